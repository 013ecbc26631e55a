//! UniDesk's domain: the Task, Node, Project and User aggregates.
//!
//! Everything here is pure. Commands carry the time and the ids they need
//! (`at`, `node_id`, …) so that handling a command is a function of the
//! aggregate's state and the command alone, and replaying the event log
//! always rebuilds the same state. Persistence lives in the `store` crate.
//!
//! Each aggregate has one module with `command`, `event`, `state` and `error`
//! parts, and each event enum is versioned through [`cqrs_es::DomainEvent`].

pub mod actor;
mod aggregate;
pub mod catalog;
pub mod name;
pub mod node;
pub mod project;
pub mod spec;
pub mod task;
pub mod user;

#[cfg(test)]
mod testing;

pub use actor::Actor;
pub use name::Name;

/// The version written with every event this build produces. Stored events
/// are never edited; a change of shape adds a variant or an upcaster and bumps
/// this for the changed type.
pub const EVENT_VERSION: &str = "1";
