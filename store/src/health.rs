//! What the database says about the platform's health: the oldest open
//! transaction (which holds every outbox consumer back), the database's
//! size against its budget, and the dead letters. Read by `/readyz`,
//! `/metrics`, `unidesk projections status` and the scheduler role's
//! watch, which also records the size in `storage_state`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;

/// From this share of the budget on, the database's size is warned about.
pub const BUDGET_WARN: f64 = 0.80;

/// From this share of the budget on, task output is refused and the
/// server reports itself degraded. Events are never refused.
pub const BUDGET_REFUSE: f64 = 0.95;

/// The oldest transaction open on the database server that has a
/// transaction id: until it ends, no consumer sees an event committed
/// after it began.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OldestTransaction {
    /// Its backend's process id; `None` for a prepared transaction.
    pub pid: Option<i32>,
    /// How long it has been open.
    #[serde(rename = "age_s", serialize_with = "seconds")]
    pub age: Duration,
    /// Its database, which may be another one of the same server.
    pub database: Option<String>,
    /// The client's `application_name`; a prepared transaction's name.
    pub application: Option<String>,
    /// Such as `idle in transaction`, or `prepared`.
    pub state: Option<String>,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// The oldest transaction with a transaction id on the whole server
/// (transaction ids are shared by its databases), prepared ones included;
/// `None` when there is none. Sessions of other users show only to a role
/// with `pg_read_all_stats` (or a superuser).
///
/// # Errors
/// A database error.
pub async fn oldest_transaction<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Option<OldestTransaction>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        pid: Option<i32>,
        age_s: f64,
        database: Option<String>,
        application: Option<String>,
        state: Option<String>,
    }
    let row: Option<Row> = sqlx::query_as(
            "SELECT pid, age_s, database, application, state FROM ( \
               SELECT pid, extract(epoch FROM clock_timestamp() - xact_start)::float8 AS age_s, \
                      datname::text AS database, application_name::text AS application, \
                      state::text AS state \
               FROM pg_stat_activity \
               WHERE backend_xid IS NOT NULL AND xact_start IS NOT NULL AND pid <> pg_backend_pid() \
               UNION ALL \
               SELECT NULL, extract(epoch FROM clock_timestamp() - prepared)::float8, \
                      database::text, gid, 'prepared' \
               FROM pg_prepared_xacts \
             ) open ORDER BY age_s DESC LIMIT 1",
        )
        .fetch_optional(db)
        .await?;
    Ok(row.map(|r| OldestTransaction {
        pid: r.pid,
        age: Duration::from_secs_f64(r.age_s.max(0.0)),
        database: r.database,
        application: r.application,
        state: r.state,
    }))
}

/// The size of the current database on disk, in bytes.
///
/// # Errors
/// A database error.
pub async fn database_size<'e>(db: impl PgExecutor<'e>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(db)
        .await
}

/// The database's size as last measured against its budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Storage {
    /// Its size then, in bytes.
    pub database_bytes: i64,
    /// The budget it was measured against, in bytes; 0 for none.
    pub budget_bytes: i64,
    /// Whether task output is refused now.
    pub output_refused: bool,
    /// When; `None` when never measured.
    pub measured_at: Option<DateTime<Utc>>,
}

/// The size last recorded by [`record_storage`].
///
/// # Errors
/// A database error.
pub async fn storage<'e>(db: impl PgExecutor<'e>) -> Result<Storage, sqlx::Error> {
    sqlx::query_as(
        "SELECT database_bytes, budget_bytes, output_refused, measured_at FROM storage_state",
    )
    .fetch_one(db)
    .await
}

/// Records a measurement, and whether task output is refused from now on
/// (a trigger on `task_log` reads it).
///
/// # Errors
/// A database error.
pub async fn record_storage<'e>(
    db: impl PgExecutor<'e>,
    database_bytes: i64,
    budget_bytes: i64,
    output_refused: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE storage_state SET database_bytes = $1, budget_bytes = $2, output_refused = $3, \
           measured_at = now()",
    )
    .bind(database_bytes)
    .bind(budget_bytes)
    .bind(output_refused)
    .execute(db)
    .await?;
    Ok(())
}

/// Share of `budget` that `bytes` take; `None` without a budget.
pub fn budget_used(bytes: i64, budget: u64) -> Option<f64> {
    (budget > 0).then(|| bytes.max(0) as f64 / budget as f64)
}

/// What `/readyz` and `/metrics` report: each figure measured now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Dead letters per consumer that has any.
    pub dead_letters: Vec<(String, i64)>,
    /// The oldest open transaction with an id.
    pub oldest_transaction: Option<OldestTransaction>,
    /// The database's size now, in bytes.
    pub database_bytes: i64,
    /// Whether task output is refused (as the scheduler role last decided).
    pub output_refused: bool,
}

/// Thresholds a [`Report`] is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The database's budget in bytes; 0 for none.
    pub db_budget_bytes: u64,
    /// An open transaction older than this is a stall.
    pub stall_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            db_budget_bytes: 0,
            stall_after: Duration::from_secs(30),
        }
    }
}

impl Report {
    /// Measures everything now.
    ///
    /// # Errors
    /// A database error.
    pub async fn measure(pool: &sqlx::PgPool) -> Result<Self, sqlx::Error> {
        Ok(Self {
            dead_letters: crate::dead_letters::counts(pool).await?,
            oldest_transaction: oldest_transaction(pool).await?,
            database_bytes: database_size(pool).await?,
            output_refused: storage(pool).await?.output_refused,
        })
    }

    /// Why the platform is degraded, in words for operators; empty when
    /// it is not. Names no aggregate and no error text: `/readyz` is
    /// public.
    pub fn problems(&self, limits: &Limits) -> Vec<String> {
        let mut out = Vec::new();
        for (consumer, n) in &self.dead_letters {
            out.push(format!(
                "consumer {consumer} skipped {n} event(s) it could not apply and is inconsistent; \
                 see `unidesk projections status`, fix the cause, then `unidesk projections retry {consumer}`"
            ));
        }
        if let Some(t) = self
            .oldest_transaction
            .as_ref()
            .filter(|t| t.age > limits.stall_after)
        {
            out.push(format!(
                "a transaction open for {:.0} s (pid {}) holds every outbox consumer back",
                t.age.as_secs_f64(),
                t.pid
                    .map_or_else(|| "none: prepared".into(), |p| p.to_string()),
            ));
        }
        if let Some(used) =
            budget_used(self.database_bytes, limits.db_budget_bytes).filter(|u| *u >= BUDGET_REFUSE)
        {
            out.push(format!(
                "the database uses {:.0}% of its budget of {} bytes; task output is refused",
                used * 100.0,
                limits.db_budget_bytes
            ));
        } else if self.output_refused {
            out.push("task output is refused: the database was over its size budget".into());
        }
        out
    }
}
