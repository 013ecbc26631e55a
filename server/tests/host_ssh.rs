//! End to end: an admin runs commands on a node's host over SSH through
//! `POST /api/v1/nodes/{id}/host-ssh`, with the real `unidesk` server, a
//! real `unidesk-agent` and a real OpenSSH `sshd` started by the test on a
//! free port of 127.0.0.1 (it stands in for the Windows or Linux host the
//! agent's WSL or container runs on). Nothing is mocked.
//!
//! Needs `openssh-server` and `openssh-client` (`ops/test.sh` installs
//! them) and Docker (the agent connects to it at start-up).

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::sshd::Sshd;
use support::{spawn_agent, Agents};
use testkit::process::{Api, ServerProcess};

/// The server and its agents; stopped when dropped.
struct Platform {
    admin: String,
    api: Api,
    dir: tempfile::TempDir,
    agents: Agents,
    server: ServerProcess,
}

impl Platform {
    async fn start() -> Platform {
        let db = testkit::fresh_db().await;
        let server = support::serve(&db.url, &["--heartbeat-s", "1", "--poll-ms", "100"]).await;
        Platform {
            admin: server.token().to_string(),
            api: server.api(),
            dir: tempfile::tempdir().unwrap(),
            agents: Agents::default(),
            server,
        }
    }

    async fn call(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.api.with_token(token).call(method, path, body).await
    }

    /// A user who is not an admin; returns their token.
    async fn user(&self, name: &str) -> String {
        self.api.post("/users", json!({ "name": name })).await;
        let issued = self
            .api
            .post(&format!("/users/{name}/tokens"), json!({"label": "test"}))
            .await;
        issued["token"].as_str().unwrap().to_string()
    }

    /// Provisions node `name`, starts its agent with `extra` flags and
    /// waits until it is online; returns the node id.
    async fn agent(&mut self, name: &str, extra: &[String]) -> String {
        let node = self.api.post("/nodes", json!({ "name": name })).await;
        let work = self.dir.path().join(format!("agent-{name}"));
        let mut flags = vec!["--cpus", "1", "--memory-mb", "512", "--no-gpus"];
        flags.extend(extra.iter().map(String::as_str));
        self.agents.0.push(spawn_agent(
            &self.server.ws(),
            node["token"].as_str().unwrap(),
            &work,
            &flags,
        ));
        let id = node["id"].as_str().unwrap().to_string();
        support::node_online(&self.api, &id).await;
        id
    }

    async fn host_ssh(&self, token: &str, node: &str, body: Value) -> (u16, Value) {
        self.call(
            token,
            reqwest::Method::POST,
            &format!("/nodes/{node}/host-ssh"),
            Some(body),
        )
        .await
    }
}

fn detail(v: &Value) -> String {
    v["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| format!("{}: {}", e["field"], e["detail"]))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_else(|| v.to_string())
}

#[tokio::test]
async fn an_admin_runs_bounded_commands_on_a_nodes_host_over_real_ssh() {
    let keys = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(keys.path(), "").await;
    let mut p = Platform::start().await;
    let host = p
        .agent(
            "gpu-3",
            &[
                "--host-ssh".into(),
                sshd.target(),
                "--host-ssh-key".into(),
                sshd.client_key.display().to_string(),
            ],
        )
        .await;

    // A probe: its output and exit status come back.
    let (status, ran) = p
        .host_ssh(&p.admin, &host, json!({"command": "echo hello; id -un"}))
        .await;
    assert_eq!(status, 200, "{ran}");
    assert_eq!(ran["exit_code"], 0, "{ran}");
    let output = ran["output"].as_str().unwrap();
    assert!(output.contains("hello"), "{ran}");
    assert!(output.contains(&sshd.user), "{ran}");
    assert_eq!(ran["timed_out"], false);
    assert_eq!(ran["truncated"], false);
    assert!(ran["error"].is_null(), "{ran}");

    // A failing command is a result, not an error.
    let (status, failed) = p
        .host_ssh(&p.admin, &host, json!({"command": "echo oops >&2; exit 3"}))
        .await;
    assert_eq!(status, 200, "{failed}");
    assert_eq!(failed["exit_code"], 3);
    assert!(failed["output"].as_str().unwrap().contains("oops"));

    // The hard time limit: a command that would run 30 s is stopped at 2.
    let started = Instant::now();
    let (status, slow) = p
        .host_ssh(
            &p.admin,
            &host,
            json!({"command": "sleep 30", "timeout_s": 2}),
        )
        .await;
    assert_eq!(status, 200, "{slow}");
    assert_eq!(slow["timed_out"], true, "{slow}");
    assert!(slow["exit_code"].is_null(), "{slow}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    // The output cap: 1 MiB printed, at most 64 KiB kept.
    let (status, big) = p
        .host_ssh(
            &p.admin,
            &host,
            json!({"command": "head -c 1048576 /dev/zero | tr '\\0' x", "timeout_s": 60}),
        )
        .await;
    assert_eq!(status, 200, "{}", detail(&big));
    assert_eq!(big["truncated"], true);
    assert_eq!(big["exit_code"], 0);
    let kept = big["output"].as_str().unwrap();
    assert!(
        !kept.is_empty() && kept.len() <= 64 * 1024,
        "{}",
        kept.len()
    );
    assert!(kept.bytes().all(|b| b == b'x'));

    // Admins only; bad bodies are named.
    let frank = p.user("frank").await;
    let (status, v) = p.host_ssh(&frank, &host, json!({"command": "id"})).await;
    assert_eq!(status, 403, "{v}");
    for (body, field) in [
        (json!({"command": ""}), "command"),
        (json!({"command": "id", "timeout_s": 0}), "timeout_s"),
        (json!({"command": "id", "timeout_s": 601}), "timeout_s"),
    ] {
        let (status, v) = p.host_ssh(&p.admin, &host, body).await;
        assert!(status == 400 || status == 422, "{status} {v}");
        assert!(
            v["errors"][0]["field"] == field,
            "expected {field} named: {v}"
        );
    }

    // A node whose agent has no SSH target says how to give it one.
    let plain = p.agent("cpu-1", &[]).await;
    let (status, v) = p.host_ssh(&p.admin, &plain, json!({"command": "id"})).await;
    assert_eq!(status, 409, "{v}");
    assert!(
        detail(&v).contains("no host SSH target configured; start the agent with --host-ssh"),
        "{v}"
    );

    // Everything is on the node's timeline, said in words.
    let events = p
        .api
        .get(&format!(
            "/events?aggregate_type=node&aggregate_id={host}&limit=1000"
        ))
        .await;
    let summaries: Vec<String> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event_type"].as_str().unwrap().starts_with("NodeHostSsh"))
        .map(|e| {
            format!(
                "{} {}",
                e["event_type"].as_str().unwrap(),
                e["summary"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(summaries.len(), 8, "{summaries:#?}");
    assert_eq!(
        summaries[0],
        "NodeHostSshRequested user:admin ran on the host of node gpu-3 over SSH: `echo hello; id -un` (time limit 30 s)"
    );
    assert!(
        summaries[1].starts_with("NodeHostSshFinished host SSH on node gpu-3 exited 0 in "),
        "{summaries:#?}"
    );
    assert!(
        summaries[5].contains("timed out after 2."),
        "{summaries:#?}"
    );
    assert!(
        summaries[7].ends_with("64.0 KiB output, truncated"),
        "{summaries:#?}"
    );

    // For anybody but an admin, none of it is there: not the commands,
    // their summaries nor what they printed, in the log or the timeline.
    for path in [
        format!("/events?aggregate_type=node&aggregate_id={host}&limit=1000"),
        format!("/timeline?node={host}&limit=500"),
        format!("/nodes/{host}"),
    ] {
        let (status, v) = p.call(&frank, reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        let shown = v.to_string();
        for hidden in ["HostSsh", "echo hello", "id -un", "over SSH", "oops"] {
            assert!(!shown.contains(hidden), "{hidden:?} in {path}: {shown}");
        }
    }
    drop(sshd);
}
