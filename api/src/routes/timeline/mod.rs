//! The audit timeline: `GET /api/v1/timeline` pages through it newest
//! first, `GET /api/v1/timeline/stream` delivers new events live.

pub mod list;
pub mod stream;

use domain::node::Node;
use utoipa_axum::router::OpenApiRouter;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::timeline::TimelineFilter;
use crate::{access, AppState};

/// Every timeline route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(list::router())
        .merge(stream::router())
}

/// Refuses a filter naming a task, project or node the caller may not
/// see (or that does not exist), as the routes of those resources do.
///
/// # Errors
/// 404 naming the parameter; 500 when the log cannot be read.
pub(crate) async fn check_filter(
    state: &AppState,
    caller: &Caller,
    filter: &TimelineFilter,
) -> Result<(), ApiError> {
    if let (Some("task"), Some(id)) = (filter.aggregate_type.as_deref(), &filter.aggregate_id) {
        let id = crate::extract::parse_uuid("task", id)?;
        match access::task(state, caller, id).await {
            Ok(_) => {}
            Err(ApiError::NotFound(p)) => return Err(ApiError::not_found_field("task", p.detail)),
            Err(e) => return Err(e),
        }
    }
    if let Some(project) = filter.project {
        access::project(state, caller, project, Some("project")).await?;
    }
    if let Some(node) = filter.node {
        if state
            .store()
            .load::<Node>(&node.to_string())
            .await?
            .is_none()
        {
            return Err(ApiError::not_found_field(
                "node",
                format!("node {node} not found"),
            ));
        }
    }
    Ok(())
}
