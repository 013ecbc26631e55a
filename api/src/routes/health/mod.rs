//! Liveness and readiness probes and the metrics scrape, outside `/api/v1`
//! and without authentication.

pub mod healthz;
pub mod metrics;
pub mod readyz;

use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

/// `GET /healthz`, `GET /readyz` and `GET /metrics`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(healthz::router())
        .merge(readyz::router())
        .merge(metrics::router())
}
