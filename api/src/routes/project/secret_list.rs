//! `GET /api/v1/projects/{id}/secrets`: a project's secrets: names,
//! versions, who set them and when; never values.

use axum::extract::State;
use axum::Json;
use domain::project::Role;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::access;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Path;
use crate::schema::secret::SecretList;
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_secrets))
}

/// The project's secrets by name, without values. Any member may see
/// them, to name them in tasks.
#[utoipa::path(
    get,
    path = "/projects/{id}/secrets",
    tag = "projects",
    params(("id" = Uuid, Path, description = "The project's id")),
    responses(
        (status = 200, description = "The secrets", body = SecretList),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such project", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn list_secrets(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<SecretList>, ApiError> {
    let access = access::project(&state, &caller, id, None).await?;
    access.require(Role::Viewer, "see secrets")?;
    Ok(Json(SecretList::of(&access.project)))
}
