//! Lists that show everything committed before they were asked for.
//!
//! Lists are read from read models, which the projector fills a few
//! milliseconds after each commit. A client that has just created a
//! project and lists projects at once would otherwise miss it now and
//! then. A list request carrying `Prefer: fresh` (an RFC 7240 preference)
//! waits, at most [`WAIT`], until the read models it reads have applied
//! every event committed before the request arrived, and then answers
//! with `Preference-Applied: fresh`. If they have not caught up by then
//! (the projector is stopped, or an old transaction holds readers back),
//! the list answers with what the models hold and without that header, so
//! a client can tell the user the list may be missing the newest changes.
//! Requests without the preference are answered at once, as before.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponseParts, ResponseParts};

use crate::error::ApiError;
use crate::AppState;

/// The preference's token, in `Prefer` and `Preference-Applied`.
pub const FRESH: &str = "fresh";

/// The longest a list waits for its read models.
pub const WAIT: Duration = Duration::from_secs(5);

/// The request header naming preferences (RFC 7240).
pub const PREFER: HeaderName = HeaderName::from_static("prefer");

/// The response header naming the preferences honoured (RFC 7240).
pub const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");

/// Whether `headers` ask for [`FRESH`]: any `Prefer` header holding it
/// among its comma-separated preferences, in any case, with or without a
/// value or parameters. Anything else in them, including text that is not
/// a preference at all, is ignored, as RFC 7240 asks of preferences a
/// server does not know.
pub fn asks_fresh(headers: &HeaderMap) -> bool {
    headers
        .get_all(PREFER)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|preference| preference.split([';', '=']).next())
        .any(|token| token.trim().eq_ignore_ascii_case(FRESH))
}

/// A list request's preferences: whether it asked for a fresh answer.
#[derive(Debug, Clone, Copy)]
pub struct Prefer {
    fresh: bool,
}

impl<S: Send + Sync> FromRequestParts<S> for Prefer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Prefer {
            fresh: asks_fresh(&parts.headers),
        })
    }
}

impl Prefer {
    /// When the request asked for a fresh answer, waits (at most [`WAIT`])
    /// for read models `models` to apply everything committed before now;
    /// call it before reading them. Whether the answer will be fresh goes
    /// into the response.
    ///
    /// # Errors
    /// A database error.
    pub async fn wait_for(self, state: &AppState, models: &[&str]) -> Result<Applied, ApiError> {
        if !self.fresh {
            return Ok(Applied(false));
        }
        let caught_up = projections::read::all_caught_up(state.pool(), models, WAIT).await?;
        if !caught_up {
            tracing::info!(
                ?models,
                "a list asked to be fresh is answered from read models still behind the log"
            );
        }
        Ok(Applied(caught_up))
    }
}

/// Whether a list reflects everything committed before it was asked for:
/// adds `Preference-Applied: fresh` to the response when it does.
#[derive(Debug, Clone, Copy)]
pub struct Applied(bool);

impl IntoResponseParts for Applied {
    type Error = Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Self::Error> {
        if self.0 {
            res.headers_mut()
                .insert(PREFERENCE_APPLIED, HeaderValue::from_static(FRESH));
        }
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(PREFER, HeaderValue::from_bytes(v).expect("a header value"));
        }
        h
    }

    #[test]
    fn fresh_is_found_among_other_preferences_in_any_case_and_form() {
        for asked in [
            &[&b"fresh"[..]][..],
            &[b"FRESH"],
            &[b"respond-async, fresh"],
            &[b"wait=10;x=1 , Fresh ; y"],
            &[b"fresh=1"],
            &[b"return=minimal", b"fresh"],
        ] {
            assert!(asks_fresh(&headers(asked)), "{asked:?}");
        }
    }

    #[test]
    fn anything_else_is_not_a_request_for_fresh() {
        for other in [
            &[][..],
            &[&b""[..]],
            &[b"freshness"],
            &[b"return=fresh"],
            &[b"wait=fresh"],
            &[b"\xfffresh"],
            &[b"fre sh"],
            &[b",,,;;;==="],
        ] {
            assert!(!asks_fresh(&headers(other)), "{other:?}");
        }
    }
}
