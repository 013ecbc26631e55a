//! `GET /api/v1/projects`: all projects for admins, the caller's own for
//! everybody else, from the project read model.

use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::schema::project::{Project, ProjectList};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// Projects the caller may see, by name.
#[utoipa::path(
    get,
    path = "/projects",
    tag = "projects",
    responses(
        (status = 200, description = "The projects", body = ProjectList),
        (status = 401, description = "No valid token", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<ProjectList>, ApiError> {
    let docs: Vec<serde_json::Value> = if caller.admin {
        sqlx::query_scalar("SELECT doc FROM project_view ORDER BY name, id")
            .fetch_all(state.pool())
            .await?
    } else {
        sqlx::query_scalar(
            "SELECT p.doc FROM project_view p \
             JOIN project_member_view m ON m.project_id = p.id \
             WHERE m.user_name = $1 ORDER BY p.name, p.id",
        )
        .bind(&caller.user)
        .fetch_all(state.pool())
        .await?
    };
    let items = docs
        .into_iter()
        .map(|doc| {
            let project: domain::project::Project = serde_json::from_value(doc).map_err(|e| {
                ApiError::internal(format!("project_view doc does not decode: {e}"))
            })?;
            Project::try_from(project)
        })
        .collect::<Result<_, _>>()?;
    Ok(Json(ProjectList { items }))
}
