//! `POST /api/v1/projects/{id}/objects/complete`: assembles a multipart
//! upload and checks what the store holds.

use axum::extract::State;
use axum::Json;
use domain::project::Role;
use domain::spec::ObjectName;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, Problem};
use crate::extract::{JsonBody, Path};
use crate::schema::object::{CompleteUpload, StoredObject};
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(complete))
}

struct Wanted {
    name: ObjectName,
    upload_id: String,
    size: u64,
    parts: Vec<(u32, String)>,
}

fn validate(body: CompleteUpload) -> Result<Wanted, ApiError> {
    let mut problems = Vec::new();
    let name = match body.name.as_deref().map(ObjectName::parse) {
        Some(Ok(n)) => Some(n),
        Some(Err(reason)) => {
            problems.push(Problem::field("name", reason));
            None
        }
        None => {
            problems.push(Problem::field("name", "is required"));
            None
        }
    };
    let upload_id = body.upload_id.filter(|u| !u.is_empty() && u.len() <= 1024);
    if upload_id.is_none() {
        problems.push(Problem::field("upload_id", "is required"));
    }
    let size = match body.size {
        Some(s) if s >= 0 => Some(s as u64),
        _ => {
            problems.push(Problem::field(
                "size",
                "is required: the object's size in bytes",
            ));
            None
        }
    };
    let mut parts = Vec::new();
    match body.parts {
        Some(list) if !list.is_empty() && list.len() <= objects::MAX_PARTS as usize => {
            for (i, p) in list.into_iter().enumerate() {
                match (p.part_number, p.etag) {
                    (Some(n), Some(etag)) if n as usize == i + 1 && !etag.is_empty() => {
                        parts.push((n, etag))
                    }
                    _ => problems.push(Problem::field(
                        format!("parts[{i}]"),
                        format!(
                            "must be part_number {} with the etag its upload answered",
                            i + 1
                        ),
                    )),
                }
            }
        }
        _ => problems.push(Problem::field(
            "parts",
            "must list every uploaded part in order (1 to 10000)",
        )),
    }
    match (name, upload_id, size) {
        (Some(name), Some(upload_id), Some(size)) if problems.is_empty() => Ok(Wanted {
            name,
            upload_id,
            size,
            parts,
        }),
        _ => Err(ApiError::Invalid(problems)),
    }
}

/// Completes a multipart upload started with
/// `POST /api/v1/projects/{id}/objects`. The store assembles the parts in
/// order; an object whose size is not the one announced is deleted and
/// refused.
#[utoipa::path(
    post,
    path = "/projects/{id}/objects/complete",
    tag = "objects",
    params(("id" = Uuid, Path, description = "The project's id")),
    request_body = CompleteUpload,
    responses(
        (status = 200, description = "Stored", body = StoredObject),
        (status = 400, description = "Malformed id or JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A viewer of the project", body = ErrorBody),
        (status = 404, description = "No such project, or not one of the caller's", body = ErrorBody),
        (status = 409, description = "No object store configured", body = ErrorBody),
        (status = 422, description = "Invalid fields, or the store refused the parts", body = ErrorBody),
        (status = 503, description = "The object store cannot be reached", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn complete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    JsonBody(body): JsonBody<CompleteUpload>,
) -> Result<Json<StoredObject>, ApiError> {
    let wanted = validate(body)?;
    let access = access::project(&state, &caller, id, None).await?;
    access.require(Role::Member, "upload objects")?;
    let objects = state.objects()?;
    let key = objects::keys::project_object(id, wanted.name.as_str());
    objects
        .complete_multipart(&key, &wanted.upload_id, &wanted.parts)
        .await
        .map_err(|e| ApiError::invalid("parts", e.to_string()))?;
    let info = objects
        .head(&key)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .ok_or_else(|| ApiError::invalid("parts", "the store holds no object after completing"))?;
    if info.size != wanted.size {
        if let Err(e) = objects.delete(&key).await {
            tracing::warn!(%key, error = %e, "could not delete a short object");
        }
        return Err(ApiError::invalid(
            "size",
            format!(
                "the parts add up to {} bytes, not {}; the object was deleted",
                info.size, wanted.size
            ),
        ));
    }
    Ok(Json(StoredObject {
        name: wanted.name.to_string(),
        size: info.size,
        sha256: info.sha256,
    }))
}
