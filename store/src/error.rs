//! The errors of executing commands and reading the log.

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
    /// The database refused the events themselves: SQLSTATE class 22
    /// (data exception, such as a NUL in `jsonb`) or 23 (integrity
    /// constraint; a unique violation of the log's key is a
    /// [`StoreError::Conflict`] instead). Executing the same command again
    /// fails the same way.
    #[error("the database refused the data (SQLSTATE {sqlstate}): {message}")]
    Unstorable {
        /// The five-character SQLSTATE.
        sqlstate: String,
        /// PostgreSQL's message.
        message: String,
    },
    /// The database cannot be reached now (see [`is_unavailable`]); the
    /// same command may succeed later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(String),
}

impl<E: std::error::Error> StoreError<E> {
    pub(crate) fn from_log(e: crate::log::LogError) -> Self {
        match e {
            crate::log::LogError::Conflict | crate::log::LogError::Stale => Self::Conflict,
            crate::log::LogError::Corrupt(e) => Self::Corrupt(e),
            crate::log::LogError::Database(e) => Self::from_sqlx(e),
        }
    }

    pub(crate) fn from_sqlx(e: sqlx::Error) -> Self {
        if let Some((sqlstate, message)) = unstorable(&e) {
            return Self::Unstorable { sqlstate, message };
        }
        if is_unavailable(&e) {
            Self::Unavailable(e.to_string())
        } else {
            Self::Database(e.to_string())
        }
    }

    /// Whether trying again can help: not when the aggregate refused the
    /// command, nor when the database refused its data.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Rejected(_) | Self::Unstorable { .. })
    }
}

/// The SQLSTATE and message of a database error of class 22 or 23.
fn unstorable(e: &sqlx::Error) -> Option<(String, String)> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    let code = db.code()?;
    (code.starts_with("22") || code.starts_with("23"))
        .then(|| (code.into_owned(), db.message().to_string()))
}

/// Whether `e` says the database cannot be reached now rather than that a
/// statement failed: no connection was free or could be made within the
/// pool's acquire timeout, the connection broke, or the server is
/// shutting down, starting up or refusing connections (SQLSTATE classes
/// 08 and 57P). Callers answer these with "try again later".
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

/// Whether `e` may pass by itself, so the same work should be tried again
/// later rather than given up: [`is_unavailable`], or a failure of the
/// moment rather than of the statement (SQLSTATE classes 40: a
/// serialization failure or deadlock; 53: out of disk, memory or
/// connections; 55: a lock not available; 57: cancelled, such as by
/// `statement_timeout`, or the server shutting down; 58: an I/O error).
/// Anything else (bad data, a constraint, a bug) fails the same way again.
pub fn is_transient(e: &sqlx::Error) -> bool {
    if is_unavailable(e) {
        return true;
    }
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            ["40", "53", "55", "57", "58"]
                .iter()
                .any(|c| code.starts_with(c))
        }),
        _ => false,
    }
}
