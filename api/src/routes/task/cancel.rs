//! `POST /api/v1/tasks/{id}/cancel`: stop a task, at once when queued,
//! through its node otherwise.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use domain::project::Role;
use domain::task::TaskCommand;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::idempotency::{self, Answer, IdempotencyKey, IdempotencyKeyHeader};
use crate::schema::task::Task;
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(cancel))
}

/// Asks for a task to stop. Repeating the request while the node stops
/// it changes nothing; sent with an `Idempotency-Key`, a repeat gets the
/// first answer even after the task has ended.
#[utoipa::path(
    post,
    path = "/tasks/{id}/cancel",
    tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id"), IdempotencyKeyHeader),
    responses(
        (status = 200, description = "The task after the request; the same answer again, with `Idempotent-Replayed: true`, to a repeated request with the same `Idempotency-Key`", body = Task,
            headers(
                ("Idempotent-Replayed" = String, description = "`true` on an answer given before to the same request with the same `Idempotency-Key`")
            )),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A viewer of the project", body = ErrorBody),
        (status = 404, description = "No such task, or not in one of the caller's projects", body = ErrorBody),
        (status = 409, description = "The task has already ended; or the `Idempotency-Key` was used for another request, or an earlier request with it is still being worked on", body = ErrorBody),
        (status = 422, description = "A malformed `Idempotency-Key`", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    key: Option<IdempotencyKey>,
) -> Result<Response, ApiError> {
    let path = format!("{}/tasks/{id}/cancel", crate::routes::API_PREFIX);
    let request = idempotency::request_sha256("POST", &path, None);
    idempotency::once(&state, &caller, key, request, |_| async {
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
        Answer::json(StatusCode::OK, &Task::try_from(executed.state)?)
    })
    .await
}
