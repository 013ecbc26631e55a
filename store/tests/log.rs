//! The event log against a real PostgreSQL: ordering under concurrent
//! writers with late commits, wake-ups, snapshots and conflicts.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use domain::node::{Node, NodeCommand};
use domain::project::{Project, ProjectCommand, ProjectError};
use domain::Actor;
use store::outbox::{self, Checkpoint, Filter};
use store::{Store, StoreError, Wakeup};
use uuid::Uuid;

fn admin() -> Actor {
    Actor::User("admin".into())
}

async fn create_project(store: &Store, id: Uuid, name: &str) {
    store
        .execute::<Project>(
            &id.to_string(),
            ProjectCommand::Create {
                project_id: id,
                name: name.into(),
                description: String::new(),
                owner: "admin".into(),
                at: Utc::now(),
            },
            &admin(),
            Utc::now(),
        )
        .await
        .unwrap();
}

/// Appends one event for `aggregate` at `sequence` in its own transaction and
/// holds the transaction open for `hold` before committing, so events with
/// higher outbox positions commit first.
async fn late_append(pool: &sqlx::PgPool, aggregate: &str, sequence: i64, hold: Duration) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('probe', $1, $2, 'ProbeWritten', '1', '{\"ProbeWritten\":{}}', '{\"actor\":\"system:test\"}')",
    )
    .bind(aggregate)
    .bind(sequence)
    .execute(&mut *tx)
    .await
    .unwrap();
    tokio::time::sleep(hold).await;
    tx.commit().await.unwrap();
}

/// Appends two events whose transaction ids and outbox positions are in
/// opposite orders, whatever the machine's load: the first transaction
/// takes its id, the second appends and commits, then the first appends
/// (a higher position, a lower id) and commits.
async fn inverted_pair(pool: &sqlx::PgPool) {
    let mut first = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *first)
        .await
        .unwrap();
    late_append(pool, "inverted-second", 1, Duration::ZERO).await;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('probe', 'inverted-first', 1, 'ProbeWritten', '1', '{\"ProbeWritten\":{}}', '{\"actor\":\"system:test\"}')",
    )
    .execute(&mut *first)
    .await
    .unwrap();
    first.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_sees_every_event_once_and_in_order_despite_late_commits() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());

    let mut writers = Vec::new();
    // One pair that is out of order for certain; the writers below make
    // more at random.
    let pool = db.pool.clone();
    writers.push(tokio::spawn(async move { inverted_pair(&pool).await }));
    // Late committers: each holds its transaction open for a while.
    for w in 0..8 {
        let pool = db.pool.clone();
        writers.push(tokio::spawn(async move {
            for seq in 1..=12 {
                let hold = Duration::from_millis(rand::random::<u64>() % 40);
                late_append(&pool, &format!("probe-{w}"), seq, hold).await;
            }
        }));
    }
    // Fast writers through the command path, some on shared aggregates so
    // that optimistic concurrency conflicts happen too.
    let shared: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (i, id) in shared.iter().enumerate() {
        create_project(&store, *id, &format!("shared-{i}")).await;
    }
    for w in 0..8 {
        let store = store.clone();
        let shared = shared.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..15 {
                let id = shared[(w + n) % shared.len()];
                store
                    .execute::<Project>(
                        &id.to_string(),
                        ProjectCommand::Rename {
                            name: format!("w{w}-n{n}"),
                            by: admin(),
                            at: Utc::now(),
                        },
                        &admin(),
                        Utc::now(),
                    )
                    .await
                    .unwrap();
            }
        }));
    }

    // The consumer reads concurrently with the writers.
    let mut seen: Vec<(String, String, i64, i64)> = Vec::new();
    let mut at = Checkpoint::default();
    let mut late_seen = 0usize;
    let mut max_position = 0i64;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Once every writer has finished, everything up to `target` is committed;
    // the consumer stops when it has read that far.
    let mut target: Option<Checkpoint> = None;
    loop {
        if target.is_none() && writers.iter().all(|w| w.is_finished()) {
            target = Some(outbox::committed_head(&db.pool).await.unwrap());
        }
        let batch = outbox::read_after(&db.pool, at, 7, &Filter::default())
            .await
            .unwrap();
        for e in &batch {
            if e.position < max_position {
                late_seen += 1;
            }
            max_position = max_position.max(e.position);
            seen.push((
                e.aggregate_type.clone(),
                e.aggregate_id.clone(),
                e.sequence,
                e.position,
            ));
        }
        if let Some(last) = batch.last() {
            assert!(
                last.checkpoint() > at,
                "the checkpoint must only move forward"
            );
            at = last.checkpoint();
        }
        if target.is_some_and(|t| at >= t) {
            break;
        }
        assert!(Instant::now() < deadline, "consumer did not catch up");
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for w in writers {
        w.await.unwrap();
    }

    // Exactly once: what was seen is what is in the log, no more, no less.
    let all: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence FROM events ORDER BY 1, 2, 3",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let unique: HashSet<_> = seen
        .iter()
        .map(|(t, i, s, _)| (t.clone(), i.clone(), *s))
        .collect();
    assert_eq!(unique.len(), seen.len(), "an event was delivered twice");
    assert_eq!(
        unique,
        all.iter().cloned().collect::<HashSet<_>>(),
        "an event was skipped"
    );
    assert_eq!(all.len(), 2 + 8 * 12 + 3 + 8 * 15);

    // Per aggregate, events arrive in sequence order with no gap.
    let mut per: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    for (t, i, s, _) in &seen {
        per.entry((t.clone(), i.clone())).or_default().push(*s);
    }
    for (key, seqs) in per {
        let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, expected, "{key:?} out of order");
    }
    // The run really produced commits that became visible out of position
    // order: a reader of `position > last` would have lost these.
    assert!(
        late_seen > 0,
        "no late commit happened; the test proved nothing"
    );
}

#[tokio::test]
async fn a_commit_wakes_a_listening_consumer_before_its_poll_interval() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let mut wake = Wakeup::new(db.pool.clone(), Duration::from_secs(30)).await;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        wake.wait().await;
        started.elapsed()
    });
    // `Wakeup::new` has already run LISTEN, so the notification of this
    // commit is queued for the waiter even if it has not reached `wait` yet.
    create_project(&store, Uuid::new_v4(), "woken").await;
    let waited = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("no wake-up")
        .unwrap();
    assert!(
        waited < Duration::from_secs(20),
        "woken only by the poll: {waited:?}"
    );
}

#[tokio::test]
async fn a_snapshotted_node_loads_the_same_state_as_a_full_replay() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let id = Uuid::new_v4();
    provision(&store, id).await;
    for i in 0..(store::SNAPSHOT_EVERY * 2 + 7) {
        store
            .execute::<Node>(&id.to_string(), drain(i % 2 == 0), &admin(), Utc::now())
            .await
            .unwrap();
    }
    let snapshots: i64 =
        sqlx::query_scalar("SELECT count(*) FROM snapshots WHERE aggregate_type = 'node'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        snapshots, 2,
        "the node should be snapshotted every 50 events"
    );
    let loaded = store.load::<Node>(&id.to_string()).await.unwrap().unwrap();
    let replayed = store.replay::<Node>(&id.to_string(), None).await.unwrap();
    let (last, full) = replayed.last().unwrap();
    assert_eq!(loaded.sequence, last.sequence);
    assert_eq!(&loaded.state, full);
    assert!(loaded.state.drained);
}

#[tokio::test]
async fn a_refused_command_appends_nothing() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let err = store
        .execute::<Project>(
            &Uuid::new_v4().to_string(),
            ProjectCommand::Archive {
                by: admin(),
                at: Utc::now(),
            },
            &admin(),
            Utc::now(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Rejected(ProjectError::NotFound)));
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn an_event_the_database_cannot_hold_is_unstorable_for_good_and_appends_nothing() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let node_id = Uuid::now_v7();
    let now = Utc::now();
    store
        .execute::<Node>(
            &node_id.to_string(),
            NodeCommand::Provision {
                node_id,
                name: "n1".into(),
                labels: BTreeMap::new(),
                token_fingerprint: "f".into(),
                max_resources: Default::default(),
                by: admin(),
                at: now,
            },
            &admin(),
            now,
        )
        .await
        .unwrap();
    // jsonb cannot hold NUL: SQLSTATE 22P05.
    let err = store
        .execute::<Node>(
            &node_id.to_string(),
            NodeCommand::Connect {
                session: Uuid::now_v7(),
                agent_version: "1.0\0".into(),
                resources: Default::default(),
                labels: BTreeMap::new(),
                at: now,
            },
            &admin(),
            now,
        )
        .await
        .unwrap_err();
    let StoreError::Unstorable { sqlstate, .. } = &err else {
        panic!("expected unstorable, got {err:?}")
    };
    assert_eq!(sqlstate, "22P05");
    assert!(err.is_permanent());
    assert!(!StoreError::<ProjectError>::Database("down".into()).is_permanent());
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn events_carry_their_actor_and_time_as_metadata() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    create_project(&store, Uuid::new_v4(), "meta").await;
    // Readers see a commit once every older transaction on the server has
    // ended, and other tests share the server.
    let events = testkit::eventually(
        "the committed event visible to outbox readers",
        Duration::from_secs(30),
        || async {
            let events =
                outbox::read_after(&db.pool, Checkpoint::default(), 10, &Filter::default())
                    .await
                    .unwrap();
            (!events.is_empty()).then_some(events)
        },
    )
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].actor(), "user:admin");
    assert!(events[0].metadata.get("at").is_some());
    assert_eq!(events[0].event_type, "ProjectCreated");
    assert_eq!(events[0].body()["name"], "meta");
}

#[tokio::test]
async fn stored_events_cannot_be_edited_or_deleted() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    create_project(&store, Uuid::new_v4(), "immutable").await;
    for sql in [
        "UPDATE events SET payload = '{}'",
        "UPDATE events SET position = position + 1000",
        "UPDATE outbox SET recorded_at = now()",
        "DELETE FROM events",
    ] {
        let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        assert!(err.to_string().contains("immutable"), "{err}");
    }
}

#[tokio::test]
async fn a_name_claim_is_exclusive_until_its_aggregate_fails_to_appear() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let first = Uuid::new_v4();
    store::names::claim(&db.pool, "project", "vision", &first.to_string())
        .await
        .unwrap();
    create_project(&store, first, "vision").await;
    let second = Uuid::new_v4().to_string();
    assert!(matches!(
        store::names::claim(&db.pool, "project", "vision", &second).await,
        Err(store::names::ClaimError::Taken(_))
    ));
    // A claim whose aggregate never appeared is taken over.
    store::names::claim(&db.pool, "project", "orphan", "ghost")
        .await
        .unwrap();
    store::names::claim(&db.pool, "project", "orphan", &second)
        .await
        .unwrap();
    assert_eq!(
        store::names::lookup(&db.pool, "project", "orphan")
            .await
            .unwrap(),
        Some(second)
    );
}

/// Provisions node `n1` as `id` through `store`.
async fn provision(store: &Store, id: Uuid) {
    store
        .execute::<Node>(
            &id.to_string(),
            NodeCommand::Provision {
                node_id: id,
                name: "n1".into(),
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
}

fn drain(drain: bool) -> NodeCommand {
    if drain {
        NodeCommand::Drain {
            by: admin(),
            at: Utc::now(),
        }
    } else {
        NodeCommand::Undrain {
            by: admin(),
            at: Utc::now(),
        }
    }
}

#[tokio::test]
async fn a_process_deciding_on_an_old_copy_decides_again_on_the_log() {
    let db = testkit::fresh_db().await;
    // Two processes: each remembers the aggregates it decided on.
    let a = Store::new(db.pool.clone());
    let b = Store::new(db.pool.clone());
    let id = Uuid::now_v7();
    provision(&a, id).await;
    let loads = a.aggregate_loads().get("node");

    // b drains the node; a still remembers it undrained.
    b.execute::<Node>(&id.to_string(), drain(true), &admin(), Utc::now())
        .await
        .unwrap();
    // Undrain is nothing to do on a's old copy, but not on the log: a must
    // not answer "nothing to do" without looking.
    let undrained = a
        .execute::<Node>(&id.to_string(), drain(false), &admin(), Utc::now())
        .await
        .unwrap();
    assert_eq!(undrained.events.len(), 1, "the undrain was appended");
    assert_eq!(undrained.sequence, 3);
    assert!(!undrained.state.drained);
    assert_eq!(a.aggregate_loads().get("node"), loads + 1, "one fresh load");

    // b's copy is old now: its drain collides with a's undrain on the log's
    // key, and is decided again on the log's state.
    let drained = b
        .execute::<Node>(&id.to_string(), drain(true), &admin(), Utc::now())
        .await
        .unwrap();
    assert_eq!(drained.sequence, 4);
    assert!(drained.state.drained);

    // Decided on a copy that is current, a command costs no load at all.
    let loads = b.aggregate_loads().get("node");
    let again = b
        .execute::<Node>(&id.to_string(), drain(false), &admin(), Utc::now())
        .await
        .unwrap();
    assert_eq!(again.sequence, 5);
    assert_eq!(b.aggregate_loads().get("node"), loads);

    let replayed = a.replay::<Node>(&id.to_string(), None).await.unwrap();
    let sequences: Vec<usize> = replayed.iter().map(|(e, _)| e.sequence).collect();
    assert_eq!(sequences, vec![1, 2, 3, 4, 5], "no gap, no duplicate");
    assert_eq!(&again.state, &replayed.last().unwrap().1);
}

#[tokio::test]
async fn a_process_loading_what_it_remembers_gets_the_log_as_it_is_now() {
    let db = testkit::fresh_db().await;
    let a = Store::new(db.pool.clone());
    let b = Store::new(db.pool.clone());
    let id = Uuid::now_v7();
    // a remembers the node at its first event; b labels it, then appends
    // past two snapshots.
    provision(&a, id).await;
    let labels = NodeCommand::SetLabels {
        labels: [("site".to_string(), "b".to_string())].into(),
        by: admin(),
        at: Utc::now(),
    };
    b.execute::<Node>(&id.to_string(), labels, &admin(), Utc::now())
        .await
        .unwrap();
    for i in 0..(store::SNAPSHOT_EVERY * 2 + 2) {
        b.execute::<Node>(&id.to_string(), drain(i % 2 == 0), &admin(), Utc::now())
            .await
            .unwrap();
    }
    assert_eq!(a.remembered::<Node>(&id.to_string()).unwrap().sequence, 1);
    let loaded = a.load::<Node>(&id.to_string()).await.unwrap().unwrap();
    let replayed = a.replay::<Node>(&id.to_string(), None).await.unwrap();
    let (last, full) = replayed.last().unwrap();
    assert_eq!(loaded.sequence, last.sequence);
    assert_eq!(loaded.sequence, store::SNAPSHOT_EVERY * 2 + 4);
    assert_eq!(&loaded.state, full);
    assert!(!loaded.state.drained, "undrained last");
    assert_eq!(
        loaded.state.labels.get("site").map(String::as_str),
        Some("b")
    );
    // And a decides on it from there: nothing to do is answered as such.
    let again = a
        .execute::<Node>(&id.to_string(), drain(false), &admin(), Utc::now())
        .await
        .unwrap();
    assert!(again.events.is_empty(), "already undrained");
    assert_eq!(again.sequence, loaded.sequence);
}

#[tokio::test]
async fn concurrent_writers_in_many_processes_lose_no_command() {
    let db = testkit::fresh_db().await;
    let stores: Vec<Store> = (0..4).map(|_| Store::new(db.pool.clone())).collect();
    let id = Uuid::now_v7();
    provision(&stores[0], id).await;
    // 4 processes x 3 tasks each toggle the same node 10 times.
    let mut writers = Vec::new();
    for (i, store) in stores.iter().enumerate() {
        for j in 0..3 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let mut appended = 0;
                for k in 0..10 {
                    let r = store
                        .execute::<Node>(
                            &id.to_string(),
                            drain((i + j + k) % 2 == 0),
                            &admin(),
                            Utc::now(),
                        )
                        .await
                        .unwrap();
                    appended += r.events.len();
                }
                appended
            }));
        }
    }
    let mut appended = 0;
    for w in writers {
        appended += w.await.unwrap();
    }
    let replayed = stores[0]
        .replay::<Node>(&id.to_string(), None)
        .await
        .unwrap();
    assert_eq!(
        replayed.len(),
        1 + appended,
        "every appended event is in the log"
    );
    for (i, (e, _)) in replayed.iter().enumerate() {
        assert_eq!(e.sequence, i + 1);
    }
    // Each toggle that was appended changed the state: no event decided on
    // a copy the log had moved past.
    for pair in replayed.windows(2).skip(1) {
        assert_ne!(pair[0].1.drained, pair[1].1.drained);
    }
    let loaded = stores[3]
        .load::<Node>(&id.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&loaded.state, &replayed.last().unwrap().1);
}

#[tokio::test]
async fn the_state_around_any_event_of_a_long_history_matches_a_full_replay() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let id = Uuid::now_v7();
    provision(&store, id).await;
    for i in 0..(store::SNAPSHOT_EVERY * 3) {
        store
            .execute::<Node>(&id.to_string(), drain(i % 2 == 0), &admin(), Utc::now())
            .await
            .unwrap();
    }
    let replayed = store.replay::<Node>(&id.to_string(), None).await.unwrap();
    for sequence in [1, 2, 49, 50, 51, 100, 101, 150, 151] {
        let (before, event, after) = store
            .around::<Node>(&id.to_string(), sequence)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(event.sequence, sequence);
        assert_eq!(event.payload, replayed[sequence - 1].0.payload);
        assert_eq!(after, replayed[sequence - 1].1, "after #{sequence}");
        assert_eq!(
            before.as_ref(),
            (sequence > 1).then(|| &replayed[sequence - 2].1),
            "before #{sequence}"
        );
    }
    assert!(store
        .around::<Node>(&id.to_string(), 152)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_guarded_command_appends_nothing_once_its_guard_moved_on() {
    let db = testkit::fresh_db().await;
    // Two processes: this one decides, the other changes the guard.
    let here = Store::new(db.pool.clone());
    let there = Store::new(db.pool.clone());
    let (guard, target) = (Uuid::new_v4(), Uuid::new_v4());
    provision(&here, guard).await;
    provision(&here, target).await;
    let (g, t) = (guard.to_string(), target.to_string());
    let events = |id: String| {
        let pool = db.pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
            n
        }
    };
    let seen = here.remembered::<Node>(&g).unwrap().sequence;
    let executed = here
        .execute_guarded::<Node>(
            &t,
            drain(true),
            &admin(),
            Utc::now(),
            &store::Guard::on::<Node>(&g, seen),
        )
        .await
        .unwrap();
    assert_eq!(executed.map(|e| e.sequence), Some(2));

    // The guard moves on elsewhere: a command decided on what was seen of
    // it before appends nothing, also when a snapshot would be due.
    there
        .execute::<Node>(&g, drain(true), &admin(), Utc::now())
        .await
        .unwrap();
    for i in 3..store::SNAPSHOT_EVERY {
        here.execute::<Node>(&t, drain(i % 2 == 0), &admin(), Utc::now())
            .await
            .unwrap();
    }
    let before = events(t.clone()).await;
    assert_eq!(before, store::SNAPSHOT_EVERY as i64 - 1);
    let stale = store::Guard::on::<Node>(&g, seen);
    let next = drain(store::SNAPSHOT_EVERY.is_multiple_of(2));
    let refused = here
        .execute_guarded::<Node>(&t, next.clone(), &admin(), Utc::now(), &stale)
        .await
        .unwrap();
    assert!(refused.is_none());
    assert_eq!(events(t.clone()).await, before);
    let snapshots: i64 = sqlx::query_scalar("SELECT count(*) FROM snapshots")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(snapshots, 0);
    // What this process remembers of the target is still right.
    let loaded = here.load::<Node>(&t).await.unwrap().unwrap();
    assert_eq!(loaded.sequence, before as usize);

    // Decided again on the guard as it is now, the command goes through.
    let now_seen = here.load::<Node>(&g).await.unwrap().unwrap().sequence;
    assert_eq!(now_seen, seen + 1);
    let executed = here
        .execute_guarded::<Node>(
            &t,
            next,
            &admin(),
            Utc::now(),
            &store::Guard::on::<Node>(&g, now_seen),
        )
        .await
        .unwrap();
    assert_eq!(executed.map(|e| e.sequence), Some(store::SNAPSHOT_EVERY));
    let snapshots: i64 = sqlx::query_scalar("SELECT count(*) FROM snapshots")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(snapshots, 1);
}

#[tokio::test]
async fn a_process_hears_of_its_own_commits_only_on_the_database_they_went_to() {
    use tokio::sync::broadcast::error::TryRecvError;
    let (a, b) = (testkit::fresh_db().await, testkit::fresh_db().await);
    let (on_a, on_b) = (Store::new(a.pool.clone()), Store::new(b.pool.clone()));
    let mut heard = outbox::local_events(&a.pool);
    let (x, y) = (Uuid::new_v4(), Uuid::new_v4());
    provision(&on_b, y).await;
    provision(&on_a, x).await;
    // Other tests commit meanwhile, each to a database of its own.
    let event = loop {
        match heard.try_recv() {
            Ok(e) => break e,
            Err(TryRecvError::Lagged(_)) => continue,
            Err(e) => panic!("the commit to database a was not heard: {e}"),
        }
    };
    assert_eq!(event.aggregate_id, x.to_string());
    assert!(matches!(heard.try_recv(), Err(TryRecvError::Empty)));
}

/// Each event's place in the global order, as consumers see it: its key
/// with (txid, position, recorded_at), in the order they read.
async fn order_of(pool: &sqlx::PgPool) -> Vec<(String, String, i64, String, i64, String)> {
    sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence, txid::text, position, recorded_at::text \
         FROM outbox ORDER BY txid, position",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// What a consumer at `after` reads once `n` events are visible to it: an
/// open transaction anywhere on the server (another test's) holds readers
/// back for a moment.
async fn read_all_after(
    pool: &sqlx::PgPool,
    after: Checkpoint,
    n: usize,
) -> Vec<store::RecordedEvent> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let read = outbox::read_after(pool, after, 100, &Filter::default())
            .await
            .unwrap();
        if read.len() >= n || Instant::now() > deadline {
            return read;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_log_written_with_an_outbox_table_keeps_its_order_once_the_events_carry_it() {
    let db = testkit::db_migrated_before("0020").await;
    let store = Store::new(db.pool.clone());
    for i in 0..3 {
        create_project(&store, Uuid::new_v4(), &format!("before-{i}")).await;
    }
    // Transaction ids and positions in opposite orders, as concurrent
    // commits leave them.
    inverted_pair(&db.pool).await;
    let before = order_of(&db.pool).await;
    assert_eq!(before.len(), 5);
    let inverted: Vec<_> = before.iter().filter(|e| e.0 == "probe").collect();
    assert_eq!(inverted[0].1, "inverted-first");
    assert!(inverted[0].4 > inverted[1].4, "{inverted:?}");

    store::migrate(&db.pool).await.unwrap();
    assert_eq!(order_of(&db.pool).await, before);
    let read = read_all_after(&db.pool, Checkpoint::default(), before.len()).await;
    let keys: Vec<_> = read
        .iter()
        .map(|e| (e.aggregate_type.clone(), e.aggregate_id.clone(), e.position))
        .collect();
    let expected: Vec<_> = before
        .iter()
        .map(|e| (e.0.clone(), e.1.clone(), e.4))
        .collect();
    assert_eq!(keys, expected);

    // What comes after continues the sequence, after everything before.
    let next = Uuid::new_v4();
    create_project(&store, next, "after").await;
    let after = order_of(&db.pool).await;
    assert_eq!(after.len(), 6);
    let last = after.last().unwrap();
    assert_eq!(last.1, next.to_string());
    assert!(
        before.iter().all(|e| e.4 < last.4 && e.3 != last.3),
        "{after:?}"
    );
    let tail = read_all_after(&db.pool, read.last().unwrap().checkpoint(), 1).await;
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].aggregate_id, next.to_string());
}

#[tokio::test]
async fn commands_executed_together_are_decided_in_turn_and_appended_at_once() {
    let db = testkit::fresh_db().await;
    let a = Store::new(db.pool.clone());
    let b = Store::new(db.pool.clone());
    let id = Uuid::now_v7();
    provision(&a, id).await;
    // b drains the node: a's copy is old, so a's first decision on it
    // conflicts on the log's key and all are decided again.
    b.execute::<Node>(&id.to_string(), drain(true), &admin(), Utc::now())
        .await
        .unwrap();
    let provision_again = NodeCommand::Provision {
        node_id: id,
        name: "n1".into(),
        labels: Default::default(),
        token_fingerprint: "ff".into(),
        max_resources: Default::default(),
        by: admin(),
        at: Utc::now(),
    };
    let outcomes = a
        .execute_each::<Node>(
            &id.to_string(),
            &[drain(false), provision_again, drain(true), drain(false)],
            &admin(),
            Utc::now(),
        )
        .await
        .unwrap();
    let accepted: Vec<bool> = outcomes.iter().map(Result::is_ok).collect();
    assert_eq!(accepted, [true, false, true, true], "{outcomes:?}");

    // The three accepted, after b's drain, in one transaction.
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT sequence, event_type, txid::text FROM events \
         WHERE aggregate_type = 'node' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id.to_string())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let kinds: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "NodeProvisioned",
            "NodeDrained",
            "NodeUndrained",
            "NodeDrained",
            "NodeUndrained"
        ]
    );
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert!(rows[2..].iter().all(|r| r.2 == rows[2].2), "{rows:?}");
    assert_ne!(rows[1].2, rows[2].2);

    // Nothing accepted appends nothing; a's copy is current, so a repeated
    // undrain is nothing to do only once decided on the log.
    let outcomes = a
        .execute_each::<Node>(&id.to_string(), &[drain(false)], &admin(), Utc::now())
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 1);
    assert!(outcomes[0].is_ok());
    let replayed = a.replay::<Node>(&id.to_string(), None).await.unwrap();
    assert_eq!(replayed.len(), 5);
    assert!(!replayed.last().unwrap().1.drained);
}

#[tokio::test]
async fn a_read_tells_in_the_same_statement_whether_events_wait_behind_an_older_transaction() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    create_project(&store, Uuid::new_v4(), "first").await;
    let first = read_all_after(&db.pool, Checkpoint::default(), 1).await;
    assert_eq!(first.len(), 1);
    let (read, _) = outbox::read_after_held(&db.pool, Checkpoint::default(), 100)
        .await
        .unwrap();
    assert_eq!(
        read.iter().map(|e| e.position).collect::<Vec<_>>(),
        first.iter().map(|e| e.position).collect::<Vec<_>>()
    );
    // A transaction older than the next event stays open: the event is
    // committed but no reader may show it yet, and the read says so, with
    // no events and with the events before it alike.
    let mut older = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *older)
        .await
        .unwrap();
    late_append(&db.pool, "behind", 1, Duration::ZERO).await;
    let after_first = first[0].checkpoint();
    let (read, held) = outbox::read_after_held(&db.pool, after_first, 100)
        .await
        .unwrap();
    assert!(read.is_empty(), "{read:?}");
    assert!(held, "an event waits behind the open transaction");
    let (read, held) = outbox::read_after_held(&db.pool, Checkpoint::default(), 100)
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    assert!(held);
    // It ends without an event of its own: the event shows.
    older.commit().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let read = loop {
        let (read, _) = outbox::read_after_held(&db.pool, after_first, 100)
            .await
            .unwrap();
        if !read.is_empty() || Instant::now() > deadline {
            break read;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].aggregate_id, "behind");
}
