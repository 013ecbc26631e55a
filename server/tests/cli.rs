//! The user command line end to end: the real `unidesk` binary's user
//! commands against a real `unidesk dev`, from real git checkouts pushed
//! to bare repositories, with tasks run by the dev's own agent in Docker.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::{sh, BASE, PATIENCE};
use testkit::process::{Launch, ServerProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A working directory PostgreSQL's own user can reach.
fn workdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("unidesk-cli-")
        .tempdir()
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

async fn dev(dir: &Path, port: Option<u16>, flags: &[&str]) -> ServerProcess {
    let mut launch = Launch::dev(env!("CARGO_BIN_EXE_unidesk"))
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .args(flags);
    if let Some(port) = port {
        launch = launch.port(port);
    }
    launch.start().await.unwrap()
}

/// The user commands as a user runs them: their own configuration and
/// cache directories, nothing from the test's environment.
struct User {
    config: tempfile::TempDir,
    cache: tempfile::TempDir,
}

impl User {
    fn new() -> User {
        User {
            config: tempfile::tempdir().unwrap(),
            cache: tempfile::tempdir().unwrap(),
        }
    }

    fn command(&self, dir: &Path, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_unidesk"));
        c.args(args)
            .current_dir(dir)
            .env("UNIDESK_CONFIG_DIR", self.config.path())
            .env("UNIDESK_CACHE_DIR", self.cache.path())
            .env_remove("UNIDESK_SERVER")
            .env_remove("UNIDESK_TOKEN")
            .env_remove("UNIDESK_PROJECT")
            .env_remove("UNIDESK_ENV")
            .env_remove("UNIDESK_DOCKERFILE")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    async fn run(&self, dir: &Path, args: &[&str]) -> Run {
        Run(self.command(dir, args).output().await.unwrap())
    }

    /// Runs a command whose standard output nobody reads: the reading end
    /// is closed before the command can write (`unidesk tasks | head -0`).
    async fn run_into_closed_pipe(&self, dir: &Path, args: &[&str]) -> Run {
        let mut child = self
            .command(dir, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        Run(child.wait_with_output().await.unwrap())
    }

    async fn run_with_stdin(&self, dir: &Path, args: &[&str], input: &str) -> Run {
        let mut child = self
            .command(dir, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).await.unwrap();
        drop(stdin);
        Run(child.wait_with_output().await.unwrap())
    }
}

/// What a command did.
struct Run(Output);

impl Run {
    fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    fn err(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.0.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.out(), self.err()))
    }
    /// Asserts the exit status, showing what was printed otherwise.
    fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code(),
            code,
            "stdout:\n{}\nstderr:\n{}",
            self.out(),
            self.err()
        );
        self
    }
    /// The task id of a `submit`'s `task ID queued` line.
    fn task_id(&self) -> String {
        let err = self.err();
        let at = err
            .find("task ")
            .unwrap_or_else(|| panic!("no task id in: {err}"));
        err[at + 5..at + 41].to_string()
    }
}

/// A bare repository served by path and a clone of it to work in, with
/// `files` committed and pushed; returns the clone.
fn pushed_checkout(root: &Path, files: &[(&str, &str)]) -> PathBuf {
    let bare = root.join("code.git");
    sh(
        root,
        &format!("git init -q --bare -b main {}", bare.display()),
    );
    let work = root.join("work");
    sh(
        root,
        &format!(
            "git clone -q {} {} 2>/dev/null",
            bare.display(),
            work.display()
        ),
    );
    for (path, content) in files {
        let p = work.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    commit(&work, "init");
    sh(&work, "git push -q origin HEAD:main 2>/dev/null");
    work
}

fn commit(work: &Path, message: &str) -> String {
    sh(
        work,
        &format!("git add -A && git -c user.name=t -c user.email=t@t commit -q -m {message:?}"),
    );
    sh(work, "git rev-parse HEAD")
}

/// A platform with a project `vision` whose member alice holds a token.
struct Platform {
    dir: tempfile::TempDir,
    dev: ServerProcess,
    alice: String,
    project: String,
}

impl Platform {
    async fn start(flags: &[&str]) -> Platform {
        let dir = workdir();
        let dev = dev(dir.path(), None, flags).await;
        let api = dev.api();
        let alice = support::user(&api, "alice").await;
        let project = api.post("/projects", json!({"name": "vision"})).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        api.post(
            &format!("/projects/{project}/members"),
            json!({"user": "alice", "role": "member"}),
        )
        .await;
        Platform {
            dir,
            dev,
            alice,
            project,
        }
    }

    /// `user` signed in as alice.
    async fn login(&self, user: &User) {
        user.run(
            self.dir.path(),
            &["login", "--server", self.dev.base(), "--token", &self.alice],
        )
        .await
        .expect(0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_signs_in_submits_from_a_checkout_follows_and_fetches_what_it_made() {
    support::base_image();
    let p = Platform::start(&[]).await;
    let here = p.dir.path();
    let user = User::new();

    // Sign-in: a bad token is refused and nothing is saved; a good one,
    // read from standard input, is saved for its owner only.
    let bad = user
        .run(
            here,
            &["login", "--server", p.dev.base(), "--token", "nope"],
        )
        .await
        .expect(3);
    assert!(bad.err().contains("401"), "{}", bad.err());
    let config = user.config.path().join("config.toml");
    assert!(!config.exists());
    let ok = user
        .run_with_stdin(
            here,
            &["login", "--server", p.dev.base()],
            &format!("{}\n", p.alice),
        )
        .await
        .expect(0);
    assert!(ok.out().contains("as alice"), "{}", ok.out());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let who = user.run(here, &["whoami"]).await.expect(0);
    assert_eq!(who.out().trim(), format!("alice on {}", p.dev.base()));
    assert_eq!(
        user.run(here, &["whoami", "--json"]).await.expect(0).json()["name"],
        "alice"
    );

    // Projects: a member lists the ones it is in; making one is for admins.
    let listed = user
        .run(here, &["projects", "--json"])
        .await
        .expect(0)
        .json();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "vision"),
        "{listed}"
    );
    user.run(here, &["projects", "create", "nlp"])
        .await
        .expect(3);
    let admin = User::new();
    admin
        .run_with_stdin(
            here,
            &["login", "--server", p.dev.base()],
            &format!("{}\n", p.dev.token()),
        )
        .await
        .expect(0);
    let made = admin
        .run(here, &["projects", "create", "nlp", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(made["name"], "nlp");
    // Lists come from read models a moment behind the log; the CLI asks
    // for them fresh, so what the last command made is listed at once.
    let listed = admin.run(here, &["projects"]).await.expect(0);
    assert!(
        listed.out().contains("nlp") && listed.out().contains("vision"),
        "{}",
        listed.out()
    );
    assert!(!listed.err().contains("warning"), "{}", listed.err());
    for n in 0..5 {
        let name = format!("made-{n}");
        admin
            .run(here, &["projects", "create", &name])
            .await
            .expect(0);
        let table = admin.run(here, &["projects"]).await.expect(0).out();
        assert!(table.contains(&name), "{name} missing from\n{table}");
    }
    // A reader that goes away (`| head`) ends a command quietly, as it
    // ends other tools: no panic, no error.
    for args in [
        &["projects"][..],
        &["tasks"],
        &["timeline"],
        &["projects", "--json"],
    ] {
        let gone = admin.run_into_closed_pipe(here, args).await.expect(0);
        assert!(gone.err().is_empty(), "{args:?}: {}", gone.err());
    }

    // Exit statuses a shell can act on.
    user.run(here, &["submit", "--cpus", "lots"])
        .await
        .expect(2);
    user.run(here, &["tasks", "--bogus"]).await.expect(2);
    let nowhere = format!("http://127.0.0.1:{}", testkit::free_port());
    let unreachable = user
        .run(here, &["whoami", "--server", &nowhere])
        .await
        .expect(4);
    assert!(
        unreachable.err().contains("cannot reach"),
        "{}",
        unreachable.err()
    );
    let missing = uuid::Uuid::new_v4().to_string();
    user.run(here, &["task", &missing]).await.expect(3);

    // A checkout pushed to its remote, with the project's defaults in
    // .unidesk.toml: the everyday command is `submit -- COMMAND`.
    let work = pushed_checkout(
        here,
        &[
            ("Dockerfile", &format!("FROM {BASE}\n")),
            ("greeting.txt", "first version\n"),
            (
                ".unidesk.toml",
                "project = \"vision\"\ncpus = 1\nmemory = \"256M\"\n",
            ),
        ],
    );
    let head = sh(&work, "git rev-parse HEAD");
    let run = user
        .run(
            &work,
            &[
                "submit",
                "--follow",
                "--",
                "sh",
                "-c",
                "echo hello from $(cat greeting.txt)",
            ],
        )
        .await
        .expect(0);
    assert_eq!(run.out(), "hello from first version\n", "{}", run.err());
    let first = run.task_id();
    let task = user
        .run(here, &["task", &first, "--json"])
        .await
        .expect(0)
        .json();
    let _first_image = support::EnvImage::of_spec(&task["spec"]);
    assert_eq!(task["spec"]["code_commit_id"], head.as_str());
    assert_eq!(task["spec"]["env_commit_id"], head.as_str());
    assert_eq!(task["state"], "succeeded");
    assert_eq!(task["spec"]["resources"]["memory_mb"], 256);

    // A commit that was not pushed is refused, saying how to fix it;
    // uncommitted changes are warned about.
    std::fs::write(work.join("greeting.txt"), "second version\n").unwrap();
    let unpushed = commit(&work, "second");
    std::fs::write(work.join("greeting.txt"), "not even committed\n").unwrap();
    let refused = user.run(&work, &["submit", "--", "true"]).await.expect(2);
    assert!(
        refused.err().contains("not on the remote"),
        "{}",
        refused.err()
    );
    assert!(
        refused.err().contains("git push origin HEAD"),
        "{}",
        refused.err()
    );
    assert!(refused.err().contains("uncommitted"), "{}", refused.err());
    sh(
        &work,
        "git checkout -q -- greeting.txt && git push -q origin HEAD:main 2>/dev/null",
    );

    // Now it runs exactly that commit; a failing command's exit status
    // is the submit's, and its output is stored as an artifact.
    let failed = user
        .run(
            &work,
            &[
                "submit",
                "--follow",
                "--output",
                "result=out.txt",
                "--",
                "sh",
                "-c",
                "cat greeting.txt | tee out.txt; exit 7",
            ],
        )
        .await
        .expect(7);
    assert_eq!(failed.out(), "second version\n");
    assert!(failed.err().contains("exit code 7"), "{}", failed.err());
    let second = failed.task_id();
    let task = user
        .run(here, &["task", &second, "--json"])
        .await
        .expect(0)
        .json();
    let _second_image = support::EnvImage::of_spec(&task["spec"]);
    assert_eq!(task["spec"]["code_commit_id"], unpushed.as_str());

    // Its artifact, downloaded and checked.
    let into = here.join("downloads");
    let got = user
        .run(
            here,
            &["artifacts", "get", &second, "-o", into.to_str().unwrap()],
        )
        .await
        .expect(0);
    assert!(got.out().contains("result"), "{}", got.out());
    assert_eq!(
        std::fs::read_to_string(into.join("result")).unwrap(),
        "second version\n"
    );
    let listed = user
        .run(here, &["artifacts", "list", &second, "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(listed[0]["name"], "result");
    user.run(here, &["artifacts", "get", &second, "nothing"])
        .await
        .expect(3);

    // Logs after the fact, whole.
    let logs = user.run(here, &["logs", &first]).await.expect(0);
    assert_eq!(logs.out(), "hello from first version\n");

    // Reading: tasks, a task, the timeline, the nodes, as text and JSON.
    let tasks = user
        .run(here, &["tasks", "--project", "vision"])
        .await
        .expect(0);
    assert!(tasks.out().starts_with("ID"), "{}", tasks.out());
    assert!(tasks.out().contains(&first) && tasks.out().contains(&second));
    let listed = user
        .run(here, &["tasks", "--state", "failed", "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], second.as_str());
    let shown = user.run(here, &["task", &second]).await.expect(0).out();
    assert!(shown.contains("state:     failed"), "{shown}");
    assert!(shown.contains("exit code: 7"), "{shown}");
    // Named for people, with the ids beside; each attempt says why it ended.
    assert!(shown.contains("project:   vision ("), "{shown}");
    assert!(shown.contains("node:      local ("), "{shown}");
    assert!(
        shown.contains(" node local assigned ") && shown.contains(" failed: exited with status 7"),
        "{shown}"
    );
    let timeline = user
        .run(here, &["timeline", "--task", &first])
        .await
        .expect(0)
        .out();
    assert!(
        timeline.contains("TaskSubmitted") && timeline.contains("TaskSucceeded"),
        "{timeline}"
    );
    let events = user
        .run(here, &["timeline", "--task", &first, "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(events[0]["event_type"], "TaskSubmitted");
    let nodes = user.run(here, &["nodes"]).await.expect(0).out();
    assert!(
        nodes.contains("local") && nodes.contains("online"),
        "{nodes}"
    );
    let nodes = user.run(here, &["nodes", "--json"]).await.expect(0).json();
    assert_eq!(nodes[0]["name"], "local");

    // A task no node can take waits, says why, and can be cancelled.
    let waiting = user
        .run(&work, &["submit", "--label", "gpu=a100", "--", "true"])
        .await
        .expect(0);
    let id = waiting.out().trim().to_string();
    let shown = testkit::eventually("the queued task to say why it waits", PATIENCE, || async {
        let shown = user.run(here, &["task", &id]).await.expect(0).out();
        shown.contains("gpu=a100").then_some(shown)
    })
    .await;
    assert!(shown.contains("waiting:"), "{shown}");
    // The timeline, followed live, shows the cancel as it happens.
    let live = here.join("timeline.jsonl");
    let mut timeline_follow = user
        .command(here, &["timeline", "-f", "--task", &id, "--json"])
        .stdout(std::fs::File::create(&live).unwrap())
        .spawn()
        .unwrap();
    testkit::eventually("the live timeline to show the past", PATIENCE, || async {
        std::fs::read_to_string(&live)
            .unwrap()
            .contains("TaskSubmitted")
            .then_some(())
    })
    .await;
    let cancelled = user.run(here, &["cancel", &id]).await.expect(0);
    assert!(
        cancelled.out().contains("cancel requested"),
        "{}",
        cancelled.out()
    );
    let state = user
        .run(here, &["task", &id, "--json"])
        .await
        .expect(0)
        .json();
    assert_eq!(state["state"], "cancelled");
    let events = testkit::eventually("the live timeline to show the cancel", PATIENCE, || async {
        let text = std::fs::read_to_string(&live).unwrap();
        text.contains("TaskCancelled").then_some(text)
    })
    .await;
    timeline_follow.kill().await.unwrap();
    let types: Vec<String> = events
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event_type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        types.first().map(String::as_str),
        Some("TaskSubmitted"),
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| *t == "TaskCancelled").count(),
        1,
        "{types:?}"
    );
    // Cancelling a task that ended is refused with the server's words.
    let again = user
        .run(here, &["cancel", &second, "--json"])
        .await
        .expect(1);
    assert!(again.err().contains("409"), "{}", again.err());

    // Completions for the shells.
    for shell in ["bash", "zsh", "fish"] {
        let script = user
            .run(here, &["completions", shell])
            .await
            .expect(0)
            .out();
        assert!(script.contains("submit"), "{shell}");
    }
    p.dev.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_goes_on_after_the_server_restarts_without_a_gap_or_a_repeat() {
    support::base_image();
    // The agent runs on its own, as on any real node: the server restarts
    // under it.
    let p = Platform::start(&["--no-agent"]).await;
    let here = p.dir.path().to_path_buf();
    let node = p.dev.api().post("/nodes", json!({"name": "worker"})).await;
    let _agent = Killed(support::spawn_agent(
        &p.dev.ws(),
        node["token"].as_str().unwrap(),
        &here.join("agent"),
        &["--cpus", "2", "--memory-mb", "2048", "--no-gpus"],
    ));
    support::node_online(&p.dev.api(), node["id"].as_str().unwrap()).await;
    let user = User::new();
    p.login(&user).await;
    let work = pushed_checkout(
        &here,
        &[
            ("Dockerfile", &format!("FROM {BASE}\n")),
            (".unidesk.toml", "project = \"vision\"\nmemory = \"256M\"\n"),
        ],
    );
    let script = "for i in $(seq 1 40); do echo line $i; sleep 0.25; done";
    let id = user
        .run(&work, &["submit", "--", "sh", "-c", script])
        .await
        .expect(0)
        .out()
        .trim()
        .to_string();
    let spec = user
        .run(&here, &["task", &id, "--json"])
        .await
        .expect(0)
        .json();
    let _image = support::EnvImage::of_spec(&spec["spec"]);
    let out_file = here.join("followed.txt");
    let err_file = here.join("followed.err");
    let mut follower = user
        .command(&here, &["logs", "-f", &id])
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    testkit::eventually("the follower to print output", PATIENCE, || async {
        std::fs::read_to_string(&out_file)
            .unwrap()
            .contains("line 3\n")
            .then_some(())
    })
    .await;
    // Ctrl-C to the server mid-task, then the same server again.
    let port = p.dev.port();
    let mut dev_process = p.dev;
    let status = dev_process
        .signal_and_wait(Signal::SIGINT, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(status.success());
    let restarted = dev(&here, Some(port), &[]).await;
    let status = tokio::time::timeout(PATIENCE, follower.wait())
        .await
        .expect("the follower ends with the task")
        .unwrap();
    let out = std::fs::read_to_string(&out_file).unwrap();
    let err = std::fs::read_to_string(&err_file).unwrap();
    let expected: String = (1..=40).map(|i| format!("line {i}\n")).collect();
    assert_eq!(out, expected, "status {status:?}, stderr: {err}");
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert!(err.contains("reconnect"), "{err}");
    restarted.stop().await.unwrap();
}

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP relay in front of the object store that, while `cut` is set,
/// drops every connection once `limit` bytes went upstream in all, and
/// then refuses new ones; it counts the bytes it forwards upstream.
struct Relay {
    port: u16,
    sent: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
}

impl Relay {
    async fn start(upstream: u16, limit: u64) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(true));
        let (s, c) = (Arc::clone(&sent), Arc::clone(&cut));
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (sent, cut) = (Arc::clone(&s), Arc::clone(&c));
                tokio::spawn(async move {
                    if cut.load(Ordering::SeqCst) && sent.load(Ordering::SeqCst) >= limit {
                        return; // refused: dropped at once
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let before = sent.fetch_add(n as u64, Ordering::SeqCst);
                        if cut.load(Ordering::SeqCst) && before + n as u64 >= limit {
                            let room = limit.saturating_sub(before) as usize;
                            let _ = sw.write_all(&buf[..room.min(n)]).await;
                            break;
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    down.abort();
                });
            }
        });
        Relay { port, sent, cut }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_upload_cut_off_midway_resumes_without_sending_its_parts_again() {
    const MIB: u64 = 1024 * 1024;
    let store_port = testkit::free_port();
    let relay = Relay::start(store_port, 100 * MIB).await;
    let store_listen = format!("127.0.0.1:{store_port}");
    let public = format!("http://127.0.0.1:{}", relay.port);
    let p = Platform::start(&[
        "--no-agent",
        "--objects-listen",
        &store_listen,
        "--objects-public-url",
        &public,
    ])
    .await;
    let here = p.dir.path().to_path_buf();
    let user = User::new();
    p.login(&user).await;

    // 200 MiB of a repeated pattern, made quickly.
    let file = here.join("big.bin");
    let mut block = vec![0u8; MIB as usize];
    for (i, b) in block.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let mut hasher = Sha256::new();
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        for n in 0..200u32 {
            block[..4].copy_from_slice(&n.to_le_bytes());
            f.write_all(&block).unwrap();
            hasher.update(&block);
        }
    }
    let sha = hex::encode(hasher.finalize());
    let args = [
        "objects",
        "put",
        "big.bin",
        "data/big.bin",
        "--project",
        "vision",
        "--json",
    ];

    // The connection is cut after 100 MiB: the first part got through.
    let cut = user.run(&here, &args).await.expect(4);
    assert!(cut.err().contains("object store"), "{}", cut.err());
    assert!(relay.sent.load(Ordering::SeqCst) >= 100 * MIB);

    // The next run sends only what is missing.
    relay.cut.store(false, Ordering::SeqCst);
    relay.sent.store(0, Ordering::SeqCst);
    let done = user.run(&here, &args).await.expect(0).json();
    assert_eq!(done["parts_resumed"], 1, "{done}");
    assert_eq!(done["parts_sent"], 3, "{done}");
    assert_eq!(done["object"]["sha256"], sha.as_str());
    assert_eq!(done["object"]["size"], 200 * MIB);
    let resent = relay.sent.load(Ordering::SeqCst);
    assert!(
        resent < 200 * MIB - 60 * MIB,
        "the second run sent {resent} bytes: it sent the first part again"
    );
    // The object is usable: a task may name it as an input.
    let api = p.dev.api().with_token(&p.alice);
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            "/tasks",
            Some(json!({
                "project_id": p.project,
                "code_repo_url": "https://example.org/c.git",
                "code_commit_id": "0".repeat(40),
                "env_repo_url": "https://example.org/e.git",
                "env_commit_id": "0".repeat(40),
                "dockerfile_path": "Dockerfile",
                "inputs": [{"name": "big.bin", "object": "data/big.bin"}]
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    p.dev.stop().await.unwrap();
}
