//! `POST /api/v1/users/{name}/tokens`: issue an API token, shown once.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use domain::user::{User, UserCommand};
use store::tokens;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, Problem};
use crate::extract::{JsonBody, Path};
use crate::schema::user::{IssueToken, IssuedToken};
use crate::AppState;

/// The longest token label.
pub const MAX_LABEL: usize = 100;

/// The longest a token may live: a year. Longer-lived credentials are
/// better revoked and issued anew.
pub const MAX_LIFETIME_S: u64 = 365 * 24 * 60 * 60;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(issue_token))
}

/// Issues a token for a user: admins for anybody, users for themselves.
/// The token is in this answer only; the log keeps its fingerprint.
///
/// A token may expire by itself (`expires_in_s` or `expires_at`, at most a
/// year ahead); after that it is refused with 401 "the token expired". A
/// user holds at most a configured number of live tokens (20 by default);
/// past it this answers 409 until one is revoked or expires.
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
        (status = 409, description = "The user holds the most live tokens allowed; revoke one first", body = ErrorBody),
        (status = 422, description = "Invalid label or expiry", body = ErrorBody),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)
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
    let body = body.map(|JsonBody(b)| b).unwrap_or_default();
    let label = body.label.clone().unwrap_or_default();
    if label.chars().count() > MAX_LABEL || label.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "label",
            format!("must be at most {MAX_LABEL} characters without control characters"),
        ));
    }
    let now = Utc::now();
    let expires_at = expiry(&body, now)?;
    let token_id = Uuid::now_v7();
    let issued = tokens::issue_user(&name, token_id);
    let command = UserCommand::IssueToken {
        token_id,
        fingerprint: issued.fingerprint.clone(),
        label: label.clone(),
        by: caller.actor(),
        at: now,
        expires_at,
        max_live: state.config().max_tokens_per_user,
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
            expires_at,
        }),
    ))
}

/// When a token asked for with `body` at `now` expires, if ever.
fn expiry(body: &IssueToken, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, ApiError> {
    let latest = now + Duration::seconds(MAX_LIFETIME_S as i64);
    match (body.expires_in_s, body.expires_at) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "expires_at",
            "give expires_in_s or expires_at, not both",
        )),
        (Some(s), None) if (1..=MAX_LIFETIME_S).contains(&s) => {
            Ok(Some(now + Duration::seconds(s as i64)))
        }
        (Some(s), None) => Err(ApiError::invalid(
            "expires_in_s",
            format!("must be from 1 to {MAX_LIFETIME_S} seconds (a year), got {s}"),
        )),
        // Refused for the time the request arrives at, not for its form:
        // the same request was or will be fine at another time.
        (None, Some(at)) if at <= now => Err(ApiError::Conflict(Problem::field(
            "expires_at",
            format!("must be in the future, got {}", at.to_rfc3339()),
        ))),
        (None, Some(at)) if at > latest => Err(ApiError::Conflict(Problem::field(
            "expires_at",
            format!(
                "must be at most a year from now (until {}), got {}",
                latest.to_rfc3339(),
                at.to_rfc3339()
            ),
        ))),
        (None, at) => Ok(at),
    }
}
