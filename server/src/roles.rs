//! The server roles and their life cycle: each runs until told to stop, so
//! a test can start them on a port-0 listener and shut them down cleanly.

use std::time::Duration;

use anyhow::Context;
use axum::serve::{ListenerExt, TapIo};
use clap::Args;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cli::Role;

/// How often the scheduler role looks for abandoned uploads to abort.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Settings shared by the roles.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Accept `file://` repository URLs (only for agents on this machine).
    #[arg(long, env = "UNIDESK_ALLOW_FILE_URLS")]
    pub allow_file_urls: bool,
    /// Let every user create projects (by default only admins may).
    #[arg(long, env = "UNIDESK_USERS_CREATE_PROJECTS")]
    pub users_create_projects: bool,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "UNIDESK_BODY_LIMIT", default_value_t = 1024 * 1024)]
    pub body_limit: usize,
    /// How often outbox consumers poll when no NOTIFY arrives, in ms.
    #[arg(long, env = "UNIDESK_POLL_MS", default_value_t = 250)]
    pub poll_ms: u64,
    /// How often agents send heartbeats, in seconds.
    #[arg(long, env = "UNIDESK_HEARTBEAT_S", default_value_t = 15)]
    pub heartbeat_s: u64,
    /// A node without a heartbeat for this long is offline and its tasks
    /// lost, in seconds.
    #[arg(long, env = "UNIDESK_OFFLINE_AFTER_S", default_value_t = 90)]
    pub offline_after_s: u64,
    /// How long past a task's `timeout_s` the server waits for the node to
    /// stop it before timing it out itself (the watchdog), in seconds.
    #[arg(long, env = "UNIDESK_TIMEOUT_GRACE_S", default_value_t = 30)]
    pub timeout_grace_s: u64,
    /// An assigned attempt its node has not accepted after this long is
    /// given up and the task requeued, in seconds.
    #[arg(long, env = "UNIDESK_ACCEPT_TIMEOUT_S", default_value_t = 120)]
    pub accept_timeout_s: u64,
    /// How long the scheduler leader's lease lasts unless renewed, in
    /// seconds: a standby scheduler takes over at most this long after the
    /// leader stopped (the leader renews it every third of this).
    #[arg(long, env = "UNIDESK_LEADER_LEASE_S", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub leader_lease_s: u64,
    /// The most output kept per task attempt, in MiB: past it the output
    /// is cut and ends with a marker line.
    #[arg(long, env = "UNIDESK_MAX_LOG_MB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1024 * 1024))]
    pub max_log_mb: u64,
    /// The rate at which one node may store task output, in KiB/s: a node
    /// that sends faster is slowed down (and its agent drops the middle of
    /// what it cannot send, with a marker line). At least 64; 0 for no bound.
    #[arg(long, env = "UNIDESK_LOG_RATE_KB", default_value_t = 1024,
          value_parser = parse_log_rate)]
    pub log_rate_kb: u64,
    /// The most live (unrevoked, unexpired) API tokens one user may hold;
    /// issuing one more answers 409.
    #[arg(long, env = "UNIDESK_MAX_TOKENS_PER_USER", default_value_t = api::limits::DEFAULT_MAX_TOKENS_PER_USER,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub max_tokens_per_user: usize,
    /// The most live streams (log follows and timeline streams together)
    /// one user may hold open on this API process; one more answers 429.
    #[arg(long, env = "UNIDESK_MAX_STREAMS_PER_USER", default_value_t = api::limits::DEFAULT_MAX_STREAMS_PER_USER,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub max_streams_per_user: usize,
    /// Requests per second one API token may make, sustained (requests
    /// without a valid token count per client address); past it, 429 with
    /// Retry-After. 0 for no limit.
    #[arg(long, env = "UNIDESK_RATE_LIMIT_PER_S", default_value_t = api::limits::DEFAULT_RATE_PER_S)]
    pub rate_limit_per_s: u32,
    /// Requests one API token may make at once on top of the steady rate.
    #[arg(long, env = "UNIDESK_RATE_LIMIT_BURST", default_value_t = api::limits::DEFAULT_RATE_BURST,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: u32,
    /// Output of tasks that finished longer ago than this many days is
    /// removed (by the scheduler role); 0 keeps it forever.
    #[arg(long, env = "UNIDESK_LOG_RETENTION_DAYS", default_value_t = 90)]
    pub log_retention_days: u32,
    /// The most task output kept in the database, in GiB (fractions
    /// allowed): past it the output of the oldest finished tasks is
    /// removed. 0 for no bound.
    #[arg(long, env = "UNIDESK_LOG_BUDGET_GB", default_value_t = 20.0, value_parser = parse_gb)]
    pub log_budget_gb: f64,
    /// The database's size budget in GiB (fractions allowed): a warning
    /// from 80%, `/readyz` degraded and task output refused from 95%
    /// (events are never refused). 0 turns it off.
    #[arg(long, env = "UNIDESK_DB_BUDGET_GB", default_value_t = 0.0, value_parser = parse_gb)]
    pub db_budget_gb: f64,
    /// PostgreSQL ends a session of this server idle inside a transaction
    /// for this long, in seconds (an open transaction holds every outbox
    /// consumer back). 0 turns it off.
    #[arg(long, env = "UNIDESK_DB_IDLE_TX_TIMEOUT_S", default_value_t = 30)]
    pub db_idle_tx_timeout_s: u64,
    /// PostgreSQL cancels a statement of this server running this long, in
    /// seconds. 0 turns it off.
    #[arg(long, env = "UNIDESK_DB_STATEMENT_TIMEOUT_S", default_value_t = 60)]
    pub db_statement_timeout_s: u64,
    /// A transaction open this long, anywhere on the database server, is
    /// warned about and makes `/readyz` say degraded, in seconds.
    #[arg(long, env = "UNIDESK_STALL_WARN_S", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub stall_warn_s: u64,
    /// Also serve `/metrics`, `/healthz` and `/readyz` on this address,
    /// for the monitoring network only: its `/metrics` adds tasks per
    /// project, by project name. Off by default; any roles (`serve` only:
    /// `dev` serves `/metrics` on its `--listen`).
    #[arg(long, env = "UNIDESK_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The object store for task inputs and outputs (the `--s3-*` flags).
    #[command(flatten)]
    pub s3: crate::objects::S3Args,
    /// The object store itself, once built from `s3` (or the embedded one
    /// of `dev`); `None` without one.
    #[arg(skip)]
    pub objects: Option<objects::ObjectStore>,
    /// The file holding the key that seals project secrets (64 hex digits;
    /// `unidesk dev` makes one). The API needs it to set secrets, the
    /// ingress to hand them to running tasks; without it, projects have no
    /// secrets.
    #[arg(long, env = "UNIDESK_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<std::path::PathBuf>,
    /// The key itself, once read from `secrets_key_file` (or made by
    /// `dev`).
    #[arg(skip)]
    pub secrets_key: Option<store::secrets::SecretsKey>,
}

impl ServerArgs {
    /// The defaults of `serve`, for `dev` and tests.
    pub fn defaults() -> Self {
        Self {
            allow_file_urls: false,
            users_create_projects: false,
            body_limit: 1024 * 1024,
            poll_ms: 250,
            heartbeat_s: 15,
            offline_after_s: 90,
            timeout_grace_s: 30,
            accept_timeout_s: 120,
            leader_lease_s: 10,
            max_log_mb: 64,
            log_rate_kb: 1024,
            max_tokens_per_user: api::limits::DEFAULT_MAX_TOKENS_PER_USER,
            max_streams_per_user: api::limits::DEFAULT_MAX_STREAMS_PER_USER,
            rate_limit_per_s: api::limits::DEFAULT_RATE_PER_S,
            rate_limit_burst: api::limits::DEFAULT_RATE_BURST,
            log_retention_days: 90,
            log_budget_gb: 20.0,
            db_budget_gb: 0.0,
            db_idle_tx_timeout_s: 30,
            db_statement_timeout_s: 60,
            stall_warn_s: 30,
            metrics_listen: None,
            s3: crate::objects::S3Args::defaults(),
            objects: None,
            secrets_key_file: None,
            secrets_key: None,
        }
    }
}

fn parse_log_rate(s: &str) -> Result<u64, String> {
    let min = ingress::MIN_BYTES_PER_S / 1024;
    match s.trim().parse::<u64>() {
        Ok(0) => Ok(0),
        Ok(n) if (min..=u64::MAX / 4096).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected 0 (no bound) or a rate of at least {min} KiB/s, got {s:?}"
        )),
    }
}

/// A size in GiB: a finite number, 0 or more.
fn parse_gb(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(gb) if gb.is_finite() && gb >= 0.0 => Ok(gb),
        _ => Err(format!(
            "expected a size in GiB, 0 or more (such as 20 or 0.5), got {s:?}"
        )),
    }
}

/// `gb` GiB in bytes.
fn gib(gb: f64) -> u64 {
    (gb * 1024.0 * 1024.0 * 1024.0).round() as u64
}

impl ServerArgs {
    /// The timeouts set on every connection of the server's pool.
    pub fn session_timeouts(&self) -> store::SessionTimeouts {
        store::SessionTimeouts {
            idle_in_transaction: Duration::from_secs(self.db_idle_tx_timeout_s),
            statement: Duration::from_secs(self.db_statement_timeout_s),
        }
    }

    /// What `/readyz` and the janitor call degraded.
    pub fn health_limits(&self) -> store::health::Limits {
        store::health::Limits {
            db_budget_bytes: gib(self.db_budget_gb),
            stall_after: Duration::from_secs(self.stall_warn_s),
        }
    }

    /// What the janitor keeps within bounds.
    pub fn janitor(&self) -> crate::janitor::Config {
        crate::janitor::Config {
            retention: (self.log_retention_days > 0)
                .then(|| Duration::from_secs(u64::from(self.log_retention_days) * 24 * 3600)),
            log_budget_bytes: gib(self.log_budget_gb),
            limits: self.health_limits(),
        }
    }

    /// The API's request rate limit; `None` when turned off.
    pub fn rate_limit(&self) -> Option<api::RateLimit> {
        Some(api::RateLimit {
            per_s: std::num::NonZeroU32::new(self.rate_limit_per_s)?,
            burst: std::num::NonZeroU32::new(self.rate_limit_burst)?,
        })
    }

    /// The ingress's bounds on stored task output.
    pub fn log_limits(&self) -> ingress::LogLimits {
        let bytes_per_s = self.log_rate_kb * 1024;
        ingress::LogLimits {
            max_bytes_per_attempt: self.max_log_mb * 1024 * 1024,
            bytes_per_s,
            burst_bytes: (bytes_per_s * 4).max(ingress::LogLimits::default().burst_bytes),
        }
    }
}

/// Running roles.
pub struct Services {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Services {
    /// Stops every role and waits for each to finish its current work.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Resolves once Ctrl-C or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Serves `app` on `listener` until `shutdown` completes.
fn serve(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // With each connection's address, by which the rate limit counts
        // requests that carry no valid token.
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        if let Err(e) = axum::serve(without_delay(listener), app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "http server failed");
        }
    })
}

/// `listener`, with Nagle's algorithm off on every connection it accepts:
/// frames go out as written. With it on, a command written while the agent
/// has not acknowledged the frame before waits for that acknowledgement,
/// which the agent's side may hold back for tens of milliseconds.
fn without_delay(listener: TcpListener) -> TapIo<TcpListener, fn(&mut TcpStream)> {
    fn no_delay(tcp: &mut TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on a connection");
        }
    }
    listener.tap_io(no_delay as fn(&mut TcpStream))
}

/// A listener on `addr`, bound now.
fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(listener)?)
}

/// Starts `roles` on `store`; the API and the ingress serve on `listener`,
/// and so do `/healthz`, `/readyz` and `/metrics` whatever the roles. Every
/// role of the process counts into one set of metrics, which
/// `--metrics-listen` also serves.
pub fn start(
    store: store::Store,
    listener: TcpListener,
    roles: &[Role],
    args: &ServerArgs,
) -> anyhow::Result<Services> {
    if roles.is_empty() {
        return Err(anyhow::anyhow!("no roles chosen")).context("--roles");
    }
    let (stop, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let poll = Duration::from_millis(args.poll_ms);
    let metrics = telemetry::Metrics::new(&store, args.health_limits());
    if let Some(addr) = args.metrics_listen {
        let listener = bind(addr)
            .with_context(|| format!("listening on {addr}"))
            .context("--metrics-listen")?;
        let probes = api::probes(
            store.clone(),
            args.health_limits(),
            metrics.clone(),
            telemetry::Scope::Private,
        );
        tasks.push(serve(
            listener,
            metrics.track_http(probes),
            stopped(rx.clone()),
        ));
    }
    let mut app = axum::Router::new();
    let mut followers = None;
    let mut timeline = None;
    if roles.contains(&Role::Api) {
        let config = api::Config {
            url_policy: domain::spec::UrlPolicy {
                allow_file: args.allow_file_urls,
            },
            body_limit: args.body_limit,
            users_create_projects: args.users_create_projects,
            max_tokens_per_user: args.max_tokens_per_user,
            max_streams_per_user: args.max_streams_per_user,
            rate_limit: args.rate_limit(),
            health: args.health_limits(),
        };
        let state = api::AppState::new(store.clone(), config)
            .with_objects(args.objects.clone(), args.s3.part_bytes())
            .with_secrets_key(args.secrets_key.clone())
            .with_metrics(metrics.clone());
        followers = Some(state.log_followers().clone());
        timeline = Some(state.timeline().clone());
        app = app.merge(api::router(state));
    }
    if roles.contains(&Role::Ingress) {
        let ingress = ingress::Ingress::new(
            store.clone(),
            ingress::Config {
                ingress_id: format!(
                    "{}:{}",
                    std::env::var("HOSTNAME").unwrap_or_else(|_| "ingress".into()),
                    std::process::id()
                ),
                heartbeat_s: args.heartbeat_s,
                poll,
                ..ingress::Config::default()
            },
        )
        .with_log_limits(args.log_limits())
        .with_objects(args.objects.clone())
        .with_secrets_key(args.secrets_key.clone())
        .with_metrics(&metrics);
        app = app.merge(ingress.router());
        let shutdown = stopped(rx.clone());
        tasks.push(tokio::spawn(async move { ingress.run(shutdown).await }));
    }
    if !roles.contains(&Role::Api) {
        // The probes and the metrics, which the API serves among its routes.
        app = app.merge(api::probes(
            store.clone(),
            args.health_limits(),
            metrics.clone(),
            telemetry::Scope::Public,
        ));
    }
    let stop_http = stopped(rx.clone());
    // Live log and timeline streams never end by themselves: end them,
    // or the graceful shutdown would wait for their clients to leave.
    let shutdown = async move {
        stop_http.await;
        if let Some(followers) = followers {
            followers.stop();
        }
        if let Some(timeline) = timeline {
            timeline.stop();
        }
    };
    tasks.push(serve(listener, metrics.track_http(app), shutdown));
    if roles.contains(&Role::Projector) {
        let projector = projections::Projector::new(store.pool().clone())
            .with_observer(metrics.projector_observer());
        let shutdown = stopped(rx.clone());
        tasks.push(tokio::spawn(async move {
            projector.run(poll, shutdown).await;
        }));
    }
    if roles.contains(&Role::Scheduler) {
        let scheduler = crate::scheduler::Scheduler::new(
            store.clone(),
            crate::scheduler::Config {
                offline_after: Duration::from_secs(args.offline_after_s),
                timeout_grace: Duration::from_secs(args.timeout_grace_s),
                accept_timeout: Duration::from_secs(args.accept_timeout_s),
                lease: Duration::from_secs(args.leader_lease_s),
                poll: poll.max(Duration::from_millis(100)),
                ..crate::scheduler::Config::default()
            },
        )
        .with_observer(metrics.projector_observer());
        let shutdown = stopped(rx.clone());
        tasks.push(tokio::spawn(async move { scheduler.run(shutdown).await }));
        // Output retention and budgets, and the database watch: one
        // process at a time.
        let janitor = crate::janitor::Janitor::new(store.clone(), args.janitor());
        let shutdown = stopped(rx.clone());
        tasks.push(tokio::spawn(async move { janitor.run(shutdown).await }));
        // Uploads nobody completed: every scheduler replica sweeps, each
        // upload is claimed by one of them.
        if let Some(objects) = args.objects.clone() {
            let sweeper = objects::uploads::Sweeper::new(
                store.pool().clone(),
                objects,
                args.s3.upload_grace(),
            );
            let shutdown = stopped(rx.clone());
            tasks.push(tokio::spawn(async move {
                sweeper.run(SWEEP_EVERY, shutdown).await;
            }));
        }
    }
    Ok(Services { stop, tasks })
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener;

    use super::*;

    /// Accepts one connection from a client of `listener`.
    async fn accepted<L>(mut listener: L) -> TcpStream
    where
        L: Listener<Io = TcpStream, Addr = std::net::SocketAddr>,
    {
        let addr = listener.local_addr().expect("the listener's address");
        let (client, (io, _)) = tokio::join!(TcpStream::connect(addr), listener.accept());
        drop(client.expect("connecting"));
        io
    }

    #[tokio::test]
    async fn the_server_sends_without_waiting_for_acknowledgements() {
        let any = || bind("127.0.0.1:0".parse().expect("an address")).expect("binding");
        // What accepting alone gives: Nagle's algorithm on.
        let plain = accepted(any()).await;
        assert!(!plain.nodelay().expect("reading TCP_NODELAY"));
        // What the server serves with.
        let served = accepted(without_delay(any())).await;
        assert!(served.nodelay().expect("reading TCP_NODELAY"));
    }
}
