//! Nodes: provisioning and the node as shown. The token fingerprint never
//! leaves the server.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;

/// The body of `POST /api/v1/nodes`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProvisionNode {
    /// A unique name: 1-63 lower-case letters, digits, '.', '_' or '-'.
    #[schema(example = "gpu-3")]
    pub name: String,
    /// Labels tasks can select the node by.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// One GPU of a node.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Gpu {
    /// The device index.
    pub index: u32,
    /// The model.
    pub name: String,
    /// Memory in MiB.
    pub memory_mb: u64,
}

/// What a node declared in its last session.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NodeResources {
    /// CPU cores.
    pub cpus: f64,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// GPUs.
    pub gpus: Vec<Gpu>,
}

/// A node as it stands.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Node {
    /// Its id.
    pub id: Uuid,
    /// Its unique name.
    pub name: String,
    /// `provisioned`, `online`, `offline` or `revoked`.
    #[schema(example = "online")]
    pub status: String,
    /// Whether it takes no new tasks.
    pub drained: bool,
    /// The labels tasks are matched against: the agent's, overridden by
    /// the provisioned ones.
    pub labels: BTreeMap<String, String>,
    /// Labels set when provisioned.
    pub provisioned_labels: BTreeMap<String, String>,
    /// Labels the agent declared.
    pub agent_labels: BTreeMap<String, String>,
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

impl TryFrom<domain::node::Node> for Node {
    type Error = ApiError;

    fn try_from(n: domain::node::Node) -> Result<Self, ApiError> {
        let Some(id) = n.id else {
            return Err(ApiError::internal("a node state without id"));
        };
        Ok(Self {
            id,
            labels: n.labels(),
            name: n.name,
            status: n.status.as_str().to_string(),
            drained: n.drained,
            provisioned_labels: n.provisioned_labels,
            agent_labels: n.agent_labels,
            agent_version: n.agent_version,
            resources: n.resources.map(|r| NodeResources {
                cpus: r.cpus,
                memory_mb: r.memory_mb,
                gpus: r
                    .gpus
                    .into_iter()
                    .map(|g| Gpu {
                        index: g.index,
                        name: g.name,
                        memory_mb: g.memory_mb,
                    })
                    .collect(),
            }),
            provisioned_at: n.provisioned_at,
            connected_at: n.connected_at,
            updated_at: n.updated_at,
        })
    }
}

/// A node just provisioned, with its token: shown this once, never again.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProvisionedNode {
    /// The node.
    #[serde(flatten)]
    pub node: Node,
    /// The agent's bearer token. Only its fingerprint is stored; keep it
    /// safe, it cannot be shown again.
    pub token: String,
}

/// A page of nodes, by name.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NodeList {
    /// The nodes.
    pub items: Vec<Node>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}
