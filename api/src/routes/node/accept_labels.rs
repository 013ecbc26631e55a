//! `POST /api/v1/nodes/{id}/labels/accept`: vouch for labels the node's
//! agent declared.

use axum::extract::State;
use axum::Json;
use domain::node::NodeCommand;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, Path};
use crate::schema::node::{AcceptLabels, Node};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(accept_labels))
}

/// Accepts labels the node's agent declared (`declared_labels`): the ones
/// named in `keys`, or all of them without a body, join the node's labels
/// with the values declared now (replacing the value of a key already
/// there). Until then placement ignores them. What is accepted stays even
/// if the agent later declares something else. Admins only; accepting what
/// the node's labels already hold changes nothing.
#[utoipa::path(
    post,
    path = "/nodes/{id}/labels/accept",
    tag = "nodes",
    params(("id" = Uuid, Path, description = "The node's id")),
    request_body(content = Option<AcceptLabels>, description = "Optional: which declared labels to accept"),
    responses(
        (status = 200, description = "The node", body = Node),
        (status = 400, description = "Malformed id or JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "The node's token was revoked, or its agent does not declare a key to accept", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "A key the agent does not declare (keys[i]), or labels beyond the limit", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn accept_labels(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    body: Result<Option<JsonBody<AcceptLabels>>, ApiError>,
) -> Result<Json<Node>, ApiError> {
    caller.require_admin("accept node labels")?;
    let keys = body?.and_then(|JsonBody(b)| b.keys);
    let node = super::execute(&state, &caller, id, "accept node labels", |by, at| {
        NodeCommand::AcceptDeclaredLabels { keys, by, at }
    })
    .await?;
    Ok(Json(node))
}
