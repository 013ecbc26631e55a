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
    #[schema(example = "alice")]
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
    #[schema(example = "laptop")]
    pub label: Option<String>,
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
    /// Their tokens, live and revoked.
    pub tokens: Vec<TokenInfo>,
}

impl From<domain::user::User> for User {
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

/// Users, by name.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserList {
    /// The users.
    pub items: Vec<UserSummary>,
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
}
