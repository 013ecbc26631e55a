//! Poison, stalls and storage, as an operator meets them: an event the read
//! models cannot read, written into the log under a real `unidesk serve`,
//! shown by `unidesk projections status`, `/readyz` and `/metrics` until
//! `unidesk projections retry` clears it once fixed; a transaction a second
//! connection holds open, reported and warned about; the server's own
//! idle transaction ended by its timeout; and task output from agents
//! speaking the real protocol over real WebSockets, removed by retention
//! and budget (oldest finished first, never events) and refused while the
//! database is over its budget.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use chrono::Utc;
use clap::Parser;
use domain::task::{Task, TaskCommand};
use domain::Actor;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use store::Store;
use testkit::agent::JsonAgent;
use testkit::process::Api;
use unidesk::janitor::{Janitor, Swept};
use unidesk::roles::ServerArgs;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(30);

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// The server's flags alone, as `serve` takes them.
#[derive(Debug, Parser)]
struct Flags {
    #[command(flatten)]
    server: ServerArgs,
}

/// Runs `unidesk ARGS --database-url URL` (waiting in place, so the
/// test's pools go on working; see the replay tests).
fn unidesk(url: &str, args: &[&str]) -> Output {
    tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_unidesk"))
            .args(args)
            .arg("--database-url")
            .arg(url)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// `unidesk projections status --json`.
fn status(url: &str) -> Value {
    let out = unidesk(url, &["projections", "status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_str(&stdout(&out)).unwrap()
}

async fn get_plain(base: &str, path: &str) -> String {
    reqwest::get(format!("{base}{path}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn readyz(base: &str) -> Value {
    serde_json::from_str(&get_plain(base, "/readyz").await).unwrap()
}

/// The value of the metric line `name` (labels included).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l[name.len()..].trim().parse().ok())
}

fn task_body(project: &str) -> Value {
    json!({
        "project_id": project,
        "code_repo_url": "https://git.example.com/lab/code.git",
        "code_commit_id": SHA,
        "env_repo_url": "https://git.example.com/lab/env.git",
        "env_commit_id": SHA,
        "dockerfile_path": "Dockerfile",
        "command": ["sh", "run.sh"]
    })
}

/// A `TaskSubmitted` of task `id` in `project` as this version writes it.
fn submitted(id: Uuid, project: Uuid) -> Value {
    let spec = domain::spec::TaskSpecDraft {
        project_id: Some(project),
        code_repo_url: Some("https://git.example.com/lab/code.git".into()),
        code_commit_id: Some(SHA.into()),
        env_repo_url: Some("https://git.example.com/lab/env.git".into()),
        env_commit_id: Some(SHA.into()),
        dockerfile_path: Some("Dockerfile".into()),
        ..Default::default()
    }
    .validate(domain::spec::UrlPolicy::default())
    .unwrap();
    let events = Task::default()
        .decide(TaskCommand::Submit {
            task_id: id,
            spec,
            by: Actor::User("admin".into()),
            at: Utc::now(),
        })
        .unwrap();
    serde_json::to_value(&events[0]).unwrap()
}

/// Writes event 1 of task `id` with `payload`, as a writer that bypassed
/// this version's types would have.
async fn write_submitted(pool: &PgPool, id: Uuid, payload: &Value) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
           payload, metadata) VALUES ('task', $1, 1, 'TaskSubmitted', '1', $2, $3)",
    )
    .bind(id.to_string())
    .bind(payload)
    .bind(json!({"actor": "user:admin", "at": Utc::now().to_rfc3339()}))
    .execute(pool)
    .await
    .unwrap();
}

/// Replaces event 1 of task `id`. The log is immutable; this stands in for
/// a new version that reads the old payload (an upcaster).
async fn fix_submitted(pool: &PgPool, id: Uuid, payload: &Value) {
    sqlx::raw_sql(&format!(
        "BEGIN; ALTER TABLE events DISABLE TRIGGER events_are_immutable; \
         UPDATE events SET payload = '{}' WHERE aggregate_type = 'task' AND aggregate_id = '{id}'; \
         ALTER TABLE events ENABLE TRIGGER events_are_immutable; COMMIT",
        payload.to_string().replace('\'', "''")
    ))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_event_is_shown_by_status_readyz_and_metrics_until_a_retry_clears_it() {
    let db = testkit::fresh_db().await;
    let server = support::serve(&db.url, &["--poll-ms", "50"]).await;
    let api = server.api();
    let base = server.base().to_string();
    let project = api
        .post("/projects", json!({"name": "vision", "description": "d"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();

    // A TaskSubmitted this version cannot read: its spec is missing.
    let bad = Uuid::new_v4();
    let good = submitted(bad, project.parse().unwrap());
    let mut unreadable = good.clone();
    let spec = unreadable["Submitted"]
        .as_object_mut()
        .unwrap()
        .remove("spec")
        .unwrap();
    unreadable["Submitted"]["spek"] = spec;
    write_submitted(&db.pool, bad, &unreadable).await;

    // The read models go on past it: a task submitted and a node added
    // after it are listed.
    let after = api.post("/tasks", task_body(&project)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.post("/nodes", json!({"name": "gpu-1"})).await;
    testkit::eventually("the later task and node to be listed", PATIENCE, || async {
        let tasks = api.get(&format!("/tasks?project={project}")).await;
        let nodes = api.get("/nodes").await;
        (tasks.to_string().contains(&after) && nodes.to_string().contains("gpu-1")).then_some(())
    })
    .await;

    // Shown in all three places.
    // The read models advance one after the other: wait for both letters.
    let ready = testkit::eventually(
        "readyz to say degraded by both letters",
        PATIENCE,
        || async {
            let r = readyz(&base).await;
            (r["status"] == "degraded"
                && r["checks"]["dead_letters"].as_array().map(Vec::len) == Some(2))
            .then_some(r)
        },
    )
    .await;
    assert_eq!(
        ready["checks"]["dead_letters"],
        json!([{"consumer": "tasks", "count": 1}, {"consumer": "timeline", "count": 1}])
    );
    let text = get_plain(&base, "/metrics").await;
    assert_eq!(
        metric(&text, "unidesk_dead_letters{consumer=\"tasks\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "unidesk_degraded"), Some(1.0));
    let s = status(&db.url);
    let tasks = s["read_models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "tasks")
        .unwrap();
    assert_eq!(tasks["consistent"], false);
    assert_eq!(tasks["dead_letters"], 1);
    assert_eq!(tasks["lag"], 0);
    let letters = s["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0]["consumer"], "tasks");
    assert_eq!(letters[0]["aggregate_id"], bad.to_string());
    assert_eq!(letters[0]["event_type"], "TaskSubmitted");
    assert!(
        letters[0]["error"].as_str().unwrap().contains("spec"),
        "{s}"
    );
    let table = stdout(&unidesk(&db.url, &["projections", "status"]));
    assert!(table.contains("INCONSISTENT"), "{table}");
    assert!(table.contains(&bad.to_string()), "{table}");

    // A retry before the fix clears nothing, and says so by its status.
    let out = unidesk(&db.url, &["projections", "retry"]);
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("cleared 0 dead letter(s); 2 remain"),
        "{out:?}"
    );

    fix_submitted(&db.pool, bad, &good).await;
    let out = unidesk(&db.url, &["projections", "retry"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).contains("cleared 2 dead letter(s); 0 remain"),
        "{out:?}"
    );

    testkit::eventually("readyz to say ready again", PATIENCE, || async {
        (readyz(&base).await["status"] == "ready").then_some(())
    })
    .await;
    let text = get_plain(&base, "/metrics").await;
    // Every consumer is listed, with none left.
    assert_eq!(
        metric(&text, "unidesk_dead_letters{consumer=\"tasks\"}"),
        Some(0.0)
    );
    assert!(
        text.lines()
            .filter(|l| l.starts_with("unidesk_dead_letters{"))
            .all(|l| l.ends_with(" 0")),
        "{text}"
    );
    assert_eq!(metric(&text, "unidesk_degraded"), Some(0.0));
    let s = status(&db.url);
    assert_eq!(s["dead_letters"], json!([]));
    assert!(s["read_models"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["consistent"] == true));
    let tasks = api.get(&format!("/tasks?project={project}")).await;
    assert!(tasks.to_string().contains(&bad.to_string()), "{tasks}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_held_open_elsewhere_is_reported_and_warned_about() {
    let db = testkit::fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let server = support::serve_with(&db.url, &["--stall-warn-s", "1"], |l| {
        l.log_to(&log).env("RUST_LOG", "info")
    })
    .await;
    let base = server.base().to_string();
    let mut holder = PgConnection::connect(&db.url).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    sqlx::raw_sql("SET application_name = 'forgotten'; BEGIN; SELECT pg_current_xact_id()")
        .execute(&mut holder)
        .await
        .unwrap();

    // Other tests share the database server: theirs may be older for a
    // moment.
    let ready = testkit::eventually("readyz to name the transaction", PATIENCE, || async {
        let r = readyz(&base).await;
        let t = &r["checks"]["oldest_transaction"];
        (r["status"] == "degraded" && t["pid"] == pid && t["age_s"].as_f64()? > 1.0).then_some(r)
    })
    .await;
    assert!(
        ready["reasons"]
            .to_string()
            .contains("holds every outbox consumer back"),
        "{ready}"
    );
    let text = get_plain(&base, "/metrics").await;
    assert!(metric(&text, "unidesk_oldest_transaction_seconds").unwrap() > 1.0);
    let oldest = testkit::eventually("status to name the transaction", PATIENCE, || async {
        let s = status(&db.url);
        (s["oldest_transaction"]["pid"] == pid).then(|| s["oldest_transaction"].clone())
    })
    .await;
    assert_eq!(oldest["application"], "forgotten");
    assert_eq!(oldest["state"], "idle in transaction");
    // The scheduler role's watch warns in the server's log.
    testkit::eventually("a warning in the server's log", PATIENCE, || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.contains("a transaction has been open for") && text.contains("forgotten"))
            .then_some(())
    })
    .await;
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
}

#[tokio::test]
async fn the_server_pool_ends_a_transaction_of_its_own_left_idle() {
    let flags = Flags::try_parse_from(["serve", "--db-idle-tx-timeout-s", "1"])
        .unwrap()
        .server;
    let db = testkit::fresh_db().await;
    let pool = unidesk::cli::connect_server(&db.url, flags.session_timeouts())
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx)
        .await
        .unwrap();
    testkit::eventually(
        "the server's idle transaction to be ended",
        PATIENCE,
        || async {
            let alive: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                    .bind(pid)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            (!alive).then_some(())
        },
    )
    .await;
    assert!(sqlx::query("SELECT 1").execute(&mut *tx).await.is_err());
}

#[test]
fn the_bounds_have_documented_defaults_and_refuse_nonsense() {
    let d = Flags::try_parse_from(["serve"]).unwrap().server;
    assert_eq!(d.log_retention_days, 90);
    assert_eq!(d.log_budget_gb, 20.0);
    assert_eq!(d.db_budget_gb, 0.0);
    assert_eq!(d.db_idle_tx_timeout_s, 30);
    assert_eq!(d.db_statement_timeout_s, 60);
    assert_eq!(d.stall_warn_s, 30);
    let j = d.janitor();
    assert_eq!(j.retention, Some(Duration::from_secs(90 * 24 * 3600)));
    assert_eq!(j.log_budget_bytes, 20 << 30);
    assert_eq!(j.limits.db_budget_bytes, 0);
    let off = Flags::try_parse_from(["serve", "--log-retention-days", "0", "--log-budget-gb", "0"])
        .unwrap()
        .server
        .janitor();
    assert_eq!((off.retention, off.log_budget_bytes), (None, 0));
    let small = Flags::try_parse_from(["serve", "--db-budget-gb", "0.5"])
        .unwrap()
        .server;
    assert_eq!(small.health_limits().db_budget_bytes, 1 << 29);
    for bad in [
        ["--log-budget-gb", "-1"],
        ["--db-budget-gb", "lots"],
        ["--stall-warn-s", "0"],
    ] {
        let mut args = vec!["serve"];
        args.extend(bad);
        assert!(Flags::try_parse_from(args).is_err(), "{bad:?}");
    }
}

// ------------------------------------------------------------ output bounds

/// The API and the ingress on one port over a fresh database, an admin, a
/// project and a node whose agent is connected.
struct Platform {
    base: String,
    store: Store,
    pool: PgPool,
    api: Api,
    project: String,
    node: Uuid,
    agent: JsonAgent,
    _dir: tempfile::TempDir,
}

impl Platform {
    async fn start(health: store::health::Limits) -> Platform {
        let db = testkit::fresh_db().await;
        let store = Store::new(db.pool.clone());
        let dir = tempfile::tempdir().unwrap();
        let admin = api::bootstrap_admin(&store, &dir.path().join("admin.token"))
            .await
            .unwrap();
        let state = api::AppState::new(
            store.clone(),
            api::Config {
                health,
                ..api::Config::default()
            },
        );
        let ingress = ingress::Ingress::new(
            store.clone(),
            ingress::Config {
                ingress_id: "bounds".into(),
                poll: Duration::from_millis(50),
                ..ingress::Config::default()
            },
        );
        let app = api::router(state).merge(ingress.router());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        tokio::spawn(async move { ingress.run(std::future::pending()).await });
        let api = Api {
            http: reqwest::Client::new(),
            base: format!("http://{addr}/api/v1"),
            token: admin,
        };
        let project = api
            .post("/projects", json!({"name": "vision", "description": "d"}))
            .await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let (node, token) = api::provision_node(
            &store,
            "gpu-1",
            Default::default(),
            &Actor::User("admin".into()),
        )
        .await
        .unwrap();
        let agent = JsonAgent::join(addr, &token, json!([])).await;
        Platform {
            base: format!("http://{addr}"),
            pool: db.pool.clone(),
            store,
            api,
            project,
            node: node.id.unwrap(),
            agent,
            _dir: dir,
        }
    }

    /// A task placed on the node, accepted and running.
    async fn running(&mut self) -> Uuid {
        let id: Uuid = self.api.post("/tasks", task_body(&self.project)).await["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        self.store
            .execute::<Task>(
                &id.to_string(),
                TaskCommand::Assign {
                    node_id: self.node,
                    gpus: vec![],
                    reason: "test".into(),
                    at: Utc::now(),
                },
                &Actor::System("scheduler".into()),
                Utc::now(),
            )
            .await
            .unwrap();
        for state in ["accepted", "running"] {
            self.status(id, state).await;
        }
        id
    }

    async fn status(&mut self, task: Uuid, state: &str) {
        self.agent
            .report(json!({"type": "status", "task_id": task, "attempt": 1,
                           "state": state, "container": "c0ffee"}))
            .await;
    }

    /// Sends a chunk of output; the error when the server refused it.
    async fn log(&mut self, task: Uuid, offset: u64, data: &str) -> Option<String> {
        let id = self
            .agent
            .send_report(json!({"type": "log", "task_id": task, "attempt": 1,
                                "offset": offset, "data": data}))
            .await;
        self.agent.received(id).await
    }

    /// A task that ran, printed `bytes` bytes and succeeded.
    async fn finished(&mut self, bytes: usize) -> Uuid {
        let id = self.running().await;
        assert_eq!(self.log(id, 0, &"x".repeat(bytes)).await, None);
        self.status(id, "succeeded").await;
        id
    }

    async fn logs(&self, task: Uuid) -> Value {
        self.api.get(&format!("/tasks/{task}/logs")).await
    }

    async fn catch_up(&self) {
        projections::Projector::new(self.pool.clone())
            .catch_up()
            .await
            .unwrap();
    }

    async fn events(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    fn janitor(&self, retention_days: u64, log_budget_bytes: u64, db_budget_bytes: u64) -> Janitor {
        Janitor::new(
            self.store.clone(),
            unidesk::janitor::Config {
                retention: (retention_days > 0)
                    .then(|| Duration::from_secs(retention_days * 24 * 3600)),
                log_budget_bytes,
                limits: store::health::Limits {
                    db_budget_bytes,
                    stall_after: Duration::from_secs(3600),
                },
            },
        )
    }
}

/// Three tasks that finished in turn with 1000 bytes of output each, and
/// one still running with as much.
async fn four_tasks(p: &mut Platform) -> ([Uuid; 3], Uuid) {
    let done = [
        p.finished(1000).await,
        p.finished(1000).await,
        p.finished(1000).await,
    ];
    let running = p.running().await;
    assert_eq!(p.log(running, 0, &"y".repeat(1000)).await, None);
    p.catch_up().await;
    (done, running)
}

fn removed(logs: &Value) -> Option<&str> {
    logs.get("removed").and_then(|r| r["reason"].as_str())
}

#[tokio::test]
async fn output_of_finished_tasks_past_the_retention_is_removed_and_the_api_says_so() {
    let mut p = Platform::start(Default::default()).await;
    let (done, running) = four_tasks(&mut p).await;
    let events = p.events().await;
    let janitor = p.janitor(90, 0, 0);

    assert_eq!(janitor.sweep(Utc::now()).await.unwrap(), Swept::default());
    let later = Utc::now() + chrono::Duration::days(91);
    let swept = janitor.sweep(later).await.unwrap();
    assert_eq!((swept.tasks, swept.bytes), (3, 3000));
    for task in done {
        let logs = p.logs(task).await;
        assert_eq!(logs["data"], "");
        assert_eq!(logs["complete"], true);
        assert_eq!(removed(&logs), Some("retention"), "{logs}");
        let shown = p.api.get(&format!("/tasks/{task}")).await;
        assert_eq!(shown["output_removed"][0]["reason"], "retention");
    }
    // A running task's output stays, however old.
    let logs = p.logs(running).await;
    assert_eq!(logs["data"].as_str().unwrap().len(), 1000);
    assert_eq!(removed(&logs), None);
    assert_eq!(p.events().await, events, "no event was touched");
    assert_eq!(janitor.sweep(later).await.unwrap(), Swept::default());
}

#[tokio::test]
async fn past_the_output_budget_the_oldest_finished_output_goes_first() {
    let mut p = Platform::start(Default::default()).await;
    let (done, running) = four_tasks(&mut p).await;
    let events = p.events().await;
    // 4000 bytes stored; the budget is 2500: the two oldest finished go.
    let janitor = p.janitor(0, 2500, 0);
    let swept = janitor.sweep(Utc::now()).await.unwrap();
    assert_eq!((swept.tasks, swept.bytes), (2, 2000));
    assert_eq!(removed(&p.logs(done[0]).await), Some("log_budget"));
    assert_eq!(removed(&p.logs(done[1]).await), Some("log_budget"));
    assert_eq!(p.logs(done[2]).await["data"].as_str().unwrap().len(), 1000);
    assert_eq!(p.logs(running).await["data"].as_str().unwrap().len(), 1000);
    assert_eq!(store::task_log::total_bytes(&p.pool).await.unwrap(), 2000);
    assert_eq!(janitor.sweep(Utc::now()).await.unwrap(), Swept::default());
    // Under a budget only running output can fill, nothing more goes.
    let tight = p.janitor(0, 500, 0);
    let swept = tight.sweep(Utc::now()).await.unwrap();
    assert_eq!(swept.tasks, 1);
    assert_eq!(p.logs(running).await["data"].as_str().unwrap().len(), 1000);
    assert_eq!(p.events().await, events, "no event was touched");
}

#[tokio::test]
async fn over_the_database_budget_output_is_refused_and_the_agent_told_while_events_go_on() {
    let mut p = Platform::start(store::health::Limits {
        db_budget_bytes: 1,
        stall_after: Duration::from_secs(3600),
    })
    .await;
    let task = p.running().await;
    assert_eq!(p.log(task, 0, "first\n").await, None);

    // A budget of one byte: the watch refuses output from now on.
    let report = p.janitor(0, 0, 1).watch().await.unwrap();
    assert!(report.output_refused);
    let refused = p.log(task, 6, "second\n").await;
    assert_eq!(refused.as_deref(), Some(store::task_log::REFUSED));
    let again = p.log(task, 13, "third\n").await;
    assert_eq!(again.as_deref(), Some(store::task_log::REFUSED));
    // Events are still stored: the task ends as reported.
    p.status(task, "succeeded").await;
    let shown = p.api.get(&format!("/tasks/{task}")).await;
    assert_eq!(shown["state"], "succeeded");
    assert_eq!(shown["output_removed"][0]["reason"], "db_budget");
    let logs = p.logs(task).await;
    assert_eq!(logs["data"], "first\n");
    assert_eq!(logs["complete"], true);
    assert_eq!(logs["removed"]["reason"], "db_budget");
    assert_eq!(logs["removed"]["from_offset"], 6);
    let ready = readyz(&p.base).await;
    assert_eq!(ready["status"], "degraded");
    assert_eq!(ready["checks"]["task_output_refused"], true);
    let text = get_plain(&p.base, "/metrics").await;
    assert_eq!(metric(&text, "unidesk_task_output_refused"), Some(1.0));

    // The budget lifted: output is stored again.
    let report = p.janitor(0, 0, 0).watch().await.unwrap();
    assert!(!report.output_refused);
    let next = p.running().await;
    assert_eq!(p.log(next, 0, "back\n").await, None);
    assert_eq!(p.logs(next).await["data"], "back\n");
}
