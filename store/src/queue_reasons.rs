//! Why queued tasks wait: `task_queue_reasons`, one row per queued task
//! the scheduler has looked at, written by the leading scheduler and read
//! by the API.
//!
//! These are not events: a reason changes with the cluster (a node joins,
//! a GPU is freed) and an event per change and task would drown the log.
//! The scheduler keeps what it recorded in memory and writes only the rows
//! whose explanation changed, and removes the rows of tasks that left the
//! queue, in one statement per round ([`record`]). A row names the attempt
//! the task waits after (0 before its first), so a reader shows it only
//! while the task is still queued after that same attempt: a row left
//! behind by a scheduler that stopped never explains a later wait.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

/// Why a queued task waits: a sentence and the reasons as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// One line for people, such as `no online node carries label
    /// gpu=a100 (of 3 nodes: 1 offline, 2 lack the label)`.
    pub summary: String,
    /// Each thing that holds the task, most telling first.
    pub reasons: Vec<Reason>,
}

/// One thing that holds a queued task.
///
/// Node reasons count each node once, under the first rule it breaks, in
/// this order: offline, drained, labels, CPU, memory, GPUs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// No node has joined (or every one was revoked).
    NoNodes,
    /// Nodes that are offline or whose agent never connected.
    Offline {
        /// How many.
        nodes_filtered: u32,
        /// How many of them carry all of the task's labels.
        with_labels: u32,
    },
    /// Online nodes an admin drained.
    Drained {
        /// How many.
        nodes_filtered: u32,
        /// How many of them carry all of the task's labels.
        with_labels: u32,
    },
    /// Online, undrained nodes lacking a label the task needs.
    Label {
        /// The label, `key=value`.
        label: String,
        /// How many nodes lack it (and had every label checked before).
        nodes_filtered: u32,
    },
    /// Nodes with the labels but too little free CPU.
    Cpu {
        /// How many.
        nodes_filtered: u32,
        /// CPU cores the task needs.
        need: f64,
        /// The most free cores of a node with the task's labels.
        most_free: f64,
        /// The most cores such a node has at all.
        largest: f64,
    },
    /// Nodes with the labels but too little free memory.
    Memory {
        /// How many.
        nodes_filtered: u32,
        /// MiB the task needs.
        need_mb: u64,
        /// The most free MiB of a node with the task's labels.
        most_free_mb: u64,
        /// The most MiB such a node has at all.
        largest_mb: u64,
    },
    /// Nodes with the labels but too few free GPUs.
    Gpus {
        /// How many.
        nodes_filtered: u32,
        /// GPUs the task needs.
        need: u32,
        /// The most free GPUs of a node with the task's labels.
        most_free: u32,
        /// The most GPUs such a node has at all.
        largest: u32,
    },
    /// The task fitted a node, but tasks placed ahead of it took the room.
    Taken,
    /// The project runs as many tasks as its `max_running` allows.
    Quota {
        /// The project's limit.
        max_running: u32,
        /// Its tasks holding nodes.
        running: u32,
    },
    /// A retried task waits out its backoff.
    Backoff {
        /// When the backoff ends.
        until: DateTime<Utc>,
    },
    /// The task fits a node and waits for its turn.
    InLine,
}

/// A recorded explanation.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The task.
    pub task: Uuid,
    /// The attempt the task waits after: 0 before its first.
    pub attempt: u32,
    /// Why it waits.
    pub explanation: Explanation,
    /// Since when this explanation holds.
    pub since: DateTime<Utc>,
}

/// A row as stored: task, attempt, reason, since.
type Row = (Uuid, i32, serde_json::Value, DateTime<Utc>);

fn decode((task, attempt, reason, since): Row) -> Option<Recorded> {
    match serde_json::from_value(reason) {
        Ok(explanation) => Some(Recorded {
            task,
            attempt: attempt.max(0) as u32,
            explanation,
            since,
        }),
        Err(e) => {
            tracing::warn!(%task, error = %e, "unreadable queue reason");
            None
        }
    }
}

/// The recorded explanation of `task`, whatever state the task is in now:
/// the caller checks that it is still queued after the same attempt.
///
/// # Errors
/// A database error.
pub async fn get(db: impl PgExecutor<'_>, task: Uuid) -> Result<Option<Recorded>, sqlx::Error> {
    let row: Option<Row> = sqlx::query_as(
        "SELECT task_id, attempt, reason, since FROM task_queue_reasons WHERE task_id = $1",
    )
    .bind(task)
    .fetch_optional(db)
    .await?;
    Ok(row.and_then(decode))
}

/// Every recorded explanation, after removing the rows of tasks the
/// `tasks` read model no longer has queued: what a new leader starts from.
///
/// # Errors
/// A database error.
pub async fn load(pool: &PgPool) -> Result<Vec<Recorded>, sqlx::Error> {
    sqlx::query(
        "DELETE FROM task_queue_reasons r WHERE NOT EXISTS \
         (SELECT 1 FROM task_view v WHERE v.id = r.task_id AND v.state = 'queued')",
    )
    .execute(pool)
    .await?;
    let rows: Vec<Row> =
        sqlx::query_as("SELECT task_id, attempt, reason, since FROM task_queue_reasons")
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().filter_map(decode).collect())
}

/// Records, as the leader of `term` at `now`, the explanations that
/// `changed` (task, attempt, explanation) and removes those of the tasks
/// `gone` from the queue, in one statement. A row stays as it is when a
/// leader of a later term wrote it; an explanation equal to the stored one
/// keeps its `since`.
///
/// # Errors
/// A database error, or an explanation that does not serialise.
pub async fn record(
    db: impl PgExecutor<'_>,
    term: u64,
    now: DateTime<Utc>,
    changed: &[(Uuid, u32, &Explanation)],
    gone: &[Uuid],
) -> Result<(), sqlx::Error> {
    let mut ids = Vec::with_capacity(changed.len());
    let mut attempts = Vec::with_capacity(changed.len());
    let mut reasons = Vec::with_capacity(changed.len());
    for (task, attempt, explanation) in changed {
        ids.push(*task);
        attempts.push(i32::try_from(*attempt).unwrap_or(i32::MAX));
        reasons.push(serde_json::to_value(explanation).map_err(|e| sqlx::Error::Encode(e.into()))?);
    }
    sqlx::query(
        "WITH gone AS ( \
           DELETE FROM task_queue_reasons WHERE task_id = ANY($1) AND term <= $2) \
         INSERT INTO task_queue_reasons AS r (task_id, attempt, term, reason, since, updated_at) \
         SELECT c.task_id, c.attempt, $2, c.reason, $3, $3 \
         FROM unnest($4::uuid[], $5::int[], $6::jsonb[]) AS c(task_id, attempt, reason) \
         ON CONFLICT (task_id) DO UPDATE SET \
           attempt = EXCLUDED.attempt, term = EXCLUDED.term, reason = EXCLUDED.reason, \
           since = CASE WHEN r.attempt = EXCLUDED.attempt AND r.reason = EXCLUDED.reason \
                        THEN r.since ELSE EXCLUDED.since END, \
           updated_at = EXCLUDED.updated_at \
         WHERE r.term <= EXCLUDED.term",
    )
    .bind(gone)
    .bind(i64::try_from(term).unwrap_or(i64::MAX))
    .bind(now)
    .bind(ids)
    .bind(attempts)
    .bind(reasons)
    .execute(db)
    .await?;
    Ok(())
}
