//! `GET /api/v1/tasks/{id}/artifacts`: a task's stored outputs, read from
//! its aggregate, one page at a time. Outputs are only ever appended, so a
//! page's cursor is the number of outputs before the next one.

use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Path, Query};
use crate::page;
use crate::schema::object::{ArtifactItem, ArtifactList};
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(artifacts))
}

/// The list's name in its cursors.
const LIST: &str = "artifacts";

/// Paging of the output list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListArtifacts {
    /// Outputs per page, 1 to 500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// The stored outputs of the task, of every attempt, oldest first, with
/// their size and SHA-256; outputs of a failed attempt are kept too.
#[utoipa::path(
    get,
    path = "/tasks/{id}/artifacts",
    tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id"), ListArtifacts),
    responses(
        (status = 200, description = "One page of outputs", body = ArtifactList),
        (status = 400, description = "Malformed id, limit or cursor", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such task, or not in one of the caller's projects", body = ErrorBody),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn artifacts(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(q): Query<ListArtifacts>,
) -> Result<Json<ArtifactList>, ApiError> {
    let limit = page::limit(q.limit.as_deref())?;
    let skip: usize = q
        .cursor
        .as_deref()
        .map(|c| page::decode(LIST, c))
        .transpose()?
        .unwrap_or(0);
    let access = access::task(&state, &caller, id).await?;
    let rows: Vec<(usize, _)> = access
        .task
        .artifacts
        .into_iter()
        .enumerate()
        .skip(skip)
        .take(usize::try_from(limit).unwrap_or(0) + 1)
        .collect();
    let (rows, next_cursor) = page::split(LIST, rows, limit, |(i, _)| i + 1);
    let items = rows
        .into_iter()
        .map(|(_, a)| ArtifactItem {
            download: format!("{}/artifacts/{}/download", crate::routes::API_PREFIX, a.id),
            id: a.id,
            attempt: a.attempt,
            name: a.name,
            size: a.size,
            sha256: a.sha256,
        })
        .collect();
    Ok(Json(ArtifactList { items, next_cursor }))
}
