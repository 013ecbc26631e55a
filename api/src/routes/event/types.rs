//! `GET /api/v1/event-types`: every event type the caller can ever
//! receive, read from the domain's event enums.

use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// One event type.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventTypeItem {
    /// The event type as events carry it, such as `TaskSubmitted`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The aggregate whose events have this type: `task`, `node`,
    /// `project` or `user`.
    pub aggregate: String,
}

/// The event types a caller can receive.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventTypeList {
    /// Task types first, then node, project and user ones.
    pub items: Vec<EventTypeItem>,
}

/// Every event type the caller can ever see in `/events`, `/timeline` and
/// their streams: all of them for admins; for others all but the
/// admin-only ones (host SSH events).
#[utoipa::path(
    get,
    path = "/event-types",
    tag = "events",
    responses(
        (status = 200, description = "The event types the caller can receive", body = EventTypeList),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "Too many requests", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn list(caller: Caller) -> Result<Json<EventTypeList>, ApiError> {
    let hidden = access::hidden_event_types(&caller);
    let items = domain::catalog::event_types()
        .into_iter()
        .filter(|t| !hidden.contains(&t.event_type.as_str()))
        .map(|t| EventTypeItem {
            event_type: t.event_type,
            aggregate: t.aggregate.to_string(),
        })
        .collect();
    Ok(Json(EventTypeList { items }))
}
