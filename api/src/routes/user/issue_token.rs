//! `POST /api/v1/users/{name}/tokens`: issue an API token, shown once.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use domain::user::{User, UserCommand};
use store::tokens;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, Path};
use crate::schema::user::{IssueToken, IssuedToken};
use crate::AppState;

/// The longest token label.
pub const MAX_LABEL: usize = 100;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(issue_token))
}

/// Issues a token for a user: admins for anybody, users for themselves.
/// The token is in this answer only; the log keeps its fingerprint.
#[utoipa::path(
    post,
    path = "/users/{name}/tokens",
    tag = "users",
    params(("name" = String, Path, description = "The user's name")),
    request_body(content = Option<IssueToken>, description = "Optional; `{}` or no body at all gives an unlabelled token"),
    responses(
        (status = 201, description = "The token, shown this once", body = IssuedToken),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user, and not an admin", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 422, description = "Invalid label", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn issue_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Option<JsonBody<IssueToken>>,
) -> Result<(StatusCode, Json<IssuedToken>), ApiError> {
    super::require_self_or_admin(&caller, &name, "issue tokens")?;
    let label = body.and_then(|JsonBody(b)| b.label).unwrap_or_default();
    if label.chars().count() > MAX_LABEL || label.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "label",
            format!("must be at most {MAX_LABEL} characters without control characters"),
        ));
    }
    let token_id = Uuid::now_v7();
    let issued = tokens::issue_user(&name, token_id);
    let now = Utc::now();
    let command = UserCommand::IssueToken {
        token_id,
        fingerprint: issued.fingerprint.clone(),
        label: label.clone(),
        by: caller.actor(),
        at: now,
    };
    state
        .store()
        .execute::<User>(&name, command, &caller.actor(), now)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(IssuedToken {
            token_id,
            token: issued.token,
            label,
        }),
    ))
}
