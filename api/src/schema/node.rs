//! Nodes: provisioning and the node as shown. The token fingerprint never
//! leaves the server.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;

/// The body of `POST /api/v1/nodes`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProvisionNode {
    /// A unique name: 1-63 lower-case letters, digits, '.', '_' or '-'.
    #[schema(
        example = "gpu-3",
        pattern = "^[a-z0-9][a-z0-9._-]*$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// Labels tasks can select the node by: the only ones placement
    /// matches, whatever the agent declares.
    #[serde(default)]
    #[schema(schema_with = crate::schema::optional_labels)]
    pub labels: Option<BTreeMap<String, String>>,
    /// The most the node may claim, whatever its agent declares; a
    /// missing or `null` field has no maximum.
    #[serde(default)]
    pub max_resources: Option<MaxResourcesInput>,
}

/// A maximum as given when provisioning; a missing or `null` field has no
/// maximum.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaxResourcesInput {
    /// CPU cores, more than 0; fractions allowed.
    #[schema(example = 4.0, exclusive_minimum = 0, maximum = 65536)]
    pub cpus: Option<f64>,
    /// Memory in MiB, 1 or more.
    #[schema(example = 16384, minimum = 1, maximum = 1073741824_i64)]
    pub memory_mb: Option<i64>,
    /// How many of the GPUs the agent declares count (the first ones), 0
    /// or more.
    #[schema(example = 1, minimum = 0, maximum = 1024)]
    pub gpus: Option<i64>,
}

impl From<MaxResourcesInput> for domain::node::ResourceLimitsDraft {
    fn from(m: MaxResourcesInput) -> Self {
        Self {
            cpus: m.cpus,
            memory_mb: m.memory_mb,
            gpus: m.gpus,
        }
    }
}

/// The body of `PUT /api/v1/nodes/{id}/labels`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetLabels {
    /// The node's whole new label set; `{}` removes every label. Required.
    #[schema(schema_with = crate::schema::labels)]
    pub labels: BTreeMap<String, String>,
}

/// The body of `POST /api/v1/nodes/{id}/labels/accept`; no body at all
/// accepts every declared label.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptLabels {
    /// The keys of the declared labels to accept; missing or `null`
    /// accepts them all.
    #[serde(default)]
    #[schema(example = json!(["gpu"]))]
    pub keys: Option<Vec<String>>,
}

/// The body of `PUT /api/v1/nodes/{id}/limits`. Every field is required,
/// `null` meaning no maximum, so that a forgotten field never lifts one.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetLimits {
    /// CPU cores, more than 0 (fractions allowed), or `null`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<f64>, required = true, example = 4.0, exclusive_minimum = 0, maximum = 65536)]
    pub cpus: Option<Option<f64>>,
    /// Memory in MiB, 1 or more, or `null`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, required = true, example = 16384, minimum = 1, maximum = 1073741824_i64)]
    pub memory_mb: Option<Option<i64>>,
    /// How many of the GPUs the agent declares count (the first ones), 0
    /// or more, or `null`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, required = true, example = 1, minimum = 0, maximum = 1024)]
    pub gpus: Option<Option<i64>>,
}

/// Tells a field given as `null` (`Some(None)`) from a missing one (`None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl SetLimits {
    /// The maximum as the domain checks it.
    ///
    /// # Errors
    /// 422 naming every missing field.
    pub fn draft(self) -> Result<domain::node::ResourceLimitsDraft, ApiError> {
        let mut missing = Vec::new();
        let mut required = |name: &str, present: bool| {
            if !present {
                missing.push(crate::error::Problem::field(
                    name,
                    "is required; give null for no maximum",
                ));
            }
        };
        required("cpus", self.cpus.is_some());
        required("memory_mb", self.memory_mb.is_some());
        required("gpus", self.gpus.is_some());
        if !missing.is_empty() {
            return Err(ApiError::Invalid(missing));
        }
        Ok(domain::node::ResourceLimitsDraft {
            cpus: self.cpus.flatten(),
            memory_mb: self.memory_mb.flatten(),
            gpus: self.gpus.flatten(),
        })
    }
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

/// CPUs, memory and GPUs of a node: as declared, or as counted.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NodeResources {
    /// CPU cores.
    pub cpus: f64,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// GPUs.
    pub gpus: Vec<Gpu>,
}

impl From<domain::node::NodeResources> for NodeResources {
    fn from(r: domain::node::NodeResources) -> Self {
        Self {
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
        }
    }
}

/// The most a node may claim, as an admin set it; `null` has no maximum.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct MaxResources {
    /// CPU cores.
    pub cpus: Option<f64>,
    /// Memory in MiB.
    pub memory_mb: Option<u64>,
    /// How many of the declared GPUs count.
    pub gpus: Option<u32>,
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
    /// The labels tasks are matched against, as an admin set them.
    pub labels: BTreeMap<String, String>,
    /// Labels the agent declared in its last session: never matched until
    /// an admin accepts them (`POST /api/v1/nodes/{id}/labels/accept`).
    pub declared_labels: BTreeMap<String, String>,
    /// The agent's version, from its last session.
    pub agent_version: Option<String>,
    /// What placement counts: what it declared, at most `max_resources`
    /// (GPUs: the first declared devices). `null` before it ever
    /// connected.
    pub resources: Option<NodeResources>,
    /// What the agent declared in its last session, unchecked.
    pub declared_resources: Option<NodeResources>,
    /// The most it may claim, as an admin set it.
    pub max_resources: MaxResources,
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
        let resources = n.effective_resources().map(NodeResources::from);
        let max = n.max_resources;
        Ok(Self {
            id,
            name: n.name,
            status: n.status.as_str().to_string(),
            drained: n.drained,
            labels: n.labels,
            declared_labels: n.declared_labels,
            agent_version: n.agent_version,
            resources,
            declared_resources: n.declared_resources.map(NodeResources::from),
            max_resources: MaxResources {
                cpus: max.cpus,
                memory_mb: max.memory_mb,
                gpus: max.gpus,
            },
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
