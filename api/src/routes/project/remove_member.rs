//! `DELETE /api/v1/projects/{id}/members/{user}`: remove a member.

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
    OpenApiRouter::new().routes(routes!(remove_member))
}

/// Removes a member. Maintainers and admins may remove anybody; any member
/// may leave. The last maintainer cannot leave. Members can be removed
/// from an archived project too, so that archiving never leaves someone with
/// access nobody can take back.
#[utoipa::path(
    delete,
    path = "/projects/{id}/members/{user}",
    tag = "projects",
    params(
        ("id" = Uuid, Path, description = "The project's id"),
        ("user" = String, Path, description = "The member's name")
    ),
    responses(
        (status = 200, description = "The project with its members", body = Project),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not a maintainer of the project", body = ErrorBody),
        (status = 404, description = "No such project, or the user is not a member", body = ErrorBody),
        (status = 409, description = "The last maintainer", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, user)): Path<(Uuid, String)>,
) -> Result<Json<Project>, ApiError> {
    let access = access::project(&state, &caller, id, None).await?;
    if user != caller.user {
        access.require(Role::Maintainer, "remove other members")?;
    }
    let project = super::execute(&state, &caller, id, |at| ProjectCommand::RemoveMember {
        user,
        by: caller.actor(),
        at,
    })
    .await?;
    Ok(Json(project))
}
