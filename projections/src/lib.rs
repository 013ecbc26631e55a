//! UniDesk's read models and the projector that writes them.
//!
//! Every read model is a function of the event log. The projector reads the
//! outbox in its global order and applies each event to each read model in
//! one transaction together with that model's checkpoint, so a crash
//! anywhere replays cleanly and applying an event twice changes nothing.
//! [`Projector::rebuild`] replays the whole log into shadow copies of the
//! models while the server keeps running, then switches them in at once:
//! readers keep seeing the old content until the new one is complete.
//! [`replay`] explains the log aggregate by aggregate, for people.

mod models;
pub mod read;
mod rebuild;
pub mod replay;
pub mod summary;

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::{Connection, PgConnection, PgPool};
use store::outbox::{self, Checkpoint, Filter, RecordedEvent};
use store::Wakeup;

pub use models::all;
pub use rebuild::Rebuilt;

/// Why a projection could not advance.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored event could not be read by this version of the code.
    #[error("event at position {position} ({event_type}) cannot be applied: {reason}")]
    Undecodable {
        /// The event's outbox position.
        position: i64,
        /// Its type.
        event_type: String,
        /// What went wrong.
        reason: String,
    },
    /// No projection has that name.
    #[error("no projection is named {0:?}")]
    Unknown(String),
    /// A rebuild could not run or finish.
    #[error("{0}")]
    Rebuild(String),
}

/// One read model.
pub trait Projection: Send + Sync {
    /// Its name, also its checkpoint's name.
    fn name(&self) -> &'static str;
    /// The tables it writes, emptied before a rebuild.
    fn tables(&self) -> &'static [&'static str];
    /// Applies one event inside the projector's transaction. Must be
    /// idempotent and depend on nothing but the log.
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        event: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), ProjectionError>>;
}

/// Where one projection stands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// The projection's name.
    pub name: &'static str,
    /// The last event it applied.
    pub checkpoint: Checkpoint,
    /// How many visible events it has not applied yet.
    pub lag: i64,
}

/// Applies the log to every read model.
pub struct Projector {
    pool: PgPool,
    projections: Vec<Box<dyn Projection>>,
    batch: i64,
}

/// The longest [`Projector::catch_up`] waits for events hidden behind an
/// older open transaction.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(30);

/// Events applied per projection per transaction.
pub const BATCH: i64 = 500;

impl Projector {
    /// A projector for every read model on `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            projections: all(),
            batch: BATCH,
        }
    }

    /// A projector for the named read models only, such as the ones a
    /// role must see fresh before it acts.
    ///
    /// # Errors
    /// [`ProjectionError::Unknown`] for a name that is no read model.
    pub fn only(pool: PgPool, names: &[&str]) -> Result<Self, ProjectionError> {
        if let Some(unknown) = names
            .iter()
            .find(|n| !all().iter().any(|p| p.name() == **n))
        {
            return Err(ProjectionError::Unknown((*unknown).to_string()));
        }
        Ok(Self {
            pool,
            projections: all()
                .into_iter()
                .filter(|p| names.contains(&p.name()))
                .collect(),
            batch: BATCH,
        })
    }

    /// The names of the read models.
    pub fn names(&self) -> Vec<&'static str> {
        self.projections.iter().map(|p| p.name()).collect()
    }

    /// Applies at most one batch of new events to each read model and
    /// returns how many event applications were made (0 when caught up).
    ///
    /// # Errors
    /// A database error or an event this code cannot apply; the failing
    /// batch is rolled back whole.
    pub async fn run_once(&self) -> Result<usize, ProjectionError> {
        let mut applied = 0;
        for p in &self.projections {
            applied += self.advance(p.as_ref(), self.batch).await?;
        }
        Ok(applied)
    }

    #[tracing::instrument(
        name = "projector_round",
        skip_all,
        fields(projection = p.name(), events = tracing::field::Empty)
    )]
    async fn advance(&self, p: &dyn Projection, limit: i64) -> Result<usize, ProjectionError> {
        // Ended explicitly on every path: a dropped transaction is only
        // rolled back when its connection is next used, and until then its
        // transaction id (taken by the checkpoint's row lock) holds back
        // every outbox reader on the server.
        let mut tx = self.pool.begin().await?;
        let Some(from) = outbox::try_lock_checkpoint(&mut tx, p.name()).await? else {
            tx.rollback().await?;
            return Ok(0);
        };
        let events = outbox::read_after(&mut *tx, from, limit, &Filter::default()).await?;
        let Some(last) = events.last().map(RecordedEvent::checkpoint) else {
            tx.rollback().await?;
            return Ok(0);
        };
        for event in &events {
            p.apply(&mut tx, event).await?;
        }
        outbox::save_checkpoint(&mut tx, p.name(), last).await?;
        tx.commit().await?;
        tracing::Span::current().record("events", events.len());
        Ok(events.len())
    }

    /// Applies everything visible now, without waiting.
    ///
    /// # Errors
    /// As [`Projector::run_once`].
    pub async fn drain(&self) -> Result<usize, ProjectionError> {
        let mut total = 0;
        loop {
            let n = self.run_once().await?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// Applies everything committed before the call. Events stay invisible
    /// to readers while an older transaction is open anywhere on the
    /// server, so this waits for them, at most [`CATCH_UP_WAIT`]; after that
    /// it returns with what it could apply.
    ///
    /// # Errors
    /// As [`Projector::run_once`].
    pub async fn catch_up(&self) -> Result<usize, ProjectionError> {
        let target = outbox::committed_head(&self.pool).await?;
        let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        let mut total = self.drain().await?;
        loop {
            let mut conn = self.pool.acquire().await?;
            let mut behind = false;
            for p in &self.projections {
                behind |= outbox::load_checkpoint(&mut conn, p.name(), false).await? < target;
            }
            drop(conn);
            if !behind || tokio::time::Instant::now() >= deadline {
                return Ok(total);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            total += self.drain().await?;
        }
    }

    /// Runs until `shutdown` completes: catches up, then waits for a NOTIFY
    /// or the poll interval. Errors are logged and retried after a pause.
    pub async fn run(&self, poll: Duration, shutdown: impl Future<Output = ()>) {
        let mut wake = Wakeup::new(self.pool.clone(), poll).await;
        tokio::pin!(shutdown);
        loop {
            if let Err(e) = self.drain().await {
                tracing::error!(error = %e, "projector failed; retrying");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = wake.wait() => {}
            }
        }
    }

    /// Rebuilds the named read model (all of them with `None`) from the
    /// whole log while everything else keeps running, and returns the event
    /// applications made.
    ///
    /// The new tables are built beside the live ones in short transactions,
    /// so the server's outbox consumers are never held back by a long one
    /// and the running projector goes on keeping the live tables fresh.
    /// One short transaction then takes the models' checkpoints (the
    /// running projector skips them meanwhile), applies what arrived since,
    /// swaps the new tables in and moves the checkpoints: readers see the
    /// old content until that commit and the new one after it, never a
    /// half-built table. Every chosen model is built in the same pass over
    /// the log and switched in the same transaction. One rebuild runs at a
    /// time. How it works: the `rebuild` module.
    ///
    /// # Errors
    /// [`ProjectionError::Unknown`] for a name that is no read model, or as
    /// [`Projector::run_once`], or [`ProjectionError::Rebuild`] when
    /// another rebuild is running or readers kept the swap from happening.
    /// On any error nothing live has changed and the new tables are gone.
    pub async fn rebuild(&self, name: Option<&str>) -> Result<usize, ProjectionError> {
        Ok(self.rebuild_report(name).await?.applications)
    }

    /// [`Projector::rebuild`], saying how much it did and how long each
    /// phase took.
    ///
    /// # Errors
    /// As [`Projector::rebuild`].
    pub async fn rebuild_report(&self, name: Option<&str>) -> Result<Rebuilt, ProjectionError> {
        let chosen: Vec<&dyn Projection> = self
            .projections
            .iter()
            .map(AsRef::as_ref)
            .filter(|p| name.is_none_or(|n| n == p.name()))
            .collect();
        if chosen.is_empty() {
            return Err(ProjectionError::Unknown(name.unwrap_or_default().into()));
        }
        // Never a pooled connection: its search path finds the new tables
        // before the live ones, and must not outlive the rebuild.
        let mut conn = PgConnection::connect_with(&self.pool.connect_options()).await?;
        let rebuilt = rebuild::run(&mut conn, &chosen).await;
        let _ = conn.close().await;
        rebuilt
    }

    /// Each read model's checkpoint and lag.
    ///
    /// # Errors
    /// A database error.
    pub async fn status(&self) -> Result<Vec<Status>, ProjectionError> {
        let mut conn = self.pool.acquire().await?;
        let mut out = Vec::new();
        for p in &self.projections {
            let checkpoint = outbox::load_checkpoint(&mut conn, p.name(), false).await?;
            let lag: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox WHERE (txid, position) > ($1::text::xid8, $2) \
                 AND txid < pg_snapshot_xmin(pg_current_snapshot())",
            )
            .bind(checkpoint.txid.to_string())
            .bind(checkpoint.position)
            .fetch_one(&mut *conn)
            .await?;
            out.push(Status {
                name: p.name(),
                checkpoint,
                lag,
            });
        }
        Ok(out)
    }
}
