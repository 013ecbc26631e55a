//! Tasks: submit, list, get, cancel, and a task's state as of one of its
//! events.

pub mod artifacts;
pub mod cancel;
pub mod get;
pub mod list;
pub mod logs;
pub mod state_at;
pub mod submit;

use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

/// Every task route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(submit::router())
        .merge(list::router())
        .merge(get::router())
        .merge(cancel::router())
        .merge(state_at::router())
        .merge(logs::router())
        .merge(artifacts::router())
}
