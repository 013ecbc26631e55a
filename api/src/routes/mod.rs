//! Every route, one file per action under `routes/<resource>/`, each with
//! a `router()` that registers its handler and documents it.

pub mod artifact;
pub mod event;
pub mod health;
pub mod node;
pub mod object;
pub mod openapi;
pub mod project;
pub mod task;
pub mod timeline;
pub mod user;
pub mod version;

use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

/// Where the versioned API lives.
pub const API_PREFIX: &str = "/api/v1";

/// Every route, with the OpenAPI document they make up.
pub fn all() -> OpenApiRouter<AppState> {
    let v1 = OpenApiRouter::new()
        .merge(task::router())
        .merge(project::router())
        .merge(node::router())
        .merge(user::router())
        .merge(event::router())
        .merge(object::router())
        .merge(artifact::router())
        .merge(timeline::router())
        .merge(version::router())
        .merge(openapi::router());
    let mut all = OpenApiRouter::with_openapi(crate::openapi::ApiDoc::openapi())
        .merge(health::router())
        .nest(API_PREFIX, v1);
    crate::openapi::complete(all.get_openapi_mut());
    crate::limits::document(all.get_openapi_mut());
    all
}
