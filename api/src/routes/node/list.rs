//! `GET /api/v1/nodes`: nodes by name, one page at a time, from the node
//! read model.

use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Query;
use crate::fresh::{Applied, Prefer};
use crate::page;
use crate::schema::node::{Node, NodeList};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// The list's name in its cursors.
const LIST: &str = "nodes";

/// Paging of the node list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListNodes {
    /// Nodes per page, 1 to 500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Nodes by name, a page at a time. Any user may see nodes.
#[utoipa::path(
    get,
    path = "/nodes",
    tag = "nodes",
    params(ListNodes, ("Prefer" = Option<String>, Header, description = "`fresh`: wait, at most 5 s, until the list shows everything committed before this request")),
    responses(
        (status = 200, description = "One page of nodes", body = NodeList, headers(("Preference-Applied" = String, description = "`fresh` when the list shows everything committed before the request"))),
        (status = 400, description = "A bad limit or cursor, named", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    prefer: Prefer,
    Query(q): Query<ListNodes>,
) -> Result<(Applied, Json<NodeList>), ApiError> {
    let limit = page::limit(q.limit.as_deref())?;
    let (name, id) = match q.cursor.as_deref() {
        Some(c) => {
            let (name, id): (String, Uuid) = page::decode(LIST, c)?;
            (Some(name), Some(id))
        }
        None => (None, None),
    };
    let after = name.as_deref().zip(id);
    let applied = prefer
        .wait_for(&state, &[projections::read::nodes::CHECKPOINT])
        .await?;
    let rows = projections::read::nodes::page(state.pool(), after, limit + 1).await?;
    let (rows, next_cursor) = page::split(LIST, rows, limit, |r| (r.name.clone(), r.id));
    let items = rows
        .into_iter()
        .map(|r| Node::try_from(r.node))
        .collect::<Result<_, _>>()?;
    Ok((applied, Json(NodeList { items, next_cursor })))
}
