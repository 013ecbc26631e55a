//! `GET /api/v1/projects/{id}`: one project, read from its aggregate.

use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::schema::project::Project;
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get))
}

/// One project with its members.
#[utoipa::path(
    get,
    path = "/projects/{id}",
    tag = "projects",
    params(("id" = Uuid, Path, description = "The project's id")),
    responses(
        (status = 200, description = "The project", body = Project),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such project, or not one of the caller's", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<Project>, ApiError> {
    let access = access::project(&state, &caller, id, None).await?;
    Ok(Json(access.project.try_into()?))
}
