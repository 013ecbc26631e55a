//! `DELETE /api/v1/projects/{id}/secrets/{name}`: delete a project secret
//! and its value. Maintainers only; tasks already running keep what they
//! were given, new ones naming it are refused.

use axum::extract::State;
use axum::http::StatusCode;
use domain::project::{ProjectCommand, Role};
use domain::Name;
use store::secrets;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::access;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(delete_secret))
}

/// Deletes the secret `name` of the project. Maintainers only.
#[utoipa::path(
    delete,
    path = "/projects/{id}/secrets/{name}",
    tag = "projects",
    params(
        ("id" = Uuid, Path, description = "The project's id"),
        ("name" = String, Path, description = "The secret's name", pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not a maintainer of the project", body = ErrorBody),
        (status = 404, description = "No such project or secret", body = ErrorBody),
        (status = 422, description = "A bad name", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn delete_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, name)): Path<(Uuid, String)>,
) -> Result<StatusCode, ApiError> {
    let access = access::project(&state, &caller, id, None).await?;
    access.require(Role::Maintainer, "delete secrets")?;
    let name = Name::parse(&name).map_err(|e| ApiError::invalid("name", e.to_string()))?;
    let Some(replaced) = access.project.secret(&name).and_then(|s| s.value_id) else {
        return Err(ApiError::not_found_field(
            "name",
            format!("the project has no secret {name}"),
        ));
    };
    super::execute(&state, &caller, id, |at| ProjectCommand::DeleteSecret {
        name: name.to_string(),
        by: caller.actor(),
        at,
    })
    .await?;
    if let Err(e) =
        secrets::remove_old_values(state.pool(), id, name.as_str(), Some(replaced), None).await
    {
        tracing::warn!(project = %id, secret = %name, error = %e, "could not remove the deleted secret's value; the next set or delete retries");
    }
    Ok(StatusCode::NO_CONTENT)
}
