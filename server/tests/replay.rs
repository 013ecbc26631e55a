//! The replay tools as a user runs them: the real `unidesk` binary against
//! real databases — `replay` of one aggregate, `replay --check`, and
//! `events export` / `events import` between databases, including files
//! that were damaged on the way.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use chrono::{DateTime, Duration, Utc};
use domain::node::{Node, NodeCommand, NodeResources};
use domain::project::{Project, ProjectCommand, Role};
use domain::spec::{TaskSpecDraft, UrlPolicy};
use domain::task::{Outcome, Task, TaskCommand};
use domain::user::{User, UserCommand};
use domain::Actor;
use sqlx::PgPool;
use store::Store;
use uuid::Uuid;

/// Runs `unidesk ARGS --database-url URL`.
///
/// The tests run on a multi-threaded runtime and wait for the command in
/// place, so that the test's own pools go on working meanwhile: a pooled
/// connection is cleaned up (a dropped transaction rolled back) by a task
/// of the runtime, and a transaction left open holds back every outbox
/// reader on the server, the command's included.
fn unidesk(url: &str, args: &[&str]) -> Output {
    tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_unidesk"))
            .args(args)
            .arg("--database-url")
            .arg(url)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// Runs a command that must succeed and returns its stdout.
fn ok(url: &str, args: &[&str]) -> String {
    let o = unidesk(url, args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Runs a command that must fail and returns its stderr.
fn fails(url: &str, args: &[&str]) -> String {
    let o = unidesk(url, args);
    assert!(
        !o.status.success(),
        "{args:?} succeeded: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stderr(&o)
}

/// What the tests refer to in the history.
struct History {
    done: Uuid,
    retried: Uuid,
    cancelled: Uuid,
    node: Uuid,
    busy_node: Uuid,
    project: Uuid,
    /// A time between the retried task's first and second attempt.
    between_attempts: DateTime<Utc>,
}

/// Times one second apart, so that `--until TIME` can fall between events.
struct Clock(DateTime<Utc>);

impl Clock {
    fn tick(&mut self) -> DateTime<Utc> {
        self.0 += Duration::seconds(1);
        self.0
    }
}

async fn exec<A: store::Stored>(
    store: &Store,
    id: Uuid,
    cmd: A::Command,
    actor: &Actor,
    at: DateTime<Utc>,
) where
    A::Command: Clone + Send,
{
    store
        .execute::<A>(&id.to_string(), cmd, actor, at)
        .await
        .unwrap_or_else(|e| panic!("command on {} {id}: {e}", A::TYPE));
}

/// A realistic history: users with a token, a project with members and a
/// quota, two nodes that connect, drop and come back (one with enough
/// events for a snapshot), and tasks that succeed, are lost and retried
/// before failing, are cancelled, and wait.
async fn history(store: &Store) -> History {
    let mut clock = Clock(Utc::now() - Duration::hours(1));
    let root = Actor::User("root".into());
    let alice = Actor::User("alice".into());
    let scheduler = Actor::System("scheduler".into());
    for (name, admin) in [("root", true), ("alice", false)] {
        let at = clock.tick();
        store
            .execute::<User>(
                name,
                UserCommand::Create {
                    name: name.into(),
                    admin,
                    by: root.clone(),
                    at,
                },
                &root,
                at,
            )
            .await
            .unwrap();
    }
    let at = clock.tick();
    store
        .execute::<User>(
            "alice",
            UserCommand::IssueToken {
                token_id: Uuid::new_v4(),
                fingerprint: "ab".repeat(32),
                label: "laptop".into(),
                by: root.clone(),
                at,
                expires_at: None,
                max_live: usize::MAX,
            },
            &root,
            at,
        )
        .await
        .unwrap();

    let project = Uuid::new_v4();
    store::names::claim(store.pool(), "project", "vision", &project.to_string())
        .await
        .unwrap();
    let at = clock.tick();
    let create = ProjectCommand::Create {
        project_id: project,
        name: "vision".into(),
        description: "detection models".into(),
        owner: "alice".into(),
        at,
    };
    exec::<Project>(store, project, create, &alice, at).await;
    for cmd in [
        ProjectCommand::AddMember {
            user: "bob".into(),
            role: Role::Member,
            by: alice.clone(),
            at: clock.tick(),
        },
        ProjectCommand::SetQuota {
            max_running: Some(4),
            by: root.clone(),
            at: clock.tick(),
        },
    ] {
        exec::<Project>(store, project, cmd, &alice, clock.0).await;
    }

    let mut nodes = Vec::new();
    for name in ["gpu-3", "gpu-4"] {
        let id = Uuid::new_v4();
        store::names::claim(store.pool(), "node", name, &id.to_string())
            .await
            .unwrap();
        let at = clock.tick();
        let provision = NodeCommand::Provision {
            node_id: id,
            name: name.into(),
            labels: BTreeMap::from([("gpu".to_string(), "a100".to_string())]),
            token_fingerprint: "cd".repeat(32),
            max_resources: Default::default(),
            by: root.clone(),
            at,
        };
        exec::<Node>(store, id, provision, &root, at).await;
        nodes.push(id);
    }
    let (node, busy_node) = (nodes[0], nodes[1]);
    let agent = Actor::Node(node.to_string());
    let connect = |at| NodeCommand::Connect {
        session: Uuid::new_v4(),
        agent_version: "0.1.0".into(),
        resources: NodeResources {
            cpus: 8.0,
            memory_mb: 32768,
            gpus: vec![],
        },
        labels: BTreeMap::new(),
        at,
    };
    let at = clock.tick();
    exec::<Node>(store, node, connect(at), &agent, at).await;
    let at = clock.tick();
    let offline = NodeCommand::MarkOffline {
        last_seen: at - Duration::seconds(95),
        at,
    };
    exec::<Node>(store, node, offline, &scheduler, at).await;
    let at = clock.tick();
    exec::<Node>(store, node, connect(at), &agent, at).await;
    // Enough sessions for the busy node to be loaded from a snapshot.
    for _ in 0..30 {
        let session = Uuid::new_v4();
        let at = clock.tick();
        let mut c = connect(at);
        if let NodeCommand::Connect { session: s, .. } = &mut c {
            *s = session;
        }
        let busy = Actor::Node(busy_node.to_string());
        exec::<Node>(store, busy_node, c, &busy, at).await;
        let at = clock.tick();
        let bye = NodeCommand::Disconnect {
            session,
            reason: "agent restarted".into(),
            at,
        };
        exec::<Node>(store, busy_node, bye, &busy, at).await;
    }

    let spec = |retries| {
        TaskSpecDraft {
            project_id: Some(project),
            code_repo_url: Some("https://example.com/code.git".into()),
            code_commit_id: Some("a".repeat(40)),
            env_repo_url: Some("https://example.com/env.git".into()),
            env_commit_id: Some("b".repeat(40)),
            dockerfile_path: Some("Dockerfile".into()),
            command: Some(vec!["python".into(), "train.py".into()]),
            max_retries: Some(retries),
            ..Default::default()
        }
        .validate(UrlPolicy::default())
        .unwrap()
    };
    let (done, retried, cancelled, waiting) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    type Make = Box<dyn Fn(DateTime<Utc>) -> TaskCommand>;
    let submit = |id: Uuid, retries: i64| -> Make {
        let spec = spec(retries);
        Box::new(move |at| TaskCommand::Submit {
            task_id: id,
            spec: spec.clone(),
            by: Actor::User("alice".into()),
            at,
        })
    };
    let assign = || -> Make {
        Box::new(move |at| TaskCommand::Assign {
            node_id: node,
            gpus: vec![],
            reason: "fits: 8 CPU free".into(),
            at,
        })
    };
    let accept = |attempt| -> Make {
        Box::new(move |at| TaskCommand::Accept {
            node_id: node,
            attempt,
            at,
        })
    };
    let started = |attempt: u32| -> Make {
        Box::new(move |at| TaskCommand::ReportStarted {
            node_id: node,
            attempt,
            container: format!("c0ffee{attempt}"),
            at,
        })
    };
    let exited = |attempt, outcome: Outcome| -> Make {
        Box::new(move |at| TaskCommand::ReportExited {
            node_id: node,
            attempt,
            outcome: outcome.clone(),
            at,
        })
    };
    let preparing: Make = Box::new(move |at| TaskCommand::ReportPreparing {
        node_id: node,
        attempt: 1,
        stage: "code ready".into(),
        detail: Some("from cache".into()),
        at,
    });
    let lost: Make = Box::new(move |at| TaskCommand::MarkLost {
        node_id: node,
        attempt: 1,
        reason: "node gpu-3 sent no heartbeat for 90 s".into(),
        at,
    });
    let cancel: Make = Box::new(|at| TaskCommand::RequestCancel {
        by: Actor::User("alice".into()),
        at,
    });
    let failed = Outcome::Failed {
        exit_code: Some(2),
        reason: "exited with status 2".into(),
    };
    let steps: Vec<(Uuid, &Actor, Make)> = vec![
        (done, &alice, submit(done, 0)),
        (done, &scheduler, assign()),
        (done, &agent, accept(1)),
        (done, &agent, preparing),
        (done, &agent, started(1)),
        (done, &agent, exited(1, Outcome::Succeeded)),
        (retried, &alice, submit(retried, 1)),
        (retried, &scheduler, assign()),
        (retried, &agent, accept(1)),
        (retried, &agent, started(1)),
        (retried, &scheduler, lost),
        (retried, &scheduler, assign()),
        (retried, &agent, accept(2)),
        (retried, &agent, started(2)),
        (retried, &agent, exited(2, failed)),
        (cancelled, &alice, submit(cancelled, 0)),
        (cancelled, &alice, cancel),
        (waiting, &alice, submit(waiting, 0)),
    ];
    let mut between_attempts = clock.0;
    for (i, (id, actor, make)) in steps.into_iter().enumerate() {
        let at = clock.tick();
        exec::<Task>(store, id, make(at), actor, at).await;
        if i == 10 {
            // After the retried task's lost attempt, before its next one.
            between_attempts = at + Duration::milliseconds(500);
        }
    }

    History {
        done,
        retried,
        cancelled,
        node,
        busy_node,
        project,
        between_attempts,
    }
}

/// A fresh database holding [`history`].
async fn with_history() -> (testkit::TestDb, History) {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let h = history(&store).await;
    projections::Projector::new(db.pool.clone())
        .catch_up()
        .await
        .unwrap();
    (db, h)
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_prints_every_event_with_its_summary_and_what_it_changed() {
    let (db, h) = with_history().await;
    let out = ok(&db.url, &["replay", "task", &h.retried.to_string()]);
    assert!(
        out.starts_with(&format!("task {}: 10 events\n", h.retried)),
        "{out}"
    );
    for expected in [
        "#1  ",
        "user:alice  TaskSubmitted",
        "user:alice submitted `python train.py` at code aaaaaaaaaaaa / env bbbbbbbbbbbb (Dockerfile)",
        "system:scheduler assigned attempt 1 to node gpu-3: fits: 8 CPU free",
        "state: \"queued\" → \"assigned\"",
        "+ attempts[0]: {",
        "attempt 1 lost on node gpu-3: node gpu-3 sent no heartbeat for 90 s",
        "attempts[0].outcome: null → \"lost\"",
        "task requeued for attempt 2 after attempt 1 was lost",
        "state: \"running\" → \"queued\"",
        "#10  ",
        "attempt 2 failed with exit code 2: exited with status 2",
        "exit_code: null → 2",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }

    // Up to a sequence number, or a time.
    let o = unidesk(
        &db.url,
        &["replay", "task", &h.retried.to_string(), "--until-seq", "2"],
    );
    assert!(o.status.success());
    assert!(stdout(&o).contains("#2  ") && !stdout(&o).contains("#3  "));
    assert!(
        stderr(&o).contains("stopped after #2 of 10 events"),
        "{}",
        stderr(&o)
    );
    let until = h.between_attempts.to_rfc3339();
    let out = ok(
        &db.url,
        &["replay", "task", &h.retried.to_string(), "--until", &until],
    );
    assert!(out.contains("#6  ") && !out.contains("#7  "), "{out}");

    // The final state only, for people and for machines.
    let out = ok(&db.url, &["replay", "task", &h.done.to_string(), "--final"]);
    assert!(out.contains("after #6 of 6 (TaskSucceeded at"), "{out}");
    assert!(out.contains("\"state\": \"succeeded\""), "{out}");
    let out = ok(
        &db.url,
        &["replay", "task", &h.done.to_string(), "--final", "--json"],
    );
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["sequence"], 6);
    assert_eq!(doc["state"]["state"], "succeeded");
    assert_eq!(doc["state"]["attempts"][0]["outcome"], "succeeded");

    // The whole state after each event, too.
    let out = ok(
        &db.url,
        &["replay", "task", &h.cancelled.to_string(), "--states"],
    );
    assert!(out.contains("    |   \"state\": \"queued\","), "{out}");
    assert!(out.contains("    |   \"state\": \"cancelled\","), "{out}");
    let out = ok(
        &db.url,
        &[
            "replay",
            "task",
            &h.cancelled.to_string(),
            "--json",
            "--states",
        ],
    );
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"]["cancel_requested"], true);

    // One JSON object per event, each with its changes.
    let out = ok(
        &db.url,
        &["replay", "task", &h.cancelled.to_string(), "--json"],
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["event_type"], "TaskCancelled");
    assert_eq!(lines[2]["summary"], "task cancelled before it ran");
    assert_eq!(lines[2]["actor"], "user:alice");
    let changes = lines[2]["changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c["path"] == "state" && c["old"] == "queued" && c["new"] == "cancelled"),
        "{changes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_projects_are_found_by_name_and_users_by_theirs() {
    let (db, h) = with_history().await;
    let out = ok(&db.url, &["replay", "node", "gpu-3"]);
    assert!(
        out.starts_with(&format!("node {}: 4 events", h.node)),
        "{out}"
    );
    assert!(
        out.contains("user:root provisioned node gpu-3 with labels gpu=a100"),
        "{out}"
    );
    assert!(
        out.contains("node gpu-3 marked offline: no heartbeat for 95 s"),
        "{out}"
    );
    assert!(out.contains("status: \"online\" → \"offline\""), "{out}");
    let out = ok(
        &db.url,
        &["replay", "project", "vision", "--final", "--json"],
    );
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["aggregate_id"], h.project.to_string());
    assert_eq!(doc["state"]["members"]["bob"], "member");
    let out = ok(&db.url, &["replay", "user", "alice"]);
    assert!(
        out.contains("user:root issued a token for alice (laptop)"),
        "{out}"
    );
    // A node with a snapshot replays from its events all the same.
    let out = ok(
        &db.url,
        &[
            "replay",
            "node",
            &h.busy_node.to_string(),
            "--until-seq",
            "61",
            "--final",
        ],
    );
    assert!(out.contains("after #61 of 61"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_aggregates_and_bad_bounds_get_clear_errors() {
    let (db, h) = with_history().await;
    let missing = Uuid::new_v4();
    let err = fails(&db.url, &["replay", "task", &missing.to_string()]);
    assert!(err.contains(&format!("no task has id {missing}")), "{err}");
    let err = fails(&db.url, &["replay", "task", "gpu-3"]);
    assert!(err.contains("\"gpu-3\" is not a task id"), "{err}");
    let err = fails(&db.url, &["replay", "node", "gpu-9"]);
    assert!(
        err.contains("no node has the id or name \"gpu-9\""),
        "{err}"
    );
    let err = fails(
        &db.url,
        &[
            "replay",
            "task",
            &h.done.to_string(),
            "--until",
            "2001-01-01T00:00:00Z",
        ],
    );
    assert!(
        err.contains("did not exist yet: its first event is #1 at"),
        "{err}"
    );
    let err = fails(
        &db.url,
        &[
            "replay",
            "task",
            &h.done.to_string(),
            "--until",
            "last tuesday",
        ],
    );
    assert!(err.contains("is not a time"), "{err}");
    let err = fails(&db.url, &["replay", "ship", "x"]);
    assert!(err.contains("invalid value 'ship'"), "{err}");
    let err = fails(&db.url, &["replay"]);
    assert!(err.contains("required"), "{err}");
}

/// Appends a raw event, as a broken or older build might have written it.
async fn insert_event(
    pool: &PgPool,
    kind: &str,
    id: Uuid,
    sequence: i64,
    event_type: &str,
    payload: &str,
) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ($1, $2, $3, $4, '1', $5::json, '{\"actor\": \"user:mallory\", \"at\": \"2026-11-28T10:00:00Z\"}')",
    )
    .bind(kind)
    .bind(id.to_string())
    .bind(sequence)
    .bind(event_type)
    .bind(payload)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_check_passes_a_sound_log_and_names_every_event_this_build_cannot_apply() {
    let (db, h) = with_history().await;
    let out = ok(&db.url, &["replay", "--check"]);
    assert!(
        out.contains("checked 9 aggregates, 91 events and 1 snapshot: every event can be applied by this build"),
        "{out}"
    );

    // An unknown variant, a malformed payload, an event the rules would
    // refuse after the task ended, a gap, and a mislabelled event.
    let at = "\"at\": \"2026-11-28T10:00:00Z\"";
    insert_event(
        &db.pool,
        "task",
        h.done,
        7,
        "TaskStarted",
        &format!("{{\"Restarted\": {{\"attempt\": 1, {at}}}}}"),
    )
    .await;
    insert_event(
        &db.pool,
        "task",
        h.retried,
        11,
        "TaskStarted",
        &format!("{{\"Started\": {{\"attempt\": \"two\", \"container\": \"c\", {at}}}}}"),
    )
    .await;
    insert_event(
        &db.pool,
        "task",
        h.cancelled,
        4,
        "TaskStarted",
        &format!("{{\"Started\": {{\"attempt\": 1, \"container\": \"c\", {at}}}}}"),
    )
    .await;
    insert_event(
        &db.pool,
        "node",
        h.node,
        9,
        "NodeDrained",
        &format!("{{\"Drained\": {{\"by\": \"user:root\", {at}}}}}"),
    )
    .await;
    insert_event(
        &db.pool,
        "project",
        h.project,
        4,
        "ProjectRenamed",
        &format!("{{\"Archived\": {{\"by\": \"user:root\", {at}}}}}"),
    )
    .await;

    let o = unidesk(&db.url, &["replay", "--check"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    let expect = [
        (h.node, "#9 NodeDrained: #9 follows #4: events in between are missing"),
        (h.project, "#4 ProjectRenamed: it is stored as ProjectRenamed but its payload is a ProjectArchived"),
        (h.cancelled, "#4 TaskStarted: the current rules would not have written it: the task had ended (cancelled)"),
        (h.done, "#7 TaskStarted: its payload does not fit task events: unknown variant `Restarted`"),
        (h.retried, "#11 TaskStarted: its payload does not fit task events: invalid type: string \"two\""),
    ];
    for (id, text) in expect {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&id.to_string()) && l.contains(text)),
            "no line for {id} with {text:?} in\n{out}"
        );
    }
    assert!(
        out.ends_with("checked 9 aggregates, 96 events and 1 snapshot: 5 problems\n"),
        "{out}"
    );
    assert!(stderr(&o).contains("5 stored event(s) or snapshot(s) cannot be taken by this build"));

    let o = unidesk(&db.url, &["replay", "--check", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["problems"].as_array().unwrap().len(), 5);
    assert_eq!(report["events"], 96);

    // Replaying the damaged task stops at the bad event, saying why.
    let o = unidesk(&db.url, &["replay", "task", &h.done.to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("#6  "));
    assert!(stderr(&o).contains(&format!("task {} #7 (TaskStarted) cannot be applied by this build: its payload does not fit task events: unknown variant `Restarted`", h.done)), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_check_reports_a_snapshot_this_build_cannot_read() {
    let (db, h) = with_history().await;
    sqlx::query(
        "INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload) \
         VALUES ('node', $1, 61, 99, '{\"id\": 5}')",
    )
    .bind(h.busy_node.to_string())
    .execute(&db.pool)
    .await
    .unwrap();
    let o = unidesk(&db.url, &["replay", "--check"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains(&format!("node {} #61: the snapshot at #61 cannot be read by this build, so the aggregate cannot be loaded", h.busy_node)),
        "{}",
        stdout(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_written_before_labels_and_maxima_were_split_replays_and_loads() {
    let db = testkit::fresh_db().await;
    let id = Uuid::new_v4();
    let session = Uuid::new_v4();
    // NodeProvisioned and NodeConnected as older builds wrote them, and a
    // snapshot of the node as they stored it (one set of merged labels).
    insert_event(
        &db.pool,
        "node",
        id,
        1,
        "NodeProvisioned",
        &serde_json::json!({"Provisioned": {
            "node_id": id, "name": "old-1", "labels": {"zone": "lab"},
            "token_fingerprint": "cd".repeat(32), "by": "user:root",
            "at": "2026-11-28T10:00:00Z"
        }})
        .to_string(),
    )
    .await;
    insert_event(
        &db.pool,
        "node",
        id,
        2,
        "NodeConnected",
        &serde_json::json!({"Connected": {
            "session": session, "agent_version": "0.0.9",
            "resources": {"cpus": 8.0, "memory_mb": 4096, "gpus": []},
            "labels": {"gpu": "a100"}, "at": "2026-11-28T10:00:01Z"
        }})
        .to_string(),
    )
    .await;
    sqlx::query(
        "INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload) \
         VALUES ('node', $1, 2, 1, $2)",
    )
    .bind(id.to_string())
    .bind(serde_json::json!({
        "id": id, "name": "old-1",
        "provisioned_labels": {"zone": "lab"}, "agent_labels": {"gpu": "a100"},
        "token_fingerprint": "cd".repeat(32), "status": "online", "drained": false,
        "session": session, "agent_version": "0.0.9",
        "resources": {"cpus": 8.0, "memory_mb": 4096, "gpus": []},
        "provisioned_at": "2026-11-28T10:00:00Z", "connected_at": "2026-11-28T10:00:01Z",
        "updated_at": "2026-11-28T10:00:01Z"
    }))
    .execute(&db.pool)
    .await
    .unwrap();
    let out = ok(&db.url, &["replay", "--check"]);
    assert!(
        out.contains("every event can be applied by this build"),
        "{out}"
    );
    // Loaded from the old snapshot, the agent's label is declared only.
    let store = Store::new(db.pool.clone());
    let node = store
        .load::<Node>(&id.to_string())
        .await
        .unwrap()
        .unwrap()
        .state;
    assert_eq!(
        node.labels,
        BTreeMap::from([("zone".to_string(), "lab".to_string())])
    );
    assert_eq!(node.declared_labels["gpu"], "a100");
    assert_eq!(node.effective_resources().unwrap().cpus, 8.0);
    // New events follow on, and the log still checks.
    let at = Utc::now();
    let root = Actor::User("root".into());
    let accept = NodeCommand::AcceptDeclaredLabels {
        keys: None,
        by: root.clone(),
        at,
    };
    exec::<Node>(&store, id, accept, &root, at).await;
    let out = ok(&db.url, &["replay", "--check"]);
    assert!(
        out.contains("every event can be applied by this build"),
        "{out}"
    );
    let out = ok(&db.url, &["replay", "node", &id.to_string()]);
    assert!(
        out.contains("user:root accepted labels declared by node old-1: gpu=a100"),
        "{out}"
    );
}

/// Every read model, without the columns that hold outbox positions and
/// transaction ids (a database's own), in a stable order.
async fn read_models(pool: &PgPool) -> String {
    let mut out = String::new();
    for (sql, key) in [
        ("SELECT id, project_id, state, priority, node_id, attempt, submitted_by, submitted_at, updated_at, last_sequence, doc FROM task_view", "id"),
        ("SELECT * FROM node_view", "id"),
        ("SELECT * FROM project_view", "id"),
        ("SELECT * FROM project_member_view", "project_id, user_name"),
        ("SELECT * FROM user_view", "name"),
        ("SELECT aggregate_type, aggregate_id, sequence, event_type, actor, recorded_at, project_id, summary FROM timeline", "aggregate_type, aggregate_id, sequence"),
    ] {
        let rows: Option<String> = sqlx::query_scalar(&format!(
            "SELECT string_agg(t::text, E'\\n' ORDER BY {key}) FROM ({sql}) t"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        out.push_str(&format!("== {sql}\n{}\n", rows.unwrap_or_default()));
    }
    out
}

/// The log, every column, as JSON values.
async fn events(pool: &PgPool) -> String {
    let rows: Option<String> = sqlx::query_scalar(
        "SELECT string_agg(format('%s %s %s %s %s %s %s', e.aggregate_type, e.aggregate_id, e.sequence, \
           e.event_type, e.event_version, e.payload::jsonb, e.metadata::jsonb), E'\\n' \
           ORDER BY o.txid, o.position) \
         FROM events e JOIN outbox o USING (aggregate_type, aggregate_id, sequence)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    rows.unwrap_or_default()
}

fn export(url: &str, file: &Path, extra: &[&str]) -> String {
    let mut args = vec!["events", "export", "--output", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = unidesk(url, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    stderr(&o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_imported_into_an_empty_database_replays_to_the_same_states() {
    let (source, h) = with_history().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let said = export(&source.url, &file, &[]);
    assert!(said.contains("exported 91 events; final hash "), "{said}");
    let hash = said
        .split("final hash ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 93);
    assert!(text.starts_with("{\"format\":\"unidesk-events\",\"version\":1,"));
    assert!(text.ends_with(&format!(
        "{{\"end\":{{\"events\":91,\"hash\":\"{hash}\"}}}}\n"
    )));

    let target = testkit::fresh_db().await;
    let out = ok(&target.url, &["events", "import", file.to_str().unwrap()]);
    assert!(
        out.contains(&format!(
            "imported 91 events of 9 aggregates; final hash {hash}"
        )),
        "{out}"
    );
    assert!(out.contains("read models up to date"), "{out}");

    assert_eq!(events(&target.pool).await, events(&source.pool).await);
    assert_eq!(
        read_models(&target.pool).await,
        read_models(&source.pool).await
    );
    let recorded = "SELECT string_agg(recorded_at::text, ',' ORDER BY txid, position) FROM outbox";
    let at_source: String = sqlx::query_scalar(recorded)
        .fetch_one(&source.pool)
        .await
        .unwrap();
    let at_target: String = sqlx::query_scalar(recorded)
        .fetch_one(&target.pool)
        .await
        .unwrap();
    assert_eq!(at_target, at_source, "recording times are kept");
    for (kind, id) in [
        ("task", h.retried.to_string()),
        ("node", "gpu-3".to_string()),
        ("project", "vision".to_string()),
    ] {
        assert_eq!(
            ok(&target.url, &["replay", kind, &id, "--json"])
                .lines()
                .map(without_position)
                .collect::<Vec<_>>(),
            ok(&source.url, &["replay", kind, &id, "--json"])
                .lines()
                .map(without_position)
                .collect::<Vec<_>>(),
        );
    }
    assert!(ok(&target.url, &["replay", "--check"]).contains("every event can be applied"));

    // The same file again, or into any database with events: refused.
    let err = fails(&target.url, &["events", "import", file.to_str().unwrap()]);
    assert!(err.contains("the database already holds events"), "{err}");
    assert_eq!(count(&target.pool, "SELECT count(*) FROM events").await, 91);
}

fn without_position(line: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    v.as_object_mut().unwrap().remove("position");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_export_holds_only_its_aggregates() {
    let (db, h) = with_history().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("task.jsonl");
    let said = export(
        &db.url,
        &file,
        &[
            "--aggregate-type",
            "task",
            "--aggregate-id",
            &h.retried.to_string(),
        ],
    );
    assert!(said.contains("exported 10 events"), "{said}");
    let target = testkit::fresh_db().await;
    ok(&target.url, &["events", "import", file.to_str().unwrap()]);
    assert_eq!(count(&target.pool, "SELECT count(*) FROM events").await, 10);
    let out = ok(
        &target.url,
        &[
            "replay",
            "task",
            &h.retried.to_string(),
            "--final",
            "--json",
        ],
    );
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["state"]["state"], "failed");
    // Without the node's events the summary names the node by id.
    let out = ok(&target.url, &["replay", "task", &h.retried.to_string()]);
    assert!(
        out.contains(&format!("assigned attempt 1 to node {}", h.node)),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_after_a_position_continues_an_earlier_one() {
    let (source, h) = with_history().await;
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.jsonl");
    let said = export(&source.url, &first, &[]);
    let after = said.split("--after ").nth(1).unwrap().trim().to_string();

    // More history: a new task, and a node that drains.
    let store = Store::new(source.pool.clone());
    let root = Actor::User("root".into());
    let at = Utc::now();
    exec::<Node>(
        &store,
        h.node,
        NodeCommand::Drain {
            by: root.clone(),
            at,
        },
        &root,
        at,
    )
    .await;
    let second = dir.path().join("second.jsonl");
    let said = export(&source.url, &second, &["--after", &after]);
    assert!(said.contains("exported 1 event;"), "{said}");

    let target = testkit::fresh_db().await;
    let err = fails(&target.url, &["events", "import", second.to_str().unwrap()]);
    assert!(err.contains(&format!("this export continues another one (it holds the events after position {after} of its source)")), "{err}");
    assert_eq!(count(&target.pool, "SELECT count(*) FROM events").await, 0);
    ok(&target.url, &["events", "import", first.to_str().unwrap()]);
    ok(&target.url, &["events", "import", second.to_str().unwrap()]);
    assert_eq!(events(&target.pool).await, events(&source.pool).await);
    let err = fails(&target.url, &["events", "import", second.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "line 2: node {} #5 (NodeDrained) is already in the database, which holds #1..#5 of it",
            h.node
        )),
        "{err}"
    );
    let err = fails(&source.url, &["events", "export", "--after", "999999"]);
    assert!(err.contains("no event has outbox position 999999"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_export_is_refused_at_its_first_bad_line_and_nothing_is_imported() {
    let (source, _) = with_history().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    export(&source.url, &file, &[]);
    let other = dir.path().join("other.jsonl");
    export(&source.url, &other, &[]);
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let other_lines: Vec<String> = std::fs::read_to_string(&other)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let join = |ls: &[String]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();

    let mut edited = lines.clone();
    edited[4] = edited[4].replacen("\"at\":\"", "\"at\":\"1", 1);
    assert_ne!(edited[4], lines[4]);
    let mut removed = lines.clone();
    removed.remove(3);
    let mut swapped = lines.clone();
    swapped.swap(5, 6);
    let mut spliced = lines.clone();
    spliced[7] = other_lines[7].clone();
    let mut recounted = lines.clone();
    recounted.remove(lines.len() - 2);
    let mut appended = lines.clone();
    appended.push(lines[3].clone());
    let mut garbage = lines.clone();
    garbage[2] = "this is not json".into();
    let mut new_field = lines.clone();
    new_field[2] = new_field[2].replacen('{', "{\"extra\":1,", 1);
    let huge = format!("{}\n{}\n", lines[0], "x".repeat(17 << 20));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "edited",
            join(&edited),
            "line 5: the hash chain breaks here",
        ),
        (
            "removed",
            join(&removed),
            "line 4: the hash chain breaks here",
        ),
        (
            "reordered",
            join(&swapped),
            "line 6: the hash chain breaks here",
        ),
        (
            "spliced",
            join(&spliced),
            "line 8: the hash chain breaks here",
        ),
        (
            "truncated",
            join(&lines[..lines.len() - 1]),
            "line 93: the file ends without its end line: it was cut short",
        ),
        (
            "cut in an event line",
            text[..text.len() - lines[lines.len() - 1].len() - 41].to_string(),
            "line 92: the file ends in the middle of this line: it was cut short",
        ),
        (
            "cut in the end line",
            text[..text.len() - 30].to_string(),
            "line 93: the file ends in the middle of this line: it was cut short",
        ),
        (
            "recounted",
            join(&recounted),
            "line 92: the end line counts 91 events, the file holds 90",
        ),
        (
            "appended",
            join(&appended),
            "line 94: a line follows the end line",
        ),
        ("garbage", join(&garbage), "line 3: not an event line"),
        (
            "a new field",
            join(&new_field),
            "line 3: the hash chain breaks here",
        ),
        (
            "huge",
            huge,
            "line 2: longer than 16 MiB: not an events export",
        ),
        ("empty", String::new(), "line 1: the file is empty"),
        (
            "not an export",
            "{\"hello\": 1}\n".into(),
            "line 1: not the header of an events export",
        ),
        (
            "binary",
            "\u{0}\u{1}\u{2}\n".into(),
            "line 1: not the header of an events export",
        ),
    ];
    let target = testkit::fresh_db().await;
    for (what, content, expected) in cases {
        let path = dir.path().join("damaged.jsonl");
        std::fs::write(&path, content).unwrap();
        let err = fails(&target.url, &["events", "import", path.to_str().unwrap()]);
        assert!(
            err.contains(expected),
            "{what}: expected {expected:?} in {err}"
        );
        assert!(err.contains("nothing was imported"), "{what}: {err}");
        assert_eq!(
            count(&target.pool, "SELECT count(*) FROM events").await,
            0,
            "{what}"
        );
        assert_eq!(
            count(&target.pool, "SELECT count(*) FROM outbox").await,
            0,
            "{what}"
        );
        assert_eq!(
            count(&target.pool, "SELECT count(*) FROM name_claims").await,
            0,
            "{what}"
        );
    }
    // The intact file still goes in.
    ok(&target.url, &["events", "import", file.to_str().unwrap()]);
    assert_eq!(count(&target.pool, "SELECT count(*) FROM events").await, 91);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_with_a_gap_in_an_aggregate_is_refused_even_with_a_valid_chain() {
    // A source whose log already has a gap (written by hand): the chain
    // is intact, the history is not.
    let (source, h) = with_history().await;
    insert_event(&source.pool, "task", h.done, 9, "TaskArtifactRecorded", "{\"ArtifactRecorded\": {\"attempt\": 1, \"name\": \"model\", \"key\": \"k\", \"size\": 1, \"sha256\": \"00\", \"at\": \"2026-11-28T10:00:00Z\"}}").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    export(&source.url, &file, &[]);
    let target = testkit::fresh_db().await;
    let err = fails(&target.url, &["events", "import", file.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "line 93: task {} #9 (TaskArtifactRecorded) follows #6: #7..#8 are missing",
            h.done
        )),
        "{err}"
    );
    assert_eq!(count(&target.pool, "SELECT count(*) FROM events").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_migrates_a_brand_new_database_first() {
    let (source, h) = with_history().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    export(&source.url, &file, &[]);
    // A database as `createdb` leaves it: no tables at all.
    let admin = testkit::server_url().await;
    let name = format!("bare_{}", Uuid::new_v4().simple());
    let pool = PgPool::connect(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&pool)
        .await
        .unwrap();
    let (base, query) = admin.split_once('?').unwrap_or((&admin, ""));
    let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
    let url = if query.is_empty() {
        format!("{server}/{name}")
    } else {
        format!("{server}/{name}?{query}")
    };
    let out = ok(&url, &["events", "import", file.to_str().unwrap()]);
    assert!(out.contains("imported 91 events of 9 aggregates"), "{out}");
    let out = ok(
        &url,
        &["replay", "task", &h.done.to_string(), "--final", "--json"],
    );
    assert!(out.contains("\"succeeded\""), "{out}");
    let status = ok(&url, &["projections", "status"]);
    assert!(status.contains("timeline"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_goes_to_stdout_and_an_import_reads_stdin() {
    let (source, _) = with_history().await;
    let exported = unidesk(&source.url, &["events", "export"]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    assert!(stderr(&exported).contains("exported 91 events"));
    let target = testkit::fresh_db().await;
    let mut import = Command::new(env!("CARGO_BIN_EXE_unidesk"))
        .args(["events", "import", "-", "--database-url", &target.url])
        .env_remove("DATABASE_URL")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = import.stdin.take().unwrap();
        stdin.write_all(&exported.stdout).unwrap();
    }
    let out = tokio::task::block_in_place(|| import.wait_with_output().unwrap());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("imported 91 events of 9 aggregates"));
    assert_eq!(events(&target.pool).await, events(&source.pool).await);
}
