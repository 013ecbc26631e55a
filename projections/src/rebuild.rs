//! Rebuilding read models while the server runs.
//!
//! A rebuild replays the whole log, which takes minutes on a large one.
//! Done in one transaction, that transaction would be the oldest one
//! running all that time, and every outbox consumer (the projector, the
//! scheduler, the ingress) only reads events of transactions older than
//! the oldest one still running: the whole platform would stand still
//! until the rebuild ended. Replacing the live rows in one transaction at
//! the end holds the consumers back too, for as long as copying a million
//! timeline rows takes. So the new content is built apart, in short
//! transactions, and swapped in whole:
//!
//! 1. Under an advisory lock (one rebuild at a time), the rebuild creates
//!    the schema [`SCHEMA`] and in it a table `LIKE` each live table of the
//!    chosen models, with its keys and unique indexes and the same name.
//!    Its connections put that schema first on their `search_path`, so
//!    the projections' own statements fill the new tables unchanged.
//! 2. It replays the log into them, [`TX_EVENTS`] events per transaction,
//!    while the running projector keeps the live tables fresh: one
//!    connection reads the log, and each model fills its tables on a
//!    connection of its own from the same batches, beside the others
//!    ([`Projection::fill_set`]: the timeline, a row per event, by
//!    `COPY`). Then it builds the live tables' other indexes on the new
//!    ones, each in one sort rather than one update per row, and
//!    concurrently: no transaction stays open while they sort. Autovacuum
//!    stays off the new tables until then, as its analyze of a table
//!    being filled holds a snapshot those builds would wait for.
//! 3. One short transaction locks the models' checkpoints (the running
//!    projector skips a locked checkpoint), applies the events that
//!    arrived since step 2, drops each live table and moves the new one
//!    into its place (renaming its indexes to the old names and granting
//!    what was granted), and stores the checkpoints. Readers see the old
//!    table until it commits and the new one after, never a half-built
//!    one; a reader still inside a query of the old table delays the swap,
//!    which gives up after [`LOCK_WAIT`] and tries again, rather than
//!    queueing every other reader behind it.
//!
//! An event a model cannot apply is handled as the projector handles it
//! (see the crate's documentation): recorded and skipped, with the later
//! events of its aggregate for a model that builds state per aggregate.
//! The dead letters found are kept apart until the switch, which replaces
//! the chosen models' dead letters by them: a rebuild after the cause was
//! fixed clears them, one before finds them again.
//!
//! A live table that something else depends on (a view, a foreign key, a
//! trigger) cannot be dropped and recreated without losing that: its rows
//! are replaced instead, in the same switch transaction, which then takes
//! as long as copying them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use store::dead_letters;
use store::outbox::{self, Checkpoint, Filter, RecordedEvent};

use std::panic::AssertUnwindSafe;

use futures::{FutureExt, TryFutureExt};

use crate::{apply_guarded, verdict, Filler, Projection, ProjectionError, SetError, Verdict};

/// The schema the new tables are built in.
pub const SCHEMA: &str = "unidesk_rebuild";

/// Held (as a session advisory lock) by the rebuild in progress.
const LOCK: i64 = 0x7265_6275_696c_6400; // "rebuild\0"

/// Events read from the log per query while building.
const READ: i64 = 2000;

/// Events applied per transaction while building: small, because every
/// outbox consumer waits for the oldest open transaction.
pub const TX_EVENTS: usize = 1000;

/// How long the swap waits for a live table's readers before it gives up
/// and tries again.
/// Readers wait behind the swap meanwhile, so it is short.
pub const LOCK_WAIT: Duration = Duration::from_millis(500);

/// How often the swap is tried.
const SWAP_TRIES: u32 = 60;

/// A progress line is logged every this many events.
const PROGRESS_EVERY: usize = 100_000;

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// The names of the models rebuilt.
    pub models: Vec<&'static str>,
    /// Events read from the log.
    pub events: usize,
    /// Event applications: events times models.
    pub applications: usize,
    /// Building the new tables, while everything else ran on.
    pub build: Duration,
    /// The part of `build` spent building the new tables' indexes after
    /// their rows were in.
    pub indexes: Duration,
    /// The switch: the transaction that catches up and swaps the tables
    /// in, the only time outbox consumers wait for the rebuild.
    pub switch: Duration,
    /// Whether a model's statement for a whole batch failed without
    /// blaming an event, so that it applied its later events one at a
    /// time (slower, the same result).
    pub one_by_one: bool,
}

/// The dead letters a rebuild finds, kept apart until the switch.
#[derive(Default)]
struct Letters {
    /// Per model: the events it could not apply, by position, with why.
    failed: HashMap<&'static str, HashMap<i64, String>>,
    /// Per model: the aggregates held back, from their first dead letter.
    held: HashMap<&'static str, HashMap<(String, String), Checkpoint>>,
    /// What committed transactions recorded: model, event (without its
    /// payload), error.
    found: Vec<Found>,
    /// A batch failed as a whole: apply one event at a time from now on,
    /// to find the event to blame.
    one_by_one: bool,
}

type Found = (&'static str, RecordedEvent, String);

/// Why applying events in a rebuild transaction stopped.
enum Stop {
    /// `model` cannot apply the event at `position`, for good.
    Poison {
        model: &'static str,
        position: i64,
        error: String,
    },
    /// A model's statement for a whole batch failed, blaming no event:
    /// the batch is applied again one event at a time.
    Whole,
    /// Anything else: the rebuild fails.
    Failed(ProjectionError),
}

impl From<sqlx::Error> for Stop {
    fn from(e: sqlx::Error) -> Self {
        Stop::Failed(e.into())
    }
}

impl Letters {
    /// Notes a poisoned event so that the next try records it instead;
    /// an event that fails again the same way stops the rebuild.
    fn poisoned(&mut self, stop: Stop) -> Result<(), ProjectionError> {
        match stop {
            Stop::Poison {
                model,
                position,
                error,
            } => {
                let failed = self.failed.entry(model).or_default();
                if failed.contains_key(&position) {
                    return Err(ProjectionError::Rebuild(format!(
                        "read model {model} failed twice on the event at position {position}: {error}"
                    )));
                }
                tracing::error!(
                    projection = model,
                    position,
                    error = %error,
                    "a read model cannot apply an event; recording it as a dead letter and going on"
                );
                failed.insert(position, error);
                Ok(())
            }
            Stop::Whole => {
                tracing::warn!("a batch failed as a whole; applying it one event at a time");
                self.one_by_one = true;
                Ok(())
            }
            Stop::Failed(e) => Err(e),
        }
    }
}

/// A live table and the one built to replace it.
struct Table {
    /// The table's name as the projections write it, such as `task_view`.
    name: &'static str,
    /// The live table's schema.
    schema: String,
    /// Whether something depends on the live table, so its rows are
    /// replaced rather than the table itself.
    copy: bool,
}

impl Table {
    fn live(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(self.name))
    }

    fn built(&self) -> String {
        format!("{}.{}", quote(SCHEMA), quote(self.name))
    }
}

/// Runs a rebuild of `chosen` on `conn`, a connection nobody else uses
/// and that is closed afterwards (which also ends the advisory lock); the
/// log is read through `pool`, and the models fill their tables on
/// connections opened with its options.
pub(crate) async fn run(
    conn: &mut PgConnection,
    pool: &sqlx::PgPool,
    chosen: &[Arc<dyn Projection>],
    rows_held: usize,
) -> Result<Rebuilt, ProjectionError> {
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Err(ProjectionError::Rebuild(
            "another rebuild is running on this database; try again when it has finished".into(),
        ));
    }
    let mut result = rebuild(conn, pool, chosen, Some(rows_held)).await;
    if let Ok(None) = result {
        tracing::warn!(
            "a read model's rows held in memory failed as a whole; building the new tables \
             again, applying the log as the running projector does"
        );
        result = rebuild(conn, pool, chosen, None).await;
    }
    // Whatever happened, nothing of the build is left behind.
    let dropped = sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", quote(SCHEMA)))
        .execute(&mut *conn)
        .await;
    let rebuilt = result?.ok_or_else(|| {
        ProjectionError::Rebuild("the read models could not be built without held rows".into())
    })?;
    dropped?;
    Ok(rebuilt)
}

/// Why filling the new tables stopped.
enum FillStop {
    /// The rebuild fails.
    Failed(ProjectionError),
    /// A model's [`Filler`] failed as a whole (a row its table refused, a
    /// panic in the model's code): the event to blame is found by
    /// building again without held rows, one event at a time where a
    /// batch fails, as the running projector does.
    Refused,
}

impl From<ProjectionError> for FillStop {
    fn from(e: ProjectionError) -> Self {
        FillStop::Failed(e)
    }
}

impl From<sqlx::Error> for FillStop {
    fn from(e: sqlx::Error) -> Self {
        FillStop::Failed(e.into())
    }
}

/// Builds the new tables and swaps them in, the models with a [`Filler`]
/// holding at most `rows_held` rows each (`None`: none held). `None` when
/// a filler failed as a whole ([`FillStop::Refused`]), nothing swapped.
async fn rebuild(
    conn: &mut PgConnection,
    pool: &sqlx::PgPool,
    chosen: &[Arc<dyn Projection>],
    rows_held: Option<usize>,
) -> Result<Option<Rebuilt>, ProjectionError> {
    let started = Instant::now();
    // Left over by a rebuild that died (the lock says none is running).
    for statement in ["DROP SCHEMA IF EXISTS {} CASCADE", "CREATE SCHEMA {}"] {
        sqlx::query(&statement.replace("{}", &quote(SCHEMA)))
            .execute(&mut *conn)
            .await?;
    }
    let mut tables = Vec::new();
    for p in chosen {
        for name in p.tables() {
            tables.push(prepare(conn, name).await?);
        }
        // The checkpoint row exists before the switch locks it.
        outbox::load_checkpoint(conn, p.name(), false).await?;
    }
    new_tables_first(conn).await?;

    // Each model fills its tables on a connection of its own, beside the
    // others: the two cores are busy with every model at once instead of
    // taking the models one after the other.
    let mut senders = Vec::with_capacity(chosen.len());
    let mut builders = tokio::task::JoinSet::new();
    for p in chosen {
        let (tx, rx) = tokio::sync::mpsc::channel::<Batch>(2);
        senders.push(tx);
        builders.spawn(fill(builder(pool).await?, p.clone(), rx, rows_held));
    }
    let filling = async {
        let mut filled = Vec::with_capacity(chosen.len());
        while let Some(done) = builders.join_next().await {
            let done = done.map_err(|e| {
                ProjectionError::Rebuild(format!("a read model's builder stopped: {e}"))
            })?;
            filled.push(done?);
        }
        Ok(filled)
    };
    // Should either side fail, returning drops `builders`, which stops
    // the builders still running.
    let reading = dispatch(pool.clone(), senders).map_err(FillStop::Failed);
    let ((at, mut read), filled) = match tokio::try_join!(reading, filling) {
        Ok(done) => done,
        Err(FillStop::Failed(e)) => return Err(e),
        Err(FillStop::Refused) => return Ok(None),
    };
    let mut letters = Letters::default();
    for found in filled {
        letters.failed.extend(found.failed);
        letters.held.extend(found.held);
        letters.found.extend(found.found);
        letters.one_by_one |= found.one_by_one;
    }
    // The indexes left out while filling, one at a time (two concurrent
    // builds wait for each other), then fresh statistics, so that queries
    // on the new tables are planned well from the start.
    let indexing = Instant::now();
    sqlx::query("SET maintenance_work_mem = '256MB'")
        .execute(&mut *conn)
        .await?;
    for t in &tables {
        for (definition,) in live_indexes(conn, t, false).await? {
            sqlx::query(&definition).execute(&mut *conn).await?;
        }
    }
    for t in &tables {
        for statement in ["ANALYZE {}", "ALTER TABLE {} RESET (autovacuum_enabled)"] {
            sqlx::query(&statement.replace("{}", &t.built()))
                .execute(&mut *conn)
                .await?;
        }
    }
    let indexes = indexing.elapsed();
    let build = started.elapsed();

    let chosen: Vec<&dyn Projection> = chosen.iter().map(AsRef::as_ref).collect();
    let mut names: Vec<&'static str> = chosen.iter().map(|p| p.name()).collect();
    names.sort_unstable();
    let mut tries = 0;
    let (caught_up, switch) = loop {
        let switching = Instant::now();
        match switch(conn, &chosen, &tables, &names, at, &mut letters).await {
            Ok(n) => break (n, switching.elapsed()),
            Err(stop @ (Stop::Poison { .. } | Stop::Whole)) => letters.poisoned(stop)?,
            Err(Stop::Failed(ProjectionError::Database(sqlx::Error::Database(e))))
                if e.code().as_deref() == Some("55P03") =>
            {
                tries += 1;
                if tries >= SWAP_TRIES {
                    return Err(ProjectionError::Rebuild(format!(
                        "readers kept the read models busy through {tries} tries to swap the \
                         rebuilt tables in; nothing was changed"
                    )));
                }
                tracing::info!(tries, "a reader held a read model; trying the swap again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(Stop::Failed(e)) => return Err(e),
        }
    };
    read += caught_up;
    Ok(Some(Rebuilt {
        models: names,
        events: read,
        applications: read * chosen.len(),
        build,
        indexes,
        switch,
        one_by_one: letters.one_by_one,
    }))
}

/// Reads the log from its start in batches of [`READ`], on a connection
/// of its own, a batch or two ahead of the rebuild applying them: reading
/// and decoding the next batch overlaps with writing this one. Ends with
/// an empty batch, or an error; stops when the receiver is dropped.
fn read_ahead(
    pool: sqlx::PgPool,
) -> tokio::sync::mpsc::Receiver<Result<Vec<RecordedEvent>, ProjectionError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        let mut at = Checkpoint::default();
        loop {
            let batch = outbox::read_after(&pool, at, READ, &Filter::default())
                .await
                .map_err(ProjectionError::from);
            let next = match &batch {
                Ok(events) => events.last().map(RecordedEvent::checkpoint),
                Err(_) => None,
            };
            if tx.send(batch).await.is_err() {
                return;
            }
            match next {
                Some(last) => at = last,
                None => return,
            }
        }
    });
    rx
}

/// A batch of the log, shared by every model's builder.
type Batch = Arc<Vec<RecordedEvent>>;

/// A connection for a model's builder: its search path finds the new
/// tables first, and its many small commits wait for no disk flush (the
/// new tables need no durability until they are swapped in).
async fn builder(pool: &sqlx::PgPool) -> Result<PgConnection, ProjectionError> {
    // Never a pooled connection: its search path must not outlive the
    // rebuild.
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut conn)
        .await?;
    new_tables_first(&mut conn).await?;
    Ok(conn)
}

/// Puts [`SCHEMA`] first on `conn`'s search path, so that the
/// projections' own statements find the new tables before the live ones.
async fn new_tables_first(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "SELECT set_config('search_path', '{}, ' || current_setting('search_path'), false)",
        quote(SCHEMA)
    ))
    .execute(conn)
    .await?;
    Ok(())
}

/// Reads the whole log and hands every batch to each builder. Returns
/// where the log ended and how many events it held.
async fn dispatch(
    pool: sqlx::PgPool,
    builders: Vec<tokio::sync::mpsc::Sender<Batch>>,
) -> Result<(Checkpoint, usize), ProjectionError> {
    let mut ahead = read_ahead(pool);
    let (mut at, mut read) = (Checkpoint::default(), 0);
    loop {
        let events = match ahead.recv().await {
            Some(batch) => batch?,
            None => return Err(ProjectionError::Rebuild("the log's reader stopped".into())),
        };
        let Some(last) = events.last().map(RecordedEvent::checkpoint) else {
            return Ok((at, read));
        };
        if (read + events.len()) / PROGRESS_EVERY > read / PROGRESS_EVERY {
            tracing::info!(events = read + events.len(), "rebuilding read models");
        }
        read += events.len();
        let events = Arc::new(events);
        for b in &builders {
            // A builder that stopped has failed: its error ends the rebuild.
            if b.send(events.clone()).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        at = last;
    }
}

/// Fills model `p`'s new tables from the batches it is handed, in
/// transactions of [`TX_EVENTS`] events, through the model's
/// [`Filler`] (holding at most `rows_held` rows) when it has one and
/// `rows_held` is given, and closes its connection. Returns the dead
/// letters it found.
async fn fill(
    mut conn: PgConnection,
    p: Arc<dyn Projection>,
    mut batches: tokio::sync::mpsc::Receiver<Batch>,
    rows_held: Option<usize>,
) -> Result<Letters, FillStop> {
    let mut letters = Letters::default();
    let mut busy = Duration::ZERO;
    let mut filler = rows_held.and_then(|rows| p.filler(rows));
    while let Some(events) = batches.recv().await {
        let applying = Instant::now();
        let events: Vec<&RecordedEvent> = events.iter().collect();
        for slice in events.chunks(TX_EVENTS) {
            loop {
                if letters.one_by_one && filler.is_some() {
                    // The held rows cannot be applied one event at a
                    // time: the model is built again without them.
                    return Err(FillStop::Refused);
                }
                let mut tx = conn.begin().await?;
                let mut pending = Vec::new();
                let applied = apply(
                    &mut tx,
                    &[p.as_ref()],
                    slice,
                    &mut letters,
                    &mut pending,
                    Target::Filling(filler.as_deref_mut()),
                )
                .await;
                match applied {
                    Ok(()) => {
                        tx.commit().await?;
                        if let Some(f) = filler.as_deref_mut() {
                            f.committed();
                        }
                        letters.found.extend(pending);
                        break;
                    }
                    Err(stop) => {
                        tx.rollback().await?;
                        if let Some(f) = filler.as_deref_mut() {
                            f.rolled_back();
                        }
                        letters.poisoned(stop)?;
                    }
                }
            }
        }
        busy += applying.elapsed();
    }
    if let Some(held) = filler.take() {
        let writing = Instant::now();
        write_held(&mut conn, held).await?;
        busy += writing.elapsed();
    }
    tracing::info!(
        projection = p.name(),
        seconds = busy.as_secs_f64(),
        "a read model's new tables are filled"
    );
    let _ = conn.close().await;
    Ok(letters)
}

/// Writes every row `filler` still holds, in short transactions.
async fn write_held(conn: &mut PgConnection, mut filler: Box<dyn Filler>) -> Result<(), FillStop> {
    loop {
        let mut tx = conn.begin().await?;
        let finished = AssertUnwindSafe(filler.finish(&mut tx))
            .catch_unwind()
            .await;
        let done = match finished {
            Ok(Ok(done)) => done,
            Ok(Err(e)) if e.error.is_transient() => return Err(FillStop::Failed(e.error)),
            Ok(Err(_)) | Err(_) => return Err(FillStop::Refused),
        };
        tx.commit().await?;
        filler.committed();
        if done {
            return Ok(());
        }
    }
}

/// What the events are applied into.
enum Target<'f> {
    /// New tables being filled, in log order: through the model's
    /// [`Filler`] when it has one, else [`Projection::fill_set`].
    Filling(Option<&'f mut (dyn Filler + 'static)>),
    /// Tables with every index, which may hold some of the rows
    /// ([`Projection::apply_set`]).
    Live,
}

/// Applies `events` to every chosen model, recording in `pending` the
/// dead letters of events [`Letters`] knows to be unappliable (and of
/// those held back behind them).
async fn apply(
    conn: &mut PgConnection,
    chosen: &[&dyn Projection],
    events: &[&RecordedEvent],
    letters: &mut Letters,
    pending: &mut Vec<Found>,
    mut into: Target<'_>,
) -> Result<(), Stop> {
    let none = HashMap::new();
    for p in chosen {
        let failed = letters.failed.get(p.name()).unwrap_or(&none);
        let held = letters.held.entry(p.name()).or_default();
        let mut to_apply = Vec::with_capacity(events.len());
        for &event in events {
            match verdict(*p, event, failed, held) {
                Verdict::Apply => to_apply.push(event),
                Verdict::Record(error) => {
                    pending.push((p.name(), event.without_payload(), error));
                }
            }
        }
        if to_apply.is_empty() {
            continue;
        }
        let set = match &mut into {
            Target::Filling(Some(filler)) => Some(filler.fill(conn, &to_apply)),
            Target::Filling(None) => p.fill_set(conn, &to_apply),
            Target::Live => p.apply_set(conn, &to_apply),
        };
        let whole = match (letters.one_by_one, set) {
            (false, Some(set)) => Some(AssertUnwindSafe(set).catch_unwind().await),
            _ => None,
        };
        if let Some(whole) = whole {
            match whole {
                Ok(Ok(())) => {}
                Ok(Err(SetError { error, .. })) if error.is_transient() => {
                    return Err(Stop::Failed(error))
                }
                Ok(Err(SetError {
                    position: Some(position),
                    error,
                })) => {
                    return Err(Stop::Poison {
                        model: p.name(),
                        position,
                        error: error.to_string(),
                    })
                }
                Ok(Err(SetError { position: None, .. })) | Err(_) => return Err(Stop::Whole),
            }
            continue;
        }
        for event in to_apply {
            match apply_guarded(*p, conn, event).await {
                Ok(()) => {}
                Err(e) if e.is_transient() => return Err(Stop::Failed(e)),
                Err(e) => {
                    return Err(Stop::Poison {
                        model: p.name(),
                        position: event.position,
                        error: e.to_string(),
                    })
                }
            }
        }
    }
    Ok(())
}

/// The switch transaction: catches the new tables up from `at`, swaps them
/// in, replaces the models' dead letters by the ones this rebuild found
/// and stores the checkpoints. Returns the events caught up.
async fn switch(
    conn: &mut PgConnection,
    chosen: &[&dyn Projection],
    tables: &[Table],
    names: &[&'static str],
    mut at: Checkpoint,
    letters: &mut Letters,
) -> Result<usize, Stop> {
    let mut tx = conn.begin().await?;
    for name in names {
        outbox::load_checkpoint(&mut tx, name, true).await?;
    }
    let mut caught_up = 0;
    let mut pending = Vec::new();
    loop {
        let events = outbox::read_after(&mut *tx, at, READ, &Filter::default()).await?;
        let Some(last) = events.last().map(RecordedEvent::checkpoint) else {
            break;
        };
        let events: Vec<&RecordedEvent> = events.iter().collect();
        let applied = apply(
            &mut tx,
            chosen,
            &events,
            letters,
            &mut pending,
            Target::Live,
        )
        .await;
        if let Err(stop) = applied {
            let _ = tx.rollback().await;
            return Err(stop);
        }
        caught_up += events.len();
        at = last;
    }
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = {}",
        LOCK_WAIT.as_millis()
    ))
    .execute(&mut *tx)
    .await?;
    // Delete in the order the models list their tables, insert in reverse,
    // as a model lists a table before the one it refers to.
    for t in tables.iter().filter(|t| t.copy) {
        sqlx::query(&format!("DELETE FROM {}", t.live()))
            .execute(&mut *tx)
            .await?;
    }
    for t in tables.iter().rev() {
        if t.copy {
            copy_rows(&mut tx, t).await?;
        } else {
            swap(&mut tx, t).await?;
        }
    }
    let found: Vec<&Found> = letters.found.iter().chain(&pending).collect();
    for name in names {
        let positions: Vec<i64> = found
            .iter()
            .filter(|(model, _, _)| model == name)
            .map(|(_, event, _)| event.position)
            .collect();
        sqlx::query("DELETE FROM dead_letters WHERE consumer = $1 AND position <> ALL($2)")
            .bind(name)
            .bind(&positions)
            .execute(&mut *tx)
            .await?;
    }
    for (model, event, error) in &found {
        dead_letters::record(&mut *tx, model, event, error).await?;
    }
    for name in names {
        outbox::save_checkpoint(&mut tx, name, at).await?;
    }
    tx.commit().await?;
    Ok(caught_up)
}

/// Replaces the live table by the new one, keeping its index names,
/// owner and grants.
async fn swap(conn: &mut PgConnection, t: &Table) -> Result<(), sqlx::Error> {
    let live = t.live();
    let old_indexes = indexes(conn, &live).await?;
    let (owner, acl): (String, Vec<String>) = sqlx::query_as(
        "SELECT pg_get_userbyid(c.relowner)::text, \
           COALESCE((SELECT array_agg(format('GRANT %s ON %s TO %s%s', a.privilege_type, $1::text, \
               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END, \
               CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)) \
             FROM aclexplode(c.relacl) a WHERE a.grantee <> c.relowner), '{}') \
         FROM pg_class c WHERE c.oid = $1::text::regclass",
    )
    .bind(&live)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(&format!("DROP TABLE {live}"))
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!(
        "ALTER TABLE {} SET SCHEMA {}",
        t.built(),
        quote(&t.schema)
    ))
    .execute(&mut *conn)
    .await?;
    // Give each index the name of the old index it replaces: first a name
    // of its own, so that no two collide on the way.
    let new_indexes = indexes(conn, &live).await?;
    let mut wanted: HashMap<&str, Vec<&str>> = HashMap::new();
    for (name, shape) in &old_indexes {
        wanted.entry(shape).or_default().push(name);
    }
    let mut renames = Vec::new();
    for (i, (name, shape)) in new_indexes.iter().enumerate() {
        if let Some(old) = wanted.get_mut(shape.as_str()).and_then(Vec::pop) {
            if old != name {
                let interim = format!("unidesk_rebuild_index_{i}");
                sqlx::query(&format!(
                    "ALTER INDEX {}.{} RENAME TO {}",
                    quote(&t.schema),
                    quote(name),
                    quote(&interim)
                ))
                .execute(&mut *conn)
                .await?;
                renames.push((interim, old));
            }
        }
    }
    for (interim, old) in renames {
        sqlx::query(&format!(
            "ALTER INDEX {}.{} RENAME TO {}",
            quote(&t.schema),
            quote(&interim),
            quote(old)
        ))
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(&format!("ALTER TABLE {live} OWNER TO {}", quote(&owner)))
        .execute(&mut *conn)
        .await?;
    for grant in acl {
        sqlx::query(&grant).execute(&mut *conn).await?;
    }
    Ok(())
}

/// A table's indexes: name, and definition without the names.
async fn indexes(
    conn: &mut PgConnection,
    table: &str,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.relname::text, \
           (CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END) || \
           substring(pg_get_indexdef(i.indexrelid) FROM ' USING .*$') \
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = $1::text::regclass ORDER BY c.relname",
    )
    .bind(table)
    .fetch_all(conn)
    .await
}

/// Replaces the live table's rows by the new table's.
async fn copy_rows(conn: &mut PgConnection, t: &Table) -> Result<(), sqlx::Error> {
    let columns: String = sqlx::query_scalar(
        "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute \
         WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = ''",
    )
    .bind(t.live())
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO {} ({columns}) SELECT {columns} FROM {}",
        t.live(),
        t.built()
    ))
    .execute(conn)
    .await?;
    Ok(())
}

/// Finds live table `name` and creates the table that will replace it.
async fn prepare(conn: &mut PgConnection, name: &'static str) -> Result<Table, sqlx::Error> {
    let (schema, copy): (String, bool) = sqlx::query_as(
        "SELECT n.nspname::text, \
           EXISTS (SELECT 1 FROM pg_depend d WHERE d.refobjid = c.oid AND d.classid = 'pg_rewrite'::regclass) \
           OR EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND (f.confrelid = c.oid OR f.conrelid = c.oid)) \
           OR EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = c.oid AND NOT g.tgisinternal) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
    )
    .bind(quote(name))
    .fetch_one(&mut *conn)
    .await?;
    let t = Table { name, schema, copy };
    sqlx::query(&format!(
        "CREATE TABLE {} (LIKE {} INCLUDING ALL EXCLUDING INDEXES)",
        t.built(),
        t.live()
    ))
    .execute(&mut *conn)
    .await?;
    // Autovacuum's analyze of a table being filled would hold a snapshot
    // the concurrent index builds wait for; the build analyzes the new
    // tables itself once their rows are in.
    sqlx::query(&format!(
        "ALTER TABLE {} SET (autovacuum_enabled = false)",
        t.built()
    ))
    .execute(&mut *conn)
    .await?;
    // Keys and unique indexes now: the projections' upserts need them.
    // The other indexes once the rows are in (see `index`).
    for (definition,) in live_indexes(conn, &t, true).await? {
        sqlx::query(&definition).execute(&mut *conn).await?;
    }
    Ok(t)
}

/// The statements that give the new table the live table's keys and
/// unique indexes (`unique`), or its other indexes: a constraint as a
/// constraint, an index as an index, unnamed (the swap names them). The
/// other indexes are built `CONCURRENTLY`: a plain `CREATE INDEX` holds
/// its transaction open while it sorts, seconds on a large table, and
/// every outbox consumer waits behind the oldest transaction running.
async fn live_indexes(
    conn: &mut PgConnection,
    t: &Table,
    unique: bool,
) -> Result<Vec<(String,)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT CASE WHEN con.oid IS NOT NULL \
             THEN format('ALTER TABLE %s ADD %s', $2::text, pg_get_constraintdef(con.oid)) \
             ELSE format('CREATE %sINDEX %sON %s %s', CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END, \
               CASE WHEN $3 THEN '' ELSE 'CONCURRENTLY ' END, \
               $2::text, substring(pg_get_indexdef(i.indexrelid) FROM ' USING .*$')) END \
         FROM pg_index i LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u', 'x') \
         WHERE i.indrelid = $1::text::regclass AND (i.indisunique OR con.oid IS NOT NULL) = $3 \
         ORDER BY i.indexrelid",
    )
    .bind(t.live())
    .bind(t.built())
    .bind(unique)
    .fetch_all(conn)
    .await
}

/// `name` as a quoted SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
