//! What happened to a task.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::spec::TaskSpec;
use crate::Actor;

/// The CPU and memory a node could give when the scheduler placed an
/// attempt on it (what its agent declared, capped by an admin's maximum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// CPU in thousandths of a core.
    pub millicpus: u64,
    /// Memory in MiB.
    pub memory_mb: u64,
}

/// The events of a task, past tense; stored ones are never edited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskEvent {
    /// A user submitted the task; it is queued.
    Submitted {
        /// The task's id.
        task_id: Uuid,
        /// What to run.
        spec: Box<TaskSpec>,
        /// Who submitted it.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// The scheduler placed attempt `attempt` on `node_id`.
    Assigned {
        /// The node chosen.
        node_id: Uuid,
        /// The attempt's number, from 1.
        attempt: u32,
        /// The node's GPU device indices reserved for this attempt; no other
        /// attempt gets them while this one holds the node.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gpus: Vec<u32>,
        /// Why this node, for the timeline.
        reason: String,
        /// The term of the scheduler leader that made the assignment: the
        /// store refuses it once another leader has taken over. Absent in
        /// assignments made outside a leader's term (tools, tests) and in
        /// events written before leaders had terms.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        term: Option<u64>,
        /// What the node could give, as the scheduler saw it: the store
        /// refuses the assignment when the node's attempts would hold more.
        /// Absent where `term` is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        capacity: Option<Capacity>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The node took the attempt on.
    Accepted {
        /// The attempt.
        attempt: u32,
        /// When.
        at: DateTime<Utc>,
    },
    /// The node is fetching code, building the image or downloading inputs.
    Preparing {
        /// The attempt.
        attempt: u32,
        /// Which step, such as `fetching code` or `building image`.
        stage: String,
        /// What the step found, such as `from cache` or `fetched 12
        /// objects (3.1 KiB)`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The container started.
    Started {
        /// The attempt.
        attempt: u32,
        /// The container's id on the node.
        container: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The command exited with status 0.
    Succeeded {
        /// The attempt.
        attempt: u32,
        /// When.
        at: DateTime<Utc>,
    },
    /// The task failed; it will not run again.
    Failed {
        /// The attempt that failed, if one had started.
        attempt: Option<u32>,
        /// The command's exit status, when it ran.
        exit_code: Option<i64>,
        /// Why, in words a person can act on.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The attempt ran longer than the task's `timeout_s`.
    TimedOut {
        /// The attempt.
        attempt: u32,
        /// Who noticed: the node or the server's watchdog.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Somebody asked for the task to stop.
    CancelRequested {
        /// Who asked.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// The task stopped after a cancel request.
    Cancelled {
        /// The attempt that was stopped, if one had been assigned.
        attempt: Option<u32>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The node running the attempt went away.
    Lost {
        /// The node.
        node_id: Uuid,
        /// The attempt.
        attempt: u32,
        /// Why the platform gave the attempt up.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The task is queued again after a lost attempt.
    Requeued {
        /// The attempt that ended; the next one is `previous_attempt + 1`.
        previous_attempt: u32,
        /// The next attempt is not placed before this time (the retry
        /// backoff); absent in events written before backoff existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_before: Option<DateTime<Utc>>,
        /// When.
        at: DateTime<Utc>,
    },
    /// An output file was stored.
    ArtifactRecorded {
        /// The attempt that produced it.
        attempt: u32,
        /// The output's name from the spec.
        name: String,
        /// The object's key in the store.
        key: String,
        /// Bytes.
        size: u64,
        /// Hex SHA-256 of the content.
        sha256: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// A report of the attempt's node was refused for good: it could never
    /// be stored. The node was told and will not send it again.
    ReportRefused {
        /// The reporting node.
        node_id: Uuid,
        /// The attempt the report was about.
        attempt: u32,
        /// The report's id on the node.
        report: u64,
        /// The state it reported, such as `failed`.
        state: String,
        /// Why, written by the platform.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
}

impl DomainEvent for TaskEvent {
    fn event_type(&self) -> String {
        match self {
            TaskEvent::Submitted { .. } => "TaskSubmitted",
            TaskEvent::Assigned { .. } => "TaskAssigned",
            TaskEvent::Accepted { .. } => "TaskAccepted",
            TaskEvent::Preparing { .. } => "TaskPreparing",
            TaskEvent::Started { .. } => "TaskStarted",
            TaskEvent::Succeeded { .. } => "TaskSucceeded",
            TaskEvent::Failed { .. } => "TaskFailed",
            TaskEvent::TimedOut { .. } => "TaskTimedOut",
            TaskEvent::CancelRequested { .. } => "TaskCancelRequested",
            TaskEvent::Cancelled { .. } => "TaskCancelled",
            TaskEvent::Lost { .. } => "TaskLost",
            TaskEvent::Requeued { .. } => "TaskRequeued",
            TaskEvent::ArtifactRecorded { .. } => "TaskArtifactRecorded",
            TaskEvent::ReportRefused { .. } => "TaskReportRefused",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
