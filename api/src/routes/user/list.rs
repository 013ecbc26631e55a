//! `GET /api/v1/users`: every user, from the user read model.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::schema::user::{UserList, UserSummary};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// Every user, by name. Admins only.
#[utoipa::path(
    get,
    path = "/users",
    tag = "users",
    responses(
        (status = 200, description = "The users", body = UserList),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<UserList>, ApiError> {
    caller.require_admin("list users")?;
    let rows: Vec<(String, bool, DateTime<Utc>, i32)> =
        sqlx::query_as("SELECT name, admin, created_at, tokens FROM user_view ORDER BY name")
            .fetch_all(state.pool())
            .await?;
    let items = rows
        .into_iter()
        .map(|(name, admin, created_at, tokens)| UserSummary {
            name,
            admin,
            created_at,
            tokens,
        })
        .collect();
    Ok(Json(UserList { items }))
}
