//! The read models: tasks, nodes, projects (with members), users and the
//! timeline.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::PgConnection;
use store::outbox::RecordedEvent;
use uuid::Uuid;

use crate::{summary, Projection, ProjectionError};
use cqrs_es::Aggregate;
use domain::node::Node;
use domain::project::Project;
use domain::task::Task;
use domain::user::UserEvent;

/// Every read model, in the order the projector advances them.
pub fn all() -> Vec<Box<dyn Projection>> {
    vec![
        Box::new(Tasks),
        Box::new(Nodes),
        Box::new(Projects),
        Box::new(Users),
        Box::new(Timeline),
    ]
}

fn undecodable(event: &RecordedEvent, reason: impl ToString) -> ProjectionError {
    ProjectionError::Undecodable {
        position: event.position,
        event_type: event.event_type.clone(),
        reason: reason.to_string(),
    }
}

fn decode<E: DeserializeOwned>(event: &RecordedEvent) -> Result<E, ProjectionError> {
    serde_json::from_value(event.payload.clone()).map_err(|e| undecodable(event, e))
}

/// For an event of aggregate `A`: loads its row of `table` (keyed by the
/// aggregate's uuid `id`), applies the event when it is newer than the row,
/// and returns the new state. `None` for other aggregates' events and for
/// events the row already reflects.
async fn advance_doc<A>(
    conn: &mut PgConnection,
    table: &str,
    event: &RecordedEvent,
) -> Result<Option<A>, ProjectionError>
where
    A: Aggregate,
{
    if event.aggregate_type != A::TYPE {
        return Ok(None);
    }
    let id: Uuid = event
        .aggregate_id
        .parse()
        .map_err(|e| undecodable(event, e))?;
    let row: Option<(i64, serde_json::Value)> = sqlx::query_as(&format!(
        "SELECT last_sequence, doc FROM {table} WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let mut state = match row {
        Some((last, _)) if event.sequence <= last => return Ok(None),
        Some((_, doc)) => serde_json::from_value(doc).map_err(|e| undecodable(event, e))?,
        None => A::default(),
    };
    state.apply(decode(event)?);
    Ok(Some(state))
}

fn doc<T: Serialize>(v: &T, event: &RecordedEvent) -> Result<serde_json::Value, ProjectionError> {
    serde_json::to_value(v).map_err(|e| undecodable(event, e))
}

fn at_or(t: Option<DateTime<Utc>>, event: &RecordedEvent) -> DateTime<Utc> {
    t.unwrap_or(event.recorded_at)
}

/// Tasks with their state, for lists and the scheduler's queue.
struct Tasks;

impl Projection for Tasks {
    fn name(&self) -> &'static str {
        crate::read::tasks::CHECKPOINT
    }
    fn tables(&self) -> &'static [&'static str] {
        &["task_view"]
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        ev: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            let Some(task) = advance_doc::<Task>(conn, "task_view", ev).await? else {
                return Ok(());
            };
            let (Some(id), Some(spec)) = (task.id, task.spec.as_ref()) else {
                return Err(undecodable(ev, "task event before TaskSubmitted"));
            };
            sqlx::query(
                "INSERT INTO task_view (id, project_id, state, priority, node_id, attempt, submitted_by, \
                   submitted_at, updated_at, list_position, last_sequence, doc) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                 ON CONFLICT (id) DO UPDATE SET state = $3, node_id = $5, attempt = $6, \
                   updated_at = $9, last_sequence = $11, doc = $12",
            )
            .bind(id)
            .bind(spec.project_id)
            .bind(task.state.as_str())
            .bind(spec.priority)
            .bind(task.node_id)
            .bind(task.attempt as i32)
            .bind(task.submitted_by.as_ref().map(ToString::to_string).unwrap_or_default())
            .bind(at_or(task.submitted_at, ev))
            .bind(at_or(task.updated_at, ev))
            .bind(ev.position)
            .bind(ev.sequence)
            .bind(doc(&task, ev)?)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
    }
}

/// Nodes with their status.
struct Nodes;

impl Projection for Nodes {
    fn name(&self) -> &'static str {
        "nodes"
    }
    fn tables(&self) -> &'static [&'static str] {
        &["node_view"]
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        ev: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            let Some(node) = advance_doc::<Node>(conn, "node_view", ev).await? else {
                return Ok(());
            };
            let Some(id) = node.id else {
                return Err(undecodable(ev, "node event before NodeProvisioned"));
            };
            sqlx::query(
                "INSERT INTO node_view (id, name, status, drained, provisioned_at, updated_at, last_sequence, doc) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (id) DO UPDATE SET name = $2, status = $3, drained = $4, \
                   updated_at = $6, last_sequence = $7, doc = $8",
            )
            .bind(id)
            .bind(&node.name)
            .bind(node.status.as_str())
            .bind(node.drained)
            .bind(at_or(node.provisioned_at, ev))
            .bind(at_or(node.updated_at, ev))
            .bind(ev.sequence)
            .bind(doc(&node, ev)?)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
    }
}

/// Projects and their members.
struct Projects;

impl Projection for Projects {
    fn name(&self) -> &'static str {
        "projects"
    }
    fn tables(&self) -> &'static [&'static str] {
        &["project_member_view", "project_view"]
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        ev: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            let Some(project) = advance_doc::<Project>(conn, "project_view", ev).await? else {
                return Ok(());
            };
            let Some(id) = project.id else {
                return Err(undecodable(ev, "project event before ProjectCreated"));
            };
            sqlx::query(
                "INSERT INTO project_view (id, name, archived, created_at, updated_at, last_sequence, doc) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (id) DO UPDATE SET name = $2, archived = $3, updated_at = $5, \
                   last_sequence = $6, doc = $7",
            )
            .bind(id)
            .bind(&project.name)
            .bind(project.archived)
            .bind(at_or(project.created_at, ev))
            .bind(at_or(project.updated_at, ev))
            .bind(ev.sequence)
            .bind(doc(&project, ev)?)
            .execute(&mut *conn)
            .await?;
            sqlx::query("DELETE FROM project_member_view WHERE project_id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            let (users, roles): (Vec<String>, Vec<String>) = project
                .members
                .iter()
                .map(|(u, r)| (u.clone(), r.as_str().to_string()))
                .unzip();
            sqlx::query(
                "INSERT INTO project_member_view (project_id, user_name, role) \
                 SELECT $1, * FROM unnest($2::text[], $3::text[])",
            )
            .bind(id)
            .bind(users)
            .bind(roles)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
    }
}

/// Users, without anything secret.
struct Users;

impl Projection for Users {
    fn name(&self) -> &'static str {
        "users"
    }
    fn tables(&self) -> &'static [&'static str] {
        &["user_view"]
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        ev: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            if ev.aggregate_type != "user" {
                return Ok(());
            }
            let last: Option<i64> = sqlx::query_scalar(
                "SELECT last_sequence FROM user_view WHERE name = $1 FOR UPDATE",
            )
            .bind(&ev.aggregate_id)
            .fetch_optional(&mut *conn)
            .await?;
            if last.is_some_and(|l| ev.sequence <= l) {
                return Ok(());
            }
            let delta = match decode::<UserEvent>(ev)? {
                UserEvent::Created {
                    name, admin, at, ..
                } => {
                    sqlx::query(
                        "INSERT INTO user_view (name, admin, created_at, tokens, last_sequence) \
                         VALUES ($1, $2, $3, 0, $4) ON CONFLICT (name) DO NOTHING",
                    )
                    .bind(name.as_str())
                    .bind(admin)
                    .bind(at)
                    .bind(ev.sequence)
                    .execute(&mut *conn)
                    .await?;
                    return Ok(());
                }
                UserEvent::TokenIssued { .. } => 1,
                UserEvent::TokenRevoked { .. } => -1,
            };
            sqlx::query(
                "UPDATE user_view SET tokens = tokens + $2, last_sequence = $3 WHERE name = $1",
            )
            .bind(&ev.aggregate_id)
            .bind(delta)
            .bind(ev.sequence)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
    }
}

/// Every event with its actor and a one-line summary.
struct Timeline;

/// The first event of an aggregate, straight from the log.
async fn first_event(
    conn: &mut PgConnection,
    aggregate_type: &str,
    id: &str,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = 1",
    )
    .bind(aggregate_type)
    .bind(id)
    .fetch_optional(conn)
    .await
}

impl Projection for Timeline {
    fn name(&self) -> &'static str {
        "timeline"
    }
    /// Each event is a row of its own.
    fn per_aggregate(&self) -> bool {
        false
    }
    fn tables(&self) -> &'static [&'static str] {
        &["timeline"]
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        ev: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            let project_id: Option<Uuid> = match ev.aggregate_type.as_str() {
                "project" => ev.aggregate_id.parse().ok(),
                // Who may see the row depends on it: a task whose first
                // event cannot be read has no row until it can.
                "task" => match first_event(conn, "task", &ev.aggregate_id).await? {
                    None => None,
                    Some(first) => Some(
                        first
                            .pointer("/Submitted/spec/project_id")
                            .and_then(|v| v.as_str())
                            .and_then(|s| s.parse().ok())
                            .ok_or_else(|| {
                                undecodable(ev, "the task's first event names no project")
                            })?,
                    ),
                },
                _ => None,
            };
            let node_id = summary::node_of(ev);
            let node_name = match node_id {
                Some(n) => first_event(conn, "node", &n.to_string())
                    .await?
                    .and_then(|p| {
                        p.pointer("/Provisioned/name")
                            .and_then(|v| v.as_str())
                            .map(str::to_string)
                    }),
                None => None,
            };
            let text =
                summary::summarize(ev, node_name.as_deref()).map_err(|e| undecodable(ev, e))?;
            sqlx::query(
                "INSERT INTO timeline (position, txid, aggregate_type, aggregate_id, sequence, event_type, \
                   actor, recorded_at, project_id, summary, node_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (position) DO NOTHING",
            )
            .bind(ev.position)
            .bind(ev.txid)
            .bind(&ev.aggregate_type)
            .bind(&ev.aggregate_id)
            .bind(ev.sequence)
            .bind(&ev.event_type)
            .bind(ev.actor())
            .bind(ev.recorded_at)
            .bind(project_id)
            .bind(text)
            .bind(node_id)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
    }
}
