//! The Project aggregate: a named group of tasks, its members, its quota
//! and its secrets (their names and versions; values never enter the log).
//!
//! Split as the Task's is: [`ProjectCommand`] and the decisions in
//! `command`, [`ProjectEvent`] in `event`, [`Project`] and how events change
//! it in `state`, [`ProjectError`] in `error`, and a member's [`Role`] in
//! `role`.

mod command;
mod error;
mod event;
mod role;
mod state;

pub use command::ProjectCommand;
pub use error::ProjectError;
pub use event::ProjectEvent;
pub use role::Role;
pub use state::{Project, Secret};

/// The most secrets one project holds.
pub const MAX_SECRETS: usize = 100;

#[cfg(test)]
mod tests;
