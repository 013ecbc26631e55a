//! The scheduler leader's lease, `scheduler_leader`: one row naming the
//! current term, its holder and when the lease runs out by the database's
//! clock.
//!
//! A scheduler takes the lease only when it has expired (or is its own),
//! and every take starts a new term. The leader renews the lease every few
//! seconds; every assignment it makes names its term, and a trigger on the
//! event log refuses an assignment whose term is not the current one, or
//! whose lease ran out (SQLSTATE [`FENCED`]). The trigger holds the row
//! `FOR KEY SHARE` while it appends, and a take bumps the term (a key
//! update), so a take waits for assignments in flight and every assignment
//! after it sees the new term. Renewals change only `expires_at` and never
//! wait for assignments.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// The SQLSTATE of an assignment fenced off: its term is not the current
/// leader's, or it names none while a leader holds the lease.
pub const FENCED: &str = "UDF01";

/// How long a take waits for assignments in flight before it gives up
/// for now: the previous leader's are quick, or its session is about to be
/// ended by the database.
const TAKE_LOCK_TIMEOUT: &str = "2s";

/// The lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Lease {
    /// The current term; 0 before any scheduler led.
    pub term: i64,
    /// Who holds it, as the holder named itself.
    pub holder: String,
    /// When it runs out unless renewed.
    pub expires_at: DateTime<Utc>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Takes the lease for `holder` for `lease` when it has expired or is
/// `holder`'s already, starting a new term; returns that term, or `None`
/// when another holder's lease is still running (or its assignments in
/// flight did not end in time).
///
/// # Errors
/// A database error.
pub async fn take(
    pool: &PgPool,
    holder: &str,
    lease: Duration,
) -> Result<Option<i64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("SET LOCAL lock_timeout = '{TAKE_LOCK_TIMEOUT}'"))
        .execute(&mut *tx)
        .await?;
    let taken = sqlx::query_scalar(
        "UPDATE scheduler_leader \
         SET term = term + 1, holder = $1, expires_at = clock_timestamp() + make_interval(secs => $2) \
         WHERE expires_at <= clock_timestamp() OR holder = $1 \
         RETURNING term",
    )
    .bind(holder)
    .bind(secs(lease))
    .fetch_optional(&mut *tx)
    .await;
    match taken {
        Ok(term) => {
            tx.commit().await?;
            Ok(term)
        }
        // lock_not_available: assignments in flight; try again later.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Extends `holder`'s lease of `term` by `lease` from now; whether it was
/// still theirs and running.
///
/// # Errors
/// A database error.
pub async fn renew(
    pool: &PgPool,
    holder: &str,
    term: i64,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE scheduler_leader SET expires_at = clock_timestamp() + make_interval(secs => $3) \
         WHERE term = $1 AND holder = $2 AND expires_at > clock_timestamp()",
    )
    .bind(term)
    .bind(holder)
    .bind(secs(lease))
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Ends `holder`'s lease of `term` now, so a standby takes over at once.
///
/// # Errors
/// A database error.
pub async fn release(pool: &PgPool, holder: &str, term: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE scheduler_leader SET expires_at = least(expires_at, clock_timestamp()) \
         WHERE term = $1 AND holder = $2",
    )
    .bind(term)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(())
}

/// The lease as it stands.
///
/// # Errors
/// A database error.
pub async fn current(pool: &PgPool) -> Result<Lease, sqlx::Error> {
    sqlx::query_as("SELECT term, holder, expires_at FROM scheduler_leader")
        .fetch_one(pool)
        .await
}
