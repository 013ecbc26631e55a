//! What attempts hold on their nodes: `task_holds` (CPU and memory, one row
//! per attempt holding a node) and `gpu_holds` (one row per GPU device held,
//! keyed by node and device, so no device is ever held twice).
//!
//! A trigger keeps both in the transaction that appends the task's event:
//! `TaskAssigned` reserves, refusing with SQLSTATE [`NOT_RESERVED`] a
//! device already held or CPU and memory beyond the capacity the
//! assignment was made for; `TaskSucceeded`, `TaskFailed`, `TaskTimedOut`,
//! `TaskCancelled` and `TaskLost` release. So they are exact at every
//! commit, unlike read models, which follow the log a moment later: the
//! scheduler places from its own view of the tasks, and these refuse what
//! that view got wrong.

use std::collections::HashMap;

use sqlx::PgExecutor;
use uuid::Uuid;

/// The SQLSTATE of a reservation refused: a GPU device held by another
/// attempt, or a node's CPU or memory exceeded.
pub const NOT_RESERVED: &str = "UDR01";

/// What one attempt holds on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The task.
    pub task: Uuid,
    /// Its attempt holding the node.
    pub attempt: u32,
    /// The node.
    pub node: Uuid,
    /// The task's project, when its submission names one.
    pub project: Option<Uuid>,
    /// CPU in thousandths of a core.
    pub millicpus: u64,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// The GPU device indices held, lowest first.
    pub gpus: Vec<u32>,
}

/// A row of [`all`] as stored.
type HoldRow = (Uuid, i32, Uuid, Option<Uuid>, i64, i64, Vec<i32>);

/// Every hold, as of the statement's snapshot.
///
/// # Errors
/// A database error.
pub async fn all(db: impl PgExecutor<'_>) -> Result<Vec<Hold>, sqlx::Error> {
    let rows: Vec<HoldRow> = sqlx::query_as(
        "SELECT h.task_id, h.attempt, h.node_id, h.project_id, h.millicpus, h.memory_mb, \
                coalesce(array_agg(g.gpu ORDER BY g.gpu) FILTER (WHERE g.gpu IS NOT NULL), '{}') \
         FROM task_holds h LEFT JOIN gpu_holds g ON g.task_id = h.task_id \
         GROUP BY h.task_id",
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(task, attempt, node, project, millicpus, memory_mb, gpus)| Hold {
                task,
                attempt: attempt.max(0) as u32,
                node,
                project,
                millicpus: millicpus.max(0) as u64,
                memory_mb: memory_mb.max(0) as u64,
                gpus: gpus.into_iter().map(|g| g.max(0) as u32).collect(),
            },
        )
        .collect())
}

/// The GPU devices held on `node`, each with the task holding it.
///
/// # Errors
/// A database error.
pub async fn gpus_on(
    db: impl PgExecutor<'_>,
    node: Uuid,
) -> Result<HashMap<u32, Uuid>, sqlx::Error> {
    let rows: Vec<(i32, Uuid)> =
        sqlx::query_as("SELECT gpu, task_id FROM gpu_holds WHERE node_id = $1")
            .bind(node)
            .fetch_all(db)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(gpu, task)| (gpu.max(0) as u32, task))
        .collect())
}
