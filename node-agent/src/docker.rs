//! Docker: env images built from a checkout, and task containers.
//!
//! Everything here is a thin, typed layer over bollard that turns Docker's
//! errors into messages a person can act on. The API version is negotiated
//! with the daemon, so old engines (API 1.41) and new ones both work.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, ListContainersOptionsBuilder, ListImagesOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use cap_std::fs::Dir;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};

use crate::beneath::Root;
use crate::keyed_lock::KeyedLocks;

/// The repository part of every env image tag.
pub const IMAGE_REPOSITORY: &str = "unidesk-env";

/// Label naming the task a container runs.
pub const LABEL_TASK: &str = "unidesk.task_id";
/// Label naming the attempt a container runs.
pub const LABEL_ATTEMPT: &str = "unidesk.attempt";
/// Label naming the agent (by its work directory) that owns a container.
pub const LABEL_AGENT: &str = "unidesk.agent";
/// Label holding the task's `timeout_s`, so an agent that restarts and
/// adopts the container still enforces it.
pub const LABEL_TIMEOUT: &str = "unidesk.timeout_s";

/// How many build output lines a failed build reports.
const BUILD_TAIL_LINES: usize = 20;

/// How much output Docker keeps per log file of a task container (two
/// files): a task printing without end cannot fill the node's disk. Far
/// above what the server stores per attempt, so the agent (and an agent
/// adopting the container after a restart) still reads all it will send.
pub const CONTAINER_LOG_MAX_SIZE: &str = "256m";

/// Limit on processes in a task container, against fork bombs.
pub const PIDS_LIMIT: i64 = 4096;

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
    },
    /// The image build failed; `tail` holds the last lines of its output.
    #[error("building the image failed:\n{tail}")]
    Build {
        /// The last lines of the build output, ending with the error.
        tail: String,
    },
    /// The build context could not be packed.
    #[error("packing the build context failed: {0}")]
    Context(#[source] std::io::Error),
}

impl DockerError {
    fn api(action: &'static str, e: &BollardError) -> Self {
        DockerError::Api {
            action,
            message: docker_message(e),
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
/// default socket, and agrees on an API version with the daemon.
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
    docker
        .negotiate_version()
        .await
        .map_err(|e| DockerError::api("asking Docker for its API version", &e))
}

/// The tag of the env image built from `dockerfile_path` in `env_repo_url`
/// at `env_commit_id`: equal inputs give equal tags on every node.
pub fn image_tag(env_repo_url: &str, env_commit_id: &str, dockerfile_path: &str) -> String {
    let digest = Sha256::digest(format!(
        "{env_repo_url}\n{env_commit_id}\n{dockerfile_path}"
    ));
    format!("{IMAGE_REPOSITORY}:{}", &hex::encode(digest)[..24])
}

/// Whether [`Images::ensure`] built the image or found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSource {
    /// The tag existed and was used as it is.
    Reused,
    /// The image was built now.
    Built,
}

/// Builds env images, one build per tag at a time.
#[derive(Debug)]
pub struct Images {
    docker: Docker,
    locks: KeyedLocks,
    builds: AtomicU64,
}

impl Images {
    /// Env images on `docker`.
    pub fn new(docker: Docker) -> Self {
        Images {
            docker,
            locks: KeyedLocks::default(),
            builds: AtomicU64::new(0),
        }
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
    /// fails, [`DockerError::Context`] when the directory cannot be read,
    /// [`DockerError::Api`] when Docker cannot be asked.
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
        let output = self.docker.build_image(options, None, Some(body));
        follow_build(output).await?;
        if !image_exists(&self.docker, tag).await? {
            return Err(DockerError::Build {
                tail: "the build ended without producing the image".into(),
            });
        }
        Ok(ImageSource::Built)
    }
}

/// Reads a build's output, keeping the last lines for an error message.
async fn follow_build(
    output: impl Stream<Item = Result<bollard::models::BuildInfo, BollardError>>,
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
                    if !line.is_empty() {
                        tracing::debug!(line, "build");
                        keep(line);
                    }
                }
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
        // Only the permission bits are kept, and a fixed time and owner,
        // so the same commit gives the same context (and Docker's cache
        // its hits) on every checkout.
        let mut header = tar::Header::new_gnu();
        header.set_mode(cap_std::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        let kind = meta.file_type();
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

/// What a task container gets.
#[derive(Debug, Clone)]
pub struct ContainerSpec<'a> {
    /// The image tag.
    pub image: &'a str,
    /// The argv; empty keeps the image's default command.
    pub command: &'a [String],
    /// Environment variables.
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
}

/// The body of the create call for `spec`.
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
        pids_limit: Some(PIDS_LIMIT),
        device_requests,
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".to_owned(), CONTAINER_LOG_MAX_SIZE.to_owned()),
                ("max-file".to_owned(), "2".to_owned()),
            ])),
        }),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.to_owned()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.to_vec()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        working_dir: Some("/workspace".into()),
        labels: Some(spec.labels.clone()),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// Creates a container for `spec` and returns its id.
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
}

/// Waits until the container has stopped and says how it ended.
///
/// # Errors
/// [`DockerError::Api`] when Docker cannot tell.
pub async fn wait_exit(docker: &Docker, id: &str) -> Result<Exit, DockerError> {
    loop {
        let mut wait = std::pin::pin!(docker.wait_container(id, None));
        match wait.next().await {
            Some(Ok(_)) | Some(Err(BollardError::DockerContainerWaitError { .. })) => {}
            Some(Err(e)) => {
                tracing::warn!(error = %docker_message(&e), "waiting for the container")
            }
            None => {}
        }
        let state = docker
            .inspect_container(id, None)
            .await
            .map_err(|e| DockerError::api("inspecting the container failed", &e))?
            .state
            .unwrap_or_default();
        if state.running != Some(true) {
            return Ok(Exit {
                code: state.exit_code.unwrap_or(-1),
                oom_killed: state.oom_killed.unwrap_or(false),
            });
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
        match inspect_leftover(docker, &id).await {
            Ok(Some(leftover)) => found.push(leftover),
            Ok(None) => {
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

async fn inspect_leftover(docker: &Docker, id: &str) -> Result<Option<Leftover>, DockerError> {
    let info = docker
        .inspect_container(id, None)
        .await
        .map_err(|e| DockerError::api("inspecting the container failed", &e))?;
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
        return Ok(None);
    };
    let started = info
        .state
        .as_ref()
        .and_then(|s| s.started_at.as_deref())
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        // Docker writes 0001-01-01 for a container that never started.
        .filter(|t| t.timestamp() > 0);
    let running_for = started.map(|t| {
        (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
            .to_std()
            .unwrap_or_default()
    });
    let memory = info
        .host_config
        .as_ref()
        .and_then(|h| h.memory)
        .unwrap_or(0);
    Ok(Some(Leftover {
        id: id.to_owned(),
        task_id,
        attempt,
        timeout_s: labels.get(LABEL_TIMEOUT).and_then(|t| t.parse().ok()),
        memory_mb: u64::try_from(memory).unwrap_or(0) / (1024 * 1024),
        running_for,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let body = container_body(&spec);
        let host = body.host_config.unwrap();
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.memory, Some(256 * 1024 * 1024));
        assert_eq!(host.memory_swap, host.memory);
        assert_eq!(host.binds.unwrap(), vec!["/w/code:/workspace:rw"]);
        let gpus = &host.device_requests.unwrap()[0];
        assert_eq!(
            gpus.device_ids.as_deref(),
            Some(&["0".to_owned(), "2".to_owned()][..])
        );
        assert_eq!(body.env.unwrap(), vec!["A=1"]);
        let logs = host.log_config.unwrap();
        assert_eq!(logs.typ.as_deref(), Some("json-file"));
        assert_eq!(logs.config.unwrap()["max-size"], CONTAINER_LOG_MAX_SIZE);
        assert_eq!(body.working_dir.as_deref(), Some("/workspace"));
    }
}
