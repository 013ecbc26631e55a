//! What `/readyz` and `/metrics` say about the platform as a whole, over
//! real HTTP on a real PostgreSQL: dead letters (from an event the read
//! models cannot read, written into the log), a transaction a second
//! connection holds open, the database's size budget; and what the logs
//! API says of output that retention removed.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::time::Duration;

use api::Config;
use chrono::Utc;
use domain::task::{Outcome, TaskCommand};
use domain::Actor;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use store::task_log::{self, RemovedBy};
use support::{minimal_task, App};
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(20);

fn config(limits: store::health::Limits) -> Config {
    Config {
        health: limits,
        ..Config::default()
    }
}

async fn readyz(app: &App) -> Value {
    let answer = app.call(reqwest::Method::GET, "/readyz", None, None).await;
    answer.expect(200).clone()
}

async fn metrics(app: &App) -> String {
    let answer = app.call(reqwest::Method::GET, "/metrics", None, None).await;
    answer.expect(200).as_str().unwrap().to_string()
}

/// The value of the metric line starting with `name` (labels included).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l[name.len()..].trim().parse().ok())
}

#[tokio::test]
async fn a_dead_letter_makes_readyz_degraded_and_shows_in_metrics_without_naming_anything() {
    let app = App::start(Config::default()).await;
    let ready = readyz(&app).await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["dead_letters"], json!([]));
    assert!(ready.get("reasons").is_none());

    // A TaskSubmitted this version cannot read, written into the log.
    let bad = Uuid::new_v4();
    sqlx::query("INSERT INTO events VALUES ('task', $1, 1, 'TaskSubmitted', '1', $2, $3)")
        .bind(bad.to_string())
        .bind(json!({"Submitted": {"task_id": bad, "secret": "s3cr3t"}}))
        .bind(json!({"actor": "user:admin", "at": Utc::now().to_rfc3339()}))
        .execute(&app.pool)
        .await
        .unwrap();
    app.settle().await;
    app.catch_up().await;

    let ready = testkit::eventually("readyz to say degraded", PATIENCE, || async {
        let r = readyz(&app).await;
        (r["status"] == "degraded").then_some(r)
    })
    .await;
    assert_eq!(
        ready["checks"]["dead_letters"],
        json!([{"consumer": "tasks", "count": 1}, {"consumer": "timeline", "count": 1}])
    );
    let reasons = ready["reasons"].to_string();
    assert!(
        reasons.contains("consumer tasks skipped 1 event"),
        "{reasons}"
    );
    assert!(
        reasons.contains("unidesk projections retry tasks"),
        "{reasons}"
    );
    // Public: no aggregate, no error text.
    assert!(!reasons.contains(&bad.to_string()), "{reasons}");
    assert!(!ready.to_string().contains("spec"), "{ready}");

    let text = metrics(&app).await;
    assert_eq!(
        metric(&text, "unidesk_dead_letters{consumer=\"tasks\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "unidesk_dead_letters{consumer=\"timeline\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&text, "unidesk_degraded"), Some(1.0));
    assert!(!text.contains(&bad.to_string()));

    // Every other read model went on: a project made now is listed.
    let project = app.project_as(&app.admin, "after").await;
    app.catch_up().await;
    let list = app.get("/api/v1/projects", &app.admin).await;
    assert!(list.expect(200).to_string().contains(&project));

    store::dead_letters::clear(&app.pool, &["tasks", "timeline"])
        .await
        .unwrap();
    testkit::eventually("readyz to say ready again", PATIENCE, || async {
        (readyz(&app).await["status"] == "ready").then_some(())
    })
    .await;
    assert_eq!(metric(&metrics(&app).await, "unidesk_degraded"), Some(0.0));
}

#[tokio::test]
async fn a_transaction_held_open_elsewhere_is_reported_with_its_pid_and_age() {
    let app = App::start(config(store::health::Limits {
        db_budget_bytes: 0,
        stall_after: Duration::from_secs(1),
    }))
    .await;
    let mut holder = PgConnection::connect_with(&app.pool.connect_options())
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; SELECT pg_current_xact_id()")
        .execute(&mut holder)
        .await
        .unwrap();
    // Other tests share the server: theirs may be older for a moment.
    let ready = testkit::eventually("readyz to name the held transaction", PATIENCE, || async {
        let r = readyz(&app).await;
        let t = &r["checks"]["oldest_transaction"];
        (r["status"] == "degraded" && t["pid"] == pid && t["age_s"].as_f64()? > 1.0).then_some(r)
    })
    .await;
    assert_eq!(
        ready["checks"]["oldest_transaction"]["state"],
        "idle in transaction"
    );
    let reasons = ready["reasons"].to_string();
    assert!(
        reasons.contains(&format!("(pid {pid}) holds every outbox consumer back")),
        "{reasons}"
    );
    let text = metrics(&app).await;
    assert!(
        metric(&text, "unidesk_oldest_transaction_seconds").unwrap() > 1.0,
        "{text}"
    );

    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    testkit::eventually(
        "the transaction to be gone from readyz",
        PATIENCE,
        || async {
            let r = readyz(&app).await;
            (r["checks"]["oldest_transaction"]["pid"] != pid).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn near_the_database_budget_readyz_is_degraded_and_the_metrics_say_so() {
    let app = App::start(config(store::health::Limits {
        db_budget_bytes: 1024,
        stall_after: Duration::from_secs(3600),
    }))
    .await;
    let ready = readyz(&app).await;
    assert_eq!(ready["status"], "degraded");
    assert_eq!(ready["checks"]["database_budget_bytes"], 1024);
    assert!(ready["checks"]["database_bytes"].as_i64().unwrap() > 1024);
    assert!(
        ready["reasons"]
            .to_string()
            .contains("of its budget of 1024 bytes; task output is refused"),
        "{ready}"
    );
    let text = metrics(&app).await;
    assert_eq!(metric(&text, "unidesk_database_budget_bytes"), Some(1024.0));
    assert_eq!(metric(&text, "unidesk_database_budget_warning"), Some(1.0));
    assert!(metric(&text, "unidesk_database_bytes").unwrap() > 1024.0);
    // Refusing is the scheduler role's decision, recorded in the database.
    assert_eq!(metric(&text, "unidesk_task_output_refused"), Some(0.0));
    store::health::record_storage(&app.pool, 2048, 1024, true)
        .await
        .unwrap();
    testkit::eventually("metrics to say output is refused", PATIENCE, || async {
        (metric(&metrics(&app).await, "unidesk_task_output_refused") == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(readyz(&app).await["checks"]["task_output_refused"], true);

    // Without a budget, nothing of it.
    let plain = App::start(Config::default()).await;
    let ready = readyz(&plain).await;
    assert_eq!(ready["status"], "ready");
    assert!(ready["checks"].get("database_budget_bytes").is_none());
}

#[tokio::test]
async fn the_logs_api_says_when_retention_removed_the_output() {
    let app = App::start(Config::default()).await;
    let project = app.project_as(&app.admin, "vision").await;
    let task: Uuid = app
        .submit_as(&app.admin, minimal_task(&project))
        .await
        .parse()
        .unwrap();
    let (node, _) = api::provision_node(&app.store, "gpu-1", Default::default(), &admin())
        .await
        .unwrap();
    let node = node.id.unwrap();
    let ran = [
        TaskCommand::ReportStarted {
            node_id: node,
            attempt: 1,
            container: "c0ffee".into(),
            at: Utc::now(),
        },
        TaskCommand::ReportExited {
            node_id: node,
            attempt: 1,
            outcome: Outcome::Succeeded,
            at: Utc::now(),
        },
    ];
    testkit::scenes::attempt_on(&app.store, &task.to_string(), node, 1, ran).await;
    sqlx::query(
        "INSERT INTO task_log (task_id, attempt, \"offset\", data) VALUES ($1, 1, 0, 'epoch 1\n')",
    )
    .bind(task)
    .execute(&app.pool)
    .await
    .unwrap();
    let logs = format!("/api/v1/tasks/{task}/logs");
    let page = app.get(&logs, &app.admin).await;
    assert_eq!(page.expect(200)["data"], "epoch 1\n");
    assert!(page.body.get("removed").is_none());
    let events = app.events().await;

    task_log::mark_removed(&app.pool, task, RemovedBy::Retention)
        .await
        .unwrap();
    while task_log::remove_batch(&app.pool, task, 10).await.unwrap() > 0 {}

    let page = app.get(&logs, &app.admin).await;
    let body = page.expect(200);
    assert_eq!(body["data"], "");
    assert_eq!(body["complete"], true);
    assert_eq!(body["removed"]["reason"], "retention");
    assert_eq!(body["removed"]["attempt"], 1);
    assert_eq!(body["removed"]["from_offset"], 0);
    let shown = app.get(&format!("/api/v1/tasks/{task}"), &app.admin).await;
    assert_eq!(
        shown.expect(200)["output_removed"][0]["reason"],
        "retention"
    );

    // A follower is told at the end of the stream.
    let stream = app.get(&format!("{logs}?follow=true"), &app.admin).await;
    let text = stream.expect(200).as_str().unwrap().to_string();
    let end = text
        .split("\n\n")
        .find(|block| block.contains("event: end"))
        .and_then(|block| block.lines().find_map(|l| l.strip_prefix("data: ")))
        .unwrap_or_else(|| panic!("no end event in {text:?}"));
    let end: Value = serde_json::from_str(end).unwrap();
    assert_eq!(end["removed"]["reason"], "retention");
    assert_eq!(end["state"], "succeeded");
    assert_eq!(app.events().await, events, "no event was touched");
}

fn admin() -> Actor {
    Actor::User("admin".into())
}
