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

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::spec::FieldError;
use crate::Actor;

pub mod trust;

pub use trust::{ResourceLimits, ResourceLimitsDraft};

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

/// The longest host SSH command, in bytes.
pub const MAX_HOST_SSH_COMMAND_BYTES: usize = 4096;

/// The longest time limit of a host SSH command, in seconds.
pub const MAX_HOST_SSH_TIMEOUT_S: u64 = 600;

/// The most output bytes a host SSH result keeps.
pub const MAX_HOST_SSH_OUTPUT_BYTES: usize = 64 * 1024;

/// The longest error text a host SSH result keeps, in bytes.
pub const MAX_HOST_SSH_ERROR_BYTES: usize = 1024;

/// How long after its time limit the answer to a host SSH request is
/// awaited: delivery, the SSH handshake and the way back. Past it, whoever
/// waits records that no answer came.
pub const HOST_SSH_ANSWER_GRACE_S: u64 = 15;

/// How long after its answer was due an unfinished host SSH request is
/// forgotten by the aggregate, so that one whose waiter died never keeps
/// the node's state growing.
pub const HOST_SSH_FORGET_AFTER_S: u64 = 300;

/// The most host SSH requests open on one node at once.
pub const MAX_OPEN_HOST_SSH: usize = 8;

/// Checks an admin's host SSH command and time limit.
///
/// # Errors
/// A [`crate::spec::FieldError`] naming `command` or `timeout_s`.
pub fn validate_host_ssh(command: &str, timeout_s: u64) -> Result<(), crate::spec::FieldError> {
    use crate::spec::FieldError;
    if command.trim().is_empty() {
        return Err(FieldError::new("command", "must not be empty"));
    }
    if command.len() > MAX_HOST_SSH_COMMAND_BYTES {
        return Err(FieldError::new(
            "command",
            format!("must be at most {MAX_HOST_SSH_COMMAND_BYTES} bytes"),
        ));
    }
    if command.contains('\0') {
        return Err(FieldError::new(
            "command",
            "must not contain NUL characters",
        ));
    }
    if !(1..=MAX_HOST_SSH_TIMEOUT_S).contains(&timeout_s) {
        return Err(FieldError::new(
            "timeout_s",
            format!("must be 1 to {MAX_HOST_SSH_TIMEOUT_S} seconds"),
        ));
    }
    Ok(())
}

/// How a host SSH command ended, as the node reported it (or as the waiter
/// recorded it when no answer came).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostSshOutcome {
    /// The SSH client's exit status; `None` when it was killed at the time
    /// limit or never ran.
    pub exit_code: Option<i32>,
    /// Standard output and error, at most [`MAX_HOST_SSH_OUTPUT_BYTES`].
    pub output: String,
    /// Whether output beyond the limit was dropped.
    pub truncated: bool,
    /// Whether the time limit stopped it.
    pub timed_out: bool,
    /// How long it ran, in milliseconds.
    pub duration_ms: u64,
    /// Why it did not run, or why no answer came.
    pub error: Option<String>,
}

/// A host SSH request that has not ended yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenHostSsh {
    /// The command line.
    pub command: String,
    /// The time limit in seconds.
    pub timeout_s: u64,
    /// Who asked.
    pub by: Actor,
    /// When.
    pub at: DateTime<Utc>,
}

impl OpenHostSsh {
    /// When the time limit of the command ends, counted from the request:
    /// the command must not start on the node after this.
    pub fn time_limit_ends(&self) -> DateTime<Utc> {
        self.at + seconds(self.timeout_s)
    }

    /// When the answer is due at the latest.
    pub fn answer_due(&self) -> DateTime<Utc> {
        self.time_limit_ends() + seconds(HOST_SSH_ANSWER_GRACE_S)
    }

    fn forgotten_by(&self, now: DateTime<Utc>) -> bool {
        now > self.answer_due() + seconds(HOST_SSH_FORGET_AFTER_S)
    }
}

fn seconds(s: u64) -> chrono::Duration {
    chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000))
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
        /// The most the node may claim; absent in events from before
        /// maxima existed, and when there is none.
        #[serde(default, skip_serializing_if = "ResourceLimits::is_unlimited")]
        max_resources: ResourceLimits,
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
        /// What the node says it has, as it said it; see
        /// [`Node::effective_resources`] for what counts.
        resources: NodeResources,
        /// Labels the agent declares: kept apart, they count for placement
        /// only once an admin accepts them.
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
    /// An admin asked to run a command on the node's host over SSH.
    HostSshRequested {
        /// Names the request in its result.
        request_id: Uuid,
        /// The command line.
        command: String,
        /// The time limit in seconds.
        timeout_s: u64,
        /// Who asked.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// A host SSH request ended: the node answered, or no answer came.
    HostSshFinished {
        /// The request.
        request_id: Uuid,
        /// How it ended.
        result: HostSshOutcome,
        /// When.
        at: DateTime<Utc>,
    },
    /// An admin replaced the node's labels: from now on placement matches
    /// exactly these.
    LabelsSet {
        /// The whole new set.
        labels: BTreeMap<String, String>,
        /// Who set them.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// An admin accepted labels the agent declared: they join the node's
    /// labels (replacing the value of a key already there).
    DeclaredLabelsAccepted {
        /// The labels accepted, with the values declared at the time.
        labels: BTreeMap<String, String>,
        /// Who accepted them.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// An admin set the most the node may claim (or lifted it).
    LimitsSet {
        /// The new maximum; a dimension without a value has none.
        max_resources: ResourceLimits,
        /// Who set it.
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
            NodeEvent::HostSshRequested { .. } => "NodeHostSshRequested",
            NodeEvent::HostSshFinished { .. } => "NodeHostSshFinished",
            NodeEvent::LabelsSet { .. } => "NodeLabelsSet",
            NodeEvent::DeclaredLabelsAccepted { .. } => "NodeDeclaredLabelsAccepted",
            NodeEvent::LimitsSet { .. } => "NodeLimitsSet",
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

/// The Node aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The node's id.
    pub id: Option<Uuid>,
    /// Its unique name.
    pub name: String,
    /// The labels tasks are matched against: only an admin sets them
    /// (when provisioning, by replacing them, or by accepting declared
    /// ones). Read from `provisioned_labels` in states stored before.
    #[serde(alias = "provisioned_labels")]
    pub labels: BTreeMap<String, String>,
    /// Labels the agent declared in its last session: shown, never matched
    /// until an admin accepts them. Read from `agent_labels` in states
    /// stored before.
    #[serde(alias = "agent_labels")]
    pub declared_labels: BTreeMap<String, String>,
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
    /// What it declared in its last session, unchecked; see
    /// [`Node::effective_resources`]. Read from `resources` in states
    /// stored before.
    #[serde(alias = "resources")]
    pub declared_resources: Option<NodeResources>,
    /// The most it may claim, as an admin set it. Defaulted (no maximum) so
    /// states stored before still load.
    #[serde(default)]
    pub max_resources: ResourceLimits,
    /// When it was provisioned.
    pub provisioned_at: Option<DateTime<Utc>>,
    /// When it last connected.
    pub connected_at: Option<DateTime<Utc>>,
    /// When it last changed.
    pub updated_at: Option<DateTime<Utc>>,
    /// Host SSH requests waiting for their result, by request id. Small:
    /// each ends with its result, or is forgotten long after its answer
    /// was due. Defaulted so snapshots from before the field still load.
    #[serde(default)]
    pub host_ssh: BTreeMap<Uuid, OpenHostSsh>,
}

impl Node {
    /// What placement may use of the node: what it declared in its last
    /// session, clamped to [`Node::max_resources`] (GPUs: the first
    /// declared devices, each index once). `None` before it ever connected.
    pub fn effective_resources(&self) -> Option<NodeResources> {
        self.declared_resources
            .as_ref()
            .map(|declared| self.max_resources.clamp(declared))
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

    fn request_host_ssh(
        &self,
        request_id: Uuid,
        command: String,
        timeout_s: u64,
        by: Actor,
        at: DateTime<Utc>,
    ) -> Result<Vec<NodeEvent>, NodeError> {
        match self.status {
            NodeStatus::Revoked => return Err(NodeError::Revoked),
            NodeStatus::Online => {}
            _ => return Err(NodeError::NotOnline),
        }
        validate_host_ssh(&command, timeout_s)
            .map_err(|e| NodeError::InvalidHostSsh(format!("{}: {}", e.field, e.reason)))?;
        if let Some(open) = self.host_ssh.get(&request_id) {
            // The same request again changes nothing; another under its id
            // is refused.
            return if open.command == command && open.timeout_s == timeout_s && open.by == by {
                Ok(vec![])
            } else {
                Err(NodeError::InvalidHostSsh(format!(
                    "request {request_id} exists already"
                )))
            };
        }
        let waiting = self
            .host_ssh
            .values()
            .filter(|open| at <= open.answer_due())
            .count();
        if waiting >= MAX_OPEN_HOST_SSH {
            return Err(NodeError::TooManyHostSsh);
        }
        Ok(vec![NodeEvent::HostSshRequested {
            request_id,
            command,
            timeout_s,
            by,
            at,
        }])
    }

    fn finish_host_ssh(
        &self,
        request_id: Uuid,
        result: HostSshOutcome,
        at: DateTime<Utc>,
    ) -> Result<Vec<NodeEvent>, NodeError> {
        if !self.host_ssh.contains_key(&request_id) {
            return Err(NodeError::UnknownHostSsh(request_id));
        }
        if result.output.len() > MAX_HOST_SSH_OUTPUT_BYTES {
            return Err(NodeError::InvalidHostSsh(format!(
                "output must be at most {MAX_HOST_SSH_OUTPUT_BYTES} bytes"
            )));
        }
        if result
            .error
            .as_ref()
            .is_some_and(|e| e.len() > MAX_HOST_SSH_ERROR_BYTES)
        {
            return Err(NodeError::InvalidHostSsh(format!(
                "error must be at most {MAX_HOST_SSH_ERROR_BYTES} bytes"
            )));
        }
        Ok(vec![NodeEvent::HostSshFinished {
            request_id,
            result,
            at,
        }])
    }

    /// Applies one event.
    pub fn apply_event(&mut self, event: NodeEvent) {
        match event {
            NodeEvent::Provisioned {
                node_id,
                name,
                labels,
                token_fingerprint,
                max_resources,
                at,
                ..
            } => {
                self.id = Some(node_id);
                self.name = name;
                self.labels = labels;
                self.max_resources = max_resources;
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
                self.declared_resources = Some(resources);
                self.declared_labels = labels;
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
            NodeEvent::HostSshRequested {
                request_id,
                command,
                timeout_s,
                by,
                at,
            } => {
                self.host_ssh.retain(|_, open| !open.forgotten_by(at));
                self.host_ssh.insert(
                    request_id,
                    OpenHostSsh {
                        command,
                        timeout_s,
                        by,
                        at,
                    },
                );
            }
            NodeEvent::HostSshFinished { request_id, .. } => {
                self.host_ssh.remove(&request_id);
            }
            NodeEvent::LabelsSet { labels, at, .. } => {
                self.labels = labels;
                self.updated_at = Some(at);
            }
            NodeEvent::DeclaredLabelsAccepted { labels, at, .. } => {
                self.labels.extend(labels);
                self.updated_at = Some(at);
            }
            NodeEvent::LimitsSet {
                max_resources, at, ..
            } => {
                self.max_resources = max_resources;
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
            max_resources: ResourceLimits::default(),
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
            max_resources: ResourceLimits::default(),
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

    fn request_ssh(id: u128, at_s: i64) -> NodeCommand {
        NodeCommand::RequestHostSsh {
            request_id: Uuid::from_u128(id),
            command: "nvidia-smi".into(),
            timeout_s: 30,
            by: admin(),
            at: at(at_s),
        }
    }
    fn ssh_requested(id: u128, at_s: i64) -> NodeEvent {
        NodeEvent::HostSshRequested {
            request_id: Uuid::from_u128(id),
            command: "nvidia-smi".into(),
            timeout_s: 30,
            by: admin(),
            at: at(at_s),
        }
    }
    fn exited(code: i32) -> HostSshOutcome {
        HostSshOutcome {
            exit_code: Some(code),
            output: "GPU 0: A100\n".into(),
            duration_ms: 120,
            ..HostSshOutcome::default()
        }
    }
    fn finish_ssh(id: u128, at_s: i64) -> NodeCommand {
        NodeCommand::FinishHostSsh {
            request_id: Uuid::from_u128(id),
            result: exited(0),
            at: at(at_s),
        }
    }
    fn ssh_finished(id: u128, at_s: i64) -> NodeEvent {
        NodeEvent::HostSshFinished {
            request_id: Uuid::from_u128(id),
            result: exited(0),
            at: at(at_s),
        }
    }

    #[test]
    fn an_admin_may_run_a_host_command_on_an_online_node() {
        F::with(())
            .given(vec![provisioned(), connected()])
            .when(request_ssh(1, 5))
            .then_expect_events(vec![ssh_requested(1, 5)]);
        F::with(())
            .given(vec![provisioned(), connected(), ssh_requested(1, 5)])
            .when(request_ssh(1, 5))
            .then_expect_events(vec![]);
    }

    #[test]
    fn host_ssh_is_refused_for_a_node_that_is_not_online() {
        F::with(())
            .given(vec![provisioned()])
            .when(request_ssh(1, 5))
            .then_expect_error(NodeError::NotOnline);
        F::with(())
            .given(vec![
                provisioned(),
                connected(),
                NodeEvent::Disconnected {
                    session: session(),
                    reason: "gone".into(),
                    at: at(3),
                },
            ])
            .when(request_ssh(1, 5))
            .then_expect_error(NodeError::NotOnline);
        F::with(())
            .given(vec![provisioned(), connected(), revoked()])
            .when(request_ssh(1, 5))
            .then_expect_error(NodeError::Revoked);
        F::with(())
            .given_no_previous_events()
            .when(request_ssh(1, 5))
            .then_expect_error(NodeError::NotFound);
    }

    #[test]
    fn a_bad_host_command_is_refused() {
        for (command, timeout_s) in [("  ", 30), ("a\0b", 30), ("ls", 0), ("ls", 601)] {
            F::with(())
                .given(vec![provisioned(), connected()])
                .when(NodeCommand::RequestHostSsh {
                    request_id: Uuid::from_u128(1),
                    command: command.into(),
                    timeout_s,
                    by: admin(),
                    at: at(5),
                })
                .then_expect_error_message(
                    &validate_host_ssh(command, timeout_s)
                        .map(|()| String::new())
                        .unwrap_or_else(|e| format!("{}: {}", e.field, e.reason)),
                );
        }
        assert!(validate_host_ssh(&"x".repeat(MAX_HOST_SSH_COMMAND_BYTES + 1), 5).is_err());
        assert!(validate_host_ssh("echo hello; id -un", 600).is_ok());
    }

    #[test]
    fn a_host_ssh_result_is_recorded_once() {
        F::with(())
            .given(vec![provisioned(), connected(), ssh_requested(1, 5)])
            .when(finish_ssh(1, 6))
            .then_expect_events(vec![ssh_finished(1, 6)]);
        // A late answer after the waiter recorded that none came.
        F::with(())
            .given(vec![
                provisioned(),
                connected(),
                ssh_requested(1, 5),
                ssh_finished(1, 50),
            ])
            .when(finish_ssh(1, 51))
            .then_expect_error(NodeError::UnknownHostSsh(Uuid::from_u128(1)));
    }

    #[test]
    fn a_result_for_an_unknown_request_is_refused() {
        F::with(())
            .given(vec![provisioned(), connected(), ssh_requested(1, 5)])
            .when(finish_ssh(2, 6))
            .then_expect_error(NodeError::UnknownHostSsh(Uuid::from_u128(2)));
    }

    #[test]
    fn a_result_larger_than_the_output_cap_is_refused() {
        F::with(())
            .given(vec![provisioned(), connected(), ssh_requested(1, 5)])
            .when(NodeCommand::FinishHostSsh {
                request_id: Uuid::from_u128(1),
                result: HostSshOutcome {
                    output: "x".repeat(MAX_HOST_SSH_OUTPUT_BYTES + 1),
                    truncated: true,
                    ..HostSshOutcome::default()
                },
                at: at(6),
            })
            .then_expect_error_message(&format!(
                "output must be at most {MAX_HOST_SSH_OUTPUT_BYTES} bytes"
            ));
    }

    #[test]
    fn only_a_few_host_ssh_requests_wait_at_once_and_old_ones_are_forgotten() {
        let mut given = vec![provisioned(), connected()];
        given.extend((0..MAX_OPEN_HOST_SSH as u128).map(|i| ssh_requested(i, 5)));
        F::with(())
            .given(given.clone())
            .when(request_ssh(100, 6))
            .then_expect_error(NodeError::TooManyHostSsh);
        // Once their answers are overdue they no longer count …
        let later = 5 + 30 + HOST_SSH_ANSWER_GRACE_S as i64 + 1;
        F::with(())
            .given(given.clone())
            .when(request_ssh(100, later))
            .then_expect_events(vec![ssh_requested(100, later)]);
        // … and long after that the state drops them.
        let mut n = Node::default();
        for e in given {
            n.apply_event(e);
        }
        assert_eq!(n.host_ssh.len(), MAX_OPEN_HOST_SSH);
        let much_later = later + HOST_SSH_FORGET_AFTER_S as i64;
        n.apply_event(ssh_requested(100, much_later));
        assert_eq!(
            n.host_ssh.keys().collect::<Vec<_>>(),
            [&Uuid::from_u128(100)]
        );
        n.apply_event(ssh_finished(100, much_later + 1));
        assert!(n.host_ssh.is_empty());
    }

    #[test]
    fn a_node_with_open_host_ssh_requests_survives_a_snapshot() {
        let mut n = Node::default();
        for e in [provisioned(), connected(), ssh_requested(1, 5)] {
            n.apply_event(e);
        }
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(serde_json::from_value::<Node>(json.clone()).unwrap(), n);
        // A snapshot written before host SSH existed still loads.
        let mut old = json;
        old.as_object_mut().unwrap().remove("host_ssh");
        let loaded: Node = serde_json::from_value(old).unwrap();
        assert!(loaded.host_ssh.is_empty());
    }

    #[test]
    fn labels_the_agent_declares_are_kept_apart_and_never_matched() {
        let mut n = Node::default();
        n.apply_event(provisioned());
        let mut c = connected();
        if let NodeEvent::Connected { labels, .. } = &mut c {
            labels.insert("gpu".into(), "none".into());
            labels.insert("os".into(), "wsl".into());
        }
        n.apply_event(c);
        assert_eq!(n.labels, [("gpu".to_string(), "a100".to_string())].into());
        assert_eq!(n.declared_labels["gpu"], "none");
        assert_eq!(n.declared_labels["os"], "wsl");
    }
}
