//! What the end-to-end tests share: `unidesk serve` started as a real
//! process, real `unidesk-agent`s, the base image built from Debian's
//! busybox, git repositories made on the spot and the agent binary. Each
//! test file uses part of it.

#![allow(dead_code, reason = "each test file uses a different part")]

pub mod sshd;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testkit::process::{Launch, ServerProcess};

/// The base image every test environment builds on: busybox in an empty
/// image, since nothing can be pulled here.
pub const BASE: &str = "unidesk-test-base:1";

pub fn sh(dir: &Path, cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn base_image() {
    let ok = Command::new("docker")
        .args(["image", "inspect", BASE])
        .output()
        .unwrap();
    if ok.status.success() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("/bin/busybox", dir.path().join("busybox")).unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nENV PATH=/bin\n",
    )
    .unwrap();
    // Another test process may build it at the same moment; both succeed.
    sh(dir.path(), &format!("docker build -q -t {BASE} ."));
}

/// A git repository with `files`, committed; returns its URL and commit.
pub fn repo(root: &Path, name: &str, files: &[(&str, &str)]) -> (String, String) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (path, content) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    sh(&dir, "git init -q -b main && git add -A && git -c user.name=t -c user.email=t@t commit -q -m init");
    let sha = sh(&dir, "git rev-parse HEAD");
    (format!("file://{}", dir.display()), sha)
}

/// The image an agent builds for the environment `env` (a [`repo`]) from
/// `dockerfile`, removed when this is dropped: a test that runs a task
/// keeps one for each environment it uses, so the suite leaves no
/// `unidesk-env` tags behind.
pub struct EnvImage(String);

impl EnvImage {
    /// The guard of the image the agent tags for `env` and `dockerfile`.
    pub fn of(env: &(String, String), dockerfile: &str) -> EnvImage {
        EnvImage(node_agent::docker::image_tag(&env.0, &env.1, dockerfile))
    }

    /// The guard of the image for a task's `spec`, as the API shows it.
    pub fn of_spec(spec: &serde_json::Value) -> EnvImage {
        let field = |name: &str| spec[name].as_str().unwrap_or_default().to_string();
        EnvImage::of(
            &(field("env_repo_url"), field("env_commit_id")),
            &field("dockerfile_path"),
        )
    }
}

impl Drop for EnvImage {
    fn drop(&mut self) {
        // Absent when the task never got as far as its build.
        let _ = Command::new("docker")
            .args(["image", "rm", "--force", &self.0])
            .output();
    }
}

/// Like [`repo`], with symbolic `links` (name, target) committed as links.
pub fn repo_with_links(
    root: &Path,
    name: &str,
    files: &[(&str, &str)],
    links: &[(&str, &str)],
) -> (String, String) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (path, target) in links {
        std::os::unix::fs::symlink(target, dir.join(path)).unwrap();
    }
    repo(root, name, files)
}

/// The `unidesk-agent` binary, built (or found up to date) first, so the
/// test never runs an agent older than the code under test.
pub fn agent_binary() -> PathBuf {
    let server = PathBuf::from(env!("CARGO_BIN_EXE_unidesk"));
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "node-agent", "--bin", "unidesk-agent"])
        .status()
        .unwrap();
    assert!(status.success(), "building unidesk-agent failed");
    server.with_file_name("unidesk-agent")
}

/// How long a test waits for a task or a node to get where it should.
pub const PATIENCE: Duration = Duration::from_secs(240);

/// `unidesk serve` on the test database `db_url`, with `flags`; waits until
/// it is ready.
pub async fn serve(db_url: &str, flags: &[&str]) -> ServerProcess {
    serve_with(db_url, flags, |launch| launch).await
}

/// Like [`serve`], with more set-up of the launch (environment, flags
/// with values that are not `&str`).
pub async fn serve_with(
    db_url: &str,
    flags: &[&str],
    more: impl FnOnce(Launch) -> Launch,
) -> ServerProcess {
    more(Launch::serve(env!("CARGO_BIN_EXE_unidesk")).args(flags))
        .env("DATABASE_URL", db_url)
        .start()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `unidesk serve` for tasks with project secrets: a fresh random secrets
/// key in `dir`, file repository URLs, quick heartbeats and polls.
pub async fn serve_with_secrets(db_url: &str, dir: &Path) -> ServerProcess {
    let key = dir.join("secrets.key");
    let random = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    std::fs::write(&key, random).unwrap();
    serve_with(
        db_url,
        &[
            "--allow-file-urls",
            "--heartbeat-s",
            "1",
            "--poll-ms",
            "100",
        ],
        |launch| launch.arg("--secrets-key-file").arg(&key),
    )
    .await
}

/// Agent processes of a test, killed when the test ends however it ends.
#[derive(Default)]
pub struct Agents(pub Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for agent in &mut self.0 {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

/// An agent process for node `token`, connecting to `ws`, working in
/// `work`, with `flags` (resources and the like) after the common ones:
/// quick reconnects, output discarded.
pub fn spawn_agent(ws: &str, token: &str, work: &Path, flags: &[&str]) -> Child {
    Command::new(agent_binary())
        .args(["--server", ws])
        .args(["--reconnect-min-ms", "100", "--reconnect-max-ms", "1000"])
        .arg("--work-dir")
        .arg(work)
        .args(flags)
        .env("UNIDESK_NODE_TOKEN", token)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until task `id` is in one of `states`; returns it.
pub async fn task_in(api: &testkit::process::Api, id: &str, states: &[&str]) -> serde_json::Value {
    testkit::eventually(
        &format!("task {id} to be one of {states:?}"),
        PATIENCE,
        || async {
            let task = api.get(&format!("/tasks/{id}")).await;
            states.iter().any(|s| task["state"] == *s).then_some(task)
        },
    )
    .await
}

/// Waits until node `id` is online.
pub async fn node_online(api: &testkit::process::Api, id: &str) {
    testkit::eventually(&format!("node {id} online"), PATIENCE, || async {
        (api.get(&format!("/nodes/{id}")).await["status"] == "online").then_some(())
    })
    .await;
}

/// Stores `data` as object `name` of `project` as a user would: asks the
/// API for an upload, PUTs the bytes to the presigned URL in one piece and
/// completes the upload; returns the stored object.
pub async fn put_object(
    api: &testkit::process::Api,
    project: &str,
    name: &str,
    data: &[u8],
) -> serde_json::Value {
    use sha2::Digest;
    let sha256 = hex::encode(sha2::Sha256::digest(data));
    let up = api
        .post(
            &format!("/projects/{project}/objects"),
            serde_json::json!({"name": name, "size": data.len(), "sha256": sha256}),
        )
        .await;
    let mut put = api
        .http
        .put(up["url"].as_str().unwrap())
        .body(data.to_vec());
    for (k, v) in up["headers"].as_object().unwrap() {
        put = put.header(k, v.as_str().unwrap());
    }
    assert!(put.send().await.unwrap().status().is_success());
    let (status, stored) = api
        .call(
            reqwest::Method::POST,
            &format!("/projects/{project}/objects/complete"),
            Some(serde_json::json!({"name": name, "upload_id": up["upload_id"]})),
        )
        .await;
    assert_eq!(status, 200, "{stored}");
    stored
}

/// Creates user `name` as the admin `api` holds and issues them a token;
/// returns the token.
pub async fn user(api: &testkit::process::Api, name: &str) -> String {
    api.post("/users", serde_json::json!({ "name": name }))
        .await;
    api.post(
        &format!("/users/{name}/tokens"),
        serde_json::json!({"label": "test"}),
    )
    .await["token"]
        .as_str()
        .unwrap()
        .to_string()
}
