//! The User aggregate: a person (or program) who calls the API, and their
//! tokens.
//!
//! A user's aggregate id is their name, so names are unique by construction.
//! Tokens are stored only as the SHA-256 of their secret; the secret is shown
//! once when issued.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::decided_by;
use crate::name::NameError;
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

/// Why a user command was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UserError {
    /// The user does not exist.
    #[error("user not found")]
    NotFound,
    /// A user with this name exists already.
    #[error("a user with this name already exists")]
    AlreadyExists,
    /// The user has no such token.
    #[error("token not found")]
    TokenNotFound,
    /// The user holds as many live tokens as allowed.
    #[error("the user holds {0} live tokens, the most allowed; revoke one before issuing another")]
    TooManyTokens(usize),
    /// The expiry is not after the time of issue.
    #[error("a token must expire after it is issued")]
    ExpiresBeforeIssue,
    /// The name does not fit the rules of a name.
    #[error("{0}")]
    InvalidName(#[from] NameError),
}

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

decided_by!(User, "user", UserCommand, UserEvent, UserError);

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::testing::{admin, at, name};

    type F = TestFramework<User>;

    fn created() -> UserEvent {
        UserEvent::Created {
            name: name("alice"),
            admin: false,
            by: admin(),
            at: at(0),
        }
    }
    fn issued() -> UserEvent {
        UserEvent::TokenIssued {
            token_id: Uuid::from_u128(5),
            fingerprint: "ff".into(),
            label: "laptop".into(),
            by: admin(),
            at: at(1),
            expires_at: None,
        }
    }

    #[test]
    fn a_name_is_taken_once() {
        F::with(())
            .given(vec![created()])
            .when(UserCommand::Create {
                name: "alice".into(),
                admin: true,
                by: admin(),
                at: at(0),
            })
            .then_expect_error(UserError::AlreadyExists);
    }

    #[test]
    fn a_user_whose_name_is_not_a_name_is_refused() {
        F::with(())
            .given_no_previous_events()
            .when(UserCommand::Create {
                name: "Alice Smith".into(),
                admin: false,
                by: admin(),
                at: at(0),
            })
            .then_expect_error(UserError::InvalidName(NameError));
    }

    #[test]
    fn tokens_are_issued_to_existing_users_only() {
        let issue = UserCommand::IssueToken {
            token_id: Uuid::from_u128(5),
            fingerprint: "ff".into(),
            label: "laptop".into(),
            by: admin(),
            at: at(1),
            expires_at: None,
            max_live: 20,
        };
        F::with(())
            .given(vec![created()])
            .when(issue.clone())
            .then_expect_events(vec![issued()]);
        F::with(())
            .given_no_previous_events()
            .when(issue)
            .then_expect_error(UserError::NotFound);
    }

    #[test]
    fn a_revoked_token_is_no_longer_live() {
        let revoke = UserCommand::RevokeToken {
            token_id: Uuid::from_u128(5),
            by: admin(),
            at: at(2),
        };
        let events = F::with(())
            .given(vec![created(), issued()])
            .when(revoke.clone())
            .inspect_result()
            .unwrap();
        let mut u = User::default();
        for e in [created(), issued()].into_iter().chain(events) {
            u.apply_event(e);
        }
        assert_eq!(u.live_token(Uuid::from_u128(5), at(3)), None);
        F::with(())
            .given(vec![created()])
            .when(revoke)
            .then_expect_error(UserError::TokenNotFound);
    }

    fn issue(id: u128, at_s: i64, expires_at: Option<DateTime<Utc>>) -> UserCommand {
        UserCommand::IssueToken {
            token_id: Uuid::from_u128(id),
            fingerprint: "ff".into(),
            label: String::new(),
            by: admin(),
            at: at(at_s),
            expires_at,
            max_live: 2,
        }
    }

    fn issued_at(id: u128, at_s: i64, expires_at: Option<DateTime<Utc>>) -> UserEvent {
        UserEvent::TokenIssued {
            token_id: Uuid::from_u128(id),
            fingerprint: "ff".into(),
            label: String::new(),
            by: admin(),
            at: at(at_s),
            expires_at,
        }
    }

    #[test]
    fn a_user_holds_at_most_max_live_tokens_and_expired_or_revoked_ones_do_not_count() {
        let two = vec![
            created(),
            issued_at(1, 1, None),
            issued_at(2, 1, Some(at(10))),
        ];
        F::with(())
            .given(two.clone())
            .when(issue(3, 5, None))
            .then_expect_error(UserError::TooManyTokens(2));
        // Token 2 expired at 10.
        F::with(())
            .given(two.clone())
            .when(issue(3, 10, None))
            .then_expect_events(vec![issued_at(3, 10, None)]);
        let mut revoked = two;
        revoked.push(UserEvent::TokenRevoked {
            token_id: Uuid::from_u128(1),
            by: admin(),
            at: at(2),
        });
        F::with(())
            .given(revoked)
            .when(issue(3, 5, None))
            .then_expect_events(vec![issued_at(3, 5, None)]);
    }

    #[test]
    fn a_token_expires_after_its_issue_and_stops_being_live_then() {
        F::with(())
            .given(vec![created()])
            .when(issue(1, 5, Some(at(5))))
            .then_expect_error(UserError::ExpiresBeforeIssue);
        let mut u = User::default();
        for e in [created(), issued_at(1, 1, Some(at(10)))] {
            u.apply_event(e);
        }
        assert_eq!(u.live_token(Uuid::from_u128(1), at(9)), Some("ff"));
        assert_eq!(u.live_token(Uuid::from_u128(1), at(10)), None);
    }

    #[test]
    fn a_token_event_stored_before_expiry_existed_still_loads() {
        let old = serde_json::json!({"TokenIssued": {
            "token_id": Uuid::from_u128(1), "fingerprint": "ff", "label": "",
            "by": admin(), "at": at(1)
        }});
        let event: UserEvent = serde_json::from_value(old).unwrap();
        assert_eq!(event, issued_at(1, 1, None));
    }
}
