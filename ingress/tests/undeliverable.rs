//! A command that cannot fit in a frame is never left undeliverable in
//! silence: a task already in the log whose `run_task` is larger than
//! `protocol::MAX_FRAME_BYTES` (submitted before the API measured commands)
//! fails, saying why, as soon as the ingress would deliver it — whether
//! it is assigned while its node is connected or before the node connects —
//! and the node's session goes on with its other work. Real PostgreSQL,
//! real WebSockets, the agent played by a tokio-tungstenite client.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers fail the test loudly on anything unexpected"
)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use domain::spec::{TaskSpecDraft, UrlPolicy};
use domain::task::{Task, TaskState};
use futures::{SinkExt, StreamExt};
use ingress::{Config, Ingress};
use serde_json::{json, Value};
use sqlx::PgPool;
use store::Store;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(10);

struct Platform {
    store: Store,
    pool: PgPool,
    addr: SocketAddr,
}

async fn platform() -> Platform {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let ingress = Ingress::new(
        store.clone(),
        Config {
            ingress_id: "ingress-frames".into(),
            poll: Duration::from_millis(50),
            ..Config::default()
        },
    );
    let addr = support::serve_and_run(ingress).await;
    Platform {
        store,
        pool: db.pool,
        addr,
    }
}

impl Platform {
    /// Submits, straight into the log, a task with 20 environment
    /// variables of 32 KiB each: every field within its limit, the whole
    /// about 640 KiB, far more than a frame.
    async fn submit_oversized(&self) -> Uuid {
        let value = "x".repeat(domain::spec::limits::MAX_ENV_VALUE_BYTES);
        let spec = TaskSpecDraft {
            project_id: Some(Uuid::new_v4()),
            code_repo_url: Some("https://example.com/code.git".into()),
            code_commit_id: Some("a".repeat(40)),
            env_repo_url: Some("https://example.com/env.git".into()),
            env_commit_id: Some("b".repeat(40)),
            dockerfile_path: Some("Dockerfile".into()),
            command: Some(vec!["python".into(), "train.py".into()]),
            env: Some(
                (0..20)
                    .map(|i| (format!("VAR_{i:02}"), value.clone()))
                    .collect(),
            ),
            ..Default::default()
        }
        .validate(UrlPolicy::default())
        .unwrap();
        support::submit_spec(&self.store, spec).await
    }

    async fn task(&self, task_id: Uuid) -> Task {
        self.store
            .load::<Task>(&task_id.to_string())
            .await
            .unwrap()
            .unwrap()
            .state
    }

    /// Waits until the task failed; returns its reason.
    async fn failure(&self, task_id: Uuid) -> String {
        testkit::eventually("the oversized task to fail", PATIENCE, || async move {
            let task = self.task(task_id).await;
            (task.state == TaskState::Failed).then(|| task.reason.unwrap_or_default())
        })
        .await
    }

    /// Who failed the task, as the log records it.
    async fn failed_by(&self, task_id: Uuid) -> String {
        sqlx::query_scalar(
            "SELECT metadata->>'actor' FROM events \
             WHERE aggregate_id = $1 AND event_type = 'TaskFailed'",
        )
        .bind(task_id.to_string())
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}

/// The agent side of one WebSocket, speaking JSON frames.
struct Agent {
    ws: support::Ws,
}

impl Agent {
    /// Dials, says hello and waits for the welcome.
    async fn join(addr: SocketAddr, token: &str) -> Self {
        let mut agent = Agent {
            ws: support::connect(addr, token).await,
        };
        let hello = json!({"type": "hello", "protocol": protocol::VERSION,
            "agent_version": "0.1.0-test",
            "resources": {"cpus": 4.0, "memory_mb": 4096, "gpus": []},
            "labels": {}, "running": [], "cache": {"images": [], "commits": []}});
        agent
            .ws
            .send(Message::Text(hello.to_string().into()))
            .await
            .unwrap();
        let welcome = agent.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        agent
    }

    /// The next JSON frame from the server.
    async fn recv(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("the connection is open")
                .unwrap();
            match frame {
                Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The task of the next command the agent receives.
    async fn next_run_task(&mut self) -> Uuid {
        let frame = self.recv().await;
        assert_eq!(frame["type"], "command", "{frame}");
        assert_eq!(frame["command"]["kind"], "run_task", "{frame}");
        frame["command"]["task_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// The reason names the size of the command and the frame limit.
fn assert_names_size_and_limit(reason: &str) {
    assert!(
        reason.contains("cannot be delivered")
            && reason.contains(&protocol::MAX_FRAME_BYTES.to_string()),
        "{reason}"
    );
    let bytes: usize = reason
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .find(|n| *n > protocol::MAX_FRAME_BYTES)
        .unwrap_or_else(|| panic!("no size in {reason:?}"));
    assert!(bytes > 640 * 1000, "{reason}");
}

#[tokio::test]
async fn an_oversized_task_assigned_to_a_connected_node_fails_saying_why() {
    let platform = platform().await;
    let (node_id, token) = support::provision(&platform.store).await;
    let mut agent = Agent::join(platform.addr, &token).await;

    let big = platform.submit_oversized().await;
    support::assign(&platform.store, big, node_id).await;
    let reason = platform.failure(big).await;
    assert_names_size_and_limit(&reason);
    assert_eq!(platform.failed_by(big).await, "system:ingress");

    // The session goes on: the next task is delivered, and nothing of the
    // oversized one ever was.
    let next = support::submit_and_assign(&platform.store, node_id).await;
    assert_eq!(agent.next_run_task().await, next);
}

#[tokio::test]
async fn an_oversized_task_assigned_before_its_node_connects_fails_when_it_connects() {
    let platform = platform().await;
    let (node_id, token) = support::provision(&platform.store).await;
    let big = platform.submit_oversized().await;
    support::assign(&platform.store, big, node_id).await;
    assert_eq!(platform.task(big).await.state, TaskState::Assigned);

    let mut agent = Agent::join(platform.addr, &token).await;
    let reason = platform.failure(big).await;
    assert_names_size_and_limit(&reason);

    let next = support::submit_and_assign(&platform.store, node_id).await;
    assert_eq!(agent.next_run_task().await, next);
}
