//! Why a node command was refused.

use uuid::Uuid;

use super::host_ssh::MAX_OPEN_HOST_SSH;
use crate::spec::FieldError;

/// Why a node command was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NodeError {
    /// The node was never provisioned.
    #[error("node not found")]
    NotFound,
    /// A node with this id exists already.
    #[error("node already exists")]
    AlreadyExists,
    /// The node's token was revoked.
    #[error("node's token was revoked")]
    Revoked,
    /// The node's agent is not connected.
    #[error("the node is not online; its agent must be connected")]
    NotOnline,
    /// A host SSH command or time limit is not acceptable.
    #[error("{0}")]
    InvalidHostSsh(String),
    /// Too many host SSH requests are open on the node.
    #[error("{MAX_OPEN_HOST_SSH} host SSH commands are already waiting on this node; wait for one to end")]
    TooManyHostSsh,
    /// No host SSH request with this id is open: it never existed, ended
    /// already, or was forgotten long after its answer was due.
    #[error("no host SSH request {0} is waiting for its result")]
    UnknownHostSsh(Uuid),
    /// A label or a maximum is not acceptable; names the field.
    #[error("{0}")]
    Invalid(FieldError),
    /// A key to accept names no label the agent declares; names the field.
    #[error("{0}")]
    NotDeclared(FieldError),
}
