//! The Node aggregate's state, what a node has, and how each event changes
//! the state.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::host_ssh::OpenHostSsh;
use super::{NodeEvent, ResourceLimits};

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
                self.name = name.into();
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
                let open = OpenHostSsh {
                    command,
                    timeout_s,
                    by,
                    at,
                };
                self.open_host_ssh(request_id, open);
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
