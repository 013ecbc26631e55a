//! `GET /api/v1/users/{name}`: one user with their live tokens (never
//! secrets or fingerprints), read from the aggregate.

use axum::extract::State;
use axum::Json;
use domain::user::User;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::schema;
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get))
}

/// One user. Admins see anybody, users themselves.
#[utoipa::path(
    get,
    path = "/users/{name}",
    tag = "users",
    params(("name" = String, Path, description = "The user's name")),
    responses(
        (status = 200, description = "The user", body = schema::user::User),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user, and not an admin", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<schema::user::User>, ApiError> {
    super::require_self_or_admin(&caller, &name, "see the details")?;
    match state.store().load::<User>(&name).await? {
        Some(loaded) if loaded.state.exists() => Ok(Json(schema::user::User::at(
            loaded.state,
            chrono::Utc::now(),
        ))),
        _ => Err(ApiError::not_found(format!(
            "there is no user named {name:?}"
        ))),
    }
}
