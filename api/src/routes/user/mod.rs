//! Users and their tokens.

pub mod create;
pub mod get;
pub mod issue_token;
pub mod list;
pub mod list_tokens;
pub mod me;
pub mod revoke_token;

use utoipa_axum::router::OpenApiRouter;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

/// Every user route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(create::router())
        .merge(list::router())
        .merge(get::router())
        .merge(issue_token::router())
        .merge(list_tokens::router())
        .merge(revoke_token::router())
        .merge(me::router())
}

/// Refuses callers who are neither `name` nor an admin.
fn require_self_or_admin(caller: &Caller, name: &str, what: &str) -> Result<(), ApiError> {
    if caller.admin || caller.user == name {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "only admins may {what} of other users"
        )))
    }
}
