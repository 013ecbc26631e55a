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
//!
//! Every file of an attempt is reached through [`Root`] handles
//! ([`crate::beneath`]): the attempt's directory `<work dir>/tasks/<task>-<n>`
//! holds the code checkout the container sees (`code/`, also where inputs
//! land and outputs are read), the env checkout (`env/`, the build context)
//! and the agent's own note of the outputs. A repository or a task that puts
//! links anywhere in there cannot make the agent read or write outside.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use futures::StreamExt;
use protocol::{Cache, ReportedState, RunTask};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use crate::beneath::{blocking, PathError, Root};
use crate::disk;
use crate::docker::{
    self, BuildLimits, Confinement, ContainerSpec, DockerError, Exit, ImageSource, Images,
    LayerQuota,
};
use crate::git::{GitCache, GitError};
use crate::logs::{Chunk, LogChunker};
use crate::transfer::{self, Files};

/// The stage reported while the code is fetched.
pub const STAGE_CODE: &str = "fetching code";
/// The stage reported while the env repository is fetched.
pub const STAGE_ENV: &str = "fetching environment";
/// The stage reported while the image is built or found.
pub const STAGE_IMAGE: &str = "building image";
/// The stage reported once the code is in the workspace, with where it came
/// from (`from cache`, `fetched 12 objects, 3.1 KiB`).
pub const STAGE_CODE_READY: &str = "code ready";
/// The stage reported once the env repository is checked out, likewise.
pub const STAGE_ENV_READY: &str = "environment ready";
/// The stage reported once the image exists, with whether it was reused or
/// built.
pub const STAGE_IMAGE_READY: &str = "image ready";
/// The stage reported while the task's inputs are downloaded.
pub const STAGE_INPUTS: &str = "downloading inputs";
/// The stage reported once every input is in the workspace, with how much
/// arrived how fast.
pub const STAGE_INPUTS_READY: &str = "inputs ready";
/// The file in an attempt's directory (beside, not inside, the workspace
/// the container sees) naming its outputs, so an agent that adopts the
/// container after a restart still uploads them.
const OUTPUTS_FILE: &str = "outputs.json";

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
    /// `<work dir>/tasks`, where each attempt gets a directory.
    tasks: Root,
    agent_label: String,
    timeout_grace: Duration,
    /// Set when a commit was fetched or an image built since the server
    /// last heard what is cached.
    cache_changed: std::sync::atomic::AtomicBool,
    /// Moves task inputs and outputs through presigned URLs.
    files: Files,
    /// How task containers are confined.
    confinement: Confinement,
    /// Whether Docker limits containers' writable layers here.
    layer_quota: LayerQuota,
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
        let tasks = Root::open(&work_dir, "the work directory")?
            .create_dir("tasks", "the attempts' directory")
            .map_err(std::io::Error::other)?;
        let digest = Sha256::digest(work_dir.to_string_lossy().as_bytes());
        Ok(Context {
            tasks,
            git: GitCache::new(work_dir.join("git")),
            images: Images::new(docker.clone()),
            agent_label: hex::encode(digest)[..16].to_owned(),
            docker,
            work_dir,
            timeout_grace: Duration::from_secs(10),
            cache_changed: std::sync::atomic::AtomicBool::new(false),
            files: Files::new(Arc::default(), transfer::PART_BYTES),
            confinement: Confinement::default(),
            layer_quota: LayerQuota::default(),
        })
    }

    /// Confines task containers as `confinement` says (by default: 4096
    /// processes, a bridge network, 100 GiB of workspace measured every
    /// 30 s).
    pub fn with_confinement(mut self, confinement: Confinement) -> Self {
        self.confinement = confinement;
        self
    }

    /// Holds every image build to `limits` (no limits by default).
    pub fn with_build_limits(mut self, limits: BuildLimits) -> Self {
        self.images = Images::new(self.docker.clone()).with_limits(limits);
        self
    }

    /// How task containers are confined.
    pub fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    /// Whether Docker limits task containers' writable layers on this
    /// node; `None` before the first task container was created.
    pub fn layer_quota(&self) -> Option<bool> {
        self.layer_quota.supported()
    }

    /// Cuts output uploads into parts of `part_bytes` (64 MiB by default,
    /// at least 5 MiB).
    pub fn with_part_bytes(mut self, part_bytes: u64) -> Self {
        self.files = Files::new(Arc::clone(self.files.broker()), part_bytes);
        self
    }

    /// What moves task inputs and outputs; its broker is served by the
    /// connection.
    pub fn files(&self) -> &Files {
        &self.files
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

    /// Whether the cache changed since the last call (which resets it).
    pub fn take_cache_change(&self) -> bool {
        self.cache_changed
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    fn note_cache_change(&self) {
        self.cache_changed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The images and commits cached here, for the hello.
    pub async fn cache(&self) -> Cache {
        Cache {
            images: docker::env_images(&self.docker, CACHE_LIST_LIMIT).await,
            commits: self.git.commits(CACHE_LIST_LIMIT).await,
        }
    }

    /// The task containers a previous run of this agent left behind, to be
    /// adopted ([`adopt`]); empty (with a warning) when Docker cannot tell.
    pub async fn leftovers(&self) -> Vec<docker::Leftover> {
        match docker::leftovers(&self.docker, &self.agent_label).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for containers left by a previous run");
                Vec::new()
            }
        }
    }
}

/// The name of an attempt's directory under `<work dir>/tasks`.
fn attempt_dir(task_id: uuid::Uuid, attempt: u32) -> String {
    format!("{task_id}-{attempt}")
}

/// An attempt's directories, held open.
#[derive(Debug)]
struct Workspace {
    /// `<work dir>/tasks/<task>-<attempt>`: the agent's notes.
    dir: Root,
    /// `code/` in it: the code checkout, where inputs land and outputs are
    /// read; the container's `/workspace`.
    code: Root,
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
    #[error("Dockerfile {0} is a link to somewhere outside the env repository")]
    DockerfileEscapes(String),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("preparing the workspace failed: {0}")]
    Workspace(#[source] PathError),
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

    async fn stage_done(&self, stage: &str, detail: String) {
        self.status(ReportedState::Preparing, |s| {
            s.stage = Some(stage.into());
            s.message = Some(detail);
        })
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
    let ending = attempt(&spec, &ctx, &out, &mut cancel).await;
    remove_workspace(&ctx, spec.task_id, spec.attempt).await;
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
) -> Ending {
    let (workspace, image) = tokio::select! {
        prepared = prepare(spec, ctx, out) => match prepared {
            Ok(prepared) => prepared,
            Err(e) => return Ending::failed(explain(&e, &ctx.work_dir)),
        },
        _ = cancel.cancelled() => {
            return Ending::plain(ReportedState::Cancelled, Some("cancelled while preparing".into()));
        }
    };
    let code = &workspace.code;
    if !spec.inputs.is_empty() {
        tokio::select! {
            fetched = download_inputs(spec, ctx, out, code) => {
                if let Err(e) = fetched {
                    return Ending::failed(e);
                }
            }
            _ = cancel.cancelled() => {
                return Ending::plain(ReportedState::Cancelled, Some("cancelled while downloading inputs".into()));
            }
        }
    }
    if !spec.outputs.is_empty() {
        note_outputs(&workspace.dir, &spec.outputs).await;
    }
    let ending = run_container(spec, ctx, out, cancel, code.path(), &image).await;
    upload_outputs(
        ctx,
        (spec.task_id, spec.attempt),
        &spec.outputs,
        Ok(code),
        ending,
    )
    .await
}

/// Writes the outputs into the attempt's directory (beside the workspace
/// the container sees), so an agent that adopts the container after a
/// restart still uploads them.
async fn note_outputs(dir: &Root, outputs: &[protocol::TaskOutput]) {
    let Ok(json) = serde_json::to_vec(outputs) else {
        return;
    };
    let written = match dir.try_clone() {
        Ok(dir) => blocking(move || dir.write(OUTPUTS_FILE, &json)).await,
        Err(e) => Err(PathError::Io {
            path: OUTPUTS_FILE.into(),
            source: e,
        }),
    };
    if let Err(e) = written {
        tracing::warn!(error = %e, "could not note the outputs for a later adoption");
    }
}

/// The outputs noted by [`note_outputs`]; none when there is no note.
async fn noted_outputs(dir: &Root) -> Vec<protocol::TaskOutput> {
    let Ok(dir) = dir.try_clone() else {
        return Vec::new();
    };
    match blocking(move || dir.read_small(OUTPUTS_FILE)).await {
        Ok(json) => serde_json::from_slice(&json).unwrap_or_default(),
        Err(PathError::Missing { .. }) => Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the noted outputs");
            Vec::new()
        }
    }
}

/// Downloads every input into the workspace, reporting the stage.
async fn download_inputs(
    spec: &RunTask,
    ctx: &Context,
    out: &Reporter,
    code: &Root,
) -> Result<(), String> {
    out.stage(STAGE_INPUTS).await;
    let started = std::time::Instant::now();
    let mut total = 0;
    for input in &spec.inputs {
        let moved = ctx
            .files
            .download(spec.task_id, spec.attempt, input, code)
            .await?;
        tracing::info!(input = %input.name, size = moved.size, sha256 = %moved.sha256, "input downloaded");
        total += moved.size;
    }
    let detail = transfer::summary(total, spec.inputs.len(), started);
    out.stage_done(STAGE_INPUTS_READY, detail).await;
    Ok(())
}

/// Uploads every output once the container ended (also when it failed or
/// timed out; not after a cancel). Outputs that fail do not stop the others;
/// they fail the attempt, saying which and why. `code` is the workspace, or
/// why it could not be opened.
async fn upload_outputs(
    ctx: &Context,
    (task_id, attempt): (uuid::Uuid, u32),
    outputs: &[protocol::TaskOutput],
    code: Result<&Root, PathError>,
    ending: Ending,
) -> Ending {
    if outputs.is_empty() || ending.state == ReportedState::Cancelled {
        return ending;
    }
    let code = match code {
        Ok(code) => code,
        Err(e) => {
            let what = format!("no output could be uploaded: {e}");
            return with_failures(ending, what);
        }
    };
    let mut failures = Vec::new();
    for output in outputs {
        match ctx.files.upload(task_id, attempt, output, code).await {
            Ok(moved) => {
                tracing::info!(output = %output.name, size = moved.size, sha256 = %moved.sha256, "output uploaded")
            }
            Err(e) => {
                tracing::warn!(output = %output.name, error = %e, "output not uploaded");
                failures.push(e);
            }
        }
    }
    if failures.is_empty() {
        return ending;
    }
    with_failures(ending, failures.join("; "))
}

/// `ending`, failed (or with its reason extended) by what went wrong with
/// the outputs.
fn with_failures(ending: Ending, what: String) -> Ending {
    match ending.state {
        ReportedState::Succeeded => Ending::failed(format!("the command succeeded, but {what}")),
        _ => Ending {
            message: Some(match ending.message {
                Some(m) => format!("{m}; {what}"),
                None => what,
            }),
            ..ending
        },
    }
}

/// Makes the attempt's directory, fetches code and env into it and finds
/// or builds the image; returns the directory and the image's tag.
async fn prepare(
    spec: &RunTask,
    ctx: &Context,
    out: &Reporter,
) -> Result<(Workspace, String), PrepareError> {
    checked_dockerfile_path(&spec.dockerfile_path)?;
    let (workspace, env) = fresh_workspace(ctx, spec.task_id, spec.attempt).await?;
    let code = &workspace.code;

    out.stage(STAGE_CODE).await;
    let fetched = ctx
        .git
        .checkout(&spec.code_repo_url, &spec.code_commit_id, code)
        .await
        .map_err(|source| PrepareError::Git {
            role: "code",
            source,
        })?;
    if !fetched.from_cache {
        ctx.note_cache_change();
    }
    out.stage_done(
        STAGE_CODE_READY,
        format!("commit {}: {fetched}", short(&spec.code_commit_id)),
    )
    .await;

    out.stage(STAGE_ENV).await;
    let fetched = ctx
        .git
        .checkout(&spec.env_repo_url, &spec.env_commit_id, &env)
        .await
        .map_err(|source| PrepareError::Git {
            role: "env",
            source,
        })?;
    if !fetched.from_cache {
        ctx.note_cache_change();
    }
    out.stage_done(
        STAGE_ENV_READY,
        format!("commit {}: {fetched}", short(&spec.env_commit_id)),
    )
    .await;
    check_dockerfile(spec, &env).await?;

    out.stage(STAGE_IMAGE).await;
    let tag = docker::image_tag(
        &spec.env_repo_url,
        &spec.env_commit_id,
        &spec.dockerfile_path,
    );
    let started = std::time::Instant::now();
    let source = ctx.images.ensure(&tag, &env, &spec.dockerfile_path).await?;
    tracing::info!(image = %tag, ?source, "image ready");
    let detail = match source {
        ImageSource::Reused => format!("{tag} cached"),
        ImageSource::Built => {
            ctx.note_cache_change();
            format!("{tag} built in {:.1} s", started.elapsed().as_secs_f64())
        }
    };
    out.stage_done(STAGE_IMAGE_READY, detail).await;
    Ok((workspace, tag))
}

/// An empty directory for the attempt, with `code/` and `env/` in it;
/// returns the workspace and the env checkout's directory.
async fn fresh_workspace(
    ctx: &Context,
    task_id: uuid::Uuid,
    attempt: u32,
) -> Result<(Workspace, Root), PrepareError> {
    let tasks = ctx.tasks.try_clone().map_err(|source| {
        PrepareError::Workspace(PathError::Io {
            path: ctx.tasks.path().display().to_string(),
            source,
        })
    })?;
    let name = attempt_dir(task_id, attempt);
    blocking(move || {
        let dir = tasks.fresh_dir(&name, "the attempt's directory")?;
        let code = dir.create_dir("code", "the workspace")?;
        let env = dir.create_dir("env", "the env repository")?;
        Ok((Workspace { dir, code }, env))
    })
    .await
    .map_err(PrepareError::Workspace)
}

/// Checks that the Dockerfile is a regular file inside the env checkout,
/// opened as Docker will find it: through links that stay inside, never
/// one that leads out.
async fn check_dockerfile(spec: &RunTask, env: &Root) -> Result<(), PrepareError> {
    let env = env.try_clone().map_err(|source| {
        PrepareError::Workspace(PathError::Io {
            path: String::new(),
            source,
        })
    })?;
    let path = spec.dockerfile_path.clone();
    match blocking(move || env.open_file(&path).map(drop)).await {
        Ok(()) => Ok(()),
        Err(PathError::Escapes { .. }) => Err(PrepareError::DockerfileEscapes(
            spec.dockerfile_path.clone(),
        )),
        Err(PathError::Missing { .. } | PathError::NotAFile(_)) => {
            Err(PrepareError::DockerfileMissing {
                path: spec.dockerfile_path.clone(),
                commit: spec.env_commit_id.clone(),
            })
        }
        Err(e) => Err(PrepareError::Workspace(e)),
    }
}

/// The first 12 digits of a commit id.
fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// A preparation failure in words a person can act on; a full disk under
/// the work directory says so, whichever step hit it.
fn explain(e: &PrepareError, work_dir: &Path) -> String {
    let text = e.to_string();
    let full = text.contains("No space left on device")
        || matches!(e, PrepareError::Workspace(p)
            if p.io().is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull));
    if full {
        format!(
            "the node's disk is full: no space left under its work directory {} ({text}); \
             free space there or give the agent another --work-dir",
            work_dir.display()
        )
    } else {
        text
    }
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

/// Removes the attempt's directory with everything in it; links in it are
/// removed, never followed.
async fn remove_workspace(ctx: &Context, task_id: uuid::Uuid, attempt: u32) {
    let tasks = match ctx.tasks.try_clone() {
        Ok(tasks) => tasks,
        Err(e) => {
            tracing::warn!(error = %e, "could not remove the workspace");
            return;
        }
    };
    let name = attempt_dir(task_id, attempt);
    if let Err(e) = blocking(move || tasks.remove(&name)).await {
        tracing::warn!(error = %e, "could not remove the workspace");
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
    let mut labels = labels;
    if let Some(t) = spec.timeout_s {
        labels.insert(docker::LABEL_TIMEOUT.to_owned(), t.to_string());
    }
    // The server refuses such tasks; an older or misbehaving one must not
    // get them run either.
    if let Some(refusal) = docker::refused_env(&spec.env) {
        return Ending::failed(refusal);
    }
    let confinement = &ctx.confinement;
    let container = ContainerSpec {
        image,
        command: &spec.command,
        env: &spec.env,
        workspace: code,
        labels,
        cpus: spec.cpus,
        memory_mb: spec.memory_mb,
        gpus: &spec.gpus,
        pids_limit: confinement.pids_limit,
        network: confinement.network.for_task(spec.network),
        layer_limit_mb: None,
    };
    let created = ctx
        .layer_quota
        .create(&ctx.docker, &container, confinement.workspace.limit_mb)
        .await;
    let (id, layer_limited) = match created {
        Ok(created) => created,
        Err(e) => return Ending::failed(e),
    };
    let disk = DiskWatch {
        workspace: code.to_owned(),
        count_layer: !layer_limited,
    };
    let ending = follow_container(spec, ctx, out, cancel, &id, disk).await;
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
    disk: DiskWatch,
) -> Ending {
    if let Err(e) = docker::start_container(&ctx.docker, id).await {
        return Ending::failed(e);
    }
    out.status(ReportedState::Running, |s| {
        s.container = Some(id.to_owned())
    })
    .await;
    let limits = Limits {
        timeout_s: spec.timeout_s,
        left: spec.timeout_s.map(Duration::from_secs),
        memory_mb: spec.memory_mb,
        disk,
    };
    watch(ctx, out, cancel, id, limits).await
}

/// Removes a container a previous run of this agent created but never
/// started, and its workspace: the attempt did not get to run, and the
/// server gives it up (and retries it) when the agent does not list it.
pub async fn discard(found: &docker::Leftover, ctx: &Context) {
    tracing::info!(task_id = %found.task_id, attempt = found.attempt, "removing a container a previous run never started");
    if let Err(e) = docker::remove_container(&ctx.docker, &found.id).await {
        tracing::warn!(container = %found.id, error = %e, "could not remove the container");
    }
    remove_workspace(ctx, found.task_id, found.attempt).await;
}

/// What a started container is held to.
#[derive(Debug, Clone)]
struct Limits {
    /// The task's time limit, for the message.
    timeout_s: Option<u64>,
    /// How much of it is left.
    left: Option<Duration>,
    /// The memory limit, for the out-of-memory message.
    memory_mb: u64,
    /// What counts against the workspace limit.
    disk: DiskWatch,
}

/// What [`disk::watch`] measures for one container.
#[derive(Debug, Clone)]
struct DiskWatch {
    /// The host directory mounted at `/workspace`.
    workspace: PathBuf,
    /// Whether the writable layer counts too (it has no quota of its own).
    count_layer: bool,
}

/// Streams a started container's output and waits for the first of: its
/// exit, a cancel, the time limit.
async fn watch(
    ctx: &Context,
    out: &Reporter,
    cancel: &mut CancelSignal,
    id: &str,
    limits: Limits,
) -> Ending {
    let (exited, on_exit) = oneshot::channel();
    let pump = tokio::spawn(pump_output(
        ctx.docker.clone(),
        id.to_owned(),
        out.clone(),
        on_exit,
    ));
    let ending = tokio::select! {
        exit = docker::wait_exit(&ctx.docker, id) => ended(exit, limits.memory_mb),
        grace = cancel.cancelled() => {
            stop(ctx, id, grace).await;
            Ending::plain(ReportedState::Cancelled, None)
        }
        _ = sleep_or_forever(limits.left) => {
            stop(ctx, id, ctx.timeout_grace).await;
            let secs = limits.timeout_s.unwrap_or_default();
            Ending::plain(ReportedState::TimedOut, Some(format!("stopped at the time limit of {secs} s")))
        }
        breach = disk::watch(
            ctx.docker.clone(),
            id.to_owned(),
            limits.disk.workspace.clone(),
            limits.disk.count_layer,
            ctx.confinement.workspace,
        ) => {
            tracing::warn!(%breach, "stopping the container for its disk use");
            stop(ctx, id, ctx.timeout_grace).await;
            Ending::failed(breach)
        }
    };
    // The receiver is gone if the output reader already stopped.
    let _ = exited.send(());
    match tokio::time::timeout(LOG_DRAIN_TIMEOUT, pump).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "output reader stopped"),
        Err(_) => tracing::warn!("the container's output did not end; some may be missing"),
    }
    ending
}

/// Takes over a started container a previous run of this agent left behind
/// (see [`discard`] for one that never started): reports
/// it running (again), follows its output from the start (the server keeps
/// only what it does not have yet), and reports how it ended, also when it
/// ended while no agent watched. The rest of its time limit still applies,
/// and a cancel stops it as for any attempt.
#[tracing::instrument(skip_all, fields(task_id = %found.task_id, attempt = found.attempt, container = %found.id))]
pub async fn adopt(
    found: docker::Leftover,
    ctx: Arc<Context>,
    reports: mpsc::Sender<Report>,
    mut cancel: CancelSignal,
) {
    let out = Reporter {
        task_id: found.task_id,
        attempt: found.attempt,
        tx: reports,
    };
    tracing::info!("adopting a container left by a previous run");
    out.status(ReportedState::Running, |s| {
        s.container = Some(found.id.clone())
    })
    .await;
    let elapsed = found.running_for.unwrap_or_default();
    let limits = Limits {
        timeout_s: found.timeout_s,
        left: found
            .timeout_s
            .map(|t| Duration::from_secs(t).saturating_sub(elapsed)),
        memory_mb: found.memory_mb,
        disk: DiskWatch {
            workspace: ctx
                .tasks
                .path()
                .join(attempt_dir(found.task_id, found.attempt))
                .join("code"),
            count_layer: !found.layer_limited,
        },
    };
    let ending = watch(&ctx, &out, &mut cancel, &found.id, limits).await;
    if let Err(e) = docker::remove_container(&ctx.docker, &found.id).await {
        tracing::warn!(error = %e, "could not remove the container");
    }
    let ending = upload_adopted_outputs(&ctx, &found, ending).await;
    remove_workspace(&ctx, found.task_id, found.attempt).await;
    tracing::info!(state = ?ending.state, message = ending.message.as_deref(), "adopted attempt ended");
    out.status(ending.state, |s| {
        s.exit_code = ending.exit_code;
        s.message = ending.message;
    })
    .await;
}

/// Uploads the outputs an adopted attempt noted before the restart.
async fn upload_adopted_outputs(ctx: &Context, found: &docker::Leftover, ending: Ending) -> Ending {
    let name = attempt_dir(found.task_id, found.attempt);
    let workspace = match ctx.tasks.try_clone() {
        Ok(tasks) => {
            blocking(move || {
                let dir = tasks.sub_dir(&name, "the attempt's directory")?;
                let code = dir.sub_dir("code", "the workspace");
                Ok((dir, code))
            })
            .await
        }
        Err(source) => Err(PathError::Io {
            path: String::new(),
            source,
        }),
    };
    let (dir, code) = match workspace {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "the adopted attempt's directory is gone; no outputs");
            return ending;
        }
    };
    let outputs = noted_outputs(&dir).await;
    let key = (found.task_id, found.attempt);
    upload_outputs(
        ctx,
        key,
        &outputs,
        code.as_ref().map_err(clone_error),
        ending,
    )
    .await
}

/// A copy of a path error, to report it once more.
fn clone_error(e: &PathError) -> PathError {
    PathError::Io {
        path: String::new(),
        source: std::io::Error::other(e.to_string()),
    }
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
///
/// Docker sometimes ends a follow before it has written the container's
/// last, unterminated line (the line is logged when the output pipe
/// closes, racing the follower). So once `exited` fires, the entries
/// logged after the last one seen are read again without following.
async fn pump_output(docker: Docker, id: String, out: Reporter, exited: oneshot::Receiver<()>) {
    let mut chunker = LogChunker::new();
    let mut last_seen = None;
    let mut complete = follow_output(&docker, &id, &out, &mut chunker, &mut last_seen).await;
    if complete && exited.await.is_ok() {
        complete = catch_up(&docker, &id, &mut chunker, last_seen).await;
    }
    if !complete {
        tracing::warn!("the container's output could not be read to its end");
    }
    for chunk in chunker.finish() {
        out.log(chunk).await;
    }
}

/// Follows the output until the container stops; false if reading failed.
async fn follow_output(
    docker: &Docker,
    id: &str,
    out: &Reporter,
    chunker: &mut LogChunker,
    last_seen: &mut Option<chrono::DateTime<chrono::Utc>>,
) -> bool {
    let mut output = std::pin::pin!(docker::output(docker, id, true, 0));
    let mut flush = tokio::time::interval(LOG_FLUSH_INTERVAL);
    loop {
        tokio::select! {
            item = output.next() => match item {
                Some(Ok(entry)) => {
                    if entry.at.is_some() {
                        *last_seen = entry.at;
                    }
                    chunker.push(&entry.data);
                    while chunker.has_full_chunk() {
                        if let Some(chunk) = chunker.take() {
                            out.log(chunk).await;
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading the output failed");
                    return false;
                }
                None => return true,
            },
            _ = flush.tick() => {
                if let Some(chunk) = chunker.take() {
                    out.log(chunk).await;
                }
            }
        }
    }
}

/// Adds the entries of a stopped container logged after `last_seen`.
async fn catch_up(
    docker: &Docker,
    id: &str,
    chunker: &mut LogChunker,
    last_seen: Option<chrono::DateTime<chrono::Utc>>,
) -> bool {
    let since = last_seen.map_or(0, |t| i32::try_from(t.timestamp()).unwrap_or(0));
    let mut output = std::pin::pin!(docker::output(docker, id, false, since));
    while let Some(item) = output.next().await {
        match item {
            Ok(entry) => {
                let newer = match (entry.at, last_seen) {
                    (Some(at), Some(seen)) => at > seen,
                    (_, None) => true,
                    (None, Some(_)) => false,
                };
                if newer {
                    tracing::debug!(bytes = entry.data.len(), "output the follow missed");
                    chunker.push(&entry.data);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the rest of the output failed");
                return false;
            }
        }
    }
    true
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
