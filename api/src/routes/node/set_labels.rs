//! `PUT /api/v1/nodes/{id}/labels`: replace the labels placement matches.

use axum::extract::State;
use axum::Json;
use domain::node::NodeCommand;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, Path};
use crate::schema::node::{Node, SetLabels};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(set_labels))
}

/// Replaces the node's labels, the only ones placement matches, with the
/// whole set given (`{}` removes them all); tasks already placed keep
/// running. Labels the agent declares are not touched: to take some of
/// them, accept them (`POST /api/v1/nodes/{id}/labels/accept`) or include
/// them here. Admins only. The same set again changes nothing.
#[utoipa::path(
    put,
    path = "/nodes/{id}/labels",
    tag = "nodes",
    params(("id" = Uuid, Path, description = "The node's id")),
    request_body = SetLabels,
    responses(
        (status = 200, description = "The node", body = Node),
        (status = 400, description = "Malformed id or JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "The node's token was revoked", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "labels missing, or a key or value not allowed, naming it (labels.<key>)", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn set_labels(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    body: Result<JsonBody<SetLabels>, ApiError>,
) -> Result<Json<Node>, ApiError> {
    caller.require_admin("set node labels")?;
    let JsonBody(body) = body?;
    let node = super::execute(&state, &caller, id, "set node labels", |by, at| {
        NodeCommand::SetLabels {
            labels: body.labels,
            by,
            at,
        }
    })
    .await?;
    Ok(Json(node))
}
