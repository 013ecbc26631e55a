//! The web view in a real headless Chromium, against the server's own
//! roles (API and projector) on a real PostgreSQL: a user signs in with a
//! token, opens a task, sees a new event arrive without a reload, clicks it
//! and sees what it changed; a user outside the project sees nothing of it.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::time::Duration;

use chrono::Utc;
use domain::node::{Node, NodeCommand, NodeResources};
use domain::Actor;
use fantoccini::Locator;
use serde_json::{json, Value};
use store::queue_reasons::{Explanation, Reason};
use store::Store;
use testkit::browser::Browser;
use testkit::process::Api;
use unidesk::cli::Role;
use unidesk::roles::{self, ServerArgs, Services};
use uuid::Uuid;

/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(15);

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// The API and the projector on one port, as `unidesk serve` runs them.
struct Server {
    base: String,
    admin: String,
    store: Store,
    http: reqwest::Client,
    services: Services,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        let db = testkit::fresh_db().await;
        let store = Store::new(db.pool.clone());
        let dir = tempfile::tempdir().unwrap();
        let admin = api::bootstrap_admin(&store, &dir.path().join("admin.token"))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let args = ServerArgs {
            poll_ms: 50,
            ..ServerArgs::defaults()
        };
        let services = roles::start(
            store.clone(),
            listener,
            &[Role::Api, Role::Projector],
            &args,
        )
        .unwrap();
        Server {
            base,
            admin,
            store,
            http: reqwest::Client::new(),
            services,
            _dir: dir,
        }
    }

    async fn post(&self, token: &str, path: &str, body: Value) -> Value {
        let api = Api {
            http: self.http.clone(),
            base: format!("{}/api/v1", self.base),
            token: token.to_string(),
        };
        api.post(path, body).await
    }

    async fn user(&self, name: &str) -> String {
        let admin = Api {
            http: self.http.clone(),
            base: format!("{}/api/v1", self.base),
            token: self.admin.clone(),
        };
        support::user(&admin, name).await
    }

    /// The admin's task running `command` (retried once) in a new project
    /// `vision`; its id.
    async fn task_in_a_new_project(&self, command: Value) -> String {
        let project = self
            .post(&self.admin, "/projects", json!({"name": "vision"}))
            .await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let task = json!({
            "project_id": project,
            "code_repo_url": "https://git.example.com/lab/code.git",
            "code_commit_id": SHA,
            "env_repo_url": "https://git.example.com/lab/env.git",
            "env_commit_id": SHA,
            "dockerfile_path": "Dockerfile",
            "command": command,
            "max_retries": 1,
        });
        self.post(&self.admin, "/tasks", task).await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A node whose agent connected, as the ingress records it.
    async fn node(&self, name: &str) -> String {
        let id = self
            .post(
                &self.admin,
                "/nodes",
                json!({ "name": name, "labels": {"gpu": "a100"} }),
            )
            .await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let at = Utc::now();
        let connect = NodeCommand::Connect {
            session: Uuid::now_v7(),
            agent_version: "0.1.0".into(),
            resources: NodeResources {
                cpus: 32.0,
                memory_mb: 262_144,
                gpus: vec![],
            },
            labels: Default::default(),
            at,
        };
        self.store
            .execute::<Node>(&id, connect, &Actor::Node(id.clone()), at)
            .await
            .unwrap();
        id
    }
}

/// Signs in through the form with `token`.
async fn sign_in(b: &Browser, token: &str) {
    let field = b.wait_for("#token", PATIENCE).await.unwrap();
    field.send_keys(token).await.unwrap();
    b.client
        .find(Locator::Css("#sign-in-form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for("#nav:not([hidden])", PATIENCE).await.unwrap();
}

async fn text(b: &Browser, css: &str) -> String {
    b.wait_for(css, PATIENCE)
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The text of an event's detail once it has loaded: the panel shows
/// "Loading…" until the event's state arrives.
async fn detail(b: &Browser) -> String {
    testkit::eventually("the event's detail to load", PATIENCE, || async {
        let detail = text(b, ".detail").await;
        (!detail.contains("Loading…")).then_some(detail)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_follows_a_task_live_and_sees_what_an_event_changed_and_outsiders_see_nothing() {
    let server = Server::start().await;
    let bob = server.user("bob").await;
    let node = server.node("gpu-3").await;
    let task = server
        .task_in_a_new_project(json!(["python", "train.py", "--epochs", "10"]))
        .await;

    let b = Browser::start().await.unwrap();
    b.client.goto(&server.base).await.unwrap();
    sign_in(&b, &server.admin).await;

    // The dashboard lists the node and the task, then leads to the task.
    let node_row = text(&b, &format!("tr[data-node-id=\"{node}\"]")).await;
    assert!(
        node_row.contains("gpu-3") && node_row.contains("online"),
        "{node_row}"
    );
    let task_row = text(&b, &format!("tr[data-task-id=\"{task}\"]")).await;
    assert!(
        task_row.contains("queued") && task_row.contains("vision"),
        "{task_row}"
    );
    b.client
        .find(Locator::Css(&format!(
            "tr[data-task-id=\"{task}\"] a[href=\"#/tasks/{task}\"]"
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The task's timeline, followed live.
    let submitted = text(&b, ".events li[data-type=\"TaskSubmitted\"]").await;
    assert!(
        submitted.contains("user:admin submitted `python train.py --epochs 10`"),
        "{submitted}"
    );
    b.wait_for(".live[data-live=\"on\"]", PATIENCE)
        .await
        .unwrap();
    b.client
        .execute("window.unideskMark = 'no reload'; return true;", vec![])
        .await
        .unwrap();

    // No scheduler runs here: the queued task says it waits for one. Once
    // the scheduler records why it waits, the page shows that, unasked.
    let waiting = text(&b, ".queue .queue-summary").await;
    assert_eq!(waiting, "waiting for the scheduler to look at it");
    let position = text(&b, ".queue .queue-position").await;
    assert!(position.contains("Position 1 in the queue"), "{position}");
    let why = Explanation {
        summary: "no online node carries label gpu=h100 (of 1 node: 1 lacks label gpu=h100)".into(),
        reasons: vec![Reason::Label {
            label: "gpu=h100".into(),
            nodes_filtered: 1,
        }],
    };
    let id: Uuid = task.parse().unwrap();
    store::queue_reasons::record(server.store.pool(), 1, Utc::now(), &[(id, 0, &why)], &[])
        .await
        .unwrap();
    let reason = text(&b, ".queue .queue-reasons li[data-kind=\"label\"]").await;
    assert_eq!(reason, "1 node without label gpu=h100.");
    let summary = text(&b, ".queue .queue-summary").await;
    assert_eq!(summary, why.summary);

    // A change made elsewhere appears without a reload.
    server
        .post(&server.admin, &format!("/tasks/{task}/cancel"), json!({}))
        .await;
    let cancelled = text(&b, ".events li[data-type=\"TaskCancelled\"]").await;
    assert!(
        cancelled.contains("task cancelled before it ran"),
        "{cancelled}"
    );
    let mark = b
        .client
        .execute("return window.unideskMark || null;", vec![])
        .await
        .unwrap();
    assert_eq!(mark, json!("no reload"), "the page was not reloaded");
    let newest = b
        .client
        .find(Locator::Css(".events li"))
        .await
        .unwrap()
        .attr("data-type")
        .await
        .unwrap();
    assert_eq!(newest.as_deref(), Some("TaskCancelled"), "newest first");
    // The task's own header follows too, and it no longer waits.
    b.wait_for("h1 .badge.cancelled", PATIENCE).await.unwrap();
    b.wait_for(".queue[hidden]", PATIENCE).await.unwrap();

    // Clicking the event shows the state it left next to the one before.
    b.client
        .find(Locator::Css(
            ".events li[data-type=\"TaskCancelled\"] button.ev",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let before = text(&b, ".diff tr[data-path=\"state\"] td.before").await;
    let after = text(&b, ".diff tr[data-path=\"state\"] td.after").await;
    assert_eq!(
        (before.as_str(), after.as_str()),
        ("\"queued\"", "\"cancelled\"")
    );
    let detail = detail(&b).await;
    assert!(
        detail.contains("TaskCancelled") && detail.contains("user:admin"),
        "{detail}"
    );

    // Bob is in no project: the task is not his to see, anywhere.
    b.client
        .find(Locator::Css("#sign-out"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    sign_in(&b, &bob).await;
    b.client
        .goto(&format!("{}/#/tasks/{task}", server.base))
        .await
        .unwrap();
    let refused = text(&b, ".notice.bad").await;
    assert!(refused.contains("not found"), "{refused}");
    b.client
        .goto(&format!("{}/#/timeline", server.base))
        .await
        .unwrap();
    b.wait_for(".live[data-live=\"on\"]", PATIENCE)
        .await
        .unwrap();
    let shown = b
        .client
        .find_all(Locator::Css(&format!(
            ".events li[data-aggregate-id=\"{task}\"]"
        )))
        .await
        .unwrap();
    assert!(shown.is_empty(), "bob sees none of the task's events");
    let nodes_events = b
        .client
        .find_all(Locator::Css(&format!(
            ".events li[data-aggregate-id=\"{node}\"]"
        )))
        .await
        .unwrap();
    assert!(!nodes_events.is_empty(), "but every node's");
    b.client.goto(&format!("{}/#/", server.base)).await.unwrap();
    b.wait_for("#tasks-title", PATIENCE).await.unwrap();
    let rows = b
        .client
        .find_all(Locator::Css(&format!("tr[data-task-id=\"{task}\"]")))
        .await
        .unwrap();
    assert!(rows.is_empty(), "nor the task on the dashboard");

    b.close().await;
    server.services.stop().await;
}

#[tokio::test]
async fn a_task_page_says_why_each_attempt_ended() {
    use domain::task::{Outcome, TaskCommand};
    let server = Server::start().await;
    let node: Uuid = server.node("gpu-3").await.parse().unwrap();
    let task = server
        .task_in_a_new_project(json!(["python", "train.py"]))
        .await;
    let lost = "the node could not run attempt 1: ended with exit status 143 while Docker was \
                not answering (a Docker restart stops its containers)";
    let failed = "building the image failed:\nStep 1/3 : FROM scratch\n<b>COPY failed</b>";
    let lose = TaskCommand::MarkLost {
        node_id: node,
        attempt: 1,
        reason: lost.into(),
        at: Utc::now(),
    };
    testkit::scenes::attempt_on(&server.store, &task, node, 1, [lose]).await;
    let fail = TaskCommand::ReportExited {
        node_id: node,
        attempt: 2,
        outcome: Outcome::Failed {
            exit_code: None,
            reason: failed.into(),
        },
        at: Utc::now(),
    };
    testkit::scenes::attempt_on(&server.store, &task, node, 2, [fail]).await;

    let b = Browser::start().await.unwrap();
    b.client.goto(&server.base).await.unwrap();
    sign_in(&b, &server.admin).await;
    b.client
        .goto(&format!("{}/#/tasks/{task}", server.base))
        .await
        .unwrap();
    b.wait_for("h1 .badge.failed", PATIENCE).await.unwrap();
    let mut shown = Vec::new();
    for cell in b.client.find_all(Locator::Css("td.why")).await.unwrap() {
        let title = cell.attr("title").await.unwrap();
        shown.push((cell.text().await.unwrap(), title));
    }
    // A reason of many lines shows its first there, whole when pointed at,
    // as text, never as markup.
    assert_eq!(
        shown,
        [
            (lost.to_string(), Some(lost.to_string())),
            (
                "building the image failed: …".to_string(),
                Some(failed.to_string())
            ),
        ]
    );
    b.close().await;
    server.services.stop().await;
}

impl Server {
    /// An admin's host command on `node`, then a drain and an undrain, as
    /// the API and the ingress record them.
    async fn host_command(&self, node: &str, command: &str) {
        testkit::scenes::host_command_then_drain(&self.store, node, command).await;
    }
}

/// How many elements match `css` once at least `n` do.
async fn wait_count(b: &Browser, css: &str, n: usize) -> usize {
    testkit::eventually(&format!("{n} of {css}"), PATIENCE, || async {
        let found = b.client.find_all(Locator::Css(css)).await.unwrap().len();
        (found >= n).then_some(found)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_commands_on_a_node_are_shown_to_admins_only() {
    let server = Server::start().await;
    let bob = server.user("bob").await;
    let node = server.node("gpu-3").await;
    server.host_command(&node, "cat /etc/marker-one").await;

    let b = Browser::start().await.unwrap();
    b.client.goto(&server.base).await.unwrap();
    sign_in(&b, &bob).await;
    b.client
        .goto(&format!("{}/#/nodes/{node}", server.base))
        .await
        .unwrap();
    b.wait_for(".live[data-live=\"on\"]", PATIENCE)
        .await
        .unwrap();
    wait_count(&b, ".events li[data-type=\"NodeUndrained\"]", 1).await;

    // Another command while Bob watches: the drain after it arrives, the
    // command does not.
    server.host_command(&node, "cat /etc/marker-two").await;
    wait_count(&b, ".events li[data-type=\"NodeUndrained\"]", 2).await;
    let host = b
        .client
        .find_all(Locator::Css(".events li[data-type^=\"NodeHostSsh\"]"))
        .await
        .unwrap();
    assert!(host.is_empty(), "bob sees no host command");
    let page = text(&b, "#view").await;
    assert!(!page.contains("marker") && !page.contains("SSH"), "{page}");
    let alerts = b
        .client
        .find_all(Locator::Css(".notice.bad"))
        .await
        .unwrap();
    assert!(alerts.is_empty(), "and nothing broke");
    // Clicking an event next to them shows what it changed.
    b.client
        .find(Locator::Css(
            ".events li[data-type=\"NodeDrained\"] button.ev",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let detail = detail(&b).await;
    assert!(detail.contains("NodeDrained"), "{detail}");
    assert!(!detail.contains("marker"), "{detail}");
    // The timeline does not offer the host command types as a filter.
    b.client
        .goto(&format!("{}/#/timeline", server.base))
        .await
        .unwrap();
    b.wait_for("#event-types", PATIENCE).await.unwrap();
    let offered = b
        .client
        .find_all(Locator::Css("#event-types option[value^=\"NodeHostSsh\"]"))
        .await
        .unwrap();
    assert!(offered.is_empty());

    // The admin sees both commands, live and in words.
    b.client
        .find(Locator::Css("#sign-out"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    sign_in(&b, &server.admin).await;
    b.client
        .goto(&format!("{}/#/nodes/{node}", server.base))
        .await
        .unwrap();
    wait_count(&b, ".events li[data-type=\"NodeHostSshRequested\"]", 2).await;
    let page = text(&b, "#view").await;
    assert!(
        page.contains("cat /etc/marker-one") && page.contains("cat /etc/marker-two"),
        "{page}"
    );
    b.client
        .goto(&format!("{}/#/timeline", server.base))
        .await
        .unwrap();
    b.wait_for("#event-types", PATIENCE).await.unwrap();
    let offered = b
        .client
        .find_all(Locator::Css("#event-types option[value^=\"NodeHostSsh\"]"))
        .await
        .unwrap();
    assert_eq!(offered.len(), 2);

    b.close().await;
    server.services.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_page_shows_what_its_agent_claims_apart_from_what_counts() {
    let server = Server::start().await;
    let id = server
        .post(
            &server.admin,
            "/nodes",
            json!({"name": "boaster", "labels": {"zone": "lab"}, "max_resources": {"cpus": 4}}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let at = Utc::now();
    let connect = NodeCommand::Connect {
        session: Uuid::now_v7(),
        agent_version: "0.9.7-wsl".into(),
        resources: NodeResources {
            cpus: 32.0,
            memory_mb: 4096,
            gpus: vec![],
        },
        labels: [("gpu".to_string(), "a100".to_string())].into(),
        at,
    };
    server
        .store
        .execute::<Node>(&id, connect, &Actor::Node(id.clone()), at)
        .await
        .unwrap();

    let b = Browser::start().await.unwrap();
    b.client.goto(&server.base).await.unwrap();
    sign_in(&b, &server.admin).await;
    // The dashboard lists each node's agent version, and every page says
    // which server answers.
    let row = format!("tr[data-node-id=\"{id}\"]");
    testkit::eventually("the node's agent version in its row", PATIENCE, || async {
        let shown = match b.client.find(Locator::Css(&row)).await {
            Ok(element) => element.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        shown.contains("0.9.7-wsl").then_some(())
    })
    .await;
    testkit::eventually("the server's version in the footer", PATIENCE, || async {
        let shown = text(&b, "#server-version").await;
        shown
            .contains(&format!("server {}", env!("CARGO_PKG_VERSION")))
            .then_some(())
    })
    .await;
    b.client
        .goto(&format!("{}/#/nodes/{id}", server.base))
        .await
        .unwrap();
    let facts = text(&b, "dl.facts").await;
    for shown in [
        "4 (declares 32)",
        "at most 4 CPU",
        "zone=lab",
        "Declared labels\ngpu=a100\nnot matched until an admin accepts them",
    ] {
        assert!(facts.contains(shown), "{shown:?} not in {facts}");
    }
    // Once an admin accepts it, the page shows the label as counted.
    b.wait_for(".live[data-live=\"on\"]", PATIENCE)
        .await
        .unwrap();
    server
        .post(
            &server.admin,
            &format!("/nodes/{id}/labels/accept"),
            json!({"keys": ["gpu"]}),
        )
        .await;
    testkit::eventually(
        "the node's facts to show gpu=a100 matched",
        PATIENCE,
        || async {
            // The facts are redrawn when the event arrives: a read may meet
            // the old element as it goes away, and is then simply tried
            // again.
            let facts = match b.client.find(Locator::Css("dl.facts")).await {
                Ok(element) => element.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            (!facts.contains("not matched") && facts.contains("gpu=a100")).then_some(())
        },
    )
    .await;
    b.close().await;
    server.services.stop().await;
}
