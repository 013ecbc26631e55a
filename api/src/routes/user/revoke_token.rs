//! `DELETE /api/v1/users/{name}/tokens/{token_id}`: revoke a token. It
//! stops working at the very next request.

use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use domain::user::{User, UserCommand};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(revoke_token))
}

/// Revokes a token: admins any, users their own. Revoking a revoked token
/// changes nothing.
#[utoipa::path(
    delete,
    path = "/users/{name}/tokens/{token_id}",
    tag = "users",
    params(
        ("name" = String, Path, description = "The user's name"),
        ("token_id" = Uuid, Path, description = "The token's id")
    ),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "Malformed token id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user, and not an admin", body = ErrorBody),
        (status = 404, description = "No such user or token", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn revoke_token(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, token_id)): Path<(String, Uuid)>,
) -> Result<StatusCode, ApiError> {
    super::require_self_or_admin(&caller, &name, "revoke tokens")?;
    let now = Utc::now();
    let command = UserCommand::RevokeToken {
        token_id,
        by: caller.actor(),
        at: now,
    };
    state
        .store()
        .execute::<User>(&name, command, &caller.actor(), now)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
