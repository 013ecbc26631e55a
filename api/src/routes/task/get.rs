//! `GET /api/v1/tasks/{id}`: one task, read from its aggregate so a client
//! sees its own writes at once.

use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::schema::task::Task;
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get))
}

/// One task as it stands now.
#[utoipa::path(
    get,
    path = "/tasks/{id}",
    tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id")),
    responses(
        (status = 200, description = "The task", body = Task),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such task, or not in one of the caller's projects", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<Task>, ApiError> {
    let access = access::task(&state, &caller, id).await?;
    let mut task: Task = access.task.try_into()?;
    task.output_removed = store::task_log::removed(state.pool(), id)
        .await
        .map_err(|e| ApiError::internal(format!("reading task_log_removed: {e}")))?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(task))
}
