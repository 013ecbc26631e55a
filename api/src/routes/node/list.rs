//! `GET /api/v1/nodes`: every node, from the node read model.

use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::schema::node::{Node, NodeList};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// Every node, by name. Any user may see nodes.
#[utoipa::path(
    get,
    path = "/nodes",
    tag = "nodes",
    responses(
        (status = 200, description = "The nodes", body = NodeList),
        (status = 401, description = "No valid token", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn list(State(state): State<AppState>, _caller: Caller) -> Result<Json<NodeList>, ApiError> {
    let docs: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT doc FROM node_view ORDER BY name, id")
            .fetch_all(state.pool())
            .await?;
    let items = docs
        .into_iter()
        .map(|doc| {
            let node: domain::node::Node = serde_json::from_value(doc)
                .map_err(|e| ApiError::internal(format!("node_view doc does not decode: {e}")))?;
            Node::try_from(node)
        })
        .collect::<Result<_, _>>()?;
    Ok(Json(NodeList { items }))
}
