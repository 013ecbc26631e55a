//! `unidesk-loadgen`: the whole platform under load, driven from outside
//! exactly as users and nodes drive it: tasks through the REST API, and
//! simulated agents that speak the real protocol over real WebSockets.
//!
//! ```text
//! unidesk-loadgen lifecycle --agents 100 --tasks 5000   # submit → succeeded, tasks/s
//! unidesk-loadgen latency --rate 20 --seconds 30 --agents 10   # submit → run_task, ms
//! unidesk-loadgen idle --agents 10000 --procs 5   # server memory per idle agent
//! unidesk-loadgen shutdown --agents 10000 --procs 5   # SIGTERM → exit of a busy ingress
//! unidesk-loadgen postgres   # a throw-away PostgreSQL for ops/bench.sh, until SIGTERM
//! ```
//!
//! By default each measurement starts everything itself: a private
//! PostgreSQL cluster and `unidesk serve` with every role, from the same
//! target directory as this binary. `--server URL --admin-token T` points it
//! at a running server instead.
//!
//! The simulated agents complete tasks instantly: on `run_task` they ack and
//! report `accepted`, `running` and `succeeded` back to back, so what is
//! measured is the platform's own work: five events per task, the
//! scheduler's placement, the outbox fan-out and the projections.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use clap::{Args, Parser, Subcommand};
use futures::{SinkExt, StreamExt, TryStreamExt};
use nix::sys::signal::Signal;
use protocol::{AgentMessage, Command, Hello, ReportedState, Resources, ServerMessage, Status};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use testkit::process::{Launch, ServerProcess};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header::AUTHORIZATION, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

/// Drive a UniDesk server with REST clients and simulated agents.
#[derive(Debug, Parser)]
#[command(name = "unidesk-loadgen", about)]
struct Cli {
    /// What to measure.
    #[command(subcommand)]
    mode: Mode,
}

/// What to measure.
#[derive(Debug, Subcommand)]
enum Mode {
    /// Full task lifecycles (submit → succeeded) per second.
    Lifecycle(LifecycleArgs),
    /// Submit → run_task delivery latency at a steady submission rate.
    Latency(LatencyArgs),
    /// Server memory per idle connected agent.
    Idle(IdleArgs),
    /// How fast an ingress with thousands of agents stops on SIGTERM, and
    /// that it loses nothing it acknowledged.
    Shutdown(ShutdownArgs),
    /// Start a throw-away PostgreSQL cluster, print its URLs and keep it
    /// running until SIGTERM or Ctrl-C (for ops/bench.sh).
    Postgres(PostgresArgs),
    /// `GET /events/{position}` on a node with a long history: its state
    /// before and after one event, read from the nearest snapshot.
    EventView(EventViewArgs),
    /// One process's share of `idle`'s agents (started by `idle` itself).
    #[command(hide = true)]
    IdleWorker(IdleWorkerArgs),
    /// One process's share of `shutdown`'s agents (started by `shutdown`).
    #[command(hide = true)]
    ShutdownWorker(ShutdownWorkerArgs),
}

/// Which server to drive.
#[derive(Debug, Args)]
struct Target {
    /// A running server's base URL, such as http://127.0.0.1:8080; without
    /// it a private PostgreSQL and `unidesk serve` are started.
    #[arg(long, requires = "admin_token")]
    server: Option<String>,
    /// An admin token of that server.
    #[arg(long, env = "UNIDESK_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// The pid of that server, to read its memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Where the started server writes its log (kept); by default a
    /// temporary file, summarised and deleted at the end.
    #[arg(long)]
    server_log: Option<PathBuf>,
    /// `--heartbeat-s` of the started server.
    #[arg(long, default_value_t = 15)]
    heartbeat_s: u64,
    /// One more flag for the started `unidesk serve`; repeatable.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
}

/// Flags of `lifecycle`.
#[derive(Debug, Args)]
struct LifecycleArgs {
    #[command(flatten)]
    target: Target,
    /// Simulated agents.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Tasks to run.
    #[arg(long, default_value_t = 5000)]
    tasks: usize,
    /// Concurrent REST submitters.
    #[arg(long, default_value_t = 16)]
    submitters: usize,
    /// Give up when the tasks have not all succeeded after this long.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

/// Flags of `latency`.
#[derive(Debug, Args)]
struct LatencyArgs {
    #[command(flatten)]
    target: Target,
    /// Tasks submitted per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// For how long.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Simulated agents.
    #[arg(long, default_value_t = 10)]
    agents: usize,
    /// Seconds of submissions at the same rate before the measured ones,
    /// run to success but counted apart: a freshly started server's first
    /// requests open its pool's connections and prepare its statements,
    /// which says nothing of the steady state.
    #[arg(long, default_value_t = 0)]
    warmup_s: u64,
    /// Also list this many of the slowest deliveries, each with when it
    /// was submitted (from the first submit) and its POST's round trip,
    /// to match stalls against what the server did then.
    #[arg(long, default_value_t = 0)]
    slowest: usize,
}

/// Flags of `idle`.
#[derive(Debug, Args)]
struct IdleArgs {
    #[command(flatten)]
    target: Target,
    /// Idle agents to connect.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Processes to spread them over (each may hold at most 20,000 files).
    #[arg(long, default_value_t = 5)]
    procs: usize,
    /// How long the agents stay connected and idle before memory is read.
    #[arg(long, default_value_t = 20)]
    settle_s: u64,
    /// Nodes provisioned concurrently through the API.
    #[arg(long, default_value_t = 32)]
    provisioners: usize,
}

/// Flags of `shutdown`.
#[derive(Debug, Args)]
struct ShutdownArgs {
    /// Agents connected to the ingress when it gets SIGTERM.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Processes to spread them over (each may hold at most 20,000 files).
    #[arg(long, default_value_t = 5)]
    procs: usize,
    /// Tasks running on the agents; their agents report them succeeded
    /// right before the SIGTERM, so reports are in flight during it.
    #[arg(long, default_value_t = 1000)]
    tasks: usize,
    /// Milliseconds between telling the agents to report and the SIGTERM.
    #[arg(long, default_value_t = 20)]
    lead_ms: u64,
    /// Seconds the ingress may take to exit; longer fails the run.
    #[arg(long, default_value_t = 10.0)]
    budget_s: f64,
    /// Nodes provisioned concurrently through the API.
    #[arg(long, default_value_t = 32)]
    provisioners: usize,
    /// Where to keep the servers' logs; by default a temporary directory,
    /// summarised and deleted at the end.
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

/// Flags of the hidden `shutdown-worker`: like `idle-worker`, and where to
/// write the reports the server answered.
#[derive(Debug, Args)]
struct ShutdownWorkerArgs {
    #[command(flatten)]
    idle: IdleWorkerArgs,
    /// The file to write `<task> <attempt> <state>` to, one line for each
    /// report answered `received` without an error.
    #[arg(long)]
    acked: PathBuf,
}

/// Flags of `postgres`.
#[derive(Debug, Args)]
struct EventViewArgs {
    /// Events of the one node, appended through the event store before
    /// measuring.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Requests timed, spread over the node's history.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// The server's log, kept.
    #[arg(long)]
    server_log: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct PostgresArgs {
    /// A second, empty database to create, for tools that want one.
    #[arg(long, default_value = "scratch")]
    scratch: String,
}

/// Flags of the hidden `idle-worker`; agent tokens arrive on stdin, one a
/// line, ended by a line `go`.
#[derive(Debug, Args)]
struct IdleWorkerArgs {
    /// The server's TCP address.
    #[arg(long)]
    connect: SocketAddr,
    /// The agent WebSocket URL.
    #[arg(long)]
    ws_url: String,
    /// The first source address of this worker, counted from 127.0.0.2.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Handshakes in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Lifecycle(args) => lifecycle(args).await,
        Mode::Latency(args) => latency(args).await,
        Mode::Idle(args) => idle(args).await,
        Mode::Postgres(args) => postgres(args).await,
        Mode::EventView(args) => event_view(args).await,
        Mode::IdleWorker(args) => idle_worker(args).await,
        Mode::Shutdown(args) => shutdown(args).await,
        Mode::ShutdownWorker(args) => shutdown_worker(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("unidesk-loadgen: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------

/// The server being driven, and what this process started for it.
struct Server {
    /// Base URL, `http://host:port`.
    base: String,
    /// An admin's bearer token.
    admin_token: String,
    /// The server process, when known.
    pid: Option<u32>,
    /// What was started for it, stopped by [`Server::finish`].
    own: Option<OwnServer>,
}

/// A server started by this process, with its database.
struct OwnServer {
    /// `unidesk serve`.
    process: ServerProcess,
    /// Its database, stopped after it.
    cluster: pgcluster::LocalCluster,
    /// Its stdout and stderr.
    log: PathBuf,
    /// Holds the log unless `--server-log` was given.
    _dir: tempfile::TempDir,
}

impl Server {
    /// Connects to `--server`, or starts PostgreSQL and `unidesk serve`
    /// and waits until it is ready.
    async fn start(target: &Target) -> anyhow::Result<Server> {
        if let Some(base) = &target.server {
            let admin_token = target
                .admin_token
                .clone()
                .context("--server needs --admin-token")?;
            return Ok(Server {
                base: base.trim_end_matches('/').to_string(),
                admin_token,
                pid: target.server_pid,
                own: None,
            });
        }
        let exe = std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("unidesk");
        ensure!(
            exe.is_file(),
            "{} not found: build it next to this binary (cargo build --release -p unidesk)",
            exe.display()
        );
        let cluster = pgcluster::LocalCluster::start_ephemeral()
            .await
            .context("starting a private PostgreSQL")?;
        let dir = tempfile::Builder::new()
            .prefix("unidesk-loadgen-")
            .tempdir()
            .context("creating a temporary directory")?;
        let log = target
            .server_log
            .clone()
            .unwrap_or_else(|| dir.path().join("server.log"));
        let process = Launch::serve(&exe)
            .args(["--roles", "api,projector,ingress,scheduler"])
            .args(["--heartbeat-s", &target.heartbeat_s.to_string()])
            // A load generator is one client sending as fast as it can.
            .args(["--rate-limit-per-s", "0"])
            .args(&target.serve_args)
            .env("DATABASE_URL", cluster.url())
            .log_to(&log)
            .ready_within(Duration::from_secs(60))
            .start()
            .await
            .with_context(|| {
                format!(
                    "starting the server; the end of its log:\n{}",
                    tail(&log, 20)
                )
            })?;
        Ok(Server {
            base: process.base().to_string(),
            admin_token: process.token().to_string(),
            pid: process.pid(),
            own: Some(OwnServer {
                process,
                cluster,
                log,
                _dir: dir,
            }),
        })
    }

    /// The REST client of this server, as its admin.
    fn api(&self) -> anyhow::Result<Api> {
        Ok(Api {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .timeout(Duration::from_secs(120))
                .build()
                .context("building the HTTP client")?,
            base: format!("{}/api/v1", self.base),
            token: self.admin_token.clone(),
        })
    }

    /// Where agents connect: the TCP address and the WebSocket URL.
    async fn agent_endpoint(&self) -> anyhow::Result<Endpoint> {
        let url = reqwest::Url::parse(&self.base).context("parsing the server URL")?;
        ensure!(
            url.scheme() == "http",
            "the simulated agents speak plain ws://; give the server's http:// address"
        );
        let host = url.host_str().context("the server URL has no host")?;
        let port = url.port_or_known_default().unwrap_or(80);
        let addr = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{host} has no IPv4 address"))?;
        Ok(Endpoint {
            addr,
            ws_url: format!("ws://{host}:{port}{}", protocol::PATH),
        })
    }

    /// The server's resident memory in KiB, when its pid is known.
    fn rss_kib(&self) -> anyhow::Result<Option<u64>> {
        self.pid.map(rss_kib).transpose()
    }

    /// Stops what this process started, and summarises the server's log.
    async fn finish(self) -> anyhow::Result<()> {
        let Some(mut own) = self.own else {
            return Ok(());
        };
        let asked = Instant::now();
        match own
            .process
            .signal_and_wait(Signal::SIGTERM, Duration::from_secs(60))
            .await
        {
            Ok(status) => {
                let secs = asked.elapsed().as_secs_f64();
                if !status.success() || secs > 6.0 {
                    println!("server: stopped {secs:.1} s after SIGTERM ({status})");
                }
            }
            Err(e) => println!("server: {e}"),
        }
        println!("{}", summarise_log(&own.log));
        own.cluster
            .stop()
            .await
            .context("stopping the private PostgreSQL")?;
        Ok(())
    }
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// The last `n` lines of a file, for error messages.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Counts the server log's warnings and errors and names the commonest.
fn summarise_log(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return format!("server log: {} unreadable", path.display());
    };
    let mut kinds: BTreeMap<(String, String), usize> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(level) = words.nth(1).filter(|l| *l == "WARN" || *l == "ERROR") else {
            continue;
        };
        // The message: the words after the target, up to the first field.
        let what: Vec<&str> = words.skip(1).take_while(|w| !w.contains('=')).collect();
        *kinds
            .entry((level.to_string(), what.join(" ")))
            .or_default() += 1;
    }
    let count = |level: &str| -> usize {
        kinds
            .iter()
            .filter(|((l, _), _)| l == level)
            .map(|(_, n)| n)
            .sum()
    };
    let mut out = format!(
        "server log: {} lines, {} WARN, {} ERROR ({})",
        text.lines().count(),
        count("WARN"),
        count("ERROR"),
        path.display()
    );
    let mut commonest: Vec<_> = kinds.into_iter().collect();
    commonest.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    for ((level, what), n) in commonest.into_iter().take(8) {
        out.push_str(&format!("\n  {n:>7} × {level} {what}"));
    }
    out
}

// ---------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------

/// The REST API as an admin.
#[derive(Clone)]
struct Api {
    /// One connection pool for every request.
    http: reqwest::Client,
    /// `http://host:port/api/v1`.
    base: String,
    /// The admin's bearer token.
    token: String,
}

/// The `id` of something created.
#[derive(Debug, Deserialize)]
struct Created {
    /// Its id.
    id: Uuid,
}

/// A provisioned node's agent token.
#[derive(Debug, Deserialize)]
struct Provisioned {
    /// Shown this once.
    token: String,
}

/// A page of `GET /tasks`.
#[derive(Debug, Deserialize)]
struct TaskPage {
    /// The tasks on this page.
    items: Vec<TaskItem>,
    /// The next page, if any.
    next_cursor: Option<String>,
}

/// A task as listed.
#[derive(Debug, Deserialize)]
struct TaskItem {
    /// `queued`, `assigned`, ..., `succeeded`.
    state: String,
}

/// A page of `GET /nodes`.
#[derive(Debug, Deserialize)]
struct NodeList {
    /// The page's nodes.
    items: Vec<NodeItem>,
    /// Where the next page starts; absent on the last one.
    next_cursor: Option<String>,
}

/// A node as listed.
#[derive(Debug, Deserialize)]
struct NodeItem {
    /// Its unique name.
    name: String,
    /// `provisioned`, `online`, `offline` or `revoked`.
    status: String,
}

impl Api {
    /// The server's `unidesk_aggregate_loads_total` by aggregate type, read
    /// from `{base}/metrics`.
    async fn aggregate_loads(&self, base: &str) -> anyhow::Result<BTreeMap<String, f64>> {
        let text = self
            .http
            .get(format!("{base}/metrics"))
            .bearer_auth(&self.token)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .context("reading the server's metrics")?
            .text()
            .await
            .context("reading the server's metrics")?;
        let prefix = "unidesk_aggregate_loads_total{aggregate_type=\"";
        Ok(text
            .lines()
            .filter_map(|line| {
                let (kind, value) = line.strip_prefix(prefix)?.split_once("\"} ")?;
                Some((kind.to_string(), value.trim().parse().ok()?))
            })
            .collect())
    }

    /// Sends `request` with the admin token and decodes a 2xx answer.
    async fn call<T: DeserializeOwned>(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("{what}: sending"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("{what}: {status}: {body}");
        }
        response
            .json()
            .await
            .with_context(|| format!("{what}: decoding the answer"))
    }

    /// `POST /projects`.
    async fn create_project(&self, name: &str) -> anyhow::Result<Uuid> {
        let request = self
            .http
            .post(format!("{}/projects", self.base))
            .json(&json!({ "name": name }));
        Ok(self
            .call::<Created>("creating a project", request)
            .await?
            .id)
    }

    /// `POST /nodes`.
    async fn provision(&self, name: &str, run: &str) -> anyhow::Result<Provisioned> {
        let request = self
            .http
            .post(format!("{}/nodes", self.base))
            .json(&json!({ "name": name, "labels": { "loadgen": run } }));
        self.call("provisioning a node", request).await
    }

    /// `POST /tasks`: a task only this run's agents match.
    async fn submit(&self, project: Uuid, run: &str) -> anyhow::Result<Uuid> {
        let request = self.http.post(format!("{}/tasks", self.base)).json(&json!({
            "project_id": project,
            "code_repo_url": "https://example.com/loadgen/code.git",
            "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
            "env_repo_url": "https://example.com/loadgen/env.git",
            "env_commit_id": "89abcdef0123456789abcdef0123456789abcdef",
            "dockerfile_path": "Dockerfile",
            "command": ["true"],
            "resources": { "cpus": 1, "memory_mb": 256, "gpus": 0 },
            "labels": { "loadgen": run },
        }));
        Ok(self.call::<Created>("submitting a task", request).await?.id)
    }

    /// How many of a project's tasks the task list shows in each state.
    async fn task_states(&self, project: Uuid) -> anyhow::Result<BTreeMap<String, usize>> {
        let mut states = BTreeMap::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![("project", project.to_string()), ("limit", "500".into())];
            if let Some(c) = cursor.take() {
                query.push(("cursor", c));
            }
            let request = self.http.get(format!("{}/tasks", self.base)).query(&query);
            let page: TaskPage = self.call("listing tasks", request).await?;
            for t in page.items {
                *states.entry(t.state).or_insert(0) += 1;
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(states),
            }
        }
    }

    /// `GET /tasks/{id}`: a task's state, from its own events.
    async fn task_state(&self, id: Uuid) -> anyhow::Result<String> {
        let request = self.http.get(format!("{}/tasks/{id}", self.base));
        Ok(self
            .call::<TaskItem>("reading a task", request)
            .await?
            .state)
    }

    /// How many nodes whose name starts with `prefix` are online.
    async fn online(&self, prefix: &str) -> anyhow::Result<usize> {
        let mut online = 0;
        let mut cursor: Option<String> = None;
        loop {
            let mut request = self
                .http
                .get(format!("{}/nodes", self.base))
                .query(&[("limit", "500")]);
            if let Some(c) = &cursor {
                request = request.query(&[("cursor", c)]);
            }
            let page: NodeList = self.call("listing nodes", request).await?;
            online += page
                .items
                .iter()
                .filter(|n| n.name.starts_with(prefix) && n.status == "online")
                .count();
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(online),
            }
        }
    }
}

/// One run's names and labels, so runs against one server do not mix.
struct Run {
    /// Labels this run's nodes and tasks.
    id: String,
    /// The project its tasks go to.
    project: Uuid,
    /// Node names are `<prefix><n>`.
    prefix: String,
}

impl Run {
    /// Creates the run's project.
    async fn create(api: &Api) -> anyhow::Result<Run> {
        let id = Uuid::new_v4().simple().to_string()[..8].to_string();
        let project = api.create_project(&format!("loadgen-{id}")).await?;
        Ok(Run {
            prefix: format!("lg-{id}-"),
            id,
            project,
        })
    }

    /// Provisions `n` nodes, `concurrency` at a time; returns their tokens.
    async fn provision(
        &self,
        api: &Api,
        n: usize,
        concurrency: usize,
    ) -> anyhow::Result<Vec<String>> {
        let started = Instant::now();
        let done = AtomicUsize::new(0);
        let tokens: Vec<String> = futures::stream::iter(0..n)
            .map(|i| {
                let done = &done;
                async move {
                    let node = api
                        .provision(&format!("{}{i}", self.prefix), &self.id)
                        .await?;
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if d.is_multiple_of(2000) {
                        eprintln!("  provisioned {d}/{n}");
                    }
                    anyhow::Ok(node.token)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .try_collect()
            .await?;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "provisioned {n} nodes through the API in {secs:.1} s = {:.0} nodes/s ({concurrency} in flight)",
            n as f64 / secs
        );
        Ok(tokens)
    }

    /// Waits until the node list shows `n` of this run's nodes online, or
    /// `within` has passed; returns how many it last showed.
    async fn await_online(&self, api: &Api, n: usize, within: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            let online = api.online(&self.prefix).await?;
            if online >= n || Instant::now() > deadline {
                return Ok(online);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the task list (a read model) shows all `n` of the run's
    /// tasks succeeded, and returns how long that took; then asks the tasks
    /// themselves (read from the log) for a sample of `sample`.
    async fn await_succeeded(
        &self,
        api: &Api,
        n: usize,
        sample: &[Uuid],
    ) -> anyhow::Result<Duration> {
        for id in sample {
            let state = api.task_state(*id).await?;
            ensure!(state == "succeeded", "task {id} is {state}, not succeeded");
        }
        let started = Instant::now();
        let deadline = started + Duration::from_secs(300);
        loop {
            let states = api.task_states(self.project).await?;
            let succeeded = states.get("succeeded").copied().unwrap_or(0);
            let total: usize = states.values().sum();
            if succeeded == n && total == n {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("after 300 s the task list shows {states:?} instead of {n} succeeded");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Simulated agents
// ---------------------------------------------------------------------------

/// Where agents connect.
#[derive(Debug, Clone)]
struct Endpoint {
    /// The server's TCP address.
    addr: SocketAddr,
    /// `ws://host:port/agent/v1/ws`.
    ws_url: String,
}

/// An agent's WebSocket.
type Ws = WebSocketStream<TcpStream>;

/// What the agents saw, shared by all of them.
#[derive(Default)]
struct Probe {
    /// When each task's first `run_task` arrived.
    run_task_at: Mutex<HashMap<Uuid, Instant>>,
    /// `run_task` commands seen again.
    resent: AtomicUsize,
    /// `succeeded` reports the server answered with `received`.
    succeeded: AtomicUsize,
    /// When the last of those answers arrived.
    last_succeeded: Mutex<Option<Instant>>,
    /// Reports the server refused for good.
    refused: AtomicUsize,
    /// Agents through `welcome`.
    connected: AtomicUsize,
    /// Agents that never got through `welcome`.
    failed: AtomicUsize,
    /// Agents whose session ended before they were told to stop.
    dropped: AtomicUsize,
    /// The first few problems, for the report.
    problems: Mutex<Vec<String>>,
}

impl Probe {
    /// Remembers a problem (the first few only).
    fn problem(&self, what: String) {
        let mut problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        if problems.len() < 5 {
            problems.push(what);
        }
    }

    /// The problems remembered, one a line.
    fn problems(&self) -> String {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n  ")
    }

    /// A `run_task` arrived for `task` at `at`.
    fn run_task(&self, task: Uuid, at: Instant) {
        self.run_task_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(task)
            .or_insert(at);
    }

    /// A `succeeded` report was answered at `at`.
    fn succeeded(&self, at: Instant) {
        *self
            .last_succeeded
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(at);
        self.succeeded.fetch_add(1, Ordering::Release);
    }
}

/// Opens a WebSocket to `endpoint` as the node of `token`, from `source`
/// when given, with 4 KiB buffers so thousands fit in one process.
async fn connect(endpoint: &Endpoint, token: &str, source: Option<Ipv4Addr>) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4().context("creating a socket")?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::from((ip, 0)))
            .with_context(|| format!("binding to {ip}"))?;
    }
    let stream = socket
        .connect(endpoint.addr)
        .await
        .with_context(|| format!("connecting to {}", endpoint.addr))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let mut request = endpoint
        .ws_url
        .as_str()
        .into_client_request()
        .context("building the upgrade request")?;
    request.headers_mut().insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).context("token header")?,
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096);
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .context("WebSocket handshake")?;
    Ok(ws)
}

/// Says `hello` as a big node and waits for `welcome`; returns the
/// heartbeat interval it names.
async fn hello(ws: &mut Ws) -> anyhow::Result<Duration> {
    let hello = AgentMessage::Hello(Hello {
        agent_version: "loadgen".into(),
        resources: Resources {
            cpus: 64.0,
            memory_mb: 256 * 1024,
            gpus: Vec::new(),
        },
        ..Hello::default()
    });
    ws.send(Message::text(protocol::encode(&hello)))
        .await
        .context("sending hello")?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                match protocol::decode::<ServerMessage>(text.as_str()).context("decoding")? {
                    ServerMessage::Welcome { heartbeat_s, .. } => {
                        return Ok(Duration::from_secs(heartbeat_s.max(1)))
                    }
                    ServerMessage::Error { code, message } => bail!("refused: {code}: {message}"),
                    other => bail!("expected welcome, got {other:?}"),
                }
            }
            Some(Ok(Message::Close(frame))) => bail!("closed before welcome: {frame:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("reading welcome"),
            None => bail!("closed before welcome"),
        }
    }
}

/// Connects and says hello, trying a few times: a server busy with
/// thousands of handshakes may turn some away.
async fn join(
    endpoint: &Endpoint,
    token: &str,
    source: Option<Ipv4Addr>,
) -> anyhow::Result<(Ws, Duration)> {
    let mut last = None;
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        let tried = tokio::time::timeout(Duration::from_secs(30), async {
            let mut ws = connect(endpoint, token, source).await?;
            let heartbeat = hello(&mut ws).await?;
            anyhow::Ok((ws, heartbeat))
        })
        .await;
        match tried {
            Ok(Ok(joined)) => return Ok(joined),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(anyhow::anyhow!("no welcome within 30 s")),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
}

/// One agent's session after `welcome`: heartbeats, and instant success
/// for every `run_task`, until `stop` or the server ends it.
struct Agent {
    /// The session's socket.
    ws: Ws,
    /// Where it records what it sees.
    probe: Arc<Probe>,
    /// The next report id.
    next_id: u64,
    /// Ids of `succeeded` reports not answered yet.
    unanswered: HashSet<u64>,
    /// Commands already handled.
    seen: HashSet<Uuid>,
}

impl Agent {
    /// Serves until `stop` turns true (then closes cleanly) or the session
    /// ends (an error). The first heartbeat comes after `first_beat`, so
    /// thousands of agents do not beat in step.
    async fn serve(
        mut self,
        heartbeat: Duration,
        first_beat: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut beat = tokio::time::interval_at(Instant::now() + first_beat, heartbeat);
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seq = 0;
        loop {
            tokio::select! {
                () = async { let _ = stop.wait_for(|s| *s).await; } => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
                    return Ok(());
                }
                _ = beat.tick() => {
                    seq += 1;
                    let frame = protocol::encode(&AgentMessage::Heartbeat { seq });
                    self.ws.send(Message::text(frame)).await.context("sending a heartbeat")?;
                }
                message = self.ws.next() => match message {
                    Some(Ok(Message::Text(text))) => self.handle(text.as_str()).await?,
                    Some(Ok(Message::Close(frame))) => bail!("closed by the server: {frame:?}"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e).context("reading"),
                    None => bail!("the connection ended"),
                },
            }
        }
    }

    /// Handles one server frame.
    async fn handle(&mut self, text: &str) -> anyhow::Result<()> {
        let now = Instant::now();
        match protocol::decode::<ServerMessage>(text).context("decoding a server frame")? {
            ServerMessage::Command {
                command_id,
                command,
            } => {
                let fresh = self.seen.insert(command_id);
                self.feed(&AgentMessage::Ack { command_id }).await?;
                match command {
                    Command::RunTask(run) if fresh => {
                        self.probe.run_task(run.task_id, now);
                        for state in [
                            ReportedState::Accepted,
                            ReportedState::Running,
                            ReportedState::Succeeded,
                        ] {
                            self.report(run.task_id, run.attempt, state).await?;
                        }
                    }
                    Command::RunTask(_) => {
                        self.probe.resent.fetch_add(1, Ordering::Relaxed);
                    }
                    Command::CancelTask { .. } | Command::HostSsh(_) => {}
                }
                self.ws.flush().await.context("sending reports")
            }
            ServerMessage::Received { id, error } => {
                let succeeded = self.unanswered.remove(&id);
                match error {
                    None if succeeded => self.probe.succeeded(now),
                    None => {}
                    Some(e) => {
                        self.probe.refused.fetch_add(1, Ordering::Relaxed);
                        self.probe.problem(format!("report {id} refused: {e}"));
                    }
                }
                Ok(())
            }
            ServerMessage::Error { code, message } => bail!("server error {code}: {message}"),
            ServerMessage::Welcome { .. } => Ok(()),
            // Simulated tasks have no inputs or outputs to transfer.
            ServerMessage::TransferUrl(_) => Ok(()),
        }
    }

    /// Queues a status report with the next id.
    async fn report(
        &mut self,
        task_id: Uuid,
        attempt: u32,
        state: ReportedState,
    ) -> anyhow::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        if state == ReportedState::Succeeded {
            self.unanswered.insert(id);
        }
        let status = Status {
            id,
            task_id,
            attempt,
            state,
            stage: None,
            container: (state == ReportedState::Running).then(|| "sim".to_string()),
            exit_code: None,
            message: None,
            node_fault: false,
        };
        self.feed(&AgentMessage::Status(status)).await
    }

    /// Queues a frame; the caller flushes.
    async fn feed(&mut self, message: &AgentMessage) -> anyhow::Result<()> {
        self.ws
            .feed(Message::text(protocol::encode(message)))
            .await
            .context("sending")
    }
}

/// Simulated agents running in this process.
struct Fleet {
    /// Set to true to close every session.
    stop: watch::Sender<bool>,
    /// One task per agent.
    tasks: JoinSet<()>,
    /// What the agents saw.
    probe: Arc<Probe>,
}

impl Fleet {
    /// Starts one agent per token, `concurrency` handshakes at a time, the
    /// i-th bound to `source(i)`; returns once every agent is welcomed or
    /// has given up.
    async fn start(
        endpoint: &Endpoint,
        tokens: Vec<String>,
        concurrency: usize,
        source: impl Fn(usize) -> Option<Ipv4Addr>,
    ) -> Fleet {
        let probe = Arc::new(Probe::default());
        let (stop, stopped) = watch::channel(false);
        let gate = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut tasks = JoinSet::new();
        let n = tokens.len();
        for (i, token) in tokens.into_iter().enumerate() {
            let (endpoint, probe, gate, stopped) = (
                endpoint.clone(),
                probe.clone(),
                gate.clone(),
                stopped.clone(),
            );
            let source = source(i);
            tasks.spawn(async move {
                let permit = gate.acquire_owned().await;
                let joined = join(&endpoint, &token, source).await;
                drop(permit);
                let (ws, heartbeat) = match joined {
                    Ok(joined) => joined,
                    Err(e) => {
                        probe.failed.fetch_add(1, Ordering::Relaxed);
                        probe.problem(format!("agent {i} did not connect: {e:#}"));
                        return;
                    }
                };
                probe.connected.fetch_add(1, Ordering::Relaxed);
                let first_beat = heartbeat.mul_f64((i % 1000) as f64 / 1000.0);
                let agent = Agent {
                    ws,
                    probe: probe.clone(),
                    next_id: 1,
                    unanswered: HashSet::new(),
                    seen: HashSet::new(),
                };
                if let Err(e) = agent.serve(heartbeat, first_beat, stopped).await {
                    probe.dropped.fetch_add(1, Ordering::Relaxed);
                    probe.problem(format!("agent {i} lost its session: {e:#}"));
                }
            });
        }
        while probe.connected.load(Ordering::Relaxed) + probe.failed.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Fleet { stop, tasks, probe }
    }

    /// Fails unless every agent connected.
    fn require_all(&self, n: usize) -> anyhow::Result<()> {
        let failed = self.probe.failed.load(Ordering::Relaxed);
        ensure!(
            failed == 0,
            "{failed} of {n} agents could not connect:\n  {}",
            self.probe.problems()
        );
        Ok(())
    }

    /// Closes every agent's session and waits (briefly) for them.
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(15), all)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
    }
}

/// Agents for `lifecycle` and `latency`: provisioned, connected and seen
/// online by the API before any task is submitted.
async fn ready_fleet(
    server: &Server,
    api: &Api,
    run: &Run,
    agents: usize,
) -> anyhow::Result<Fleet> {
    let tokens = run.provision(api, agents, 32).await?;
    let endpoint = server.agent_endpoint().await?;
    let started = Instant::now();
    let fleet = Fleet::start(&endpoint, tokens, 64, |_| None).await;
    fleet.require_all(agents)?;
    let online = run
        .await_online(api, agents, Duration::from_secs(60))
        .await?;
    ensure!(
        online == agents,
        "only {online} of {agents} nodes are online in GET /nodes after 60 s"
    );
    println!(
        "{agents} agents connected and online in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(fleet)
}

// ---------------------------------------------------------------------------
// lifecycle
// ---------------------------------------------------------------------------

/// `lifecycle`: submit `--tasks` through `--submitters` concurrent clients
/// and time the first submit to the last `received` for `succeeded`.
async fn lifecycle(args: LifecycleArgs) -> anyhow::Result<()> {
    ensure!(
        args.agents > 0 && args.tasks > 0,
        "--agents and --tasks must be positive"
    );
    let server = Server::start(&args.target).await?;
    let outcome = measure_lifecycle(&server, &args).await;
    server.finish().await?;
    outcome
}

/// The body of `lifecycle`, between starting and stopping the server.
async fn measure_lifecycle(server: &Server, args: &LifecycleArgs) -> anyhow::Result<()> {
    let api = server.api()?;
    let run = Run::create(&api).await?;
    let fleet = ready_fleet(server, &api, &run, args.agents).await?;
    let probe = fleet.probe.clone();
    let loads_before = api.aggregate_loads(&server.base).await?;

    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut submitters = JoinSet::new();
    for _ in 0..args.submitters.max(1) {
        let (api, next, project, label, n) = (
            api.clone(),
            next.clone(),
            run.project,
            run.id.clone(),
            args.tasks,
        );
        submitters.spawn(async move {
            let mut submitted = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let at = Instant::now();
                submitted.push((api.submit(project, &label).await?, at));
            }
            anyhow::Ok(submitted)
        });
    }
    let mut submitted_at = HashMap::with_capacity(args.tasks);
    while let Some(joined) = submitters.join_next().await {
        submitted_at.extend(joined.context("a submitter panicked")??);
    }
    let submit_secs = started.elapsed().as_secs_f64();

    let deadline = started + Duration::from_secs(args.timeout_s);
    let mut report = Instant::now() + Duration::from_secs(5);
    while probe.succeeded.load(Ordering::Acquire) < args.tasks {
        if Instant::now() > deadline {
            bail!(
                "after {} s only {} of {} tasks succeeded ({} run_task seen, {} refused, {} agents dropped):\n  {}",
                args.timeout_s,
                probe.succeeded.load(Ordering::Acquire),
                args.tasks,
                probe.run_task_at.lock().unwrap_or_else(|e| e.into_inner()).len(),
                probe.refused.load(Ordering::Relaxed),
                probe.dropped.load(Ordering::Relaxed),
                probe.problems()
            );
        }
        if Instant::now() > report {
            eprintln!(
                "  {:.0} s: {} of {} succeeded",
                started.elapsed().as_secs_f64(),
                probe.succeeded.load(Ordering::Acquire),
                args.tasks
            );
            report += Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let last = (*probe
        .last_succeeded
        .lock()
        .unwrap_or_else(|e| e.into_inner()))
    .context("no succeeded report was answered")?;
    let secs = (last - started).as_secs_f64();
    let sample: Vec<Uuid> = submitted_at.keys().take(50).copied().collect();
    let projected = run.await_succeeded(&api, args.tasks, &sample).await?;
    let delivery = delays(&submitted_at, &probe);
    let (resent, refused) = (
        probe.resent.load(Ordering::Relaxed),
        probe.refused.load(Ordering::Relaxed),
    );
    let loads_after = api.aggregate_loads(&server.base).await?;
    fleet.stop().await;

    let rate = args.tasks as f64 / secs;
    println!(
        "lifecycle: {} tasks in {secs:.1} s = {rate:.0} tasks/s = {:.0} commits/s ({} agents, {} submitters)",
        args.tasks,
        rate * 5.0,
        args.agents,
        args.submitters
    );
    println!(
        "lifecycle: submitting alone took {submit_secs:.1} s = {:.0} submits/s",
        args.tasks as f64 / submit_secs
    );
    println!(
        "lifecycle: submit → run_task under this load: {}",
        delivery.line()
    );
    println!(
        "lifecycle: GET /tasks showed all {} succeeded {:.0} ms after the last received; 50 checked one by one ({resent} run_task resent, {refused} reports refused)",
        args.tasks,
        projected.as_secs_f64() * 1000.0
    );
    let loads: Vec<String> = loads_after
        .iter()
        .map(|(kind, after)| {
            let before = loads_before.get(kind).copied().unwrap_or(0.0);
            format!("{kind} {:.2}", (after - before) / args.tasks as f64)
        })
        .collect();
    println!(
        "lifecycle: aggregates the server loaded from the log, per task: {}",
        loads.join(", ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// latency
// ---------------------------------------------------------------------------

/// `latency`: submit at a steady rate and time each task's submit-start to
/// its `run_task` arriving at an agent.
async fn latency(args: LatencyArgs) -> anyhow::Result<()> {
    ensure!(
        args.rate > 0.0 && args.seconds > 0 && args.agents > 0,
        "--rate, --seconds and --agents must be positive"
    );
    let server = Server::start(&args.target).await?;
    let outcome = measure_latency(&server, &args).await;
    server.finish().await?;
    outcome
}

/// The body of `latency`, between starting and stopping the server.
async fn measure_latency(server: &Server, args: &LatencyArgs) -> anyhow::Result<()> {
    let api = server.api()?;
    let run = Run::create(&api).await?;
    let fleet = ready_fleet(server, &api, &run, args.agents).await?;
    let probe = fleet.probe.clone();

    let n = (args.rate * args.seconds as f64).round() as usize;
    let warmup = (args.rate * args.warmup_s as f64).round() as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    // One steady rate throughout: the warm-up's submissions are the first
    // `warmup` ticks.
    let mut submits = JoinSet::new();
    for i in 0..warmup + n {
        tick.tick().await;
        let (api, project, label) = (api.clone(), run.project, run.id.clone());
        submits.spawn(async move {
            let at = Instant::now();
            let id = api.submit(project, &label).await?;
            anyhow::Ok((i < warmup, id, at, at.elapsed()))
        });
    }
    let mut submitted_at = HashMap::with_capacity(n);
    let mut warmed_at = HashMap::with_capacity(warmup);
    let mut posts = HashMap::with_capacity(n);
    while let Some(joined) = submits.join_next().await {
        let (warming, id, at, rtt) = joined.context("a submitter panicked")??;
        if warming {
            warmed_at.insert(id, at);
            continue;
        }
        submitted_at.insert(id, at);
        posts.insert(id, rtt);
    }
    let total = warmup + n;
    let deadline = Instant::now() + Duration::from_secs(60);
    while probe.succeeded.load(Ordering::Acquire) < total {
        ensure!(
            Instant::now() < deadline,
            "60 s after the last submit only {} of {total} tasks succeeded:\n  {}",
            probe.succeeded.load(Ordering::Acquire),
            probe.problems()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sample: Vec<Uuid> = submitted_at.keys().take(50).copied().collect();
    run.await_succeeded(&api, total, &sample).await?;
    let delivery = delays(&submitted_at, &probe);
    let warm = delays(&warmed_at, &probe);
    let slowest = slowest(&submitted_at, &posts, &probe, args.slowest);
    fleet.stop().await;

    println!(
        "latency: submit → run_task at {} tasks/s for {} s ({n} tasks, {} agents): {}",
        args.rate,
        args.seconds,
        args.agents,
        delivery.line()
    );
    println!(
        "latency: POST /tasks round trip: {}",
        Percentiles::of(posts.values().copied().collect()).line()
    );
    if warmup > 0 {
        println!(
            "latency: the {warmup} tasks of the {} s warm-up before them, not counted above: {}",
            args.warmup_s,
            warm.line()
        );
    }
    println!("latency: all {total} tasks succeeded (checked through GET /tasks)");
    for line in slowest {
        println!("latency: slow: {line}");
    }
    Ok(())
}

/// The `count` slowest deliveries, slowest first: when each was submitted
/// (seconds from the first submit), its delivery and its POST round trip.
fn slowest(
    submitted_at: &HashMap<Uuid, Instant>,
    posts: &HashMap<Uuid, Duration>,
    probe: &Probe,
    count: usize,
) -> Vec<String> {
    let Some(first) = submitted_at.values().min().copied() else {
        return vec![];
    };
    let received = probe.run_task_at.lock().unwrap_or_else(|e| e.into_inner());
    let mut all: Vec<(Duration, Duration, Duration)> = submitted_at
        .iter()
        .filter_map(|(id, at)| {
            let delivered = received.get(id)?.saturating_duration_since(*at);
            Some((delivered, at.duration_since(first), posts.get(id).copied()?))
        })
        .collect();
    all.sort_by_key(|d| std::cmp::Reverse(d.0));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    all.into_iter()
        .take(count)
        .map(|(delivered, since, post)| {
            format!(
                "submitted at {:.3} s, delivered after {:.1} ms (POST {:.1} ms)",
                since.as_secs_f64(),
                ms(delivered),
                ms(post)
            )
        })
        .collect()
}

/// Submit-start → `run_task` received, for each task seen by both sides.
fn delays(submitted_at: &HashMap<Uuid, Instant>, probe: &Probe) -> Percentiles {
    let received = probe.run_task_at.lock().unwrap_or_else(|e| e.into_inner());
    Percentiles::of(
        submitted_at
            .iter()
            .filter_map(|(id, at)| received.get(id).map(|r| r.saturating_duration_since(*at)))
            .collect(),
    )
}

/// A distribution of durations.
struct Percentiles {
    /// Samples.
    n: usize,
    /// Median.
    p50: Duration,
    /// 90th percentile.
    p90: Duration,
    /// 99th percentile.
    p99: Duration,
    /// Largest.
    max: Duration,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples`.
    fn of(mut samples: Vec<Duration>) -> Percentiles {
        samples.sort();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).max(1);
            samples.get(rank - 1).copied().unwrap_or_default()
        };
        Percentiles {
            n: samples.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }

    /// `p50 … ms, p90 … ms, p99 … ms, max … ms (n …)`.
    fn line(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n {})",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max),
            self.n
        )
    }
}

// ---------------------------------------------------------------------------
// idle
// ---------------------------------------------------------------------------

/// `idle`: connect `--agents` idle agents from `--procs` worker processes
/// and read the server's memory before and after.
async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    ensure!(
        args.agents > 0 && args.procs > 0,
        "--agents and --procs must be positive"
    );
    let server = Server::start(&args.target).await?;
    let outcome = measure_idle(&server, &args).await;
    server.finish().await?;
    outcome
}

/// The body of `idle`, between starting and stopping the server.
async fn measure_idle(server: &Server, args: &IdleArgs) -> anyhow::Result<()> {
    let fresh = server.rss_kib()?;
    let api = server.api()?;
    let run = Run::create(&api).await?;
    let tokens = run.provision(&api, args.agents, args.provisioners).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = server.rss_kib()?;

    let endpoint = server.agent_endpoint().await?;
    let started = Instant::now();
    let mut workers = Vec::new();
    let per = args.agents.div_ceil(args.procs);
    for (k, share) in tokens.chunks(per).enumerate() {
        workers.push(Worker::start(&endpoint, k * per, share).await?);
    }
    let mut connected = 0;
    for w in &mut workers {
        connected += w.ready().await?;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    println!(
        "idle: {connected} of {} agents connected from {} processes in {connect_secs:.1} s = {:.0} connects/s",
        args.agents,
        workers.len(),
        connected as f64 / connect_secs
    );
    ensure!(
        connected == args.agents,
        "not every agent connected; see the messages above"
    );
    let online = run
        .await_online(&api, args.agents, Duration::from_secs(300))
        .await?;
    println!(
        "idle: GET /nodes showed {online} of {} nodes online {:.1} s after the last agent was welcomed",
        args.agents,
        started.elapsed().as_secs_f64() - connect_secs
    );
    let settled_from = Instant::now();
    let mut samples = Vec::new();
    while settled_from.elapsed() < Duration::from_secs(args.settle_s) {
        if let Some(kib) = server.rss_kib()? {
            samples.push(format!("{:.0}", kib as f64 / 1024.0));
        }
        tokio::time::sleep(Duration::from_secs(5).min(Duration::from_secs(args.settle_s))).await;
    }
    let after = server.rss_kib()?;

    let mut still = 0;
    for w in workers {
        still += w.finish().await?;
    }
    match (fresh, before, after) {
        (Some(fresh), Some(before), Some(after)) => {
            println!(
                "idle: server RSS {:.0} MiB fresh, {:.0} MiB with {} nodes provisioned and 0 connected, {:.0} MiB with {connected} agents idle for {} s (samples MiB: {})",
                fresh as f64 / 1024.0,
                before as f64 / 1024.0,
                args.agents,
                after as f64 / 1024.0,
                args.settle_s,
                samples.join(", ")
            );
            println!(
                "idle: {:.1} KiB per idle agent ({:.0} MiB for {connected} agents)",
                after.saturating_sub(before) as f64 / connected as f64,
                after.saturating_sub(before) as f64 / 1024.0
            );
        }
        _ => println!("idle: no memory figure (the server's pid is unknown: pass --server-pid)"),
    }
    println!("idle: {still} of {connected} agents were still connected at the end");
    Ok(())
}

/// A child process holding a share of the idle agents.
struct Worker {
    /// `unidesk-loadgen idle-worker`.
    child: tokio::process::Child,
    /// Closing it tells the worker to stop.
    stdin: Option<tokio::process::ChildStdin>,
    /// What the worker says.
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Worker {
    /// Starts `unidesk-loadgen idle-worker` and hands it `tokens`.
    async fn start(
        endpoint: &Endpoint,
        offset: usize,
        tokens: &[String],
    ) -> anyhow::Result<Worker> {
        Worker::start_as(&["idle-worker"], endpoint, offset, tokens).await
    }

    /// Starts `unidesk-loadgen <mode…>` as a worker and hands it `tokens`.
    async fn start_as(
        mode: &[&str],
        endpoint: &Endpoint,
        offset: usize,
        tokens: &[String],
    ) -> anyhow::Result<Worker> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut child = tokio::process::Command::new(exe)
            .args(mode)
            .arg("--connect")
            .arg(endpoint.addr.to_string())
            .arg("--ws-url")
            .arg(&endpoint.ws_url)
            .arg("--offset")
            .arg(offset.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting an idle worker")?;
        let mut stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut text = tokens.join("\n");
        text.push_str("\ngo\n");
        stdin
            .write_all(text.as_bytes())
            .await
            .context("handing tokens to a worker")?;
        stdin.flush().await.context("handing tokens to a worker")?;
        Ok(Worker {
            child,
            stdin: Some(stdin),
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// Waits for the worker's `ready <connected> <failed>` line.
    async fn ready(&mut self) -> anyhow::Result<usize> {
        let (connected, failed) = self.expect("ready").await?;
        if failed > 0 {
            eprintln!("idle: a worker could not connect {failed} agents");
        }
        Ok(connected)
    }

    /// Tells the worker to stop (end of stdin); returns how many of its
    /// agents were still connected.
    async fn finish(mut self) -> anyhow::Result<usize> {
        drop(self.stdin.take());
        let (still, dropped) = self.expect("final").await?;
        if dropped > 0 {
            eprintln!("idle: a worker lost {dropped} sessions while idle");
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        Ok(still)
    }

    /// Writes one line to the worker.
    async fn say(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("the worker's stdin is closed")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .context("writing to a worker")?;
        stdin.flush().await.context("writing to a worker")
    }

    /// Waits for `<word> <a> <b>` and for the worker to exit.
    async fn finish_with(mut self, word: &str) -> anyhow::Result<(usize, usize)> {
        let said = self.expect(word).await?;
        drop(self.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        Ok(said)
    }

    /// Reads lines until one reads `<word> <a> <b>`.
    async fn expect(&mut self, word: &str) -> anyhow::Result<(usize, usize)> {
        while let Some(line) = self.lines.next_line().await.context("reading a worker")? {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if let [w, a, b] = parts[..] {
                if w == word {
                    return Ok((a.parse()?, b.parse()?));
                }
            }
            println!("{line}");
        }
        bail!("an idle worker ended before saying {word}")
    }
}

/// `idle-worker`: connects the agents whose tokens arrive on stdin, says
/// `ready <connected> <failed>`, idles until stdin ends, then says
/// `final <still connected> <dropped>` and closes them.
async fn idle_worker(args: IdleWorkerArgs) -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut tokens = Vec::new();
    while let Some(line) = lines.next_line().await.context("reading tokens")? {
        match line.trim() {
            "go" => break,
            "" => {}
            token => tokens.push(token.to_string()),
        }
    }
    let endpoint = Endpoint {
        addr: args.connect,
        ws_url: args.ws_url,
    };
    let offset = args.offset;
    let fleet = Fleet::start(&endpoint, tokens, args.concurrency, |i| {
        Some(source_address(offset + i))
    })
    .await;
    let probe = fleet.probe.clone();
    if probe.failed.load(Ordering::Relaxed) > 0 {
        eprintln!("idle-worker: {}", probe.problems());
    }
    println!(
        "ready {} {}",
        probe.connected.load(Ordering::Relaxed),
        probe.failed.load(Ordering::Relaxed)
    );
    while lines.next_line().await.ok().flatten().is_some() {}
    let dropped = probe.dropped.load(Ordering::Relaxed);
    if dropped > 0 {
        eprintln!("idle-worker: {}", probe.problems());
    }
    println!(
        "final {} {dropped}",
        probe
            .connected
            .load(Ordering::Relaxed)
            .saturating_sub(dropped)
    );
    fleet.stop().await;
    Ok(())
}

/// The i-th source address, round-robin over 127.0.0.2–127.0.0.254: each
/// address has its own ~28,000 ephemeral ports.
fn source_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % 253) as u8)
}

// ---------------------------------------------------------------------------
// shutdown
// ---------------------------------------------------------------------------

/// `shutdown`: an ingress process of its own with `--agents` agents from
/// `--procs` worker processes, `--tasks` of them running a task; the agents
/// report their tasks succeeded and the ingress gets SIGTERM `--lead-ms`
/// later. Measures SIGTERM → exit, counts the agents that got a close
/// frame, and checks that every report answered `received` is in the log.
async fn shutdown(args: ShutdownArgs) -> anyhow::Result<()> {
    ensure!(
        args.agents > 0 && args.procs > 0 && args.tasks <= args.agents * 8,
        "--agents and --procs must be positive, and --tasks at most 8 per agent"
    );
    raise_open_files();
    let exe = std::env::current_exe()
        .context("locating this executable")?
        .with_file_name("unidesk");
    ensure!(
        exe.is_file(),
        "{} not found: build it next to this binary (cargo build --release -p unidesk)",
        exe.display()
    );
    let dir = tempfile::Builder::new()
        .prefix("unidesk-loadgen-shutdown-")
        .tempdir()
        .context("creating a temporary directory")?;
    let logs = args
        .log_dir
        .clone()
        .unwrap_or_else(|| dir.path().to_path_buf());
    std::fs::create_dir_all(&logs).context("creating the log directory")?;
    let cluster = pgcluster::LocalCluster::start_ephemeral()
        .await
        .context("starting a private PostgreSQL")?;
    // Everything but the ingress in one process; the ingress alone in
    // another, so SIGTERM stops exactly the agents' side.
    let api_log = logs.join("api.log");
    let rest = Launch::serve(&exe)
        .args(["--roles", "api,projector,scheduler"])
        .args(["--rate-limit-per-s", "0"])
        .env("DATABASE_URL", cluster.url())
        .log_to(&api_log)
        .ready_within(Duration::from_secs(60))
        .start()
        .await
        .with_context(|| format!("starting the api; its log:\n{}", tail(&api_log, 20)))?;
    let port = testkit::free_port();
    let ingress_log = logs.join("ingress.log");
    let mut ingress = bench::faults::process::Proc::new(
        "ingress",
        &exe,
        [
            "serve".to_string(),
            "--roles".into(),
            "ingress".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ],
        &ingress_log,
    )
    .env("DATABASE_URL", cluster.url());
    ingress.start()?;
    let outcome = measure_shutdown(&args, &rest, &mut ingress, port, &cluster).await;
    if ingress.running() {
        let _ = ingress.kill9().await;
    }
    drop(rest);
    println!("{}", summarise_log(&ingress_log));
    cluster
        .stop()
        .await
        .context("stopping the private PostgreSQL")?;
    if args.log_dir.is_none() {
        drop(dir);
    }
    outcome
}

/// The body of `shutdown`, between starting and stopping the servers.
async fn measure_shutdown(
    args: &ShutdownArgs,
    rest: &ServerProcess,
    ingress: &mut bench::faults::process::Proc,
    port: u16,
    cluster: &pgcluster::LocalCluster,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let ws_probe = format!("http://127.0.0.1:{port}{}", protocol::PATH);
    let ready = testkit::try_eventually(Duration::from_secs(60), || async {
        http.get(&ws_probe).send().await.ok().map(|_| ())
    })
    .await;
    ensure!(ready.is_some(), "the ingress did not answer within 60 s");
    let server = Server {
        base: rest.base().to_string(),
        admin_token: rest.token().to_string(),
        pid: None,
        own: None,
    };
    let api = server.api()?;
    let run = Run::create(&api).await?;
    let tokens = run.provision(&api, args.agents, args.provisioners).await?;
    let endpoint = Endpoint {
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        ws_url: format!("ws://127.0.0.1:{port}{}", protocol::PATH),
    };
    let files = tempfile::tempdir().context("creating a temporary directory")?;
    let started = Instant::now();
    let mut workers = Vec::new();
    let per = args.agents.div_ceil(args.procs);
    for (k, share) in tokens.chunks(per).enumerate() {
        let acked = files.path().join(format!("acked-{k}"));
        let acked = acked.display().to_string();
        workers.push(
            Worker::start_as(
                &["shutdown-worker", "--acked", &acked],
                &endpoint,
                k * per,
                share,
            )
            .await?,
        );
    }
    let mut connected = 0;
    for w in &mut workers {
        connected += w.ready().await?;
    }
    println!(
        "shutdown: {connected} of {} agents connected to the ingress from {} processes in {:.1} s",
        args.agents,
        workers.len(),
        started.elapsed().as_secs_f64()
    );
    ensure!(connected == args.agents, "not every agent connected");
    let online = run
        .await_online(&api, args.agents, Duration::from_secs(300))
        .await?;
    ensure!(online == args.agents, "only {online} nodes are online");

    for _ in 0..args.tasks {
        api.submit(run.project, &run.id).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let states = api.task_states(run.project).await?;
        if states.get("running").copied().unwrap_or(0) == args.tasks {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "after 300 s the tasks are {states:?}, not all running"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("shutdown: {} tasks running on the agents", args.tasks);

    for w in &mut workers {
        w.say("finish").await?;
    }
    tokio::time::sleep(Duration::from_millis(args.lead_ms)).await;
    let (took, status) = ingress.terminate(Duration::from_secs(120)).await?;
    let mut close_frames = 0;
    let mut abrupt = 0;
    for w in workers {
        let (closed, cut) = w.finish_with("final").await?;
        close_frames += closed;
        abrupt += cut;
    }

    // Every report answered `received` is in the log.
    let pool = sqlx::PgPool::connect(&cluster.url())
        .await
        .context("connecting to the database")?;
    let mut acked = Vec::new();
    for entry in std::fs::read_dir(files.path()).context("reading the acked files")? {
        let text = std::fs::read_to_string(entry?.path()).context("reading an acked file")?;
        for line in text.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if let [task, attempt, state] = parts[..] {
                acked.push((task.to_string(), attempt.parse::<i64>()?, state.to_string()));
            }
        }
    }
    let stored: HashSet<(String, i64, String)> = sqlx::query_as(
        "SELECT aggregate_id, (payload->(json_object_keys(payload))->>'attempt')::bigint, event_type \
         FROM events WHERE aggregate_type = 'task' \
         AND event_type IN ('TaskAccepted', 'TaskStarted', 'TaskSucceeded')",
    )
    .fetch_all(&pool)
    .await
    .context("reading the task events")?
    .into_iter()
    .collect();
    let wanted = |state: &str| match state {
        "accepted" => "TaskAccepted",
        "running" => "TaskStarted",
        _ => "TaskSucceeded",
    };
    let missing: Vec<&(String, i64, String)> = acked
        .iter()
        .filter(|(t, a, s)| !stored.contains(&(t.clone(), *a, wanted(s).to_string())))
        .collect();
    let succeeded_acked = acked.iter().filter(|(_, _, s)| s == "succeeded").count();
    let disconnected: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'node' AND event_type = 'NodeDisconnected'",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;

    println!(
        "shutdown: SIGTERM → exit in {:.2} s ({status}) with {connected} agents connected and {} tasks reporting `succeeded` {} ms before",
        took.as_secs_f64(),
        args.tasks,
        args.lead_ms
    );
    println!(
        "shutdown: {close_frames} of {connected} agents got a close frame, {abrupt} saw the connection end without one"
    );
    println!(
        "shutdown: {} reports answered `received` ({succeeded_acked} of {} `succeeded`; the rest are sent again on reconnect), {} of them missing from the log",
        acked.len(),
        args.tasks,
        missing.len()
    );
    println!("shutdown: {disconnected} NodeDisconnected events in the log");
    for m in missing.iter().take(5) {
        println!("  missing: task {} attempt {} {}", m.0, m.1, m.2);
    }
    ensure!(
        missing.is_empty(),
        "reports answered `received` are missing from the log"
    );
    ensure!(
        close_frames == connected,
        "{} agents got no close frame",
        connected - close_frames
    );
    ensure!(
        took.as_secs_f64() <= args.budget_s,
        "the ingress took {:.1} s to stop, more than {} s",
        took.as_secs_f64(),
        args.budget_s
    );
    Ok(())
}

/// Raises the soft limit of open files to the hard one, for this process
/// and the servers and workers it starts.
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// What a shutdown worker's agents saw.
#[derive(Default)]
struct Ending {
    /// Sessions the server ended with a close frame.
    close_frames: AtomicUsize,
    /// Sessions that ended without one.
    abrupt: AtomicUsize,
    /// Reports answered `received` without an error.
    acked: Mutex<Vec<(Uuid, u32, ReportedState)>>,
}

/// `shutdown-worker`: connects its agents, says `ready`, runs the tasks it
/// gets until stdin says `finish`, then reports them all succeeded and
/// waits for the server to end every session; writes the answered reports
/// and says `final <close frames> <ended without>`.
async fn shutdown_worker(args: ShutdownWorkerArgs) -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut tokens = Vec::new();
    while let Some(line) = lines.next_line().await.context("reading tokens")? {
        match line.trim() {
            "go" => break,
            "" => {}
            token => tokens.push(token.to_string()),
        }
    }
    let endpoint = Endpoint {
        addr: args.idle.connect,
        ws_url: args.idle.ws_url,
    };
    let ending = Arc::new(Ending::default());
    let (finish, finishing) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(args.idle.concurrency.max(1)));
    let (mut connected, mut failed) = (0, 0);
    let mut agents = JoinSet::new();
    let mut joins = JoinSet::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let (endpoint, gate) = (endpoint.clone(), gate.clone());
        let source = Some(source_address(args.idle.offset + i));
        joins.spawn(async move {
            let permit = gate.acquire_owned().await;
            let joined = join(&endpoint, &token, source).await;
            drop(permit);
            (i, joined)
        });
    }
    while let Some(joined) = joins.join_next().await {
        match joined.context("an agent panicked")? {
            (i, Ok((ws, heartbeat))) => {
                connected += 1;
                let first = heartbeat.mul_f64((i % 1000) as f64 / 1000.0);
                agents.spawn(hold(
                    ws,
                    heartbeat,
                    first,
                    finishing.clone(),
                    ending.clone(),
                ));
            }
            (i, Err(e)) => {
                failed += 1;
                if failed <= 5 {
                    eprintln!("shutdown-worker: agent {i} did not connect: {e:#}");
                }
            }
        }
    }
    println!("ready {connected} {failed}");
    while let Some(line) = lines.next_line().await.ok().flatten() {
        if line.trim() == "finish" {
            break;
        }
    }
    let _ = finish.send(true);
    let all = async { while agents.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(150), all)
        .await
        .is_err()
    {
        eprintln!("shutdown-worker: sessions still open 150 s after finish");
    }
    let text: String = ending
        .acked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(task, attempt, state)| {
            let state = match state {
                ReportedState::Accepted => "accepted",
                ReportedState::Running => "running",
                _ => "succeeded",
            };
            format!("{task} {attempt} {state}\n")
        })
        .collect();
    std::fs::write(&args.acked, text).context("writing the acked reports")?;
    println!(
        "final {} {}",
        ending.close_frames.load(Ordering::Relaxed),
        ending.abrupt.load(Ordering::Relaxed)
    );
    Ok(())
}

/// One agent of `shutdown`: runs the tasks it gets until `finish`, then
/// reports them succeeded, and serves until the server ends the session.
async fn hold(
    mut ws: Ws,
    heartbeat: Duration,
    first_beat: Duration,
    mut finish: watch::Receiver<bool>,
    ending: Arc<Ending>,
) {
    let mut beat = tokio::time::interval_at(Instant::now() + first_beat, heartbeat);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut seq, mut next_id) = (0, 0);
    let mut held: Vec<(Uuid, u32)> = Vec::new();
    let mut unanswered: HashMap<u64, (Uuid, u32, ReportedState)> = HashMap::new();
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut finished = false;
    let mut report = |unanswered: &mut HashMap<u64, (Uuid, u32, ReportedState)>,
                      task: Uuid,
                      attempt: u32,
                      state: ReportedState| {
        next_id += 1;
        unanswered.insert(next_id, (task, attempt, state));
        AgentMessage::Status(Status {
            id: next_id,
            task_id: task,
            attempt,
            state,
            stage: None,
            container: (state == ReportedState::Running).then(|| "sim".to_string()),
            exit_code: None,
            message: None,
            node_fault: false,
        })
    };
    loop {
        let frames: Vec<AgentMessage> = tokio::select! {
            changed = finish.changed(), if !finished => {
                if changed.is_err() {
                    return;
                }
                finished = true;
                held.drain(..)
                    .map(|(t, a)| report(&mut unanswered, t, a, ReportedState::Succeeded))
                    .collect()
            }
            _ = beat.tick() => {
                seq += 1;
                vec![AgentMessage::Heartbeat { seq }]
            }
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    match protocol::decode::<ServerMessage>(text.as_str()) {
                        Ok(ServerMessage::Command { command_id, command }) => {
                            let mut out = vec![AgentMessage::Ack { command_id }];
                            if let (true, Command::RunTask(run)) = (seen.insert(command_id), command) {
                                for state in [ReportedState::Accepted, ReportedState::Running] {
                                    out.push(report(&mut unanswered, run.task_id, run.attempt, state));
                                }
                                held.push((run.task_id, run.attempt));
                            }
                            out
                        }
                        Ok(ServerMessage::Received { id, error }) => {
                            if let (Some(r), None) = (unanswered.remove(&id), error) {
                                ending.acked.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                            }
                            Vec::new()
                        }
                        _ => Vec::new(),
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    ending.close_frames.fetch_add(1, Ordering::Relaxed);
                    // Answer the close and wait for the server to hang up.
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        let _ = ws.close(None).await;
                        while ws.next().await.is_some() {}
                    })
                    .await;
                    return;
                }
                Some(Ok(_)) => Vec::new(),
                Some(Err(_)) | None => {
                    ending.abrupt.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
        };
        for frame in &frames {
            if ws
                .feed(Message::text(protocol::encode(frame)))
                .await
                .is_err()
            {
                ending.abrupt.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if !frames.is_empty() && ws.flush().await.is_err() {
            ending.abrupt.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// postgres
// ---------------------------------------------------------------------------

/// `postgres`: a throw-away cluster for the reference scripts, on the same
/// settings as the clusters the benchmarks start (no fsync).
/// Appends `events` events to one node through the event store (as the
/// API and ingress do, snapshots included), then times `GET
/// /api/v1/events/{position}` on events spread over its history.
async fn event_view(args: EventViewArgs) -> anyhow::Result<()> {
    ensure!(
        args.events > 1 && args.samples > 0,
        "--events must exceed 1, --samples be positive"
    );
    let target = Target {
        server: None,
        admin_token: None,
        server_pid: None,
        server_log: args.server_log.clone(),
        heartbeat_s: 15,
        serve_args: Vec::new(),
    };
    let server = Server::start(&target).await?;
    let outcome = measure_event_view(&server, &args).await;
    server.finish().await?;
    outcome
}

/// The body of `event-view`, between starting and stopping the server.
async fn measure_event_view(server: &Server, args: &EventViewArgs) -> anyhow::Result<()> {
    use domain::node::{Node, NodeCommand};
    let url = server
        .own
        .as_ref()
        .map(|o| o.cluster.url())
        .context("event-view runs its own server")?;
    let pool = sqlx::PgPool::connect(&url).await.context("connecting")?;
    let store = store::Store::new(pool.clone());
    let admin = domain::Actor::User("admin".into());
    let node = Uuid::now_v7();
    let id = node.to_string();
    let seeding = Instant::now();
    store
        .execute::<Node>(
            &id,
            NodeCommand::Provision {
                node_id: node,
                name: "long-history".parse().context("a node name")?,
                labels: Default::default(),
                token_fingerprint: "00".into(),
                max_resources: Default::default(),
                by: admin.clone(),
                at: chrono::Utc::now(),
            },
            &admin,
            chrono::Utc::now(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("provisioning: {e}"))?;
    for i in 1..args.events {
        let at = chrono::Utc::now();
        let cmd = if i % 2 == 1 {
            NodeCommand::Drain {
                by: admin.clone(),
                at,
            }
        } else {
            NodeCommand::Undrain {
                by: admin.clone(),
                at,
            }
        };
        store
            .execute::<Node>(&id, cmd, &admin, at)
            .await
            .map_err(|e| anyhow::anyhow!("appending event {}: {e}", i + 1))?;
    }
    let seeded = seeding.elapsed();
    let positions: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT sequence, position FROM outbox WHERE aggregate_type = 'node' AND aggregate_id = $1 \
         ORDER BY sequence",
    )
    .bind(&id)
    .fetch_all(&pool)
    .await?;
    ensure!(
        positions.len() == args.events,
        "{} events in the outbox",
        positions.len()
    );
    let api = server.api()?;
    let mut times = Vec::with_capacity(args.samples);
    for k in 0..args.samples {
        // Spread over the history, the last event and the first included.
        let (_, position) = positions[k * (positions.len() - 1) / (args.samples - 1).max(1)];
        let started = Instant::now();
        let detail: serde_json::Value = api
            .call(
                "reading an event",
                api.http.get(format!("{}/events/{position}", api.base)),
            )
            .await?;
        times.push(started.elapsed());
        ensure!(
            detail.get("after").is_some(),
            "no state after event {position}"
        );
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "event-view: node with {} events (appended in {:.1} s, {:.0}/s, snapshot every {})",
        args.events,
        seeded.as_secs_f64(),
        args.events as f64 / seeded.as_secs_f64(),
        store::SNAPSHOT_EVERY
    );
    println!(
        "event-view: GET /events/{{position}} x{}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        times.len(),
        ms(pick(0.5)),
        ms(pick(0.99)),
        ms(*times.last().unwrap_or(&Duration::ZERO))
    );
    pool.close().await;
    Ok(())
}

async fn postgres(args: PostgresArgs) -> anyhow::Result<()> {
    let cluster = pgcluster::LocalCluster::start_ephemeral()
        .await
        .context("starting a private PostgreSQL")?;
    let scratch = args.scratch;
    ensure!(
        !scratch.is_empty() && scratch.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
        "--scratch must be lower-case letters and '_'"
    );
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&cluster.url())
            .await
            .context("connecting to the private PostgreSQL")?;
        sqlx::query(&format!("CREATE DATABASE {scratch}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating the database {scratch}"))?;
        conn.close().await.ok();
    }
    println!("DATABASE_URL={}", cluster.url());
    println!("SCRATCH_URL={}", cluster.admin_url_for(&scratch));
    println!("READY");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("watching SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    cluster
        .stop()
        .await
        .context("stopping the private PostgreSQL")?;
    Ok(())
}
