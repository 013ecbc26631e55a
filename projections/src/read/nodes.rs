//! The nodes read model, `node_view`.

use chrono::{DateTime, Utc};
use domain::node::Node;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{decode, ReadError};

/// The name of the checkpoint of the read model `node_view` belong to:
/// events after it are not in them yet.
pub const CHECKPOINT: &str = "nodes";

/// One node of a page, with the key it is ordered by.
#[derive(Debug, Clone)]
pub struct NodeRow {
    /// The node.
    pub node: Node,
    /// Its name, the first part of the order.
    pub name: String,
    /// Its id, which breaks ties between equal names.
    pub id: Uuid,
}

/// Up to `limit` nodes ordered by (name, id), those after `after` when it
/// is given.
pub async fn page(
    db: impl PgExecutor<'_>,
    after: Option<(&str, Uuid)>,
    limit: i64,
) -> Result<Vec<NodeRow>, ReadError> {
    let (name, id) = after.unzip();
    let rows: Vec<(serde_json::Value, String, Uuid)> = sqlx::query_as(
        "SELECT doc, name, id FROM node_view \
         WHERE ($1::text IS NULL OR (name, id) > ($1, $2)) ORDER BY name, id LIMIT $3",
    )
    .bind(name)
    .bind(id)
    .bind(limit)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|(doc, name, id)| {
            Ok(NodeRow {
                node: decode("node_view", doc)?,
                name,
                id,
            })
        })
        .collect()
}

/// An online node and its last sign of life.
#[derive(Debug, Clone, Copy)]
pub struct Silent {
    /// The node.
    pub id: Uuid,
    /// Its last heartbeat, or its last change without one.
    pub last_seen: DateTime<Utc>,
}

/// Online nodes whose last sign of life is before `cutoff`.
pub async fn silent_online(
    db: impl PgExecutor<'_>,
    cutoff: DateTime<Utc>,
) -> Result<Vec<Silent>, sqlx::Error> {
    let rows: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
        "SELECT n.id, coalesce(l.last_seen, n.updated_at) FROM node_view n \
         LEFT JOIN node_liveness l ON l.node_id = n.id \
         WHERE n.status = 'online' AND coalesce(l.last_seen, n.updated_at) < $1",
    )
    .bind(cutoff)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, last_seen)| Silent { id, last_seen })
        .collect())
}

/// A node work may be placed on, with its caches.
#[derive(Debug)]
pub struct Placeable {
    /// The node's id.
    pub id: Uuid,
    /// The node, or why the stored one does not decode.
    pub node: Result<Node, serde_json::Error>,
    /// The images it has cached.
    pub images: Vec<String>,
    /// The code commits it has cached.
    pub commits: Vec<String>,
}

/// A row of [`placeable`] as stored: id, document, images, commits.
type PlaceableRow = (
    Uuid,
    serde_json::Value,
    Option<Vec<String>>,
    Option<Vec<String>>,
);

/// A node work may not be placed on now: offline, never connected, or
/// drained. Revoked nodes are not counted: they are gone for good.
#[derive(Debug, Clone, PartialEq)]
pub struct Unplaceable {
    /// Whether it is online (and so drained).
    pub online: bool,
    /// The labels an admin set.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Nodes that could take work once they are online and undrained, with
/// their labels: what explains a queued task besides the nodes it could
/// be placed on. A node whose labels do not decode counts without labels.
pub async fn unplaceable(db: impl PgExecutor<'_>) -> Result<Vec<Unplaceable>, sqlx::Error> {
    let rows: Vec<(String, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT status, doc->'labels' FROM node_view \
         WHERE status IN ('provisioned', 'offline') OR (status = 'online' AND drained)",
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(status, labels)| Unplaceable {
            online: status == "online",
            labels: labels
                .and_then(|l| serde_json::from_value(l).ok())
                .unwrap_or_default(),
        })
        .collect())
}

/// Online, undrained nodes and their caches.
pub async fn placeable(db: impl PgExecutor<'_>) -> Result<Vec<Placeable>, sqlx::Error> {
    let rows: Vec<PlaceableRow> = sqlx::query_as(
        "SELECT n.id, n.doc, c.images, c.commits FROM node_view n \
                 LEFT JOIN node_cache c ON c.node_id = n.id \
                 WHERE n.status = 'online' AND NOT n.drained",
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, doc, images, commits)| Placeable {
            id,
            node: serde_json::from_value(doc),
            images: images.unwrap_or_default(),
            commits: commits.unwrap_or_default(),
        })
        .collect())
}
