//! Events a read model cannot apply, against a real PostgreSQL: a payload
//! that does not fit its event (written into the log as an older or buggy
//! writer would have), and a row a read model's table refuses. Each is
//! recorded as a dead letter and skipped, with the later events of its
//! aggregate; every other aggregate and model goes on; a retry or a
//! rebuild clears it once the cause is fixed.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use chrono::Utc;
use cqrs_es::{Aggregate, DomainEvent};
use domain::node::{Node, NodeCommand};
use domain::project::{Project, ProjectCommand};
use domain::spec::TaskSpecDraft;
use domain::task::{Task, TaskCommand, TaskEvent};
use domain::Actor;
use projections::{Projector, Retried};
use serde_json::{json, Value};
use sqlx::PgPool;
use store::dead_letters::{self, DeadLetter};
use store::Store;
use uuid::Uuid;

fn admin() -> Actor {
    Actor::User("admin".into())
}

async fn project(store: &Store, name: &str) -> Uuid {
    let id = Uuid::new_v4();
    store
        .execute::<Project>(
            &id.to_string(),
            ProjectCommand::Create {
                project_id: id,
                name: name.into(),
                description: "d".into(),
                owner: "admin".into(),
                at: Utc::now(),
            },
            &admin(),
            Utc::now(),
        )
        .await
        .unwrap();
    id
}

fn submit(task_id: Uuid, project: Uuid) -> TaskCommand {
    let spec = testkit::spec(TaskSpecDraft {
        command: Some(vec!["echo".into(), "hi".into()]),
        ..testkit::spec_draft(project)
    });
    TaskCommand::Submit {
        task_id,
        spec,
        by: admin(),
        at: Utc::now(),
    }
}

async fn task(store: &Store, project: Uuid) -> Uuid {
    let id = Uuid::new_v4();
    store
        .execute::<Task>(&id.to_string(), submit(id, project), &admin(), Utc::now())
        .await
        .unwrap();
    id
}

/// A task's history as the domain decides it: submitted, then assigned.
fn history(task_id: Uuid, project: Uuid) -> Vec<TaskEvent> {
    let mut state = Task::default();
    let mut events = Vec::new();
    for command in [
        submit(task_id, project),
        TaskCommand::Assign {
            node_id: Uuid::new_v4(),
            gpus: vec![],
            reason: "fits".into(),
            at: Utc::now(),
        },
    ] {
        for e in state.decide(command).unwrap() {
            state.apply(e.clone());
            events.push(e);
        }
    }
    events
}

/// Appends `payload` as event `sequence` of task `id`, as a writer that
/// bypassed this version's types would have.
async fn append_raw(pool: &PgPool, id: Uuid, sequence: i64, event: &TaskEvent, payload: Value) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
           payload, metadata) VALUES ('task', $1, $2, $3, $4, $5, $6)",
    )
    .bind(id.to_string())
    .bind(sequence)
    .bind(event.event_type())
    .bind(event.event_version())
    .bind(payload)
    .bind(json!({"actor": "user:admin", "at": Utc::now().to_rfc3339()}))
    .execute(pool)
    .await
    .unwrap();
}

/// A `TaskSubmitted` payload this version cannot read: `spec` is missing.
fn unreadable(event: &TaskEvent) -> Value {
    let mut v = serde_json::to_value(event).unwrap();
    let body = v["Submitted"].as_object_mut().unwrap();
    let spec = body.remove("spec").unwrap();
    body.insert("spek".into(), spec);
    v
}

/// Replaces the payload of a stored event. The log is immutable; this
/// stands in for a new version that reads the old payload (an upcaster).
async fn fix_payload(pool: &PgPool, id: Uuid, sequence: i64, payload: Value) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE events DISABLE TRIGGER events_are_immutable")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE events SET payload = $3 WHERE aggregate_type = 'task' AND aggregate_id = $1 \
         AND sequence = $2",
    )
    .bind(id.to_string())
    .bind(sequence)
    .bind(payload)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("ALTER TABLE events ENABLE TRIGGER events_are_immutable")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn letters(pool: &PgPool) -> Vec<DeadLetter> {
    dead_letters::list(pool, None).await.unwrap()
}

async fn task_state(pool: &PgPool, id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT state FROM task_view WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

async fn in_timeline(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM timeline WHERE aggregate_id = $1")
        .bind(id.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A log with one unreadable `TaskSubmitted` (task `bad`) between valid
/// events, and a readable event of `bad` after it. Returns `bad`, its true
/// history and a task submitted after it.
async fn poisoned(store: &Store) -> (Uuid, Vec<TaskEvent>, Uuid) {
    let pool = store.pool();
    let p = project(store, "vision").await;
    let before = task(store, p).await;
    let bad = Uuid::new_v4();
    let events = history(bad, p);
    append_raw(pool, bad, 1, &events[0], unreadable(&events[0])).await;
    let after = task(store, p).await;
    for (i, e) in events.iter().enumerate().skip(1) {
        append_raw(pool, bad, i as i64 + 1, e, serde_json::to_value(e).unwrap()).await;
    }
    assert_eq!(task_state(pool, before).await, None, "nothing applied yet");
    (bad, events, after)
}

#[tokio::test]
async fn an_unreadable_event_stops_only_its_aggregate_in_the_models_that_cannot_read_it() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let (bad, _, after) = poisoned(&store).await;
    let projector = Projector::new(db.pool.clone());
    projector.catch_up().await.unwrap();

    // Everything after the bad event was applied: the task submitted after
    // it, in the tasks model itself, and every other model.
    assert_eq!(task_state(&db.pool, after).await.as_deref(), Some("queued"));
    let later = project(&store, "later").await;
    projector.catch_up().await.unwrap();
    let projects: i64 = sqlx::query_scalar("SELECT count(*) FROM project_view WHERE id = $1")
        .bind(later)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(projects, 1);

    // The bad task is nowhere in task_view: its later event waited behind
    // the bad one instead of being applied to a task that never was. Nor
    // in the timeline: who may see a row depends on the project its first
    // event names.
    assert_eq!(task_state(&db.pool, bad).await, None);
    assert_eq!(in_timeline(&db.pool, bad).await, 0);
    let found = letters(&db.pool).await;
    let summary: Vec<(&str, i64, &str)> = found
        .iter()
        .map(|d| (d.consumer.as_str(), d.sequence, d.event_type.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("tasks", 1, "TaskSubmitted"),
            ("tasks", 2, "TaskAssigned"),
            ("timeline", 1, "TaskSubmitted"),
            ("timeline", 2, "TaskAssigned"),
        ]
    );
    for d in &found {
        assert_eq!(d.aggregate_type, "task");
        assert_eq!(d.aggregate_id, bad.to_string());
    }
    assert!(found[0].error.contains("spec"), "{}", found[0].error);
    assert!(found[1].error.contains("held back"), "{}", found[1].error);

    // Each model says where it stands; only the two are inconsistent, and
    // none lags.
    for s in projector.status().await.unwrap() {
        assert_eq!(s.lag, 0, "{} lags", s.name);
        let expected = match s.name {
            "tasks" | "timeline" => 2,
            _ => 0,
        };
        assert_eq!(s.dead_letters, expected, "{}", s.name);
        assert_eq!(s.consistent, expected == 0, "{}", s.name);
    }

    // Applying the whole log again changes nothing but the count: the
    // same letters, each tried once more.
    sqlx::query("UPDATE checkpoints SET txid = 0, position = 0")
        .execute(&db.pool)
        .await
        .unwrap();
    projector.catch_up().await.unwrap();
    let again = letters(&db.pool).await;
    assert_eq!(again.len(), found.len());
    assert!(again.iter().all(|d| d.attempts == 2), "{again:?}");

    // A retry while the cause is still there clears nothing.
    assert_eq!(
        projector.retry(None).await.unwrap(),
        Retried {
            cleared: 0,
            remaining: 4
        }
    );
}

#[tokio::test]
async fn a_retry_after_the_fix_applies_the_skipped_events_in_order() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let (bad, events, _) = poisoned(&store).await;
    let projector = Projector::new(db.pool.clone());
    projector.catch_up().await.unwrap();
    assert_eq!(letters(&db.pool).await.len(), 4);

    fix_payload(&db.pool, bad, 1, serde_json::to_value(&events[0]).unwrap()).await;
    assert_eq!(
        projector.retry(Some("tasks")).await.unwrap(),
        Retried {
            cleared: 2,
            remaining: 0
        }
    );
    // Submitted, then assigned: both applied, in order.
    assert_eq!(task_state(&db.pool, bad).await.as_deref(), Some("assigned"));
    assert_eq!(letters(&db.pool).await.len(), 2, "the timeline's are left");
    projector.retry(None).await.unwrap();
    assert!(letters(&db.pool).await.is_empty());
    assert_eq!(in_timeline(&db.pool, bad).await, 2);
    assert!(projector
        .status()
        .await
        .unwrap()
        .iter()
        .all(|s| s.consistent));

    // The aggregate is no longer held back: its new events apply.
    store
        .execute::<Task>(
            &bad.to_string(),
            TaskCommand::RequestCancel {
                by: admin(),
                at: Utc::now(),
            },
            &admin(),
            Utc::now(),
        )
        .await
        .unwrap();
    projector.catch_up().await.unwrap();
    let asked: bool =
        sqlx::query_scalar("SELECT (doc->>'cancel_requested')::bool FROM task_view WHERE id = $1")
            .bind(bad)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(asked);
    assert!(letters(&db.pool).await.is_empty());
    let live = support::dump(&db.pool).await;
    projector.rebuild(None).await.unwrap();
    assert_eq!(support::dump(&db.pool).await, live, "as a rebuild makes it");
}

#[tokio::test]
async fn a_rebuild_finds_the_dead_letters_again_and_clears_them_once_fixed() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let (bad, events, after) = poisoned(&store).await;
    let projector = Projector::new(db.pool.clone());
    projector.catch_up().await.unwrap();
    let found = letters(&db.pool).await;

    // Still broken: the rebuild succeeds around the bad event and finds
    // the same letters (kept, tried once more).
    projector.rebuild(None).await.unwrap();
    let again = letters(&db.pool).await;
    assert_eq!(again.len(), found.len());
    for (a, f) in again.iter().zip(&found) {
        assert_eq!((&a.consumer, a.position), (&f.consumer, f.position));
        assert_eq!(a.first_seen, f.first_seen);
        assert_eq!(a.attempts, 2);
    }
    assert_eq!(task_state(&db.pool, after).await.as_deref(), Some("queued"));
    assert_eq!(task_state(&db.pool, bad).await, None);

    // Fixed: one model's rebuild clears that model's letters only.
    fix_payload(&db.pool, bad, 1, serde_json::to_value(&events[0]).unwrap()).await;
    projector.rebuild(Some("tasks")).await.unwrap();
    let left: Vec<String> = letters(&db.pool)
        .await
        .into_iter()
        .map(|d| d.consumer)
        .collect();
    assert_eq!(left, vec!["timeline".to_string(), "timeline".to_string()]);
    assert_eq!(task_state(&db.pool, bad).await.as_deref(), Some("assigned"));
    projector.rebuild(None).await.unwrap();
    assert!(letters(&db.pool).await.is_empty());
    assert_eq!(in_timeline(&db.pool, bad).await, 2);
}

#[tokio::test]
async fn a_row_a_read_model_table_refuses_is_a_dead_letter_and_the_model_goes_on() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    // A constraint the nodes model does not know about, as a schema
    // change made by hand (or a bug in the model) would be.
    sqlx::query("ALTER TABLE node_view ADD CONSTRAINT no_gpu_9 CHECK (name <> 'gpu-9')")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut nodes = Vec::new();
    for name in ["gpu-1", "gpu-9", "gpu-2"] {
        let id = Uuid::new_v4();
        store
            .execute::<Node>(
                &id.to_string(),
                NodeCommand::Provision {
                    node_id: id,
                    name: name.into(),
                    labels: Default::default(),
                    token_fingerprint: "ff".into(),
                    max_resources: Default::default(),
                    by: admin(),
                    at: Utc::now(),
                },
                &admin(),
                Utc::now(),
            )
            .await
            .unwrap();
        nodes.push(id);
    }
    let projector = Projector::new(db.pool.clone());
    projector.catch_up().await.unwrap();
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM node_view ORDER BY name")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(names, vec!["gpu-1", "gpu-2"]);
    let found = letters(&db.pool).await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].consumer, "nodes");
    assert_eq!(found[0].aggregate_id, nodes[1].to_string());
    assert!(found[0].error.contains("no_gpu_9"), "{}", found[0].error);
    // The timeline has every node event.
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM timeline WHERE aggregate_type = 'node'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows, 3);

    // A rebuild meets the same refusal: the new table has the constraint
    // too. The rows it held in memory fail as a whole, and it builds again
    // without them to find the event to blame, as the projector did.
    let rebuilt = projector.rebuild_report(None).await.unwrap();
    assert!(rebuilt.one_by_one);
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM node_view ORDER BY name")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(names, vec!["gpu-1", "gpu-2"]);
    let again = letters(&db.pool).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].position, found[0].position);
    assert!(again[0].error.contains("no_gpu_9"), "{}", again[0].error);

    sqlx::query("ALTER TABLE node_view DROP CONSTRAINT no_gpu_9")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        projector.retry(Some("nodes")).await.unwrap(),
        Retried {
            cleared: 1,
            remaining: 0
        }
    );
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM node_view ORDER BY name")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(names, vec!["gpu-1", "gpu-2", "gpu-9"]);
    assert!(matches!(
        projector.retry(Some("nope")).await,
        Err(projections::ProjectionError::Unknown(_))
    ));
}
