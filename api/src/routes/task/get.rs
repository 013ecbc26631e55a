//! `GET /api/v1/tasks/{id}`: one task, read from its aggregate so a client
//! sees its own writes at once, and while it is queued, why it waits.

use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::schema::task::{QueueStatus, Task};
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
    if task.state == domain::task::TaskState::Queued.as_str() {
        task.queue = Some(queue_status(&state, &task).await?);
    }
    Ok(Json(task))
}

/// Why queued `task` waits: the scheduler's explanation, if it explained
/// this same wait (the attempt the task waits after is the one the row
/// names), and its place in the queue.
async fn queue_status(state: &AppState, task: &Task) -> Result<QueueStatus, ApiError> {
    let internal = |e: sqlx::Error| ApiError::internal(format!("reading the queue: {e}"));
    let recorded = store::queue_reasons::get(state.pool(), task.id)
        .await
        .map_err(internal)?
        .filter(|r| r.attempt == task.attempt);
    let ahead = match task.submitted_at {
        Some(at) => {
            projections::read::tasks::queued_ahead(state.pool(), task.spec.priority, at, task.id)
                .await
                .map_err(internal)?
        }
        None => 0,
    };
    let position = u64::try_from(ahead).unwrap_or(0) + 1;
    Ok(match recorded {
        Some(r) => QueueStatus {
            summary: r.explanation.summary,
            reasons: r.explanation.reasons.into_iter().map(Into::into).collect(),
            since: Some(r.since),
            position,
        },
        None => QueueStatus {
            summary: "waiting for the scheduler to look at it".into(),
            reasons: Vec::new(),
            since: None,
            position,
        },
    })
}
