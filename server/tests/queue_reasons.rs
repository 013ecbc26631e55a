//! Why a queued task waits, as a user reads it in `GET /api/v1/tasks/{id}`:
//! a real `unidesk serve` (API, ingress, projector and scheduler) on a real
//! PostgreSQL, with nodes played by agents speaking the real protocol over
//! real WebSockets. The explanation follows the cluster as nodes join and
//! the project's limit changes, and goes once the task is placed.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use testkit::agent::JsonAgent;
use testkit::process::{Api, ServerProcess};

const PATIENCE: Duration = Duration::from_secs(30);

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

struct Platform {
    api: Api,
    addr: SocketAddr,
    _server: ServerProcess,
}

impl Platform {
    async fn start() -> Platform {
        let db = testkit::fresh_db().await;
        // The test's agents never beat, and a session silent for four
        // heartbeat periods is closed: at the default period every node
        // stays online through the test however slow the machine.
        let server = support::serve(&db.url, &["--heartbeat-s", "15", "--poll-ms", "100"]).await;
        Platform {
            api: server.api(),
            addr: format!("127.0.0.1:{}", server.port()).parse().unwrap(),
            _server: server,
        }
    }

    /// Provisions node `name` with `labels` and connects an agent declaring
    /// 4 CPUs, 4 GiB and GPUs with device indices `gpus`.
    async fn node(&self, name: &str, labels: Value, gpus: &[u32]) -> (String, JsonAgent) {
        let node = self
            .api
            .post("/nodes", json!({"name": name, "labels": labels}))
            .await;
        let gpus: Vec<Value> = gpus
            .iter()
            .map(|i| json!({"index": i, "name": "A100", "memory_mb": 40960}))
            .collect();
        let hello = json!({"type": "hello", "agent_version": "0.1.0-test",
            "resources": {"cpus": 4.0, "memory_mb": 4096, "gpus": gpus},
            "labels": {}, "running": [], "cache": {"images": [], "commits": []}});
        let agent = JsonAgent::join_with(self.addr, node["token"].as_str().unwrap(), hello).await;
        let id = node["id"].as_str().unwrap().to_string();
        support::node_online(&self.api, &id).await;
        (id, agent)
    }

    async fn submit(&self, project: &str, labels: Value, gpus: u32) -> String {
        self.api
            .post(
                "/tasks",
                json!({
                    "project_id": project,
                    "code_repo_url": "https://git.example.com/lab/code.git",
                    "code_commit_id": SHA,
                    "env_repo_url": "https://git.example.com/lab/env.git",
                    "env_commit_id": SHA,
                    "dockerfile_path": "Dockerfile",
                    "command": ["python", "train.py"],
                    "labels": labels,
                    "resources": {"cpus": 1, "memory_mb": 1024, "gpus": gpus}
                }),
            )
            .await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits until queued task `id` is explained with a reason for which
    /// `check` holds; returns the task.
    async fn explained(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        testkit::eventually(what, PATIENCE, || async {
            let task = self.api.get(&format!("/tasks/{id}")).await;
            let reasons = task["queue"]["reasons"].as_array()?;
            reasons.iter().any(&check).then_some(task)
        })
        .await
    }

    async fn quota(&self, project: &str, max_running: Value) {
        let (status, body) = self
            .api
            .call(
                reqwest::Method::PUT,
                &format!("/projects/{project}/quota"),
                Some(json!({ "max_running": max_running })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test]
async fn a_queued_task_says_what_holds_it_until_a_fitting_node_takes_it() {
    let p = Platform::start().await;
    let project = p
        .api
        .post("/projects", json!({"name": "vision", "description": ""}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_plain, _plain_agent) = p.node("plain", json!({}), &[]).await;
    let task = p.submit(&project, json!({"gpu": "a100"}), 2).await;

    // No node carries the label: said in words, and as data with counts.
    let t = p
        .explained(&task, "the label reason", |r| r["kind"] == "label")
        .await;
    assert_eq!(t["state"], "queued");
    assert_eq!(
        t["queue"]["reasons"],
        json!([{"kind": "label", "label": "gpu=a100", "nodes_filtered": 1}])
    );
    assert_eq!(
        t["queue"]["summary"],
        "no online node carries label gpu=a100 (of 1 node: 1 lacks label gpu=a100)"
    );
    assert_eq!(t["queue"]["position"], 1);
    assert!(t["queue"]["since"].is_string(), "{t}");

    // A node with the label but one GPU, for a task needing two.
    let (_small, _small_agent) = p.node("a100-small", json!({"gpu": "a100"}), &[0]).await;
    let t = p
        .explained(&task, "the GPU reason", |r| r["kind"] == "gpus")
        .await;
    assert_eq!(
        t["queue"]["reasons"],
        json!([
            {"kind": "label", "label": "gpu=a100", "nodes_filtered": 1},
            {"kind": "gpus", "nodes_filtered": 1, "need": 2, "most_free": 1, "largest": 1}
        ])
    );
    let summary = t["queue"]["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(
            "1 node with label gpu=a100 lacks free GPUs: need 2, most free 1 \
             (none of them has 2 at all)"
        ),
        "{summary}"
    );

    // Another task of the project takes a node; at a limit of one running
    // task, the project is at its max_running.
    let small = p.submit(&project, json!({}), 0).await;
    support::task_in(&p.api, &small, &["assigned"]).await;
    p.quota(&project, json!(1)).await;
    let t = p
        .explained(&task, "the quota reason", |r| r["kind"] == "quota")
        .await;
    assert_eq!(
        t["queue"]["reasons"][0],
        json!({"kind": "quota", "max_running": 1, "running": 1})
    );
    let summary = t["queue"]["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("the project is at its max_running: 1 of 1 running; "),
        "{summary}"
    );

    // Without the limit, a node with the label and two GPUs takes the task,
    // which runs; the explanation is gone.
    p.quota(&project, Value::Null).await;
    let (big, mut big_agent) = p.node("a100-big", json!({"gpu": "a100"}), &[0, 1]).await;
    let t = support::task_in(&p.api, &task, &["assigned"]).await;
    assert_eq!(t["node_id"], big.as_str());
    assert!(t.get("queue").is_none(), "{t}");
    for state in ["accepted", "running"] {
        big_agent
            .report(json!({"type": "status", "task_id": task, "attempt": 1,
                           "state": state, "container": "c0ffee"}))
            .await;
    }
    let t = support::task_in(&p.api, &task, &["running"]).await;
    assert!(t.get("queue").is_none(), "{t}");
}
