//! The web view under load: seeds a realistic history through the real
//! event store (so the outbox, the projector and every read model are the
//! real ones), serves it with the API, and measures in headless Chromium
//! how fast the timeline page paints and shows its first page of events.
//! With `--screenshot` it also photographs the timeline for the README.
//!
//! ```text
//! cargo run --release -p bench --bin unidesk-web-bench -- --events 100000
//! cargo run --release -p bench --bin unidesk-web-bench -- --events 600 --span-hours 3 \
//!     --runs 0 --screenshot docs/timeline.png --dashboard-screenshot docs/dashboard.png
//! ```
//!
//! Without `--database-url` it starts a private PostgreSQL cluster. Needs
//! Debian's `chromium` and `chromium-driver`.

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark stops at the first surprise"
)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use chrono::{DateTime, Utc};
use clap::Parser;
use domain::node::{Gpu, Node, NodeCommand, NodeResources};
use domain::project::{Project, ProjectCommand, Role as ProjectRole};
use domain::spec::{ResourcesDraft, TaskSpecDraft, UrlPolicy};
use domain::task::{Outcome, Task, TaskCommand};
use domain::user::{User, UserCommand};
use domain::Actor;
use fantoccini::Locator;
use serde_json::{json, Value};
use store::Store;
use unidesk::cli::Role;
use unidesk::roles::{self, ServerArgs};
use uuid::Uuid;

use testkit::browser::Browser;

/// Measure the web view with a realistic history.
#[derive(Debug, Parser)]
struct Args {
    /// Database to seed and serve; a private cluster is started when absent.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Events to seed (at least; whole task lifecycles are written).
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// How far back the seeded history reaches, in hours.
    #[arg(long, default_value_t = 7 * 24)]
    span_hours: i64,
    /// Concurrent writers while seeding.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Page loads to measure after one warm-up load.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Where to save a PNG of the timeline with one event opened.
    #[arg(long)]
    screenshot: Option<std::path::PathBuf>,
    /// Where to save a PNG of the dashboard.
    #[arg(long)]
    dashboard_screenshot: Option<std::path::PathBuf>,
    /// Where to save a PNG of the page of a running task.
    #[arg(long)]
    task_screenshot: Option<std::path::PathBuf>,
    /// Measure the history already in the database instead of seeding one
    /// (a database a previous run seeded).
    #[arg(long)]
    reuse: bool,
}

/// Hands out event times: the seeded history is written in the order it
/// happened, `step` apart, ending a little before now.
struct Clock {
    start: DateTime<Utc>,
    step: chrono::Duration,
    tick: AtomicU64,
}

impl Clock {
    fn next(&self) -> DateTime<Utc> {
        let n = self.tick.fetch_add(1, Ordering::Relaxed);
        self.start + self.step * n as i32
    }
}

/// A deterministic stream of numbers, so every run seeds the same world.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[derive(Clone)]
struct NodeInfo {
    id: Uuid,
    name: String,
    gpus: u32,
    cpus: f64,
    memory_mb: u64,
}

#[derive(Clone)]
struct ProjectInfo {
    id: Uuid,
    user: &'static str,
    gpus: u32,
    commands: &'static [&'static str],
}

struct World {
    store: Store,
    clock: Clock,
    events: AtomicU64,
    nodes: Vec<NodeInfo>,
    projects: Vec<ProjectInfo>,
    /// Nodes that take no new work.
    drained: std::sync::Mutex<Vec<Uuid>>,
    admin_token: String,
}

impl World {
    async fn run<A>(&self, id: &str, command: A::Command, actor: &Actor) -> anyhow::Result<()>
    where
        A: store::Stored,
        A::Command: Clone + Send,
        A::Error: std::fmt::Debug,
    {
        let at = self.clock.next();
        let executed = self
            .store
            .execute::<A>(id, command, actor, at)
            .await
            .map_err(|e| anyhow!("{id}: {e:?}"))?;
        self.events
            .fetch_add(executed.events.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn at(&self) -> DateTime<Utc> {
        self.clock.start + self.clock.step * self.clock.tick.load(Ordering::Relaxed) as i32
    }
}

const SCHEDULER: &str = "scheduler";

fn hex(dice: &mut Dice, len: usize) -> String {
    (0..len)
        .map(|_| char::from_digit(dice.roll(16) as u32, 16).unwrap_or('0'))
        .collect()
}

/// Users, projects and nodes, as an admin would have set them up.
async fn setup(store: &Store, clock: Clock) -> anyhow::Result<World> {
    let admin = Actor::User("admin".into());
    let mut world = World {
        store: store.clone(),
        clock,
        events: AtomicU64::new(0),
        nodes: Vec::new(),
        projects: Vec::new(),
        drained: std::sync::Mutex::new(Vec::new()),
        admin_token: String::new(),
    };
    let create = |name: &str, admin_flag: bool, at| UserCommand::Create {
        name: name.into(),
        admin: admin_flag,
        by: Actor::System("bootstrap".into()),
        at,
    };
    let at = world.clock.next();
    world
        .run::<User>(
            "admin",
            create("admin", true, at),
            &Actor::System("bootstrap".into()),
        )
        .await?;
    let token_id = Uuid::now_v7();
    let issued = store::tokens::issue_user("admin", token_id);
    world.admin_token = issued.token.clone();
    let at = world.at();
    world
        .run::<User>(
            "admin",
            UserCommand::IssueToken {
                token_id,
                fingerprint: issued.fingerprint,
                label: "web bench".into(),
                by: admin.clone(),
                at,
                expires_at: None,
                max_live: usize::MAX,
            },
            &admin,
        )
        .await?;
    for user in ["alice", "bob", "carol"] {
        let at = world.at();
        let mut command = create(user, false, at);
        if let UserCommand::Create { by, .. } = &mut command {
            *by = admin.clone();
        }
        world.run::<User>(user, command, &admin).await?;
    }
    let projects: [(&str, &str, &str, u32, &[&str]); 3] = [
        (
            "vision",
            "object detection and segmentation",
            "alice",
            2,
            &[
                "python train.py --config configs/detr_r50.yaml --epochs 50",
                "python eval.py --split val",
            ],
        ),
        (
            "audio",
            "speech recognition",
            "bob",
            0,
            &[
                "python prepare.py --corpus librispeech",
                "python train.py --model conformer-s",
            ],
        ),
        (
            "llm",
            "language model fine-tuning",
            "carol",
            4,
            &[
                "torchrun --nproc-per-node 4 finetune.py --lr 2e-5",
                "python score.py --bench mmlu",
            ],
        ),
    ];
    for (name, description, user, gpus, commands) in projects {
        let id = Uuid::now_v7();
        store::names::claim(store.pool(), "project", name, &id.to_string()).await?;
        let at = world.at();
        world
            .run::<Project>(
                &id.to_string(),
                ProjectCommand::Create {
                    project_id: id,
                    name: name.into(),
                    description: description.into(),
                    owner: "admin".into(),
                    at,
                },
                &admin,
            )
            .await?;
        let at = world.at();
        world
            .run::<Project>(
                &id.to_string(),
                ProjectCommand::AddMember {
                    user: user.into(),
                    role: ProjectRole::Member,
                    by: admin.clone(),
                    at,
                },
                &admin,
            )
            .await?;
        world.projects.push(ProjectInfo {
            id,
            user,
            gpus,
            commands,
        });
    }
    let machines: [(&str, u32, f64, u64, &str, &str); 8] = [
        (
            "gpu-1",
            8,
            64.0,
            512 * 1024,
            "NVIDIA A100-SXM4-80GB",
            "a100",
        ),
        (
            "gpu-2",
            8,
            64.0,
            512 * 1024,
            "NVIDIA A100-SXM4-80GB",
            "a100",
        ),
        ("gpu-3", 4, 32.0, 256 * 1024, "NVIDIA L40S", "l40s"),
        ("gpu-4", 4, 32.0, 256 * 1024, "NVIDIA L40S", "l40s"),
        (
            "gpu-5",
            2,
            24.0,
            128 * 1024,
            "NVIDIA RTX 6000 Ada",
            "rtx6000",
        ),
        (
            "ws-lab-7",
            1,
            16.0,
            64 * 1024,
            "NVIDIA GeForce RTX 4090",
            "rtx4090",
        ),
        ("cpu-1", 0, 96.0, 384 * 1024, "", ""),
        ("cpu-2", 0, 96.0, 384 * 1024, "", ""),
    ];
    for (name, gpus, cpus, memory_mb, model, kind) in machines {
        let id = Uuid::now_v7();
        let key = id.to_string();
        store::names::claim(store.pool(), "node", name, &key).await?;
        let mut labels = BTreeMap::new();
        labels.insert(
            "zone".to_string(),
            if name.starts_with("ws") {
                "office"
            } else {
                "dc-1"
            }
            .to_string(),
        );
        if gpus > 0 {
            labels.insert("gpu".to_string(), kind.to_string());
        }
        let at = world.at();
        world
            .run::<Node>(
                &key,
                NodeCommand::Provision {
                    node_id: id,
                    name: name.into(),
                    labels,
                    token_fingerprint: store::tokens::issue_node(id).fingerprint,
                    max_resources: Default::default(),
                    by: admin.clone(),
                    at,
                },
                &admin,
            )
            .await?;
        let resources = NodeResources {
            cpus,
            memory_mb,
            gpus: (0..gpus)
                .map(|index| Gpu {
                    index,
                    name: model.into(),
                    memory_mb: if model.contains("80GB") {
                        81_920
                    } else {
                        49_152
                    },
                })
                .collect(),
        };
        let at = world.at();
        world
            .run::<Node>(
                &key,
                NodeCommand::Connect {
                    session: Uuid::now_v7(),
                    agent_version: "0.1.0".into(),
                    resources,
                    labels: BTreeMap::new(),
                    at,
                },
                &Actor::Node(key.clone()),
            )
            .await?;
        world.nodes.push(NodeInfo {
            id,
            name: name.into(),
            gpus,
            cpus,
            memory_mb,
        });
    }
    Ok(world)
}

/// How a seeded task ends.
#[derive(Clone, Copy, PartialEq)]
enum Ending {
    Succeeds,
    Fails,
    LostThenSucceeds,
    Cancelled,
    TimesOut,
    /// Still running when the history ends.
    Running,
    /// Never placed.
    Queued,
}

fn ending(dice: &mut Dice) -> Ending {
    match dice.roll(40) {
        0..=29 => Ending::Succeeds,
        30..=33 => Ending::Fails,
        34..=35 => Ending::LostThenSucceeds,
        36..=37 => Ending::Cancelled,
        _ => Ending::TimesOut,
    }
}

/// The scheduler's reason, as it words it.
fn reason(node: &NodeInfo, gpus: u32, dice: &mut Dice) -> String {
    let free_gpus = node.gpus.saturating_sub(gpus + dice.roll(2) as u32);
    let mut r = format!(
        "{:.1} CPU, {} MiB, {} GPU free of {:.1} CPU, {} MiB, {} GPU",
        node.cpus - 8.0 * dice.roll(3) as f64,
        node.memory_mb - 32_768 * dice.roll(3),
        free_gpus + gpus,
        node.cpus,
        node.memory_mb,
        node.gpus
    );
    if dice.roll(3) > 0 {
        r.push_str(", image cached");
    }
    if dice.roll(2) > 0 {
        r.push_str(", code cached");
    }
    r.push_str(&format!(", best of {} fitting nodes", 2 + dice.roll(4)));
    r
}

/// One task's life, from submission to `end`. Returns the task and the
/// node of its last attempt.
async fn life(world: &World, n: u64, end: Ending) -> anyhow::Result<(String, Option<Uuid>)> {
    let mut dice = Dice(n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let project = &world.projects[(n % world.projects.len() as u64) as usize];
    let gpus = if project.gpus == 0 {
        0
    } else {
        1 + dice.roll(project.gpus as u64) as u32
    };
    let drained = world.drained.lock().unwrap().clone();
    let fits: Vec<&NodeInfo> = world
        .nodes
        .iter()
        .filter(|x| x.gpus >= gpus && !drained.contains(&x.id))
        .collect();
    let node = fits[dice.roll(fits.len() as u64) as usize];
    let task_id = Uuid::now_v7();
    let id = task_id.to_string();
    let spec = TaskSpecDraft {
        project_id: Some(project.id),
        code_repo_url: Some(format!("https://git.example.org/lab/{}.git", project.user)),
        code_commit_id: Some(hex(&mut dice, 40)),
        env_repo_url: Some("https://git.example.org/lab/envs.git".into()),
        env_commit_id: Some(hex(&mut dice, 40)),
        dockerfile_path: Some(
            if gpus > 0 {
                "cuda12/Dockerfile"
            } else {
                "cpu/Dockerfile"
            }
            .into(),
        ),
        command: Some(
            project.commands[dice.roll(project.commands.len() as u64) as usize]
                .split(' ')
                .map(str::to_string)
                .collect(),
        ),
        resources: Some(ResourcesDraft {
            cpus: Some(4.0 * (1 + dice.roll(4)) as f64),
            memory_mb: Some(16_384 * (1 + dice.roll(4) as i64)),
            gpus: Some(gpus as i64),
        }),
        timeout_s: Some(86_400),
        ..Default::default()
    }
    .validate(UrlPolicy::default())
    .map_err(|e| anyhow!("{e:?}"))?;
    let user = Actor::User(project.user.into());
    let scheduler = Actor::System(SCHEDULER.into());
    let at = world.at();
    world
        .run::<Task>(
            &id,
            TaskCommand::Submit {
                task_id,
                spec,
                by: user.clone(),
                at,
            },
            &user,
        )
        .await?;
    if end == Ending::Queued {
        return Ok((id, None));
    }
    let mut attempt = 0;
    let mut node = node.clone();
    loop {
        attempt += 1;
        let at = world.at();
        let assign = TaskCommand::Assign {
            node_id: node.id,
            gpus: (0..gpus).collect(),
            reason: reason(&node, gpus, &mut dice),
            at,
        };
        world.run::<Task>(&id, assign, &scheduler).await?;
        let agent = Actor::Node(node.id.to_string());
        let (task, by) = (&id, &agent);
        let report =
            move |command: TaskCommand| async move { world.run::<Task>(task, command, by).await };
        report(TaskCommand::Accept {
            node_id: node.id,
            attempt,
            at: world.at(),
        })
        .await?;
        let cached = dice.roll(3) > 0;
        report(TaskCommand::ReportPreparing {
            node_id: node.id,
            attempt,
            stage: "code ready".into(),
            detail: Some(if cached {
                format!("commit {}: from cache", hex(&mut dice, 12))
            } else {
                format!(
                    "commit {}: fetched {} objects, {}.{} KiB",
                    hex(&mut dice, 12),
                    3 + dice.roll(40),
                    1 + dice.roll(90),
                    dice.roll(10)
                )
            }),
            at: world.at(),
        })
        .await?;
        report(TaskCommand::ReportPreparing {
            node_id: node.id,
            attempt,
            stage: "image ready".into(),
            detail: Some(if dice.roll(4) > 0 {
                "cached".to_string()
            } else {
                format!("built in {}.{} s", 20 + dice.roll(60), dice.roll(10))
            }),
            at: world.at(),
        })
        .await?;
        report(TaskCommand::ReportStarted {
            node_id: node.id,
            attempt,
            container: hex(&mut dice, 64),
            at: world.at(),
        })
        .await?;
        if end == Ending::LostThenSucceeds && attempt == 1 {
            let lost = TaskCommand::MarkLost {
                node_id: node.id,
                attempt,
                reason: format!("node {} sent no heartbeat for 90 s", node.name),
                at: world.at(),
            };
            world.run::<Task>(&id, lost, &scheduler).await?;
            let others: Vec<&NodeInfo> = world
                .nodes
                .iter()
                .filter(|x| x.gpus >= gpus && x.id != node.id && !drained.contains(&x.id))
                .collect();
            node = others[dice.roll(others.len() as u64) as usize].clone();
            continue;
        }
        let outcome = match end {
            Ending::Running | Ending::Queued => return Ok((id, Some(node.id))),
            Ending::Succeeds | Ending::LostThenSucceeds => {
                if dice.roll(3) == 0 {
                    report(TaskCommand::RecordArtifact {
                        node_id: node.id,
                        attempt,
                        name: "checkpoints/model.safetensors".into(),
                        key: format!("outputs/{id}/{attempt}/model.safetensors"),
                        size: 50_000_000 + dice.roll(4_000_000_000),
                        sha256: hex(&mut dice, 64),
                        at: world.at(),
                    })
                    .await?;
                }
                Outcome::Succeeded
            }
            Ending::Fails => Outcome::Failed {
                exit_code: Some(1),
                reason: [
                    "exit status 1: torch.OutOfMemoryError: CUDA out of memory",
                    "exit status 1: FileNotFoundError: data/train.jsonl",
                    "exit status 2: error: unrecognized arguments: --epochs",
                ][dice.roll(3) as usize]
                    .into(),
            },
            Ending::Cancelled => {
                let by = user.clone();
                let cancel = TaskCommand::RequestCancel {
                    by: by.clone(),
                    at: world.at(),
                };
                world.run::<Task>(&id, cancel, &by).await?;
                Outcome::Cancelled
            }
            Ending::TimesOut => Outcome::TimedOut,
        };
        report(TaskCommand::ReportExited {
            node_id: node.id,
            attempt,
            outcome,
            at: world.at(),
        })
        .await?;
        return Ok((id, Some(node.id)));
    }
}

/// The last hour of the history: work in flight, a drained node, a node
/// that went silent and whose task moved elsewhere.
async fn finale(world: &World) -> anyhow::Result<()> {
    let admin = Actor::User("admin".into());
    for n in 0..5 {
        life(world, 1_000_000 + n, Ending::Running).await?;
    }
    for n in 0..3 {
        life(world, 2_000_000 + n, Ending::Queued).await?;
    }
    life(world, 3_000_001, Ending::Fails).await?;
    let cpu2 = world.nodes.iter().find(|n| n.name == "cpu-2").unwrap().id;
    world.drained.lock().unwrap().push(cpu2);
    let cpu2 = cpu2.to_string();
    let at = world.at();
    world
        .run::<Node>(
            &cpu2,
            NodeCommand::Drain {
                by: admin.clone(),
                at,
            },
            &admin,
        )
        .await?;
    // gpu-4 falls silent with a task on it.
    let gpu4 = world
        .nodes
        .iter()
        .find(|n| n.name == "gpu-4")
        .unwrap()
        .clone();
    let mut n = 4_000_000;
    let task = loop {
        let (task, on) = life(world, n, Ending::Running).await?;
        if on == Some(gpu4.id) {
            break task;
        }
        n += 1;
    };
    let gpu4_key = gpu4.id.to_string();
    let at = world.at();
    world
        .run::<Node>(
            &gpu4_key,
            NodeCommand::MarkOffline {
                last_seen: at - chrono::Duration::seconds(90),
                at,
            },
            &Actor::System(SCHEDULER.into()),
        )
        .await?;
    let lost = TaskCommand::MarkLost {
        node_id: gpu4.id,
        attempt: 1,
        reason: "node gpu-4 sent no heartbeat for 90 s".into(),
        at: world.at(),
    };
    world
        .run::<Task>(&task, lost, &Actor::System(SCHEDULER.into()))
        .await?;
    let gpu2 = world
        .nodes
        .iter()
        .find(|n| n.name == "gpu-2")
        .unwrap()
        .clone();
    let loaded = world
        .store
        .load::<Task>(&task)
        .await
        .map_err(|e| anyhow!("{e:?}"))?;
    let gpus = loaded.map_or(0, |l| l.state.spec.map_or(0, |s| s.resources.gpus));
    let mut dice = Dice(7);
    let assign = TaskCommand::Assign {
        node_id: gpu2.id,
        gpus: (0..gpus).collect(),
        reason: reason(&gpu2, gpus, &mut dice),
        at: world.at(),
    };
    world
        .run::<Task>(&task, assign, &Actor::System(SCHEDULER.into()))
        .await?;
    Ok(())
}

async fn seed(world: Arc<World>, target: u64, writers: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..writers {
        let (world, next) = (world.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            while world.events.load(Ordering::Relaxed) < target {
                let n = next.fetch_add(1, Ordering::Relaxed) as u64;
                let end = ending(&mut Dice(
                    (n.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0xabcd) | 1,
                ));
                life(&world, n, end).await?;
            }
            anyhow::Ok(())
        }));
    }
    let started = Instant::now();
    let mut last = 0;
    while !handles.iter().all(|h| h.is_finished()) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = world.events.load(Ordering::Relaxed);
        if now / 10_000 != last / 10_000 {
            eprintln!(
                "  {now} events after {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        last = now;
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// The API's own time for one page of the timeline under each filter.
async fn api_figures(
    base: &str,
    token: &str,
    pool: &sqlx::PgPool,
    node: Uuid,
    project: Uuid,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        let url = format!("{base}/api/v1{path}");
        let token = token.to_string();
        async move {
            let started = Instant::now();
            let r = http.get(url).bearer_auth(token).send().await?;
            let status = r.status();
            let body: Value = r.json().await?;
            anyhow::ensure!(status.is_success(), "{status}: {body}");
            anyhow::Ok((started.elapsed().as_secs_f64() * 1000.0, body))
        }
    };
    let (_, first) = get("/timeline?limit=50".into()).await?;
    let task = first["items"]
        .as_array()
        .and_then(|items| items.iter().find(|e| e["aggregate_type"] == "task"))
        .map(|e| e["aggregate_id"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    let middle: i64 = sqlx::query_scalar("SELECT position FROM timeline ORDER BY position OFFSET (SELECT count(*) / 2 FROM timeline) LIMIT 1")
        .fetch_one(pool)
        .await?;
    let day_ago = (Utc::now() - chrono::Duration::hours(30))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let day_before = (Utc::now() - chrono::Duration::hours(6))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let cases = [
        ("everything, newest page", "/timeline?limit=50".to_string()),
        (
            "everything, a page in the middle",
            format!("/timeline?limit=50&before={middle}"),
        ),
        ("one task", format!("/timeline?limit=50&task={task}")),
        ("one node", format!("/timeline?limit=50&node={node}")),
        (
            "one project",
            format!("/timeline?limit=50&project={project}"),
        ),
        (
            "one event type (TaskLost)",
            "/timeline?limit=50&event_type=TaskLost".to_string(),
        ),
        (
            "a day, 30 h to 6 h ago",
            format!("/timeline?limit=50&since={day_ago}&until={day_before}"),
        ),
        ("an event with its states", format!("/events/{middle}")),
    ];
    println!("\nAPI, one page of 50 (median of 15 calls, ms, HTTP round trip on 127.0.0.1):");
    for (what, path) in cases {
        let mut times = Vec::new();
        for _ in 0..15 {
            times.push(get(path.clone()).await?.0);
        }
        println!("  {what:<36} {:>7.1}", median(times));
    }
    Ok(())
}

/// Loads the timeline page `runs` times (after one warm-up) and prints
/// first contentful paint and the time until the first page of events is
/// on the screen.
async fn paint_figures(b: &Browser, base: &str, token: &str, runs: usize) -> anyhow::Result<()> {
    b.client.goto(base).await?;
    b.client
        .execute(
            "sessionStorage.setItem('unidesk.token', arguments[0]); return true;",
            vec![json!(token)],
        )
        .await?;
    let (mut fcp, mut shown) = (Vec::new(), Vec::new());
    for run in 0..=runs {
        b.client
            .goto(&format!("{base}/?run={run}#/timeline"))
            .await?;
        b.wait_for(".events li", Duration::from_secs(30))
            .await
            .map_err(|e| anyhow!(e))?;
        let m = b
            .client
            .execute(
                "const f = performance.getEntriesByName('first-contentful-paint')[0];\
                 const r = performance.getEntriesByName('timeline-rendered')[0];\
                 return {fcp: f ? f.startTime : null, shown: r ? r.startTime : null,\
                         items: document.querySelectorAll('.events li').length};",
                vec![],
            )
            .await?;
        let (f, s) = (m["fcp"].as_f64(), m["shown"].as_f64());
        let items = m["items"].as_u64().unwrap_or(0);
        if run == 0 {
            println!(
                "  warm-up load: first contentful paint {:.0} ms, first {items} events shown at {:.0} ms",
                f.unwrap_or(f64::NAN),
                s.unwrap_or(f64::NAN)
            );
            continue;
        }
        println!(
            "  load {run}: first contentful paint {:.0} ms, events shown at {:.0} ms",
            f.unwrap_or(f64::NAN),
            s.unwrap_or(f64::NAN)
        );
        fcp.push(f.context("no first-contentful-paint entry")?);
        shown.push(s.context("no timeline-rendered mark")?);
    }
    // The reference, in the same browser and run: the sign-in page, which
    // makes no API call at all.
    b.client
        .execute("sessionStorage.clear(); return true;", vec![])
        .await?;
    let mut reference = Vec::new();
    for run in 0..runs {
        b.client.goto(&format!("{base}/?reference={run}")).await?;
        b.wait_for("#sign-in:not([hidden])", Duration::from_secs(30))
            .await
            .map_err(|e| anyhow!(e))?;
        // The paint entry is recorded a frame after the paint.
        let mut fcp = None;
        for _ in 0..100 {
            fcp = b
                .client
                .execute(
                    "const f = performance.getEntriesByName('first-contentful-paint')[0];\
                     return f ? f.startTime : null;",
                    vec![],
                )
                .await?
                .as_f64();
            if fcp.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        reference.push(fcp.context("no first-contentful-paint entry")?);
    }
    if runs > 0 {
        let (min_f, max_f) = (
            fcp.iter().cloned().fold(f64::MAX, f64::min),
            fcp.iter().cloned().fold(0.0, f64::max),
        );
        let (min_s, max_s) = (
            shown.iter().cloned().fold(f64::MAX, f64::min),
            shown.iter().cloned().fold(0.0, f64::max),
        );
        println!("\nTimeline page in headless Chromium, {runs} loads (ms from navigation start):");
        println!(
            "  first contentful paint        median {:>6.0}   min {:>6.0}   max {:>6.0}",
            median(fcp),
            min_f,
            max_f
        );
        println!(
            "  first page of events shown    median {:>6.0}   min {:>6.0}   max {:>6.0}",
            median(shown),
            min_s,
            max_s
        );
        let (min_r, max_r) = (
            reference.iter().cloned().fold(f64::MAX, f64::min),
            reference.iter().cloned().fold(0.0, f64::max),
        );
        println!(
            "  reference: sign-in page FCP   median {:>6.0}   min {:>6.0}   max {:>6.0}",
            median(reference),
            min_r,
            max_r
        );
    }
    Ok(())
}

/// The timeline with the newest assignment opened, and the dashboard.
async fn screenshots(b: &Browser, base: &str, token: &str, args: &Args) -> anyhow::Result<()> {
    b.client.goto(base).await?;
    b.client
        .execute(
            "sessionStorage.setItem('unidesk.token', arguments[0]); return true;",
            vec![json!(token)],
        )
        .await?;
    if let Some(path) = &args.dashboard_screenshot {
        b.client.goto(&format!("{base}/?shot=1#/")).await?;
        b.wait_for(".live[data-live=\"on\"]", Duration::from_secs(30))
            .await
            .map_err(|e| anyhow!(e))?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        std::fs::write(path, b.client.screenshot().await?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("dashboard screenshot in {}", path.display());
    }
    if let Some(path) = &args.task_screenshot {
        b.client
            .goto(&format!("{base}/?shot=3#/?state=running"))
            .await?;
        b.wait_for("tr[data-task-id] a", Duration::from_secs(30))
            .await
            .map_err(|e| anyhow!(e))?
            .click()
            .await?;
        b.wait_for(".live[data-live=\"on\"]", Duration::from_secs(30))
            .await
            .map_err(|e| anyhow!(e))?;
        tokio::time::sleep(Duration::from_millis(800)).await;
        std::fs::write(path, b.client.screenshot().await?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("task screenshot in {}", path.display());
    }
    if let Some(path) = &args.screenshot {
        b.client.goto(&format!("{base}/?shot=2#/timeline")).await?;
        b.wait_for(".live[data-live=\"on\"]", Duration::from_secs(30))
            .await
            .map_err(|e| anyhow!(e))?;
        b.client
            .find(Locator::Css(
                ".events li[data-type=\"TaskAssigned\"] button.ev",
            ))
            .await?
            .click()
            .await?;
        b.wait_for(".diff", Duration::from_secs(30))
            .await
            .map_err(|e| anyhow!(e))?;
        // Let the highlight of fresh rows and the focus settle.
        tokio::time::sleep(Duration::from_millis(800)).await;
        std::fs::write(path, b.client.screenshot().await?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("timeline screenshot in {}", path.display());
    }
    Ok(())
}

/// Seeds a history through the event store and brings every read model up
/// to date, saying how long each took.
async fn seeded(store: &Store, args: &Args) -> anyhow::Result<Arc<World>> {
    let pool = store.pool().clone();
    // Spread the history evenly over the span, ending about now.
    let span = chrono::Duration::hours(args.span_hours);
    let step = span / i32::try_from(args.events.max(1)).unwrap_or(i32::MAX);
    let clock = Clock {
        start: Utc::now() - span - chrono::Duration::minutes(1),
        step,
        tick: AtomicU64::new(0),
    };
    let started = Instant::now();
    let world = Arc::new(setup(store, clock).await?);
    let target = args.events.saturating_sub(120);
    seed(world.clone(), target, args.writers).await?;
    finale(&world).await?;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;
    let seeding = started.elapsed().as_secs_f64();
    println!(
        "seeded {events} events through the event store in {seeding:.1} s ({:.0} events/s, {} writers)",
        events as f64 / seeding,
        args.writers
    );

    let started = Instant::now();
    let applied = projections::Projector::new(pool.clone()).catch_up().await?;
    let projecting = started.elapsed().as_secs_f64();
    println!(
        "projected {applied} event applications (every read model) in {projecting:.1} s ({:.0} events/s)",
        events as f64 / projecting
    );

    Ok(world)
}

/// A token for the admin of a history seeded before, and a node and a
/// project of it.
async fn reused(store: &Store) -> anyhow::Result<(String, Uuid, Uuid)> {
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(store.pool())
        .await?;
    anyhow::ensure!(events > 0, "--reuse: the database holds no events");
    println!("measuring the {events} events already in the database");
    projections::Projector::new(store.pool().clone())
        .catch_up()
        .await?;
    let token_id = Uuid::now_v7();
    let issued = store::tokens::issue_user("admin", token_id);
    let admin = Actor::User("admin".into());
    let now = Utc::now();
    let issue = UserCommand::IssueToken {
        token_id,
        fingerprint: issued.fingerprint,
        label: "web bench".into(),
        by: admin.clone(),
        at: now,
        expires_at: None,
        max_live: usize::MAX,
    };
    store
        .execute::<User>("admin", issue, &admin, now)
        .await
        .map_err(|e| anyhow!("{e:?}"))?;
    let nodes: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM node_view ORDER BY name")
        .fetch_all(store.pool())
        .await?;
    let projects: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM project_view ORDER BY name")
        .fetch_all(store.pool())
        .await?;
    let pick = |ids: &[Uuid], i: usize| ids.get(i).or(ids.first()).copied();
    Ok((
        issued.token,
        pick(&nodes, 2).context("no nodes")?,
        pick(&projects, 1).context("no projects")?,
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let database = bench::Database::given_or_private(args.database_url.as_deref()).await?;
    let url = database.url.clone();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.writers as u32 + 8)
        .connect(&url)
        .await
        .context("connecting")?;
    store::migrate(&pool).await?;
    let store = Store::new(pool.clone());

    let (token, node, project) = if args.reuse {
        reused(&store).await?
    } else {
        let world = seeded(&store, &args).await?;
        (
            world.admin_token.clone(),
            world.nodes[2].id,
            world.projects[1].id,
        )
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let services = roles::start(
        store.clone(),
        listener,
        &[Role::Api, Role::Projector],
        &ServerArgs::defaults(),
    )?;
    api_figures(&base, &token, &pool, node, project).await?;
    let b = Browser::start().await.map_err(|e| anyhow!(e))?;
    if args.runs > 0 {
        paint_figures(&b, &base, &token, args.runs).await?;
    }
    screenshots(&b, &base, &token, &args).await?;
    b.close().await;
    services.stop().await;
    Ok(())
}
