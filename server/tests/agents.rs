//! End to end across real processes: the `unidesk` server, real
//! `unidesk-agent`s over real WebSockets, real Docker containers and real
//! git repositories. Nothing is mocked.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::process::{Api, ServerProcess};

use support::{base_image, repo, spawn_agent, task_in, Agents, EnvImage, BASE};

struct Platform {
    api: Api,
    dir: tempfile::TempDir,
    agents: Agents,
    /// Per agent: its node token and work directory, to start it again.
    started: Vec<(String, PathBuf)>,
    server: ServerProcess,
}

impl Platform {
    async fn start() -> Platform {
        base_image();
        let db = testkit::fresh_db().await;
        let server = support::serve(
            &db.url,
            &[
                "--allow-file-urls",
                "--heartbeat-s",
                "1",
                // Eight missed heartbeats: a node is not lost to a loaded
                // machine's scheduling hiccup, only to the kill below.
                "--offline-after-s",
                "8",
                "--poll-ms",
                "100",
            ],
        )
        .await;
        Platform {
            api: server.api(),
            dir: tempfile::tempdir().unwrap(),
            agents: Agents::default(),
            started: Vec::new(),
            server,
        }
    }

    /// Provisions a node and starts its agent; returns the node id and the
    /// agent's index.
    async fn agent(&mut self, name: &str, labels: Value) -> (String, usize) {
        let node = self
            .api
            .post("/nodes", json!({"name": name, "labels": labels}))
            .await;
        let work = self.dir.path().join(format!("agent-{name}"));
        let token = node["token"].as_str().unwrap().to_string();
        self.agents.0.push(agent(&self.server.ws(), &token, &work));
        self.started.push((token, work));
        let id = node["id"].as_str().unwrap().to_string();
        support::node_online(&self.api, &id).await;
        (id, self.agents.0.len() - 1)
    }

    /// Starts agent `index` again as a new process (same token, same work
    /// directory), as after a crash or an upgrade.
    fn restart_agent(&mut self, index: usize) {
        let (token, work) = &self.started[index];
        self.agents.0[index] = agent(&self.server.ws(), token, work);
    }

    /// The timeline of one task, oldest first.
    async fn timeline(&self, task: &str) -> Vec<Value> {
        let page = self
            .api
            .get(&format!(
                "/events?aggregate_type=task&aggregate_id={task}&limit=1000"
            ))
            .await;
        page["items"].as_array().unwrap().clone()
    }

    async fn until<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        testkit::eventually(what, Duration::from_secs(180), || {
            let holds = check();
            async move { holds.await.then_some(()) }
        })
        .await;
    }

    async fn task_until(&self, id: &str, states: &[&str]) -> Value {
        task_in(&self.api, id, states).await
    }
}

/// An agent process for `token`, working in `work`.
fn agent(ws: &str, token: &str, work: &Path) -> Child {
    spawn_agent(
        ws,
        token,
        work,
        &["--cpus", "4", "--memory-mb", "4096", "--no-gpus"],
    )
}

struct Repos {
    code: (String, String),
    env: (String, String),
    _image: EnvImage,
}

fn repos(root: &Path) -> Repos {
    let env = repo(
        root,
        "env",
        &[(
            "images/base/Dockerfile",
            &format!("FROM {BASE}\nRUN echo built > /built\n"),
        )],
    );
    Repos {
        _image: EnvImage::of(&env, "images/base/Dockerfile"),
        env,
        code: repo(
            root,
            "code",
            &[("run.sh", "echo \"hello from $(cat greeting.txt)\"\necho to-stderr >&2\nexit ${EXIT:-0}\n"), ("greeting.txt", "the task\n")],
        ),
    }
}

fn task(project: &str, r: &Repos, command: &[&str], env: Value) -> Value {
    json!({
        "project_id": project,
        "code_repo_url": r.code.0, "code_commit_id": r.code.1,
        "env_repo_url": r.env.0, "env_commit_id": r.env.1,
        "dockerfile_path": "images/base/Dockerfile",
        "command": command, "env": env,
        "resources": {"cpus": 1, "memory_mb": 256},
        "max_retries": 1
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_runs_in_a_container_on_a_real_agent_and_its_output_is_readable() {
    let mut p = Platform::start().await;
    let r = repos(p.dir.path());
    let project = p.api.post("/projects", json!({"name": "e2e"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (node, _) = p.agent("worker-1", json!({"site": "lab"})).await;
    let listed = p.api.get(&format!("/nodes/{node}")).await;
    assert_eq!(listed["resources"]["cpus"], 4.0, "{listed}");

    let t = p
        .api
        .post("/tasks", task(&project, &r, &["sh", "run.sh"], json!({})))
        .await;
    let id = t["id"].as_str().unwrap().to_string();
    let done = p.task_until(&id, &["succeeded", "failed"]).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["node_id"], node);
    let logs = p.api.get(&format!("/tasks/{id}/logs")).await;
    let out = logs["data"].as_str().unwrap();
    assert!(out.contains("hello from the task"), "{logs}");
    assert!(out.contains("to-stderr"), "{logs}");
    // The timeline shows every step, in order.
    let events = p
        .api
        .get(&format!("/events?aggregate_type=task&aggregate_id={id}"))
        .await;
    let types: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types.first(), Some(&"TaskSubmitted"));
    assert!(
        types.contains(&"TaskAssigned")
            && types.contains(&"TaskAccepted")
            && types.contains(&"TaskStarted"),
        "{types:?}"
    );
    assert_eq!(types.last(), Some(&"TaskSucceeded"));

    // A non-zero exit fails the task with its exit code.
    let t = p
        .api
        .post(
            "/tasks",
            task(&project, &r, &["sh", "run.sh"], json!({"EXIT": "3"})),
        )
        .await;
    let failed = p
        .task_until(t["id"].as_str().unwrap(), &["succeeded", "failed"])
        .await;
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["exit_code"], 3, "{failed}");

    // A commit that does not exist fails with a reason a person understands.
    let mut bad = task(&project, &r, &["sh", "run.sh"], json!({}));
    bad["code_commit_id"] = json!("0123456789abcdef0123456789abcdef01234567");
    let t = p.api.post("/tasks", bad).await;
    let failed = p
        .task_until(t["id"].as_str().unwrap(), &["succeeded", "failed"])
        .await;
    assert_eq!(failed["state"], "failed");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("0123456789abcdef"),
        "{failed}"
    );

    // A Dockerfile that does not build fails with its last lines.
    let broken = repo(
        p.dir.path(),
        "env-broken",
        &[(
            "Dockerfile",
            &format!("FROM {BASE}\nRUN echo about-to-fail && false\n"),
        )],
    );
    let mut t = task(&project, &r, &["true"], json!({}));
    t["env_repo_url"] = json!(broken.0);
    t["env_commit_id"] = json!(broken.1);
    t["dockerfile_path"] = json!("Dockerfile");
    let t = p.api.post("/tasks", t).await;
    let failed = p
        .task_until(t["id"].as_str().unwrap(), &["succeeded", "failed"])
        .await;
    assert_eq!(failed["state"], "failed");
    assert!(
        failed["reason"].as_str().unwrap().contains("about-to-fail"),
        "{failed}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agents_task_is_requeued_and_runs_elsewhere_and_revoked_agents_stay_out() {
    let mut p = Platform::start().await;
    let r = repos(p.dir.path());
    let project = p.api.post("/projects", json!({"name": "e2e-loss"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (first, first_agent) = p.agent("doomed", json!({"pool": "a"})).await;
    let t = p
        .api
        .post("/tasks", {
            let mut t = task(&project, &r, &["sleep", "600"], json!({}));
            t["labels"] = json!({"pool": "a"});
            t
        })
        .await;
    let id = t["id"].as_str().unwrap().to_string();
    let running = p.task_until(&id, &["running"]).await;
    assert_eq!(running["node_id"], first);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            remove_containers(&self.0);
        }
    }
    let _cleanup = Cleanup(id.clone());

    // kill -9: no goodbye. After the offline interval the node is offline,
    // the attempt lost, and the task queued again.
    p.agents.0[first_agent].kill().unwrap();
    p.until("node offline", || async {
        p.api.get(&format!("/nodes/{first}")).await["status"] == "offline"
    })
    .await;
    let requeued = p.task_until(&id, &["queued"]).await;
    assert_eq!(requeued["attempts"][0]["outcome"], "lost", "{requeued}");

    // A second node with the label takes attempt 2.
    let (second, _) = p.agent("survivor", json!({"pool": "a"})).await;
    let again = p.task_until(&id, &["running"]).await;
    assert_eq!(
        (again["node_id"].as_str(), again["attempt"].as_u64()),
        (Some(second.as_str()), Some(2))
    );

    // Draining keeps new work away; revoking closes the session at once and
    // the agent is refused from then on.
    p.api
        .post(&format!("/nodes/{second}/drain"), json!({}))
        .await;
    let waiting = p
        .api
        .post("/tasks", {
            let mut t = task(&project, &r, &["true"], json!({}));
            t["labels"] = json!({"pool": "a"});
            t
        })
        .await;
    let waiting = format!("/tasks/{}", waiting["id"].as_str().unwrap());
    testkit::stays(
        "a task for a draining node's labels stays queued",
        Duration::from_secs(2),
        || async { p.api.get(&waiting).await["state"] == "queued" },
    )
    .await;
    p.api
        .post(&format!("/nodes/{second}/revoke"), json!({}))
        .await;
    let agent = p.agents.0.last_mut().unwrap();
    let status = testkit::eventually("the revoked agent to exit", Duration::from_secs(30), || {
        std::future::ready(agent.try_wait().unwrap())
    })
    .await;
    assert_eq!(
        status.code(),
        Some(2),
        "a revoked agent exits with status 2"
    );
    p.until("revoked node marked", || async {
        p.api.get(&format!("/nodes/{second}")).await["status"] == "revoked"
    })
    .await;
    // Its attempt is given up at once, and with no retries left the task fails.
    let ended = p.task_until(&id, &["failed"]).await;
    assert!(
        ended["reason"].as_str().unwrap().contains("revoked"),
        "{ended}"
    );
    remove_containers(&id);
}

/// Removes the containers a task left behind on agents that were killed.
fn remove_containers(task: &str) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "docker ps -aq --filter label=unidesk.task_id={task} | xargs -r docker rm -f"
        ))
        .output();
}

/// The containers of a task still present in Docker.
fn containers_of(task: &str) -> String {
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=unidesk.task_id={task}"),
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_keeps_its_running_task_and_a_cancel_stops_a_container() {
    let mut p = Platform::start().await;
    let r = repos(p.dir.path());
    let project = p
        .api
        .post("/projects", json!({"name": "e2e-restart"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (node, agent) = p.agent("steady", json!({})).await;

    // The agent dies while the task runs, and comes back (same work
    // directory) before the server gives the node up: it adopts the
    // container, and the task ends as if nothing happened.
    let t = p
        .api
        .post(
            "/tasks",
            task(
                &project,
                &r,
                &["sh", "-c", "echo before; sleep 6; echo after"],
                json!({}),
            ),
        )
        .await;
    let id = t["id"].as_str().unwrap().to_string();
    p.task_until(&id, &["running"]).await;
    p.until("first line stored", || async {
        p.api.get(&format!("/tasks/{id}/logs")).await["data"] == "before\n"
    })
    .await;
    p.agents.0[agent].kill().unwrap();
    p.agents.0[agent].wait().unwrap();
    p.restart_agent(agent);
    let done = p.task_until(&id, &["succeeded", "failed", "queued"]).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1, "{done}");
    let logs = p.api.get(&format!("/tasks/{id}/logs")).await;
    assert_eq!(logs["data"], "before\nafter\n", "no gap, no duplicate");
    assert_eq!(logs["complete"], true);
    assert_eq!(containers_of(&id), "", "the adopted container is removed");
    let timeline = p.timeline(&id).await;
    let summaries: Vec<&str> = timeline
        .iter()
        .filter_map(|e| e["summary"].as_str())
        .collect();
    assert!(
        summaries
            .iter()
            .any(|s| s.contains("code ready") && s.contains("fetched")),
        "the timeline says the code was fetched: {summaries:#?}"
    );
    assert!(
        summaries
            .iter()
            .any(|s| s.contains("image ready") && s.contains("built in")),
        "{summaries:#?}"
    );

    // The same code and environment again: both come from the node's cache.
    let t = p
        .api
        .post("/tasks", task(&project, &r, &["sleep", "600"], json!({})))
        .await;
    let cancel_me = t["id"].as_str().unwrap().to_string();
    let running = p.task_until(&cancel_me, &["running"]).await;
    assert_eq!(running["node_id"], node);
    let summaries: Vec<String> = p
        .timeline(&cancel_me)
        .await
        .iter()
        .filter_map(|e| e["summary"].as_str().map(str::to_owned))
        .collect();
    assert!(
        summaries
            .iter()
            .any(|s| s.contains("code ready") && s.contains("from cache")),
        "{summaries:#?}"
    );
    assert!(
        summaries
            .iter()
            .any(|s| s.contains("image ready") && s.contains("cached")),
        "{summaries:#?}"
    );
    assert!(
        summaries.iter().any(|s| s.contains("image cached")),
        "the scheduler preferred the node holding the image: {summaries:#?}"
    );
    assert_ne!(containers_of(&cancel_me), "");
    let asked = Instant::now();
    p.api
        .post(&format!("/tasks/{cancel_me}/cancel"), json!({}))
        .await;
    let ended = p.task_until(&cancel_me, &["cancelled"]).await;
    assert_eq!(ended["state"], "cancelled");
    p.until("container removed", || async {
        containers_of(&cancel_me).is_empty()
    })
    .await;
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "cancel took {:?}",
        asked.elapsed()
    );
}
