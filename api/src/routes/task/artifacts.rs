//! `GET /api/v1/tasks/{id}/artifacts`: a task's stored outputs, read from
//! its aggregate.

use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::schema::object::{ArtifactItem, ArtifactList};
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(artifacts))
}

/// Every stored output of the task, of every attempt, with its size and
/// SHA-256; outputs of a failed attempt are kept too.
#[utoipa::path(
    get,
    path = "/tasks/{id}/artifacts",
    tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id")),
    responses(
        (status = 200, description = "The outputs", body = ArtifactList),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such task, or not in one of the caller's projects", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn artifacts(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<ArtifactList>, ApiError> {
    let access = access::task(&state, &caller, id).await?;
    let items = access
        .task
        .artifacts
        .into_iter()
        .map(|a| ArtifactItem {
            download: format!("{}/artifacts/{}/download", crate::routes::API_PREFIX, a.id),
            id: a.id,
            attempt: a.attempt,
            name: a.name,
            size: a.size,
            sha256: a.sha256,
        })
        .collect();
    Ok(Json(ArtifactList { items }))
}
