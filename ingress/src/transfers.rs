//! Presigned URLs for a node's transfers, signed at the moment it asks.
//!
//! A node asks right before each download or upload (and each part of a
//! multipart upload), so every URL it holds is fresh and short-lived, and a
//! `run_task` resent hours later carries none. The server answers only for
//! an attempt placed on the asking node that still holds it, and only for
//! an input or output its task names: the key is worked out here from the
//! task's spec, never taken from the node. An input is granted only when
//! its object was verified by a completed upload through the API, and the
//! node is given the verified size and SHA-256 to check. A completed upload
//! is checked at the store (its size, and its SHA-256 when the store keeps
//! one) before it is recorded as an artifact.
//!
//! Every body a node sends is bound to a SHA-256 in its URL, which the store
//! checks. A one-part upload names the file's SHA-256 at its start; a
//! multipart upload names each part's with its URL and the whole file's only
//! at completion, as the node hashes the parts and the whole in one pass
//! while it sends: the object the store assembles is exactly the bytes that
//! pass hashed, and it is recorded under that hash.

use chrono::Utc;
use domain::task::{Task, TaskCommand};
use domain::Actor;
use objects::uploads::{Uploads, VerifiedObject};
use objects::{ObjectStore, MAX_OBJECT_BYTES};
use protocol::{TransferGrant, TransferOp, TransferRequest, UploadedPart, MAX_UPLOAD_PARTS};
use store::{Store, StoreError};
use uuid::Uuid;

/// What a node is told when the server has no object store.
pub(crate) const NO_STORE: &str =
    "this server has no object store configured (start it with --s3-endpoint and --s3-bucket)";

/// Answers one request of node `node_id`.
pub(crate) async fn answer(
    store: &Store,
    objects: Option<&ObjectStore>,
    secrets_key: Option<&store::secrets::SecretsKey>,
    node_id: Uuid,
    request: TransferRequest,
) -> TransferGrant {
    let id = request.id;
    let result = match (&request.op, objects) {
        (TransferOp::Secrets, _) => {
            crate::secrets::grant(store, secrets_key, node_id, &request).await
        }
        (_, None) => Err(NO_STORE.to_string()),
        (_, Some(objects)) => grant(store, objects, node_id, request).await,
    };
    match result {
        Ok(grant) => TransferGrant { id, ..grant },
        // The session tells the refusal, within the node's notices.
        Err(error) => TransferGrant {
            id,
            error: Some(error),
            ..TransferGrant::default()
        },
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What a node is told when the object store failed for `what`: the
/// store's own error can name its internal address or credentials' owner,
/// so it goes to the server's log, not to the node or the task's events.
fn store_failed(what: &str, error: &objects::ObjectError) -> String {
    tracing::warn!(%error, what, "object store request failed");
    format!("{what}: the object store cannot be used now (the server's log says why); try again")
}

/// What a node is told when the database failed for `what`; the error
/// itself goes to the server's log.
pub(crate) fn database_failed(what: &str, error: &dyn std::fmt::Display) -> String {
    tracing::warn!(%error, what, "database request failed");
    format!("{what}: the server cannot read or write its records now; try again")
}

/// The task, when attempt `attempt` of it is placed on `node_id` and still
/// holds the node.
pub(crate) async fn live_attempt(
    store: &Store,
    node_id: Uuid,
    task_id: Uuid,
    attempt: u32,
) -> Result<Task, String> {
    let not_ours = || format!("attempt {attempt} of this task is not running on this node");
    let task = store
        .load::<Task>(&task_id.to_string())
        .await
        .map_err(|e| database_failed("the task", &e))?
        .map(|l| l.state)
        .ok_or_else(not_ours)?;
    if task.attempt == attempt && task.node_id == Some(node_id) && task.state.holds_node() {
        Ok(task)
    } else {
        Err(not_ours())
    }
}

async fn grant(
    store: &Store,
    objects: &ObjectStore,
    node_id: Uuid,
    request: TransferRequest,
) -> Result<TransferGrant, String> {
    let task = live_attempt(store, node_id, request.task_id, request.attempt).await?;
    let Some(spec) = task.spec.as_ref() else {
        return Err("the task has no spec".into());
    };
    let attempt = Attempt {
        store,
        objects,
        node_id,
        task_id: request.task_id,
        attempt: request.attempt,
        spec,
    };
    match request.op {
        // Answered by `answer`, before any store is needed.
        TransferOp::Secrets => Err("secrets are not a transfer".into()),
        TransferOp::Download { input } => attempt.download(&input).await,
        TransferOp::Upload {
            output,
            size,
            sha256,
            parts,
        } => {
            attempt
                .upload(&output, size, sha256.as_deref(), parts)
                .await
        }
        TransferOp::UploadPart {
            output,
            upload_id,
            part_number,
            sha256,
        } => {
            attempt
                .upload_part(&output, &upload_id, part_number, &sha256)
                .await
        }
        TransferOp::Complete {
            output,
            upload_id,
            parts,
            size,
            sha256,
        } => {
            let done = Completed {
                output: &output,
                key: &attempt.output_key(&output)?,
                size,
                sha256: &sha256,
            };
            attempt.complete(done, upload_id.as_deref(), &parts).await
        }
    }
}

/// The running attempt a node asks for, with what answering needs.
struct Attempt<'a> {
    store: &'a Store,
    objects: &'a ObjectStore,
    node_id: Uuid,
    task_id: Uuid,
    attempt: u32,
    spec: &'a domain::spec::TaskSpec,
}

impl Attempt<'_> {
    /// The store key of output `output`, which the task must name.
    fn output_key(&self, output: &str) -> Result<String, String> {
        self.spec
            .outputs
            .iter()
            .find(|o| o.name.as_str() == output)
            .map(|o| {
                objects::keys::task_output(
                    self.spec.project_id,
                    self.task_id,
                    self.attempt,
                    o.name.as_str(),
                )
            })
            .ok_or_else(|| format!("the task has no output named {output:?}"))
    }

    /// A URL to download input `input`, with the size and SHA-256 its
    /// upload was verified with.
    async fn download(&self, input: &str) -> Result<TransferGrant, String> {
        let Some(found) = self.spec.inputs.iter().find(|i| i.name.as_str() == input) else {
            return Err(format!("the task has no input named {input:?}"));
        };
        let object = found.object.as_str();
        let project_id = self.spec.project_id;
        let verified = verified_input(self.store, self.objects, project_id, input, object).await?;
        let key = objects::keys::project_object(project_id, object);
        let url = self
            .objects
            .presign_get(&key, None)
            .await
            .map_err(|e| store_failed(&format!("input {input}"), &e))?;
        Ok(TransferGrant {
            url: Some(url),
            size: Some(verified.size),
            sha256: Some(verified.sha256),
            blake3: verified.blake3,
            ..TransferGrant::default()
        })
    }

    /// A URL for a one-part upload of output `output`, or the id of a
    /// multipart upload whose parts are asked for one by one. A one-part
    /// upload needs the file's SHA-256 (`sha256`); a multipart upload may
    /// name it (the store keeps it with the object) or leave it to the
    /// completion.
    async fn upload(
        &self,
        output: &str,
        size: u64,
        sha256: Option<&str>,
        parts: u32,
    ) -> Result<TransferGrant, String> {
        let key = self.output_key(output)?;
        if sha256.is_some_and(|s| !is_sha256(s)) {
            return Err("sha256 must be 64 lower-case hex digits".into());
        }
        if size > MAX_OBJECT_BYTES {
            return Err(format!(
                "output {output} is larger than the store's limit of 5 TiB"
            ));
        }
        if !(1..=MAX_UPLOAD_PARTS).contains(&parts) {
            return Err(format!("an upload has 1 to {MAX_UPLOAD_PARTS} parts"));
        }
        let failed = |e: objects::ObjectError| store_failed(&format!("output {output}"), &e);
        if parts == 1 {
            let Some(sha256) = sha256 else {
                return Err(format!(
                    "output {output}: a one-part upload names the file's sha256 at its start"
                ));
            };
            let p = self
                .objects
                .presign_put(&key, Some(sha256))
                .await
                .map_err(failed)?;
            Ok(TransferGrant {
                url: Some(p.url),
                headers: p.headers,
                ..TransferGrant::default()
            })
        } else {
            let upload_id = self
                .objects
                .start_multipart(&key, sha256)
                .await
                .map_err(failed)?;
            Ok(TransferGrant {
                upload_id: Some(upload_id),
                ..TransferGrant::default()
            })
        }
    }

    /// A URL for part `part_number` of a multipart upload of `output`.
    async fn upload_part(
        &self,
        output: &str,
        upload_id: &str,
        part_number: u32,
        sha256: &str,
    ) -> Result<TransferGrant, String> {
        let key = self.output_key(output)?;
        if !is_sha256(sha256) {
            return Err("sha256 must be 64 lower-case hex digits".into());
        }
        let p = self
            .objects
            .presign_part(&key, upload_id, part_number, Some(sha256))
            .await
            .map_err(|e| store_failed(&format!("output {output}"), &e))?;
        Ok(TransferGrant {
            url: Some(p.url),
            headers: p.headers,
            ..TransferGrant::default()
        })
    }

    /// Checks a finished upload at the store and records it as an artifact
    /// of the attempt.
    async fn complete(
        &self,
        done: Completed<'_>,
        upload_id: Option<&str>,
        parts: &[UploadedPart],
    ) -> Result<TransferGrant, String> {
        if !is_sha256(done.sha256) {
            return Err("sha256 must be 64 lower-case hex digits".into());
        }
        done.check(self.objects, upload_id, parts).await?;
        let output = done.output;
        let at = Utc::now();
        let command = TaskCommand::RecordArtifact {
            node_id: self.node_id,
            attempt: self.attempt,
            name: output.to_string(),
            key: done.key.to_string(),
            size: done.size,
            sha256: done.sha256.to_string(),
            at,
        };
        let actor = Actor::Node(self.node_id.to_string());
        match self
            .store
            .execute::<Task>(&self.task_id.to_string(), command, &actor, at)
            .await
        {
            Ok(_) => Ok(TransferGrant::default()),
            Err(StoreError::Rejected(e)) => Err(format!("output {output}: {e}")),
            Err(e) => Err(database_failed(&format!("output {output}"), &e)),
        }
    }
}

/// Input `input`, object `object` of project `project_id`, when a task may
/// use it: the store holds the object its last completed upload verified.
/// The node checks what it downloads against the size and SHA-256 the
/// server verified, never against what the store says of itself.
async fn verified_input(
    store: &Store,
    objects: &ObjectStore,
    project_id: Uuid,
    input: &str,
    object: &str,
) -> Result<VerifiedObject, String> {
    let key = objects::keys::project_object(project_id, object);
    let verified = Uploads::new(store.pool().clone())
        .verified_object(project_id, object)
        .await
        .map_err(|e| database_failed(&format!("input {input}"), &e))?;
    let head = objects
        .head(&key)
        .await
        .map_err(|e| store_failed(&format!("input {input}"), &e))?
        .ok_or_else(|| {
            format!("input {input}: object {object:?} does not exist in the project's store")
        })?;
    let Some(verified) = verified else {
        return Err(format!(
            "input {input}: object {object:?} was never verified: no upload of it through the \
             API was completed (objects stored before uploads were verified need one too); \
             upload it and complete the upload"
        ));
    };
    if head.size != verified.size || head.sha256.as_deref() != Some(verified.sha256.as_str()) {
        return Err(format!(
            "input {input}: object {object:?} changed after it was verified (a later upload \
             of it was not completed); complete that upload or upload it again"
        ));
    }
    Ok(verified)
}

/// An upload the node says is complete.
struct Completed<'a> {
    output: &'a str,
    key: &'a str,
    size: u64,
    sha256: &'a str,
}

impl Completed<'_> {
    /// Completes a multipart upload, then checks the stored object's size
    /// and SHA-256; an object that does not match is deleted.
    async fn check(
        &self,
        objects: &ObjectStore,
        upload_id: Option<&str>,
        parts: &[UploadedPart],
    ) -> Result<(), String> {
        let output = self.output;
        let mut completion = Ok(());
        if let Some(upload_id) = upload_id {
            let parts: Vec<_> = parts
                .iter()
                .map(|p| (p.part_number, p.etag.clone()))
                .collect();
            completion = objects
                .complete_multipart(self.key, upload_id, &parts)
                .await
                .map_err(|e| store_failed(&format!("output {output}: completing the upload"), &e));
        }
        // A completion sent again after a lost answer finds the upload
        // gone but the object there: the object decides.
        let info = match objects.head(self.key).await {
            Ok(Some(info)) => info,
            Ok(None) => {
                completion?;
                return Err(format!("output {output}: the store does not hold it"));
            }
            Err(e) => return Err(store_failed(&format!("output {output}"), &e)),
        };
        let sha_ok = info.sha256.as_deref().is_none_or(|s| s == self.sha256);
        if info.size == self.size && sha_ok {
            return Ok(());
        }
        if let Err(e) = objects.delete(self.key).await {
            tracing::warn!(key = self.key, error = %e, "could not delete a mismatched object");
        }
        Err(format!(
            "output {output}: the store holds {} bytes with SHA-256 {}, the node sent {} bytes with SHA-256 {}; the object was deleted",
            info.size,
            info.sha256.as_deref().unwrap_or("unknown"),
            self.size,
            self.sha256
        ))
    }
}
