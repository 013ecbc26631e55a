//! The scheduler against a real PostgreSQL: placement, liveness, timeouts
//! and leadership. The tests play the ingress: they write the heartbeats
//! (`node_liveness`) and the ingress's own record (`ingress_liveness`).

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::time::Duration;

use testkit::eventually;

use chrono::{DateTime, Utc};
use domain::node::{Node, NodeCommand, NodeResources, ResourceLimits};
use domain::project::{Project, ProjectCommand};
use domain::spec::{ResourcesDraft, TaskSpec, TaskSpecDraft, UrlPolicy};
use domain::task::{Task, TaskCommand, TaskEvent, TaskState};
use domain::Actor;
use store::Store;
use unidesk::scheduler::{Config, Scheduler};
use uuid::Uuid;

fn admin() -> Actor {
    Actor::User("admin".into())
}

struct World {
    store: Store,
    project: Uuid,
}

async fn world() -> World {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
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
            &admin(),
            Utc::now(),
        )
        .await
        .unwrap();
    // An ingress alive for a day already: nodes have been heard all along.
    sqlx::query(
        "INSERT INTO ingress_liveness (ingress, alive_since, last_seen) \
         VALUES ('test', now() - interval '1 day', now())",
    )
    .execute(store.pool())
    .await
    .unwrap();
    World { store, project }
}

/// How a node joins: what the admin provisions, what its agent declares on
/// connecting, and when it last beat.
struct Joining<'a> {
    name: &'a str,
    /// Labels the admin provisions.
    provisioned: &'a [(&'a str, &'a str)],
    /// Limits the admin provisions.
    max: ResourceLimits,
    cpus: f64,
    memory_mb: u64,
    /// Device indices of the GPUs the agent declares.
    gpus: &'a [u32],
    /// Labels the agent declares.
    declared: &'a [(&'a str, &'a str)],
    seen: DateTime<Utc>,
}

impl World {
    /// Sets the project's most running tasks.
    async fn set_quota(&self, max_running: Option<u32>) {
        self.store
            .execute::<Project>(
                &self.project.to_string(),
                ProjectCommand::SetQuota {
                    max_running,
                    by: admin(),
                    at: Utc::now(),
                },
                &admin(),
                Utc::now(),
            )
            .await
            .unwrap();
    }

    /// A provisioned node whose agent is connected and beat at `seen`.
    async fn node(
        &self,
        name: &str,
        cpus: f64,
        labels: &[(&str, &str)],
        seen: DateTime<Utc>,
    ) -> Uuid {
        self.node_with_gpus(name, cpus, labels, seen, &[]).await
    }

    /// Like [`World::node`], declaring GPUs with these device indices.
    async fn node_with_gpus(
        &self,
        name: &str,
        cpus: f64,
        labels: &[(&str, &str)],
        seen: DateTime<Utc>,
        gpus: &[u32],
    ) -> Uuid {
        self.join(Joining {
            name,
            provisioned: labels,
            max: ResourceLimits::default(),
            cpus,
            memory_mb: 16384,
            gpus,
            declared: &[],
            seen,
        })
        .await
    }

    /// A node provisioned by an admin and connected by its agent as `j` says.
    async fn join(&self, j: Joining<'_>) -> Uuid {
        let id = Uuid::new_v4();
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        self.store
            .execute::<Node>(
                &id.to_string(),
                NodeCommand::Provision {
                    node_id: id,
                    name: j.name.into(),
                    labels: labels(j.provisioned),
                    token_fingerprint: "ff".into(),
                    max_resources: j.max,
                    by: admin(),
                    at: Utc::now(),
                },
                &admin(),
                Utc::now(),
            )
            .await
            .unwrap();
        let session = Uuid::new_v4();
        self.store
            .execute::<Node>(
                &id.to_string(),
                NodeCommand::Connect {
                    session,
                    agent_version: "test".into(),
                    resources: NodeResources {
                        cpus: j.cpus,
                        memory_mb: j.memory_mb,
                        gpus: j
                            .gpus
                            .iter()
                            .map(|&index| domain::node::Gpu {
                                index,
                                name: "Test GPU".into(),
                                memory_mb: 16384,
                            })
                            .collect(),
                    },
                    labels: labels(j.declared),
                    at: Utc::now(),
                },
                &Actor::Node(id.to_string()),
                Utc::now(),
            )
            .await
            .unwrap();
        self.beat(id, session, j.seen).await;
        id
    }

    /// The test's ingress records that it is alive.
    async fn ingress_alive(&self) {
        sqlx::query("UPDATE ingress_liveness SET last_seen = now() WHERE ingress = 'test'")
            .execute(self.store.pool())
            .await
            .unwrap();
    }

    /// The test's ingress was restarted at `at`: nodes are heard through
    /// it since then.
    async fn ingress_restarted(&self, at: DateTime<Utc>) {
        sqlx::query("UPDATE ingress_liveness SET alive_since = $1 WHERE ingress = 'test'")
            .bind(at)
            .execute(self.store.pool())
            .await
            .unwrap();
    }

    /// Places `task`'s next attempt on `node` directly, with no scheduler
    /// leading.
    async fn assign(&self, task: Uuid, node: Uuid) {
        let cmd = TaskCommand::Assign {
            node_id: node,
            gpus: vec![],
            reason: "test".into(),
            at: Utc::now(),
        };
        self.store
            .execute::<Task>(&task.to_string(), cmd, &admin(), Utc::now())
            .await
            .unwrap();
    }

    async fn beat(&self, node: Uuid, session: Uuid, at: DateTime<Utc>) {
        sqlx::query(
            "INSERT INTO node_liveness (node_id, session, ingress, connected_at, last_seen) \
             VALUES ($1, $2, 'test', $3, $3) ON CONFLICT (node_id) DO UPDATE SET last_seen = $3",
        )
        .bind(node)
        .bind(session)
        .bind(at)
        .execute(self.store.pool())
        .await
        .unwrap();
    }

    async fn submit(
        &self,
        cpus: f64,
        labels: &[(&str, &str)],
        retries: i64,
        timeout: Option<i64>,
    ) -> Uuid {
        self.submit_gpus(cpus, labels, retries, timeout, 0).await
    }

    async fn submit_gpus(
        &self,
        cpus: f64,
        labels: &[(&str, &str)],
        retries: i64,
        timeout: Option<i64>,
        gpus: i64,
    ) -> Uuid {
        let spec = self.spec(cpus, labels, retries, timeout, gpus);
        let id = Uuid::now_v7();
        self.store
            .execute::<Task>(
                &id.to_string(),
                TaskCommand::Submit {
                    task_id: id,
                    spec,
                    by: admin(),
                    at: Utc::now(),
                },
                &admin(),
                Utc::now(),
            )
            .await
            .unwrap();
        id
    }

    /// The spec of a task of the world's project.
    fn spec(
        &self,
        cpus: f64,
        labels: &[(&str, &str)],
        retries: i64,
        timeout: Option<i64>,
        gpus: i64,
    ) -> TaskSpec {
        TaskSpecDraft {
            project_id: Some(self.project),
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
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            max_retries: Some(retries),
            timeout_s: timeout,
            ..Default::default()
        }
        .validate(UrlPolicy::default())
        .unwrap()
    }

    /// Appends `event` to task `id`'s log as another process would:
    /// straight into the table, so this process hears of it only through
    /// the outbox.
    async fn append_elsewhere(&self, id: Uuid, sequence: i64, event: &TaskEvent) {
        use cqrs_es::DomainEvent;
        let metadata = serde_json::json!({"actor": admin().to_string(), "at": Utc::now()});
        sqlx::query(
            "INSERT INTO events \
               (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             VALUES ('task', $1, $2, $3, $4, $5::json, $6::json)",
        )
        .bind(id.to_string())
        .bind(sequence)
        .bind(event.event_type())
        .bind(event.event_version())
        .bind(serde_json::to_string(event).unwrap())
        .bind(metadata.to_string())
        .execute(self.store.pool())
        .await
        .unwrap();
    }

    async fn task(&self, id: Uuid) -> Task {
        self.store
            .load::<Task>(&id.to_string())
            .await
            .unwrap()
            .unwrap()
            .state
    }

    async fn run(&self, node: Uuid, task: Uuid) {
        let n = Actor::Node(node.to_string());
        let attempt = self.task(task).await.attempt;
        for cmd in [
            TaskCommand::Accept {
                node_id: node,
                attempt,
                at: Utc::now(),
            },
            TaskCommand::ReportStarted {
                node_id: node,
                attempt,
                container: "c".into(),
                at: Utc::now(),
            },
        ] {
            self.store
                .execute::<Task>(&task.to_string(), cmd, &n, Utc::now())
                .await
                .unwrap();
        }
    }
}

/// One scheduling round once every event committed so far is visible: other
/// tests share the PostgreSQL server, and an open transaction of theirs can
/// hold back what the scheduler's read models see. The test's ingress
/// records that it is alive first.
async fn round(w: &World, s: &Scheduler, now: DateTime<Utc>) -> unidesk::scheduler::Outcome {
    w.ingress_alive().await;
    projections::Projector::new(w.store.pool().clone())
        .catch_up()
        .await
        .unwrap();
    let outcome = s.run_once(now).await.unwrap();
    assert!(outcome.term.is_some(), "the scheduler does not lead");
    outcome
}

/// A scheduler leading already (before the test's clock starts).
async fn scheduler(w: &World) -> Scheduler {
    let s = Scheduler::new(w.store.clone(), Config::default());
    round(w, &s, Utc::now()).await;
    s
}

#[tokio::test]
async fn tasks_go_only_where_labels_and_free_resources_fit() {
    let w = world().await;
    let s = scheduler(&w).await;
    let now = Utc::now();
    let small = w.node("small", 2.0, &[], now).await;
    let gpu = w.node("gpu-1", 8.0, &[("gpu", "a100")], now).await;
    let needs_gpu_label = w.submit(1.0, &[("gpu", "a100")], 0, None).await;
    let big = w.submit(6.0, &[], 0, None).await;
    let too_big = w.submit(9.0, &[], 0, None).await;
    let unmatched = w.submit(1.0, &[("gpu", "h100")], 0, None).await;
    let outcome = round(&w, &s, Utc::now()).await;
    assert_eq!(outcome.assigned, 2);
    assert_eq!(w.task(needs_gpu_label).await.node_id, Some(gpu));
    assert_eq!(w.task(big).await.node_id, Some(gpu));
    for t in [too_big, unmatched] {
        assert_eq!(w.task(t).await.state, TaskState::Queued);
    }
    // The gpu node now has 1 CPU left and `small` 2: a 2-CPU task fits only
    // on `small`, a third one nowhere.
    let a = w.submit(2.0, &[], 0, None).await;
    let b = w.submit(2.0, &[], 0, None).await;
    round(&w, &s, Utc::now()).await;
    assert_eq!(w.task(a).await.node_id, Some(small));
    assert_eq!(w.task(b).await.state, TaskState::Queued);
    // Running again changes nothing: nothing is ever assigned twice.
    assert_eq!(round(&w, &s, Utc::now()).await.assigned, 0);
}

/// A round places what this process committed before it reads the
/// outbox, then reads it: what another process committed still decides. A
/// task cancelled elsewhere is not assigned, and a task submitted
/// elsewhere is placed in the same round.
#[tokio::test]
async fn a_round_placing_before_it_reads_the_outbox_still_follows_the_log() {
    let w = world().await;
    let s = scheduler(&w).await;
    let now = Utc::now();
    let node = w.node("n", 4.0, &[], now).await;
    round(&w, &s, Utc::now()).await;

    // Submitted here, cancelled elsewhere before the round.
    let cancelled = w.submit(1.0, &[], 0, None).await;
    let cancel = TaskEvent::Cancelled {
        attempt: None,
        at: Utc::now(),
    };
    w.append_elsewhere(cancelled, 2, &cancel).await;
    // One submitted here, one elsewhere.
    let here = w.submit(1.0, &[], 0, None).await;
    let elsewhere = Uuid::now_v7();
    let submitted = TaskEvent::Submitted {
        task_id: elsewhere,
        spec: Box::new(w.spec(1.0, &[], 0, None, 0)),
        by: admin(),
        at: Utc::now(),
    };
    w.append_elsewhere(elsewhere, 1, &submitted).await;

    let outcome = round(&w, &s, Utc::now()).await;
    assert_eq!(outcome.assigned, 2, "{outcome:?}");
    assert_eq!(w.task(here).await.node_id, Some(node));
    assert_eq!(w.task(elsewhere).await.node_id, Some(node));
    let t = w.task(cancelled).await;
    assert_eq!((t.state, t.attempt), (TaskState::Cancelled, 0));
    assert_eq!(round(&w, &s, Utc::now()).await.assigned, 0);
}

#[tokio::test]
async fn a_projects_max_running_is_never_exceeded() {
    let w = world().await;
    w.node("n", 64.0, &[], Utc::now()).await;
    w.set_quota(Some(2)).await;
    let tasks = [
        w.submit(1.0, &[], 0, None).await,
        w.submit(1.0, &[], 0, None).await,
        w.submit(1.0, &[], 0, None).await,
    ];
    let s = scheduler(&w).await;
    round(&w, &s, Utc::now()).await;
    round(&w, &s, Utc::now()).await;
    let mut states = Vec::new();
    for t in tasks {
        states.push(w.task(t).await.state);
    }
    assert_eq!(
        states.iter().filter(|s| **s == TaskState::Assigned).count(),
        2
    );
    assert_eq!(
        states.iter().filter(|s| **s == TaskState::Queued).count(),
        1
    );
}

/// How many of `tasks` are assigned.
async fn assigned(w: &World, tasks: &[Uuid]) -> usize {
    let mut n = 0;
    for t in tasks {
        n += usize::from(w.task(*t).await.state == TaskState::Assigned);
    }
    n
}

/// The leader remembers projects' limits between rounds; a change of
/// limit must count from the next round, not once the memory expires.
#[tokio::test]
async fn a_projects_new_max_running_counts_from_the_next_round() {
    let w = world().await;
    w.node("n", 64.0, &[], Utc::now()).await;
    w.set_quota(Some(1)).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(w.submit(1.0, &[], 0, None).await);
    }
    let s = scheduler(&w).await;
    round(&w, &s, Utc::now()).await;
    round(&w, &s, Utc::now()).await;
    assert_eq!(assigned(&w, &tasks).await, 1);
    w.set_quota(Some(3)).await;
    round(&w, &s, Utc::now()).await;
    assert_eq!(
        assigned(&w, &tasks).await,
        3,
        "the raised limit counts at once"
    );
    w.set_quota(None).await;
    round(&w, &s, Utc::now()).await;
    assert_eq!(assigned(&w, &tasks).await, 4, "no limit, none waits");
}

#[tokio::test]
async fn a_silent_node_goes_offline_and_its_task_runs_elsewhere() {
    let w = world().await;
    let s = scheduler(&w).await;
    let now = Utc::now();
    let first = w.node("first", 4.0, &[], now).await;
    let task = w.submit(1.0, &[], 1, None).await;
    round(&w, &s, now).await;
    assert_eq!(w.task(task).await.node_id, Some(first));
    w.run(first, task).await;

    // 60 s later nothing happens; after 91 s without a heartbeat the node
    // is offline, the attempt lost and the task queued again.
    let quiet = round(&w, &s, now + chrono::Duration::seconds(60)).await;
    assert_eq!((quiet.offline, quiet.lost), (0, 0));
    let second = w
        .node("second", 4.0, &[], now + chrono::Duration::seconds(91))
        .await;
    let later = now + chrono::Duration::seconds(91);
    let o = round(&w, &s, later).await;
    assert_eq!((o.offline, o.lost), (1, 1));
    let t = w.task(task).await;
    assert_eq!(t.attempts[0].outcome.as_deref(), Some("lost"));
    assert!(t.reason.unwrap().contains("no heartbeat"));
    // Requeued with a backoff of 5 s: not placed before, placed after.
    let t = w.task(task).await;
    assert_eq!(t.state, TaskState::Queued);
    assert_eq!(t.not_before, Some(later + chrono::Duration::seconds(5)));
    round(&w, &s, later + chrono::Duration::seconds(4)).await;
    assert_eq!(w.task(task).await.state, TaskState::Queued);
    round(&w, &s, later + chrono::Duration::milliseconds(5001)).await;
    let t = w.task(task).await;
    assert_eq!(
        (t.state, t.attempt, t.node_id),
        (TaskState::Assigned, 2, Some(second))
    );
}

#[tokio::test]
async fn gpu_devices_are_never_given_to_two_attempts_at_once() {
    let w = world().await;
    let now = Utc::now() + chrono::Duration::hours(1);
    let node = w.node_with_gpus("gpu", 64.0, &[], now, &[0, 1, 2]).await;
    let two = w.submit_gpus(1.0, &[], 0, None, 2).await;
    let one = w.submit_gpus(1.0, &[], 0, None, 1).await;
    let waits = w.submit_gpus(1.0, &[], 0, None, 1).await;
    let s = scheduler(&w).await;
    round(&w, &s, Utc::now()).await;
    round(&w, &s, Utc::now()).await;
    let (a, b) = (w.task(two).await, w.task(one).await);
    assert_eq!(a.gpus(), &[0, 1]);
    assert_eq!(b.gpus(), &[2]);
    assert_eq!(w.task(waits).await.state, TaskState::Queued);
    // The two-GPU task ends; its devices go to the waiting task.
    w.run(node, two).await;
    w.store
        .execute::<Task>(
            &two.to_string(),
            TaskCommand::ReportExited {
                node_id: node,
                attempt: 1,
                outcome: domain::task::Outcome::Succeeded,
                at: Utc::now(),
            },
            &Actor::Node(node.to_string()),
            Utc::now(),
        )
        .await
        .unwrap();
    round(&w, &s, Utc::now()).await;
    let c = w.task(waits).await;
    assert_eq!(c.state, TaskState::Assigned);
    assert_eq!(c.gpus(), &[0]);
}

/// A node as an agent would present it, however much it claims: provisioned
/// by an admin with no labels and `max`, then connected declaring `cpus`,
/// GPU devices `gpus` and `labels`.
async fn claiming_node(
    w: &World,
    name: &str,
    max: ResourceLimits,
    cpus: f64,
    gpus: &[u32],
    labels: &[(&str, &str)],
) -> Uuid {
    w.join(Joining {
        name,
        provisioned: &[],
        max,
        cpus,
        memory_mb: 1024 * 1024,
        gpus,
        declared: labels,
        seen: Utc::now() + chrono::Duration::hours(1),
    })
    .await
}

async fn as_admin(w: &World, node: Uuid, command: NodeCommand) {
    w.store
        .execute::<Node>(&node.to_string(), command, &admin(), Utc::now())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_agent_declaring_a_label_gets_no_task_requiring_it_until_an_admin_accepts() {
    let w = world().await;
    let liar = claiming_node(
        &w,
        "liar",
        ResourceLimits::default(),
        8.0,
        &[],
        &[("gpu", "a100")],
    )
    .await;
    let task = w.submit(1.0, &[("gpu", "a100")], 0, None).await;
    let s = scheduler(&w).await;
    assert_eq!(round(&w, &s, Utc::now()).await.assigned, 0);
    assert_eq!(w.task(task).await.state, TaskState::Queued);
    // An admin accepts the declared label: now it counts.
    as_admin(
        &w,
        liar,
        NodeCommand::AcceptDeclaredLabels {
            keys: Some(vec!["gpu".into()]),
            by: admin(),
            at: Utc::now(),
        },
    )
    .await;
    round(&w, &s, Utc::now()).await;
    let t = w.task(task).await;
    assert_eq!((t.state, t.node_id), (TaskState::Assigned, Some(liar)));
}

#[tokio::test]
async fn a_node_claiming_more_than_its_maximum_is_given_at_most_its_maximum() {
    let w = world().await;
    let max = ResourceLimits {
        cpus: Some(4.0),
        memory_mb: None,
        gpus: Some(1),
    };
    let node = claiming_node(&w, "greedy", max, 64.0, &[0, 1, 2, 3, 4, 5, 6, 7], &[]).await;
    let two_gpus = w.submit_gpus(1.0, &[], 0, None, 2).await;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(w.submit_gpus(1.0, &[], 0, None, 1).await);
    }
    for _ in 0..6 {
        tasks.push(w.submit(1.0, &[], 0, None).await);
    }
    let s = scheduler(&w).await;
    round(&w, &s, Utc::now()).await;
    round(&w, &s, Utc::now()).await;
    let mut cpus = 0;
    let mut devices = Vec::new();
    for t in tasks.iter().chain([&two_gpus]) {
        let t = w.task(*t).await;
        if t.state == TaskState::Assigned {
            assert_eq!(t.node_id, Some(node));
            cpus += 1;
            devices.extend_from_slice(t.gpus());
        }
    }
    // 4 CPUs' worth of tasks, one of them on the first declared GPU.
    assert_eq!(cpus, 4);
    assert_eq!(devices, [0]);
    assert_eq!(w.task(two_gpus).await.state, TaskState::Queued);
}

#[tokio::test]
async fn lowering_a_maximum_below_what_runs_stops_nothing_and_places_nothing_until_it_fits() {
    let w = world().await;
    let node = claiming_node(&w, "n", ResourceLimits::default(), 8.0, &[], &[]).await;
    let big = w.submit(3.0, &[], 0, None).await;
    let s = scheduler(&w).await;
    round(&w, &s, Utc::now()).await;
    assert_eq!(w.task(big).await.node_id, Some(node));
    w.run(node, big).await;
    as_admin(
        &w,
        node,
        NodeCommand::SetLimits {
            max_resources: ResourceLimits {
                cpus: Some(2.0),
                memory_mb: None,
                gpus: None,
            },
            by: admin(),
            at: Utc::now(),
        },
    )
    .await;
    let small = w.submit(1.0, &[], 0, None).await;
    let o = round(&w, &s, Utc::now()).await;
    assert_eq!((o.assigned, o.lost, o.timed_out), (0, 0, 0));
    assert_eq!(w.task(big).await.state, TaskState::Running);
    assert_eq!(w.task(small).await.state, TaskState::Queued);
    // The running task ends: what the node holds fits, and it takes work
    // within its new maximum.
    w.store
        .execute::<Task>(
            &big.to_string(),
            TaskCommand::ReportExited {
                node_id: node,
                attempt: 1,
                outcome: domain::task::Outcome::Succeeded,
                at: Utc::now(),
            },
            &Actor::Node(node.to_string()),
            Utc::now(),
        )
        .await
        .unwrap();
    let too_big_now = w.submit(3.0, &[], 0, None).await;
    round(&w, &s, Utc::now()).await;
    assert_eq!(w.task(small).await.node_id, Some(node));
    assert_eq!(w.task(too_big_now).await.state, TaskState::Queued);
}

#[tokio::test]
async fn an_attempt_its_node_never_accepts_is_given_up_and_retried() {
    let w = world().await;
    let s = scheduler(&w).await;
    let now = Utc::now();
    let node = w
        .node("stuck", 4.0, &[], now + chrono::Duration::hours(1))
        .await;
    let task = w.submit(1.0, &[], 1, None).await;
    round(&w, &s, now).await;
    assert_eq!(w.task(task).await.state, TaskState::Assigned);
    assert_eq!(
        round(&w, &s, now + chrono::Duration::seconds(60))
            .await
            .lost,
        0
    );
    let o = round(&w, &s, now + chrono::Duration::seconds(121)).await;
    assert_eq!(o.lost, 1);
    let t = w.task(task).await;
    assert!(t
        .reason
        .unwrap()
        .contains("did not accept the attempt within 120 s"));
    assert_eq!(t.attempts[0].node_id, node);
    assert_eq!(t.state, TaskState::Queued);
}

#[tokio::test]
async fn an_overdue_task_on_a_dead_node_times_out_rather_than_retrying() {
    let w = world().await;
    let s = scheduler(&w).await;
    let now = Utc::now();
    let node = w.node("n", 4.0, &[], now).await;
    let task = w.submit(1.0, &[], 3, Some(80)).await;
    round(&w, &s, now).await;
    w.run(node, task).await;
    // No heartbeat since `now`: the node is gone after 90 s, and the
    // attempt is past its 80 s limit by then (though not past the 30 s
    // the watchdog grants a live node to report its own timeout).
    let o = round(&w, &s, now + chrono::Duration::seconds(95)).await;
    assert_eq!((o.timed_out, o.lost), (1, 0));
    let t = w.task(task).await;
    assert_eq!(t.state, TaskState::TimedOut);
    assert_eq!(t.attempts.len(), 1);
}

#[tokio::test]
async fn a_task_whose_retries_are_spent_fails_when_its_node_is_lost() {
    let w = world().await;
    let s = scheduler(&w).await;
    let now = Utc::now();
    let node = w.node("only", 4.0, &[], now).await;
    let task = w.submit(1.0, &[], 0, None).await;
    round(&w, &s, now).await;
    w.run(node, task).await;
    round(&w, &s, now + chrono::Duration::seconds(120)).await;
    let t = w.task(task).await;
    assert_eq!(t.state, TaskState::Failed);
    assert!(t.reason.unwrap().contains("no retries left"));
}

#[tokio::test]
async fn the_watchdog_times_out_a_task_whose_node_never_reports() {
    let w = world().await;
    let s = scheduler(&w).await;
    let now = Utc::now();
    let node = w.node("n", 4.0, &[], now).await;
    let task = w.submit(1.0, &[], 0, Some(60)).await;
    round(&w, &s, now).await;
    w.run(node, task).await;
    // The node keeps beating but never reports the timeout itself.
    let later = Utc::now() + chrono::Duration::seconds(60 + 31);
    let (session,): (Uuid,) =
        sqlx::query_as("SELECT session FROM node_liveness WHERE node_id = $1")
            .bind(node)
            .fetch_one(w.store.pool())
            .await
            .unwrap();
    w.beat(node, session, later).await;
    let o = round(&w, &s, later).await;
    assert_eq!(o.timed_out, 1);
    assert_eq!(w.task(task).await.state, TaskState::TimedOut);
}

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_stops() {
    let w = world().await;
    w.node("n", 64.0, &[], Utc::now() + chrono::Duration::hours(1))
        .await;
    let fast = Config {
        poll: Duration::from_millis(50),
        ..Config::default()
    };
    let leader = std::sync::Arc::new(Scheduler::new(w.store.clone(), fast.clone()));
    let standby = std::sync::Arc::new(Scheduler::new(w.store.clone(), fast));
    let (stop_leader, rx) = tokio::sync::oneshot::channel::<()>();
    let l = leader.clone();
    let leader_task = tokio::spawn(async move {
        l.run(async {
            let _ = rx.await;
        })
        .await
    });
    // The first assignment, made while it runs alone, shows the leader leads
    // before the standby starts.
    let first = w.submit(1.0, &[], 0, None).await;
    wait_assigned(&w, first).await;
    let s = standby.clone();
    let standby_task = tokio::spawn(async move { s.run(std::future::pending()).await });
    // The leader stops and gives its lease up; the standby leads.
    let _ = stop_leader.send(());
    leader_task.await.unwrap();
    let second = w.submit(1.0, &[], 0, None).await;
    wait_assigned(&w, second).await;
    standby_task.abort();
}

async fn wait_assigned(w: &World, task: Uuid) {
    eventually(
        "the task to be assigned",
        Duration::from_secs(20),
        || async { (w.task(task).await.state == TaskState::Assigned).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_node_silent_since_before_the_scheduler_led_gets_a_whole_window() {
    let w = world().await;
    // The server was down: the node's last heartbeat is old when a
    // scheduler starts leading.
    let node = w
        .node("n", 4.0, &[], Utc::now() - chrono::Duration::seconds(200))
        .await;
    let task = w.submit(1.0, &[], 1, None).await;
    w.assign(task, node).await;
    w.run(node, task).await;
    let s = Scheduler::new(w.store.clone(), Config::default());
    let now = Utc::now();
    let o = round(&w, &s, now).await;
    assert_eq!((o.offline, o.lost), (0, 0));
    let o = round(&w, &s, now + chrono::Duration::seconds(60)).await;
    assert_eq!((o.offline, o.lost), (0, 0));
    assert_eq!(w.task(task).await.state, TaskState::Running);
    // Still silent a whole window after the scheduler began to hear: gone.
    let o = round(&w, &s, now + chrono::Duration::seconds(91)).await;
    assert_eq!((o.offline, o.lost), (1, 1));
}

#[tokio::test]
async fn silence_counts_only_while_an_ingress_is_heard() {
    let w = world().await;
    let s = scheduler(&w).await;
    let now = Utc::now();
    let node = w.node("n", 4.0, &[], now).await;
    let task = w.submit(1.0, &[], 1, None).await;
    round(&w, &s, now).await;
    w.run(node, task).await;
    // No ingress is alive: nothing can be heard, nothing is gone.
    sqlx::query("UPDATE ingress_liveness SET last_seen = now() - interval '1 hour'")
        .execute(w.store.pool())
        .await
        .unwrap();
    let o = s
        .run_once(now + chrono::Duration::seconds(120))
        .await
        .unwrap();
    assert_eq!((o.offline, o.lost), (0, 0));
    // The ingress comes back at +150 s: the node has until +240 s.
    w.ingress_restarted(now + chrono::Duration::seconds(150))
        .await;
    let o = round(&w, &s, now + chrono::Duration::seconds(200)).await;
    assert_eq!((o.offline, o.lost), (0, 0));
    assert_eq!(w.task(task).await.state, TaskState::Running);
    let o = round(&w, &s, now + chrono::Duration::seconds(241)).await;
    assert_eq!((o.offline, o.lost), (1, 1));
}

#[tokio::test]
async fn an_attempt_assigned_before_an_outage_is_not_given_up_for_it() {
    let w = world().await;
    let s = scheduler(&w).await;
    let now = Utc::now();
    w.node("n", 4.0, &[], now + chrono::Duration::hours(1))
        .await;
    let task = w.submit(1.0, &[], 1, None).await;
    round(&w, &s, now).await;
    assert_eq!(w.task(task).await.state, TaskState::Assigned);
    // Nothing was heard until +100 s: the node has until +220 s to accept.
    w.ingress_restarted(now + chrono::Duration::seconds(100))
        .await;
    let o = round(&w, &s, now + chrono::Duration::seconds(150)).await;
    assert_eq!(o.lost, 0);
    let o = round(&w, &s, now + chrono::Duration::seconds(221)).await;
    assert_eq!(o.lost, 1);
}

#[tokio::test]
async fn a_leader_whose_lease_was_taken_over_is_refused_by_the_store_and_stands_down() {
    let w = world().await;
    w.node("n", 64.0, &[], Utc::now() + chrono::Duration::hours(1))
        .await;
    // A long lease: the old leader renews nothing during the test, so it
    // still believes it leads when it next assigns.
    let long = Config {
        lease: Duration::from_secs(600),
        ..Config::default()
    };
    let old = Scheduler::new(w.store.clone(), long.clone());
    let old_term = round(&w, &old, Utc::now()).await.term.unwrap();
    // Its lease runs out while it is frozen; another scheduler takes over.
    sqlx::query("UPDATE scheduler_leader SET expires_at = clock_timestamp()")
        .execute(w.store.pool())
        .await
        .unwrap();
    let new = Scheduler::new(w.store.clone(), long);
    let new_term = round(&w, &new, Utc::now()).await.term.unwrap();
    assert_eq!(new_term, old_term + 1);

    let task = w.submit(1.0, &[], 0, None).await;
    projections::Projector::new(w.store.pool().clone())
        .catch_up()
        .await
        .unwrap();
    let o = old.run_once(Utc::now()).await.unwrap();
    assert_eq!((o.term, o.assigned), (Some(old_term), 0));
    assert_eq!(w.task(task).await.state, TaskState::Queued);
    // It stood down: the next round does nothing.
    let o = old.run_once(Utc::now()).await.unwrap();
    assert_eq!(o.term, None);
    let o = round(&w, &new, Utc::now()).await;
    assert_eq!(o.assigned, 1);
    let terms: Vec<Option<i64>> = sqlx::query_scalar(
        "SELECT (payload -> 'Assigned' ->> 'term')::bigint FROM events \
         WHERE event_type = 'TaskAssigned' AND aggregate_id = $1",
    )
    .bind(task.to_string())
    .fetch_all(w.store.pool())
    .await
    .unwrap();
    assert_eq!(terms, [Some(new_term as i64)]);
}

#[tokio::test]
async fn tasks_are_placed_from_the_log_while_the_read_models_stand_still() {
    let w = world().await;
    let node = w.node("n1", 64.0, &[], Utc::now()).await;
    // One queued before the scheduler leads, placed by its first (full)
    // round, which also brings the read models up to date.
    let before = w.submit(0.5, &[], 0, None).await;
    let config = Config {
        // After the first round only placement runs: no read model is
        // advanced by anyone from here on.
        poll: Duration::from_secs(3600),
        ..Config::default()
    };
    let s = std::sync::Arc::new(Scheduler::new(w.store.clone(), config));
    w.ingress_alive().await;
    projections::Projector::new(w.store.pool().clone())
        .catch_up()
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let s = s.clone();
        tokio::spawn(async move {
            s.run(async {
                let _ = stopped.await;
            })
            .await
        })
    };
    eventually(
        "the task queued before leadership assigned",
        Duration::from_secs(30),
        || async { (w.task(before).await.state == TaskState::Assigned).then_some(()) },
    )
    .await;

    // Submitted by another process (a store of its own), after leadership
    // began: only the log knows them.
    let other = World {
        store: Store::new(w.store.pool().clone()),
        project: w.project,
    };
    let mut later = Vec::new();
    for _ in 0..10 {
        later.push(other.submit(0.5, &[], 0, None).await);
    }
    for id in &later {
        eventually(
            "a task submitted after leadership assigned",
            Duration::from_secs(30),
            || async {
                let t = w.task(*id).await;
                (t.state == TaskState::Assigned && t.node_id == Some(node)).then_some(())
            },
        )
        .await;
    }
    let in_read_model: i64 =
        sqlx::query_scalar("SELECT count(*) FROM task_view WHERE id = ANY($1)")
            .bind(&later)
            .fetch_one(w.store.pool())
            .await
            .unwrap();
    assert_eq!(
        in_read_model, 0,
        "the read model was not needed to place them"
    );

    stop.send(()).unwrap();
    running.await.unwrap();
}

/// The recorded explanation of why `task` waits: its reasons, since when
/// it holds and when it was last written; `None` when there is none.
async fn why_waiting(
    w: &World,
    task: Uuid,
) -> Option<(serde_json::Value, DateTime<Utc>, DateTime<Utc>)> {
    sqlx::query_as(
        "SELECT reason->'reasons', since, updated_at FROM task_queue_reasons WHERE task_id = $1",
    )
    .bind(task)
    .fetch_optional(w.store.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn why_a_task_waits_is_written_only_when_it_changes_and_goes_once_it_is_placed() {
    let w = world().await;
    let s = Scheduler::new(
        w.store.clone(),
        Config {
            explain_every: Duration::ZERO,
            ..Config::default()
        },
    );
    w.node("plain", 4.0, &[], Utc::now()).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(w.submit_gpus(1.0, &[("gpu", "a100")], 0, None, 2).await);
    }
    round(&w, &s, Utc::now()).await;
    let mut first = Vec::new();
    for &t in &tasks {
        first.push(why_waiting(&w, t).await.unwrap());
    }
    assert_eq!(
        first[0].0,
        serde_json::json!([{"kind": "label", "label": "gpu=a100", "nodes_filtered": 1}])
    );
    // Rounds that find the same reasons write nothing.
    round(&w, &s, Utc::now()).await;
    round(&w, &s, Utc::now()).await;
    for (i, &t) in tasks.iter().enumerate() {
        assert_eq!(why_waiting(&w, t).await.unwrap(), first[i]);
    }
    // A node with the label but one GPU: new reasons, holding since the
    // round that found them.
    w.node_with_gpus("a100-1", 4.0, &[("gpu", "a100")], Utc::now(), &[0])
        .await;
    let at = Utc::now();
    round(&w, &s, at).await;
    let (reasons, since, _) = why_waiting(&w, tasks[0]).await.unwrap();
    assert_eq!(
        reasons[1],
        serde_json::json!({"kind": "gpus", "nodes_filtered": 1, "need": 2, "most_free": 1,
                           "largest": 1})
    );
    assert_eq!(since.timestamp_micros(), at.timestamp_micros());
    // Placed tasks have no explanation left; the others learn that the
    // room went to the tasks placed before them.
    w.node_with_gpus("a100-2", 4.0, &[("gpu", "a100")], Utc::now(), &[0, 1])
        .await;
    assert_eq!(round(&w, &s, Utc::now()).await.assigned, 1);
    let mut placed = 0;
    for &t in &tasks {
        if w.task(t).await.state == TaskState::Assigned {
            placed += 1;
            assert_eq!(why_waiting(&w, t).await, None);
        } else {
            let (reasons, _, _) = why_waiting(&w, t).await.unwrap();
            assert_eq!(
                reasons[0],
                serde_json::json!({"kind": "taken"}),
                "{reasons}"
            );
        }
    }
    assert_eq!(placed, 1);
}
