//! The timeline read model, `timeline`, and its checkpoint.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, Postgres, QueryBuilder};
use uuid::Uuid;

use super::ReadError;

/// The name of the timeline's checkpoint: events after it are not in
/// `timeline` yet.
pub const CHECKPOINT: &str = "timeline";

/// Which events a page of the timeline holds; every field that is given
/// narrows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct TimelineFilter<'a> {
    /// Only events of aggregates of this type.
    pub aggregate_type: Option<&'a str>,
    /// Only the events of this aggregate.
    pub aggregate_id: Option<&'a str>,
    /// Only events of this project and its tasks.
    pub project: Option<Uuid>,
    /// Only events of this node and task events placing work on it or
    /// losing it there.
    pub node: Option<Uuid>,
    /// Only events of this type.
    pub event_type: Option<&'a str>,
    /// Only events at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only events before this time.
    pub until: Option<DateTime<Utc>>,
    /// Whether the filters contradict each other, so that nothing matches.
    pub contradictory: bool,
    /// Only events before this (txid, position) key (the page cursor).
    pub before: Option<(i64, i64)>,
    /// Only what this member may see: node events, events of projects the
    /// user is a member of and the user's own events, none of them of the
    /// hidden types.
    pub member: Option<Member<'a>>,
}

/// A non-administrator reading the timeline.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// The user's name.
    pub user: &'a str,
    /// Event types only administrators see.
    pub hidden_event_types: &'a [&'a str],
}

/// One event as the timeline read model holds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TimelineRow {
    /// The event's outbox position.
    pub position: i64,
    /// Its aggregate's type.
    pub aggregate_type: String,
    /// Its aggregate's id.
    pub aggregate_id: String,
    /// Its sequence number within the aggregate.
    pub sequence: i64,
    /// Its type.
    pub event_type: String,
    /// Who caused it.
    pub actor: String,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
    /// The project it concerns, if any.
    pub project_id: Option<Uuid>,
    /// The node it concerns, if any.
    pub node_id: Option<Uuid>,
    /// A one-line summary for people.
    pub summary: String,
}

/// The outbox position the timeline has been projected up to, 0 before
/// the first event.
pub async fn projected_up_to(db: impl PgExecutor<'_>) -> Result<i64, ReadError> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = $1")
            .bind(CHECKPOINT)
            .fetch_optional(db)
            .await?;
    Ok(position.unwrap_or(0))
}

/// The transaction id of the event at `position`, if the timeline holds it.
pub async fn txid_at(db: impl PgExecutor<'_>, position: i64) -> Result<Option<i64>, ReadError> {
    Ok(
        sqlx::query_scalar("SELECT txid FROM timeline WHERE position = $1")
            .bind(position)
            .fetch_optional(db)
            .await?,
    )
}

/// Up to `limit` events matching `filter`, newest first (by transaction,
/// then position).
pub async fn page(
    db: impl PgExecutor<'_>,
    filter: &TimelineFilter<'_>,
    limit: i64,
) -> Result<Vec<TimelineRow>, ReadError> {
    let mut sql = select(filter);
    sql.push(" ORDER BY txid DESC, position DESC LIMIT ")
        .push_bind(limit);
    Ok(sql.build_query_as::<TimelineRow>().fetch_all(db).await?)
}

/// The query for `filter`, with only the conditions it names, so that each
/// combination is planned for the index that serves it.
fn select<'a>(filter: &TimelineFilter<'a>) -> QueryBuilder<'a, Postgres> {
    let mut sql = QueryBuilder::new(
        "SELECT position, aggregate_type, aggregate_id, sequence, event_type, actor, \
         recorded_at, project_id, node_id, summary FROM timeline WHERE true",
    );
    if filter.contradictory {
        sql.push(" AND false");
    }
    if let Some(t) = filter.aggregate_type {
        sql.push(" AND aggregate_type = ").push_bind(t);
    }
    if let Some(id) = filter.aggregate_id {
        sql.push(" AND aggregate_id = ").push_bind(id);
    }
    if let Some(p) = filter.project {
        sql.push(" AND project_id = ").push_bind(p);
    }
    if let Some(n) = filter.node {
        sql.push(" AND node_id = ").push_bind(n);
    }
    if let Some(t) = filter.event_type {
        sql.push(" AND event_type = ").push_bind(t);
    }
    if let Some(t) = filter.since {
        sql.push(" AND recorded_at >= ").push_bind(t);
    }
    if let Some(t) = filter.until {
        sql.push(" AND recorded_at < ").push_bind(t);
    }
    if let Some((txid, position)) = filter.before {
        sql.push(" AND (txid, position) < (")
            .push_bind(txid)
            .push(", ")
            .push_bind(position)
            .push(")");
    }
    if let Some(member) = filter.member {
        sql.push(" AND NOT (event_type = ANY(")
            .push_bind(member.hidden_event_types)
            .push("))");
        sql.push(
            " AND (aggregate_type = 'node' \
               OR project_id IN (SELECT project_id FROM project_member_view WHERE user_name = ",
        )
        .push_bind(member.user)
        .push(") OR (aggregate_type = 'user' AND aggregate_id = ")
        .push_bind(member.user)
        .push("))");
    }
    sql
}
