//! The commands of a user and the decisions on them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{User, UserError, UserEvent};
use crate::aggregate::decided_by;
use crate::{Actor, Name};

/// The commands of a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserCommand {
    /// Create the user.
    Create {
        /// Their name (also the aggregate id).
        name: String,
        /// Whether they are an admin.
        admin: bool,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Issue a token.
    IssueToken {
        /// The new token's id.
        token_id: Uuid,
        /// Hex SHA-256 of its secret.
        fingerprint: String,
        /// What it is for.
        label: String,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
        /// When it stops working by itself; `None` for never. Must be
        /// after `at`.
        expires_at: Option<DateTime<Utc>>,
        /// The most live tokens the user may hold, this one included; the
        /// command is refused when they hold that many already.
        max_live: usize,
    },
    /// Revoke a token.
    RevokeToken {
        /// The token's id.
        token_id: Uuid,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
}

impl User {
    /// Decides which events `command` produces, without changing anything.
    ///
    /// # Errors
    /// A [`UserError`] when the command is refused; nothing is appended.
    pub fn decide(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        match command {
            UserCommand::Create {
                name,
                admin,
                by,
                at,
            } => {
                if self.exists() {
                    return Err(UserError::AlreadyExists);
                }
                let name = Name::parse(&name)?;
                Ok(vec![UserEvent::Created {
                    name,
                    admin,
                    by,
                    at,
                }])
            }
            _ if !self.exists() => Err(UserError::NotFound),
            UserCommand::IssueToken {
                token_id,
                fingerprint,
                label,
                by,
                at,
                expires_at,
                max_live,
            } => {
                if expires_at.is_some_and(|e| e <= at) {
                    return Err(UserError::ExpiresBeforeIssue);
                }
                if self.live_tokens(at) >= max_live {
                    return Err(UserError::TooManyTokens(max_live));
                }
                Ok(vec![UserEvent::TokenIssued {
                    token_id,
                    fingerprint,
                    label,
                    by,
                    at,
                    expires_at,
                }])
            }
            UserCommand::RevokeToken { token_id, by, at } => match self.tokens.get(&token_id) {
                None => Err(UserError::TokenNotFound),
                Some(t) if t.revoked_at.is_some() => Ok(vec![]),
                Some(_) => Ok(vec![UserEvent::TokenRevoked { token_id, by, at }]),
            },
        }
    }
}

decided_by!(User, "user", UserCommand, UserEvent, UserError);
