//! `POST /api/v1/projects/{id}/objects`: presigned URLs to upload one
//! object into the project's store, straight to the store. Each upload is
//! recorded with what it declared, to be checked at its completion.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use domain::project::Role;
use domain::spec::ObjectName;
use objects::uploads::{NewUpload, Uploads};
use objects::{MAX_OBJECT_BYTES, MAX_PARTS};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, Problem};
use crate::extract::{JsonBody, Path};
use crate::schema::object::{CreateUpload, PartUrl, Upload};
use crate::{access, AppState};

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(upload))
}

/// A validated upload request.
struct Wanted {
    name: ObjectName,
    size: u64,
    sha256: String,
}

fn validate(body: CreateUpload) -> Result<Wanted, ApiError> {
    let mut problems = Vec::new();
    let name = match body.name.as_deref().map(ObjectName::parse) {
        None => {
            problems.push(Problem::field("name", "is required"));
            None
        }
        Some(Err(reason)) => {
            problems.push(Problem::field("name", reason));
            None
        }
        Some(Ok(name)) => Some(name),
    };
    let size = match body.size {
        None => {
            problems.push(Problem::field("size", "is required"));
            None
        }
        Some(s) if s < 0 || s as u64 > MAX_OBJECT_BYTES => {
            problems.push(Problem::field(
                "size",
                format!("must be between 0 and {MAX_OBJECT_BYTES} bytes (5 TiB), got {s}"),
            ));
            None
        }
        Some(s) => Some(s as u64),
    };
    let sha256 = match body.sha256 {
        None => {
            problems.push(Problem::field(
                "sha256",
                "is required: the SHA-256 of the file, as `sha256sum` prints it",
            ));
            None
        }
        Some(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(s.to_ascii_lowercase())
        }
        Some(_) => {
            problems.push(Problem::field("sha256", "must be 64 hexadecimal digits"));
            None
        }
    };
    match (name, size, sha256) {
        (Some(name), Some(size), Some(sha256)) if problems.is_empty() => {
            Ok(Wanted { name, size, sha256 })
        }
        _ => Err(ApiError::Invalid(problems)),
    }
}

/// The part size for `size` bytes: `preferred`, or more when the object
/// would need more parts than S3 allows.
fn part_size(size: u64, preferred: u64) -> u64 {
    let mib = 1024 * 1024;
    preferred.max(size.div_ceil(u64::from(MAX_PARTS)).div_ceil(mib) * mib)
}

/// Presigned URLs to upload an object into the project's store. Up to the
/// part size (64 MiB) it is one PUT of the whole file, which the store
/// refuses unless its SHA-256 matches; larger files are sent in parts, each
/// to its own URL. Either way the upload ends with
/// `POST /api/v1/projects/{id}/objects/complete` naming its `upload_id`: the
/// server reads the stored object back and checks its size and SHA-256, and
/// only then may tasks use it. The URLs are valid for a short time, for this
/// one object only; an upload not completed by then (plus a grace) is
/// aborted. Members and maintainers may upload; an object of the same name
/// is replaced.
#[utoipa::path(
    post,
    path = "/projects/{id}/objects",
    tag = "objects",
    params(("id" = Uuid, Path, description = "The project's id")),
    request_body = CreateUpload,
    responses(
        (status = 201, description = "Where to send the bytes", body = Upload),
        (status = 400, description = "Malformed id or JSON", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A viewer of the project", body = ErrorBody),
        (status = 404, description = "No such project, or not one of the caller's", body = ErrorBody),
        (status = 409, description = "No object store configured, or the project is archived", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid fields, each named", body = ErrorBody),
        (status = 503, description = "The object store cannot be reached", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    JsonBody(body): JsonBody<CreateUpload>,
) -> Result<(StatusCode, Json<Upload>), ApiError> {
    let wanted = validate(body)?;
    let access = access::project(&state, &caller, id, None).await?;
    access.require(Role::Member, "upload objects")?;
    if access.project.archived {
        return Err(ApiError::conflict(
            "the project is archived and takes no new objects",
        ));
    }
    let objects = state.objects()?;
    let key = objects::keys::project_object(id, wanted.name.as_str());
    let unavailable = |e: objects::ObjectError| ApiError::object_store(e);
    let part = part_size(wanted.size, state.part_bytes());
    let ttl = objects.url_ttl_secs();
    // Signed now, the URLs expire then: the sweeper counts from here.
    let started_at = Utc::now();
    let record = NewUpload {
        project_id: id,
        name: wanted.name.to_string(),
        size: wanted.size,
        sha256: wanted.sha256.clone(),
        multipart_id: None,
        started_by: caller.actor().to_string(),
        started_at,
        expires_at: started_at + chrono::Duration::seconds(i64::from(ttl)),
    };
    let uploads = Uploads::new(state.pool().clone());
    let answer = if wanted.size <= part {
        let p = objects
            .presign_put(&key, Some(&wanted.sha256))
            .await
            .map_err(unavailable)?;
        let recorded = uploads.start(record).await.map_err(ApiError::internal)?;
        Upload {
            name: wanted.name.to_string(),
            method: "put".into(),
            url: Some(p.url),
            headers: p.headers,
            upload_id: Some(recorded.upload_id),
            part_size: None,
            parts: Vec::new(),
            expires_in_s: ttl,
        }
    } else {
        let upload_id = objects
            .start_multipart(&key, Some(&wanted.sha256))
            .await
            .map_err(unavailable)?;
        let recorded = NewUpload {
            multipart_id: Some(upload_id.clone()),
            ..record
        };
        if let Err(e) = uploads.start(recorded).await {
            // Unrecorded, nobody could complete it and no sweeper would
            // find it: drop it now.
            if let Err(abort) = objects.abort_multipart(&key, &upload_id).await {
                tracing::warn!(%key, error = %abort, "cannot abort an unrecorded upload");
            }
            return Err(ApiError::internal(e));
        }
        let count = wanted.size.div_ceil(part) as u32;
        let mut parts = Vec::with_capacity(count as usize);
        for n in 1..=count {
            let p = objects
                .presign_part(&key, &upload_id, n, None)
                .await
                .map_err(unavailable)?;
            parts.push(PartUrl {
                part_number: n,
                url: p.url,
            });
        }
        Upload {
            name: wanted.name.to_string(),
            method: "multipart".into(),
            url: None,
            headers: Default::default(),
            upload_id: Some(upload_id),
            part_size: Some(part),
            parts,
            expires_in_s: ttl,
        }
    };
    Ok((StatusCode::CREATED, Json(answer)))
}
