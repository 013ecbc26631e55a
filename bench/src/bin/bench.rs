//! `unidesk-bench`: commands per second through the event-sourced core,
//! measured next to plain single-row INSERTs on the same database in the
//! same run, and optionally next to `bench/reference/ceiling.sh`.
//!
//! ```text
//! unidesk-bench [--database-url URL] [--seconds 10] [--writers 1,16] [--ceiling PATH/ceiling.sh]
//! ```
//! Without a URL it starts a private PostgreSQL cluster of its own.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use domain::spec::{TaskSpecDraft, UrlPolicy};
use domain::task::{Capacity, Outcome, Task, TaskCommand};
use domain::Actor;
use sqlx::PgPool;
use store::Store;
use uuid::Uuid;

/// The allocator of the `unidesk` binary, whose store this measures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmark the event-sourced core.
#[derive(Debug, Parser)]
struct Args {
    /// Database to measure on; a private cluster is started when absent.
    /// Never one a server uses: the bench writes tasks into it and holds
    /// the scheduler leader's lease while it measures.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent writer counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    writers: Vec<usize>,
    /// Path to bench/reference/ceiling.sh, to run as the reference in this run.
    #[arg(long)]
    ceiling: Option<std::path::PathBuf>,
}

const PAYLOAD: &str = r#"{"task_id":1,"type":"task.submitted","node":"node-7f3c2a1e-9b4d-4e8f-a6c1-2d3e4f5a6b7c","attempt":1,"at":"2026-01-01T00:00:00.000000Z","meta":{"actor":"user/alice","priority":5,"labels":["gpu","linux","x86_64"],"trace":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}"#;

/// Runs `writers` copies of `work` for `secs` seconds; each call of `work`
/// is given its writer's number (from 0) and returns how many commits it
/// made. Returns commits per second.
async fn measure<F, Fut>(writers: usize, secs: u64, work: F) -> anyhow::Result<f64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut handles = Vec::new();
    for writer in 0..writers {
        let (stop, count, work) = (stop.clone(), count.clone(), work.clone());
        handles.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = work(writer).await?;
                count.fetch_add(n, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// What every node of the bench can give: room for every writer's tasks at
/// once, so the store's capacity check passes and is still made.
const CAPACITY: Capacity = Capacity {
    millicpus: 1_000_000,
    memory_mb: 1 << 30,
};

/// One task's life through the cqrs framework: five commands, each loading
/// the aggregate and appending one event in its own transaction. The
/// assignment is made as the scheduler leader makes it, in `term` and for
/// the node's capacity, so the store fences and reserves it.
async fn lifecycle(store: &Store, node: Uuid, project: Uuid, term: u64) -> anyhow::Result<u64> {
    let id = Uuid::now_v7();
    let t = id.to_string();
    let now = Utc::now;
    let spec = TaskSpecDraft {
        project_id: Some(project),
        code_repo_url: Some("https://example.com/code.git".into()),
        code_commit_id: Some("a".repeat(40)),
        env_repo_url: Some("https://example.com/env.git".into()),
        env_commit_id: Some("b".repeat(40)),
        dockerfile_path: Some("Dockerfile".into()),
        command: Some(vec!["python".into(), "train.py".into()]),
        ..Default::default()
    }
    .validate(UrlPolicy::default())
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let user = Actor::User("bench".into());
    let agent = Actor::Node(node.to_string());
    let commands = [
        (
            TaskCommand::Submit {
                task_id: id,
                spec,
                by: user.clone(),
                at: now(),
            },
            user,
        ),
        (
            TaskCommand::AssignAsLeader {
                node_id: node,
                gpus: vec![],
                reason: "bench".into(),
                term,
                capacity: CAPACITY,
                at: now(),
            },
            Actor::System("scheduler".into()),
        ),
        (
            TaskCommand::Accept {
                node_id: node,
                attempt: 1,
                at: now(),
            },
            agent.clone(),
        ),
        (
            TaskCommand::ReportStarted {
                node_id: node,
                attempt: 1,
                container: "c".into(),
                at: now(),
            },
            agent.clone(),
        ),
        (
            TaskCommand::ReportExited {
                node_id: node,
                attempt: 1,
                outcome: Outcome::Succeeded,
                at: now(),
            },
            agent,
        ),
    ];
    for (cmd, actor) in commands {
        store
            .execute::<Task>(&t, cmd, &actor, now())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(5)
}

/// A pool set as a server's is ([`store::pool_options`]): a connection used
/// moments ago is not checked again before use, so neither the plain
/// INSERTs nor the commands pay a round trip the server does not.
async fn pool(url: &str, size: u32) -> anyhow::Result<PgPool> {
    store::pool_options()
        .max_connections(size)
        .connect(url)
        .await
        .context("connecting")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let database = bench::Database::given_or_private(args.database_url.as_deref()).await?;
    let url = database.url.clone();
    let setup = pool(&url, 2).await?;
    store::migrate(&setup).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_plain (id bigserial PRIMARY KEY, payload jsonb NOT NULL)",
    )
    .execute(&setup)
    .await?;
    // Assignments name the term of a leader holding the lease, as the
    // scheduler's do: held for every measurement (three per writer count)
    // and a minute more, then let go.
    let holder = "unidesk-bench";
    let measuring = args
        .seconds
        .saturating_mul(3 * args.writers.len() as u64)
        .saturating_add(60);
    let term = store::leader::take(&setup, holder, Duration::from_secs(measuring))
        .await?
        .context("a scheduler holds the leader's lease on this database: measure on another")?;
    println!("unidesk-bench: {} s per figure", args.seconds);
    println!("{:<44} {:>8} {:>14}", "what", "writers", "commits/s");
    for &w in &args.writers {
        let p = pool(&url, w as u32 + 2).await?;
        let plain = {
            let p = p.clone();
            measure(w, args.seconds, move |_| {
                let p = p.clone();
                async move {
                    sqlx::query("INSERT INTO bench_plain (payload) VALUES ($1::jsonb)")
                        .bind(PAYLOAD)
                        .execute(&p)
                        .await?;
                    Ok(1)
                }
            })
            .await?
        };
        println!("{:<44} {:>8} {:>14.0}", "plain single-row INSERT", w, plain);
        let store = Store::new(p.clone());
        let project = Uuid::new_v4();
        // Each writer's tasks on a node of its own, as concurrent
        // assignments mostly land on different nodes of a cluster; then
        // every task on one node, where the assignments queue for that
        // node's reservation (what keeps its capacity and GPU checks
        // true), one commit at a time.
        let nodes: Arc<Vec<Uuid>> = Arc::new((0..w).map(|_| Uuid::new_v4()).collect());
        let one = Uuid::new_v4();
        for (what, spread) in [
            ("cqrs command (load + decide + append)", true),
            ("cqrs command, every task on one node", false),
        ] {
            if !spread && w == 1 {
                // One writer has one node either way.
                continue;
            }
            let (store, nodes) = (store.clone(), nodes.clone());
            let cqrs = measure(w, args.seconds, move |writer| {
                let store = store.clone();
                let node = if spread { nodes[writer] } else { one };
                async move { lifecycle(&store, node, project, term as u64).await }
            })
            .await?;
            println!(
                "{:<44} {:>8} {:>14.0}   ({:.0} task lifecycles/s, {:.0}% of plain)",
                what,
                w,
                cqrs,
                cqrs / 5.0,
                100.0 * cqrs / plain
            );
        }
        p.close().await;
    }
    if let Some(script) = &args.ceiling {
        println!("reference, same database, same run: {}", script.display());
        let status = tokio::process::Command::new("bash")
            .arg(script)
            .arg(&url)
            .status()
            .await
            .context("running ceiling.sh")?;
        anyhow::ensure!(status.success(), "ceiling.sh failed");
    }
    store::leader::release(&setup, holder, term).await?;
    setup.close().await;
    database.stop().await?;
    Ok(())
}
