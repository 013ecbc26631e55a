//! What the store itself refuses, whoever asks: an assignment of a GPU
//! device another attempt holds, CPU or memory beyond the node's capacity,
//! and an assignment under a scheduler leader's term that is no longer
//! current. Every command goes straight through `Store::execute`, as a
//! scheduler's would.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::time::Duration;

use chrono::Utc;
use domain::spec::{ResourcesDraft, TaskSpecDraft, UrlPolicy};
use domain::task::{Capacity, Outcome, Task, TaskCommand, TaskError, TaskState};
use domain::Actor;
use store::{Store, StoreError};
use uuid::Uuid;

fn admin() -> Actor {
    Actor::User("admin".into())
}

fn scheduler() -> Actor {
    Actor::System("scheduler".into())
}

/// A queued task needing `cpus`, 512 MiB and `gpus` GPUs.
async fn submit(store: &Store, cpus: f64, gpus: i64) -> Uuid {
    let spec = TaskSpecDraft {
        project_id: Some(Uuid::new_v4()),
        code_repo_url: Some("https://example.com/c.git".into()),
        code_commit_id: Some("a".repeat(40)),
        env_repo_url: Some("https://example.com/e.git".into()),
        env_commit_id: Some("b".repeat(40)),
        dockerfile_path: Some("Dockerfile".into()),
        resources: Some(ResourcesDraft {
            cpus: Some(cpus),
            memory_mb: Some(512),
            gpus: Some(gpus),
        }),
        ..Default::default()
    }
    .validate(UrlPolicy::default())
    .unwrap();
    let id = Uuid::now_v7();
    let submit = TaskCommand::Submit {
        task_id: id,
        spec,
        by: admin(),
        at: Utc::now(),
    };
    store
        .execute::<Task>(&id.to_string(), submit, &admin(), Utc::now())
        .await
        .unwrap();
    id
}

async fn run(store: &Store, task: Uuid, cmd: TaskCommand) -> Result<(), StoreError<TaskError>> {
    store
        .execute::<Task>(&task.to_string(), cmd, &scheduler(), Utc::now())
        .await
        .map(|_| ())
}

fn assign(node: Uuid, gpus: Vec<u32>) -> TaskCommand {
    TaskCommand::Assign {
        node_id: node,
        gpus,
        reason: "test".into(),
        at: Utc::now(),
    }
}

fn as_leader(node: Uuid, gpus: Vec<u32>, term: u64, capacity: Capacity) -> TaskCommand {
    TaskCommand::AssignAsLeader {
        node_id: node,
        gpus,
        reason: "test".into(),
        term,
        capacity,
        at: Utc::now(),
    }
}

async fn events(store: &Store, task: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'task' AND aggregate_id = $1",
    )
    .bind(task.to_string())
    .fetch_one(store.pool())
    .await
    .unwrap()
}

async fn state(store: &Store, task: Uuid) -> TaskState {
    store
        .load::<Task>(&task.to_string())
        .await
        .unwrap()
        .unwrap()
        .state
        .state
}

/// Ends attempt 1 of `task` on `node` as its node would report it.
async fn finish(store: &Store, task: Uuid, node: Uuid) {
    let report = TaskCommand::ReportExited {
        node_id: node,
        attempt: 1,
        outcome: Outcome::Succeeded,
        at: Utc::now(),
    };
    store
        .execute::<Task>(
            &task.to_string(),
            report,
            &Actor::Node(node.to_string()),
            Utc::now(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn an_assignment_of_a_held_gpu_is_refused_by_the_store() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let node = Uuid::new_v4();
    let first = submit(&store, 1.0, 2).await;
    let second = submit(&store, 1.0, 1).await;
    run(&store, first, assign(node, vec![0, 3])).await.unwrap();

    // Device 3 is held: refused, nothing appended, the task still queued.
    let before = events(&store, second).await;
    let refused = run(&store, second, assign(node, vec![3])).await;
    match refused {
        Err(StoreError::Rejected(TaskError::NotReserved(why))) => {
            assert!(
                why.contains(&format!(
                    "GPU 3 of node {node} is held by attempt 1 of task {first}"
                )),
                "{why}"
            );
        }
        other => panic!("not refused as held: {other:?}"),
    }
    assert_eq!(events(&store, second).await, before);
    assert_eq!(state(&store, second).await, TaskState::Queued);
    // The same device on another node, or a free one here, is fine.
    run(&store, second, assign(Uuid::new_v4(), vec![3]))
        .await
        .unwrap();

    // Once the first attempt ends, its devices are free again.
    let third = submit(&store, 1.0, 1).await;
    assert!(run(&store, third, assign(node, vec![0])).await.is_err());
    finish(&store, first, node).await;
    run(&store, third, assign(node, vec![0])).await.unwrap();
    let holds = store::holds::gpus_on(&db.pool, node).await.unwrap();
    assert_eq!(holds.into_iter().collect::<Vec<_>>(), [(0, third)]);
}

#[tokio::test]
async fn cpu_and_memory_beyond_the_capacity_an_assignment_was_made_for_are_refused() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let term = store::leader::take(&db.pool, "test", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap() as u64;
    let node = Uuid::new_v4();
    let two_cpus = Capacity {
        millicpus: 2000,
        memory_mb: 4096,
    };
    let tasks = [
        submit(&store, 1.5, 0).await,
        submit(&store, 0.5, 0).await,
        submit(&store, 0.25, 0).await,
    ];
    run(&store, tasks[0], as_leader(node, vec![], term, two_cpus))
        .await
        .unwrap();
    run(&store, tasks[1], as_leader(node, vec![], term, two_cpus))
        .await
        .unwrap();
    let refused = run(&store, tasks[2], as_leader(node, vec![], term, two_cpus)).await;
    assert!(
        matches!(&refused, Err(StoreError::Rejected(TaskError::NotReserved(why))) if why.contains("2000 of 2000 millicpus held")),
        "{refused:?}"
    );
    assert_eq!(state(&store, tasks[2]).await, TaskState::Queued);
    let tight_memory = Capacity {
        millicpus: 64_000,
        memory_mb: 1024,
    };
    let refused = run(
        &store,
        tasks[2],
        as_leader(node, vec![], term, tight_memory),
    )
    .await;
    assert!(
        matches!(&refused, Err(StoreError::Rejected(TaskError::NotReserved(why))) if why.contains("MiB of memory held")),
        "{refused:?}"
    );
    let held: Vec<(Uuid, u64)> = store::holds::all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.task, h.millicpus))
        .collect();
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(held.contains(&(tasks[0], 1500)) && held.contains(&(tasks[1], 500)));
}

#[tokio::test]
async fn an_assignment_under_a_term_no_longer_current_is_refused_by_the_store() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let lease = Duration::from_secs(60);
    let node = Uuid::new_v4();
    let capacity = Capacity {
        millicpus: 64_000,
        memory_mb: 64_000,
    };
    let old = store::leader::take(&db.pool, "old", lease)
        .await
        .unwrap()
        .unwrap() as u64;
    let first = submit(&store, 1.0, 0).await;
    run(&store, first, as_leader(node, vec![], old, capacity))
        .await
        .unwrap();
    // While a leader holds the lease, nobody else takes it, and an
    // assignment without its term is refused.
    assert_eq!(
        store::leader::take(&db.pool, "new", lease).await.unwrap(),
        None
    );
    let task = submit(&store, 1.0, 0).await;
    let refused = run(&store, task, assign(node, vec![])).await;
    assert!(
        matches!(&refused, Err(StoreError::Rejected(TaskError::Fenced(why))) if why.contains(&format!("term {old} holds the lease"))),
        "{refused:?}"
    );

    // The old leader's lease runs out; a new one takes over with the next
    // term, and the old term is refused from then on.
    sqlx::query("UPDATE scheduler_leader SET expires_at = clock_timestamp()")
        .execute(&db.pool)
        .await
        .unwrap();
    let new = store::leader::take(&db.pool, "new", lease)
        .await
        .unwrap()
        .unwrap() as u64;
    assert_eq!(new, old + 1);
    assert!(!store::leader::renew(&db.pool, "old", old as i64, lease)
        .await
        .unwrap());
    let before = events(&store, task).await;
    let refused = run(&store, task, as_leader(node, vec![], old, capacity)).await;
    assert!(
        matches!(&refused, Err(StoreError::Rejected(TaskError::Fenced(why)))
            if why.contains(&format!("term {old} is no longer the scheduler leader's (the current term is {new})"))),
        "{refused:?}"
    );
    assert_eq!(events(&store, task).await, before);
    run(&store, task, as_leader(node, vec![], new, capacity))
        .await
        .unwrap();
    let terms: Vec<Option<i64>> = sqlx::query_scalar(
        "SELECT (payload -> 'Assigned' ->> 'term')::bigint FROM events \
         WHERE event_type = 'TaskAssigned' ORDER BY aggregate_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(terms, [Some(old as i64), Some(new as i64)]);

    // A lease that ran out with nobody taking over fences its own term too.
    sqlx::query("UPDATE scheduler_leader SET expires_at = clock_timestamp()")
        .execute(&db.pool)
        .await
        .unwrap();
    let late = submit(&store, 1.0, 0).await;
    let refused = run(&store, late, as_leader(node, vec![], new, capacity)).await;
    assert!(
        matches!(&refused, Err(StoreError::Rejected(TaskError::Fenced(why))) if why.contains("its lease expired")),
        "{refused:?}"
    );
    // And with no live lease, a tool may assign without a term.
    run(&store, late, assign(node, vec![])).await.unwrap();
}

#[tokio::test]
async fn an_imported_log_brings_its_holds_along() {
    let source = testkit::fresh_db().await;
    let store = Store::new(source.pool.clone());
    let node = Uuid::new_v4();
    let running = submit(&store, 1.0, 1).await;
    let done = submit(&store, 1.0, 1).await;
    run(&store, done, assign(node, vec![0])).await.unwrap();
    finish(&store, done, node).await;
    run(&store, running, assign(node, vec![0])).await.unwrap();
    let mut file = Vec::new();
    store::export::export(&source.pool, &Default::default(), &mut file)
        .await
        .unwrap();

    let target = testkit::fresh_db().await;
    // A leader leads on the target: imported history is not its to fence.
    store::leader::take(&target.pool, "target", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    store::export::import(&target.pool, &mut file.as_slice())
        .await
        .unwrap();
    let held = store::holds::gpus_on(&target.pool, node).await.unwrap();
    assert_eq!(held.into_iter().collect::<Vec<_>>(), [(0, running)]);
}

#[tokio::test]
async fn holds_of_attempts_already_in_the_log_are_taken_on_by_the_migration() {
    let pool = testkit::db_migrated_before("0015").await.pool;
    let store = Store::new(pool.clone());
    let node = Uuid::new_v4();
    let ended = submit(&store, 1.0, 1).await;
    run(&store, ended, assign(node, vec![0])).await.unwrap();
    finish(&store, ended, node).await;
    let running = submit(&store, 2.0, 2).await;
    run(&store, running, assign(node, vec![0, 1]))
        .await
        .unwrap();
    let queued = submit(&store, 1.0, 0).await;

    store::migrate(&pool).await.unwrap();
    let held = store::holds::all(&pool).await.unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        (held[0].task, held[0].node, held[0].millicpus, &held[0].gpus),
        (running, node, 2000, &vec![0, 1])
    );
    // From now on the store holds them: device 1 is not given again.
    run(&store, queued, assign(node, vec![])).await.unwrap();
    let gpu = submit(&store, 1.0, 1).await;
    let refused = run(&store, gpu, assign(node, vec![1])).await;
    assert!(
        matches!(
            refused,
            Err(StoreError::Rejected(TaskError::NotReserved(_)))
        ),
        "{refused:?}"
    );
}
