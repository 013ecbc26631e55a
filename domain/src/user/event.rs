//! The events of a user: past tense, versioned, never edited once stored.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Actor, Name};

/// The events of a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserEvent {
    /// The user was created.
    Created {
        /// Their unique name.
        name: Name,
        /// Whether they administer the whole platform.
        admin: bool,
        /// Who created them.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// A token was issued.
    TokenIssued {
        /// The token's id, which is part of the token.
        token_id: Uuid,
        /// Hex SHA-256 of the token's secret.
        fingerprint: String,
        /// What the token is for.
        label: String,
        /// Who issued it.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
        /// When it stops working by itself; never when absent (and in
        /// events stored before tokens could expire).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<DateTime<Utc>>,
    },
    /// A token was revoked.
    TokenRevoked {
        /// The token's id.
        token_id: Uuid,
        /// Who revoked it.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        match self {
            UserEvent::Created { .. } => "UserCreated",
            UserEvent::TokenIssued { .. } => "UserTokenIssued",
            UserEvent::TokenRevoked { .. } => "UserTokenRevoked",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
