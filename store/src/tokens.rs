//! Bearer tokens for users and nodes.
//!
//! A token names its owner and carries a 256-bit random secret:
//! `udu~<user>~<token id>~<secret>` for users, `udn~<node id>~<secret>` for
//! nodes. Only the SHA-256 of the secret (its fingerprint) is stored, in the
//! owner's events; the token itself is shown once. The secret has full
//! entropy, so a fast hash is enough, and fingerprints are compared in
//! constant time.

use std::fmt;

use base64::Engine;
use sha2::{Digest, Sha256};
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

/// Splits a presented token; `None` when it is not one of ours.
pub fn parse(token: &str) -> Option<Presented> {
    let parts: Vec<&str> = token.trim().split('~').collect();
    match parts.as_slice() {
        ["udu", user, id, secret] if !user.is_empty() && secret.len() >= 32 => {
            Some(Presented::User {
                user: (*user).to_string(),
                token_id: Uuid::try_parse(id).ok()?,
                secret: (*secret).to_string(),
            })
        }
        ["udn", id, secret] if secret.len() >= 32 => Some(Presented::Node {
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
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
