//! Why a user command was refused.

use crate::name::NameError;

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
