//! Why a task command was refused.

use uuid::Uuid;

use super::TaskState;

/// A refused task command. Nothing is appended when one is returned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TaskError {
    /// The task was never submitted.
    #[error("task not found")]
    NotFound,
    /// A task with this id exists already.
    #[error("task already exists")]
    AlreadyExists,
    /// The command does not apply in the task's current state.
    #[error("cannot {action} a task that is {state}")]
    InvalidTransition {
        /// The state the task is in.
        state: TaskState,
        /// What was attempted.
        action: &'static str,
    },
    /// A report names an attempt that is not the current one.
    #[error("attempt {reported} is not current (current attempt is {current})")]
    StaleAttempt {
        /// The task's current attempt.
        current: u32,
        /// The attempt named by the report.
        reported: u32,
    },
    /// A report came from a node the attempt is not assigned to.
    #[error("attempt is assigned to node {assigned}, not {reporter}")]
    WrongNode {
        /// The node the attempt belongs to.
        assigned: Uuid,
        /// The node that reported.
        reporter: Uuid,
    },
    /// A placement that does not fit the task (the scheduler's mistake).
    #[error("invalid assignment: {0}")]
    InvalidAssignment(String),
    /// The store refused an assignment: it names a scheduler leader's term
    /// that is no longer current (another scheduler took over), or names
    /// none while a leader holds the lease. The scheduler that made it
    /// must stand down.
    #[error("assignment fenced off: {0}")]
    Fenced(String),
    /// The store could not reserve what the assignment needs on its node:
    /// a GPU device is held by another attempt, or the node's CPU or memory
    /// would be exceeded.
    #[error("resources not reserved: {0}")]
    NotReserved(String),
    /// A report contradicts one already recorded for the same attempt.
    #[error("attempt {attempt} already ended differently: {outcome}")]
    ConflictingReport {
        /// The attempt.
        attempt: u32,
        /// What was recorded before.
        outcome: String,
    },
}
