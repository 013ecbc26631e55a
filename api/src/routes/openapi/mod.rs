//! The OpenAPI document of this API.

pub mod document;

use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

/// `GET /api/v1/openapi.json`.
pub fn router() -> OpenApiRouter<AppState> {
    document::router()
}
