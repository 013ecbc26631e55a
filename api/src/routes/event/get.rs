//! `GET /api/v1/events/{position}`: one event in full, with its
//! aggregate's state right before and right after it, folded from the log
//! (from the aggregate's nearest snapshot, so a node with a long history
//! answers as fast as a new one; never from read models). `unidesk replay
//! --check` compares snapshots with full replays.

use axum::extract::State;
use axum::Json;
use domain::node::Node;
use domain::project::Project;
use domain::task::Task;
use domain::user::User;
use serde::Serialize;
use serde_json::Value;
use store::outbox;
use store::{StoreError, Stored};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::schema;
use crate::schema::timeline::EventDetail;
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get))
}

/// One event with its payload, its metadata, and the aggregate's state
/// before and after it: what the event changed.
///
/// Callers see the events they could list with `GET /events` naming the
/// event's aggregate: admins any, others those of their projects and
/// those projects' tasks, of any node, and their own. Any other event
/// (another project's, another user's, a host SSH event, which are for
/// admins only) answers 404 like a missing one, so that positions tell
/// nothing of what the caller may not see.
#[utoipa::path(
    get,
    path = "/events/{position}",
    tag = "events",
    params(("position" = i64, Path, description = "The event's outbox position")),
    responses(
        (status = 200, description = "The event and the state it left", body = EventDetail),
        (status = 400, description = "A malformed position", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such event, or not the caller's", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(position): Path<String>,
) -> Result<Json<EventDetail>, ApiError> {
    let position: i64 = position.trim().parse().map_err(|_| {
        ApiError::bad_request(
            "position",
            format!("must be an event position, got {position:?}"),
        )
    })?;
    let missing = || ApiError::not_found(format!("there is no event at position {position}"));
    let Some(event) = outbox::read_at(state.pool(), position).await? else {
        return Err(missing());
    };
    if !caller.admin {
        if access::admin_only(&event.event_type) {
            return Err(missing());
        }
        let kind = Some(event.aggregate_type.as_str());
        let id = Some(event.aggregate_id.as_str());
        match super::list::check_visible(&state, &caller, kind, id).await {
            Err(ApiError::NotFound(_) | ApiError::Forbidden(_)) => return Err(missing()),
            other => other?,
        }
    }
    let id = event.aggregate_id.as_str();
    let sequence = usize::try_from(event.sequence).map_err(|_| missing())?;
    let (before, after) = match event.aggregate_type.as_str() {
        "task" => around::<Task, _>(&state, id, sequence, schema::task::Task::try_from).await?,
        "node" => around::<Node, _>(&state, id, sequence, schema::node::Node::try_from).await?,
        "project" => {
            around::<Project, _>(&state, id, sequence, schema::project::Project::try_from).await?
        }
        "user" => {
            around::<User, _>(&state, id, sequence, |u| {
                Ok::<_, ApiError>(schema::user::User::from(u))
            })
            .await?
        }
        other => {
            return Err(ApiError::internal(format!(
                "event {position} of unknown aggregate type {other}"
            )))
        }
    };
    let metadata = event.metadata.clone();
    let shown = super::list::summarized(&state, std::slice::from_ref(&event))
        .await?
        .pop()
        .ok_or_else(|| ApiError::internal("summarising one event gave none"))?;
    Ok(Json(EventDetail {
        event: shown,
        metadata,
        before,
        after,
    }))
}

/// Aggregate `id`'s state after its event `sequence - 1` (none for the
/// first) and after its event `sequence`, as `show` shows it.
async fn around<A, S>(
    state: &AppState,
    id: &str,
    sequence: usize,
    show: impl Fn(A) -> Result<S, ApiError>,
) -> Result<(Option<Value>, Value), ApiError>
where
    A: Stored,
    A::Command: Clone + Send,
    S: Serialize,
    ApiError: From<StoreError<A::Error>>,
{
    let Some((before, _, after)) = state.store().around::<A>(id, sequence).await? else {
        return Err(ApiError::internal(format!(
            "{id} has no event {sequence} in the log"
        )));
    };
    let encode = |s: A| -> Result<Value, ApiError> {
        serde_json::to_value(show(s)?)
            .map_err(|e| ApiError::internal(format!("a state does not serialise: {e}")))
    };
    Ok((before.map(encode).transpose()?, encode(after)?))
}
