//! Live task output as a user sees it: `GET /api/v1/tasks/{id}/logs?follow=true`
//! over real HTTP (Server-Sent Events read with reqwest and a small parser),
//! fed by agents speaking the real protocol over real WebSockets to the real
//! ingress, on a real PostgreSQL. The API and the ingress run in this
//! process on one port, as `unidesk serve` runs them; the last test runs
//! the real `unidesk serve`, a real `unidesk-agent` and a Docker container.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use testkit::agent::JsonAgent;

use std::net::SocketAddr;
use std::time::Duration;

use chrono::Utc;
use domain::task::{Task, TaskCommand};
use domain::Actor;
use ingress::LogLimits;
use serde_json::{json, Value};
use store::Store;
use uuid::Uuid;

use support::{base_image, repo, spawn_agent, Agents, EnvImage, BASE};
use testkit::process::Api;

/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(10);

/// How long a test listens to be sure nothing arrives.
const QUIET: Duration = Duration::from_millis(700);

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

// ---------------------------------------------------------------- platform

/// The API and the ingress on one port over a fresh database.
struct Platform {
    base: String,
    addr: SocketAddr,
    store: Store,
    http: reqwest::Client,
    admin: String,
    followers: api::LogFollowers,
    _dir: tempfile::TempDir,
}

impl Platform {
    async fn start(limits: LogLimits) -> Self {
        let db = testkit::fresh_db().await;
        let store = Store::new(db.pool.clone());
        let dir = tempfile::tempdir().unwrap();
        let admin = api::bootstrap_admin(&store, &dir.path().join("admin.token"))
            .await
            .unwrap();
        let state = api::AppState::new(store.clone(), api::Config::default());
        let followers = state.log_followers().clone();
        let ingress = ingress::Ingress::new(
            store.clone(),
            ingress::Config {
                ingress_id: "live-logs".into(),
                poll: Duration::from_millis(50),
                ..ingress::Config::default()
            },
        )
        .with_log_limits(limits);
        let app = api::router(state).merge(ingress.router());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        tokio::spawn(async move { ingress.run(std::future::pending()).await });
        Platform {
            base: format!("http://{addr}/api/v1"),
            addr,
            store,
            http: reqwest::Client::new(),
            admin,
            followers,
            _dir: dir,
        }
    }

    /// The API as the holder of `token`.
    fn api(&self, token: &str) -> Api {
        Api {
            http: self.http.clone(),
            base: self.base.clone(),
            token: token.to_string(),
        }
    }

    async fn post(&self, token: &str, path: &str, body: Value) -> Value {
        self.api(token).post(path, body).await
    }

    async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        self.api(token).call(reqwest::Method::GET, path, None).await
    }

    /// A user and a token of theirs.
    async fn user(&self, name: &str) -> String {
        support::user(&self.api(&self.admin), name).await
    }

    async fn project(&self, name: &str) -> String {
        self.post(
            &self.admin,
            "/projects",
            json!({"name": name, "description": "live logs"}),
        )
        .await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn submit(&self, project: &str) -> Uuid {
        let t = self
            .post(
                &self.admin,
                "/tasks",
                json!({
                    "project_id": project,
                    "code_repo_url": "https://git.example.com/lab/code.git",
                    "code_commit_id": SHA,
                    "env_repo_url": "https://git.example.com/lab/env.git",
                    "env_commit_id": SHA,
                    "dockerfile_path": "Dockerfile",
                    "command": ["sh", "run.sh"]
                }),
            )
            .await;
        t["id"].as_str().unwrap().parse().unwrap()
    }

    /// A node and its agent, connected.
    async fn node(&self, name: &str) -> (Uuid, String, Agent) {
        let actor = Actor::User("admin".into());
        let (node, token) = api::provision_node(&self.store, name, Default::default(), &actor)
            .await
            .unwrap();
        let agent = Agent::join(self.addr, &token).await;
        (node.id.unwrap(), token, agent)
    }

    /// Places the task's next attempt on `node`, as the scheduler would.
    async fn assign(&self, task: Uuid, node: Uuid) {
        let actor = Actor::System("scheduler".into());
        self.store
            .execute::<Task>(
                &task.to_string(),
                TaskCommand::Assign {
                    node_id: node,
                    gpus: vec![],
                    reason: "test".into(),
                    at: Utc::now(),
                },
                &actor,
                Utc::now(),
            )
            .await
            .unwrap();
    }

    /// Opens `GET /tasks/{id}/logs?follow=true&<query>` as `token`.
    async fn follow(
        &self,
        token: &str,
        task: Uuid,
        query: &str,
        last_event_id: Option<&str>,
    ) -> reqwest::Response {
        let mut r = self
            .http
            .get(format!(
                "{}/tasks/{task}/logs?follow=true{query}",
                self.base
            ))
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            r = r.header("Last-Event-ID", id);
        }
        r.send().await.unwrap()
    }

    async fn follower(&self, task: Uuid, query: &str, last_event_id: Option<&str>) -> Follower {
        let r = self.follow(&self.admin, task, query, last_event_id).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Follower {
            response: r,
            buffer: String::new(),
        }
    }
}

// ---------------------------------------------------------------- SSE

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    event: String,
    id: Option<String>,
    data: Value,
}

#[derive(Debug)]
enum Next {
    Event(Sse),
    Closed,
    Nothing,
}

/// The client side of one event stream.
struct Follower {
    response: reqwest::Response,
    buffer: String,
}

impl Follower {
    /// The next event (comments skipped), the end of the stream, or
    /// nothing within `within`.
    async fn next(&mut self, within: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse(&block) {
                    return Next::Event(event);
                }
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return Next::Nothing,
                Ok(Ok(Some(bytes))) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                Ok(Ok(None)) => return Next::Closed,
                Ok(Err(e)) => panic!("the stream broke: {e}"),
            }
        }
    }

    async fn event(&mut self) -> Sse {
        match self.next(PATIENCE).await {
            Next::Event(e) => e,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    async fn expect_nothing(&mut self) {
        match self.next(QUIET).await {
            Next::Nothing => {}
            other => panic!("expected nothing yet, got {other:?}"),
        }
    }

    async fn expect_closed(&mut self) {
        match self.next(PATIENCE).await {
            Next::Closed => {}
            other => panic!("expected the stream to end, got {other:?}"),
        }
    }

    /// Every `log` event's data until `end`, which is returned too; checks
    /// that each piece starts where the one before ended.
    async fn read_to_end(&mut self, mut at: u64) -> (String, Sse) {
        let mut out = String::new();
        loop {
            let e = self.event().await;
            if e.event == "end" {
                return (out, e);
            }
            assert_eq!(e.event, "log");
            assert_eq!(e.data["offset"], at, "no gap, no overlap");
            let data = e.data["data"].as_str().unwrap();
            assert!(data.len() <= api::live_logs::PAGE_BYTES);
            out.push_str(data);
            at = e.data["next_offset"].as_u64().unwrap();
            assert_eq!(e.id.as_deref(), Some(format!("1:{at}").as_str()));
        }
    }
}

/// Parses one event block; `None` for a comment-only block.
fn parse(block: &str) -> Option<Sse> {
    let mut event = "message".to_string();
    let mut id = None;
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        if line.starts_with(':') || line.is_empty() {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = value.to_string(),
            "id" => id = Some(value.to_string()),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() {
        return None;
    }
    Some(Sse {
        event,
        id,
        data: serde_json::from_str(&data.join("\n")).unwrap(),
    })
}

// ---------------------------------------------------------------- agent

/// A node agent played over a real WebSocket, speaking JSON frames.
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
    async fn join(addr: SocketAddr, token: &str) -> Self {
        Agent::join_running(addr, token, json!([])).await
    }

    /// Joins saying it still runs `running` (`[{"task_id", "attempt"}]`).
    async fn join_running(addr: SocketAddr, token: &str, running: Value) -> Self {
        Agent(JsonAgent::join(addr, token, running).await)
    }

    async fn status(&mut self, task: Uuid, state: &str) {
        self.report(json!({"type": "status", "task_id": task, "attempt": 1,
                           "state": state, "container": "c0ffee"}))
            .await;
    }

    async fn log(&mut self, task: Uuid, offset: u64, data: &str) {
        self.report(log(task, offset, data)).await;
    }

    async fn close(self) {
        self.0.close().await;
    }
}

fn log(task: Uuid, offset: u64, data: &str) -> Value {
    json!({"type": "log", "task_id": task, "attempt": 1, "offset": offset, "data": data})
}

/// Output of `n` numbered lines starting at line `from`.
fn lines(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("line {i:06} {}\n", "z".repeat(40)))
        .collect()
}

/// Sends `text` as chunks of at most 60 KiB, on character boundaries;
/// returns the offset after it.
async fn send_output(agent: &mut Agent, task: Uuid, mut offset: u64, text: &str) -> u64 {
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(60 * 1024);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        agent.log(task, offset, &rest[..cut]).await;
        offset += cut as u64;
        rest = &rest[cut..];
    }
    offset
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn a_follower_sees_output_as_it_is_produced_and_an_end_after_the_final_state() {
    let p = Platform::start(LogLimits::default()).await;
    let project = p.project("vision").await;
    let task = p.submit(&project).await;
    let (node, _, mut agent) = p.node("gpu-1").await;
    p.assign(task, node).await;

    let mut follower = p.follower(task, "", None).await;
    follower.expect_nothing().await;
    agent.status(task, "accepted").await;
    agent.status(task, "running").await;

    agent.log(task, 0, "epoch 1: loss 0.9\n").await;
    let first = follower.event().await;
    assert_eq!(first.event, "log");
    assert_eq!(
        first.data,
        json!({"attempt": 1, "offset": 0, "next_offset": 18, "data": "epoch 1: loss 0.9\n"})
    );
    assert_eq!(first.id.as_deref(), Some("1:18"));
    // Nothing more until the task prints more, and no end while it runs.
    follower.expect_nothing().await;

    agent.log(task, 18, "epoch 2: loss 0.5\n").await;
    let second = follower.event().await;
    assert_eq!(second.data["data"], "epoch 2: loss 0.5\n");
    assert_eq!(second.id.as_deref(), Some("1:36"));
    follower.expect_nothing().await;

    agent.status(task, "succeeded").await;
    let end = follower.event().await;
    assert_eq!(end.event, "end");
    assert_eq!(
        end.data,
        json!({"attempt": 1, "state": "succeeded", "next_offset": 36})
    );
    follower.expect_closed().await;
    assert_eq!(p.followers.followed(), 0, "the finished stream let go");
}

#[tokio::test]
async fn a_follower_resuming_with_last_event_id_gets_exactly_the_rest() {
    let p = Platform::start(LogLimits::default()).await;
    let project = p.project("vision").await;
    let task = p.submit(&project).await;
    let (node, _, mut agent) = p.node("gpu-1").await;
    p.assign(task, node).await;
    agent.status(task, "accepted").await;
    agent.status(task, "running").await;
    // More than a page already stored when the follower comes.
    let before = lines(0, 12_000);
    let at = send_output(&mut agent, task, 0, &before).await;

    let mut follower = p.follower(task, "", None).await;
    let mut seen = String::new();
    let mut last_id = String::new();
    for _ in 0..2 {
        let e = follower.event().await;
        assert!(e.data["data"].as_str().unwrap().len() <= api::live_logs::PAGE_BYTES);
        seen.push_str(e.data["data"].as_str().unwrap());
        last_id = e.id.unwrap();
    }
    drop(follower);

    // The task prints more while nobody follows, then ends.
    let after = lines(12_000, 3_000);
    send_output(&mut agent, task, at, &after).await;
    agent.status(task, "succeeded").await;

    // Last-Event-ID wins over the offset in the query.
    let resumed_at: u64 = last_id.split_once(':').unwrap().1.parse().unwrap();
    let mut follower = p.follower(task, "&offset=0", Some(&last_id)).await;
    let (rest, end) = follower.read_to_end(resumed_at).await;
    seen.push_str(&rest);
    assert_eq!(seen.len(), before.len() + after.len());
    assert!(
        seen == before.clone() + &after,
        "the output, whole and once"
    );
    assert_eq!(end.data["state"], "succeeded");

    // A client that got the end and reconnects gets the end again.
    let end_id = end.id.unwrap();
    let mut again = p.follower(task, "", Some(&end_id)).await;
    assert_eq!(again.event().await.event, "end");
    again.expect_closed().await;
}

#[tokio::test]
async fn a_chunk_resent_after_an_agent_reconnect_reaches_a_follower_once() {
    let p = Platform::start(LogLimits::default()).await;
    let project = p.project("vision").await;
    let task = p.submit(&project).await;
    let (node, token, mut agent) = p.node("gpu-1").await;
    p.assign(task, node).await;
    agent.status(task, "accepted").await;
    agent.status(task, "running").await;
    let mut follower = p.follower(task, "", None).await;

    agent.log(task, 0, "before the drop\n").await;
    // Sent, but the connection drops before the answer arrives.
    agent.send_report(log(task, 16, "in flight\n")).await;
    agent.close().await;

    let running = json!([{"task_id": task, "attempt": 1}]);
    let mut agent = Agent::join_running(p.addr, &token, running).await;
    agent.number_reports_from(100);
    agent.log(task, 16, "in flight\n").await;
    agent.log(task, 26, "after the reconnect\n").await;
    agent.status(task, "succeeded").await;

    let (output, end) = follower.read_to_end(0).await;
    assert_eq!(output, "before the drop\nin flight\nafter the reconnect\n");
    assert_eq!(end.data["next_offset"], 46);
}

#[tokio::test]
async fn an_attempt_past_the_cap_ends_with_the_marker_and_still_completes() {
    let cap = 1000;
    let p = Platform::start(LogLimits {
        max_bytes_per_attempt: cap,
        ..LogLimits::default()
    })
    .await;
    let project = p.project("vision").await;
    let task = p.submit(&project).await;
    let (node, _, mut agent) = p.node("gpu-1").await;
    p.assign(task, node).await;
    agent.status(task, "accepted").await;
    agent.status(task, "running").await;
    let output = lines(0, 100);
    send_output(&mut agent, task, 0, &output).await;
    agent.status(task, "failed").await;

    let expected = output[..cap as usize].to_string() + &ingress::cut_marker(cap);
    let mut follower = p.follower(task, "", None).await;
    let (seen, end) = follower.read_to_end(0).await;
    assert_eq!(seen, expected);
    assert!(seen.ends_with("the rest of this attempt's output was dropped]\n"));
    assert_eq!(end.data["state"], "failed");

    // The JSON route agrees, and says the output is complete.
    let (status, page) = p.get(&p.admin, &format!("/tasks/{task}/logs")).await;
    assert_eq!(status, 200);
    assert_eq!(page["data"], expected);
    assert_eq!(page["complete"], true);
}

#[tokio::test]
async fn a_follower_of_a_queued_task_waits_for_its_first_attempt() {
    let p = Platform::start(LogLimits::default()).await;
    let project = p.project("vision").await;
    let task = p.submit(&project).await;
    let mut follower = p.follower(task, "", None).await;
    follower.expect_nothing().await;

    let (node, _, mut agent) = p.node("gpu-1").await;
    p.assign(task, node).await;
    agent.status(task, "accepted").await;
    agent.status(task, "running").await;
    agent.log(task, 0, "hello\n").await;
    agent.status(task, "succeeded").await;
    let (output, end) = follower.read_to_end(0).await;
    assert_eq!(output, "hello\n");
    assert_eq!(end.data["attempt"], 1);

    // A task cancelled before it ever ran ends at once, as attempt 0.
    let never = p.submit(&project).await;
    let mut follower = p.follower(never, "", None).await;
    p.post(&p.admin, &format!("/tasks/{never}/cancel"), json!({}))
        .await;
    let end = follower.event().await;
    assert_eq!(end.event, "end");
    assert_eq!(
        end.data,
        json!({"attempt": 0, "state": "cancelled", "next_offset": 0})
    );
}

#[tokio::test]
async fn only_members_of_the_tasks_project_may_follow_its_output() {
    let p = Platform::start(LogLimits::default()).await;
    let project = p.project("vision").await;
    let other = p.project("audio").await;
    let task = p.submit(&project).await;
    let viewer = p.user("vera").await;
    let outsider = p.user("otto").await;
    p.post(
        &p.admin,
        &format!("/projects/{project}/members"),
        json!({"user": "vera", "role": "viewer"}),
    )
    .await;
    p.post(
        &p.admin,
        &format!("/projects/{other}/members"),
        json!({"user": "otto", "role": "member"}),
    )
    .await;

    let hidden = p.follow(&outsider, task, "", None).await;
    assert_eq!(hidden.status(), 404);
    let body: Value = hidden.json().await.unwrap();
    assert!(body["errors"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("not found"));
    let seen = p.follow(&viewer, task, "", None).await;
    assert_eq!(seen.status(), 200);
    let anonymous = p
        .http
        .get(format!("{}/tasks/{task}/logs?follow=true", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn revoking_the_token_ends_an_open_stream() {
    let p = Platform::start(LogLimits::default()).await;
    let project = p.project("revocation").await;
    let task = p.submit(&project).await;
    let token = p.user("rita").await;
    p.post(
        &p.admin,
        &format!("/projects/{project}/members"),
        json!({"user": "rita", "role": "viewer"}),
    )
    .await;
    let response = p.follow(&token, task, "", None).await;
    assert_eq!(response.status(), 200);
    let mut stream = Follower {
        response,
        buffer: String::new(),
    };
    stream.expect_nothing().await;
    let token_id = token.split('~').nth(2).unwrap();
    let revoked = p
        .http
        .delete(format!("{}/users/rita/tokens/{token_id}", p.base))
        .bearer_auth(&p.admin)
        .send()
        .await
        .unwrap();
    assert!(revoked.status().is_success(), "{revoked:?}");
    // The stream re-checks its token within the access re-check interval
    // (10 s) plus one poll.
    match stream.next(Duration::from_secs(20)).await {
        Next::Closed => {}
        Next::Event(e) => assert_ne!(e.event, "log", "{e:?}"),
        Next::Nothing => panic!("a revoked token kept its stream open"),
    }
}

#[tokio::test]
async fn bad_follow_parameters_are_refused_with_their_name() {
    let p = Platform::start(LogLimits::default()).await;
    let project = p.project("vision").await;
    let task = p.submit(&project).await;
    for (query, last, status, field) in [
        ("", Some("nonsense"), 400, "Last-Event-ID"),
        ("", Some("0:5"), 400, "Last-Event-ID"),
        ("&attempt=2", None, 404, "attempt"),
        ("", Some("2:0"), 404, "attempt"),
    ] {
        let r = p.follow(&p.admin, task, query, last).await;
        assert_eq!(r.status().as_u16(), status, "{query} {last:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["field"], field, "{body}");
    }
    let r = p
        .http
        .get(format!("{}/tasks/{task}/logs?follow=maybe", p.base))
        .bearer_auth(&p.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn stopping_the_server_ends_open_streams() {
    let p = Platform::start(LogLimits::default()).await;
    let project = p.project("vision").await;
    let task = p.submit(&project).await;
    let mut follower = p.follower(task, "", None).await;
    follower.expect_nothing().await;
    p.followers.stop();
    follower.expect_closed().await;
}

// ---------------------------------------------------------------- end to end

#[tokio::test(flavor = "multi_thread")]
async fn a_real_task_is_followed_live_through_unidesk_serve_and_a_real_agent() {
    base_image();
    let db = testkit::fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    let server = support::serve(
        &db.url,
        &[
            "--allow-file-urls",
            "--heartbeat-s",
            "1",
            "--poll-ms",
            "100",
            "--max-log-mb",
            "8",
            "--log-rate-kb",
            "512",
        ],
    )
    .await;
    let api = server.api();
    let (base, http, admin) = (&api.base, &api.http, &api.token);
    let post = |path: &str, body: Value| {
        let api = api.clone();
        let path = path.to_string();
        async move { api.post(&path, body).await }
    };
    let project = post("/projects", json!({"name": "live"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let node = post("/nodes", json!({"name": "worker-1"})).await;
    let _agent = Agents(vec![spawn_agent(
        &server.ws(),
        node["token"].as_str().unwrap(),
        &dir.path().join("agent"),
        &["--cpus", "2", "--memory-mb", "2048", "--no-gpus"],
    )]);
    let code = repo(
        dir.path(),
        "code",
        &[(
            "run.sh",
            "for i in 1 2 3 4 5 6; do echo \"tick $i\"; sleep 1; done\n",
        )],
    );
    let env = repo(
        dir.path(),
        "env",
        &[("Dockerfile", &format!("FROM {BASE}\n"))],
    );
    let _image = EnvImage::of(&env, "Dockerfile");
    let task = post(
        "/tasks",
        json!({
            "project_id": project,
            "code_repo_url": code.0, "code_commit_id": code.1,
            "env_repo_url": env.0, "env_commit_id": env.1,
            "dockerfile_path": "Dockerfile",
            "command": ["sh", "run.sh"],
            "resources": {"cpus": 1, "memory_mb": 256}
        }),
    )
    .await;
    let id = task["id"].as_str().unwrap().to_string();

    // Follow from before the task runs.
    let r = http
        .get(format!("{base}/tasks/{id}/logs?follow=true"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut follower = Follower {
        response: r,
        buffer: String::new(),
    };
    let first = match follower.next(Duration::from_secs(240)).await {
        Next::Event(e) => e,
        other => panic!("expected the first output, got {other:?}"),
    };
    assert_eq!(first.event, "log");
    assert!(
        first.data["data"].as_str().unwrap().starts_with("tick 1\n"),
        "{first:?}"
    );
    // Seen while the task still runs.
    let state = http
        .get(format!("{base}/tasks/{id}"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(state["state"], "running", "{state}");

    let mut output = first.data["data"].as_str().unwrap().to_string();
    let end = loop {
        match follower.next(Duration::from_secs(60)).await {
            Next::Event(e) if e.event == "log" => output.push_str(e.data["data"].as_str().unwrap()),
            Next::Event(e) => break e,
            other => panic!("expected more output or the end, got {other:?}"),
        }
    };
    assert_eq!(end.event, "end");
    assert_eq!(end.data["state"], "succeeded", "{end:?}");
    let expected: String = (1..=6).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(output, expected);
}

#[tokio::test]
async fn the_openapi_document_describes_following_output() {
    let p = Platform::start(LogLimits::default()).await;
    let doc: Value = p
        .http
        .get(format!("{}/openapi.json", p.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let op = &doc["paths"]["/api/v1/tasks/{id}/logs"]["get"];
    let params: Vec<&str> = op["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(params.contains(&"follow"), "{params:?}");
    assert!(params.contains(&"Last-Event-ID"), "{params:?}");
    let content = &op["responses"]["200"]["content"];
    assert!(content.get("application/json").is_some(), "{content}");
    assert!(content.get("text/event-stream").is_some(), "{content}");
    assert!(op["description"]
        .as_str()
        .unwrap()
        .contains("Last-Event-ID"));
}
