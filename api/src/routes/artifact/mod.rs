//! A task's stored outputs, by artifact id.

pub mod download;

use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

/// Every artifact route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().merge(download::router())
}
