//! Running one attempt of a task, from checkout to cleanup.
//!
//! [`run`] reports, in order: `accepted`; `preparing` with the stages
//! `fetching code`, `fetching environment` and `building image`; `running`
//! with the container id; the container's output as log chunks; and exactly
//! one final state: `succeeded`, `failed`, `cancelled` or `timed_out`. All
//! log chunks are reported before the final state. A failure at any step
//! ends the attempt `failed` with a message a person can act on; nothing
//! here panics or returns an error to the caller.
//!
//! Afterwards the container and the attempt's workspace are removed; the git
//! mirror and the image stay cached.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use futures::StreamExt;
use protocol::{Cache, ReportedState, RunTask};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::docker::{self, ContainerSpec, DockerError, Exit, Images};
use crate::git::{GitCache, GitError};
use crate::logs::{Chunk, LogChunker};

/// The stage reported while the code is fetched.
pub const STAGE_CODE: &str = "fetching code";
/// The stage reported while the env repository is fetched.
pub const STAGE_ENV: &str = "fetching environment";
/// The stage reported while the image is built or found.
pub const STAGE_IMAGE: &str = "building image";

/// How long buffered output may wait before it is reported.
const LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// How long to wait for the rest of the output once the container stopped.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How many entries of the cache a hello lists, each.
const CACHE_LIST_LIMIT: usize = 1000;

/// Something an executor tells the server, before it gets a report id.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// A change of state.
    Status(StatusReport),
    /// A piece of output.
    Log(LogReport),
}

impl Report {
    /// The attempt the report is about.
    pub fn attempt(&self) -> (uuid::Uuid, u32) {
        match self {
            Report::Status(s) => (s.task_id, s.attempt),
            Report::Log(l) => (l.task_id, l.attempt),
        }
    }
}

/// A change of an attempt's state; see [`protocol::Status`].
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    /// The task.
    pub task_id: uuid::Uuid,
    /// The attempt.
    pub attempt: u32,
    /// The new state.
    pub state: ReportedState,
    /// With `preparing`: the stage.
    pub stage: Option<String>,
    /// With `running`: the container id.
    pub container: Option<String>,
    /// With `failed`: the exit status, if the command ran.
    pub exit_code: Option<i64>,
    /// Why, for a person.
    pub message: Option<String>,
}

impl StatusReport {
    /// A bare report of `state`.
    pub fn new(task_id: uuid::Uuid, attempt: u32, state: ReportedState) -> Self {
        StatusReport {
            task_id,
            attempt,
            state,
            stage: None,
            container: None,
            exit_code: None,
            message: None,
        }
    }

    /// Whether this state ends the attempt.
    pub fn is_final(&self) -> bool {
        !matches!(
            self.state,
            ReportedState::Accepted | ReportedState::Preparing | ReportedState::Running
        )
    }
}

/// A piece of an attempt's output; see [`protocol::LogChunk`].
#[derive(Debug, Clone, PartialEq)]
pub struct LogReport {
    /// The task.
    pub task_id: uuid::Uuid,
    /// The attempt.
    pub attempt: u32,
    /// Byte offset of `data` in the attempt's output.
    pub offset: u64,
    /// The text.
    pub data: String,
}

/// Asks a running attempt to stop.
#[derive(Debug)]
pub struct Canceller(watch::Sender<Option<Duration>>);

/// The attempt's side of a [`Canceller`].
#[derive(Debug, Clone)]
pub struct CancelSignal(watch::Receiver<Option<Duration>>);

/// A connected [`Canceller`] and [`CancelSignal`].
pub fn cancel_pair() -> (Canceller, CancelSignal) {
    let (tx, rx) = watch::channel(None);
    (Canceller(tx), CancelSignal(rx))
}

impl Canceller {
    /// Stops the attempt, giving its container `grace` between SIGTERM and
    /// SIGKILL.
    pub fn cancel(&self, grace: Duration) {
        self.0.send_replace(Some(grace));
    }
}

impl CancelSignal {
    /// Resolves with the grace period once the attempt is cancelled; never
    /// resolves if the [`Canceller`] is dropped without cancelling.
    pub async fn cancelled(&mut self) -> Duration {
        let grace = match self.0.wait_for(Option::is_some).await {
            Ok(grace) => *grace,
            Err(_) => None,
        };
        match grace {
            Some(grace) => grace,
            None => std::future::pending().await,
        }
    }
}

/// What every executor shares: Docker, the git cache, the image builder and
/// the work directory.
#[derive(Debug)]
pub struct Context {
    docker: Docker,
    git: GitCache,
    images: Images,
    work_dir: PathBuf,
    agent_label: String,
    timeout_grace: Duration,
}

impl Context {
    /// A context keeping its caches and workspaces under `work_dir`, which
    /// is created and made absolute (Docker needs absolute bind mounts).
    ///
    /// # Errors
    /// The I/O error when `work_dir` cannot be created.
    pub fn new(docker: Docker, work_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(work_dir)?;
        let work_dir = work_dir.canonicalize()?;
        let digest = Sha256::digest(work_dir.to_string_lossy().as_bytes());
        Ok(Context {
            git: GitCache::new(work_dir.join("git")),
            images: Images::new(docker.clone()),
            agent_label: hex::encode(digest)[..16].to_owned(),
            docker,
            work_dir,
            timeout_grace: Duration::from_secs(10),
        })
    }

    /// Sets the grace period between SIGTERM and SIGKILL when an attempt
    /// reaches its time limit (10 s by default).
    pub fn with_timeout_grace(mut self, grace: Duration) -> Self {
        self.timeout_grace = grace;
        self
    }

    /// The Docker client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The absolute work directory.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// How many image builds this process has started.
    pub fn images_built(&self) -> u64 {
        self.images.builds_started()
    }

    /// The value of the [`docker::LABEL_AGENT`] label on this agent's
    /// containers.
    pub fn agent_label(&self) -> &str {
        &self.agent_label
    }

    /// The images and commits cached here, for the hello.
    pub async fn cache(&self) -> Cache {
        Cache {
            images: docker::env_images(&self.docker, CACHE_LIST_LIMIT).await,
            commits: self.git.commits(CACHE_LIST_LIMIT).await,
        }
    }

    /// Removes containers a previous run of this agent left behind.
    pub async fn remove_leftovers(&self) {
        match docker::remove_leftovers(&self.docker, &self.agent_label).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(containers = n, "removed containers left by a previous run"),
            Err(e) => tracing::warn!(error = %e, "could not look for leftover containers"),
        }
    }

    fn workspace(&self, spec: &RunTask) -> PathBuf {
        self.work_dir
            .join("tasks")
            .join(format!("{}-{}", spec.task_id, spec.attempt))
    }
}

/// Why an attempt failed before its command could run.
#[derive(Debug, thiserror::Error)]
enum PrepareError {
    #[error("{role} {source}")]
    Git {
        role: &'static str,
        source: GitError,
    },
    #[error("dockerfile_path {0:?} must be a relative path inside the env repository")]
    BadDockerfilePath(String),
    #[error("Dockerfile {path} not found in env repository at {commit}")]
    DockerfileMissing { path: String, commit: String },
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("preparing the workspace {path} failed: {source}")]
    Workspace {
        path: String,
        source: std::io::Error,
    },
}

/// How an attempt ended.
#[derive(Debug)]
struct Ending {
    state: ReportedState,
    exit_code: Option<i64>,
    message: Option<String>,
}

impl Ending {
    fn failed(message: impl std::fmt::Display) -> Self {
        Ending {
            state: ReportedState::Failed,
            exit_code: None,
            message: Some(message.to_string()),
        }
    }

    fn plain(state: ReportedState, message: Option<String>) -> Self {
        Ending {
            state,
            exit_code: None,
            message,
        }
    }
}

/// Sends one attempt's reports.
#[derive(Debug, Clone)]
struct Reporter {
    task_id: uuid::Uuid,
    attempt: u32,
    tx: mpsc::Sender<Report>,
}

impl Reporter {
    async fn send(&self, report: Report) {
        if self.tx.send(report).await.is_err() {
            tracing::debug!("report dropped: the agent is shutting down");
        }
    }

    async fn status(&self, state: ReportedState, fill: impl FnOnce(&mut StatusReport)) {
        let mut status = StatusReport::new(self.task_id, self.attempt, state);
        fill(&mut status);
        self.send(Report::Status(status)).await;
    }

    async fn stage(&self, stage: &str) {
        self.status(ReportedState::Preparing, |s| s.stage = Some(stage.into()))
            .await;
    }

    async fn log(&self, chunk: Chunk) {
        self.send(Report::Log(LogReport {
            task_id: self.task_id,
            attempt: self.attempt,
            offset: chunk.offset,
            data: chunk.data,
        }))
        .await;
    }
}

/// Runs one attempt to its end, sending every report to `reports`; see the
/// module documentation for the sequence. `cancel` stops it at any point.
#[tracing::instrument(skip_all, fields(task_id = %spec.task_id, attempt = spec.attempt))]
pub async fn run(
    spec: RunTask,
    ctx: Arc<Context>,
    reports: mpsc::Sender<Report>,
    mut cancel: CancelSignal,
) {
    let out = Reporter {
        task_id: spec.task_id,
        attempt: spec.attempt,
        tx: reports,
    };
    out.status(ReportedState::Accepted, |_| {}).await;
    let workspace = ctx.workspace(&spec);
    let ending = attempt(&spec, &ctx, &out, &mut cancel, &workspace).await;
    remove_workspace(&workspace).await;
    tracing::info!(state = ?ending.state, message = ending.message.as_deref(), "attempt ended");
    out.status(ending.state, |s| {
        s.exit_code = ending.exit_code;
        s.message = ending.message;
    })
    .await;
}

async fn attempt(
    spec: &RunTask,
    ctx: &Context,
    out: &Reporter,
    cancel: &mut CancelSignal,
    workspace: &Path,
) -> Ending {
    let image = tokio::select! {
        prepared = prepare(spec, ctx, out, workspace) => match prepared {
            Ok(image) => image,
            Err(e) => return Ending::failed(e),
        },
        _ = cancel.cancelled() => {
            return Ending::plain(ReportedState::Cancelled, Some("cancelled while preparing".into()));
        }
    };
    run_container(spec, ctx, out, cancel, &workspace.join("code"), &image).await
}

/// Fetches code and env and finds or builds the image; returns its tag.
async fn prepare(
    spec: &RunTask,
    ctx: &Context,
    out: &Reporter,
    workspace: &Path,
) -> Result<String, PrepareError> {
    let dockerfile = checked_dockerfile_path(&spec.dockerfile_path)?;
    fresh_dir(workspace).await?;
    let (code, env) = (workspace.join("code"), workspace.join("env"));

    out.stage(STAGE_CODE).await;
    ctx.git
        .checkout(&spec.code_repo_url, &spec.code_commit_id, &code)
        .await
        .map_err(|source| PrepareError::Git {
            role: "code",
            source,
        })?;

    out.stage(STAGE_ENV).await;
    ctx.git
        .checkout(&spec.env_repo_url, &spec.env_commit_id, &env)
        .await
        .map_err(|source| PrepareError::Git {
            role: "env",
            source,
        })?;
    if !env.join(&dockerfile).is_file() {
        return Err(PrepareError::DockerfileMissing {
            path: spec.dockerfile_path.clone(),
            commit: spec.env_commit_id.clone(),
        });
    }

    out.stage(STAGE_IMAGE).await;
    let tag = docker::image_tag(
        &spec.env_repo_url,
        &spec.env_commit_id,
        &spec.dockerfile_path,
    );
    let source = ctx.images.ensure(&tag, &env, &spec.dockerfile_path).await?;
    tracing::info!(image = %tag, ?source, "image ready");
    Ok(tag)
}

/// Refuses absolute paths and `..`, although the server checked already.
fn checked_dockerfile_path(path: &str) -> Result<PathBuf, PrepareError> {
    let p = Path::new(path);
    let plain = !path.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if plain {
        Ok(p.to_owned())
    } else {
        Err(PrepareError::BadDockerfilePath(path.to_owned()))
    }
}

/// Empties (or creates) the attempt's workspace.
async fn fresh_dir(dir: &Path) -> Result<(), PrepareError> {
    let d = dir.to_owned();
    let result = tokio::task::spawn_blocking(move || {
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
        std::fs::create_dir_all(&d)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    result.map_err(|source| PrepareError::Workspace {
        path: dir.display().to_string(),
        source,
    })
}

async fn remove_workspace(dir: &Path) {
    let d = dir.to_owned();
    let result = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&d) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove the workspace")
        }
        Err(e) => tracing::warn!(error = %e, "workspace removal stopped"),
    }
}

/// Creates, starts and follows the container until it ends, then removes it.
async fn run_container(
    spec: &RunTask,
    ctx: &Context,
    out: &Reporter,
    cancel: &mut CancelSignal,
    code: &Path,
    image: &str,
) -> Ending {
    let labels = HashMap::from([
        (docker::LABEL_TASK.to_owned(), spec.task_id.to_string()),
        (docker::LABEL_ATTEMPT.to_owned(), spec.attempt.to_string()),
        (docker::LABEL_AGENT.to_owned(), ctx.agent_label.clone()),
    ]);
    let container = ContainerSpec {
        image,
        command: &spec.command,
        env: &spec.env,
        workspace: code,
        labels,
        cpus: spec.cpus,
        memory_mb: spec.memory_mb,
        gpus: &spec.gpus,
    };
    let id = match docker::create_container(&ctx.docker, &container).await {
        Ok(id) => id,
        Err(e) => return Ending::failed(e),
    };
    let ending = follow_container(spec, ctx, out, cancel, &id).await;
    if let Err(e) = docker::remove_container(&ctx.docker, &id).await {
        tracing::warn!(container = %id, error = %e, "could not remove the container");
    }
    ending
}

/// Starts the container, streams its output, and waits for the first of:
/// its exit, a cancel, the time limit.
async fn follow_container(
    spec: &RunTask,
    ctx: &Context,
    out: &Reporter,
    cancel: &mut CancelSignal,
    id: &str,
) -> Ending {
    if let Err(e) = docker::start_container(&ctx.docker, id).await {
        return Ending::failed(e);
    }
    out.status(ReportedState::Running, |s| {
        s.container = Some(id.to_owned())
    })
    .await;
    let pump = tokio::spawn(pump_output(ctx.docker.clone(), id.to_owned(), out.clone()));
    let limit = spec.timeout_s.map(Duration::from_secs);
    let ending = tokio::select! {
        exit = docker::wait_exit(&ctx.docker, id) => ended(exit, spec.memory_mb),
        grace = cancel.cancelled() => {
            stop(ctx, id, grace).await;
            Ending::plain(ReportedState::Cancelled, None)
        }
        _ = sleep_or_forever(limit) => {
            stop(ctx, id, ctx.timeout_grace).await;
            let secs = spec.timeout_s.unwrap_or_default();
            Ending::plain(ReportedState::TimedOut, Some(format!("stopped at the time limit of {secs} s")))
        }
    };
    match tokio::time::timeout(LOG_DRAIN_TIMEOUT, pump).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "output reader stopped"),
        Err(_) => tracing::warn!("the container's output did not end; some may be missing"),
    }
    ending
}

fn ended(exit: Result<Exit, DockerError>, memory_mb: u64) -> Ending {
    match exit {
        Ok(Exit { code: 0, .. }) => Ending::plain(ReportedState::Succeeded, None),
        Ok(Exit { code, oom_killed }) => Ending {
            state: ReportedState::Failed,
            exit_code: Some(code),
            message: Some(if oom_killed {
                format!("killed: out of memory (limit {memory_mb} MiB)")
            } else {
                format!("exited with status {code}")
            }),
        },
        Err(e) => Ending::failed(e),
    }
}

async fn stop(ctx: &Context, id: &str, grace: Duration) {
    if let Err(e) = docker::stop_container(&ctx.docker, id, grace).await {
        tracing::warn!(container = %id, error = %e, "stop failed; removing the container");
        if let Err(e) = docker::remove_container(&ctx.docker, id).await {
            tracing::warn!(container = %id, error = %e, "could not remove the container");
        }
    }
}

async fn sleep_or_forever(limit: Option<Duration>) {
    match limit {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Reports the container's output as log chunks until it ends.
async fn pump_output(docker: Docker, id: String, out: Reporter) {
    let mut output = std::pin::pin!(docker::output(&docker, &id));
    let mut chunker = LogChunker::new();
    let mut flush = tokio::time::interval(LOG_FLUSH_INTERVAL);
    loop {
        tokio::select! {
            item = output.next() => match item {
                Some(Ok(bytes)) => {
                    chunker.push(&bytes);
                    while chunker.has_full_chunk() {
                        if let Some(chunk) = chunker.take() {
                            out.log(chunk).await;
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading the output failed");
                    break;
                }
                None => break,
            },
            _ = flush.tick() => {
                if let Some(chunk) = chunker.take() {
                    out.log(chunk).await;
                }
            }
        }
    }
    for chunk in chunker.finish() {
        out.log(chunk).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerfile_paths_must_stay_inside_the_repository() {
        assert!(checked_dockerfile_path("Dockerfile").is_ok());
        assert!(checked_dockerfile_path("ci/gpu.Dockerfile").is_ok());
        assert!(checked_dockerfile_path("../Dockerfile").is_err());
        assert!(checked_dockerfile_path("a/../../Dockerfile").is_err());
        assert!(checked_dockerfile_path("/etc/passwd").is_err());
        assert!(checked_dockerfile_path("").is_err());
    }

    #[tokio::test]
    async fn a_cancel_carries_its_grace_period() {
        let (canceller, mut signal) = cancel_pair();
        canceller.cancel(Duration::from_secs(7));
        assert_eq!(signal.cancelled().await, Duration::from_secs(7));
    }

    #[test]
    fn exits_become_final_states() {
        let ok = ended(
            Ok(Exit {
                code: 0,
                oom_killed: false,
            }),
            64,
        );
        assert_eq!(ok.state, ReportedState::Succeeded);
        let bad = ended(
            Ok(Exit {
                code: 3,
                oom_killed: false,
            }),
            64,
        );
        assert_eq!(bad.exit_code, Some(3));
        assert_eq!(bad.message.as_deref(), Some("exited with status 3"));
        let oom = ended(
            Ok(Exit {
                code: 137,
                oom_killed: true,
            }),
            64,
        );
        assert_eq!(
            oom.message.as_deref(),
            Some("killed: out of memory (limit 64 MiB)")
        );
    }
}
