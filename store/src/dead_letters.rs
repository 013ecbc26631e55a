//! Dead letters: events an outbox consumer could not apply, kept with the
//! error so that one bad event stops neither its consumer nor the others.
//!
//! A consumer records a dead letter only for a failure that will not pass
//! by itself (a payload this version cannot read, a constraint, a bug);
//! a lost connection is retried as ever ([`crate::is_transient`]). What a
//! consumer does after recording one is its own decision; the read models'
//! is in the `projections` crate. Rows stay until the consumer clears them
//! (a retry that now applies the event, or a rebuild).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;

use crate::outbox::{Checkpoint, RecordedEvent};

/// The most characters of an error kept: enough for any message of ours
/// or of PostgreSQL, bounded whatever a payload holds.
pub const ERROR_CHARS: usize = 2000;

/// One event a consumer could not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    /// The consumer: a read model's name, or `ingress`.
    pub consumer: String,
    /// The event's outbox position.
    pub position: i64,
    /// The id of the transaction that wrote it.
    pub txid: i64,
    /// Its aggregate's type.
    pub aggregate_type: String,
    /// Its aggregate's id.
    pub aggregate_id: String,
    /// Its number within the aggregate.
    pub sequence: i64,
    /// Such as `TaskSubmitted`.
    pub event_type: String,
    /// Why it could not be applied (at most [`ERROR_CHARS`] characters).
    pub error: String,
    /// When it first failed.
    pub first_seen: DateTime<Utc>,
    /// When it last failed.
    pub last_seen: DateTime<Utc>,
    /// How often it was tried.
    pub attempts: i32,
}

impl DeadLetter {
    /// Where the event stands in the global order.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            txid: self.txid,
            position: self.position,
        }
    }
}

/// `error` cut to at most [`ERROR_CHARS`] characters, marked when cut.
pub fn bounded(error: &str) -> String {
    match error.char_indices().nth(ERROR_CHARS) {
        None => error.to_string(),
        Some((cut, _)) => format!("{}…", &error[..cut]),
    }
}

/// Records that `consumer` could not apply `event` because of `error`;
/// when it was recorded before, counts one more attempt and keeps the
/// newest error.
///
/// # Errors
/// A database error.
pub async fn record<'e>(
    db: impl PgExecutor<'e>,
    consumer: &str,
    event: &RecordedEvent,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dead_letters (consumer, position, txid, aggregate_type, aggregate_id, \
           sequence, event_type, error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (consumer, position) DO UPDATE SET error = EXCLUDED.error, \
           last_seen = now(), attempts = dead_letters.attempts + 1",
    )
    .bind(consumer)
    .bind(event.position)
    .bind(event.txid)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(event.sequence)
    .bind(&event.event_type)
    .bind(bounded(error))
    .execute(db)
    .await?;
    Ok(())
}

/// The dead letters of `consumer` (of every consumer with `None`), by
/// consumer and then in the log's order.
///
/// # Errors
/// A database error.
pub async fn list<'e>(
    db: impl PgExecutor<'e>,
    consumer: Option<&str>,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    sqlx::query_as(
        "SELECT consumer, position, txid, aggregate_type, aggregate_id, sequence, event_type, \
           error, first_seen, last_seen, attempts FROM dead_letters \
         WHERE $1::text IS NULL OR consumer = $1 ORDER BY consumer, txid, position",
    )
    .bind(consumer)
    .fetch_all(db)
    .await
}

/// Up to `limit` dead letters of `consumer` for one aggregate after
/// `after`, in the log's order.
///
/// # Errors
/// A database error.
pub async fn of_aggregate<'e>(
    db: impl PgExecutor<'e>,
    consumer: &str,
    aggregate: (&str, &str),
    after: Checkpoint,
    limit: i64,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    sqlx::query_as(
        "SELECT consumer, position, txid, aggregate_type, aggregate_id, sequence, event_type, \
           error, first_seen, last_seen, attempts FROM dead_letters \
         WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3 \
           AND (txid, position) > ($4, $5) ORDER BY txid, position LIMIT $6",
    )
    .bind(consumer)
    .bind(aggregate.0)
    .bind(aggregate.1)
    .bind(after.txid)
    .bind(after.position)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// How many dead letters each consumer that has any holds, by name.
///
/// # Errors
/// A database error.
pub async fn counts<'e>(db: impl PgExecutor<'e>) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT consumer, count(*) FROM dead_letters GROUP BY consumer ORDER BY consumer",
    )
    .fetch_all(db)
    .await
}

/// The aggregates `consumer` holds dead letters of, each with the place of
/// its first one: events of the aggregate after that place wait behind it.
///
/// # Errors
/// A database error.
pub async fn held<'e>(
    db: impl PgExecutor<'e>,
    consumer: &str,
) -> Result<HashMap<(String, String), Checkpoint>, sqlx::Error> {
    let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT DISTINCT ON (aggregate_type, aggregate_id) aggregate_type, aggregate_id, txid, position \
         FROM dead_letters WHERE consumer = $1 ORDER BY aggregate_type, aggregate_id, txid, position",
    )
    .bind(consumer)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(t, id, txid, position)| ((t, id), Checkpoint { txid, position }))
        .collect())
}

/// Removes `consumer`'s dead letter of the event at `position`; whether
/// there was one.
///
/// # Errors
/// A database error.
pub async fn remove<'e>(
    db: impl PgExecutor<'e>,
    consumer: &str,
    position: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM dead_letters WHERE consumer = $1 AND position = $2")
        .bind(consumer)
        .bind(position)
        .execute(db)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Removes every dead letter of the `consumers`; how many there were.
///
/// # Errors
/// A database error.
pub async fn clear<'e>(db: impl PgExecutor<'e>, consumers: &[&str]) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM dead_letters WHERE consumer = ANY($1)")
        .bind(consumers)
        .execute(db)
        .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_error_is_cut_on_a_character_and_marked() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(ERROR_CHARS + 10);
        let cut = bounded(&long);
        assert_eq!(cut.chars().count(), ERROR_CHARS + 1);
        assert!(cut.ends_with('…'));
    }
}
