//! Docker: env images built from a checkout, and task containers.
//!
//! Everything here is a thin, typed layer over bollard that turns Docker's
//! errors into messages a person can act on. The API version is negotiated
//! with the daemon, so old engines (API 1.41) and new ones both work.
//!
//! A task container cannot gain the host ([`container_body`]): no new
//! privileges, every capability dropped but [`TASK_CAPABILITIES`], never
//! privileged, no mount but its workspace, its own IPC, PID and network
//! namespaces (or no network at all), a process limit, and only the GPUs
//! assigned to it. Env images are built by the classic builder under the
//! node's [`BuildLimits`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, EventsOptions, InspectContainerOptions, ListContainersOptionsBuilder,
    ListImagesOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::{BollardRequest, Docker};
use cap_std::fs::Dir;
use futures::{Stream, StreamExt};

use crate::beneath::Root;
use crate::keyed_lock::KeyedLocks;

/// The repository part of every env image tag.
pub const IMAGE_REPOSITORY: &str = protocol::ENV_IMAGE_REPOSITORY;

/// Label naming the task a container runs.
pub const LABEL_TASK: &str = "unidesk.task_id";
/// Label naming the attempt a container runs.
pub const LABEL_ATTEMPT: &str = "unidesk.attempt";
/// Label naming the agent (by its work directory) that owns a container.
pub const LABEL_AGENT: &str = "unidesk.agent";
/// Label holding the task's `timeout_s`, so an agent that restarts and
/// adopts the container still enforces it.
pub const LABEL_TIMEOUT: &str = "unidesk.timeout_s";
/// Label saying the container's environment holds project secrets, so an
/// agent adopting it asks for their values to mask its output.
pub const LABEL_SECRETS: &str = "unidesk.secrets";

/// How many build output lines a failed build reports.
const BUILD_TAIL_LINES: usize = 20;

/// How much output Docker keeps per log file of a task container (two
/// files), in bytes: a task printing without end cannot fill the node's
/// disk. Far above what the server stores per attempt, so the agent (and
/// an agent adopting the container after a restart) still reads all it
/// will send, unless its reading lags the task by more than that.
pub const CONTAINER_LOG_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// The default limit on processes (threads included) in a task container,
/// against fork bombs; the agent's `--task-pids-limit` sets another.
pub const PIDS_LIMIT: i64 = 4096;

/// The capabilities a task's processes keep; every other one is dropped.
/// These are what root inside a container needs for ordinary work:
/// package managers (`apt`, `dpkg`, `pip`, `conda`) installing files owned
/// by other users and switching to their sandbox users, and entry points
/// that start workers as another user and stop them.
///
/// - `CHOWN`: give files to another owner (`dpkg`, `tar` extracting as root).
/// - `DAC_OVERRIDE`: root reads and writes files whatever their mode bits.
/// - `FOWNER`: root changes modes and times of files it does not own.
/// - `FSETID`: keep set-user-id bits when root changes such a file.
/// - `SETUID`, `SETGID`: switch user and group (`su`, `gosu`, `apt`'s `_apt`).
/// - `KILL`: signal processes of another user in the same container.
///
/// Left out of Docker's own default list: `MKNOD` (device nodes),
/// `NET_RAW` (raw sockets: forged packets on the node's bridge),
/// `SYS_CHROOT`, `SETFCAP` and `SETPCAP` (handing capabilities to files and
/// processes), `AUDIT_WRITE` and `NET_BIND_SERVICE` (Docker lets a
/// container bind ports below 1024 in its own network namespace without it).
pub const TASK_CAPABILITIES: [&str; 7] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "SETUID",
    "SETGID",
    "KILL",
];

/// The environment variable that tells the NVIDIA container runtime which
/// GPUs a container sees. The agent always sets it itself.
pub const NVIDIA_VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";

/// The variable that holds the task's id in its container; the server
/// refuses tasks that set any `UNIDESK_*` of their own
/// (`domain::spec::TASK_ID_VARIABLE`).
pub const TASK_ID_VARIABLE: &str = "UNIDESK_TASK_ID";

/// The variable that holds the attempt's number, from 1
/// (`domain::spec::ATTEMPT_VARIABLE`).
pub const ATTEMPT_VARIABLE: &str = "UNIDESK_ATTEMPT";

/// How long one request to Docker may wait for its response to begin. Stop
/// requests wait for the grace period, so this is generous.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// What went wrong talking to Docker.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// A Docker call failed; `message` is Docker's own explanation.
    #[error("{action}: {message}")]
    Api {
        /// What the agent was doing.
        action: &'static str,
        /// Docker's message.
        message: String,
        /// Whether Docker gave no answer (the connection failed or timed
        /// out, or the daemon failed inside), so that asking again later
        /// may succeed; false when it answered no.
        unanswered: bool,
    },
    /// The image build failed; `tail` holds the last lines of its output.
    #[error("building the image failed:\n{tail}")]
    Build {
        /// The last lines of the build output, ending with the error.
        tail: String,
    },
    /// A build step was killed for going past the node's build memory
    /// limit.
    #[error(
        "building the image failed: a build step ran out of memory; this node gives image \
         builds {limit_mb} MiB (--build-memory-mb):\n{tail}"
    )]
    BuildOutOfMemory {
        /// The node's build memory limit.
        limit_mb: u64,
        /// The last lines of the build output.
        tail: String,
    },
    /// The build context could not be packed.
    #[error("packing the build context failed: {0}")]
    Context(#[source] std::io::Error),
}

impl DockerError {
    fn api(action: &'static str, e: &BollardError) -> Self {
        let unanswered = unanswered(e);
        let message = match e {
            // Docker answered, but with a failure of its own: a daemon
            // starting or stopping, a full disk, a broken runtime.
            BollardError::DockerResponseServerError { status_code, .. } if unanswered => {
                format!("Docker failed (HTTP {status_code}: {})", docker_message(e))
            }
            _ if unanswered => format!("Docker did not answer ({})", docker_message(e)),
            _ => docker_message(e),
        };
        DockerError::Api {
            action,
            message,
            unanswered,
        }
    }

    /// Whether Docker gave no answer, so that asking again later may
    /// succeed (see [`Outage`]).
    pub fn is_unanswered(&self) -> bool {
        matches!(
            self,
            DockerError::Api {
                unanswered: true,
                ..
            }
        )
    }
}

/// Whether `e` says Docker did not answer: the connection failed, broke
/// or timed out, its socket is gone, or the daemon failed inside (5xx).
fn unanswered(e: &BollardError) -> bool {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => *status_code >= 500,
        BollardError::RequestTimeoutError
        | BollardError::IOError { .. }
        | BollardError::HyperResponseError { .. }
        | BollardError::HyperLegacyError { .. }
        | BollardError::HttpClientError { .. }
        | BollardError::SocketNotFoundError(_) => true,
        _ => false,
    }
}

/// How long the agent keeps asking a Docker that does not answer while it
/// watches a running container, before it gives up on the container's end
/// or output: Docker Desktop takes about a minute to restart, and a
/// daemon restarted with `live-restore` keeps its containers running.
pub const DOCKER_OUTAGE_MOST: Duration = Duration::from_secs(300);

/// The first and the longest pause between two questions to a Docker
/// that does not answer.
const OUTAGE_PAUSES: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// A run of questions Docker did not answer: how long to pause before the
/// next, and when to give up.
#[derive(Debug, Default)]
pub struct Outage {
    since: Option<tokio::time::Instant>,
    pause: Duration,
    /// Whether Docker failed to answer at least once.
    happened: bool,
}

impl Outage {
    /// Notes that Docker did not answer (`error`) and pauses before the
    /// next question, a little longer each time; `false`, without a
    /// pause, once it has not answered for [`DOCKER_OUTAGE_MOST`].
    pub async fn pause(&mut self, error: &(dyn std::fmt::Display + Sync)) -> bool {
        let now = tokio::time::Instant::now();
        self.happened = true;
        let since = *self.since.get_or_insert(now);
        if since == now {
            tracing::warn!(%error, "Docker does not answer; asking again until it does");
            self.pause = OUTAGE_PAUSES.0;
        } else if now - since >= DOCKER_OUTAGE_MOST {
            tracing::warn!(%error, secs = DOCKER_OUTAGE_MOST.as_secs(), "Docker did not answer; giving up");
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(OUTAGE_PAUSES.1);
        true
    }

    /// Notes that Docker answered: the next failure starts a new outage.
    pub fn over(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(secs = since.elapsed().as_secs_f64(), "Docker answers again");
        }
    }

    /// Whether Docker failed to answer at least once, even if it answers
    /// again now.
    pub fn happened(&self) -> bool {
        self.happened
    }
}

/// What `ask` gets from Docker, asked again while Docker does not answer,
/// for up to [`DOCKER_OUTAGE_MOST`].
///
/// # Errors
/// What Docker answered, or why it did not, once it had not answered for
/// that long.
pub async fn until_answered<T, Ask, Fut>(ask: Ask) -> Result<T, DockerError>
where
    Ask: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DockerError>>,
{
    until_answered_within(&mut Outage::default(), ask).await
}

/// [`until_answered`], noting in `outage` whether Docker failed to answer.
async fn until_answered_within<T, Ask, Fut>(
    outage: &mut Outage,
    mut ask: Ask,
) -> Result<T, DockerError>
where
    Ask: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DockerError>>,
{
    loop {
        match ask().await {
            Err(e) if e.is_unanswered() => {
                if !outage.pause(&e).await {
                    return Err(e);
                }
            }
            answer => {
                outage.over();
                return answer;
            }
        }
    }
}

/// Docker's own message for an error, without bollard's wrapping.
fn docker_message(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message.trim().to_owned(),
        BollardError::DockerStreamError { error } => error.trim().to_owned(),
        other => other.to_string(),
    }
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Connects to Docker at `host` (`unix:///…`, `tcp://…`), or the local
/// default socket, and agrees on an API version with the daemon, asking
/// again while Docker does not answer, for up to [`DOCKER_OUTAGE_MOST`].
///
/// # Errors
/// [`DockerError::Api`] when the address is unusable or the daemon does not
/// answer.
pub async fn connect(host: Option<&str>) -> Result<Docker, DockerError> {
    let docker = match host {
        Some(host) => Docker::connect_with_host(host),
        None => Docker::connect_with_local_defaults(),
    }
    .map_err(|e| DockerError::api("connecting to Docker", &e))?
    .with_timeout(REQUEST_TIMEOUT);
    // An agent started with the machine may come up before Docker does
    // (Docker Desktop takes a minute): it waits as for any outage.
    until_answered(|| async {
        docker
            .clone()
            .negotiate_version()
            .await
            .map_err(|e| DockerError::api("asking Docker for its API version", &e))
    })
    .await
}

/// The tag of the env image built from `dockerfile_path` in `env_repo_url`
/// at `env_commit_id`: equal inputs give equal tags on every node, and the
/// scheduler, which knows which nodes hold which image, computes the same
/// ([`protocol::env_image_tag`]).
pub fn image_tag(env_repo_url: &str, env_commit_id: &str, dockerfile_path: &str) -> String {
    protocol::env_image_tag(env_repo_url, env_commit_id, dockerfile_path)
}

/// Whether [`Images::ensure`] built the image or found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSource {
    /// The tag existed and was used as it is.
    Reused,
    /// The image was built now.
    Built,
}

/// What an image build may use: its steps run in containers of the
/// classic builder (the one bollard asks for by default, and the one that
/// applies these limits; BuildKit ignores them), each held to this much
/// memory, without swap, and this many CPUs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BuildLimits {
    /// Memory of one build step, in MiB.
    pub memory_mb: u64,
    /// CPU cores of one build step.
    pub cpus: f64,
}

impl BuildLimits {
    /// The `/build` query parameters that hold a build to these limits.
    /// bollard types `memory` as a 32-bit number, too small past 2 GiB,
    /// so [`Images`] writes them into the request itself.
    fn query(&self) -> [(&'static str, i64); 4] {
        let memory = i64::try_from(self.memory_mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
        let period = 100_000;
        let quota = ((self.cpus * period as f64).round() as i64).max(1000);
        [
            ("memory", memory),
            ("memswap", memory),
            ("cpuperiod", period),
            ("cpuquota", quota),
        ]
    }

    /// `request` with these limits in its query when it is a build;
    /// other requests pass unchanged.
    fn apply(&self, mut request: BollardRequest) -> BollardRequest {
        if request.method() != "POST" || !request.uri().path().ends_with("/build") {
            return request;
        }
        let text = request.uri().to_string();
        let (base, query) = text.split_once('?').unwrap_or((&text, ""));
        let ours = self.query();
        let mut pairs: Vec<String> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .filter(|pair| {
                let key = pair.split('=').next().unwrap_or_default();
                !ours.iter().any(|(name, _)| *name == key)
            })
            .map(str::to_owned)
            .collect();
        pairs.extend(ours.iter().map(|(name, value)| format!("{name}={value}")));
        match format!("{base}?{}", pairs.join("&")).parse() {
            Ok(uri) => *request.uri_mut() = uri,
            Err(e) => tracing::warn!(error = %e, "could not put the build limits in the request"),
        }
        request
    }
}

/// Builds env images, one build per tag at a time.
#[derive(Debug)]
pub struct Images {
    docker: Docker,
    /// The client builds go through: `docker` with the build limits put
    /// into every build request.
    builder: Docker,
    limits: Option<BuildLimits>,
    locks: KeyedLocks,
    builds: AtomicU64,
}

impl Images {
    /// Env images on `docker`, built without limits until
    /// [`Images::with_limits`].
    pub fn new(docker: Docker) -> Self {
        Images {
            builder: docker.clone(),
            docker,
            limits: None,
            locks: KeyedLocks::default(),
            builds: AtomicU64::new(0),
        }
    }

    /// Holds every build to `limits`.
    pub fn with_limits(mut self, limits: BuildLimits) -> Self {
        self.builder = self
            .docker
            .clone()
            .with_request_modifier(move |request| limits.apply(request));
        self.limits = Some(limits);
        self
    }

    /// The limits builds are held to, if any.
    pub fn limits(&self) -> Option<BuildLimits> {
        self.limits
    }

    /// How many builds this process has started.
    pub fn builds_started(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// Makes sure `tag` exists, building it from `context` (a directory,
    /// packed by [`pack_context`]) with `dockerfile` (relative to it) when it
    /// does not.
    ///
    /// # Errors
    /// [`DockerError::Build`] with the end of the build output when the build
    /// fails, [`DockerError::BuildOutOfMemory`] when a step went past the
    /// build memory limit, [`DockerError::Context`] when the directory
    /// cannot be read, [`DockerError::Api`] when Docker cannot be asked.
    #[tracing::instrument(skip_all, fields(tag))]
    pub async fn ensure(
        &self,
        tag: &str,
        context: &Root,
        dockerfile: &str,
    ) -> Result<ImageSource, DockerError> {
        let _one_build_per_tag = self.locks.lock(tag).await;
        if image_exists(&self.docker, tag).await? {
            return Ok(ImageSource::Reused);
        }
        self.builds.fetch_add(1, Ordering::Relaxed);
        tracing::info!("building image");
        let dir = context.dir().try_clone().map_err(DockerError::Context)?;
        let tar = tokio::task::spawn_blocking(move || pack_context(&dir))
            .await
            .map_err(|e| DockerError::Context(std::io::Error::other(e)))?
            .map_err(DockerError::Context)?;
        let options = BuildImageOptionsBuilder::default()
            .dockerfile(dockerfile)
            .t(tag)
            .rm(true)
            .forcerm(true)
            .build();
        let body = bollard::body_full(bytes::Bytes::from(tar));
        let started = chrono::Utc::now();
        let output = self.builder.build_image(options, None, Some(body));
        let mut steps = Vec::new();
        if let Err(e) = follow_build(output, &mut steps).await {
            return Err(self.explain_build_failure(e, &steps, started).await);
        }
        if !image_exists(&self.docker, tag).await? {
            return Err(DockerError::Build {
                tail: "the build ended without producing the image".into(),
            });
        }
        Ok(ImageSource::Built)
    }

    /// `failure`, or [`DockerError::BuildOutOfMemory`] when Docker saw one
    /// of the build's step containers (`steps`, short ids) run out of
    /// memory since `started`.
    async fn explain_build_failure(
        &self,
        failure: DockerError,
        steps: &[String],
        started: chrono::DateTime<chrono::Utc>,
    ) -> DockerError {
        let (Some(limits), DockerError::Build { tail }) = (self.limits, &failure) else {
            return failure;
        };
        if steps.is_empty() {
            return failure;
        }
        let until = chrono::Utc::now() + Duration::from_secs(1);
        let killed = out_of_memory_since(&self.docker, started, None, until).await;
        if killed
            .iter()
            .any(|id| steps.iter().any(|step| id.starts_with(step.as_str())))
        {
            DockerError::BuildOutOfMemory {
                limit_mb: limits.memory_mb,
                tail: tail.clone(),
            }
        } else {
            failure
        }
    }
}

/// How long after a container's exit Docker's word that the kernel killed
/// it for memory may still come. Docker records the exit and the kill as
/// they reach it, in either order; when the exit comes first, `OOMKilled`
/// stays false for good and only the `oom` event says what happened (seen
/// up to 0.8 s after the exit on a loaded machine). A kill in a
/// container's first moments, before containerd watches its memory, is
/// never reported at all (containerd 1.6, cgroup v1).
pub const OOM_EVENT_GRACE: Duration = Duration::from_secs(3);

/// The ids of containers Docker saw run out of memory from `since` until
/// `until` (waiting for it when it is ahead); of container `only` when
/// given, and then no later than its first.
async fn out_of_memory_since(
    docker: &Docker,
    since: chrono::DateTime<chrono::Utc>,
    only: Option<&str>,
    until: chrono::DateTime<chrono::Utc>,
) -> Vec<String> {
    let mut filters = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        ("event".to_owned(), vec!["oom".to_owned()]),
    ]);
    if let Some(id) = only {
        filters.insert("container".to_owned(), vec![id.to_owned()]);
    }
    let options = EventsOptions {
        since: Some((since.timestamp() - 1).to_string()),
        until: Some(format!(
            "{}.{:09}",
            until.timestamp(),
            until.timestamp_subsec_nanos()
        )),
        filters: Some(filters),
    };
    let mut events = std::pin::pin!(docker.events(Some(options)));
    let mut ids = Vec::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => ids.extend(event.actor.and_then(|a| a.id)),
            Err(e) => {
                tracing::warn!(error = %docker_message(&e), "could not read Docker's events");
                break;
            }
        }
        if only.is_some() && !ids.is_empty() {
            break;
        }
    }
    ids
}

/// `exit` of container `id` (as Docker's `state` of it records), with
/// `oom_killed` set when Docker's events say the kernel killed it for
/// memory though its record does not: waiting for that word until
/// [`OOM_EVENT_GRACE`] after the exit. Only a SIGKILL (status 137) is
/// looked into: it is how the kernel kills.
async fn confirm_out_of_memory(
    docker: &Docker,
    id: &str,
    state: &bollard::models::ContainerState,
    exit: Exit,
) -> Exit {
    if exit.oom_killed || exit.code != KILLED_STATUS {
        return exit;
    }
    let Some(started) = docker_time(state.started_at.as_deref()) else {
        return exit;
    };
    let finished = docker_time(state.finished_at.as_deref()).unwrap_or_else(chrono::Utc::now);
    let until = (finished + OOM_EVENT_GRACE).max(chrono::Utc::now());
    let killed = out_of_memory_since(docker, started, Some(id), until).await;
    if !killed.is_empty() {
        tracing::debug!(container = %id, "Docker said out of memory after the exit");
    }
    Exit {
        oom_killed: !killed.is_empty(),
        ..exit
    }
}

/// The status Docker records for a container whose process a SIGKILL
/// ended: 128 + 9.
pub const KILLED_STATUS: i64 = 137;

/// Reads a build's output, keeping the last lines for an error message and
/// the (short) ids of the containers its steps ran in.
async fn follow_build(
    output: impl Stream<Item = Result<bollard::models::BuildInfo, BollardError>>,
    steps: &mut Vec<String>,
) -> Result<(), DockerError> {
    let mut output = std::pin::pin!(output);
    let mut tail = VecDeque::with_capacity(BUILD_TAIL_LINES + 1);
    let mut keep = |line: &str| {
        if tail.len() == BUILD_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_owned());
    };
    while let Some(item) = output.next().await {
        match item {
            Ok(info) => {
                for line in info
                    .stream
                    .iter()
                    .chain(&info.status)
                    .flat_map(|s| s.lines())
                {
                    let line = strip_ansi(line);
                    let line = line.trim_end();
                    if let Some(id) = line.trim_start().strip_prefix("---> Running in ") {
                        steps.push(id.trim().to_owned());
                    }
                    if !line.is_empty() {
                        tracing::debug!(line, "build");
                        keep(line);
                    }
                }
            }
            // Docker stopped answering mid-build: the build did not fail.
            Err(e) if unanswered(&e) => {
                return Err(DockerError::api("building the image failed", &e));
            }
            Err(e) => {
                keep(&docker_message(&e));
                let tail: Vec<String> = tail.into_iter().collect();
                return Err(DockerError::Build {
                    tail: tail.join("\n"),
                });
            }
        }
    }
    Ok(())
}

/// Removes terminal colour sequences (`ESC [ … letter`), which the classic
/// builder puts around a step's stderr.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Packs the directory `dir` as an uncompressed tar, leaving out `.git`:
/// the build context, which is all the Docker daemon can see of the node.
///
/// The walk goes by directory handles and never follows a link: links are
/// stored as links (Docker resolves them inside the context, never on the
/// node), directories are opened with `O_NOFOLLOW`, files are read from the
/// handle whose type was checked. Anything else (a FIFO, a device) is left
/// out.
fn pack_context(dir: &Dir) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    pack_dir(&mut builder, dir, Path::new(""), 0)?;
    builder.into_inner()
}

/// How deep a build context may nest.
const MAX_CONTEXT_DEPTH: usize = 256;

fn pack_dir(
    builder: &mut tar::Builder<Vec<u8>>,
    dir: &Dir,
    at: &Path,
    depth: usize,
) -> std::io::Result<()> {
    use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt, OpenOptionsSyncExt};
    if depth > MAX_CONTEXT_DEPTH {
        return Err(std::io::Error::other(format!(
            "{} is nested more than {MAX_CONTEXT_DEPTH} directories deep",
            at.display()
        )));
    }
    let mut entries = dir
        .entries()?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<Vec<_>>>()?;
    entries.sort();
    for name in entries {
        if depth == 0 && name == ".git" {
            continue;
        }
        let path = at.join(&name);
        let meta = dir.symlink_metadata(&name)?;
        // The modes git records (0644, or 0755 when executable;
        // directories 0755), a fixed time and owner: the same commit gives
        // the same context (and Docker's cache its hits) whatever the
        // checkout's modes or the agent's umask, and what an image copies
        // from it is as committed.
        let mut header = tar::Header::new_gnu();
        let kind = meta.file_type();
        let executable = cap_std::fs::PermissionsExt::mode(&meta.permissions()) & 0o100 != 0;
        header.set_mode(if kind.is_symlink() {
            0o777
        } else if kind.is_dir() || executable {
            0o755
        } else {
            0o644
        });
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if kind.is_symlink() {
            let target = dir.read_link_contents(&name)?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder.append_link(&mut header, &path, &target)?;
        } else if kind.is_dir() {
            let sub = dir.open_dir_nofollow(&name)?;
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, &path, std::io::empty())?;
            pack_dir(builder, &sub, &path, depth + 1)?;
        } else if kind.is_file() {
            let mut options = cap_std::fs::OpenOptions::new();
            options.read(true).follow(FollowSymlinks::No).nonblock(true);
            let file = dir.open_with(&name, &options)?;
            let opened = file.metadata()?;
            if !opened.is_file() {
                continue;
            }
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(opened.len());
            builder.append_data(&mut header, &path, std::io::Read::take(file, opened.len()))?;
        }
    }
    Ok(())
}

/// Whether an image with this tag exists.
///
/// # Errors
/// [`DockerError::Api`] when Docker cannot be asked.
pub async fn image_exists(docker: &Docker, tag: &str) -> Result<bool, DockerError> {
    match docker.inspect_image(tag).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(DockerError::api("looking up the image", &e)),
    }
}

/// The env image tags present, at most `limit`; empty (with a warning) when
/// Docker cannot be asked.
pub async fn env_images(docker: &Docker, limit: usize) -> Vec<String> {
    let filters = HashMap::from([("reference", vec![format!("{IMAGE_REPOSITORY}:*")])]);
    let options = ListImagesOptionsBuilder::default()
        .filters(&filters)
        .build();
    match docker.list_images(Some(options)).await {
        Ok(images) => images
            .into_iter()
            .flat_map(|image| image.repo_tags)
            .filter(|tag| tag.starts_with(IMAGE_REPOSITORY))
            .take(limit)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %docker_message(&e), "could not list cached images");
            Vec::new()
        }
    }
}

/// The network a node runs task containers on (`--task-network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// Docker's default bridge: the container reaches what the node
    /// reaches, through NAT.
    #[default]
    Bridge,
    /// No network: only a loopback interface.
    None,
}

impl NetworkMode {
    /// Docker's name for it.
    pub fn as_docker(&self) -> &'static str {
        match self {
            NetworkMode::Bridge => "bridge",
            NetworkMode::None => "none",
        }
    }

    /// What a task gets: no network when either the node or the task says
    /// so.
    pub fn for_task(self, asked: protocol::TaskNetwork) -> NetworkMode {
        match asked {
            protocol::TaskNetwork::None => NetworkMode::None,
            protocol::TaskNetwork::Node => self,
        }
    }
}

impl std::str::FromStr for NetworkMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bridge" => Ok(NetworkMode::Bridge),
            "none" => Ok(NetworkMode::None),
            other => Err(format!("{other:?} is not bridge or none")),
        }
    }
}

/// How this node confines its task containers, from the agent's flags.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Confinement {
    /// The most processes in one container (`--task-pids-limit`).
    pub pids_limit: i64,
    /// The network tasks get unless they ask for none (`--task-network`).
    pub network: NetworkMode,
    /// How large a workspace may grow (`--workspace-limit-mb`,
    /// `--workspace-check-s`).
    pub workspace: crate::disk::WorkspaceLimit,
}

impl Default for Confinement {
    fn default() -> Self {
        Confinement {
            pids_limit: PIDS_LIMIT,
            network: NetworkMode::Bridge,
            workspace: crate::disk::WorkspaceLimit::default(),
        }
    }
}

/// Whether `name` is an environment variable that decides which GPUs a
/// container sees: `NVIDIA_VISIBLE_DEVICES`, `CUDA_VISIBLE_DEVICES` or any
/// `NVIDIA_*`, in any case. The server refuses tasks that set one; the
/// agent refuses them too, and never passes one on.
pub fn is_gpu_visibility_variable(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper.starts_with("NVIDIA_") || upper == "CUDA_VISIBLE_DEVICES"
}

/// Why a task's `env` cannot be used as it is, naming the first variable
/// that sets GPU visibility; `None` when it can.
pub fn refused_env(env: &BTreeMap<String, String>) -> Option<String> {
    let name = env.keys().find(|k| is_gpu_visibility_variable(k))?;
    Some(format!(
        "env.{name}: NVIDIA_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES and NVIDIA_* are set by the \
         node from the GPUs assigned to the task, never by the task"
    ))
}

/// What a task container gets.
#[derive(Debug, Clone)]
pub struct ContainerSpec<'a> {
    /// The image tag.
    pub image: &'a str,
    /// The argv; empty keeps the image's default command.
    pub command: &'a [String],
    /// Environment variables; any that set GPU visibility are left out
    /// (see [`is_gpu_visibility_variable`]).
    pub env: &'a BTreeMap<String, String>,
    /// The host directory mounted read-write at `/workspace`.
    pub workspace: &'a Path,
    /// Labels to put on the container.
    pub labels: HashMap<String, String>,
    /// CPU cores; 0 or less means no limit.
    pub cpus: f64,
    /// Memory in MiB; 0 means no limit.
    pub memory_mb: u64,
    /// GPU device indices.
    pub gpus: &'a [u32],
    /// The most processes (threads included) in the container.
    pub pids_limit: i64,
    /// The container's network.
    pub network: NetworkMode,
    /// The size limit of the container's own writable layer in MiB, on
    /// storage drivers that support one (see [`LayerQuota`]).
    pub layer_limit_mb: Option<u64>,
    /// The size of each of the two files Docker keeps the container's
    /// output in ([`CONTAINER_LOG_FILE_BYTES`] unless told otherwise).
    pub log_file_bytes: u64,
}

/// The body of the create call for `spec`. Nothing in `spec` can add a
/// mount, a device, a capability or a host namespace: those are fixed
/// here.
pub fn container_body(spec: &ContainerSpec<'_>) -> ContainerCreateBody {
    let memory = (spec.memory_mb > 0).then(|| (spec.memory_mb * 1024 * 1024) as i64);
    let device_requests = (!spec.gpus.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(spec.gpus.iter().map(u32::to_string).collect()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    });
    let host_config = HostConfig {
        binds: Some(vec![format!("{}:/workspace:rw", spec.workspace.display())]),
        nano_cpus: (spec.cpus > 0.0).then(|| (spec.cpus * 1e9).round() as i64),
        memory,
        memory_swap: memory,
        pids_limit: Some(spec.pids_limit),
        device_requests,
        privileged: Some(false),
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        cap_drop: Some(vec!["ALL".into()]),
        cap_add: Some(TASK_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()),
        network_mode: Some(spec.network.as_docker().into()),
        ipc_mode: Some("private".into()),
        storage_opt: spec
            .layer_limit_mb
            .map(|mb| HashMap::from([("size".to_owned(), format!("{}", mb * 1024 * 1024))])),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                (
                    "max-size".to_owned(),
                    spec.log_file_bytes.max(1).to_string(),
                ),
                ("max-file".to_owned(), "2".to_owned()),
            ])),
        }),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.to_owned()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.to_vec()),
        env: Some(container_env(spec.env, spec.gpus)),
        working_dir: Some("/workspace".into()),
        labels: Some(spec.labels.clone()),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// The container's environment: the task's variables without any that
/// set GPU visibility, then `NVIDIA_VISIBLE_DEVICES` with the assigned
/// device indices, or `void` for none. A container's variables win over
/// its image's, so an image built with `ENV NVIDIA_VISIBLE_DEVICES=all`
/// still sees no GPU but its own under the NVIDIA runtime.
fn container_env(env: &BTreeMap<String, String>, gpus: &[u32]) -> Vec<String> {
    let visible = if gpus.is_empty() {
        "void".to_owned()
    } else {
        gpus.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    env.iter()
        .filter(|(k, _)| !is_gpu_visibility_variable(k))
        .map(|(k, v)| format!("{k}={v}"))
        .chain(std::iter::once(format!(
            "{NVIDIA_VISIBLE_DEVICES}={visible}"
        )))
        .collect()
}

/// Creates a container for `spec` exactly as asked and returns its id.
///
/// # Errors
/// [`DockerError::Api`] with Docker's message.
pub async fn create_container(
    docker: &Docker,
    spec: &ContainerSpec<'_>,
) -> Result<String, DockerError> {
    let created = docker
        .create_container(None, container_body(spec))
        .await
        .map_err(|e| DockerError::api("creating the container failed", &e))?;
    for warning in &created.warnings {
        tracing::warn!(warning, "Docker warned about the container");
    }
    Ok(created.id)
}

/// Whether this node's Docker can limit the size of a container's
/// writable layer (`storage_opt size`: overlay2 on xfs mounted with
/// `pquota`, btrfs, zfs). Docker itself is the judge: the first task
/// container is created with the limit, and if Docker refuses the storage
/// option, the same container is created without; the node has no such
/// quota and
/// the agent counts the writable layer into the workspace limit instead
/// (see [`crate::disk`]).
#[derive(Debug, Default)]
pub struct LayerQuota(AtomicU8);

// 0: not known yet.
const QUOTA_YES: u8 = 1;
const QUOTA_NO: u8 = 2;

impl LayerQuota {
    /// Whether Docker is known to limit writable layers; `None` before the
    /// first task container.
    pub fn supported(&self) -> Option<bool> {
        match self.0.load(Ordering::Relaxed) {
            QUOTA_YES => Some(true),
            QUOTA_NO => Some(false),
            _ => None,
        }
    }

    /// Creates a container for `spec` with its writable layer limited to
    /// `limit_mb` where Docker can, and returns its id and whether the
    /// limit applies.
    ///
    /// # Errors
    /// [`DockerError::Api`] with Docker's message when the container
    /// cannot be created even without the limit.
    pub async fn create(
        &self,
        docker: &Docker,
        spec: &ContainerSpec<'_>,
        limit_mb: u64,
    ) -> Result<(String, bool), DockerError> {
        let plain = ContainerSpec {
            layer_limit_mb: None,
            ..spec.clone()
        };
        if self.supported() == Some(false) {
            return Ok((create_container(docker, &plain).await?, false));
        }
        let limited = ContainerSpec {
            layer_limit_mb: Some(limit_mb),
            ..spec.clone()
        };
        let refusal = match create_container(docker, &limited).await {
            Ok(id) => {
                if self.0.swap(QUOTA_YES, Ordering::Relaxed) != QUOTA_YES {
                    tracing::info!(
                        limit_mb,
                        "task containers' writable layers are limited by the storage driver"
                    );
                }
                return Ok((id, true));
            }
            Err(refusal) => refusal,
        };
        let about_storage = {
            let text = refusal.to_string().to_ascii_lowercase();
            text.contains("storage") || text.contains("quota")
        };
        if !about_storage {
            return Err(refusal);
        }
        let id = create_container(docker, &plain).await?;
        if self.0.swap(QUOTA_NO, Ordering::Relaxed) != QUOTA_NO {
            tracing::warn!(
                docker_said = %refusal,
                "this node's storage driver cannot limit a container's writable layer; \
                 the agent counts it into the workspace limit instead"
            );
        }
        Ok((id, false))
    }
}

/// How many bytes the container's writable layer holds, as Docker counts
/// them; `None` when Docker cannot tell.
pub async fn writable_layer_bytes(docker: &Docker, id: &str) -> Option<u64> {
    let options = InspectContainerOptions { size: true };
    match docker.inspect_container(id, Some(options)).await {
        Ok(info) => info.size_rw.and_then(|b| u64::try_from(b).ok()),
        Err(e) => {
            tracing::debug!(error = %docker_message(&e), "could not size the writable layer");
            None
        }
    }
}

/// Starts a created container.
///
/// # Errors
/// [`DockerError::Api`] with Docker's message (for example, the command was
/// not found in the image).
pub async fn start_container(docker: &Docker, id: &str) -> Result<(), DockerError> {
    docker
        .start_container(id, None)
        .await
        .map_err(|e| DockerError::api("starting the container failed", &e))
}

/// One entry of a container's output, with the time Docker logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputEntry {
    /// When Docker received it; `None` if the stamp could not be read.
    pub at: Option<chrono::DateTime<chrono::Utc>>,
    /// The bytes.
    pub data: bytes::Bytes,
}

/// The container's combined stdout and stderr from its start (or from
/// `since_s`, whole seconds since the epoch), following it until it exits
/// when `follow` is set.
pub fn output(
    docker: &Docker,
    id: &str,
    follow: bool,
    since_s: i32,
) -> impl Stream<Item = Result<OutputEntry, DockerError>> {
    let options = LogsOptionsBuilder::default()
        .follow(follow)
        .stdout(true)
        .stderr(true)
        .timestamps(true)
        .since(since_s)
        .build();
    docker.logs(id, Some(options)).map(|item| {
        item.map(|out| stamped(out.into_bytes()))
            .map_err(|e| DockerError::api("reading the container's output failed", &e))
    })
}

/// Splits Docker's `<RFC 3339 time> <data>` log entry.
fn stamped(entry: bytes::Bytes) -> OutputEntry {
    let space = entry.iter().position(|b| *b == b' ');
    let at = space.and_then(|i| {
        let stamp = std::str::from_utf8(&entry[..i]).ok()?;
        chrono::DateTime::parse_from_rfc3339(stamp)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    });
    match (at, space) {
        (Some(at), Some(i)) => OutputEntry {
            at: Some(at),
            data: entry.slice(i + 1..),
        },
        _ => OutputEntry {
            at: None,
            data: entry,
        },
    }
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit status.
    pub code: i64,
    /// Whether the kernel killed it for running out of memory.
    pub oom_killed: bool,
    /// Whether Docker stopped answering between the last time the agent
    /// saw the container running and the moment it learnt of its end: the
    /// end came while Docker itself was going away or coming back, as when
    /// a daemon restarted without `live-restore` stops its containers.
    pub amid_outage: bool,
}

/// Waits until the container has stopped and says how it ended, asking
/// again while Docker does not answer, for up to [`DOCKER_OUTAGE_MOST`].
///
/// # Errors
/// [`DockerError::Api`] when Docker cannot tell.
pub async fn wait_exit(docker: &Docker, id: &str) -> Result<Exit, DockerError> {
    loop {
        let mut outage = Outage::default();
        let mut wait = std::pin::pin!(docker.wait_container(id, None));
        let told = match wait.next().await {
            Some(Ok(_)) | Some(Err(BollardError::DockerContainerWaitError { .. })) => true,
            Some(Err(e)) if unanswered(&e) => false,
            Some(Err(e)) => {
                tracing::warn!(error = %docker_message(&e), "waiting for the container");
                true
            }
            // The answer ended before it said anything.
            None => false,
        };
        let state = until_answered_within(&mut outage, || async {
            docker
                .inspect_container(id, None)
                .await
                .map_err(|e| DockerError::api("inspecting the container failed", &e))
        })
        .await?
        .state
        .unwrap_or_default();
        if state.running != Some(true) {
            // Docker shuts its API before it stops its containers: the
            // wait is either cut or answered just before the inspection
            // finds Docker gone.
            let exit = Exit {
                code: state.exit_code.unwrap_or(-1),
                oom_killed: state.oom_killed.unwrap_or(false),
                amid_outage: !told || outage.happened(),
            };
            return Ok(confirm_out_of_memory(docker, id, &state, exit).await);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Stops a container: SIGTERM, then SIGKILL after `grace`.
///
/// # Errors
/// [`DockerError::Api`] when Docker refuses.
pub async fn stop_container(docker: &Docker, id: &str, grace: Duration) -> Result<(), DockerError> {
    let grace_s = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
    let options = StopContainerOptionsBuilder::default().t(grace_s).build();
    match docker.stop_container(id, Some(options)).await {
        Ok(()) => Ok(()),
        // 304: it had stopped already.
        Err(BollardError::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(e) => Err(DockerError::api("stopping the container failed", &e)),
    }
}

/// Removes a container, stopping it first if it still runs; a container
/// that is gone already is fine.
///
/// # Errors
/// [`DockerError::Api`] when Docker refuses.
pub async fn remove_container(docker: &Docker, id: &str) -> Result<(), DockerError> {
    let options = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(id, Some(options)).await {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(DockerError::api("removing the container failed", &e)),
    }
}

/// How a stopped container ended, as Docker recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedExit {
    /// Its exit status and whether it ran out of memory.
    pub exit: Exit,
    /// How long it ran: from its start to its end (`FinishedAt` minus
    /// `StartedAt`), whenever anyone looked.
    pub ran_for: Duration,
}

/// How a container ended, from Docker's record of it (`State.ExitCode`,
/// `OOMKilled`, `StartedAt`, `FinishedAt`); `None` while it runs or if it
/// never ran.
///
/// # Errors
/// [`DockerError::Api`] when Docker cannot tell.
pub async fn recorded_exit(docker: &Docker, id: &str) -> Result<Option<RecordedExit>, DockerError> {
    let info = docker
        .inspect_container(id, None)
        .await
        .map_err(|e| DockerError::api("inspecting the container failed", &e))?;
    Ok(match &info.state {
        Some(state) => recorded_end(docker, id, state).await,
        None => None,
    })
}

/// A stopped container's recorded end, its out-of-memory kill confirmed
/// (see [`confirm_out_of_memory`]); `None` while it runs.
async fn recorded_end(
    docker: &Docker,
    id: &str,
    state: &bollard::models::ContainerState,
) -> Option<RecordedExit> {
    let recorded = exit_of(state)?;
    Some(RecordedExit {
        exit: confirm_out_of_memory(docker, id, state, recorded.exit).await,
        ..recorded
    })
}

/// A stopped container's recorded end.
fn exit_of(state: &bollard::models::ContainerState) -> Option<RecordedExit> {
    if state.running == Some(true) {
        return None;
    }
    let started = docker_time(state.started_at.as_deref())?;
    let finished = docker_time(state.finished_at.as_deref())?;
    Some(RecordedExit {
        exit: Exit {
            code: state.exit_code?,
            oom_killed: state.oom_killed.unwrap_or(false),
            amid_outage: false,
        },
        ran_for: (finished - started).to_std().unwrap_or_default(),
    })
}

/// A time of a container's state; `None` for Docker's zero time
/// (0001-01-01: it never happened).
fn docker_time(text: Option<&str>) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(text?)
        .ok()
        .filter(|t| t.timestamp() > 0)
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// The containers of attempt `attempt` of `task_id` made by the agent with
/// `agent_label`, running or not.
///
/// # Errors
/// [`DockerError::Api`] when Docker cannot list them.
pub async fn attempt_containers(
    docker: &Docker,
    agent_label: &str,
    task_id: uuid::Uuid,
    attempt: u32,
) -> Result<Vec<String>, DockerError> {
    let filters = HashMap::from([(
        "label",
        vec![
            format!("{LABEL_AGENT}={agent_label}"),
            format!("{LABEL_TASK}={task_id}"),
            format!("{LABEL_ATTEMPT}={attempt}"),
        ],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let containers = docker
        .list_containers(Some(options))
        .await
        .map_err(|e| DockerError::api("listing the attempt's containers failed", &e))?;
    Ok(containers.into_iter().filter_map(|c| c.id).collect())
}

/// A task container a previous run of this agent (same `agent_label`) left
/// behind, running or stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// The container.
    pub id: String,
    /// Its task, from [`LABEL_TASK`].
    pub task_id: uuid::Uuid,
    /// Its attempt, from [`LABEL_ATTEMPT`].
    pub attempt: u32,
    /// The task's time limit, from [`LABEL_TIMEOUT`].
    pub timeout_s: Option<u64>,
    /// Its memory limit in MiB (0: none).
    pub memory_mb: u64,
    /// How long ago it started; `None` if it never did.
    pub running_for: Option<Duration>,
    /// How it ended, when it has stopped: this, not the time since,
    /// says whether it ended within its time limit.
    pub exit: Option<RecordedExit>,
    /// Whether its environment holds project secrets ([`LABEL_SECRETS`]).
    pub uses_secrets: bool,
    /// Whether its writable layer has a size limit of its own.
    pub layer_limited: bool,
}

/// The task containers a previous run of this agent left behind. Containers
/// whose labels cannot be read are removed: nothing can follow them.
///
/// # Errors
/// [`DockerError::Api`] when Docker cannot list them.
pub async fn leftovers(docker: &Docker, agent_label: &str) -> Result<Vec<Leftover>, DockerError> {
    let filters = HashMap::from([("label", vec![format!("{LABEL_AGENT}={agent_label}")])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let containers = docker
        .list_containers(Some(options))
        .await
        .map_err(|e| DockerError::api("listing leftover containers failed", &e))?;
    let mut found = Vec::new();
    for id in containers.into_iter().filter_map(|c| c.id) {
        // Docker lists a container it is still creating before it can be
        // inspected (a create the previous run asked for just before it
        // died): one listed but not found is looked at again for a moment.
        let inspected = until_settled(
            || inspect_leftover(docker, &id),
            |inspected| !matches!(inspected, Ok(Inspected::NotFound)),
        )
        .await;
        match inspected {
            Ok(Inspected::Task(leftover)) => found.push(*leftover),
            Ok(Inspected::NotFound) => {
                tracing::info!(container = %id, "a listed container is gone");
            }
            Ok(Inspected::Unlabelled) => {
                tracing::warn!(container = %id, "removing a container without readable task labels");
                if let Err(e) = remove_container(docker, &id).await {
                    tracing::warn!(container = %id, error = %e, "could not remove it");
                }
            }
            Err(e) => {
                tracing::warn!(container = %id, error = %e, "could not inspect a leftover container")
            }
        }
    }
    Ok(found)
}

/// How many times the agent looks at something Docker may still be
/// finishing (a container's create or removal) before it takes what it
/// sees.
pub const SETTLE_LOOKS: u32 = 10;

/// How long apart those looks are: about two seconds in all.
pub const SETTLE_PAUSE: Duration = Duration::from_millis(200);

/// Runs `look` until what it returns is `settled`, at most
/// [`SETTLE_LOOKS`] times, [`SETTLE_PAUSE`] apart; returns the last look.
pub async fn until_settled<T, Fut>(mut look: impl FnMut() -> Fut, settled: impl Fn(&T) -> bool) -> T
where
    Fut: std::future::Future<Output = T>,
{
    let mut seen = look().await;
    for _ in 1..SETTLE_LOOKS {
        if settled(&seen) {
            break;
        }
        tokio::time::sleep(SETTLE_PAUSE).await;
        seen = look().await;
    }
    seen
}

/// What inspecting a listed container found.
enum Inspected {
    /// A task container of this agent.
    Task(Box<Leftover>),
    /// A container without readable task labels.
    Unlabelled,
    /// Nothing: it is gone, or not made yet.
    NotFound,
}

async fn inspect_leftover(docker: &Docker, id: &str) -> Result<Inspected, DockerError> {
    let info = match docker.inspect_container(id, None).await {
        Ok(info) => info,
        Err(e) if is_not_found(&e) => return Ok(Inspected::NotFound),
        Err(e) => return Err(DockerError::api("inspecting the container failed", &e)),
    };
    let labels = info
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default();
    let task_id = labels
        .get(LABEL_TASK)
        .and_then(|t| uuid::Uuid::try_parse(t).ok());
    let attempt = labels.get(LABEL_ATTEMPT).and_then(|a| a.parse().ok());
    let (Some(task_id), Some(attempt)) = (task_id, attempt) else {
        return Ok(Inspected::Unlabelled);
    };
    // Docker writes 0001-01-01 for a container that never started.
    let started = docker_time(info.state.as_ref().and_then(|s| s.started_at.as_deref()));
    let running_for = started.map(|t| (chrono::Utc::now() - t).to_std().unwrap_or_default());
    let exit = match (started, &info.state) {
        (Some(_), Some(state)) => recorded_end(docker, id, state).await,
        _ => None,
    };
    let memory = info
        .host_config
        .as_ref()
        .and_then(|h| h.memory)
        .unwrap_or(0);
    let layer_limited = info
        .host_config
        .as_ref()
        .and_then(|h| h.storage_opt.as_ref())
        .is_some_and(|opts| opts.contains_key("size"));
    Ok(Inspected::Task(Box::new(Leftover {
        id: id.to_owned(),
        task_id,
        attempt,
        timeout_s: labels.get(LABEL_TIMEOUT).and_then(|t| t.parse().ok()),
        uses_secrets: labels.contains_key(LABEL_SECRETS),
        memory_mb: u64::try_from(memory).unwrap_or(0) / (1024 * 1024),
        running_for,
        exit,
        layer_limited,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_outage_pauses_longer_each_time_gives_up_at_its_bound_and_starts_over_once_answered()
    {
        let mut outage = Outage::default();
        let started = tokio::time::Instant::now();
        let mut pauses = Vec::new();
        let mut at = started;
        while outage.pause(&"refused").await {
            pauses.push(at.elapsed());
            at = tokio::time::Instant::now();
        }
        assert_eq!(
            pauses[..6],
            [250, 500, 1000, 2000, 4000, 5000].map(Duration::from_millis)
        );
        assert!(pauses[6..].iter().all(|p| *p == OUTAGE_PAUSES.1));
        let asked_for = started.elapsed();
        assert!(
            asked_for >= DOCKER_OUTAGE_MOST && asked_for < DOCKER_OUTAGE_MOST + OUTAGE_PAUSES.1,
            "{asked_for:?}"
        );
        // Once Docker answered, a new failure is a new outage.
        outage.over();
        let again = tokio::time::Instant::now();
        assert!(outage.pause(&"refused").await);
        assert_eq!(again.elapsed(), OUTAGE_PAUSES.0);
    }

    #[test]
    fn only_failures_to_answer_are_asked_again() {
        let server = |status_code| BollardError::DockerResponseServerError {
            status_code,
            message: "m".into(),
        };
        assert!(unanswered(&server(500)));
        assert!(unanswered(&server(503)));
        assert!(unanswered(&BollardError::RequestTimeoutError));
        assert!(!unanswered(&server(404)));
        assert!(!unanswered(&server(409)));
        assert!(!unanswered(&BollardError::DockerStreamError {
            error: "e".into()
        }));
    }

    #[test]
    fn a_failure_inside_docker_is_not_said_to_be_no_answer() {
        let message =
            |e: &BollardError| DockerError::api("starting the container failed", e).to_string();
        assert_eq!(
            message(&BollardError::DockerResponseServerError {
                status_code: 500,
                message: "write /var/lib/docker/x: no space left on device\n".into(),
            }),
            "starting the container failed: Docker failed (HTTP 500: write /var/lib/docker/x: no \
             space left on device)"
        );
        assert_eq!(
            message(&BollardError::RequestTimeoutError),
            "starting the container failed: Docker did not answer (Timeout error)"
        );
        let refused = BollardError::DockerResponseServerError {
            status_code: 404,
            message: "No such image: x".into(),
        };
        assert_eq!(
            message(&refused),
            "starting the container failed: No such image: x"
        );
    }

    #[test]
    fn colour_sequences_are_removed_from_build_output() {
        assert_eq!(strip_ansi("\u{1b}[91mthe-build-broke"), "the-build-broke");
        assert_eq!(strip_ansi("\u{1b}[0m"), "");
        assert_eq!(strip_ansi("plain [text]"), "plain [text]");
    }

    #[test]
    fn image_tags_depend_on_all_three_inputs() {
        let a = image_tag("u", "c", "Dockerfile");
        assert!(a.starts_with("unidesk-env:"));
        assert_eq!(a.len(), "unidesk-env:".len() + 24);
        assert_eq!(a, image_tag("u", "c", "Dockerfile"));
        assert_ne!(a, image_tag("u", "c", "other/Dockerfile"));
        assert_ne!(a, image_tag("u", "d", "Dockerfile"));
    }

    #[test]
    fn build_limits_replace_any_in_the_build_request_and_fit_past_2_gib() {
        let limits = BuildLimits {
            memory_mb: 4096,
            cpus: 1.5,
        };
        let request = http_request(
            "POST",
            "http://docker/v1.41/build?dockerfile=Dockerfile&memory=1&t=img%3Atag",
        );
        let uri = limits.apply(request).uri().to_string();
        let query = uri.split_once('?').unwrap().1;
        let mut pairs: Vec<&str> = query.split('&').collect();
        pairs.sort_unstable();
        assert_eq!(
            pairs,
            [
                "cpuperiod=100000",
                "cpuquota=150000",
                "dockerfile=Dockerfile",
                "memory=4294967296",
                "memswap=4294967296",
                "t=img%3Atag",
            ]
        );
        let other = http_request("POST", "http://docker/v1.41/containers/create");
        assert_eq!(
            limits.apply(other).uri().to_string(),
            "http://docker/v1.41/containers/create"
        );
    }

    fn http_request(method: &str, uri: &str) -> BollardRequest {
        let mut request = BollardRequest::new(bollard::body_full(bytes::Bytes::new()));
        *request.method_mut() = method.parse().unwrap();
        *request.uri_mut() = uri.parse().unwrap();
        request
    }

    #[test]
    fn the_task_cannot_set_gpu_visibility_and_the_agent_always_does() {
        let env = BTreeMap::from([
            ("A".to_owned(), "1".to_owned()),
            ("nvidia_visible_devices".to_owned(), "all".to_owned()),
            ("CUDA_VISIBLE_DEVICES".to_owned(), "0".to_owned()),
        ]);
        assert_eq!(
            container_env(&env, &[]),
            ["A=1", "NVIDIA_VISIBLE_DEVICES=void"]
        );
        assert_eq!(
            container_env(&env, &[1, 3]),
            ["A=1", "NVIDIA_VISIBLE_DEVICES=1,3"]
        );
        let refused = refused_env(&env).unwrap();
        assert!(
            refused.starts_with("env.CUDA_VISIBLE_DEVICES: "),
            "{refused}"
        );
        assert!(refused_env(&BTreeMap::from([("CUDA_HOME".to_owned(), String::new())])).is_none());
    }

    #[test]
    fn the_task_network_is_none_when_the_node_or_the_task_says_so() {
        use protocol::TaskNetwork;
        assert_eq!(
            NetworkMode::Bridge.for_task(TaskNetwork::Node),
            NetworkMode::Bridge
        );
        assert_eq!(
            NetworkMode::Bridge.for_task(TaskNetwork::None),
            NetworkMode::None
        );
        assert_eq!(
            NetworkMode::None.for_task(TaskNetwork::Node),
            NetworkMode::None
        );
        assert_eq!("none".parse(), Ok(NetworkMode::None));
        assert!("host".parse::<NetworkMode>().is_err());
    }

    #[test]
    fn the_container_gets_limits_mounts_and_gpus() {
        let env = BTreeMap::from([("A".to_owned(), "1".to_owned())]);
        let command = vec!["run".to_owned()];
        let spec = ContainerSpec {
            image: "img",
            command: &command,
            env: &env,
            workspace: Path::new("/w/code"),
            labels: HashMap::new(),
            cpus: 1.5,
            memory_mb: 256,
            gpus: &[0, 2],
            pids_limit: 77,
            network: NetworkMode::None,
            layer_limit_mb: Some(3),
            log_file_bytes: CONTAINER_LOG_FILE_BYTES,
        };
        let body = container_body(&spec);
        let host = body.host_config.unwrap();
        assert_eq!(host.pids_limit, Some(77));
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.security_opt.unwrap(), ["no-new-privileges:true"]);
        assert_eq!(host.cap_drop.unwrap(), ["ALL"]);
        assert_eq!(host.cap_add.unwrap(), TASK_CAPABILITIES);
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.ipc_mode.as_deref(), Some("private"));
        assert_eq!(host.storage_opt.unwrap()["size"], "3145728");
        assert!(host.devices.is_none() && host.mounts.is_none() && host.volumes_from.is_none());
        assert!(host.pid_mode.is_none() && host.userns_mode.is_none());
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.memory, Some(256 * 1024 * 1024));
        assert_eq!(host.memory_swap, host.memory);
        assert_eq!(host.binds.unwrap(), vec!["/w/code:/workspace:rw"]);
        let gpus = &host.device_requests.unwrap()[0];
        assert_eq!(
            gpus.device_ids.as_deref(),
            Some(&["0".to_owned(), "2".to_owned()][..])
        );
        assert_eq!(body.env.unwrap(), vec!["A=1", "NVIDIA_VISIBLE_DEVICES=0,2"]);
        let logs = host.log_config.unwrap();
        assert_eq!(logs.typ.as_deref(), Some("json-file"));
        assert_eq!(logs.config.unwrap()["max-size"], "268435456");
        assert_eq!(body.working_dir.as_deref(), Some("/workspace"));
    }
}
