//! `/metrics` of real server processes after real work: one process runs
//! the API and the ingress (with a private metrics listener), another only
//! the projector and the scheduler, which has no API and still answers
//! `/metrics`. A real agent runs a real task in Docker; then every scrape
//! says what happened, names nothing it must not, and passes Prometheus's
//! own checker (`promtool check metrics`).

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::json;
use testkit::process::ServerProcess;

use support::{base_image, repo, spawn_agent, task_in, Agents, EnvImage, BASE, PATIENCE};

/// One sample of a scrape: its name, labels and value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of `text` in the text format (labels without commas or
/// quotes inside their values, as all of ours are).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().unwrap(),
            }
        })
        .collect()
}

/// The value of the sample `name` with exactly `labels`, if there is one.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    samples(text)
        .into_iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

/// `GET url` as a scraper does: no token.
async fn scrape(url: &str) -> String {
    let answer = reqwest::get(url).await.unwrap();
    assert_eq!(answer.status(), 200, "{url}");
    let kind = answer.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(kind, "text/plain; version=0.0.4; charset=utf-8", "{url}");
    answer.text().await.unwrap()
}

/// Waits until a scrape of `url` satisfies `check`, and returns it.
async fn scrape_until(url: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    testkit::eventually(what, PATIENCE, || async {
        let text = scrape(url).await;
        check(&text).then_some(text)
    })
    .await
}

/// Fails unless `promtool check metrics` finds nothing wrong with `text`.
fn promtool_accepts(text: &str, what: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool not found ({e}): install Debian's prometheus package (ops/test.sh does)"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the metrics of {what} ({}):\n{}{}\n--- the text:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

async fn serve(db_url: &str, flags: &[&str]) -> ServerProcess {
    support::serve(db_url, flags).await
}

#[tokio::test]
async fn every_role_serves_metrics_that_say_what_happened_and_promtool_accepts() {
    base_image();
    let db = testkit::fresh_db().await;
    let private_port = testkit::free_port();
    let private = format!("http://127.0.0.1:{private_port}/metrics");
    let front = serve(
        &db.url,
        &[
            "--roles",
            "api,ingress",
            "--allow-file-urls",
            "--heartbeat-s",
            "1",
            "--poll-ms",
            "100",
            "--metrics-listen",
            &format!("127.0.0.1:{private_port}"),
        ],
    )
    .await;
    // No API here: its --listen answers only the probes and /metrics
    // (the launch waits for its /readyz there).
    let back = serve(
        &db.url,
        &["--roles", "projector,scheduler", "--poll-ms", "100"],
    )
    .await;
    let api = front.api();
    let front_metrics = front.url("/metrics");
    let back_metrics = back.url("/metrics");
    assert_eq!(
        reqwest::get(back.url("/api/v1/projects"))
            .await
            .unwrap()
            .status(),
        404,
        "a process without the API serves no API"
    );

    // Real work: a project, a node with a real agent, a task that prints
    // and succeeds.
    let dir = tempfile::tempdir().unwrap();
    let output = "hello from a metered task\n";
    let code = repo(
        dir.path(),
        "code",
        &[(
            "run.sh",
            &format!("printf '{}'\n", output.replace('\n', "\\n")),
        )],
    );
    let env = repo(
        dir.path(),
        "env",
        &[("Dockerfile", &format!("FROM {BASE}\n"))],
    );
    let _image = EnvImage::of(&env, "Dockerfile");
    let project = api.post("/projects", json!({"name": "metered"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let node = api.post("/nodes", json!({"name": "gauge-worker"})).await;
    let node_id = node["id"].as_str().unwrap().to_string();
    let _agents = Agents(vec![spawn_agent(
        &front.ws(),
        node["token"].as_str().unwrap(),
        &dir.path().join("agent"),
        &["--cpus", "2", "--memory-mb", "1024", "--no-gpus"],
    )]);
    support::node_online(&api, &node_id).await;
    let task = api
        .post(
            "/tasks",
            json!({
                "project_id": project,
                "code_repo_url": code.0, "code_commit_id": code.1,
                "env_repo_url": env.0, "env_commit_id": env.1,
                "dockerfile_path": "Dockerfile",
                "command": ["sh", "run.sh"],
                "resources": {"cpus": 1, "memory_mb": 256}
            }),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let done = task_in(&api, &task, &["succeeded", "failed", "cancelled"]).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let log = api.get(&format!("/tasks/{task}/logs")).await;
    assert!(
        log.to_string().contains("hello from a metered task"),
        "{log}"
    );

    // The API and ingress process: what its agent did, what its API
    // answered, and the platform as the read models have it.
    // The agent stays connected and beats its heart every second.
    let text = scrape_until(
        &front_metrics,
        "the front to count the task as succeeded, and heartbeats",
        |t| {
            value(t, "unidesk_tasks", &[("state", "succeeded")]) == Some(1.0)
                && value(t, "unidesk_ingress_log_bytes_total", &[])
                    .is_some_and(|b| b >= output.len() as f64)
                && value(t, "unidesk_ingress_heartbeats_total", &[]).is_some_and(|n| n >= 2.0)
        },
    )
    .await;
    assert_eq!(
        value(&text, "unidesk_ingress_agents_connected", &[]),
        Some(1.0)
    );
    assert!(
        value(&text, "unidesk_ingress_heartbeats_late_total", &[]).is_some(),
        "{text}"
    );
    // Accepted, preparing (one or more), running, succeeded.
    assert!(
        value(
            &text,
            "unidesk_ingress_reports_total",
            &[("kind", "status"), ("outcome", "stored")]
        )
        .unwrap()
            >= 4.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "unidesk_tasks", &[("state", "queued")]),
        Some(0.0)
    );
    assert_eq!(value(&text, "unidesk_queue_depth", &[]), Some(0.0));
    assert_eq!(value(&text, "unidesk_database_up", &[]), Some(1.0));
    assert!(value(&text, "unidesk_database_bytes", &[]).unwrap() > 0.0);
    assert!(value(&text, "unidesk_task_output_bytes", &[]).unwrap() >= output.len() as f64);
    for consumer in ["tasks", "nodes", "projects", "users", "timeline", "ingress"] {
        assert!(
            value(
                &text,
                "unidesk_outbox_lag_events",
                &[("consumer", consumer)]
            )
            .is_some(),
            "no lag of {consumer} in\n{text}"
        );
        assert_eq!(
            value(&text, "unidesk_dead_letters", &[("consumer", consumer)]),
            Some(0.0),
            "{consumer}"
        );
    }
    assert_eq!(value(&text, "unidesk_degraded", &[]), Some(0.0));
    // HTTP by route template, never by path.
    assert_eq!(
        value(
            &text,
            "unidesk_http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/api/v1/tasks"),
                ("status", "201")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        value(
            &text,
            "unidesk_http_requests_total",
            &[
                ("method", "GET"),
                ("route", "/api/v1/tasks/{id}"),
                ("status", "200")
            ]
        )
        .unwrap()
            >= 1.0,
        "{text}"
    );
    assert!(
        value(
            &text,
            "unidesk_http_request_duration_seconds_count",
            &[("method", "POST"), ("route", "/api/v1/tasks")]
        ) == Some(1.0),
        "{text}"
    );
    assert!(text.contains("route=\"/agent/v1/ws\""), "{text}");
    // Nothing that names an aggregate, a node or a person; on this public
    // listener not even the project.
    for secret in [
        task.as_str(),
        node_id.as_str(),
        project.as_str(),
        "gauge-worker",
        "metered",
        "admin",
        front.token(),
    ] {
        assert!(!text.contains(secret), "{secret} in\n{text}");
    }
    promtool_accepts(&text, "the API and ingress process");

    // Its private listener adds the tasks per project.
    let text = scrape(&private).await;
    assert_eq!(
        value(
            &text,
            "unidesk_project_tasks",
            &[("project", "metered"), ("state", "succeeded")]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains(&task) && !text.contains("gauge-worker"));
    promtool_accepts(&text, "the private metrics listener");

    // The projector and scheduler process: the task's latencies, observed
    // by its projector or its scheduler (whichever applied the events to
    // the tasks read model), and the same platform figures.
    let text = scrape_until(&back_metrics, "the back to observe both latencies", |t| {
        value(t, "unidesk_task_assign_to_running_seconds_count", &[]) == Some(1.0)
    })
    .await;
    assert_eq!(
        value(&text, "unidesk_task_submit_to_assign_seconds_count", &[]),
        Some(1.0)
    );
    let submit_to_assign = value(&text, "unidesk_task_submit_to_assign_seconds_sum", &[]).unwrap();
    let assign_to_running =
        value(&text, "unidesk_task_assign_to_running_seconds_sum", &[]).unwrap();
    // Preparing builds an image and fetches code: running comes after a
    // moment, and both within the test's patience.
    assert!(assign_to_running > 0.0, "{text}");
    assert!(
        (0.0..PATIENCE.as_secs_f64()).contains(&submit_to_assign)
            && assign_to_running < PATIENCE.as_secs_f64(),
        "{text}"
    );
    assert_eq!(
        value(&text, "unidesk_tasks", &[("state", "succeeded")]),
        Some(1.0)
    );
    assert!(value(&text, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
    // It runs no ingress and no API.
    assert!(!text.contains("unidesk_ingress_"), "{text}");
    assert!(!text.contains("unidesk_rate_limited_total"), "{text}");
    assert!(value(
        &text,
        "unidesk_outbox_lag_events",
        &[("consumer", "ingress")]
    )
    .is_none());
    promtool_accepts(&text, "the projector and scheduler process");
}

#[test]
fn promtool_refuses_text_that_is_not_the_format() {
    // The checker itself can fail: a test that trusts it must know.
    let result = std::panic::catch_unwind(|| {
        promtool_accepts(
            "# TYPE x_total counter\nx_total{a=\"b\"} not-a-number\n",
            "a broken text",
        );
    });
    assert!(result.is_err());
}
