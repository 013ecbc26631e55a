//! Clients can retry safely, and what is accepted can be delivered, over
//! real HTTP against a real PostgreSQL: `Idempotency-Key` on submissions
//! and cancels (one task however often and however concurrently a request
//! is sent), a 503 with `Retry-After` within seconds while the database is
//! down (a private cluster stopped under the running API), and a
//! specification whose command to its node could not fit in one frame
//! refused at submission.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::time::{Duration, Instant};

use api::{AppState, Config};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use store::Store;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// A running API on its own database.
struct App {
    base: String,
    client: reqwest::Client,
    pool: PgPool,
    admin: String,
    _dir: tempfile::TempDir,
}

/// What one call answered, its body as sent.
#[derive(Debug, Clone)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    bytes: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or(Value::Null)
    }

    #[track_caller]
    fn expect(&self, status: u16) -> Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "{}",
            String::from_utf8_lossy(&self.bytes)
        );
        self.json()
    }

    fn details(&self) -> String {
        self.json()["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| e["detail"].as_str().unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default()
    }

    fn fields(&self) -> Vec<String> {
        self.json()["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .filter_map(|e| e["field"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
}

/// Serves the API on `pool` (already migrated); returns it with an admin
/// token.
async fn serve(pool: PgPool) -> App {
    let store = Store::new(pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let admin = api::bootstrap_admin(&store, &dir.path().join("admin.token"))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = api::router(AppState::new(store, Config::default()));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    App {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        pool,
        admin,
        _dir: dir,
    }
}

async fn start() -> App {
    serve(testkit::fresh_db().await.pool).await
}

impl App {
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        key: Option<&[u8]>,
        body: Option<&str>,
    ) -> Answer {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", HeaderValue::from_bytes(key).unwrap());
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.unwrap();
        Answer {
            status: response.status(),
            headers: response.headers().clone(),
            bytes: response.bytes().await.unwrap().to_vec(),
        }
    }

    async fn submit(&self, key: Option<&str>, body: &Value) -> Answer {
        self.send(
            Method::POST,
            "/api/v1/tasks",
            &self.admin,
            key.map(str::as_bytes),
            Some(&body.to_string()),
        )
        .await
    }

    async fn cancel(&self, task: &str, key: Option<&str>) -> Answer {
        self.send(
            Method::POST,
            &format!("/api/v1/tasks/{task}/cancel"),
            &self.admin,
            key.map(str::as_bytes),
            None,
        )
        .await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.send(Method::POST, path, token, None, Some(&body.to_string()))
            .await
    }

    async fn project(&self) -> String {
        let name = format!("p{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        self.post("/api/v1/projects", &self.admin, json!({ "name": name }))
            .await
            .expect(201)["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A token of a new user who is a member of `project`.
    async fn member(&self, project: &str, name: &str) -> String {
        self.post("/api/v1/users", &self.admin, json!({ "name": name }))
            .await
            .expect(201);
        self.post(
            &format!("/api/v1/projects/{project}/members"),
            &self.admin,
            json!({ "user": name, "role": "member" }),
        )
        .await
        .expect(200);
        self.post(
            &format!("/api/v1/users/{name}/tokens"),
            &self.admin,
            json!({ "label": "test" }),
        )
        .await
        .expect(201)["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// How many tasks were ever submitted.
    async fn submitted(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'TaskSubmitted'")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn events(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

fn task_body(project: &str) -> Value {
    json!({
        "project_id": project,
        "code_repo_url": "https://git.example.com/lab/code.git",
        "code_commit_id": SHA,
        "env_repo_url": "https://git.example.com/lab/env.git",
        "env_commit_id": SHA,
        "dockerfile_path": "Dockerfile",
        "command": ["python", "train.py"],
        "env": {"EPOCHS": "3"},
        "resources": {"cpus": 1, "memory_mb": 512, "gpus": 0},
        "timeout_s": 3600
    })
}

/// `body` with its fields in reverse order and spaces around everything.
fn written_otherwise(body: &Value) -> String {
    let fields: Vec<String> = body
        .as_object()
        .unwrap()
        .iter()
        .rev()
        .map(|(k, v)| format!("\n  {} : {}", Value::String(k.clone()), v))
        .collect();
    format!("{{{}\n}}", fields.join(" ,"))
}

// ------------------------------------------------------------ idempotency

#[tokio::test]
async fn a_submission_sent_again_with_its_key_creates_one_task_and_gets_the_first_answer() {
    let app = start().await;
    let project = app.project().await;
    let body = task_body(&project);

    let first = app.submit(Some("retry-1"), &body).await;
    let task = first.expect(201);
    assert!(!first.replayed());
    let again = app.submit(Some("retry-1"), &body).await;
    again.expect(201);
    assert!(again.replayed(), "{:?}", again.headers);
    assert_eq!(again.bytes, first.bytes, "the same body, byte for byte");
    assert_eq!(again.headers["location"], first.headers["location"]);
    assert_eq!(
        first.headers["location"],
        format!("/api/v1/tasks/{}", task["id"].as_str().unwrap()).as_str()
    );

    // The same request written otherwise (keys in another order, spaces)
    // is the same request.
    let reordered = written_otherwise(&body);
    let rewritten = app
        .send(
            Method::POST,
            "/api/v1/tasks",
            &app.admin,
            Some(b"retry-1"),
            Some(&reordered),
        )
        .await;
    rewritten.expect(201);
    assert!(rewritten.replayed());
    assert_eq!(rewritten.bytes, first.bytes);
    assert_eq!(app.submitted().await, 1);

    // Without a key nothing changes: every request is a new task.
    let a = app.submit(None, &body).await;
    let b = app.submit(None, &body).await;
    assert_ne!(a.expect(201)["id"], b.expect(201)["id"]);
    assert!(!a.replayed() && !b.replayed());
    assert_eq!(app.submitted().await, 3);
}

#[tokio::test]
async fn a_key_sent_again_with_another_request_is_refused_and_changes_nothing() {
    let app = start().await;
    let project = app.project().await;
    let body = task_body(&project);
    let task = app.submit(Some("k"), &body).await.expect(201);
    let events = app.events().await;

    let mut other = body.clone();
    other["command"] = json!(["python", "eval.py"]);
    let refused = app.submit(Some("k"), &other).await;
    refused.expect(409);
    assert_eq!(refused.fields(), ["Idempotency-Key"]);
    assert!(
        refused.details().contains("another request"),
        "{}",
        refused.details()
    );
    // The same key on another path is another request too.
    let elsewhere = app.cancel(task["id"].as_str().unwrap(), Some("k")).await;
    elsewhere.expect(409);
    assert_eq!(elsewhere.fields(), ["Idempotency-Key"]);
    assert_eq!(app.events().await, events, "nothing appended");

    // Keys are the user's own: another user's "k" is another key.
    let mia = app.member(&project, "mia").await;
    let theirs = app
        .send(
            Method::POST,
            "/api/v1/tasks",
            &mia,
            Some(b"k"),
            Some(&other.to_string()),
        )
        .await;
    assert_ne!(theirs.expect(201)["id"], task["id"]);
    assert!(!theirs.replayed());
    assert_eq!(app.submitted().await, 2);
}

#[tokio::test]
async fn twenty_concurrent_submissions_with_one_key_create_one_task() {
    let app = start().await;
    let project = app.project().await;
    let body = task_body(&project).to_string();
    let sends = (0..20).map(|_| {
        let request = app
            .client
            .post(format!("{}/api/v1/tasks", app.base))
            .bearer_auth(&app.admin)
            .header("Idempotency-Key", "one-key")
            .header("content-type", "application/json")
            .body(body.clone());
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.bytes().await.unwrap())
        }
    });
    let answers = futures::future::join_all(sends).await;
    for (status, bytes) in &answers {
        assert_eq!(*status, StatusCode::CREATED, "{bytes:?}");
        assert_eq!(bytes, &answers[0].1, "every answer is the first one");
    }
    assert_eq!(app.submitted().await, 1);
}

#[tokio::test]
async fn a_cancel_sent_again_with_its_key_gets_its_first_answer_after_the_task_ended() {
    let app = start().await;
    let project = app.project().await;
    let task = app.submit(None, &task_body(&project)).await.expect(201);
    let id = task["id"].as_str().unwrap();

    let first = app.cancel(id, Some("stop-it")).await;
    assert_eq!(first.expect(200)["state"], "cancelled");
    let events = app.events().await;
    let again = app.cancel(id, Some("stop-it")).await;
    again.expect(200);
    assert!(again.replayed());
    assert_eq!(again.bytes, first.bytes);
    assert_eq!(app.events().await, events);
    // Without the key the same request says the task has ended.
    app.cancel(id, None).await.expect(409);
}

#[tokio::test]
async fn malformed_keys_are_refused_with_422_naming_the_header() {
    let app = start().await;
    let project = app.project().await;
    let body = task_body(&project).to_string();
    let long = "k".repeat(256);
    for key in [long.as_bytes(), b"", "clé".as_bytes(), b"tab\tinside"] {
        let answer = app
            .send(
                Method::POST,
                "/api/v1/tasks",
                &app.admin,
                Some(key),
                Some(&body),
            )
            .await;
        answer.expect(422);
        assert_eq!(answer.fields(), ["Idempotency-Key"], "{key:?}");
        assert!(answer.details().contains("255 printable ASCII"));
    }
    let longest = "k".repeat(255);
    app.submit(Some(&longest), &task_body(&project))
        .await
        .expect(201);
    assert_eq!(app.submitted().await, 1);
}

#[tokio::test]
async fn a_refused_request_leaves_its_key_unused() {
    let app = start().await;
    let project = app.project().await;
    let mut bad = task_body(&project);
    bad["code_commit_id"] = json!("not-a-commit");
    let refused = app.submit(Some("fix-and-retry"), &bad).await;
    refused.expect(422);
    assert!(!refused.replayed());
    // Corrected, the request goes through under the same key.
    let fixed = app
        .submit(Some("fix-and-retry"), &task_body(&project))
        .await;
    fixed.expect(201);
    assert!(!fixed.replayed());
    assert_eq!(app.submitted().await, 1);
}

#[tokio::test]
async fn a_key_whose_request_died_after_submitting_is_taken_over_without_a_second_task() {
    let app = start().await;
    let project = app.project().await;
    let body = task_body(&project);
    let first = app.submit(Some("crash"), &body).await.expect(201);
    // As if the request had died right after the task was submitted,
    // before its answer was stored, a minute ago.
    sqlx::query(
        "UPDATE idempotency_keys SET status = NULL, body = NULL, location = NULL, \
         claim = gen_random_uuid(), claimed_at = now() - interval '1 minute'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let retry = app.submit(Some("crash"), &body).await;
    assert_eq!(retry.expect(201)["id"], first["id"]);
    assert_eq!(app.submitted().await, 1);
    // Its answer is stored now.
    assert!(app.submit(Some("crash"), &body).await.replayed());
}

#[tokio::test]
async fn keys_expire_after_a_day_and_expired_ones_are_deleted() {
    let app = start().await;
    let project = app.project().await;
    let body = task_body(&project);
    let first = app.submit(Some("daily"), &body).await.expect(201);
    app.submit(Some("forgotten"), &body).await.expect(201);
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
        .execute(&app.pool)
        .await
        .unwrap();

    // A day later the key is free: the same request is a new task.
    let later = app.submit(Some("daily"), &body).await;
    assert!(!later.replayed());
    assert_ne!(later.expect(201)["id"], first["id"]);
    assert_eq!(app.submitted().await, 3);
    let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM idempotency_keys")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(keys, ["daily"], "the expired key was deleted");
}

#[tokio::test]
async fn the_openapi_document_describes_the_key_and_the_replayed_header() {
    let app = start().await;
    let doc = app
        .send(Method::GET, "/api/v1/openapi.json", &app.admin, None, None)
        .await
        .expect(200);
    for (path, success) in [
        ("/api/v1/tasks", "201"),
        ("/api/v1/tasks/{id}/cancel", "200"),
    ] {
        let operation = &doc["paths"][path]["post"];
        let key = operation["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "Idempotency-Key")
            .unwrap_or_else(|| panic!("{path} documents no Idempotency-Key"));
        assert_eq!(key["in"], "header");
        assert_eq!(key["schema"]["maxLength"], 255);
        assert!(operation["responses"][success]["headers"]["Idempotent-Replayed"].is_object());
        assert!(operation["responses"]["422"].is_object());
        assert!(operation["responses"]["503"]["headers"]["Retry-After"].is_object());
    }
}

// ------------------------------------------------------------ outage

#[tokio::test]
async fn while_the_database_is_down_requests_get_503_with_retry_after_within_seconds() {
    let cluster = pgcluster::LocalCluster::start_ephemeral().await.unwrap();
    let pool = store::pool_options().connect(&cluster.url()).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let app = serve(pool).await;
    let project = app.project().await;
    let body = task_body(&project);
    app.submit(None, &body).await.expect(201);
    let url = cluster.url();
    let password = url
        .split_once("://unidesk:")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(p, _)| p.to_string())
        .unwrap();
    let port = cluster.port().to_string();

    cluster.stop().await.unwrap();

    let requests: [(&str, Method, &str, Option<String>); 4] = [
        ("list tasks", Method::GET, "/api/v1/tasks", None),
        (
            "submit",
            Method::POST,
            "/api/v1/tasks",
            Some(body.to_string()),
        ),
        (
            "submit with a key",
            Method::POST,
            "/api/v1/tasks",
            Some(body.to_string()),
        ),
        ("readiness", Method::GET, "/readyz", None),
    ];
    for (what, method, path, body) in requests {
        let key = (what == "submit with a key").then_some(b"outage".as_slice());
        let started = Instant::now();
        let answer = app
            .send(method, path, &app.admin, key, body.as_deref())
            .await;
        let took = started.elapsed();
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{what}: {}",
            String::from_utf8_lossy(&answer.bytes)
        );
        assert!(
            took < Duration::from_secs(3),
            "{what} took {took:?} to answer"
        );
        let retry_after: u64 = answer.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 1, "{what}: Retry-After {retry_after}");
        let details = answer.details();
        assert!(details.contains("database"), "{what}: {details}");
        for secret in [&password, &port] {
            assert!(!details.contains(secret.as_str()), "{what}: {details}");
        }
    }
    // Liveness does not depend on the database.
    app.send(Method::GET, "/healthz", &app.admin, None, None)
        .await
        .expect(200);
}

// ------------------------------------------------------------ frames

/// `n` environment variables of 32 KiB each, every one within its limit.
fn big_env(n: usize) -> Value {
    let value = "x".repeat(domain::spec::limits::MAX_ENV_VALUE_BYTES);
    Value::Object(
        (0..n)
            .map(|i| (format!("VAR_{i:03}"), Value::String(value.clone())))
            .collect(),
    )
}

#[tokio::test]
async fn a_specification_whose_command_cannot_fit_a_frame_is_refused_naming_size_and_limit() {
    let app = start().await;
    let project = app.project().await;
    let mut body = task_body(&project);
    body["env"] = big_env(20);
    let sent = body.to_string();
    assert!(sent.len() > 640 * 1000 && sent.len() < api::DEFAULT_BODY_LIMIT);
    let events = app.events().await;

    let refused = app.submit(Some("big"), &body).await;
    refused.expect(422);
    // The size is the one the ingress would send: its own conversion.
    let draft: domain::spec::TaskSpecDraft = serde_json::from_value(body.clone()).unwrap();
    let spec = draft.validate(Default::default()).unwrap();
    let measured = ingress::check_run_task_fits(uuid::Uuid::now_v7(), &spec).unwrap_err();
    assert_eq!(measured.limit, protocol_frame_limit());
    let details = refused.details();
    assert!(
        details.contains(&measured.bytes.to_string()) && details.contains("262144"),
        "{details}"
    );
    assert_eq!(app.events().await, events, "nothing appended");

    // A large specification that fits is accepted and fits.
    body["env"] = big_env(7);
    let accepted = app.submit(None, &body).await;
    accepted.expect(201);
    let draft: domain::spec::TaskSpecDraft = serde_json::from_value(body).unwrap();
    let spec = draft.validate(Default::default()).unwrap();
    assert!(ingress::check_run_task_fits(uuid::Uuid::now_v7(), &spec).is_ok());
}

/// The frame limit of the agent protocol, 256 KiB.
fn protocol_frame_limit() -> usize {
    256 * 1024
}
