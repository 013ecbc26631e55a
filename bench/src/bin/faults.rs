//! `unidesk-faults`: a real UniDesk cluster put through randomised faults,
//! then audited from its event log.
//!
//! ```text
//! unidesk-faults --rounds 100 --seed 7          # a long run (ops/bench.sh)
//! unidesk-faults --rounds 10                    # a short one (ops/test.sh)
//! ```
//!
//! The cluster: a private PostgreSQL; `unidesk serve --roles api,projector`
//! and `unidesk serve --roles ingress` as two processes; a scheduler leader
//! and a standby as two more (`--roles scheduler`); real `unidesk-agent`s
//! running short Docker tasks (busybox on `FROM scratch`, built here from
//! Debian's `busybox-static`), some in network namespaces of their own so
//! that a partition is a real cut; and simulated agents on real WebSockets
//! beside them, some declaring GPUs they do not have.
//!
//! Tasks are submitted all along (sim, GPU and Docker tasks, each command
//! naming how it ends) while each round injects one fault chosen by the
//! seed: `kill -9` of an agent (then started again), of the ingress, of the
//! scheduler leader or of the projector; SIGTERM to the ingress (which must
//! exit within 10 s) and a start again; a PostgreSQL restart with an
//! outage; a node cut off for longer or shorter than the offline window;
//! the leader frozen with SIGSTOP past its lease, then SIGCONT. After each
//! fault the harness waits until the cluster is whole again.
//!
//! After the rounds it waits until every task has ended, stops the roles
//! and checks the log (see `bench::faults::audit`): every task ended
//! exactly once, attempts in order and each ended once, no GPU held twice,
//! every report an agent got `received` for is in the log, outcomes match
//! the commands, no heartbeating node taken for offline, every event in
//! the outbox, `replay --check` clean, and the read models equal to a
//! rebuild. It prints the figures and exits 1 on any violation; the logs of
//! every process stay in the work directory it names.
//!
//! Needs root (network namespaces), Docker, `ip`, `git`, `/bin/busybox`
//! and PostgreSQL's server programs; `--real-agents 0` runs without Docker
//! and namespaces.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use bench::faults::audit::{self, Violation};
use bench::faults::netns::{self, Netns};
use bench::faults::process::Proc;
use bench::faults::sim::{Endpoint, SimAgent, SimConfig};
use chrono::Utc;
use clap::Parser;
use pgcluster::{LocalCluster, StopMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

/// Put a real UniDesk cluster through randomised faults and audit its log.
#[derive(Debug, Parser)]
#[command(name = "unidesk-faults", about)]
struct Cli {
    /// Fault rounds.
    #[arg(long, default_value_t = 100)]
    rounds: u32,
    /// Seed of every random choice (faults, targets, timings, tasks);
    /// random when absent, and printed either way.
    #[arg(long)]
    seed: Option<u64>,
    /// The scheduler's `--offline-after-s`.
    #[arg(long, default_value_t = 6)]
    offline_after_s: u64,
    /// The ingress's `--heartbeat-s`.
    #[arg(long, default_value_t = 1)]
    heartbeat_s: u64,
    /// How long the leader is frozen (SIGSTOP), in seconds; by default two
    /// seconds past the offline window, so longer than any lease shorter
    /// than it.
    #[arg(long)]
    freeze_s: Option<u64>,
    /// Real `unidesk-agent`s running Docker tasks.
    #[arg(long, default_value_t = 3)]
    real_agents: usize,
    /// How many of the real agents run in a network namespace of their own.
    #[arg(long, default_value_t = 2)]
    netns_agents: usize,
    /// Simulated agents without GPUs.
    #[arg(long, default_value_t = 2)]
    sim_agents: usize,
    /// Simulated agents declaring two GPUs each.
    #[arg(long, default_value_t = 2)]
    gpu_agents: usize,
    /// Milliseconds between two task submissions.
    #[arg(long, default_value_t = 600)]
    submit_every_ms: u64,
    /// The most tasks waiting or running at once; submission pauses above.
    #[arg(long, default_value_t = 40)]
    max_open_tasks: usize,
    /// Every task's `max_retries`.
    #[arg(long, default_value_t = 3)]
    max_retries: u32,
    /// The longest wait for the cluster to be whole after a fault, in s.
    #[arg(long, default_value_t = 120)]
    recover_s: u64,
    /// The longest wait for every task to end after the rounds, in s.
    #[arg(long, default_value_t = 300)]
    quiesce_s: u64,
    /// Where to keep every process's log (kept); a fresh directory under
    /// the temporary directory by default, deleted after a clean run.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Only these faults (comma-separated names as the figures print
    /// them, such as `restart_postgres,freeze_leader`); all by default.
    #[arg(long, value_delimiter = ',', value_parser = parse_fault)]
    faults: Vec<Fault>,
    /// One more flag for the scheduler processes (such as a lease length);
    /// repeatable.
    #[arg(long = "scheduler-arg", allow_hyphen_values = true)]
    scheduler_args: Vec<String>,
    /// One more flag for every `unidesk serve`; repeatable.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sqlx=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("unidesk-faults: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

/// The faults a round may inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillAgent,
    KillIngress,
    StopIngress,
    KillLeader,
    KillProjector,
    RestartPostgres,
    PartitionLong,
    PartitionShort,
    FreezeLeader,
}

impl Fault {
    const ALL: [Fault; 9] = [
        Fault::KillAgent,
        Fault::KillIngress,
        Fault::StopIngress,
        Fault::KillLeader,
        Fault::KillProjector,
        Fault::RestartPostgres,
        Fault::PartitionLong,
        Fault::PartitionShort,
        Fault::FreezeLeader,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillAgent => "kill_agent",
            Fault::KillIngress => "kill_ingress",
            Fault::StopIngress => "stop_ingress",
            Fault::KillLeader => "kill_leader",
            Fault::KillProjector => "kill_projector",
            Fault::RestartPostgres => "restart_postgres",
            Fault::PartitionLong => "partition_long",
            Fault::PartitionShort => "partition_short",
            Fault::FreezeLeader => "freeze_leader",
        }
    }
}

fn parse_fault(s: &str) -> Result<Fault, String> {
    Fault::ALL
        .into_iter()
        .find(|f| f.name() == s)
        .ok_or_else(|| {
            format!(
                "unknown fault {s:?}; one of {}",
                Fault::ALL.map(Fault::name).join(", ")
            )
        })
}

// ---------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------

/// The base image of the Docker tasks: `FROM scratch` and busybox.
const BASE_IMAGE: &str = "unidesk-faults-base:1";

/// A real agent and, when it has one, its namespace.
struct RealAgent {
    proc: Proc,
    netns: Option<Netns>,
}

/// The git repositories of the Docker tasks.
struct Repos {
    code_url: String,
    code_commit: String,
    env_url: String,
    env_commit: String,
}

/// Everything the harness started.
struct Cluster {
    dir: PathBuf,
    unidesk: PathBuf,
    pg: LocalCluster,
    pool: PgPool,
    http: reqwest::Client,
    api: Proc,
    api_port: u16,
    token: String,
    ingress: Proc,
    ingress_port: u16,
    schedulers: Vec<Proc>,
    reals: Vec<RealAgent>,
    sims: Vec<SimAgent>,
    project: Uuid,
    repos: Option<Repos>,
    offline_after: Duration,
    heartbeat: Duration,
}

/// A free TCP port on all addresses.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("0.0.0.0:0")
        .context("finding a free port")?
        .local_addr()?
        .port())
}

/// The database URL with an `application_name`, by which the harness tells
/// the processes' sessions apart in `pg_stat_activity`.
fn named_url(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

impl Cluster {
    async fn start(cli: &Cli, dir: &Path) -> anyhow::Result<Cluster> {
        let bin = std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("unidesk");
        ensure!(
            bin.is_file(),
            "{} not found: build it next to this binary (cargo build -p unidesk)",
            bin.display()
        );
        let agent_exe = bin.with_file_name("unidesk-agent");
        if cli.real_agents > 0 {
            ensure!(
                agent_exe.is_file(),
                "{} not found: build it next to this binary (cargo build -p node-agent)",
                agent_exe.display()
            );
            ensure!(
                nix::unistd::geteuid().is_root() || cli.netns_agents == 0,
                "network namespaces need root: run as root or pass --netns-agents 0"
            );
        }
        let pg = LocalCluster::start_ephemeral()
            .await
            .context("starting a private PostgreSQL")?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&named_url(&pg.url(), "faults-harness"))
            .await
            .context("connecting to the private PostgreSQL")?;
        // The cluster skips fsync (the machine does not crash here), but a
        // commit must reach the log before it is answered, or a crash of
        // PostgreSQL (an immediate stop) would lose acknowledged work that
        // no real server set up for production loses.
        for statement in [
            "ALTER SYSTEM SET synchronous_commit = on",
            "SELECT pg_reload_conf()",
        ] {
            sqlx::query(statement)
                .execute(&pool)
                .await
                .with_context(|| format!("{statement} on the private PostgreSQL"))?;
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let (api_port, ingress_port) = (free_port()?, free_port()?);
        let poll = ["--poll-ms".to_string(), "100".to_string()];
        let serve = |name: &str, roles: &str, listen: String, extra: &[String]| {
            let mut args: Vec<String> = vec![
                "serve".into(),
                "--roles".into(),
                roles.into(),
                "--listen".into(),
                listen,
            ];
            args.extend(poll.iter().cloned());
            args.extend(extra.iter().cloned());
            args.extend(cli.serve_args.iter().cloned());
            Proc::new(name, &bin, args, &dir.join(format!("{name}.log")))
                .env(
                    "DATABASE_URL",
                    named_url(&pg.url(), &format!("faults-{name}")),
                )
                .env("RUST_LOG", "info,sqlx=warn")
        };
        let token_file = dir.join("admin.token");
        let mut api = serve(
            "api",
            "api,projector",
            format!("127.0.0.1:{api_port}"),
            &[
                "--admin-token-file".into(),
                token_file.display().to_string(),
                "--allow-file-urls".into(),
                "--rate-limit-per-s".into(),
                "0".into(),
            ],
        );
        api.start()?;
        let ingress = serve(
            "ingress",
            "ingress",
            format!("0.0.0.0:{ingress_port}"),
            &["--heartbeat-s".into(), cli.heartbeat_s.to_string()],
        );
        let mut sched_args = vec![
            "--offline-after-s".to_string(),
            cli.offline_after_s.to_string(),
            "--accept-timeout-s".into(),
            "60".into(),
        ];
        sched_args.extend(cli.scheduler_args.iter().cloned());
        let mut schedulers = Vec::new();
        for name in ["scheduler-a", "scheduler-b"] {
            schedulers.push(serve(
                name,
                "scheduler",
                format!("127.0.0.1:{}", free_port()?),
                &sched_args,
            ));
        }
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            unidesk: bin.clone(),
            pg,
            pool,
            http,
            api,
            api_port,
            token: String::new(),
            ingress,
            ingress_port,
            schedulers,
            reals: Vec::new(),
            sims: Vec::new(),
            project: Uuid::nil(),
            repos: None,
            offline_after: Duration::from_secs(cli.offline_after_s),
            heartbeat: Duration::from_secs(cli.heartbeat_s),
        };
        cluster.api_ready(Duration::from_secs(60)).await?;
        cluster.token = std::fs::read_to_string(&token_file)
            .context("reading the admin token")?
            .trim()
            .to_string();
        cluster.ingress.start()?;
        cluster.ingress_ready(Duration::from_secs(60)).await?;
        for i in 0..cluster.schedulers.len() {
            cluster.start_scheduler(i).await?;
            // The first one started leads.
            if i == 0 {
                let deadline = Instant::now() + Duration::from_secs(30);
                while cluster.leader().await != Some(0) {
                    ensure!(
                        Instant::now() < deadline,
                        "scheduler-a did not lead within 30 s"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        cluster.project = cluster.create_project().await?;
        if cli.real_agents > 0 {
            build_base_image().await?;
            cluster.repos = Some(make_repos(&dir.join("repos"))?);
            cluster.start_real_agents(cli, &agent_exe).await?;
        }
        cluster.start_sims(cli).await?;
        if let Err(unwell) = cluster.await_whole(Duration::from_secs(180)).await {
            bail!("the cluster did not come up whole: {unwell}");
        }
        Ok(cluster)
    }

    /// Starts `--real-agents` real agents, the first `--netns-agents` of
    /// them in network namespaces of their own.
    async fn start_real_agents(&mut self, cli: &Cli, agent_exe: &Path) -> anyhow::Result<()> {
        let port = self.ingress_port;
        let block = if cli.netns_agents > 0 && cli.real_agents > 0 {
            netns::free_block((std::process::id() % 200) as u8)?
        } else {
            0
        };
        let tag = format!("uf{}", std::process::id() % 100_000);
        for i in 0..cli.real_agents {
            let name = format!("real-{i}");
            let token = self.provision(&name, "real").await?;
            let netns = if i < cli.netns_agents {
                Some(Netns::create(&tag, block, (i + 1) as u8)?)
            } else {
                None
            };
            let host = netns
                .as_ref()
                .map_or("127.0.0.1".to_string(), |n| n.host_ip.to_string());
            let work = self.dir.join(&name);
            std::fs::create_dir_all(&work)?;
            let agent_args: Vec<String> = vec![
                agent_exe.display().to_string(),
                "--server".into(),
                format!("ws://{host}:{port}"),
                "--work-dir".into(),
                work.display().to_string(),
                "--cpus".into(),
                "2".into(),
                "--memory-mb".into(),
                "4096".into(),
                "--no-gpus".into(),
                "--reconnect-min-ms".into(),
                "200".into(),
                "--reconnect-max-ms".into(),
                "2000".into(),
                "--task-network".into(),
                "none".into(),
            ];
            let (program, args) = match &netns {
                Some(n) => {
                    let mut all = n.exec_prefix();
                    all.extend(agent_args);
                    ("ip".to_string(), all)
                }
                None => (agent_args[0].clone(), agent_args[1..].to_vec()),
            };
            let mut proc = Proc::new(&name, program, args, &self.dir.join(format!("{name}.log")))
                .env("UNIDESK_NODE_TOKEN", token)
                .env("RUST_LOG", "info");
            proc.start()?;
            self.reals.push(RealAgent { proc, netns });
        }
        Ok(())
    }

    /// Starts the simulated agents, those with GPUs last.
    async fn start_sims(&mut self, cli: &Cli) -> anyhow::Result<()> {
        let port = self.ingress_port;
        let endpoint = Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            ws_url: format!("ws://127.0.0.1:{port}{}", protocol::PATH),
        };
        for i in 0..cli.sim_agents + cli.gpu_agents {
            let gpu = i >= cli.sim_agents;
            let name = if gpu {
                format!("gpu-{}", i - cli.sim_agents)
            } else {
                format!("sim-{i}")
            };
            let token = self
                .provision(&name, if gpu { "gpu" } else { "sim" })
                .await?;
            let mut sim = SimAgent::new(SimConfig {
                name,
                token,
                endpoint: endpoint.clone(),
                gpus: if gpu { 2 } else { 0 },
                cpus: 16.0,
                memory_mb: 64 * 1024,
            });
            sim.start();
            self.sims.push(sim);
        }
        Ok(())
    }

    async fn start_scheduler(&mut self, i: usize) -> anyhow::Result<()> {
        let from = self.schedulers[i].log_len();
        self.schedulers[i].start()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.schedulers[i].logged_since(from, "serving") {
            if let Some(status) = self.schedulers[i].exited() {
                bail!(
                    "{} exited ({status}):\n{}",
                    self.schedulers[i].name,
                    self.schedulers[i].tail(20)
                );
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not start within 60 s",
                self.schedulers[i].name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn api_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let url = format!("http://127.0.0.1:{}/readyz", self.api_port);
        loop {
            let ok = self
                .http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok && self.dir.join("admin.token").exists() {
                return Ok(());
            }
            if let Some(status) = self.api.exited() {
                bail!("the api exited ({status}):\n{}", self.api.tail(20));
            }
            ensure!(
                Instant::now() < deadline,
                "the api was not ready within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ingress_answers(&self) -> bool {
        let url = format!("http://127.0.0.1:{}{}", self.ingress_port, protocol::PATH);
        self.http.get(&url).send().await.is_ok()
    }

    async fn ingress_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while !self.ingress_answers().await {
            if let Some(status) = self.ingress.exited() {
                bail!("the ingress exited ({status}):\n{}", self.ingress.tail(20));
            }
            ensure!(
                Instant::now() < deadline,
                "the ingress did not answer within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Which scheduler leads: the one whose session holds an advisory
    /// lock; failing that (a leadership kept otherwise), the one that
    /// last said it leads in its log.
    async fn leader(&self) -> Option<usize> {
        let holders: Vec<String> = sqlx::query_scalar(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE 'faults-scheduler-%'",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        let by_lock = self
            .schedulers
            .iter()
            .position(|s| holders.iter().any(|h| h == &format!("faults-{}", s.name)));
        if by_lock.is_some() {
            return by_lock;
        }
        // The newest line saying "leading" among the running schedulers.
        let mut best: Option<(String, usize)> = None;
        for (i, s) in self.schedulers.iter().enumerate() {
            let text = std::fs::read_to_string(s.log()).unwrap_or_default();
            if let Some(line) = text.lines().rev().find(|l| l.contains("is leading")) {
                let stamp = line.split_whitespace().next().unwrap_or("").to_string();
                if best.as_ref().is_none_or(|(b, _)| stamp > *b) {
                    best = Some((stamp, i));
                }
            }
        }
        best.map(|(_, i)| i)
    }

    async fn api_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(
                method,
                format!("http://127.0.0.1:{}/api/v1{path}", self.api_port),
            )
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{path}: sending"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        ensure!(status.is_success(), "{path}: {status}: {text}");
        serde_json::from_str(&text).with_context(|| format!("{path}: decoding {text}"))
    }

    /// The header in which `POST /tasks` takes an idempotency key, as its
    /// OpenAPI document says; `None` when it documents none.
    async fn idempotency_header(&self) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/api/v1/openapi.json", self.api_port);
        let doc: Value = self.http.get(&url).send().await.ok()?.json().await.ok()?;
        let params = doc
            .pointer("/paths/~1api~1v1~1tasks/post/parameters")?
            .as_array()?;
        params
            .iter()
            .filter(|p| p.get("in").and_then(Value::as_str) == Some("header"))
            .filter_map(|p| p.get("name").and_then(Value::as_str))
            .find(|name| name.to_ascii_lowercase().contains("idempotency"))
            .map(str::to_string)
    }

    async fn create_project(&self) -> anyhow::Result<Uuid> {
        let v = self
            .api_call(
                reqwest::Method::POST,
                "/projects",
                Some(json!({ "name": "faults" })),
            )
            .await?;
        v.get("id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .context("no project id")
    }

    async fn provision(&self, name: &str, pool: &str) -> anyhow::Result<String> {
        let v = self
            .api_call(
                reqwest::Method::POST,
                "/nodes",
                Some(json!({ "name": name, "labels": { "pool": pool } })),
            )
            .await?;
        Ok(v.get("token")
            .and_then(Value::as_str)
            .context("no token")?
            .to_string())
    }

    /// `Ok` once every process runs, a scheduler leads and every node is
    /// online with a fresh heartbeat; else, after `within`, what is not.
    async fn await_whole(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let unwell = self.unwell().await;
            if unwell.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(unwell.join("; "));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn unwell(&mut self) -> Vec<String> {
        let mut unwell = Vec::new();
        if !self.api.running() {
            unwell.push("the api is not running".to_string());
        } else {
            let url = format!("http://127.0.0.1:{}/readyz", self.api_port);
            if !self
                .http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                unwell.push("the api is not ready".into());
            }
        }
        if !self.ingress.running() || !self.ingress_answers().await {
            unwell.push("the ingress does not answer".into());
        }
        for s in &mut self.schedulers {
            if !s.running() || s.frozen() {
                unwell.push(format!("{} is not running", s.name));
            }
        }
        if self.leader().await.is_none() {
            unwell.push("no scheduler leads".into());
        }
        for s in &self.sims {
            if !s.connected() {
                unwell.push(format!("{} is not connected", s.name()));
            }
        }
        for r in &mut self.reals {
            if !r.proc.running() {
                unwell.push(format!("{} is not running", r.proc.name));
            }
        }
        let fresh = self.heartbeat.as_secs_f64() * 3.0 + 1.0;
        let rows: Result<Vec<(String, String, Option<f64>)>, _> = sqlx::query_as(
            "SELECT v.name, v.status, extract(epoch FROM now() - l.last_seen)::float8 \
             FROM node_view v LEFT JOIN node_liveness l ON l.node_id = v.id ORDER BY v.name",
        )
        .fetch_all(&self.pool)
        .await;
        match rows {
            Ok(rows) => {
                for (name, status, age) in rows {
                    if status != "online" || age.is_none_or(|a| a > fresh) {
                        unwell.push(format!(
                            "node {name} is {status}, last heard {}",
                            age.map_or("never".into(), |a| format!("{a:.1} s ago"))
                        ));
                    }
                }
            }
            Err(e) => unwell.push(format!("the database does not answer: {e}")),
        }
        unwell
    }

    /// Starts again whatever is down, after a fault that did not heal.
    async fn mend(&mut self) {
        let _ = self.pg.resume().await;
        if !self.api.running() {
            let _ = self.api.start();
        }
        if !self.ingress.running() {
            let _ = self.ingress.start();
        }
        for i in 0..self.schedulers.len() {
            if self.schedulers[i].frozen() {
                let _ = self.schedulers[i].thaw();
            }
            if !self.schedulers[i].running() {
                let _ = self.start_scheduler(i).await;
            }
        }
        for r in &mut self.reals {
            if let Some(n) = &mut r.netns {
                if n.is_cut() {
                    let _ = n.heal();
                }
            }
            if !r.proc.running() {
                let _ = r.proc.start();
            }
        }
        for s in &mut self.sims {
            if !s.running() {
                s.start();
            }
        }
    }

    /// Tasks submitted that have not ended, from the log.
    async fn open_tasks(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT count(*) FROM events s WHERE s.aggregate_type = 'task' AND s.event_type = 'TaskSubmitted' \
             AND NOT EXISTS (SELECT 1 FROM events e WHERE e.aggregate_type = 'task' \
               AND e.aggregate_id = s.aggregate_id \
               AND e.event_type IN ('TaskSucceeded', 'TaskFailed', 'TaskTimedOut', 'TaskCancelled'))",
        )
        .fetch_one(&self.pool)
        .await
    }
}

/// Builds [`BASE_IMAGE`] unless it exists: `FROM scratch` with Debian's
/// static busybox and its applets linked into `/bin`.
async fn build_base_image() -> anyhow::Result<()> {
    let exists = tokio::process::Command::new("docker")
        .args(["image", "inspect", BASE_IMAGE])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .context("running docker (is Docker installed?)")?;
    if exists.success() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    std::fs::copy("/bin/busybox", dir.path().join("busybox"))
        .context("copying /bin/busybox (Debian/Ubuntu: apt-get install busybox-static)")?;
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )?;
    let out = tokio::process::Command::new("docker")
        .args(["build", "-q", "-t", BASE_IMAGE, "."])
        .current_dir(dir.path())
        .output()
        .await
        .context("running docker build")?;
    ensure!(
        out.status.success(),
        "building {BASE_IMAGE}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Runs git in `dir`; its trimmed output.
fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=faults",
            "-c",
            "user.email=faults@example.org",
        ])
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .context("running git")?;
    ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A repository at `dir` with one commit of `files`.
fn repo(dir: &Path, files: &[(&str, &str)]) -> anyhow::Result<(String, String)> {
    std::fs::create_dir_all(dir)?;
    git(dir, &["init", "-q"])?;
    for (name, content) in files {
        std::fs::write(dir.join(name), content)?;
    }
    git(dir, &["add", "-A"])?;
    git(dir, &["commit", "-q", "-m", "faults"])?;
    Ok((
        format!("file://{}", dir.display()),
        git(dir, &["rev-parse", "HEAD"])?,
    ))
}

fn make_repos(dir: &Path) -> anyhow::Result<Repos> {
    let (code_url, code_commit) = repo(
        &dir.join("code"),
        &[(
            "run.sh",
            "echo \"attempt on $(hostname)\"\nsleep \"$1\"\nexit \"$2\"\n",
        )],
    )?;
    let (env_url, env_commit) = repo(
        &dir.join("env"),
        &[("Dockerfile", &format!("FROM {BASE_IMAGE}\n"))],
    )?;
    Ok(Repos {
        code_url,
        code_commit,
        env_url,
        env_commit,
    })
}

// ---------------------------------------------------------------------------
// Submitting tasks
// ---------------------------------------------------------------------------

/// Figures of the submitter.
#[derive(Default)]
struct Submitted {
    by_kind: std::sync::Mutex<BTreeMap<&'static str, usize>>,
    retries: AtomicUsize,
    given_up: AtomicUsize,
}

/// What the submitter needs.
struct Workload {
    http: reqwest::Client,
    /// The header `POST /tasks` takes an idempotency key in.
    key_header: String,
    url: String,
    token: String,
    project: Uuid,
    repos: Option<(String, String, String, String)>,
    every: Duration,
    max_open: usize,
    max_retries: u32,
    pool: PgPool,
    stop: Arc<AtomicBool>,
    figures: Arc<Submitted>,
}

impl Workload {
    /// Submits tasks until told to stop.
    async fn run(self, mut rng: StdRng) {
        let mut n: u64 = 0;
        while !self.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(self.every).await;
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM task_view WHERE state NOT IN ('succeeded', 'failed', 'timed_out', 'cancelled')",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0);
            if open as usize >= self.max_open {
                continue;
            }
            n += 1;
            let (kind, body) = self.task(&mut rng, n);
            self.submit(kind, body, n).await;
        }
    }

    /// One task, chosen at random: its kind and its body.
    fn task(&self, rng: &mut StdRng, n: u64) -> (&'static str, Value) {
        let roll = rng.gen_range(0..100);
        let key = format!("faults-{n}");
        let base = |labels: Value, command: Vec<String>, resources: Value| {
            json!({
                "project_id": self.project,
                "code_repo_url": "https://example.com/faults/code.git",
                "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
                "env_repo_url": "https://example.com/faults/env.git",
                "env_commit_id": "89abcdef0123456789abcdef0123456789abcdef",
                "dockerfile_path": "Dockerfile",
                "command": command,
                "env": { "FAULTS_SUBMISSION": key },
                "resources": resources,
                "labels": labels,
                "timeout_s": 600,
                "max_retries": self.max_retries,
            })
        };
        if let (Some((code_url, code_commit, env_url, env_commit)), true) = (&self.repos, roll < 20)
        {
            let exit = if rng.gen_bool(0.2) { 5 } else { 0 };
            let secs = rng.gen_range(1..=3);
            let mut body = base(
                json!({ "pool": "real" }),
                vec![
                    "sh".into(),
                    "run.sh".into(),
                    secs.to_string(),
                    exit.to_string(),
                ],
                json!({ "cpus": 0.5, "memory_mb": 64, "gpus": 0 }),
            );
            body["code_repo_url"] = json!(code_url);
            body["code_commit_id"] = json!(code_commit);
            body["env_repo_url"] = json!(env_url);
            body["env_commit_id"] = json!(env_commit);
            return ("real", body);
        }
        if roll < 55 {
            let exit = if rng.gen_bool(0.1) { 7 } else { 0 };
            let gpus = if rng.gen_bool(0.3) { 2 } else { 1 };
            let ms = rng.gen_range(1000..5000);
            return (
                "gpu",
                base(
                    json!({ "pool": "gpu" }),
                    vec!["sim".into(), ms.to_string(), exit.to_string()],
                    json!({ "cpus": 1, "memory_mb": 256, "gpus": gpus }),
                ),
            );
        }
        let exit = if rng.gen_bool(0.15) {
            rng.gen_range(1..=3)
        } else {
            0
        };
        let ms = rng.gen_range(300..3000);
        (
            "sim",
            base(
                json!({ "pool": "sim" }),
                vec!["sim".into(), ms.to_string(), exit.to_string()],
                json!({ "cpus": 1, "memory_mb": 256, "gpus": 0 }),
            ),
        )
    }

    /// Submits one task, again and again while the API is down (with the
    /// same idempotency key), for at most a minute.
    async fn submit(&self, kind: &'static str, body: Value, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sent = self
                .http
                .post(&self.url)
                .bearer_auth(&self.token)
                .header(self.key_header.as_str(), format!("faults-{n}"))
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    *self
                        .figures
                        .by_kind
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(kind)
                        .or_default() += 1;
                    return;
                }
                Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    eprintln!("faults: a {kind} task was refused: {status}: {text}");
                    self.figures.given_up.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                _ => {}
            }
            if Instant::now() > deadline || self.stop.load(Ordering::Relaxed) {
                self.figures.given_up.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.figures.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Rounds
// ---------------------------------------------------------------------------

/// What the rounds did.
#[derive(Default)]
struct Rounds {
    by_fault: BTreeMap<&'static str, usize>,
    violations: Vec<Violation>,
}

/// A random duration between `lo` and `hi` seconds.
fn secs(rng: &mut StdRng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(rng.gen_range(lo..hi))
}

/// Runs one fault; says what it did.
async fn inject(
    cluster: &mut Cluster,
    fault: Fault,
    rng: &mut StdRng,
    freeze: Duration,
    violations: &mut Vec<Violation>,
) -> anyhow::Result<String> {
    let offline = cluster.offline_after;
    Ok(match fault {
        Fault::KillAgent => {
            let n = cluster.reals.len() + cluster.sims.len();
            let i = rng.gen_range(0..n);
            let pause = secs(rng, 0.2, 2.0);
            if i < cluster.reals.len() {
                let r = &mut cluster.reals[i];
                r.proc.kill9().await?;
                tokio::time::sleep(pause).await;
                r.proc.start()?;
                format!(
                    "{} killed, started again after {:.1} s",
                    r.proc.name,
                    pause.as_secs_f64()
                )
            } else {
                let s = &mut cluster.sims[i - cluster.reals.len()];
                s.kill().await;
                tokio::time::sleep(pause).await;
                s.start();
                format!(
                    "{} killed, started again after {:.1} s",
                    s.name(),
                    pause.as_secs_f64()
                )
            }
        }
        Fault::KillIngress => {
            let pause = secs(rng, 0.0, 1.0);
            cluster.ingress.kill9().await?;
            tokio::time::sleep(pause).await;
            cluster.ingress.start()?;
            cluster.ingress_ready(Duration::from_secs(60)).await?;
            format!(
                "ingress killed, started again after {:.1} s",
                pause.as_secs_f64()
            )
        }
        Fault::StopIngress => {
            // An operator's restart: SIGTERM, which must end within 10 s
            // and say goodbye to every agent.
            let (took, status) = cluster.ingress.terminate(Duration::from_secs(30)).await?;
            cluster.ingress.start()?;
            cluster.ingress_ready(Duration::from_secs(60)).await?;
            if took > Duration::from_secs(10) || !status.success() {
                violations.push(Violation {
                    kind: "slow_shutdown",
                    detail: format!(
                        "the ingress took {:.1} s to stop on SIGTERM ({status})",
                        took.as_secs_f64()
                    ),
                });
            }
            format!(
                "ingress stopped (SIGTERM, exited in {:.2} s) and started again",
                took.as_secs_f64()
            )
        }
        Fault::KillLeader => {
            let i = cluster.leader().await.unwrap_or(0);
            let pause = secs(rng, 0.0, 1.0);
            cluster.schedulers[i].kill9().await?;
            tokio::time::sleep(pause).await;
            cluster.start_scheduler(i).await?;
            format!(
                "leader {} killed, started again after {:.1} s",
                cluster.schedulers[i].name,
                pause.as_secs_f64()
            )
        }
        Fault::KillProjector => {
            let pause = secs(rng, 0.0, 1.0);
            cluster.api.kill9().await?;
            tokio::time::sleep(pause).await;
            cluster.api.start()?;
            cluster.api_ready(Duration::from_secs(60)).await?;
            format!(
                "api+projector killed, started again after {:.1} s",
                pause.as_secs_f64()
            )
        }
        Fault::RestartPostgres => {
            let mode = if rng.gen_bool(0.5) {
                StopMode::Fast
            } else {
                StopMode::Immediate
            };
            let down = secs(rng, 0.0, offline.as_secs_f64() + 2.0);
            cluster.pg.halt(mode).await?;
            tokio::time::sleep(down).await;
            cluster.pg.resume().await?;
            format!(
                "PostgreSQL stopped ({mode:?}), down {:.1} s",
                down.as_secs_f64()
            )
        }
        Fault::PartitionLong | Fault::PartitionShort => {
            let how_long = if fault == Fault::PartitionLong {
                offline + secs(rng, 2.0, 5.0)
            } else {
                secs(rng, 1.0, (offline.as_secs_f64() / 3.0).max(1.5))
            };
            let cuttable: Vec<usize> = (0..cluster.reals.len())
                .filter(|i| cluster.reals[*i].netns.is_some())
                .collect();
            let n = cuttable.len() + cluster.sims.len();
            let i = rng.gen_range(0..n);
            if i < cuttable.len() {
                let r = &mut cluster.reals[cuttable[i]];
                if let Some(ns) = &mut r.netns {
                    ns.cut()?;
                    tokio::time::sleep(how_long).await;
                    ns.heal()?;
                }
                format!(
                    "{} cut off for {:.1} s",
                    r.proc.name,
                    how_long.as_secs_f64()
                )
            } else {
                let s = &cluster.sims[i - cuttable.len()];
                s.partition(how_long);
                tokio::time::sleep(how_long).await;
                format!("{} cut off for {:.1} s", s.name(), how_long.as_secs_f64())
            }
        }
        Fault::FreezeLeader => {
            let i = cluster.leader().await.unwrap_or(0);
            cluster.schedulers[i].freeze()?;
            tokio::time::sleep(freeze).await;
            cluster.schedulers[i].thaw()?;
            format!(
                "leader {} frozen for {:.1} s",
                cluster.schedulers[i].name,
                freeze.as_secs_f64()
            )
        }
    })
}

async fn rounds(
    cluster: &mut Cluster,
    cli: &Cli,
    rng: &mut StdRng,
    out: &mut Rounds,
) -> anyhow::Result<()> {
    let freeze = Duration::from_secs(cli.freeze_s.unwrap_or(cli.offline_after_s + 2));
    let faults: Vec<Fault> = if cli.faults.is_empty() {
        Fault::ALL.to_vec()
    } else {
        cli.faults.clone()
    };
    for round in 1..=cli.rounds {
        let fault = faults[rng.gen_range(0..faults.len())];
        let started = Instant::now();
        let at = Utc::now();
        let what = inject(cluster, fault, rng, freeze, &mut out.violations)
            .await
            .with_context(|| format!("round {round}: {}", fault.name()))?;
        *out.by_fault.entry(fault.name()).or_default() += 1;
        match cluster
            .await_whole(Duration::from_secs(cli.recover_s))
            .await
        {
            Ok(()) => println!(
                "round {round}/{} at {}: {what}; whole again {:.1} s after the fault began",
                cli.rounds,
                at.format("%H:%M:%S%.3f"),
                started.elapsed().as_secs_f64()
            ),
            Err(unwell) => {
                println!(
                    "round {round}/{} at {}: {what}; NOT whole after {} s: {unwell}",
                    cli.rounds,
                    at.format("%H:%M:%S%.3f"),
                    cli.recover_s
                );
                out.violations.push(Violation {
                    kind: "no_recovery",
                    detail: format!(
                        "round {round} ({}, {what}, began {at}): after {} s: {unwell}",
                        fault.name(),
                        cli.recover_s
                    ),
                });
                cluster.mend().await;
                if let Err(still) = cluster
                    .await_whole(Duration::from_secs(cli.recover_s))
                    .await
                {
                    bail!("the cluster stays broken after restarting what was down: {still}");
                }
            }
        }
        tokio::time::sleep(secs(rng, 0.5, 2.0)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

async fn run(cli: Cli) -> anyhow::Result<usize> {
    ensure!(
        cli.sim_agents + cli.gpu_agents + cli.real_agents >= 1,
        "at least one agent is needed"
    );
    ensure!(
        cli.netns_agents <= cli.real_agents,
        "--netns-agents must not exceed --real-agents"
    );
    raise_open_files();
    let seed = cli.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let (dir, temp) = match &cli.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("unidesk-faults-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    println!(
        "faults: seed {seed}, {} rounds, offline after {} s, heartbeat {} s; logs in {}",
        cli.rounds,
        cli.offline_after_s,
        cli.heartbeat_s,
        dir.display()
    );
    let began = Instant::now();
    let mut cluster = Cluster::start(&cli, &dir).await?;
    println!(
        "faults: cluster up in {:.1} s: {} real agents ({} in namespaces), {} simulated ({} with GPUs)",
        began.elapsed().as_secs_f64(),
        cli.real_agents,
        cli.netns_agents,
        cli.sim_agents + cli.gpu_agents,
        cli.gpu_agents
    );

    let key_header = cluster.idempotency_header().await;
    match &key_header {
        Some(h) => println!("faults: POST /tasks takes an idempotency key in {h}: a retried submission must make one task"),
        None => println!("faults: POST /tasks documents no idempotency key: retried submissions that made two tasks are counted, not judged"),
    }
    let stop = Arc::new(AtomicBool::new(false));
    let submitted = Arc::new(Submitted::default());
    let workload = Workload {
        key_header: key_header
            .clone()
            .unwrap_or_else(|| "Idempotency-Key".into()),
        http: cluster.http.clone(),
        url: format!("http://127.0.0.1:{}/api/v1/tasks", cluster.api_port),
        token: cluster.token.clone(),
        project: cluster.project,
        repos: cluster.repos.as_ref().map(|r| {
            (
                r.code_url.clone(),
                r.code_commit.clone(),
                r.env_url.clone(),
                r.env_commit.clone(),
            )
        }),
        every: Duration::from_millis(cli.submit_every_ms),
        max_open: cli.max_open_tasks,
        max_retries: cli.max_retries,
        pool: cluster.pool.clone(),
        stop: stop.clone(),
        figures: submitted.clone(),
    };
    let submitter = tokio::spawn(workload.run(StdRng::seed_from_u64(seed ^ 0x5eed)));

    let rounds_began = Instant::now();
    let mut out = Rounds::default();
    let outcome = rounds(&mut cluster, &cli, &mut rng, &mut out).await;
    stop.store(true, Ordering::Relaxed);
    let _ = submitter.await;
    if let Err(e) = outcome {
        println!("faults: the rounds stopped: {e:#}");
        return Err(e.context(format!("logs are in {}", dir.display())));
    }
    let rounds_secs = rounds_began.elapsed().as_secs_f64();

    // Quiet: every task ends.
    let quiet_began = Instant::now();
    let deadline = quiet_began + Duration::from_secs(cli.quiesce_s);
    loop {
        let open = cluster.open_tasks().await.unwrap_or(i64::MAX);
        if open == 0 {
            break;
        }
        if Instant::now() > deadline {
            println!("faults: {open} tasks still open after {} s", cli.quiesce_s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "faults: every task ended {:.1} s after the last round",
        quiet_began.elapsed().as_secs_f64()
    );

    let violations = finish(
        &mut cluster,
        &cli,
        &mut out,
        &submitted,
        rounds_secs,
        seed,
        key_header.is_some(),
    )
    .await?;
    let failed = violations > 0;
    cleanup(cluster).await;
    match temp {
        Some(t) if !failed => drop(t),
        Some(t) => {
            let kept = t.keep();
            println!("faults: logs kept in {}", kept.display());
        }
        None => {}
    }
    Ok(violations)
}

/// Stops the roles, audits, prints the figures; the number of violations.
async fn finish(
    cluster: &mut Cluster,
    cli: &Cli,
    out: &mut Rounds,
    submitted: &Submitted,
    rounds_secs: f64,
    seed: u64,
    idempotent: bool,
) -> anyhow::Result<usize> {
    // Agents, ingress and schedulers stop; the projector catches up.
    for s in &mut cluster.sims {
        s.stop().await;
    }
    for r in &mut cluster.reals {
        let _ = r.proc.terminate(Duration::from_secs(30)).await;
    }
    let _ = cluster.ingress.terminate(Duration::from_secs(30)).await;
    for s in &mut cluster.schedulers {
        let _ = s.terminate(Duration::from_secs(30)).await;
    }
    let projector = projections::Projector::new(cluster.pool.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lag: i64 = projector
            .status()
            .await
            .map(|s| s.iter().map(|x| x.lag).sum())
            .unwrap_or(i64::MAX);
        if lag == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the projector did not catch up within 60 s (lag {lag})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let journals: Vec<_> = cluster
        .sims
        .iter()
        .map(|s| (s.name().to_string(), s.journal().clone()))
        .collect();
    let view = audit::SimView {
        journals: journals.iter().map(|(n, j)| (n.clone(), j)).collect(),
        offline_after: chrono::Duration::from_std(cluster.offline_after)?,
        beat_gap: chrono::Duration::from_std(cluster.heartbeat * 2 + Duration::from_secs(1))?,
    };
    let (figures, mut violations) = audit::audit_log(&cluster.pool, &view).await?;
    let acked: usize = view.journals.iter().map(|(_, j)| j.acked.len()).sum();
    let refused: usize = view.journals.iter().map(|(_, j)| j.refused.len()).sum();
    drop(view);
    drop(journals);
    violations.extend(audit::audit_replay(&cluster.pool).await?);
    let doubled = duplicates(&cluster.pool).await?;
    let doubled_count = doubled.len();
    if idempotent {
        violations.extend(doubled);
    }
    let live = audit::read_models(&cluster.pool).await?;
    let rebuild = tokio::process::Command::new(&cluster.unidesk)
        .args(["projections", "rebuild"])
        .env("DATABASE_URL", cluster.pg.url())
        .output()
        .await
        .context("running unidesk projections rebuild")?;
    ensure!(
        rebuild.status.success(),
        "unidesk projections rebuild failed: {}",
        String::from_utf8_lossy(&rebuild.stderr)
    );
    let rebuilt = audit::read_models(&cluster.pool).await?;
    violations.extend(audit::compare_read_models(&live, &rebuilt));
    out.violations.extend(violations);

    let by_kind = |m: &BTreeMap<&'static str, usize>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for v in &out.violations {
        *counts.entry(v.kind).or_default() += 1;
    }
    let kinds = submitted
        .by_kind
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    println!();
    println!(
        "faults: {} rounds in {rounds_secs:.0} s (seed {seed}); faults: {}",
        cli.rounds,
        by_kind(&out.by_fault)
    );
    println!(
        "faults: tasks: {} in the log ({} submitted: {}; {} submit retries, {} given up)",
        figures.tasks,
        kinds.values().sum::<usize>(),
        by_kind(&kinds),
        submitted.retries.load(Ordering::Relaxed),
        submitted.given_up.load(Ordering::Relaxed)
    );
    println!(
        "faults: outcomes: {}",
        figures
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "faults: attempts {}, lost {}, nodes marked offline {}, events {}; simulated agents: {acked} reports answered received, {refused} refused; {doubled_count} retried submissions made two tasks",
        figures.attempts, figures.lost, figures.offline, figures.events
    );
    if out.violations.is_empty() {
        println!("faults: violations: none");
    } else {
        let export = cluster.dir.join("events.jsonl");
        let exported = tokio::process::Command::new(&cluster.unidesk)
            .args(["events", "export", "--output"])
            .arg(&export)
            .env("DATABASE_URL", cluster.pg.url())
            .output()
            .await;
        if exported.is_ok_and(|o| o.status.success()) {
            println!(
                "faults: the whole log is in {} (`unidesk events import` loads it into an empty database)",
                export.display()
            );
        }
        println!(
            "faults: violations: {} ({})",
            out.violations.len(),
            by_kind(&counts)
        );
        let mut shown: HashMap<&str, usize> = HashMap::new();
        for v in &out.violations {
            let n = shown.entry(v.kind).or_default();
            *n += 1;
            if *n <= 5 {
                println!("  {}: {}", v.kind, v.detail);
            }
        }
        println!(
            "faults: to run the same faults again: unidesk-faults --rounds {} --seed {seed} --offline-after-s {} --heartbeat-s {}{}",
            cli.rounds,
            cli.offline_after_s,
            cli.heartbeat_s,
            if cli.faults.is_empty() {
                String::new()
            } else {
                format!(" --faults {}", cli.faults.iter().map(|f| f.name()).collect::<Vec<_>>().join(","))
            }
        );
    }
    Ok(out.violations.len())
}

/// Submissions that made more than one task (the same idempotency key,
/// carried in the task's environment).
async fn duplicates(pool: &PgPool) -> Result<Vec<Violation>, sqlx::Error> {
    let rows: Vec<(String, i64, Vec<String>)> = sqlx::query_as(
        "SELECT payload->'Submitted'->'spec'->'env'->>'FAULTS_SUBMISSION' AS key, count(*), array_agg(aggregate_id) \
         FROM events WHERE aggregate_type = 'task' AND event_type = 'TaskSubmitted' \
         GROUP BY 1 HAVING count(*) > 1 AND payload->'Submitted'->'spec'->'env'->>'FAULTS_SUBMISSION' IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(key, n, ids)| Violation {
            kind: "duplicate_submission",
            detail: format!(
                "submission {key} (one POST /tasks, retried with its Idempotency-Key) made {n} tasks: {}",
                ids.join(", ")
            ),
        })
        .collect())
}

/// Stops what is left and removes the Docker containers of the run.
async fn cleanup(mut cluster: Cluster) {
    let _ = cluster.api.terminate(Duration::from_secs(30)).await;
    for r in &mut cluster.reals {
        if r.proc.running() {
            let _ = r.proc.kill9().await;
        }
    }
    if !cluster.reals.is_empty() {
        let tasks: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT aggregate_id FROM events WHERE aggregate_type = 'task'",
        )
        .fetch_all(&cluster.pool)
        .await
        .unwrap_or_default();
        let listed = tokio::process::Command::new("docker")
            .args([
                "ps",
                "-a",
                "--format",
                "{{.ID}} {{.Label \"unidesk.task_id\"}}",
            ])
            .output()
            .await;
        if let Ok(listed) = listed {
            let ids: Vec<String> = String::from_utf8_lossy(&listed.stdout)
                .lines()
                .filter_map(|l| l.split_once(' '))
                .filter(|(_, task)| tasks.iter().any(|t| t == task))
                .map(|(id, _)| id.to_string())
                .collect();
            if !ids.is_empty() {
                let _ = tokio::process::Command::new("docker")
                    .arg("rm")
                    .arg("-f")
                    .args(&ids)
                    .output()
                    .await;
            }
        }
        if let Some(r) = &cluster.repos {
            let tag = protocol::env_image_tag(&r.env_url, &r.env_commit, "Dockerfile");
            let _ = tokio::process::Command::new("docker")
                .args(["rmi", "-f", &tag])
                .output()
                .await;
        }
    }
    cluster.pool.close().await;
    let _ = cluster.pg.stop().await;
    // The namespaces go with the agents.
    cluster.reals.clear();
}

/// Raises the soft limit of open files to the hard one: agents, sessions
/// and database connections add up.
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
