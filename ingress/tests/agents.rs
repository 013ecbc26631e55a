//! The ingress against real agents' WebSockets and a real PostgreSQL: each
//! test gets a fresh database, serves `Ingress::router()` on 127.0.0.1:0,
//! runs `Ingress::run`, and plays the agent with a tokio-tungstenite client
//! speaking the protocol.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers fail the test loudly on anything unexpected"
)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::node::{Node, NodeCommand};
use domain::task::{Task, TaskCommand};
use domain::Actor;
use futures::{SinkExt, StreamExt};
use ingress::{Config, Ingress};
use protocol::{
    AgentMessage, Cache, Command, Hello, LogChunk, ReportedState, Resources, RunningAttempt,
    ServerMessage, Status,
};
use sqlx::PgPool;
use store::{tokens, Store};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use support::{admin, Ws};

/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(10);

/// How long a test listens to be sure nothing arrives.
const QUIET: Duration = Duration::from_millis(600);

const GRACE_S: u64 = 7;

// ---------------------------------------------------------------- server

/// One ingress process: its router on a port and its outbox consumer.
struct Server {
    ingress: Ingress,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    runner: JoinHandle<()>,
}

impl Server {
    async fn start(store: &Store, name: &str) -> Self {
        let ingress = Ingress::new(
            store.clone(),
            Config {
                ingress_id: name.into(),
                heartbeat_s: 15,
                hello_timeout: Duration::from_millis(500),
                poll: Duration::from_millis(50),
                cancel_grace_s: GRACE_S,
            },
        );
        let addr = support::serve(&ingress).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let running = ingress.clone();
        let runner = tokio::spawn(async move {
            running
                .run(async {
                    let _ = stopped.await;
                })
                .await
        });
        Self {
            ingress,
            addr,
            stop: Some(stop),
            runner,
        }
    }

    async fn shut_down(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(PATIENCE, self.runner)
            .await
            .unwrap()
            .unwrap();
    }

    /// Delivers everything committed so far, as the running consumer
    /// would: afterwards nothing appended before is still on its way to
    /// this process's sessions, even while transactions of other tests
    /// hold readers back.
    async fn deliver(&self) {
        self.ingress.catch_up().await.unwrap();
    }

    /// Waits until this process holds `n` sessions.
    async fn wait_connected(&self, n: usize) {
        wait_until(&format!("{n} sessions"), || async {
            self.ingress.connected() == n
        })
        .await;
    }
}

struct Platform {
    store: Store,
    pool: PgPool,
}

async fn platform() -> Platform {
    let db = testkit::fresh_db().await;
    Platform {
        store: Store::new(db.pool.clone()),
        pool: db.pool,
    }
}

impl Platform {
    /// A node and its token.
    async fn provision(&self) -> (Uuid, String) {
        support::provision(&self.store).await
    }

    async fn revoke(&self, node_id: Uuid) {
        let now = Utc::now();
        self.store
            .execute::<Node>(
                &node_id.to_string(),
                NodeCommand::RevokeToken {
                    by: admin(),
                    at: now,
                },
                &admin(),
                now,
            )
            .await
            .unwrap();
    }

    async fn task(&self, id: Uuid, command: TaskCommand) {
        support::task(&self.store, id, command).await;
    }

    async fn submit_and_assign(&self, node_id: Uuid) -> Uuid {
        support::submit_and_assign(&self.store, node_id).await
    }

    async fn cancel(&self, task_id: Uuid) {
        self.task(
            task_id,
            TaskCommand::RequestCancel {
                by: admin(),
                at: Utc::now(),
            },
        )
        .await;
    }

    /// Reports for a task as its node would, without going through an agent.
    async fn report_as(&self, node_id: Uuid, task_id: Uuid, command: TaskCommand) {
        let actor = Actor::Node(node_id.to_string());
        self.store
            .execute::<Task>(&task_id.to_string(), command, &actor, Utc::now())
            .await
            .unwrap();
    }

    /// An open transaction with an id, which holds back every outbox
    /// reader until it ends.
    async fn hold_outbox_back(&self) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut blocker = self.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO checkpoints (name) VALUES ('held-open')")
            .execute(&mut *blocker)
            .await
            .unwrap();
        blocker
    }

    async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// The event types of one aggregate, in order.
    async fn events_of(&self, aggregate_type: &str, id: Uuid) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT event_type FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
             ORDER BY sequence",
        )
        .bind(aggregate_type)
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    async fn liveness(&self, node_id: Uuid) -> Option<(Uuid, String, DateTime<Utc>)> {
        sqlx::query_as("SELECT session, ingress, last_seen FROM node_liveness WHERE node_id = $1")
            .bind(node_id)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    testkit::eventually(what, PATIENCE, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await;
}

// ---------------------------------------------------------------- agent

/// The agent side of one WebSocket.
struct Agent {
    ws: Ws,
}

/// What arrived from the server.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one value at a time in a test; boxing would only add noise"
)]
enum Incoming {
    Message(ServerMessage),
    Closed(Option<CloseFrame>),
}

/// Dials the ingress; `Err` holds the HTTP status and body of a refusal.
async fn dial(addr: SocketAddr, token: Option<&str>) -> Result<Agent, (u16, String)> {
    support::dial(addr, token).await.map(|ws| Agent { ws })
}

fn hello(running: Vec<RunningAttempt>) -> Hello {
    Hello {
        agent_version: "0.1.0-test".into(),
        resources: Resources {
            cpus: 8.0,
            memory_mb: 16384,
            gpus: vec![],
        },
        labels: [("os".to_string(), "linux".to_string())].into(),
        running,
        cache: Cache {
            images: vec!["unidesk-env:abc".into()],
            commits: vec!["a".repeat(40)],
        },
        host_ssh: false,
    }
}

impl Agent {
    /// Dials with a token that must be accepted and says hello; returns the
    /// agent and its session.
    async fn join(addr: SocketAddr, token: &str, running: Vec<RunningAttempt>) -> (Self, Uuid) {
        let mut agent = dial(addr, Some(token)).await.unwrap();
        agent.send(&AgentMessage::Hello(hello(running))).await;
        match agent.recv().await {
            ServerMessage::Welcome {
                session,
                heartbeat_s,
                ..
            } => {
                assert_eq!(heartbeat_s, 15);
                (agent, session)
            }
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    async fn send(&mut self, message: &AgentMessage) {
        self.send_raw(Message::Text(protocol::encode(message).into()))
            .await;
    }

    async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    async fn next(&mut self, within: Duration) -> Option<Incoming> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(frame) => frame,
            };
            return Some(match frame {
                None | Some(Err(_)) => Incoming::Closed(None),
                Some(Ok(Message::Text(text))) => {
                    Incoming::Message(protocol::decode(text.as_str()).unwrap())
                }
                Some(Ok(Message::Close(frame))) => Incoming::Closed(frame),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected frame {other:?}"),
            });
        }
    }

    async fn recv(&mut self) -> ServerMessage {
        match self.next(PATIENCE).await {
            Some(Incoming::Message(m)) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    async fn command(&mut self) -> Command {
        match self.recv().await {
            ServerMessage::Command {
                command_id,
                command,
            } => {
                let (kind, task_id, attempt) = match &command {
                    Command::RunTask(r) => ("run_task", r.task_id, r.attempt),
                    Command::CancelTask {
                        task_id, attempt, ..
                    } => ("cancel_task", *task_id, *attempt),
                    Command::HostSsh(h) => {
                        assert_eq!(command_id, protocol::host_ssh_command_id(h.request_id));
                        return command;
                    }
                };
                assert_eq!(command_id, protocol::command_id(kind, task_id, attempt));
                command
            }
            other => panic!("expected a command, got {other:?}"),
        }
    }

    /// Collects every command that arrives until the line goes quiet.
    async fn commands(&mut self) -> Vec<Command> {
        let mut out = Vec::new();
        while let Some(incoming) = self.next(QUIET).await {
            match incoming {
                Incoming::Message(ServerMessage::Command { command, .. }) => out.push(command),
                other => panic!("expected commands only, got {other:?}"),
            }
        }
        out
    }

    async fn expect_quiet(&mut self) {
        if let Some(incoming) = self.next(QUIET).await {
            panic!("expected nothing, got {incoming:?}");
        }
    }

    /// The server must send `error{code}` and close.
    async fn expect_refused(&mut self, code: &str) {
        match self.recv().await {
            ServerMessage::Error { code: got, .. } => assert_eq!(got, code),
            other => panic!("expected error {code}, got {other:?}"),
        }
        match self.next(PATIENCE).await {
            Some(Incoming::Closed(_)) => {}
            other => panic!("expected the connection to close, got {other:?}"),
        }
    }

    /// Sends a report and returns the server's answer.
    async fn report(&mut self, status: Status) -> Option<String> {
        let id = status.id;
        self.send(&AgentMessage::Status(status)).await;
        match self.recv().await {
            ServerMessage::Received { id: got, error } => {
                assert_eq!(got, id);
                error
            }
            other => panic!("expected received, got {other:?}"),
        }
    }

    /// Sends a report and returns the server's answer, and the commands
    /// that came before it.
    async fn report_amid_commands(&mut self, status: Status) -> (Option<String>, Vec<Command>) {
        let id = status.id;
        self.send(&AgentMessage::Status(status)).await;
        let mut commands = Vec::new();
        loop {
            match self.recv().await {
                ServerMessage::Received { id: got, error } => {
                    assert_eq!(got, id);
                    return (error, commands);
                }
                ServerMessage::Command { command, .. } => commands.push(command),
                other => panic!("expected received, got {other:?}"),
            }
        }
    }

    /// Sends `messages` in one write, as an agent with several reports
    /// ready does.
    async fn send_together(&mut self, messages: &[AgentMessage]) {
        for message in messages {
            let text = protocol::encode(message);
            self.ws.feed(Message::Text(text.into())).await.unwrap();
        }
        self.ws.flush().await.unwrap();
    }

    async fn log(&mut self, chunk: LogChunk) -> Option<String> {
        let id = chunk.id;
        self.send(&AgentMessage::Log(chunk)).await;
        match self.recv().await {
            ServerMessage::Received { id: got, error } => {
                assert_eq!(got, id);
                error
            }
            other => panic!("expected received, got {other:?}"),
        }
    }
}

fn status(id: u64, task_id: Uuid, state: ReportedState) -> Status {
    Status {
        id,
        task_id,
        attempt: 1,
        state,
        stage: None,
        container: None,
        exit_code: None,
        message: None,
        node_fault: false,
    }
}

fn run_task_for(command: &Command) -> Uuid {
    match command {
        Command::RunTask(r) => r.task_id,
        other => panic!("expected run_task, got {other:?}"),
    }
}

fn command_task(command: &Command) -> Uuid {
    match command {
        Command::RunTask(r) => r.task_id,
        Command::CancelTask { task_id, .. } => *task_id,
        other => panic!("expected a task command, got {other:?}"),
    }
}

fn cancel_task_for(command: &Command) -> (Uuid, u32, u64) {
    match command {
        Command::CancelTask {
            task_id,
            attempt,
            grace_s,
        } => (*task_id, *attempt, *grace_s),
        other => panic!("expected cancel_task, got {other:?}"),
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn connections_without_a_valid_node_token_get_401_and_append_nothing() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let (revoked_id, revoked_token) = p.provision().await;
    p.revoke(revoked_id).await;
    let before = p.event_count().await;

    let forged = format!("udn~{}~{}", node_id.simple(), "x".repeat(43));
    let unknown = tokens::issue_node(Uuid::now_v7()).token;
    let user = tokens::issue_user("alice", Uuid::now_v7()).token;
    for token in [
        None,
        Some("garbage"),
        Some(user.as_str()),
        Some(unknown.as_str()),
        Some(forged.as_str()),
        Some(revoked_token.as_str()),
    ] {
        let Err((status, body)) = dial(server.addr, token).await else {
            panic!("{token:?} was let in");
        };
        assert_eq!(status, 401, "{token:?}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(body["errors"][0]["detail"].is_string(), "{body}");
    }
    assert_eq!(p.event_count().await, before);
    assert_eq!(server.ingress.connected(), 0);
    // The right token still works.
    Agent::join(server.addr, &token, vec![]).await;
}

#[tokio::test]
async fn hello_records_the_connection_and_is_welcomed() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let mut agent = dial(server.addr, Some(&token)).await.unwrap();
    agent.send(&AgentMessage::Hello(hello(vec![]))).await;
    let ServerMessage::Welcome {
        node_id: welcomed,
        session,
        heartbeat_s,
        output_limit_bytes,
    } = agent.recv().await
    else {
        panic!("expected welcome")
    };
    assert_eq!((welcomed, heartbeat_s), (node_id, 15));
    assert_eq!(
        output_limit_bytes,
        Some(64 * 1024 * 1024),
        "the default limit"
    );
    assert_eq!(
        p.events_of("node", node_id).await,
        ["NodeProvisioned", "NodeConnected"]
    );
    let node = p
        .store
        .load::<Node>(&node_id.to_string())
        .await
        .unwrap()
        .unwrap()
        .state;
    assert_eq!(node.session, Some(session));
    assert_eq!(node.agent_version.as_deref(), Some("0.1.0-test"));
    assert_eq!(node.declared_resources.unwrap().memory_mb, 16384);
    // What the agent declares is kept apart: only an admin's labels count.
    assert_eq!(node.declared_labels["os"], "linux");
    assert!(node.labels.is_empty(), "{:?}", node.labels);
    let actor: String = sqlx::query_scalar(
        "SELECT metadata->>'actor' FROM events WHERE aggregate_id = $1 AND event_type = 'NodeConnected'",
    )
    .bind(node_id.to_string())
    .fetch_one(&p.pool)
    .await
    .unwrap();
    assert_eq!(actor, format!("node:{node_id}"));
    let (live_session, ingress_id, _) = p.liveness(node_id).await.unwrap();
    assert_eq!((live_session, ingress_id.as_str()), (session, "ingress-a"));
    let images: Vec<String> =
        sqlx::query_scalar("SELECT unnest(images) FROM node_cache WHERE node_id = $1")
            .bind(node_id)
            .fetch_all(&p.pool)
            .await
            .unwrap();
    assert_eq!(images, ["unidesk-env:abc"]);
    server.wait_connected(1).await;
}

#[tokio::test]
async fn a_hello_claiming_labels_and_more_than_the_maximum_gets_neither() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let node_id = Uuid::now_v7();
    let issued = tokens::issue_node(node_id);
    let now = Utc::now();
    p.store
        .execute::<Node>(
            &node_id.to_string(),
            NodeCommand::Provision {
                node_id,
                name: "small".into(),
                labels: [("zone".to_string(), "lab".to_string())].into(),
                token_fingerprint: issued.fingerprint,
                max_resources: domain::node::ResourceLimits {
                    cpus: Some(4.0),
                    memory_mb: Some(8192),
                    gpus: Some(1),
                },
                by: admin(),
                at: now,
            },
            &admin(),
            now,
        )
        .await
        .unwrap();
    let mut claim = hello(vec![]);
    claim.resources = Resources {
        cpus: 64.0,
        memory_mb: 1024 * 1024,
        gpus: (0..8)
            .map(|index| protocol::Gpu {
                index,
                name: "A100".into(),
                memory_mb: 81920,
            })
            .collect(),
    };
    claim.labels = [
        ("gpu".to_string(), "a100".to_string()),
        ("zone".to_string(), "dc1".to_string()),
    ]
    .into();
    let mut agent = dial(server.addr, Some(&issued.token)).await.unwrap();
    agent.send(&AgentMessage::Hello(claim)).await;
    let ServerMessage::Welcome { .. } = agent.recv().await else {
        panic!("expected welcome")
    };
    let node = p
        .store
        .load::<Node>(&node_id.to_string())
        .await
        .unwrap()
        .unwrap()
        .state;
    // The claim is on record, but counts for nothing.
    assert_eq!(node.declared_labels["gpu"], "a100");
    assert_eq!(
        node.labels,
        [("zone".to_string(), "lab".to_string())].into()
    );
    assert_eq!(node.declared_resources.as_ref().unwrap().gpus.len(), 8);
    let effective = node.effective_resources().unwrap();
    assert_eq!((effective.cpus, effective.memory_mb), (4.0, 8192));
    assert_eq!(
        effective.gpus.iter().map(|g| g.index).collect::<Vec<_>>(),
        [0]
    );
}

#[tokio::test]
async fn heartbeats_move_last_seen() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let (mut agent, _) = Agent::join(server.addr, &token, vec![]).await;
    let (_, _, first) = p.liveness(node_id).await.unwrap();
    // The server stamps last_seen with PostgreSQL's microsecond clock, which
    // has moved on by the time a heartbeat crosses the socket.
    for seq in 1..=2 {
        agent.send(&AgentMessage::Heartbeat { seq }).await;
    }
    let p = &p;
    wait_until("last_seen to move", || async move {
        p.liveness(node_id).await.unwrap().2 > first
    })
    .await;
    // Heartbeats are not events.
    assert_eq!(
        p.events_of("node", node_id).await,
        ["NodeProvisioned", "NodeConnected"]
    );
}

#[tokio::test]
async fn a_task_assigned_while_connected_reaches_its_node_only() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_a, token_a) = p.provision().await;
    let (_node_b, token_b) = p.provision().await;
    let (mut a, _) = Agent::join(server.addr, &token_a, vec![]).await;
    let (mut b, _) = Agent::join(server.addr, &token_b, vec![]).await;
    let task_id = p.submit_and_assign(node_a).await;
    let Command::RunTask(run) = a.command().await else {
        panic!("expected run_task")
    };
    assert_eq!((run.task_id, run.attempt), (task_id, 1));
    assert_eq!(run.code_repo_url, "https://example.com/code.git");
    assert_eq!(run.code_commit_id, "a".repeat(40));
    assert_eq!(run.env_commit_id, "b".repeat(40));
    assert_eq!(run.dockerfile_path, "docker/Dockerfile");
    assert_eq!(run.command, ["python", "train.py"]);
    assert_eq!(run.env["SEED"], "1");
    assert_eq!((run.cpus, run.memory_mb), (1.0, 1024));
    assert_eq!(run.timeout_s, Some(3600));
    assert!(run.gpus.is_empty());
    assert_eq!(run.network, protocol::TaskNetwork::None);
    server.deliver().await;
    b.expect_quiet().await;
    a.send(&AgentMessage::Ack {
        command_id: protocol::command_id("run_task", task_id, 1),
    })
    .await;
    a.expect_quiet().await;
}

#[tokio::test]
async fn an_assignment_committed_here_reaches_its_node_at_once_and_once_while_the_outbox_is_held_back(
) {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node, token) = p.provision().await;
    let (mut a, _) = Agent::join(server.addr, &token, vec![]).await;
    // Only this process's own hand-off can deliver meanwhile.
    let blocker = p.hold_outbox_back().await;
    let task_id = p.submit_and_assign(node).await;
    let Command::RunTask(run) = a.command().await else {
        panic!("expected run_task")
    };
    assert_eq!((run.task_id, run.attempt), (task_id, 1));
    // Once the outbox shows the assignment, it is not sent a second time.
    blocker.rollback().await.unwrap();
    server.deliver().await;
    a.expect_quiet().await;
}

#[tokio::test]
async fn a_cancel_another_process_commits_reaches_the_agent_of_an_assignment_this_one_delivered() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node, token) = p.provision().await;
    let (mut a, _) = Agent::join(server.addr, &token, vec![]).await;
    // The outbox held back: the assignment goes by this process's own
    // hand-off, and this process remembers the task as assigned.
    let blocker = p.hold_outbox_back().await;
    let task_id = p.submit_and_assign(node).await;
    assert_eq!(run_task_for(&a.command().await), task_id);
    // Another process (a store of its own) asks to cancel it: what this
    // one remembers of the task is now behind the log.
    let other = Store::new(p.pool.clone());
    let now = Utc::now();
    let cancel = TaskCommand::RequestCancel {
        by: admin(),
        at: now,
    };
    other
        .execute::<Task>(&task_id.to_string(), cancel, &admin(), now)
        .await
        .unwrap();
    blocker.rollback().await.unwrap();
    server.deliver().await;
    // The outbox brings the assignment (already delivered) and the cancel,
    // which must be decided on the task as the log has it.
    let commands = a.commands().await;
    assert!(
        commands.iter().any(
            |c| matches!(c, Command::CancelTask { task_id: t, attempt: 1, .. } if *t == task_id)
        ),
        "no cancel_task reached the agent: {commands:?}"
    );
}

#[tokio::test]
async fn pending_commands_are_sent_when_the_agent_connects() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let (other_node, _) = p.provision().await;
    // Seen by the projector: found through task_view.
    let projected = p.submit_and_assign(node_id).await;
    let cancelled = p.submit_and_assign(node_id).await;
    p.report_as(
        node_id,
        cancelled,
        TaskCommand::Accept {
            node_id,
            attempt: 1,
            at: Utc::now(),
        },
    )
    .await;
    p.cancel(cancelled).await;
    let cancelled_early = p.submit_and_assign(node_id).await;
    p.cancel(cancelled_early).await;
    let elsewhere = p.submit_and_assign(other_node).await;
    projections::Projector::new(p.pool.clone())
        .catch_up()
        .await
        .unwrap();
    // Not yet projected: found in the outbox after the projector's checkpoint.
    let fresh = p.submit_and_assign(node_id).await;

    // The agent took `cancelled` on and still runs it.
    let still_running = || {
        vec![RunningAttempt {
            task_id: cancelled,
            attempt: 1,
            container: None,
        }]
    };
    let (mut agent, _) = Agent::join(server.addr, &token, still_running()).await;
    let commands = agent.commands().await;
    let mut runs: Vec<Uuid> = commands
        .iter()
        .filter(|c| matches!(c, Command::RunTask(_)))
        .map(run_task_for)
        .collect();
    // Delivery is at least once: a command the outbox consumer also sees
    // may arrive twice under the same id, which the agent drops.
    runs.sort();
    runs.dedup();
    let mut wanted = vec![projected, fresh, cancelled_early];
    wanted.sort();
    assert_eq!(runs, wanted);
    let mut cancels: Vec<_> = commands
        .iter()
        .filter(|c| matches!(c, Command::CancelTask { .. }))
        .map(cancel_task_for)
        .collect();
    cancels.sort();
    cancels.dedup();
    let mut cancels_wanted = vec![(cancelled, 1, GRACE_S), (cancelled_early, 1, GRACE_S)];
    cancels_wanted.sort();
    assert_eq!(cancels, cancels_wanted);
    assert!(!runs.contains(&elsewhere));
    // Cancelled before it was accepted: the cancel comes first, so the
    // agent never starts it.
    let position = |kind: fn(&Command) -> bool| {
        commands
            .iter()
            .position(|c| kind(c) && command_task(c) == cancelled_early)
            .unwrap()
    };
    assert!(
        position(|c| matches!(c, Command::CancelTask { .. }))
            < position(|c| matches!(c, Command::RunTask(_)))
    );

    // Still wanted after a reconnect: sent again, same ids.
    drop(agent);
    server.wait_connected(0).await;
    let (mut again, _) = Agent::join(server.addr, &token, still_running()).await;
    assert_eq!(again.commands().await.len(), 5);
}

#[tokio::test]
async fn an_accepted_attempt_missing_from_the_hello_is_lost_and_retried() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let task_id = p.submit_and_assign(node_id).await;
    let (mut agent, _) = Agent::join(server.addr, &token, vec![]).await;
    // The run_task may come twice (at connect and from the outbox).
    let runs = agent.commands().await;
    assert!(!runs.is_empty() && runs.iter().all(|c| run_task_for(c) == task_id));
    let mut accepted = status(1, task_id, ReportedState::Accepted);
    accepted.attempt = 1;
    assert_eq!(agent.report(accepted).await, None);
    // The agent restarts: its hello no longer lists the attempt (it died
    // while preparing, before any container existed).
    drop(agent);
    server.wait_connected(0).await;
    let (_again, _) = Agent::join(server.addr, &token, vec![]).await;
    wait_until("attempt lost", || async {
        p.events_of("task", task_id)
            .await
            .contains(&"TaskRequeued".to_string())
    })
    .await;
    let task = p
        .store
        .load::<domain::task::Task>(&task_id.to_string())
        .await
        .unwrap()
        .unwrap()
        .state;
    assert_eq!(task.state, domain::task::TaskState::Queued);
    assert_eq!(task.attempts[0].outcome.as_deref(), Some("lost"));
    assert!(
        task.reason
            .as_deref()
            .unwrap()
            .contains("reconnected without attempt 1"),
        "{:?}",
        task.reason
    );
}

#[tokio::test]
async fn reports_append_the_task_events_and_each_is_received_once_stored() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let (mut agent, _) = Agent::join(server.addr, &token, vec![]).await;
    let task_id = p.submit_and_assign(node_id).await;
    agent.command().await;

    assert_eq!(
        agent
            .report(status(1, task_id, ReportedState::Accepted))
            .await,
        None
    );
    let mut preparing = status(2, task_id, ReportedState::Preparing);
    preparing.stage = Some("fetching code".into());
    assert_eq!(agent.report(preparing).await, None);
    let mut running = status(3, task_id, ReportedState::Running);
    running.container = Some("c0ffee".into());
    assert_eq!(agent.report(running).await, None);
    assert_eq!(
        agent
            .report(status(4, task_id, ReportedState::Succeeded))
            .await,
        None
    );
    let events = [
        "TaskSubmitted",
        "TaskAssigned",
        "TaskAccepted",
        "TaskPreparing",
        "TaskStarted",
        "TaskSucceeded",
    ];
    assert_eq!(p.events_of("task", task_id).await, events);
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT metadata->>'actor' FROM events WHERE aggregate_id = $1 AND sequence > 2",
    )
    .bind(task_id.to_string())
    .fetch_all(&p.pool)
    .await
    .unwrap();
    assert!(actors.iter().all(|a| *a == format!("node:{node_id}")));

    // A repeated report is answered and appends nothing.
    let before = p.event_count().await;
    assert_eq!(
        agent
            .report(status(5, task_id, ReportedState::Succeeded))
            .await,
        None
    );
    assert_eq!(
        agent
            .report(status(6, task_id, ReportedState::Accepted))
            .await,
        None
    );
    assert_eq!(p.event_count().await, before);
    // A contradicting one is refused for good, and the session stays open.
    let mut failed = status(7, task_id, ReportedState::Failed);
    failed.exit_code = Some(1);
    assert!(agent.report(failed).await.is_some());
    assert_eq!(p.event_count().await, before);
    // A malformed report is refused, not fatal.
    assert!(agent
        .report(status(8, task_id, ReportedState::Running))
        .await
        .unwrap()
        .contains("container"));
}

#[tokio::test]
async fn reports_arriving_together_are_stored_together_and_each_answered_in_order() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let (mut agent, _) = Agent::join(server.addr, &token, vec![]).await;
    let first = p.submit_and_assign(node_id).await;
    agent.command().await;
    let second = p.submit_and_assign(node_id).await;
    agent.command().await;

    let mut running = status(3, first, ReportedState::Running);
    running.container = Some("c0ffee".into());
    let mut stale = status(5, first, ReportedState::Accepted);
    stale.attempt = 2;
    let sent = [
        AgentMessage::Status(status(1, first, ReportedState::Accepted)),
        // Malformed: a running report names its container.
        AgentMessage::Status(status(2, first, ReportedState::Running)),
        AgentMessage::Status(running),
        AgentMessage::Status(status(4, second, ReportedState::Accepted)),
        // Not this node's current attempt.
        AgentMessage::Status(stale),
        AgentMessage::Status(status(6, first, ReportedState::Succeeded)),
        AgentMessage::Heartbeat { seq: 1 },
        AgentMessage::Status(status(7, second, ReportedState::Accepted)),
    ];
    agent.send_together(&sent).await;
    let mut answers = Vec::new();
    for _ in 1..=7 {
        match agent.recv().await {
            ServerMessage::Received { id, error } => answers.push((id, error.is_some())),
            other => panic!("expected received, got {other:?}"),
        }
    }
    assert_eq!(
        answers,
        [
            (1, false),
            (2, true),
            (3, false),
            (4, false),
            (5, true),
            (6, false),
            (7, false)
        ]
    );
    assert_eq!(
        p.events_of("task", first).await,
        [
            "TaskSubmitted",
            "TaskAssigned",
            "TaskAccepted",
            "TaskStarted",
            "TaskSucceeded",
            // The malformed report, shown on the task's timeline.
            "TaskReportRefused"
        ]
    );
    assert_eq!(
        p.events_of("task", second).await,
        ["TaskSubmitted", "TaskAssigned", "TaskAccepted"]
    );
    // The first task's three reports went in one statement.
    let txids: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT txid::text FROM events \
         WHERE aggregate_type = 'task' AND aggregate_id = $1 AND sequence BETWEEN 3 AND 5",
    )
    .bind(first.to_string())
    .fetch_all(&p.pool)
    .await
    .unwrap();
    assert_eq!(txids.len(), 1, "{txids:?}");

    // A batch the database refuses part of is stored one by one: the good
    // report is stored, the one it cannot hold refused for good. (Reports
    // are bounded before they reach the database, so a trigger plays a
    // database refusing the data.)
    sqlx::query(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF NEW.payload::text LIKE '%poison-message%' THEN \
             RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'poison'; \
           END IF; \
           RETURN NEW; \
         END $$",
    )
    .execute(&p.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON events \
         FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    )
    .execute(&p.pool)
    .await
    .unwrap();
    let mut bad = status(9, second, ReportedState::Failed);
    bad.exit_code = Some(1);
    bad.message = Some("poison-message".into());
    let mut running = status(8, second, ReportedState::Running);
    running.container = Some("c0ffee".into());
    agent
        .send_together(&[AgentMessage::Status(running), AgentMessage::Status(bad)])
        .await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        match agent.recv().await {
            ServerMessage::Received { id, error } => answers.push((id, error)),
            other => panic!("expected received, got {other:?}"),
        }
    }
    assert_eq!(answers[0], (8, None));
    assert_eq!(answers[1].0, 9);
    assert!(answers[1].1.is_some(), "{answers:?}");
    assert_eq!(
        p.events_of("task", second).await,
        [
            "TaskSubmitted",
            "TaskAssigned",
            "TaskAccepted",
            "TaskStarted",
            "TaskReportRefused"
        ]
    );
}

#[tokio::test]
async fn a_failure_report_records_its_exit_code_and_message() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let (mut agent, _) = Agent::join(server.addr, &token, vec![]).await;
    let task_id = p.submit_and_assign(node_id).await;
    agent.command().await;
    let mut failed = status(1, task_id, ReportedState::Failed);
    failed.exit_code = Some(137);
    failed.message = Some("out of memory".into());
    assert_eq!(agent.report(failed).await, None);
    let task = p
        .store
        .load::<Task>(&task_id.to_string())
        .await
        .unwrap()
        .unwrap()
        .state;
    assert_eq!(task.exit_code, Some(137));
    assert_eq!(task.reason.as_deref(), Some("out of memory"));
}

#[tokio::test]
async fn a_failure_the_node_caused_is_a_lost_attempt_retried_and_its_repeat_changes_nothing() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let (mut agent, _) = Agent::join(server.addr, &token, vec![]).await;
    let spec = domain::spec::TaskSpecDraft {
        max_retries: Some(1),
        command: Some(vec!["python".into(), "train.py".into()]),
        ..testkit::spec_draft(Uuid::new_v4())
    };
    let task_id = support::submit_spec(&p.store, testkit::spec(spec)).await;
    support::assign(&p.store, task_id, node_id).await;
    agent.command().await;
    assert_eq!(
        agent
            .report(status(1, task_id, ReportedState::Accepted))
            .await,
        None
    );
    let mut failed = status(2, task_id, ReportedState::Failed);
    failed.node_fault = true;
    failed.message =
        Some("looking up the image: Docker did not answer (connection refused)".into());
    // The ingress also tells the node to stop the lost attempt, should it
    // run on: harmless to an agent that ended it.
    let (answer, commands) = agent.report_amid_commands(failed.clone()).await;
    assert_eq!(answer, None);
    assert!(
        commands.iter().all(
            |c| matches!(c, Command::CancelTask { task_id: t, attempt: 1, .. } if *t == task_id)
        ),
        "{commands:?}"
    );
    let lost = [
        "TaskSubmitted",
        "TaskAssigned",
        "TaskAccepted",
        "TaskLost",
        "TaskRequeued",
    ];
    assert_eq!(p.events_of("task", task_id).await, lost);
    let task = p
        .store
        .load::<Task>(&task_id.to_string())
        .await
        .unwrap()
        .unwrap()
        .state;
    assert_eq!(task.state, domain::task::TaskState::Queued);
    assert_eq!(task.attempts[0].outcome.as_deref(), Some("lost"));
    // The agent sends it again, as after a reconnect: acknowledged, and
    // nothing is appended.
    failed.id = 3;
    assert_eq!(agent.report_amid_commands(failed).await.0, None);
    assert_eq!(p.events_of("task", task_id).await, lost);
    // Only a failed report may say so.
    let mut odd = status(4, task_id, ReportedState::Succeeded);
    odd.node_fault = true;
    let error = agent.report_amid_commands(odd).await.0.unwrap();
    assert!(error.contains("node_fault"), "{error}");
    let mut refused = lost.to_vec();
    refused.push("TaskReportRefused");
    assert_eq!(p.events_of("task", task_id).await, refused);
}

#[tokio::test]
async fn a_report_for_another_nodes_task_is_refused_and_appends_nothing() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_a, token_a) = p.provision().await;
    let (_, token_b) = p.provision().await;
    let (mut a, _) = Agent::join(server.addr, &token_a, vec![]).await;
    let (mut b, _) = Agent::join(server.addr, &token_b, vec![]).await;
    let task_id = p.submit_and_assign(node_a).await;
    a.command().await;
    let before = p.event_count().await;
    let error = b
        .report(status(1, task_id, ReportedState::Accepted))
        .await
        .unwrap();
    // Without telling who holds the task.
    assert!(error.contains("not assigned to this node"), "{error}");
    assert!(!error.contains(&node_a.to_string()), "{error}");
    let mut stale = status(2, task_id, ReportedState::Accepted);
    stale.attempt = 2;
    assert!(a.report(stale).await.is_some());
    let nobody = status(3, Uuid::now_v7(), ReportedState::Accepted);
    assert!(b.report(nobody).await.is_some());
    assert_eq!(p.event_count().await, before);
    // Both sessions carry on.
    assert_eq!(
        a.report(status(4, task_id, ReportedState::Accepted)).await,
        None
    );
    server.wait_connected(2).await;
}

#[tokio::test]
async fn log_chunks_are_stored_once_each_and_only_for_the_nodes_own_attempts() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_a, token_a) = p.provision().await;
    let (_, token_b) = p.provision().await;
    let (mut a, _) = Agent::join(server.addr, &token_a, vec![]).await;
    let (mut b, _) = Agent::join(server.addr, &token_b, vec![]).await;
    let task_id = p.submit_and_assign(node_a).await;
    a.command().await;
    let chunk = |id, offset, data: &str| LogChunk {
        id,
        task_id,
        attempt: 1,
        offset,
        data: data.into(),
    };
    let before = p.event_count().await;
    assert_eq!(a.log(chunk(1, 0, "hello ")).await, None);
    assert_eq!(a.log(chunk(2, 6, "world\n")).await, None);
    assert_eq!(a.log(chunk(3, 0, "hello ")).await, None);
    assert_eq!(a.log(chunk(4, 6, "world\n")).await, None);
    assert!(b.log(chunk(1, 12, "not mine")).await.is_some());
    let mut stale = chunk(5, 12, "no such attempt");
    stale.attempt = 2;
    assert!(a.log(stale).await.is_some());
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT \"offset\", data FROM task_log WHERE task_id = $1 ORDER BY \"offset\"",
    )
    .bind(task_id)
    .fetch_all(&p.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [(0, "hello ".to_string()), (6, "world\n".to_string())]
    );
    // An agent that adopted its container after a restart reads the output
    // again from the start, cut differently: the server keeps only what it
    // did not have.
    assert_eq!(a.log(chunk(6, 0, "hel")).await, None);
    assert_eq!(a.log(chunk(7, 3, "lo world\nmore\n")).await, None);
    let text: Vec<String> =
        sqlx::query_scalar("SELECT data FROM task_log WHERE task_id = $1 ORDER BY \"offset\"")
            .bind(task_id)
            .fetch_all(&p.pool)
            .await
            .unwrap();
    assert_eq!(text.concat(), "hello world\nmore\n");
    // A gap is still refused.
    assert!(a.log(chunk(8, 40, "far ahead")).await.is_some());
    // Logs are not events.
    assert_eq!(p.event_count().await, before);
    // A cache change mid-session replaces what the hello said.
    a.send(&AgentMessage::Cache(Cache {
        images: vec!["unidesk-env:abc".into()],
        commits: vec!["c".repeat(40)],
    }))
    .await;
    wait_until("cache recorded", || async {
        let images: Option<Vec<String>> =
            sqlx::query_scalar("SELECT images FROM node_cache WHERE node_id = $1")
                .bind(node_a)
                .fetch_optional(&p.pool)
                .await
                .unwrap();
        images == Some(vec!["unidesk-env:abc".to_string()])
    })
    .await;
}

#[tokio::test]
async fn bad_frames_get_an_error_and_close_only_their_own_session() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (good_node, good_token) = p.provision().await;
    let (mut good, _) = Agent::join(server.addr, &good_token, vec![]).await;
    let oversized = format!(
        r#"{{"protocol":1,"type":"heartbeat","seq":1,"pad":"{}"}}"#,
        "x".repeat(protocol::MAX_FRAME_BYTES)
    );
    let cases: Vec<(&str, Message)> = vec![
        ("bad_frame", Message::Binary(vec![1, 2, 3].into())),
        ("bad_frame", Message::Text("{not json".into())),
        (
            "unknown_type",
            Message::Text(r#"{"protocol":1,"type":"launch_missiles"}"#.into()),
        ),
        (
            "protocol_version",
            Message::Text(r#"{"protocol":9,"type":"heartbeat","seq":1}"#.into()),
        ),
        (
            "bad_frame",
            Message::Text(r#"{"protocol":1,"type":"status","id":1}"#.into()),
        ),
        ("too_large", Message::Text(oversized.into())),
    ];
    for (code, frame) in cases {
        // After hello: the frame appends nothing; only the session's end is recorded.
        let (node_id, token) = p.provision().await;
        let (mut bad, _) = Agent::join(server.addr, &token, vec![]).await;
        bad.send_raw(frame.clone()).await;
        bad.expect_refused(code).await;
        let p = &p;
        wait_until("the disconnection to be recorded", || async move {
            p.events_of("node", node_id).await.len() == 3
        })
        .await;
        assert_eq!(
            p.events_of("node", node_id).await,
            ["NodeProvisioned", "NodeConnected", "NodeDisconnected"],
            "{code}"
        );
        // Before hello: nothing at all is appended.
        let before = p.event_count().await;
        let mut early = dial(server.addr, Some(&token)).await.unwrap();
        early.send_raw(frame).await;
        early.expect_refused(code).await;
        assert_eq!(p.event_count().await, before, "{code}");
    }
    // The agent connected all along is unaffected.
    good.send(&AgentMessage::Heartbeat { seq: 1 }).await;
    let task_id = p.submit_and_assign(good_node).await;
    assert_eq!(run_task_for(&good.command().await), task_id);
    assert_eq!(
        good.report(status(1, task_id, ReportedState::Accepted))
            .await,
        None
    );
    server.wait_connected(1).await;
}

#[tokio::test]
async fn the_first_message_must_be_a_timely_hello() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (_, token) = p.provision().await;
    let before = p.event_count().await;
    let mut silent = dial(server.addr, Some(&token)).await.unwrap();
    silent.expect_refused("hello_expected").await;
    let mut hasty = dial(server.addr, Some(&token)).await.unwrap();
    hasty.send(&AgentMessage::Heartbeat { seq: 1 }).await;
    hasty.expect_refused("hello_expected").await;
    let mut nonsense = dial(server.addr, Some(&token)).await.unwrap();
    let mut bad = hello(vec![]);
    bad.agent_version = String::new();
    nonsense.send(&AgentMessage::Hello(bad)).await;
    nonsense.expect_refused("bad_frame").await;
    assert_eq!(p.event_count().await, before);
}

#[tokio::test]
async fn cancelling_a_running_task_sends_cancel_task_to_its_agent() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let (mut agent, _) = Agent::join(server.addr, &token, vec![]).await;
    let task_id = p.submit_and_assign(node_id).await;
    agent.command().await;
    agent
        .report(status(1, task_id, ReportedState::Accepted))
        .await;
    let mut running = status(2, task_id, ReportedState::Running);
    running.container = Some("c1".into());
    assert_eq!(agent.report(running).await, None);
    p.cancel(task_id).await;
    assert_eq!(
        cancel_task_for(&agent.command().await),
        (task_id, 1, GRACE_S)
    );
    assert_eq!(
        agent
            .report(status(3, task_id, ReportedState::Cancelled))
            .await,
        None
    );
    assert_eq!(
        p.events_of("task", task_id).await.last().unwrap(),
        "TaskCancelled"
    );

    // Cancelled before the agent accepted it: cancel_task, then run_task
    // again (same id) so an agent that missed the first one knows what the
    // cancel is about.
    let early = p.submit_and_assign(node_id).await;
    assert_eq!(run_task_for(&agent.command().await), early);
    p.cancel(early).await;
    assert_eq!(cancel_task_for(&agent.command().await), (early, 1, GRACE_S));
    assert_eq!(run_task_for(&agent.command().await), early);
    assert_eq!(
        agent
            .report(status(4, early, ReportedState::Cancelled))
            .await,
        None
    );
    assert_eq!(
        p.events_of("task", early).await.last().unwrap(),
        "TaskCancelled"
    );
}

#[tokio::test]
async fn revoking_a_connected_node_closes_its_session_at_once_for_good() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let (_, other_token) = p.provision().await;
    let (mut agent, _) = Agent::join(server.addr, &token, vec![]).await;
    let (mut other, _) = Agent::join(server.addr, &other_token, vec![]).await;
    p.revoke(node_id).await;
    agent.expect_refused("revoked").await;
    server.wait_connected(1).await;
    let Err((status, _)) = dial(server.addr, Some(&token)).await else {
        panic!("a revoked node was let in")
    };
    assert_eq!(status, 401);
    other.send(&AgentMessage::Heartbeat { seq: 1 }).await;
    server.deliver().await;
    other.expect_quiet().await;
}

#[tokio::test]
async fn two_ingresses_on_one_database_deliver_only_to_their_own_agents() {
    let p = platform().await;
    let east = Server::start(&p.store, "ingress-east").await;
    let west = Server::start(&p.store, "ingress-west").await;
    let (node_e, token_e) = p.provision().await;
    let (node_w, token_w) = p.provision().await;
    let (mut e, _) = Agent::join(east.addr, &token_e, vec![]).await;
    let (mut w, _) = Agent::join(west.addr, &token_w, vec![]).await;
    let task_e = p.submit_and_assign(node_e).await;
    let task_w = p.submit_and_assign(node_w).await;
    assert_eq!(run_task_for(&e.command().await), task_e);
    assert_eq!(run_task_for(&w.command().await), task_w);
    east.deliver().await;
    west.deliver().await;
    e.expect_quiet().await;
    w.expect_quiet().await;
    assert_eq!(p.liveness(node_e).await.unwrap().1, "ingress-east");
    assert_eq!(p.liveness(node_w).await.unwrap().1, "ingress-west");
    assert_eq!((east.ingress.connected(), west.ingress.connected()), (1, 1));
    // Reports go through whichever ingress the agent is on.
    assert_eq!(
        w.report(status(1, task_w, ReportedState::Accepted)).await,
        None
    );
}

#[tokio::test]
async fn a_node_connecting_again_replaces_its_older_session() {
    let p = platform().await;
    let east = Server::start(&p.store, "ingress-east").await;
    let west = Server::start(&p.store, "ingress-west").await;
    let (node_id, token) = p.provision().await;

    // Twice through the same ingress.
    let (mut first, _) = Agent::join(east.addr, &token, vec![]).await;
    let (mut second, second_session) = Agent::join(east.addr, &token, vec![]).await;
    first.expect_refused("replaced").await;
    east.wait_connected(1).await;
    second.send(&AgentMessage::Heartbeat { seq: 1 }).await;
    let task_id = p.submit_and_assign(node_id).await;
    assert_eq!(run_task_for(&second.command().await), task_id);
    assert_eq!(p.liveness(node_id).await.unwrap().0, second_session);

    // Then through another one: the outbox tells the first ingress.
    let (mut third, third_session) = Agent::join(west.addr, &token, vec![]).await;
    second.expect_refused("replaced").await;
    east.wait_connected(0).await;
    assert_eq!(run_task_for(&third.command().await), task_id);
    let (live, ingress_id, _) = p.liveness(node_id).await.unwrap();
    assert_eq!((live, ingress_id.as_str()), (third_session, "ingress-west"));
    // Replaced sessions end without marking the node disconnected.
    testkit::stays(
        "the node's events without a NodeDisconnected",
        QUIET,
        || async {
            p.events_of("node", node_id).await
                == [
                    "NodeProvisioned",
                    "NodeConnected",
                    "NodeConnected",
                    "NodeConnected",
                ]
        },
    )
    .await;
    let node = p
        .store
        .load::<Node>(&node_id.to_string())
        .await
        .unwrap()
        .unwrap()
        .state;
    assert_eq!(node.session, Some(third_session));
}

#[tokio::test]
async fn attempts_the_platform_no_longer_wants_are_cancelled_on_hello() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let (other_node, _) = p.provision().await;
    let kept = p.submit_and_assign(node_id).await;
    let moved = p.submit_and_assign(other_node).await;
    let finished = p.submit_and_assign(node_id).await;
    p.report_as(
        node_id,
        finished,
        TaskCommand::ReportExited {
            node_id,
            attempt: 1,
            outcome: domain::task::Outcome::Succeeded,
            at: Utc::now(),
        },
    )
    .await;
    let unknown = Uuid::now_v7();
    let waiting = p.submit_and_assign(node_id).await;
    let running = |task_id| RunningAttempt {
        task_id,
        attempt: 1,
        container: Some("c".into()),
    };
    // The outbox consumer has handled every assignment while the node was
    // away, as on a server that has been up a while: what the agent gets
    // now is the answer to its hello alone.
    server.deliver().await;
    let (mut agent, _) = Agent::join(
        server.addr,
        &token,
        vec![
            running(kept),
            running(moved),
            running(finished),
            running(unknown),
        ],
    )
    .await;
    let commands = agent.commands().await;
    let mut cancels: Vec<Uuid> = commands
        .iter()
        .filter(|c| matches!(c, Command::CancelTask { .. }))
        .map(|c| cancel_task_for(c).0)
        .collect();
    cancels.sort();
    cancels.dedup();
    let mut unwanted = vec![moved, finished, unknown];
    unwanted.sort();
    assert_eq!(cancels, unwanted);
    // The kept attempt gets nothing (not even run_task); the waiting one runs.
    let mut runs: Vec<Uuid> = commands
        .iter()
        .filter(|c| matches!(c, Command::RunTask(_)))
        .map(run_task_for)
        .collect();
    runs.dedup();
    assert_eq!(runs, [waiting]);
}

#[tokio::test]
async fn shutting_down_closes_every_session_cleanly() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let (mut agent, _) = Agent::join(server.addr, &token, vec![]).await;
    let ingress = server.ingress.clone();
    server.shut_down().await;
    match agent.next(PATIENCE).await {
        Some(Incoming::Closed(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert_eq!(ingress.connected(), 0);
    assert_eq!(
        p.events_of("node", node_id).await.last().unwrap(),
        "NodeDisconnected"
    );
}

#[tokio::test]
async fn shutting_down_says_goodbye_to_every_agent_and_records_each_end() {
    let p = platform().await;
    let server = Server::start(&p.store, "ingress-a").await;
    let mut agents = Vec::new();
    for _ in 0..40 {
        let (node_id, token) = p.provision().await;
        let (agent, _) = Agent::join(server.addr, &token, vec![]).await;
        agents.push((node_id, agent));
    }
    server.wait_connected(agents.len()).await;
    let ingress = server.ingress.clone();
    server.shut_down().await;
    assert_eq!(ingress.connected(), 0);
    for (node_id, agent) in &mut agents {
        match agent.next(PATIENCE).await {
            Some(Incoming::Closed(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
            other => panic!("node {node_id}: expected a close frame, got {other:?}"),
        }
        let reason: String = sqlx::query_scalar(
            "SELECT payload->'Disconnected'->>'reason' FROM events \
             WHERE aggregate_type = 'node' AND aggregate_id = $1 AND event_type = 'NodeDisconnected'",
        )
        .bind(node_id.to_string())
        .fetch_one(&p.pool)
        .await
        .unwrap();
        assert_eq!(reason, "the ingress shut down");
    }
}

/// A session whose agent left just before the ingress stops may still be
/// recording its end, outside the sessions the stop says goodbye to (it no
/// longer takes a goodbye). The stop waits for that end too: the process
/// closes its pool right after, and the end would be lost, the node left
/// online in the log until liveness noticed.
#[tokio::test]
async fn stopping_waits_for_the_ends_sessions_are_still_recording() {
    let p = platform().await;
    let mut server = Server::start(&p.store, "ingress-a").await;
    let (node_id, token) = p.provision().await;
    let (agent, _) = Agent::join(server.addr, &token, vec![]).await;
    server.wait_connected(1).await;
    // Appends wait while this transaction holds the log in share mode: the
    // end the session records once its agent leaves cannot land yet.
    let mut hold = p.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN SHARE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    drop(agent);
    let pool = &p.pool;
    wait_until("the session's end to wait on the log", || async move {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE relation = 'events'::regclass AND NOT granted",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        waiting > 0
    })
    .await;

    let _ = server.stop.take().unwrap().send(());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !server.runner.is_finished(),
        "the ingress stopped while a session was still recording its end"
    );
    hold.rollback().await.unwrap();
    tokio::time::timeout(PATIENCE, &mut server.runner)
        .await
        .expect("the ingress did not stop once the end was recorded")
        .unwrap();
    assert_eq!(
        p.events_of("node", node_id).await,
        ["NodeProvisioned", "NodeConnected", "NodeDisconnected"]
    );
    assert_eq!(server.ingress.connected(), 0);
}

/// Sessions that end together (a site's gateway restarting, a load test
/// stopping) each have their end recorded, even on a pool far smaller
/// than their number: the ends queue for the ingress's few recorders, not
/// all at once for the pool's connections, where most would time out and
/// leave their node online in the log until liveness noticed.
#[tokio::test]
async fn sessions_ending_together_each_have_their_end_recorded() {
    const AGENTS: usize = 1000;
    let db = testkit::fresh_db().await;
    let small = store::pool_options()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(250))
        .connect(&db.url)
        .await
        .unwrap();
    let p = Platform {
        store: Store::new(small),
        pool: db.pool.clone(),
    };
    let server = Server::start(&p.store, "ingress-a").await;
    let mut agents = Vec::new();
    let mut nodes = Vec::new();
    for _ in 0..AGENTS {
        let (node_id, token) = p.provision().await;
        let (agent, _) = Agent::join(server.addr, &token, vec![]).await;
        agents.push(agent);
        nodes.push(node_id);
    }
    server.wait_connected(AGENTS).await;
    drop(agents);
    // A thousand ends take a second or two here; a loaded machine may
    // take several times that, and an end that timed out never comes.
    let pool = &p.pool;
    testkit::eventually(
        "every end to be recorded",
        Duration::from_secs(60),
        || async move {
            let ended: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM events \
             WHERE aggregate_type = 'node' AND event_type = 'NodeDisconnected'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            (ended == AGENTS as i64).then_some(())
        },
    )
    .await;
    for node_id in nodes {
        assert_eq!(
            p.events_of("node", node_id).await,
            ["NodeProvisioned", "NodeConnected", "NodeDisconnected"]
        );
    }
    assert_eq!(server.ingress.connected(), 0);
}
