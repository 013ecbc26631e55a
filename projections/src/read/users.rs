//! The users read model, `user_view`.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::ReadError;

/// The name of the checkpoint of the read model `user_view` belong to:
/// events after it are not in them yet.
pub const CHECKPOINT: &str = "users";

/// One user as the users read model holds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    /// The user's name, unique and the order of pages.
    pub name: String,
    /// Whether the user is an administrator.
    pub admin: bool,
    /// When the user was created.
    pub created_at: DateTime<Utc>,
    /// How many live tokens the user has.
    pub tokens: i32,
}

/// Up to `limit` users ordered by name, those after `after` when it is
/// given.
pub async fn page(
    db: impl PgExecutor<'_>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<UserRow>, ReadError> {
    Ok(sqlx::query_as(
        "SELECT name, admin, created_at, tokens FROM user_view \
         WHERE ($1::text IS NULL OR name > $1) ORDER BY name LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await?)
}
