//! `PUT /api/v1/projects/{id}/quota`: set or remove the project's limit on
//! running tasks.

use axum::extract::State;
use axum::Json;
use domain::project::ProjectCommand;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, Path};
use crate::schema::project::{Project, SetQuota};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(set_quota))
}

/// Sets how many of the project's tasks may hold nodes at once; `null`
/// removes the limit. Admins only.
#[utoipa::path(
    put,
    path = "/projects/{id}/quota",
    tag = "projects",
    params(("id" = Uuid, Path, description = "The project's id")),
    request_body = SetQuota,
    responses(
        (status = 200, description = "The project", body = Project),
        (status = 400, description = "Malformed id or JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such project", body = ErrorBody),
        (status = 409, description = "The project is archived", body = ErrorBody),
        (status = 422, description = "max_running missing or out of range", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn set_quota(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    JsonBody(body): JsonBody<SetQuota>,
) -> Result<Json<Project>, ApiError> {
    caller.require_admin("set quotas")?;
    let max_running = match body.max_running {
        None => {
            return Err(ApiError::invalid(
                "max_running",
                "is required; give null to remove the limit",
            ))
        }
        Some(None) => None,
        Some(Some(n)) => Some(u32::try_from(n).map_err(|_| {
            ApiError::invalid(
                "max_running",
                format!("must be between 0 and {}, or null, got {n}", u32::MAX),
            )
        })?),
    };
    let project = super::execute(&state, &caller, id, |at| ProjectCommand::SetQuota {
        max_running,
        by: caller.actor(),
        at,
    })
    .await?;
    Ok(Json(project))
}
