//! The janitor: keeps task output and the database within bounds, and says
//! when the platform is held back.
//!
//! Run by the scheduler role, by one process at a time: it holds a
//! PostgreSQL advisory lock ([`LOCK`]) on a connection of its own, and
//! other scheduler processes stand by. Its two duties, each safe to run
//! twice at once all the same (every step is idempotent):
//!
//! - [`Janitor::watch`], every [`WATCH_EVERY`]: measures the database
//!   against `--db-budget-gb` and records in `storage_state` whether task
//!   output is refused (from [`BUDGET_REFUSE`] of the budget; a trigger on
//!   `task_log` then refuses new chunks, and the ingress tells the agent).
//!   Logs a warning from [`BUDGET_WARN`] of the budget, while a
//!   transaction older than the stall threshold holds every outbox
//!   consumer back, and while consumers hold dead letters.
//! - [`Janitor::sweep`], every [`SWEEP_EVERY`]: removes the output of
//!   finished tasks only, oldest finished first: those that finished
//!   longer ago than `--log-retention-days`, then, while all stored output
//!   together is over `--log-budget-gb`, the oldest others. Each task's
//!   attempts are first marked removed (readers are told at once), then
//!   its chunks deleted [`BATCH_ROWS`] at a time in short statements, so
//!   no long transaction holds the outbox back. Events are never touched.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use domain::task::Task;
use sqlx::{Connection, PgConnection};
use store::health::{budget_used, Limits, Report, BUDGET_REFUSE, BUDGET_WARN};
use store::task_log::{self, RemovedBy};
use store::Store;
use uuid::Uuid;

/// The advisory lock the janitor holds ("janitor\0" in ASCII).
pub const LOCK: i64 = 0x6a61_6e69_746f_7200;

/// How often the database is measured.
pub const WATCH_EVERY: Duration = Duration::from_secs(15);

/// How often output past retention or budget is looked for.
pub const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// Chunks deleted per statement.
pub const BATCH_ROWS: i64 = 200;

/// The most tasks whose output one sweep removes; a sweep that reaches it
/// is followed by another at once.
pub const TASKS_PER_SWEEP: usize = 200;

/// The least time between two warnings of one kind.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What the janitor keeps within bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Output of tasks that finished longer ago than this is removed;
    /// `None` keeps it.
    pub retention: Option<Duration>,
    /// Stored output of all tasks together is kept under this many bytes
    /// by removing the oldest finished tasks' output; 0 for no bound.
    pub log_budget_bytes: u64,
    /// The database's size budget and the stall threshold.
    pub limits: Limits,
}

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Tasks whose output was removed.
    pub tasks: usize,
    /// Chunks deleted.
    pub chunks: u64,
    /// Output bytes removed.
    pub bytes: i64,
}

/// The janitor of one process.
pub struct Janitor {
    store: Store,
    config: Config,
    /// When each kind of warning was last logged.
    warned: Mutex<HashMap<&'static str, Instant>>,
}

impl Janitor {
    /// A janitor on `store`.
    pub fn new(store: Store, config: Config) -> Self {
        Self {
            store,
            config,
            warned: Mutex::new(HashMap::new()),
        }
    }

    /// Runs until `shutdown`: waits for the lock, then watches and sweeps
    /// on their intervals until the lock's connection is lost.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut lock: Option<PgConnection> = None;
        let mut next_sweep = Instant::now();
        loop {
            if lock.is_none() {
                lock = self.lock().await;
            } else if let Some(conn) = lock.as_mut() {
                if let Err(e) = sqlx::query("SELECT 1").execute(conn).await {
                    tracing::warn!(error = %e, "the janitor lost its lock's connection");
                    lock = None;
                }
            }
            if lock.is_some() {
                if let Err(e) = self.watch().await {
                    tracing::warn!(error = %e, "measuring the database failed");
                }
                if Instant::now() >= next_sweep {
                    match self.sweep(Utc::now()).await {
                        Ok(s) if s.tasks >= TASKS_PER_SWEEP => {
                            tracing::info!(?s, "removed task output; more to remove");
                            continue;
                        }
                        Ok(s) => {
                            if s.tasks > 0 {
                                tracing::info!(?s, "removed task output");
                            }
                            next_sweep = Instant::now() + SWEEP_EVERY;
                        }
                        Err(e) => tracing::warn!(error = %e, "removing task output failed"),
                    }
                }
            }
            tokio::select! {
                _ = &mut shutdown => {
                    if let Some(conn) = lock {
                        let _ = conn.close().await;
                    }
                    return;
                }
                _ = tokio::time::sleep(WATCH_EVERY) => {}
            }
        }
    }

    /// A connection holding [`LOCK`], or `None` when another process holds
    /// it (or the database cannot be reached).
    async fn lock(&self) -> Option<PgConnection> {
        let mut conn = PgConnection::connect_with(&self.store.pool().connect_options())
            .await
            .map_err(|e| tracing::debug!(error = %e, "the janitor cannot connect"))
            .ok()?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK)
            .fetch_one(&mut conn)
            .await
            .ok()?;
        if locked {
            tracing::info!("the janitor runs in this process");
            Some(conn)
        } else {
            let _ = conn.close().await;
            None
        }
    }

    /// Whether a warning of `kind` is due, and notes that it is given.
    fn due(&self, kind: &'static str) -> bool {
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match warned.get(kind) {
            Some(at) if at.elapsed() < WARN_EVERY => false,
            _ => {
                warned.insert(kind, Instant::now());
                true
            }
        }
    }

    /// Measures the database, records its size and whether task output is
    /// refused, and warns about what needs an operator. Returns what it
    /// measured.
    ///
    /// # Errors
    /// A database error.
    pub async fn watch(&self) -> Result<Report, sqlx::Error> {
        let pool = self.store.pool();
        let limits = &self.config.limits;
        let mut report = Report::measure(pool).await?;
        let budget = limits.db_budget_bytes;
        let used = budget_used(report.database_bytes, budget);
        let refuse = used.is_some_and(|u| u >= BUDGET_REFUSE);
        if refuse != report.output_refused {
            if refuse {
                tracing::warn!(
                    database_bytes = report.database_bytes,
                    budget_bytes = budget,
                    "the database is over {:.0}% of its budget: task output is refused until it is \
                     under again (events are still stored)",
                    BUDGET_REFUSE * 100.0
                );
            } else {
                tracing::info!(
                    database_bytes = report.database_bytes,
                    "the database is within its budget again: task output is stored"
                );
            }
        }
        store::health::record_storage(
            pool,
            report.database_bytes,
            i64::try_from(budget).unwrap_or(i64::MAX),
            refuse,
        )
        .await?;
        report.output_refused = refuse;
        if let Some(used) = used.filter(|u| *u >= BUDGET_WARN) {
            if self.due("budget") {
                tracing::warn!(
                    database_bytes = report.database_bytes,
                    budget_bytes = budget,
                    "the database uses {:.0}% of its budget (--db-budget-gb); task output is refused \
                     from {:.0}%",
                    used * 100.0,
                    BUDGET_REFUSE * 100.0
                );
            }
        }
        if let Some(t) = report
            .oldest_transaction
            .as_ref()
            .filter(|t| t.age > limits.stall_after)
        {
            if self.due("stall") {
                tracing::warn!(
                    pid = ?t.pid,
                    database = ?t.database,
                    application = ?t.application,
                    state = ?t.state,
                    "a transaction has been open for {:.0} s: every outbox consumer (read models, \
                     scheduler, ingress, timeline) waits for it to end",
                    t.age.as_secs_f64()
                );
            }
        }
        if !report.dead_letters.is_empty() && self.due("dead_letters") {
            tracing::warn!(
                dead_letters = ?report.dead_letters,
                "outbox consumers skipped events they could not apply; see `unidesk projections status`"
            );
        }
        Ok(report)
    }

    /// Removes, as of `now`, the output of finished tasks past the
    /// retention, then of the oldest finished tasks while all output is
    /// over its budget; at most [`TASKS_PER_SWEEP`] tasks.
    ///
    /// # Errors
    /// A database error; what was removed before it stays removed.
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<Swept, sqlx::Error> {
        let mut swept = Swept::default();
        let mut passed = Vec::new();
        if let Some(retention) = self.config.retention {
            let cutoff =
                now - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
            while swept.tasks < TASKS_PER_SWEEP {
                let batch =
                    task_log::finished_with_output(self.store.pool(), cutoff, &passed, 50).await?;
                if batch.is_empty() {
                    break;
                }
                for stored in batch {
                    self.remove(stored, RemovedBy::Retention, &mut swept, &mut passed)
                        .await?;
                }
            }
        }
        let budget = i64::try_from(self.config.log_budget_bytes).unwrap_or(i64::MAX);
        if budget > 0 {
            let mut total = task_log::total_bytes(self.store.pool()).await?;
            while total > budget && swept.tasks < TASKS_PER_SWEEP {
                let batch =
                    task_log::finished_with_output(self.store.pool(), now, &passed, 50).await?;
                if batch.is_empty() {
                    if self.due("log_budget") {
                        tracing::warn!(
                            stored_bytes = total,
                            budget_bytes = budget,
                            "task output is over its budget (--log-budget-gb), but all of it \
                             belongs to tasks that have not finished"
                        );
                    }
                    break;
                }
                for stored in batch {
                    if total <= budget {
                        break;
                    }
                    let bytes = stored.bytes;
                    if self
                        .remove(stored, RemovedBy::LogBudget, &mut swept, &mut passed)
                        .await?
                    {
                        total -= bytes;
                    }
                }
            }
        }
        Ok(swept)
    }

    /// Removes one task's output when its aggregate confirms it finished
    /// (the read model it was found in may lag or hold a dead letter);
    /// otherwise passes it over for the rest of the sweep.
    async fn remove(
        &self,
        stored: task_log::Stored,
        reason: RemovedBy,
        swept: &mut Swept,
        passed: &mut Vec<Uuid>,
    ) -> Result<bool, sqlx::Error> {
        let task_id = stored.task_id;
        let finished = match self.store.load::<Task>(&task_id.to_string()).await {
            Ok(task) => task.is_some_and(|t| t.state.state.is_terminal()),
            Err(e) => {
                tracing::warn!(%task_id, error = %e, "cannot load a task to remove its output");
                false
            }
        };
        if !finished {
            passed.push(task_id);
            return Ok(false);
        }
        let pool = self.store.pool();
        task_log::mark_removed(pool, task_id, reason).await?;
        loop {
            let n = task_log::remove_batch(pool, task_id, BATCH_ROWS).await?;
            if n == 0 {
                break;
            }
            swept.chunks += n;
        }
        swept.tasks += 1;
        swept.bytes += stored.bytes;
        tracing::debug!(%task_id, bytes = stored.bytes, reason = reason.as_str(), "removed task output");
        Ok(true)
    }
}
