//! The audit timeline over real HTTP against a real PostgreSQL: pages newest
//! first under every filter, the live stream from the outbox, one event
//! with the state before and after it, access exactly as the REST API
//! grants it, and the web view's files.

use std::time::Duration;

use api::Config;
use chrono::Utc;
use domain::node::{Node, NodeCommand, NodeResources};
use domain::task::{Task, TaskCommand};
use domain::Actor;
use serde_json::{json, Value};
use uuid::Uuid;

/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(10);

mod support;

use support::{minimal_task, App};

async fn start() -> App {
    App::start(Config::default()).await
}

impl App {
    /// The answer to `GET /api/v1{path}`, which must be 200.
    async fn ok(&self, path: &str, token: &str) -> Value {
        self.get(&format!("/api/v1{path}"), token)
            .await
            .expect(200)
            .clone()
    }

    /// The answer to `POST /api/v1{path}`, which must succeed.
    async fn post_ok(&self, path: &str, token: &str, body: Value) -> Value {
        let answer = self.post(&format!("/api/v1{path}"), token, body).await;
        assert!(
            answer.status.is_success(),
            "POST {path}: {} {}",
            answer.status,
            answer.body
        );
        answer.body
    }

    async fn project(&self, name: &str, member: &str) -> String {
        let id = self
            .post_ok("/projects", &self.admin, json!({ "name": name }))
            .await["id"]
            .as_str()
            .expect("an id")
            .to_string();
        self.post_ok(
            &format!("/projects/{id}/members"),
            &self.admin,
            json!({ "user": member, "role": "member" }),
        )
        .await;
        id
    }

    async fn submit(&self, project: &str) -> String {
        let mut body = minimal_task(project);
        body["command"] = json!(["python", "train.py"]);
        self.post_ok("/tasks", &self.admin, body).await["id"]
            .as_str()
            .expect("an id")
            .to_string()
    }

    /// A node whose agent connected, as the ingress records it.
    async fn node(&self, name: &str) -> String {
        let id = self
            .post_ok("/nodes", &self.admin, json!({ "name": name }))
            .await["id"]
            .as_str()
            .expect("an id")
            .to_string();
        let at = Utc::now();
        let connect = NodeCommand::Connect {
            session: Uuid::now_v7(),
            agent_version: "0.1.0-test".into(),
            resources: NodeResources::default(),
            labels: Default::default(),
            at,
        };
        self.store
            .execute::<Node>(&id, connect, &Actor::Node(id.clone()), at)
            .await
            .expect("connect");
        id
    }

    async fn assign(&self, task: &str, node: &str) {
        let at = Utc::now();
        let assign = TaskCommand::Assign {
            node_id: node.parse().expect("a node id"),
            gpus: vec![],
            reason: "1 CPU free, image cached".into(),
            at,
        };
        self.store
            .execute::<Task>(task, assign, &Actor::System("scheduler".into()), at)
            .await
            .expect("assign");
    }

    /// Every page of the timeline for `filter`, newest first.
    async fn all(&self, filter: &str, token: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut before: Option<i64> = None;
        loop {
            let cursor = before.map_or(String::new(), |b| format!("&before={b}"));
            let page = self
                .ok(&format!("/timeline?limit=3{filter}{cursor}"), token)
                .await;
            items.extend(page["items"].as_array().expect("items").iter().cloned());
            match page["next_before"].as_i64() {
                Some(b) => before = Some(b),
                None => return items,
            }
        }
    }

    async fn stream(&self, query: &str, token: &str, last_id: Option<&str>) -> Stream {
        let mut request = self
            .client
            .get(format!("{}/api/v1/timeline/stream{query}", self.base))
            .bearer_auth(token);
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("answered");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "a stream of events"
        );
        Stream {
            response,
            buffer: String::new(),
        }
    }
}

fn positions(items: &[Value]) -> Vec<i64> {
    items
        .iter()
        .map(|e| e["position"].as_i64().expect("a position"))
        .collect()
}

/// One Server-Sent Events response, read event by event.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    /// The next event as (type, data, id), waiting at most `PATIENCE`.
    async fn next(&mut self) -> Option<(String, Value, Option<String>)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut kind, mut data, mut id) = ("message".to_string(), String::new(), None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        kind = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some((kind, serde_json::from_str(&data).expect("JSON data"), id));
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .ok()?
                .expect("the stream reads")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// Timeline events until `ready`.
    async fn until_ready(&mut self) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let (kind, data, _) = self.next().await.expect("ready comes");
            match kind.as_str() {
                "ready" => return seen,
                "timeline" => seen.push(data),
                other => panic!("unexpected event {other}"),
            }
        }
    }

    /// The next `n` timeline events.
    async fn take(&mut self, n: usize) -> Vec<(Value, String)> {
        let mut out = Vec::new();
        while out.len() < n {
            let (kind, data, id) = self.next().await.expect("an event comes");
            assert_eq!(kind, "timeline", "{data}");
            out.push((data, id.expect("an id")));
        }
        out
    }

    /// Whether nothing arrives for a while.
    async fn quiet(&mut self) -> bool {
        if self.buffer.contains("\n\n") && !self.buffer.trim_start().starts_with(':') {
            return false;
        }
        match tokio::time::timeout(Duration::from_millis(800), self.response.chunk()).await {
            Err(_) => true,
            Ok(chunk) => {
                let chunk = chunk.expect("reads").unwrap_or_default();
                std::str::from_utf8(&chunk)
                    .expect("UTF-8")
                    .lines()
                    .all(|l| l.is_empty() || l.starts_with(':'))
            }
        }
    }
}

/// Alice is a member of `vision`, Bob of `audio`; one task each, and one
/// more in `vision` placed on node gpu-3.
struct World {
    alice: String,
    bob: String,
    vision: String,
    audio: String,
    t1: String,
    t2: String,
    t3: String,
    node: String,
}

async fn world(app: &App) -> World {
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let vision = app.project("vision", "alice").await;
    let audio = app.project("audio", "bob").await;
    let t1 = app.submit(&vision).await;
    let t2 = app.submit(&audio).await;
    let node = app.node("gpu-3").await;
    let t3 = app.submit(&vision).await;
    app.assign(&t3, &node).await;
    app.catch_up().await;
    World {
        alice,
        bob,
        vision,
        audio,
        t1,
        t2,
        t3,
        node,
    }
}

#[tokio::test]
async fn the_timeline_pages_newest_first_under_every_filter() {
    let app = start().await;
    let w = world(&app).await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .expect("count");

    let all = app.all("", &app.admin).await;
    assert_eq!(all.len() as i64, total, "every event, each once");
    let p = positions(&all);
    assert!(p.windows(2).all(|w| w[0] > w[1]), "newest first: {p:?}");
    let first = &all[0];
    assert_eq!(first["event_type"], "TaskAssigned");
    assert_eq!(first["actor"], "system:scheduler");
    assert_eq!(
        first["summary"],
        "system:scheduler assigned attempt 1 to node gpu-3: 1 CPU free, image cached"
    );
    assert_eq!(first["node_id"], w.node.as_str());
    assert_eq!(first["project_id"], w.vision.as_str());

    let task = app.all(&format!("&task={}", w.t1), &app.admin).await;
    assert!(!task.is_empty());
    assert!(task.iter().all(|e| e["aggregate_id"] == w.t1.as_str()));

    let node = app.all(&format!("&node={}", w.node), &app.admin).await;
    let types: Vec<&str> = node
        .iter()
        .map(|e| e["event_type"].as_str().expect("a type"))
        .collect();
    assert_eq!(types, ["TaskAssigned", "NodeConnected", "NodeProvisioned"]);

    let vision = app.all(&format!("&project={}", w.vision), &app.admin).await;
    assert!(vision.iter().all(|e| e["project_id"] == w.vision.as_str()));
    assert!(vision.iter().any(|e| e["aggregate_id"] == w.t3.as_str()));
    assert!(vision.iter().any(|e| e["aggregate_type"] == "project"));

    let submitted = app.all("&event_type=TaskSubmitted", &app.admin).await;
    assert_eq!(submitted.len(), 3);
    let nodes = app.all("&aggregate_type=node", &app.admin).await;
    assert_eq!(nodes.len(), 2);

    let t = &vision[vision.len() / 2];
    let at = t["recorded_at"].as_str().expect("a time");
    let since = app.all(&format!("&since={at}"), &app.admin).await;
    let until = app.all(&format!("&until={at}"), &app.admin).await;
    assert_eq!(
        since.len() + until.len(),
        all.len(),
        "a time splits the log"
    );
    assert!(app
        .all("&since=2999-01-01T00:00:00Z", &app.admin)
        .await
        .is_empty());

    // The same filters for a member: their project, every node, themselves.
    let mine = app.all("", &w.alice).await;
    assert!(!mine.is_empty());
    for e in &mine {
        let kind = e["aggregate_type"].as_str().expect("a type");
        match kind {
            "task" | "project" => assert_eq!(e["project_id"], w.vision.as_str(), "{e}"),
            "node" => {}
            "user" => assert_eq!(e["aggregate_id"], "alice"),
            other => panic!("{other}"),
        }
    }
    assert!(mine.iter().any(|e| e["aggregate_id"] == w.t1.as_str()));
    assert!(!mine.iter().any(|e| e["aggregate_id"] == w.t2.as_str()));
    let bobs = app.all(&format!("&node={}", w.node), &w.bob).await;
    assert_eq!(
        bobs.len(),
        2,
        "the node's own events, not alice's task on it"
    );
}

#[tokio::test]
async fn filters_for_what_the_caller_may_not_see_and_bad_parameters_are_refused_by_name() {
    let app = start().await;
    let w = world(&app).await;
    let missing = Uuid::new_v4();
    for (path, status, field) in [
        (format!("/timeline?task={}", w.t2), 404, "task"),
        (format!("/timeline?project={}", w.audio), 404, "project"),
        (format!("/timeline?node={missing}"), 404, "node"),
        (format!("/timeline/stream?task={}", w.t2), 404, "task"),
        ("/timeline?limit=0".into(), 400, "limit"),
        ("/timeline?limit=501".into(), 400, "limit"),
        ("/timeline?before=x".into(), 400, "before"),
        ("/timeline?before=999999".into(), 404, "before"),
        ("/timeline?task=nope".into(), 400, "task"),
        (
            "/timeline?aggregate_type=file".into(),
            400,
            "aggregate_type",
        ),
        (
            "/timeline?event_type=Task%20Assigned".into(),
            400,
            "event_type",
        ),
        ("/timeline?since=yesterday".into(), 400, "since"),
        ("/timeline?colour=red".into(), 400, "colour"),
        ("/timeline/stream?after=-1".into(), 400, "after"),
        ("/timeline/stream?after=999999".into(), 404, "after"),
        ("/events/999999".into(), 404, ""),
        ("/events/x".into(), 400, "position"),
    ] {
        let (got, body) = app.get(&format!("/api/v1{path}"), &w.alice).await.pair();
        assert_eq!(got.as_u16(), status, "{path}: {body}");
        if !field.is_empty() {
            assert_eq!(body["errors"][0]["field"], field, "{path}: {body}");
        }
    }
}

#[tokio::test]
async fn the_stream_takes_over_from_the_page_and_shows_only_what_the_caller_may_see() {
    let app = start().await;
    let w = world(&app).await;
    let page = app.ok("/timeline?limit=5", &w.alice).await;
    let after = page["live_after"].as_i64().expect("live_after");
    let newest = page["items"][0]["position"].as_i64().expect("a position");
    assert!(after >= newest);

    let mut alice = app.stream(&format!("?after={after}"), &w.alice, None).await;
    assert!(alice.until_ready().await.is_empty(), "the page had it all");
    let mut task = app
        .stream(&format!("?task={}", w.t1), &app.admin, None)
        .await;
    task.until_ready().await;
    let mut bob = app.stream("", &w.bob, None).await;
    bob.until_ready().await;

    // Bob's task changes, then Alice's: Alice sees only hers.
    app.post_ok(&format!("/tasks/{}/cancel", w.t2), &app.admin, json!({}))
        .await;
    app.post_ok(&format!("/tasks/{}/cancel", w.t1), &app.admin, json!({}))
        .await;
    let t4 = app.submit(&w.vision).await;

    let seen = alice.take(3).await;
    let summaries: Vec<&str> = seen
        .iter()
        .map(|(e, _)| e["summary"].as_str().expect("a summary"))
        .collect();
    assert_eq!(
        summaries[..2],
        [
            "user:admin asked to cancel the task",
            "task cancelled before it ran"
        ]
    );
    assert!(seen[..2]
        .iter()
        .all(|(e, _)| e["aggregate_id"] == w.t1.as_str()));
    assert_eq!(seen[2].0["aggregate_id"], t4.as_str());
    let ids: Vec<i64> = seen
        .iter()
        .map(|(e, id)| {
            assert_eq!(e["position"].to_string(), *id);
            e["position"].as_i64().expect("a position")
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
    assert!(alice.quiet().await, "nothing of bob's");

    let of_task = task.take(2).await;
    assert!(of_task
        .iter()
        .all(|(e, _)| e["aggregate_id"] == w.t1.as_str()));
    assert!(task.quiet().await, "nothing of other tasks");
    let bobs = bob.take(2).await;
    assert!(bobs.iter().all(|(e, _)| e["aggregate_id"] == w.t2.as_str()));

    // Resuming after the first event gives exactly the rest.
    let mut resumed = app.stream("", &w.alice, Some(&seen[0].1)).await;
    let rest = resumed.until_ready().await;
    assert_eq!(positions(&rest), ids[1..]);

    // The page, read again, has them too, with the same summaries.
    app.catch_up().await;
    let page = app.ok("/timeline?limit=3", &w.alice).await;
    let listed: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .rev()
        .map(|e| e["summary"].as_str().expect("a summary"))
        .collect();
    assert_eq!(listed, summaries);
}

#[tokio::test]
async fn an_event_shows_its_payload_metadata_and_the_state_before_and_after_it() {
    let app = start().await;
    let w = world(&app).await;
    app.post_ok(&format!("/tasks/{}/cancel", w.t1), &app.admin, json!({}))
        .await;
    app.catch_up().await;
    let events = app.all(&format!("&task={}", w.t1), &app.admin).await;
    let cancelled = events
        .iter()
        .find(|e| e["event_type"] == "TaskCancelled")
        .expect("cancelled");
    let position = cancelled["position"].as_i64().expect("a position");

    let d = app.ok(&format!("/events/{position}"), &w.alice).await;
    assert_eq!(d["event"]["summary"], "task cancelled before it ran");
    assert_eq!(d["event"]["position"], position);
    assert_eq!(d["metadata"]["actor"], "user:admin");
    assert!(d["metadata"]["at"].is_string());
    assert_eq!(d["before"]["state"], "queued");
    assert_eq!(d["after"]["state"], "cancelled");
    assert_eq!(d["after"]["id"], w.t1.as_str());

    let submitted = events.last().expect("the first event");
    let d = app
        .ok(&format!("/events/{}", submitted["position"]), &app.admin)
        .await;
    assert_eq!(d["before"], Value::Null);
    assert_eq!(d["after"]["state"], "queued");

    let node = app.all(&format!("&node={}", w.node), &app.admin).await;
    let connected = node
        .iter()
        .find(|e| e["event_type"] == "NodeConnected")
        .expect("connected");
    let d = app
        .ok(&format!("/events/{}", connected["position"]), &w.bob)
        .await;
    assert_eq!(d["before"]["status"], "provisioned");
    assert_eq!(d["after"]["status"], "online");
    assert!(d["after"].get("token_fingerprint").is_none());

    // Neither another project's event nor another user's is there for
    // alice: both answer as a position with no event would.
    let theirs = app.all(&format!("&task={}", w.t2), &app.admin).await;
    let answer = app
        .get(
            &format!("/api/v1/events/{}", theirs[0]["position"]),
            &w.alice,
        )
        .await;
    assert_eq!(answer.status, 404);
    let users = app.all("&aggregate_type=user", &app.admin).await;
    let bobs = users
        .iter()
        .find(|e| e["aggregate_id"] == "bob")
        .expect("bob's");
    let answer = app
        .get(&format!("/api/v1/events/{}", bobs["position"]), &w.alice)
        .await;
    assert_eq!(answer.status, 404);
}

#[tokio::test]
async fn the_web_view_is_served_from_the_binary_with_a_strict_policy() {
    let app = start().await;
    let client = &app.client;
    for (path, kind, needle) in [
        (
            "/",
            "text/html",
            "<script type=\"module\" src=\"/js/main.js\"></script>",
        ),
        ("/js/main.js", "text/javascript", "from './timeline.js'"),
        ("/js/api.js", "text/javascript", "/event-types"),
        ("/js/dom.js", "text/javascript", "export function h("),
        ("/js/dashboard.js", "text/javascript", "/timeline/stream"),
        ("/js/timeline.js", "text/javascript", "/timeline/stream"),
        (
            "/js/pages.js",
            "text/javascript",
            "export async function taskPage(",
        ),
        ("/app.css", "text/css", ".events"),
        ("/favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let r = client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .expect("answered");
        assert_eq!(r.status(), 200, "{path}");
        let headers = r.headers().clone();
        assert!(headers["content-type"]
            .to_str()
            .expect("text")
            .starts_with(kind));
        let csp = headers["content-security-policy"].to_str().expect("text");
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let body = r.text().await.expect("a body");
        assert!(body.contains(needle), "{path}");
        let etag = headers["etag"].clone();
        let again = client
            .get(format!("{}{path}", app.base))
            .header("if-none-match", etag)
            .send()
            .await
            .expect("answered");
        assert_eq!(again.status(), 304, "{path}");
    }
    // Every module another imports is served.
    for module in ["main", "api", "dom", "dashboard", "timeline", "pages"] {
        let body = client
            .get(format!("{}/js/{module}.js", app.base))
            .send()
            .await
            .expect("answered")
            .text()
            .await
            .expect("a body");
        for line in body.lines().filter(|l| l.starts_with("import ")) {
            let name = line
                .rsplit("from './")
                .next()
                .and_then(|rest| rest.strip_suffix("';"))
                .expect("an import from a sibling module");
            let r = client
                .get(format!("{}/js/{name}", app.base))
                .send()
                .await
                .expect("answered");
            assert_eq!(r.status(), 200, "{module}.js imports {name}");
        }
    }
    // The old single script and names outside the set are not there.
    for path in ["/app.js", "/js/app.js", "/js/..%2Fmod.rs", "/js/"] {
        let r = client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .expect("answered");
        assert_eq!(r.status(), 404, "{path}");
    }
    let r = client
        .get(format!("{}/nothing-here", app.base))
        .send()
        .await
        .expect("answered");
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.expect("the JSON envelope");
    assert!(body["errors"].is_array());
}

/// A node's events as an admin ran a host command on it and then drained
/// and undrained it.
async fn host_command(app: &App, node: &str) {
    testkit::scenes::host_command_then_drain(&app.store, node, "cat /etc/marker-command").await;
}

fn event_types(items: &Value) -> Vec<String> {
    items
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["event_type"].as_str().expect("a type").to_string())
        .collect()
}

/// Whether `text` shows anything of the host command.
fn shows_host_command(text: &str) -> bool {
    [
        "HostSsh",
        "marker-command",
        "marker-output",
        "over SSH",
        "host SSH",
    ]
    .iter()
    .any(|s| text.contains(s))
}

#[tokio::test]
async fn host_commands_are_for_admins_on_every_read_path() {
    let app = start().await;
    let alice = app.user("alice").await;
    let node = app.node("gpu-3").await;
    app.catch_up().await;
    let mut alice_live = app.stream("", &alice, None).await;
    alice_live.until_ready().await;
    let mut admin_live = app.stream("", &app.admin, None).await;
    admin_live.until_ready().await;

    host_command(&app, &node).await;

    // The live stream: the admin sees all four, Alice the last two only.
    let admins: Vec<String> = admin_live
        .take(4)
        .await
        .iter()
        .map(|(e, _)| e["event_type"].as_str().expect("a type").to_string())
        .collect();
    assert_eq!(
        admins,
        [
            "NodeHostSshRequested",
            "NodeHostSshFinished",
            "NodeDrained",
            "NodeUndrained"
        ]
    );
    let alices = alice_live.take(2).await;
    for (e, _) in &alices {
        assert!(!shows_host_command(&e.to_string()), "{e}");
    }
    assert_eq!(alices[0].0["event_type"], "NodeDrained");
    assert_eq!(alices[1].0["event_type"], "NodeUndrained");
    assert!(alice_live.quiet().await);
    // So does a stream that catches up from the log.
    let mut replayed = app.stream("?after=0", &alice, None).await;
    let caught_up = replayed.until_ready().await;
    assert!(caught_up.iter().any(|e| e["event_type"] == "NodeUndrained"));
    assert!(!caught_up.iter().any(|e| shows_host_command(&e.to_string())));
    let mut only_host = app
        .stream("?after=0&event_type=NodeHostSshRequested", &alice, None)
        .await;
    assert!(only_host.until_ready().await.is_empty());

    // /events pages come back full: the hidden events take no room.
    app.catch_up().await;
    let events = format!("/events?aggregate_type=node&aggregate_id={node}&limit=2");
    let first = app.ok(&events, &alice).await;
    assert_eq!(
        event_types(&first["items"]),
        ["NodeProvisioned", "NodeConnected"]
    );
    let after = first["next_after"].as_i64().expect("next_after");
    let second = app.ok(&format!("{events}&after={after}"), &alice).await;
    assert_eq!(
        event_types(&second["items"]),
        ["NodeDrained", "NodeUndrained"]
    );
    let after = second["next_after"].as_i64().expect("next_after");
    let third = app.ok(&format!("{events}&after={after}"), &alice).await;
    assert_eq!(event_types(&third["items"]), Vec::<String>::new());
    let all = app
        .ok(
            &format!("/events?aggregate_type=node&aggregate_id={node}"),
            &app.admin,
        )
        .await;
    let positions: Vec<i64> = all["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["position"].as_i64().expect("a position"))
        .collect();
    assert_eq!(all["items"].as_array().expect("items").len(), 6);
    assert!(shows_host_command(&all.to_string()));

    // /events/{position}: not there for Alice, there for the admin; the
    // events around them show nothing of them either.
    for (i, position) in positions.iter().enumerate() {
        let path = format!("/events/{position}");
        let (status, body) = app.get(&format!("/api/v1{path}"), &alice).await.pair();
        if (2..4).contains(&i) {
            assert_eq!(status, 404, "{body}");
            assert_eq!(
                body["errors"][0]["detail"],
                format!("there is no event at position {position}")
            );
            let shown = app.ok(&path, &app.admin).await;
            assert!(shows_host_command(&shown.to_string()));
        } else {
            assert_eq!(status, 200, "{body}");
            assert!(!shows_host_command(&body.to_string()), "{body}");
        }
    }

    // The timeline pages, whole and for the node, come back full too.
    let node_page = app
        .ok(&format!("/timeline?node={node}&limit=2"), &alice)
        .await;
    assert_eq!(
        event_types(&node_page["items"]),
        ["NodeUndrained", "NodeDrained"]
    );
    let before = node_page["next_before"].as_i64().expect("next_before");
    let older = app
        .ok(
            &format!("/timeline?node={node}&limit=2&before={before}"),
            &alice,
        )
        .await;
    assert_eq!(
        event_types(&older["items"]),
        ["NodeConnected", "NodeProvisioned"]
    );
    assert!(older["next_before"].is_null());
    let everything = app.all("", &alice).await;
    assert!(!everything
        .iter()
        .any(|e| shows_host_command(&e.to_string())));
    let asked = app
        .ok("/timeline?event_type=NodeHostSshFinished", &alice)
        .await;
    assert_eq!(event_types(&asked["items"]), Vec::<String>::new());
    let admins = app.all(&format!("&node={node}"), &app.admin).await;
    assert_eq!(admins.len(), 6);
    assert_eq!(
        admins[3]["summary"],
        "user:admin ran on the host of node gpu-3 over SSH: `cat /etc/marker-command` (time limit 30 s)"
    );

    // The node routes and the web view's data show nothing of it.
    for path in ["/nodes".to_string(), format!("/nodes/{node}")] {
        let shown = app.ok(&path, &alice).await;
        assert!(!shows_host_command(&shown.to_string()), "{shown}");
    }
    drop(alice_live);
    drop(admin_live);
}

fn listed_types(body: &Value) -> Vec<String> {
    body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|t| t["type"].as_str().expect("a type").to_string())
        .collect()
}

#[tokio::test]
async fn the_event_types_route_lists_every_type_an_admin_sees_and_hides_admin_only_ones() {
    let app = start().await;
    let alice = app.user("alice").await;
    let node = app.node("gpu-4").await;
    host_command(&app, &node).await;
    app.catch_up().await;

    let for_admin = app.ok("/event-types", &app.admin).await;
    let admin_types = listed_types(&for_admin);
    for item in for_admin["items"].as_array().expect("items") {
        let t = item["type"].as_str().expect("a type");
        let aggregate = item["aggregate"].as_str().expect("an aggregate");
        assert!(
            ["task", "node", "project", "user"].contains(&aggregate),
            "{item}"
        );
        assert!(t.to_lowercase().starts_with(aggregate), "{item}");
    }
    // Every type the admin meets in the log is in the admin's list.
    let seen = app.ok("/events?limit=1000", &app.admin).await;
    let seen = event_types(&seen["items"]);
    assert!(seen.contains(&"NodeHostSshFinished".to_string()));
    for t in &seen {
        assert!(
            admin_types.contains(t),
            "{t} is missing from {admin_types:?}"
        );
    }
    for t in ["TaskSubmitted", "ProjectCreated", "UserTokenRevoked"] {
        assert!(admin_types.contains(&t.to_string()), "{t}");
    }

    // Others get the same list without the host SSH events.
    let alices = listed_types(&app.ok("/event-types", &alice).await);
    assert!(!alices.iter().any(|t| shows_host_command(t)), "{alices:?}");
    let expected: Vec<String> = admin_types
        .iter()
        .filter(|t| !api::access::ADMIN_ONLY_EVENT_TYPES.contains(&t.as_str()))
        .cloned()
        .collect();
    assert_eq!(alices, expected);
    assert_eq!(alices.len() + 2, admin_types.len());
}
