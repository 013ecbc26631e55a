//! Projects: create, list, get, members, quota, secrets and archive.

pub mod add_member;
pub mod archive;
pub mod create;
pub mod get;
pub mod list;
pub mod remove_member;
pub mod secret_delete;
pub mod secret_list;
pub mod secret_set;
pub mod set_quota;

use chrono::Utc;
use domain::project::{Project, ProjectCommand};
use utoipa_axum::router::OpenApiRouter;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::schema;
use crate::AppState;

/// Every project route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(create::router())
        .merge(list::router())
        .merge(get::router())
        .merge(add_member::router())
        .merge(remove_member::router())
        .merge(set_quota::router())
        .merge(secret_set::router())
        .merge(secret_list::router())
        .merge(secret_delete::router())
        .merge(archive::router())
}

/// Executes `command` on project `id` as `caller` and shows the result.
async fn execute(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    command: impl FnOnce(chrono::DateTime<Utc>) -> ProjectCommand,
) -> Result<schema::project::Project, ApiError> {
    let now = Utc::now();
    let executed = state
        .store()
        .execute::<Project>(&id.to_string(), command(now), &caller.actor(), now)
        .await?;
    executed.state.try_into()
}
