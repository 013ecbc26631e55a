//! `GET /api/v1/users`: users by name, one page at a time, from the user
//! read model.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Query;
use crate::fresh::{Applied, Prefer};
use crate::page;
use crate::schema::user::{UserList, UserSummary};
use crate::AppState;

/// The list's name in its cursors.
const LIST: &str = "users";

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// Paging of the user list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListUsers {
    /// Users per page, 1 to 500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Users by name, a page at a time. Admins only.
#[utoipa::path(
    get,
    path = "/users",
    tag = "users",
    params(ListUsers, ("Prefer" = Option<String>, Header, description = "`fresh`: wait, at most 5 s, until the list shows everything committed before this request")),
    responses(
        (status = 200, description = "One page of users", body = UserList, headers(("Preference-Applied" = String, description = "`fresh` when the list shows everything committed before the request"))),
        (status = 400, description = "A bad limit or cursor, named", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    prefer: Prefer,
    Query(q): Query<ListUsers>,
) -> Result<(Applied, Json<UserList>), ApiError> {
    caller.require_admin("list users")?;
    let limit = page::limit(q.limit.as_deref())?;
    let after: Option<String> = q
        .cursor
        .as_deref()
        .map(|c| page::decode(LIST, c))
        .transpose()?;
    let applied = prefer
        .wait_for(&state, &[projections::read::users::CHECKPOINT])
        .await?;
    let rows = projections::read::users::page(state.pool(), after.as_deref(), limit + 1).await?;
    let (rows, next_cursor) = page::split(LIST, rows, limit, |r| r.name.clone());
    let items = rows
        .into_iter()
        .map(|r| UserSummary {
            name: r.name,
            admin: r.admin,
            created_at: r.created_at,
            tokens: r.tokens,
        })
        .collect();
    Ok((applied, Json(UserList { items, next_cursor })))
}
