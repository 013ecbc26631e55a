//! Idempotency keys: the first answer to a request made with a client's
//! key, so that the same request sent again gets that answer instead of a
//! second effect.
//!
//! A key belongs to one user and one request (its SHA-256, computed by the
//! caller over what makes the request what it is). [`begin`] decides, in
//! single statements that concurrent requests cannot interleave, whether
//! this request does the work ([`Begun::Claimed`]), gets the first answer
//! ([`Begun::Answered`]), waits for a request still working on it
//! ([`Begun::InProgress`]) or uses the key for something else
//! ([`Begun::Mismatch`]). The request that claimed the key stores its
//! answer with [`answer`], or gives the key back with [`release`].
//!
//! A claim whose request died (or failed with a server error, so its
//! outcome is unknown) is taken over by the next request with the same key
//! and content, which gets the same [`Claim::task_id`]: a submission under
//! that id that already happened is refused by the Task aggregate itself,
//! so even a takeover never submits a task twice.
//!
//! Keys expire [`KEY_TTL`] after their first use; a key used again after
//! that starts afresh, and every new claim deletes a few expired rows.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

/// How long a key keeps its answer: a day.
pub const KEY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a claim may go unanswered before a retry takes it over: far
/// longer than a submission or a cancel takes, even with the database's
/// acquire timeouts and conflict retries.
pub const CLAIM_STALE_AFTER: Duration = Duration::from_secs(30);

/// Expired rows deleted by each new claim, oldest first. More than one, so
/// that the table shrinks whenever keys are used at all.
const SWEEP_BATCH: i64 = 100;

/// A key held by the request that will answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    user: String,
    key: String,
    claim: Uuid,
    /// The id of the task a submission under this key creates: fixed by
    /// the first request with the key, the same for every retry.
    pub task_id: Uuid,
    /// Whether an earlier request with this key claimed it and gave no
    /// answer: the work may already have been done.
    pub taken_over: bool,
}

/// A stored answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The `Location` header, if the answer had one.
    pub location: Option<String>,
    /// The body, byte for byte.
    pub body: Vec<u8>,
}

/// What a request with a key should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// Do the work, then [`answer`] or [`release`].
    Claimed(Claim),
    /// The same request was answered before: answer the same.
    Answered(Answer),
    /// The key was used by this user for another request within
    /// [`KEY_TTL`].
    Mismatch,
    /// Another request with this key and content is still working on it.
    InProgress,
}

/// A key's row as [`begin`] reads it.
#[derive(sqlx::FromRow)]
struct Row {
    request_sha256: Vec<u8>,
    status: Option<i16>,
    location: Option<String>,
    body: Option<Vec<u8>>,
}

/// Decides what a request of `user` with `key` and content hash
/// `request_sha256` does; `task_id` is the id to fix for a submission
/// when the key is new.
///
/// # Errors
/// A database error.
pub async fn begin(
    pool: &PgPool,
    user: &str,
    key: &str,
    request_sha256: &[u8],
    task_id: Uuid,
) -> Result<Begun, sqlx::Error> {
    let ttl = KEY_TTL.as_secs_f64();
    let claim = Uuid::new_v4();
    let claimed = |task_id, taken_over| {
        Begun::Claimed(Claim {
            user: user.to_string(),
            key: key.to_string(),
            claim,
            task_id,
            taken_over,
        })
    };
    // A row deleted between the statements (it had expired) means trying
    // again from the start; twice is enough, as a new row cannot expire.
    for _ in 0..3 {
        let fresh: Option<Uuid> = sqlx::query_scalar(
            "INSERT INTO idempotency_keys \
                 (user_name, key, request_sha256, task_id, claim, claimed_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, now(), now()) \
             ON CONFLICT (user_name, key) DO UPDATE SET \
                 request_sha256 = EXCLUDED.request_sha256, task_id = EXCLUDED.task_id, \
                 claim = EXCLUDED.claim, claimed_at = now(), created_at = now(), \
                 status = NULL, location = NULL, body = NULL \
             WHERE idempotency_keys.created_at < now() - make_interval(secs => $6) \
             RETURNING task_id",
        )
        .bind(user)
        .bind(key)
        .bind(request_sha256)
        .bind(task_id)
        .bind(claim)
        .bind(ttl)
        .fetch_optional(pool)
        .await?;
        if let Some(task_id) = fresh {
            sweep(pool, SWEEP_BATCH).await?;
            return Ok(claimed(task_id, false));
        }
        let taken: Option<Uuid> = sqlx::query_scalar(
            "UPDATE idempotency_keys SET claim = $4, claimed_at = now() \
             WHERE user_name = $1 AND key = $2 AND request_sha256 = $3 AND status IS NULL \
               AND (claim IS NULL OR claimed_at < now() - make_interval(secs => $5)) \
               AND created_at >= now() - make_interval(secs => $6) \
             RETURNING task_id",
        )
        .bind(user)
        .bind(key)
        .bind(request_sha256)
        .bind(claim)
        .bind(CLAIM_STALE_AFTER.as_secs_f64())
        .bind(ttl)
        .fetch_optional(pool)
        .await?;
        if let Some(task_id) = taken {
            return Ok(claimed(task_id, true));
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT request_sha256, status, location, body FROM idempotency_keys \
             WHERE user_name = $1 AND key = $2",
        )
        .bind(user)
        .bind(key)
        .fetch_optional(pool)
        .await?;
        let Some(Row {
            request_sha256: stored_sha256,
            status,
            location,
            body,
        }) = row
        else {
            continue;
        };
        if stored_sha256 != request_sha256 {
            return Ok(Begun::Mismatch);
        }
        return Ok(match (status, body) {
            (Some(status), Some(body)) => Begun::Answered(Answer {
                status: u16::try_from(status).unwrap_or(500),
                location,
                body,
            }),
            _ => Begun::InProgress,
        });
    }
    Ok(Begun::InProgress)
}

/// Stores `answer` as the answer to the key `claim` holds; `false` when
/// the claim was taken over meanwhile (the request that took it over
/// stores its own).
///
/// # Errors
/// A database error.
pub async fn answer(pool: &PgPool, claim: &Claim, answer: &Answer) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE idempotency_keys SET status = $4, location = $5, body = $6, claim = NULL \
         WHERE user_name = $1 AND key = $2 AND claim = $3",
    )
    .bind(&claim.user)
    .bind(&claim.key)
    .bind(claim.claim)
    .bind(i16::try_from(answer.status).unwrap_or(i16::MAX))
    .bind(answer.location.as_deref())
    .bind(&answer.body)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

/// Gives back the key `claim` holds, without an answer. With `forget`
/// (nothing was done: the request was refused) the key is forgotten, so
/// that it may be used again, even for another request; without it (the
/// outcome is unknown) the key stays bound to this request, free for the
/// next retry to take over.
///
/// # Errors
/// A database error.
pub async fn release(pool: &PgPool, claim: &Claim, forget: bool) -> Result<(), sqlx::Error> {
    let sql = if forget {
        "DELETE FROM idempotency_keys WHERE user_name = $1 AND key = $2 AND claim = $3"
    } else {
        "UPDATE idempotency_keys SET claim = NULL \
         WHERE user_name = $1 AND key = $2 AND claim = $3"
    };
    sqlx::query(sql)
        .bind(&claim.user)
        .bind(&claim.key)
        .bind(claim.claim)
        .execute(pool)
        .await?;
    Ok(())
}

/// Deletes up to `limit` keys older than [`KEY_TTL`], oldest first,
/// skipping rows another sweep holds; returns how many.
///
/// # Errors
/// A database error.
pub async fn sweep(pool: &PgPool, limit: i64) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query(
        "DELETE FROM idempotency_keys WHERE (user_name, key) IN ( \
             SELECT user_name, key FROM idempotency_keys \
             WHERE created_at < now() - make_interval(secs => $1) \
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(KEY_TTL.as_secs_f64())
    .bind(limit)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(deleted)
}
