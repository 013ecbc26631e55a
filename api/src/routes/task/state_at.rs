//! `GET /api/v1/tasks/{id}/state?at_sequence=N`: a task's state right
//! after its event N, replayed from the log (never from snapshots or read
//! models), for the timeline's "state as of this event".

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Path, Query};
use crate::schema::event::{public_payload, unwrap_variant, EventRecord};
use crate::schema::task::TaskStateAt;
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(state_at))
}

/// Which event to stop at.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AtSequence {
    /// The event's sequence number within the task, from 1; the latest
    /// event when absent.
    #[param(value_type = Option<u64>, minimum = 1)]
    at_sequence: Option<String>,
}

/// The task as it was right after one of its events.
#[utoipa::path(
    get,
    path = "/tasks/{id}/state",
    tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id"), AtSequence),
    responses(
        (status = 200, description = "The state after the event, with the event", body = TaskStateAt),
        (status = 400, description = "Malformed id or at_sequence", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such task, or no such event of it", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn state_at(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(q): Query<AtSequence>,
) -> Result<Json<TaskStateAt>, ApiError> {
    let at = q
        .at_sequence
        .as_deref()
        .map(|s| match s.trim().parse::<u64>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(ApiError::bad_request(
                "at_sequence",
                format!("must be an event sequence number of 1 or more, got {s:?}"),
            )),
        })
        .transpose()?;
    let access = access::task(&state, &caller, id).await?;
    let last = access.sequence as u64;
    let until = at.unwrap_or(last);
    if until > last {
        return Err(ApiError::not_found_field(
            "at_sequence",
            format!("task {id} has {last} events; there is no event {until}"),
        ));
    }
    let replayed = state
        .store()
        .replay::<domain::task::Task>(&id.to_string(), Some(until as usize))
        .await?;
    let Some((envelope, task)) = replayed.into_iter().last() else {
        return Err(ApiError::internal(format!("task {id} replayed to nothing")));
    };
    let payload = serde_json::to_value(&envelope.payload)
        .map_err(|e| ApiError::internal(format!("task event does not serialise: {e}")))?;
    let event = EventRecord {
        sequence: envelope.sequence as u64,
        event_type: envelope.payload.event_type(),
        event_version: envelope.payload.event_version(),
        actor: envelope.metadata.get("actor").cloned(),
        at: envelope
            .metadata
            .get("at")
            .and_then(|a| DateTime::parse_from_rfc3339(a).ok())
            .map(|a| a.with_timezone(&Utc)),
        payload: public_payload(unwrap_variant(&payload)),
    };
    Ok(Json(TaskStateAt {
        event,
        last_sequence: last,
        state: task.try_into()?,
    }))
}
