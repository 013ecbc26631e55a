//! The figures `/readyz` and `/metrics` report about the platform's health
//! (dead letters, the oldest open transaction, the database's size),
//! measured on demand and shared for a moment, so that probes and scrapes
//! arriving together cost the database one measurement and say the same.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use store::health::{Limits, Report};
use tokio::sync::Mutex;

/// How long one measurement answers every probe.
pub const FRESH_FOR: Duration = Duration::from_secs(1);

/// Measurements of this process, one at a time.
#[derive(Debug)]
pub struct HealthChecks {
    pool: PgPool,
    limits: Limits,
    last: Mutex<Option<(Instant, Report)>>,
}

impl HealthChecks {
    /// Checks on `pool` judged by `limits`.
    pub fn new(pool: PgPool, limits: Limits) -> Self {
        Self {
            pool,
            limits,
            last: Mutex::new(None),
        }
    }

    /// The thresholds the report is judged by.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A report at most [`FRESH_FOR`] old; callers arriving while one is
    /// measured wait for it.
    ///
    /// # Errors
    /// A database error.
    pub async fn report(&self) -> Result<Report, sqlx::Error> {
        let mut last = self.last.lock().await;
        if let Some((at, report)) = last.as_ref() {
            if at.elapsed() < FRESH_FOR {
                return Ok(report.clone());
            }
        }
        let report = Report::measure(&self.pool).await?;
        *last = Some((Instant::now(), report.clone()));
        Ok(report)
    }
}
