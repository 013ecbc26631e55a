//! `GET /api/v1/nodes/{id}`: one node, read from its aggregate.

use axum::extract::State;
use axum::Json;
use domain::node::Node;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::schema;
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get))
}

/// One node as it stands. Any user may see nodes: they are shared by all
/// projects.
#[utoipa::path(
    get,
    path = "/nodes/{id}",
    tag = "nodes",
    params(("id" = Uuid, Path, description = "The node's id")),
    responses(
        (status = 200, description = "The node", body = schema::node::Node),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<schema::node::Node>, ApiError> {
    let Some(loaded) = state.store().load::<Node>(&id.to_string()).await? else {
        return Err(ApiError::not_found(format!("node {id} not found")));
    };
    Ok(Json(loaded.state.try_into()?))
}
