//! `unidesk replay --check`: replays every aggregate and reports each
//! stored event the current code can no longer apply, the check to run
//! before deploying a new version.
//!
//! For every aggregate the check reads its events in sequence order and
//! asks of each one:
//! - is its aggregate type known, and are the sequence numbers 1, 2, 3, …
//!   without gaps;
//! - does its payload deserialize into the current event type, is the
//!   stored type name the one the decoded event gives, and is its version
//!   one this build reads;
//! - could the current rules have produced it in the state before it
//!   (a task event before `TaskSubmitted`, a report for an attempt that is
//!   not the current one, anything but an artifact after a task ended,
//!   anything after a project was archived, …);
//! - can it be applied and summarised without a panic;
//! - is it in the outbox (without, no read model ever sees it).
//!
//! Snapshots (nodes load from them) must deserialize into the current
//! state type and equal the state replayed to the same event.
//!
//! Once an aggregate has a problem, its later events are checked for
//! decoding only: the state they would apply to is unknown.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cqrs_es::{Aggregate, DomainEvent};
use domain::node::{Node, NodeEvent, NodeStatus};
use domain::project::{Project, ProjectEvent};
use domain::task::{Task, TaskEvent, TaskState};
use domain::user::{User, UserEvent};
use futures::TryStreamExt;
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::PgPool;
use store::outbox::RecordedEvent;

use super::{diff, recorded, Kind, COLUMNS};
use crate::summary;

/// One stored event (or aggregate) the current code cannot take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The aggregate's type.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The event's sequence number; `None` for the aggregate as a whole.
    pub sequence: Option<i64>,
    /// The event's stored type.
    pub event_type: Option<String>,
    /// What is wrong.
    pub reason: String,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Aggregates checked.
    pub aggregates: u64,
    /// Events checked.
    pub events: u64,
    /// Snapshots checked.
    pub snapshots: u64,
    /// Everything wrong, in aggregate and sequence order.
    pub problems: Vec<Problem>,
}

/// Checks every event of the log and every latest snapshot.
///
/// # Errors
/// A database error; problems in the data are in the report.
pub async fn check(pool: &PgPool) -> Result<CheckReport, sqlx::Error> {
    let mut snapshots: HashMap<(String, String), (i64, Value)> = sqlx::query_as(
        "SELECT DISTINCT ON (aggregate_type, aggregate_id) aggregate_type, aggregate_id, last_sequence, payload \
         FROM snapshots ORDER BY aggregate_type, aggregate_id, last_sequence DESC",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(t, i, s, p): (String, String, i64, Value)| ((t, i), (s, p)))
    .collect();
    let mut report = CheckReport {
        snapshots: snapshots.len() as u64,
        ..CheckReport::default()
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM events e \
         ORDER BY e.aggregate_type, e.aggregate_id, e.sequence"
    );
    let mut rows = sqlx::query(&sql)
        .try_map(|row: PgRow| recorded(&row))
        .fetch(pool);
    let mut current: Option<Current> = None;
    while let Some(event) = rows.try_next().await? {
        let same = current.as_ref().is_some_and(|c| {
            c.aggregate_type == event.aggregate_type && c.aggregate_id == event.aggregate_id
        });
        if !same {
            if let Some(done) = current.take() {
                done.finish(&mut snapshots, &mut report);
            }
            report.aggregates += 1;
            current = Some(Current::new(&event, &snapshots));
        }
        report.events += 1;
        if let Some(c) = current.as_mut() {
            c.take(&event, &mut report);
        }
    }
    if let Some(done) = current.take() {
        done.finish(&mut snapshots, &mut report);
    }
    for ((t, i), (s, _)) in snapshots {
        report.problems.push(Problem {
            aggregate_type: t,
            aggregate_id: i,
            sequence: Some(s),
            event_type: None,
            reason: format!("a snapshot at #{s} of an aggregate without events"),
        });
    }
    Ok(report)
}

/// The aggregate being checked.
struct Current {
    aggregate_type: String,
    aggregate_id: String,
    /// The last sequence seen.
    last: i64,
    /// Its state so far; `None` for an unknown type.
    state: Option<Box<dyn Checked>>,
    /// Whether a problem was found: later events are only decoded.
    broken: bool,
    /// The sequence of the aggregate's latest snapshot, if any.
    snapshot_sequence: Option<i64>,
    /// The replayed state at that sequence, to compare the snapshot with.
    at_snapshot: Option<Value>,
}

impl Current {
    fn new(first: &RecordedEvent, snapshots: &HashMap<(String, String), (i64, Value)>) -> Self {
        let state: Option<Box<dyn Checked>> = match Kind::parse(&first.aggregate_type) {
            Some(Kind::Task) => Some(Box::new(Typed::<Task>::default())),
            Some(Kind::Node) => Some(Box::new(Typed::<Node>::default())),
            Some(Kind::Project) => Some(Box::new(Typed::<Project>::default())),
            Some(Kind::User) => Some(Box::new(Typed::<User>::default())),
            None => None,
        };
        Self {
            aggregate_type: first.aggregate_type.clone(),
            aggregate_id: first.aggregate_id.clone(),
            last: 0,
            state,
            broken: false,
            snapshot_sequence: snapshots
                .get(&(first.aggregate_type.clone(), first.aggregate_id.clone()))
                .map(|(s, _)| *s),
            at_snapshot: None,
        }
    }

    fn problem(&self, event: Option<&RecordedEvent>, reason: String) -> Problem {
        Problem {
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            sequence: event.map(|e| e.sequence),
            event_type: event.map(|e| e.event_type.clone()),
            reason,
        }
    }

    fn take(&mut self, event: &RecordedEvent, report: &mut CheckReport) {
        let expected = self.last + 1;
        self.last = event.sequence;
        let Some(state) = self.state.as_mut() else {
            if expected == 1 {
                let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                let reason = format!(
                    "unknown aggregate type {:?}: this build knows {}",
                    self.aggregate_type,
                    known.join(", ")
                );
                report.problems.push(self.problem(None, reason));
            }
            return;
        };
        let mut reasons = Vec::new();
        if event.sequence != expected {
            reasons.push(if expected == 1 {
                format!("the aggregate starts at #{}, not #1", event.sequence)
            } else {
                format!(
                    "#{} follows #{}: events in between are missing",
                    event.sequence,
                    expected - 1
                )
            });
        }
        if event.position == 0 {
            reasons.push("it is not in the outbox: no read model or consumer ever sees it".into());
        }
        match state.take(event, self.broken) {
            Ok(()) => {}
            Err(reason) => reasons.push(reason),
        }
        if !reasons.is_empty() {
            self.broken = true;
        }
        if self.snapshot_sequence == Some(event.sequence) && !self.broken {
            self.at_snapshot = Some(state.json());
        }
        for reason in reasons {
            report.problems.push(self.problem(Some(event), reason));
        }
    }

    /// Compares the aggregate's snapshot, if any, with the replayed state.
    fn finish(
        mut self,
        snapshots: &mut HashMap<(String, String), (i64, Value)>,
        report: &mut CheckReport,
    ) {
        let key = (self.aggregate_type.clone(), self.aggregate_id.clone());
        let Some((sequence, payload)) = snapshots.remove(&key) else {
            return;
        };
        let Some(state) = self.state.as_ref() else {
            return;
        };
        let reason = if sequence > self.last {
            Some(format!(
                "the snapshot is at #{sequence}, past the last event #{}",
                self.last
            ))
        } else {
            match state.snapshot(&payload) {
                Err(e) => Some(format!(
                    "the snapshot at #{sequence} cannot be read by this build, so the aggregate cannot be loaded: {e}"
                )),
                // The state replayed to the snapshot's sequence is known
                // unless a problem came first.
                Ok(snapshot) => match self.at_snapshot.take() {
                        Some(replayed) if replayed != snapshot => {
                            let paths: Vec<String> = diff(&replayed, &snapshot)
                                .into_iter()
                                .take(5)
                                .map(|c| c.path)
                                .collect();
                            Some(format!(
                                "the snapshot at #{sequence} differs from the state replayed to #{sequence} at {}",
                                paths.join(", ")
                            ))
                        }
                        _ => None,
                },
            }
        };
        if let Some(reason) = reason {
            let mut p = self.problem(None, reason);
            p.sequence = Some(sequence);
            report.problems.push(p);
        }
    }
}

/// An aggregate's state during the check, whatever its type.
trait Checked {
    /// Checks and applies `event`; with `decode_only`, checks that it
    /// decodes and nothing more.
    fn take(&mut self, event: &RecordedEvent, decode_only: bool) -> Result<(), String>;
    /// The state as JSON.
    fn json(&self) -> Value;
    /// A snapshot's payload, read as this state type, as JSON.
    fn snapshot(&self, payload: &Value) -> Result<Value, serde_json::Error>;
}

#[derive(Default)]
struct Typed<A>(A);

impl<A: History> Checked for Typed<A> {
    fn take(&mut self, event: &RecordedEvent, decode_only: bool) -> Result<(), String> {
        let decoded: A::Event = serde_json::from_value(event.payload.clone())
            .map_err(|e| format!("its payload does not fit {} events: {e}", A::TYPE))?;
        if decoded.event_type() != event.event_type {
            return Err(format!(
                "it is stored as {} but its payload is a {}",
                event.event_type,
                decoded.event_type()
            ));
        }
        if event.event_version != domain::EVENT_VERSION {
            return Err(format!(
                "its version {:?} is not one this build reads (it reads {:?}): an upcaster is missing",
                event.event_version,
                domain::EVENT_VERSION
            ));
        }
        if decode_only {
            return Ok(());
        }
        if let Some(reason) = self.0.illegal(&event.aggregate_id, &decoded) {
            return Err(format!(
                "the current rules would not have written it: {reason}"
            ));
        }
        let state = &mut self.0;
        catch_unwind(AssertUnwindSafe(|| state.apply(decoded)))
            .map_err(|p| format!("applying it panicked: {}", panic_message(&p)))?;
        catch_unwind(|| summary::summarize(event, None))
            .map_err(|p| format!("summarising it panicked: {}", panic_message(&p)))?
            .map_err(|e| format!("it cannot be summarised: {e}"))?;
        Ok(())
    }

    fn json(&self) -> Value {
        serde_json::to_value(&self.0).unwrap_or(Value::Null)
    }

    fn snapshot(&self, payload: &Value) -> Result<Value, serde_json::Error> {
        let state: A = serde_json::from_value(payload.clone())?;
        serde_json::to_value(&state)
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// The rules of an aggregate as they bear on history: whether the current
/// code could have written `event` in this state.
trait History: Aggregate {
    /// Why `event` could not follow this state, or `None` when it could.
    fn illegal(&self, id: &str, event: &Self::Event) -> Option<String>;
}

impl History for Task {
    fn illegal(&self, id: &str, event: &TaskEvent) -> Option<String> {
        use TaskEvent as E;
        if let E::Submitted { task_id, .. } = event {
            return if self.state != TaskState::New {
                Some("the task was submitted already".into())
            } else if task_id.to_string() != id {
                Some(format!("it submits task {task_id}, not this one"))
            } else {
                None
            };
        }
        if self.state == TaskState::New {
            return Some("the task was never submitted".into());
        }
        let current = |attempt: u32| {
            (attempt != self.attempt).then(|| {
                format!(
                    "it is for attempt {attempt}, the current attempt is {}",
                    self.attempt
                )
            })
        };
        let holding = |what: &str| {
            (!self.state.holds_node()).then(|| format!("{what} a task that is {}", self.state))
        };
        let ended = self.state.is_terminal();
        match event {
            E::ArtifactRecorded { attempt, .. } | E::ReportRefused { attempt, .. } => {
                (!self.attempts.iter().any(|a| a.number == *attempt))
                    .then(|| format!("no attempt {attempt} was ever assigned"))
            }
            _ if ended => Some(format!("the task had ended ({})", self.state)),
            E::Assigned { attempt, .. } => {
                if self.state != TaskState::Queued {
                    Some(format!("assigning a task that is {}", self.state))
                } else if *attempt != self.attempt + 1 {
                    Some(format!(
                        "it assigns attempt {attempt} after attempt {}",
                        self.attempt
                    ))
                } else {
                    None
                }
            }
            E::Accepted { attempt, .. } => current(*attempt).or_else(|| {
                (self.state != TaskState::Assigned)
                    .then(|| format!("accepting a task that is {}", self.state))
            }),
            E::Preparing { attempt, .. } => current(*attempt).or_else(|| {
                (!matches!(
                    self.state,
                    TaskState::Assigned | TaskState::Accepted | TaskState::Preparing
                ))
                .then(|| format!("preparing a task that is {}", self.state))
            }),
            E::Started { attempt, .. } => current(*attempt)
                .or_else(|| holding("starting"))
                .or_else(|| {
                    (self.state == TaskState::Running).then(|| "it was running already".into())
                }),
            E::Succeeded { attempt, .. }
            | E::TimedOut { attempt, .. }
            | E::Lost { attempt, .. } => current(*attempt).or_else(|| holding("ending")),
            E::Failed {
                attempt: Some(attempt),
                ..
            }
            | E::Cancelled {
                attempt: Some(attempt),
                ..
            } => current(*attempt).or_else(|| holding("ending")),
            E::Failed { attempt: None, .. } | E::Cancelled { attempt: None, .. } => {
                (self.state != TaskState::Queued).then(|| {
                    format!(
                        "ending a task without an attempt while it is {}",
                        self.state
                    )
                })
            }
            E::CancelRequested { .. } => (self.state != TaskState::Queued
                && !self.state.holds_node())
            .then(|| format!("cancelling a task that is {}", self.state)),
            E::Requeued {
                previous_attempt, ..
            } => current(*previous_attempt).or_else(|| {
                let lost = self
                    .attempts
                    .last()
                    .is_some_and(|a| a.outcome.as_deref() == Some("lost"));
                (!lost).then(|| "requeued, but its attempt was not lost".into())
            }),
            _ => None,
        }
    }
}

impl History for Node {
    fn illegal(&self, id: &str, event: &NodeEvent) -> Option<String> {
        use NodeEvent as E;
        if let E::Provisioned { node_id, .. } = event {
            return if self.status != NodeStatus::New {
                Some("the node was provisioned already".into())
            } else if node_id.to_string() != id {
                Some(format!("it provisions node {node_id}, not this one"))
            } else {
                None
            };
        }
        if self.status == NodeStatus::New {
            return Some("the node was never provisioned".into());
        }
        let revoked = self.status == NodeStatus::Revoked;
        match event {
            E::Connected { .. }
            | E::Drained { .. }
            | E::Undrained { .. }
            | E::LabelsSet { .. }
            | E::DeclaredLabelsAccepted { .. }
            | E::LimitsSet { .. }
                if revoked =>
            {
                Some("the node's token was revoked".into())
            }
            E::HostSshRequested { .. } if self.status != NodeStatus::Online => {
                Some(format!("the node was not online ({:?})", self.status))
            }
            E::HostSshFinished { request_id, .. } if !self.host_ssh.contains_key(request_id) => {
                Some(format!("no host SSH request {request_id} was open"))
            }
            E::Disconnected { session, .. } if self.session != Some(*session) => {
                Some(format!("session {session} is not the node's session"))
            }
            E::MarkedOffline { .. } if self.status != NodeStatus::Online => {
                Some(format!("the node was not online ({:?})", self.status))
            }
            E::Drained { .. } if self.drained => Some("the node was drained already".into()),
            E::Undrained { .. } if !self.drained => Some("the node was not drained".into()),
            _ => None,
        }
    }
}

impl History for Project {
    fn illegal(&self, id: &str, event: &ProjectEvent) -> Option<String> {
        use ProjectEvent as E;
        if let E::Created { project_id, .. } = event {
            return if self.id.is_some() {
                Some("the project was created already".into())
            } else if project_id.to_string() != id {
                Some(format!("it creates project {project_id}, not this one"))
            } else {
                None
            };
        }
        if self.id.is_none() {
            return Some("the project was never created".into());
        }
        if self.archived {
            return Some("the project was archived".into());
        }
        match event {
            E::MemberRemoved { user, .. } if self.role_of(user).is_none() => {
                Some(format!("{user} was not a member"))
            }
            _ => None,
        }
    }
}

impl History for User {
    fn illegal(&self, id: &str, event: &UserEvent) -> Option<String> {
        use UserEvent as E;
        match event {
            E::Created { name, .. } if self.exists() => {
                Some(format!("user {name} was created already"))
            }
            E::Created { name, .. } if name != id => {
                Some(format!("it creates user {name}, not this one"))
            }
            E::Created { .. } => None,
            _ if !self.exists() => Some("the user was never created".into()),
            E::TokenRevoked { token_id, .. } if !self.tokens.contains_key(token_id) => {
                Some(format!("no token {token_id} was issued"))
            }
            _ => None,
        }
    }
}
