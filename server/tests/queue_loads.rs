//! The leader's queue and the log: what the process itself committed is
//! not loaded again when the outbox brings it. Alone in its test binary:
//! the events a process commits are handed to every consumer in it, so
//! other tests' events would reach this scheduler's queue and blur the
//! count of loads.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use chrono::Utc;
use domain::project::{Project, ProjectCommand};
use domain::task::{Task, TaskCommand, TaskState};
use domain::Actor;
use store::Store;
use unidesk::scheduler::{Config, Scheduler};
use uuid::Uuid;

fn admin() -> Actor {
    Actor::User("admin".into())
}

async fn submit(store: &Store, project: Uuid) -> Uuid {
    let spec = testkit::spec(testkit::spec_draft(project));
    let id = Uuid::now_v7();
    let command = TaskCommand::Submit {
        task_id: id,
        spec,
        by: admin(),
        at: Utc::now(),
    };
    store
        .execute::<Task>(&id.to_string(), command, &admin(), Utc::now())
        .await
        .unwrap();
    id
}

#[tokio::test]
async fn tasks_the_process_saw_end_are_not_loaded_when_the_outbox_brings_their_events() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let project = Uuid::new_v4();
    let create = ProjectCommand::Create {
        project_id: project,
        name: "p".into(),
        description: String::new(),
        owner: "admin".into(),
        at: Utc::now(),
    };
    store
        .execute::<Project>(&project.to_string(), create, &admin(), Utc::now())
        .await
        .unwrap();
    let scheduler = Scheduler::new(store.clone(), Config::default());
    let round = || async {
        let outcome = scheduler.run_once(Utc::now()).await.unwrap();
        assert!(outcome.term.is_some(), "the scheduler does not lead");
    };
    round().await;

    // Submitted, and read by the queue from the outbox too: no node is
    // there, so they stay queued.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(submit(&store, project).await);
    }
    round().await;
    // Then cancelled: the queue sees them end from this process's own
    // commits first, and the outbox brings the same events after.
    for id in &tasks {
        let cancel = TaskCommand::RequestCancel {
            by: admin(),
            at: Utc::now(),
        };
        let ended = store
            .execute::<Task>(&id.to_string(), cancel, &admin(), Utc::now())
            .await
            .unwrap();
        assert_eq!(ended.state.state, TaskState::Cancelled);
    }
    let before = store.aggregate_loads().get("task");
    round().await;
    round().await;
    assert_eq!(
        store.aggregate_loads().get("task") - before,
        0,
        "the queue loaded tasks it had seen end"
    );
}
