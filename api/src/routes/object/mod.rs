//! Large files in a project's store: uploads through presigned URLs, each
//! ended by a completion that checks what the store holds.

pub mod complete;
pub mod upload;

use domain::spec::TaskSpec;
use objects::uploads::Uploads;
use utoipa_axum::router::OpenApiRouter;

use crate::error::{ApiError, Problem};
use crate::AppState;

/// Every object route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(upload::router())
        .merge(complete::router())
}

/// Refuses a task whose inputs name objects that are not verified objects
/// of its project (never uploaded, or uploaded without a completion that
/// found them intact): such a task could only fail on its node. One
/// query, whatever the number of inputs.
///
/// # Errors
/// 422 naming each such input; 500 when the database cannot be read.
pub async fn require_verified_inputs(state: &AppState, spec: &TaskSpec) -> Result<(), ApiError> {
    if spec.inputs.is_empty() || state.objects().is_err() {
        return Ok(());
    }
    let names: Vec<String> = spec
        .inputs
        .iter()
        .map(|i| i.object.as_str().to_string())
        .collect();
    let missing = Uploads::new(state.pool().clone())
        .unverified(spec.project_id, &names)
        .await
        .map_err(ApiError::internal)?;
    if missing.is_empty() {
        return Ok(());
    }
    // A conflict with the project's store as it is, named by the first
    // such input.
    let problem = spec
        .inputs
        .iter()
        .enumerate()
        .find(|(_, i)| missing.contains(&i.object.as_str().to_string()))
        .map(|(n, i)| {
            Problem::field(
                format!("inputs[{n}].object"),
                format!(
                    "object {:?} is not a verified object of the project: upload it through \
                     POST /api/v1/projects/{}/objects and complete the upload first",
                    i.object.as_str(),
                    spec.project_id
                ),
            )
        });
    match problem {
        Some(problem) => Err(ApiError::Conflict(problem)),
        None => Ok(()),
    }
}
