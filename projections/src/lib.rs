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
//!
//! An event a read model cannot apply for good (its payload does not fit,
//! the model's table refuses it, the model's code fails or panics on it)
//! stops only that model, and only for that event's aggregate: the event
//! is recorded as a dead letter ([`store::dead_letters`]) and skipped. A
//! model that builds state per aggregate (tasks, nodes, projects, users)
//! also records and skips the later events of that aggregate, since
//! applying them to a state missing one would show a state that never
//! was; the timeline, which writes each event on its own, skips only the
//! bad one. Every other aggregate and every other model goes on. A model
//! with dead letters is inconsistent ([`Status::consistent`]) until
//! [`Projector::retry`] applies them (once the cause is fixed) or
//! [`Projector::rebuild`] rebuilds it. A failure that may pass by itself
//! (a lost connection, a timeout) is retried as before and never recorded.

mod fill;
mod models;
pub mod read;
mod rebuild;
pub mod replay;
pub mod summary;

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use sqlx::{Connection, PgConnection, PgPool};
use store::dead_letters;
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

impl ProjectionError {
    /// Whether the failure may pass by itself (the database unreachable, a
    /// timeout, a deadlock), so the event is tried again rather than
    /// recorded as a dead letter.
    pub fn is_transient(&self) -> bool {
        match self {
            ProjectionError::Database(e) => store::is_transient(e),
            _ => false,
        }
    }
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
    /// Whether the model builds state per aggregate, event after event:
    /// then an event it cannot apply holds back the later events of its
    /// aggregate too. A model that writes each event on its own says
    /// `false`, and skips only the event that failed.
    fn per_aggregate(&self) -> bool {
        true
    }
    /// Applies `events`, in order, in a few statements for the whole batch
    /// rather than a few per event; `None` when the model applies one
    /// event at a time ([`Projection::apply`]). It must leave the model
    /// exactly as applying the events one by one would.
    fn apply_set<'a>(
        &'a self,
        _conn: &'a mut PgConnection,
        _events: &'a [&'a RecordedEvent],
    ) -> Option<BoxFuture<'a, Result<(), SetError>>> {
        None
    }
    /// Applies `events` while a rebuild fills the model's new tables,
    /// which hold no row of any of them yet and only their keys and
    /// unique indexes; by default as [`Projection::apply_set`]. A model
    /// that writes one row per event may write them by `COPY` here.
    fn fill_set<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [&'a RecordedEvent],
    ) -> Option<BoxFuture<'a, Result<(), SetError>>> {
        self.apply_set(conn, events)
    }
    /// What fills the model's new tables in a rebuild in place of
    /// [`Projection::fill_set`], keeping rows in memory between batches
    /// instead of reading them back, at most `rows_held` of them; `None`
    /// (the default) when the model has nothing to keep.
    fn filler(&self, _rows_held: usize) -> Option<Box<dyn Filler>> {
        None
    }
}

/// Fills one model's new tables in a rebuild, batch after batch of the
/// log, holding the rows it builds in memory and writing each once it
/// lets go of it, rather than reading it back and writing it again for
/// every batch that changes it. Each batch runs in a transaction of the
/// rebuild's; the filler's memory follows that transaction: a batch's
/// changes are kept when it commits ([`Filler::committed`]) and forgotten
/// when it is rolled back ([`Filler::rolled_back`]), so a batch applied
/// again without an event it could not apply starts from where the last
/// committed one left off.
pub trait Filler: Send {
    /// Applies `events` (in log order) to the rows held, writing on
    /// `conn`, inside the caller's transaction, some it lets go of to
    /// make room (as many as one short transaction should). What it held
    /// before does not change until [`Filler::committed`]. An error
    /// blames an event as [`Projection::apply_set`]'s does.
    fn fill<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
        events: &'a [&'a RecordedEvent],
    ) -> BoxFuture<'a, Result<(), SetError>>;
    /// Writes some of the rows still held (as many as one short
    /// transaction should), inside the caller's transaction; they are
    /// let go of once it commits ([`Filler::committed`]). `true` when no
    /// other row is left.
    fn finish<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<bool, SetError>>;
    /// The transaction of the last [`Filler::fill`] or
    /// [`Filler::finish`] committed: its changes are kept.
    fn committed(&mut self);
    /// The transaction of the last [`Filler::fill`] or
    /// [`Filler::finish`] was rolled back: its changes are forgotten.
    fn rolled_back(&mut self);
}

/// Why [`Projection::apply_set`] failed.
#[derive(Debug)]
pub struct SetError {
    /// The outbox position of the event to blame, when one is: it is then
    /// recorded as a dead letter and the batch applied again without it.
    /// `None` (a statement for the whole batch failed) applies the batch
    /// again one event at a time, to find the event to blame.
    pub position: Option<i64>,
    /// What went wrong.
    pub error: ProjectionError,
}

impl SetError {
    /// An error to blame on `event`.
    pub fn at(event: &RecordedEvent, error: ProjectionError) -> Self {
        Self {
            position: Some(event.position),
            error,
        }
    }
}

impl From<sqlx::Error> for SetError {
    fn from(e: sqlx::Error) -> Self {
        Self {
            position: None,
            error: e.into(),
        }
    }
}

/// Told of every batch a read model committed, once the commit is done:
/// for figures computed from the events as the projector sees them, such as
/// how long tasks waited for a node. Each batch is committed by one
/// projector (the read model's checkpoint row is locked), so when every
/// projector that applies a model has the observer, every event reaches
/// one observer once, except after a crash between the commit and the
/// call. A rebuild tells no observer: it replays history.
pub trait Observer: Send + Sync {
    /// Read model `projection` has just committed `events`.
    fn committed<'a>(
        &'a self,
        projection: &'static str,
        events: &'a [RecordedEvent],
    ) -> BoxFuture<'a, ()>;
}

/// Applies `event` to `p`, turning a panic of the model's code into an
/// error like any other, so that it is recorded rather than killing the
/// projector.
async fn apply_guarded(
    p: &dyn Projection,
    conn: &mut PgConnection,
    event: &RecordedEvent,
) -> Result<(), ProjectionError> {
    match AssertUnwindSafe(p.apply(conn, event)).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(ProjectionError::Undecodable {
                position: event.position,
                event_type: event.event_type.clone(),
                reason: format!("the read model's code panicked: {what}"),
            })
        }
    }
}

/// The dead-letter error of an event held back behind an earlier one of
/// its aggregate.
fn held_back(event: &RecordedEvent, first: Checkpoint) -> String {
    format!(
        "held back: event at position {} of {} {} could not be applied before it",
        first.position, event.aggregate_type, event.aggregate_id
    )
}

/// What a model does with one event of a batch, given the events found
/// unappliable (`failed`, by position) and the aggregates held back
/// (`held`, with the place of their first dead letter).
enum Verdict {
    /// Apply it.
    Apply,
    /// Record it as a dead letter with this error, and skip it.
    Record(String),
}

fn verdict(
    p: &dyn Projection,
    event: &RecordedEvent,
    failed: &HashMap<i64, String>,
    held: &mut HashMap<(String, String), Checkpoint>,
) -> Verdict {
    // Nearly always both are empty: no key is built for them.
    let key = || (event.aggregate_type.clone(), event.aggregate_id.clone());
    if !held.is_empty() {
        if let Some(first) = held
            .get(&key())
            .filter(|first| event.checkpoint() > **first)
        {
            return Verdict::Record(held_back(event, *first));
        }
    }
    match failed.get(&event.position) {
        Some(error) => {
            if p.per_aggregate() {
                held.entry(key()).or_insert(event.checkpoint());
            }
            Verdict::Record(error.clone())
        }
        None => Verdict::Apply,
    }
}

/// One model's batch failed on `event` for good.
struct Poisoned<'e> {
    /// The event to blame; `None` when a set-based application failed as
    /// a whole (the batch is then applied again one event at a time).
    event: Option<&'e RecordedEvent>,
    error: ProjectionError,
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
    /// How many events it skipped because it could not apply them.
    pub dead_letters: i64,
    /// Whether it reflects every event up to its checkpoint: no dead
    /// letters.
    pub consistent: bool,
}

/// What [`Projector::retry`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retried {
    /// Dead letters whose events applied now, and that are gone.
    pub cleared: usize,
    /// Dead letters left: their events still fail, or wait behind one
    /// that does.
    pub remaining: usize,
}

/// Applies the log to every read model.
pub struct Projector {
    pool: PgPool,
    projections: Vec<Arc<dyn Projection>>,
    batch: i64,
    observer: Option<Arc<dyn Observer>>,
    rows_held: usize,
}

/// The longest [`Projector::catch_up`] waits for events hidden behind an
/// older open transaction.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(30);

/// Events applied per projection per transaction.
pub const BATCH: i64 = 500;

/// How many rows of a read model with a row per aggregate (tasks, nodes)
/// a rebuild holds in memory while it fills the model's new table (see
/// [`Filler`]), and, in [`ROW_BYTES`] each, how much memory they may take
/// together: a task's row is a few kilobytes, a large one up to a
/// megabyte.
pub const ROWS_HELD: usize = 10_000;

/// The bytes each of [`ROWS_HELD`] rows may take on average; a row whose
/// size is not estimated counts as this much.
pub const ROW_BYTES: usize = 8 * 1024;

/// How long the projector lets a wake-up settle before it reads the log.
/// The read models are not on the path from a submission to its node (the
/// scheduler and the ingress follow the log themselves), so the projector
/// gives way to that path on a commit instead of contending with it for
/// the database and the cores, and each of its batches takes in what
/// arrived meanwhile.
const SETTLE: Duration = Duration::from_millis(5);

impl Projector {
    /// A projector for every read model on `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            projections: all(),
            batch: BATCH,
            observer: None,
            rows_held: ROWS_HELD,
        }
    }

    /// The same projector reading at most `events` events per batch
    /// ([`BATCH`] by default; at least 1).
    pub fn with_batch(mut self, events: i64) -> Self {
        self.batch = events.max(1);
        self
    }

    /// The same projector holding at most `rows` rows per read model in
    /// memory while it rebuilds, of at most [`ROW_BYTES`] each on average
    /// ([`ROWS_HELD`] by default; at least 1): fewer take less memory, and
    /// write and read back more rows.
    pub fn with_rows_held(mut self, rows: usize) -> Self {
        self.rows_held = rows.max(1);
        self
    }

    /// The same projector telling `observer` of every batch it commits.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
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
            observer: None,
            rows_held: ROWS_HELD,
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
        // One read of the log per round, from the read model furthest
        // behind: each model applies the part of the batch after its own
        // checkpoint (the batch is in checkpoint order). Models standing
        // apart (one held by another copy of the projector for a round, one
        // that failed) so cost no second read of events the first already
        // brought, and a wake-up with nothing new costs two statements.
        let at = self.checkpoints().await?;
        let Some(&earliest) = at.iter().min() else {
            return Ok(0);
        };
        let events =
            outbox::read_after(&self.pool, earliest, self.batch, &Filter::default()).await?;
        let mut applied = 0;
        for (p, &from) in self.projections.iter().zip(&at) {
            let after = events.partition_point(|e| e.checkpoint() <= from);
            applied += self.advance(p.as_ref(), from, &events[after..]).await?;
        }
        Ok(applied)
    }

    /// Where each read model stands, in the order of [`Projector::names`],
    /// in one statement.
    ///
    /// # Errors
    /// A database error.
    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>, ProjectionError> {
        let names = self.names();
        let stored: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT name, txid, position FROM checkpoints WHERE name = ANY($1)")
                .bind(&names)
                .fetch_all(&self.pool)
                .await?;
        let at: HashMap<String, Checkpoint> = stored
            .into_iter()
            .map(|(name, txid, position)| (name, Checkpoint { txid, position }))
            .collect();
        Ok(names
            .iter()
            .map(|name| at.get(*name).copied().unwrap_or_default())
            .collect())
    }

    /// Applies everything visible now, as [`Projector::drain`] does, unless
    /// the read models moved since `seen`, where this call left them last
    /// time: then another projector keeps them current (the projector role
    /// beside a scheduler that drains before its housekeeping), and this
    /// reads no events, which that one reads anyway. `seen` is updated.
    ///
    /// # Errors
    /// As [`Projector::run_once`].
    pub async fn drain_unless_moved(
        &self,
        seen: &mut Option<Vec<Checkpoint>>,
    ) -> Result<usize, ProjectionError> {
        let now = self.checkpoints().await?;
        if seen.as_ref().is_some_and(|s| *s != now) {
            *seen = Some(now);
            return Ok(0);
        }
        let applied = self.drain().await?;
        *seen = Some(if applied == 0 {
            now
        } else {
            self.checkpoints().await?
        });
        Ok(applied)
    }

    #[tracing::instrument(
        name = "projector_round",
        skip_all,
        fields(projection = p.name(), events = tracing::field::Empty)
    )]
    async fn advance(
        &self,
        p: &dyn Projection,
        from: Checkpoint,
        events: &[RecordedEvent],
    ) -> Result<usize, ProjectionError> {
        // Events found unappliable in this round, by position: the batch is
        // applied again from its start, recording them instead.
        let mut failed: HashMap<i64, String> = HashMap::new();
        let mut one_by_one = false;
        loop {
            // The batch was read before the transaction that applies it:
            // from its checkpoint's row lock on, that transaction has an
            // id, and while it is open it holds back every outbox reader on
            // the server, so it should only write.
            let Some(last) = events.last().map(RecordedEvent::checkpoint) else {
                return Ok(0);
            };
            // Ended explicitly on every path: a dropped transaction is only
            // rolled back when its connection is next used.
            let mut tx = self.pool.begin().await?;
            match outbox::try_lock_checkpoint(&mut tx, p.name()).await? {
                Some(locked) if locked == from => {}
                // Another copy of the projector applied the batch meanwhile
                // (the next round reads on from where it got), or applies
                // this model now.
                _ => {
                    tx.rollback().await?;
                    return Ok(0);
                }
            }
            let mut held = if p.per_aggregate() {
                dead_letters::held(&mut *tx, p.name()).await?
            } else {
                HashMap::new()
            };
            match apply_batch(p, &mut tx, events, &failed, &mut held, one_by_one).await {
                Ok(()) => {
                    outbox::save_checkpoint(&mut tx, p.name(), last).await?;
                    tx.commit().await?;
                    tracing::Span::current().record("events", events.len());
                    if let Some(observer) = &self.observer {
                        observer.committed(p.name(), events).await;
                    }
                    return Ok(events.len());
                }
                Err(Poisoned { event: None, error }) if !error.is_transient() && !one_by_one => {
                    tx.rollback().await?;
                    tracing::warn!(
                        projection = p.name(),
                        error = %error,
                        "a batch failed as a whole; applying it one event at a time"
                    );
                    one_by_one = true;
                }
                Err(Poisoned {
                    event: Some(event),
                    error,
                }) if !error.is_transient() && !failed.contains_key(&event.position) => {
                    tx.rollback().await?;
                    tracing::error!(
                        projection = p.name(),
                        position = event.position,
                        event_type = %event.event_type,
                        aggregate_type = %event.aggregate_type,
                        aggregate_id = %event.aggregate_id,
                        error = %error,
                        "a read model cannot apply an event; recording it as a dead letter and going on"
                    );
                    failed.insert(event.position, error.to_string());
                }
                Err(Poisoned { error, .. }) => {
                    let _ = tx.rollback().await;
                    return Err(error);
                }
            }
        }
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
        if self.names().contains(&read::tasks::CHECKPOINT) {
            match models::recount_tasks(&self.pool).await {
                Ok(0) => {}
                Ok(wrong) => tracing::warn!(
                    wrong,
                    "task counts did not match the tasks read model (written without them); counted again"
                ),
                Err(e) => tracing::warn!(error = %e, "counting the tasks again failed; the counts stay as they were"),
            }
        }
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
                _ = async {
                    wake.wait().await;
                    tokio::time::sleep(SETTLE).await;
                } => {}
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
        let chosen: Vec<Arc<dyn Projection>> = self
            .projections
            .iter()
            .filter(|p| name.is_none_or(|n| n == p.name()))
            .cloned()
            .collect();
        if chosen.is_empty() {
            return Err(ProjectionError::Unknown(name.unwrap_or_default().into()));
        }
        // Never a pooled connection: its search path finds the new tables
        // before the live ones, and must not outlive the rebuild.
        let mut conn = PgConnection::connect_with(&self.pool.connect_options()).await?;
        let rebuilt = rebuild::run(&mut conn, &self.pool, &chosen, self.rows_held).await;
        let _ = conn.close().await;
        rebuilt
    }

    /// Each read model's checkpoint, lag and dead letters.
    ///
    /// # Errors
    /// A database error.
    pub async fn status(&self) -> Result<Vec<Status>, ProjectionError> {
        let mut conn = self.pool.acquire().await?;
        let counts: HashMap<String, i64> = dead_letters::counts(&mut *conn)
            .await?
            .into_iter()
            .collect();
        let mut out = Vec::new();
        for p in &self.projections {
            let checkpoint = outbox::load_checkpoint(&mut conn, p.name(), false).await?;
            let lag = outbox::behind(&mut *conn, checkpoint).await?;
            let dead = counts.get(p.name()).copied().unwrap_or(0);
            out.push(Status {
                name: p.name(),
                checkpoint,
                lag,
                dead_letters: dead,
                consistent: dead == 0,
            });
        }
        Ok(out)
    }

    /// Tries the dead letters of the named read model (of all of them with
    /// `None`) again, in the log's order, once their cause is fixed (a
    /// version that reads the payload, a constraint corrected): each event
    /// that applies now is applied and its dead letter removed. An event
    /// that still fails keeps its dead letter (one more attempt, the new
    /// error), and so do the later ones of its aggregate in a model that
    /// builds state per aggregate.
    ///
    /// Each aggregate's letters are applied in short transactions holding
    /// the model's checkpoint, so the running projector neither applies
    /// newer events of that aggregate meanwhile nor is held back long.
    ///
    /// # Errors
    /// [`ProjectionError::Unknown`] for a name that is no read model, or a
    /// database error.
    pub async fn retry(&self, name: Option<&str>) -> Result<Retried, ProjectionError> {
        let chosen: Vec<&dyn Projection> = self
            .projections
            .iter()
            .map(AsRef::as_ref)
            .filter(|p| name.is_none_or(|n| n == p.name()))
            .collect();
        if chosen.is_empty() {
            return Err(ProjectionError::Unknown(name.unwrap_or_default().into()));
        }
        let mut done = Retried::default();
        for p in chosen {
            let mut aggregates: Vec<(String, String)> = Vec::new();
            for letter in dead_letters::list(&self.pool, Some(p.name())).await? {
                let key = (letter.aggregate_type, letter.aggregate_id);
                if !aggregates.contains(&key) {
                    aggregates.push(key);
                }
            }
            for (aggregate_type, aggregate_id) in aggregates {
                let r = self
                    .retry_aggregate(p, (&aggregate_type, &aggregate_id))
                    .await?;
                done.cleared += r.cleared;
                done.remaining += r.remaining;
            }
        }
        Ok(done)
    }

    /// Retries one aggregate's dead letters of `p`, in order, a few per
    /// transaction. The letters are read under the checkpoint's lock, so
    /// ones the projector added meanwhile are seen too.
    async fn retry_aggregate(
        &self,
        p: &dyn Projection,
        aggregate: (&str, &str),
    ) -> Result<Retried, ProjectionError> {
        const PER_TX: i64 = 100;
        let mut done = Retried::default();
        let mut after = Checkpoint::default();
        loop {
            let mut tx = self.pool.begin().await?;
            outbox::load_checkpoint(&mut tx, p.name(), true).await?;
            let letters =
                dead_letters::of_aggregate(&mut *tx, p.name(), aggregate, after, PER_TX).await?;
            if letters.is_empty() {
                tx.commit().await?;
                return Ok(done);
            }
            for letter in &letters {
                after = letter.checkpoint();
                let Some(event) = outbox::read_at(&mut *tx, letter.position).await? else {
                    // Nothing to apply any more.
                    dead_letters::remove(&mut *tx, p.name(), letter.position).await?;
                    done.cleared += 1;
                    continue;
                };
                let mut attempt = tx.begin().await?;
                match apply_guarded(p, &mut attempt, &event).await {
                    Ok(()) => {
                        attempt.commit().await?;
                        dead_letters::remove(&mut *tx, p.name(), letter.position).await?;
                        done.cleared += 1;
                    }
                    Err(e) if e.is_transient() => {
                        let _ = attempt.rollback().await;
                        let _ = tx.rollback().await;
                        return Err(e);
                    }
                    Err(e) => {
                        attempt.rollback().await?;
                        dead_letters::record(&mut *tx, p.name(), &event, &e.to_string()).await?;
                        done.remaining += 1;
                        if p.per_aggregate() {
                            // The rest waits behind this one.
                            let rest = dead_letters::of_aggregate(
                                &mut *tx,
                                p.name(),
                                aggregate,
                                after,
                                i64::MAX,
                            )
                            .await?;
                            done.remaining += rest.len();
                            tx.commit().await?;
                            return Ok(done);
                        }
                    }
                }
            }
            tx.commit().await?;
        }
    }
}

/// Applies `events` to `p` in its transaction, recording the ones found
/// unappliable (and those held back behind them) as dead letters instead.
/// Returns the first event that fails, with why.
async fn apply_batch<'e>(
    p: &dyn Projection,
    conn: &mut PgConnection,
    events: &'e [RecordedEvent],
    failed: &HashMap<i64, String>,
    held: &mut HashMap<(String, String), Checkpoint>,
    one_by_one: bool,
) -> Result<(), Poisoned<'e>> {
    let mut apply = Vec::with_capacity(events.len());
    for event in events {
        match verdict(p, event, failed, held) {
            Verdict::Apply => apply.push(event),
            Verdict::Record(error) => dead_letters::record(&mut *conn, p.name(), event, &error)
                .await
                .map_err(|e| Poisoned {
                    event: Some(event),
                    error: e.into(),
                })?,
        }
    }
    if apply.is_empty() {
        return Ok(());
    }
    if !one_by_one {
        if let Some(set) = p.apply_set(conn, &apply) {
            return match AssertUnwindSafe(set).catch_unwind().await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(SetError { position, error })) => Err(Poisoned {
                    event: position.and_then(|at| apply.iter().find(|e| e.position == at).copied()),
                    error,
                }),
                Err(_) => Err(Poisoned {
                    event: None,
                    error: ProjectionError::Rebuild("the read model's code panicked".into()),
                }),
            };
        }
    }
    for event in apply {
        apply_guarded(p, conn, event)
            .await
            .map_err(|error| Poisoned {
                event: Some(event),
                error,
            })?;
    }
    Ok(())
}
