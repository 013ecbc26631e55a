//! Users and their tokens. Token secrets are shown once, fingerprints never.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The body of `POST /api/v1/users`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// A unique name: 1-63 lower-case letters, digits, '.', '_' or '-'.
    #[schema(
        example = "alice",
        pattern = "^[a-z0-9][a-z0-9._-]*$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// Whether the user administers the whole platform (default false).
    #[serde(default)]
    pub admin: bool,
}

/// The body of `POST /api/v1/users/{name}/tokens`; may be omitted.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueToken {
    /// What the token is for, up to 100 characters.
    #[schema(
        example = "laptop",
        max_length = 100,
        pattern = "^[^\\x00-\\x1F\\x7F-\\x9F]*$"
    )]
    pub label: Option<String>,
    /// Seconds from now until the token stops working by itself, 1 to
    /// 31536000 (a year). Not together with `expires_at`; without either
    /// (or with `null`) the token works until revoked.
    #[serde(default)]
    #[schema(example = 2592000, minimum = 1, maximum = 31536000)]
    pub expires_in_s: Option<u64>,
    /// When the token stops working by itself (RFC 3339): in the future
    /// and at most a year from now, else 409 (the time of the request
    /// decides). Not together with `expires_in_s`.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// One token of a user, without its secret.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenInfo {
    /// Its id.
    pub token_id: Uuid,
    /// What it is for.
    pub label: String,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it stops (or stopped) working by itself; absent when never.
    pub expires_at: Option<DateTime<Utc>>,
}

impl From<store::tokens::TokenSummary> for TokenInfo {
    fn from(t: store::tokens::TokenSummary) -> Self {
        Self {
            token_id: t.token_id,
            label: t.label,
            issued_at: t.issued_at,
            revoked_at: t.revoked_at,
            expires_at: t.expires_at,
        }
    }
}

/// A page of a user's tokens, in the order they were issued.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenPage {
    /// The tokens, live, revoked and expired.
    pub items: Vec<TokenInfo>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A user as it stands.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct User {
    /// Their name.
    pub name: String,
    /// Whether they administer the platform.
    pub admin: bool,
    /// When they were created.
    pub created_at: Option<DateTime<Utc>>,
    /// Their live tokens (neither revoked nor expired), at most the
    /// server's per-user limit; every token, page by page, is at
    /// `GET /api/v1/users/{name}/tokens`.
    pub tokens: Vec<TokenInfo>,
}

impl From<domain::user::User> for User {
    /// The user with every token of its state, revoked and expired ones
    /// too: the state as of an event, as the event's detail shows it.
    fn from(u: domain::user::User) -> Self {
        Self {
            name: u.name,
            admin: u.admin,
            created_at: u.created_at,
            tokens: u
                .tokens
                .into_iter()
                .map(|(token_id, t)| TokenInfo {
                    token_id,
                    label: t.label,
                    issued_at: t.issued_at,
                    revoked_at: t.revoked_at,
                    expires_at: t.expires_at,
                })
                .collect(),
        }
    }
}

impl User {
    /// The user as it stands at `now`, with its live tokens only.
    pub fn at(u: domain::user::User, now: DateTime<Utc>) -> Self {
        Self {
            name: u.name,
            admin: u.admin,
            created_at: u.created_at,
            tokens: u
                .tokens
                .into_iter()
                .filter(|(_, t)| t.is_live(now))
                .map(|(token_id, t)| TokenInfo {
                    token_id,
                    label: t.label,
                    issued_at: t.issued_at,
                    revoked_at: t.revoked_at,
                    expires_at: t.expires_at,
                })
                .collect(),
        }
    }
}

/// A user in a list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserSummary {
    /// Their name.
    pub name: String,
    /// Whether they administer the platform.
    pub admin: bool,
    /// When they were created.
    pub created_at: DateTime<Utc>,
    /// How many live tokens they hold.
    pub tokens: i32,
}

/// A page of users, by name.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserList {
    /// The users.
    pub items: Vec<UserSummary>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A token just issued: shown this once, never again.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IssuedToken {
    /// The token's id, to revoke it by.
    pub token_id: Uuid,
    /// The bearer token.
    pub token: String,
    /// What it is for.
    pub label: String,
    /// When it stops working by itself; absent when never.
    pub expires_at: Option<DateTime<Utc>>,
}
