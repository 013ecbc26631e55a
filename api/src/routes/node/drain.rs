//! `POST /api/v1/nodes/{id}/drain`: take no new tasks.

use axum::extract::State;
use axum::Json;
use domain::node::NodeCommand;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::schema::node::Node;
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(drain))
}

/// Stops placing new tasks on a node; running ones finish. Admins only. Repeating it changes nothing.
#[utoipa::path(
    post,
    path = "/nodes/{id}/drain",
    tag = "nodes",
    params(("id" = Uuid, Path, description = "The node's id")),
    responses(
        (status = 200, description = "The node", body = Node),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn drain(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<Node>, ApiError> {
    let node = super::execute(&state, &caller, id, "drain nodes", |by, at| {
        NodeCommand::Drain { by, at }
    })
    .await?;
    Ok(Json(node))
}
