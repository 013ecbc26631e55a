//! A task whose events this version cannot read stops neither command
//! delivery nor anything else: the ingress records the event that asked
//! for it as a dead letter and delivers the other tasks' commands. Real
//! PostgreSQL, real WebSockets, the agent played by a JSON client.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers fail the test loudly on anything unexpected"
)]

mod support;

use std::time::Duration;

use chrono::Utc;
use domain::spec::{TaskSpecDraft, UrlPolicy};
use domain::task::{Task, TaskCommand};
use ingress::{Config, Ingress};
use serde_json::{json, Value};
use sqlx::PgPool;
use store::Store;
use testkit::agent::JsonAgent;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(10);

/// Writes `events` as task `id`'s, as a writer that bypassed this
/// version's types would have.
async fn write_raw(pool: &PgPool, id: Uuid, events: &[(&str, Value)]) {
    for (i, (event_type, payload)) in events.iter().enumerate() {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
               event_version, payload, metadata) VALUES ('task', $1, $2, $3, '1', $4, $5)",
        )
        .bind(id.to_string())
        .bind(i as i64 + 1)
        .bind(event_type)
        .bind(payload)
        .bind(json!({"actor": "system:scheduler", "at": Utc::now().to_rfc3339()}))
        .execute(pool)
        .await
        .unwrap();
    }
}

/// The next `run_task` the agent receives: its task.
async fn next_run_task(agent: &mut JsonAgent) -> Uuid {
    loop {
        let frame = agent.recv().await;
        if frame["type"] == "command" && frame["command"]["kind"] == "run_task" {
            return frame["command"]["task_id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
        }
    }
}

#[tokio::test]
async fn a_task_that_cannot_be_read_is_a_dead_letter_and_other_commands_still_go_out() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let ingress = Ingress::new(
        store.clone(),
        Config {
            ingress_id: "poison".into(),
            poll: Duration::from_millis(50),
            ..Config::default()
        },
    );
    let addr = support::serve_and_run(ingress).await;
    let (node, token) = support::provision(&store).await;
    let mut agent = JsonAgent::join(addr, &token, json!([])).await;

    // A task submitted and assigned to this node, as the domain writes
    // it, except that its TaskSubmitted lacks its spec.
    let bad = Uuid::new_v4();
    let spec = TaskSpecDraft {
        project_id: Some(Uuid::new_v4()),
        code_repo_url: Some("https://example.com/code.git".into()),
        code_commit_id: Some("a".repeat(40)),
        env_repo_url: Some("https://example.com/env.git".into()),
        env_commit_id: Some("b".repeat(40)),
        dockerfile_path: Some("Dockerfile".into()),
        ..Default::default()
    }
    .validate(UrlPolicy::default())
    .unwrap();
    let submitted = Task::default()
        .decide(TaskCommand::Submit {
            task_id: bad,
            spec,
            by: support::admin(),
            at: Utc::now(),
        })
        .unwrap();
    let mut unreadable = serde_json::to_value(&submitted[0]).unwrap();
    unreadable["Submitted"]
        .as_object_mut()
        .unwrap()
        .remove("spec");
    let assigned = json!({"Assigned": {"node_id": node, "attempt": 1, "gpus": [],
                                       "reason": "test", "at": Utc::now()}});
    write_raw(
        &db.pool,
        bad,
        &[("TaskSubmitted", unreadable), ("TaskAssigned", assigned)],
    )
    .await;

    // A task assigned after it reaches the node.
    let good = support::submit_and_assign(&store, node).await;
    let delivered = tokio::time::timeout(PATIENCE, next_run_task(&mut agent))
        .await
        .expect("the later task's run_task");
    assert_eq!(delivered, good);

    let letters = testkit::eventually("the ingress's dead letter", PATIENCE, || async {
        let l = store::dead_letters::list(&db.pool, Some(ingress::DEAD_LETTER_CONSUMER))
            .await
            .unwrap();
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].aggregate_id, bad.to_string());
    assert_eq!(letters[0].event_type, "TaskAssigned");
    assert!(
        letters[0].error.contains(&bad.to_string()),
        "{}",
        letters[0].error
    );
}
