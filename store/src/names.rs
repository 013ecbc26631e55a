//! Unique names for nodes and projects.
//!
//! The log has no unique index across aggregates, so a name is claimed in
//! `name_claims` before the aggregate's first event is appended. A claim whose
//! aggregate never came to exist (the process died in between) is taken
//! over by the next claimant.

use sqlx::PgPool;

/// Why a name could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another aggregate holds the name.
    #[error("the name {0:?} is taken")]
    Taken(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Claims `name` of `kind` (`node`, `project`) for aggregate `id`.
///
/// # Errors
/// [`ClaimError::Taken`] when an existing aggregate holds the name.
pub async fn claim(pool: &PgPool, kind: &str, name: &str, id: &str) -> Result<(), ClaimError> {
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO name_claims (kind, name, aggregate_id) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(kind)
    .bind(name)
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        tx.commit().await?;
        return Ok(());
    }
    let holder: String = sqlx::query_scalar(
        "SELECT aggregate_id FROM name_claims WHERE kind = $1 AND name = $2 FOR UPDATE",
    )
    .bind(kind)
    .bind(name)
    .fetch_one(&mut *tx)
    .await?;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_type = $1 AND aggregate_id = $2)",
    )
    .bind(kind)
    .bind(&holder)
    .fetch_one(&mut *tx)
    .await?;
    if exists && holder != id {
        return Err(ClaimError::Taken(name.to_string()));
    }
    sqlx::query("UPDATE name_claims SET aggregate_id = $3 WHERE kind = $1 AND name = $2")
        .bind(kind)
        .bind(name)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Gives up a claim made for `id`, after its command was refused.
///
/// # Errors
/// A database error.
pub async fn release(pool: &PgPool, kind: &str, name: &str, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM name_claims WHERE kind = $1 AND name = $2 AND aggregate_id = $3")
        .bind(kind)
        .bind(name)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// The aggregate id holding `name` of `kind`, if any.
///
/// # Errors
/// A database error.
pub async fn lookup(pool: &PgPool, kind: &str, name: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT aggregate_id FROM name_claims WHERE kind = $1 AND name = $2")
        .bind(kind)
        .bind(name)
        .fetch_optional(pool)
        .await
}
