//! The User aggregate's state, its tokens, and how each event changes
//! them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::UserEvent;

/// One API token of a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Token {
    /// Hex SHA-256 of the secret.
    pub fingerprint: String,
    /// What it is for.
    pub label: String,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it stops working by itself; never when absent.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

impl Token {
    /// Whether the token works at `now`: not revoked and not expired.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

/// The User aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Their name; empty before creation.
    pub name: String,
    /// Whether they administer the platform.
    pub admin: bool,
    /// Their tokens by id.
    pub tokens: BTreeMap<Uuid, Token>,
    /// When they were created.
    pub created_at: Option<DateTime<Utc>>,
}

impl User {
    /// Whether the user exists.
    pub fn exists(&self) -> bool {
        self.created_at.is_some()
    }

    /// The fingerprint of a token that works at `now` (neither revoked nor
    /// expired).
    pub fn live_token(&self, token_id: Uuid, now: DateTime<Utc>) -> Option<&str> {
        self.tokens
            .get(&token_id)
            .filter(|t| t.is_live(now))
            .map(|t| t.fingerprint.as_str())
    }

    /// How many tokens work at `now`.
    pub fn live_tokens(&self, now: DateTime<Utc>) -> usize {
        self.tokens.values().filter(|t| t.is_live(now)).count()
    }

    /// Applies one event.
    pub fn apply_event(&mut self, event: UserEvent) {
        match event {
            UserEvent::Created {
                name, admin, at, ..
            } => {
                self.name = name.into();
                self.admin = admin;
                self.created_at = Some(at);
            }
            UserEvent::TokenIssued {
                token_id,
                fingerprint,
                label,
                at,
                expires_at,
                ..
            } => {
                self.tokens.insert(
                    token_id,
                    Token {
                        fingerprint,
                        label,
                        issued_at: at,
                        revoked_at: None,
                        expires_at,
                    },
                );
            }
            UserEvent::TokenRevoked { token_id, at, .. } => {
                if let Some(t) = self.tokens.get_mut(&token_id) {
                    t.revoked_at = Some(at);
                }
            }
        }
    }
}
