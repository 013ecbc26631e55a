//! `GET /api/v1/me`: the caller, as `GET /api/v1/users/{name}` shows them,
//! so that a client holding only a token can say whose it is.

use axum::extract::State;
use axum::Json;
use domain::user::User;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::schema;
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(me))
}

/// The user the token belongs to, with their live tokens. Any valid user
/// token may ask.
#[utoipa::path(
    get,
    path = "/me",
    tag = "users",
    responses(
        (status = 200, description = "The caller", body = schema::user::User),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn me(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<schema::user::User>, ApiError> {
    match state.store().load::<User>(&caller.user).await? {
        Some(loaded) if loaded.state.exists() => Ok(Json(schema::user::User::at(
            loaded.state,
            chrono::Utc::now(),
        ))),
        // A token outlives no user; seen only in a race with a removal.
        _ => Err(ApiError::Unauthorized(
            "the token's user does not exist".into(),
        )),
    }
}
