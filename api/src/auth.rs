//! Bearer-token authentication.
//!
//! A user token (`udu~<user>~<token id>~<secret>`) is first checked by
//! parsing alone: anything that is not one of ours is refused without
//! touching the database. A well-formed token is then looked up by its id
//! in `auth_tokens` ([`store::tokens::lookup`]), which a trigger keeps
//! current in the same transaction as the user's events: a revoked token
//! stops working and a new one works at the very next request, on every
//! replica, with no cache to invalidate, and an unknown, wrong, revoked or
//! expired token costs one indexed read and never an aggregate load.
//! Node tokens are for the agent WebSocket only and are refused here.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use chrono::Utc;
use domain::Actor;
use store::tokens::{self, Presented, TokenRecord};
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

    /// The caller as the log says now: fails once the token was revoked or
    /// expired, and picks up a change of the admin flag. Streams that
    /// outlive a request call this now and then; it costs one indexed read.
    ///
    /// # Errors
    /// 401 when the token is no longer valid; 500 when the database cannot
    /// be read.
    pub async fn refresh(&self, store: &Store) -> Result<Caller, ApiError> {
        let record = tokens::lookup(store.pool(), self.token_id).await?;
        let admin = check(record.as_ref(), &self.user, None)?;
        Ok(Caller {
            admin,
            ..self.clone()
        })
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

/// What the rate limit layer found out about a request's token, left in
/// the request's extensions so that the handler does not look the token up
/// a second time: the caller, or why the token was refused (401).
#[derive(Debug, Clone)]
pub(crate) struct Authenticated(pub(crate) Result<Caller, String>);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(Authenticated(outcome)) = parts.extensions.remove::<Authenticated>() {
            return outcome.map_err(ApiError::Unauthorized);
        }
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized("send an Authorization: Bearer <token> header".into())
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(tokens::bearer)
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header must be Bearer <token>".into())
            })?;
        authenticate(state.store(), token).await
    }
}

/// Why a token is refused without saying which part was wrong.
const INVALID: &str = "the bearer token is invalid or was revoked";

/// Checks `token`: by parsing, then by one lookup of its id. Never loads an
/// aggregate.
///
/// # Errors
/// 401 when the token is malformed, belongs to a node, is unknown, does
/// not match, was revoked or expired; 500 when the database cannot be read.
pub async fn authenticate(store: &Store, token: &str) -> Result<Caller, ApiError> {
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
        None => return Err(ApiError::Unauthorized(INVALID.into())),
    };
    let record = tokens::lookup(store.pool(), token_id).await?;
    let admin = check(record.as_ref(), &user, Some(&secret))?;
    Ok(Caller {
        user,
        admin,
        token_id,
    })
}

/// Whether `record` lets `user` in now, and as admin or not. The secret is
/// checked (when given) before anything else is said about the token, so
/// that only its holder learns that it expired.
fn check(record: Option<&TokenRecord>, user: &str, secret: Option<&str>) -> Result<bool, ApiError> {
    let invalid = || ApiError::Unauthorized(INVALID.into());
    let Some(record) = record else {
        return Err(invalid());
    };
    if record.user != user || secret.is_some_and(|s| !tokens::matches(s, &record.fingerprint)) {
        return Err(invalid());
    }
    if record.revoked_at.is_some() {
        return Err(ApiError::Unauthorized(
            "the bearer token was revoked".into(),
        ));
    }
    if record.expires_at.is_some_and(|at| at <= Utc::now()) {
        return Err(ApiError::Unauthorized("the token expired".into()));
    }
    record.admin.ok_or_else(invalid)
}
