//! Project secrets end to end, on real processes: `unidesk serve` with a
//! secrets key, the `unidesk-agent` binary, Docker and git. A task gets its
//! secrets as environment variables, its output shows `***` in their
//! place (also when a value is written in two pieces), and no value is
//! found in the log, the timeline or any answer. A restarted agent that
//! adopts the container masks its output too.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use support::{base_image, repo, spawn_agent, task_in, Agents, EnvImage, BASE};

/// Values that would be found wherever they leaked.
const WANDB: &str = "wandb-Zq8vN3kLp0xR7tY2uW";
const HF: &str = "hf_Hh4Jj6Kk8Ll0Mm2Nn";

struct Setup {
    server: testkit::process::ServerProcess,
    api: testkit::process::Api,
    _db: testkit::TestDb,
    dir: tempfile::TempDir,
    project: String,
    code: (String, String),
    env: (String, String),
    token: String,
    agents: Agents,
    _image: EnvImage,
}

impl Setup {
    async fn start() -> Setup {
        base_image();
        let db = testkit::fresh_db().await;
        let dir = tempfile::tempdir().unwrap();
        let server = support::serve_with_secrets(&db.url, dir.path()).await;
        let api = server.api();
        let project = api.post("/projects", json!({"name": "secret-lab"})).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        for (name, value) in [("wandb", WANDB), ("hf", HF)] {
            let (status, body) = api
                .call(
                    Method::PUT,
                    &format!("/projects/{project}/secrets/{name}"),
                    Some(json!({"value": value})),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
        let node = api.post("/nodes", json!({"name": "secret-node"})).await;
        let code = repo(dir.path(), "code", &[("a.txt", "a")]);
        let env = repo(
            dir.path(),
            "env",
            &[("Dockerfile", &format!("FROM {BASE}\n"))],
        );
        let mut setup = Setup {
            token: node["token"].as_str().unwrap().to_string(),
            server,
            api,
            _db: db,
            dir,
            project,
            code,
            _image: EnvImage::of(&env, "Dockerfile"),
            env,
            agents: Agents::default(),
        };
        setup.start_agent();
        support::node_online(&setup.api, node["id"].as_str().unwrap()).await;
        setup
    }

    fn start_agent(&mut self) {
        self.agents.0.push(spawn_agent(
            &self.server.ws(),
            &self.token,
            &self.dir.path().join("agent"),
            &["--cpus", "2", "--memory-mb", "2048", "--no-gpus"],
        ));
    }

    fn kill_agent(&mut self) {
        for mut agent in self.agents.0.drain(..) {
            agent.kill().unwrap();
            agent.wait().unwrap();
        }
    }

    async fn submit(&self, script: &str, extra: Value) -> String {
        let mut task = json!({
            "project_id": self.project,
            "code_repo_url": self.code.0, "code_commit_id": self.code.1,
            "env_repo_url": self.env.0, "env_commit_id": self.env.1,
            "dockerfile_path": "Dockerfile",
            "command": ["sh", "-c", script],
            "resources": {"cpus": 0.25, "memory_mb": 64},
        });
        for (k, v) in extra.as_object().unwrap() {
            task[k] = v.clone();
        }
        self.api.post("/tasks", task).await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn logs(&self, task: &str) -> String {
        self.api.get(&format!("/tasks/{task}/logs")).await["data"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Everything a user or an export could read about the platform.
    async fn everything_readable(&self, task: &str) -> String {
        let mut all = Vec::new();
        for path in [
            format!("/tasks/{task}"),
            format!("/tasks/{task}/logs"),
            "/events?limit=1000".to_string(),
            "/timeline?limit=500".to_string(),
            format!("/projects/{}/secrets", self.project),
        ] {
            all.push(self.api.get(&path).await.to_string());
        }
        all.join("\n")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_gets_its_secrets_and_its_output_shows_them_masked() {
    let s = Setup::start().await;
    // The values reach the container (a value is masked only where it is
    // printed exactly); printed whole, and in two pieces with a pause
    // between them, they are masked.
    let script = r#"
        test "${#WANDB_API_KEY}" = 24 && echo "wandb set"
        test "${#HF_TOKEN}" = 20 && echo "hf set"
        echo "key=$WANDB_API_KEY"
        printf 'split=%s' "$(echo "$HF_TOKEN" | cut -c1-7)"; sleep 1
        printf '%s done\n' "$(echo "$HF_TOKEN" | cut -c8-)"
        echo "$WANDB_API_KEY" >&2
        exit 3
    "#;
    let task = s
        .submit(
            script,
            json!({"env_secrets": {"WANDB_API_KEY": "wandb", "HF_TOKEN": "hf"}}),
        )
        .await;
    let done = task_in(&s.api, &task, &["succeeded", "failed"]).await;
    assert_eq!(done["exit_code"], 3, "{done}");
    let logs = s.logs(&task).await;
    assert!(logs.contains("wandb set\nhf set\n"), "{logs}");
    assert!(logs.contains("key=***\n"), "{logs}");
    assert!(logs.contains("split=*** done\n"), "{logs}");
    assert_eq!(logs.matches("***").count(), 3, "{logs}");
    let all = s.everything_readable(&task).await;
    for value in [WANDB, HF, &HF[..10], &WANDB[6..]] {
        assert!(!all.contains(value), "{value} leaked");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adopted_container_with_secrets_has_its_output_masked_too() {
    let mut s = Setup::start().await;
    let task = s
        .submit(
            r#"echo "first $WANDB_API_KEY"; sleep 8; echo "after $WANDB_API_KEY""#,
            json!({"env_secrets": {"WANDB_API_KEY": "wandb"}}),
        )
        .await;
    testkit::eventually("the first line", support::PATIENCE, || async {
        s.logs(&task).await.contains("first ***").then_some(())
    })
    .await;
    // The agent dies while the task runs; the next one adopts it.
    s.kill_agent();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.start_agent();
    let done = task_in(&s.api, &task, &["succeeded", "failed"]).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1, "adopted, not run again: {done}");
    let logs = s.logs(&task).await;
    assert!(logs.contains("after ***\n"), "{logs}");
    assert!(!s.everything_readable(&task).await.contains(WANDB));
}
