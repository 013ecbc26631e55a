//! UniDesk's persistence: the event log of cqrs-es aggregates on PostgreSQL
//! (one statement per command, see [`Store::execute`]), the ordered outbox
//! that gives the log a global order, consumer checkpoints, unique names
//! and schema migrations. The private PostgreSQL
//! clusters of `unidesk dev`, the tests and the benchmarks are the
//! `pgcluster` crate's.

pub mod dead_letters;
mod error;
pub mod export;
pub mod health;
pub mod holds;
pub mod idempotency;
pub mod leader;
mod log;
pub mod names;
pub mod outbox;
pub mod queue_reasons;
pub mod secrets;
pub mod task_log;
pub mod tokens;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, EventEnvelope};
use domain::node::Node;
use domain::project::Project;
use domain::task::{Task, TaskError};
use domain::user::User;
use domain::Actor;
pub use log::Cache;
use log::{Current, LogError};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

pub use error::{is_transient, is_unavailable, StoreError};
pub use outbox::{Checkpoint, Notifier, RecordedEvent, Wakeup};

/// The embedded migrations from `migrations/`, the only DDL of the project.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// How long a request waits for a database connection before it is
/// answered "unavailable, try again" instead: short, so that while the
/// database is unreachable callers hear so within seconds rather than
/// waiting on a connection that will not come.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_millis(1500);

/// The connections of a server process's pool.
pub const POOL_SIZE: u32 = 32;

/// A connection idle for longer than this is checked before it is handed
/// out; one in use moments ago is not (a check is a round trip, and the
/// busy path would pay it on every statement).
pub const CHECK_IDLE_AFTER: Duration = Duration::from_millis(1000);

/// The pool settings of a server process: [`POOL_SIZE`] connections, each
/// checked before use when it has been idle for [`CHECK_IDLE_AFTER`] (so a
/// database restart is noticed on the first request after it, not
/// answered with a dead connection), and at most [`ACQUIRE_TIMEOUT`] to
/// get one (a free one, or a new one when the server accepts connections).
/// A pool timeout or a broken connection is told apart by
/// [`is_unavailable`].
pub fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for < CHECK_IDLE_AFTER {
                    return Ok(true);
                }
                Ok(sqlx::Connection::ping(conn).await.is_ok())
            })
        })
}

/// Timeouts a server sets on each connection of its pool, so that
/// neither a transaction of its own left open nor a runaway statement can
/// hold the platform back: every outbox consumer waits for the oldest open
/// transaction on the database server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimeouts {
    /// `idle_in_transaction_session_timeout`: a session idle inside a
    /// transaction this long is ended by PostgreSQL (its transaction rolls
    /// back, the pool replaces the connection). Zero turns it off.
    pub idle_in_transaction: Duration,
    /// `statement_timeout`: a statement running this long is cancelled.
    /// Zero turns it off.
    pub statement: Duration,
}

impl Default for SessionTimeouts {
    /// 30 s idle in a transaction and 60 s per statement: far above
    /// anything the server does, far below what would stall the platform
    /// unseen.
    fn default() -> Self {
        Self {
            idle_in_transaction: Duration::from_secs(30),
            statement: Duration::from_secs(60),
        }
    }
}

/// `options` with `timeouts` set on every new connection of the pool.
/// Connections opened apart from the pool (a leader lock held for hours,
/// a rebuild, `LISTEN`) keep PostgreSQL's defaults.
pub fn with_session_timeouts(options: PgPoolOptions, timeouts: SessionTimeouts) -> PgPoolOptions {
    let idle = timeouts.idle_in_transaction.as_millis().to_string();
    let statement = timeouts.statement.as_millis().to_string();
    options.after_connect(move |conn, _| {
        let (idle, statement) = (idle.clone(), statement.clone());
        Box::pin(async move {
            sqlx::query(
                "SELECT set_config('idle_in_transaction_session_timeout', $1, false), \
                        set_config('statement_timeout', $2, false)",
            )
            .bind(idle)
            .bind(statement)
            .execute(conn)
            .await?;
            Ok(())
        })
    })
}

/// Applies every migration not yet applied, on a connection without
/// [`SessionTimeouts`] (a migration may take long, and waits for another
/// process's), which is closed afterwards rather than going back to the
/// pool.
///
/// # Errors
/// The migrator's error when a migration fails or the applied ones differ
/// from the embedded ones.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = pool.acquire().await?;
    conn.close_on_drop();
    sqlx::query(
        "SELECT set_config('idle_in_transaction_session_timeout', '0', false), \
                set_config('statement_timeout', '0', false)",
    )
    .execute(&mut *conn)
    .await?;
    MIGRATOR.run(&mut *conn).await
}

/// Whether every embedded migration has been applied to the database.
///
/// # Errors
/// A database error when the migrations table cannot be read.
pub async fn migrations_current(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied: Vec<i64> = match sqlx::query_scalar(
        "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    {
        Ok(v) => v,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => return Ok(false),
        Err(e) => return Err(e),
    };
    let wanted: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    Ok(applied == wanted)
}

pub use log::SNAPSHOT_EVERY;

/// How often a command is retried when another writer changed the same
/// aggregate between our load and our commit.
const CONFLICT_RETRIES: usize = 25;

/// The metadata stored with a command's events: who and when.
fn metadata(actor: &Actor, at: DateTime<Utc>) -> HashMap<String, String> {
    HashMap::from([
        ("actor".to_string(), actor.to_string()),
        (
            "at".to_string(),
            at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        ),
    ])
}

/// After another writer appended to `id` first: forgets what this process
/// remembered of it and, when the lost decision was already on a fresh
/// load, waits a moment (random, growing with `round`) so that writers
/// colliding on one aggregate spread out.
async fn lost_race<A: Clone>(cache: &Cache<A>, id: &str, fresh: bool, round: usize) {
    cache.forget(id);
    if fresh {
        let backoff = 1u64 << round.min(7);
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % backoff + 1)).await;
    }
}

/// What a failed append (other than a conflict) means to the caller: the
/// aggregate's refusal when the database refused its events for a reason
/// it names (a fenced assignment), else the database's error.
fn append_failed<A>(e: LogError) -> StoreError<A::Error>
where
    A: Stored,
    A::Command: Clone + Send,
{
    match e {
        LogError::Database(e) => match Refused::of(&e).and_then(A::refusal) {
            Some(refusal) => StoreError::Rejected(refusal),
            None => StoreError::from_sqlx(e),
        },
        e => StoreError::from_log(e),
    }
}

/// How many aggregates of each type a process remembers (least recently
/// used first out): tasks in flight, every node and project and user of
/// an ordinary installation.
const CACHED: usize = 8192;

/// The result of a command that was accepted.
#[derive(Debug)]
pub struct Executed<A: Aggregate> {
    /// The aggregate's state after the command.
    pub state: A,
    /// The events appended, empty when the command changed nothing.
    pub events: Vec<EventEnvelope<A>>,
    /// The aggregate's last sequence number after the command.
    pub sequence: usize,
}

/// What [`Store::decide_and_append`] decided and appended.
struct Decided<A: Aggregate> {
    /// The state after the accepted commands.
    state: A,
    /// Each command's outcome, in order.
    outcomes: Vec<Result<(), A::Error>>,
    /// The events appended, empty when none was accepted or none changed
    /// anything.
    events: Vec<EventEnvelope<A>>,
    /// The aggregate's last sequence number after them.
    sequence: usize,
}

/// An aggregate's current state as loaded from the log.
#[derive(Debug)]
pub struct Loaded<A> {
    /// The state.
    pub state: A,
    /// The sequence number of its last event.
    pub sequence: usize,
}

/// An aggregate kept in the event log by [`Store`].
pub trait Stored: Aggregate<Services = ()> + Clone + 'static
where
    Self::Command: Clone + Send,
{
    /// What `store` remembers of this aggregate type.
    #[doc(hidden)]
    fn cache(store: &Store) -> &Cache<Self>;

    /// This aggregate's refusal for a refusal of the database's own
    /// (a trigger's), if the aggregate has one; otherwise the error stays
    /// a database error.
    fn refusal(_refused: Refused) -> Option<Self::Error> {
        None
    }
}

/// An aggregate a command was decided with besides its own, at the
/// sequence the decision saw: see [`Store::execute_guarded`].
#[derive(Debug, Clone, Copy)]
pub struct Guard<'a> {
    /// Its type, such as `project`.
    pub aggregate_type: &'static str,
    /// Its id.
    pub id: &'a str,
    /// The sequence of its last event the decision saw.
    pub sequence: usize,
}

impl<'a> Guard<'a> {
    /// A guard on aggregate `id` of type `A` whose last event the decision
    /// saw is `sequence`.
    pub fn on<A: Stored>(id: &'a str, sequence: usize) -> Self
    where
        A::Command: Clone + Send,
    {
        Guard {
            aggregate_type: A::TYPE,
            id,
            sequence,
        }
    }
}

/// Why the database itself refused to append an event: its triggers guard
/// what no single aggregate can see, such as the scheduler leader's term
/// and what other attempts hold on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The event names a scheduler leader's term that is no longer the
    /// current one, or none while a leader holds the lease
    /// (SQLSTATE [`leader::FENCED`]).
    Fenced(String),
    /// What the event reserves on a node is held already or exceeds the
    /// node (SQLSTATE [`holds::NOT_RESERVED`]).
    NotReserved(String),
}

impl Refused {
    /// The refusal `e` carries, when it is one of the database's own.
    fn of(e: &sqlx::Error) -> Option<Refused> {
        let db = e.as_database_error()?;
        match db.code().as_deref()? {
            leader::FENCED => Some(Refused::Fenced(db.message().to_string())),
            holds::NOT_RESERVED => Some(Refused::NotReserved(db.message().to_string())),
            _ => None,
        }
    }
}

macro_rules! stored {
    ($a:ty, $field:ident) => {
        impl Stored for $a {
            fn cache(store: &Store) -> &Cache<Self> {
                &store.caches.$field
            }
        }
    };
}

impl Stored for Task {
    fn cache(store: &Store) -> &Cache<Self> {
        &store.caches.tasks
    }

    fn refusal(refused: Refused) -> Option<TaskError> {
        Some(match refused {
            Refused::Fenced(m) => TaskError::Fenced(m),
            Refused::NotReserved(m) => TaskError::NotReserved(m),
        })
    }
}
stored!(Node, nodes);
stored!(Project, projects);
stored!(User, users);

/// How many times aggregates were loaded from the log (for a command, a
/// read or a replay), by aggregate type. Loads are what a request costs the
/// log, so `/metrics` shows them, and tests prove with them that a request
/// was refused without any.
#[derive(Debug, Default)]
pub struct AggregateLoads {
    task: AtomicU64,
    node: AtomicU64,
    project: AtomicU64,
    user: AtomicU64,
}

impl AggregateLoads {
    fn counter(&self, aggregate_type: &str) -> Option<&AtomicU64> {
        match aggregate_type {
            Task::TYPE => Some(&self.task),
            Node::TYPE => Some(&self.node),
            Project::TYPE => Some(&self.project),
            User::TYPE => Some(&self.user),
            _ => None,
        }
    }

    fn count(&self, aggregate_type: &str) {
        if let Some(c) = self.counter(aggregate_type) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Loads of `aggregate_type` (`task`, `node`, `project`, `user`) so far;
    /// 0 for any other type.
    pub fn get(&self, aggregate_type: &str) -> u64 {
        self.counter(aggregate_type)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Loads of every aggregate type so far, by type.
    pub fn all(&self) -> [(&'static str, u64); 4] {
        [Task::TYPE, Node::TYPE, Project::TYPE, User::TYPE].map(|t| (t, self.get(t)))
    }

    /// Loads of all types together.
    pub fn total(&self) -> u64 {
        self.all().iter().map(|(_, n)| n).sum()
    }
}

/// What a process remembers of each aggregate type.
struct Caches {
    tasks: Cache<Task>,
    nodes: Cache<Node>,
    projects: Cache<Project>,
    users: Cache<User>,
}

/// The event log: executes commands on aggregates and wakes outbox
/// consumers after each commit. Cheap to clone; clones share their
/// [`AggregateLoads`] and the aggregates they remember.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    notifier: Notifier,
    loads: Arc<AggregateLoads>,
    caches: Arc<Caches>,
}

impl Store {
    /// A store on `pool`. Spawns the coalescing notifier, so call it inside
    /// a Tokio runtime.
    pub fn new(pool: PgPool) -> Self {
        Self {
            notifier: Notifier::spawn(pool.clone()),
            caches: Arc::new(Caches {
                tasks: Cache::new(CACHED),
                nodes: Cache::new(CACHED),
                projects: Cache::new(CACHED),
                users: Cache::new(CACHED),
            }),
            loads: Arc::default(),
            pool,
        }
    }

    /// The same store working on `pool`, another pool of the same
    /// database: it and its clones share with this one what they remember
    /// of aggregates, their load counts and the notifier. A role that needs
    /// connections of its own (the scheduler's, which end soon after their
    /// peer vanishes) still decides on what the other roles of the process
    /// just appended, without loading it again.
    pub fn on_pool(&self, pool: PgPool) -> Self {
        Self {
            pool,
            notifier: self.notifier.clone(),
            loads: self.loads.clone(),
            caches: self.caches.clone(),
        }
    }

    /// What this process remembers of aggregate `id`: its state and
    /// sequence as last appended or loaded here, or `None`. It may be
    /// behind the log (another process appended since), never ahead of it.
    pub fn remembered<A>(&self, id: &str) -> Option<Loaded<A>>
    where
        A: Stored,
        A::Command: Clone + Send,
    {
        A::cache(self).get(id).map(|c| Loaded {
            state: c.state,
            sequence: c.sequence,
        })
    }

    /// How many aggregates this store (and its clones) loaded so far.
    pub fn aggregate_loads(&self) -> &AggregateLoads {
        &self.loads
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The notifier that wakes outbox consumers.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Loads `id` from the log and remembers it: from what this process
    /// remembers of it and the events after that when it remembers it,
    /// else from its latest snapshot and the events after that.
    async fn fetch<A>(&self, id: &str) -> Result<Current<A>, StoreError<A::Error>>
    where
        A: Stored,
        A::Command: Clone + Send,
    {
        self.loads.count(A::TYPE);
        let current = match A::cache(self).get(id) {
            Some(known) => log::catch_up::<A>(&self.pool, id, known).await,
            None => log::load::<A>(&self.pool, id).await,
        }
        .map_err(StoreError::from_log)?;
        if current.sequence > 0 {
            A::cache(self).put(id, current.clone());
        }
        Ok(current)
    }

    /// Executes `command` on aggregate `id` on behalf of `actor` at `at`.
    ///
    /// The command is decided against the aggregate's current state (as
    /// this process remembers it; one it does not remember is assumed
    /// new) and its events are appended
    /// in one statement with optimistic concurrency; when another writer got
    /// there first the aggregate is loaded afresh and the command decided
    /// again, a few times. A refusal, or a command that changes nothing,
    /// is only answered once decided on a fresh load. The actor and time are
    /// stored as the events' metadata.
    ///
    /// # Errors
    /// [`StoreError::Rejected`] when the aggregate refuses the command, or
    /// the database refuses its events ([`Refused`], for a task such as
    /// `TaskError::Fenced`); nothing is appended. [`StoreError::Conflict`]
    /// when writers kept colliding, or a database error.
    pub async fn execute<A>(
        &self,
        id: &str,
        command: A::Command,
        actor: &Actor,
        at: DateTime<Utc>,
    ) -> Result<Executed<A>, StoreError<A::Error>>
    where
        A: Stored,
        A::Command: Clone + Send,
    {
        match self.execute_with(id, command, actor, at, None).await {
            Ok(Some(executed)) => Ok(executed),
            // Only a guarded append comes back without events.
            Ok(None) => Err(StoreError::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Executes `command` on aggregate `id` as [`Store::execute`] does,
    /// provided `guard`'s aggregate, which the caller decided with besides
    /// (a project's membership for a task's submission, say), still has no
    /// event after `guard.sequence` when the events are appended: checked
    /// in the appending statement itself, so deciding on a remembered
    /// guard costs no statement of its own. `None` when it has one:
    /// nothing was appended, and the caller loads the guard and decides
    /// again.
    ///
    /// # Errors
    /// As [`Store::execute`].
    pub async fn execute_guarded<A>(
        &self,
        id: &str,
        command: A::Command,
        actor: &Actor,
        at: DateTime<Utc>,
        guard: &Guard<'_>,
    ) -> Result<Option<Executed<A>>, StoreError<A::Error>>
    where
        A: Stored,
        A::Command: Clone + Send,
    {
        self.execute_with(id, command, actor, at, Some(guard)).await
    }

    async fn execute_with<A>(
        &self,
        id: &str,
        command: A::Command,
        actor: &Actor,
        at: DateTime<Utc>,
        guard: Option<&Guard<'_>>,
    ) -> Result<Option<Executed<A>>, StoreError<A::Error>>
    where
        A: Stored,
        A::Command: Clone + Send,
    {
        let decided = self
            .decide_and_append::<A>(id, std::slice::from_ref(&command), actor, at, guard)
            .await?;
        let Some(Decided {
            state,
            mut outcomes,
            events,
            sequence,
        }) = decided
        else {
            return Ok(None);
        };
        match outcomes.pop() {
            Some(Err(refusal)) => Err(StoreError::Rejected(refusal)),
            _ => Ok(Some(Executed {
                state,
                events,
                sequence,
            })),
        }
    }

    /// Executes `commands` on aggregate `id` one after another, as
    /// [`Store::execute`] would one by one, and appends the events of all
    /// those accepted in one statement: each is decided on the state the
    /// ones before it left, and one refused leaves the state as it was for
    /// the next. A refusal, or a command that changes nothing, decided on a
    /// remembered state has them all decided again on a fresh load, and a
    /// conflict with another writer does too. Returns each command's
    /// outcome, in order; nothing of a refused one is appended.
    ///
    /// # Errors
    /// When the append fails for anything but a conflict (the database
    /// refused some event, or is unreachable), nothing was appended: the
    /// caller executes the commands one by one to learn which. Otherwise
    /// as [`Store::execute`].
    pub async fn execute_each<A>(
        &self,
        id: &str,
        commands: &[A::Command],
        actor: &Actor,
        at: DateTime<Utc>,
    ) -> Result<Vec<Result<(), A::Error>>, StoreError<A::Error>>
    where
        A: Stored,
        A::Command: Clone + Send,
    {
        match self
            .decide_and_append::<A>(id, commands, actor, at, None)
            .await?
        {
            Some(decided) => Ok(decided.outcomes),
            // Only a guarded append comes back without a decision.
            None => Err(StoreError::Conflict),
        }
    }

    /// What [`Store::execute`] and [`Store::execute_each`] share: decides
    /// `commands` in turn on what this process remembers of `id` (one it
    /// does not remember is first assumed new: a command creating it then
    /// costs one statement, and if it exists after all, its first sequence
    /// is taken and it is loaded) and appends the accepted ones' events in
    /// one statement, guarded by `guard` when given. A refusal or a no-op
    /// decided on a remembered state, or a conflict, decides them all again
    /// on a fresh load. `None` when the guard's aggregate moved on.
    async fn decide_and_append<A>(
        &self,
        id: &str,
        commands: &[A::Command],
        actor: &Actor,
        at: DateTime<Utc>,
        guard: Option<&Guard<'_>>,
    ) -> Result<Option<Decided<A>>, StoreError<A::Error>>
    where
        A: Stored,
        A::Command: Clone + Send,
    {
        let metadata = metadata(actor, at);
        let cache = A::cache(self);
        let mut known = cache.get(id).or_else(|| Some(Current::empty()));
        'rounds: for round in 0..CONFLICT_RETRIES {
            // A copy: the cache keeps its own.
            let (current, fresh) = match known.take() {
                Some(c) => (c, false),
                None => (self.fetch::<A>(id).await?, true),
            };
            let Current {
                mut state,
                sequence: after,
            } = current;
            let mut events = Vec::new();
            let mut outcomes = Vec::with_capacity(commands.len());
            for command in commands {
                // A refused command may have changed its copy before it
                // failed: with more than one, the state goes on from the
                // last accepted one. A single command needs no copy: when
                // it is refused nothing is appended.
                let mut copy = (commands.len() > 1).then(|| state.clone());
                let next = copy.as_mut().unwrap_or(&mut state);
                let sink = EventSink::default();
                let decided = next.handle(command.clone(), &(), &sink).await;
                let decided_events = sink.collect().await;
                match decided {
                    Err(_) if !fresh => continue 'rounds,
                    Ok(()) if decided_events.is_empty() && !fresh => continue 'rounds,
                    Err(e) => outcomes.push(Err(e)),
                    Ok(()) => {
                        if let Some(copy) = copy {
                            state = copy;
                        }
                        events.extend(decided_events);
                        outcomes.push(Ok(()));
                    }
                }
            }
            if events.is_empty() {
                return Ok(Some(Decided {
                    state,
                    outcomes,
                    events: vec![],
                    sequence: after,
                }));
            }
            match log::append::<A>(&self.pool, id, after, events, &state, &metadata, guard).await {
                Ok(events) => {
                    self.notifier.poke();
                    let sequence = events.last().map_or(after, |e| e.sequence);
                    cache.put(
                        id,
                        Current {
                            state: state.clone(),
                            sequence,
                        },
                    );
                    return Ok(Some(Decided {
                        state,
                        outcomes,
                        events,
                        sequence,
                    }));
                }
                Err(LogError::Stale) => return Ok(None),
                Err(LogError::Conflict) => lost_race(cache, id, fresh, round).await,
                Err(e) => {
                    cache.forget(id);
                    return Err(append_failed::<A>(e));
                }
            }
        }
        Err(StoreError::Conflict)
    }

    /// Loads aggregate `id` as the log has it now, or `None` when it has
    /// no events: the events after what this process remembers of it, or
    /// when it remembers nothing, its latest snapshot and the events after
    /// that; one statement either way.
    ///
    /// # Errors
    /// A database or deserialisation error.
    pub async fn load<A>(&self, id: &str) -> Result<Option<Loaded<A>>, StoreError<A::Error>>
    where
        A: Stored,
        A::Command: Clone + Send,
    {
        let current = self.fetch::<A>(id).await?;
        if current.sequence == 0 {
            return Ok(None);
        }
        Ok(Some(Loaded {
            state: current.state,
            sequence: current.sequence,
        }))
    }

    /// Aggregate `id`'s state before its event `sequence` (`None` before
    /// its first), that event, and the state after it; `None` when it has
    /// no such event. Read from the nearest snapshot ([`SNAPSHOT_EVERY`]),
    /// so the cost does not grow with the aggregate's history.
    ///
    /// # Errors
    /// A database or deserialisation error.
    #[allow(clippy::type_complexity)]
    pub async fn around<A>(
        &self,
        id: &str,
        sequence: usize,
    ) -> Result<Option<(Option<A>, EventEnvelope<A>, A)>, StoreError<A::Error>>
    where
        A: Stored,
        A::Command: Clone + Send,
    {
        self.loads.count(A::TYPE);
        log::around::<A>(&self.pool, id, sequence)
            .await
            .map_err(StoreError::from_log)
    }

    /// Replays aggregate `id` from its first event up to and including
    /// sequence `until` (all events when `None`), returning each event with
    /// the state after it. Never uses snapshots: this is what debugging
    /// and audits read.
    ///
    /// # Errors
    /// A database or deserialisation error.
    pub async fn replay<A>(
        &self,
        id: &str,
        until: Option<usize>,
    ) -> Result<Vec<(EventEnvelope<A>, A)>, StoreError<A::Error>>
    where
        A: Stored,
        A::Command: Clone + Send,
    {
        self.loads.count(A::TYPE);
        let rows = sqlx::query(
            "SELECT sequence, payload, metadata FROM events \
              WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence <= $3 ORDER BY sequence",
        )
        .bind(A::TYPE)
        .bind(id)
        .bind(until.map_or(i64::MAX, |u| u as i64))
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from_sqlx)?;
        let mut state = A::default();
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let envelope = log::envelope::<A>(row, id).map_err(StoreError::from_log)?;
            state.apply(envelope.payload.clone());
            out.push((envelope, state.clone()));
        }
        Ok(out)
    }
}
