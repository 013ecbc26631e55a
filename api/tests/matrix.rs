//! Every route against every kind of caller, over real HTTP against a real
//! PostgreSQL and the embedded object store.
//!
//! [`TABLE`] holds one row per route the server serves: the routes of the
//! OpenAPI document the router itself serves, plus the web view's, which
//! the document leaves out. A route added to the router without a row, or
//! a row left behind by a route that is gone, fails
//! `the_table_names_exactly_the_routes_the_server_serves`.
//!
//! Each row says what each of ten callers must get: an admin; the
//! maintainer, a member and a viewer of project P; a stranger who
//! maintains only project Q; a node's token; no token; a revoked and an
//! expired admin token; and the admin's token with a made-up secret. Path
//! parameters are real resources of P, bodies are valid, and a route that
//! changes what it acts on gets a fresh resource for every call, so that
//! one caller's success never changes the next caller's answer. Besides
//! the status, no answer to anybody but the admin may hold anything of the
//! project the caller is not in: ids and names of the project, its tasks,
//! artifacts, objects and members; and no answer to anybody holds a
//! caller's token.
//!
//! `another_project_is_as_absent_as_what_does_not_exist_even_through_the_node_both_share`
//! sends Q's ids to P's users and gets what ids of nothing get.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use api::Config;
use chrono::Utc;
use domain::task::{Task, TaskCommand};
use domain::Actor;
use objects::ObjectStore;
use serde_json::{json, Value};
use store::Store;
use uuid::Uuid;

mod support;

use support::{minimal_task as task_body, put, sha, App, Objects, SHA};

/// The part size of uploads: every object here fits in one PUT.
const PART: u64 = 5 * 1024 * 1024;

/// The kinds of caller, in the order of the columns of [`TABLE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// A platform admin.
    Admin,
    /// The maintainer of project P.
    Maintainer,
    /// A member of P.
    Member,
    /// A viewer of P.
    Viewer,
    /// The maintainer of project Q, in no role in P.
    Stranger,
    /// A node's token, valid for the agents' WebSocket.
    Node,
    /// No Authorization header.
    Anonymous,
    /// An admin's token that was revoked.
    Revoked,
    /// An admin's token that expired.
    Expired,
    /// An admin's user name and token id with a made-up secret.
    Forged,
}

impl Who {
    /// What a 401 must say for this caller, so that each column tries what
    /// it says (a node token that is valid, a token that expired rather
    /// than one that is unknown).
    fn refused_because(self) -> Option<&'static str> {
        match self {
            Who::Node => Some("node tokens are only valid for agents"),
            Who::Anonymous => Some("Authorization: Bearer"),
            Who::Revoked => Some("the bearer token was revoked"),
            Who::Expired => Some("the token expired"),
            Who::Forged => Some("the bearer token is invalid or was revoked"),
            _ => None,
        }
    }
}

const CALLERS: [Who; 10] = [
    Who::Admin,
    Who::Maintainer,
    Who::Member,
    Who::Viewer,
    Who::Stranger,
    Who::Node,
    Who::Anonymous,
    Who::Revoked,
    Who::Expired,
    Who::Forged,
];

/// Column headings of [`TABLE`], in the order of [`CALLERS`].
const HEADINGS: [&str; 10] = [
    "admin", "maint", "member", "viewer", "stranger", "node", "none", "revoked", "expired",
    "forged",
];

/// One route and what each caller gets, in the order of [`CALLERS`]:
/// admin, maintainer, member, viewer, stranger, node, none, revoked,
/// expired, forged.
struct Row(&'static str, &'static str, [u16; 10]);

/// The web view's routes, served but not in the OpenAPI document.
const OUTSIDE_THE_DOCUMENT: [(&str, &str); 4] = [
    ("get", "/"),
    ("get", "/js/{file}"),
    ("get", "/app.css"),
    ("get", "/favicon.svg"),
];

/// Every route the server serves and what each caller must get.
///
/// Rules: a request without a valid user token is 401 wherever a token is
/// needed (node tokens are for the agents' WebSocket only); a project, and
/// everything in it, that the caller may not see is 404, as if it did not
/// exist; an action on a project the caller sees but whose role does not
/// allow it is 403, except adding members, which answers 404 on `user` to
/// everybody but maintainers and admins so that it tells no user names;
/// admin-only routes are 403 to every other user, whatever they name;
/// nodes are shared by every project and readable by every user. Host SSH
/// answers the admin 409 because the node is offline, which the route only
/// says after it let the admin in.
#[rustfmt::skip]
const TABLE: &[Row] = &[
    Row("get", "/healthz",                                    [200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    Row("get", "/readyz",                                     [200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    Row("get", "/metrics",                                    [200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    Row("get", "/api/v1/openapi.json",                        [200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    Row("get", "/",                                           [200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    Row("get", "/js/{file}",                                  [200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    Row("get", "/app.css",                                    [200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    Row("get", "/favicon.svg",                                [200, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
    Row("post", "/api/v1/users",                              [201, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/users",                               [200, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/users/{name}",                        [200, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/me",                                  [200, 200, 200, 200, 200, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/users/{name}/tokens",                [201, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/users/{name}/tokens",                 [200, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("delete", "/api/v1/users/{name}/tokens/{token_id}",   [204, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/projects",                           [201, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/projects",                            [200, 200, 200, 200, 200, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/projects/{id}",                       [200, 200, 200, 200, 404, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/projects/{id}/members",              [200, 200, 404, 404, 404, 401, 401, 401, 401, 401]),
    Row("delete", "/api/v1/projects/{id}/members/{user}",     [200, 200, 403, 403, 404, 401, 401, 401, 401, 401]),
    Row("put", "/api/v1/projects/{id}/quota",                 [200, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/projects/{id}/archive",              [200, 200, 403, 403, 404, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/projects/{id}/secrets",               [200, 200, 200, 200, 404, 401, 401, 401, 401, 401]),
    Row("put", "/api/v1/projects/{id}/secrets/{name}",        [200, 200, 403, 403, 404, 401, 401, 401, 401, 401]),
    Row("delete", "/api/v1/projects/{id}/secrets/{name}",     [204, 204, 403, 403, 404, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/projects/{id}/objects",              [201, 201, 201, 403, 404, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/projects/{id}/objects/complete",     [200, 200, 200, 403, 404, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/tasks",                              [201, 201, 201, 403, 404, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/tasks",                               [200, 200, 200, 200, 200, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/tasks/{id}",                          [200, 200, 200, 200, 404, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/tasks/{id}/cancel",                  [200, 200, 200, 403, 404, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/tasks/{id}/state",                    [200, 200, 200, 200, 404, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/tasks/{id}/logs",                     [200, 200, 200, 200, 404, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/tasks/{id}/artifacts",                [200, 200, 200, 200, 404, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/artifacts/{id}/download",             [302, 302, 302, 302, 404, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/nodes",                              [201, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/nodes",                               [200, 200, 200, 200, 200, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/nodes/{id}",                          [200, 200, 200, 200, 200, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/nodes/{id}/drain",                   [200, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/nodes/{id}/undrain",                 [200, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/nodes/{id}/revoke",                  [200, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/nodes/{id}/host-ssh",                [409, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("put", "/api/v1/nodes/{id}/labels",                   [200, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("post", "/api/v1/nodes/{id}/labels/accept",           [200, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("put", "/api/v1/nodes/{id}/limits",                   [200, 403, 403, 403, 403, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/events",                              [200, 200, 200, 200, 404, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/events/{position}",                   [200, 200, 200, 200, 404, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/event-types",                         [200, 200, 200, 200, 200, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/timeline",                            [200, 200, 200, 200, 200, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/timeline/stream",                     [200, 200, 200, 200, 200, 401, 401, 401, 401, 401]),
    Row("get", "/api/v1/version",                             [200, 200, 200, 200, 200, 401, 401, 401, 401, 401]),
];

/// A user in no project and in no column, whose user routes are called.
const OTHER_USER: &str = "olga-outsider";

/// What one call answered.
struct Reply {
    status: u16,
    content_type: String,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|_| panic!("{}: not JSON: {}", self.status, self.text))
    }
}

/// One concrete request for a route.
struct Call {
    path: String,
    body: Option<Value>,
}

impl Call {
    fn to(path: String) -> Self {
        Self { path, body: None }
    }

    fn with(path: String, body: Value) -> Self {
        Self {
            path,
            body: Some(body),
        }
    }

    /// The request as text, to tell what a caller sent from what the
    /// server told them.
    fn text(&self) -> String {
        format!(
            "{} {}",
            self.path,
            self.body.as_ref().map(Value::to_string).unwrap_or_default()
        )
    }
}

/// A running server with projects P and Q and everything in them.
struct World {
    base: String,
    client: reqwest::Client,
    store: Store,
    pool: sqlx::PgPool,
    objects: ObjectStore,
    admin: String,
    /// The tokens of [`CALLERS`], `None` for no token.
    tokens: Vec<Option<String>>,
    p: String,
    q: String,
    p_task: String,
    q_task: String,
    p_artifact: String,
    q_artifact: String,
    p_position: i64,
    q_position: i64,
    /// The node of both projects' tasks, whose token is the node caller's.
    node: String,
    /// Where the fresh resources' names count from.
    counter: AtomicUsize,
    /// The ids and names of everything of P.
    p_marks: Vec<String>,
    /// The ids and names of everything of Q.
    q_marks: Vec<String>,
    /// Before anything of the matrix was done.
    set_up_at: chrono::DateTime<Utc>,
    _dir: tempfile::TempDir,
}

/// A task of `project` with an input and an output.
fn task_with_files(project: &str, input: &str) -> Value {
    json!({
        "project_id": project,
        "code_repo_url": "https://git.example.com/lab/code.git",
        "code_commit_id": SHA,
        "env_repo_url": "https://git.example.com/lab/env.git",
        "env_commit_id": SHA,
        "dockerfile_path": "Dockerfile",
        "inputs": [{"name": "data/in.bin", "object": input}],
        "outputs": [{"name": "model", "path": "out/model.bin"}]
    })
}

/// `token` with its secret replaced by a well-formed made-up one.
fn forged(token: &str) -> String {
    let (known, secret) = token.rsplit_once('~').unwrap();
    let made_up = if secret.starts_with('A') { "B" } else { "A" };
    format!("{known}~{}", made_up.repeat(secret.len()))
}

/// The server alone, with an admin and the embedded object store; rate
/// limits off, as one token makes hundreds of calls here.
async fn serve() -> App {
    let db = testkit::fresh_db().await;
    let config = Config {
        rate_limit: None,
        ..Config::default()
    };
    let objects = Objects {
        ttl: Duration::from_secs(60),
        part: PART,
    };
    App::start_on(db.pool, config, Some(objects)).await
}

/// Sends `method path` with `token` and `body`. A stream is read up to its
/// `ready` event (or for a few seconds), then dropped.
async fn send(
    client: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Reply {
    let mut req = client.request(
        method.to_uppercase().parse().unwrap(),
        format!("{base}{path}"),
    );
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(body);
    }
    let mut response = req.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = if content_type.starts_with("text/event-stream") {
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !text.contains("event: ready") {
            match tokio::time::timeout_at(deadline, response.chunk()).await {
                Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
                _ => break,
            }
        }
        assert!(text.contains("event: ready"), "{path}: no ready event");
        text
    } else {
        response.text().await.unwrap()
    };
    Reply {
        status,
        content_type,
        text,
    }
}

impl World {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        send(&self.client, &self.base, method, path, token, body).await
    }

    /// An admin's call that must succeed; its JSON answer.
    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let reply = self
            .call(method, path, Some(&self.admin), body.as_ref())
            .await;
        assert!(
            (200..300).contains(&reply.status),
            "{method} {path}: {} {}",
            reply.status,
            reply.text
        );
        if reply.text.is_empty() {
            Value::Null
        } else {
            reply.json()
        }
    }

    fn token(&self, who: Who) -> Option<&str> {
        let i = CALLERS.iter().position(|w| *w == who).unwrap();
        self.tokens[i].as_deref()
    }

    fn fresh(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// Waits until every committed event is visible to outbox readers, then
    /// lets the read models catch up.
    async fn catch_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let target = store::outbox::committed_head(&self.pool).await.unwrap();
        while store::outbox::head(&self.pool).await.unwrap() < target {
            assert!(Instant::now() < deadline, "events stayed hidden");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        projections::Projector::new(self.pool.clone())
            .catch_up()
            .await
            .unwrap();
    }

    async fn user(&self, name: &str) -> String {
        self.admin("post", "/api/v1/users", Some(json!({ "name": name })))
            .await;
        self.issue(name, json!({"label": "matrix"})).await.0
    }

    /// Issues a token of `name`; the token and its id.
    async fn issue(&self, name: &str, body: Value) -> (String, String) {
        let t = self
            .admin("post", &format!("/api/v1/users/{name}/tokens"), Some(body))
            .await;
        (
            t["token"].as_str().unwrap().to_string(),
            t["token_id"].as_str().unwrap().to_string(),
        )
    }

    /// A project named `name` with `members`; its id.
    async fn project(&self, name: &str, description: &str, members: &[(&str, &str)]) -> String {
        let p = self
            .admin(
                "post",
                "/api/v1/projects",
                Some(json!({"name": name, "description": description})),
            )
            .await;
        let id = p["id"].as_str().unwrap().to_string();
        for (user, role) in members {
            self.admin(
                "post",
                &format!("/api/v1/projects/{id}/members"),
                Some(json!({"user": user, "role": role})),
            )
            .await;
        }
        id
    }

    /// Starts an upload of `data` as object `name` of `project` and sends
    /// its bytes; the completion's body.
    async fn uploaded(&self, project: &str, name: &str, data: &[u8]) -> Value {
        let up = self
            .admin(
                "post",
                &format!("/api/v1/projects/{project}/objects"),
                Some(json!({"name": name, "size": data.len(), "sha256": sha(data)})),
            )
            .await;
        assert_eq!(up["method"], "put");
        let r = put(up["url"].as_str().unwrap(), &up["headers"], data.to_vec()).await;
        assert!(r.status().is_success());
        json!({"name": name, "upload_id": up["upload_id"]})
    }

    /// A task of `project` run by `node` that left artifact `model`; the
    /// task's and the artifact's ids.
    async fn task_with_artifact(&self, project: &str, input: &str, node: &str) -> (String, String) {
        let body = self.uploaded(project, input, b"input bytes").await;
        self.admin(
            "post",
            &format!("/api/v1/projects/{project}/objects/complete"),
            Some(body),
        )
        .await;
        let t = self
            .admin(
                "post",
                "/api/v1/tasks",
                Some(task_with_files(project, input)),
            )
            .await;
        let task_id: Uuid = t["id"].as_str().unwrap().parse().unwrap();
        let node_id: Uuid = node.parse().unwrap();
        let at = Utc::now();
        let system = Actor::System("test".into());
        let run = |c: TaskCommand| async {
            self.store
                .execute::<Task>(&task_id.to_string(), c, &system, at)
                .await
                .unwrap();
        };
        run(TaskCommand::Assign {
            node_id,
            gpus: vec![],
            reason: "test".into(),
            at,
        })
        .await;
        run(TaskCommand::Accept {
            node_id,
            attempt: 1,
            at,
        })
        .await;
        let data = b"trained weights".to_vec();
        let key = objects::keys::task_output(project.parse().unwrap(), task_id, 1, "model");
        let p = self
            .objects
            .presign_put(&key, Some(&sha(&data)))
            .await
            .unwrap();
        let headers = serde_json::to_value(&p.headers).unwrap();
        assert!(put(&p.url, &headers, data.clone())
            .await
            .status()
            .is_success());
        run(TaskCommand::RecordArtifact {
            node_id,
            attempt: 1,
            name: "model".into(),
            key,
            size: data.len() as u64,
            sha256: sha(&data),
            at,
        })
        .await;
        self.catch_up().await;
        let list = self
            .admin("get", &format!("/api/v1/tasks/{task_id}/artifacts"), None)
            .await;
        let artifact = list["items"][0]["id"].as_str().unwrap().to_string();
        (task_id.to_string(), artifact)
    }

    /// The position of the first event of task `task`.
    async fn first_event(&self, task: &str) -> i64 {
        let page = self
            .admin(
                "get",
                &format!("/api/v1/events?aggregate_type=task&aggregate_id={task}"),
                None,
            )
            .await;
        page["items"][0]["position"].as_i64().unwrap()
    }

    /// A node provisioned now; its id and token.
    async fn node(&self) -> (String, String) {
        let name = self.fresh("node");
        let n = self
            .admin("post", "/api/v1/nodes", Some(json!({ "name": name })))
            .await;
        (
            n["id"].as_str().unwrap().to_string(),
            n["token"].as_str().unwrap().to_string(),
        )
    }

    /// Projects P and Q, their users, tasks, artifacts and objects, a node
    /// and every caller's token.
    async fn build() -> Self {
        let App {
            base,
            client,
            store,
            pool,
            objects,
            admin,
            dir,
            ..
        } = serve().await;
        let mut world = World {
            base,
            client,
            store,
            pool,
            objects: objects.expect("the embedded object store"),
            admin,
            tokens: Vec::new(),
            p: String::new(),
            q: String::new(),
            p_task: String::new(),
            q_task: String::new(),
            p_artifact: String::new(),
            q_artifact: String::new(),
            p_position: 0,
            q_position: 0,
            node: String::new(),
            counter: AtomicUsize::new(0),
            p_marks: Vec::new(),
            q_marks: Vec::new(),
            set_up_at: Utc::now(),
            _dir: dir,
        };
        // Issued first, so that it has expired by the end of the set-up.
        let expiring = world
            .issue("admin", json!({"expires_in_s": 1, "label": "expiring"}))
            .await;
        let expires = Instant::now() + Duration::from_millis(1100);
        let (revoked, revoked_id) = world.issue("admin", json!({"label": "revoked"})).await;
        world
            .admin(
                "delete",
                &format!("/api/v1/users/admin/tokens/{revoked_id}"),
                None,
            )
            .await;

        let maintainer = world.user("pat-maintainer").await;
        let member = world.user("pia-member").await;
        let viewer = world.user("pim-viewer").await;
        let stranger = world.user("quentin-qzecret").await;
        world.user(OTHER_USER).await;
        let p = world
            .project(
                "plain-project",
                "the project of the matrix",
                &[
                    ("pat-maintainer", "maintainer"),
                    ("pia-member", "member"),
                    ("pim-viewer", "viewer"),
                ],
            )
            .await;
        let q = world
            .project(
                "qzecret-project",
                "qzecret plans",
                &[("quentin-qzecret", "maintainer")],
            )
            .await;
        let (node, node_token) = world.node().await;
        let (p_task, p_artifact) = world
            .task_with_artifact(&p, "pdata/plain-input.bin", &node)
            .await;
        let (q_task, q_artifact) = world
            .task_with_artifact(&q, "qzecret-data/input.bin", &node)
            .await;
        world.p_position = world.first_event(&p_task).await;
        world.q_position = world.first_event(&q_task).await;
        world.p_marks = vec![
            p.clone(),
            "plain-project".into(),
            "the project of the matrix".into(),
            p_task.clone(),
            p_artifact.clone(),
            "pdata/plain-input.bin".into(),
            "pat-maintainer".into(),
            "pia-member".into(),
            "pim-viewer".into(),
        ];
        world.q_marks = vec![
            q.clone(),
            "qzecret".into(),
            q_task.clone(),
            q_artifact.clone(),
        ];
        world.p = p;
        world.q = q;
        world.p_task = p_task;
        world.q_task = q_task;
        world.p_artifact = p_artifact;
        world.q_artifact = q_artifact;
        world.node = node;
        world.tokens = vec![
            Some(world.admin.clone()),
            Some(maintainer),
            Some(member),
            Some(viewer),
            Some(stranger),
            Some(node_token),
            None,
            Some(revoked),
            Some(expiring.0),
            Some(forged(&world.admin)),
        ];
        world.catch_up().await;
        tokio::time::sleep_until(expires.into()).await;
        world.set_up_at = Utc::now();
        world
    }

    /// A request for `method path` with real resources of P
    /// and fresh ones where the route changes what it acts on.
    async fn prepare(&self, method: &str, path: &str) -> Call {
        let p = &self.p;
        let fresh_node = || async { self.node().await.0 };
        match (method, path) {
            ("get", "/healthz" | "/readyz" | "/metrics" | "/api/v1/openapi.json")
            | ("get", "/" | "/app.css" | "/favicon.svg")
            | ("get", "/api/v1/users" | "/api/v1/nodes" | "/api/v1/me") => Call::to(path.into()),
            ("post", "/api/v1/users") => {
                Call::with(path.into(), json!({ "name": self.fresh("new-user") }))
            }
            ("get", "/api/v1/users/{name}") => Call::to(format!("/api/v1/users/{OTHER_USER}")),
            ("post", "/api/v1/users/{name}/tokens") => Call::with(
                format!("/api/v1/users/{OTHER_USER}/tokens"),
                json!({"label": "more"}),
            ),
            ("get", "/api/v1/users/{name}/tokens") => {
                Call::to(format!("/api/v1/users/{OTHER_USER}/tokens"))
            }
            ("delete", "/api/v1/users/{name}/tokens/{token_id}") => {
                let (_, id) = self.issue(OTHER_USER, json!({})).await;
                Call::to(format!("/api/v1/users/{OTHER_USER}/tokens/{id}"))
            }
            ("post", "/api/v1/projects") => {
                Call::with(path.into(), json!({ "name": self.fresh("new-project") }))
            }
            ("get", "/api/v1/projects") => Call::to("/api/v1/projects?limit=500".into()),
            ("get", "/api/v1/projects/{id}") => Call::to(format!("/api/v1/projects/{p}")),
            ("post", "/api/v1/projects/{id}/members") => {
                let user = self.fresh("joining");
                self.user(&user).await;
                Call::with(
                    format!("/api/v1/projects/{p}/members"),
                    json!({"user": user, "role": "viewer"}),
                )
            }
            ("delete", "/api/v1/projects/{id}/members/{user}") => {
                let user = self.fresh("leaving");
                self.user(&user).await;
                self.admin(
                    "post",
                    &format!("/api/v1/projects/{p}/members"),
                    Some(json!({"user": user, "role": "member"})),
                )
                .await;
                Call::to(format!("/api/v1/projects/{p}/members/{user}"))
            }
            ("put", "/api/v1/projects/{id}/quota") => Call::with(
                format!("/api/v1/projects/{p}/quota"),
                json!({"max_running": 8}),
            ),
            ("get", "/api/v1/projects/{id}/secrets") => {
                Call::to(format!("/api/v1/projects/{p}/secrets"))
            }
            ("put", "/api/v1/projects/{id}/secrets/{name}") => Call::with(
                format!("/api/v1/projects/{p}/secrets/{}", self.fresh("set")),
                json!({"value": "a-secret-value"}),
            ),
            ("delete", "/api/v1/projects/{id}/secrets/{name}") => {
                let name = self.fresh("gone");
                self.admin(
                    "put",
                    &format!("/api/v1/projects/{p}/secrets/{name}"),
                    Some(json!({"value": "a-secret-value"})),
                )
                .await;
                Call::to(format!("/api/v1/projects/{p}/secrets/{name}"))
            }
            ("get", "/api/v1/version") => Call::to(path.into()),
            ("post", "/api/v1/projects/{id}/archive") => {
                let id = self
                    .project(
                        &self.fresh("archived"),
                        "",
                        &[
                            ("pat-maintainer", "maintainer"),
                            ("pia-member", "member"),
                            ("pim-viewer", "viewer"),
                        ],
                    )
                    .await;
                Call::to(format!("/api/v1/projects/{id}/archive"))
            }
            ("post", "/api/v1/projects/{id}/objects") => Call::with(
                format!("/api/v1/projects/{p}/objects"),
                json!({"name": format!("{}.bin", self.fresh("uploads/new")), "size": 3, "sha256": sha(b"abc")}),
            ),
            ("post", "/api/v1/projects/{id}/objects/complete") => {
                let name = format!("{}.bin", self.fresh("uploads/done"));
                let body = self.uploaded(p, &name, b"complete me").await;
                Call::with(format!("/api/v1/projects/{p}/objects/complete"), body)
            }
            ("post", "/api/v1/tasks") => Call::with(path.into(), task_body(p)),
            ("get", "/api/v1/tasks") => Call::to("/api/v1/tasks?limit=500".into()),
            ("get", "/api/v1/tasks/{id}") => Call::to(format!("/api/v1/tasks/{}", self.p_task)),
            ("post", "/api/v1/tasks/{id}/cancel") => {
                let t = self
                    .admin("post", "/api/v1/tasks", Some(task_body(p)))
                    .await;
                Call::to(format!(
                    "/api/v1/tasks/{}/cancel",
                    t["id"].as_str().unwrap()
                ))
            }
            ("get", "/api/v1/tasks/{id}/state") => {
                Call::to(format!("/api/v1/tasks/{}/state?at_sequence=2", self.p_task))
            }
            ("get", "/api/v1/tasks/{id}/logs") => {
                Call::to(format!("/api/v1/tasks/{}/logs?attempt=1", self.p_task))
            }
            ("get", "/api/v1/tasks/{id}/artifacts") => {
                Call::to(format!("/api/v1/tasks/{}/artifacts", self.p_task))
            }
            ("get", "/api/v1/artifacts/{id}/download") => {
                Call::to(format!("/api/v1/artifacts/{}/download", self.p_artifact))
            }
            ("post", "/api/v1/nodes") => {
                Call::with(path.into(), json!({ "name": self.fresh("new-node") }))
            }
            ("get", "/api/v1/nodes/{id}") => Call::to(format!("/api/v1/nodes/{}", self.node)),
            ("post", "/api/v1/nodes/{id}/drain") => {
                Call::to(format!("/api/v1/nodes/{}/drain", fresh_node().await))
            }
            ("post", "/api/v1/nodes/{id}/undrain") => {
                let id = fresh_node().await;
                self.admin("post", &format!("/api/v1/nodes/{id}/drain"), None)
                    .await;
                Call::to(format!("/api/v1/nodes/{id}/undrain"))
            }
            ("post", "/api/v1/nodes/{id}/revoke") => {
                Call::to(format!("/api/v1/nodes/{}/revoke", fresh_node().await))
            }
            ("post", "/api/v1/nodes/{id}/host-ssh") => Call::with(
                format!("/api/v1/nodes/{}/host-ssh", self.node),
                json!({"command": "uptime", "timeout_s": 5}),
            ),
            ("put", "/api/v1/nodes/{id}/labels") => Call::with(
                format!("/api/v1/nodes/{}/labels", fresh_node().await),
                json!({"labels": {"zone": "a"}}),
            ),
            ("post", "/api/v1/nodes/{id}/labels/accept") => Call::with(
                format!("/api/v1/nodes/{}/labels/accept", fresh_node().await),
                json!({}),
            ),
            ("put", "/api/v1/nodes/{id}/limits") => Call::with(
                format!("/api/v1/nodes/{}/limits", fresh_node().await),
                json!({"cpus": 4, "memory_mb": 16384, "gpus": null}),
            ),
            ("get", "/api/v1/events") => Call::to(format!(
                "/api/v1/events?aggregate_type=task&aggregate_id={}&limit=1000",
                self.p_task
            )),
            ("get", "/api/v1/event-types") => Call::to(path.to_string()),
            ("get", "/js/{file}") => Call::to("/js/main.js".into()),
            ("get", "/api/v1/events/{position}") => {
                Call::to(format!("/api/v1/events/{}", self.p_position))
            }
            // Only what happened before the matrix: everything of Q among it.
            ("get", "/api/v1/timeline") => Call::to(format!(
                "/api/v1/timeline?limit=500&until={}",
                self.set_up_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            )),
            ("get", "/api/v1/timeline/stream") => Call::to(format!("{path}?after=0")),
            _ => panic!("no request for {method} {path}: add one to World::prepare"),
        }
    }

    /// What of the project `who` is not in their answer holds, besides
    /// what they sent themselves.
    /// Tokens in the answer are a leak to anybody, admins too.
    fn leaks(&self, who: Who, call: &Call, reply: &Reply) -> Vec<String> {
        let marks: &[String] = match who {
            Who::Admin => &[],
            Who::Stranger => &self.p_marks,
            _ => &self.q_marks,
        };
        let sent = call.text();
        let secrets = self.tokens.iter().flatten();
        marks
            .iter()
            .filter(|m| !sent.contains(m.as_str()))
            .chain(secrets)
            .filter(|m| reply.text.contains(m.as_str()))
            .cloned()
            .collect()
    }
}

/// The `(method, path)` of every operation in OpenAPI document `doc`.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let methods = [
        "get", "put", "post", "delete", "patch", "head", "options", "trace",
    ];
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|m| methods.contains(&m.as_str()))
                .map(|m| (m.clone(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn the_table_names_exactly_the_routes_the_server_serves() {
    let app = serve().await;
    let reply = send(
        &app.client,
        &app.base,
        "get",
        "/api/v1/openapi.json",
        None,
        None,
    )
    .await;
    assert_eq!(reply.status, 200);
    let documented = documented(&reply.json());
    assert!(documented.len() > 30, "{documented:?}");
    let outside: BTreeSet<(String, String)> = OUTSIDE_THE_DOCUMENT
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert!(
        documented.is_disjoint(&outside),
        "routes of the web view are in the document now: take them off OUTSIDE_THE_DOCUMENT"
    );
    let mut table = BTreeSet::new();
    for Row(method, path, _) in TABLE {
        assert!(
            table.insert((method.to_string(), path.to_string())),
            "{method} {path} has two rows"
        );
    }
    let served: BTreeSet<_> = documented.union(&outside).cloned().collect();
    let missing: Vec<_> = served.difference(&table).collect();
    let stale: Vec<_> = table.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "routes without a row in TABLE (say what every caller gets): {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "rows of TABLE for routes the server does not serve: {stale:?}"
    );
}

#[tokio::test]
async fn every_route_answers_every_kind_of_caller_as_the_table_says_and_tells_nobody_of_another_project(
) {
    let world = World::build().await;
    // What the others must not see is there to be seen: the admin sees
    // both projects, and the stranger their own.
    let timeline = world.prepare("get", "/api/v1/timeline").await;
    for (who, marks) in [
        (Who::Admin, [&world.p, &world.p_task]),
        (Who::Admin, [&world.q, &world.q_task]),
        (Who::Stranger, [&world.q, &world.q_task]),
        (Who::Viewer, [&world.p, &world.p_task]),
    ] {
        let seen = world
            .call("get", &timeline.path, world.token(who), None)
            .await;
        for mark in marks {
            assert!(seen.text.contains(mark.as_str()), "{who:?} misses {mark}");
        }
    }

    let mut failures = Vec::new();
    let mut actual = Vec::new();
    for Row(method, path, expected) in TABLE {
        let mut got = [0u16; 10];
        for (i, who) in CALLERS.iter().enumerate() {
            let call = world.prepare(method, path).await;
            let reply = world
                .call(method, &call.path, world.token(*who), call.body.as_ref())
                .await;
            got[i] = reply.status;
            if reply.status != expected[i] {
                failures.push(format!(
                    "{method} {path} as {who:?}: expected {}, got {}: {}",
                    expected[i],
                    reply.status,
                    reply.text.chars().take(300).collect::<String>()
                ));
            }
            let why = who.refused_because().unwrap_or_default();
            if reply.status == 401 && !reply.text.contains(why) {
                failures.push(format!(
                    "{method} {path} as {who:?}: refused, but not because {why:?}: {}",
                    reply.text
                ));
            }
            let leaks = world.leaks(*who, &call, &reply);
            if !leaks.is_empty() {
                failures.push(format!(
                    "{method} {} as {who:?} ({}) tells of another project: {leaks:?} in {}",
                    call.path, reply.content_type, reply.text
                ));
            }
        }
        actual.push(format!("{method:>6} {path:<45} {got:?}"));
    }
    assert!(
        failures.is_empty(),
        "{}\n\nwhat each caller got ({}):\n{}",
        failures.join("\n"),
        HEADINGS.join(", "),
        actual.join("\n")
    );
}

#[tokio::test]
async fn another_project_is_as_absent_as_what_does_not_exist_even_through_the_node_both_share() {
    let world = World::build().await;
    let missing = Uuid::now_v7().to_string();
    let q = &world.q;
    let upload = world.uploaded(q, "qzecret-data/more.bin", b"more").await;
    // Each probe with Q's resource, then with one that does not exist.
    let probes = |q: &str, task: &str, artifact: &str, position: i64| {
        vec![
            ("get", format!("/api/v1/projects/{q}"), None),
            ("post", format!("/api/v1/projects/{q}/archive"), None),
            (
                "post",
                format!("/api/v1/projects/{q}/members"),
                Some(json!({"user": OTHER_USER, "role": "viewer"})),
            ),
            (
                "delete",
                format!("/api/v1/projects/{q}/members/quentin-qzecret"),
                None,
            ),
            (
                "post",
                format!("/api/v1/projects/{q}/objects"),
                Some(json!({"name": "x.bin", "size": 1, "sha256": sha(b"x")})),
            ),
            (
                "post",
                format!("/api/v1/projects/{q}/objects/complete"),
                Some(upload.clone()),
            ),
            ("post", "/api/v1/tasks".to_string(), Some(task_body(q))),
            ("get", format!("/api/v1/tasks?project={q}"), None),
            ("get", format!("/api/v1/tasks/{task}"), None),
            ("post", format!("/api/v1/tasks/{task}/cancel"), None),
            ("get", format!("/api/v1/tasks/{task}/state"), None),
            ("get", format!("/api/v1/tasks/{task}/logs"), None),
            (
                "get",
                format!("/api/v1/tasks/{task}/logs?follow=true"),
                None,
            ),
            ("get", format!("/api/v1/tasks/{task}/artifacts"), None),
            (
                "get",
                format!("/api/v1/artifacts/{artifact}/download"),
                None,
            ),
            ("get", format!("/api/v1/events/{position}"), None),
            (
                "get",
                format!("/api/v1/events?aggregate_type=project&aggregate_id={q}"),
                None,
            ),
            (
                "get",
                format!("/api/v1/events?aggregate_type=task&aggregate_id={task}"),
                None,
            ),
            ("get", format!("/api/v1/timeline?project={q}"), None),
            ("get", format!("/api/v1/timeline?task={task}"), None),
            ("get", format!("/api/v1/timeline/stream?project={q}"), None),
            ("get", format!("/api/v1/timeline/stream?task={task}"), None),
        ]
    };
    let of_q = probes(q, &world.q_task, &world.q_artifact, world.q_position);
    let of_nothing = probes(&missing, &missing, &missing, i64::MAX);
    let mut failures = Vec::new();
    for who in [Who::Maintainer, Who::Member, Who::Viewer] {
        for ((method, path, body), (_, absent, absent_body)) in of_q.iter().zip(&of_nothing) {
            let reply = world
                .call(method, path, world.token(who), body.as_ref())
                .await;
            let none = world
                .call(method, absent, world.token(who), absent_body.as_ref())
                .await;
            if reply.status != 404 || none.status != 404 {
                failures.push(format!(
                    "{method} {path} as {who:?}: {} {} (and {} for what does not exist)",
                    reply.status, reply.text, none.status
                ));
            }
            let call = Call {
                path: path.clone(),
                body: body.clone(),
            };
            let leaks = world.leaks(who, &call, &reply);
            if !leaks.is_empty() {
                failures.push(format!(
                    "{method} {path} as {who:?} tells {leaks:?}: {}",
                    reply.text
                ));
            }
        }
    }

    // What is shared between projects (the node both ran tasks on, and
    // the lists filtered by it) shows nothing of the other project.
    let node = &world.node;
    let others = world
        .admin(
            "get",
            &format!("/api/v1/events?aggregate_type=user&aggregate_id={OTHER_USER}"),
            None,
        )
        .await;
    let others = others["items"][0]["position"].as_i64().unwrap();
    let shared = [
        // Another user's event is no more there than one that never was.
        (format!("/api/v1/events/{others}"), 404),
        ("/api/v1/events".to_string(), 403),
        (
            format!("/api/v1/events?aggregate_type=node&aggregate_id={node}&limit=1000"),
            200,
        ),
        (format!("/api/v1/nodes/{node}"), 200),
        (format!("/api/v1/tasks?node={node}&limit=500"), 200),
        (format!("/api/v1/timeline?node={node}&limit=500"), 200),
        (format!("/api/v1/timeline/stream?node={node}&after=0"), 200),
    ];
    let admin_sees = world
        .call("get", &shared[4].0, world.token(Who::Admin), None)
        .await;
    assert!(
        admin_sees.text.contains(&world.q_task) && admin_sees.text.contains(&world.p_task),
        "both projects' tasks ran on the node: {}",
        admin_sees.text
    );
    for who in [Who::Maintainer, Who::Member, Who::Viewer, Who::Stranger] {
        for (path, status) in &shared {
            let reply = world.call("get", path, world.token(who), None).await;
            if reply.status != *status {
                failures.push(format!(
                    "GET {path} as {who:?}: {} {}",
                    reply.status, reply.text
                ));
            }
            let call = Call::to(path.clone());
            let leaks = world.leaks(who, &call, &reply);
            if !leaks.is_empty() {
                failures.push(format!(
                    "GET {path} as {who:?} tells {leaks:?}: {}",
                    reply.text
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
