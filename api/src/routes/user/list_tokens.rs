//! `GET /api/v1/users/{name}/tokens`: every token of a user, live,
//! revoked and expired, in the order they were issued, one page at a time.
//! Read from the table authentication uses, so a token just issued or
//! revoked shows at once.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Path, Query};
use crate::page;
use crate::schema::user::{TokenInfo, TokenPage};
use crate::AppState;

/// The list's name in its cursors.
const LIST: &str = "tokens";

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_tokens))
}

/// Paging of the token list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListTokens {
    /// Tokens per page, 1 to 500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A user's tokens (never secrets or fingerprints), oldest first: admins
/// anybody's, users their own.
#[utoipa::path(
    get,
    path = "/users/{name}/tokens",
    tag = "users",
    params(("name" = String, Path, description = "The user's name"), ListTokens),
    responses(
        (status = 200, description = "One page of tokens", body = TokenPage),
        (status = 400, description = "A bad limit or cursor, named", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another user, and not an admin", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<ListTokens>,
) -> Result<Json<TokenPage>, ApiError> {
    super::require_self_or_admin(&caller, &name, "list the tokens")?;
    let limit = page::limit(q.limit.as_deref())?;
    let after: Option<Uuid> = q
        .cursor
        .as_deref()
        .map(|c| page::decode(LIST, c))
        .transpose()?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM auth_users WHERE name = $1)")
            .bind(&name)
            .fetch_one(state.pool())
            .await?;
    if !exists {
        return Err(ApiError::not_found(format!(
            "there is no user named {name:?}"
        )));
    }
    let rows = store::tokens::list(state.pool(), &name, after, limit + 1).await?;
    let (rows, next_cursor) = page::split(LIST, rows, limit, |t| t.token_id);
    Ok(Json(TokenPage {
        items: rows.into_iter().map(TokenInfo::from).collect(),
        next_cursor,
    }))
}
