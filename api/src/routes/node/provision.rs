//! `POST /api/v1/nodes`: create a node and its agent's token.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::Json;
use chrono::Utc;
use domain::node::{Node, NodeCommand};
use domain::spec::{validate_labels, validate_name};
use store::{names, tokens, StoreError};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, Problem};
use crate::extract::JsonBody;
use crate::schema::node::{ProvisionNode, ProvisionedNode};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(provision))
}

/// Provisions a node. The answer holds the agent's token, shown this once:
/// only its fingerprint is stored. Admins only.
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
        (status = 422, description = "Invalid name or labels", body = ErrorBody)
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
    let mut problems = Vec::new();
    if let Err(reason) = validate_name(&body.name) {
        problems.push(Problem::field("name", reason));
    }
    let labels = body.labels.unwrap_or_else(BTreeMap::new);
    if let Err(e) = validate_labels("labels", &labels) {
        problems.push(e.into());
    }
    if !problems.is_empty() {
        return Err(ApiError::Invalid(problems));
    }
    let id = Uuid::now_v7();
    let key = id.to_string();
    names::claim(state.pool(), "node", &body.name, &key).await?;
    let issued = tokens::issue_node(id);
    let now = Utc::now();
    let command = NodeCommand::Provision {
        node_id: id,
        name: body.name.clone(),
        labels,
        token_fingerprint: issued.fingerprint.clone(),
        by: caller.actor(),
        at: now,
    };
    let executed = match state
        .store()
        .execute::<Node>(&key, command, &caller.actor(), now)
        .await
    {
        Ok(executed) => executed,
        Err(e) => {
            if matches!(e, StoreError::Rejected(_)) {
                if let Err(release) = names::release(state.pool(), "node", &body.name, &key).await {
                    tracing::warn!(error = %release, "releasing a refused node's name failed");
                }
            }
            return Err(e.into());
        }
    };
    let location = format!("{}/nodes/{id}", crate::routes::API_PREFIX);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(ProvisionedNode {
            node: executed.state.try_into()?,
            token: issued.token,
        }),
    ))
}
