//! The queries that read the read models, one module per model.
//!
//! The tables' columns and the JSON layout of their documents are known
//! here and in the writers ([`crate::all`]) only; everything else reads the
//! models through these typed functions. Each function takes any executor
//! (a pool, a connection or an open transaction), so a caller's transaction
//! keeps covering the read.

pub mod nodes;
pub mod projects;
pub mod tasks;
pub mod timeline;
pub mod users;

/// Why a read-model query failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored document does not decode into this version's type.
    #[error("{table} doc does not decode: {reason}")]
    Undecodable {
        /// The read-model table it came from.
        table: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// Decodes a document of `table` into `T`.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    table: &'static str,
    doc: serde_json::Value,
) -> Result<T, ReadError> {
    serde_json::from_value(doc).map_err(|e| ReadError::Undecodable {
        table,
        reason: e.to_string(),
    })
}
