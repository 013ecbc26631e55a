//! `GET /api/v1/events`: events in the global order of the log, read from
//! the outbox, for audits and for clients that follow changes.

use axum::extract::State;
use axum::Json;
use domain::node::Node;
use serde::Deserialize;
use store::outbox::{self, Checkpoint, Filter};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{parse_limit, parse_uuid, Query};
use crate::schema::event::{Event, EventPage};
use crate::{access, AppState};

/// Events per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 100;
/// The most events per page.
pub const MAX_LIMIT: i64 = 1000;

/// The aggregate types of the log.
const AGGREGATE_TYPES: [&str; 4] = ["task", "project", "node", "user"];

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// Which events to read.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListEvents {
    /// `task`, `project`, `node` or `user`. Required for non-admins.
    #[param(value_type = Option<String>, example = "task")]
    aggregate_type: Option<String>,
    /// One aggregate's id (a user's name for `user`); needs
    /// `aggregate_type`. Required for non-admins.
    aggregate_id: Option<String>,
    /// Only events after this outbox position (a previous `next_after`).
    #[param(value_type = Option<i64>)]
    after: Option<String>,
    /// Events per page, 1 to 1000 (default 100).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// Events in the order they were committed. Admins may read the whole log;
/// other users name one aggregate they can see.
#[utoipa::path(
    get,
    path = "/events",
    tag = "events",
    params(ListEvents),
    responses(
        (status = 200, description = "One page of events", body = EventPage),
        (status = 400, description = "A bad parameter, named", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin, and no visible aggregate named", body = ErrorBody),
        (status = 404, description = "The aggregate does not exist or is not the caller's", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListEvents>,
) -> Result<Json<EventPage>, ApiError> {
    let aggregate_type = q
        .aggregate_type
        .map(|t| {
            let t = t.trim().to_string();
            if AGGREGATE_TYPES.contains(&t.as_str()) {
                Ok(t)
            } else {
                Err(ApiError::bad_request(
                    "aggregate_type",
                    format!("{t:?} is not one of {}", AGGREGATE_TYPES.join(", ")),
                ))
            }
        })
        .transpose()?;
    // Ids of tasks, projects and nodes are UUIDs, stored in their canonical
    // lower-case form; users are named.
    let aggregate_id = match (aggregate_type.as_deref(), q.aggregate_id) {
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "aggregate_type",
                "is required together with aggregate_id",
            ))
        }
        (Some(kind), Some(id)) if kind != "user" => {
            Some(parse_uuid("aggregate_id", &id)?.to_string())
        }
        (_, id) => id,
    };
    let limit = parse_limit("limit", q.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = match q.after.as_deref() {
        None => None,
        Some(raw) => Some(resolve_after(&state, raw).await?),
    };
    if !caller.admin {
        check_visible(
            &state,
            &caller,
            aggregate_type.as_deref(),
            aggregate_id.as_deref(),
        )
        .await?;
    }
    let filter = Filter {
        aggregate_type,
        aggregate_id,
    };
    let from = after.map_or_else(Checkpoint::default, |(_, c)| c);
    let events = outbox::read_after(state.pool(), from, limit, &filter).await?;
    let next_after = events
        .last()
        .map(|e| e.position)
        .or(after.map(|(position, _)| position));
    Ok(Json(EventPage {
        items: events.iter().map(Event::from).collect(),
        next_after,
    }))
}

/// The checkpoint of outbox position `raw`; 0 is the start of the log.
async fn resolve_after(state: &AppState, raw: &str) -> Result<(i64, Checkpoint), ApiError> {
    let position: i64 = raw.trim().parse().ok().filter(|p| *p >= 0).ok_or_else(|| {
        ApiError::bad_request("after", format!("must be an event position, got {raw:?}"))
    })?;
    if position == 0 {
        return Ok((0, Checkpoint::default()));
    }
    match outbox::checkpoint_of(state.pool(), position).await? {
        Some(checkpoint) => Ok((position, checkpoint)),
        None => Err(ApiError::bad_request(
            "after",
            format!("there is no event at position {position}"),
        )),
    }
}

/// Whether a non-admin may read the events of the named aggregate: a task
/// or project of theirs, any node, or themselves.
async fn check_visible(
    state: &AppState,
    caller: &Caller,
    aggregate_type: Option<&str>,
    aggregate_id: Option<&str>,
) -> Result<(), ApiError> {
    let (Some(kind), Some(id)) = (aggregate_type, aggregate_id) else {
        return Err(ApiError::Forbidden(
            "only admins may read the whole log; name an aggregate_type and aggregate_id".into(),
        ));
    };
    match kind {
        "task" => {
            access::task(state, caller, parse_uuid("aggregate_id", id)?).await?;
        }
        "project" => {
            access::project(
                state,
                caller,
                parse_uuid("aggregate_id", id)?,
                Some("aggregate_id"),
            )
            .await?;
        }
        "node" => {
            let id = parse_uuid("aggregate_id", id)?;
            if state.store().load::<Node>(&id.to_string()).await?.is_none() {
                return Err(ApiError::not_found_field(
                    "aggregate_id",
                    format!("node {id} not found"),
                ));
            }
        }
        _ => {
            if id != caller.user {
                return Err(ApiError::Forbidden(
                    "only admins may read other users' events".into(),
                ));
            }
        }
    }
    Ok(())
}
