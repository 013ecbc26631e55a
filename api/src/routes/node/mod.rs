//! Nodes: provision, list, get, drain, undrain and revoke, and an admin's
//! emergency command on a node's host (`host-ssh`). What placement trusts
//! of a node is an admin's: its labels (`labels`, `labels/accept`) and the
//! most it may claim (`limits`); see `domain::node::trust`.

pub mod accept_labels;
pub mod drain;
pub mod get;
pub mod host_ssh;
pub mod list;
pub mod provision;
pub mod revoke;
pub mod set_labels;
pub mod set_limits;
pub mod undrain;

use chrono::{DateTime, Utc};
use domain::node::{Node, NodeCommand};
use utoipa_axum::router::OpenApiRouter;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::schema;
use crate::AppState;

/// Every node route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(provision::router())
        .merge(list::router())
        .merge(get::router())
        .merge(drain::router())
        .merge(undrain::router())
        .merge(revoke::router())
        .merge(host_ssh::router())
        .merge(set_labels::router())
        .merge(accept_labels::router())
        .merge(set_limits::router())
}

/// Executes an admin's `command` on node `id` and shows the result.
async fn execute(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    what: &str,
    command: impl FnOnce(domain::Actor, DateTime<Utc>) -> NodeCommand,
) -> Result<schema::node::Node, ApiError> {
    caller.require_admin(what)?;
    let now = Utc::now();
    let executed = state
        .store()
        .execute::<Node>(
            &id.to_string(),
            command(caller.actor(), now),
            &caller.actor(),
            now,
        )
        .await?;
    executed.state.try_into()
}
