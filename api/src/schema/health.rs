//! Liveness and readiness answers.

use serde::Serialize;
use utoipa::ToSchema;

/// A health answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    #[schema(example = "ok")]
    pub status: String,
}
