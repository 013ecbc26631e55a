//! `POST /api/v1/projects/{id}/archive`: make a project read-only.

use axum::extract::State;
use axum::Json;
use domain::project::{ProjectCommand, Role};
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
    OpenApiRouter::new().routes(routes!(archive))
}

/// Archives a project: it takes no new tasks and no changes. Archiving an
/// archived project changes nothing. Maintainers and admins only.
#[utoipa::path(
    post,
    path = "/projects/{id}/archive",
    tag = "projects",
    params(("id" = Uuid, Path, description = "The project's id")),
    responses(
        (status = 200, description = "The archived project", body = Project),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not a maintainer of the project", body = ErrorBody),
        (status = 404, description = "No such project, or not one of the caller's", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn archive(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<Project>, ApiError> {
    let access = access::project(&state, &caller, id, None).await?;
    access.require(Role::Maintainer, "archive the project")?;
    let project = super::execute(&state, &caller, id, |at| ProjectCommand::Archive {
        by: caller.actor(),
        at,
    })
    .await?;
    Ok(Json(project))
}
