//! The rows heartbeats and `hello` keep: `node_liveness` and `node_cache`,
//! and the ingress's own record, `ingress_liveness`.
//!
//! Heartbeats are not events (thousands of nodes beating every 15 s would
//! drown the log); they move `node_liveness.last_seen`, which the scheduler
//! reads to decide that a node is gone. Each row names the session and the
//! ingress holding the node, so a late heartbeat of a replaced session
//! changes nothing.
//!
//! A node's silence means something only while the platform can hear it:
//! each ingress records that it is alive, and since when without a break,
//! so that after a restart or a database outage the scheduler gives nodes
//! a full window to come back before it calls any of them gone.

use std::time::Duration;

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

/// How often an ingress records that it is alive (`ingress_liveness`).
pub const ALIVE_EVERY: Duration = Duration::from_secs(2);

/// An ingress whose last record is older than this is not heard from: it
/// cannot write heartbeats either. When it records again after a gap this
/// long, its unbroken run (`alive_since`) starts anew.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(6);

/// Records that `ingress` is alive now: `alive_since` stays while its
/// records follow each other within [`ALIVE_WITHIN`], else starts now.
///
/// # Errors
/// A database error.
pub(crate) async fn alive(pool: &PgPool, ingress: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO ingress_liveness (ingress, alive_since, last_seen) VALUES ($1, now(), now()) \
         ON CONFLICT (ingress) DO UPDATE SET \
           alive_since = CASE WHEN ingress_liveness.last_seen < now() - make_interval(secs => $2) \
                         THEN now() ELSE ingress_liveness.alive_since END, \
           last_seen = now()",
    )
    .bind(ingress)
    .bind(ALIVE_WITHIN.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(())
}

/// Records that `ingress` is alive every [`ALIVE_EVERY`], for ever; first
/// forgets ingresses not heard from for a day. Failures are logged: the
/// gap they leave is what the scheduler must see.
pub(crate) async fn keep_alive(pool: &PgPool, ingress: &str) {
    if let Err(e) =
        sqlx::query("DELETE FROM ingress_liveness WHERE last_seen < now() - interval '1 day'")
            .execute(pool)
            .await
    {
        tracing::warn!(error = %e, "forgetting old ingress records failed");
    }
    let mut every = tokio::time::interval(ALIVE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = alive(pool, ingress).await {
            tracing::warn!(error = %e, "recording that this ingress is alive failed");
        }
    }
}

/// Removes `ingress`'s record as it stops: nodes are no longer heard
/// through it.
pub(crate) async fn gone(pool: &PgPool, ingress: &str) {
    if let Err(e) = sqlx::query("DELETE FROM ingress_liveness WHERE ingress = $1")
        .bind(ingress)
        .execute(pool)
        .await
    {
        tracing::warn!(error = %e, "removing this ingress's record failed");
    }
}
