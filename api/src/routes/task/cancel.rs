//! `POST /api/v1/tasks/{id}/cancel`: stop a task, at once when queued,
//! through its node otherwise.

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use domain::project::Role;
use domain::task::TaskCommand;
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
    OpenApiRouter::new().routes(routes!(cancel))
}

/// Asks for a task to stop. Repeating the request while the node stops
/// it changes nothing.
#[utoipa::path(
    post,
    path = "/tasks/{id}/cancel",
    tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id")),
    responses(
        (status = 200, description = "The task after the request", body = Task),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A viewer of the project", body = ErrorBody),
        (status = 404, description = "No such task, or not in one of the caller's projects", body = ErrorBody),
        (status = 409, description = "The task has already ended", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<Task>, ApiError> {
    let access = access::task(&state, &caller, id).await?;
    access.project.require(Role::Member, "cancel tasks")?;
    let now = Utc::now();
    let command = TaskCommand::RequestCancel {
        by: caller.actor(),
        at: now,
    };
    let executed = state
        .store()
        .execute::<domain::task::Task>(&id.to_string(), command, &caller.actor(), now)
        .await?;
    Ok(Json(executed.state.try_into()?))
}
