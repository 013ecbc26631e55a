//! `unidesk dev` as a new user runs it: the real binary, a private
//! PostgreSQL, Ctrl-C, and a second start that finds everything again.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use testkit::process::{Launch, ServerProcess};

/// A working directory PostgreSQL's own user can reach.
fn workdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("unidesk-dev-")
        .tempdir()
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// `unidesk dev` in `dir`, with its own PostgreSQL cluster.
async fn start(dir: &Path) -> ServerProcess {
    Launch::dev(env!("CARGO_BIN_EXE_unidesk"))
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .start()
        .await
        .unwrap()
}

/// Ctrl-C: dev must stop, and stop cleanly.
async fn interrupt(mut dev: ServerProcess) {
    let status = dev
        .signal_and_wait(Signal::SIGINT, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(status.success(), "dev exited with {status}");
}

fn postmaster_running(pg: &Path) -> bool {
    pg.join("postmaster.pid").exists()
}

async fn projects(dev: &ServerProcess) -> Vec<String> {
    dev.api().get("/projects").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_starts_stops_on_ctrl_c_and_finds_its_data_again() {
    let dir = workdir();
    let state = dir.path().join(".unidesk");
    let client = reqwest::Client::new();

    let dev = start(dir.path()).await;
    // The token is printed and kept in a file only its owner can read.
    let file = state.join("admin.token");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), dev.token());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    for path in ["/healthz", "/readyz"] {
        let r = client.get(dev.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    // The local agent joins over a real WebSocket, like any node.
    let api = dev.api();
    testkit::eventually(
        "the local agent to come online",
        Duration::from_secs(60),
        || async {
            let nodes = api.get("/nodes").await;
            nodes["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == "local" && n["status"] == "online")
                .then_some(())
        },
    )
    .await;
    let (status, created) = api
        .call(
            reqwest::Method::POST,
            "/projects",
            Some(json!({"name": "kept", "description": "survives a restart"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");

    // Admin commands run in the same directory find the private cluster.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_unidesk"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let rebuilt = cli(&["projections", "rebuild"]);
    assert!(rebuilt.starts_with("rebuilt all read models"), "{rebuilt}");
    let status = cli(&["projections", "status"]);
    assert!(status.contains("timeline"), "{status}");
    let check = cli(&["replay", "--check"]);
    assert!(check.contains("every event can be applied"), "{check}");
    assert!(projects(&dev).await.contains(&"kept".to_string()));

    // A second dev in another directory runs side by side.
    let other_dir = workdir();
    let other = start(other_dir.path()).await;
    assert_ne!(other.token(), dev.token());
    assert!(projects(&other).await.is_empty());
    interrupt(other).await;

    let first_token = dev.token().to_string();
    interrupt(dev).await;
    assert!(
        !postmaster_running(&state.join("pg").join("data")),
        "PostgreSQL kept running after Ctrl-C"
    );

    let dev = start(dir.path()).await;
    assert_eq!(dev.token(), first_token, "the kept token is reused");
    testkit::eventually(
        "the project to be there after the restart",
        Duration::from_secs(30),
        || async {
            projects(&dev)
                .await
                .contains(&"kept".to_string())
                .then_some(())
        },
    )
    .await;
    interrupt(dev).await;
}

/// Every entry under `dir` that is open to anyone but its owner: the top
/// directory may only be entered (not read) by the `postgres` group when
/// the test runs as root, since PostgreSQL then runs as that user. The
/// agent's directory must be closed itself; the modes below it are the
/// agent's to set (a task's workspace is open to its container, inside
/// directories closed to everyone else), checked by the agent's tests.
fn open_to_others(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let postgres_gid = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .map(|u| u.gid.as_raw());
    let mut open = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // removed meanwhile by PostgreSQL
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.mode() & 0o777;
        let allowed = if path == dir
            && nix::unistd::geteuid().is_root()
            && Some(meta.gid()) == postgres_gid
        {
            0o010
        } else {
            0
        };
        if mode & 0o077 & !allowed != 0 {
            open.push(format!("{} {mode:o}", path.display()));
        }
        if meta.is_dir() && path != dir.join("agent") {
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                stack.push(entry.path());
            }
        }
    }
    open
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_keeps_its_directory_and_everything_in_it_for_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = workdir();
    let state = dir.path().join(".unidesk");
    // What an older version left: open directories and files.
    std::fs::create_dir_all(state.join("objects").join("old")).unwrap();
    std::fs::write(state.join("objects").join("old").join("part"), b"old").unwrap();
    for (path, mode) in [
        (state.clone(), 0o755),
        (state.join("objects"), 0o777),
        (state.join("objects").join("old"), 0o755),
        (state.join("objects").join("old").join("part"), 0o666),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::os::unix::fs::symlink("/etc/hostname", state.join("link")).unwrap();
    // The workspace of an attempt whose container outlives the restart,
    // run as another user: it keeps its modes (the container keeps its
    // access), while the agent's directory above it is closed.
    let workspace = state.join("agent").join("tasks").join("t-1").join("code");
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::write(workspace.join("f"), b"task").unwrap();
    for (path, mode) in [
        (state.join("agent"), 0o755),
        (workspace.clone(), 0o777),
        (workspace.join("f"), 0o666),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    let dev = start(dir.path()).await;
    let api = dev.api();
    let project = api.post("/projects", json!({"name": "private"})).await;
    let id = project["id"].as_str().unwrap();
    support::put_object(&api, id, "data/results.bin", &b"results".repeat(100)).await;
    let stored = std::fs::read_dir(state.join("objects"))
        .unwrap()
        .flatten()
        .count();
    assert!(stored >= 2, "the object is under .unidesk/objects");

    assert_eq!(open_to_others(&state), Vec::<String>::new());
    for (path, mode) in [
        (state.join("agent").join("tasks"), 0o700),
        (workspace.clone(), 0o777),
        (workspace.join("f"), 0o666),
    ] {
        let now = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(now, mode, "{}", path.display());
    }
    // The link was left alone, and what it points to too.
    assert!(std::fs::symlink_metadata(state.join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_ne!(
        std::fs::metadata("/etc/hostname")
            .unwrap()
            .permissions()
            .mode()
            & 0o044,
        0
    );
    interrupt(dev).await;
    assert_eq!(open_to_others(&state), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_dev_in_the_same_directory_is_refused_and_leaves_the_first_running() {
    let dir = workdir();
    let dev = start(dir.path()).await;
    let (status, created) = dev
        .api()
        .call(
            reqwest::Method::POST,
            "/projects",
            Some(json!({"name": "first"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");

    // The same directory from a second terminal, on another port.
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_unidesk"))
        .args(["dev", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), second.wait_with_output())
        .await
        .expect("a second dev in the same directory kept running")
        .unwrap();
    let ended = out.status;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!ended.success(), "the second dev started: {said}");
    assert!(
        said.contains("another unidesk dev is running in")
            && said.contains(&format!("process {}", dev.pid().unwrap())),
        "{said}"
    );

    // The first still has its database and everything in it. The list is a
    // read model: the refusal can come before the projector has applied
    // the project's first event.
    assert!(postmaster_running(&dir.path().join(".unidesk/pg/data")));
    testkit::eventually(
        "the first dev to list its project",
        Duration::from_secs(30),
        || async { (projects(&dev).await == ["first"]).then_some(()) },
    )
    .await;
    interrupt(dev).await;
}
