//! `GET /healthz`: the process is up and serving. Touches nothing else, so
//! a slow database never gets a healthy process restarted.

use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::schema::health::Health;
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(healthz))
}

/// Whether the process serves requests.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "Serving", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health::status("ok"))
}
