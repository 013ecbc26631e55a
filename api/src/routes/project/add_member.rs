//! `POST /api/v1/projects/{id}/members`: add a member or change their role.

use axum::extract::State;
use axum::Json;
use domain::project::{ProjectCommand, ProjectError, Role};
use domain::spec::validate_name;
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
///
/// The user must exist. So that nobody can use this route to find out
/// which user names exist beyond what adding members needs, a caller who
/// is not an admin gets one answer for "there is no such user" and for "you
/// may not add members here": 404 on field `user`, "no user named X can be
/// added to this project …", whichever it is. A project the caller cannot
/// see answers 404 for the project, and an archived project 409, before any
/// user is looked up. Admins get the precise answer. A maintainer does learn
/// that a user exists by adding them, which is what the route is for.
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
        (status = 404, description = "No such project; or no such user, or not a maintainer of the project (one answer)", body = ErrorBody),
        (status = 409, description = "Archived, or it would leave no maintainer", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid role or user name", body = ErrorBody)
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
    validate_name(&body.user).map_err(|reason| ApiError::invalid("user", reason))?;
    let cannot_add = || {
        ApiError::not_found_field(
            "user",
            format!(
                "no user named {:?} can be added to this project (the user must exist and \
                 only maintainers may add members)",
                body.user
            ),
        )
    };
    let access = access::project(&state, &caller, id, None).await?;
    if !caller.admin && access.role != Some(Role::Maintainer) {
        return Err(cannot_add());
    }
    if access.project.archived {
        return Err(ApiError::conflict(ProjectError::Archived.to_string()));
    }
    let exists = state
        .store()
        .load::<User>(&body.user)
        .await?
        .is_some_and(|u| u.state.exists());
    if !exists {
        return Err(if caller.admin {
            ApiError::not_found_field("user", format!("there is no user named {:?}", body.user))
        } else {
            cannot_add()
        });
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
