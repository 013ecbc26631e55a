//! Bearer-token authentication.
//!
//! A user token (`udu~<user>~<token id>~<secret>`) names its user, whose
//! aggregate is loaded from the event log on every request: the log is the
//! source of truth, so a revoked token stops working and a new one works at
//! the very next request, on every replica, with no cache to invalidate.
//! Node tokens are for the agent WebSocket only and are refused here.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use domain::user::User;
use domain::Actor;
use store::tokens::{self, Presented};
use store::Store;

use crate::error::ApiError;
use crate::AppState;

/// The authenticated user making a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user's name.
    pub user: String,
    /// Whether they administer the whole platform.
    pub admin: bool,
    /// The token they authenticated with, so a long-lived stream can check
    /// that it was not revoked since.
    pub token_id: uuid::Uuid,
}

impl Caller {
    /// The actor recorded on the events this caller causes.
    pub fn actor(&self) -> Actor {
        Actor::User(self.user.clone())
    }

    /// The caller as the log says now: fails once the token was revoked (or
    /// the user removed), and picks up a change of the admin flag. Streams
    /// that outlive a request call this now and then.
    ///
    /// # Errors
    /// 401 when the token is no longer valid; 500 when the log cannot be
    /// read.
    pub async fn refresh(&self, store: &Store) -> Result<Caller, ApiError> {
        let revoked = || ApiError::Unauthorized("the bearer token was revoked".into());
        let Some(loaded) = store.load::<User>(&self.user).await? else {
            return Err(revoked());
        };
        match loaded.state.live_token(self.token_id) {
            Some(_) => Ok(Caller {
                admin: loaded.state.admin,
                ..self.clone()
            }),
            None => Err(revoked()),
        }
    }

    /// Refuses callers who are not admins.
    ///
    /// # Errors
    /// 403 saying what needed an admin.
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!("only admins may {what}")))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized("send an Authorization: Bearer <token> header".into())
        })?;
        let token = header.to_str().ok().and_then(bearer).ok_or_else(|| {
            ApiError::Unauthorized("the Authorization header must be Bearer <token>".into())
        })?;
        authenticate(state.store(), token).await
    }
}

/// The token of an `Authorization` value with the `Bearer` scheme (any
/// case, as RFC 7235 says).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Checks `token` against the event log.
///
/// # Errors
/// 401 when the token is malformed, belongs to a node, names an unknown
/// user, was revoked or does not match; 500 when the log cannot be read.
pub async fn authenticate(store: &Store, token: &str) -> Result<Caller, ApiError> {
    let invalid = || ApiError::Unauthorized("the bearer token is invalid or was revoked".into());
    let (user, token_id, secret) = match tokens::parse(token) {
        Some(Presented::User {
            user,
            token_id,
            secret,
        }) => (user, token_id, secret),
        Some(Presented::Node { .. }) => {
            return Err(ApiError::Unauthorized(
                "node tokens are only valid for agents; use a user token".into(),
            ))
        }
        None => return Err(invalid()),
    };
    let Some(loaded) = store.load::<User>(&user).await? else {
        return Err(invalid());
    };
    let state = loaded.state;
    match state.live_token(token_id) {
        Some(fingerprint) if tokens::matches(&secret, fingerprint) => Ok(Caller {
            user: state.name,
            admin: state.admin,
            token_id,
        }),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_others_are_refused() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer   "), None);
    }
}
