//! Liveness and readiness probes, outside `/api/v1` and without
//! authentication.

pub mod healthz;
pub mod readyz;

use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

/// `GET /healthz` and `GET /readyz`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(healthz::router())
        .merge(readyz::router())
}
