//! Shared helpers: the busybox base image, git repositories made on the
//! spot, task specs, and an executor context on a fresh work directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::{BuildImageOptionsBuilder, RemoveImageOptionsBuilder};
use bollard::Docker;
use futures::StreamExt;
use node_agent::docker;
use node_agent::executor::{Context, Report};
use protocol::RunTask;
use tempfile::TempDir;
use tokio::sync::OnceCell;
use uuid::Uuid;

/// The image every test env repository builds `FROM`.
pub const BASE_IMAGE: &str = "unidesk-test-base:1";

static BASE: OnceCell<()> = OnceCell::const_new();

/// A Docker client that speaks the daemon's API version.
pub async fn docker() -> Docker {
    docker::connect(None).await.unwrap()
}

/// Builds [`BASE_IMAGE`] once per test process: `FROM scratch` with Debian's
/// static busybox and its applets linked into `/bin`.
pub async fn base_image() {
    BASE.get_or_init(|| async {
        let docker = docker().await;
        if docker::image_exists(&docker, BASE_IMAGE).await.unwrap() {
            return;
        }
        let dockerfile = "FROM scratch\nCOPY busybox /bin/busybox\n\
            RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n";
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(dockerfile.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
            .unwrap();
        tar.append_path_with_name("/bin/busybox", "busybox")
            .unwrap();
        let body = bollard::body_full(tar.into_inner().unwrap().into());
        let options = BuildImageOptionsBuilder::default()
            .t(BASE_IMAGE)
            .rm(true)
            .build();
        let mut build = std::pin::pin!(docker.build_image(options, None, Some(body)));
        while let Some(step) = build.next().await {
            step.unwrap();
        }
    })
    .await;
}

/// Removes an image, ignoring one that is gone.
pub async fn remove_image(docker: &Docker, tag: &str) {
    let options = RemoveImageOptionsBuilder::default().force(true).build();
    let _ = docker.remove_image(tag, Some(options), None).await;
}

/// A git repository in a temporary directory, used by `file://` URL.
pub struct Repo {
    _dir: TempDir,
    /// The `file://` URL.
    pub url: String,
    /// The commit holding the files.
    pub commit: String,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.org"])
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Makes a repository with one commit holding `files`.
pub fn repo(files: &[(&str, &str)]) -> Repo {
    let dir = tempfile::tempdir().unwrap();
    git(dir.path(), &["init", "-q"]);
    for (name, content) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-q", "-m", "files"]);
    let commit = git(dir.path(), &["rev-parse", "HEAD"]);
    Repo {
        url: format!("file://{}", dir.path().display()),
        commit,
        _dir: dir,
    }
}

/// Makes a repository with one commit holding `files` and symbolic
/// `links` (name, target), committed as links.
pub fn repo_with_links(files: &[(&str, &str)], links: &[(&str, &str)]) -> Repo {
    let dir = tempfile::tempdir().unwrap();
    git(dir.path(), &["init", "-q"]);
    for (name, content) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    for (name, target) in links {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, path).unwrap();
    }
    let mut repo = Repo {
        url: format!("file://{}", dir.path().display()),
        commit: String::new(),
        _dir: dir,
    };
    repo.commit_all();
    repo
}

impl Repo {
    /// The repository's working directory.
    pub fn path(&self) -> &Path {
        self._dir.path()
    }

    /// Commits every change in the working directory.
    pub fn commit_all(&mut self) {
        git(self.path(), &["add", "-A"]);
        git(
            self.path(),
            &["commit", "-q", "--allow-empty", "-m", "files"],
        );
        self.commit = git(self.path(), &["rev-parse", "HEAD"]);
    }
}

/// An env repository whose Dockerfile builds on [`BASE_IMAGE`] with `extra`
/// lines after the `FROM`.
pub fn env_repo(extra: &str) -> Repo {
    repo(&[("Dockerfile", &format!("FROM {BASE_IMAGE}\n{extra}\n"))])
}

/// A spec running `command` (through `sh -c`) on `code` in `env`'s image.
pub fn spec(code: &Repo, env: &Repo, script: &str) -> RunTask {
    RunTask {
        task_id: Uuid::new_v4(),
        attempt: 1,
        code_repo_url: code.url.clone(),
        code_commit_id: code.commit.clone(),
        env_repo_url: env.url.clone(),
        env_commit_id: env.commit.clone(),
        dockerfile_path: "Dockerfile".into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        env: BTreeMap::new(),
        cpus: 0.5,
        memory_mb: 64,
        gpus: Vec::new(),
        timeout_s: None,
        inputs: Vec::new(),
        outputs: Vec::new(),
        network: Default::default(),
        env_secrets: BTreeMap::new(),
        code_credential: None,
        env_credential: None,
        known_hosts: None,
    }
}

/// An executor context on a fresh work directory, with a short grace at
/// the time limit.
pub async fn context() -> (Arc<Context>, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::new(docker().await, dir.path())
        .unwrap()
        .with_timeout_grace(Duration::from_secs(1));
    (Arc::new(ctx), dir)
}

/// The env image tag a spec uses.
pub fn tag_of(spec: &RunTask) -> String {
    docker::image_tag(
        &spec.env_repo_url,
        &spec.env_commit_id,
        &spec.dockerfile_path,
    )
}

/// The statuses among `reports`.
pub fn statuses(reports: &[Report]) -> Vec<&node_agent::executor::StatusReport> {
    reports
        .iter()
        .filter_map(|r| match r {
            Report::Status(s) => Some(s),
            Report::Log(_) => None,
        })
        .collect()
}

/// All log text among `reports`, checking offsets are contiguous from 0.
pub fn output(reports: &[Report]) -> String {
    let mut text = String::new();
    for report in reports {
        if let Report::Log(log) = report {
            assert_eq!(log.offset, text.len() as u64, "offsets without gaps");
            text.push_str(&log.data);
        }
    }
    text
}

/// Runs an attempt to its end, reading its reports as they come, and
/// returns every one; its container and directory are kept, as until the
/// server has the attempt's end.
pub async fn run_kept(ctx: &Arc<Context>, spec: RunTask) -> Vec<Report> {
    let (_canceller, signal) = node_agent::executor::cancel_pair();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let collect = tokio::spawn(async move {
        let mut reports = Vec::new();
        while let Some(report) = rx.recv().await {
            reports.push(report);
        }
        reports
    });
    node_agent::executor::run(spec, Arc::clone(ctx), tx, signal).await;
    collect.await.unwrap()
}

/// Removes what an attempt left on the node (its container and its
/// directory), as the agent does once the server has the attempt's end.
pub async fn release(ctx: &Context, spec: &RunTask) {
    node_agent::executor::release(ctx, spec.task_id, spec.attempt)
        .await
        .unwrap();
}

/// Removes the image built from `env`'s `Dockerfile`, so tests leave no
/// images behind.
pub async fn remove_env_image(ctx: &Context, env: &Repo) {
    let tag = docker::image_tag(&env.url, &env.commit, "Dockerfile");
    remove_image(ctx.docker(), &tag).await;
}

/// Polls `check` every 50 ms until it returns `Some`, and returns what it
/// returned: the wait for another process to get somewhere. (The same as
/// `testkit::eventually`, which this crate cannot use: testkit pulls
/// in the store and PostgreSQL.)
///
/// # Panics
/// When `timeout` passes first, naming `what` and the time waited.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `git://` server on 127.0.0.1 that takes every connection and answers
/// nothing until [`StalledGit::release`], which closes them all and stops
/// listening: a repository whose fetch hangs for as long as a test wants
/// and then fails.
pub struct StalledGit {
    addr: std::net::SocketAddr,
    released: Arc<std::sync::atomic::AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl StalledGit {
    /// Starts listening on a free port.
    pub fn start() -> StalledGit {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&released);
        let server = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => held.push(stream),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        StalledGit {
            addr,
            released,
            server: Some(server),
        }
    }

    /// The URL of repository `name` on it.
    pub fn url(&self, name: &str) -> String {
        format!("git://{}/{name}", self.addr)
    }

    /// Closes every connection and stops listening: fetches fail from now.
    pub fn release(&mut self) {
        self.released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(server) = self.server.take() {
            server.join().unwrap();
        }
    }
}

impl Drop for StalledGit {
    fn drop(&mut self) {
        self.release();
    }
}

/// The containers of `spec`'s attempt on `ctx`'s agent, started or not.
pub async fn attempt_containers(ctx: &Context, spec: &RunTask) -> Vec<String> {
    docker::attempt_containers(ctx.docker(), ctx.agent_label(), spec.task_id, spec.attempt)
        .await
        .unwrap()
}

/// Waits until `spec`'s attempt has a container and returns its id,
/// checking it was created and not started. A container already removed
/// when it is looked at (its attempt ended between the listing and the
/// look, as an attempt whose checkout fails may on a loaded machine) is
/// returned as it is: the callers check from the attempt's reports that
/// it never ran and that it is gone.
pub async fn created_container(ctx: &Context, spec: &RunTask) -> String {
    let id = eventually(
        "the attempt's container to be created",
        Duration::from_secs(120),
        || async { attempt_containers(ctx, spec).await.into_iter().next() },
    )
    .await;
    let state = match ctx.docker().inspect_container(&id, None).await {
        Ok(inspected) => inspected.state.unwrap(),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return id,
        Err(e) => panic!("inspecting container {id}: {e}"),
    };
    assert_eq!(
        state.status,
        Some(bollard::models::ContainerStateStatusEnum::CREATED),
        "{state:?}"
    );
    id
}

/// A Unix socket in front of Docker's whose connections a test can cut,
/// and refuse until it mends them, as a daemon restart or a socket that
/// breaks does to an agent.
pub struct DockerLink {
    host: String,
    down: Arc<tokio::sync::watch::Sender<bool>>,
    trip: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    accepting: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl DockerLink {
    /// Listens beside Docker's own socket (`DOCKER_HOST` when it names a
    /// Unix socket, else `/var/run/docker.sock`).
    pub fn start() -> Self {
        let upstream = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(str::to_owned))
            .unwrap_or_else(|| "/var/run/docker.sock".to_owned());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (down, watching) = tokio::sync::watch::channel(false);
        let down = Arc::new(down);
        let trip = Arc::new(std::sync::Mutex::new(None));
        let accepting = {
            let (down, trip) = (Arc::clone(&down), Arc::clone(&trip));
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *watching.borrow() {
                        continue;
                    }
                    let link = Link {
                        cut: watching.clone(),
                        down: Arc::clone(&down),
                        trip: Arc::clone(&trip),
                    };
                    tokio::spawn(link.carry(client, upstream.clone()));
                }
            })
        };
        DockerLink {
            host: format!("unix://{}", path.display()),
            down,
            trip,
            accepting,
            _dir: dir,
        }
    }

    /// The address to give the agent.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Drops every connection through the link and refuses new ones.
    pub fn cut(&self) {
        self.down.send_replace(true);
    }

    /// Cuts the link (as [`DockerLink::cut`]) the moment an answer of
    /// Docker's holding `marker` has passed through it: a daemon that
    /// shuts its API as it answers a last request.
    pub fn cut_after(&self, marker: &[u8]) {
        *self.trip.lock().unwrap() = Some(marker.to_vec());
    }

    /// Lets connections through again.
    pub fn mend(&self) {
        self.down.send_replace(false);
    }
}

/// One connection through a [`DockerLink`].
struct Link {
    cut: tokio::sync::watch::Receiver<bool>,
    down: Arc<tokio::sync::watch::Sender<bool>>,
    trip: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl Link {
    async fn carry(mut self, client: tokio::net::UnixStream, upstream: String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(docker) = tokio::net::UnixStream::connect(&upstream).await else {
            return;
        };
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_docker, mut to_docker) = docker.into_split();
        let asking = tokio::io::copy(&mut from_client, &mut to_docker);
        let answering = async {
            let mut buf = vec![0; 64 * 1024];
            loop {
                let n = from_docker.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(());
                }
                to_client.write_all(&buf[..n]).await?;
                let tripped = {
                    let mut trip = self.trip.lock().unwrap();
                    let hit = trip
                        .as_deref()
                        .is_some_and(|m| buf[..n].windows(m.len()).any(|w| w == m));
                    hit && trip.take().is_some()
                };
                if tripped {
                    self.down.send_replace(true);
                }
            }
        };
        tokio::select! {
            biased;
            _ = self.cut.wait_for(|down| *down) => {}
            _ = async { tokio::join!(asking, answering) } => {}
        }
    }
}

impl Drop for DockerLink {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}
