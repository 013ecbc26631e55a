//! `GET /api/v1/timeline`: the audit timeline newest first, one page at a
//! time, from the timeline read model.

use axum::extract::State;
use axum::Json;
use projections::read::timeline::{self, TimelineRow};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{parse_limit, Query};
use crate::fresh::{Applied, Prefer};
use crate::page;
use crate::schema::timeline::{TimelineEntry, TimelinePage};
use crate::timeline::{RawFilter, TimelineFilter};
use crate::AppState;

/// Events per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 50;
/// The most events per page.
pub const MAX_LIMIT: i64 = 500;

/// The list's name in its cursors.
const LIST: &str = "timeline";

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// Which part of the timeline to read. Every filter narrows it further.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListTimeline {
    /// Only this task's events.
    #[param(value_type = Option<Uuid>)]
    task: Option<String>,
    /// Only this node's events and the task events that place work on it
    /// or lose it there.
    #[param(value_type = Option<Uuid>)]
    node: Option<String>,
    /// Only this project's events and its tasks'.
    #[param(value_type = Option<Uuid>)]
    project: Option<String>,
    /// Only events of `task`, `node`, `project` or `user` aggregates.
    #[param(value_type = Option<String>, example = "node", pattern = "^(task|project|node|user)$")]
    aggregate_type: Option<String>,
    /// Only events of this type, such as `TaskAssigned`.
    #[param(value_type = Option<String>, example = "TaskAssigned", pattern = "^[A-Za-z0-9]{1,64}$")]
    event_type: Option<String>,
    /// Only events at or after this time (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    since: Option<String>,
    /// Only events before this time (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    until: Option<String>,
    /// Only events older than the one at this position: the previous
    /// page's `next_before`. Not together with `cursor`.
    #[param(value_type = Option<i64>, minimum = 1)]
    before: Option<String>,
    /// The previous page's `next_cursor`. Not together with `before`.
    cursor: Option<String>,
    /// Events per page, 1 to 500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    limit: Option<String>,
}

/// The audit timeline, newest first: every event with who caused it, when,
/// and what happened in one line.
///
/// Admins see the whole log; anybody else the events of their projects and
/// those projects' tasks, every node's events but host SSH ones (admins
/// only), and their own. Filters
/// naming a task, project or node the caller may not see are refused as
/// those resources' own routes refuse them. The page is read from the
/// timeline read model, usually a few milliseconds behind the log; its
/// `live_after` is where `GET /timeline/stream` takes over.
#[utoipa::path(
    get,
    path = "/timeline",
    tag = "events",
    params(ListTimeline, ("Prefer" = Option<String>, Header, description = "`fresh`: wait, at most 5 s, until the list shows everything committed before this request")),
    responses(
        (status = 200, description = "One page of the timeline, newest first", body = TimelinePage, headers(("Preference-Applied" = String, description = "`fresh` when the list shows everything committed before the request"))),
        (status = 400, description = "A bad parameter, named", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "The task, project or node filtered on does not exist or is not the caller's", body = ErrorBody),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    prefer: Prefer,
    Query(q): Query<ListTimeline>,
) -> Result<(Applied, Json<TimelinePage>), ApiError> {
    let filter = TimelineFilter::parse(&RawFilter {
        task: q.task.as_deref(),
        node: q.node.as_deref(),
        project: q.project.as_deref(),
        aggregate_type: q.aggregate_type.as_deref(),
        event_type: q.event_type.as_deref(),
        since: q.since.as_deref(),
        until: q.until.as_deref(),
    })?;
    let limit = parse_limit("limit", q.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)?;
    let from_cursor = q
        .cursor
        .as_deref()
        .map(|c| page::decode::<i64>(LIST, c))
        .transpose()?;
    let given = q
        .before
        .as_deref()
        .map(|raw| {
            raw.trim()
                .parse::<i64>()
                .ok()
                .filter(|p| *p >= 1)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "before",
                        format!("must be an event position, got {raw:?}"),
                    )
                })
        })
        .transpose()?;
    // Both narrow the page: the earlier position wins.
    let before = match (given, from_cursor) {
        (Some(b), Some(c)) if c < b => Some((c, "cursor")),
        (Some(b), _) => Some((b, "before")),
        (None, c) => c.map(|c| (c, "cursor")),
    };
    super::check_filter(&state, &caller, &filter).await?;
    let member = (!caller.admin).then_some(caller.user.as_str());
    let applied = prefer
        .wait_for(
            &state,
            &[
                projections::read::timeline::CHECKPOINT,
                projections::read::projects::CHECKPOINT,
            ],
        )
        .await?;
    Ok((
        applied,
        Json(read_page(&state, &filter, member, before, limit).await?),
    ))
}

/// One page, and where the stream takes over, read in one snapshot.
/// `before` names the parameter it came in.
async fn read_page(
    state: &AppState,
    filter: &TimelineFilter,
    member: Option<&str>,
    before: Option<(i64, &str)>,
    limit: i64,
) -> Result<TimelinePage, ApiError> {
    let mut tx = state.pool().begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let live_after = timeline::projected_up_to(&mut *tx).await?;
    let before = match before {
        None => None,
        Some((position, field)) => {
            let txid = timeline::txid_at(&mut *tx, position).await?;
            let txid = txid.ok_or_else(|| {
                ApiError::not_found_field(
                    field,
                    format!("there is no event at position {position}"),
                )
            })?;
            Some((txid, position))
        }
    };
    let read = timeline::TimelineFilter {
        aggregate_type: filter.aggregate_type.as_deref(),
        aggregate_id: filter.aggregate_id.as_deref(),
        project: filter.project,
        node: filter.node,
        event_type: filter.event_type.as_deref(),
        since: filter.since,
        until: filter.until,
        contradictory: filter.contradictory,
        before,
        member: member.map(|user| timeline::Member {
            user,
            hidden_event_types: &crate::access::ADMIN_ONLY_EVENT_TYPES,
        }),
    };
    let mut items: Vec<TimelineEntry> = timeline::page(&mut *tx, &read, limit + 1)
        .await?
        .into_iter()
        .map(TimelineEntry::from)
        .collect();
    tx.commit().await?;
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next_before = items.last().map(|e| e.position).filter(|_| more);
    Ok(TimelinePage {
        items,
        next_before,
        next_cursor: next_before.map(|p| page::encode(LIST, &p)),
        live_after,
    })
}

impl From<TimelineRow> for TimelineEntry {
    fn from(r: TimelineRow) -> Self {
        Self {
            position: r.position,
            aggregate_type: r.aggregate_type,
            aggregate_id: r.aggregate_id,
            sequence: r.sequence,
            event_type: r.event_type,
            actor: r.actor,
            recorded_at: r.recorded_at,
            project_id: r.project_id,
            node_id: r.node_id,
            summary: r.summary,
        }
    }
}
