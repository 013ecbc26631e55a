//! `GET /api/v1/openapi.json`: the OpenAPI document, without authentication
//! so that tools can fetch it.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(document))
}

/// The OpenAPI document of every route.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
async fn document(Extension(doc): Extension<Arc<serde_json::Value>>) -> Response {
    Json(doc.as_ref()).into_response()
}
