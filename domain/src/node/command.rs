//! The commands of a node and the decisions on them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[cfg(doc)]
use super::host_ssh::validate_host_ssh;
use super::host_ssh::HostSshOutcome;
use super::{Node, NodeError, NodeEvent, NodeResources, NodeStatus, ResourceLimits};
use crate::aggregate::decided_by;
use crate::spec::FieldError;
use crate::{Actor, Name};

/// The commands of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeCommand {
    /// Create the node.
    Provision {
        /// Its id.
        node_id: Uuid,
        /// Its unique name.
        name: String,
        /// Its labels; see [`crate::spec::validate_labels`].
        labels: BTreeMap<String, String>,
        /// Hex SHA-256 of its token's secret.
        token_fingerprint: String,
        /// The most it may claim; [`ResourceLimits::default`] for no
        /// maximum.
        max_resources: ResourceLimits,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// The agent connected with a valid token.
    Connect {
        /// The new session's id.
        session: Uuid,
        /// The agent's version.
        agent_version: String,
        /// What the node has.
        resources: NodeResources,
        /// Labels the agent declares.
        labels: BTreeMap<String, String>,
        /// When.
        at: DateTime<Utc>,
    },
    /// A session ended.
    Disconnect {
        /// The session.
        session: Uuid,
        /// Why.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// No heartbeat since `last_seen`.
    MarkOffline {
        /// The last heartbeat.
        last_seen: DateTime<Utc>,
        /// When.
        at: DateTime<Utc>,
    },
    /// Take no new tasks.
    Drain {
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Take new tasks again.
    Undrain {
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Revoke the token; the node can never connect again.
    RevokeToken {
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Run a command on the node's host over SSH (admins only; the caller
    /// checks that).
    RequestHostSsh {
        /// A new id for the request.
        request_id: Uuid,
        /// The command line; see [`validate_host_ssh`].
        command: String,
        /// The time limit in seconds.
        timeout_s: u64,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Record how a host SSH request ended.
    FinishHostSsh {
        /// The request.
        request_id: Uuid,
        /// How it ended.
        result: HostSshOutcome,
        /// When.
        at: DateTime<Utc>,
    },
    /// Replace the node's labels with `labels` (admins only; the caller
    /// checks that).
    SetLabels {
        /// The whole new set; see [`crate::spec::validate_labels`].
        labels: BTreeMap<String, String>,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Accept labels the agent declared into the node's labels (admins
    /// only; the caller checks that).
    AcceptDeclaredLabels {
        /// The keys to accept; `None` accepts every declared label.
        keys: Option<Vec<String>>,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Set the most the node may claim (admins only; the caller checks
    /// that).
    SetLimits {
        /// The new maximum; [`ResourceLimits::default`] lifts it.
        max_resources: ResourceLimits,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
}

impl Node {
    fn exists(&self) -> Result<(), NodeError> {
        match self.status {
            NodeStatus::New => Err(NodeError::NotFound),
            _ => Ok(()),
        }
    }

    /// Decides which events `command` produces, without changing anything.
    ///
    /// # Errors
    /// A [`NodeError`] when the command is refused; nothing is appended.
    pub fn decide(&self, command: NodeCommand) -> Result<Vec<NodeEvent>, NodeError> {
        use NodeCommand as C;
        use NodeEvent as E;
        if !matches!(command, C::Provision { .. }) {
            self.exists()?;
        }
        Ok(match command {
            C::Provision {
                node_id,
                name,
                labels,
                token_fingerprint,
                max_resources,
                by,
                at,
            } => {
                if self.status != NodeStatus::New {
                    return Err(NodeError::AlreadyExists);
                }
                crate::spec::validate_labels("labels", &labels).map_err(NodeError::Invalid)?;
                max_resources
                    .validate("max_resources")
                    .map_err(NodeError::Invalid)?;
                let name = Name::parse(&name)
                    .map_err(|e| NodeError::Invalid(FieldError::new("name", e.to_string())))?;
                vec![E::Provisioned {
                    node_id,
                    name,
                    labels,
                    token_fingerprint,
                    max_resources,
                    by,
                    at,
                }]
            }
            C::Connect {
                session,
                agent_version,
                resources,
                labels,
                at,
            } => {
                if self.status == NodeStatus::Revoked {
                    return Err(NodeError::Revoked);
                }
                vec![E::Connected {
                    session,
                    agent_version,
                    resources,
                    labels,
                    at,
                }]
            }
            C::Disconnect {
                session,
                reason,
                at,
            } => {
                if self.session == Some(session) {
                    vec![E::Disconnected {
                        session,
                        reason,
                        at,
                    }]
                } else {
                    vec![]
                }
            }
            C::MarkOffline { last_seen, at } => {
                if self.status == NodeStatus::Online {
                    vec![E::MarkedOffline { last_seen, at }]
                } else {
                    vec![]
                }
            }
            C::Drain { .. }
            | C::Undrain { .. }
            | C::SetLabels { .. }
            | C::AcceptDeclaredLabels { .. }
            | C::SetLimits { .. }
                if self.status == NodeStatus::Revoked =>
            {
                return Err(NodeError::Revoked)
            }
            C::Drain { by, at } => {
                if self.drained {
                    vec![]
                } else {
                    vec![E::Drained { by, at }]
                }
            }
            C::Undrain { by, at } => {
                if self.drained {
                    vec![E::Undrained { by, at }]
                } else {
                    vec![]
                }
            }
            C::RevokeToken { by, at } => {
                if self.status == NodeStatus::Revoked {
                    vec![]
                } else {
                    vec![E::TokenRevoked { by, at }]
                }
            }
            C::RequestHostSsh {
                request_id,
                command,
                timeout_s,
                by,
                at,
            } => self.request_host_ssh(request_id, command, timeout_s, by, at)?,
            C::FinishHostSsh {
                request_id,
                result,
                at,
            } => self.finish_host_ssh(request_id, result, at)?,
            C::SetLabels { labels, by, at } => self.set_labels(labels, by, at)?,
            C::AcceptDeclaredLabels { keys, by, at } => {
                self.accept_declared_labels(keys.as_deref(), by, at)?
            }
            C::SetLimits {
                max_resources,
                by,
                at,
            } => self.set_limits(max_resources, by, at)?,
        })
    }
}

decided_by!(Node, "node", NodeCommand, NodeEvent, NodeError);
