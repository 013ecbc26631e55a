//! UniDesk's agent ingress: the server side of the node agents' WebSockets.
//!
//! Compute nodes have no public address, so their agents dial out to
//! [`protocol::PATH`] and keep one WebSocket open. This crate
//!
//! - authenticates the upgrade with the node's token and refuses anything
//!   else with a 401 before a single byte of WebSocket is spoken
//!   ([`Ingress::router`]);
//! - runs one session per connection in one Tokio task: `hello` →
//!   `NodeConnected` and `welcome`, reconciliation of what the agent still
//!   runs, every pending command, then heartbeats, reports and log chunks
//!   until the connection ends (`NodeDisconnected`);
//! - turns reports into Task commands on behalf of the node the session
//!   authenticated as, never the node a frame names;
//! - follows the outbox ([`Ingress::run`]) and delivers `run_task`,
//!   `cancel_task` and an admin's `host_ssh` to the sessions connected to
//!   *this* process, and closes
//!   sessions whose token was revoked or whose node connected elsewhere.
//!
//! Task output is stored within bounds no agent can talk its way past (a
//! size cap per attempt, a rate per session) and announces itself to log
//! followers; see [`LogLimits`].
//!
//! Nothing an agent sends is trusted to be storable: every message passes
//! [`protocol::bounds`] right after it is decoded (texts cleaned and cut,
//! lists capped, identifiers checked), agent text reaches a log line only
//! quoted, and a report that can never be stored is answered
//! `received{id, error}` and shown on its task's timeline instead of
//! ending the session. How often a node may connect, and how often its
//! refusals are told, is bounded per node ([`ConnectLimits`]).
//!
//! Several ingress processes may serve one database side by side: each
//! delivers only to its own sessions, and a command stays wanted in the log
//! until the agent reports on it, so a reconnect anywhere resends it.
//!
//! The ingress never decides that a task is lost: a closed session only
//! records `NodeDisconnected`. The scheduler decides from
//! `node_liveness.last_seen`, which heartbeats keep fresh, and from
//! `ingress_liveness`, which says since when nodes could be heard at all.

mod admission;
mod auth;
mod commands;
mod fanout;
mod host_ssh;
mod liveness;
mod logs;
mod registry;
mod reports;
mod secrets;
mod session;
mod shutdown;
mod transfers;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use store::outbox::Checkpoint;
use store::Store;
use tokio::sync::{Mutex, OnceCell};
use uuid::Uuid;

use crate::admission::Admission;
use crate::logs::LogNotifier;
use crate::registry::Registry;

/// The longest [`Ingress::catch_up`] waits for transactions older than the
/// events it was asked to deliver.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(10);

pub use crate::admission::{ConnectLimits, NOTICE_BURST, NOTICE_EVERY};
pub use crate::commands::{check_run_task_fits, run_task_message, PendingError, TooLargeForFrame};
pub use crate::fanout::CONSUMER as DEAD_LETTER_CONSUMER;
pub use crate::liveness::{ALIVE_EVERY, ALIVE_WITHIN};
pub use crate::logs::{cut_marker, LogLimits, CHUNK_COST, MIN_BYTES_PER_S};

/// How the ingress behaves, fixed at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// This process's name in `node_liveness.ingress`, such as
    /// `<hostname>-<pid>`: tells operators which replica holds a node.
    pub ingress_id: String,
    /// How often agents send heartbeats, told to them in `welcome`. A
    /// session that stays silent for [`IDLE_HEARTBEATS`] of these is closed.
    pub heartbeat_s: u64,
    /// How long a new connection may take to send `hello`.
    pub hello_timeout: Duration,
    /// The longest the outbox consumer waits between reads when no NOTIFY
    /// arrives.
    pub poll: Duration,
    /// Seconds between SIGTERM and SIGKILL in `cancel_task`.
    pub cancel_grace_s: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ingress_id: format!("ingress-{}", std::process::id()),
            heartbeat_s: 15,
            hello_timeout: Duration::from_secs(10),
            poll: Duration::from_millis(250),
            cancel_grace_s: 10,
        }
    }
}

/// How many heartbeat intervals a session may stay silent before it is
/// closed as dead (a half-open TCP connection never says goodbye).
pub const IDLE_HEARTBEATS: u64 = 4;

/// How long [`Ingress::run`] takes at most, at shutdown, for its sessions
/// to say goodbye and for recording their ends before it returns.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// The agent ingress: a router for the WebSocket endpoint and the outbox
/// consumer that feeds its sessions. Cheap to clone; clones share the
/// sessions.
#[derive(Clone)]
pub struct Ingress {
    store: Store,
    config: Arc<Config>,
    registry: Registry,
    /// Where the outbox consumer starts: the head of the outbox when the
    /// consumer or the first session asked, whichever came first. Every
    /// session reads its pending commands after this point is fixed, so
    /// between them the two see every event.
    start: Arc<OnceCell<Checkpoint>>,
    /// How far the outbox consumer has delivered; `None` until its first
    /// step, which starts at `start`. Held through a whole step, so two
    /// steps never deliver the same events side by side.
    delivered: Arc<Mutex<Option<Checkpoint>>>,
    /// Whether the last read of the outbox found events committed but held
    /// back by an older open transaction: the consumer then looks again
    /// soon.
    held_back: Arc<std::sync::atomic::AtomicBool>,
    /// Assignments delivered from this process's own commits before the
    /// outbox showed them, by task and sequence: the outbox's copy of each
    /// is not sent again.
    sent_early: Arc<std::sync::Mutex<HashSet<(Uuid, i64)>>>,
    /// Bounds on stored task output.
    log_limits: LogLimits,
    /// Wakes log followers after output is stored.
    log_notifier: LogNotifier,
    /// Signs URLs for the nodes' transfers, when the server has a store.
    objects: Option<objects::ObjectStore>,
    /// Opens the project secrets running attempts ask for.
    secrets_key: Option<store::secrets::SecretsKey>,
    /// How often each node may connect and have its refusals told.
    admission: Admission,
    /// What the ingress counts for `/metrics`.
    metrics: telemetry::IngressMetrics,
    /// Permits to record a session's end ([`shutdown::RECORDERS`]): ends
    /// recorded at once, so that thousands of sessions ending together
    /// queue here rather than on the pool, where they would time out and
    /// keep every other query waiting.
    end_recorders: Arc<tokio::sync::Semaphore>,
    /// Sessions over that have not recorded their end yet
    /// ([`Ingress::ending`]). Such a session may have left the registry
    /// already (at shutdown one that no longer takes a goodbye is dropped
    /// from it), so [`Ingress::run`] waits for these too before it returns
    /// and the process closes its pool.
    ending: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one session in [`Ingress::ending`] until dropped.
pub(crate) struct Ending(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Ending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Ingress {
    /// An ingress on `store`. Nothing runs until [`Ingress::router`] is
    /// served and [`Ingress::run`] is polled.
    pub fn new(store: Store, config: Config) -> Self {
        Self {
            store,
            config: Arc::new(config),
            registry: Registry::default(),
            start: Arc::new(OnceCell::new()),
            delivered: Arc::new(Mutex::new(None)),
            held_back: Arc::default(),
            sent_early: Arc::default(),
            log_limits: LogLimits::default(),
            log_notifier: LogNotifier::default(),
            objects: None,
            secrets_key: None,
            admission: Admission::new(ConnectLimits::default()),
            metrics: telemetry::IngressMetrics::default(),
            end_recorders: Arc::new(tokio::sync::Semaphore::new(shutdown::RECORDERS)),
            ending: Arc::default(),
        }
    }

    /// Counts a session that is over in [`Ingress::run`]'s wait at
    /// shutdown until the guard is dropped, once its end is recorded.
    pub(crate) fn ending(&self) -> Ending {
        self.ending
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ending(self.ending.clone())
    }

    /// The same ingress counting into the process's `metrics` (sessions,
    /// heartbeats, reports, output stored, its outbox lag). Call before
    /// serving.
    pub fn with_metrics(mut self, metrics: &telemetry::Metrics) -> Self {
        self.metrics = metrics.ingress().clone();
        let registry = self.registry.clone();
        let counts = self.metrics.clone();
        metrics.on_scrape(move || {
            counts.set_connected(registry.len());
            std::future::ready(())
        });
        self
    }

    /// The same ingress with other limits on how often a node may connect
    /// (the default is [`ConnectLimits::default`]). Call before serving.
    pub fn with_connect_limits(mut self, limits: ConnectLimits) -> Self {
        self.admission = Admission::new(limits);
        self
    }

    /// The same ingress signing URLs for the nodes' task inputs and outputs
    /// with `objects`; without one, every transfer is refused with a
    /// message saying so. Call before serving.
    pub fn with_objects(mut self, objects: Option<objects::ObjectStore>) -> Self {
        self.objects = objects;
        self
    }

    /// The same ingress handing running attempts the project secrets their
    /// tasks name, opened with `key`; without one, such attempts fail
    /// saying the server has no secrets key. Call before serving.
    pub fn with_secrets_key(mut self, key: Option<store::secrets::SecretsKey>) -> Self {
        self.secrets_key = key;
        self
    }

    /// The same ingress with other bounds on stored task output (the
    /// default is [`LogLimits::default`]). Call before serving: sessions
    /// already running keep the bounds they started with.
    pub fn with_log_limits(mut self, limits: LogLimits) -> Self {
        self.log_limits = limits;
        self
    }

    /// The WebSocket endpoint at [`protocol::PATH`], to merge with the
    /// REST router on the same listener.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route(protocol::PATH, get(session::upgrade))
            .with_state(self.clone())
    }

    /// Delivers commands from the outbox to the sessions of this process,
    /// sends the wake-ups of log followers and records that this ingress is
    /// alive (`ingress_liveness`, every [`ALIVE_EVERY`]), until `shutdown`
    /// completes. Then every session says goodbye at once (close code 1001,
    /// "going away": its agent reconnects elsewhere), and their ends are
    /// recorded as `NodeDisconnected` a few at a time, for at most
    /// [`SHUTDOWN_WAIT`] in all; an end left unrecorded is what a crash
    /// would leave (see `shutdown.rs`). Database errors are logged and
    /// retried; this never fails.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let ingress_id = &self.config.ingress_id;
        tokio::select! {
            () = fanout::follow(self) => {}
            () = self.log_notifier.run(self.store.pool()) => {}
            () = liveness::keep_alive(self.store.pool(), ingress_id) => {}
            () = &mut shutdown => {}
        }
        liveness::gone(self.store.pool(), ingress_id).await;
        let asked = self.registry.close_all();
        let began = tokio::time::Instant::now();
        let deadline = began + SHUTDOWN_WAIT;
        // Every session asked has said goodbye, and every session over
        // (asked or not: one that ended just before may be recording its
        // own end outside the registry) has recorded its end.
        let goodbyes = async {
            while (self.registry.len() > 0
                || self.ending.load(std::sync::atomic::Ordering::SeqCst) > 0)
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let (ends, ()) = tokio::join!(shutdown::record_ends(self, asked, deadline), goodbyes);
        tracing::info!(
            left = self.registry.len(),
            ends_recorded = ends.recorded,
            nodes_moved = ends.moved,
            ends_unrecorded = ends.left,
            secs = began.elapsed().as_secs_f64(),
            "ingress stopped"
        );
    }

    /// One step of the outbox consumer that [`Ingress::run`] repeats:
    /// delivers to the sessions of this process what every event since
    /// the last step asks (commands, host SSH requests, sessions to close)
    /// and returns how many events it read. When it returns, everything
    /// appended before the call has been handled, so a test can drive
    /// delivery itself instead of waiting for the loop.
    ///
    /// # Errors
    /// A database error; the next step starts again from the last batch
    /// handled in full (what was already sent is sent again, which agents
    /// ignore).
    #[tracing::instrument(name = "outbox_delivery", skip_all, fields(events = tracing::field::Empty))]
    pub async fn deliver_once(&self) -> Result<usize, PendingError> {
        let mut delivered = self.delivered.lock().await;
        let mut at = match *delivered {
            Some(at) => at,
            None => self.start_point().await?,
        };
        let mut events = 0;
        self.metrics.delivered(at);
        while let Some((next, read)) = fanout::run_once(self, at).await? {
            at = next;
            events += read;
            *delivered = Some(at);
            self.metrics.delivered(at);
        }
        *delivered = Some(at);
        tracing::Span::current().record("events", events);
        Ok(events)
    }

    /// Delivers everything committed before the call. Events stay
    /// invisible to readers while an older transaction is open anywhere on
    /// the database server, so this waits for them, at most
    /// [`CATCH_UP_WAIT`]; after that it returns with what it delivered.
    ///
    /// # Errors
    /// As [`Ingress::deliver_once`].
    pub async fn catch_up(&self) -> Result<usize, PendingError> {
        let target = store::outbox::committed_head(self.store.pool()).await?;
        let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        let mut events = 0;
        loop {
            events += self.deliver_once().await?;
            let reached = self.delivered.lock().await.is_some_and(|at| at >= target);
            if reached || tokio::time::Instant::now() >= deadline {
                return Ok(events);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// How many agent sessions this process holds.
    pub fn connected(&self) -> usize {
        self.registry.len()
    }

    /// Where the outbox consumer starts; fixed on first use.
    ///
    /// # Errors
    /// A database error reading the outbox head.
    async fn start_point(&self) -> Result<Checkpoint, sqlx::Error> {
        self.start
            .get_or_try_init(|| store::outbox::head(self.store.pool()))
            .await
            .copied()
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn log_limits(&self) -> LogLimits {
        self.log_limits
    }

    fn metrics(&self) -> &telemetry::IngressMetrics {
        &self.metrics
    }

    fn log_notifier(&self) -> &LogNotifier {
        &self.log_notifier
    }

    fn objects(&self) -> Option<&objects::ObjectStore> {
        self.objects.as_ref()
    }

    fn secrets_key(&self) -> Option<&store::secrets::SecretsKey> {
        self.secrets_key.as_ref()
    }

    fn admission(&self) -> &Admission {
        &self.admission
    }
}
