//! The events of a node: past tense, versioned, never edited once stored.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::host_ssh::HostSshOutcome;
#[cfg(doc)]
use super::Node;
use super::{NodeResources, ResourceLimits};
use crate::{Actor, Name};

/// The events of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeEvent {
    /// An admin created the node and its token.
    Provisioned {
        /// The node's id.
        node_id: Uuid,
        /// Its unique name.
        name: Name,
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
