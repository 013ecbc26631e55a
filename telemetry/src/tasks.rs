//! How long tasks wait: from submission to their first assignment, and
//! from an attempt's assignment until its container runs.
//!
//! Both are computed from the events once the tasks read model has
//! committed them ([`LatencyObserver`]), by whichever process applied the
//! batch: the projector role, or a scheduler catching the read models up
//! before its round. The times are the ones the events record (the API's
//! when the task was submitted, the scheduler's when it assigned, the
//! ingress's when the agent said running), not when some process happened
//! to notice, so they are right whichever processes run the roles, however
//! many there are, and however late the read model catches up. Each batch
//! is committed once, under its checkpoint's row lock, so each transition
//! is observed once across all processes: sum the histograms across
//! instances. A rebuild observes nothing (it replays history), and neither
//! does a process that crashed between a commit and its observation.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use domain::task::{Task, TaskEvent};
use futures::future::BoxFuture;
use prometheus::{Histogram, HistogramOpts, Registry};
use sqlx::PgPool;
use store::outbox::RecordedEvent;
use uuid::Uuid;

/// Upper bounds of the latency buckets, in seconds: from a scheduler round
/// to an image built from scratch.
pub const BUCKETS: [f64; 15] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
];

/// The two histograms. Cheap to clone; clones share the counts.
#[derive(Debug, Clone)]
pub struct TaskLatencies {
    submit_to_assign: Histogram,
    assign_to_running: Histogram,
}

impl TaskLatencies {
    pub(crate) fn new() -> Self {
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()))
                .expect("a valid histogram definition")
        };
        Self {
            submit_to_assign: histogram(
                "unidesk_task_submit_to_assign_seconds",
                "Time from a task's submission to its first assignment to a node (from the events' own times; observed where the tasks read model applied them).",
            ),
            assign_to_running: histogram(
                "unidesk_task_assign_to_running_seconds",
                "Time from an attempt's assignment to its container running (from the events' own times; observed where the tasks read model applied them).",
            ),
        }
    }

    pub(crate) fn register(&self, registry: &Registry) {
        crate::register(registry, self.submit_to_assign.clone());
        crate::register(registry, self.assign_to_running.clone());
    }
}

/// Seconds from `from` to `to`; 0 when the clocks of the processes that
/// recorded them disagree that much.
fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    ((to - from).num_microseconds().unwrap_or(0) as f64 / 1e6).max(0.0)
}

/// A transition the histograms count.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Transition {
    /// Attempt 1 was assigned at this time.
    FirstAssigned(DateTime<Utc>),
    /// Attempt `.0`'s container started at this time.
    Started(u32, DateTime<Utc>),
}

/// The transition `event` records, if the histograms count it.
fn transition(event: &RecordedEvent) -> Option<(Uuid, Transition)> {
    if event.aggregate_type != "task"
        || !matches!(event.event_type.as_str(), "TaskAssigned" | "TaskStarted")
    {
        return None;
    }
    let task: Uuid = event.aggregate_id.parse().ok()?;
    match serde_json::from_value::<TaskEvent>(event.payload.clone()).ok()? {
        TaskEvent::Assigned { attempt: 1, at, .. } => Some((task, Transition::FirstAssigned(at))),
        TaskEvent::Started { attempt, at, .. } => Some((task, Transition::Started(attempt, at))),
        _ => None,
    }
}

/// How long the transition took, from the earlier time `task` records.
fn latency(task: &Task, t: Transition) -> Option<f64> {
    match t {
        Transition::FirstAssigned(at) => Some(seconds(task.submitted_at?, at)),
        Transition::Started(attempt, at) => {
            let a = task.attempts.iter().find(|a| a.number == attempt)?;
            Some(seconds(a.assigned_at, at))
        }
    }
}

/// Fills [`TaskLatencies`] from the batches the tasks read model commits.
pub(crate) struct LatencyObserver {
    pool: PgPool,
    latencies: TaskLatencies,
}

impl LatencyObserver {
    pub(crate) fn new(pool: PgPool, latencies: TaskLatencies) -> Self {
        Self { pool, latencies }
    }

    async fn observe(&self, events: &[RecordedEvent]) {
        let found: Vec<(Uuid, Transition)> = events.iter().filter_map(transition).collect();
        if found.is_empty() {
            return;
        }
        let ids: Vec<Uuid> = found
            .iter()
            .map(|(id, _)| *id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        // The earlier times (submission, assignment) may lie in an older
        // batch: the read model has them all.
        let tasks: HashMap<Uuid, Task> = match projections::read::tasks::by_ids(&self.pool, &ids)
            .await
        {
            Ok(tasks) => tasks.into_iter().filter_map(|t| Some((t.id?, t))).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read tasks for their latencies; skipping them");
                return;
            }
        };
        for (id, t) in found {
            let Some(seconds) = tasks.get(&id).and_then(|task| latency(task, t)) else {
                continue;
            };
            match t {
                Transition::FirstAssigned(_) => self.latencies.submit_to_assign.observe(seconds),
                Transition::Started(..) => self.latencies.assign_to_running.observe(seconds),
            }
        }
    }
}

impl projections::Observer for LatencyObserver {
    fn committed<'a>(
        &'a self,
        projection: &'static str,
        events: &'a [RecordedEvent],
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if projection == projections::read::tasks::CHECKPOINT {
                self.observe(events).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    fn recorded(task: Uuid, event: &TaskEvent) -> RecordedEvent {
        use cqrs_es::DomainEvent;
        RecordedEvent {
            position: 1,
            txid: 1,
            aggregate_type: "task".into(),
            aggregate_id: task.to_string(),
            sequence: 1,
            event_type: event.event_type(),
            event_version: event.event_version(),
            payload: serde_json::to_value(event).unwrap(),
            metadata: serde_json::json!({}),
            recorded_at: at(0),
        }
    }

    #[test]
    fn the_first_assignment_and_every_start_are_transitions_and_later_assignments_are_not() {
        let id = Uuid::new_v4();
        let node = Uuid::new_v4();
        let assigned = |attempt| TaskEvent::Assigned {
            node_id: node,
            attempt,
            gpus: vec![],
            reason: "fits".into(),
            term: None,
            capacity: None,
            at: at(7),
        };
        assert_eq!(
            transition(&recorded(id, &assigned(1))),
            Some((id, Transition::FirstAssigned(at(7))))
        );
        assert_eq!(transition(&recorded(id, &assigned(2))), None);
        let started = TaskEvent::Started {
            attempt: 2,
            container: "c".into(),
            at: at(9),
        };
        assert_eq!(
            transition(&recorded(id, &started)),
            Some((id, Transition::Started(2, at(9))))
        );
    }

    #[test]
    fn latencies_run_from_the_earlier_time_the_task_records_and_never_below_zero() {
        let mut task = Task {
            submitted_at: Some(at(10)),
            ..Task::default()
        };
        assert_eq!(latency(&task, Transition::FirstAssigned(at(13))), Some(3.0));
        assert_eq!(latency(&task, Transition::FirstAssigned(at(8))), Some(0.0));
        task.attempts.push(domain::task::Attempt {
            number: 1,
            node_id: Uuid::new_v4(),
            assigned_at: at(20),
            started_at: None,
            ended_at: None,
            outcome: None,
            gpus: vec![],
        });
        assert_eq!(latency(&task, Transition::Started(1, at(50))), Some(30.0));
        assert_eq!(latency(&task, Transition::Started(2, at(50))), None);
    }
}
