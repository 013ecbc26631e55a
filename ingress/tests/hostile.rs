//! A hostile agent against the ingress, a real PostgreSQL and real
//! WebSockets: every text it sends carries NUL, newlines, escape sequences
//! or a whole frame of one string, every list is too long, and it connects
//! 200 times at once. What an operator checks afterwards: the node can
//! connect and is shown as it is, events stay small, the server's log has
//! no line the agent wrote, a report that can never be stored is refused
//! for good (and said so on the task's timeline) while the next one goes
//! through, and a storm of connects appends a handful of events.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers fail the test loudly on anything unexpected"
)]

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use domain::node::{Node, NodeStatus};
use domain::task::{Task, TaskState};
use futures::{SinkExt, StreamExt};
use ingress::{Config, ConnectLimits, Ingress, NOTICE_BURST};
use protocol::{
    AgentMessage, Cache, Gpu, Hello, LogChunk, ReportedState, Resources, RunningAttempt,
    ServerMessage, Status,
};
use sqlx::PgPool;
use store::Store;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use support::Ws;

/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(15);

/// The largest payload an event may have when the node's hello is an
/// ordinary one, whatever else it sends (the largest hello allowed makes a
/// `NodeConnected` under 32 KiB).
const SMALL_EVENT: i64 = 4 * 1024;

// ---------------------------------------------------------------- logs

/// Everything the ingress logs in this test binary, as the server's
/// default text format writes it to a file (no colours).
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        tracing_subscriber::fmt()
            .with_env_filter("info,sqlx=warn")
            .with_ansi(false)
            .with_writer(move || Sink(Arc::clone(&sink)))
            .init();
        buffer
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

/// Text an agent puts in a field to forge a log line of its own.
fn forged(marker: &str) -> String {
    format!("\n1999-01-01T00:00:00.000000Z ERROR ingress: {marker} \u{1b}[2J")
}

/// Every line of the server's log is its own: each starts with the
/// server's timestamp, none with the forger's, none holds an escape or
/// NUL, and none is longer than a few KiB.
fn assert_log_is_the_servers_own() {
    let text = log_text();
    for line in text.lines() {
        assert!(
            line.starts_with("20") && line.as_bytes().get(4) == Some(&b'-'),
            "a log line the server did not start: {:?}",
            &line[..line.len().min(200)]
        );
        assert!(!line.starts_with("1999-"), "forged: {line}");
        assert!(!line.contains(['\u{1b}', '\0']), "raw control in {line:?}");
        assert!(line.len() < 4096, "a log line of {} bytes", line.len());
    }
}

// ---------------------------------------------------------------- platform

struct Platform {
    store: Store,
    pool: PgPool,
    ingress: Ingress,
    addr: SocketAddr,
}

async fn platform() -> Platform {
    platform_with(ConnectLimits::default()).await
}

async fn platform_with(limits: ConnectLimits) -> Platform {
    logs();
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let ingress = Ingress::new(
        store.clone(),
        Config {
            ingress_id: "ingress-hostile".into(),
            heartbeat_s: 15,
            hello_timeout: Duration::from_secs(5),
            poll: Duration::from_millis(50),
            cancel_grace_s: 7,
        },
    )
    .with_connect_limits(limits);
    let addr = support::serve_and_run(ingress.clone()).await;
    Platform {
        store,
        pool: db.pool,
        ingress,
        addr,
    }
}

impl Platform {
    async fn node(&self, node_id: Uuid) -> Node {
        self.store
            .load::<Node>(&node_id.to_string())
            .await
            .unwrap()
            .unwrap()
            .state
    }

    async fn task(&self, task_id: Uuid) -> Task {
        self.store
            .load::<Task>(&task_id.to_string())
            .await
            .unwrap()
            .unwrap()
            .state
    }

    async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// The event types of one aggregate, in order.
    async fn events_of(&self, id: Uuid) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// The largest stored payload of one aggregate's events, in bytes.
    async fn largest_event(&self, id: Uuid) -> i64 {
        sqlx::query_scalar(
            "SELECT coalesce(max(octet_length(payload::text)), 0)::bigint FROM events \
             WHERE aggregate_id = $1",
        )
        .bind(id.to_string())
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    async fn wait_for(&self, id: Uuid, event_type: &str) {
        testkit::eventually(event_type, PATIENCE, || async {
            self.events_of(id)
                .await
                .iter()
                .any(|t| t == event_type)
                .then_some(())
        })
        .await;
    }
}

// ---------------------------------------------------------------- agent

struct Agent {
    ws: Ws,
}

fn hello() -> Hello {
    Hello {
        agent_version: "0.1.0-test".into(),
        resources: Resources {
            cpus: 8.0,
            memory_mb: 16384,
            gpus: vec![],
        },
        labels: [("os".to_string(), "linux".to_string())].into(),
        running: vec![],
        cache: Cache::default(),
        host_ssh: false,
    }
}

impl Agent {
    async fn dial(addr: SocketAddr, token: &str) -> Self {
        Self {
            ws: support::connect(addr, token).await,
        }
    }

    /// Dials, says `hello` and returns the first answer.
    async fn hello(addr: SocketAddr, token: &str, hello: Hello) -> (Self, Option<ServerMessage>) {
        let mut agent = Self::dial(addr, token).await;
        agent.send(&AgentMessage::Hello(hello)).await;
        let first = agent.recv().await;
        (agent, first)
    }

    /// Dials and must be welcomed.
    async fn join(addr: SocketAddr, token: &str) -> Self {
        match Self::hello(addr, token, hello()).await {
            (agent, Some(ServerMessage::Welcome { .. })) => agent,
            (_, other) => panic!("expected welcome, got {other:?}"),
        }
    }

    async fn send(&mut self, message: &AgentMessage) {
        self.send_raw(Message::Text(protocol::encode(message).into()))
            .await;
    }

    async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// The next message; `None` once the server closed the connection.
    async fn recv(&mut self) -> Option<ServerMessage> {
        loop {
            let frame = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("the server answered in time");
            match frame {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(Message::Text(text))) => {
                    return Some(protocol::decode(text.as_str()).unwrap())
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// The next message that is not a command.
    async fn answer(&mut self) -> Option<ServerMessage> {
        loop {
            match self.recv().await {
                Some(ServerMessage::Command { .. }) => {}
                other => return other,
            }
        }
    }

    /// The server must send `error{code}` and close; returns its message.
    async fn refused(&mut self, code: &str) -> String {
        let message = match self.answer().await {
            Some(ServerMessage::Error { code: got, message }) if got == code => message,
            other => panic!("expected error {code}, got {other:?}"),
        };
        assert!(self.recv().await.is_none(), "the session stayed open");
        message
    }

    /// Sends a report; returns the server's `received` error.
    async fn report(&mut self, status: Status) -> Option<String> {
        let id = status.id;
        self.send(&AgentMessage::Status(status)).await;
        self.received(id).await
    }

    async fn log(&mut self, chunk: LogChunk) -> Option<String> {
        let id = chunk.id;
        self.send(&AgentMessage::Log(chunk)).await;
        self.received(id).await
    }

    async fn received(&mut self, id: u64) -> Option<String> {
        match self.answer().await {
            Some(ServerMessage::Received { id: got, error }) => {
                assert_eq!(got, id);
                error
            }
            other => panic!("expected received {id}, got {other:?}"),
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

fn running(id: u64, task_id: Uuid, container: &str) -> Status {
    Status {
        container: Some(container.into()),
        ..status(id, task_id, ReportedState::Running)
    }
}

fn storable(text: &str) -> bool {
    !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn a_hello_full_of_control_characters_connects_and_the_node_is_shown_cleaned() {
    let p = platform().await;
    let (node_id, token) = support::provision(&p.store).await;
    let marker = format!("FORGED-{}", Uuid::new_v4().simple());
    let mut h = hello();
    h.agent_version = format!("1.0\0{}", forged(&marker))
        .chars()
        .take(100)
        .collect();
    h.resources.gpus = (0..8)
        .map(|index| Gpu {
            index,
            name: format!("A100\0{}{}", forged(&marker), "x".repeat(2000)),
            memory_mb: 81920,
        })
        .collect();
    h.cache = Cache {
        images: vec![
            "unidesk-env:abc".into(),
            "bad\0image".into(),
            forged(&marker),
        ],
        commits: (0..2000).map(|i| format!("{i:040x}")).collect(),
    };
    h.running = vec![RunningAttempt {
        task_id: Uuid::now_v7(),
        attempt: 1,
        container: Some(format!("c\0{}", "x".repeat(50_000))),
    }];
    let (_agent, first) = Agent::hello(p.addr, &token, h).await;
    assert!(
        matches!(first, Some(ServerMessage::Welcome { .. })),
        "{first:?}"
    );

    let node = p.node(node_id).await;
    assert_eq!(node.status, NodeStatus::Online);
    let version = node.agent_version.unwrap();
    assert!(version.starts_with("1.0\u{fffd}"), "{version:?}");
    assert!(storable(&version) && !version.contains('\n'), "{version:?}");
    let gpus = node.declared_resources.unwrap().gpus;
    assert_eq!(gpus.len(), 8);
    for gpu in &gpus {
        assert!(gpu.name.starts_with("A100\u{fffd}"), "{:?}", gpu.name);
        assert!(storable(&gpu.name) && !gpu.name.contains('\n'));
        assert!(gpu.name.len() <= protocol::bounds::MAX_GPU_NAME_BYTES);
    }
    let (images, commits): (Vec<String>, i32) =
        sqlx::query_as("SELECT images, cardinality(commits) FROM node_cache WHERE node_id = $1")
            .bind(node_id)
            .fetch_one(&p.pool)
            .await
            .unwrap();
    assert_eq!(images, ["unidesk-env:abc"]);
    assert_eq!(commits as usize, protocol::bounds::MAX_CACHE_ENTRIES);
    assert!(p.largest_event(node_id).await < SMALL_EVENT);
    assert_log_is_the_servers_own();
}

#[tokio::test]
async fn hostile_frames_leave_small_events_an_offline_node_and_no_forged_log_line() {
    let p = platform().await;
    let marker = format!("FORGED-{}", Uuid::new_v4().simple());
    let huge_type = format!(
        r#"{{"protocol":1,"type":{}}}"#,
        serde_json::to_string(&format!(
            "{}{}",
            forged(&marker),
            "y".repeat(protocol::MAX_FRAME_BYTES - 200)
        ))
        .unwrap()
    );
    assert!(huge_type.len() <= protocol::MAX_FRAME_BYTES);
    let nul_type = r#"{"protocol":1,"type":"launch\u0000missiles"}"#.to_string();
    let huge_value = format!(
        r#"{{"protocol":1,"type":"heartbeat","seq":{}}}"#,
        serde_json::to_string(&format!("{}{}", forged(&marker), "z".repeat(200_000))).unwrap()
    );
    let cases = [
        ("unknown_type", Message::Text(huge_type.into())),
        ("unknown_type", Message::Text(nul_type.into())),
        ("bad_frame", Message::Text(huge_value.into())),
        (
            "bad_frame",
            Message::Binary(vec![0, 0xff, 0xfe, b'\n'].into()),
        ),
    ];
    for (code, frame) in cases {
        let (node_id, token) = support::provision(&p.store).await;
        let mut agent = Agent::join(p.addr, &token).await;
        agent.send_raw(frame).await;
        let message = agent.refused(code).await;
        assert!(
            message.len() <= protocol::bounds::MAX_REASON_BYTES,
            "{code}"
        );
        assert!(storable(&message) && !message.contains('\n'), "{message:?}");
        // The node is shown as it is: gone.
        p.wait_for(node_id, "NodeDisconnected").await;
        assert_eq!(p.node(node_id).await.status, NodeStatus::Offline, "{code}");
        let largest = p.largest_event(node_id).await;
        assert!(largest < SMALL_EVENT, "{code}: an event of {largest} bytes");
    }
    let text = log_text();
    assert!(
        text.contains(&marker),
        "the agent's text was never logged, quoted or not"
    );
    assert_log_is_the_servers_own();
}

#[tokio::test]
async fn a_hello_listing_too_much_is_refused_naming_the_field_and_appends_nothing() {
    let p = platform().await;
    let (node_id, token) = support::provision(&p.store).await;
    let before = p.event_count().await;
    let gpus = |n: u32| {
        (0..n)
            .map(|index| Gpu {
                index,
                name: "NVIDIA A100-SXM4-80GB".into(),
                memory_mb: 81920,
            })
            .collect()
    };
    let mut many_gpus = hello();
    many_gpus.resources.gpus = gpus(878);
    let mut many_running = hello();
    many_running.running = (0..1024)
        .map(|_| RunningAttempt {
            task_id: Uuid::now_v7(),
            attempt: 1,
            container: Some("c".into()),
        })
        .collect();
    let mut many_labels = hello();
    many_labels.labels = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
    let mut nul_label = hello();
    nul_label.labels = [("zone".to_string(), "lab\0".to_string())].into();
    let mut long_version = hello();
    long_version.agent_version = "v".repeat(100_000);
    for (field, h) in [
        ("resources.gpus", many_gpus),
        ("running", many_running),
        ("labels", many_labels),
        ("labels.zone", nul_label),
        ("agent_version", long_version),
    ] {
        let (mut agent, first) = Agent::hello(p.addr, &token, h).await;
        // The first answer is the refusal: not one cancel_task before it.
        match first {
            Some(ServerMessage::Error { code, message }) => {
                assert_eq!(code, "bad_frame", "{field}");
                assert!(message.starts_with(field), "{field}: {message}");
                assert!(storable(&message) && message.len() < 512, "{message:?}");
            }
            other => panic!("{field}: expected a refusal, got {other:?}"),
        }
        assert!(agent.recv().await.is_none(), "{field}: still open");
    }
    assert_eq!(p.event_count().await, before);
    // The largest hello that is allowed connects, and stays small enough.
    let mut largest = hello();
    largest.resources.gpus = gpus(protocol::bounds::MAX_GPUS as u32);
    for gpu in &mut largest.resources.gpus {
        gpu.name = "g".repeat(2_500);
    }
    largest.labels = (0..protocol::bounds::MAX_LABELS)
        .map(|i| (format!("{i:0>63}"), "v".repeat(63)))
        .collect();
    let (_agent, first) = Agent::hello(p.addr, &token, largest).await;
    assert!(
        matches!(first, Some(ServerMessage::Welcome { .. })),
        "{first:?}"
    );
    let connected = p.largest_event(node_id).await;
    assert!(connected < 32 * 1024, "NodeConnected of {connected} bytes");
}

#[tokio::test]
async fn a_report_that_can_never_be_stored_is_refused_for_good_and_the_next_goes_through() {
    let p = platform().await;
    let (node_id, token) = support::provision(&p.store).await;
    let mut agent = Agent::join(p.addr, &token).await;
    let task_id = support::submit_and_assign(&p.store, node_id).await;
    assert_eq!(
        agent
            .report(status(1, task_id, ReportedState::Accepted))
            .await,
        None
    );

    // A container id with NUL and a newline: refused for good, naming the
    // field, and the same report again is refused again.
    let marker = format!("FORGED-{}", Uuid::new_v4().simple());
    let bad = running(2, task_id, &format!("c1\0{}", forged(&marker)));
    let error = agent.report(bad.clone()).await.expect("refused");
    assert!(error.starts_with("container:"), "{error}");
    assert!(agent.report(bad).await.is_some());
    // The timeline says so, once.
    let refused: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_id = $1 AND event_type = 'TaskReportRefused'",
    )
    .bind(task_id.to_string())
    .fetch_all(&p.pool)
    .await
    .unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    let body = &refused[0]["ReportRefused"];
    assert_eq!(body["report"], 2);
    assert_eq!(body["state"], "running");
    assert!(body["reason"].as_str().unwrap().starts_with("container:"));
    assert!(!refused[0].to_string().contains(&marker));

    // The next report goes through on the same session.
    assert_eq!(agent.report(running(3, task_id, "c1")).await, None);
    assert_eq!(p.task(task_id).await.state, TaskState::Running);

    // Output with NUL, escapes and carriage returns is stored at its
    // length, so the next chunk still continues it.
    let first = "step 1\0\u{1b}[31mred\u{1b}[0m 50%\r100%\r\n";
    let chunk = |id, offset, data: &str| LogChunk {
        id,
        task_id,
        attempt: 1,
        offset,
        data: data.into(),
    };
    assert_eq!(agent.log(chunk(4, 0, first)).await, None);
    assert_eq!(
        agent.log(chunk(5, first.len() as u64, "done\n")).await,
        None
    );
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT data FROM task_log WHERE task_id = $1 ORDER BY \"offset\"")
            .bind(task_id)
            .fetch_all(&p.pool)
            .await
            .unwrap();
    let stored = stored.concat();
    assert_eq!(stored.len(), first.len() + "done\n".len());
    assert!(storable(&stored), "{stored:?}");
    assert!(stored.starts_with("step 1 ") && stored.ends_with("done\n"));

    // A report the database itself refuses (here a rule the database holds
    // on every event): refused for good, not retried, said on the timeline
    // without the report's own text.
    sqlx::query(
        "ALTER TABLE events ADD CONSTRAINT no_poison \
         CHECK (position('poison-pill' in payload::text) = 0)",
    )
    .execute(&p.pool)
    .await
    .unwrap();
    let mut poisoned = status(6, task_id, ReportedState::Failed);
    poisoned.message = Some("poison-pill".into());
    let error = agent.report(poisoned).await.expect("refused");
    assert!(error.contains("SQLSTATE 23514"), "{error}");
    let refused = p
        .events_of(task_id)
        .await
        .iter()
        .filter(|t| *t == "TaskReportRefused")
        .count();
    assert_eq!(refused, 2);

    // A failure message with NUL and escapes is stored, cleaned.
    let mut failed = status(7, task_id, ReportedState::Failed);
    failed.exit_code = Some(137);
    failed.message = Some(format!(
        "out of memory\0\u{1b}[31m{}\nkilled",
        forged(&marker)
    ));
    assert_eq!(agent.report(failed).await, None);
    let task = p.task(task_id).await;
    assert_eq!(task.state, TaskState::Failed);
    let reason = task.reason.unwrap();
    assert!(reason.starts_with("out of memory\u{fffd}"), "{reason:?}");
    assert!(
        storable(&reason) && reason.ends_with("\nkilled"),
        "{reason:?}"
    );

    // All on one session: the node never left.
    agent.send(&AgentMessage::Heartbeat { seq: 1 }).await;
    assert!(!p
        .events_of(node_id)
        .await
        .contains(&"NodeDisconnected".to_string()));
    assert_eq!(p.ingress.connected(), 1);
    assert_log_is_the_servers_own();
}

#[tokio::test]
async fn a_flood_of_refused_reports_appends_a_bounded_number_of_events() {
    let p = platform().await;
    let (node_id, token) = support::provision(&p.store).await;
    let mut agent = Agent::join(p.addr, &token).await;
    let task_id = support::submit_and_assign(&p.store, node_id).await;
    assert_eq!(
        agent
            .report(status(1, task_id, ReportedState::Accepted))
            .await,
        None
    );
    let lines_of_node = || {
        log_text()
            .lines()
            .filter(|l| l.contains(&node_id.to_string()))
            .count()
    };
    let lines_before = lines_of_node();
    for id in 2..302 {
        let error = agent.report(running(id, task_id, "bad\0id")).await;
        assert!(error.is_some(), "report {id} was stored");
    }
    let refused = p
        .events_of(task_id)
        .await
        .iter()
        .filter(|t| *t == "TaskReportRefused")
        .count();
    assert!(
        (1..=NOTICE_BURST as usize + 1).contains(&refused),
        "{refused} refusal events for 300 bad reports"
    );
    assert!(p.largest_event(task_id).await < SMALL_EVENT);
    let lines = lines_of_node() - lines_before;
    assert!(lines <= NOTICE_BURST as usize + 5, "{lines} log lines");
    // The node still reports.
    assert_eq!(agent.report(running(400, task_id, "c1")).await, None);
}

#[tokio::test]
async fn two_hundred_simultaneous_connections_of_one_node_append_a_few_events() {
    // No token comes back while the test runs, however slow the machine.
    let limits = ConnectLimits {
        every: Duration::from_secs(3600),
        ..ConnectLimits::default()
    };
    let p = platform_with(limits).await;
    let (node_id, token) = support::provision(&p.store).await;
    let attempts: Vec<_> = (0..200)
        .map(|_| {
            let (addr, token) = (p.addr, token.clone());
            tokio::spawn(async move { Agent::hello(addr, &token, hello()).await })
        })
        .collect();
    let mut welcomed = Vec::new();
    let mut limited = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            (agent, Some(ServerMessage::Welcome { session, .. })) => {
                welcomed.push((agent, session))
            }
            (_, Some(ServerMessage::Error { code, message })) if code == "rate_limited" => {
                assert!(message.contains("connect again in"), "{message}");
                limited += 1;
            }
            (_, other) => panic!("expected welcome or rate_limited, got {other:?}"),
        }
    }
    let burst = limits.burst as usize;
    assert!(
        (1..=burst).contains(&welcomed.len()),
        "{} welcomes",
        welcomed.len()
    );
    assert_eq!(welcomed.len() + limited, 200);
    let connected = p
        .events_of(node_id)
        .await
        .iter()
        .filter(|t| *t == "NodeConnected")
        .count();
    assert_eq!(connected, welcomed.len());
    // One session is left, the node's current one; the others were
    // replaced.
    testkit::eventually("one session left", PATIENCE, || async {
        (p.ingress.connected() == 1).then_some(())
    })
    .await;
    let current = p.node(node_id).await.session.unwrap();
    assert!(welcomed.iter().any(|(_, s)| *s == current));
    assert_eq!(p.node(node_id).await.status, NodeStatus::Online);
    // Connecting again at once is refused without a word in the log.
    let before = p.event_count().await;
    let (mut agent, first) = Agent::hello(p.addr, &token, hello()).await;
    match first {
        Some(ServerMessage::Error { code, message }) => {
            assert_eq!(code, "rate_limited");
            // Named in seconds: the bucket is empty for nearly an hour.
            let after_s: u64 = message
                .split("connect again in ")
                .nth(1)
                .and_then(|rest| rest.strip_suffix(" s"))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no time in {message:?}"));
            assert!((3000..=3600).contains(&after_s), "{message}");
        }
        other => panic!("expected rate_limited, got {other:?}"),
    }
    assert!(agent.recv().await.is_none());
    assert_eq!(p.event_count().await, before);
}
