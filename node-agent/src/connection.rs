//! The connection to the server: dial out, say hello, serve commands, send
//! reports, and come back after every failure.
//!
//! The agent dials `<server>/agent/v1/ws` with `Authorization: Bearer
//! <token>`. A 401 answer means the token is wrong or revoked: [`Agent::run`]
//! returns [`Refused`] and the binary exits. Any other failure, and every
//! dropped session, is followed by a reconnect after a [`backoff`] delay
//! (reset only after a session that lived [`backoff::SETTLED_AFTER`] past
//! its `welcome`); nothing from the network makes the agent exit or panic.
//!
//! A session sends `hello` (resources, labels, running attempts, cache),
//! waits for `welcome`, sends every unanswered report again (see
//! [`queue`]), then heartbeats every `heartbeat_s`, acknowledges every
//! command as it arrives and passes it to the [`Supervisor`] (or, for an
//! admin's host command, to the [`host_ssh::Runner`]).
//!
//! Reports survive the agent: unanswered ones are kept in a [`journal`]
//! under the work directory and sent again by the next start. Once the
//! server stored an attempt's final status (or refused it for good), the
//! attempt's container and directory are removed, and only then is the
//! report dropped from the journal. A server that refuses a connect as
//! `rate_limited` ("connect again in N s") is not dialled again before
//! that time.

pub mod backoff;
pub mod journal;
pub mod queue;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use protocol::{AgentMessage, Hello, Resources, ServerMessage, MAX_FRAME_BYTES};
use rand::SeedableRng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header::AUTHORIZATION, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use self::backoff::Backoff;
use self::queue::{Limits, ReportQueue};
use crate::executor::{Context, Report};
use crate::host_ssh::{self, Outbox};
use crate::supervisor::Supervisor;

/// How long dialling (TCP, TLS, upgrade) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server may take to answer `hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// Reports waiting between the executors and the queue.
const REPORT_CHANNEL: usize = 256;
/// Host command results waiting between the runner and its outbox.
const HOST_SSH_CHANNEL: usize = 16;
/// The longest a `rate_limited` refusal can make the agent wait: a
/// server's word is taken, within reason.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A node token. It never appears in logs, errors or `Debug` output.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Wraps a token, trimming surrounding whitespace (as a token file has).
    pub fn new(token: &str) -> Self {
        Token(token.trim().to_owned())
    }

    /// The token itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token([redacted])")
    }
}

/// Everything the connection needs, checked at start-up.
#[derive(Debug, Clone)]
pub struct Config {
    /// `ws://host:port` or `wss://host:port`, without the path.
    pub server: String,
    /// The node token.
    pub token: Token,
    /// TLS settings for `wss://`; see [`tls_config`].
    pub tls: Arc<rustls::ClientConfig>,
    /// Labels the node declares.
    pub labels: BTreeMap<String, String>,
    /// Resources the node declares.
    pub resources: Resources,
    /// The first reconnect delay's upper bound.
    pub reconnect_min: Duration,
    /// The largest reconnect delay.
    pub reconnect_max: Duration,
}

/// A bad `--server` or `--ca-file`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not a `ws://` or `wss://` URL.
    #[error("server address {0:?} must start with ws:// or wss://")]
    Scheme(String),
    /// The CA file could not be read.
    #[error("could not read CA certificates from {path}: {message}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The CA file holds no certificate.
    #[error("{0} holds no PEM certificate")]
    NoCertificates(PathBuf),
}

/// Checks a server address and returns it without a trailing slash.
///
/// # Errors
/// [`ConfigError::Scheme`] unless it starts with `ws://` or `wss://`.
pub fn server_address(server: &str) -> Result<String, ConfigError> {
    let trimmed = server.trim().trim_end_matches('/');
    let known = ["ws://", "wss://"]
        .iter()
        .any(|s| trimmed.len() > s.len() && trimmed.starts_with(s));
    if known {
        Ok(trimmed.to_owned())
    } else {
        Err(ConfigError::Scheme(server.to_owned()))
    }
}

/// TLS settings trusting only the PEM certificates in `ca_file` (a private
/// CA), or the webpki roots without one. ring is the one crypto provider.
///
/// # Errors
/// [`ConfigError::CaFile`] or [`ConfigError::NoCertificates`] for an
/// unusable CA file.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let bad = |message: String| ConfigError::CaFile {
                path: path.to_owned(),
                message,
            };
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))?;
            for cert in certs {
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ConfigError::NoCertificates(path.to_owned()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::CaFile {
            path: ca_file.map(Path::to_owned).unwrap_or_default(),
            message: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The server refused the node's token; reconnecting will not help.
#[derive(Debug, thiserror::Error)]
#[error("the server refused this node's token (wrong or revoked); ask an admin for a new one")]
pub struct Refused;

/// Why dialling failed.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("the server answered 401")]
    Refused,
    #[error("the server answered {0} instead of upgrading to a WebSocket")]
    Status(StatusCode),
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("the token cannot be sent in an HTTP header (it has control characters)")]
    BadToken,
    #[error(transparent)]
    Ws(#[from] WsError),
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("the server closed the connection{0}")]
    Closed(String),
    #[error("the server said {code}: {message}")]
    ServerError { code: String, message: String },
    #[error("no welcome within {0:?}")]
    NoWelcome(Duration),
    #[error("nothing heard from the server for {0:?}")]
    Silent(Duration),
    #[error(transparent)]
    Ws(#[from] WsError),
}

/// The agent: its connection, its report queue and its supervisor.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    ctx: Arc<Context>,
    supervisor: Supervisor,
    queue: Arc<Mutex<ReportQueue>>,
    wake: Arc<Notify>,
    reports_tx: mpsc::Sender<Report>,
    reports_rx: mpsc::Receiver<Report>,
    host_ssh: host_ssh::Runner,
    host_results_tx: mpsc::Sender<protocol::HostSshResult>,
    host_results_rx: mpsc::Receiver<protocol::HostSshResult>,
    /// The work directory's lock, held while the agent lives.
    work_dir_lock: Option<std::fs::File>,
}

/// The lock file that keeps a second agent off a work directory.
const WORK_DIR_LOCK: &str = "agent.lock";

/// Holds the work directory for this agent; `None`, with a warning, where
/// its file system cannot lock files.
fn hold_work_dir(work_dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    use crate::dir_lock::{by_process, hold, HoldError};
    match hold(work_dir, WORK_DIR_LOCK) {
        Ok(held) => Ok(Some(held)),
        Err(e) if e.cannot_lock() => {
            tracing::warn!(error = %e, "the work directory cannot be locked: make sure no other agent uses it");
            Ok(None)
        }
        Err(HoldError::Held { holder, .. }) => Err(std::io::Error::new(
            std::io::ErrorKind::ResourceBusy,
            format!(
                "another agent is running on the work directory {}{}: \
                 stop it first, or give this one a work directory of its own",
                work_dir.display(),
                by_process(holder)
            ),
        )),
        Err(e) => Err(std::io::Error::other(e)),
    }
}

impl Agent {
    /// An agent with this configuration, running tasks with `ctx`; its
    /// report journal is `<work dir>/journal`, and what it holds is sent
    /// again first. It holds the work directory: a second agent on it is
    /// refused until this one is dropped (or its process ends).
    ///
    /// # Errors
    /// The I/O error when the journal cannot be created, read or written,
    /// and one naming the other agent's process when one holds the work
    /// directory.
    pub fn new(config: Config, ctx: Arc<Context>) -> std::io::Result<Self> {
        Agent::with_limits(config, ctx, Limits::default())
    }

    /// Like [`Agent::new`], with other report queue bounds.
    ///
    /// # Errors
    /// As [`Agent::new`].
    pub fn with_limits(config: Config, ctx: Arc<Context>, limits: Limits) -> std::io::Result<Self> {
        let work_dir_lock = hold_work_dir(ctx.work_dir())?;
        let queue = ReportQueue::open(limits, &ctx.work_dir().join(journal::DIR))?;
        let (reports_tx, reports_rx) = mpsc::channel(REPORT_CHANNEL);
        let (host_results_tx, host_results_rx) = mpsc::channel(HOST_SSH_CHANNEL);
        Ok(Agent {
            host_ssh: host_ssh::Runner::new(None, host_results_tx.clone()),
            host_results_tx,
            host_results_rx,
            supervisor: Supervisor::new(Arc::clone(&ctx), reports_tx.clone()),
            config,
            ctx,
            queue: Arc::new(Mutex::new(queue)),
            wake: Arc::new(Notify::new()),
            reports_tx,
            reports_rx,
            work_dir_lock,
        })
    }

    /// Lets admins run commands on this machine's host over SSH to
    /// `config`'s target, and says so in every hello.
    pub fn with_host_ssh(mut self, config: host_ssh::Config) -> Self {
        self.host_ssh = host_ssh::Runner::new(Some(config), self.host_results_tx.clone());
        self
    }

    /// Where executors send their reports; anything sent here reaches the
    /// server reliably.
    pub fn reports(&self) -> mpsc::Sender<Report> {
        self.reports_tx.clone()
    }

    /// Connects and serves until the server refuses the token; reconnects
    /// after everything else.
    pub async fn run(self) -> Refused {
        let Agent {
            config,
            ctx,
            supervisor,
            queue,
            wake,
            reports_rx,
            reports_tx: _,
            host_ssh,
            host_results_tx: _,
            host_results_rx,
            work_dir_lock: _held_until_the_agent_stops,
        } = self;
        let host_results = Arc::new(Mutex::new(Outbox::default()));
        tokio::spawn(collect_host_results(
            host_results_rx,
            Arc::clone(&host_results),
            Arc::clone(&wake),
        ));
        // Attempts whose end the journal holds are reported from it, not
        // adopted; containers of other attempts of a previous run are
        // taken over before the first hello, which lists them.
        let ended = queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ended_attempts();
        supervisor.note_ended(ended);
        supervisor.adopt_leftovers().await;
        tokio::spawn(collect_reports(
            reports_rx,
            supervisor.clone(),
            Arc::clone(&queue),
            Arc::clone(&wake),
        ));
        let link = Link {
            endpoint: format!("{}{}", config.server, protocol::PATH),
            config,
            ctx,
            supervisor,
            queue,
            wake,
            host_ssh,
            host_results,
        };
        link.run().await
    }
}

/// Moves host command results into their outbox and wakes the session.
async fn collect_host_results(
    mut rx: mpsc::Receiver<protocol::HostSshResult>,
    outbox: Arc<Mutex<Outbox>>,
    wake: Arc<Notify>,
) {
    while let Some(result) = rx.recv().await {
        outbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(result);
        wake.notify_one();
    }
}

/// Moves reports from the executors into the queue and wakes the session.
async fn collect_reports(
    mut rx: mpsc::Receiver<Report>,
    supervisor: Supervisor,
    queue: Arc<Mutex<ReportQueue>>,
    wake: Arc<Notify>,
) {
    while let Some(report) = rx.recv().await {
        supervisor.observe(&report);
        queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(report);
        wake.notify_one();
    }
}

/// The running connection loop.
struct Link {
    endpoint: String,
    config: Config,
    ctx: Arc<Context>,
    supervisor: Supervisor,
    queue: Arc<Mutex<ReportQueue>>,
    wake: Arc<Notify>,
    host_ssh: host_ssh::Runner,
    host_results: Arc<Mutex<Outbox>>,
}

impl Link {
    /// The host command results, held only between awaits.
    fn host_results(&self) -> MutexGuard<'_, Outbox> {
        self.host_results
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The queue, held only between awaits.
    fn queue(&self) -> MutexGuard<'_, ReportQueue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn run(self) -> Refused {
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        let mut rng = rand::rngs::StdRng::from_entropy();
        loop {
            let mut retry_after = None;
            match self.dial().await {
                Ok(ws) => {
                    let ended = self.session(ws).await;
                    backoff.session_ended(ended.lived);
                    retry_after = ended.retry_after;
                }
                Err(DialError::Refused) => return Refused,
                Err(e) => {
                    tracing::warn!(server = %self.config.server, error = %e, "could not connect")
                }
            }
            let delay = backoff
                .next_delay(&mut rng)
                .max(retry_after.unwrap_or_default());
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "reconnecting after a pause"
            );
            tokio::time::sleep(delay).await;
        }
    }

    async fn dial(&self) -> Result<Ws, DialError> {
        let mut request = self.endpoint.as_str().into_client_request()?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", self.config.token.expose()))
            .map_err(|_| DialError::BadToken)?;
        auth.set_sensitive(true);
        request.headers_mut().insert(AUTHORIZATION, auth);
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(2 * MAX_FRAME_BYTES))
            .max_frame_size(Some(2 * MAX_FRAME_BYTES));
        let connector = if self.endpoint.starts_with("wss://") {
            Connector::Rustls(Arc::clone(&self.config.tls))
        } else {
            Connector::Plain
        };
        let dial = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(ws_config),
            true,
            Some(connector),
        );
        match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
            Err(_) => Err(DialError::Timeout(CONNECT_TIMEOUT)),
            Ok(Err(WsError::Http(response))) if response.status() == StatusCode::UNAUTHORIZED => {
                Err(DialError::Refused)
            }
            Ok(Err(WsError::Http(response))) => Err(DialError::Status(response.status())),
            Ok(Err(e)) => Err(DialError::Ws(e)),
            Ok(Ok((ws, _))) => Ok(ws),
        }
    }

    /// Runs one session; returns how long it lived after its `welcome`
    /// and how long the server asked the agent to stay away.
    async fn session(&self, ws: Ws) -> Ended {
        let (mut sink, mut stream) = ws.split();
        let hello = self.hello().await;
        if let Err(e) = sink.send(frame(&AgentMessage::Hello(hello))).await {
            tracing::warn!(error = %e, "could not send hello");
            return Ended::default();
        }
        let heartbeat_s = match tokio::time::timeout(WELCOME_TIMEOUT, welcome(&mut stream)).await {
            Ok(Ok((heartbeat_s, output_limit))) => {
                self.ctx.set_output_limit(output_limit);
                heartbeat_s
            }
            Ok(Err(end)) => {
                if matches!(&end, SessionEnd::ServerError { code, .. } if code == "protocol_version")
                {
                    tracing::error!(
                        agent_protocol = protocol::VERSION,
                        "the server does not accept this agent's protocol version: \
                         upgrade this agent (or, if it is newer than the server, the server first)"
                    );
                }
                let retry_after = end.retry_after();
                tracing::warn!(reason = %end, retry_after_s = retry_after.map(|d| d.as_secs()), "session ended before welcome");
                return Ended {
                    lived: None,
                    retry_after,
                };
            }
            Err(_) => {
                tracing::warn!(reason = %SessionEnd::NoWelcome(WELCOME_TIMEOUT), "session ended");
                return Ended::default();
            }
        };
        let welcomed = Instant::now();
        self.queue().rewind();
        self.host_results().rewind();
        self.ctx.files().broker().rewind();
        let end = self.serve(&mut sink, &mut stream, heartbeat_s).await;
        tracing::warn!(reason = %end, "session ended");
        Ended {
            lived: Some(welcomed.elapsed()),
            retry_after: end.retry_after(),
        }
    }

    async fn hello(&self) -> Hello {
        Hello {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            resources: self.config.resources.clone(),
            labels: self.config.labels.clone(),
            running: self.running(),
            cache: self.ctx.cache().await,
            host_ssh: self.host_ssh.configured(),
        }
    }

    /// What the hello lists as running: the attempts executing here, and
    /// those that ended but whose reports the server has not stored yet
    /// (without them the server would take the attempt for lost).
    fn running(&self) -> Vec<protocol::RunningAttempt> {
        let mut running = self.supervisor.running();
        let listed: std::collections::HashSet<_> =
            running.iter().map(|r| (r.task_id, r.attempt)).collect();
        let unanswered = self.queue().attempts();
        running.extend(
            unanswered
                .into_iter()
                .filter(|key| !listed.contains(key))
                .map(|(task_id, attempt)| protocol::RunningAttempt {
                    task_id,
                    attempt,
                    container: None,
                }),
        );
        running
    }

    /// The welcomed part of a session; returns why it ended.
    async fn serve(
        &self,
        sink: &mut (impl SinkExt<Message, Error = WsError> + Unpin),
        stream: &mut (impl StreamExt<Item = Result<Message, WsError>> + Unpin),
        heartbeat_s: u64,
    ) -> SessionEnd {
        let period = Duration::from_secs(heartbeat_s.max(1));
        let silence = period * 3 + Duration::from_secs(10);
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        let mut seq = 0;
        let mut last_heard = Instant::now();
        loop {
            if let Err(e) = self.flush(sink).await {
                return e.into();
            }
            let step = tokio::select! {
                incoming = stream.next() => {
                    last_heard = Instant::now();
                    self.on_frame(incoming, sink).await
                }
                _ = self.wake.notified() => Ok(()),
                _ = self.ctx.files().broker().wanted() => Ok(()),
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > silence {
                        return SessionEnd::Silent(silence);
                    }
                    seq += 1;
                    send_heartbeat(sink, seq).await
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Sends queued reports while the in-flight window allows.
    async fn flush(
        &self,
        sink: &mut (impl SinkExt<Message, Error = WsError> + Unpin),
    ) -> Result<(), WsError> {
        if self.ctx.take_cache_change() {
            let cache = self.ctx.cache().await;
            sink.send(frame(&AgentMessage::Cache(cache))).await?;
        }
        loop {
            let batch = self.queue().next_batch();
            if batch.is_empty() {
                break;
            }
            for message in &batch {
                sink.send(frame(message)).await?;
            }
        }
        loop {
            let next = self.ctx.files().broker().next_message();
            match next {
                Some(message) => sink.send(frame(&message)).await?,
                None => break,
            }
        }
        loop {
            let next = self.host_results().next_message();
            match next {
                Some(message) => sink.send(frame(&message)).await?,
                None => return Ok(()),
            }
        }
    }

    async fn on_frame(
        &self,
        incoming: Option<Result<Message, WsError>>,
        sink: &mut (impl SinkExt<Message, Error = WsError> + Unpin),
    ) -> Result<(), SessionEnd> {
        match incoming {
            Some(Ok(Message::Text(text))) => self.on_message(text.as_str(), sink).await,
            Some(Ok(Message::Close(close))) => Err(SessionEnd::Closed(
                close
                    .map(|c| format!(" ({} {})", c.code, c.reason))
                    .unwrap_or_default(),
            )),
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.into()),
            None => Err(SessionEnd::Closed(String::new())),
        }
    }

    async fn on_message(
        &self,
        text: &str,
        sink: &mut (impl SinkExt<Message, Error = WsError> + Unpin),
    ) -> Result<(), SessionEnd> {
        let message = match protocol::decode_newer::<ServerMessage>(text) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(code = e.code(), error = %e, "ignoring a frame this agent cannot read");
                return Ok(());
            }
        };
        match message {
            ServerMessage::Command {
                command_id,
                command,
            } => {
                sink.send(frame(&AgentMessage::Ack { command_id })).await?;
                match command {
                    protocol::Command::HostSsh(request) => self.host_ssh.handle(request),
                    command => self.supervisor.handle(command_id, command),
                }
            }
            ServerMessage::Received { id, error } => self.on_received(id, error),
            ServerMessage::Error { code, message } => {
                tracing::warn!(%code, %message, "the server reported an error");
                if matches!(code.as_str(), "revoked" | "replaced") {
                    return Err(SessionEnd::ServerError { code, message });
                }
            }
            ServerMessage::TransferUrl(grant) => self.ctx.files().broker().answer(grant),
            ServerMessage::Welcome { .. } => tracing::debug!("ignoring a second welcome"),
        }
        Ok(())
    }

    /// The server stored report `id`, or refused it for good (`error`):
    /// either way it is dropped from the queue and the journal and never
    /// sent again. An attempt's final status first releases the attempt's
    /// container and directory.
    fn on_received(&self, id: u64, error: Option<String>) {
        if Outbox::owns(id) {
            if let Some(error) = error {
                tracing::warn!(id, reason = %protocol::bounds::quoted(&error), "the server refused a host command result for good");
            }
            self.host_results().answer(id);
            return;
        }
        let answered = self.queue().answer(id);
        match (&answered, &error) {
            (Some(a), Some(error)) => tracing::warn!(
                id,
                task_id = %a.task_id,
                attempt = a.attempt,
                report = %a.what,
                reason = %protocol::bounds::quoted(error),
                "the server refused a report for good; dropped, it is not sent again"
            ),
            (None, Some(error)) => tracing::warn!(
                id,
                reason = %protocol::bounds::quoted(error),
                "the server refused a report this agent no longer holds"
            ),
            _ => {}
        }
        if let Some(answered) = answered.filter(|a| a.ends_attempt) {
            tokio::spawn(settle(
                Arc::clone(&self.ctx),
                Arc::clone(&self.queue),
                answered,
            ));
        }
    }
}

/// Removes what an attempt left here once the server has its end, then
/// drops its final status from the journal. If removing fails the report
/// stays in the journal, so the next start sends it again and retries.
async fn settle(ctx: Arc<Context>, queue: Arc<Mutex<ReportQueue>>, answered: queue::Answered) {
    let (task_id, attempt) = (answered.task_id, answered.attempt);
    match crate::executor::release(&ctx, task_id, attempt).await {
        Ok(()) => {
            tracing::debug!(%task_id, attempt, "attempt released");
            queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .settled(answered.id);
        }
        Err(e) => tracing::warn!(
            %task_id,
            attempt,
            error = %e,
            "could not remove what the attempt left; its final report stays journaled and the next start tries again"
        ),
    }
}

/// How a session ended, for the reconnect.
#[derive(Debug, Default)]
struct Ended {
    /// How long it lived after its `welcome`; `None` without one.
    lived: Option<Duration>,
    /// How long the server asked the agent to stay away.
    retry_after: Option<Duration>,
}

impl SessionEnd {
    /// For a `rate_limited` refusal: the time it names ("connect again in
    /// N s"), at most [`MAX_RETRY_AFTER`].
    fn retry_after(&self) -> Option<Duration> {
        match self {
            SessionEnd::ServerError { code, message } if code == "rate_limited" => {
                Some(retry_after(message).unwrap_or(Duration::from_secs(10)))
            }
            _ => None,
        }
    }
}

/// The wait a `rate_limited` message names: the number of seconds after
/// "again in".
fn retry_after(message: &str) -> Option<Duration> {
    let (_, rest) = message.split_once("again in ")?;
    let number: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let secs: f64 = number.parse().ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        secs.min(MAX_RETRY_AFTER.as_secs_f64()),
    ))
}

/// Reads frames until `welcome`; returns its heartbeat period and the
/// server's limit on an attempt's output.
async fn welcome(
    stream: &mut (impl StreamExt<Item = Result<Message, WsError>> + Unpin),
) -> Result<(u64, Option<u64>), SessionEnd> {
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => {
                match protocol::decode_newer::<ServerMessage>(text.as_str()) {
                    Ok(ServerMessage::Welcome {
                        node_id,
                        session,
                        heartbeat_s,
                        output_limit_bytes,
                    }) => {
                        tracing::info!(%node_id, %session, heartbeat_s, output_limit_bytes, "connected");
                        return Ok((heartbeat_s, output_limit_bytes));
                    }
                    Ok(ServerMessage::Error { code, message }) => {
                        return Err(SessionEnd::ServerError { code, message })
                    }
                    Ok(other) => tracing::debug!(?other, "ignoring a message before welcome"),
                    Err(e) => tracing::warn!(error = %e, "ignoring a frame this agent cannot read"),
                }
            }
            Some(Ok(Message::Close(close))) => {
                return Err(SessionEnd::Closed(
                    close
                        .map(|c| format!(" ({} {})", c.code, c.reason))
                        .unwrap_or_default(),
                ))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err(SessionEnd::Closed(String::new())),
        }
    }
}

async fn send_heartbeat(
    sink: &mut (impl SinkExt<Message, Error = WsError> + Unpin),
    seq: u64,
) -> Result<(), SessionEnd> {
    sink.send(frame(&AgentMessage::Heartbeat { seq })).await?;
    // A ping the server answers on its own, so a dead link is noticed.
    sink.send(Message::Ping(Default::default())).await?;
    Ok(())
}

fn frame(message: &AgentMessage) -> Message {
    Message::text(protocol::encode(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let token = Token::new(" s3cret\n");
        assert_eq!(token.expose(), "s3cret");
        assert!(!format!("{token:?}").contains("s3cret"));
    }

    #[test]
    fn server_addresses_need_a_websocket_scheme() {
        assert_eq!(server_address("ws://h:8080/").unwrap(), "ws://h:8080");
        assert_eq!(server_address("wss://h").unwrap(), "wss://h");
        assert!(server_address("http://h").is_err());
        assert!(server_address("ws://").is_err());
    }

    #[test]
    fn a_rate_limited_refusal_names_the_wait() {
        let end = |code: &str, message: &str| SessionEnd::ServerError {
            code: code.into(),
            message: message.into(),
        };
        let limited = end(
            "rate_limited",
            "this node connected too often; connect again in 7 s",
        );
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(
            end("rate_limited", "connect again in 2.5 s").retry_after(),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            end("rate_limited", "connect again in 99999999 s").retry_after(),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            end("rate_limited", "later").retry_after(),
            Some(Duration::from_secs(10)),
            "a wait it cannot read is a short one"
        );
        assert_eq!(end("revoked", "connect again in 7 s").retry_after(), None);
        assert_eq!(SessionEnd::Silent(Duration::ZERO).retry_after(), None);
    }

    #[test]
    fn a_missing_ca_file_is_named_in_the_error() {
        let err = tls_config(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"));
        assert!(tls_config(None).is_ok());
    }
}
