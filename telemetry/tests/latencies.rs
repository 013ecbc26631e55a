//! The task latency histograms against a real PostgreSQL: a process that
//! commits a transition whose earlier time another process committed reads
//! it from the tasks read model, and both give the times the events record.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::task::{Task, TaskCommand};
use domain::Actor;
use projections::Projector;
use store::Store;
use telemetry::{Metrics, Scope};
use uuid::Uuid;

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000, 0).unwrap() + Duration::milliseconds(ms)
}

/// The value of the sample `name` (without labels) in `text`.
fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

async fn execute(store: &Store, task: Uuid, command: TaskCommand) {
    let actor = Actor::System("test".into());
    store
        .execute::<Task>(&task.to_string(), command, &actor, Utc::now())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_process_reads_the_earlier_times_it_did_not_commit_from_the_read_model() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    // Two processes' metrics and projectors on one database.
    let (first, second) = (
        Metrics::new(&store, store::health::Limits::default()),
        Metrics::new(&store, store::health::Limits::default()),
    );
    let projector =
        |m: &Metrics| Projector::new(db.pool.clone()).with_observer(m.projector_observer());
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let node = Uuid::new_v4();
    for task in [a, b] {
        let spec = testkit::spec(testkit::spec_draft(Uuid::new_v4()));
        let by = Actor::User("alice".into());
        execute(
            &store,
            task,
            TaskCommand::Submit {
                task_id: task,
                spec,
                by,
                at: at(0),
            },
        )
        .await;
    }
    // The first process commits both submissions.
    projector(&first).drain().await.unwrap();
    let lifecycle = [(a, 1_500, 4_250), (b, 2_000, 2_500)];
    for (task, assigned, started) in lifecycle {
        let reason = "fits".into();
        execute(
            &store,
            task,
            TaskCommand::Assign {
                node_id: node,
                gpus: vec![],
                reason,
                at: at(assigned),
            },
        )
        .await;
        execute(
            &store,
            task,
            TaskCommand::Accept {
                node_id: node,
                attempt: 1,
                at: at(assigned),
            },
        )
        .await;
        let container = "c".into();
        execute(
            &store,
            task,
            TaskCommand::ReportStarted {
                node_id: node,
                attempt: 1,
                container,
                at: at(started),
            },
        )
        .await;
        // a's transitions are committed by the first process, which saw
        // its submission; b's by the second, which did not.
        let p = if task == a {
            projector(&first)
        } else {
            projector(&second)
        };
        p.drain().await.unwrap();
    }
    let first = first.render(Scope::Private).await;
    let second = second.render(Scope::Private).await;
    for (text, assign, running) in [(&first, 1.5, 2.75), (&second, 2.0, 0.5)] {
        assert_eq!(
            value(text, "unidesk_task_submit_to_assign_seconds_count"),
            1.0,
            "{text}"
        );
        assert_eq!(
            value(text, "unidesk_task_submit_to_assign_seconds_sum"),
            assign,
            "{text}"
        );
        assert_eq!(
            value(text, "unidesk_task_assign_to_running_seconds_count"),
            1.0,
            "{text}"
        );
        assert_eq!(
            value(text, "unidesk_task_assign_to_running_seconds_sum"),
            running,
            "{text}"
        );
    }
}
