//! Large files: uploads into a project's store and a task's stored outputs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The body of `POST /api/v1/projects/{id}/objects`: an object to upload.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUpload {
    /// The object's name in the project's store, a relative path such as
    /// `datasets/train.tar`; tasks name it as an input's `object`.
    #[schema(example = "datasets/train.tar", value_type = String, required = true, max_length = 512, pattern = "^(?:\\.(?:/(?:\\.|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+))?)*/(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+)(?:/(?:\\.|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+))?)*|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+)(?:/(?:\\.|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+))?)*)$")]
    pub name: Option<String>,
    /// Its size in bytes, at most 5 TiB.
    #[schema(value_type = i64, required = true, minimum = 0, maximum = 5497558138880_i64)]
    pub size: Option<i64>,
    /// Its SHA-256, 64 hex digits: the store refuses a single upload whose
    /// body does not match, the completion checks the stored object against
    /// it, and every download is checked against it.
    #[schema(value_type = String, required = true, pattern = "^[0-9a-fA-F]{64}$")]
    pub sha256: Option<String>,
}

/// Where to send an object's bytes: one presigned PUT, or one per part.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Upload {
    /// The object's normalised name.
    pub name: String,
    /// `put` (send the whole file to `url`) or `multipart` (send each part
    /// to its URL, then complete the upload).
    #[schema(example = "put")]
    pub method: String,
    /// With `put`: the presigned URL.
    pub url: Option<String>,
    /// Headers to send with every PUT, unchanged (they are signed).
    pub headers: BTreeMap<String, String>,
    /// The upload's id, to name in the completion (every upload ends with
    /// one). With `multipart` it is also the store's id of the upload.
    pub upload_id: Option<String>,
    /// With `multipart`: bytes per part (the last may be shorter).
    pub part_size: Option<u64>,
    /// With `multipart`: one presigned URL per part, in order.
    pub parts: Vec<PartUrl>,
    /// Seconds the URLs stay valid. An upload not completed by then, plus
    /// the server's grace, is aborted.
    pub expires_in_s: u32,
}

/// A presigned URL for one part of a multipart upload.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PartUrl {
    /// From 1.
    pub part_number: u32,
    /// Where to PUT the part's bytes.
    pub url: String,
}

/// The body of `POST /api/v1/projects/{id}/objects/complete`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteUpload {
    /// The object's name, as in the upload.
    #[schema(value_type = String, required = true, max_length = 512, pattern = "^(?:\\.(?:/(?:\\.|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+))?)*/(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+)(?:/(?:\\.|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+))?)*|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+)(?:/(?:\\.|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+))?)*)$")]
    pub name: Option<String>,
    /// The upload's id, as the upload answered it.
    #[schema(value_type = String, required = true, min_length = 1, max_length = 1024)]
    pub upload_id: Option<String>,
    /// Optional: the object's size, which must be the one the upload
    /// declared.
    #[schema(minimum = 0)]
    pub size: Option<i64>,
    /// With `multipart`: every part in order, with the `ETag` header the
    /// store answered. Left out for a single PUT.
    #[schema(max_items = 10000)]
    pub parts: Option<Vec<CompletedPart>>,
}

/// A part the store took.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletedPart {
    /// From 1: the part's place in the list.
    #[schema(value_type = u32, required = true, minimum = 1)]
    pub part_number: Option<u32>,
    /// The `ETag` header of the part's PUT answer.
    #[schema(value_type = String, required = true, min_length = 1)]
    pub etag: Option<String>,
}

/// An object the store holds, read back and found to be what its upload
/// declared: tasks may use it as an input.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StoredObject {
    /// Its name in the project's store.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Its SHA-256, lower-case hex.
    pub sha256: String,
}

/// A stored output of a task.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ArtifactItem {
    /// The artifact's id.
    pub id: Uuid,
    /// The attempt that produced it.
    pub attempt: u32,
    /// The output's name.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Hex SHA-256 of the content, checked at the store when it was
    /// uploaded.
    pub sha256: String,
    /// Where to download it: answers with a redirect to a presigned URL.
    #[schema(example = "/api/v1/artifacts/6f1c…/download")]
    pub download: String,
}

/// A page of a task's stored outputs, oldest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ArtifactList {
    /// The outputs of every attempt.
    pub items: Vec<ArtifactItem>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}
