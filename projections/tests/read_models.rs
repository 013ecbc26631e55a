//! The read models against a real PostgreSQL: they follow the log, apply
//! each event once, and rebuild to the same bytes.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use chrono::Utc;
use domain::node::{Node, NodeCommand};
use domain::project::{Project, ProjectCommand, Role};
use domain::spec::TaskSpecDraft;
use domain::task::{Outcome, Task, TaskCommand};
use domain::user::{User, UserCommand};
use domain::Actor;
use projections::Projector;
use store::Store;
use uuid::Uuid;

use support::dump;

fn admin() -> Actor {
    Actor::User("admin".into())
}

/// Writes a small but varied history: users, a project with members, a
/// node, and tasks in several states.
async fn history(store: &Store) -> (Uuid, Uuid) {
    let now = Utc::now;
    store
        .execute::<User>(
            "alice",
            UserCommand::Create {
                name: "alice".into(),
                admin: false,
                by: admin(),
                at: now(),
            },
            &admin(),
            now(),
        )
        .await
        .unwrap();
    let project = Uuid::new_v4();
    let p = project.to_string();
    store
        .execute::<Project>(
            &p,
            ProjectCommand::Create {
                project_id: project,
                name: "vision".into(),
                description: "d".into(),
                owner: "alice".into(),
                at: now(),
            },
            &admin(),
            now(),
        )
        .await
        .unwrap();
    store
        .execute::<Project>(
            &p,
            ProjectCommand::AddMember {
                user: "bob".into(),
                role: Role::Viewer,
                by: admin(),
                at: now(),
            },
            &admin(),
            now(),
        )
        .await
        .unwrap();
    let node = Uuid::new_v4();
    store
        .execute::<Node>(
            &node.to_string(),
            NodeCommand::Provision {
                node_id: node,
                name: "gpu-3".into(),
                labels: Default::default(),
                token_fingerprint: "ff".into(),
                max_resources: Default::default(),
                by: admin(),
                at: now(),
            },
            &admin(),
            now(),
        )
        .await
        .unwrap();
    for i in 0..5 {
        task_history(store, project, node, i).await;
    }
    (project, node)
}

/// Task `i` of a history on `project` and `node`: submitted; assigned
/// unless it is the first; accepted, started and ended from the third on
/// (the fourth failing).
async fn task_history(store: &Store, project: Uuid, node: Uuid, i: usize) {
    let now = Utc::now;
    let spec = testkit::spec(TaskSpecDraft {
        command: Some(vec!["echo".into(), i.to_string()]),
        ..testkit::spec_draft(project)
    });
    let id = Uuid::new_v4();
    let t = id.to_string();
    let user = Actor::User("alice".into());
    store
        .execute::<Task>(
            &t,
            TaskCommand::Submit {
                task_id: id,
                spec,
                by: user.clone(),
                at: now(),
            },
            &user,
            now(),
        )
        .await
        .unwrap();
    if i == 0 {
        return;
    }
    store
        .execute::<Task>(
            &t,
            TaskCommand::Assign {
                node_id: node,
                gpus: vec![],
                reason: "fits".into(),
                at: now(),
            },
            &Actor::System("scheduler".into()),
            now(),
        )
        .await
        .unwrap();
    if i >= 2 {
        let n = Actor::Node(node.to_string());
        for cmd in [
            TaskCommand::Accept {
                node_id: node,
                attempt: 1,
                at: now(),
            },
            TaskCommand::ReportStarted {
                node_id: node,
                attempt: 1,
                container: "c".into(),
                at: now(),
            },
            TaskCommand::ReportExited {
                node_id: node,
                attempt: 1,
                outcome: if i == 3 {
                    Outcome::Failed {
                        exit_code: Some(2),
                        // As an agent may report it: what separates the
                        // fields and rows of COPY's text, its escapes and
                        // its NULL, quotes and characters beyond ASCII.
                        reason: "exit 2\tcol\nrow\r\\N \\t back\\slash \"q\" 'q' é 😀".into(),
                    }
                } else {
                    Outcome::Succeeded
                },
                at: now(),
            },
        ] {
            store.execute::<Task>(&t, cmd, &n, now()).await.unwrap();
        }
    }
}

#[tokio::test]
async fn read_models_follow_the_log() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let (project, _node) = history(&store).await;
    let projector = Projector::new(db.pool.clone());
    assert!(projector.catch_up().await.unwrap() > 0);
    let states: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM task_view WHERE project_id = $1 GROUP BY state ORDER BY state",
    )
    .bind(project)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        states,
        vec![
            ("assigned".to_string(), 1),
            ("failed".to_string(), 1),
            ("queued".to_string(), 1),
            ("succeeded".to_string(), 2)
        ]
    );
    let members: Vec<(String, String)> = sqlx::query_as(
        "SELECT user_name, role FROM project_member_view WHERE project_id = $1 ORDER BY 1",
    )
    .bind(project)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        members,
        vec![
            ("alice".to_string(), "maintainer".to_string()),
            ("bob".to_string(), "viewer".to_string())
        ]
    );
    let summary: String = sqlx::query_scalar(
        "SELECT summary FROM timeline WHERE event_type = 'TaskAssigned' LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        summary,
        "system:scheduler assigned attempt 1 to node gpu-3: fits"
    );
    let with_project: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM timeline WHERE aggregate_type = 'task' AND project_id = $1",
    )
    .bind(project)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let task_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'task'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(with_project, task_events);
    for s in projector.status().await.unwrap() {
        assert_eq!(s.lag, 0, "{} lags", s.name);
    }
}

/// The counts of one project's tasks, by state, as `/metrics` reads them.
async fn counted(pool: &sqlx::PgPool, project: &str) -> Vec<(String, i64)> {
    projections::read::tasks::counts(pool)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.project.as_deref() == Some(project))
        .map(|c| (c.state.as_str().to_string(), c.tasks))
        .collect()
}

/// The counts kept beside the tasks are those of the rows, and counts
/// gone wrong (a row written without them, as by a server of an earlier
/// version still projecting while the counts' migration ran) are put right
/// when a projector starts.
#[tokio::test]
async fn the_task_counts_are_the_rows_counted_and_are_put_right_when_a_projector_starts() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let (project, _node) = history(&store).await;
    // One event at a time: the tasks pass through every state on the way.
    Projector::new(db.pool.clone())
        .with_batch(1)
        .catch_up()
        .await
        .unwrap();
    let expected = |pairs: &[(&str, i64)]| -> Vec<(String, i64)> {
        pairs.iter().map(|(s, n)| (s.to_string(), *n)).collect()
    };
    assert_eq!(
        counted(&db.pool, "vision").await,
        expected(&[
            ("assigned", 1),
            ("failed", 1),
            ("queued", 1),
            ("succeeded", 2)
        ])
    );
    // The states the tasks only passed through left no row at zero.
    let zero: i64 = sqlx::query_scalar("SELECT count(*) FROM task_counts WHERE tasks <= 0")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(zero, 0);

    sqlx::query(
        "UPDATE task_view SET state = 'cancelled' WHERE project_id = $1 AND state = 'queued'",
    )
    .bind(project)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO task_counts (project_id, state, tasks) VALUES ($1, 'running', 7)")
        .bind(project)
        .execute(&db.pool)
        .await
        .unwrap();
    let projector = Projector::new(db.pool.clone());
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        projector.run(
            std::time::Duration::from_millis(50),
            tokio::time::sleep(std::time::Duration::from_millis(300)),
        ),
    )
    .await
    .expect("the projector did not stop");
    assert_eq!(
        counted(&db.pool, "vision").await,
        expected(&[
            ("assigned", 1),
            ("cancelled", 1),
            ("failed", 1),
            ("succeeded", 2)
        ])
    );
}

#[tokio::test]
async fn replaying_events_already_applied_changes_nothing() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    history(&store).await;
    let projector = Projector::new(db.pool.clone());
    projector.catch_up().await.unwrap();
    let before = dump(&db.pool).await;
    // As after a crash between the writes and the checkpoint: every
    // checkpoint goes back to the start and the whole log is applied again.
    sqlx::query("UPDATE checkpoints SET txid = 0, position = 0")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(projector.catch_up().await.unwrap() > 0);
    assert_eq!(dump(&db.pool).await, before);
}

#[tokio::test]
async fn batches_applied_set_based_equal_events_applied_one_at_a_time() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    history(&store).await;
    // One event per batch: each model applies exactly one event at a time.
    let one = Projector::new(db.pool.clone()).with_batch(1);
    assert!(one.catch_up().await.unwrap() > 0);
    let one_by_one = dump(&db.pool).await;
    // A rebuild applies the same log in batches of a thousand, each
    // aggregate's events folded together and written once per batch.
    Projector::new(db.pool.clone()).rebuild(None).await.unwrap();
    assert_eq!(dump(&db.pool).await, one_by_one);
}

#[tokio::test]
async fn a_rebuild_reproduces_every_read_model_byte_for_byte() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    history(&store).await;
    let projector = Projector::new(db.pool.clone());
    projector.catch_up().await.unwrap();
    let before = dump(&db.pool).await;
    assert!(before.contains("gpu-3"));
    let reason: String =
        sqlx::query_scalar("SELECT summary FROM timeline WHERE event_type = 'TaskFailed'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        reason.contains("exit 2\tcol\nrow\r\\N \\t back\\slash"),
        "{reason:?}"
    );
    let rebuilt = projector.rebuild_report(None).await.unwrap();
    assert!(rebuilt.events > 0);
    // Every batch written as a whole (the timeline's by COPY), not one
    // event at a time after a batch failed, which would hide a mistake
    // in the batch's statement behind the same result.
    assert!(!rebuilt.one_by_one);
    assert_eq!(dump(&db.pool).await, before);
    // One model alone, too.
    projector.rebuild(Some("timeline")).await.unwrap();
    assert_eq!(dump(&db.pool).await, before);
    assert!(matches!(
        projector.rebuild(Some("nope")).await,
        Err(projections::ProjectionError::Unknown(_))
    ));
}

/// Where each model of `projector` stands, by name.
async fn standing(projector: &Projector) -> Vec<(&'static str, store::Checkpoint)> {
    projector
        .names()
        .into_iter()
        .zip(projector.checkpoints().await.unwrap())
        .collect()
}

#[tokio::test]
async fn models_standing_apart_each_apply_what_they_lack_from_one_read_of_the_log() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let (project, node) = history(&store).await;
    // The models end up at three different places: tasks at the head,
    // the timeline a few events in, the others at the start.
    Projector::only(db.pool.clone(), &["tasks"])
        .unwrap()
        .catch_up()
        .await
        .unwrap();
    let timeline = Projector::only(db.pool.clone(), &["timeline"])
        .unwrap()
        .with_batch(4);
    assert_eq!(timeline.run_once().await.unwrap(), 4);
    let projector = Projector::new(db.pool.clone()).with_batch(3);
    let apart = standing(&projector).await;
    let at = |all: &[(&str, store::Checkpoint)], name: &str| {
        all.iter().find(|(n, _)| *n == name).unwrap().1
    };
    assert!(at(&apart, "tasks") > at(&apart, "timeline"));
    assert!(at(&apart, "timeline") > at(&apart, "nodes"));
    for i in 0..5 {
        task_history(&store, project, node, i).await;
    }
    // Small batches, read from the model furthest behind: each model takes
    // only the events after its own checkpoint, none twice, none skipped.
    assert!(projector.catch_up().await.unwrap() > 0);
    let head = store::outbox::committed_head(&db.pool).await.unwrap();
    for (name, checkpoint) in standing(&projector).await {
        assert_eq!(checkpoint, head, "{name} stopped short of the head");
    }
    let followed = dump(&db.pool).await;
    projector.rebuild(None).await.unwrap();
    assert_eq!(dump(&db.pool).await, followed);
}

#[tokio::test]
async fn a_catch_up_that_another_projector_keeps_current_reads_nothing_until_that_one_stops() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let (project, node) = history(&store).await;
    // The scheduler's own catch-up, before its housekeeping.
    let beside = Projector::only(db.pool.clone(), &["tasks", "nodes", "projects"]).unwrap();
    let mut seen = None;
    // The history is committed, but an open transaction anywhere on the
    // server (another test's) may hide it from readers for a moment: a
    // call that found nothing to read changes nothing, and the next reads.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while beside.drain_unless_moved(&mut seen).await.unwrap() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the history never showed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let caught_up = standing(&beside).await;
    // Another projector moves one model on: this one leaves the others
    // behind to it rather than reading the log again.
    task_history(&store, project, node, 2).await;
    Projector::only(db.pool.clone(), &["nodes"])
        .unwrap()
        .catch_up()
        .await
        .unwrap();
    assert_eq!(beside.drain_unless_moved(&mut seen).await.unwrap(), 0);
    let skipped = standing(&beside).await;
    assert_eq!(skipped[0], caught_up[0], "tasks moved without a read");
    assert_ne!(skipped[1], caught_up[1]);
    // Nobody moved them since: this one catches them up itself.
    assert!(beside.drain_unless_moved(&mut seen).await.unwrap() > 0);
    let head = store::outbox::committed_head(&db.pool).await.unwrap();
    for (name, checkpoint) in standing(&beside).await {
        assert_eq!(checkpoint, head, "{name} stopped short of the head");
    }
    // And once all stand still at the head, a call reads nothing new.
    assert_eq!(beside.drain_unless_moved(&mut seen).await.unwrap(), 0);
}
