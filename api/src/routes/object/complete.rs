//! `POST /api/v1/projects/{id}/objects/complete`: ends an upload. The server
//! assembles a multipart upload, reads the stored object back and checks it
//! against the size and SHA-256 the upload declared; only then may tasks
//! use it.

use axum::extract::State;
use axum::Json;
use domain::project::Role;
use domain::spec::ObjectName;
use objects::uploads::{
    Completion, Method, Mismatch, State as UploadState, Upload, UploadError, Uploads,
};
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
    size: Option<u64>,
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
        problems.push(Problem::field(
            "upload_id",
            "is required: the upload_id the upload answered",
        ));
    }
    let size = match body.size {
        None => None,
        Some(s) if s >= 0 => Some(s as u64),
        Some(_) => {
            problems.push(Problem::field(
                "size",
                "must be the object's size in bytes, as the upload declared it",
            ));
            None
        }
    };
    let mut parts = Vec::new();
    match body.parts {
        None => {}
        Some(list) if list.len() <= objects::MAX_PARTS as usize => {
            for (i, p) in list.into_iter().enumerate() {
                match (p.part_number, p.etag) {
                    (Some(n), Some(etag)) if n >= 1 && !etag.is_empty() => parts.push((n, etag)),
                    _ => problems.push(Problem::field(
                        format!("parts[{i}]"),
                        "must have a part_number from 1 and the etag its upload answered",
                    )),
                }
            }
        }
        Some(_) => problems.push(Problem::field(
            "parts",
            "must list every uploaded part in order (1 to 10000)",
        )),
    }
    match (name, upload_id) {
        (Some(name), Some(upload_id)) if problems.is_empty() => Ok(Wanted {
            name,
            upload_id,
            size,
            parts,
        }),
        _ => Err(ApiError::Invalid(problems)),
    }
}

/// Completes an upload started with `POST /api/v1/projects/{id}/objects`,
/// a single PUT or a multipart upload alike. The store assembles the parts
/// of a multipart upload; then the server reads the stored object back and
/// compares it with the size and SHA-256 the upload declared. A match makes
/// the object usable as a task input; a mismatch deletes it and answers 422
/// naming what did not match. Completing a completed upload again answers
/// the same object. An upload not completed before its URLs expired, plus a
/// grace, was aborted and cannot be completed (409).
#[utoipa::path(
    post,
    path = "/projects/{id}/objects/complete",
    tag = "objects",
    params(("id" = Uuid, Path, description = "The project's id")),
    request_body = CompleteUpload,
    responses(
        (status = 200, description = "Stored and verified", body = StoredObject),
        (status = 400, description = "Malformed id or JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A viewer of the project", body = ErrorBody),
        (status = 404, description = "No such project, or not one of the caller's; or no such upload in the project", body = ErrorBody),
        (status = 409, description = "No object store configured; the project is archived; the upload was aborted or refused before, is being completed, or its bytes have not arrived", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid fields; the store refused the parts; or the stored object does not match the declared size or SHA-256 (it was deleted)", body = ErrorBody),
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
    if access.project.archived {
        return Err(ApiError::conflict(
            "the project is archived and takes no uploads",
        ));
    }
    let objects = state.objects()?.clone();
    let uploads = Uploads::new(state.pool().clone());
    let upload = uploads
        .find(id, &wanted.upload_id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::not_found_field(
                "upload_id",
                format!("the project has no upload {:?}", wanted.upload_id),
            )
        })?;
    check_matches(&upload, &wanted)?;
    // The outcome is recorded even if the client goes away meanwhile.
    let parts = wanted.parts;
    let work = upload.clone();
    let done = tokio::spawn(async move { uploads.complete(&objects, &work, &parts).await })
        .await
        .map_err(|e| ApiError::internal(format!("completing an upload: {e}")))?;
    match done {
        Ok(completion) => answer(&upload, completion),
        Err(UploadError::Store(e)) => Err(ApiError::object_store(e)),
        Err(e @ UploadError::ClaimLost(_)) => Err(ApiError::Unavailable(format!("{e}; try again"))),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// Refuses, as a conflict with the upload, a completion that does not
/// name it as it was started or lists its parts out of order.
fn check_matches(upload: &Upload, wanted: &Wanted) -> Result<(), ApiError> {
    if upload.name != wanted.name.as_str() {
        return Err(ApiError::Conflict(Problem::field(
            "name",
            format!(
                "upload {:?} is of object {:?}, not {:?}",
                upload.upload_id,
                upload.name,
                wanted.name.as_str()
            ),
        )));
    }
    if let Some(size) = wanted.size.filter(|s| *s != upload.size) {
        return Err(ApiError::Conflict(Problem::field(
            "size",
            format!("the upload declared {} bytes, not {size}", upload.size),
        )));
    }
    if upload.method == Method::Put && !wanted.parts.is_empty() {
        return Err(ApiError::Conflict(Problem::field(
            "parts",
            "this upload is a single PUT and has no parts",
        )));
    }
    if let Some((i, (n, _))) = wanted
        .parts
        .iter()
        .enumerate()
        .find(|(i, (n, _))| *n as usize != i + 1)
    {
        return Err(ApiError::Conflict(Problem::field(
            format!("parts[{i}]"),
            format!(
                "the upload's part {} comes here, not part {n}: list every part in order",
                i + 1
            ),
        )));
    }
    Ok(())
}

fn answer(upload: &Upload, completion: Completion) -> Result<Json<StoredObject>, ApiError> {
    let stored = |size, sha256| {
        Ok(Json(StoredObject {
            name: upload.name.clone(),
            size,
            sha256,
        }))
    };
    match completion {
        Completion::Verified(v) => stored(v.size, v.sha256),
        Completion::Mismatch(m) => Err(mismatch(&m)),
        Completion::NothingUploaded => Err(ApiError::Conflict(Problem::field(
            "upload_id",
            "the store holds nothing of this upload yet: send the bytes to its URL, then complete it",
        ))),
        Completion::PartsRefused(reason) => Err(ApiError::invalid("parts", reason)),
        Completion::Busy => Err(ApiError::Conflict(Problem::field(
            "upload_id",
            "another completion of this upload is at work; try again shortly",
        ))),
        Completion::AlreadyEnded(ended) => {
            let detail = ended.detail.as_deref().unwrap_or("no reason recorded");
            let why = match ended.state {
                UploadState::Verified => return stored(ended.size, ended.sha256),
                UploadState::Rejected => format!("was refused ({detail})"),
                UploadState::Aborting | UploadState::Aborted => {
                    format!("was abandoned and aborted ({detail})")
                }
                UploadState::Pending | UploadState::Completing => "is still open".into(),
            };
            Err(ApiError::Conflict(Problem::field(
                "upload_id",
                format!(
                    "upload {:?} {why}; start a new upload",
                    ended.upload_id
                ),
            )))
        }
    }
}

/// 422 naming each of size and SHA-256 that did not match.
fn mismatch(m: &Mismatch) -> ApiError {
    let mut problems = Vec::new();
    if let Some((stored, declared)) = &m.size {
        problems.push(Problem::field(
            "size",
            format!(
                "the store holds {stored} bytes, not the declared {declared}; the object was deleted"
            ),
        ));
    }
    if let Some((stored, declared)) = &m.sha256 {
        problems.push(Problem::field(
            "sha256",
            format!(
                "the stored bytes have SHA-256 {stored}, not the declared {declared}; the object was deleted"
            ),
        ));
    }
    ApiError::Invalid(problems)
}
