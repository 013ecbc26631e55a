//! Task output in `task_log`: what the ingress writes and the API reads.
//!
//! An attempt's output is a chain of chunks keyed by byte offset: the first
//! starts at 0 and each next one starts where the one before it ends, so
//! the chunk holding any offset is the one with the greatest `offset` at or
//! before it, found by the primary key alone. The ingress keeps the chain
//! whole (it refuses chunks that would overlap it or leave a gap), which is
//! also what bounds an attempt's stored bytes by its last offset.
//!
//! Log rows are not events and have no outbox: the ingress sends a NOTIFY
//! on [`CHANNEL`] with the task id (coalesced, outside any write) after
//! storing chunks or a final report, and followers poll slowly as well, so
//! a lost notification only delays them.
//!
//! Output is bounded in time and space: the scheduler role removes the
//! output of finished tasks past a retention or a budget, oldest first
//! ([`remove_batch`]), and while the database is over its size budget a
//! trigger refuses new chunks ([`is_refused`]). What is no longer stored
//! is recorded per attempt, with why ([`removed`]), so readers are told
//! rather than shown an empty output.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

/// The channel the ingress NOTIFYs with a task's id when its output grew
/// or one of its attempts ended.
pub const CHANNEL: &str = "unidesk_task_log";

/// The most chunks one [`page`] reads, whatever their size.
pub const PAGE_ROWS: i64 = 1024;

/// One stored chunk: where it starts and its text.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Chunk {
    /// Byte offset of `data` in the attempt's output.
    pub offset: i64,
    /// The text.
    pub data: String,
}

/// The chunks of `attempt` from the one holding byte `offset` on, in
/// order, until they hold at least `max_bytes` (the last one may pass it)
/// or [`PAGE_ROWS`] chunks. Only the chunks returned are read in full, so a
/// reader's memory stays bounded whatever the size of the output.
///
/// # Errors
/// A database error.
pub async fn page(
    pool: &PgPool,
    task_id: Uuid,
    attempt: u32,
    offset: u64,
    max_bytes: usize,
) -> Result<Vec<Chunk>, sqlx::Error> {
    sqlx::query_as(
        "SELECT \"offset\", data FROM ( \
           SELECT \"offset\", data, \
                  sum(octet_length(data)) OVER (ORDER BY \"offset\") - octet_length(data) AS before \
           FROM task_log \
           WHERE task_id = $1 AND attempt = $2 AND \"offset\" >= COALESCE( \
             (SELECT max(\"offset\") FROM task_log \
              WHERE task_id = $1 AND attempt = $2 AND \"offset\" <= $3), 0) \
           ORDER BY \"offset\" LIMIT $5 \
         ) page WHERE before < $4 ORDER BY \"offset\"",
    )
    .bind(task_id)
    .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
    .bind(i64::try_from(offset).unwrap_or(i64::MAX))
    .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
    .bind(PAGE_ROWS)
    .fetch_all(pool)
    .await
}

/// Where `attempt`'s stored output ends: the end of its last chunk, or
/// `None` when nothing is stored.
///
/// # Errors
/// A database error.
pub async fn stored_end(
    pool: &PgPool,
    task_id: Uuid,
    attempt: u32,
) -> Result<Option<u64>, sqlx::Error> {
    let end: Option<i64> = sqlx::query_scalar(
        "SELECT \"offset\" + octet_length(data) FROM task_log \
         WHERE task_id = $1 AND attempt = $2 ORDER BY \"offset\" DESC LIMIT 1",
    )
    .bind(task_id)
    .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
    .fetch_optional(pool)
    .await?;
    Ok(end.map(|e| e.max(0) as u64))
}

/// The SQLSTATE of a chunk refused because the database is over its size
/// budget (raised by a trigger on `task_log`).
pub const REFUSED_SQLSTATE: &str = "UD001";

/// What the agent is told when its output is refused for that reason.
pub const REFUSED: &str = "task output is not stored: the server's database is over its size \
    budget; the rest of this attempt's output is dropped";

/// Whether `e` is the refusal of a chunk because the database is over its
/// size budget: permanent for that chunk.
pub fn is_refused(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some(REFUSED_SQLSTATE))
}

/// Why output is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovedBy {
    /// The task finished longer ago than the retention.
    Retention,
    /// Stored output exceeded its budget, and this task's was among the
    /// oldest.
    LogBudget,
    /// The database was over its size budget when the output came.
    DbBudget,
}

impl RemovedBy {
    /// As stored and shown: `retention`, `log_budget` or `db_budget`.
    pub fn as_str(self) -> &'static str {
        match self {
            RemovedBy::Retention => "retention",
            RemovedBy::LogBudget => "log_budget",
            RemovedBy::DbBudget => "db_budget",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "retention" => RemovedBy::Retention,
            "log_budget" => RemovedBy::LogBudget,
            _ => RemovedBy::DbBudget,
        }
    }
}

/// Output of an attempt that is not, or no longer, stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removed {
    /// The attempt.
    pub attempt: u32,
    /// Where the missing output starts: 0 when all of it was removed.
    pub from_offset: u64,
    /// Why.
    pub reason: RemovedBy,
    /// When.
    pub at: DateTime<Utc>,
}

/// What is missing of `task_id`'s output, per attempt with any.
///
/// # Errors
/// A database error.
pub async fn removed<'e>(
    db: impl PgExecutor<'e>,
    task_id: Uuid,
) -> Result<Vec<Removed>, sqlx::Error> {
    let rows: Vec<(i32, i64, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT attempt, from_offset, reason, removed_at FROM task_log_removed \
         WHERE task_id = $1 ORDER BY attempt",
    )
    .bind(task_id)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(attempt, from, reason, at)| Removed {
            attempt: attempt.max(0) as u32,
            from_offset: from.max(0) as u64,
            reason: RemovedBy::parse(&reason),
            at,
        })
        .collect())
}

/// Records that `attempt`'s output from `offset` on was refused (the
/// database was over its budget); the first refusal stays.
///
/// # Errors
/// A database error.
pub async fn record_refused(
    pool: &PgPool,
    task_id: Uuid,
    attempt: i32,
    offset: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO task_log_removed (task_id, attempt, from_offset, reason) \
         VALUES ($1, $2, $3, 'db_budget') ON CONFLICT DO NOTHING",
    )
    .bind(task_id)
    .bind(attempt)
    .bind(offset)
    .execute(pool)
    .await?;
    Ok(())
}

/// A finished task whose output is stored, as the retention and budget
/// see it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Stored {
    /// The task.
    pub task_id: Uuid,
    /// Its stored output in bytes.
    pub bytes: i64,
    /// When it finished (its last change in `task_view`).
    pub finished_at: DateTime<Utc>,
}

/// The stored output of every task together, in bytes.
///
/// # Errors
/// A database error.
pub async fn total_bytes<'e>(db: impl PgExecutor<'e>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COALESCE(sum(bytes), 0)::bigint FROM task_log_usage")
        .fetch_one(db)
        .await
}

/// Up to `limit` tasks that finished (per `task_view`) before `before`,
/// that have stored output and are not in `except`, the earliest finished
/// first.
///
/// # Errors
/// A database error.
pub async fn finished_with_output<'e>(
    db: impl PgExecutor<'e>,
    before: DateTime<Utc>,
    except: &[Uuid],
    limit: i64,
) -> Result<Vec<Stored>, sqlx::Error> {
    sqlx::query_as(
        "SELECT u.task_id, u.bytes, t.updated_at AS finished_at \
         FROM task_log_usage u JOIN task_view t ON t.id = u.task_id \
         WHERE t.state IN ('succeeded', 'failed', 'timed_out', 'cancelled') \
           AND t.updated_at < $1 AND u.task_id <> ALL($2) \
         ORDER BY t.updated_at, u.task_id LIMIT $3",
    )
    .bind(before)
    .bind(except)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Marks every attempt of `task_id` with stored output as removed for
/// `reason`, before its chunks go: readers are told at once, even while
/// the removal is under way.
///
/// # Errors
/// A database error.
pub async fn mark_removed<'e>(
    db: impl PgExecutor<'e>,
    task_id: Uuid,
    reason: RemovedBy,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO task_log_removed (task_id, attempt, from_offset, reason) \
         SELECT DISTINCT task_id, attempt, 0, $2 FROM task_log WHERE task_id = $1 \
         ON CONFLICT (task_id, attempt) DO UPDATE SET from_offset = 0, reason = EXCLUDED.reason, \
           removed_at = now()",
    )
    .bind(task_id)
    .bind(reason.as_str())
    .execute(db)
    .await?;
    Ok(())
}

/// Deletes up to `rows` chunks of `task_id`'s output in one short
/// statement; returns how many. When none are left, the task's usage row
/// goes too. Idempotent: run it until it returns 0.
///
/// # Errors
/// A database error.
pub async fn remove_batch(pool: &PgPool, task_id: Uuid, rows: i64) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query(
        "DELETE FROM task_log WHERE (task_id, attempt, \"offset\") IN ( \
           SELECT task_id, attempt, \"offset\" FROM task_log WHERE task_id = $1 LIMIT $2)",
    )
    .bind(task_id)
    .bind(rows)
    .execute(pool)
    .await?
    .rows_affected();
    if deleted == 0 {
        sqlx::query("DELETE FROM task_log_usage WHERE task_id = $1")
            .bind(task_id)
            .execute(pool)
            .await?;
    }
    Ok(deleted)
}
