//! Liveness and readiness answers.

use serde::Serialize;
use utoipa::ToSchema;

/// A health answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// `ok` (liveness), `ready`, or `degraded`: serving, but something
    /// needs an operator (see `reasons`).
    #[schema(example = "ok")]
    pub status: String,
    /// Why it is degraded, in words for operators; absent when it is not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// What readiness measured; absent from liveness answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<Checks>,
}

impl Health {
    /// An answer with `status` only.
    pub fn status(status: &str) -> Self {
        Self {
            status: status.into(),
            reasons: Vec::new(),
            checks: None,
        }
    }
}

/// What readiness measured.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Checks {
    /// Events each outbox consumer with any skipped because it could not
    /// apply them; such a consumer is inconsistent until they are retried
    /// or it is rebuilt.
    pub dead_letters: Vec<DeadLetters>,
    /// The oldest open transaction with a transaction id on the database
    /// server, which holds every outbox consumer back; absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_transaction: Option<OldestTransaction>,
    /// The database's size on disk, in bytes.
    pub database_bytes: i64,
    /// Its budget in bytes; absent when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_budget_bytes: Option<u64>,
    /// Whether task output is refused because the database is over its
    /// budget.
    pub task_output_refused: bool,
}

/// The dead letters of one consumer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeadLetters {
    /// A read model (`tasks`, `nodes`, `projects`, `users`, `timeline`) or
    /// `ingress`.
    pub consumer: String,
    /// How many events it skipped.
    pub count: i64,
}

/// An open transaction.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OldestTransaction {
    /// How long it has been open, in seconds.
    pub age_s: f64,
    /// Its server process id (`pg_stat_activity.pid`); absent for a
    /// prepared transaction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Its state, such as `idle in transaction`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}
