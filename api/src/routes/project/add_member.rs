//! `POST /api/v1/projects/{id}/members`: add a member or change their role.

use axum::extract::State;
use axum::Json;
use domain::project::{ProjectCommand, Role};
use domain::user::User;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, Path};
use crate::schema::project::{AddMember, Project};
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(add_member))
}

/// Adds an existing user to the project with a role, or changes their
/// role. Maintainers and admins only.
#[utoipa::path(
    post,
    path = "/projects/{id}/members",
    tag = "projects",
    params(("id" = Uuid, Path, description = "The project's id")),
    request_body = AddMember,
    responses(
        (status = 200, description = "The project with its members", body = Project),
        (status = 400, description = "Malformed id or JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not a maintainer of the project", body = ErrorBody),
        (status = 404, description = "No such project, or no such user", body = ErrorBody),
        (status = 409, description = "Archived, or it would leave no maintainer", body = ErrorBody),
        (status = 422, description = "Invalid role", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    JsonBody(body): JsonBody<AddMember>,
) -> Result<Json<Project>, ApiError> {
    let role = Role::parse(body.role.trim())
        .ok_or_else(|| ApiError::invalid("role", "must be one of maintainer, member or viewer"))?;
    let access = access::project(&state, &caller, id, None).await?;
    access.require(Role::Maintainer, "manage members")?;
    let exists = state
        .store()
        .load::<User>(&body.user)
        .await?
        .is_some_and(|u| u.state.exists());
    if !exists {
        return Err(ApiError::not_found_field(
            "user",
            format!("there is no user named {:?}", body.user),
        ));
    }
    let project = super::execute(&state, &caller, id, |at| ProjectCommand::AddMember {
        user: body.user,
        role,
        by: caller.actor(),
        at,
    })
    .await?;
    Ok(Json(project))
}
