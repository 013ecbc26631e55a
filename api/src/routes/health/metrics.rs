//! `GET /metrics`: this process's metrics and the platform's gauges in the
//! Prometheus text format 0.0.4, without authentication so that a scraper
//! needs no token ([`telemetry`] says what is there). Labels carry no ids,
//! no node or user names and no secrets; on the API listener not even
//! project names, which only members of a project may see (the private
//! metrics listener adds them).

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Extension;
use telemetry::Scope;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// This process's metrics, in the Prometheus text format 0.0.4.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "The metrics", content_type = "text/plain; version=0.0.4", body = String))
)]
async fn metrics(
    State(state): State<AppState>,
    scope: Option<Extension<Scope>>,
) -> impl IntoResponse {
    let scope = scope.map(|Extension(s)| s).unwrap_or_default();
    (
        [(header::CONTENT_TYPE, telemetry::CONTENT_TYPE)],
        state.metrics().render(scope).await,
    )
}
