//! `POST /api/v1/projects`: create a project; its creator becomes its
//! maintainer. Only admins may, unless the server lets every user
//! (`--users-create-projects`).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::Json;
use chrono::Utc;
use domain::project::{Project, ProjectCommand};
use domain::spec::validate_name;
use store::names;
use store::StoreError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::JsonBody;
use crate::schema::project::{self, CreateProject};
use crate::AppState;

/// The longest description accepted.
pub const MAX_DESCRIPTION: usize = 4096;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create))
}

/// Creates a project. Only admins may, unless the server was started with
/// `--users-create-projects`. Its name is claimed before the first event so that
/// two projects never share a name, and released if creation is refused.
#[utoipa::path(
    post,
    path = "/projects",
    tag = "projects",
    request_body = CreateProject,
    responses(
        (status = 201, description = "Created", body = project::Project),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Only admins may create projects on this server", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid name or description", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateProject>,
) -> Result<
    (
        StatusCode,
        [(header::HeaderName, String); 1],
        Json<project::Project>,
    ),
    ApiError,
> {
    if !state.config().users_create_projects {
        caller.require_admin("create projects on this server")?;
    }
    validate_name(&body.name).map_err(|reason| ApiError::invalid("name", reason))?;
    let description = body.description.unwrap_or_default();
    if description.len() > MAX_DESCRIPTION || description.contains('\0') {
        return Err(ApiError::invalid(
            "description",
            format!("must be at most {MAX_DESCRIPTION} bytes without NUL characters"),
        ));
    }
    let id = Uuid::now_v7();
    let key = id.to_string();
    names::claim(state.pool(), "project", &body.name, &key).await?;
    let now = Utc::now();
    let command = ProjectCommand::Create {
        project_id: id,
        name: body.name.clone(),
        description,
        owner: caller.user.clone(),
        at: now,
    };
    let executed = match state
        .store()
        .execute::<Project>(&key, command, &caller.actor(), now)
        .await
    {
        Ok(executed) => executed,
        Err(e) => {
            if matches!(e, StoreError::Rejected(_)) {
                if let Err(release) =
                    names::release(state.pool(), "project", &body.name, &key).await
                {
                    tracing::warn!(error = %release, "releasing a refused project's name failed");
                }
            }
            return Err(e.into());
        }
    };
    let location = format!("{}/projects/{id}", crate::routes::API_PREFIX);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(executed.state.try_into()?),
    ))
}
