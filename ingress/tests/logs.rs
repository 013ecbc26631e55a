//! Task output through the ingress, against a real PostgreSQL and real
//! WebSockets: agents played by a tokio-tungstenite client speaking the
//! protocol. What is checked is what ends up in `task_log` and what the
//! agent is told: each byte once, no gaps, the cap and its marker, the
//! rate bound and the wake-ups for followers.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers fail the test loudly on anything unexpected"
)]

mod support;

use testkit::agent::JsonAgent;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ingress::{Config, Ingress, LogLimits};
use serde_json::json;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use store::Store;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(10);

struct Platform {
    store: Store,
    pool: PgPool,
    addr: SocketAddr,
}

/// A fresh database and an ingress on port 0 with these log bounds.
async fn platform(limits: LogLimits) -> Platform {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let ingress = Ingress::new(
        store.clone(),
        Config {
            ingress_id: "ingress-logs".into(),
            poll: Duration::from_millis(50),
            ..Config::default()
        },
    )
    .with_log_limits(limits);
    let addr = support::serve_and_run(ingress).await;
    Platform {
        store,
        pool: db.pool,
        addr,
    }
}

impl Platform {
    /// A node, its token, and a task whose first attempt is placed on it.
    async fn node_with_task(&self) -> (String, Uuid) {
        let (node_id, token) = support::provision(&self.store).await;
        let task_id = support::submit_and_assign(&self.store, node_id).await;
        (token, task_id)
    }

    async fn rows(&self, task_id: Uuid) -> Vec<(i64, String)> {
        sqlx::query_as(
            "SELECT \"offset\", data FROM task_log WHERE task_id = $1 AND attempt = 1 \
             ORDER BY \"offset\"",
        )
        .bind(task_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    async fn output(&self, task_id: Uuid) -> String {
        self.rows(task_id).await.into_iter().map(|r| r.1).collect()
    }
}

/// The agent side of one WebSocket, speaking JSON frames.
struct Agent(JsonAgent);

impl std::ops::Deref for Agent {
    type Target = JsonAgent;
    fn deref(&self) -> &JsonAgent {
        &self.0
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut JsonAgent {
        &mut self.0
    }
}

impl Agent {
    /// Dials, says hello and waits for the welcome.
    async fn join(addr: SocketAddr, token: &str) -> Self {
        Agent(JsonAgent::join(addr, token, json!([])).await)
    }

    async fn log(&mut self, id: u64, task_id: Uuid, offset: u64, data: &str) -> Option<String> {
        self.send(
            json!({"type": "log", "id": id, "task_id": task_id, "attempt": 1,
                         "offset": offset, "data": data}),
        )
        .await;
        self.received(id).await
    }

    async fn status(&mut self, id: u64, task_id: Uuid, state: &str) -> Option<String> {
        self.send(
            json!({"type": "status", "id": id, "task_id": task_id, "attempt": 1,
                         "state": state, "container": "c0ffee"}),
        )
        .await;
        self.received(id).await
    }

    async fn close(self) {
        self.0.close().await;
    }
}

#[tokio::test]
async fn a_chunk_sent_again_after_a_reconnect_is_stored_once() {
    let p = platform(LogLimits::default()).await;
    let (token, task_id) = p.node_with_task().await;
    let mut agent = Agent::join(p.addr, &token).await;
    assert_eq!(agent.log(1, task_id, 0, "one\n").await, None);
    assert_eq!(agent.log(2, task_id, 4, "two\n").await, None);
    // The connection drops before the agent hears about the next chunk.
    agent
        .send(
            json!({"type": "log", "id": 3, "task_id": task_id, "attempt": 1,
                     "offset": 8, "data": "three\n"}),
        )
        .await;
    agent.close().await;

    // Back again, it sends everything unanswered, then goes on.
    let mut agent = Agent::join(p.addr, &token).await;
    assert_eq!(agent.log(3, task_id, 8, "three\n").await, None);
    assert_eq!(agent.log(4, task_id, 14, "four\n").await, None);
    // Even an answered chunk sent again changes nothing.
    assert_eq!(agent.log(1, task_id, 0, "one\n").await, None);
    assert_eq!(agent.log(2, task_id, 4, "two\n").await, None);
    assert_eq!(agent.log(5, task_id, 19, "five\n").await, None);
    assert_eq!(
        p.rows(task_id).await,
        [
            (0, "one\n".to_string()),
            (4, "two\n".to_string()),
            (8, "three\n".to_string()),
            (14, "four\n".to_string()),
            (19, "five\n".to_string()),
        ]
    );
}

#[tokio::test]
async fn output_read_again_in_larger_chunks_after_a_restart_adds_only_what_is_new() {
    let p = platform(LogLimits::default()).await;
    let (token, task_id) = p.node_with_task().await;
    let agent = {
        let mut agent = Agent::join(p.addr, &token).await;
        assert_eq!(agent.log(1, task_id, 0, "start\n").await, None);
        assert_eq!(agent.log(2, task_id, 6, "two\n").await, None);
        agent
    };
    agent.close().await;
    // The agent restarted and adopted its container: it reads the output
    // from the start, and what was printed while no agent ran arrives in
    // the same chunk as what the server has. Its first chunk starts where
    // the first stored one does and reaches past the stored end.
    let mut agent = Agent::join(p.addr, &token).await;
    assert_eq!(agent.log(1, task_id, 0, "start\ntwo\nthree\n").await, None);
    assert_eq!(agent.log(2, task_id, 16, "four\n").await, None);
    // The same from a later stored chunk's start.
    assert_eq!(
        agent.log(3, task_id, 6, "two\nthree\nfour\nfive\n").await,
        None
    );
    // A resend within what is stored adds nothing.
    assert_eq!(agent.log(4, task_id, 0, "start\n").await, None);
    assert_eq!(agent.log(5, task_id, 6, "two\nth").await, None);
    assert_eq!(p.output(task_id).await, "start\ntwo\nthree\nfour\nfive\n");
    assert_eq!(
        p.rows(task_id).await.last(),
        Some(&(21, "five\n".to_string()))
    );
}

#[tokio::test]
async fn chunks_that_would_leave_a_gap_are_refused_and_overlaps_keep_only_their_new_part() {
    let p = platform(LogLimits::default()).await;
    let (token, task_id) = p.node_with_task().await;
    let mut agent = Agent::join(p.addr, &token).await;
    let gap = agent.log(1, task_id, 5, "late").await.unwrap();
    assert!(gap.contains("continues at offset 0"), "{gap}");
    assert_eq!(agent.log(2, task_id, 0, "hello ").await, None);
    // Output read again (an agent that adopted its container after a
    // restart) overlaps what is stored: only what is new is kept.
    assert_eq!(agent.log(3, task_id, 3, "lo world").await, None);
    assert_eq!(agent.log(4, task_id, 0, "hel").await, None);
    let gap = agent.log(5, task_id, 20, "x").await.unwrap();
    assert!(gap.contains("continues at offset 11"), "{gap}");
    assert_eq!(agent.log(6, task_id, 11, "\n").await, None);
    assert_eq!(p.output(task_id).await, "hello world\n");
    assert_eq!(
        store::task_log::stored_end(&p.pool, task_id, 1)
            .await
            .unwrap(),
        Some(12)
    );
}

#[tokio::test]
async fn output_past_the_cap_is_cut_with_a_marker_and_later_chunks_are_acknowledged_but_dropped() {
    let cap = 1000;
    let p = platform(LogLimits {
        max_bytes_per_attempt: cap,
        ..LogLimits::default()
    })
    .await;
    let (token, task_id) = p.node_with_task().await;
    let mut agent = Agent::join(p.addr, &token).await;
    let line = "x".repeat(299) + "\n";
    let mut offset = 0;
    for id in 1..=10 {
        // Every chunk is acknowledged, so the agent forgets it.
        assert_eq!(agent.log(id, task_id, offset, &line).await, None);
        offset += line.len() as u64;
    }
    // The chunk that crossed the cap, sent again, changes nothing.
    assert_eq!(agent.log(4, task_id, 900, &line).await, None);
    let marker = ingress::cut_marker(cap);
    assert!(marker.contains("output cut at 1000 bytes"), "{marker}");
    let output = p.output(task_id).await;
    assert_eq!(output.len(), cap as usize + marker.len());
    assert_eq!(output, line.repeat(4)[..cap as usize].to_string() + &marker);
    // Readers find one chain that ends with the marker.
    let rows = p.rows(task_id).await;
    assert_eq!(rows.len(), 4);
    assert_eq!(
        store::task_log::stored_end(&p.pool, task_id, 1)
            .await
            .unwrap(),
        Some(cap + marker.len() as u64)
    );
    // The attempt still ends normally.
    assert_eq!(agent.status(11, task_id, "accepted").await, None);
    assert_eq!(agent.status(12, task_id, "running").await, None);
    assert_eq!(agent.status(13, task_id, "succeeded").await, None);
}

#[tokio::test]
async fn output_reaching_the_cap_exactly_gets_the_marker_with_the_next_chunk() {
    let p = platform(LogLimits {
        max_bytes_per_attempt: 10,
        ..LogLimits::default()
    })
    .await;
    let (token, task_id) = p.node_with_task().await;
    let mut agent = Agent::join(p.addr, &token).await;
    assert_eq!(agent.log(1, task_id, 0, "0123456789").await, None);
    assert_eq!(p.output(task_id).await, "0123456789");
    assert_eq!(agent.log(2, task_id, 10, "more").await, None);
    assert_eq!(agent.log(3, task_id, 14, "and more").await, None);
    assert_eq!(
        p.output(task_id).await,
        format!("0123456789{}", ingress::cut_marker(10))
    );
}

#[tokio::test]
async fn a_chatty_session_is_slowed_down_to_its_rate() {
    let p = platform(LogLimits {
        max_bytes_per_attempt: 64 * 1024 * 1024,
        bytes_per_s: 200_000,
        burst_bytes: 20_000,
    })
    .await;
    let (token, task_id) = p.node_with_task().await;
    let mut agent = Agent::join(p.addr, &token).await;
    let chunk = "y".repeat(9_999) + "\n";
    let started = Instant::now();
    for i in 0..20u64 {
        assert_eq!(agent.log(i + 1, task_id, i * 10_000, &chunk).await, None);
    }
    let took = started.elapsed();
    // 20 chunks cost 20 × (10,000 + 4,096) bytes; the burst pays 20,000.
    let owed = (20 * (10_000 + ingress::CHUNK_COST) - 20_000) as f64 / 200_000.0;
    assert!(
        took.as_secs_f64() >= owed * 0.9,
        "took {took:?}, expected at least {owed} s"
    );
    assert_eq!(p.output(task_id).await, chunk.repeat(20));
}

#[tokio::test]
async fn followers_are_woken_when_output_is_stored_and_when_the_attempt_ends() {
    let p = platform(LogLimits::default()).await;
    let (token, task_id) = p.node_with_task().await;
    let mut listener = PgListener::connect_with(&p.pool).await.unwrap();
    listener.listen(store::task_log::CHANNEL).await.unwrap();
    let mut agent = Agent::join(p.addr, &token).await;
    assert_eq!(agent.status(1, task_id, "accepted").await, None);
    assert_eq!(agent.status(2, task_id, "running").await, None);
    assert_eq!(agent.log(3, task_id, 0, "hello\n").await, None);
    assert_eq!(notified(&mut listener).await, task_id.to_string());
    assert_eq!(agent.status(4, task_id, "succeeded").await, None);
    assert_eq!(notified(&mut listener).await, task_id.to_string());
}

async fn notified(listener: &mut PgListener) -> String {
    tokio::time::timeout(PATIENCE, listener.recv())
        .await
        .expect("a notification in time")
        .unwrap()
        .payload()
        .to_string()
}

/// A node's commands go out while a frame of that node is still being
/// stored: a node streaming output (or a database slow to store it) never
/// keeps its next `run_task` waiting, and the frame is still answered and
/// stored once.
#[tokio::test]
async fn commands_go_out_while_the_nodes_own_frame_is_being_stored() {
    let p = platform(LogLimits::default()).await;
    let (node_id, token) = support::provision(&p.store).await;
    let first = support::submit_and_assign(&p.store, node_id).await;
    let mut agent = Agent::join(p.addr, &token).await;
    let run_task = |frame: &serde_json::Value| {
        (frame["type"] == "command" && frame["command"]["kind"] == "run_task").then(|| {
            frame["command"]["task_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
    };

    // Storing output waits for the table, held by another transaction.
    let mut blocker = p.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE task_log IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    agent
        .send(
            json!({"type": "log", "id": 1, "task_id": first, "attempt": 1,
                     "offset": 0, "data": "one\n"}),
        )
        .await;
    let pool = p.pool.clone();
    testkit::eventually("the chunk's insert to wait for the lock", PATIENCE, || {
        let pool = pool.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks \
                 WHERE relation = 'task_log'::regclass AND NOT granted",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        }
    })
    .await;

    let second = support::submit_and_assign(&p.store, node_id).await;
    loop {
        // The first task's `run_task` may come again (agents ignore it).
        let frame = agent.recv().await;
        if run_task(&frame) == Some(first.to_string()) {
            continue;
        }
        assert_eq!(
            run_task(&frame),
            Some(second.to_string()),
            "the next task's run_task comes while the chunk waits: {frame}"
        );
        break;
    }

    blocker.commit().await.unwrap();
    assert_eq!(agent.received(1).await, None);
    assert_eq!(p.output(first).await, "one\n");
}
