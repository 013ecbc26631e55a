//! Bearer tokens for users and nodes.
//!
//! A token names its owner and carries a 256-bit random secret:
//! `udu~<user>~<token id>~<secret>` for users, `udn~<node id>~<secret>` for
//! nodes. Only the SHA-256 of the secret (its fingerprint) is stored, in the
//! owner's events; the token itself is shown once. The secret has full
//! entropy, so a fast hash is enough, and fingerprints are compared in
//! constant time.
//!
//! Authentication reads user tokens from `auth_tokens` (with the admin flag
//! from `auth_users`), which a trigger keeps current in the transaction of
//! each user event: one lookup by primary key tells whether a token works,
//! so a bad token never costs an aggregate load ([`lookup`]).
//!
//! [`bearer`] is the one parser of `Authorization: Bearer` values, for the
//! API and the agents' ingress alike.

use std::fmt;

use base64::Engine;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// A token as presented by a caller, split into its parts.
#[derive(Clone, PartialEq, Eq)]
pub enum Presented {
    /// A user's API token.
    User {
        /// The user's name.
        user: String,
        /// The token's id.
        token_id: Uuid,
        /// The secret.
        secret: String,
    },
    /// A node agent's token.
    Node {
        /// The node's id.
        node_id: Uuid,
        /// The secret.
        secret: String,
    },
}

impl fmt::Debug for Presented {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Presented::User { user, token_id, .. } => {
                write!(f, "Presented::User({user}, {token_id}, <secret>)")
            }
            Presented::Node { node_id, .. } => write!(f, "Presented::Node({node_id}, <secret>)"),
        }
    }
}

/// A freshly made token: the text to show once and the fingerprint to store.
pub struct Issued {
    /// The full token, to hand to its owner once.
    pub token: String,
    /// Hex SHA-256 of the secret, to store.
    pub fingerprint: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Issued {{ fingerprint: {} }}", self.fingerprint)
    }
}

fn secret() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// Hex SHA-256 of a secret.
pub fn fingerprint(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` matches a stored fingerprint, in constant time.
pub fn matches(secret: &str, stored_fingerprint: &str) -> bool {
    fingerprint(secret)
        .as_bytes()
        .ct_eq(stored_fingerprint.as_bytes())
        .into()
}

/// Makes a new token for `user`.
pub fn issue_user(user: &str, token_id: Uuid) -> Issued {
    let s = secret();
    Issued {
        token: format!("udu~{user}~{}~{s}", token_id.simple()),
        fingerprint: fingerprint(&s),
    }
}

/// Makes a new token for node `node_id`.
pub fn issue_node(node_id: Uuid) -> Issued {
    let s = secret();
    Issued {
        token: format!("udn~{}~{s}", node_id.simple()),
        fingerprint: fingerprint(&s),
    }
}

/// The token of an `Authorization` header value with the `Bearer` scheme
/// (any case, as RFC 7235 says); `None` for another scheme or no token.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// What the log says about one user token, as authentication needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The user it belongs to.
    pub user: String,
    /// Hex SHA-256 of its secret.
    pub fingerprint: String,
    /// When it stops working by itself; never when `None`.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Whether its user administers the platform; `None` when the user
    /// is unknown (which the log never leads to).
    pub admin: Option<bool>,
}

impl fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("user", &self.user)
            .field("expires_at", &self.expires_at)
            .field("revoked_at", &self.revoked_at)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

/// Looks user token `token_id` up: one indexed read, never an aggregate
/// load. Current as of the last committed user event.
///
/// # Errors
/// The database's error.
pub async fn lookup(pool: &PgPool, token_id: Uuid) -> Result<Option<TokenRecord>, sqlx::Error> {
    sqlx::query_as::<_, TokenRow>(
        "SELECT t.user_name, t.fingerprint, t.expires_at, t.revoked_at, u.admin \
         FROM auth_tokens t LEFT JOIN auth_users u ON u.name = t.user_name \
         WHERE t.token_id = $1",
    )
    .bind(token_id)
    .fetch_optional(pool)
    .await
    .map(|row| row.map(TokenRecord::from))
}

/// A row of [`lookup`]'s query.
#[derive(sqlx::FromRow)]
struct TokenRow {
    user_name: String,
    fingerprint: String,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    admin: Option<bool>,
}

impl From<TokenRow> for TokenRecord {
    fn from(r: TokenRow) -> Self {
        Self {
            user: r.user_name,
            fingerprint: r.fingerprint,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            admin: r.admin,
        }
    }
}

/// One token of a user as listed: never its secret or fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenSummary {
    /// Its id.
    pub token_id: Uuid,
    /// What it is for.
    pub label: String,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// When it stops working by itself, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// `user`'s tokens in the order they were issued (by id), after
/// `after`, at most `limit`.
///
/// # Errors
/// The database's error.
pub async fn list(
    pool: &PgPool,
    user: &str,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<TokenSummary>, sqlx::Error> {
    sqlx::query_as(
        "SELECT token_id, label, issued_at, expires_at, revoked_at FROM auth_tokens \
         WHERE user_name = $1 AND ($2::uuid IS NULL OR token_id > $2) \
         ORDER BY token_id LIMIT $3",
    )
    .bind(user)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The length of a secret: 32 random bytes in unpadded URL-safe base64.
const SECRET_LEN: usize = 43;

/// Whether `s` looks like a secret we issue, so that anything else is
/// refused by parsing alone.
fn is_secret(s: &str) -> bool {
    s.len() == SECRET_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Splits a presented token; `None` when it is not one of ours: a wrong
/// prefix, a user name that no user can have, an id that is not a UUID or
/// a secret of the wrong length or alphabet.
pub fn parse(token: &str) -> Option<Presented> {
    let parts: Vec<&str> = token.trim().split('~').collect();
    match parts.as_slice() {
        ["udu", user, id, secret]
            if domain::name::validate_name(user).is_ok() && is_secret(secret) =>
        {
            Some(Presented::User {
                user: (*user).to_string(),
                token_id: Uuid::try_parse(id).ok()?,
                secret: (*secret).to_string(),
            })
        }
        ["udn", id, secret] if is_secret(secret) => Some(Presented::Node {
            node_id: Uuid::try_parse(id).ok()?,
            secret: (*secret).to_string(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_user_token_parses_back_and_matches_its_fingerprint() {
        let id = Uuid::new_v4();
        let issued = issue_user("alice", id);
        let Some(Presented::User {
            user,
            token_id,
            secret,
        }) = parse(&issued.token)
        else {
            panic!("did not parse")
        };
        assert_eq!((user.as_str(), token_id), ("alice", id));
        assert!(matches(&secret, &issued.fingerprint));
        assert!(!matches("wrong", &issued.fingerprint));
        assert!(!format!("{issued:?}").contains(&secret));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_others_are_refused() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("BEARER abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer   "), None);
        assert_eq!(bearer(""), None);
    }

    #[test]
    fn node_tokens_parse_and_garbage_does_not() {
        let id = Uuid::new_v4();
        let issued = issue_node(id);
        assert!(
            matches!(parse(&issued.token), Some(Presented::Node { node_id, .. }) if node_id == id)
        );
        for bad in [
            "",
            "udu~a~b~c",
            "udn~notauuid~xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "Bearer x",
            &format!("udu~Alice~{}~{}", id.simple(), "a".repeat(43)),
            &format!("udu~alice~{}~{}", id.simple(), "a".repeat(42)),
            &format!("udu~alice~{}~{}", id.simple(), "a".repeat(44)),
            &format!("udu~alice~{}~{}=", id.simple(), "a".repeat(42)),
            &format!("udu~alice~{}~{}", id.simple(), "é".repeat(21)),
            &format!("udu~~{}~{}", id.simple(), "a".repeat(43)),
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
