//! The errors of executing commands and reading the log.

use cqrs_es::AggregateError;

/// Why a command could not be executed or the log not read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError<E: std::error::Error> {
    /// The aggregate refused the command; nothing was appended.
    #[error(transparent)]
    Rejected(E),
    /// Other writers kept changing the aggregate; retry later.
    #[error("the aggregate was changed concurrently too often; try again")]
    Conflict,
    /// A stored event or snapshot could not be read by this version.
    #[error("stored data could not be read: {0}")]
    Corrupt(String),
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Database(String),
}

impl<E: std::error::Error> StoreError<E> {
    pub(crate) fn from_aggregate(e: AggregateError<E>) -> Self {
        match e {
            AggregateError::UserError(e) => Self::Rejected(e),
            AggregateError::AggregateConflict => Self::Conflict,
            AggregateError::DeserializationError(e) => Self::Corrupt(e.to_string()),
            AggregateError::DatabaseConnectionError(e) | AggregateError::UnexpectedError(e) => {
                Self::Database(e.to_string())
            }
        }
    }
}
