//! `PUT /api/v1/nodes/{id}/limits`: set the most a node may claim.

use axum::extract::State;
use axum::Json;
use domain::node::NodeCommand;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, Problem};
use crate::extract::{JsonBody, Path};
use crate::schema::node::{Node, SetLimits};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(set_limits))
}

/// Sets the most the node may claim, whatever its agent declares: CPUs and
/// memory beyond it are not counted, and of its GPUs only the first `gpus`
/// declared devices are used. Each field is required; `null` means no
/// maximum. Lowering it below what running tasks hold stops nothing: no
/// new task is placed on the node until they fit under it. Admins only;
/// the same maximum again changes nothing.
#[utoipa::path(
    put,
    path = "/nodes/{id}/limits",
    tag = "nodes",
    params(("id" = Uuid, Path, description = "The node's id")),
    request_body = SetLimits,
    responses(
        (status = 200, description = "The node", body = Node),
        (status = 400, description = "Malformed id or JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "The node's token was revoked", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "A field missing or out of range, naming it", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn set_limits(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    body: Result<JsonBody<SetLimits>, ApiError>,
) -> Result<Json<Node>, ApiError> {
    caller.require_admin("set node limits")?;
    let JsonBody(body) = body?;
    let max_resources = body
        .draft()?
        .validate("")
        .map_err(|errors| ApiError::Invalid(errors.into_iter().map(Problem::from).collect()))?;
    let node = super::execute(&state, &caller, id, "set node limits", |by, at| {
        NodeCommand::SetLimits {
            max_resources,
            by,
            at,
        }
    })
    .await?;
    Ok(Json(node))
}
