//! `unidesk-exec-bench`: what executing a task on a node costs, with the
//! node's caches cold and warm.
//!
//! ```text
//! unidesk-exec-bench                        # both measurements
//! unidesk-exec-bench --only start --runs 5  # assigned → running, cold vs cached
//! unidesk-exec-bench --only fetch --fetch-runs 5   # clone vs incremental fetch
//! ```
//!
//! **start** drives the real platform as a user does: the `unidesk` binary
//! next to this one runs `unidesk dev` in a fresh directory (its private
//! PostgreSQL, and this machine joined as node `local`, running tasks in
//! Docker); tasks are submitted through the REST API and timed from their
//! own events: the `TaskAssigned` event's `at` to the `TaskStarted` event's
//! `at`. A cold run's code repository has a URL the node has never fetched
//! and its env repository a Dockerfile with a `RUN` line never built; the
//! cached run after it submits exactly the same code and env commits again.
//! The `TaskPreparing` events split each start into its steps.
//!
//! **fetch** calls the agent's git cache ([`node_agent::git::GitCache`])
//! directly: a fresh clone of a repository against one new commit changing
//! one file fetched into a cache that holds the commit before it, counting
//! the objects and bytes received and the wall-clock time of each checkout.
//!
//! Every repository is served by `git daemon` on 127.0.0.1 over `git://`.
//! The code repository is generated with a realistic history: by default
//! 300 commits over a tree of 500 files (a few MB packed), each commit
//! rewriting a few lines of one to three files.
//!
//! The report is printed for people, then once more as `exec: ` lines of
//! `key=value` pairs for scripts (ops/bench.sh collects them).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use chrono::{DateTime, Utc};
use clap::{Parser, ValueEnum};
use node_agent::executor::{
    STAGE_CODE, STAGE_CODE_READY, STAGE_ENV, STAGE_ENV_READY, STAGE_IMAGE, STAGE_IMAGE_READY,
};
use node_agent::git::{human_bytes, Fetched, GitCache};
use serde_json::{json, Value};
use testkit::process::{Launch, ServerProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use uuid::Uuid;

/// Measure task execution on a node: cached vs cold start, incremental
/// fetch vs clone.
#[derive(Debug, Parser)]
#[command(name = "unidesk-exec-bench", about)]
struct Cli {
    /// Only this measurement; both by default.
    #[arg(long, value_enum)]
    only: Option<Measurement>,
    /// Cold starts, each followed by a cached start of the same task.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Clones and incremental fetches, each into a fresh cache.
    #[arg(long, default_value_t = 5)]
    fetch_runs: usize,
    /// Commits in the generated code repository's history.
    #[arg(long, default_value_t = 300)]
    commits: usize,
    /// Files in the generated code repository's tree.
    #[arg(long, default_value_t = 500)]
    files: usize,
    /// The `unidesk` binary that runs `dev`; by default the one next to
    /// this binary.
    #[arg(long)]
    unidesk: Option<PathBuf>,
    /// Keep the work directory (repositories, `dev`'s state and log)
    /// instead of deleting it at the end.
    #[arg(long)]
    keep: bool,
}

/// One of the two measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Measurement {
    /// Assigned → running through `unidesk dev`, cold vs cached.
    Start,
    /// Objects, bytes and time of a clone vs an incremental fetch.
    Fetch,
}

/// The image every env repository builds on: Debian's static busybox in an
/// empty image, since nothing can be pulled on the machines this runs on.
const BASE_IMAGE: &str = "unidesk-test-base:1";
/// Where the env repositories keep their Dockerfile.
const DOCKERFILE: &str = "Dockerfile";
/// The seed of the generated history, so every run fetches the same bytes.
const SEED: u64 = 0x5eed_c0de;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("unidesk-exec-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Makes the work directory, runs the measurements in it, prints the lines
/// for scripts, and removes the directory unless `--keep`.
async fn run(cli: Cli) -> anyhow::Result<()> {
    ensure!(
        cli.runs > 0 && cli.fetch_runs > 0 && cli.commits > 0 && cli.files > 0,
        "--runs, --fetch-runs, --commits and --files must be at least 1"
    );
    let work = tempfile::Builder::new()
        .prefix("unidesk-exec-bench-")
        .tempdir()
        .context("creating the work directory")?;
    // Traversable, so PostgreSQL's own user reaches `dev`'s cluster when
    // this runs as root.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))
            .context("opening the work directory to PostgreSQL's user")?;
    }
    println!("work directory: {}", work.path().display());
    let result = measure(&cli, work.path()).await;
    if cli.keep {
        println!("kept {}", work.keep().display());
    }
    let lines = result?;
    println!();
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// Generates the code repository, serves the repositories, and runs the
/// measurements asked for; returns the lines for scripts.
async fn measure(cli: &Cli, dir: &Path) -> anyhow::Result<Vec<String>> {
    let repos = dir.join("repos");
    std::fs::create_dir_all(&repos).context("creating the repositories' directory")?;
    let made = Instant::now();
    let history = History::make(&repos, "template.git", cli.files, cli.commits).await?;
    let packed = count_objects(&repos.join("template.git")).await?;
    println!(
        "code repository: {} commits, {} files, {} objects in {} packed (made in {:.1} s)",
        cli.commits,
        cli.files,
        packed.objects,
        human_bytes(packed.bytes),
        made.elapsed().as_secs_f64()
    );
    let daemon = GitDaemon::start(&repos, &dir.join("git-daemon.log")).await?;
    println!(
        "serving {} at git://127.0.0.1:{}/",
        repos.display(),
        daemon.port
    );
    let result = async {
        let mut lines = Vec::new();
        if cli.only != Some(Measurement::Fetch) {
            lines.extend(start_bench(cli, dir, &repos, &daemon, &history).await?);
        }
        if cli.only != Some(Measurement::Start) {
            lines.extend(fetch_bench(cli, dir, &repos, &daemon, &history).await?);
        }
        anyhow::Ok(lines)
    }
    .await;
    daemon.stop().await;
    result
}

// ---------------------------------------------------------------------------
// Repositories
// ---------------------------------------------------------------------------

/// Runs `git args…` in `dir`, with `input` on its stdin; returns its stdout.
async fn git_with_input(dir: &Path, args: &[&str], input: Vec<u8>) -> anyhow::Result<String> {
    let mut child = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting git {}", args.join(" ")))?;
    let mut stdin = child.stdin.take().context("git's stdin")?;
    let writer = tokio::spawn(async move {
        stdin.write_all(&input).await?;
        stdin.shutdown().await
    });
    let out = child
        .wait_with_output()
        .await
        .with_context(|| format!("running git {}", args.join(" ")))?;
    let written = writer.await.context("feeding git")?;
    ensure!(
        out.status.success(),
        "git {} in {}: {}: {}",
        args.join(" "),
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    written.with_context(|| format!("writing to git {}", args.join(" ")))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs `git args…` in `dir`; returns its stdout.
async fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    git_with_input(dir, args, Vec::new()).await
}

/// The objects of a repository and the bytes of its packs.
struct Packed {
    /// Objects in packs.
    objects: u64,
    /// Bytes of the packs.
    bytes: u64,
}

/// `git count-objects -v` of a bare repository.
async fn count_objects(repo: &Path) -> anyhow::Result<Packed> {
    let out = git(repo, &["count-objects", "-v"]).await?;
    let field = |name: &str| -> anyhow::Result<u64> {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {name} in git count-objects: {out}"))
    };
    Ok(Packed {
        objects: field("in-pack:")?,
        bytes: field("size-pack:")? * 1024,
    })
}

/// How many objects `git rev-list --objects range…` names in `repo`: what
/// a fetch of that range must transfer at least.
async fn objects_in(repo: &Path, range: &[&str]) -> anyhow::Result<usize> {
    let mut args = vec!["rev-list", "--objects"];
    args.extend_from_slice(range);
    Ok(git(repo, &args).await?.lines().count())
}

/// Adds one commit on `refs/heads/main` to the fast-import stream `out`,
/// writing `files` (path, content) over its parent's tree. `from` names
/// the parent when it is not the branch's last commit in this stream.
fn commit_stream(
    out: &mut Vec<u8>,
    message: &str,
    time: i64,
    from: Option<&str>,
    files: &[(String, String)],
) {
    fn data(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(format!("data {}\n", bytes.len()).as_bytes());
        out.extend_from_slice(bytes);
        out.push(b'\n');
    }
    out.extend_from_slice(b"commit refs/heads/main\n");
    out.extend_from_slice(
        format!("committer Exec Bench <bench@example.org> {time} +0000\n").as_bytes(),
    );
    data(out, message.as_bytes());
    if let Some(from) = from {
        out.extend_from_slice(format!("from {from}\n").as_bytes());
    }
    for (path, content) in files {
        out.extend_from_slice(format!("M 100644 inline {path}\n").as_bytes());
        data(out, content.as_bytes());
    }
    out.push(b'\n');
}

/// Creates the bare repository `repos/name` with the commits of `stream`;
/// returns the commit at `main`.
async fn import_new(repos: &Path, name: &str, stream: Vec<u8>) -> anyhow::Result<String> {
    git(repos, &["init", "-q", "--bare", "-b", "main", name]).await?;
    import(&repos.join(name), stream).await
}

/// Imports the commits of `stream` into the bare repository `repo`;
/// returns the commit at `main`.
async fn import(repo: &Path, stream: Vec<u8>) -> anyhow::Result<String> {
    git_with_input(repo, &["fast-import", "--quiet"], stream).await?;
    git(repo, &["rev-parse", "refs/heads/main"]).await
}

/// A small deterministic generator (SplitMix64), so every run of the
/// bench builds the same repository.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    /// The next 64 random bits.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A line of made-up source code, about 60 bytes, that compresses
    /// about as well as real code does.
    fn line(&mut self) -> String {
        const WORDS: [&str; 32] = [
            "buffer", "count", "decode", "encode", "frame", "index", "layer", "loss", "model",
            "node", "offset", "parse", "queue", "range", "sample", "scale", "shape", "slice",
            "state", "step", "store", "table", "task", "tensor", "token", "value", "batch",
            "cache", "epoch", "field", "graph", "weight",
        ];
        let indent = "    ".repeat(1 + self.below(3));
        let word = |r: &mut Rng| WORDS[r.below(WORDS.len())];
        format!(
            "{indent}let {}_{} = {}::{}(0x{:08x}, {});",
            word(self),
            self.below(1000),
            word(self),
            word(self),
            self.next() as u32,
            self.below(100_000)
        )
    }
}

/// The working tree of the generated code repository, kept in memory so
/// later commits can change it.
#[derive(Debug, Clone)]
struct SourceTree {
    /// Each file's path and lines.
    files: Vec<(String, Vec<String>)>,
    /// Where the contents come from.
    rng: Rng,
}

impl SourceTree {
    /// `files` files of 100 to 500 lines in 25 directories.
    fn new(files: usize, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let files = (0..files)
            .map(|i| {
                let n = 100 + rng.below(400);
                let path = format!("src/module_{:02}/file_{i:04}.rs", i % 25);
                (path, (0..n).map(|_| rng.line()).collect())
            })
            .collect();
        SourceTree { files, rng }
    }

    /// Rewrites a few consecutive lines of file `i`, as a small change
    /// does; returns its path and new content.
    fn edit(&mut self, i: usize) -> (String, String) {
        let (path, lines) = &mut self.files[i];
        let at = self.rng.below(lines.len());
        let removed = (1 + self.rng.below(12)).min(lines.len() - at);
        let added: Vec<String> = (0..1 + self.rng.below(12))
            .map(|_| self.rng.line())
            .collect();
        lines.splice(at..at + removed, added);
        (path.clone(), lines.join("\n") + "\n")
    }

    /// Every file's path and content.
    fn contents(&self) -> Vec<(String, String)> {
        self.files
            .iter()
            .map(|(path, lines)| (path.clone(), lines.join("\n") + "\n"))
            .collect()
    }
}

/// The generated code repository: its tip and the tree at the tip.
struct History {
    /// The repository's name in the served directory.
    name: String,
    /// The commit at `main`.
    tip: String,
    /// The files at `tip`, for commits made on top of it later.
    tree: SourceTree,
    /// When the last commit was made (seconds since the epoch).
    time: i64,
}

impl History {
    /// Creates the bare repository `repos/name` with `commits` commits:
    /// the first adds `files` files, every later one rewrites a few lines
    /// of one to three of them. Packed once, as a server keeps it.
    async fn make(
        repos: &Path,
        name: &str,
        files: usize,
        commits: usize,
    ) -> anyhow::Result<History> {
        let mut tree = SourceTree::new(files, SEED);
        let mut time = 1_700_000_000;
        let mut stream = Vec::new();
        commit_stream(&mut stream, "first files", time, None, &tree.contents());
        for n in 1..commits {
            time += 3_600;
            let changed: Vec<(String, String)> = (0..1 + tree.rng.below(3))
                .map(|_| {
                    let i = tree.rng.below(files);
                    tree.edit(i)
                })
                .collect();
            commit_stream(&mut stream, &format!("change {n}"), time, None, &changed);
        }
        import_new(repos, name, stream).await?;
        let repo = repos.join(name);
        git(&repo, &["repack", "-adq"]).await?;
        let tip = git(&repo, &["rev-parse", "refs/heads/main"]).await?;
        Ok(History {
            name: name.to_string(),
            tip,
            tree,
            time,
        })
    }

    /// Copies the repository to `repos/copy`, a new URL with the same
    /// history.
    async fn copy(&self, repos: &Path, copy: &str) -> anyhow::Result<()> {
        git(repos, &["clone", "-q", "--bare", &self.name, copy])
            .await
            .map(drop)
    }
}

/// Adds to `repo` one commit changing one file of `tree` (file `i`), on top
/// of `main`; returns the new commit.
async fn change_one_file(
    repo: &Path,
    tree: &mut SourceTree,
    i: usize,
    time: i64,
) -> anyhow::Result<String> {
    let changed = tree.edit(i % tree.files.len());
    let mut stream = Vec::new();
    commit_stream(
        &mut stream,
        "one more change",
        time,
        Some("refs/heads/main^0"),
        &[changed],
    );
    import(repo, stream).await
}

/// Creates the env repository `repos/name`: a Dockerfile building on
/// [`BASE_IMAGE`] with one more line; returns its commit.
async fn env_repo(repos: &Path, name: &str, line: &str) -> anyhow::Result<String> {
    let dockerfile = format!("FROM {BASE_IMAGE}\n{line}\n");
    let mut stream = Vec::new();
    commit_stream(
        &mut stream,
        "environment",
        1_700_000_000,
        None,
        &[(DOCKERFILE.to_string(), dockerfile)],
    );
    import_new(repos, name, stream).await
}

/// Sends `signal` to a child process, if it still runs.
fn signal(child: &Child, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).context("pid")?);
        nix::sys::signal::kill(pid, signal).context("signalling a child process")?;
    }
    Ok(())
}

/// `git daemon` serving every repository under one directory over
/// `git://127.0.0.1:<port>/<name>`.
struct GitDaemon {
    /// The daemon.
    child: Child,
    /// Where it listens.
    port: u16,
}

impl GitDaemon {
    /// Starts the daemon on a free port and waits until it accepts
    /// connections. Its own and its children's messages go to `log`.
    async fn start(base: &Path, log: &Path) -> anyhow::Result<GitDaemon> {
        let port = testkit::free_port();
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        // `git daemon` runs git-daemon as a child that killing `git` would
        // leave behind: start git-daemon itself.
        let exec_path = std::process::Command::new("git")
            .arg("--exec-path")
            .output()
            .context("asking git for its exec path")?;
        let exec_path = String::from_utf8_lossy(&exec_path.stdout).trim().to_owned();
        let mut child = Command::new(Path::new(&exec_path).join("git-daemon"))
            .arg("--export-all")
            .arg(format!("--base-path={}", base.display()))
            .arg(format!("--port={port}"))
            .arg("--listen=127.0.0.1")
            .arg("--reuseaddr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("starting git daemon")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().context("watching git daemon")? {
                bail!("git daemon exited ({status}); see {}", log.display());
            }
            if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .is_ok()
            {
                return Ok(GitDaemon { child, port });
            }
            if Instant::now() > deadline {
                bail!("git daemon did not listen on port {port} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The URL of the repository `name` under the served directory.
    fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after 10 s).
    async fn stop(mut self) {
        let _ = signal(&self.child, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

// ---------------------------------------------------------------------------
// start: assigned → running through `unidesk dev`
// ---------------------------------------------------------------------------

/// Builds [`BASE_IMAGE`] unless it exists: `FROM scratch` with Debian's
/// static busybox and its applets linked into `/bin`.
async fn ensure_base_image() -> anyhow::Result<()> {
    let found = Command::new("docker")
        .args(["image", "inspect", BASE_IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("running docker (is the docker CLI installed?)")?;
    if found.success() {
        return Ok(());
    }
    let dir = tempfile::tempdir().context("creating the base image's build directory")?;
    std::fs::copy("/bin/busybox", dir.path().join("busybox"))
        .context("copying /bin/busybox (Debian/Ubuntu: apt-get install busybox-static)")?;
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )
    .context("writing the base image's Dockerfile")?;
    let out = Command::new("docker")
        .args(["build", "-q", "-t", BASE_IMAGE, "."])
        .current_dir(dir.path())
        .output()
        .await
        .context("running docker build")?;
    ensure!(
        out.status.success(),
        "building {BASE_IMAGE}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Removes the env images the start measurement built.
async fn remove_images(tags: &[String]) -> anyhow::Result<()> {
    if tags.is_empty() {
        return Ok(());
    }
    let out = Command::new("docker")
        .args(["rmi", "-f"])
        .args(tags)
        .output()
        .await
        .context("running docker rmi")?;
    ensure!(
        out.status.success(),
        "removing the env images: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// `unidesk dev` running as a child process, and its REST API as admin.
struct Dev {
    /// The `unidesk dev` process.
    process: ServerProcess,
    /// `http://127.0.0.1:<port>/api/v1`.
    api: String,
    /// One connection pool for every request.
    http: reqwest::Client,
    /// The bootstrap admin token `dev` wrote.
    token: String,
    /// Its stdout and stderr.
    log: PathBuf,
}

impl Dev {
    /// Starts `exe dev` in `dir` on a free port and waits until it serves
    /// the API and has written its admin token.
    async fn start(exe: &Path, dir: &Path) -> anyhow::Result<Dev> {
        let log = dir.join("dev.log");
        let process = Launch::dev(exe)
            .current_dir(dir)
            .env_remove("DATABASE_URL")
            .env_remove("UNIDESK_DEV_DIR")
            .env_remove("UNIDESK_LISTEN")
            .log_to(&log)
            .ready_within(Duration::from_secs(180))
            .start()
            .await
            .with_context(|| {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!(
                    "starting {} dev; the end of its log:\n{}",
                    exe.display(),
                    lines[lines.len().saturating_sub(20)..].join("\n")
                )
            })?;
        Ok(Dev {
            api: process.url("/api/v1"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .context("building the HTTP client")?,
            token: process.token().to_string(),
            process,
            log,
        })
    }

    /// The last lines of `dev`'s log, for error messages.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Sends `request` with the admin token; the JSON of a 2xx answer.
    async fn call(&self, what: &str, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("{what}: sending"))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        ensure!(status.is_success(), "{what}: {status}: {body}");
        serde_json::from_str(&body).with_context(|| format!("{what}: decoding {body}"))
    }

    /// `GET path`.
    async fn get(&self, what: &str, path: &str) -> anyhow::Result<Value> {
        self.call(what, self.http.get(format!("{}{path}", self.api)))
            .await
    }

    /// `POST path` with `body`.
    async fn post(&self, what: &str, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(
            what,
            self.http.post(format!("{}{path}", self.api)).json(&body),
        )
        .await
    }

    /// Waits until node `local` is online (its agent joined over the
    /// WebSocket).
    async fn await_local_node(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let nodes = self.get("listing nodes", "/nodes").await?;
            let online = nodes["items"].as_array().is_some_and(|items| {
                items
                    .iter()
                    .any(|n| n["name"] == "local" && n["status"] == "online")
            });
            if online {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node local did not come online within 120 s (is Docker running?); the end of dev's log:\n{}",
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `POST /tasks`: runs `true` on `task`'s code in its env's image.
    async fn submit(&self, project: &str, task: &TaskSource) -> anyhow::Result<Uuid> {
        let body = json!({
            "project_id": project,
            "code_repo_url": task.code_url,
            "code_commit_id": task.code_commit,
            "env_repo_url": task.env_url,
            "env_commit_id": task.env_commit,
            "dockerfile_path": DOCKERFILE,
            "command": ["true"],
            "resources": { "cpus": 1, "memory_mb": 256 },
            "max_retries": 0,
        });
        let created = self.post("submitting a task", "/tasks", body).await?;
        created["id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .with_context(|| format!("no task id in {created}"))
    }

    /// Waits until task `id` succeeded, then reads its timeline from the
    /// event log.
    async fn await_timeline(&self, id: Uuid) -> anyhow::Result<Timeline> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let task = self.get("reading a task", &format!("/tasks/{id}")).await?;
            match task["state"].as_str() {
                Some("succeeded") => break,
                Some(end @ ("failed" | "cancelled" | "timed_out")) => {
                    bail!("task {id} ended {end}: {task}")
                }
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("task {id} did not succeed within 600 s: {task}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let path = format!("/events?aggregate_type=task&aggregate_id={id}&limit=1000");
        loop {
            let page = self.get("reading a task's events", &path).await?;
            let items = page["items"].as_array().cloned().unwrap_or_default();
            if items.iter().any(|e| e["event_type"] == "TaskSucceeded") {
                return Timeline::from_events(&items)
                    .with_context(|| format!("reading the events of task {id}"));
            }
            if Instant::now() > deadline {
                bail!("task {id} succeeded but its TaskSucceeded event never showed: {page}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops `dev` as Ctrl-C does (SIGINT), so it stops its PostgreSQL,
    /// and waits for it; kills it after 60 s.
    async fn stop(mut self) -> anyhow::Result<()> {
        match self
            .process
            .signal_and_wait(nix::sys::signal::Signal::SIGINT, Duration::from_secs(60))
            .await
        {
            Ok(status) => {
                ensure!(
                    status.success(),
                    "unidesk dev exited with {status}; the end of its log:\n{}",
                    self.tail()
                );
                Ok(())
            }
            Err(e) => bail!(
                "{e}; its PostgreSQL may still run (see {})",
                self.log.display()
            ),
        }
    }
}

/// The code and env commits of a task.
struct TaskSource {
    /// `git://` URL of the code repository.
    code_url: String,
    /// Its commit.
    code_commit: String,
    /// `git://` URL of the env repository.
    env_url: String,
    /// Its commit.
    env_commit: String,
}

/// One `TaskPreparing` event.
#[derive(Debug)]
struct Stage {
    /// Such as `fetching code` or `code ready`.
    name: String,
    /// When the server recorded it.
    at: DateTime<Utc>,
    /// What the step found, such as `from cache`.
    detail: Option<String>,
}

/// The moments of a task's one attempt, from its events.
#[derive(Debug)]
struct Timeline {
    /// `TaskAssigned`.
    assigned: DateTime<Utc>,
    /// `TaskAccepted`: the node took the attempt on.
    accepted: DateTime<Utc>,
    /// `TaskStarted`: the container runs.
    started: DateTime<Utc>,
    /// Every `TaskPreparing`, in order.
    stages: Vec<Stage>,
}

/// A start split into its steps, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Phases {
    /// Assigned → running.
    total: f64,
    /// Assigned → accepted: the assignment reaching the node.
    delivery: f64,
    /// Fetching and checking out the code.
    code: f64,
    /// Fetching and checking out the env repository.
    env: f64,
    /// Building or finding the image.
    image: f64,
    /// The last preparing stage → container started: the start, and the
    /// create when it did not happen beside the code checkout.
    container: f64,
}

impl Phases {
    /// The names of the steps, in order, as the report shows them.
    const NAMES: [&'static str; 6] = [
        "assigned → running",
        "  delivery (assigned → accepted)",
        "  code fetch + checkout",
        "  env fetch + checkout",
        "  image build or lookup",
        "  prepared → running (container)",
    ];

    /// The steps, in the order of [`Phases::NAMES`].
    fn values(&self) -> [f64; 6] {
        [
            self.total,
            self.delivery,
            self.code,
            self.env,
            self.image,
            self.container,
        ]
    }
}

/// Milliseconds from `a` to `b`.
fn ms(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

impl Timeline {
    /// Reads the timeline from `GET /events` items: `event_type` names the
    /// event, and `payload` is the stored event, `{"Variant": {…, "at"}}`.
    fn from_events(items: &[Value]) -> anyhow::Result<Timeline> {
        let mut assigned = None;
        let mut accepted = None;
        let mut started = None;
        let mut stages = Vec::new();
        for item in items {
            let kind = item["event_type"].as_str().unwrap_or_default();
            let body = match &item["payload"] {
                Value::Object(o) if o.len() == 1 => o.values().next().unwrap_or(&Value::Null),
                other => other,
            };
            if body
                .get("attempt")
                .and_then(Value::as_u64)
                .is_some_and(|a| a != 1)
            {
                bail!("the task ran more than one attempt: {item}");
            }
            let at = || -> anyhow::Result<DateTime<Utc>> {
                serde_json::from_value(body["at"].clone())
                    .with_context(|| format!("no `at` in {item}"))
            };
            match kind {
                "TaskAssigned" => assigned = Some(at()?),
                "TaskAccepted" => accepted = Some(at()?),
                "TaskStarted" => started = Some(at()?),
                "TaskPreparing" => stages.push(Stage {
                    name: body["stage"].as_str().unwrap_or_default().to_string(),
                    at: at()?,
                    detail: body["detail"].as_str().map(str::to_string),
                }),
                _ => {}
            }
        }
        Ok(Timeline {
            assigned: assigned.context("no TaskAssigned event")?,
            accepted: accepted.context("no TaskAccepted event")?,
            started: started.context("no TaskStarted event")?,
            stages,
        })
    }

    /// The `TaskPreparing` event of `stage`.
    fn stage(&self, stage: &str) -> anyhow::Result<&Stage> {
        self.stages
            .iter()
            .find(|s| s.name == stage)
            .with_context(|| format!("no TaskPreparing event for {stage:?}"))
    }

    /// What the `TaskPreparing` event of `stage` found, shortened: without
    /// the commit or the image tag it names.
    fn detail(&self, stage: &str) -> String {
        let detail = self
            .stage(stage)
            .ok()
            .and_then(|s| s.detail.clone())
            .unwrap_or_default();
        match detail.split_once(": ") {
            Some((_, found)) => found.to_string(),
            None => match detail.split_once(' ') {
                Some((tag, found)) if tag.starts_with("unidesk-env:") => found.to_string(),
                _ => detail,
            },
        }
    }

    /// The start split into its steps. The code and the image are
    /// prepared side by side from the first stage on: an image found on
    /// the node reports no `building image` stage (its lookup is timed
    /// from the first stage) and an env not checked out no `fetching
    /// environment` stage (0 ms).
    fn phases(&self) -> anyhow::Result<Phases> {
        let span = |from: &str, to: &str| -> anyhow::Result<f64> {
            Ok(ms(self.stage(from)?.at, self.stage(to)?.at))
        };
        let first = self.stages.first().context("no TaskPreparing event")?.at;
        let prepared = self
            .stages
            .iter()
            .map(|s| s.at)
            .max()
            .context("no TaskPreparing event")?;
        let env = match self.stage(STAGE_ENV) {
            Ok(_) => span(STAGE_ENV, STAGE_ENV_READY)?,
            Err(_) => 0.0,
        };
        let image = match self.stage(STAGE_IMAGE) {
            Ok(_) => span(STAGE_IMAGE, STAGE_IMAGE_READY)?,
            Err(_) => ms(first, self.stage(STAGE_IMAGE_READY)?.at),
        };
        Ok(Phases {
            total: ms(self.assigned, self.started),
            delivery: ms(self.assigned, self.accepted),
            code: span(STAGE_CODE, STAGE_CODE_READY)?,
            env,
            image,
            container: ms(prepared, self.started),
        })
    }
}

/// Whether the node had the task's code and image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cache {
    /// Code never fetched by the node, image never built.
    Cold,
    /// The same code and env commits as the cold run before.
    Cached,
}

impl Cache {
    /// `cold` or `cached`.
    fn name(self) -> &'static str {
        match self {
            Cache::Cold => "cold",
            Cache::Cached => "cached",
        }
    }
}

/// The start measurement: `dev` up, the trials, images removed, `dev`
/// stopped; returns the lines for scripts.
async fn start_bench(
    cli: &Cli,
    dir: &Path,
    repos: &Path,
    daemon: &GitDaemon,
    history: &History,
) -> anyhow::Result<Vec<String>> {
    ensure_base_image().await?;
    let exe = match &cli.unidesk {
        Some(exe) => exe.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("unidesk"),
    };
    ensure!(
        exe.is_file(),
        "{} not found: build it (cargo build --release -p unidesk) or give --unidesk",
        exe.display()
    );
    let dev_dir = dir.join("dev");
    std::fs::create_dir_all(&dev_dir).context("creating dev's directory")?;
    println!(
        "\n== start: assigned → running on node `local` of `unidesk dev`, cold vs cached ({} runs each)",
        cli.runs
    );
    let dev = Dev::start(&exe, &dev_dir).await?;
    let mut images = Vec::new();
    let trials = start_trials(cli, &dev, repos, daemon, history, &mut images).await;
    let alone = match (&trials, images.last()) {
        (Ok(_), Some(image)) => container_alone(cli.runs, image, dir).await.map(Some),
        _ => Ok(None),
    };
    let removed = remove_images(&images).await;
    let stopped = dev.stop().await;
    let trials = trials?;
    let alone = alone?;
    stopped?;
    removed?;
    Ok(start_report(&trials, alone))
}

/// The reference: `runs` containers of `image` created and started
/// straight through Docker's API, with the same settings as a task's
/// container (the same create body, a directory bind-mounted at
/// `/workspace`, `true` as the command) but nothing around them: no
/// checkout, no reports. Returns the spread of create + start in ms.
async fn container_alone(runs: usize, image: &str, dir: &Path) -> anyhow::Result<Spread> {
    use node_agent::docker::{self, Confinement, ContainerSpec};
    let docker = docker::connect(None)
        .await
        .context("connecting to Docker")?;
    let workspace = dir.join("alone");
    std::fs::create_dir_all(&workspace).context("creating the reference's workspace")?;
    let confinement = Confinement::default();
    let command = vec!["true".to_owned()];
    let env = std::collections::BTreeMap::new();
    let mut times = Vec::new();
    for _ in 0..runs {
        let spec = ContainerSpec {
            image,
            command: &command,
            env: &env,
            workspace: &workspace,
            labels: std::collections::HashMap::new(),
            cpus: 1.0,
            memory_mb: 256,
            gpus: &[],
            pids_limit: confinement.pids_limit,
            network: confinement.network,
            layer_limit_mb: None,
            log_file_bytes: docker::CONTAINER_LOG_FILE_BYTES,
        };
        let began = Instant::now();
        let id = docker::create_container(&docker, &spec)
            .await
            .context("creating the reference container")?;
        let started = docker::start_container(&docker, &id).await;
        let took = began.elapsed().as_secs_f64() * 1000.0;
        let exited = match started {
            Ok(()) => docker::wait_exit(&docker, &id).await.map(drop),
            Err(e) => Err(e),
        };
        let removed = docker::remove_container(&docker, &id).await;
        exited.context("running the reference container")?;
        removed.context("removing the reference container")?;
        times.push(took);
    }
    let spread = Spread::of(times);
    println!(
        "container alone (create + start of {image}, straight through Docker): {} ms",
        spread.show()
    );
    Ok(spread)
}

/// One measured start.
struct Trial {
    /// Cold or cached.
    cache: Cache,
    /// Its steps.
    phases: Phases,
}

/// Runs each cold start followed by the cached start of the same task;
/// pushes the tags of the images built to `images`.
async fn start_trials(
    cli: &Cli,
    dev: &Dev,
    repos: &Path,
    daemon: &GitDaemon,
    history: &History,
    images: &mut Vec<String>,
) -> anyhow::Result<Vec<Trial>> {
    dev.await_local_node().await?;
    // Docker's build cache outlives this run: a RUN line of its own keeps
    // every cold build a real build.
    let nonce = Uuid::new_v4().simple().to_string();
    let project = dev
        .post(
            "creating a project",
            "/projects",
            json!({ "name": format!("exec-bench-{}", &nonce[..8]) }),
        )
        .await?;
    let project = project["id"]
        .as_str()
        .with_context(|| format!("no project id in {project}"))?
        .to_string();
    println!(
        "{:<4} {:<7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}   code | env | image",
        "run", "cache", "total ms", "delivery", "code", "env", "image", "container"
    );
    let mut trials = Vec::new();
    for run in 1..=cli.runs {
        let code = format!("code-{run}.git");
        history.copy(repos, &code).await?;
        let env = format!("env-{run}.git");
        let env_commit = env_repo(
            repos,
            &env,
            &format!("RUN echo exec-bench {nonce} {run} > /run-id"),
        )
        .await?;
        let task = TaskSource {
            code_url: daemon.url(&code),
            code_commit: history.tip.clone(),
            env_url: daemon.url(&env),
            env_commit,
        };
        images.push(node_agent::docker::image_tag(
            &task.env_url,
            &task.env_commit,
            DOCKERFILE,
        ));
        for cache in [Cache::Cold, Cache::Cached] {
            let id = dev.submit(&project, &task).await?;
            let timeline = dev.await_timeline(id).await?;
            let phases = timeline.phases()?;
            println!(
                "{run:<4} {:<7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1}   {} | {} | {}",
                cache.name(),
                phases.total,
                phases.delivery,
                phases.code,
                phases.env,
                phases.image,
                phases.container,
                timeline.detail(STAGE_CODE_READY),
                timeline.detail(STAGE_ENV_READY),
                timeline.detail(STAGE_IMAGE_READY),
            );
            trials.push(Trial { cache, phases });
        }
    }
    Ok(trials)
}

/// min / median / max of some figures.
#[derive(Debug, Clone, Copy)]
struct Spread {
    /// The smallest.
    min: f64,
    /// The middle one (the mean of the middle two of an even count).
    median: f64,
    /// The largest.
    max: f64,
}

impl Spread {
    /// The spread of `values`; zeros when there are none.
    fn of(values: impl IntoIterator<Item = f64>) -> Spread {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return Spread {
                min: 0.0,
                median: 0.0,
                max: 0.0,
            };
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            min: v[0],
            median,
            max: v[n - 1],
        }
    }

    /// `a / b / c`, for people.
    fn show(&self) -> String {
        format!("{:.1} / {:.1} / {:.1}", self.min, self.median, self.max)
    }

    /// `min=a median=b max=c`, for scripts.
    fn pairs(&self, prefix: &str) -> String {
        format!(
            "{prefix}min={:.1} {prefix}median={:.1} {prefix}max={:.1}",
            self.min, self.median, self.max
        )
    }
}

/// Prints the start summary, with the container-alone reference when it
/// was measured; returns its lines for scripts.
fn start_report(trials: &[Trial], alone: Option<Spread>) -> Vec<String> {
    let spreads = |cache: Cache| -> Vec<Spread> {
        (0..Phases::NAMES.len())
            .map(|i| {
                Spread::of(
                    trials
                        .iter()
                        .filter(|t| t.cache == cache)
                        .map(|t| t.phases.values()[i]),
                )
            })
            .collect()
    };
    let (cold, cached) = (spreads(Cache::Cold), spreads(Cache::Cached));
    let runs = trials.iter().filter(|t| t.cache == Cache::Cold).count();
    println!(
        "\n{:<34} {:>28} {:>28}",
        "ms, min / median / max", "cold", "cached"
    );
    for (i, name) in Phases::NAMES.iter().enumerate() {
        println!("{name:<34} {:>28} {:>28}", cold[i].show(), cached[i].show());
    }
    if let Some(alone) = &alone {
        println!(
            "{:<34} {:>28} {:>28}",
            "reference: container alone",
            "",
            alone.show()
        );
    }
    let mut lines = Vec::new();
    for (cache, s) in [(Cache::Cold, &cold), (Cache::Cached, &cached)] {
        lines.push(format!(
            "exec: {}_start_ms {} runs={runs}",
            cache.name(),
            s[0].pairs("")
        ));
    }
    for (cache, s) in [(Cache::Cold, &cold), (Cache::Cached, &cached)] {
        lines.push(format!(
            "exec: {}_steps_median_ms delivery={:.1} code={:.1} env={:.1} image={:.1} container={:.1}",
            cache.name(),
            s[1].median,
            s[2].median,
            s[3].median,
            s[4].median,
            s[5].median
        ));
    }
    if let Some(alone) = alone {
        lines.push(format!(
            "exec: container_alone_ms {} runs={runs}",
            alone.pairs("")
        ));
    }
    lines
}

// ---------------------------------------------------------------------------
// fetch: clone vs incremental fetch through the git cache
// ---------------------------------------------------------------------------

/// A TCP relay in front of `git daemon` that counts the bytes each way, so
/// the bench knows what a fetch really transferred whatever the cache
/// reports.
struct CountingRelay {
    /// Where it listens on 127.0.0.1.
    port: u16,
    /// Bytes from the server to the client.
    down: Arc<AtomicU64>,
    /// Bytes from the client to the server.
    up: Arc<AtomicU64>,
    /// The accept loop, stopped on drop.
    accept: tokio::task::JoinHandle<()>,
}

impl CountingRelay {
    /// Relays a free port to `target` on 127.0.0.1.
    async fn start(target: u16) -> anyhow::Result<CountingRelay> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the counting relay")?;
        let port = listener.local_addr().context("the relay's port")?.port();
        let (down, up) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (d, u) = (down.clone(), up.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (d, u) = (d.clone(), u.clone());
                tokio::spawn(async move {
                    let Ok(server) =
                        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, target)).await
                    else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let _ = tokio::join!(
                        pump(server_read, client_write, d),
                        pump(client_read, server_write, u)
                    );
                });
            }
        });
        Ok(CountingRelay {
            port,
            down,
            up,
            accept,
        })
    }

    /// The URL of the repository `name`, through the relay.
    fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }

    /// Bytes relayed so far: server → client, client → server.
    fn counts(&self) -> (u64, u64) {
        (
            self.down.load(Ordering::SeqCst),
            self.up.load(Ordering::SeqCst),
        )
    }
}

impl Drop for CountingRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, counting each chunk before it is passed on (so a
/// client that has read a byte finds it counted), until `from` ends.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counted: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        counted.fetch_add(n as u64, Ordering::SeqCst);
        to.write_all(&buf[..n]).await?;
    }
}

/// One checkout through the git cache.
struct Checkout {
    /// What the cache says it fetched.
    fetched: Fetched,
    /// Bytes the server sent, counted on the wire.
    down: u64,
    /// Bytes the cache sent to the server.
    up: u64,
    /// Wall-clock milliseconds of `GitCache::checkout`, files written
    /// included.
    ms: f64,
    /// Objects `git rev-list --objects` names for what was new to the
    /// cache: the least a fetch must receive.
    needed: usize,
}

/// The checkouts of each fetch run, in order, for the key and label of
/// each.
const FETCH_CASES: [(&str, &str); 4] = [
    ("fetch_clone", "fresh clone (empty cache)"),
    ("fetch_incremental", "new commit, one file changed"),
    ("checkout_cached", "same commit again (prepared tree)"),
    ("fetch_not_tip", "new commit, no longer a branch tip"),
];

/// Times one checkout of `commit` of `url` into a fresh directory under
/// `scratch`, which is removed afterwards.
async fn timed_checkout(
    cache: &GitCache,
    relay: &CountingRelay,
    url: &str,
    commit: &str,
    scratch: &Path,
    needed: usize,
) -> anyhow::Result<Checkout> {
    let name = format!("checkout-{}", Uuid::new_v4().simple());
    let dest = scratch.join(&name);
    let into = node_agent::beneath::Root::open(scratch, "the scratch directory")
        .context("opening the scratch directory")?
        .create_dir(&name, "a checkout")
        .context("creating a checkout directory")?;
    let (down, up) = relay.counts();
    let began = Instant::now();
    let fetched = cache
        .checkout(
            url,
            commit,
            &into,
            &node_agent::git_auth::GitAuth::default(),
        )
        .await
        .with_context(|| format!("checking out {commit} of {url}"))?;
    let ms = began.elapsed().as_secs_f64() * 1000.0;
    let (down_after, up_after) = relay.counts();
    std::fs::remove_dir_all(&dest).context("removing a checkout")?;
    Ok(Checkout {
        fetched,
        down: down_after - down,
        up: up_after - up,
        ms,
        needed,
    })
}

/// One fetch run against a new copy `name` of the code repository, through
/// a fresh cache: its tip (a clone), a new commit changing one file, that
/// commit again, and the first of two more new commits (no longer a branch
/// tip). With `by_id` the copy lets clients fetch any reachable commit by
/// id (`uploadpack.allowReachableSHA1InWant`); without, it is served with
/// `git daemon`'s defaults. Returns the checkouts in [`FETCH_CASES`] order.
async fn fetch_run(
    repos: &Path,
    name: &str,
    by_id: bool,
    relay: &CountingRelay,
    history: &History,
    scratch: &Path,
    seed: usize,
) -> anyhow::Result<Vec<Checkout>> {
    history.copy(repos, name).await?;
    let repo = repos.join(name);
    if by_id {
        git(
            &repo,
            &["config", "uploadpack.allowReachableSHA1InWant", "true"],
        )
        .await?;
    }
    let url = relay.url(name);
    let cache_dir = scratch.join(format!("cache-{name}"));
    let cache = GitCache::new(cache_dir.clone());
    let mut tree = history.tree.clone();
    let tip = &history.tip;
    let mut out = Vec::new();

    let needed = objects_in(&repo, &[tip]).await?;
    out.push(timed_checkout(&cache, relay, &url, tip, scratch, needed).await?);

    let one = change_one_file(&repo, &mut tree, seed, history.time + 3_600).await?;
    let needed = objects_in(&repo, &[&one, &format!("^{tip}")]).await?;
    out.push(timed_checkout(&cache, relay, &url, &one, scratch, needed).await?);
    out.push(timed_checkout(&cache, relay, &url, &one, scratch, 0).await?);

    let older = change_one_file(&repo, &mut tree, seed + 11, history.time + 7_200).await?;
    change_one_file(&repo, &mut tree, seed + 23, history.time + 10_800).await?;
    let needed = objects_in(&repo, &[&older, &format!("^{one}")]).await?;
    out.push(timed_checkout(&cache, relay, &url, &older, scratch, needed).await?);
    std::fs::remove_dir_all(&cache_dir).context("removing a git cache")?;
    Ok(out)
}

/// The fetch measurement, against `git daemon`'s defaults and against a
/// server that serves any reachable commit by id; returns the lines for
/// scripts.
async fn fetch_bench(
    cli: &Cli,
    dir: &Path,
    repos: &Path,
    daemon: &GitDaemon,
    history: &History,
) -> anyhow::Result<Vec<String>> {
    println!(
        "\n== fetch: the agent's git cache over git:// ({} runs, each with a fresh cache)",
        cli.fetch_runs
    );
    let scratch = dir.join("fetch");
    std::fs::create_dir_all(&scratch).context("creating the fetch directory")?;
    let relay = CountingRelay::start(daemon.port).await?;
    let mut lines = Vec::new();
    for by_id in [false, true] {
        let mut samples: Vec<Vec<Checkout>> = (0..FETCH_CASES.len()).map(|_| Vec::new()).collect();
        for run in 1..=cli.fetch_runs {
            let name = format!("fetch-{run}{}.git", if by_id { "-by-id" } else { "" });
            let checkouts =
                fetch_run(repos, &name, by_id, &relay, history, &scratch, run * 37).await?;
            for (case, checkout) in samples.iter_mut().zip(checkouts) {
                case.push(checkout);
            }
        }
        println!(
            "\n{}",
            if by_id {
                "served with uploadpack.allowReachableSHA1InWant (fetch by commit id allowed):"
            } else {
                "served with git daemon's defaults (no allow-*-sha1-in-want):"
            }
        );
        lines.extend(fetch_report(&samples, if by_id { "_by_id" } else { "" }));
    }
    Ok(lines)
}

/// Prints one table of [`FETCH_CASES`]; returns its lines for scripts,
/// each key ending in `suffix`.
fn fetch_report(samples: &[Vec<Checkout>], suffix: &str) -> Vec<String> {
    println!(
        "{:<36} {:>8} {:>7} {:>11} {:>9} {:>11} {:>8} {:>26}",
        "",
        "objects",
        "needed",
        "wire down",
        "wire up",
        "cache says",
        "fell back",
        "ms, min / median / max"
    );
    let mut lines = Vec::new();
    let mut down_medians = Vec::new();
    for ((key, label), runs) in FETCH_CASES.iter().zip(samples) {
        let objects = Spread::of(runs.iter().map(|c| c.fetched.objects as f64));
        let said = Spread::of(runs.iter().map(|c| c.fetched.bytes as f64));
        let down = Spread::of(runs.iter().map(|c| c.down as f64));
        let up = Spread::of(runs.iter().map(|c| c.up as f64));
        let needed = Spread::of(runs.iter().map(|c| c.needed as f64));
        let time = Spread::of(runs.iter().map(|c| c.ms));
        let fell_back = runs.iter().filter(|c| c.fetched.fell_back).count();
        let from_cache = runs.iter().filter(|c| c.fetched.from_cache).count();
        down_medians.push(down.median);
        println!(
            "{label:<36} {:>8.0} {:>7.0} {:>11} {:>9} {:>11} {:>8} {:>26}",
            objects.median,
            needed.median,
            human_bytes(down.median as u64),
            human_bytes(up.median as u64),
            human_bytes(said.median as u64),
            format!("{fell_back}/{}", runs.len()),
            time.show()
        );
        if objects.min != objects.max {
            println!(
                "{:<36} (varied: {:.0}–{:.0} objects, {}–{} down)",
                "",
                objects.min,
                objects.max,
                human_bytes(down.min as u64),
                human_bytes(down.max as u64)
            );
        }
        lines.push(format!(
            "exec: {key}{suffix} objects={:.0} needed_objects={:.0} wire_down_bytes={:.0} wire_up_bytes={:.0} cache_reported_bytes={:.0} {} runs={} fell_back={fell_back} from_cache={from_cache}",
            objects.median,
            needed.median,
            down.median,
            up.median,
            said.median,
            time.pairs("ms_"),
            runs.len()
        ));
    }
    if let [clone, incremental, ..] = down_medians[..] {
        if clone > 0.0 {
            println!(
                "the incremental fetch moved {:.2}% of a clone's bytes",
                100.0 * incremental / clone
            );
        }
    }
    lines
}
