//! The tasks read model, `task_view`.

use chrono::{DateTime, Utc};
use domain::spec::TaskSpec;
use domain::task::{Task, TaskState};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{decode, ReadError};

/// Which tasks a page of the task list holds; every field that is given
/// narrows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskFilter<'a> {
    /// Only tasks of this project.
    pub project: Option<Uuid>,
    /// Only tasks in this state.
    pub state: Option<TaskState>,
    /// Only tasks placed on this node.
    pub node: Option<Uuid>,
    /// Only tasks listed before this list position (the page cursor).
    pub before: Option<i64>,
    /// Only tasks of projects this user is a member of.
    pub member: Option<&'a str>,
}

/// One task of a page, with the position it is ordered by.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// The task.
    pub task: Task,
    /// Its list position; pages run from the highest down.
    pub list_position: i64,
}

/// Up to `limit` tasks matching `filter`, newest listed first.
pub async fn page(
    db: impl PgExecutor<'_>,
    filter: &TaskFilter<'_>,
    limit: i64,
) -> Result<Vec<TaskRow>, ReadError> {
    let rows: Vec<(serde_json::Value, i64)> = sqlx::query_as(
        "SELECT doc, list_position FROM task_view \
         WHERE ($1::uuid IS NULL OR project_id = $1) \
           AND ($2::text IS NULL OR state = $2) \
           AND ($3::uuid IS NULL OR node_id = $3) \
           AND ($4::bigint IS NULL OR list_position < $4) \
           AND ($5::text IS NULL OR project_id IN \
                (SELECT project_id FROM project_member_view WHERE user_name = $5)) \
         ORDER BY list_position DESC LIMIT $6",
    )
    .bind(filter.project)
    .bind(filter.state.map(TaskState::as_str))
    .bind(filter.node)
    .bind(filter.before)
    .bind(filter.member)
    .bind(limit)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|(doc, list_position)| {
            Ok(TaskRow {
                task: decode("task_view", doc)?,
                list_position,
            })
        })
        .collect()
}

/// The id of the task holding artifact `artifact`, if any task does.
pub async fn holding_artifact(
    db: impl PgExecutor<'_>,
    artifact: Uuid,
) -> Result<Option<Uuid>, ReadError> {
    let wanted = serde_json::json!([{ "id": artifact }]);
    Ok(
        sqlx::query_scalar("SELECT id FROM task_view WHERE doc->'artifacts' @> $1 LIMIT 1")
            .bind(wanted)
            .fetch_optional(db)
            .await?,
    )
}

/// The states in which a task holds its node, as SQL.
const HOLDING: &str = "('assigned', 'accepted', 'preparing', 'running')";

/// An attempt holding a node that has gone away, or may have.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HeldAttempt {
    /// The task.
    pub task: Uuid,
    /// The attempt's number.
    pub attempt: i32,
    /// The node it holds.
    pub node: Uuid,
    /// The node's name.
    pub name: String,
    /// The node's status.
    pub status: String,
    /// The node's last heartbeat, if it sent any.
    pub last_seen: Option<DateTime<Utc>>,
    /// Running past its `timeout_s` already.
    pub overdue: bool,
}

/// Attempts holding a node that is revoked or whose last heartbeat (or,
/// without one, the task's last change) is before `cutoff`; `overdue` is
/// measured against `now`.
pub async fn held_on_gone_nodes(
    db: impl PgExecutor<'_>,
    cutoff: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Vec<HeldAttempt>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT t.id AS task, t.attempt, t.node_id AS node, n.name, n.status, l.last_seen, \
                coalesce(t.state = 'running' \
                  AND (t.doc->>'started_at')::timestamptz \
                      + make_interval(secs => (t.doc->'spec'->>'timeout_s')::float8) < $2, \
                  false) AS overdue \
         FROM task_view t JOIN node_view n ON n.id = t.node_id \
         LEFT JOIN node_liveness l ON l.node_id = t.node_id \
         WHERE t.state IN {HOLDING} \
           AND (n.status = 'revoked' OR coalesce(l.last_seen, t.updated_at) < $1)"
    ))
    .bind(cutoff)
    .bind(now)
    .fetch_all(db)
    .await
}

/// An attempt assigned to a node that has not taken it on.
#[derive(Debug, Clone)]
pub struct Unaccepted {
    /// The task.
    pub task: Uuid,
    /// The attempt's number.
    pub attempt: i32,
    /// The node it is assigned to.
    pub node: Uuid,
    /// The node's name.
    pub node_name: String,
}

/// Attempts still assigned, not accepted, whose task last changed before
/// `cutoff`.
pub async fn unaccepted(
    db: impl PgExecutor<'_>,
    cutoff: DateTime<Utc>,
) -> Result<Vec<Unaccepted>, sqlx::Error> {
    let rows: Vec<(Uuid, i32, Uuid, String)> = sqlx::query_as(
        "SELECT t.id, t.attempt, t.node_id, n.name FROM task_view t \
         JOIN node_view n ON n.id = t.node_id \
         WHERE t.state = 'assigned' AND t.updated_at < $1",
    )
    .bind(cutoff)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(task, attempt, node, node_name)| Unaccepted {
            task,
            attempt,
            node,
            node_name,
        })
        .collect())
}

/// A task and one of its attempts.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// The task.
    pub task: Uuid,
    /// The attempt's number.
    pub attempt: i32,
}

/// Running attempts with a time limit that, `grace_s` seconds added, has
/// passed at `now`.
pub async fn overdue(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
    grace_s: f64,
) -> Result<Vec<Attempt>, sqlx::Error> {
    let rows: Vec<(Uuid, i32)> = sqlx::query_as(
        "SELECT id, attempt FROM task_view WHERE state = 'running' \
         AND (doc->'spec'->>'timeout_s') IS NOT NULL \
         AND (doc->>'started_at')::timestamptz \
             + make_interval(secs => (doc->'spec'->>'timeout_s')::float8 + $2) < $1",
    )
    .bind(now)
    .bind(grace_s)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(task, attempt)| Attempt { task, attempt })
        .collect())
}

/// A queued task as placement needs it.
#[derive(Debug)]
pub struct QueuedTask {
    /// The task.
    pub id: Uuid,
    /// Its project.
    pub project: Uuid,
    /// Its priority.
    pub priority: i32,
    /// Its spec, or why the stored one does not decode.
    pub spec: Result<TaskSpec, serde_json::Error>,
}

/// Up to `limit` queued tasks, highest priority and oldest first, without
/// those in `skip` and those whose retry backoff lasts past `now`.
pub async fn queued(
    db: impl PgExecutor<'_>,
    limit: i64,
    skip: &[Uuid],
    now: DateTime<Utc>,
) -> Result<Vec<QueuedTask>, sqlx::Error> {
    let rows: Vec<(Uuid, Uuid, i32, serde_json::Value)> = sqlx::query_as(
        "SELECT id, project_id, priority, doc->'spec' FROM task_view \
         WHERE state = 'queued' AND NOT (id = ANY($2)) \
           AND (doc->>'not_before' IS NULL OR (doc->>'not_before')::timestamptz <= $3) \
         ORDER BY priority DESC, submitted_at, id LIMIT $1",
    )
    .bind(limit)
    .bind(skip)
    .bind(now)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, project, priority, spec)| QueuedTask {
            id,
            project,
            priority,
            spec: serde_json::from_value(spec),
        })
        .collect())
}

/// How many queued tasks come before a task of `priority` submitted at
/// `submitted_at` with id `id`, in the order the scheduler takes them
/// (highest priority, then oldest, first; projects take turns within a
/// priority, so this is the most that are ahead of it in its priority).
///
/// # Errors
/// A database error.
pub async fn queued_ahead(
    db: impl PgExecutor<'_>,
    priority: i32,
    submitted_at: DateTime<Utc>,
    id: Uuid,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM task_view WHERE state = 'queued' AND id <> $3 \
           AND (priority > $1 OR (priority = $1 AND (submitted_at, id) < ($2, $3)))",
    )
    .bind(priority)
    .bind(submitted_at)
    .bind(id)
    .fetch_one(db)
    .await
}

/// The name of the checkpoint of the read model `task_view` belongs to:
/// events after it are not in `task_view` yet.
pub const CHECKPOINT: &str = "tasks";

/// The ids of the tasks holding node `node_id`.
///
/// # Errors
/// A database error.
pub async fn held_by(db: impl PgExecutor<'_>, node_id: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT id FROM task_view WHERE node_id = $1 AND state IN {HOLDING}"
    ))
    .bind(node_id)
    .fetch_all(db)
    .await
}

/// How many tasks of one project are in one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateCount {
    /// The project's name; `None` when the projects read model does not
    /// know the project (yet).
    pub project: Option<String>,
    /// The state.
    pub state: TaskState,
    /// How many tasks.
    pub tasks: i64,
}

/// How many tasks are in each state, per project: one row per project and
/// state that has any, from the counts the tasks read model keeps beside
/// its rows. A state this version does not know is left out.
///
/// # Errors
/// A database error.
pub async fn counts(db: impl PgExecutor<'_>) -> Result<Vec<StateCount>, sqlx::Error> {
    let rows: Vec<(Option<String>, String, i64)> = sqlx::query_as(
        "SELECT p.name, c.state, c.tasks FROM task_counts c \
         LEFT JOIN project_view p ON p.id = c.project_id \
         ORDER BY p.name, c.state",
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(project, state, tasks)| {
            let state = TaskState::ALL.into_iter().find(|s| s.as_str() == state)?;
            Some(StateCount {
                project,
                state,
                tasks,
            })
        })
        .collect())
}

/// How many queued tasks the scheduler may place at `now`: queued, their
/// retry backoff (if any) over.
///
/// # Errors
/// A database error.
pub async fn ready_to_place(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM task_view WHERE state = 'queued' \
           AND (doc->>'not_before' IS NULL OR (doc->>'not_before')::timestamptz <= $1)",
    )
    .bind(now)
    .fetch_one(db)
    .await
}

/// The tasks with these ids that the read model holds, in no order.
///
/// # Errors
/// A database error, or a stored document that does not decode.
pub async fn by_ids(db: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<Vec<Task>, ReadError> {
    let docs: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT doc FROM task_view WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(db)
            .await?;
    docs.into_iter()
        .map(|doc| decode("task_view", doc))
        .collect()
}
