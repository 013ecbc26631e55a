//! Large files in a project's store: uploads through presigned URLs.

pub mod complete;
pub mod upload;

use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

/// Every object route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(upload::router())
        .merge(complete::router())
}
