//! What every attempt on this agent shares: Docker, the git cache, the
//! image builder, the work directory and how containers are confined.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use protocol::Cache;
use sha2::{Digest, Sha256};

use crate::beneath::Root;
use crate::docker::{self, BuildLimits, Confinement, Images, LayerQuota};
use crate::git::GitCache;
use crate::transfer::{self, Files};

/// How many entries of the cache a hello lists, each.
const CACHE_LIST_LIMIT: usize = 1000;

/// What every executor shares: Docker, the git cache, the image builder and
/// the work directory.
#[derive(Debug)]
pub struct Context {
    pub(super) docker: Docker,
    pub(super) git: GitCache,
    pub(super) images: Images,
    pub(super) work_dir: PathBuf,
    /// `<work dir>/tasks`, where each attempt gets a directory.
    pub(super) tasks: Root,
    pub(super) agent_label: String,
    pub(super) timeout_grace: Duration,
    /// Set when a commit was fetched or an image built since the server
    /// last heard what is cached.
    pub(super) cache_changed: std::sync::atomic::AtomicBool,
    /// Moves task inputs and outputs through presigned URLs.
    pub(super) files: Files,
    /// How task containers are confined.
    pub(super) confinement: Confinement,
    /// Whether Docker limits containers' writable layers here.
    pub(super) layer_quota: LayerQuota,
    /// The node's `known_hosts` for SSH repositories.
    pub(super) git_known_hosts: Option<PathBuf>,
    /// The size of each of the two files Docker keeps a task container's
    /// output in.
    pub(super) container_log_bytes: u64,
    /// The most output bytes the server stores per attempt, as its last
    /// welcome said; [`u64::MAX`] while unknown.
    pub(super) output_limit: Arc<AtomicU64>,
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
        // Workspaces below are shared with their containers, whatever
        // user those run as; this keeps every other user on the node out.
        crate::beneath::private(tasks.dir())?;
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
            git_known_hosts: None,
            container_log_bytes: docker::CONTAINER_LOG_FILE_BYTES,
            output_limit: Arc::new(AtomicU64::new(u64::MAX)),
        })
    }

    /// Notes the most output bytes the server stores per attempt (`None`:
    /// no limit known): a container's output is read no further, also that
    /// of attempts already running.
    pub fn set_output_limit(&self, bytes: Option<u64>) {
        self.output_limit
            .store(bytes.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Keeps each task container's output in two files of `bytes` each
    /// ([`docker::CONTAINER_LOG_FILE_BYTES`] by default, at least 1 MiB):
    /// the most a node's disk holds of one task's output, and how far the
    /// agent's reading may lag the task before Docker discards output it
    /// has not read (the output then says so where it is missing).
    pub fn with_container_log_bytes(mut self, bytes: u64) -> Self {
        self.container_log_bytes = bytes.max(1024 * 1024);
        self
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

    /// Trusts the private CA in `ca_file` for transfers too (call after
    /// [`Context::with_part_bytes`]).
    ///
    /// # Errors
    /// The file cannot be read or holds no certificate.
    pub fn with_ca_file(mut self, ca_file: &Path) -> Result<Self, String> {
        self.files = self.files.with_ca_file(ca_file)?;
        Ok(self)
    }

    /// What moves task inputs and outputs; its broker is served by the
    /// connection.
    pub fn files(&self) -> &Files {
        &self.files
    }

    /// Keeps prepared trees of recently checked-out commits up to `bytes`
    /// together (2 GiB by default; 0 keeps none), so a warm checkout
    /// copies files instead of reading the mirror; see
    /// [`crate::prepared`].
    pub fn with_prepared_bytes(mut self, bytes: u64) -> Self {
        self.git = GitCache::with_prepared_bytes(self.work_dir.join("git"), bytes);
        self
    }

    /// Trusts the SSH host keys in `file` (a `known_hosts` file) for the
    /// repositories of every task, besides those a task's own
    /// `known_hosts` secret lists.
    pub fn with_git_known_hosts(mut self, file: Option<PathBuf>) -> Self {
        self.git_known_hosts = file;
        self
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

    pub(super) fn note_cache_change(&self) {
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
    /// adopted ([`adopt`](super::adopt())); empty (with a warning) when Docker cannot tell.
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
