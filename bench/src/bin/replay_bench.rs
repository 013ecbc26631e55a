//! `unidesk-replay-bench`: how fast `unidesk projections rebuild` replays
//! the log, next to a plain `SELECT` scan of the same rows in the same run.
//!
//! ```text
//! unidesk-replay-bench [--events 1000000] [--database-url URL] [--rebuilds 2]
//! ```
//!
//! Without a URL it starts a private PostgreSQL cluster of its own (fsync
//! off, like the test clusters). It then:
//!
//! 1. seeds the log with `--events` events by `COPY`: users, projects with
//!    members, nodes that connect and drop, and tasks whose lifecycles are
//!    decided by the real domain code (succeeded, failed, lost and retried,
//!    cancelled), many in flight at once so their events interleave as in
//!    production. Each row takes its position and transaction id from the
//!    events table's defaults, as for real appends;
//! 2. scans the same rows with a plain `SELECT` (the events in the log's
//!    order, every column decoded), once as one query
//!    and once in the rebuild's own batches;
//! 3. runs `Projector::rebuild_report(None)`, what `unidesk projections
//!    rebuild` runs, into empty read models and then again over full ones,
//!    while a probe appends a task every 200 ms and measures how long each
//!    new event takes to become visible to outbox consumers.
//!
//! Results are printed for people, then as `replay: key=value` lines for
//! scripts (ops/bench.sh collects them).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use clap::Parser;
use cqrs_es::DomainEvent;
use domain::node::{Node, NodeCommand, NodeResources};
use domain::project::{Project, ProjectCommand, Role};
use domain::spec::{OutputDraft, ResourcesDraft, TaskSpec, TaskSpecDraft, UrlPolicy};
use domain::task::{Outcome, Task, TaskCommand};
use domain::user::{User, UserCommand};
use domain::Actor;
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
use store::outbox::{self, Checkpoint, Filter};
use store::Store;
use uuid::Uuid;

/// The allocator of the `unidesk` binary, whose rebuild this measures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure rebuilding read models from the log.
#[derive(Debug, Parser)]
struct Args {
    /// Database to measure on (emptied first); a private cluster is
    /// started when absent.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Events to seed the log with.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Rebuilds to run: the first fills empty read models, later ones
    /// replace full ones, as on a running server.
    #[arg(long, default_value_t = 2)]
    rebuilds: usize,
}

/// A tiny deterministic generator: the same seed, the same history.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Events as `COPY … (FORMAT csv)` rows, in the order they are appended.
struct Log {
    csv: String,
    rows: usize,
    clock: DateTime<Utc>,
}

fn csv_field(out: &mut String, s: &str) {
    out.push('"');
    out.push_str(&s.replace('"', "\"\""));
    out.push('"');
}

impl Log {
    /// Appends one event of aggregate `id` of type `kind` at sequence
    /// `seq`, with metadata as the store writes it.
    fn push<E: DomainEvent>(&mut self, kind: &str, id: &str, seq: i64, event: &E, actor: &Actor) {
        self.clock += chrono::Duration::milliseconds(40);
        let payload = serde_json::to_string(event).unwrap_or_default();
        let metadata = serde_json::json!({
            "actor": actor.to_string(),
            "at": self.clock.to_rfc3339_opts(SecondsFormat::Micros, true),
        })
        .to_string();
        let _ = write!(
            self.csv,
            "{kind},{id},{seq},{},{},",
            event.event_type(),
            event.event_version()
        );
        csv_field(&mut self.csv, &payload);
        self.csv.push(',');
        csv_field(&mut self.csv, &metadata);
        self.csv.push('\n');
        self.rows += 1;
    }
}

/// An aggregate being written, decided by the domain's own rules.
struct Writer<A> {
    id: String,
    state: A,
    seq: i64,
}

impl<A: cqrs_es::Aggregate> Writer<A> {
    fn new(id: String) -> Self {
        Self {
            id,
            state: A::default(),
            seq: 0,
        }
    }

    fn run(
        &mut self,
        log: &mut Log,
        decide: fn(&A, A::Command) -> Vec<A::Event>,
        command: A::Command,
        actor: &Actor,
    ) {
        for event in decide(&self.state, command) {
            self.seq += 1;
            log.push(A::TYPE, &self.id, self.seq, &event, actor);
            self.state.apply(event);
        }
    }
}

fn task_decide(t: &Task, c: TaskCommand) -> Vec<domain::task::TaskEvent> {
    t.decide(c).unwrap_or_default()
}
fn node_decide(n: &Node, c: NodeCommand) -> Vec<domain::node::NodeEvent> {
    n.decide(c).unwrap_or_default()
}
fn project_decide(p: &Project, c: ProjectCommand) -> Vec<domain::project::ProjectEvent> {
    p.decide(c).unwrap_or_default()
}
fn user_decide(u: &User, c: UserCommand) -> Vec<domain::user::UserEvent> {
    u.decide(c).unwrap_or_default()
}

/// One task's remaining commands, issued one per turn.
struct TaskRun {
    writer: Writer<Task>,
    steps: std::vec::IntoIter<(TaskCommand, Actor)>,
}

fn spec(rng: &mut Rng, project: Uuid) -> anyhow::Result<TaskSpec> {
    let commit = |rng: &mut Rng| {
        format!(
            "{:016x}{:016x}{:08x}",
            rng.next(),
            rng.next(),
            rng.next() as u32
        )
    };
    TaskSpecDraft {
        project_id: Some(project),
        code_repo_url: Some("https://git.example.com/vision/detector.git".into()),
        code_commit_id: Some(commit(rng)),
        env_repo_url: Some("https://git.example.com/vision/envs.git".into()),
        env_commit_id: Some(commit(rng)),
        dockerfile_path: Some("cuda12/Dockerfile".into()),
        command: Some(vec![
            "python".into(),
            "train.py".into(),
            "--epochs".into(),
            (rng.below(50) + 1).to_string(),
        ]),
        env: Some([("WANDB_MODE".to_string(), "offline".to_string())].into()),
        resources: Some(ResourcesDraft {
            cpus: Some(8.0),
            memory_mb: Some(32768),
            gpus: Some(0),
        }),
        labels: Some([("gpu".to_string(), "a100".to_string())].into()),
        timeout_s: Some(86400),
        max_retries: Some(2),
        outputs: Some(vec![OutputDraft {
            name: Some("model".into()),
            path: Some("out/model.pt".into()),
        }]),
        ..Default::default()
    }
    .validate(UrlPolicy::default())
    .map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// A task lifecycle of one of the shapes seen in production.
fn task_run(
    rng: &mut Rng,
    project: Uuid,
    node: Uuid,
    at: DateTime<Utc>,
) -> anyhow::Result<TaskRun> {
    let id = Uuid::new_v4();
    let user = Actor::User(format!("user{}", rng.below(50)));
    let scheduler = Actor::System("scheduler".into());
    let agent = Actor::Node(node.to_string());
    let submit = TaskCommand::Submit {
        task_id: id,
        spec: spec(rng, project)?,
        by: user.clone(),
        at,
    };
    let assign = || TaskCommand::Assign {
        node_id: node,
        gpus: vec![],
        reason: "fits: 8 CPU, 32768 MiB free; holds the env image".into(),
        at,
    };
    let accept = |attempt| TaskCommand::Accept {
        node_id: node,
        attempt,
        at,
    };
    let prepare = |attempt, stage: &str, detail: &str| TaskCommand::ReportPreparing {
        node_id: node,
        attempt,
        stage: stage.into(),
        detail: Some(detail.into()),
        at,
    };
    let start = |attempt| TaskCommand::ReportStarted {
        node_id: node,
        attempt,
        container: format!("{:016x}{:016x}", id.as_u128() as u64, attempt),
        at,
    };
    let exit = |attempt, outcome| TaskCommand::ReportExited {
        node_id: node,
        attempt,
        outcome,
        at,
    };
    let mut steps = vec![(submit, user.clone()), (assign(), scheduler.clone())];
    match rng.below(100) {
        0..70 => steps.extend([
            (accept(1), agent.clone()),
            (
                prepare(1, "code ready", "commit 1a2b3c4d5e6f: from cache"),
                agent.clone(),
            ),
            (prepare(1, "image ready", "built in 41.2 s"), agent.clone()),
            (start(1), agent.clone()),
            (exit(1, Outcome::Succeeded), agent.clone()),
        ]),
        70..80 => steps.extend([
            (accept(1), agent.clone()),
            (start(1), agent.clone()),
            (
                exit(
                    1,
                    Outcome::Failed {
                        exit_code: Some(1),
                        reason: "the command exited with status 1".into(),
                    },
                ),
                agent.clone(),
            ),
        ]),
        80..90 => steps.extend([
            (accept(1), agent.clone()),
            (start(1), agent.clone()),
            (
                TaskCommand::MarkLost {
                    node_id: node,
                    attempt: 1,
                    reason: "no heartbeat for 90 s".into(),
                    at,
                },
                scheduler.clone(),
            ),
            (assign(), scheduler.clone()),
            (accept(2), agent.clone()),
            (start(2), agent.clone()),
            (exit(2, Outcome::Succeeded), agent.clone()),
        ]),
        90..95 => {
            steps.truncate(1);
            steps.push((
                TaskCommand::RequestCancel {
                    by: user.clone(),
                    at,
                },
                user.clone(),
            ));
        }
        _ => steps.extend([
            (accept(1), agent.clone()),
            (start(1), agent.clone()),
            (
                TaskCommand::RequestCancel {
                    by: user.clone(),
                    at,
                },
                user,
            ),
            (exit(1, Outcome::Cancelled), agent.clone()),
        ]),
    }
    Ok(TaskRun {
        writer: Writer::new(id.to_string()),
        steps: steps.into_iter(),
    })
}

/// Seeds about `events` events; returns how many were written.
async fn seed(pool: &PgPool, events: usize) -> anyhow::Result<usize> {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut log = Log {
        csv: String::with_capacity(8 << 20),
        rows: 0,
        clock: Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_default(),
    };
    let mut conn = pool.acquire().await?;
    let mut copy = conn
        .copy_in_raw(
            "COPY events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             FROM STDIN WITH (FORMAT csv)",
        )
        .await?;
    let root = Actor::User("root".into());
    for i in 0..50 {
        let name = format!("user{i}");
        let mut w = Writer::<User>::new(name.clone());
        let at = log.clock;
        w.run(
            &mut log,
            user_decide,
            UserCommand::Create {
                name,
                admin: i == 0,
                by: root.clone(),
                at,
            },
            &root,
        );
        let token = UserCommand::IssueToken {
            token_id: Uuid::new_v4(),
            fingerprint: format!("{:016x}", rng.next()).repeat(4),
            label: "laptop".into(),
            by: root.clone(),
            at,
            expires_at: None,
            max_live: usize::MAX,
        };
        w.run(&mut log, user_decide, token, &root);
    }
    let mut projects = Vec::new();
    for i in 0..20 {
        let id = Uuid::new_v4();
        let mut w = Writer::<Project>::new(id.to_string());
        let at = log.clock;
        let owner = format!("user{i}");
        let create = ProjectCommand::Create {
            project_id: id,
            name: format!("project-{i}"),
            description: "detection models".into(),
            owner: owner.clone(),
            at,
        };
        w.run(&mut log, project_decide, create, &root);
        for m in 0..4 {
            let add = ProjectCommand::AddMember {
                user: format!("user{}", (i + m + 1) % 50),
                role: if m == 0 {
                    Role::Maintainer
                } else {
                    Role::Member
                },
                by: Actor::User(owner.clone()),
                at,
            };
            w.run(&mut log, project_decide, add, &root);
        }
        projects.push(id);
    }
    let mut nodes = Vec::new();
    for i in 0..100 {
        let id = Uuid::new_v4();
        let mut w = Writer::<Node>::new(id.to_string());
        let at = log.clock;
        let provision = NodeCommand::Provision {
            node_id: id,
            name: format!("gpu-{i}"),
            labels: [("gpu".to_string(), "a100".to_string())].into(),
            token_fingerprint: format!("{:016x}", rng.next()).repeat(4),
            max_resources: Default::default(),
            by: root.clone(),
            at,
        };
        w.run(&mut log, node_decide, provision, &root);
        nodes.push((w, None::<Uuid>));
    }
    // Tasks in flight at once, their events interleaved.
    let mut running: Vec<TaskRun> = Vec::new();
    while log.rows < events {
        if running.len() < 64 {
            let project = projects[rng.below(projects.len() as u64) as usize];
            let node = nodes[rng.below(nodes.len() as u64) as usize]
                .0
                .state
                .id
                .unwrap_or_default();
            running.push(task_run(&mut rng, project, node, log.clock)?);
            continue;
        }
        if rng.below(50) == 0 {
            // A node's agent connects, or its session ends.
            let n = rng.below(nodes.len() as u64) as usize;
            let (w, session) = &mut nodes[n];
            let actor = Actor::Node(w.id.clone());
            let at = log.clock;
            let command = match session.take() {
                Some(s) => NodeCommand::Disconnect {
                    session: s,
                    reason: "agent restarted".into(),
                    at,
                },
                None => {
                    let s = Uuid::new_v4();
                    *session = Some(s);
                    NodeCommand::Connect {
                        session: s,
                        agent_version: "0.1.0".into(),
                        resources: NodeResources {
                            cpus: 32.0,
                            memory_mb: 262_144,
                            gpus: vec![],
                        },
                        labels: Default::default(),
                        at,
                    }
                }
            };
            w.run(&mut log, node_decide, command, &actor);
            continue;
        }
        let i = rng.below(running.len() as u64) as usize;
        match running[i].steps.next() {
            Some((command, actor)) => {
                let t = &mut running[i];
                t.writer.run(&mut log, task_decide, command, &actor);
            }
            None => {
                running.swap_remove(i);
            }
        }
        if log.csv.len() > 4 << 20 {
            copy.send(log.csv.as_bytes()).await?;
            log.csv.clear();
        }
    }
    copy.send(log.csv.as_bytes()).await?;
    copy.finish().await?;
    Ok(log.rows)
}

/// Streams every event in the log's order, decoding every column, as one
/// query; returns the rows read.
async fn scan_one_query(pool: &PgPool) -> anyhow::Result<usize> {
    let mut rows = sqlx::query(
        "SELECT e.position, e.txid::text::bigint AS txid, e.recorded_at, e.aggregate_type, e.aggregate_id, \
           e.sequence, e.event_type, e.event_version, e.payload, e.metadata \
         FROM events e ORDER BY e.txid, e.position",
    )
    .fetch(pool);
    let mut n = 0;
    while let Some(row) = rows.try_next().await? {
        decode(&row)?;
        n += 1;
    }
    Ok(n)
}

fn decode(row: &PgRow) -> Result<(), sqlx::Error> {
    let _: i64 = row.try_get("position")?;
    let _: i64 = row.try_get("txid")?;
    let _: DateTime<Utc> = row.try_get("recorded_at")?;
    let _: String = row.try_get("aggregate_type")?;
    let _: String = row.try_get("aggregate_id")?;
    let _: i64 = row.try_get("sequence")?;
    let _: String = row.try_get("event_type")?;
    let _: String = row.try_get("event_version")?;
    let _: serde_json::Value = row.try_get("payload")?;
    let _: serde_json::Value = row.try_get("metadata")?;
    Ok(())
}

/// Reads every event the way the rebuild does: `outbox::read_after` in
/// batches of 5,000; returns the rows read.
async fn scan_batches(pool: &PgPool) -> anyhow::Result<usize> {
    let mut at = Checkpoint::default();
    let mut n = 0;
    loop {
        let batch = outbox::read_after(pool, at, 5000, &Filter::default()).await?;
        let Some(last) = batch.last() else {
            return Ok(n);
        };
        at = last.checkpoint();
        n += batch.len();
    }
}

/// Appends a task every 200 ms until stopped and returns, for each, how
/// long its event took to become visible to outbox consumers.
async fn probe(store: Store, stop: Arc<AtomicBool>) -> anyhow::Result<Vec<Duration>> {
    let mut delays = Vec::new();
    let mut rng = Rng(42);
    let user = Actor::User("probe".into());
    while !stop.load(Ordering::Relaxed) {
        let id = Uuid::new_v4();
        let now = Utc::now();
        let submit = TaskCommand::Submit {
            task_id: id,
            spec: spec(&mut rng, Uuid::new_v4())?,
            by: user.clone(),
            at: now,
        };
        store
            .execute::<Task>(&id.to_string(), submit, &user, now)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let committed = Instant::now();
        loop {
            let visible: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_type = 'task' AND aggregate_id = $1 \
                 AND txid < pg_snapshot_xmin(pg_current_snapshot()))",
            )
            .bind(id.to_string())
            .fetch_one(store.pool())
            .await?;
            if visible {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        delays.push(committed.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(delays)
}

#[derive(Debug, Serialize)]
struct Figure {
    what: String,
    events: usize,
    seconds: f64,
}

impl Figure {
    fn per_second(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let database = bench::Database::given_or_private(args.database_url.as_deref()).await?;
    let url = database.url.clone();
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .context("connecting")?;
    store::migrate(&pool).await?;
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        existing == 0,
        "the database holds {existing} events: give an empty one"
    );

    println!("unidesk-replay-bench: {} events", args.events);
    let started = Instant::now();
    let seeded = seed(&pool, args.events).await.context("seeding the log")?;
    let seed_s = started.elapsed().as_secs_f64();
    println!(
        "seeded {seeded} events by COPY in {seed_s:.1} s ({:.0} events/s, positions included)",
        seeded as f64 / seed_s
    );
    sqlx::query("VACUUM ANALYZE events").execute(&pool).await?;

    let mut figures = Vec::new();
    for (what, scan) in [
        ("plain SELECT, one query", 0),
        ("plain SELECT, rebuild's batches", 1),
    ] {
        let t = Instant::now();
        let n = if scan == 0 {
            scan_one_query(&pool).await?
        } else {
            scan_batches(&pool).await?
        };
        let f = Figure {
            what: what.into(),
            events: n,
            seconds: t.elapsed().as_secs_f64(),
        };
        println!(
            "{:<44} {:>9} rows in {:>7.1} s = {:>9.0} rows/s",
            f.what,
            f.events,
            f.seconds,
            f.per_second()
        );
        figures.push(f);
    }
    let scan_rate = figures[0].per_second();

    let store = Store::new(pool.clone());
    let projector = projections::Projector::new(pool.clone());
    let mut probes = Vec::new();
    for run in 1..=args.rebuilds {
        let stop = Arc::new(AtomicBool::new(false));
        let probing = tokio::spawn(probe(store.clone(), stop.clone()));
        let r = projector.rebuild_report(None).await.context("rebuilding")?;
        stop.store(true, Ordering::Relaxed);
        let delays = probing.await??;
        let what = if run == 1 {
            "rebuild into empty read models"
        } else {
            "rebuild over full read models"
        };
        let seconds = (r.build + r.switch).as_secs_f64();
        let f = Figure {
            what: what.into(),
            events: r.events,
            seconds,
        };
        println!(
            "{:<44} {:>9} events in {:>7.1} s = {:>9.0} events/s ({:.1}% of the one-query SELECT; {} models, {:.0} applications/s; indexes {:.2} s; switch {:.2} s)",
            f.what,
            f.events,
            f.seconds,
            f.per_second(),
            100.0 * f.per_second() / scan_rate,
            r.models.len(),
            r.applications as f64 / seconds,
            r.indexes.as_secs_f64(),
            r.switch.as_secs_f64()
        );
        let mut sorted = delays.clone();
        sorted.sort();
        if let (Some(max), false) = (sorted.last(), sorted.is_empty()) {
            println!(
                "  new events during it: {} appended, visible to consumers after p50 {:.1} ms, max {:.1} ms",
                sorted.len(),
                ms(sorted[sorted.len() / 2]),
                ms(*max)
            );
        }
        probes.push((r, sorted));
        figures.push(f);
    }
    for f in &figures {
        println!(
            "replay: what={:?} events={} seconds={:.2} per_second={:.0}",
            f.what,
            f.events,
            f.seconds,
            f.per_second()
        );
    }
    for (i, (r, delays)) in probes.iter().enumerate() {
        println!(
            "replay: rebuild={} build_s={:.2} switch_s={:.3} probes={} visible_p50_ms={:.1} visible_max_ms={:.1}",
            i + 1,
            r.build.as_secs_f64(),
            r.switch.as_secs_f64(),
            delays.len(),
            delays.get(delays.len() / 2).map_or(0.0, |d| ms(*d)),
            delays.last().map_or(0.0, |d| ms(*d)),
        );
    }
    pool.close().await;
    database.stop().await?;
    Ok(())
}
