//! Large files through the API against real parts: a fresh PostgreSQL
//! database, the embedded S3 store (s3s over s3s-fs) on a local port, the
//! router on another, and presigned URLs followed with reqwest. Uploads
//! that lie about their bytes, complete someone else's upload or are left
//! behind are tried here, and the store itself is looked at afterwards.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::path::Path;
use std::time::Duration;

use api::Config;
use chrono::Utc;
use domain::task::{Task, TaskCommand};
use domain::Actor;
use objects::uploads::Sweeper;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

const PART: u64 = 5 * 1024 * 1024;
/// How long the test store's URLs live.
const TTL: Duration = Duration::from_secs(60);

mod support;

use support::{put, sha, App, Objects, SHA};

async fn start(with_store: bool) -> App {
    let db = testkit::fresh_db().await;
    let objects = with_store.then_some(Objects {
        ttl: TTL,
        part: PART,
    });
    App::start_on(db.pool, Config::default(), objects).await
}

impl App {
    /// `method /api/v1{path}` with `token` and `body`: status and JSON.
    async fn call_v1(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let method = method.parse().expect("a method");
        self.call(method, &format!("/api/v1{path}"), Some(token), body)
            .await
            .pair()
    }

    async fn post_v1(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call_v1("POST", path, token, Some(body)).await
    }

    async fn project(&self, members: &[(&str, &str)]) -> String {
        let (s, p) = self
            .post_v1(
                "/projects",
                &self.admin,
                json!({"name": format!("p{}", Uuid::new_v4().simple())}),
            )
            .await;
        assert_eq!(s, 201, "{p}");
        let id = p["id"].as_str().unwrap().to_string();
        for (user, role) in members {
            let (s, b) = self
                .post_v1(
                    &format!("/projects/{id}/members"),
                    &self.admin,
                    json!({"user": user, "role": role}),
                )
                .await;
            assert!(s.is_success(), "{b}");
        }
        id
    }

    /// Starts an upload of `data` declared as `size` bytes with SHA-256
    /// `sha256`.
    async fn start_upload(
        &self,
        project: &str,
        token: &str,
        name: &str,
        size: usize,
        sha256: &str,
    ) -> Value {
        let (s, up) = self
            .post_v1(
                &format!("/projects/{project}/objects"),
                token,
                json!({"name": name, "size": size, "sha256": sha256}),
            )
            .await;
        assert_eq!(s, 201, "{up}");
        up
    }

    async fn complete(&self, project: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.post_v1(
            &format!("/projects/{project}/objects/complete"),
            token,
            body,
        )
        .await
    }

    /// Uploads `data` as object `name`, in one PUT or in parts, and
    /// completes the upload; returns the completion's answer.
    async fn upload(&self, project: &str, token: &str, name: &str, data: &[u8]) -> Value {
        let up = self
            .start_upload(project, token, name, data.len(), &sha(data))
            .await;
        let mut complete = json!({"name": name, "upload_id": up["upload_id"]});
        if up["method"] == "put" {
            let r = put(up["url"].as_str().unwrap(), &up["headers"], data.to_vec()).await;
            assert!(r.status().is_success());
        } else {
            complete["parts"] = json!(send_parts(&up, data).await);
        }
        let (s, stored) = self.complete(project, token, complete).await;
        assert_eq!(s, 200, "{stored}");
        stored
    }

    /// The record of upload `upload_id`: its state and how it ended.
    async fn upload_state(&self, upload_id: &str) -> (String, Option<String>) {
        sqlx::query_as("SELECT state, detail FROM object_uploads WHERE upload_id = $1")
            .bind(upload_id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    fn key(&self, project: &str, name: &str) -> String {
        objects::keys::project_object(project.parse().unwrap(), name)
    }

    async fn head(&self, project: &str, name: &str) -> Option<objects::ObjectInfo> {
        let objects = self.objects.as_ref().unwrap();
        objects.head(&self.key(project, name)).await.unwrap()
    }

    fn sweeper(&self, grace: Duration) -> Sweeper {
        Sweeper::new(self.pool.clone(), self.objects.clone().unwrap(), grace)
    }
}

/// The files the embedded store keeps for pending multipart upload
/// `upload_id`: its record and its parts.
fn pending_files(root: &Path, upload_id: &str) -> Vec<String> {
    std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(upload_id))
        .collect()
}

/// How many parts of upload `upload_id` the embedded store holds.
fn parts_stored(root: &Path, upload_id: &str) -> usize {
    pending_files(root, upload_id)
        .iter()
        .filter(|n| n.contains(".part-"))
        .count()
}

/// Sends each slice of `data` to its part URL; returns the parts for the
/// completion.
async fn send_parts(up: &Value, data: &[u8]) -> Vec<Value> {
    let size = up["part_size"].as_u64().unwrap() as usize;
    let mut done = Vec::new();
    for (i, (part, chunk)) in up["parts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(data.chunks(size))
        .enumerate()
    {
        let r = put(part["url"].as_str().unwrap(), &json!({}), chunk.to_vec()).await;
        assert!(r.status().is_success(), "part {}", i + 1);
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        done.push(json!({"part_number": i + 1, "etag": etag}));
    }
    done
}

fn task_with_input(project: &str, object: &str) -> Value {
    let mut t = task_body(project);
    t["inputs"][0]["object"] = json!(object);
    t
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
async fn a_single_put_is_checked_by_the_store_and_usable_only_once_completed() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let project = app.project(&[("alice", "member")]).await;
    let data = b"pixels".repeat(1000);
    let (s, up) = app
        .post_v1(
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
    let upload_id = up["upload_id"].as_str().unwrap();
    let complete = json!({"name": "datasets/a.bin", "upload_id": upload_id});
    // Completed before the bytes arrived: nothing to check, nothing lost.
    let (s, e) = app.complete(&project, &alice, complete.clone()).await;
    assert_eq!(s, 409, "{e}");
    assert!(
        e["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("holds nothing of this upload yet"),
        "{e}"
    );
    let good = put(url, &up["headers"], data.clone()).await;
    assert!(good.status().is_success());
    let info = app.head(&project, "datasets/a.bin").await.unwrap();
    assert_eq!(
        (info.size, info.sha256),
        (data.len() as u64, Some(sha(&data)))
    );
    // Stored but not completed: no task may use it yet.
    let task = task_with_input(&project, "datasets/a.bin");
    let (s, e) = app.post_v1("/tasks", &alice, task.clone()).await;
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["errors"][0]["field"], "inputs[0].object");
    assert!(
        e["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("is not a verified object of the project"),
        "{e}"
    );
    let (s, stored) = app.complete(&project, &alice, complete.clone()).await;
    assert_eq!(s, 200, "{stored}");
    assert_eq!(
        (stored["size"].as_u64(), stored["sha256"].as_str()),
        (Some(data.len() as u64), Some(sha(&data).as_str()))
    );
    assert_eq!(app.upload_state(upload_id).await.0, "verified");
    // A completion sent again (its answer lost) gets the same answer.
    let (s, again) = app.complete(&project, &alice, complete).await;
    assert_eq!((s, &again), (StatusCode::OK, &stored));
    let (s, t) = app.post_v1("/tasks", &alice, task).await;
    assert_eq!(s, 201, "{t}");
}

#[tokio::test]
async fn a_file_larger_than_a_part_goes_up_in_parts_and_is_checked_when_completed() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let project = app.project(&[("alice", "member")]).await;
    let data: Vec<u8> = (0..(2 * PART + 12345)).map(|i| (i % 241) as u8).collect();
    let (s, up) = app
        .post_v1(
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
        .post_v1(
            &format!("/projects/{project}/objects/complete"),
            &alice,
            complete,
        )
        .await;
    assert_eq!(s, 200, "{stored}");
    assert_eq!(stored["size"], data.len());
    assert_eq!(stored["sha256"], sha(&data));

    let (s, refused) = app
        .post_v1(
            &format!("/projects/{project}/objects/complete"),
            &alice,
            json!({"name": "big.bin", "upload_id": "x", "size": -1, "parts": [{"part_number": 0, "etag": "e"}]}),
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
        .post_v1(
            &path,
            &alice,
            json!({"name": "../x", "size": -3, "sha256": "abc"}),
        )
        .await;
    assert_eq!(s, 422);
    assert_eq!(e["errors"].as_array().unwrap().len(), 3, "{e}");
    let body = json!({"name": "a", "size": 1, "sha256": sha(b"a")});
    assert_eq!(app.post_v1(&path, &viewer, body.clone()).await.0, 403);
    assert_eq!(app.post_v1(&path, &stranger, body).await.0, 404);
    // An artifact nobody stored, once the read models hold everything.
    app.catch_up().await;
    let (s, _) = app
        .call_v1(
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
    let (s, e) = app.post_v1("/tasks", &app.admin, task_body(&project)).await;
    assert_eq!(s, 422, "{e}");
    assert_eq!(e["errors"][0]["field"], "inputs");
    assert_eq!(e["errors"][1]["field"], "outputs");
    let upload = json!({"name": "a", "size": 1, "sha256": sha(b"a")});
    let (s, _) = app
        .post_v1(&format!("/projects/{project}/objects"), &app.admin, upload)
        .await;
    assert_eq!(s, 409);

    let app = start(true).await;
    let project = app.project(&[]).await;
    let mut bad = task_body(&project);
    bad["outputs"][0]["path"] = json!("../../etc/passwd");
    let (s, e) = app.post_v1("/tasks", &app.admin, bad).await;
    assert_eq!(s, 422);
    assert_eq!(e["errors"][0]["field"], "outputs[0].path");
    // An input must be a verified object of the project.
    let (s, e) = app.post_v1("/tasks", &app.admin, task_body(&project)).await;
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["errors"][0]["field"], "inputs[0].object", "{e}");
    app.upload(&project, &app.admin, "datasets/train.tar", b"tar")
        .await;
    let (s, t) = app.post_v1("/tasks", &app.admin, task_body(&project)).await;
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
    app.upload(&project, &app.admin, "datasets/train.tar", b"tar")
        .await;
    let (s, t) = app.post_v1("/tasks", &app.admin, task_body(&project)).await;
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

    // The list reads the task itself: the output is there at once, before
    // any read model took it in.
    let (s, list) = app
        .call_v1("GET", &format!("/tasks/{task_id}/artifacts"), &alice, None)
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
    let get = || {
        app.client
            .get(format!("{}/api/v1{download}", app.base))
            .bearer_auth(&alice)
            .send()
    };

    // No projector runs: the download cannot find the task and says the
    // list is behind, not that the output does not exist.
    let r = get().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().await.unwrap();
    assert!(
        e["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("behind the event log"),
        "{e}"
    );

    // A download asked for just before the projector takes the output in
    // waits for it and is answered.
    let asked = tokio::spawn(get());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !asked.is_finished(),
        "answered before the read model had it"
    );
    projections::Projector::new(app.pool.clone())
        .catch_up()
        .await
        .unwrap();
    let r = asked.await.unwrap().unwrap();
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let body = reqwest::get(&location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.as_ref(), data.as_slice());

    assert_eq!(app.call_v1("GET", download, &stranger, None).await.0, 404);
    let (s, _) = app
        .call_v1(
            "GET",
            &format!("/tasks/{task_id}/artifacts"),
            &stranger,
            None,
        )
        .await;
    assert_eq!(s, 404);
}

/// `(status, first error's field, first error's detail)` of a refusal.
fn refusal(answer: &(StatusCode, Value)) -> (u16, String, String) {
    let e = &answer.1["errors"][0];
    (
        answer.0.as_u16(),
        e["field"].as_str().unwrap_or_default().to_string(),
        e["detail"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test]
async fn a_multipart_upload_of_other_bytes_than_declared_is_deleted_and_refused_as_an_input() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let project = app.project(&[("alice", "member")]).await;
    let declared: Vec<u8> = (0..(PART + 100)).map(|i| (i % 251) as u8).collect();
    // A good version first: the lie replaces it and must not leave it
    // usable either.
    app.upload(&project, &alice, "model.bin", &declared).await;
    let (s, _) = app
        .post_v1("/tasks", &alice, task_with_input(&project, "model.bin"))
        .await;
    assert_eq!(s, 201);

    let mut sent = declared.clone();
    sent[PART as usize + 7] ^= 1;
    let up = app
        .start_upload(
            &project,
            &alice,
            "model.bin",
            declared.len(),
            &sha(&declared),
        )
        .await;
    assert_eq!(up["method"], "multipart");
    let parts = send_parts(&up, &sent).await;
    let complete = json!({
        "name": "model.bin", "upload_id": up["upload_id"], "size": declared.len(), "parts": parts
    });
    let answer = app.complete(&project, &alice, complete.clone()).await;
    assert_eq!(
        answer.1["errors"].as_array().unwrap().len(),
        1,
        "{}",
        answer.1
    );
    let (status, field, detail) = refusal(&answer);
    assert_eq!((status, field.as_str()), (422, "sha256"), "{detail}");
    assert!(
        detail.contains(&format!(
            "the stored bytes have SHA-256 {}, not the declared {}",
            sha(&sent),
            sha(&declared)
        )),
        "{detail}"
    );
    assert!(detail.ends_with("the object was deleted"), "{detail}");
    assert_eq!(app.head(&project, "model.bin").await, None);
    let upload_id = up["upload_id"].as_str().unwrap();
    assert_eq!(app.upload_state(upload_id).await.0, "rejected");

    let answer = app
        .post_v1("/tasks", &alice, task_with_input(&project, "model.bin"))
        .await;
    let (status, field, _) = refusal(&answer);
    assert_eq!((status, field.as_str()), (409, "inputs[0].object"));

    // Completing it again cannot bring it back.
    let (status, field, detail) = refusal(&app.complete(&project, &alice, complete).await);
    assert_eq!((status, field.as_str()), (409, "upload_id"));
    assert!(detail.contains("was refused"), "{detail}");
}

#[tokio::test]
async fn an_upload_of_fewer_bytes_than_declared_is_deleted_and_refused() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let project = app.project(&[("alice", "member")]).await;

    // Three parts declared, two sent and named.
    let data: Vec<u8> = (0..(2 * PART + 10)).map(|i| (i % 239) as u8).collect();
    let up = app
        .start_upload(&project, &alice, "short.bin", data.len(), &sha(&data))
        .await;
    assert_eq!(up["parts"].as_array().unwrap().len(), 3);
    let parts = send_parts(&up, &data[..2 * PART as usize]).await;
    let answer = app
        .complete(
            &project,
            &alice,
            json!({"name": "short.bin", "upload_id": up["upload_id"], "parts": parts}),
        )
        .await;
    let (status, field, detail) = refusal(&answer);
    assert_eq!((status, field.as_str()), (422, "size"), "{detail}");
    assert_eq!(
        detail,
        format!(
            "the store holds {} bytes, not the declared {}; the object was deleted",
            2 * PART,
            data.len()
        )
    );
    assert_eq!(app.head(&project, "short.bin").await, None);

    // One PUT: a body shorter than declared but matching the declared
    // SHA-256 gets past the store, not past the completion.
    let small = b"half of it".to_vec();
    let up = app
        .start_upload(&project, &alice, "small.txt", small.len() * 2, &sha(&small))
        .await;
    assert_eq!(up["method"], "put");
    let r = put(up["url"].as_str().unwrap(), &up["headers"], small.clone()).await;
    assert!(r.status().is_success());
    let answer = app
        .complete(
            &project,
            &alice,
            json!({"name": "small.txt", "upload_id": up["upload_id"]}),
        )
        .await;
    let (status, field, detail) = refusal(&answer);
    assert_eq!((status, field.as_str()), (422, "size"), "{detail}");
    assert!(
        detail.contains("holds 10 bytes, not the declared 20"),
        "{detail}"
    );
    assert_eq!(app.head(&project, "small.txt").await, None);
    let answer = app
        .post_v1("/tasks", &alice, task_with_input(&project, "small.txt"))
        .await;
    assert_eq!(refusal(&answer).0, 409);

    // A body that is not the declared one never gets past the store.
    let up = app
        .start_upload(&project, &alice, "cut.txt", small.len(), &sha(&small))
        .await;
    let r = put(
        up["url"].as_str().unwrap(),
        &up["headers"],
        small[..4].to_vec(),
    )
    .await;
    assert!(!r.status().is_success());
    let answer = app
        .complete(
            &project,
            &alice,
            json!({"name": "cut.txt", "upload_id": up["upload_id"]}),
        )
        .await;
    assert_eq!(refusal(&answer).0, 409);
}

#[tokio::test]
async fn completing_another_projects_upload_or_under_another_name_changes_nothing() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let vera = app.user("vera").await;
    let a = app
        .project(&[("alice", "member"), ("vera", "viewer")])
        .await;
    let b = app.project(&[("bob", "member")]).await;
    let data: Vec<u8> = (0..(PART + 1)).map(|i| (i % 7) as u8).collect();
    let up = app
        .start_upload(&a, &alice, "big.bin", data.len(), &sha(&data))
        .await;
    let upload_id = up["upload_id"].as_str().unwrap().to_string();
    let parts = send_parts(&up, &data).await;
    let body = |name: &str| json!({"name": name, "upload_id": upload_id, "parts": parts});

    // Another project's upload, under one's own project.
    let (status, field, _) = refusal(&app.complete(&b, &bob, body("big.bin")).await);
    assert_eq!((status, field.as_str()), (404, "upload_id"));
    // Straight at the other project: it does not exist for a stranger.
    assert_eq!(
        refusal(&app.complete(&a, &bob, body("big.bin")).await).0,
        404
    );
    // A viewer may not complete.
    assert_eq!(
        refusal(&app.complete(&a, &vera, body("big.bin")).await).0,
        403
    );
    // The upload under another name.
    let (status, field, detail) = refusal(&app.complete(&a, &alice, body("other.bin")).await);
    assert_eq!((status, field.as_str()), (409, "name"));
    assert!(detail.contains("is of object \"big.bin\""), "{detail}");
    // No parts, and nothing stored declaring this content.
    let no_parts = json!({"name": "big.bin", "upload_id": upload_id, "parts": []});
    let (status, field, _) = refusal(&app.complete(&a, &alice, no_parts).await);
    assert_eq!((status, field.as_str()), (422, "parts"));

    // Nothing changed: no object anywhere, the upload still pending with
    // its parts in the store.
    assert_eq!(app.head(&a, "big.bin").await, None);
    assert_eq!(app.head(&a, "other.bin").await, None);
    assert_eq!(app.head(&b, "big.bin").await, None);
    assert_eq!(app.upload_state(&upload_id).await.0, "pending");
    assert_eq!(parts_stored(&app.objects_root, &upload_id), 2);

    let (s, stored) = app.complete(&a, &alice, body("big.bin")).await;
    assert_eq!(s, 200, "{stored}");
    assert_eq!(stored["sha256"], sha(&data));
}

#[tokio::test]
async fn an_abandoned_multipart_upload_is_aborted_once_its_urls_expired_and_cannot_be_completed() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let project = app.project(&[("alice", "member")]).await;
    let data: Vec<u8> = (0..(PART + 5)).map(|i| (i % 13) as u8).collect();
    let up = app
        .start_upload(&project, &alice, "left.bin", data.len(), &sha(&data))
        .await;
    let upload_id = up["upload_id"].as_str().unwrap().to_string();
    let part_urls: Vec<String> = up["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["url"].as_str().unwrap().to_string())
        .collect();
    let first = put(&part_urls[0], &json!({}), data[..PART as usize].to_vec()).await;
    assert!(first.status().is_success());
    let etag = first.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(parts_stored(&app.objects_root, &upload_id), 1);
    assert!(pending_files(&app.objects_root, &upload_id).len() > 1);

    let expires: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT expires_at FROM object_uploads WHERE upload_id = $1")
            .bind(&upload_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let grace = Duration::from_secs(30);
    let sweeper = app.sweeper(grace);
    let second = chrono::Duration::seconds(1);
    for now in [Utc::now(), expires, expires + grace - second] {
        let o = sweeper.run_once(now).await.unwrap();
        assert_eq!(o.aborted, 0, "swept too early, at {now}");
    }
    assert_eq!(app.upload_state(&upload_id).await.0, "pending");

    let o = sweeper.run_once(expires + grace + second).await.unwrap();
    assert_eq!((o.aborted, o.failed), (1, 0));
    // The store holds nothing of it any more: no record, no part, and the
    // store itself refuses to go on with it.
    assert_eq!(
        pending_files(&app.objects_root, &upload_id),
        Vec::<String>::new()
    );
    let late = put(&part_urls[1], &json!({}), data[PART as usize..].to_vec()).await;
    assert!(
        !late.status().is_success(),
        "a part of an aborted upload was taken"
    );
    let key = app.key(&project, "left.bin");
    let objects = app.objects.as_ref().unwrap();
    assert!(objects
        .complete_multipart(&key, &upload_id, &[(1, etag.clone())])
        .await
        .is_err());
    assert_eq!(app.head(&project, "left.bin").await, None);

    let (state, detail) = app.upload_state(&upload_id).await;
    assert_eq!(state, "aborted");
    assert!(detail.unwrap().contains("the multipart upload was aborted"));
    let late = json!({"name": "left.bin", "upload_id": upload_id, "parts": [{"part_number": 1, "etag": etag}]});
    let (status, field, detail) = refusal(&app.complete(&project, &alice, late).await);
    assert_eq!((status, field.as_str()), (409, "upload_id"));
    assert!(detail.contains("was abandoned and aborted"), "{detail}");
    assert!(detail.contains("start a new upload"), "{detail}");
    // Swept once only.
    let o = sweeper.run_once(expires + grace * 10).await.unwrap();
    assert_eq!(o.aborted, 0);
}

#[tokio::test]
async fn two_sweepers_at_once_abort_each_abandoned_upload_once() {
    let app = start(true).await;
    let project = app.project(&[]).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let data = vec![i as u8; PART as usize + 1];
        let up = app
            .start_upload(
                &project,
                &app.admin,
                &format!("f{i}"),
                data.len(),
                &sha(&data),
            )
            .await;
        ids.push(up["upload_id"].as_str().unwrap().to_string());
    }
    let grace = Duration::from_secs(1);
    let later = Utc::now() + TTL * 2 + grace;
    let (one, two) = (app.sweeper(grace), app.sweeper(grace));
    let (a, b) = tokio::join!(one.run_once(later), two.run_once(later));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.aborted + b.aborted, a.failed + b.failed), (6, 0));
    for id in &ids {
        assert_eq!(app.upload_state(id).await.0, "aborted");
        assert!(pending_files(&app.objects_root, id).is_empty());
    }
}

#[tokio::test]
async fn an_archived_project_takes_no_uploads_and_completes_none() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let project = app.project(&[("alice", "member")]).await;
    let data = b"late".to_vec();
    let up = app
        .start_upload(&project, &alice, "late.txt", data.len(), &sha(&data))
        .await;
    let r = put(up["url"].as_str().unwrap(), &up["headers"], data.clone()).await;
    assert!(r.status().is_success());
    let (s, p) = app
        .post_v1(
            &format!("/projects/{project}/archive"),
            &app.admin,
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{p}");

    let complete = json!({"name": "late.txt", "upload_id": up["upload_id"]});
    let (status, _, detail) = refusal(&app.complete(&project, &alice, complete).await);
    assert_eq!(status, 409);
    assert!(detail.contains("the project is archived"), "{detail}");
    let (status, _, detail) = refusal(
        &app.post_v1(
            &format!("/projects/{project}/objects"),
            &alice,
            json!({"name": "new.txt", "size": 1, "sha256": sha(b"x")}),
        )
        .await,
    );
    assert_eq!(status, 409);
    assert!(detail.contains("the project is archived"), "{detail}");
    assert_eq!(
        app.upload_state(up["upload_id"].as_str().unwrap()).await.0,
        "pending"
    );
    let uploads: i64 = sqlx::query_scalar("SELECT count(*) FROM object_uploads")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(uploads, 1);
}

#[tokio::test]
async fn an_object_stored_before_uploads_were_verified_is_usable_only_once_a_completion_read_it() {
    let app = start(true).await;
    let project = app.project(&[]).await;
    let objects = app.objects.as_ref().unwrap();
    // As single PUTs left objects before: in the store with their SHA-256,
    // never read back.
    let data = b"old dataset\n".repeat(100);
    let p = objects
        .presign_put(&app.key(&project, "old.txt"), Some(&sha(&data)))
        .await
        .unwrap();
    let headers = serde_json::to_value(&p.headers).unwrap();
    assert!(put(&p.url, &headers, data.clone())
        .await
        .status()
        .is_success());
    let task = task_with_input(&project, "old.txt");
    assert_eq!(
        refusal(&app.post_v1("/tasks", &app.admin, task.clone()).await).0,
        409
    );
    // An upload declaring the same, completed without sending anything:
    // the server reads what is there.
    let up = app
        .start_upload(&project, &app.admin, "old.txt", data.len(), &sha(&data))
        .await;
    let complete = json!({"name": "old.txt", "upload_id": up["upload_id"]});
    let (s, stored) = app.complete(&project, &app.admin, complete).await;
    assert_eq!(s, 200, "{stored}");
    let (s, t) = app.post_v1("/tasks", &app.admin, task).await;
    assert_eq!(s, 201, "{t}");

    // As multipart uploads left objects before: declaring a SHA-256 their
    // parts never had. Checked in place, they are found out.
    let declared = vec![1u8; PART as usize + 3];
    let mut sent = declared.clone();
    sent[0] = 2;
    let key = app.key(&project, "old.bin");
    let id = objects
        .start_multipart(&key, Some(&sha(&declared)))
        .await
        .unwrap();
    let mut parts = Vec::new();
    for (i, chunk) in sent.chunks(PART as usize).enumerate() {
        let n = i as u32 + 1;
        let p = objects.presign_part(&key, &id, n, None).await.unwrap();
        let r = put(&p.url, &json!({}), chunk.to_vec()).await;
        parts.push((n, r.headers()["etag"].to_str().unwrap().to_string()));
    }
    objects.complete_multipart(&key, &id, &parts).await.unwrap();
    let up = app
        .start_upload(
            &project,
            &app.admin,
            "old.bin",
            declared.len(),
            &sha(&declared),
        )
        .await;
    assert_eq!(up["method"], "multipart");
    let upload_id = up["upload_id"].as_str().unwrap();
    let complete = json!({"name": "old.bin", "upload_id": upload_id});
    let (status, field, _) = refusal(&app.complete(&project, &app.admin, complete).await);
    assert_eq!((status, field.as_str()), (422, "sha256"));
    assert_eq!(app.head(&project, "old.bin").await, None);
    // The multipart upload the check did not need is gone too.
    assert!(pending_files(&app.objects_root, upload_id).is_empty());
}

#[tokio::test]
async fn parts_the_store_will_not_assemble_are_refused_naming_the_parts() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let project = app.project(&[("alice", "member")]).await;
    let data: Vec<u8> = vec![9; PART as usize + 1];
    let up = app
        .start_upload(&project, &alice, "tiny-parts.bin", data.len(), &sha(&data))
        .await;
    // Two parts of a few bytes each: S3 wants every part but the last to
    // have 5 MiB.
    let mut parts = Vec::new();
    for (i, part) in up["parts"].as_array().unwrap().iter().enumerate() {
        let r = put(part["url"].as_str().unwrap(), &json!({}), vec![9; 100]).await;
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        parts.push(json!({"part_number": i + 1, "etag": etag}));
    }
    let upload_id = up["upload_id"].as_str().unwrap();
    let body = json!({"name": "tiny-parts.bin", "upload_id": upload_id, "parts": parts});
    let (status, field, detail) = refusal(&app.complete(&project, &alice, body).await);
    assert_eq!((status, field.as_str()), (422, "parts"), "{detail}");
    assert!(detail.contains("EntityTooSmall"), "{detail}");
    assert_eq!(app.upload_state(upload_id).await.0, "pending");
    assert_eq!(app.head(&project, "tiny-parts.bin").await, None);
}

#[tokio::test]
async fn two_completions_of_one_upload_at_once_verify_it_once() {
    let app = start(true).await;
    let alice = app.user("alice").await;
    let project = app.project(&[("alice", "member")]).await;
    let data: Vec<u8> = (0..(2 * PART + 99)).map(|i| (i % 101) as u8).collect();
    let up = app
        .start_upload(&project, &alice, "twice.bin", data.len(), &sha(&data))
        .await;
    let parts = send_parts(&up, &data).await;
    let body = json!({"name": "twice.bin", "upload_id": up["upload_id"], "parts": parts});
    let (one, two) = tokio::join!(
        app.complete(&project, &alice, body.clone()),
        app.complete(&project, &alice, body.clone())
    );
    let mut verified = 0;
    for answer in [&one, &two] {
        match answer.0.as_u16() {
            200 => {
                assert_eq!(answer.1["sha256"], sha(&data));
                verified += 1;
            }
            409 => {
                let (_, field, detail) = refusal(answer);
                assert_eq!(field, "upload_id");
                assert!(detail.contains("another completion"), "{detail}");
            }
            other => panic!("a completion answered {other}: {}", answer.1),
        }
    }
    assert!(verified >= 1);
    assert_eq!(
        app.upload_state(up["upload_id"].as_str().unwrap()).await.0,
        "verified"
    );
    let info = app.head(&project, "twice.bin").await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    // Whatever the first answers were, the next one is the object.
    let (s, stored) = app.complete(&project, &alice, body).await;
    assert_eq!((s.as_u16(), &stored["sha256"]), (200, &json!(sha(&data))));
}
