//! `unidesk dev` as a new user runs it: the real binary, a private
//! PostgreSQL, Ctrl-C, and a second start that finds everything again.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

struct Dev {
    child: Child,
    base: String,
    token: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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

fn start(dir: &Path) -> Dev {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_unidesk"))
        .args(["dev", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(t) = line.strip_prefix("admin token: ") {
                let _ = tx.send(t.to_string());
            }
        }
    });
    let token = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("dev printed no admin token");
    Dev {
        child,
        base: format!("http://127.0.0.1:{port}"),
        token,
    }
}

fn interrupt(mut dev: Dev) {
    kill(Pid::from_raw(dev.child.id() as i32), Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = dev.child.try_wait().unwrap() {
            assert!(status.success(), "dev exited with {status}");
            return;
        }
        assert!(Instant::now() < deadline, "dev did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn postmaster_running(pg: &Path) -> bool {
    pg.join("postmaster.pid").exists()
}

async fn projects(client: &reqwest::Client, dev: &Dev) -> Vec<String> {
    let body: Value = client
        .get(format!("{}/api/v1/projects", dev.base))
        .bearer_auth(&dev.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = body
        .get("items")
        .or(Some(&body))
        .and_then(Value::as_array)
        .cloned();
    items
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_starts_stops_on_ctrl_c_and_finds_its_data_again() {
    let dir = workdir();
    let state = dir.path().join(".unidesk");
    let client = reqwest::Client::new();

    let dev = start(dir.path());
    // The token is printed and kept in a file only its owner can read.
    let file = state.join("admin.token");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), dev.token);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    for path in ["/healthz", "/readyz"] {
        let r = client
            .get(format!("{}{path}", dev.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    // The local agent joins over a real WebSocket, like any node.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes: Value = client
            .get(format!("{}/api/v1/nodes", dev.base))
            .bearer_auth(&dev.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let local = nodes["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "local" && n["status"] == "online");
        if local {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the local agent never came online: {nodes}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = client
        .post(format!("{}/api/v1/projects", dev.base))
        .bearer_auth(&dev.token)
        .json(&json!({"name": "kept", "description": "survives a restart"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

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
    assert!(projects(&client, &dev).await.contains(&"kept".to_string()));

    // A second dev in another directory runs side by side.
    let other_dir = workdir();
    let other = start(other_dir.path());
    assert_ne!(other.token, dev.token);
    assert!(projects(&client, &other).await.is_empty());
    interrupt(other);

    let first_token = dev.token.clone();
    interrupt(dev);
    assert!(
        !postmaster_running(&state.join("pg").join("data")),
        "PostgreSQL kept running after Ctrl-C"
    );

    let dev = start(dir.path());
    assert_eq!(dev.token, first_token, "the kept token is reused");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if projects(&client, &dev).await.contains(&"kept".to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the project did not survive the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    interrupt(dev);
}

/// Every entry under `dir` that is open to anyone but its owner: the top
/// directory may only be entered (not read) by the `postgres` group when
/// the test runs as root, since PostgreSQL then runs as that user.
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
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                stack.push(entry.path());
            }
        }
    }
    open
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_keeps_its_directory_and_everything_in_it_for_its_owner_only() {
    use sha2::Digest;
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

    let dev = start(dir.path());
    let client = reqwest::Client::new();
    let project: Value = client
        .post(format!("{}/api/v1/projects", dev.base))
        .bearer_auth(&dev.token)
        .json(&json!({"name": "private"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = project["id"].as_str().unwrap();
    let data = b"results".repeat(100);
    let upload: Value = client
        .post(format!("{}/api/v1/projects/{id}/objects", dev.base))
        .bearer_auth(&dev.token)
        .json(&json!({
            "name": "data/results.bin",
            "size": data.len(),
            "sha256": hex::encode(sha2::Sha256::digest(&data)),
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut put = client
        .put(upload["url"].as_str().unwrap())
        .body(data.clone());
    for (k, v) in upload["headers"].as_object().unwrap() {
        put = put.header(k, v.as_str().unwrap());
    }
    assert!(put.send().await.unwrap().status().is_success());
    let completed = client
        .post(format!(
            "{}/api/v1/projects/{id}/objects/complete",
            dev.base
        ))
        .bearer_auth(&dev.token)
        .json(&json!({"name": "data/results.bin", "upload_id": upload["upload_id"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(completed.status(), 200);
    let stored = std::fs::read_dir(state.join("objects"))
        .unwrap()
        .flatten()
        .count();
    assert!(stored >= 2, "the object is under .unidesk/objects");

    assert_eq!(open_to_others(&state), Vec::<String>::new());
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
    interrupt(dev);
    assert_eq!(open_to_others(&state), Vec::<String>::new());
}
