//! A task's state, rebuilt from its events.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::TaskEvent;
use crate::spec::TaskSpec;
use crate::Actor;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Not submitted: the state of an empty aggregate.
    #[default]
    New,
    /// Waiting for a node.
    Queued,
    /// Placed on a node, not yet acknowledged by it.
    Assigned,
    /// The node took it on.
    Accepted,
    /// The node is fetching code, building the image or fetching inputs.
    Preparing,
    /// The container runs.
    Running,
    /// Ended with exit status 0.
    Succeeded,
    /// Ended in failure.
    Failed,
    /// Ran past its time limit.
    TimedOut,
    /// Stopped on request.
    Cancelled,
}

impl TaskState {
    /// Every state, in life order.
    pub const ALL: [TaskState; 10] = [
        TaskState::New,
        TaskState::Queued,
        TaskState::Assigned,
        TaskState::Accepted,
        TaskState::Preparing,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::TimedOut,
        TaskState::Cancelled,
    ];

    /// The state's name as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::New => "new",
            TaskState::Queued => "queued",
            TaskState::Assigned => "assigned",
            TaskState::Accepted => "accepted",
            TaskState::Preparing => "preparing",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::TimedOut => "timed_out",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Parses a name written by [`TaskState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the task has ended for good.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::TimedOut | TaskState::Cancelled
        )
    }

    /// Whether an attempt holds a node: assigned, accepted, preparing or running.
    pub fn holds_node(self) -> bool {
        matches!(
            self,
            TaskState::Assigned | TaskState::Accepted | TaskState::Preparing | TaskState::Running
        )
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One try at running the task on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// The attempt's number, from 1.
    pub number: u32,
    /// The node it was placed on.
    pub node_id: Uuid,
    /// When it was placed.
    pub assigned_at: DateTime<Utc>,
    /// When its container started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// How it ended: a task state name or `lost`.
    pub outcome: Option<String>,
    /// Why it ended, when it did not succeed (absent in states stored
    /// before attempts kept it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The node's GPU device indices it holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<u32>,
}

/// A stored output of the task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// Its id: the same for the same task, attempt and name
    /// ([`Artifact::id_for`]); absent in states stored before ids existed.
    #[serde(default)]
    pub id: Uuid,
    /// The attempt that produced it.
    pub attempt: u32,
    /// The output's name.
    pub name: String,
    /// The object key.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// Hex SHA-256.
    pub sha256: String,
}

impl Artifact {
    /// The id of output `name` of `attempt` of task `task_id`: derived, so
    /// a recorded output keeps its id when the log is replayed.
    pub fn id_for(task_id: Uuid, attempt: u32, name: &str) -> Uuid {
        Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("unidesk/artifact/{task_id}/{attempt}/{name}").as_bytes(),
        )
    }
}

/// A report of a node that was refused for good, recorded once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedReport {
    /// The attempt it was about.
    pub attempt: u32,
    /// Its id on the node.
    pub report: u64,
}

/// The Task aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The task's id; `None` before submission.
    pub id: Option<Uuid>,
    /// What to run.
    pub spec: Option<TaskSpec>,
    /// Who submitted it.
    pub submitted_by: Option<Actor>,
    /// Where it is in its life.
    pub state: TaskState,
    /// The current attempt's number; 0 before the first assignment.
    pub attempt: u32,
    /// The node holding the current attempt, while one does.
    pub node_id: Option<Uuid>,
    /// The stage reported while preparing.
    pub stage: Option<String>,
    /// What the current stage found, such as `from cache`.
    #[serde(default)]
    pub stage_detail: Option<String>,
    /// A requeued task is not placed before this time (retry backoff).
    #[serde(default)]
    pub not_before: Option<DateTime<Utc>>,
    /// The container of the current attempt.
    pub container: Option<String>,
    /// Whether a cancel was asked for.
    pub cancel_requested: bool,
    /// The exit status, once known.
    pub exit_code: Option<i64>,
    /// Why the task ended as it did, when it did not succeed.
    pub reason: Option<String>,
    /// Every attempt so far.
    pub attempts: Vec<Attempt>,
    /// Stored outputs.
    pub artifacts: Vec<Artifact>,
    /// Reports refused for good and recorded, at most
    /// [`super::MAX_REFUSED_REPORTS`]. Defaulted so states stored before
    /// the field still load.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_reports: Vec<RefusedReport>,
    /// When it was submitted.
    pub submitted_at: Option<DateTime<Utc>>,
    /// When its current attempt's container started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// When it last changed.
    pub updated_at: Option<DateTime<Utc>>,
}

impl Task {
    /// Applies one event. Events are facts: this never fails.
    pub fn apply_event(&mut self, event: TaskEvent) {
        match event {
            TaskEvent::Submitted {
                task_id,
                spec,
                by,
                at,
            } => {
                self.id = Some(task_id);
                self.spec = Some(*spec);
                self.submitted_by = Some(by);
                self.state = TaskState::Queued;
                self.submitted_at = Some(at);
                self.updated_at = Some(at);
            }
            TaskEvent::Assigned {
                node_id,
                attempt,
                gpus,
                at,
                ..
            } => {
                self.state = TaskState::Assigned;
                self.attempt = attempt;
                self.node_id = Some(node_id);
                self.not_before = None;
                self.stage = None;
                self.stage_detail = None;
                self.container = None;
                self.started_at = None;
                self.attempts.push(Attempt {
                    number: attempt,
                    node_id,
                    assigned_at: at,
                    started_at: None,
                    ended_at: None,
                    outcome: None,
                    reason: None,
                    gpus,
                });
                self.updated_at = Some(at);
            }
            TaskEvent::Accepted { at, .. } => {
                self.state = TaskState::Accepted;
                self.updated_at = Some(at);
            }
            TaskEvent::Preparing {
                stage, detail, at, ..
            } => {
                self.state = TaskState::Preparing;
                self.stage = Some(stage);
                self.stage_detail = detail;
                self.updated_at = Some(at);
            }
            TaskEvent::Started { container, at, .. } => {
                self.state = TaskState::Running;
                self.container = Some(container);
                self.started_at = Some(at);
                if let Some(a) = self.attempts.last_mut() {
                    a.started_at = Some(at);
                }
                self.updated_at = Some(at);
            }
            TaskEvent::Succeeded { at, .. } => {
                self.exit_code = Some(0);
                self.finish(TaskState::Succeeded, at);
            }
            TaskEvent::Failed {
                exit_code,
                reason,
                at,
                ..
            } => {
                self.exit_code = exit_code;
                self.reason = Some(reason);
                self.finish(TaskState::Failed, at);
            }
            TaskEvent::TimedOut { at, .. } => {
                self.reason = Some(match self.spec.as_ref().and_then(|s| s.timeout_s) {
                    Some(t) => format!("ran longer than its timeout of {t} s"),
                    None => "ran longer than its timeout".into(),
                });
                self.finish(TaskState::TimedOut, at);
            }
            TaskEvent::CancelRequested { at, .. } => {
                self.cancel_requested = true;
                self.updated_at = Some(at);
            }
            TaskEvent::Cancelled { at, .. } => {
                self.reason = Some("cancelled on request".into());
                self.finish(TaskState::Cancelled, at);
            }
            TaskEvent::Lost { reason, at, .. } => {
                self.reason = Some(reason);
                self.end_attempt("lost", at);
                self.node_id = None;
                self.updated_at = Some(at);
            }
            TaskEvent::Requeued { not_before, at, .. } => {
                self.state = TaskState::Queued;
                self.not_before = not_before;
                self.stage = None;
                self.stage_detail = None;
                self.container = None;
                self.started_at = None;
                self.updated_at = Some(at);
            }
            TaskEvent::ArtifactRecorded {
                attempt,
                name,
                key,
                size,
                sha256,
                at,
            } => {
                let id = Artifact::id_for(self.id.unwrap_or_default(), attempt, &name);
                self.artifacts.push(Artifact {
                    id,
                    attempt,
                    name,
                    key,
                    size,
                    sha256,
                });
                self.updated_at = Some(at);
            }
            // Says something about a report, not about the task: the task
            // is as it was.
            TaskEvent::ReportRefused {
                attempt, report, ..
            } => self.refused_reports.push(RefusedReport { attempt, report }),
        }
    }

    /// Ends the current attempt, if it has not ended, with `outcome` and
    /// the task's reason (set first by the caller; none for a success).
    fn end_attempt(&mut self, outcome: &str, at: DateTime<Utc>) {
        let reason = (outcome != TaskState::Succeeded.as_str())
            .then(|| self.reason.clone())
            .flatten();
        if let Some(a) = self.attempts.last_mut() {
            if a.ended_at.is_none() {
                a.ended_at = Some(at);
                a.outcome = Some(outcome.to_string());
                a.reason = reason;
            }
        }
    }

    fn finish(&mut self, state: TaskState, at: DateTime<Utc>) {
        self.end_attempt(state.as_str(), at);
        self.state = state;
        self.finished_at = Some(at);
        self.updated_at = Some(at);
    }

    /// The GPU device indices the current attempt holds on its node; empty
    /// when no attempt holds a node.
    pub fn gpus(&self) -> &[u32] {
        match self.attempts.last() {
            Some(a) if self.state.holds_node() => &a.gpus,
            _ => &[],
        }
    }

    /// How many more attempts the task may have after the current one.
    pub fn retries_left(&self) -> u32 {
        let allowed = self.spec.as_ref().map_or(0, |s| s.max_retries) + 1;
        allowed.saturating_sub(self.attempt)
    }
}
