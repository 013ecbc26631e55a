//! Host SSH through the ingress, against a real PostgreSQL and real
//! WebSockets, with the test playing the agent: requests reach the node's
//! live session (and a reconnecting one only while the admin's window is
//! open), results are recorded for the session's own node only, and an
//! agent without a host SSH target never gets a command.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers fail the test loudly on anything unexpected"
)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::node::{Node, NodeCommand, NodeEvent};
use futures::{SinkExt, StreamExt};
use ingress::{Config, Ingress};
use protocol::{AgentMessage, Command, Hello, HostSsh, HostSshResult, ServerMessage};
use store::Store;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use support::{admin, Ws};

/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(10);

/// How long a test listens to be sure nothing arrives.
const QUIET: Duration = Duration::from_millis(600);

/// The first id of the agent's result range.
const RESULT_ID: u64 = 1 << 63;

struct Platform {
    store: Store,
    ingress: Ingress,
    addr: SocketAddr,
}

async fn platform() -> Platform {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let ingress = Ingress::new(
        store.clone(),
        Config {
            ingress_id: "host-ssh-test".into(),
            heartbeat_s: 15,
            hello_timeout: Duration::from_millis(500),
            poll: Duration::from_millis(50),
            cancel_grace_s: 5,
        },
    );
    let addr = support::serve_and_run(ingress.clone()).await;
    Platform {
        store,
        ingress,
        addr,
    }
}

impl Platform {
    async fn provision(&self) -> (Uuid, String) {
        support::provision(&self.store).await
    }

    /// An admin's request, as the API appends it, made at `at`.
    async fn request(&self, node_id: Uuid, at: DateTime<Utc>) -> Uuid {
        let request_id = Uuid::now_v7();
        let request = NodeCommand::RequestHostSsh {
            request_id,
            command: "uptime".into(),
            timeout_s: 30,
            by: admin(),
            at,
        };
        self.store
            .execute::<Node>(&node_id.to_string(), request, &admin(), Utc::now())
            .await
            .unwrap();
        // Whatever the request asks of a session here is on its way when
        // this returns, so an agent listening for it need not guess.
        self.ingress.catch_up().await.unwrap();
        request_id
    }

    async fn node(&self, node_id: Uuid) -> Node {
        self.store
            .load::<Node>(&node_id.to_string())
            .await
            .unwrap()
            .unwrap()
            .state
    }

    /// The node's `NodeHostSshFinished` events with their actors.
    async fn finished(&self, node_id: Uuid) -> Vec<(NodeEvent, String)> {
        let rows: Vec<(serde_json::Value, serde_json::Value)> = sqlx::query_as(
            "SELECT payload, metadata FROM events WHERE aggregate_type = 'node' \
             AND aggregate_id = $1 AND event_type = 'NodeHostSshFinished' ORDER BY sequence",
        )
        .bind(node_id.to_string())
        .fetch_all(self.store.pool())
        .await
        .unwrap();
        rows.into_iter()
            .map(|(p, m)| {
                (
                    serde_json::from_value(p).unwrap(),
                    m["actor"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    async fn wait_status(&self, node_id: Uuid, status: &str) {
        testkit::eventually(&format!("node {status}"), PATIENCE, || async {
            (self.node(node_id).await.status.as_str() == status).then_some(())
        })
        .await;
    }
}

struct Agent {
    ws: Ws,
}

impl Agent {
    async fn join(addr: SocketAddr, token: &str, host_ssh: bool) -> Agent {
        let mut agent = Agent {
            ws: support::connect(addr, token).await,
        };
        let hello = Hello {
            agent_version: "0.1.0-test".into(),
            host_ssh,
            ..Hello::default()
        };
        agent.send(&AgentMessage::Hello(hello)).await;
        match agent.next(PATIENCE).await {
            Some(ServerMessage::Welcome { .. }) => agent,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    async fn send(&mut self, message: &AgentMessage) {
        self.ws
            .send(Message::Text(protocol::encode(message).into()))
            .await
            .unwrap();
    }

    async fn next(&mut self, within: Duration) -> Option<ServerMessage> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Some(protocol::decode(text.as_str()).unwrap())
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(other) => panic!("the session ended: {other:?}"),
            }
        }
    }

    /// Every host command that arrives until the line goes quiet.
    async fn host_commands(&mut self) -> Vec<HostSsh> {
        let mut out = Vec::new();
        while let Some(message) = self.next(QUIET).await {
            match message {
                ServerMessage::Command {
                    command_id,
                    command: Command::HostSsh(h),
                } => {
                    assert_eq!(command_id, protocol::host_ssh_command_id(h.request_id));
                    out.push(h);
                }
                other => panic!("expected host commands only, got {other:?}"),
            }
        }
        out
    }

    /// Sends a result and returns the server's answer.
    async fn result(&mut self, id: u64, request_id: Uuid) -> Option<String> {
        let result = HostSshResult {
            id,
            request_id,
            exit_code: Some(0),
            output: "up 3 days\n".into(),
            truncated: false,
            timed_out: false,
            duration_ms: 25,
            error: None,
        };
        self.send(&AgentMessage::HostSshResult(result)).await;
        match self.next(PATIENCE).await {
            Some(ServerMessage::Received { id: got, error }) => {
                assert_eq!(got, id);
                error
            }
            other => panic!("expected received, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_host_command_reaches_the_agent_and_its_result_is_recorded_once() {
    let p = platform().await;
    let (node, token) = p.provision().await;
    let mut agent = Agent::join(p.addr, &token, true).await;
    let request_id = p.request(node, Utc::now()).await;
    let sent = agent.host_commands().await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].request_id, request_id);
    assert_eq!(sent[0].command, "uptime");
    assert!((28..=30).contains(&sent[0].timeout_s), "{sent:?}");
    assert_eq!(sent[0].output_limit, 64 * 1024);

    assert_eq!(agent.result(RESULT_ID, request_id).await, None);
    let finished = p.finished(node).await;
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].1, format!("node:{node}"));
    let NodeEvent::HostSshFinished { result, .. } = &finished[0].0 else {
        panic!("{finished:?}")
    };
    assert_eq!(result.output, "up 3 days\n");
    assert_eq!(result.exit_code, Some(0));

    // The same answer again, and one for a request that never was, are
    // refused for good, and the session lives on.
    let again = agent.result(RESULT_ID + 1, request_id).await;
    assert!(again.unwrap().contains("not waiting"));
    let unknown = agent.result(RESULT_ID + 2, Uuid::now_v7()).await;
    assert!(unknown.is_some());
    assert_eq!(p.finished(node).await.len(), 1);
}

#[tokio::test]
async fn a_node_cannot_finish_another_nodes_request() {
    let p = platform().await;
    let (a, a_token) = p.provision().await;
    let (_b, b_token) = p.provision().await;
    let mut agent_a = Agent::join(p.addr, &a_token, true).await;
    let mut agent_b = Agent::join(p.addr, &b_token, true).await;
    let request_id = p.request(a, Utc::now()).await;
    assert_eq!(agent_a.host_commands().await.len(), 1);
    assert!(agent_b.host_commands().await.is_empty());
    let refused = agent_b.result(RESULT_ID, request_id).await;
    assert!(refused.is_some(), "node b finished node a's request");
    assert!(p.node(a).await.host_ssh.contains_key(&request_id));
    assert!(p.finished(a).await.is_empty());
}

#[tokio::test]
async fn a_reconnecting_agent_gets_open_requests_only_while_the_admin_still_waits() {
    let p = platform().await;
    let (node, token) = p.provision().await;
    let mut agent = Agent::join(p.addr, &token, true).await;
    // One whose window (30 s limit + 5 s) closed already is never sent …
    let stale = p
        .request(node, Utc::now() - chrono::Duration::seconds(40))
        .await;
    // … one with 20 s of it left is sent with the time that is left.
    let late = p
        .request(node, Utc::now() - chrono::Duration::seconds(15))
        .await;
    let fresh = p.request(node, Utc::now()).await;
    let sent = agent.host_commands().await;
    let ids: Vec<Uuid> = sent.iter().map(|h| h.request_id).collect();
    assert_eq!(ids, [late, fresh]);
    assert!((18..=20).contains(&sent[0].timeout_s), "{sent:?}");

    // The agent goes away without answering and comes back: what the
    // admin still waits for is sent again, under the same ids.
    drop(agent);
    p.wait_status(node, "offline").await;
    let mut agent = Agent::join(p.addr, &token, true).await;
    let again: Vec<Uuid> = agent
        .host_commands()
        .await
        .iter()
        .map(|h| h.request_id)
        .collect();
    assert_eq!(again, [late, fresh]);
    assert!(!again.contains(&stale));
}

#[tokio::test]
async fn an_agent_without_a_host_ssh_target_gets_no_command_and_the_request_ends() {
    let p = platform().await;
    let (node, token) = p.provision().await;
    let mut agent = Agent::join(p.addr, &token, false).await;
    let request_id = p.request(node, Utc::now()).await;
    assert!(agent.host_commands().await.is_empty());
    let finished = testkit::eventually("the request to finish", PATIENCE, || async {
        let finished = p.finished(node).await;
        (!finished.is_empty()).then_some(finished)
    })
    .await;
    let NodeEvent::HostSshFinished {
        request_id: r,
        result,
        ..
    } = &finished[0].0
    else {
        panic!("{finished:?}")
    };
    assert_eq!(*r, request_id);
    assert_eq!(
        result.error.as_deref(),
        Some("this node has no host SSH target configured; start the agent with --host-ssh")
    );
    assert_eq!(finished[0].1, "system:ingress");
}
