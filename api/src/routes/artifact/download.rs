//! `GET /api/v1/artifacts/{id}/download`: a redirect to a presigned URL of
//! one stored output.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(download))
}

/// How long a download waits for the tasks read model to take in an
/// artifact stored just before.
const CATCH_UP: Duration = Duration::from_secs(5);

/// The task holding artifact `id`, from the tasks read model. An artifact
/// is listed from its task's aggregate as soon as it is stored, and the
/// read model takes it in a moment later; so an id the model does not know
/// is looked up once more when the model has applied everything committed
/// before, and only then is it unknown.
async fn task_of(state: &AppState, id: Uuid) -> Result<Option<Uuid>, ApiError> {
    use projections::read::{caught_up, tasks};
    if let Some(task) = tasks::holding_artifact(state.pool(), id).await? {
        return Ok(Some(task));
    }
    if !caught_up(state.pool(), tasks::CHECKPOINT, CATCH_UP).await? {
        return Err(ApiError::Unavailable(
            "the task list is behind the event log; try again shortly".into(),
        ));
    }
    Ok(tasks::holding_artifact(state.pool(), id).await?)
}

/// Redirects (302) to a presigned URL that downloads the output, valid for
/// a short time; the file arrives straight from the store. Anyone who may
/// see the task may download it.
#[utoipa::path(
    get,
    path = "/artifacts/{id}/download",
    tag = "objects",
    params(("id" = Uuid, Path, description = "The artifact's id")),
    responses(
        (status = 302, description = "To the presigned URL, in `Location`"),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such artifact, or not in one of the caller's projects", body = ErrorBody),
        (status = 409, description = "No object store configured", body = ErrorBody),
        (status = 503, description = "The object store cannot be reached, or the task list is behind the event log", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn download(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<(StatusCode, [(header::HeaderName, String); 1]), ApiError> {
    let hidden = || ApiError::not_found(format!("artifact {id} not found"));
    let task_id = task_of(&state, id).await?.ok_or_else(hidden)?;
    let access = match access::task(&state, &caller, task_id).await {
        Err(ApiError::NotFound(_)) => return Err(hidden()),
        other => other?,
    };
    let artifact = access
        .task
        .artifacts
        .iter()
        .find(|a| a.id == id)
        .ok_or_else(hidden)?;
    let objects = state.objects()?;
    let url = objects
        .presign_get(&artifact.key, Some(&artifact.name))
        .await
        .map_err(ApiError::object_store)?;
    Ok((StatusCode::FOUND, [(header::LOCATION, url)]))
}
