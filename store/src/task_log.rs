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

use sqlx::PgPool;
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
