//! One agent's session, from the upgrade to the goodbye.
//!
//! ```text
//! upgrade ─ token ok ─► awaiting hello ─ hello ─► admitted ─► connecting ─► live ─► closing
//!    │ 401                 │ timeout, bad frame,    │ too often   │ revoked,       │ bad frame, replaced,
//!    ▼                     ▼ hello out of bounds    ▼             ▼ db down        ▼ revoked, idle, gone,
//!  (no socket)          error + close            rate_limited  error + close    shutdown → NodeDisconnected
//!                       (nothing appended)       (nothing appended)
//! ```
//!
//! A valid hello must also be admitted ([`crate::admission`]): a node that
//! connects too often is told when to come back, and the hellos of one
//! node are handled one at a time until the agent is welcomed. Every
//! message is bounded by [`protocol::bounds`] as it is read; agent text
//! reaches a reason or a log line only cleaned, cut and Debug-quoted.
//!
//! A session is one Tokio task (the one axum spawns for the upgrade) that
//! owns its socket and selects over the socket, a small queue of frames
//! from the outbox consumer ([`crate::registry`]) and an idle timer.
//! Frames are handled one at a time, in order, which is also the back
//! pressure: an agent that floods waits for its own answers. Buffers are
//! small ([`SOCKET_BUFFER`]) so tens of thousands of idle agents fit in one
//! process, and everything but the wait for the next frame runs boxed
//! (see [`serve`]): an idle session is a task of about 1.1 KiB and one box
//! of about 1.1 KiB beside its socket's buffers, and a handler's database
//! futures take memory only while it runs. `unidesk-loadgen idle` measures
//! the whole: 7.5 KiB of server memory per idle agent with 10,000.

use std::collections::HashSet;
use std::error::Error as _;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use domain::node::{Gpu, Node, NodeCommand, NodeError, NodeResources, NodeStatus};
use domain::Actor;
use futures::FutureExt as _;
use protocol::bounds::{self, MAX_REASON_BYTES};
use protocol::{AgentMessage, DecodeError, Hello, ServerMessage, TransferGrant};
use store::StoreError;
use telemetry::ingress::{ReportKind, ReportOutcome};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite;
use tracing::Instrument;
use uuid::Uuid;

use crate::commands::{self, Encoded};
use crate::host_ssh;
use crate::registry::{Ending, Outgoing};
use crate::reports::{self, Answer, LogPermissions};
use crate::{auth, liveness, shutdown, Ingress, IDLE_HEARTBEATS};

/// tungstenite's read and write buffers per connection. Its default read
/// buffer (128 KiB) would cost ~135 KiB per idle agent; idle sessions are
/// what one ingress holds by the ten thousand (BENCHMARKS.md). A larger
/// frame is read in more chunks, never refused for it.
pub(crate) const SOCKET_BUFFER: usize = 2048;

/// How long a closing session waits for the agent's close frame.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// `GET /agent/v1/ws`: checks the node token, then upgrades.
pub(crate) async fn upgrade(
    State(ingress): State<Ingress>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let node_id = match auth::authenticate(ingress.store(), &headers).await {
        Ok(node_id) => node_id,
        Err(refusal) => return refusal.into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    ws.read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .max_message_size(protocol::MAX_FRAME_BYTES)
        .max_frame_size(protocol::MAX_FRAME_BYTES)
        .on_failed_upgrade(move |e| {
            tracing::info!(%node_id, error = %e, "agent WebSocket upgrade failed");
        })
        .on_upgrade(move |socket| {
            // Instrumented here rather than with `#[instrument]`, whose
            // wrapper keeps the session's future twice in every idle
            // session's task.
            let span = tracing::info_span!(
                "agent_session",
                %node_id,
                session = tracing::field::Empty
            );
            serve(ingress, node_id, socket).instrument(span)
        })
}

/// How a session ends.
#[derive(Debug)]
enum End {
    /// The agent closed the connection or it broke.
    Gone(String),
    /// The server closes it, saying why in an `error` frame first.
    Refused {
        code: &'static str,
        message: String,
        close: u16,
    },
    /// This process is stopping: close, no error.
    ShuttingDown,
}

/// A reason that may quote the agent, made one short line.
fn reason_text(text: &str) -> String {
    bounds::line(text, MAX_REASON_BYTES)
}

impl End {
    fn refused(code: &'static str, message: impl AsRef<str>) -> Self {
        End::Refused {
            code,
            message: reason_text(message.as_ref()),
            close: close_code::POLICY,
        }
    }

    fn bad_frame(e: &DecodeError) -> Self {
        End::Refused {
            code: e.code(),
            message: reason_text(&e.to_string()),
            close: match e {
                DecodeError::TooLarge(_) => close_code::SIZE,
                _ => close_code::POLICY,
            },
        }
    }

    fn from_socket_error(e: &axum::Error) -> Self {
        let inner = e
            .source()
            .and_then(|s| s.downcast_ref::<tungstenite::Error>());
        match inner {
            Some(tungstenite::Error::Capacity(c)) => End::Refused {
                code: "too_large",
                message: format!("{c}; the limit is {} bytes", protocol::MAX_FRAME_BYTES),
                close: close_code::SIZE,
            },
            Some(tungstenite::Error::Utf8(_)) => {
                End::refused("bad_frame", "text frame is not UTF-8")
            }
            _ => End::Gone(reason_text(&format!("connection failed: {e}"))),
        }
    }

    fn from_ending(why: Ending) -> Self {
        match why {
            Ending::Replaced => End::Refused {
                code: "replaced",
                message: "the node connected again; this older session is closed".into(),
                close: close_code::NORMAL,
            },
            Ending::Revoked => End::refused("revoked", "the node's token was revoked"),
            Ending::Offline => End::Refused {
                code: "session_ended",
                message: "the platform marked this node offline; connect again".into(),
                close: close_code::NORMAL,
            },
            Ending::ShuttingDown => End::ShuttingDown,
        }
    }

    /// The reason recorded in `NodeDisconnected`: one line, at most
    /// [`MAX_REASON_BYTES`].
    fn reason(&self) -> String {
        match self {
            End::Gone(why) => reason_text(why),
            End::Refused { code, message, .. } => reason_text(&format!("{code}: {message}")),
            End::ShuttingDown => "the ingress shut down".into(),
        }
    }
}

/// Runs a session on an upgraded socket until it ends, in the span
/// [`upgrade`] opened naming the node and, once connected, the session.
///
/// Tens of thousands of sessions sit idle in one process, each as one
/// task, and a task keeps room for the largest state its future can be in.
/// So the opening is built and boxed here, in a plain function (an async
/// body keeps its arguments, and each value it moves on, in fields of
/// their own), what the session holds while it lives is one box
/// ([`Opened`]), and every step that needs more than the wait for the next
/// frame runs boxed.
fn serve(
    ingress: Ingress,
    node_id: Uuid,
    socket: WebSocket,
) -> impl std::future::Future<Output = ()> + Send {
    let opening = Box::pin(open(ingress, node_id, socket));
    async move {
        if let Some(mut opened) = opening.await {
            opened.run().await;
        }
    }
}

/// From the upgrade to a registered session: the hello, the admission and
/// `NodeConnected`. `None` when the session ended there; the agent was
/// told why.
async fn open(ingress: Ingress, node_id: Uuid, mut socket: WebSocket) -> Option<Box<Opened>> {
    let hello = match Box::pin(await_hello(&mut socket, ingress.config().hello_timeout)).await {
        Ok(hello) => hello,
        Err(end) => {
            // Nothing is written for a session that never said hello: its
            // log line is the only trace, and a loop of them is told
            // within the node's notices.
            if ingress.admission().notice(node_id).is_some() {
                log_end(node_id, None, &end);
            }
            Box::pin(close(&mut socket, end)).await;
            return None;
        }
    };
    // Admitted before anything is written; the turn is held until the
    // agent is welcomed, so the hellos of one node never race.
    let turn = match ingress.admission().admit(node_id) {
        Ok(turn) => turn.lock_owned().await,
        Err(wait) => {
            let end = rate_limited(wait);
            tracing::debug!(%node_id, ?wait, "agent connects too often; refused");
            Box::pin(close(&mut socket, end)).await;
            return None;
        }
    };
    let (session, outgoing) = match Box::pin(Session::connect(ingress, node_id, &hello)).await {
        Ok(connected) => connected,
        Err(end) => {
            log_end(node_id, None, &end);
            Box::pin(close(&mut socket, end)).await;
            return None;
        }
    };
    tracing::Span::current().record("session", tracing::field::display(session.id));
    Some(Box::new(Opened {
        socket,
        session,
        outgoing,
        hello: Some(Box::new(hello)),
        turn: Some(turn),
    }))
}

/// A connected session and its socket: what it holds while it lives.
struct Opened {
    socket: WebSocket,
    session: Session,
    /// What others send the session ([`crate::registry`]).
    outgoing: mpsc::Receiver<Outgoing>,
    /// The hello, until the agent is welcomed.
    hello: Option<Box<Hello>>,
    /// The node's turn ([`crate::admission`]), until the agent is welcomed.
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Opened {
    /// Welcomes the agent, serves it until the session ends, records the
    /// end and closes the socket.
    async fn run(&mut self) {
        let end = match Box::pin(self.start()).await {
            Ok(()) => {
                self.session
                    .live(&mut self.socket, &mut self.outgoing)
                    .await
            }
            Err(end) => end,
        };
        // Counted before the queue closes: from then on a shutdown no
        // longer finds this session taking a goodbye, and waits for it
        // here instead, until its end is recorded.
        let _ending = self.session.ingress.ending();
        // Nothing more is taken: from here on, what others send finds the
        // queue closed (and the agent gets it again when it comes back).
        self.outgoing.close();
        let (node_id, session) = (self.session.node_id, self.session.id);
        log_end(node_id, Some(session), &end);
        if matches!(end, End::ShuttingDown) {
            // Goodbye first; `Ingress::run` records the end (shutdown.rs).
            Box::pin(close(&mut self.socket, end)).await;
            self.session.ingress.registry.unregister(node_id, session);
            return;
        }
        Box::pin(self.session.end(&end)).await;
        Box::pin(close(&mut self.socket, end)).await;
    }

    /// [`Session::start`]; the hello (its cache lists may be large) is
    /// dropped once stored, and the node's turn given back.
    async fn start(&mut self) -> Result<(), End> {
        let started = match self.hello.take() {
            Some(hello) => Box::pin(self.session.start(&mut self.socket, *hello)).await,
            None => Ok(()),
        };
        self.turn = None;
        started
    }
}

/// Logs how a session ended; the reason may quote the agent, so it is
/// written Debug-quoted.
fn log_end(node_id: Uuid, session: Option<Uuid>, end: &End) {
    match end {
        End::Refused { code, message, .. } => {
            tracing::warn!(%node_id, ?session, code, reason = ?message, "agent session refused")
        }
        End::Gone(why) => {
            tracing::info!(%node_id, ?session, reason = ?why, "agent session ended")
        }
        End::ShuttingDown => {
            tracing::debug!(%node_id, ?session, "agent session closed at shutdown")
        }
    }
}

/// Says goodbye: the error frame (if any) and a close frame, then waits
/// briefly for the agent's close frame so the TCP connection ends cleanly.
async fn close(socket: &mut WebSocket, end: End) {
    let (code, reason) = match end {
        End::Gone(_) => return,
        End::Refused {
            code,
            message,
            close,
        } => {
            let error = ServerMessage::Error {
                code: code.into(),
                message,
            };
            if socket
                .send(Message::Text(protocol::encode(&error).into()))
                .await
                .is_err()
            {
                return;
            }
            (close, code)
        }
        End::ShuttingDown => (close_code::AWAY, "server shutting down"),
    };
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Waits for the first message, which must be a valid `hello`.
async fn await_hello(socket: &mut WebSocket, timeout: Duration) -> Result<Hello, End> {
    let deadline = Instant::now() + timeout;
    let expected = || {
        End::refused(
            "hello_expected",
            format!(
                "the first message must be hello, within {} s",
                timeout.as_secs_f64()
            ),
        )
    };
    loop {
        let message = match tokio::time::timeout_at(deadline, socket.recv()).await {
            Err(_) => return Err(expected()),
            Ok(None) => return Err(End::Gone("closed before hello".into())),
            Ok(Some(Err(e))) => return Err(End::from_socket_error(&e)),
            Ok(Some(Ok(m))) => m,
        };
        match message {
            Message::Text(text) => {
                return match protocol::decode::<AgentMessage>(text.as_str()) {
                    Ok(AgentMessage::Hello(hello)) => {
                        check_hello(hello).map_err(|m| End::refused("bad_frame", m))
                    }
                    Ok(_) => Err(expected()),
                    Err(e) => Err(End::bad_frame(&e)),
                }
            }
            Message::Binary(_) => return Err(binary()),
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Close(_) => return Err(End::Gone("closed before hello".into())),
        }
    }
}

fn binary() -> End {
    End::refused(
        "bad_frame",
        "binary frames are not part of the protocol; send JSON text frames",
    )
}

/// What of `hello` may go into an event ([`Hello::bounded`]), its labels
/// checked as an admin's would be.
fn check_hello(hello: Hello) -> Result<Hello, String> {
    let hello = hello.bounded().map_err(|e| e.to_string())?;
    domain::spec::validate_labels("labels", &hello.labels).map_err(|e| e.to_string())?;
    Ok(hello)
}

/// The refusal of a node that connects too often.
fn rate_limited(wait: Duration) -> End {
    let after_s = wait.as_secs_f64().ceil().max(1.0);
    End::Refused {
        code: "rate_limited",
        message: format!("this node connected too often; connect again in {after_s} s"),
        close: close_code::AGAIN,
    }
}

fn resources(hello: &Hello) -> NodeResources {
    NodeResources {
        cpus: hello.resources.cpus,
        memory_mb: hello.resources.memory_mb,
        gpus: hello
            .resources
            .gpus
            .iter()
            .map(|g| Gpu {
                index: g.index,
                name: g.name.clone(),
                memory_mb: g.memory_mb,
            })
            .collect(),
    }
}

/// A connected session: `NodeConnected` is in the log and the session is
/// registered in this process.
struct Session {
    ingress: Ingress,
    node_id: Uuid,
    id: Uuid,
    actor: Actor,
    /// The attempts the agent said it runs, which never get `run_task`.
    running: HashSet<(Uuid, u32)>,
    logs: LogPermissions,
    /// Whether the agent declared a host SSH target in its hello.
    host_ssh: bool,
    /// When the last heartbeat came (at first, when the session began),
    /// to tell late ones.
    last_beat: Instant,
}

impl Session {
    /// Records the connection and registers the session; returns it with
    /// the queue of what others send it.
    async fn connect(
        ingress: Ingress,
        node_id: Uuid,
        hello: &Hello,
    ) -> Result<(Self, mpsc::Receiver<Outgoing>), End> {
        let id = Uuid::now_v7();
        let actor = Actor::Node(node_id.to_string());
        let at = Utc::now();
        let command = NodeCommand::Connect {
            session: id,
            agent_version: hello.agent_version.trim().to_string(),
            resources: resources(hello),
            labels: hello.labels.clone(),
            at,
        };
        let store = ingress.store();
        let connected_seq = match store
            .execute::<Node>(&node_id.to_string(), command, &actor, at)
            .await
        {
            Ok(executed) => executed.sequence,
            Err(StoreError::Rejected(NodeError::Revoked)) => {
                return Err(End::refused("revoked", "the node's token was revoked"))
            }
            Err(StoreError::Rejected(e)) => {
                return Err(End::refused("unauthorized", e.to_string()))
            }
            Err(StoreError::Unstorable { sqlstate, message }) => {
                tracing::warn!(%node_id, sqlstate, error = %message, "the database refused an agent's hello");
                return Err(End::refused(
                    "bad_frame",
                    format!("hello: {}", crate::reports::unstorable(&sqlstate)),
                ));
            }
            Err(e) => {
                tracing::error!(%node_id, error = %e, "recording an agent connection failed");
                return Err(unavailable());
            }
        };
        let outgoing = match ingress.registry.register(
            node_id,
            id,
            i64::try_from(connected_seq).unwrap_or(i64::MAX),
        ) {
            Ok(rx) => rx,
            Err(_) => {
                // Connected is recorded: record its end too.
                record_end(&ingress, node_id, id, &actor, &End::ShuttingDown).await;
                return Err(End::ShuttingDown);
            }
        };
        let logs = LogPermissions::new(
            ingress.log_limits(),
            ingress.log_notifier().clone(),
            ingress.metrics().clone(),
        );
        let session = Self {
            ingress,
            node_id,
            id,
            actor,
            running: hello
                .running
                .iter()
                .map(|r| (r.task_id, r.attempt))
                .collect(),
            logs,
            host_ssh: hello.host_ssh,
            last_beat: Instant::now(),
        };
        Ok((session, outgoing))
    }

    /// Serves a welcomed agent until the session ends: the frames it sends
    /// and what others send it, in their order.
    async fn live(
        &mut self,
        socket: &mut WebSocket,
        outgoing: &mut mpsc::Receiver<Outgoing>,
    ) -> End {
        let idle_after =
            Duration::from_secs(self.ingress.config().heartbeat_s.max(1) * IDLE_HEARTBEATS);
        let idle = tokio::time::sleep(idle_after);
        tokio::pin!(idle);
        loop {
            let event = tokio::select! {
                out = outgoing.recv() => Event::Outgoing(out),
                incoming = socket.recv() => Event::Incoming(incoming),
                () = &mut idle => Event::Idle,
            };
            let step = match event {
                Event::Outgoing(out) => Box::pin(self.outgoing(socket, out)).await,
                Event::Incoming(incoming) => {
                    reset(idle.as_mut(), idle_after);
                    // Boxed: what handling a frame needs is held only
                    // while it runs, not by every idle session.
                    Box::pin(self.received(socket, outgoing, incoming)).await
                }
                Event::Idle => Err(End::Gone(format!(
                    "nothing received for {} s",
                    idle_after.as_secs()
                ))),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Liveness rows, a last look at the node, reconciliation and pending
    /// commands, then `welcome` followed by those commands.
    async fn start(&mut self, socket: &mut WebSocket, hello: Hello) -> Result<(), End> {
        let pool = self.ingress.store().pool();
        let ingress_id = &self.ingress.config().ingress_id;
        if let Err(e) =
            liveness::connected(pool, self.node_id, self.id, ingress_id, Utc::now()).await
        {
            tracing::error!(node_id = %self.node_id, error = %e, "recording liveness failed");
            return Err(unavailable());
        }
        if let Err(e) = liveness::cache(pool, self.node_id, &hello.cache).await {
            tracing::warn!(node_id = %self.node_id, error = %e, "recording the node's cache failed");
        }
        // The outbox consumer may have passed a revoke or a newer
        // connection before this session was registered.
        self.check_current().await?;
        // Everything the consumer will not deliver, worked out before the
        // welcome: what happens after the agent is welcomed reaches it once.
        if let Err(e) = self.ingress.start_point().await {
            tracing::error!(node_id = %self.node_id, error = %e, "reading the outbox head failed");
            return Err(unavailable());
        }
        let mut commands = self.reconcile().await?;
        commands.extend(self.pending().await?);
        let host_commands = self.pending_host_ssh().await?;
        let welcome = ServerMessage::Welcome {
            node_id: self.node_id,
            session: self.id,
            heartbeat_s: self.ingress.config().heartbeat_s,
            output_limit_bytes: Some(self.ingress.log_limits().max_bytes_per_attempt),
        };
        send(socket, &protocol::encode(&welcome)).await?;
        for command in commands {
            tracing::debug!(node_id = %self.node_id, task_id = %command.task_id, kind = command.kind, "sending pending command");
            send(socket, &command.frame).await?;
        }
        for pending in host_commands {
            self.host_ssh(socket, &pending).await?;
        }
        Ok(())
    }

    /// The host commands still waiting for this node (see
    /// [`crate::host_ssh`]).
    async fn pending_host_ssh(&self) -> Result<Vec<host_ssh::Pending>, End> {
        host_ssh::pending(self.ingress.store(), self.node_id, Utc::now())
            .await
            .map_err(|e| {
                tracing::error!(node_id = %self.node_id, error = %e, "finding pending host commands failed");
                unavailable()
            })
    }

    /// Sends a host command while its window is open, or records at once
    /// that this agent has no host SSH target.
    async fn host_ssh(
        &self,
        socket: &mut WebSocket,
        pending: &host_ssh::Pending,
    ) -> Result<(), End> {
        let request_id = pending.request_id;
        if !self.host_ssh {
            tracing::info!(node_id = %self.node_id, %request_id, "host SSH requested of an agent without a target");
            let store = self.ingress.store();
            host_ssh::refuse(store, self.node_id, request_id, host_ssh::NOT_CONFIGURED).await;
            return Ok(());
        }
        match pending.frame(Utc::now()) {
            Some(frame) => {
                tracing::info!(node_id = %self.node_id, %request_id, "sending host command");
                send(socket, &frame).await
            }
            None => {
                tracing::info!(node_id = %self.node_id, %request_id, "host command not sent: its time is up");
                Ok(())
            }
        }
    }

    /// Fails when the node's current session is not this one any more.
    async fn check_current(&self) -> Result<(), End> {
        match self
            .ingress
            .store()
            .load::<Node>(&self.node_id.to_string())
            .await
        {
            Ok(Some(node)) if node.state.session == Some(self.id) => Ok(()),
            Ok(Some(node)) if node.state.status == NodeStatus::Revoked => {
                Err(End::from_ending(Ending::Revoked))
            }
            Ok(_) => Err(End::from_ending(Ending::Replaced)),
            Err(e) => {
                tracing::error!(node_id = %self.node_id, error = %e, "loading the node failed");
                Err(unavailable())
            }
        }
    }

    /// `cancel_task` for every attempt the agent runs that the platform
    /// does not want there: its task is gone, ended, or holds another
    /// attempt or another node.
    async fn reconcile(&self) -> Result<Vec<Encoded>, End> {
        let grace_s = self.ingress.config().cancel_grace_s;
        let mut cancels = Vec::new();
        let mut sorted: Vec<_> = self.running.iter().copied().collect();
        sorted.sort();
        for (task_id, attempt) in sorted {
            let task = commands::load_task(self.ingress.store(), task_id)
                .await
                .map_err(|e| {
                    tracing::error!(node_id = %self.node_id, error = %e, "reconciling failed");
                    unavailable()
                })?;
            let keep = task.is_some_and(|t| {
                t.attempt == attempt && t.node_id == Some(self.node_id) && t.state.holds_node()
            });
            if !keep {
                tracing::info!(node_id = %self.node_id, %task_id, attempt, "agent runs an unwanted attempt; cancelling it");
                cancels.push(commands::cancel_task(task_id, attempt, grace_s));
            }
        }
        Ok(cancels)
    }

    /// Every command the node's tasks want now.
    async fn pending(&self) -> Result<Vec<Encoded>, End> {
        let store = self.ingress.store();
        let failed = |e: &dyn std::fmt::Display| {
            tracing::error!(node_id = %self.node_id, error = %e, "finding pending commands failed");
            unavailable()
        };
        let ids = commands::candidates(store.pool(), self.node_id)
            .await
            .map_err(|e| failed(&e))?;
        let grace_s = self.ingress.config().cancel_grace_s;
        let mut wanted = Vec::new();
        for task_id in ids {
            let task = commands::load_task(store, task_id)
                .await
                .map_err(|e| failed(&e))?;
            if let Some(task) = task {
                if self.vanished(&task) {
                    self.mark_vanished(task_id, task.attempt).await;
                    continue;
                }
                wanted.extend(commands::wanted(
                    &task,
                    self.node_id,
                    &self.running,
                    grace_s,
                ));
            }
        }
        Ok(wanted)
    }

    /// Whether `task`'s current attempt was taken on by this node but the
    /// agent no longer knows it: the agent lists every attempt it runs or
    /// still has reports for, so one missing after it accepted was lost
    /// with a restart of the agent (its container, if any, was found by its
    /// labels and would be listed).
    fn vanished(&self, task: &domain::task::Task) -> bool {
        use domain::task::TaskState;
        task.node_id == Some(self.node_id)
            && matches!(
                task.state,
                TaskState::Accepted | TaskState::Preparing | TaskState::Running
            )
            && task
                .id
                .is_some_and(|id| !self.running.contains(&(id, task.attempt)))
    }

    /// Gives up an attempt the agent no longer runs; the task is requeued
    /// while retries remain.
    async fn mark_vanished(&self, task_id: Uuid, attempt: u32) {
        let at = Utc::now();
        let command = domain::task::TaskCommand::MarkLost {
            node_id: self.node_id,
            attempt,
            reason: format!(
                "the node's agent reconnected without attempt {attempt}: it restarted and the attempt did not survive"
            ),
            at,
        };
        match self
            .ingress
            .store()
            .execute::<domain::task::Task>(&task_id.to_string(), command, &self.actor, at)
            .await
        {
            Ok(_) => {
                tracing::warn!(node_id = %self.node_id, %task_id, attempt, "attempt lost with an agent restart")
            }
            Err(e) => {
                tracing::warn!(node_id = %self.node_id, %task_id, attempt, error = %e, "cannot mark a vanished attempt lost")
            }
        }
    }

    /// Sends `out` from the registry; `None`: the session was dropped from
    /// the registry without a word (it fell behind).
    async fn outgoing(&mut self, socket: &mut WebSocket, out: Option<Outgoing>) -> Result<(), End> {
        match out {
            Some(Outgoing::Frame(frame)) => send(socket, &frame).await,
            Some(Outgoing::HostSsh(pending)) => self.host_ssh(socket, &pending).await,
            Some(Outgoing::Close(why)) => Err(End::from_ending(why)),
            None => Err(unavailable()),
        }
    }

    /// Handles a frame the agent sent, with the reports that arrived right
    /// behind a report: those are stored together ([`reports::report_each`]),
    /// and the first other frame behind them is handled after them.
    async fn received(
        &mut self,
        socket: &mut WebSocket,
        outgoing: &mut mpsc::Receiver<Outgoing>,
        incoming: Option<Result<Message, axum::Error>>,
    ) -> Result<(), End> {
        let mut reports = match decode_frame(incoming)? {
            Some(AgentMessage::Status(status)) => vec![status],
            other => return self.handle(socket, outgoing, Work::One(other)).await,
        };
        let mut behind = None;
        while reports.len() < REPORTS_TOGETHER {
            // Only what has arrived already: no report waits for another.
            let Some(next) = socket.recv().now_or_never() else {
                break;
            };
            match decode_frame(next) {
                Ok(Some(AgentMessage::Status(status))) => reports.push(status),
                other => {
                    behind = Some(other);
                    break;
                }
            }
        }
        let work = match <[_; 1]>::try_from(reports) {
            Ok([one]) => Work::One(Some(AgentMessage::Status(one))),
            Err(many) => Work::Reports(many),
        };
        self.handle(socket, outgoing, work).await?;
        match behind {
            Some(message) => self.handle(socket, outgoing, Work::One(message?)).await,
            None => Ok(()),
        }
    }

    /// Handles a frame the agent sent and sends its answer. Meanwhile
    /// (storing a report or a log chunk takes a round trip to the
    /// database, and a node may send many) the commands the registry
    /// queues for the node still go out, in their order: a `run_task` or
    /// a `cancel_task` never waits behind the node's own traffic. The
    /// first queued item that needs the session itself (a host SSH request,
    /// a close) waits for the frame's answer, and so does everything
    /// queued after it. Frames from the agent are still handled one at a
    /// time, in order.
    async fn handle(
        &mut self,
        socket: &mut WebSocket,
        outgoing: &mut mpsc::Receiver<Outgoing>,
        work: Work,
    ) -> Result<(), End> {
        let mut held: Option<Option<Outgoing>> = None;
        let mut broken = None;
        let answers = {
            let mut work = Box::pin(self.work(work));
            loop {
                tokio::select! {
                    biased;
                    answer = &mut work => break answer,
                    out = outgoing.recv(), if held.is_none() && broken.is_none() => match out {
                        Some(Outgoing::Frame(frame)) => {
                            // The frame's handling is let finish: what it
                            // stores is stored whether or not it is answered.
                            if let Err(end) = send(socket, &frame).await {
                                broken = Some(end);
                            }
                        }
                        other => held = Some(other),
                    },
                }
            }
        };
        if let Some(end) = broken {
            return Err(end);
        }
        for frame in answers? {
            send(socket, &frame).await?;
        }
        match held {
            Some(out) => Box::pin(self.outgoing(socket, out)).await,
            None => Ok(()),
        }
    }

    /// Does `work`; returns the frames to answer with.
    async fn work(&mut self, work: Work) -> Result<Vec<String>, End> {
        match work {
            Work::One(None) => Ok(vec![]),
            Work::One(Some(message)) => Ok(self.message(message).await?.into_iter().collect()),
            Work::Reports(statuses) => self.statuses(statuses).await,
        }
    }

    /// Handles a message the agent sent; returns the frame to answer with.
    async fn message(&mut self, message: AgentMessage) -> Result<Option<String>, End> {
        match message {
            AgentMessage::Hello(_) => Err(End::refused(
                "bad_frame",
                "hello is only valid as the first message",
            )),
            AgentMessage::Heartbeat { seq } => self.heartbeat(seq).await.map(|()| None),
            AgentMessage::Ack { command_id } => {
                tracing::debug!(node_id = %self.node_id, %command_id, "command acknowledged");
                Ok(None)
            }
            AgentMessage::Status(status) => self.status(status).await,
            AgentMessage::Log(chunk) => {
                let id = chunk.id;
                let answer = match chunk.bounded() {
                    Ok(chunk) => {
                        self.logs
                            .store(self.ingress.store(), self.node_id, &chunk)
                            .await
                    }
                    Err(invalid) => Answer::Refused(invalid.to_string()),
                };
                self.count(ReportKind::Log, &answer);
                self.tell_refusal(id, "log chunk", &answer);
                self.answer(id, answer, "log chunk")
            }
            AgentMessage::Cache(cache) => {
                let pool = self.ingress.store().pool();
                if let Err(e) = liveness::cache(pool, self.node_id, &cache.bounded()).await {
                    tracing::warn!(node_id = %self.node_id, error = %e, "recording the node's cache failed");
                }
                Ok(None)
            }
            AgentMessage::TransferRequest(request) => {
                let id = request.id;
                let grant = match request.bounded() {
                    Ok(request) => {
                        crate::transfers::answer(
                            self.ingress.store(),
                            self.ingress.objects(),
                            self.ingress.secrets_key(),
                            self.node_id,
                            request,
                        )
                        .await
                    }
                    Err(invalid) => TransferGrant {
                        id,
                        error: Some(invalid.to_string()),
                        ..TransferGrant::default()
                    },
                };
                if let Some(error) = &grant.error {
                    self.refusal_notice(id, "transfer request", error);
                }
                Ok(Some(protocol::encode(&ServerMessage::TransferUrl(grant))))
            }
            AgentMessage::HostSshResult(result) => {
                let id = result.id;
                let answer = host_ssh::finish(self.ingress.store(), self.node_id, result).await;
                self.count(ReportKind::HostSsh, &answer);
                self.tell_refusal(id, "host SSH result", &answer);
                self.answer(id, answer, "host SSH result")
            }
        }
    }

    async fn heartbeat(&mut self, seq: u64) -> Result<(), End> {
        let now = Instant::now();
        let gap = now.duration_since(self.last_beat);
        self.last_beat = now;
        self.ingress
            .metrics()
            .heartbeat(gap.as_secs_f64(), self.ingress.config().heartbeat_s as f64);
        let pool = self.ingress.store().pool();
        match liveness::heartbeat(pool, self.node_id, self.id).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                // The row names another session: if the log still says we
                // are current (two connects crossed), take the row back.
                self.check_current().await?;
                let at = Utc::now();
                let ingress_id = &self.ingress.config().ingress_id;
                if let Err(e) =
                    liveness::connected(pool, self.node_id, self.id, ingress_id, at).await
                {
                    tracing::warn!(node_id = %self.node_id, seq, error = %e, "heartbeat not recorded");
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(node_id = %self.node_id, seq, error = %e, "heartbeat not recorded");
                Ok(())
            }
        }
    }

    /// Handles a report: bounded, then executed; one that can never be
    /// stored is refused for good and, within the node's notices, shown on
    /// its task's timeline.
    async fn status(&mut self, status: protocol::Status) -> Result<Option<String>, End> {
        let (status, answer) = match status.clone().bounded() {
            Ok(bounded) => {
                let answer = reports::report(self.ingress.store(), self.node_id, &bounded).await;
                (bounded, answer)
            }
            Err(invalid) => (status, Answer::Unstorable(invalid.to_string())),
        };
        self.answered(&status, answer).await
    }

    /// Counts, notes and answers `status` with `answer`; a report that
    /// can never be stored is, within the node's notices, shown on its
    /// task's timeline.
    async fn answered(
        &mut self,
        status: &protocol::Status,
        answer: Answer,
    ) -> Result<Option<String>, End> {
        let id = status.id;
        self.count(ReportKind::Status, &answer);
        match &answer {
            Answer::Stored => self.logs.reported(status),
            Answer::Unstorable(reason) => {
                if self.refusal_notice(id, "report", reason) {
                    reports::record_refusal(self.ingress.store(), self.node_id, status, reason)
                        .await;
                }
            }
            Answer::Refused(reason) => {
                self.refusal_notice(id, "report", reason);
            }
            Answer::Later(_) => {}
        }
        self.answer(id, answer, "report")
    }

    /// Handles reports that arrived together: each bounded, then all
    /// stored together, then each answered as [`Session::status`] answers.
    async fn statuses(&mut self, statuses: Vec<protocol::Status>) -> Result<Vec<String>, End> {
        let mut bounded = Vec::with_capacity(statuses.len());
        let mut answers: Vec<Option<Answer>> = Vec::with_capacity(statuses.len());
        let mut checked = Vec::with_capacity(statuses.len());
        for status in statuses {
            match status.clone().bounded() {
                Ok(ok) => {
                    checked.push(ok.clone());
                    bounded.push(ok);
                    answers.push(None);
                }
                Err(invalid) => {
                    bounded.push(status);
                    answers.push(Some(Answer::Unstorable(invalid.to_string())));
                }
            }
        }
        let mut stored = reports::report_each(self.ingress.store(), self.node_id, &checked)
            .await
            .into_iter();
        let mut frames = Vec::with_capacity(bounded.len());
        for (status, answer) in bounded.into_iter().zip(answers) {
            let answer = match answer.or_else(|| stored.next()) {
                Some(answer) => answer,
                None => Answer::Later("not handled".into()),
            };
            if let Some(frame) = self.answered(&status, answer).await? {
                frames.push(frame);
            }
        }
        Ok(frames)
    }

    /// Counts a report of `kind` answered `answer`.
    fn count(&self, kind: ReportKind, answer: &Answer) {
        let outcome = match answer {
            Answer::Stored => ReportOutcome::Stored,
            Answer::Refused(_) | Answer::Unstorable(_) => ReportOutcome::Refused,
            Answer::Later(_) => ReportOutcome::Retry,
        };
        self.ingress.metrics().report(kind, outcome);
    }

    /// [`Session::refusal_notice`] for a refused `answer`.
    fn tell_refusal(&self, id: u64, what: &str, answer: &Answer) {
        if let Answer::Refused(reason) | Answer::Unstorable(reason) = answer {
            self.refusal_notice(id, what, reason);
        }
    }

    /// Logs that frame `id` was refused for `reason`, unless the node's
    /// refusals were told too often (see [`crate::admission`]); returns
    /// whether it was told.
    fn refusal_notice(&self, id: u64, what: &str, reason: &str) -> bool {
        match self.ingress.admission().notice(self.node_id) {
            Some(untold) => {
                tracing::info!(node_id = %self.node_id, id, reason = ?reason, untold_before = untold, "{what} refused");
                true
            }
            None => {
                tracing::debug!(node_id = %self.node_id, id, reason = ?reason, "{what} refused");
                false
            }
        }
    }

    /// The `received` frame answering frame `id` with `answer`; a frame
    /// not stored for now ends the session.
    fn answer(&self, id: u64, answer: Answer, what: &str) -> Result<Option<String>, End> {
        let error = match answer {
            Answer::Stored => None,
            Answer::Refused(reason) | Answer::Unstorable(reason) => Some(reason),
            Answer::Later(reason) => {
                // Frames after this one must not be handled before it (a
                // final report must never overtake the output before it):
                // end the session, and the agent sends every unanswered
                // report again, in order, when it is back.
                tracing::warn!(node_id = %self.node_id, id, reason = ?reason, "{what} not stored; the agent will send it again");
                return Err(unavailable());
            }
        };
        Ok(Some(protocol::encode(&ServerMessage::Received {
            id,
            error,
        })))
    }

    /// Records the end of the session and forgets it.
    async fn end(&self, end: &End) {
        // Recorded before the session leaves the registry, so a shutdown
        // that waits for the registry to empty has recorded every end.
        record_end(&self.ingress, self.node_id, self.id, &self.actor, end).await;
        self.ingress.registry.unregister(self.node_id, self.id);
    }
}

/// Appends `NodeDisconnected` for `session` ([`shutdown::record_end`]),
/// saying so when it cannot.
async fn record_end(ingress: &Ingress, node_id: Uuid, session: Uuid, actor: &Actor, end: &End) {
    if let Err(e) = shutdown::record_end(ingress, (node_id, session), end.reason(), actor).await {
        tracing::warn!(%node_id, error = %e, "recording the disconnection failed");
    }
}

enum Event {
    Outgoing(Option<Outgoing>),
    Incoming(Option<Result<Message, axum::Error>>),
    Idle,
}

/// The most reports that arrived together stored together.
const REPORTS_TOGETHER: usize = 32;

/// What to do with what the agent sent.
enum Work {
    /// One message (`None`: a ping or pong, nothing to do).
    One(Option<AgentMessage>),
    /// Reports that arrived together, in their order.
    Reports(Vec<protocol::Status>),
}

/// The message in a frame from the agent: `None` for a ping or pong; the
/// session ends on anything but a text frame that decodes.
fn decode_frame(
    incoming: Option<Result<Message, axum::Error>>,
) -> Result<Option<AgentMessage>, End> {
    let text = match incoming {
        None => return Err(End::Gone("connection closed".into())),
        Some(Err(e)) => return Err(End::from_socket_error(&e)),
        Some(Ok(Message::Text(text))) => text,
        Some(Ok(Message::Binary(_))) => return Err(binary()),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(None),
        Some(Ok(Message::Close(_))) => return Err(End::Gone("closed by the agent".into())),
    };
    protocol::decode::<AgentMessage>(text.as_str())
        .map(Some)
        .map_err(|e| End::bad_frame(&e))
}

fn reset(idle: std::pin::Pin<&mut Sleep>, after: Duration) {
    idle.reset(Instant::now() + after);
}

fn unavailable() -> End {
    End::Refused {
        code: "unavailable",
        message: "the server cannot serve this session right now; connect again later".into(),
        close: close_code::AGAIN,
    }
}

async fn send(socket: &mut WebSocket, frame: &str) -> Result<(), End> {
    socket
        .send(Message::Text(frame.into()))
        .await
        .map_err(|e| End::Gone(format!("sending failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_with_nonsense_resources_or_labels_is_refused() {
        let mut hello = Hello {
            agent_version: "0.1.0".into(),
            ..Hello::default()
        };
        assert!(check_hello(hello.clone()).is_ok());
        hello.resources.cpus = f64::NAN;
        assert!(check_hello(hello.clone()).is_err());
        hello.resources.cpus = 1.0;
        hello.agent_version = " ".into();
        assert!(check_hello(hello.clone()).is_err());
        hello.agent_version = "0.1.0".into();
        hello.labels = [("gpu".to_string(), "a100!".to_string())].into();
        let error = check_hello(hello).unwrap_err();
        assert!(error.contains("labels.gpu"), "{error}");
    }

    #[test]
    fn a_rate_limited_connect_is_told_when_to_come_back() {
        let End::Refused { code, message, .. } = rate_limited(Duration::from_millis(6200)) else {
            panic!("not refused")
        };
        assert_eq!(code, "rate_limited");
        assert!(message.contains("again in 7 s"), "{message}");
    }
}
