//! The Task aggregate: one unit of work from submission to its end.
//!
//! ```text
//! queued → assigned → accepted → preparing → running → succeeded
//!    ▲                                          │      failed | timed_out | cancelled
//!    └──────── requeued ◄── lost ◄──────────────┘
//! ```
//!
//! Every report from a node names its attempt; reports for an attempt that
//! is no longer current are rejected, and a repeated identical report is
//! accepted but appends nothing.

mod command;
mod error;
mod event;
mod state;

pub use command::{retry_backoff, Outcome, TaskCommand, MAX_REFUSED_REPORTS};
pub use error::TaskError;
pub use event::{Capacity, TaskEvent};
pub use state::{Artifact, Attempt, RefusedReport, Task, TaskState};

#[cfg(test)]
mod tests;
