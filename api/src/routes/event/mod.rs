//! The event log in its global order.

pub mod get;
pub mod list;
pub mod types;

use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

/// Every event route.
pub fn router() -> OpenApiRouter<AppState> {
    list::router().merge(get::router()).merge(types::router())
}
