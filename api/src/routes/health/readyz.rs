//! `GET /readyz`: the database answers and its schema is the one this build
//! expects, so requests can be served.

use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ErrorBody};
use crate::schema::health::Health;
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(readyz))
}

/// Whether the database is reachable and fully migrated.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Database unreachable or not migrated", body = ErrorBody)
    )
)]
async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    match store::migrations_current(state.pool()).await {
        Ok(true) => Ok(Json(Health {
            status: "ready".into(),
        })),
        Ok(false) => Err(ApiError::Unavailable(
            "the database schema is not migrated to this version; run `unidesk migrate`".into(),
        )),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check could not reach the database");
            Err(ApiError::Unavailable("the database is unreachable".into()))
        }
    }
}
