//! What the end-to-end tests share: the base image built from Debian's
//! busybox, git repositories made on the spot, free ports and the agent
//! binary. Each test file uses part of it.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::path::{Path, PathBuf};
use std::process::Command;

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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
