//! The Node aggregate: a compute machine joined through its agent.
//!
//! Heartbeats are not events (they update a liveness row); only changes of
//! state are: provisioned, connected, disconnected, marked offline, drained,
//! undrained, token revoked. Host SSH requests and their results are events
//! too, so every command an admin runs on a node's host is on its timeline.
//!
//! A node's token proves which node is talking, not that what it says about
//! itself is true: the labels placement matches are the ones an admin set
//! (labels the agent declares are kept apart until an admin accepts them),
//! and what it declares is clamped to the maximum an admin may set. See
//! [`trust`].
//!
//! The aggregate is split as the Task's is: [`NodeCommand`] and the
//! decisions in `command`, [`NodeEvent`] in `event`, [`Node`] and how
//! events change it in `state`, [`NodeError`] in `error`; running commands
//! on the node's host is [`host_ssh`], and what an admin vouches for is
//! [`trust`].

mod command;
mod error;
mod event;
pub mod host_ssh;
mod state;
pub mod trust;

pub use command::NodeCommand;
pub use error::NodeError;
pub use event::NodeEvent;
pub use host_ssh::{
    validate_host_ssh, HostSshOutcome, OpenHostSsh, HOST_SSH_ANSWER_GRACE_S,
    HOST_SSH_FORGET_AFTER_S, MAX_HOST_SSH_COMMAND_BYTES, MAX_HOST_SSH_ERROR_BYTES,
    MAX_HOST_SSH_OUTPUT_BYTES, MAX_HOST_SSH_TIMEOUT_S, MAX_OPEN_HOST_SSH,
};
pub use state::{Gpu, Node, NodeResources, NodeStatus};
pub use trust::{ResourceLimits, ResourceLimitsDraft};

#[cfg(test)]
mod tests;
