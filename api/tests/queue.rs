//! Why a queued task waits, as `GET /api/v1/tasks/{id}` shows it over real
//! HTTP against a real PostgreSQL. No scheduler runs here: the test writes
//! explanations the way the scheduler records them
//! (`store::queue_reasons::record`), and checks what a client is shown,
//! and never shown, for each.

use api::Config;
use chrono::Utc;
use serde_json::{json, Value};
use store::queue_reasons::{Explanation, Reason};
use uuid::Uuid;

mod support;

use support::{minimal_task, App};

fn label_reason() -> Explanation {
    Explanation {
        summary: "no online node carries label gpu=a100 (of 2 nodes: 2 lack label gpu=a100)".into(),
        reasons: vec![Reason::Label {
            label: "gpu=a100".into(),
            nodes_filtered: 2,
        }],
    }
}

async fn record(app: &App, task: &str, attempt: u32, why: &Explanation) {
    let id: Uuid = task.parse().expect("a task id");
    store::queue_reasons::record(&app.pool, 1, Utc::now(), &[(id, attempt, why)], &[])
        .await
        .expect("recorded");
}

async fn queue_of(app: &App, task: &str) -> Value {
    app.get(&format!("/api/v1/tasks/{task}"), &app.admin)
        .await
        .expect(200)["queue"]
        .clone()
}

#[tokio::test]
async fn a_queued_task_shows_the_explanation_of_its_current_wait_and_no_other() {
    let app = App::start(Config::default()).await;
    let project = app.project_as(&app.admin, "vision").await;
    let first = app.submit_as(&app.admin, minimal_task(&project)).await;
    let task = app.submit_as(&app.admin, minimal_task(&project)).await;
    app.settle().await;
    app.catch_up().await;

    // Before the scheduler looked at it, the task says so, and where it
    // stands in the queue.
    assert_eq!(
        queue_of(&app, &task).await,
        json!({"summary": "waiting for the scheduler to look at it",
               "reasons": [], "since": null, "position": 2})
    );
    assert_eq!(queue_of(&app, &first).await["position"], 1);

    // The scheduler's explanation, as words and data.
    record(&app, &task, 0, &label_reason()).await;
    let queue = queue_of(&app, &task).await;
    assert_eq!(queue["summary"], label_reason().summary);
    assert_eq!(
        queue["reasons"],
        json!([{"kind": "label", "label": "gpu=a100", "nodes_filtered": 2}])
    );
    assert!(queue["since"].is_string(), "{queue}");

    // An explanation of another wait (after an attempt the task has not
    // had) is not this one's.
    record(&app, &task, 1, &label_reason()).await;
    assert_eq!(
        queue_of(&app, &task).await["summary"],
        "waiting for the scheduler to look at it"
    );

    // A task that no longer waits shows no explanation, whatever is stored.
    record(&app, &task, 0, &label_reason()).await;
    app.post_empty(&format!("/api/v1/tasks/{task}/cancel"), &app.admin)
        .await
        .expect(200);
    let shown = app
        .get(&format!("/api/v1/tasks/{task}"), &app.admin)
        .await
        .expect(200)
        .clone();
    assert_eq!(shown["state"], "cancelled");
    assert!(shown.get("queue").is_none(), "{shown}");
}

/// The task as the API shows it once the read models have everything
/// committed.
async fn caught_up(app: &App, task: &str) -> Value {
    app.settle().await;
    app.catch_up().await;
    app.get(&format!("/api/v1/tasks/{task}"), &app.admin)
        .await
        .expect(200)
        .clone()
}

#[tokio::test]
async fn a_task_requeued_after_a_lost_attempt_says_why_until_it_succeeds() {
    use domain::task::{Outcome, TaskCommand};
    use domain::Actor;
    let app = App::start(Config::default()).await;
    let project = app.project_as(&app.admin, "vision").await;
    let task = app.submit_as(&app.admin, minimal_task(&project)).await;
    let admin = Actor::User("admin".into());
    let (node, _) = api::provision_node(&app.store, "gpu-1", Default::default(), &admin)
        .await
        .expect("a node");
    let node = node.id.expect("its id");
    let lose = TaskCommand::MarkLost {
        node_id: node,
        attempt: 1,
        reason: "the node could not run attempt 1: Docker did not answer".into(),
        at: Utc::now(),
    };
    testkit::scenes::attempt_on(&app.store, &task, node, 1, [lose]).await;
    let shown = caught_up(&app, &task).await;
    assert_eq!(shown["state"], "queued");
    assert_eq!(
        shown["reason"],
        "the node could not run attempt 1: Docker did not answer"
    );
    let succeed = TaskCommand::ReportExited {
        node_id: node,
        attempt: 2,
        outcome: Outcome::Succeeded,
        at: Utc::now(),
    };
    testkit::scenes::attempt_on(&app.store, &task, node, 2, [succeed]).await;
    let shown = caught_up(&app, &task).await;
    assert_eq!(shown["state"], "succeeded");
    assert!(shown["reason"].is_null(), "{shown}");
    // Each attempt keeps why it ended: the lost one its loss, the one
    // that succeeded nothing.
    let ends: Vec<(&Value, &Value)> = shown["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| (&a["outcome"], &a["reason"]))
        .collect();
    assert_eq!(
        ends,
        [
            (
                &json!("lost"),
                &json!("the node could not run attempt 1: Docker did not answer")
            ),
            (&json!("succeeded"), &Value::Null)
        ]
    );
}

#[tokio::test]
async fn the_document_describes_the_queue_and_every_kind_of_reason() {
    let app = App::start(Config::default()).await;
    let doc = app
        .get("/api/v1/openapi.json", &app.admin)
        .await
        .expect(200)
        .clone();
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["Task"]["properties"]["queue"]["oneOf"][1]["$ref"],
        "#/components/schemas/QueueStatus",
        "{}",
        schemas["Task"]["properties"]["queue"]
    );
    let kinds: Vec<Value> = schemas["QueueReason"]["oneOf"]
        .as_array()
        .expect("one schema per kind")
        .iter()
        .map(|k| k["properties"]["kind"]["enum"][0].clone())
        .collect();
    assert_eq!(
        kinds,
        [
            "no_nodes", "offline", "drained", "label", "cpu", "memory", "gpus", "taken", "quota",
            "backoff", "in_line"
        ]
    );
}
