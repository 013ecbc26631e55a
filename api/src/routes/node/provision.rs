//! `POST /api/v1/nodes`: create a node and its agent's token.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::JsonBody;
use crate::schema::node::{ProvisionNode, ProvisionedNode};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(provision))
}

/// Provisions a node. The answer holds the agent's token, shown this once:
/// only its fingerprint is stored. Admins only.
///
/// `labels` are the only labels placement matches: labels the agent
/// declares are shown apart (`declared_labels`) until an admin accepts
/// them. `max_resources` caps what the agent may claim: CPUs and memory
/// beyond it, and GPUs past the first `gpus` it declares, are not counted.
#[utoipa::path(
    post,
    path = "/nodes",
    tag = "nodes",
    request_body = ProvisionNode,
    responses(
        (status = 201, description = "Provisioned, with its token", body = ProvisionedNode),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid name, labels or maximum, naming the field", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn provision(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<ProvisionNode>,
) -> Result<
    (
        StatusCode,
        [(header::HeaderName, String); 1],
        Json<ProvisionedNode>,
    ),
    ApiError,
> {
    caller.require_admin("provision nodes")?;
    let (node, token) = crate::provision_node_with_limits(
        state.store(),
        &body.name,
        body.labels.unwrap_or_else(BTreeMap::new),
        body.max_resources.unwrap_or_default().into(),
        &caller.actor(),
    )
    .await?;
    let id = node.id.unwrap_or_default();
    let location = format!("{}/nodes/{id}", crate::routes::API_PREFIX);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(ProvisionedNode {
            node: node.try_into()?,
            token,
        }),
    ))
}
