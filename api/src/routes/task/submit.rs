//! `POST /api/v1/tasks`: validate a task specification and queue it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use domain::project::Role;
use domain::spec::{TaskSpec, TaskSpecDraft};
use domain::task::{TaskCommand, TaskError};
use store::StoreError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, Problem};
use crate::extract::{self, JsonBody};
use crate::idempotency::{self, Answer, IdempotencyKey, IdempotencyKeyHeader, Reserved};
use crate::schema::task::{SubmitTask, Task};
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(submit))
}

/// Queues a task. Every invalid field is reported at once and nothing is
/// appended unless the whole request is valid. Sent with an
/// `Idempotency-Key`, the request is safe to send again.
#[utoipa::path(
    post,
    path = "/tasks",
    tag = "tasks",
    params(IdempotencyKeyHeader),
    request_body = SubmitTask,
    responses(
        (status = 201, description = "Queued; the same answer again, with `Idempotent-Replayed: true`, to a repeated request with the same `Idempotency-Key`", body = Task,
            headers(
                ("Location" = String, description = "The task's URL"),
                ("Idempotent-Replayed" = String, description = "`true` on an answer given before to the same request with the same `Idempotency-Key`")
            )),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A viewer of the project", body = ErrorBody),
        (status = 404, description = "No such project, or not one of the caller's; a secret the task names that the project does not have", body = ErrorBody),
        (status = 409, description = "The project is archived; or the `Idempotency-Key` was used for another request, or an earlier request with it is still being worked on", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid fields, each named; an input naming an object with no completed, verified upload; a specification whose command to its node would not fit in one frame (the size and the limit named); a malformed `Idempotency-Key`", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    key: Option<IdempotencyKey>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    let path = format!("{}/tasks", crate::routes::API_PREFIX);
    let request = idempotency::request_sha256("POST", &path, Some(&body));
    let body: SubmitTask = extract::from_value(body)?;
    idempotency::once(&state, &caller, key, request, |reserved| {
        queue(&state, &caller, body, reserved)
    })
    .await
}

/// Validates `body` and queues it as task `reserved.task_id`.
async fn queue(
    state: &AppState,
    caller: &Caller,
    body: SubmitTask,
    reserved: Reserved,
) -> Result<Answer, ApiError> {
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
    let id = reserved.task_id;
    deliverable(id, &spec)?;
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
    // Decided on the project as this process remembers it, the task's
    // event appended only while the project has no newer event: one
    // statement in all. A refusal, or a project that moved on, is decided
    // again on the project loaded afresh.
    let project = spec.project_id.to_string();
    let mut remembered = access::remembered_project(state, caller, spec.project_id);
    let mut inputs_checked = false;
    for _ in 0..GUARD_TRIES {
        let sequence = match remembered.take() {
            Some((access, sequence)) if may_submit(&access, &spec).is_ok() => sequence,
            _ => {
                let (access, sequence) =
                    access::project_at(state, caller, spec.project_id, Some("project_id")).await?;
                may_submit(&access, &spec)?;
                sequence
            }
        };
        if !inputs_checked {
            crate::routes::object::require_verified_inputs(state, &spec).await?;
            inputs_checked = true;
        }
        let now = Utc::now();
        let command = TaskCommand::Submit {
            task_id: id,
            spec: spec.clone(),
            by: caller.actor(),
            at: now,
        };
        let guard = store::Guard::on::<domain::project::Project>(&project, sequence);
        let task = match state
            .store()
            .execute_guarded::<domain::task::Task>(
                &id.to_string(),
                command,
                &caller.actor(),
                now,
                &guard,
            )
            .await
        {
            Ok(Some(executed)) => executed.state,
            // The project changed since: decide again on what it is now.
            Ok(None) => continue,
            // An earlier request with the same key submitted it and gave
            // no answer: this is that task.
            Err(StoreError::Rejected(TaskError::AlreadyExists)) if reserved.taken_over => {
                state
                    .store()
                    .load::<domain::task::Task>(&id.to_string())
                    .await?
                    .ok_or_else(|| ApiError::internal("a task that exists could not be loaded"))?
                    .state
            }
            Err(e) => return Err(e.into()),
        };
        return answer(id, task);
    }
    Err(StoreError::<TaskError>::Conflict.into())
}

/// How many times a submission is decided again because its project
/// changed meanwhile.
const GUARD_TRIES: usize = 4;

/// Whether the caller, with `access` to the task's project, may submit
/// `spec` there.
fn may_submit(access: &access::ProjectAccess, spec: &TaskSpec) -> Result<(), ApiError> {
    access.require(Role::Member, "submit tasks")?;
    if access.project.archived {
        return Err(ApiError::Conflict(Problem::field(
            "project_id",
            "the project is archived and takes no new tasks",
        )));
    }
    // Like a project that does not exist: what the task refers to is not
    // there (now), so 404 naming the field.
    if let Some((name, field)) = spec
        .secrets()
        .into_iter()
        .find(|(name, _)| access.project.secret(name).is_none())
    {
        return Err(ApiError::not_found_field(
            &field,
            format!("the project has no secret {name}"),
        ));
    }
    Ok(())
}

/// The answer to a submission of task `id`, now `task`.
fn answer(id: Uuid, task: domain::task::Task) -> Result<Answer, ApiError> {
    let location = format!("{}/tasks/{id}", crate::routes::API_PREFIX);
    Ok(Answer::json(StatusCode::CREATED, &Task::try_from(task)?)?.with_location(location))
}

/// Refuses a specification whose `run_task` could never be delivered to
/// a node: measured with the ingress's own conversion, so what is
/// accepted here always fits in a frame there.
fn deliverable(task_id: Uuid, spec: &TaskSpec) -> Result<(), ApiError> {
    ingress::check_run_task_fits(task_id, spec)
        .map(drop)
        .map_err(|e| ApiError::Invalid(vec![Problem::new(e.to_string())]))
}
