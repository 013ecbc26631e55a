//! Uploads through the API hold their promise: the record of each upload,
//! its completion, and the sweeper of abandoned ones.
//!
//! A user declares an object's name, size and SHA-256, gets presigned URLs
//! and sends the bytes straight to the store; the server never sees them
//! pass. So every upload ends with a completion ([`Uploads::complete`]) in
//! which the server reads the stored object back from the store, in a
//! stream, and compares it with what was declared. Only then is the object
//! *verified* ([`Uploads::verified_object`]), and only verified objects are
//! handed to tasks as inputs. An object that does not match is deleted.
//!
//! The record lives in its own tables (`object_uploads`, `project_objects`),
//! not in the event log: an upload lives for minutes and most of its life is
//! coordination between the API, the store and the sweeper (claims and
//! leases), which would flood the log without telling anyone more than the
//! rows do.
//!
//! Concurrency is settled in the rows, never by a leader: a completion
//! claims its upload (`pending` → `completing`, with a lease it renews while
//! it reads), the [`Sweeper`] claims the expired ones it aborts (`aborting`,
//! picked with `FOR UPDATE SKIP LOCKED`), and every ending is written only
//! by the holder of the claim. Any number of replicas may sweep at once;
//! each upload is handled by one of them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::store::{ObjectError, ObjectStore, ReadBack};

/// How long a claim holds without renewal: a completion renews it while
/// it reads, so a crashed completion frees its upload this soon after.
pub const LEASE: Duration = Duration::from_secs(120);

/// How often a completion renews its lease while it works.
const RENEW_EVERY: Duration = Duration::from_secs(30);

/// How the bytes of an upload travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// One presigned PUT of the whole object.
    Put,
    /// A multipart upload: one presigned PUT per part, assembled by the
    /// store at completion.
    Multipart,
}

impl Method {
    /// The name stored and shown: `put` or `multipart`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Put => "put",
            Method::Multipart => "multipart",
        }
    }
}

/// Where an upload is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// URLs handed out; waiting for the completion.
    Pending,
    /// A completion is assembling or reading it back.
    Completing,
    /// The stored object matched the declaration.
    Verified,
    /// It did not; the object was deleted.
    Rejected,
    /// The sweeper is aborting it in the store.
    Aborting,
    /// Abandoned, and aborted in the store.
    Aborted,
}

impl State {
    fn parse(s: &str) -> Result<Self, UploadError> {
        Ok(match s {
            "pending" => State::Pending,
            "completing" => State::Completing,
            "verified" => State::Verified,
            "rejected" => State::Rejected,
            "aborting" => State::Aborting,
            "aborted" => State::Aborted,
            other => return Err(UploadError::Corrupt(format!("upload state {other:?}"))),
        })
    }

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Completing => "completing",
            State::Verified => "verified",
            State::Rejected => "rejected",
            State::Aborting => "aborting",
            State::Aborted => "aborted",
        }
    }
}

/// Why the record of uploads could not be used.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored row holds something this build cannot read.
    #[error("malformed upload record: {0}")]
    Corrupt(String),
    /// The object store failed; the upload is left as it was, to try again.
    #[error(transparent)]
    Store(#[from] ObjectError),
    /// The claim on the upload lapsed while it was being worked on (the
    /// database was out of reach for longer than [`LEASE`]); nothing was
    /// recorded, try again.
    #[error("upload {0} was taken over while it was being worked on")]
    ClaimLost(Uuid),
}

/// One upload started through the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The record's own id.
    pub id: Uuid,
    /// The project whose store it goes into.
    pub project_id: Uuid,
    /// The object's name in the project's store.
    pub name: String,
    /// The declared size in bytes.
    pub size: u64,
    /// The declared SHA-256, lower-case hex.
    pub sha256: String,
    /// How the bytes travel.
    pub method: Method,
    /// What the completion names: the store's multipart upload id, or the
    /// record's own id for a single PUT.
    pub upload_id: String,
    /// Who started it (`user:<name>`).
    pub started_by: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When its URLs expire.
    pub expires_at: DateTime<Utc>,
    /// Where it is now.
    pub state: State,
    /// When it ended (verified, rejected or aborted).
    pub finished_at: Option<DateTime<Utc>>,
    /// How it ended, in words.
    pub detail: Option<String>,
}

impl Upload {
    /// The object's key in the bucket.
    pub fn key(&self) -> String {
        crate::keys::project_object(self.project_id, &self.name)
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    project_id: Uuid,
    name: String,
    size: i64,
    sha256: String,
    method: String,
    upload_id: String,
    started_by: String,
    started_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    state: String,
    finished_at: Option<DateTime<Utc>>,
    detail: Option<String>,
}

const COLUMNS: &str = "id, project_id, name, size, sha256, method, upload_id, started_by, \
                       started_at, expires_at, state, finished_at, detail";

impl TryFrom<Row> for Upload {
    type Error = UploadError;

    fn try_from(r: Row) -> Result<Self, UploadError> {
        let method = match r.method.as_str() {
            "put" => Method::Put,
            "multipart" => Method::Multipart,
            other => return Err(UploadError::Corrupt(format!("upload method {other:?}"))),
        };
        Ok(Upload {
            id: r.id,
            project_id: r.project_id,
            name: r.name,
            size: u64::try_from(r.size)
                .map_err(|_| UploadError::Corrupt(format!("size {}", r.size)))?,
            sha256: r.sha256,
            method,
            upload_id: r.upload_id,
            started_by: r.started_by,
            started_at: r.started_at,
            expires_at: r.expires_at,
            state: State::parse(&r.state)?,
            finished_at: r.finished_at,
            detail: r.detail,
        })
    }
}

/// An upload about to be recorded.
#[derive(Debug, Clone)]
pub struct NewUpload {
    /// The project.
    pub project_id: Uuid,
    /// The object's (validated) name.
    pub name: String,
    /// The declared size.
    pub size: u64,
    /// The declared SHA-256, lower-case hex.
    pub sha256: String,
    /// `Some(store upload id)` for a multipart upload, `None` for a single
    /// PUT.
    pub multipart_id: Option<String>,
    /// Who starts it.
    pub started_by: String,
    /// Now.
    pub started_at: DateTime<Utc>,
    /// When the URLs handed out expire.
    pub expires_at: DateTime<Utc>,
}

/// An object a task may use: the last verified upload of its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedObject {
    /// Its name in the project's store.
    pub name: String,
    /// Bytes, as read back from the store.
    pub size: u64,
    /// SHA-256 of the bytes read back, lower-case hex.
    pub sha256: String,
    /// BLAKE3 of the same bytes, lower-case hex; `None` for objects
    /// verified before it was recorded.
    pub blake3: Option<String>,
    /// The upload that verified it.
    pub upload: Uuid,
    /// When.
    pub verified_at: DateTime<Utc>,
}

/// What the stored object turned out to be, against the declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// `(stored, declared)` when the sizes differ; the stored size is a
    /// lower bound ("more than") when reading stopped early.
    pub size: Option<(String, u64)>,
    /// `(stored, declared)` when the SHA-256 differ (only compared when
    /// the sizes agree).
    pub sha256: Option<(String, String)>,
}

impl Mismatch {
    /// The mismatch in words, as kept on the upload.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some((stored, declared)) = &self.size {
            parts.push(format!(
                "the store holds {stored} bytes, not the declared {declared}"
            ));
        }
        if let Some((stored, declared)) = &self.sha256 {
            parts.push(format!(
                "the stored bytes have SHA-256 {stored}, not the declared {declared}"
            ));
        }
        parts.join("; ")
    }
}

/// How a completion ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// The stored object is what was declared; tasks may use it now.
    Verified(VerifiedObject),
    /// It is not; it was deleted and the upload is `rejected`.
    Mismatch(Mismatch),
    /// The store holds nothing of this upload yet (a single PUT that has
    /// not arrived); the upload stays `pending`.
    NothingUploaded,
    /// The store would not assemble the parts (a missing part, a wrong
    /// ETag), or no parts were named; the upload stays `pending`.
    PartsRefused(String),
    /// Another completion of this upload is at work.
    Busy,
    /// The upload had ended before: `verified`, `rejected` or aborted.
    AlreadyEnded(Upload),
}

/// The record of uploads, on the server's database.
#[derive(Debug, Clone)]
pub struct Uploads {
    pool: PgPool,
}

impl Uploads {
    /// The record on `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Records a started upload, `pending`.
    ///
    /// # Errors
    /// [`UploadError::Database`]; also when the store's upload id is
    /// already recorded for the project.
    pub async fn start(&self, new: NewUpload) -> Result<Upload, UploadError> {
        let id = Uuid::now_v7();
        let (method, upload_id) = match new.multipart_id {
            Some(u) => (Method::Multipart, u),
            None => (Method::Put, id.to_string()),
        };
        let size = i64::try_from(new.size)
            .map_err(|_| UploadError::Corrupt(format!("size {}", new.size)))?;
        let row: Row = sqlx::query_as(&format!(
            "INSERT INTO object_uploads \
               (id, project_id, name, size, sha256, method, upload_id, started_by, \
                started_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(new.project_id)
        .bind(&new.name)
        .bind(size)
        .bind(&new.sha256)
        .bind(method.as_str())
        .bind(&upload_id)
        .bind(&new.started_by)
        .bind(new.started_at)
        .bind(new.expires_at)
        .fetch_one(&self.pool)
        .await?;
        row.try_into()
    }

    /// Upload `upload_id` (as the completion names it) of project
    /// `project_id`; `None` when that project has no such upload.
    ///
    /// # Errors
    /// [`UploadError::Database`], [`UploadError::Corrupt`].
    pub async fn find(
        &self,
        project_id: Uuid,
        upload_id: &str,
    ) -> Result<Option<Upload>, UploadError> {
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM object_uploads WHERE project_id = $1 AND upload_id = $2"
        ))
        .bind(project_id)
        .bind(upload_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(Upload::try_from).transpose()
    }

    /// The upload with record id `id`.
    ///
    /// # Errors
    /// [`UploadError::Database`], [`UploadError::Corrupt`].
    pub async fn get(&self, id: Uuid) -> Result<Option<Upload>, UploadError> {
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM object_uploads WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(Upload::try_from).transpose()
    }

    /// The verified object `name` of project `project_id`, if there is one.
    ///
    /// # Errors
    /// [`UploadError::Database`], [`UploadError::Corrupt`].
    pub async fn verified_object(
        &self,
        project_id: Uuid,
        name: &str,
    ) -> Result<Option<VerifiedObject>, UploadError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            size: i64,
            sha256: String,
            blake3: Option<String>,
            upload: Uuid,
            verified_at: DateTime<Utc>,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT size, sha256, blake3, upload, verified_at FROM project_objects \
             WHERE project_id = $1 AND name = $2",
        )
        .bind(project_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(VerifiedObject {
                name: name.to_string(),
                size: u64::try_from(r.size)
                    .map_err(|_| UploadError::Corrupt(format!("size {}", r.size)))?,
                sha256: r.sha256,
                blake3: r.blake3,
                upload: r.upload,
                verified_at: r.verified_at,
            })
        })
        .transpose()
    }

    /// Those of `names` that are not verified objects of project
    /// `project_id`, in the order given.
    ///
    /// # Errors
    /// [`UploadError::Database`].
    pub async fn unverified(
        &self,
        project_id: Uuid,
        names: &[String],
    ) -> Result<Vec<String>, UploadError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM project_objects WHERE project_id = $1 AND name = ANY($2)",
        )
        .bind(project_id)
        .bind(names)
        .fetch_all(&self.pool)
        .await?;
        Ok(names
            .iter()
            .filter(|n| !found.contains(n))
            .cloned()
            .collect())
    }

    /// Completes `upload`: assembles a multipart upload from `parts`, then
    /// reads the stored object back and compares its size and SHA-256
    /// with the declared ones. A match makes the object verified; a
    /// mismatch deletes it and rejects the upload.
    ///
    /// A multipart upload completed with no parts verifies the object
    /// already stored under the name, when it was stored declaring the same
    /// SHA-256 (an object kept from before uploads were verified), and drops
    /// the multipart upload.
    ///
    /// The work holds a claim on the upload, renewed while it reads, so a
    /// second completion at the same time answers [`Completion::Busy`] and
    /// the sweeper leaves it alone. Run it in a task of its own if the
    /// caller may go away: the outcome is recorded either way.
    ///
    /// # Errors
    /// [`UploadError::Store`] when the store fails (the upload stays
    /// `pending`, to try again), [`UploadError::Database`].
    pub async fn complete(
        &self,
        store: &ObjectStore,
        upload: &Upload,
        parts: &[(u32, String)],
    ) -> Result<Completion, UploadError> {
        if !matches!(upload.state, State::Pending | State::Completing) {
            return Ok(Completion::AlreadyEnded(upload.clone()));
        }
        let claim = Uuid::new_v4();
        if !self.claim(upload.id, claim).await? {
            return match self.get(upload.id).await? {
                Some(u) if matches!(u.state, State::Pending | State::Completing) => {
                    Ok(Completion::Busy)
                }
                Some(u) => Ok(Completion::AlreadyEnded(u)),
                None => Err(UploadError::Corrupt(format!(
                    "upload {} vanished",
                    upload.id
                ))),
            };
        }
        let work = Completer {
            uploads: self,
            store,
            upload,
            claim,
        };
        let result = tokio::select! {
            r = work.run(parts) => r,
            e = self.keep_claim(upload.id, claim) => Err(e),
        };
        match result {
            Ok(done) => Ok(done),
            Err(e) => {
                if let Err(release) = self.release(upload.id, claim).await {
                    tracing::warn!(upload = %upload.id, error = %release, "cannot release an upload");
                }
                Err(e)
            }
        }
    }

    async fn claim(&self, id: Uuid, claim: Uuid) -> Result<bool, UploadError> {
        let now = Utc::now();
        let done = sqlx::query(
            "UPDATE object_uploads SET state = 'completing', claim = $2, lease_until = $4 \
             WHERE id = $1 AND (state = 'pending' \
                                OR (state = 'completing' AND lease_until < $3))",
        )
        .bind(id)
        .bind(claim)
        .bind(now)
        .bind(now + lease())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Renews the claim until it is lost (then returns why) or the caller
    /// stops polling.
    async fn keep_claim(&self, id: Uuid, claim: Uuid) -> UploadError {
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            let renewed = sqlx::query(
                "UPDATE object_uploads SET lease_until = $3 \
                 WHERE id = $1 AND claim = $2 AND state = 'completing'",
            )
            .bind(id)
            .bind(claim)
            .bind(Utc::now() + lease())
            .execute(&self.pool)
            .await;
            match renewed {
                Ok(r) if r.rows_affected() == 1 => {}
                Ok(_) => return UploadError::ClaimLost(id),
                Err(e) => return e.into(),
            }
        }
    }

    /// Gives a claimed upload back, `pending`, to try again.
    async fn release(&self, id: Uuid, claim: Uuid) -> Result<(), UploadError> {
        sqlx::query(
            "UPDATE object_uploads SET state = 'pending', claim = NULL, lease_until = NULL \
             WHERE id = $1 AND claim = $2 AND state = 'completing'",
        )
        .bind(id)
        .bind(claim)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends a claimed upload verified and makes its object the verified
    /// one of its name.
    async fn verified(
        &self,
        upload: &Upload,
        claim: Uuid,
        size: u64,
        sha256: &str,
        blake3: &str,
    ) -> Result<VerifiedObject, UploadError> {
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE object_uploads SET state = 'verified', claim = NULL, lease_until = NULL, \
                    finished_at = $3, detail = 'the stored object matched its size and SHA-256' \
             WHERE id = $1 AND claim = $2 AND state = 'completing'",
        )
        .bind(upload.id)
        .bind(claim)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(UploadError::ClaimLost(upload.id));
        }
        let size_i = i64::try_from(size).map_err(|_| UploadError::Corrupt(format!("{size}")))?;
        sqlx::query(
            "INSERT INTO project_objects \
                (project_id, name, size, sha256, upload, verified_at, blake3) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (project_id, name) DO UPDATE SET size = $3, sha256 = $4, upload = $5, \
                verified_at = $6, blake3 = $7",
        )
        .bind(upload.project_id)
        .bind(&upload.name)
        .bind(size_i)
        .bind(sha256)
        .bind(upload.id)
        .bind(now)
        .bind(blake3)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(VerifiedObject {
            name: upload.name.clone(),
            size,
            sha256: sha256.to_string(),
            blake3: Some(blake3.to_string()),
            upload: upload.id,
            verified_at: now,
        })
    }

    /// Ends a claimed upload rejected; its name has no verified object any
    /// more (the object was deleted).
    async fn rejected(
        &self,
        upload: &Upload,
        claim: Uuid,
        detail: &str,
    ) -> Result<(), UploadError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE object_uploads SET state = 'rejected', claim = NULL, lease_until = NULL, \
                    finished_at = $3, detail = $4 \
             WHERE id = $1 AND claim = $2 AND state = 'completing'",
        )
        .bind(upload.id)
        .bind(claim)
        .bind(Utc::now())
        .bind(detail)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM project_objects WHERE project_id = $1 AND name = $2")
            .bind(upload.project_id)
            .bind(&upload.name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

fn lease() -> chrono::Duration {
    chrono::Duration::from_std(LEASE).unwrap_or(chrono::Duration::MAX)
}

/// One claimed completion at work.
struct Completer<'a> {
    uploads: &'a Uploads,
    store: &'a ObjectStore,
    upload: &'a Upload,
    claim: Uuid,
}

impl Completer<'_> {
    async fn run(&self, parts: &[(u32, String)]) -> Result<Completion, UploadError> {
        let upload = self.upload;
        let key = upload.key();
        let declared = Some(upload.sha256.as_str());
        if upload.method == Method::Multipart {
            let assembled = if parts.is_empty() {
                Err("must name every uploaded part in order, with the ETag each answered".into())
            } else {
                self.store
                    .complete_multipart(&key, &upload.upload_id, parts)
                    .await
                    .map_err(|e| format!("the store would not assemble the parts: {e}"))
            };
            if let Err(refused) = assembled {
                // An object already stored declaring this SHA-256 (by an
                // earlier try whose answer was lost, or from before uploads
                // were verified) is checked as it is.
                let head = self.store.head(&key).await?;
                if head.as_ref().and_then(|h| h.sha256.as_deref()) != declared {
                    return self
                        .back_to_pending(Completion::PartsRefused(refused))
                        .await;
                }
                // Checked in place: the multipart upload is not needed.
                if let Err(e) = self.store.abort_multipart(&key, &upload.upload_id).await {
                    tracing::warn!(upload = %upload.id, error = %e,
                        "cannot abort a multipart upload completed without parts");
                }
            }
        }
        let Some(head) = self.store.head(&key).await? else {
            return self.back_to_pending(Completion::NothingUploaded).await;
        };
        // Every upload URL stores the declared SHA-256 with the object: an
        // object declaring another one is not this upload's (a single PUT
        // that has not arrived), and must not be judged, let alone deleted.
        if head.sha256.as_deref() != declared {
            return self.back_to_pending(Completion::NothingUploaded).await;
        }
        let found = if head.size != upload.size {
            Mismatch {
                size: Some((head.size.to_string(), upload.size)),
                sha256: None,
            }
        } else {
            match self.store.read_back(&key, upload.size).await? {
                None => return self.back_to_pending(Completion::NothingUploaded).await,
                Some(ReadBack::Longer { than }) => Mismatch {
                    size: Some((format!("more than {than}"), upload.size)),
                    sha256: None,
                },
                Some(ReadBack::Whole { size, .. }) if size != upload.size => Mismatch {
                    size: Some((size.to_string(), upload.size)),
                    sha256: None,
                },
                Some(ReadBack::Whole {
                    size,
                    sha256,
                    blake3,
                }) if sha256 == upload.sha256 => {
                    let v = self
                        .uploads
                        .verified(upload, self.claim, size, &sha256, &blake3)
                        .await?;
                    tracing::info!(upload = %upload.id, %key, size, "upload verified");
                    return Ok(Completion::Verified(v));
                }
                Some(ReadBack::Whole { sha256, .. }) => Mismatch {
                    size: None,
                    sha256: Some((sha256, upload.sha256.clone())),
                },
            }
        };
        self.store.delete(&key).await?;
        let detail = format!("{}; the object was deleted", found.describe());
        self.uploads.rejected(upload, self.claim, &detail).await?;
        tracing::info!(upload = %upload.id, %key, %detail, "upload rejected");
        Ok(Completion::Mismatch(found))
    }

    async fn back_to_pending(&self, outcome: Completion) -> Result<Completion, UploadError> {
        self.uploads.release(self.upload.id, self.claim).await?;
        Ok(outcome)
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Uploads aborted.
    pub aborted: usize,
    /// Uploads the store would not abort now; tried again once their claim
    /// lapses.
    pub failed: usize,
}

/// Aborts uploads nobody completed: once their URLs expired and a grace
/// passed, a multipart upload is aborted in the store (its parts deleted)
/// and the upload ends `aborted`, so a late completion is refused.
#[derive(Debug, Clone)]
pub struct Sweeper {
    uploads: Uploads,
    store: ObjectStore,
    grace: Duration,
    batch: i64,
}

impl Sweeper {
    /// A sweeper of `pool`'s uploads in `store`, aborting uploads `grace`
    /// after their URLs expired.
    pub fn new(pool: PgPool, store: ObjectStore, grace: Duration) -> Self {
        Self {
            uploads: Uploads::new(pool),
            store,
            grace,
            batch: 100,
        }
    }

    /// Sweeps until `shutdown`, once every `every`.
    pub async fn run(&self, every: Duration, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            loop {
                match self.run_once(Utc::now()).await {
                    Ok(o) if o.aborted + o.failed == self.batch as usize => continue,
                    Ok(o) if o != SweepOutcome::default() => {
                        tracing::info!(?o, "abandoned uploads swept")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "sweeping abandoned uploads failed"),
                }
                break;
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One sweep as of `now`: claims up to a batch of uploads whose URLs
    /// expired more than the grace before `now` (and that no completion is
    /// working on), and aborts each.
    ///
    /// # Errors
    /// [`UploadError::Database`]; a store that refuses an abort is counted
    /// in [`SweepOutcome::failed`] and logged.
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<SweepOutcome, UploadError> {
        let cutoff = now - chrono::Duration::from_std(self.grace).unwrap_or(chrono::Duration::MAX);
        let claim = Uuid::new_v4();
        let rows: Vec<Row> = sqlx::query_as(
            "WITH picked AS ( \
               SELECT id FROM object_uploads \
               WHERE state IN ('pending', 'completing', 'aborting') AND expires_at < $1 \
                 AND (state = 'pending' OR lease_until IS NULL OR lease_until < $2) \
               ORDER BY expires_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
             UPDATE object_uploads u SET state = 'aborting', claim = $4, lease_until = $5 \
             FROM picked WHERE u.id = picked.id \
             RETURNING u.*",
        )
        .bind(cutoff)
        .bind(now)
        .bind(self.batch)
        .bind(claim)
        .bind(now + lease())
        .fetch_all(&self.uploads.pool)
        .await?;
        let mut outcome = SweepOutcome::default();
        for row in rows {
            let upload = Upload::try_from(row)?;
            if self.sweep(&upload, claim, now).await? {
                outcome.aborted += 1;
            } else {
                outcome.failed += 1;
            }
        }
        Ok(outcome)
    }
}

impl Sweeper {
    /// Aborts one claimed upload; `false` when the store would not, and it
    /// stays claimed to be tried again once the claim lapses.
    async fn sweep(
        &self,
        upload: &Upload,
        claim: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool, UploadError> {
        let abandoned = format!(
            "abandoned: not completed within {} s after its URLs expired at {}",
            self.grace.as_secs(),
            upload.expires_at.to_rfc3339()
        );
        let detail = match upload.method {
            Method::Put => abandoned,
            Method::Multipart => match self
                .store
                .abort_multipart(&upload.key(), &upload.upload_id)
                .await
            {
                Ok(()) => format!("{abandoned}; the multipart upload was aborted"),
                // A store that keeps refusing is not asked forever.
                Err(e) if now - upload.expires_at > give_up(self.grace) => {
                    tracing::error!(upload = %upload.id, key = %upload.key(), error = %e,
                        "the store would not abort an abandoned upload for a day; giving up");
                    format!("{abandoned}; the store would not abort it ({e}), its parts may remain")
                }
                Err(e) => {
                    tracing::warn!(upload = %upload.id, error = %e,
                        "cannot abort an abandoned upload; trying again later");
                    sqlx::query(
                        "UPDATE object_uploads SET detail = $3 WHERE id = $1 AND claim = $2",
                    )
                    .bind(upload.id)
                    .bind(claim)
                    .bind(format!("{abandoned}; aborting it failed: {e}"))
                    .execute(&self.uploads.pool)
                    .await?;
                    return Ok(false);
                }
            },
        };
        sqlx::query(
            "UPDATE object_uploads SET state = 'aborted', claim = NULL, lease_until = NULL, \
                    finished_at = $3, detail = $4 \
             WHERE id = $1 AND claim = $2 AND state = 'aborting'",
        )
        .bind(upload.id)
        .bind(claim)
        .bind(now)
        .bind(&detail)
        .execute(&self.uploads.pool)
        .await?;
        tracing::info!(upload = %upload.id, key = %upload.key(), "abandoned upload aborted");
        Ok(true)
    }
}

/// How long after its URLs expired the sweeper stops asking a store that
/// refuses to abort an upload: the grace and a day.
fn give_up(grace: Duration) -> chrono::Duration {
    chrono::Duration::from_std(grace + GIVE_UP_AFTER).unwrap_or(chrono::Duration::MAX)
}

/// How long the sweeper keeps asking a store that refuses an abort.
const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_names_what_did_not_match() {
        let m = Mismatch {
            size: Some(("5".into(), 7)),
            sha256: None,
        };
        assert_eq!(m.describe(), "the store holds 5 bytes, not the declared 7");
        let m = Mismatch {
            size: None,
            sha256: Some(("aa".into(), "bb".into())),
        };
        assert_eq!(
            m.describe(),
            "the stored bytes have SHA-256 aa, not the declared bb"
        );
    }
}
