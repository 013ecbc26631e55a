//! The Node aggregate: a compute machine joined through its agent.
//!
//! Heartbeats are not events (they update a liveness row); only changes of
//! state are: provisioned, connected, disconnected, marked offline, drained,
//! undrained, token revoked.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Actor;

/// One GPU as the agent detected it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    /// The device index on the node.
    pub index: u32,
    /// The model name.
    pub name: String,
    /// Memory in MiB.
    pub memory_mb: u64,
}

/// What a node declares it has.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NodeResources {
    /// CPU cores.
    pub cpus: f64,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// GPUs.
    pub gpus: Vec<Gpu>,
}

/// Whether a node can take work right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Not provisioned: the state of an empty aggregate.
    #[default]
    New,
    /// Provisioned; its agent never connected.
    Provisioned,
    /// Its agent is connected.
    Online,
    /// Its agent disconnected or stopped sending heartbeats.
    Offline,
    /// Its token was revoked; it can never connect again.
    Revoked,
}

impl NodeStatus {
    /// The status's name as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::New => "new",
            NodeStatus::Provisioned => "provisioned",
            NodeStatus::Online => "online",
            NodeStatus::Offline => "offline",
            NodeStatus::Revoked => "revoked",
        }
    }
}

/// The events of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeEvent {
    /// An admin created the node and its token.
    Provisioned {
        /// The node's id.
        node_id: Uuid,
        /// Its unique name.
        name: String,
        /// Labels tasks can select it by.
        labels: BTreeMap<String, String>,
        /// Hex SHA-256 of the token's secret; the token itself is never stored.
        token_fingerprint: String,
        /// Who provisioned it.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// The agent connected and declared what it has.
    Connected {
        /// The new session's id.
        session: Uuid,
        /// The agent's version.
        agent_version: String,
        /// What the node has.
        resources: NodeResources,
        /// Labels the agent declares, added to the provisioned ones.
        labels: BTreeMap<String, String>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The agent's session ended.
    Disconnected {
        /// The session that ended.
        session: Uuid,
        /// Why.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// No heartbeat arrived in time.
    MarkedOffline {
        /// When the last heartbeat arrived.
        last_seen: DateTime<Utc>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The node takes no new tasks.
    Drained {
        /// Who drained it.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// The node takes new tasks again.
    Undrained {
        /// Who undrained it.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// The node's token was revoked.
    TokenRevoked {
        /// Who revoked it.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
}

impl DomainEvent for NodeEvent {
    fn event_type(&self) -> String {
        match self {
            NodeEvent::Provisioned { .. } => "NodeProvisioned",
            NodeEvent::Connected { .. } => "NodeConnected",
            NodeEvent::Disconnected { .. } => "NodeDisconnected",
            NodeEvent::MarkedOffline { .. } => "NodeMarkedOffline",
            NodeEvent::Drained { .. } => "NodeDrained",
            NodeEvent::Undrained { .. } => "NodeUndrained",
            NodeEvent::TokenRevoked { .. } => "NodeTokenRevoked",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}

/// The commands of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeCommand {
    /// Create the node.
    Provision {
        /// Its id.
        node_id: Uuid,
        /// Its unique name.
        name: String,
        /// Its labels.
        labels: BTreeMap<String, String>,
        /// Hex SHA-256 of its token's secret.
        token_fingerprint: String,
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
}

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
}

/// The Node aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The node's id.
    pub id: Option<Uuid>,
    /// Its unique name.
    pub name: String,
    /// Labels set when provisioned.
    pub provisioned_labels: BTreeMap<String, String>,
    /// Labels declared by the agent in its last session.
    pub agent_labels: BTreeMap<String, String>,
    /// Hex SHA-256 of the token's secret.
    pub token_fingerprint: String,
    /// Whether it can take work.
    pub status: NodeStatus,
    /// Whether it takes no new tasks.
    pub drained: bool,
    /// The current session, while online.
    pub session: Option<Uuid>,
    /// The agent's version, from its last session.
    pub agent_version: Option<String>,
    /// What it declared in its last session.
    pub resources: Option<NodeResources>,
    /// When it was provisioned.
    pub provisioned_at: Option<DateTime<Utc>>,
    /// When it last connected.
    pub connected_at: Option<DateTime<Utc>>,
    /// When it last changed.
    pub updated_at: Option<DateTime<Utc>>,
}

impl Node {
    /// The labels tasks are matched against: the agent's, overridden by the
    /// provisioned ones (an admin's word beats the node's).
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut l = self.agent_labels.clone();
        l.extend(self.provisioned_labels.clone());
        l
    }

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
                by,
                at,
            } => {
                if self.status != NodeStatus::New {
                    return Err(NodeError::AlreadyExists);
                }
                vec![E::Provisioned {
                    node_id,
                    name,
                    labels,
                    token_fingerprint,
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
            C::Drain { .. } | C::Undrain { .. } if self.status == NodeStatus::Revoked => {
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
        })
    }

    /// Applies one event.
    pub fn apply_event(&mut self, event: NodeEvent) {
        match event {
            NodeEvent::Provisioned {
                node_id,
                name,
                labels,
                token_fingerprint,
                at,
                ..
            } => {
                self.id = Some(node_id);
                self.name = name;
                self.provisioned_labels = labels;
                self.token_fingerprint = token_fingerprint;
                self.status = NodeStatus::Provisioned;
                self.provisioned_at = Some(at);
                self.updated_at = Some(at);
            }
            NodeEvent::Connected {
                session,
                agent_version,
                resources,
                labels,
                at,
            } => {
                self.status = NodeStatus::Online;
                self.session = Some(session);
                self.agent_version = Some(agent_version);
                self.resources = Some(resources);
                self.agent_labels = labels;
                self.connected_at = Some(at);
                self.updated_at = Some(at);
            }
            NodeEvent::Disconnected { at, .. } | NodeEvent::MarkedOffline { at, .. } => {
                self.status = NodeStatus::Offline;
                self.session = None;
                self.updated_at = Some(at);
            }
            NodeEvent::Drained { at, .. } => {
                self.drained = true;
                self.updated_at = Some(at);
            }
            NodeEvent::Undrained { at, .. } => {
                self.drained = false;
                self.updated_at = Some(at);
            }
            NodeEvent::TokenRevoked { at, .. } => {
                self.status = NodeStatus::Revoked;
                self.session = None;
                self.updated_at = Some(at);
            }
        }
    }
}

impl Aggregate for Node {
    const TYPE: &'static str = "node";
    type Command = NodeCommand;
    type Event = NodeEvent;
    type Error = NodeError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        self.apply_event(event);
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use cqrs_es::test::TestFramework;

    use super::*;

    type F = TestFramework<Node>;

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }
    fn admin() -> Actor {
        Actor::User("admin".into())
    }
    fn session() -> Uuid {
        Uuid::from_u128(11)
    }
    fn provisioned() -> NodeEvent {
        NodeEvent::Provisioned {
            node_id: Uuid::from_u128(7),
            name: "gpu-3".into(),
            labels: [("gpu".to_string(), "a100".to_string())].into(),
            token_fingerprint: "ff".into(),
            by: admin(),
            at: at(0),
        }
    }
    fn connect() -> NodeCommand {
        NodeCommand::Connect {
            session: session(),
            agent_version: "0.1.0".into(),
            resources: NodeResources {
                cpus: 8.0,
                memory_mb: 32768,
                gpus: vec![],
            },
            labels: Default::default(),
            at: at(1),
        }
    }
    fn connected() -> NodeEvent {
        NodeEvent::Connected {
            session: session(),
            agent_version: "0.1.0".into(),
            resources: NodeResources {
                cpus: 8.0,
                memory_mb: 32768,
                gpus: vec![],
            },
            labels: Default::default(),
            at: at(1),
        }
    }
    fn revoked() -> NodeEvent {
        NodeEvent::TokenRevoked {
            by: admin(),
            at: at(2),
        }
    }

    #[test]
    fn provisioning_creates_the_node_once() {
        let provision = NodeCommand::Provision {
            node_id: Uuid::from_u128(7),
            name: "gpu-3".into(),
            labels: [("gpu".to_string(), "a100".to_string())].into(),
            token_fingerprint: "ff".into(),
            by: admin(),
            at: at(0),
        };
        F::with(())
            .given_no_previous_events()
            .when(provision.clone())
            .then_expect_events(vec![provisioned()]);
        F::with(())
            .given(vec![provisioned()])
            .when(provision)
            .then_expect_error(NodeError::AlreadyExists);
    }

    #[test]
    fn an_unknown_node_cannot_connect() {
        F::with(())
            .given_no_previous_events()
            .when(connect())
            .then_expect_error(NodeError::NotFound);
    }

    #[test]
    fn a_provisioned_node_connects_and_a_revoked_one_cannot() {
        F::with(())
            .given(vec![provisioned()])
            .when(connect())
            .then_expect_events(vec![connected()]);
        F::with(())
            .given(vec![provisioned(), revoked()])
            .when(connect())
            .then_expect_error(NodeError::Revoked);
    }

    #[test]
    fn only_the_current_session_can_disconnect() {
        let disconnect = |s: Uuid| NodeCommand::Disconnect {
            session: s,
            reason: "closed".into(),
            at: at(3),
        };
        F::with(())
            .given(vec![provisioned(), connected()])
            .when(disconnect(session()))
            .then_expect_events(vec![NodeEvent::Disconnected {
                session: session(),
                reason: "closed".into(),
                at: at(3),
            }]);
        F::with(())
            .given(vec![provisioned(), connected()])
            .when(disconnect(Uuid::from_u128(99)))
            .then_expect_events(vec![]);
    }

    #[test]
    fn an_online_node_is_marked_offline_once() {
        let mark = NodeCommand::MarkOffline {
            last_seen: at(1),
            at: at(91),
        };
        F::with(())
            .given(vec![provisioned(), connected()])
            .when(mark.clone())
            .then_expect_events(vec![NodeEvent::MarkedOffline {
                last_seen: at(1),
                at: at(91),
            }]);
        F::with(())
            .given(vec![
                provisioned(),
                connected(),
                NodeEvent::MarkedOffline {
                    last_seen: at(1),
                    at: at(91),
                },
            ])
            .when(mark)
            .then_expect_events(vec![]);
    }

    #[test]
    fn drain_and_undrain_are_idempotent() {
        let drain = NodeCommand::Drain {
            by: admin(),
            at: at(4),
        };
        let drained = NodeEvent::Drained {
            by: admin(),
            at: at(4),
        };
        F::with(())
            .given(vec![provisioned()])
            .when(drain.clone())
            .then_expect_events(vec![drained.clone()]);
        F::with(())
            .given(vec![provisioned(), drained.clone()])
            .when(drain)
            .then_expect_events(vec![]);
        F::with(())
            .given(vec![provisioned()])
            .when(NodeCommand::Undrain {
                by: admin(),
                at: at(5),
            })
            .then_expect_events(vec![]);
        F::with(())
            .given(vec![provisioned(), drained])
            .when(NodeCommand::Undrain {
                by: admin(),
                at: at(5),
            })
            .then_expect_events(vec![NodeEvent::Undrained {
                by: admin(),
                at: at(5),
            }]);
    }

    #[test]
    fn a_revoked_node_cannot_be_drained_or_undrained() {
        F::with(())
            .given(vec![provisioned(), revoked()])
            .when(NodeCommand::Drain {
                by: admin(),
                at: at(4),
            })
            .then_expect_error(NodeError::Revoked);
    }

    #[test]
    fn revoking_is_recorded_once() {
        let revoke = NodeCommand::RevokeToken {
            by: admin(),
            at: at(2),
        };
        F::with(())
            .given(vec![provisioned(), connected()])
            .when(revoke.clone())
            .then_expect_events(vec![revoked()]);
        F::with(())
            .given(vec![provisioned(), revoked()])
            .when(revoke)
            .then_expect_events(vec![]);
    }

    #[test]
    fn provisioned_labels_win_over_the_agents() {
        let mut n = Node::default();
        n.apply_event(provisioned());
        let mut c = connected();
        if let NodeEvent::Connected { labels, .. } = &mut c {
            labels.insert("gpu".into(), "none".into());
            labels.insert("os".into(), "wsl".into());
        }
        n.apply_event(c);
        let l = n.labels();
        assert_eq!(l["gpu"], "a100");
        assert_eq!(l["os"], "wsl");
    }
}
