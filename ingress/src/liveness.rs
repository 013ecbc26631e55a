//! The rows heartbeats and `hello` keep: `node_liveness` and `node_cache`.
//!
//! Heartbeats are not events (thousands of nodes beating every 15 s would
//! drown the log); they move `node_liveness.last_seen`, which the scheduler
//! reads to decide that a node is gone. Each row names the session and the
//! ingress holding the node, so a late heartbeat of a replaced session
//! changes nothing.

use chrono::{DateTime, Utc};
use protocol::Cache;
use sqlx::PgPool;
use uuid::Uuid;

/// Records that `session` of `node_id` is held by `ingress` since `at`.
///
/// # Errors
/// A database error.
pub(crate) async fn connected(
    pool: &PgPool,
    node_id: Uuid,
    session: Uuid,
    ingress: &str,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO node_liveness (node_id, session, ingress, connected_at, last_seen) \
         VALUES ($1, $2, $3, $4, $4) \
         ON CONFLICT (node_id) DO UPDATE SET session = EXCLUDED.session, \
           ingress = EXCLUDED.ingress, connected_at = EXCLUDED.connected_at, \
           last_seen = EXCLUDED.last_seen",
    )
    .bind(node_id)
    .bind(session)
    .bind(ingress)
    .bind(at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Stores what the node has cached, as it said in `hello`.
///
/// # Errors
/// A database error.
pub(crate) async fn cache(pool: &PgPool, node_id: Uuid, cache: &Cache) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO node_cache (node_id, images, commits, updated_at) VALUES ($1, $2, $3, now()) \
         ON CONFLICT (node_id) DO UPDATE SET images = EXCLUDED.images, \
           commits = EXCLUDED.commits, updated_at = EXCLUDED.updated_at",
    )
    .bind(node_id)
    .bind(&cache.images)
    .bind(&cache.commits)
    .execute(pool)
    .await?;
    Ok(())
}

/// Moves `last_seen` of `session`; returns whether the row still belongs
/// to that session.
///
/// # Errors
/// A database error.
pub(crate) async fn heartbeat(
    pool: &PgPool,
    node_id: Uuid,
    session: Uuid,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE node_liveness SET last_seen = now() WHERE node_id = $1 AND session = $2",
    )
    .bind(node_id)
    .bind(session)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}
