//! How long tasks wait: from submission to their first assignment, and
//! from an attempt's assignment until its container runs.
//!
//! Both are computed from the events once the tasks read model has
//! committed them (`LatencyObserver`), by whichever process applied the
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
//!
//! The earlier time of a transition (the submission's, the attempt's
//! assignment) usually lies in a batch the same observer committed a
//! moment before: it is remembered from there (`Earlier`), and the read
//! model is read only for the transitions whose earlier time this process
//! did not see or no longer remembers.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use domain::task::Task;
use futures::future::BoxFuture;
use hashlink::LruCache;
use prometheus::{Histogram, HistogramOpts, Registry};
use serde::Deserialize;
use sqlx::PgPool;
use store::outbox::RecordedEvent;
use uuid::Uuid;

/// Upper bounds of the latency buckets, in seconds: from a scheduler round
/// to an image built from scratch.
pub const BUCKETS: [f64; 15] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
];

/// How many earlier times an observer remembers: the submissions of tasks
/// still waiting for their first assignment and the assignments of
/// attempts whose containers have not started yet. Beyond that the least
/// recently noted is forgotten, and read back from the read model if its
/// transition comes.
pub const REMEMBERED: usize = 10_000;

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

/// What a task event records about the histograms' transitions.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Noted {
    /// The task was submitted at this time.
    Submitted(DateTime<Utc>),
    /// Attempt `.0` was assigned at this time.
    Assigned(u32, DateTime<Utc>),
    /// Attempt `.0`'s container started at this time.
    Started(u32, DateTime<Utc>),
}

/// What `event` records about the histograms' transitions, if anything.
fn noted(event: &RecordedEvent) -> Option<(Uuid, Noted)> {
    if event.aggregate_type != "task"
        || !matches!(
            event.event_type.as_str(),
            "TaskSubmitted" | "TaskAssigned" | "TaskStarted"
        )
    {
        return None;
    }
    let task: Uuid = event.aggregate_id.parse().ok()?;
    match Times::deserialize(&event.payload).ok()? {
        Times::Submitted { at } => Some((task, Noted::Submitted(at))),
        Times::Assigned { attempt, at } => Some((task, Noted::Assigned(attempt, at))),
        Times::Started { attempt, at } => Some((task, Noted::Started(attempt, at))),
    }
}

/// The fields of [`domain::task::TaskEvent`]'s variants the histograms read, decoded
/// without the rest (a submission's whole specification, say).
#[derive(Deserialize)]
enum Times {
    Submitted { at: DateTime<Utc> },
    Assigned { attempt: u32, at: DateTime<Utc> },
    Started { attempt: u32, at: DateTime<Utc> },
}

/// The transition `event` records, if the histograms count it.
#[cfg(test)]
fn transition(event: &RecordedEvent) -> Option<(Uuid, Transition)> {
    let (task, noted) = noted(event)?;
    match noted {
        Noted::Assigned(1, at) => Some((task, Transition::FirstAssigned(at))),
        Noted::Started(attempt, at) => Some((task, Transition::Started(attempt, at))),
        _ => None,
    }
}

/// The earlier times of transitions to come, as the events an observer
/// committed recorded them: keyed by task and attempt, attempt 0 being the
/// submission. Each is forgotten once its transition is observed (each
/// happens once), and the least recently noted beyond the bound.
struct Earlier {
    times: LruCache<(Uuid, u32), DateTime<Utc>>,
}

impl Earlier {
    fn new(most: usize) -> Self {
        Self {
            times: LruCache::new(most.max(1)),
        }
    }

    /// Notes the earlier times `events` record and returns the transitions
    /// they record, in order, each with its latency when its earlier time
    /// was noted here (in this batch or an earlier one), else `None`.
    fn read(&mut self, events: &[RecordedEvent]) -> Vec<(Uuid, Transition, Option<f64>)> {
        let mut found = Vec::new();
        for (task, noted) in events.iter().filter_map(noted) {
            match noted {
                Noted::Submitted(at) => self.note(task, 0, at),
                Noted::Assigned(attempt, at) => {
                    if attempt == 1 {
                        let since = self.times.remove(&(task, 0));
                        found.push((
                            task,
                            Transition::FirstAssigned(at),
                            since.map(|s| seconds(s, at)),
                        ));
                    }
                    self.note(task, attempt, at);
                }
                Noted::Started(attempt, at) => {
                    let since = self.times.remove(&(task, attempt));
                    found.push((
                        task,
                        Transition::Started(attempt, at),
                        since.map(|s| seconds(s, at)),
                    ));
                }
            }
        }
        found
    }

    /// Remembers `at` for `task`'s `attempt`; the first time noted stays,
    /// as the task's state keeps the first attempt of a number.
    fn note(&mut self, task: Uuid, attempt: u32, at: DateTime<Utc>) {
        if !self.times.contains_key(&(task, attempt)) {
            self.times.insert((task, attempt), at);
        }
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
    earlier: Mutex<Earlier>,
}

impl LatencyObserver {
    pub(crate) fn new(pool: PgPool, latencies: TaskLatencies) -> Self {
        Self {
            pool,
            latencies,
            earlier: Mutex::new(Earlier::new(REMEMBERED)),
        }
    }

    fn count(&self, t: Transition, seconds: f64) {
        match t {
            Transition::FirstAssigned(_) => self.latencies.submit_to_assign.observe(seconds),
            Transition::Started(..) => self.latencies.assign_to_running.observe(seconds),
        }
    }

    async fn observe(&self, events: &[RecordedEvent]) {
        let found = self
            .earlier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(events);
        let mut unknown = Vec::new();
        for (id, t, seconds) in found {
            match seconds {
                Some(seconds) => self.count(t, seconds),
                None => unknown.push((id, t)),
            }
        }
        if unknown.is_empty() {
            return;
        }
        let ids: Vec<Uuid> = unknown
            .iter()
            .map(|(id, _)| *id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        // The earlier times (submission, assignment) lie in a batch this
        // process did not commit, or has forgotten: the read model has
        // them all.
        let tasks: HashMap<Uuid, Task> = match projections::read::tasks::by_ids(&self.pool, &ids)
            .await
        {
            Ok(tasks) => tasks.into_iter().filter_map(|t| Some((t.id?, t))).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read tasks for their latencies; skipping them");
                return;
            }
        };
        for (id, t) in unknown {
            if let Some(seconds) = tasks.get(&id).and_then(|task| latency(task, t)) {
                self.count(t, seconds);
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
    use domain::task::TaskEvent;

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
            reason: None,
            gpus: vec![],
        });
        assert_eq!(latency(&task, Transition::Started(1, at(50))), Some(30.0));
        assert_eq!(latency(&task, Transition::Started(2, at(50))), None);
    }

    fn submitted(task: Uuid, s: i64) -> TaskEvent {
        TaskEvent::Submitted {
            task_id: task,
            spec: Box::new(testkit::spec(testkit::spec_draft(Uuid::new_v4()))),
            by: domain::Actor::User("alice".into()),
            at: at(s),
        }
    }

    fn assigned(attempt: u32, s: i64) -> TaskEvent {
        TaskEvent::Assigned {
            node_id: Uuid::new_v4(),
            attempt,
            gpus: vec![],
            reason: "fits".into(),
            term: None,
            capacity: None,
            at: at(s),
        }
    }

    fn started(attempt: u32, s: i64) -> TaskEvent {
        TaskEvent::Started {
            attempt,
            container: "c".into(),
            at: at(s),
        }
    }

    #[test]
    fn earlier_times_noted_in_past_batches_give_the_latencies_the_task_state_would() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut earlier = Earlier::new(REMEMBERED);
        // Batch 1: both submitted; a assigned in the same batch.
        let found = earlier.read(&[
            recorded(a, &submitted(a, 10)),
            recorded(b, &submitted(b, 11)),
            recorded(a, &assigned(1, 13)),
        ]);
        assert_eq!(
            found,
            vec![(a, Transition::FirstAssigned(at(13)), Some(3.0))]
        );
        // Batch 2: b assigned, a started, a retried as attempt 2.
        let found = earlier.read(&[
            recorded(b, &assigned(1, 21)),
            recorded(a, &started(1, 30)),
            recorded(a, &assigned(2, 40)),
            recorded(a, &started(2, 45)),
        ]);
        assert_eq!(
            found,
            vec![
                (b, Transition::FirstAssigned(at(21)), Some(10.0)),
                (a, Transition::Started(1, at(30)), Some(17.0)),
                (a, Transition::Started(2, at(45)), Some(5.0)),
            ]
        );
        // What the task's own state gives for the same transitions.
        let mut task = Task::default();
        for e in [
            submitted(a, 10),
            assigned(1, 13),
            started(1, 30),
            assigned(2, 40),
        ] {
            cqrs_es::Aggregate::apply(&mut task, e);
        }
        assert_eq!(latency(&task, Transition::FirstAssigned(at(13))), Some(3.0));
        assert_eq!(latency(&task, Transition::Started(1, at(30))), Some(17.0));
        assert_eq!(latency(&task, Transition::Started(2, at(45))), Some(5.0));
        // Each transition happens once: what it used is forgotten, and
        // only b's assignment, whose container has not started, remains.
        assert_eq!(earlier.times.len(), 1);
        assert_eq!(earlier.times.get(&(b, 1)), Some(&at(21)));
    }

    #[test]
    fn a_transition_whose_earlier_time_was_not_seen_or_was_forgotten_is_left_to_the_read_model() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut earlier = Earlier::new(2);
        // a's submission was committed by another process; b's is
        // forgotten once two later ones are noted.
        earlier.read(&[
            recorded(b, &submitted(b, 1)),
            recorded(c, &submitted(c, 2)),
            recorded(c, &assigned(1, 3)),
            recorded(c, &assigned(2, 4)),
        ]);
        let found = earlier.read(&[
            recorded(c, &started(2, 9)),
            recorded(a, &assigned(1, 5)),
            recorded(b, &assigned(1, 6)),
            recorded(a, &started(7, 9)),
        ]);
        assert_eq!(
            found,
            vec![
                (c, Transition::Started(2, at(9)), Some(5.0)),
                (a, Transition::FirstAssigned(at(5)), None),
                (b, Transition::FirstAssigned(at(6)), None),
                (a, Transition::Started(7, at(9)), None),
            ]
        );
        // Neither undecodable payloads nor other aggregates count.
        let mut odd = recorded(a, &started(1, 9));
        odd.payload = serde_json::json!({"Started": {"attempt": "one"}});
        let mut node = recorded(a, &started(1, 9));
        node.aggregate_type = "node".into();
        assert!(earlier.read(&[odd, node]).is_empty());
    }
}
