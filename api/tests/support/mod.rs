//! What the API tests share: the router served over real HTTP on port 0
//! against a fresh database (and, when asked, the embedded object store),
//! an admin, and calls whose answers are checked the way a client reads
//! them.

#![allow(dead_code, reason = "each test binary uses its own part of this")]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use api::{AppState, Config};
use objects::embedded::{fresh_credentials, Embedded};
use objects::ObjectStore;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use store::Store;

/// A full commit id the tests' tasks name.
pub const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// The object store of a test server: how long its URLs live and the part
/// size of multipart uploads.
#[derive(Debug, Clone, Copy)]
pub struct Objects {
    /// How long presigned URLs live.
    pub ttl: Duration,
    /// The part size the API hands out for uploads.
    pub part: u64,
}

/// A running API on its own database.
pub struct App {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// A client that does not follow redirects, so a test sees them.
    pub client: reqwest::Client,
    /// The test's database.
    pub pool: PgPool,
    /// The event log on it.
    pub store: Store,
    /// The served state, shared with the router.
    pub state: AppState,
    /// The bootstrapped admin's token.
    pub admin: String,
    /// Where the admin's token was written.
    pub token_file: PathBuf,
    /// The embedded object store, when started with one.
    pub objects: Option<ObjectStore>,
    /// Where the embedded store keeps its files.
    pub objects_root: PathBuf,
    /// The temporary directory of the token file and the store's files.
    pub dir: tempfile::TempDir,
}

/// What one call answered.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body: JSON when the server said it is JSON, a string otherwise,
    /// `Null` when empty.
    pub body: Value,
}

impl Answer {
    /// The `field`s of the error envelope.
    pub fn fields(&self) -> Vec<String> {
        self.errors()
            .iter()
            .filter_map(|e| e["field"].as_str().map(str::to_string))
            .collect()
    }

    /// The error envelope's entries; panics when the body is not one.
    #[track_caller]
    pub fn errors(&self) -> Vec<Value> {
        self.body["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("not an error envelope: {:?}", self.body))
            .clone()
    }

    /// Every entry's `detail`, joined.
    pub fn details(&self) -> String {
        self.errors()
            .iter()
            .map(|e| e["detail"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The first entry's `detail`.
    pub fn detail(&self) -> String {
        self.body["errors"][0]["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The `Retry-After` header in seconds; panics without one.
    #[track_caller]
    pub fn retry_after(&self) -> u64 {
        self.headers["retry-after"]
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Retry-After in seconds: {:?}", self.headers))
    }

    /// The body, after checking the status is `status`.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected answer: {:?}",
            self.body
        );
        &self.body
    }

    /// Checks the status is `status` and the error names `field`.
    #[track_caller]
    pub fn expect_error(&self, status: u16, field: &str) {
        self.expect(status);
        assert!(
            self.fields().iter().any(|f| f == field),
            "expected field {field:?} in {:?}",
            self.body
        );
    }

    /// The status and body, for tests that compare both.
    pub fn pair(self) -> (StatusCode, Value) {
        (self.status, self.body)
    }
}

impl App {
    /// The API on `config` over a fresh database, without an object store.
    pub async fn start(config: Config) -> App {
        let db = testkit::fresh_db().await;
        App::start_on(db.pool, config, None).await
    }

    /// The API on `config` over `pool`, with the embedded object store when
    /// `objects` says how. Served with connection information, as
    /// `unidesk serve` serves it.
    pub async fn start_on(pool: PgPool, config: Config, objects: Option<Objects>) -> App {
        let store = Store::new(pool.clone());
        let dir = tempfile::tempdir().expect("a temporary directory");
        let token_file = dir.path().join("secrets").join("admin.token");
        let admin = api::bootstrap_admin(&store, &token_file)
            .await
            .expect("bootstrap admin");
        let objects_root = dir.path().join("objects");
        let mut state = AppState::new(store.clone(), config)
            .with_secrets_key(Some(store::secrets::SecretsKey::from_bytes(rand::random())));
        let mut object_store = None;
        if let Some(o) = objects {
            let (access, secret) = fresh_credentials();
            let embedded = Embedded::new(&objects_root, "unidesk", &access, secret)
                .expect("the embedded object store");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind port 0");
            let endpoint = format!("http://{}", listener.local_addr().expect("local address"));
            let store = ObjectStore::new(&embedded.client_config(&endpoint, o.ttl))
                .expect("a client of the object store");
            tokio::spawn(embedded.run(listener, std::future::pending()));
            state = state.with_objects(Some(store.clone()), o.part);
            object_store = Some(store);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("local address");
        let app = api::router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        App {
            base: format!("http://{addr}"),
            client: client(),
            pool,
            store,
            state,
            admin,
            token_file,
            objects: object_store,
            objects_root,
            dir,
        }
    }

    /// Sends `method path` (a path from the root, such as `/api/v1/tasks`)
    /// with `token` and a JSON `body`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    /// Sends `request` and reads its answer.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("the request is answered");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("a body");
        let json = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let body = if text.is_empty() {
            Value::Null
        } else if json {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: not JSON: {text:?}"))
        } else {
            Value::String(text)
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    /// `GET path` with `token`.
    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, Some(token), None).await
    }

    /// `POST path` with `token` and `body`.
    pub async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// `PUT path` with `token` and `body`.
    pub async fn put(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call(Method::PUT, path, Some(token), Some(body)).await
    }

    /// `POST path` with `token` and no body.
    pub async fn post_empty(&self, path: &str, token: &str) -> Answer {
        self.call(Method::POST, path, Some(token), None).await
    }

    /// `DELETE path` with `token`.
    pub async fn delete(&self, path: &str, token: &str) -> Answer {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    /// How many events the log holds.
    pub async fn events(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .expect("count events")
    }

    /// Waits until every committed event is visible to outbox readers:
    /// readers see nothing newer than the oldest transaction still open on
    /// the server, and other tests share the server.
    pub async fn settle(&self) {
        let target = store::outbox::committed_head(&self.pool)
            .await
            .expect("committed head");
        testkit::eventually(
            "every committed event visible to outbox readers",
            Duration::from_secs(30),
            || async {
                let head = store::outbox::head(&self.pool).await.expect("head");
                (head >= target).then_some(())
            },
        )
        .await;
    }

    /// Lets the read models catch up with everything committed so far.
    pub async fn catch_up(&self) {
        projections::Projector::new(self.pool.clone())
            .catch_up()
            .await
            .expect("projections catch up");
    }

    /// Creates user `name` and returns a token for them.
    pub async fn user(&self, name: &str) -> String {
        self.post("/api/v1/users", &self.admin, json!({ "name": name }))
            .await
            .expect(201);
        self.token(name, json!({ "label": "test" })).await.0
    }

    /// Issues a token for `name` as the admin: (token, token id).
    pub async fn token(&self, name: &str, body: Value) -> (String, String) {
        let issued = self
            .post(&format!("/api/v1/users/{name}/tokens"), &self.admin, body)
            .await;
        let body = issued.expect(201);
        (
            body["token"].as_str().expect("a token").to_string(),
            body["token_id"].as_str().expect("a token id").to_string(),
        )
    }

    /// Creates project `name` as the holder of `token`; its id.
    pub async fn project_as(&self, token: &str, name: &str) -> String {
        let answer = self
            .post(
                "/api/v1/projects",
                token,
                json!({ "name": name, "description": "for tests" }),
            )
            .await;
        answer.expect(201)["id"]
            .as_str()
            .expect("an id")
            .to_string()
    }

    /// Makes `user` a `role` of `project`, as the admin.
    pub async fn add_member(&self, project: &str, user: &str, role: &str) {
        self.post(
            &format!("/api/v1/projects/{project}/members"),
            &self.admin,
            json!({ "user": user, "role": role }),
        )
        .await
        .expect(200);
    }

    /// Submits task `body` as the holder of `token`; its id.
    pub async fn submit_as(&self, token: &str, body: Value) -> String {
        let answer = self.post("/api/v1/tasks", token, body).await;
        answer.expect(201)["id"]
            .as_str()
            .expect("an id")
            .to_string()
    }
}

/// A client that does not follow redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client")
}

/// The smallest valid task of `project`.
pub fn minimal_task(project: &str) -> Value {
    json!({
        "project_id": project,
        "code_repo_url": "https://git.example.com/lab/code.git",
        "code_commit_id": SHA,
        "env_repo_url": "https://git.example.com/lab/env.git",
        "env_commit_id": SHA,
        "dockerfile_path": "Dockerfile",
    })
}

/// The hex SHA-256 of `data`.
pub fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `PUT`s `body` to a presigned `url` with the `headers` it was handed out
/// with.
pub async fn put(url: &str, headers: &Value, body: Vec<u8>) -> reqwest::Response {
    let mut req = reqwest::Client::new().put(url).body(body);
    if let Some(h) = headers.as_object() {
        for (k, v) in h {
            req = req.header(k, v.as_str().expect("a header value"));
        }
    }
    req.send().await.expect("the store answers")
}
