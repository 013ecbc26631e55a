//! `POST /api/v1/tasks`: validate a task specification and queue it.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::Json;
use chrono::Utc;
use domain::project::Role;
use domain::spec::TaskSpecDraft;
use domain::task::TaskCommand;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, Problem};
use crate::extract::JsonBody;
use crate::schema::task::{SubmitTask, Task};
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(submit))
}

/// Queues a task. Every invalid field is reported at once and nothing is
/// appended unless the whole request is valid.
#[utoipa::path(
    post,
    path = "/tasks",
    tag = "tasks",
    request_body = SubmitTask,
    responses(
        (status = 201, description = "Queued", body = Task),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A viewer of the project", body = ErrorBody),
        (status = 404, description = "No such project, or not one of the caller's", body = ErrorBody),
        (status = 409, description = "The project is archived", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid fields, each named; an input naming an object with no completed, verified upload", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<SubmitTask>,
) -> Result<(StatusCode, [(header::HeaderName, String); 1], Json<Task>), ApiError> {
    let spec = TaskSpecDraft::from(body)
        .validate(state.config().url_policy)
        .map_err(|errors| {
            // Names taken by another input or output of the same task are
            // a conflict, as a taken name is elsewhere.
            if errors.iter().all(|e| e.taken) {
                if let Some(first) = errors.into_iter().next() {
                    return ApiError::Conflict(first.into());
                }
                return ApiError::internal("a refused specification without a reason");
            }
            ApiError::Invalid(errors.into_iter().map(Problem::from).collect())
        })?;
    if state.objects().is_err() {
        let mut problems = Vec::new();
        if !spec.inputs.is_empty() {
            problems.push(Problem::field("inputs", crate::NO_OBJECT_STORE));
        }
        if !spec.outputs.is_empty() {
            problems.push(Problem::field("outputs", crate::NO_OBJECT_STORE));
        }
        if !problems.is_empty() {
            return Err(ApiError::Invalid(problems));
        }
    }
    let access = access::project(&state, &caller, spec.project_id, Some("project_id")).await?;
    access.require(Role::Member, "submit tasks")?;
    if access.project.archived {
        return Err(ApiError::Conflict(Problem::field(
            "project_id",
            "the project is archived and takes no new tasks",
        )));
    }
    crate::routes::object::require_verified_inputs(&state, &spec).await?;
    let id = Uuid::now_v7();
    let now = Utc::now();
    let command = TaskCommand::Submit {
        task_id: id,
        spec,
        by: caller.actor(),
        at: now,
    };
    let executed = state
        .store()
        .execute::<domain::task::Task>(&id.to_string(), command, &caller.actor(), now)
        .await?;
    let location = format!("{}/tasks/{id}", crate::routes::API_PREFIX);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(executed.state.try_into()?),
    ))
}
