//! `GET /api/v1/events`: events in the global order of the log, read from
//! the outbox, for audits and for clients that follow changes.

use std::collections::{BTreeSet, HashMap};

use axum::extract::State;
use axum::Json;
use domain::node::Node;
use serde::Deserialize;
use store::outbox::{self, Checkpoint, Filter, RecordedEvent};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{parse_limit, parse_uuid, Query};
use crate::page;
use crate::schema::event::{Event, EventPage};
use crate::{access, AppState};

/// Events per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 100;
/// The most events per page.
pub const MAX_LIMIT: i64 = 1000;

/// The list's name in its cursors.
const LIST: &str = "events";

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
    #[param(value_type = Option<String>, example = "task", pattern = "^(task|project|node|user)$")]
    aggregate_type: Option<String>,
    /// One aggregate's id (a user's name for `user`); without
    /// `aggregate_type`, the events of every aggregate with this id.
    /// Required for non-admins, with `aggregate_type`.
    #[param(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    aggregate_id: Option<String>,
    /// Only events after this outbox position (a previous `next_after`).
    /// Not together with `cursor`.
    #[param(value_type = Option<i64>, minimum = 0)]
    after: Option<String>,
    /// The `next_cursor` of the previous page. Not together with `after`.
    cursor: Option<String>,
    /// Events per page, 1 to 1000 (default 100).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// Events in the order they were committed. Admins may read the whole log;
/// other users name one aggregate they can see, and never see host SSH
/// events (admins only; left out without shortening the page).
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
        (status = 404, description = "The aggregate does not exist or is not the caller's", body = ErrorBody),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)
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
    if let Some(id) = &q.aggregate_id {
        domain::spec::validate_name(id).map_err(|_| {
            ApiError::bad_request(
                "aggregate_id",
                "must be a task, project or node id (a lower-case UUID) or a user's name",
            )
        })?;
    }
    // Ids of tasks, projects and nodes are UUIDs, stored in their canonical
    // lower-case form; users are named.
    let aggregate_id = match (aggregate_type.as_deref(), q.aggregate_id) {
        // A name that is no UUID names no task, project or node.
        (Some(kind), Some(id)) if kind != "user" => Some(
            parse_uuid("aggregate_id", &id)
                .map_err(|_| ApiError::not_found_field("aggregate_id", format!("no {kind} {id}")))?
                .to_string(),
        ),
        (_, id) => id,
    };
    let limit = parse_limit("limit", q.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = match (q.after.as_deref(), q.cursor.as_deref()) {
        // Both narrow the page: the later position wins.
        (Some(raw), Some(cursor)) => {
            let position: i64 = page::decode(LIST, cursor)?;
            let a = resolve_after(&state, raw, "after").await?;
            let c = resolve_after(&state, &position.to_string(), "cursor").await?;
            Some(if a.0 >= c.0 { a } else { c })
        }
        (Some(raw), None) => Some(resolve_after(&state, raw, "after").await?),
        (None, Some(cursor)) => {
            let position: i64 = page::decode(LIST, cursor)?;
            Some(resolve_after(&state, &position.to_string(), "cursor").await?)
        }
        (None, None) => None,
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
    let hidden = access::hidden_event_types(&caller);
    let mut events =
        outbox::read_after_except(state.pool(), from, limit + 1, &filter, hidden).await?;
    let more = events.len() as i64 > limit;
    events.truncate(limit as usize);
    let next_after = events
        .last()
        .map(|e| e.position)
        .or(after.map(|(position, _)| position));
    let next_cursor = next_after
        .filter(|_| more)
        .map(|position| page::encode(LIST, &position));
    let items = summarized(&state, &events).await?;
    Ok(Json(EventPage {
        items,
        next_after,
        next_cursor,
    }))
}

/// The events as shown, each with its timeline summary (naming nodes by
/// their names).
pub(crate) async fn summarized(
    state: &AppState,
    events: &[RecordedEvent],
) -> Result<Vec<Event>, ApiError> {
    let nodes: BTreeSet<String> = events
        .iter()
        .filter_map(projections::summary::node_of)
        .map(|id| id.to_string())
        .collect();
    let names: HashMap<String, String> = if nodes.is_empty() {
        HashMap::new()
    } else {
        let nodes: Vec<String> = nodes.into_iter().collect();
        sqlx::query_as::<_, (String, serde_json::Value)>(
            "SELECT aggregate_id, payload FROM events \
             WHERE aggregate_type = 'node' AND sequence = 1 AND aggregate_id = ANY($1)",
        )
        .bind(&nodes)
        .fetch_all(state.pool())
        .await?
        .into_iter()
        .filter_map(|(id, payload)| {
            let name = payload.pointer("/Provisioned/name")?.as_str()?.to_string();
            Some((id, name))
        })
        .collect()
    };
    Ok(events
        .iter()
        .map(|e| {
            let name = projections::summary::node_of(e)
                .and_then(|id| names.get(&id.to_string()))
                .map(String::as_str);
            let mut shown = Event::from(e);
            shown.summary = projections::summary::summarize(e, name).ok();
            shown
        })
        .collect())
}

/// The checkpoint of outbox position `raw`, given as `field`; 0 is the
/// start of the log.
async fn resolve_after(
    state: &AppState,
    raw: &str,
    field: &str,
) -> Result<(i64, Checkpoint), ApiError> {
    let position: i64 = raw.trim().parse().ok().filter(|p| *p >= 0).ok_or_else(|| {
        ApiError::bad_request(field, format!("must be an event position, got {raw:?}"))
    })?;
    if position == 0 {
        return Ok((0, Checkpoint::default()));
    }
    match outbox::checkpoint_of(state.pool(), position).await? {
        Some(checkpoint) => Ok((position, checkpoint)),
        None => Err(ApiError::not_found_field(
            field,
            format!("there is no event at position {position}"),
        )),
    }
}

/// Whether a non-admin may read the events of the named aggregate: a task
/// or project of theirs, any node, or themselves.
pub(crate) async fn check_visible(
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
