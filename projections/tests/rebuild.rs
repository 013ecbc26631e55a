//! Rebuilding read models while the server keeps running: readers never
//! see a half-built model, and the running projector (and every other
//! outbox consumer) keeps up with new events meanwhile.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use cqrs_es::{Aggregate, DomainEvent};
use domain::node::{Node, NodeCommand};
use domain::project::{Project, ProjectCommand};
use domain::spec::TaskSpecDraft;
use domain::task::{Outcome, Task, TaskCommand};
use domain::Actor;
use projections::Projector;
use sqlx::PgPool;
use store::Store;
use testkit::{eventually, try_eventually};
use uuid::Uuid;

use support::dump;

/// Events as the log stores them: (type, id, sequence, event type,
/// payload, metadata).
type Row = (String, String, i64, String, String, String);

/// Decides `commands` on a new `A` in memory and returns the events as
/// stored rows, exactly as the store would write them.
fn decided<A>(id: &str, commands: Vec<(A::Command, Actor, DateTime<Utc>)>, out: &mut Vec<Row>)
where
    A: Aggregate,
    A: Decide,
{
    let mut state = A::default();
    let mut sequence = 0;
    for (command, actor, at) in commands {
        for event in state.decide_now(command) {
            sequence += 1;
            out.push((
                A::TYPE.to_string(),
                id.to_string(),
                sequence,
                event.event_type(),
                serde_json::to_string(&event).unwrap(),
                serde_json::json!({"actor": actor.to_string(), "at": at}).to_string(),
            ));
            state.apply(event);
        }
    }
}

/// The domain's `decide`, for the aggregates used here.
trait Decide: Aggregate {
    fn decide_now(&self, command: Self::Command) -> Vec<Self::Event>;
}

impl Decide for Task {
    fn decide_now(&self, command: TaskCommand) -> Vec<Self::Event> {
        self.decide(command).unwrap()
    }
}

/// Writes `rows` straight into the log (each takes its position as an append does).
async fn insert(pool: &PgPool, rows: &[Row]) {
    for chunk in rows.chunks(2000) {
        let col = |f: fn(&Row) -> String| chunk.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             SELECT t, i, s, e, '1', p::json, m::json FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[]) \
               WITH ORDINALITY AS u(t, i, s, e, p, m, n) ORDER BY n",
        )
        .bind(col(|r| r.0.clone()))
        .bind(col(|r| r.1.clone()))
        .bind(chunk.iter().map(|r| r.2).collect::<Vec<_>>())
        .bind(col(|r| r.3.clone()))
        .bind(col(|r| r.4.clone()))
        .bind(col(|r| r.5.clone()))
        .execute(pool)
        .await
        .unwrap();
    }
}

fn spec(project: Uuid) -> domain::spec::TaskSpec {
    testkit::spec(TaskSpecDraft {
        command: Some(vec!["python".into(), "train.py".into()]),
        ..testkit::spec_draft(project)
    })
}

/// A project, a node and `tasks` whole task lifecycles, written fast,
/// each task's events together.
async fn big_history(store: &Store, tasks: usize) -> (Uuid, Uuid) {
    history_of(store, tasks, None).await
}

/// As [`big_history`]; with `waves` of `n` tasks, the tasks in groups of
/// `n`, and in the log the first group's first events, the next group's
/// first events and so on, then every group's second events, and so
/// on: a task's events lie a whole wave apart.
async fn history_of(store: &Store, tasks: usize, waves: Option<usize>) -> (Uuid, Uuid) {
    let admin = Actor::User("admin".into());
    // The log's times as a raw write may leave them: with nanoseconds
    // beyond the microsecond that rounding and truncating part on (the
    // database keeps microseconds); every row written from them, by the
    // projector or a rebuild, keeps the same time.
    let now = Utc::now();
    let now = now
        .with_nanosecond(now.nanosecond() / 1000 * 1000 + 696)
        .unwrap_or(now);
    let project = Uuid::new_v4();
    store
        .execute::<Project>(
            &project.to_string(),
            ProjectCommand::Create {
                project_id: project,
                name: "big".into(),
                description: String::new(),
                owner: "alice".into(),
                at: now,
            },
            &admin,
            now,
        )
        .await
        .unwrap();
    let node = Uuid::new_v4();
    store
        .execute::<Node>(
            &node.to_string(),
            NodeCommand::Provision {
                node_id: node,
                name: "gpu-1".into(),
                labels: Default::default(),
                token_fingerprint: "ff".into(),
                max_resources: Default::default(),
                by: admin.clone(),
                at: now,
            },
            &admin,
            now,
        )
        .await
        .unwrap();
    let agent = Actor::Node(node.to_string());
    let mut lifecycles = Vec::new();
    for _ in 0..tasks {
        let id = Uuid::new_v4();
        let commands = vec![
            (
                TaskCommand::Submit {
                    task_id: id,
                    spec: spec(project),
                    by: admin.clone(),
                    at: now,
                },
                admin.clone(),
                now,
            ),
            (
                TaskCommand::Assign {
                    node_id: node,
                    gpus: vec![],
                    reason: "fits".into(),
                    at: now,
                },
                Actor::System("scheduler".into()),
                now,
            ),
            (
                TaskCommand::ReportStarted {
                    node_id: node,
                    attempt: 1,
                    container: "c".into(),
                    at: now,
                },
                agent.clone(),
                now,
            ),
            (
                TaskCommand::ReportExited {
                    node_id: node,
                    attempt: 1,
                    outcome: Outcome::Succeeded,
                    at: now,
                },
                agent.clone(),
                now,
            ),
        ];
        let mut task = Vec::new();
        decided::<Task>(&id.to_string(), commands, &mut task);
        lifecycles.push(task);
    }
    let rows: Vec<Row> = match waves {
        Some(n) => {
            let longest = lifecycles.iter().map(Vec::len).max().unwrap_or(0);
            let groups: Vec<&[Vec<Row>]> = lifecycles.chunks(n.max(1)).collect();
            (0..longest)
                .flat_map(|i| {
                    groups
                        .iter()
                        .flat_map(move |group| group.iter().filter_map(move |t| t.get(i)))
                })
                .cloned()
                .collect()
        }
        None => lifecycles.concat(),
    };
    insert(store.pool(), &rows).await;
    visible(store.pool()).await;
    (project, node)
}

/// Waits until every committed event is visible to outbox readers: other
/// tests' transactions on the same server can hide new ones for a moment.
async fn visible(pool: &PgPool) {
    let committed = store::outbox::committed_head(pool).await.unwrap();
    eventually(
        "every committed event to be visible to outbox readers",
        Duration::from_secs(20),
        || async { (store::outbox::head(pool).await.unwrap() >= committed).then_some(()) },
    )
    .await;
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn submit(store: &Store, project: Uuid) -> Uuid {
    let id = Uuid::new_v4();
    let user = Actor::User("alice".into());
    store
        .execute::<Task>(
            &id.to_string(),
            TaskCommand::Submit {
                task_id: id,
                spec: spec(project),
                by: user.clone(),
                at: Utc::now(),
            },
            &user,
            Utc::now(),
        )
        .await
        .unwrap();
    id
}

#[tokio::test]
async fn a_rebuild_while_the_server_runs_never_shows_a_half_built_model_nor_holds_consumers_back() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let (project, _) = big_history(&store, 2000).await;
    let projector = Arc::new(Projector::new(db.pool.clone()));
    projector.catch_up().await.unwrap();
    let tasks_before = count(&db.pool, "task_view").await;
    let timeline_before = count(&db.pool, "timeline").await;
    assert_eq!(tasks_before, 2000);

    // The server: a projector running as the projector role runs it.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let projector = projector.clone();
        tokio::spawn(async move {
            projector
                .run(Duration::from_millis(20), async {
                    let _ = stopped.await;
                })
                .await;
        })
    };
    // Readers: a model never has fewer rows than before the rebuild.
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pool, done) = (db.pool.clone(), done.clone());
        tokio::spawn(async move {
            let mut reads = 0;
            while !done.load(Ordering::Relaxed) {
                let tasks = count(&pool, "task_view").await;
                let timeline = count(&pool, "timeline").await;
                assert!(tasks >= tasks_before, "task_view read with {tasks} rows");
                assert!(
                    timeline >= timeline_before,
                    "timeline read with {timeline} rows"
                );
                reads += 1;
            }
            reads
        })
    };

    let rebuild = {
        let pool = db.pool.clone();
        tokio::spawn(async move { Projector::new(pool).rebuild(None).await })
    };
    // New work during the rebuild reaches the running projector's models
    // while the rebuild is still going on.
    let mut seen_during_rebuild = 0;
    let mut submitted = Vec::new();
    while !rebuild.is_finished() {
        let id = submit(&store, project).await;
        submitted.push(id);
        // Some(true): the task showed while the rebuild still ran; Some(false):
        // the rebuild finished first; None: it did not show within 5 s.
        let during = try_eventually(Duration::from_secs(5), || async {
            let there: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM task_view WHERE id = $1)")
                    .bind(id)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            let finished = rebuild.is_finished();
            (there || finished).then_some(there && !finished)
        })
        .await;
        if during == Some(true) {
            seen_during_rebuild += 1;
        }
    }
    let applied = rebuild.await.unwrap().unwrap();
    assert!(applied >= 5 * 8_000, "{applied}");
    assert!(
        seen_during_rebuild >= 2,
        "only {seen_during_rebuild} of {} tasks submitted during the rebuild were projected before it ended",
        submitted.len()
    );
    done.store(true, Ordering::Relaxed);
    assert!(reader.await.unwrap() > 0);

    // Afterwards everything is there, once, and the running projector
    // carries on from the rebuilt checkpoints.
    let late = submit(&store, project).await;
    projector.catch_up().await.unwrap();
    let _ = stop.send(());
    running.await.unwrap();
    let events = count(&db.pool, "events").await;
    assert_eq!(count(&db.pool, "timeline").await, events);
    assert_eq!(
        count(&db.pool, "task_view").await,
        2000 + submitted.len() as i64 + 1
    );
    let state: String = sqlx::query_scalar("SELECT state FROM task_view WHERE id = $1")
        .bind(late)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "queued");
    for s in projector.status().await.unwrap() {
        assert_eq!(s.lag, 0, "{} lags", s.name);
    }
    assert_nothing_left(&db.pool).await;
}

#[tokio::test]
async fn a_rebuild_holding_few_rows_writes_those_it_lets_go_and_reads_them_back_when_named_again() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    // Two groups of a thousand tasks, 8,000 events: each group's first
    // events fill one of the rebuild's transactions of a thousand, the
    // other group's the next, and so on; a task's events lie two
    // transactions apart.
    history_of(&store, 2000, Some(1000)).await;
    let projector = Projector::new(db.pool.clone());
    projector.catch_up().await.unwrap();
    let live = dump(&db.pool).await;
    assert_eq!(count(&db.pool, "task_view").await, 2000);
    // Seven rows held: each transaction lets go of the rows of the group
    // it did not touch, and the next reads them back to apply their
    // tasks' next events.
    for held in [7, projections::ROWS_HELD] {
        let rebuilt = Projector::new(db.pool.clone())
            .with_rows_held(held)
            .rebuild_report(None)
            .await
            .unwrap();
        assert!(!rebuilt.one_by_one, "{held} rows held");
        assert_eq!(dump(&db.pool).await, live, "{held} rows held");
    }
}

#[tokio::test]
async fn a_rebuild_that_fails_leaves_the_live_models_as_they_were() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let (project, _) = big_history(&store, 50).await;
    submit(&store, project).await;
    let projector = Projector::new(db.pool.clone());
    projector.catch_up().await.unwrap();
    let before = count(&db.pool, "task_view").await;
    // A failure that may pass by itself (the database cancelling the
    // statement), which a rebuild gives up on rather than recording: a
    // check on task_view, which the rebuilt table copies, refuses tasks of
    // priority 7 that way.
    sqlx::raw_sql(
        "CREATE FUNCTION not_now(p integer) RETURNS boolean LANGUAGE plpgsql AS $$ \
         BEGIN IF p = 7 THEN RAISE EXCEPTION 'not now' USING ERRCODE = '57014'; END IF; \
         RETURN true; END $$; \
         ALTER TABLE task_view ADD CONSTRAINT not_now CHECK (not_now(priority)) NOT VALID",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut urgent = spec(project);
    urgent.priority = 7;
    let id = Uuid::new_v4();
    let user = Actor::User("alice".into());
    store
        .execute::<Task>(
            &id.to_string(),
            TaskCommand::Submit {
                task_id: id,
                spec: urgent,
                by: user.clone(),
                at: Utc::now(),
            },
            &user,
            Utc::now(),
        )
        .await
        .unwrap();
    visible(&db.pool).await;
    let err = projector.rebuild(Some("tasks")).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_eq!(count(&db.pool, "task_view").await, before);
    assert_nothing_left(&db.pool).await;
    let letters = store::dead_letters::list(&db.pool, None).await.unwrap();
    assert!(
        letters.is_empty(),
        "a passing failure is no dead letter: {letters:?}"
    );
}

/// No table of a rebuild outlives it.
async fn assert_nothing_left(pool: &PgPool) {
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'unidesk_rebuild'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(left, 0, "the rebuild's schema is still there");
}

/// The read models' tables as the catalog describes them: indexes with
/// their names, keys and other constraints, owners, grants, and a view's
/// definition.
async fn catalog(pool: &PgPool) -> String {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT format('%s %s', tablename, indexdef) FROM pg_indexes \
           WHERE tablename IN ('task_view', 'node_view', 'project_view', 'project_member_view', 'user_view', 'timeline') \
         UNION ALL SELECT format('%s owner %s acl %s', c.relname, pg_get_userbyid(c.relowner), c.relacl) \
           FROM pg_class c WHERE c.relname IN ('task_view', 'node_view', 'project_view', 'project_member_view', 'user_view', 'timeline') \
         UNION ALL SELECT format('%s index %s valid %s ready %s', c.relname, x.relname, i.indisvalid, i.indisready) \
           FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_class x ON x.oid = i.indexrelid \
           WHERE c.relname IN ('task_view', 'node_view', 'project_view', 'project_member_view', 'user_view', 'timeline') \
         UNION ALL SELECT format('%s constraint %s %s', c.relname, k.conname, pg_get_constraintdef(k.oid)) \
           FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid \
           WHERE c.relname IN ('task_view', 'node_view', 'project_view', 'project_member_view', 'user_view', 'timeline') \
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.join("\n")
}

#[tokio::test]
async fn a_rebuild_keeps_index_names_grants_and_whatever_depends_on_a_model() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let (project, _) = big_history(&store, 20).await;
    submit(&store, project).await;
    let projector = Projector::new(db.pool.clone());
    projector.catch_up().await.unwrap();
    // A reporting role with read access, and a view over one model (so
    // that model cannot be dropped and recreated).
    sqlx::query("GRANT SELECT ON timeline, task_view TO PUBLIC")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("CREATE VIEW queued_tasks AS SELECT id FROM task_view WHERE state = 'queued'")
        .execute(&db.pool)
        .await
        .unwrap();
    let (before, rows) = (catalog(&db.pool).await, dump(&db.pool).await);
    assert!(before.contains("timeline_order"), "{before}");
    assert!(
        before.contains("timeline index timeline_order valid t ready t"),
        "{before}"
    );
    assert!(
        before.contains("task_view constraint task_view_pkey PRIMARY KEY (id)"),
        "{before}"
    );
    projector.rebuild(None).await.unwrap();
    assert_eq!(catalog(&db.pool).await, before);
    assert_eq!(dump(&db.pool).await, rows);
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM queued_tasks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(queued, 1);
    assert_nothing_left(&db.pool).await;
}

#[tokio::test]
async fn a_reader_in_a_long_transaction_delays_the_swap_and_sees_the_old_rows_throughout() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let (project, _) = big_history(&store, 20).await;
    let projector = Projector::new(db.pool.clone());
    projector.catch_up().await.unwrap();
    let mut reader = db.pool.begin().await.unwrap();
    let seen = count_in(&mut reader, "task_view").await;
    assert_eq!(seen, 20);
    let rebuild = {
        let pool = db.pool.clone();
        tokio::spawn(async move { Projector::new(pool).rebuild(None).await })
    };
    // Meanwhile new work keeps flowing to the running projector's models.
    let id = submit(&store, project).await;
    // The signal: the rebuild's swap is queued behind the reader's lock.
    eventually(
        "the rebuild's swap to wait for the reader's lock",
        Duration::from_secs(30),
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                 WHERE NOT l.granted AND d.datname = current_database())",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap()
            .then_some(())
        },
    )
    .await;
    assert!(
        !rebuild.is_finished(),
        "the swap did not wait for the reader"
    );
    assert_eq!(count_in(&mut reader, "task_view").await, 20);
    projector.catch_up().await.unwrap();
    let there: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM task_view WHERE id = $1)")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        there,
        "the running projector was held back during the rebuild"
    );
    reader.commit().await.unwrap();
    rebuild.await.unwrap().unwrap();
    assert_eq!(count(&db.pool, "task_view").await, 21);
    assert_nothing_left(&db.pool).await;
}

async fn count_in(conn: &mut sqlx::PgConnection, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn one_rebuild_runs_at_a_time() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    big_history(&store, 300).await;
    let first = {
        let pool = db.pool.clone();
        tokio::spawn(async move { Projector::new(pool).rebuild(None).await })
    };
    eventually(
        "the first rebuild to hold the rebuild lock (or finish)",
        Duration::from_secs(30),
        || async {
            let held: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'unidesk_rebuild')",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (held || first.is_finished()).then_some(())
        },
    )
    .await;
    if !first.is_finished() {
        let err = Projector::new(db.pool.clone())
            .rebuild(Some("timeline"))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("another rebuild is running"),
            "{err}"
        );
    }
    first.await.unwrap().unwrap();
    assert_eq!(count(&db.pool, "task_view").await, 300);
    assert_nothing_left(&db.pool).await;
}

#[tokio::test]
async fn new_events_reach_their_consumers_while_a_rebuild_builds_its_indexes() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let (project, _) = big_history(&store, 100).await;
    let projector = Projector::new(db.pool.clone());
    projector.catch_up().await.unwrap();
    // One more index on the timeline, slow to build (10 ms a row, some
    // four seconds for the rebuild's copy), as a large table's are.
    for statement in [
        "CREATE FUNCTION slow_key(p bigint) RETURNS bigint IMMUTABLE LANGUAGE plpgsql AS \
           'BEGIN PERFORM pg_sleep(0.01); RETURN p; END'",
        "CREATE INDEX timeline_slow ON timeline (slow_key(position))",
    ] {
        sqlx::query(statement).execute(&db.pool).await.unwrap();
    }
    let rebuilding = {
        let projector = Projector::new(db.pool.clone());
        tokio::spawn(async move { projector.rebuild(None).await })
    };
    let building = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
               AND state = 'active' AND query LIKE 'CREATE INDEX%slow_key%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        n > 0
    };
    eventually(
        "the rebuild to build its copy of the slow index",
        Duration::from_secs(60),
        || async { building().await.then_some(()) },
    )
    .await;
    // A task submitted meanwhile is visible to the scheduler, the ingress
    // and the projector while that index is still being built: nothing
    // of the rebuild holds a transaction open that long.
    submit(&store, project).await;
    visible(&db.pool).await;
    assert!(
        building().await,
        "the new event became visible only once the index was built"
    );
    rebuilding.await.unwrap().unwrap();
    let valid: bool = sqlx::query_scalar(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE c.relname = 'timeline_slow'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(valid, "the rebuilt index is not valid");
    assert_nothing_left(&db.pool).await;
}
