//! The queries that read the read models, one module per model.
//!
//! The tables' columns and the JSON layout of their documents are known
//! here and in the writers ([`crate::all`]) only; everything else reads the
//! models through these typed functions. Each function takes any executor
//! (a pool, a connection or an open transaction), so a caller's transaction
//! keeps covering the read.

pub mod nodes;
pub mod projects;
pub mod tasks;
pub mod timeline;
pub mod users;

use std::time::Duration;

use sqlx::PgPool;
use store::outbox::{self, Checkpoint};

/// Why a read-model query failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored document does not decode into this version's type.
    #[error("{table} doc does not decode: {reason}")]
    Undecodable {
        /// The read-model table it came from.
        table: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// Decodes a document of `table` into `T`.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    table: &'static str,
    doc: serde_json::Value,
) -> Result<T, ReadError> {
    serde_json::from_value(doc).map_err(|e| ReadError::Undecodable {
        table,
        reason: e.to_string(),
    })
}

/// How soon [`all_caught_up`] looks at the checkpoints again after the
/// first look found them behind. The projector usually applies a commit
/// within a few milliseconds, so the first looks come quickly; each wait
/// after that is twice the one before, up to [`CAUGHT_UP_POLL_MAX`], so a
/// stopped projector costs a waiting request a few dozen queries, not one
/// every few milliseconds for the whole wait.
const CAUGHT_UP_POLL_FIRST: Duration = Duration::from_millis(1);
/// The longest wait between two looks of [`all_caught_up`].
const CAUGHT_UP_POLL_MAX: Duration = Duration::from_millis(100);

/// The waits between the looks of [`all_caught_up`], first to last.
fn poll_waits() -> impl Iterator<Item = Duration> {
    std::iter::successors(Some(CAUGHT_UP_POLL_FIRST), |&wait| {
        Some((wait * 2).min(CAUGHT_UP_POLL_MAX))
    })
}

/// Waits until read model `name` reflects every event committed before
/// this call, for at most `within`; whether it does. A request that found
/// nothing in a read model though the caller has seen the thing in the log
/// (an artifact listed from its task's aggregate, say) asks again once
/// this returns `true`, so the answer no longer depends on how far the
/// projector had come.
///
/// # Errors
/// A database error.
pub async fn caught_up(pool: &PgPool, name: &str, within: Duration) -> Result<bool, ReadError> {
    all_caught_up(pool, &[name], within).await
}

/// Waits until every read model of `names` reflects every event committed
/// before this call, for at most `within`; whether they all do. A model
/// that has no checkpoint yet has applied nothing, so it has not caught up
/// with a log that holds anything.
///
/// # Errors
/// A database error.
pub async fn all_caught_up(
    pool: &PgPool,
    names: &[&str],
    within: Duration,
) -> Result<bool, ReadError> {
    let target = outbox::committed_head(pool).await?;
    if target == Checkpoint::default() {
        return Ok(true);
    }
    let mut names = names.to_vec();
    names.sort_unstable();
    names.dedup();
    let deadline = tokio::time::Instant::now() + within;
    let mut waits = poll_waits();
    loop {
        let at: Vec<(i64, i64)> =
            sqlx::query_as("SELECT txid, position FROM checkpoints WHERE name = ANY($1)")
                .bind(&names)
                .fetch_all(pool)
                .await?;
        let all_there = at.len() == names.len();
        if all_there
            && at
                .iter()
                .all(|&(txid, position)| Checkpoint { txid, position } >= target)
        {
            return Ok(true);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        // The last look comes at the deadline, not a wait past it.
        let wait = waits.next().unwrap_or(CAUGHT_UP_POLL_MAX);
        tokio::time::sleep(wait.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_come_quickly_then_back_off_to_the_cap() {
        let waits: Vec<u64> = poll_waits()
            .take(10)
            .map(|w| w.as_millis() as u64)
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 100, 100, 100]);
        // Five seconds of a stopped projector: a few dozen looks.
        let mut spent = Duration::ZERO;
        let looks = poll_waits()
            .take_while(|&w| {
                spent += w;
                spent <= Duration::from_secs(5)
            })
            .count()
            + 1;
        assert!((50..=60).contains(&looks), "{looks} looks in 5 s");
    }
}
