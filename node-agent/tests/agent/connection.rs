//! The agent against a small in-test WebSocket server speaking the protocol.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use node_agent::connection::{self, Agent, Config, Token};
use node_agent::executor::{Report, StatusReport};
use protocol::{AgentMessage, Command, Hello, ReportedState, Resources, ServerMessage, Status};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

use crate::support::{self, context, env_repo, repo, spec};

/// How long an attempt may take to build its image and run.
pub(crate) const RUN_WAIT: Duration = Duration::from_secs(120);

pub(crate) const TOKEN: &str = "node-token-for-tests";
pub(crate) const WAIT: Duration = Duration::from_secs(15);

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// Accepts agents presenting [`TOKEN`] on [`protocol::PATH`] and hands each
/// session to the test; answers 401 to anything else.
pub(crate) async fn server() -> (SocketAddr, mpsc::Receiver<Ws>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, check_token).await {
                    let _ = tx.send(ws).await;
                }
            });
        }
    });
    (addr, rx)
}

#[expect(
    clippy::result_large_err,
    reason = "the signature of tungstenite's handshake callback"
)]
fn check_token(req: &Request, res: Response) -> Result<Response, ErrorResponse> {
    let auth = req.headers().get("authorization");
    let good = auth.and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"));
    if good && req.uri().path() == protocol::PATH {
        Ok(res)
    } else {
        let mut refusal = ErrorResponse::new(Some("unauthorized".into()));
        *refusal.status_mut() = StatusCode::UNAUTHORIZED;
        Err(refusal)
    }
}

pub(crate) fn config(addr: SocketAddr, token: &str) -> Config {
    Config {
        server: format!("ws://{addr}"),
        token: Token::new(token),
        tls: connection::tls_config(None).unwrap(),
        labels: BTreeMap::from([("zone".to_owned(), "test".to_owned())]),
        resources: Resources {
            cpus: 2.0,
            memory_mb: 1024,
            gpus: Vec::new(),
        },
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(200),
    }
}

/// The next protocol message from the agent, skipping pings.
pub(crate) async fn recv(ws: &mut Ws) -> AgentMessage {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the agent said nothing")
            .expect("the agent hung up")
            .unwrap();
        if let Message::Text(text) = frame {
            return protocol::decode(text.as_str()).unwrap();
        }
    }
}

/// The next status or log from the agent, skipping heartbeats and acks.
/// Reads the agent's reports, answering none, until `task`'s final status.
pub(crate) async fn until_final(ws: &mut Ws, task: Uuid) -> Vec<AgentMessage> {
    let deadline = tokio::time::Instant::now() + RUN_WAIT;
    let mut seen = Vec::new();
    loop {
        let message = tokio::time::timeout_at(deadline, recv(ws))
            .await
            .unwrap_or_else(|_| panic!("no final status within {RUN_WAIT:?}: {seen:?}"));
        match &message {
            AgentMessage::Status(s) if s.task_id == task => {
                let done = !matches!(
                    s.state,
                    ReportedState::Accepted | ReportedState::Preparing | ReportedState::Running
                );
                seen.push(message);
                if done {
                    return seen;
                }
            }
            AgentMessage::Log(_) => seen.push(message),
            _ => {}
        }
    }
}

pub(crate) async fn recv_report(ws: &mut Ws) -> AgentMessage {
    loop {
        let message = recv(ws).await;
        if matches!(message, AgentMessage::Status(_) | AgentMessage::Log(_)) {
            return message;
        }
    }
}

pub(crate) async fn send(ws: &mut Ws, message: &ServerMessage) {
    ws.send(Message::text(protocol::encode(message)))
        .await
        .unwrap();
}

pub(crate) async fn next_session(sessions: &mut mpsc::Receiver<Ws>) -> Ws {
    tokio::time::timeout(WAIT, sessions.recv())
        .await
        .expect("the agent did not connect")
        .unwrap()
}

/// Reads the hello and answers with a welcome.
pub(crate) async fn welcome(ws: &mut Ws, heartbeat_s: u64) -> Hello {
    welcome_limiting(ws, heartbeat_s, None).await
}

/// Like [`welcome`], with a limit on each attempt's output.
async fn welcome_limiting(ws: &mut Ws, heartbeat_s: u64, output_limit_bytes: Option<u64>) -> Hello {
    let AgentMessage::Hello(hello) = recv(ws).await else {
        panic!("the first message must be hello");
    };
    let welcome = ServerMessage::Welcome {
        node_id: Uuid::new_v4(),
        session: Uuid::new_v4(),
        heartbeat_s,
        output_limit_bytes,
    };
    send(ws, &welcome).await;
    hello
}

fn status_report(task_id: Uuid, state: ReportedState) -> Report {
    Report::Status(StatusReport::new(task_id, 1, state))
}

pub(crate) fn report_id(message: &AgentMessage) -> u64 {
    match message {
        AgentMessage::Status(s) => s.id,
        AgentMessage::Log(l) => l.id,
        other => panic!("not a report: {other:?}"),
    }
}

pub(crate) async fn answer(ws: &mut Ws, id: u64, error: Option<&str>) {
    let received = ServerMessage::Received {
        id,
        error: error.map(str::to_owned),
    };
    send(ws, &received).await;
}

#[tokio::test]
async fn a_refused_token_makes_the_agent_stop_with_a_clear_message() {
    let (addr, _sessions) = server().await;
    let (ctx, _work) = context().await;
    let agent = Agent::new(config(addr, "revoked-token"), ctx).unwrap();
    let refused = tokio::time::timeout(WAIT, agent.run())
        .await
        .expect("the agent must stop on 401");
    let message = refused.to_string();
    assert_eq!(
        message,
        "the server refused this node's token (wrong or revoked); ask an admin for a new one"
    );
    assert!(!format!("{:?}", config(addr, "revoked-token")).contains("revoked-token"));
}

#[tokio::test]
async fn the_agent_says_hello_heartbeats_and_acks_every_command() {
    let (addr, mut sessions) = server().await;
    let (ctx, _work) = context().await;
    tokio::spawn(Agent::new(config(addr, TOKEN), ctx).unwrap().run());
    let mut ws = next_session(&mut sessions).await;
    let hello = welcome(&mut ws, 1).await;
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(hello.resources.cpus, 2.0);
    assert_eq!(hello.labels["zone"], "test");
    assert!(hello.running.is_empty());

    assert_eq!(recv(&mut ws).await, AgentMessage::Heartbeat { seq: 1 });
    assert_eq!(recv(&mut ws).await, AgentMessage::Heartbeat { seq: 2 });

    let task_id = Uuid::new_v4();
    let command_id = protocol::command_id("cancel_task", task_id, 1);
    let cancel = ServerMessage::Command {
        command_id,
        command: Command::CancelTask {
            task_id,
            attempt: 1,
            grace_s: 1,
        },
    };
    send(&mut ws, &cancel).await;
    send(&mut ws, &cancel).await;
    ws.send(Message::text(
        "{\"protocol\":1,\"type\":\"from_the_future\"}",
    ))
    .await
    .unwrap();
    let mut acks = 0;
    while acks < 2 {
        match recv(&mut ws).await {
            AgentMessage::Ack { command_id: id } => {
                assert_eq!(id, command_id);
                acks += 1;
            }
            AgentMessage::Heartbeat { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_rate_limited_agent_waits_the_time_the_server_names_before_it_connects_again() {
    let (addr, mut sessions) = server().await;
    let (ctx, _work) = context().await;
    tokio::spawn(Agent::new(config(addr, TOKEN), ctx).unwrap().run());
    let mut ws = next_session(&mut sessions).await;
    let AgentMessage::Hello(_) = recv(&mut ws).await else {
        panic!("the first message must be hello");
    };
    let refusal = ServerMessage::Error {
        code: "rate_limited".into(),
        message: "this node connected too often; connect again in 2 s".into(),
    };
    send(&mut ws, &refusal).await;
    let refused = std::time::Instant::now();
    drop(ws);
    // Its reconnect delays are at most 200 ms; the server said 2 s.
    let mut ws = next_session(&mut sessions).await;
    let waited = refused.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "came back after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "came back after {waited:?}"
    );
    welcome(&mut ws, 30).await;
}

#[tokio::test]
async fn unanswered_reports_are_resent_in_order_after_a_reconnect() {
    let (addr, mut sessions) = server().await;
    let (ctx, _work) = context().await;
    let agent = Agent::new(config(addr, TOKEN), ctx).unwrap();
    let reports = agent.reports();
    let task = Uuid::new_v4();
    for state in [
        ReportedState::Accepted,
        ReportedState::Preparing,
        ReportedState::Running,
    ] {
        reports.send(status_report(task, state)).await.unwrap();
    }
    tokio::spawn(agent.run());

    let mut ws = next_session(&mut sessions).await;
    welcome(&mut ws, 30).await;
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(report_id(&recv_report(&mut ws).await));
    }
    assert_eq!(first, vec![1, 2, 3]);
    answer(&mut ws, 1, None).await;
    answer(&mut ws, 3, Some("attempt 1 is no longer current")).await;
    // The agent reads frames in order: once this is acked, so are the answers.
    let probe = Uuid::new_v4();
    let command_id = protocol::command_id("cancel_task", probe, 1);
    let cancel = Command::CancelTask {
        task_id: probe,
        attempt: 1,
        grace_s: 1,
    };
    send(
        &mut ws,
        &ServerMessage::Command {
            command_id,
            command: cancel,
        },
    )
    .await;
    assert_eq!(recv(&mut ws).await, AgentMessage::Ack { command_id });
    reports
        .send(status_report(task, ReportedState::Succeeded))
        .await
        .unwrap();
    assert_eq!(report_id(&recv_report(&mut ws).await), 4);
    drop(ws);

    let mut ws = next_session(&mut sessions).await;
    welcome(&mut ws, 30).await;
    let resent: Vec<AgentMessage> = vec![recv_report(&mut ws).await, recv_report(&mut ws).await];
    let ids: Vec<u64> = resent.iter().map(report_id).collect();
    assert_eq!(ids, vec![2, 4], "only unanswered reports, in order");
    let AgentMessage::Status(Status { state, .. }) = &resent[0] else {
        panic!("expected a status");
    };
    assert_eq!(*state, ReportedState::Preparing);
}

/// An agent running tasks in Docker, connected to an in-test server whose
/// sessions come out of the receiver.
async fn agent_with_docker() -> (
    Arc<node_agent::executor::Context>,
    tempfile::TempDir,
    mpsc::Receiver<Ws>,
) {
    let (addr, sessions) = server().await;
    let (ctx, work) = context().await;
    tokio::spawn(
        Agent::new(config(addr, TOKEN), Arc::clone(&ctx))
            .unwrap()
            .run(),
    );
    (ctx, work, sessions)
}

#[tokio::test]
async fn a_run_task_command_runs_and_survives_a_reconnect() {
    support::base_image().await;
    let (ctx, _work, mut sessions) = agent_with_docker().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let spec = spec(&code, &env, "echo start; sleep 3; echo done");
    let command_id = protocol::command_id("run_task", spec.task_id, spec.attempt);

    let mut ws = next_session(&mut sessions).await;
    welcome(&mut ws, 30).await;
    let run = ServerMessage::Command {
        command_id,
        command: Command::RunTask(spec.clone()),
    };
    send(&mut ws, &run).await;
    assert_eq!(recv(&mut ws).await, AgentMessage::Ack { command_id });
    let mut output = String::new();
    let container = loop {
        let report = recv_report(&mut ws).await;
        answer(&mut ws, report_id(&report), None).await;
        match report {
            AgentMessage::Log(log) if log.offset == output.len() as u64 => {
                output.push_str(&log.data)
            }
            AgentMessage::Status(s) if s.state == ReportedState::Running => {
                break s.container.unwrap()
            }
            _ => {}
        }
    };
    drop(ws);

    let mut ws = next_session(&mut sessions).await;
    let hello = welcome(&mut ws, 30).await;
    assert_eq!(hello.running.len(), 1, "{hello:?}");
    assert_eq!(hello.running[0].task_id, spec.task_id);
    assert_eq!(hello.running[0].container.as_deref(), Some(&*container));
    // A resent command for the same attempt is acked and ignored.
    send(&mut ws, &run).await;
    let end = loop {
        let report = match recv(&mut ws).await {
            AgentMessage::Ack { command_id: id } => {
                assert_eq!(id, command_id);
                continue;
            }
            AgentMessage::Heartbeat { .. } => continue,
            report => report,
        };
        answer(&mut ws, report_id(&report), None).await;
        match report {
            AgentMessage::Log(log) if log.offset == output.len() as u64 => {
                output.push_str(&log.data);
            }
            AgentMessage::Status(s) if s.state != ReportedState::Running => break s,
            _ => {}
        }
    };
    assert_eq!(end.state, ReportedState::Succeeded, "{end:?}");
    assert_eq!(output, "start\ndone\n");
    // The end answered, the agent removes the container: the test waits
    // for that rather than leave it half removed.
    support::eventually("the container removed", Duration::from_secs(30), || async {
        ctx.docker()
            .inspect_container(&container, None)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    support::remove_image(ctx.docker(), &support::tag_of(&spec)).await;
}

#[tokio::test]
async fn output_past_the_servers_limit_is_not_read_and_the_end_says_so() {
    support::base_image().await;
    let (ctx, _work, mut sessions) = agent_with_docker().await;
    let mut ws = next_session(&mut sessions).await;
    let limit = 1024 * 1024;
    welcome_limiting(&mut ws, 30, Some(limit)).await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    // 64 MB, then a last line the agent does not get to.
    let line = "0123456789".repeat(6) + "abc";
    let task = spec(
        &code,
        &env,
        &format!("yes {line} | head -n 1000000; echo LAST-LINE"),
    );
    let run = ServerMessage::Command {
        command_id: protocol::command_id("run_task", task.task_id, task.attempt),
        command: Command::RunTask(task.clone()),
    };
    send(&mut ws, &run).await;
    let seen = until_final(&mut ws, task.task_id).await;
    let Some(AgentMessage::Status(end)) = seen.last() else {
        panic!("{seen:?}")
    };
    assert_eq!(end.state, ReportedState::Succeeded, "{end:?}");
    let mut text = String::new();
    for message in &seen {
        if let AgentMessage::Log(chunk) = message {
            assert_eq!(chunk.offset, text.len() as u64, "offsets without gaps");
            text.push_str(&chunk.data);
        }
    }
    let marker = node_agent::executor::past_limit_marker(limit);
    assert_eq!(marker, "\n[unidesk: output past 1.0 MiB was not read: the server keeps no more of an attempt's output]\n");
    let read = text
        .strip_suffix(marker.as_str())
        .unwrap_or_else(|| panic!("no marker at the end: {:?}", &text[text.len() - 200..]));
    // The agent stops after the chunk that crosses the limit, and sends
    // what it had read but not sent yet (less than a chunk): it read no
    // further. 64 MB would be read otherwise.
    assert!(read.len() as u64 > limit);
    assert!(
        read.len() as u64 <= limit + 2 * protocol::MAX_LOG_CHUNK_BYTES as u64,
        "{}",
        read.len()
    );
    assert!(
        read.lines().all(|l| line.starts_with(l)),
        "only whole lines, the last maybe cut"
    );
    assert!(!text.contains("LAST-LINE"));
    // The end answered, the agent removes the container.
    answer(&mut ws, report_id(&seen[seen.len() - 1]), None).await;
    support::eventually("the container removed", Duration::from_secs(30), || async {
        support::attempt_containers(&ctx, &task)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    support::remove_env_image(&ctx, &env).await;
}
