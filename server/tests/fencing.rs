//! Leadership and liveness across real processes: `unidesk serve` killed,
//! frozen and restarted, its PostgreSQL stopped and started, real
//! `unidesk-agent`s running real Docker containers. Windows are scaled
//! down (an 8 s offline window, a 2 s lease) so each test takes seconds.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::time::{Duration, Instant};

use chrono::Utc;
use domain::node::{Node, NodeCommand, NodeResources};
use domain::project::{Project, ProjectCommand};
use domain::spec::{TaskSpecDraft, UrlPolicy};
use domain::task::{Task, TaskCommand, TaskState};
use domain::Actor;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use store::Store;
use testkit::eventually;
use testkit::process::{Api, ServerProcess};
use uuid::Uuid;

use support::{base_image, repo, spawn_agent, task_in, Agents, EnvImage, BASE};

/// The flags of a platform whose windows are scaled down: a node silent
/// for 8 s is offline; a leader's lease lasts 2 s.
const QUICK: &[&str] = &[
    "--allow-file-urls",
    "--heartbeat-s",
    "1",
    "--offline-after-s",
    "8",
    "--poll-ms",
    "100",
    "--leader-lease-s",
    "2",
];

/// How long an outage lasts: well past the offline window.
const OUTAGE: Duration = Duration::from_secs(12);

/// How long after the platform is back the node's agent is heard again
/// (its reconnect backoff, a slow network): well within the offline
/// window, but after the scheduler's first round.
const COMEBACK: Duration = Duration::from_secs(3);

/// A project, a node with a real agent, and a task that runs for
/// `run_s` seconds in a container on it, as a user sets them up.
struct Work {
    api: Api,
    task: String,
    agents: Agents,
    _dir: tempfile::TempDir,
    _image: EnvImage,
}

impl Work {
    /// Sets everything up on `server` and waits until the task runs.
    async fn start(server: &ServerProcess, run_s: u32) -> Work {
        base_image();
        let api = server.api();
        let dir = tempfile::tempdir().unwrap();
        let code = repo(
            dir.path(),
            "code",
            &[(
                "run.sh",
                &format!("echo started\nsleep {run_s}\necho done\n"),
            )],
        );
        let env = repo(
            dir.path(),
            "env",
            &[("Dockerfile", &format!("FROM {BASE}\n"))],
        );
        let project = api.post("/projects", json!({"name": "outages"})).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let node = api.post("/nodes", json!({"name": "worker"})).await;
        let token = node["token"].as_str().unwrap();
        let agents = Agents(vec![spawn_agent(
            &server.ws(),
            token,
            &dir.path().join("agent"),
            &["--cpus", "2", "--memory-mb", "1024", "--no-gpus"],
        )]);
        support::node_online(&api, node["id"].as_str().unwrap()).await;
        let task = api
            .post(
                "/tasks",
                json!({
                    "project_id": project,
                    "code_repo_url": code.0, "code_commit_id": code.1,
                    "env_repo_url": env.0, "env_commit_id": env.1,
                    "dockerfile_path": "Dockerfile",
                    "command": ["sh", "run.sh"],
                    "resources": {"cpus": 1, "memory_mb": 256},
                    "max_retries": 2
                }),
            )
            .await["id"]
            .as_str()
            .unwrap()
            .to_string();
        task_in(&api, &task, &["running"]).await;
        Work {
            api,
            task,
            agents,
            _dir: dir,
            _image: EnvImage::of(&env, "Dockerfile"),
        }
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the agent process; its
    /// container runs on either way.
    fn agent(&self, signal: Signal) {
        let pid = i32::try_from(self.agents.0[0].id()).unwrap();
        kill(Pid::from_raw(pid), signal).unwrap();
    }

    /// Waits for the task to end on `api` and checks it succeeded as
    /// attempt 1, never lost and its node never offline.
    async fn finished_as_attempt_one(&self, api: &Api) {
        let done = task_in(
            api,
            &self.task,
            &["succeeded", "failed", "cancelled", "timed_out"],
        )
        .await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["attempt"], 1, "{done}");
        let events = api.get("/events?aggregate_type=task&limit=1000").await;
        let types: Vec<&str> = events["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_type"].as_str().unwrap())
            .collect();
        assert!(!types.contains(&"TaskLost"), "{types:?}");
        let nodes = api.get("/events?aggregate_type=node&limit=1000").await;
        let offline: Vec<&Value> = nodes["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event_type"] == "NodeMarkedOffline")
            .collect();
        assert!(offline.is_empty(), "{offline:?}");
        let logs = api.get(&format!("/tasks/{}/logs", self.task)).await;
        assert!(logs["data"].as_str().unwrap().contains("done"), "{logs}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_outlives_a_server_outage_longer_than_the_offline_window() {
    let db = testkit::fresh_db().await;
    let mut server = support::serve(&db.url, QUICK).await;
    let port = server.port();
    let work = Work::start(&server, 30).await;

    // The whole server dies (every role at once) and stays away for
    // longer than the offline window; the container runs on meanwhile,
    // and its agent is heard again a little after the server is back.
    server.kill();
    work.agent(Signal::SIGSTOP);
    tokio::time::sleep(OUTAGE).await;
    let server = support::serve_with(&db.url, QUICK, |launch| launch.port(port)).await;
    tokio::time::sleep(COMEBACK).await;
    work.agent(Signal::SIGCONT);
    work.finished_as_attempt_one(&server.api()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_outlives_a_database_outage_longer_than_the_offline_window() {
    let mut cluster = pgcluster::LocalCluster::start_ephemeral().await.unwrap();
    let port = cluster.port();
    let server = support::serve(&cluster.url(), QUICK).await;
    let work = Work::start(&server, 30).await;

    // PostgreSQL stops for longer than the offline window; the server and
    // the container run on, and the agent is heard again a little after
    // PostgreSQL is back.
    work.agent(Signal::SIGSTOP);
    cluster.halt(pgcluster::StopMode::Fast).await.unwrap();
    tokio::time::sleep(OUTAGE).await;
    cluster.resume().await.unwrap();
    assert_eq!(cluster.port(), port, "PostgreSQL came back elsewhere");
    tokio::time::sleep(COMEBACK).await;
    work.agent(Signal::SIGCONT);
    work.finished_as_attempt_one(&work.api).await;
}

/// What a test of two schedulers needs: a database with a project and an
/// online node (no ingress: nothing is heard, nothing goes offline), and
/// a directory for the schedulers' logs.
struct Schedulers {
    db: testkit::TestDb,
    store: Store,
    project: Uuid,
    node: Uuid,
    logs: tempfile::TempDir,
}

impl Schedulers {
    async fn new() -> Schedulers {
        let db = testkit::fresh_db().await;
        let store = Store::new(db.pool.clone());
        let admin = Actor::User("admin".into());
        let project = Uuid::new_v4();
        store
            .execute::<Project>(
                &project.to_string(),
                ProjectCommand::Create {
                    project_id: project,
                    name: "p".into(),
                    description: String::new(),
                    owner: "admin".into(),
                    at: Utc::now(),
                },
                &admin,
                Utc::now(),
            )
            .await
            .unwrap();
        let node = Uuid::new_v4();
        let provision = NodeCommand::Provision {
            node_id: node,
            name: "n".into(),
            labels: Default::default(),
            token_fingerprint: "ff".into(),
            max_resources: Default::default(),
            by: admin.clone(),
            at: Utc::now(),
        };
        store
            .execute::<Node>(&node.to_string(), provision, &admin, Utc::now())
            .await
            .unwrap();
        let connect = NodeCommand::Connect {
            session: Uuid::new_v4(),
            agent_version: "test".into(),
            resources: NodeResources {
                cpus: 64.0,
                memory_mb: 65536,
                gpus: vec![],
            },
            labels: Default::default(),
            at: Utc::now(),
        };
        store
            .execute::<Node>(
                &node.to_string(),
                connect,
                &Actor::Node(node.to_string()),
                Utc::now(),
            )
            .await
            .unwrap();
        Schedulers {
            db,
            store,
            project,
            node,
            logs: tempfile::tempdir().unwrap(),
        }
    }

    /// A scheduler process (with the API, which answers `/readyz`),
    /// writing its log to `<name>.log`.
    async fn start(&self, name: &str) -> ServerProcess {
        let log = self.logs.path().join(format!("{name}.log"));
        support::serve_with(
            &self.db.url,
            &[
                "--roles",
                "api,scheduler",
                "--poll-ms",
                "100",
                "--leader-lease-s",
                "2",
            ],
            |launch| launch.log_to(log),
        )
        .await
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits until `server` leads; returns its term.
    async fn leads(&self, server: &ServerProcess) -> i64 {
        let pid = format!(":{}:", server.pid().unwrap());
        eventually("the scheduler to lead", Duration::from_secs(30), || async {
            let lease = store::leader::current(&self.db.pool).await.unwrap();
            (lease.holder.contains(&pid) && lease.expires_at > Utc::now()).then_some(lease.term)
        })
        .await
    }

    async fn submit(&self, retries: i64) -> Uuid {
        let spec = TaskSpecDraft {
            project_id: Some(self.project),
            code_repo_url: Some("https://example.com/c.git".into()),
            code_commit_id: Some("a".repeat(40)),
            env_repo_url: Some("https://example.com/e.git".into()),
            env_commit_id: Some("b".repeat(40)),
            dockerfile_path: Some("Dockerfile".into()),
            max_retries: Some(retries),
            ..Default::default()
        }
        .validate(UrlPolicy::default())
        .unwrap();
        let id = Uuid::now_v7();
        let admin = Actor::User("admin".into());
        let submit = TaskCommand::Submit {
            task_id: id,
            spec,
            by: admin.clone(),
            at: Utc::now(),
        };
        self.store
            .execute::<Task>(&id.to_string(), submit, &admin, Utc::now())
            .await
            .unwrap();
        id
    }

    async fn task(&self, id: Uuid) -> Task {
        self.store
            .load::<Task>(&id.to_string())
            .await
            .unwrap()
            .unwrap()
            .state
    }

    /// How many assignments name `term`.
    async fn assigned_under(&self, term: i64) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE event_type = 'TaskAssigned' \
             AND (payload -> 'Assigned' ->> 'term')::bigint = $1",
        )
        .bind(term)
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }

    /// The term of `task`'s assignment of `attempt`.
    async fn term_of(&self, task: Uuid, attempt: i64) -> Option<i64> {
        sqlx::query_scalar(
            "SELECT (payload -> 'Assigned' ->> 'term')::bigint FROM events \
             WHERE aggregate_id = $1 AND event_type = 'TaskAssigned' \
               AND (payload -> 'Assigned' ->> 'attempt')::bigint = $2",
        )
        .bind(task.to_string())
        .bind(attempt)
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }
}

fn signal(server: &ServerProcess, signal: Signal) {
    let pid = i32::try_from(server.pid().unwrap()).unwrap();
    kill(Pid::from_raw(pid), signal).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_leader_resuming_after_its_lease_was_taken_is_refused_by_the_store() {
    let s = Schedulers::new().await;
    // A task placed before any scheduler runs; its attempt will be lost,
    // and the retry placed while the test holds appends back.
    let task = s.submit(1).await;
    let scheduler = Actor::System("scheduler".into());
    let assign = TaskCommand::Assign {
        node_id: s.node,
        gpus: vec![],
        reason: "test".into(),
        at: Utc::now(),
    };
    s.store
        .execute::<Task>(&task.to_string(), assign, &scheduler, Utc::now())
        .await
        .unwrap();
    let a = s.start("a").await;
    let a_term = s.leads(&a).await;
    let b = s.start("b").await;

    // The attempt is lost: the task may be placed again 5 s from now.
    let lost = TaskCommand::MarkLost {
        node_id: s.node,
        attempt: 1,
        reason: "test".into(),
        at: Utc::now(),
    };
    s.store
        .execute::<Task>(&task.to_string(), lost, &scheduler, Utc::now())
        .await
        .unwrap();
    // Appends wait until the test lets them through: the leader's
    // assignment, checked and sent, waits at the door.
    let mut door = s.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN SHARE MODE")
        .execute(&mut *door)
        .await
        .unwrap();
    eventually(
        "the leader's assignment to wait",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query ILIKE '%insert into events%'",
            )
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;
    // The leader freezes; its lease runs out and the standby takes over.
    signal(&a, Signal::SIGSTOP);
    let b_term = s.leads(&b).await;
    assert_eq!(b_term, a_term + 1);
    door.commit().await.unwrap();
    eventually(
        "the new leader to place the task",
        Duration::from_secs(30),
        || async { (s.task(task).await.attempt == 2).then_some(()) },
    )
    .await;
    assert_eq!(s.term_of(task, 2).await, Some(b_term));

    // The old leader resumes: the store refused what it sent, and it
    // stands down.
    signal(&a, Signal::SIGCONT);
    eventually(
        "the old leader to report the refusal",
        Duration::from_secs(30),
        || async {
            let log = s.log("a");
            (log.contains("the store refused an assignment")
                && log.contains(&format!(
                    "term {a_term} is no longer the scheduler leader's"
                )))
            .then_some(())
        },
    )
    .await;
    let later = s.submit(0).await;
    eventually(
        "the leader to place another task",
        Duration::from_secs(30),
        || async { (s.task(later).await.state == TaskState::Assigned).then_some(()) },
    )
    .await;
    assert_eq!(s.term_of(later, 1).await, Some(b_term));
    assert_eq!(s.assigned_under(a_term).await, 0, "{}", s.log("a"));
    let lease = store::leader::current(&s.db.pool).await.unwrap();
    assert_eq!(lease.term, b_term);
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_takes_over_within_seconds_when_the_leader_is_killed() {
    let s = Schedulers::new().await;
    let mut a = s.start("a").await;
    let a_term = s.leads(&a).await;
    let b = s.start("b").await;
    let first = s.submit(0).await;
    eventually(
        "the leader to place a task",
        Duration::from_secs(30),
        || async { (s.task(first).await.state == TaskState::Assigned).then_some(()) },
    )
    .await;
    assert_eq!(s.term_of(first, 1).await, Some(a_term));

    // kill -9: the lease is not given up, it runs out.
    a.kill();
    let killed = Instant::now();
    let task = s.submit(0).await;
    eventually(
        "the standby to place the task",
        Duration::from_secs(30),
        || async { (s.task(task).await.state == TaskState::Assigned).then_some(()) },
    )
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(8), "the standby took {took:?}");
    assert_eq!(s.term_of(task, 1).await, Some(a_term + 1));
    assert_eq!(s.leads(&b).await, a_term + 1);
}
