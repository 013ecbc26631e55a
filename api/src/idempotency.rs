//! Safe retries: the `Idempotency-Key` header of `POST /tasks` and
//! `POST /tasks/{id}/cancel`.
//!
//! A client that timed out, or lost its connection, cannot know whether
//! its request took effect. Sent with a key of its choosing, the request
//! can be sent again with the same key: the first request with the key
//! does the work and its answer is stored; every later request of the same
//! user with the same key and the same request (method, path and body, as
//! canonical JSON) gets that answer (same status and body, with
//! `Idempotent-Replayed: true`) and changes nothing. The same key with
//! another request is refused with 409 (a malformed key with 422). A
//! request arriving while the first is still working waits for its answer
//! (at most [`WAIT_FOR_FIRST`], then 409). Only successes are stored: a
//! refused request appended nothing and leaves the key unused; one that
//! failed with a server error leaves the key bound to its request for the
//! next retry to take over ([`store::idempotency`]). Keys expire after
//! [`store::idempotency::KEY_TTL`] (a day).
//!
//! Without the header nothing changes.

use std::future::Future;
use std::time::Duration;

use axum::extract::OptionalFromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sha2::{Digest, Sha256};
use store::idempotency::{self as keys, Begun};
use tokio::time::Instant;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::AppState;

/// The request header naming a key.
pub const HEADER: &str = "Idempotency-Key";

/// The response header of an answer given again: `true`.
pub const REPLAYED: &str = "Idempotent-Replayed";

/// The longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// How long a request waits for an earlier request with the same key and
/// content to answer before it is told to try again (409).
pub const WAIT_FOR_FIRST: Duration = Duration::from_secs(10);

/// A key as the client sent it, checked: 1 to [`MAX_KEY_BYTES`]
/// printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Checks a header's value.
    ///
    /// # Errors
    /// 422 naming the header when the value is empty, too long, or not
    /// printable ASCII.
    pub fn parse(value: &[u8]) -> Result<Self, ApiError> {
        let printable = value.iter().all(|b| (0x20..=0x7e).contains(b));
        if value.is_empty() || value.len() > MAX_KEY_BYTES || !printable {
            return Err(ApiError::invalid(
                HEADER,
                format!("must be 1 to {MAX_KEY_BYTES} printable ASCII characters, such as a UUID"),
            ));
        }
        Ok(Self(String::from_utf8_lossy(value).into_owned()))
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl OptionalFromRequestParts<AppState> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &AppState,
    ) -> Result<Option<Self>, Self::Rejection> {
        let mut values = parts.headers.get_all(HEADER).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(ApiError::invalid(HEADER, "send one key, not several"));
        }
        Self::parse(value.as_bytes()).map(Some)
    }
}

/// The header as the OpenAPI document describes it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKeyHeader {
    /// A key of the client's choosing (a UUID, say) that makes the request
    /// safe to send again: the same request with the same key within 24
    /// hours gets the first answer, with `Idempotent-Replayed: true`, and
    /// changes nothing; the same key with another request answers 409.
    /// Printable ASCII, not starting or ending with a space (which HTTP
    /// would strip).
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 255,
        pattern = r"^[!-~](?:[ -~]*[!-~])?$"
    )]
    pub idempotency_key: Option<String>,
}

/// The SHA-256 of what makes a request what it is: its method and path,
/// and its JSON body in a canonical form (keys sorted, no white space),
/// so that the same request serialised otherwise is the same request.
pub fn request_sha256(method: &str, path: &str, body: Option<&serde_json::Value>) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update(b" ");
    hash.update(path.as_bytes());
    hash.update(b"\n");
    if let Some(body) = body {
        let mut canonical = Vec::new();
        write_canonical(body, &mut canonical);
        hash.update(&canonical);
    }
    hash.finalize().into()
}

fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Object(fields) => {
            let mut sorted: Vec<_> = fields.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (name, value)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(name.clone()).to_string().as_bytes());
                out.push(b':');
                write_canonical(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

/// What a keyed request's work is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    /// The id a submission gives its task: new for a new key, the same
    /// for every retry with one.
    pub task_id: Uuid,
    /// Whether an earlier request with the key may have done the work
    /// already (it claimed the key and gave no answer).
    pub taken_over: bool,
}

/// A JSON answer that can be stored and given again.
#[derive(Debug, Clone)]
pub struct Answer {
    status: StatusCode,
    location: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    /// `body` as JSON with `status`.
    ///
    /// # Errors
    /// 500 when the body cannot be serialised.
    pub fn json(status: StatusCode, body: &impl Serialize) -> Result<Self, ApiError> {
        Ok(Self {
            status,
            location: None,
            body: serde_json::to_vec(body).map_err(ApiError::internal)?,
        })
    }

    /// The same answer with a `Location` header.
    pub fn with_location(mut self, location: String) -> Self {
        self.location = Some(location);
        self
    }

    fn stored(&self) -> keys::Answer {
        keys::Answer {
            status: self.status.as_u16(),
            location: self.location.clone(),
            body: self.body.clone(),
        }
    }

    fn from_stored(stored: keys::Answer) -> Self {
        Self {
            status: StatusCode::from_u16(stored.status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            location: stored.location,
            body: stored.body,
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.body,
        )
            .into_response();
        if let Some(location) = self.location.and_then(|l| HeaderValue::try_from(l).ok()) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        response
    }
}

/// Runs `work` once per key: without a key, simply runs it; with one,
/// answers a repeated request with the stored answer, refuses the key
/// with another request, waits for a request still working on it, or runs
/// `work` and stores its answer when it succeeded.
///
/// # Errors
/// 409 when the key was used for another request, or when an earlier
/// request with it is still working after [`WAIT_FOR_FIRST`]; 503 when the
/// database cannot be reached, and whatever `work` fails with.
pub async fn once<F, Fut>(
    state: &AppState,
    caller: &Caller,
    key: Option<IdempotencyKey>,
    request_sha256: [u8; 32],
    work: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Reserved) -> Fut,
    Fut: Future<Output = Result<Answer, ApiError>>,
{
    let Some(key) = key else {
        let fresh = Reserved {
            task_id: Uuid::now_v7(),
            taken_over: false,
        };
        return work(fresh).await.map(IntoResponse::into_response);
    };
    let pool = state.pool();
    let deadline = Instant::now() + WAIT_FOR_FIRST;
    let mut pause = Duration::from_millis(10);
    let claim = loop {
        let begun = keys::begin(
            pool,
            &caller.user,
            key.as_str(),
            &request_sha256,
            Uuid::now_v7(),
        )
        .await?;
        match begun {
            Begun::Claimed(claim) => break claim,
            Begun::Answered(stored) => {
                let mut response = Answer::from_stored(stored).into_response();
                response
                    .headers_mut()
                    .insert(REPLAYED, HeaderValue::from_static("true"));
                return Ok(response);
            }
            Begun::Mismatch => {
                return Err(ApiError::Conflict(Problem::field(
                    HEADER,
                    "this key was used for another request (another body or path) in the \
                     last 24 hours; send a new key with a new request",
                )))
            }
            Begun::InProgress if Instant::now() >= deadline => {
                return Err(ApiError::conflict(
                    "an earlier request with this Idempotency-Key is still being worked on; \
                     send it again in a moment to get its answer",
                ))
            }
            Begun::InProgress => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    };
    let reserved = Reserved {
        task_id: claim.task_id,
        taken_over: claim.taken_over,
    };
    match work(reserved).await {
        Ok(answer) => {
            if let Err(e) = keys::answer(pool, &claim, &answer.stored()).await {
                // The work is done: answer it. A retry waits for the claim
                // to go stale, takes it over and finds the work done.
                tracing::warn!(error = %e, "storing the answer of an Idempotency-Key failed");
            }
            Ok(answer.into_response())
        }
        Err(e) => {
            // A refusal appended nothing: the key is forgotten. After a
            // server error the outcome is unknown: the key stays bound to
            // this request for a retry to take over.
            let forget = e.status().is_client_error();
            if let Err(release) = keys::release(pool, &claim, forget).await {
                tracing::warn!(error = %release, "releasing an Idempotency-Key failed");
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_one_to_255_printable_ascii_characters() {
        for good in [
            "a",
            "0b5f3c1e-8d1a-4c7e-9a57-4b7a1d0c2e11",
            "with inner space",
            "~!",
        ] {
            assert!(IdempotencyKey::parse(good.as_bytes()).is_ok(), "{good:?}");
        }
        assert!(IdempotencyKey::parse("k".repeat(255).as_bytes()).is_ok());
        for bad in [
            "".as_bytes(),
            "k".repeat(256).as_bytes(),
            "tab\there".as_bytes(),
            "é".as_bytes(),
            b"nul\0",
        ] {
            let e = IdempotencyKey::parse(bad).expect_err("refused");
            assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        }
    }

    #[test]
    fn the_same_request_serialised_otherwise_has_the_same_hash() {
        let a = json!({"b": [1, {"y": 2, "x": "é"}], "a": null});
        let b: serde_json::Value =
            serde_json::from_str(r#"{ "a" : null , "b" : [ 1 , { "x" : "é", "y" : 2 } ] }"#)
                .expect("JSON");
        assert_eq!(
            request_sha256("POST", "/t", Some(&a)),
            request_sha256("POST", "/t", Some(&b))
        );
        assert_ne!(
            request_sha256("POST", "/t", Some(&a)),
            request_sha256("POST", "/u", Some(&a))
        );
        assert_ne!(
            request_sha256("POST", "/t", Some(&a)),
            request_sha256("POST", "/t", Some(&json!({"a": null})))
        );
    }
}
