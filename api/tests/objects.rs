//! Large files through the API against real parts: a fresh PostgreSQL
//! database, the embedded S3 store (s3s over s3s-fs) on a local port, the
//! router on another, and presigned URLs followed with reqwest.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::time::Duration;

use api::{AppState, Config};
use chrono::Utc;
use domain::task::{Task, TaskCommand};
use domain::Actor;
use objects::embedded::{fresh_credentials, Embedded};
use objects::ObjectStore;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use store::Store;
use uuid::Uuid;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const PART: u64 = 5 * 1024 * 1024;

struct App {
    base: String,
    client: reqwest::Client,
    store: Store,
    pool: sqlx::PgPool,
    objects: Option<ObjectStore>,
    admin: String,
    _dirs: Vec<tempfile::TempDir>,
}

async fn start(with_store: bool) -> App {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let admin = api::bootstrap_admin(&store, &dir.path().join("admin.token"))
        .await
        .unwrap();
    let objects = if with_store {
        let (access, secret) = fresh_credentials();
        let embedded =
            Embedded::new(&dir.path().join("objects"), "unidesk", &access, secret).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let objects =
            ObjectStore::new(&embedded.client_config(&endpoint, Duration::from_secs(60))).unwrap();
        tokio::spawn(embedded.run(listener, std::future::pending()));
        Some(objects)
    } else {
        None
    };
    let state = AppState::new(store.clone(), Config::default()).with_objects(objects.clone(), PART);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, api::router(state)).await });
    App {
        base,
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        store,
        pool: db.pool,
        objects,
        admin,
        _dirs: vec![dir],
    }
}

impl App {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let url = format!("{}/api/v1{path}", self.base);
        let mut req = self
            .client
            .request(method.parse().unwrap(), url)
            .bearer_auth(token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", path, token, Some(body)).await
    }

    async fn user(&self, name: &str) -> String {
        self.post("/users", &self.admin, json!({ "name": name }))
            .await;
        let (_, t) = self
            .post(
                &format!("/users/{name}/tokens"),
                &self.admin,
                json!({"label": "t"}),
            )
            .await;
        t["token"].as_str().unwrap().to_string()
    }

    async fn project(&self, members: &[(&str, &str)]) -> String {
        let (s, p) = self
            .post(
                "/projects",
                &self.admin,
                json!({"name": format!("p{}", Uuid::new_v4().simple())}),
            )
            .await;
        assert_eq!(s, 201, "{p}");
        let id = p["id"].as_str().unwrap().to_string();
        for (user, role) in members {
            let (s, b) = self
                .post(
                    &format!("/projects/{id}/members"),
                    &self.admin,
                    json!({"user": user, "role": role}),
                )
                .await;
            assert!(s.is_success(), "{b}");
        }
        id
    }
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

async fn put(url: &str, headers: &Value, body: Vec<u8>) -> reqwest::Response {
    let mut req = reqwest::Client::new().put(url).body(body);
    if let Some(h) = headers.as_object() {
        for (k, v) in h {
            req = req.header(k, v.as_str().unwrap());
        }
    }
    req.send().await.unwrap()
}

fn task_body(project: &str) -> Value {
    json!({
        "project_id": project,
        "code_repo_url": "https://git.example.com/lab/code.git",
        "code_commit_id": SHA,
        "env_repo_url": "https://git.example.com/lab/env.git",
        "env_commit_id": SHA,
        "dockerfile_path": "Dockerfile",
        "inputs": [{"name": "data/train.tar", "object": "datasets/train.tar"}],
        "outputs": [{"name": "model", "path": "out/model.bin"}]
    })
}

#[tokio::test]
async fn a_member_uploads_an_object_in_one_put_and_the_store_checks_its_sha256() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let project = app.project(&[("alice", "member")]).await;
    let data = b"pixels".repeat(1000);
    let (s, up) = app
        .post(
            &format!("/projects/{project}/objects"),
            &alice,
            json!({"name": "./datasets//a.bin", "size": data.len(), "sha256": sha(&data)}),
        )
        .await;
    assert_eq!(s, 201, "{up}");
    assert_eq!(up["method"], "put");
    assert_eq!(up["name"], "datasets/a.bin");
    let url = up["url"].as_str().unwrap();
    let bad = put(url, &up["headers"], b"not the pixels".to_vec()).await;
    assert!(!bad.status().is_success());
    let good = put(url, &up["headers"], data.clone()).await;
    assert!(good.status().is_success());
    let key = objects::keys::project_object(project.parse().unwrap(), "datasets/a.bin");
    let info = app
        .objects
        .as_ref()
        .unwrap()
        .head(&key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (info.size, info.sha256),
        (data.len() as u64, Some(sha(&data)))
    );
}

#[tokio::test]
async fn a_file_larger_than_a_part_goes_up_in_parts_and_is_checked_when_completed() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let project = app.project(&[("alice", "member")]).await;
    let data: Vec<u8> = (0..(2 * PART + 12345)).map(|i| (i % 241) as u8).collect();
    let (s, up) = app
        .post(
            &format!("/projects/{project}/objects"),
            &alice,
            json!({"name": "big.bin", "size": data.len(), "sha256": sha(&data)}),
        )
        .await;
    assert_eq!(s, 201, "{up}");
    assert_eq!(up["method"], "multipart");
    let parts = up["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    let mut done = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let chunk = data.chunks(PART as usize).nth(i).unwrap().to_vec();
        let r = put(part["url"].as_str().unwrap(), &json!({}), chunk).await;
        assert!(r.status().is_success());
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        done.push(json!({"part_number": i + 1, "etag": etag}));
    }
    let complete =
        json!({"name": "big.bin", "upload_id": up["upload_id"], "size": data.len(), "parts": done});
    let (s, stored) = app
        .post(
            &format!("/projects/{project}/objects/complete"),
            &alice,
            complete,
        )
        .await;
    assert_eq!(s, 200, "{stored}");
    assert_eq!(stored["size"], data.len());
    assert_eq!(stored["sha256"], sha(&data));

    let (s, refused) = app
        .post(
            &format!("/projects/{project}/objects/complete"),
            &alice,
            json!({"name": "big.bin", "upload_id": "x", "size": -1, "parts": [{"part_number": 2, "etag": "e"}]}),
        )
        .await;
    assert_eq!(s, 422);
    let fields: Vec<_> = refused["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(fields, ["size", "parts[0]"]);
}

#[tokio::test]
async fn bad_uploads_name_each_field_and_strangers_see_nothing() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let viewer = app.user("vera").await;
    let stranger = app.user("sam").await;
    let project = app
        .project(&[("alice", "member"), ("vera", "viewer")])
        .await;
    let path = format!("/projects/{project}/objects");
    let (s, e) = app
        .post(
            &path,
            &alice,
            json!({"name": "../x", "size": -3, "sha256": "abc"}),
        )
        .await;
    assert_eq!(s, 422);
    assert_eq!(e["errors"].as_array().unwrap().len(), 3, "{e}");
    let body = json!({"name": "a", "size": 1, "sha256": sha(b"a")});
    assert_eq!(app.post(&path, &viewer, body.clone()).await.0, 403);
    assert_eq!(app.post(&path, &stranger, body).await.0, 404);
    let (s, _) = app
        .call(
            "GET",
            &format!("/artifacts/{}/download", Uuid::new_v4()),
            &alice,
            None,
        )
        .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn tasks_name_valid_inputs_and_outputs_and_need_a_store_for_them() {
    let app = start(false).await;
    let project = app.project(&[]).await;
    let (s, e) = app.post("/tasks", &app.admin, task_body(&project)).await;
    assert_eq!(s, 422, "{e}");
    assert_eq!(e["errors"][0]["field"], "inputs");
    assert_eq!(e["errors"][1]["field"], "outputs");
    let upload = json!({"name": "a", "size": 1, "sha256": sha(b"a")});
    let (s, _) = app
        .post(&format!("/projects/{project}/objects"), &app.admin, upload)
        .await;
    assert_eq!(s, 409);

    let app = start(true).await;
    let project = app.project(&[]).await;
    let mut bad = task_body(&project);
    bad["outputs"][0]["path"] = json!("../../etc/passwd");
    let (s, e) = app.post("/tasks", &app.admin, bad).await;
    assert_eq!(s, 422);
    assert_eq!(e["errors"][0]["field"], "outputs[0].path");
    let (s, t) = app.post("/tasks", &app.admin, task_body(&project)).await;
    assert_eq!(s, 201, "{t}");
    assert_eq!(t["spec"]["inputs"][0]["object"], "datasets/train.tar");
    assert_eq!(t["spec"]["outputs"][0]["path"], "out/model.bin");
}

#[tokio::test]
async fn a_recorded_output_is_listed_and_downloaded_by_members_only() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let stranger = app.user("sam").await;
    let project = app.project(&[("alice", "viewer")]).await;
    let (s, t) = app.post("/tasks", &app.admin, task_body(&project)).await;
    assert_eq!(s, 201);
    let task_id: Uuid = t["id"].as_str().unwrap().parse().unwrap();
    let node = Uuid::new_v4();
    let at = Utc::now();
    let system = Actor::System("test".into());
    let run = |c: TaskCommand| async {
        app.store
            .execute::<Task>(&task_id.to_string(), c, &system, at)
            .await
            .unwrap();
    };
    run(TaskCommand::Assign {
        node_id: node,
        gpus: vec![],
        reason: "test".into(),
        at,
    })
    .await;
    run(TaskCommand::Accept {
        node_id: node,
        attempt: 1,
        at,
    })
    .await;
    // The output as the agent leaves it in the store.
    let data = b"trained weights".to_vec();
    let key = objects::keys::task_output(project.parse().unwrap(), task_id, 1, "model");
    let objects = app.objects.as_ref().unwrap();
    let p = objects.presign_put(&key, Some(&sha(&data))).await.unwrap();
    let headers = serde_json::to_value(&p.headers).unwrap();
    assert!(put(&p.url, &headers, data.clone())
        .await
        .status()
        .is_success());
    run(TaskCommand::RecordArtifact {
        node_id: node,
        attempt: 1,
        name: "model".into(),
        key,
        size: data.len() as u64,
        sha256: sha(&data),
        at,
    })
    .await;
    projections::Projector::new(app.pool.clone())
        .catch_up()
        .await
        .unwrap();

    let (s, list) = app
        .call("GET", &format!("/tasks/{task_id}/artifacts"), &alice, None)
        .await;
    assert_eq!(s, 200, "{list}");
    let item = &list["items"][0];
    assert_eq!(
        (item["name"].as_str(), item["size"].as_u64()),
        (Some("model"), Some(data.len() as u64))
    );
    assert_eq!(item["sha256"], sha(&data));
    let download = item["download"]
        .as_str()
        .unwrap()
        .trim_start_matches("/api/v1");

    let r = app
        .client
        .get(format!("{}/api/v1{download}", app.base))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let body = reqwest::get(&location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.as_ref(), data.as_slice());

    assert_eq!(app.call("GET", download, &stranger, None).await.0, 404);
    let (s, _) = app
        .call(
            "GET",
            &format!("/tasks/{task_id}/artifacts"),
            &stranger,
            None,
        )
        .await;
    assert_eq!(s, 404);
}
