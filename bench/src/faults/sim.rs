//! Simulated agents for the fault harness: the real protocol over real
//! WebSockets, with the behaviour of `unidesk-agent` that the platform's
//! promises rest on, and none of its Docker work.
//!
//! A simulated node runs each attempt for the time its command names
//! (`["sim", "<ms>", "<exit code>"]`) and reports `accepted`, `running`,
//! then `succeeded` or `failed`. Like the real agent it acknowledges every
//! command, ignores a command id it has seen, keeps every report until the
//! server answers `received` and sends the unanswered ones again, in order,
//! after a reconnect, and lists in its `hello` the attempts it still runs
//! or still has reports for. A node may declare GPUs it does not have.
//!
//! What one life of the agent knows dies with it ([`SimAgent::kill`] is a
//! `kill -9`: its runs and unanswered reports are gone). What the harness
//! needs to judge the platform outlives every life in the [`Journal`]:
//! every report answered `received`, every heartbeat sent on a welcomed
//! session, and what the node itself saw go wrong (two attempts on one GPU
//! at once).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use protocol::{
    AgentMessage, Command, Gpu, Hello, ReportedState, Resources, RunningAttempt, ServerMessage,
    Status,
};
use rand::Rng;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header::AUTHORIZATION, HeaderValue};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

/// Where agents connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The ingress's TCP address.
    pub addr: SocketAddr,
    /// `ws://host:port/agent/v1/ws`.
    pub ws_url: String,
}

/// Who a simulated node is and what it declares.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The node's name.
    pub name: String,
    /// Its agent token.
    pub token: String,
    /// Where it connects.
    pub endpoint: Endpoint,
    /// GPUs it declares (indices 0..gpus).
    pub gpus: u32,
    /// CPU cores it declares.
    pub cpus: f64,
    /// Memory it declares, in MiB.
    pub memory_mb: u64,
}

/// A report the server answered `received` without an error.
#[derive(Debug, Clone)]
pub struct Acked {
    /// The task.
    pub task: Uuid,
    /// The attempt.
    pub attempt: u32,
    /// What was reported.
    pub state: ReportedState,
    /// When the answer arrived.
    pub at: DateTime<Utc>,
}

/// What a simulated node's lives recorded, for the harness's checks.
#[derive(Debug, Clone, Default)]
pub struct Journal {
    /// Reports answered `received` without an error.
    pub acked: Vec<Acked>,
    /// Reports refused for good: (task, attempt, state, why).
    pub refused: Vec<(Uuid, u32, ReportedState, String)>,
    /// When a heartbeat was written to a welcomed session.
    pub beats: Vec<DateTime<Utc>>,
    /// Welcomed sessions: when welcomed, and when they ended.
    pub sessions: Vec<(DateTime<Utc>, Option<DateTime<Utc>>)>,
    /// Times the node was cut off on purpose: from, until.
    pub dark: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    /// What the node itself saw go wrong, one sentence each.
    pub physical: Vec<String>,
    /// Whether a session is welcomed now.
    pub connected: bool,
    /// `run_task` commands started.
    pub runs: u64,
}

impl Journal {
    /// Whether the node was welcomed and sent heartbeats no further than
    /// `gap` apart over all of `[from, to]`, and was not cut off in it: a
    /// node the platform must not have taken for silent then.
    pub fn beating_throughout(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        gap: chrono::Duration,
    ) -> bool {
        if self.dark.iter().any(|(a, b)| *a <= to && *b >= from - gap) {
            return false;
        }
        let in_session = self
            .sessions
            .iter()
            .any(|(start, end)| *start <= from - gap && end.is_none_or(|e| e >= to));
        if !in_session {
            return false;
        }
        let mut last = from - gap;
        for beat in self.beats.iter().filter(|b| **b > from - gap && **b <= to) {
            if *beat - last > gap {
                return false;
            }
            last = *beat;
        }
        to - last <= gap
    }
}

/// What the harness tells a running life.
#[derive(Debug)]
enum Control {
    /// Neither read nor write until then, then carry on.
    Dark(Instant),
    /// Close the session and end.
    Stop,
}

/// A simulated node, across its lives.
pub struct SimAgent {
    config: Arc<SimConfig>,
    journal: Arc<Mutex<Journal>>,
    control: Option<mpsc::UnboundedSender<Control>>,
    task: Option<JoinHandle<()>>,
}

impl SimAgent {
    /// A node that is not running yet.
    pub fn new(config: SimConfig) -> SimAgent {
        SimAgent {
            config: Arc::new(config),
            journal: Arc::default(),
            control: None,
            task: None,
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The journal of all its lives.
    pub fn journal(&self) -> MutexGuard<'_, Journal> {
        lock(&self.journal)
    }

    /// Starts a new life with an empty memory.
    pub fn start(&mut self) {
        let (tx, rx) = mpsc::unbounded_channel();
        let life = Life {
            config: self.config.clone(),
            journal: self.journal.clone(),
            control: rx,
            node: Node::default(),
        };
        self.control = Some(tx);
        self.task = Some(tokio::spawn(life.run()));
    }

    /// Whether a life runs.
    pub fn running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Ends the life at once, as `kill -9` would: the socket is dropped
    /// without a close frame and everything the life knew is gone.
    pub async fn kill(&mut self) {
        self.control = None;
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        lock(&self.journal).connected = false;
        close_session(&self.journal);
    }

    /// Cuts the node off for `how_long`: it neither reads nor writes (its
    /// runs go on), then carries on with whatever is left of its session.
    pub fn partition(&self, how_long: Duration) {
        let now = Utc::now();
        lock(&self.journal).dark.push((
            now,
            now + chrono::Duration::from_std(how_long).unwrap_or_default(),
        ));
        if let Some(control) = &self.control {
            let _ = control.send(Control::Dark(Instant::now() + how_long));
        }
    }

    /// Whether a session is welcomed now.
    pub fn connected(&self) -> bool {
        lock(&self.journal).connected
    }

    /// Closes the session cleanly and ends the life.
    pub async fn stop(&mut self) {
        if let Some(control) = self.control.take() {
            let _ = control.send(Control::Stop);
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        lock(&self.journal).connected = false;
        close_session(&self.journal);
    }
}

fn lock(journal: &Mutex<Journal>) -> MutexGuard<'_, Journal> {
    journal.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks the open session, if any, ended now.
fn close_session(journal: &Mutex<Journal>) {
    let mut j = lock(journal);
    if let Some((_, end)) = j.sessions.last_mut() {
        if end.is_none() {
            *end = Some(Utc::now());
        }
    }
}

/// One attempt running on the node.
#[derive(Debug, Clone)]
struct Run {
    gpus: Vec<u32>,
    ends_at: Instant,
    exit: i64,
}

/// What one life knows.
#[derive(Debug, Default)]
struct Node {
    running: HashMap<(Uuid, u32), Run>,
    /// Reports not answered yet, by id (so in the order they were made).
    unanswered: BTreeMap<u64, Status>,
    next_id: u64,
    seen: HashSet<Uuid>,
}

impl Node {
    /// Queues a report; returns it for sending.
    fn report(
        &mut self,
        task: Uuid,
        attempt: u32,
        state: ReportedState,
        exit: Option<i64>,
    ) -> Status {
        self.next_id += 1;
        let status = Status {
            id: self.next_id,
            task_id: task,
            attempt,
            state,
            stage: None,
            container: (state == ReportedState::Running).then(|| format!("sim-{task}-{attempt}")),
            exit_code: exit.filter(|_| state == ReportedState::Failed),
            message: (state == ReportedState::Failed)
                .then(|| "the simulated command failed".into()),
            node_fault: false,
        };
        self.unanswered.insert(status.id, status.clone());
        status
    }

    /// Ends the runs whose time is up; returns their final reports.
    fn finish_due(&mut self, now: Instant) -> Vec<Status> {
        let due: Vec<(Uuid, u32)> = self
            .running
            .iter()
            .filter(|(_, r)| r.ends_at <= now)
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::new();
        for key in due {
            if let Some(run) = self.running.remove(&key) {
                let state = if run.exit == 0 {
                    ReportedState::Succeeded
                } else {
                    ReportedState::Failed
                };
                out.push(self.report(key.0, key.1, state, Some(run.exit)));
            }
        }
        out
    }

    fn next_end(&self) -> Option<Instant> {
        self.running.values().map(|r| r.ends_at).min()
    }

    /// What `hello` lists: runs, and attempts with unanswered reports.
    fn hello_running(&self) -> Vec<RunningAttempt> {
        let mut keys: Vec<(Uuid, u32)> = self.running.keys().copied().collect();
        keys.extend(self.unanswered.values().map(|s| (s.task_id, s.attempt)));
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .map(|(task_id, attempt)| RunningAttempt {
                task_id,
                attempt,
                container: self
                    .running
                    .contains_key(&(task_id, attempt))
                    .then(|| format!("sim-{task_id}-{attempt}")),
            })
            .collect()
    }
}

type Ws = WebSocketStream<TcpStream>;

/// Why a session ended.
enum Ended {
    /// Told to stop: the life ends.
    Stop,
    /// The connection failed or the server closed it: reconnect.
    Lost,
}

/// One life of a simulated agent.
struct Life {
    config: Arc<SimConfig>,
    journal: Arc<Mutex<Journal>>,
    control: mpsc::UnboundedReceiver<Control>,
    node: Node,
}

impl Life {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.join()).await {
                Ok(Ok((ws, heartbeat))) => {
                    backoff = Duration::from_millis(100);
                    {
                        let mut j = lock(&self.journal);
                        j.connected = true;
                        j.sessions.push((Utc::now(), None));
                    }
                    let ended = self.serve(ws, heartbeat).await;
                    lock(&self.journal).connected = false;
                    close_session(&self.journal);
                    if matches!(ended, Ended::Stop) {
                        return;
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(node = %self.config.name, error = %e, "could not join")
                }
                Err(_) => tracing::debug!(node = %self.config.name, "no welcome within 10 s"),
            }
            // Full jitter, as the real agent does.
            let pause = backoff.mul_f64(rand::thread_rng().gen_range(0.0..1.0));
            backoff = (backoff * 2).min(Duration::from_secs(1));
            if self.pause(pause).await {
                return;
            }
        }
    }

    /// Waits `how_long`, longer when cut off meanwhile; whether to stop.
    async fn pause(&mut self, how_long: Duration) -> bool {
        let mut until = Instant::now() + how_long;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return false,
                control = self.control.recv() => match control {
                    Some(Control::Dark(d)) => until = until.max(d),
                    Some(Control::Stop) | None => return true,
                },
            }
        }
    }

    /// Connects, says hello and waits for welcome; the heartbeat interval.
    async fn join(&mut self) -> anyhow::Result<(Ws, Duration)> {
        let endpoint = &self.config.endpoint;
        let socket = TcpSocket::new_v4().context("creating a socket")?;
        let stream = socket
            .connect(endpoint.addr)
            .await
            .with_context(|| format!("connecting to {}", endpoint.addr))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        let mut request = endpoint
            .ws_url
            .as_str()
            .into_client_request()
            .context("building the upgrade request")?;
        request.headers_mut().insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", self.config.token))
                .context("token header")?,
        );
        let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .context("WebSocket handshake")?;
        let hello = AgentMessage::Hello(Hello {
            agent_version: "faults-sim".into(),
            resources: Resources {
                cpus: self.config.cpus,
                memory_mb: self.config.memory_mb,
                gpus: (0..self.config.gpus)
                    .map(|index| Gpu {
                        index,
                        name: "Simulated GPU".into(),
                        memory_mb: 16 * 1024,
                    })
                    .collect(),
            },
            running: self.node.hello_running(),
            ..Hello::default()
        });
        ws.send(Message::text(protocol::encode(&hello)))
            .await
            .context("sending hello")?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    match protocol::decode::<ServerMessage>(text.as_str()).context("decoding")? {
                        ServerMessage::Welcome { heartbeat_s, .. } => {
                            return Ok((ws, Duration::from_secs(heartbeat_s.max(1))))
                        }
                        ServerMessage::Error { code, message } => {
                            bail!("refused: {code}: {message}")
                        }
                        other => bail!("expected welcome, got {other:?}"),
                    }
                }
                Some(Ok(Message::Close(frame))) => bail!("closed before welcome: {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("reading welcome"),
                None => bail!("closed before welcome"),
            }
        }
    }

    /// The welcomed part of a session.
    async fn serve(&mut self, mut ws: Ws, heartbeat: Duration) -> Ended {
        // Every unanswered report again, in order.
        let again: Vec<Status> = self.node.unanswered.values().cloned().collect();
        for status in again {
            if send(&mut ws, &AgentMessage::Status(status)).await.is_err() {
                return Ended::Lost;
            }
        }
        let mut beat = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0;
        loop {
            for status in self.node.finish_due(Instant::now()) {
                if send(&mut ws, &AgentMessage::Status(status)).await.is_err() {
                    return Ended::Lost;
                }
            }
            let next_end = self
                .node
                .next_end()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                control = self.control.recv() => match control {
                    Some(Control::Dark(d)) => tokio::time::sleep_until(d).await,
                    Some(Control::Stop) | None => {
                        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                        return Ended::Stop;
                    }
                },
                _ = beat.tick() => {
                    seq += 1;
                    if send(&mut ws, &AgentMessage::Heartbeat { seq }).await.is_err() {
                        return Ended::Lost;
                    }
                    lock(&self.journal).beats.push(Utc::now());
                }
                () = tokio::time::sleep_until(next_end) => {}
                message = ws.next() => {
                    let handled = match message {
                        Some(Ok(Message::Text(text))) => self.handle(&mut ws, text.as_str()).await,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Err(()),
                        Some(Ok(_)) => Ok(()),
                    };
                    if handled.is_err() {
                        return Ended::Lost;
                    }
                }
            }
        }
    }

    /// Handles one server frame; `Err` ends the session.
    async fn handle(&mut self, ws: &mut Ws, text: &str) -> Result<(), ()> {
        let Ok(message) = protocol::decode::<ServerMessage>(text) else {
            return Err(());
        };
        match message {
            ServerMessage::Command {
                command_id,
                command,
            } => {
                send(ws, &AgentMessage::Ack { command_id }).await?;
                if !self.node.seen.insert(command_id) {
                    return Ok(());
                }
                match command {
                    Command::RunTask(run) => self.run_task(ws, &run).await,
                    Command::CancelTask {
                        task_id, attempt, ..
                    } => {
                        if self.node.running.remove(&(task_id, attempt)).is_some() {
                            let status =
                                self.node
                                    .report(task_id, attempt, ReportedState::Cancelled, None);
                            send(ws, &AgentMessage::Status(status)).await?;
                        }
                        Ok(())
                    }
                    Command::HostSsh(_) => Ok(()),
                }
            }
            ServerMessage::Received { id, error } => {
                if let Some(status) = self.node.unanswered.remove(&id) {
                    let mut j = lock(&self.journal);
                    match error {
                        None => j.acked.push(Acked {
                            task: status.task_id,
                            attempt: status.attempt,
                            state: status.state,
                            at: Utc::now(),
                        }),
                        Some(e) => {
                            j.refused
                                .push((status.task_id, status.attempt, status.state, e))
                        }
                    }
                }
                Ok(())
            }
            ServerMessage::Error { .. } => Err(()),
            ServerMessage::Welcome { .. } | ServerMessage::TransferUrl(_) => Ok(()),
        }
    }

    /// Starts an attempt, unless it already runs here.
    async fn run_task(&mut self, ws: &mut Ws, run: &protocol::RunTask) -> Result<(), ()> {
        let key = (run.task_id, run.attempt);
        if self.node.running.contains_key(&key) {
            return Ok(());
        }
        for ((task, attempt), other) in &self.node.running {
            let shared: Vec<u32> = other
                .gpus
                .iter()
                .filter(|g| run.gpus.contains(g))
                .copied()
                .collect();
            if !shared.is_empty() {
                lock(&self.journal).physical.push(format!(
                    "node {} was given GPU {shared:?} for attempt {} of task {} while attempt {attempt} of task {task} still ran on it",
                    self.config.name, run.attempt, run.task_id
                ));
            }
        }
        let (ms, exit) = sim_command(&run.command);
        self.node.running.insert(
            key,
            Run {
                gpus: run.gpus.clone(),
                ends_at: Instant::now() + Duration::from_millis(ms),
                exit,
            },
        );
        lock(&self.journal).runs += 1;
        for state in [ReportedState::Accepted, ReportedState::Running] {
            let status = self.node.report(run.task_id, run.attempt, state, None);
            send(ws, &AgentMessage::Status(status)).await?;
        }
        Ok(())
    }
}

/// `["sim", "<ms>", "<exit>"]`: how long to run and how to end; anything
/// else runs half a second and succeeds.
pub fn sim_command(command: &[String]) -> (u64, i64) {
    match command {
        [sim, ms, exit] if sim == "sim" => (ms.parse().unwrap_or(500), exit.parse().unwrap_or(0)),
        _ => (500, 0),
    }
}

async fn send(ws: &mut Ws, message: &AgentMessage) -> Result<(), ()> {
    ws.send(Message::text(protocol::encode(message)))
        .await
        .map_err(|_| ())
}
