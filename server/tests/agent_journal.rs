//! An agent owes the server its attempts' ends: across `kill -9` of the
//! agent, with the server down meanwhile, and for a container that ended
//! while no agent watched. Real processes: `unidesk serve`, the
//! `unidesk-agent` binary, Docker and git.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use testkit::process::{Api, ServerProcess};

use support::{base_image, repo, spawn_agent, task_in, EnvImage, BASE};

/// The server's flags: file URLs for the test repositories, quick
/// heartbeats, and an offline window longer than any agent is down here.
const FLAGS: &[&str] = &[
    "--allow-file-urls",
    "--heartbeat-s",
    "1",
    "--offline-after-s",
    "60",
    "--poll-ms",
    "100",
];

/// A server, a project, one node and its agent process.
struct Setup {
    server: ServerProcess,
    api: Api,
    db: testkit::TestDb,
    /// Holds the repositories and the agent's work directory.
    dir: tempfile::TempDir,
    project: String,
    code: (String, String),
    env: (String, String),
    token: String,
    work: PathBuf,
    agent: Option<Child>,
    _image: EnvImage,
}

impl Setup {
    async fn start(name: &str) -> Setup {
        base_image();
        let db = testkit::fresh_db().await;
        let server = support::serve(&db.url, FLAGS).await;
        let api = server.api();
        let project = api.post("/projects", json!({"name": name})).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let node = api.post("/nodes", json!({"name": name})).await;
        let dir = tempfile::tempdir().unwrap();
        let code = repo(dir.path(), "code", &[("a.txt", "a")]);
        let env = repo(
            dir.path(),
            "env",
            &[("Dockerfile", &format!("FROM {BASE}\n"))],
        );
        let mut setup = Setup {
            _image: EnvImage::of(&env, "Dockerfile"),
            work: dir.path().join("agent"),
            code,
            env,
            token: node["token"].as_str().unwrap().to_string(),
            server,
            api,
            db,
            dir,
            project,
            agent: None,
        };
        setup.start_agent();
        support::node_online(&setup.api, node["id"].as_str().unwrap()).await;
        setup
    }

    fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    fn start_agent_with(&mut self, flags: &[&str]) {
        let mut all = vec!["--cpus", "2", "--memory-mb", "2048", "--no-gpus"];
        all.extend_from_slice(flags);
        self.agent = Some(spawn_agent(
            &self.server.ws(),
            &self.token,
            &self.work,
            &all,
        ));
    }

    /// `kill -9` of the agent: it writes and removes nothing more.
    fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill().unwrap();
            agent.wait().unwrap();
        }
    }

    /// Submits `script` (run by `sh -c`) with `extra` fields; returns the
    /// task id.
    async fn submit(&self, script: &str, extra: Value) -> String {
        let (code, env) = (&self.code, &self.env);
        let mut task = json!({
            "project_id": self.project,
            "code_repo_url": code.0, "code_commit_id": code.1,
            "env_repo_url": env.0, "env_commit_id": env.1,
            "dockerfile_path": "Dockerfile",
            "command": ["sh", "-c", script],
            "resources": {"cpus": 0.25, "memory_mb": 64},
            "max_retries": 1
        });
        for (k, v) in extra.as_object().unwrap() {
            task[k] = v.clone();
        }
        let task = self.api.post("/tasks", task).await;
        task["id"].as_str().unwrap().to_string()
    }

    async fn logs_are(&self, task: &str, text: &str) {
        testkit::eventually(
            &format!("the output of {task} to be {text:?}"),
            support::PATIENCE,
            || async {
                let logs = self.api.get(&format!("/tasks/{task}/logs")).await;
                (logs["data"] == text).then_some(())
            },
        )
        .await;
    }

    /// The event types of a task, oldest first.
    async fn events(&self, task: &str) -> Vec<String> {
        let page = self
            .api
            .get(&format!(
                "/events?aggregate_type=task&aggregate_id={task}&limit=1000"
            ))
            .await;
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_type"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.kill_agent();
    }
}

/// Docker's view of the task's container: `(status, started at)`, or
/// `None` while there is none.
fn container_state(task: &str) -> Option<(String, chrono::DateTime<chrono::Utc>)> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "docker ps -aq --filter label=unidesk.task_id={task} | head -n1 | \
             xargs -r docker inspect -f '{{{{.State.Status}}}} {{{{.State.StartedAt}}}}'"
        ))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, started) = text.trim().split_once(' ')?;
    let started = chrono::DateTime::parse_from_rfc3339(started).ok()?;
    Some((status.to_string(), started.with_timezone(&chrono::Utc)))
}

/// Removes the task's containers however the test ended.
struct RemoveContainers(String);

impl Drop for RemoveContainers {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker ps -aq --filter label=unidesk.task_id={} | xargs -r docker rm -f",
                self.0
            ))
            .output();
    }
}

/// A way to the Docker daemon that answers slowly, as a busy daemon does:
/// every piece of every answer waits `delay`. Returns its address for
/// `--docker-host`.
fn slow_docker(dir: &Path, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = dir.join("slow-docker.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(daemon) = tokio::net::UnixStream::connect("/var/run/docker.sock").await
                else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_daemon, mut to_daemon) = daemon.into_split();
                let up = tokio::io::copy(&mut from_client, &mut to_daemon);
                let down = async {
                    let mut buf = vec![0; 64 * 1024];
                    loop {
                        let n = from_daemon.read(&mut buf).await?;
                        if n == 0 {
                            return Ok::<(), std::io::Error>(());
                        }
                        tokio::time::sleep(delay).await;
                        to_client.write_all(&buf[..n]).await?;
                    }
                };
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    format!("unix://{}", path.display())
}

/// The agent's report journal, as text.
fn journal(work: &Path) -> String {
    let bytes = std::fs::read(work.join("journal").join("reports.log")).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The events that end an attempt.
const ENDS: [&str; 5] = [
    "TaskSucceeded",
    "TaskFailed",
    "TaskTimedOut",
    "TaskCancelled",
    "TaskLost",
];

#[tokio::test(flavor = "multi_thread")]
async fn an_end_the_server_never_stored_is_reported_by_the_restarted_agent_as_attempt_one() {
    let mut s = Setup::start("journal-end").await;
    let task = s
        .submit("echo started; sleep 3; echo finished; exit 3", json!({}))
        .await;
    let _cleanup = RemoveContainers(task.clone());
    s.logs_are(&task, "started\n").await;

    // The server goes away; the container ends meanwhile, and the agent is
    // killed with its end unacknowledged.
    let port = s.server.port();
    s.server
        .signal_and_wait(Signal::SIGTERM, Duration::from_secs(20))
        .await
        .unwrap();
    testkit::eventually("the container to exit", support::PATIENCE, || async {
        container_state(&task).filter(|(status, _)| status == "exited")
    })
    .await;
    testkit::eventually(
        "the agent to journal the end",
        Duration::from_secs(30),
        || async {
            let text = journal(&s.work);
            (text.contains(r#""state":"failed""#) && text.contains(r#""exit_code":3"#))
                .then_some(())
        },
    )
    .await;
    s.kill_agent();

    // Both come back.
    s.server = support::serve_with(&s.db.url, FLAGS, |launch| launch.port(port)).await;
    s.api = s.server.api();
    s.start_agent();
    let done = task_in(
        &s.api,
        &task,
        &["succeeded", "failed", "timed_out", "queued"],
    )
    .await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["attempt"], 1, "{done}");
    assert_eq!(done["exit_code"], 3, "{done}");
    s.logs_are(&task, "started\nfinished\n").await;
    let events = s.events(&task).await;
    let ends: Vec<&String> = events
        .iter()
        .filter(|e| ENDS.contains(&e.as_str()))
        .collect();
    assert_eq!(ends, ["TaskFailed"], "exactly one end: {events:?}");
    assert!(
        !events.iter().any(|e| e == "TaskReportRefused"),
        "{events:?}"
    );
    testkit::eventually(
        "the container removed once the end is stored",
        Duration::from_secs(30),
        || async { container_state(&task).is_none().then_some(()) },
    )
    .await;
    testkit::eventually("the journal compacted", Duration::from_secs(30), || async {
        (!journal(&s.work).contains(r#""record":"status""#)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn adopted_containers_that_ended_before_their_time_limit_report_their_real_exits() {
    let mut s = Setup::start("journal-limit").await;
    // Several at once: each is judged on its own record.
    let mut tasks = Vec::new();
    for code in 5..8 {
        let script = format!("echo hi; sleep 2; exit {code}");
        tasks.push((s.submit(&script, json!({"timeout_s": 6})).await, code));
    }
    let _cleanup: Vec<RemoveContainers> = tasks
        .iter()
        .map(|(task, _)| RemoveContainers(task.clone()))
        .collect();
    for (task, _) in &tasks {
        s.logs_are(task, "hi\n").await;
    }

    // The agent dies; the containers end within their limit while no
    // agent watches, and the next agent starts after the limit passed,
    // with a Docker daemon that is slow to answer (a busy one): how long
    // Docker takes must not decide how an attempt ended.
    s.kill_agent();
    for (task, _) in &tasks {
        testkit::eventually(
            "the container to end and its time limit to pass",
            support::PATIENCE,
            || async {
                let (status, started) = container_state(task)?;
                let since = chrono::Utc::now() - started;
                (status == "exited" && since > chrono::Duration::seconds(7)).then_some(())
            },
        )
        .await;
    }
    let docker = slow_docker(s.dir.path(), Duration::from_millis(20));
    s.start_agent_with(&["--docker-host", &docker]);
    for (task, code) in &tasks {
        let done = task_in(
            &s.api,
            task,
            &["succeeded", "failed", "timed_out", "queued"],
        )
        .await;
        assert_eq!(
            (&done["state"], &done["exit_code"], &done["attempt"]),
            (&json!("failed"), &json!(code), &json!(1)),
            "{done}"
        );
        let events = s.events(task).await;
        let ends: Vec<&String> = events
            .iter()
            .filter(|e| ENDS.contains(&e.as_str()))
            .collect();
        assert_eq!(ends, ["TaskFailed"], "{events:?}");
        s.logs_are(task, "hi\n").await;
    }
}

/// What the container's own log (`docker logs`) holds.
fn container_output(task: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "docker ps -aq --filter label=unidesk.task_id={task} | head -n1 | xargs -r docker logs"
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn output_printed_while_no_agent_watched_is_kept_when_the_container_is_adopted() {
    let mut s = Setup::start("journal-output").await;
    let task = s
        .submit(
            "echo start; sleep 2; echo while-down; echo still-down; sleep 4; echo after",
            json!({}),
        )
        .await;
    let _cleanup = RemoveContainers(task.clone());
    s.logs_are(&task, "start\n").await;

    // The agent dies after the first line was stored; the container goes
    // on printing with no agent to read it.
    s.kill_agent();
    testkit::eventually(
        "the container to print while no agent runs",
        support::PATIENCE,
        || async { container_output(&task).contains("still-down").then_some(()) },
    )
    .await;

    // The next agent adopts it and reads its output again from the start,
    // gathered into larger chunks than the first agent sent: what the
    // server already has is skipped, nothing else.
    s.start_agent();
    let done = task_in(&s.api, &task, &["succeeded", "failed", "queued"]).await;
    assert_eq!(
        (&done["state"], &done["attempt"]),
        (&json!("succeeded"), &json!(1)),
        "{done}"
    );
    s.logs_are(&task, "start\nwhile-down\nstill-down\nafter\n")
        .await;
}
