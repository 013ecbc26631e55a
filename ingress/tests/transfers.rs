//! Transfer URLs against a real PostgreSQL, the embedded S3 store and a
//! real WebSocket: a node gets URLs only for the inputs and outputs of its
//! own running attempt, an input only while the store holds what a
//! completed upload verified, and an upload is recorded only once the store
//! holds it intact.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers fail the test loudly on anything unexpected"
)]

mod support;

use std::time::Duration;

use chrono::Utc;
use domain::spec::{InputDraft, OutputDraft, TaskSpecDraft, UrlPolicy};
use domain::task::Task;
use futures::{SinkExt, StreamExt};
use ingress::{Config, Ingress};
use objects::embedded::{fresh_credentials, Embedded};
use objects::uploads::{Completion, NewUpload, Uploads};
use objects::ObjectStore;
use protocol::{
    AgentMessage, Hello, ServerMessage, TransferGrant, TransferOp, TransferRequest, UploadedPart,
};
use sha2::{Digest, Sha256};
use store::Store;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use support::{provision, Ws};

async fn join(addr: std::net::SocketAddr, token: &str) -> Ws {
    let mut ws = support::connect(addr, token).await;
    let hello = AgentMessage::Hello(Hello {
        agent_version: "0.1.0-test".into(),
        ..Hello::default()
    });
    ws.send(Message::Text(protocol::encode(&hello).into()))
        .await
        .unwrap();
    ask_raw(&mut ws, None).await;
    ws
}

/// Sends `request` (if any) and returns the next transfer answer, skipping
/// everything else (the welcome, commands).
async fn ask_raw(ws: &mut Ws, request: Option<TransferRequest>) -> Option<TransferGrant> {
    if let Some(r) = request {
        let m = AgentMessage::TransferRequest(r);
        ws.send(Message::Text(protocol::encode(&m).into()))
            .await
            .unwrap();
    }
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(text) = frame {
            match protocol::decode::<ServerMessage>(text.as_str()).unwrap() {
                ServerMessage::TransferUrl(g) => return Some(g),
                ServerMessage::Welcome { .. } => return None,
                _ => {}
            }
        }
    }
}

async fn ask(ws: &mut Ws, task_id: Uuid, op: TransferOp) -> TransferGrant {
    let r = TransferRequest {
        id: 7,
        task_id,
        attempt: 1,
        op,
    };
    let g = ask_raw(ws, Some(r)).await.unwrap();
    assert_eq!(g.id, 7);
    g
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A database, the embedded store and an ingress serving both.
struct Platform {
    store: Store,
    objects: ObjectStore,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

async fn platform() -> Platform {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let (access, secret) = fresh_credentials();
    let embedded = Embedded::new(dir.path(), "unidesk", &access, secret).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let objects =
        ObjectStore::new(&embedded.client_config(&endpoint, Duration::from_secs(60))).unwrap();
    tokio::spawn(embedded.run(listener, std::future::pending()));

    let ingress =
        Ingress::new(store.clone(), Config::default()).with_objects(Some(objects.clone()));
    let addr = support::serve(&ingress).await;
    Platform {
        store,
        objects,
        addr,
        _dir: dir,
    }
}

/// A task of project `project_id` with input `in.txt` (object `object`)
/// and output `model`, assigned to `node`.
async fn assigned_task(store: &Store, project_id: Uuid, object: &str, node: Uuid) -> Uuid {
    let spec = TaskSpecDraft {
        project_id: Some(project_id),
        code_repo_url: Some("https://example.com/code.git".into()),
        code_commit_id: Some("a".repeat(40)),
        env_repo_url: Some("https://example.com/env.git".into()),
        env_commit_id: Some("b".repeat(40)),
        dockerfile_path: Some("Dockerfile".into()),
        inputs: Some(vec![InputDraft {
            name: Some("in.txt".into()),
            object: Some(object.into()),
        }]),
        outputs: Some(vec![OutputDraft {
            name: Some("model".into()),
            path: Some("model.bin".into()),
        }]),
        ..Default::default()
    }
    .validate(UrlPolicy::default())
    .unwrap();
    let task_id = support::submit_spec(store, spec).await;
    support::assign(store, task_id, node).await;
    task_id
}

/// Puts `data` as the object under `key`, as a presigned single PUT does.
async fn put_object(objects: &ObjectStore, key: &str, data: &[u8]) {
    let p = objects.presign_put(key, Some(&sha(data))).await.unwrap();
    let mut put = reqwest::Client::new().put(&p.url).body(data.to_vec());
    for (k, v) in &p.headers {
        put = put.header(k, v);
    }
    assert!(put.send().await.unwrap().status().is_success());
}

#[tokio::test]
async fn an_input_is_granted_only_while_the_store_holds_what_a_completed_upload_verified() {
    let p = platform().await;
    let (node, token) = provision(&p.store).await;
    let project = Uuid::new_v4();
    let task = assigned_task(&p.store, project, "data/in.txt", node).await;
    let mut ws = join(p.addr, &token).await;
    let download = || TransferOp::Download {
        input: "in.txt".into(),
    };
    let key = objects::keys::project_object(project, "data/in.txt");

    // In the store, but no upload of it was ever completed.
    let data = b"verified bytes\n".repeat(20);
    put_object(&p.objects, &key, &data).await;
    let g = ask(&mut ws, task, download()).await;
    assert!(g.url.is_none());
    let e = g.error.unwrap();
    assert!(
        e.starts_with("input in.txt: object \"data/in.txt\" was never verified"),
        "{e}"
    );

    // Completed through the record: read back and verified.
    let uploads = Uploads::new(p.store.pool().clone());
    let now = Utc::now();
    let upload = uploads
        .start(NewUpload {
            project_id: project,
            name: "data/in.txt".into(),
            size: data.len() as u64,
            sha256: sha(&data),
            multipart_id: None,
            started_by: "user:admin".into(),
            started_at: now,
            expires_at: now + chrono::Duration::seconds(60),
        })
        .await
        .unwrap();
    let done = uploads.complete(&p.objects, &upload, &[]).await.unwrap();
    assert!(matches!(done, Completion::Verified(_)), "{done:?}");
    let g = ask(&mut ws, task, download()).await;
    assert_eq!(g.error, None);
    assert!(g.url.unwrap().contains("/objects/data/in.txt?"));
    assert_eq!(
        (g.size, g.sha256, g.blake3),
        (
            Some(data.len() as u64),
            Some(sha(&data)),
            Some(blake3::hash(&data).to_hex().to_string())
        ),
        "the grant names the digests of the bytes the server read back"
    );

    // Verified before BLAKE3 was recorded: the grant names the SHA-256
    // alone, which the agent checks as before.
    sqlx::query("UPDATE project_objects SET blake3 = NULL WHERE name = 'data/in.txt'")
        .execute(p.store.pool())
        .await
        .unwrap();
    let g = ask(&mut ws, task, download()).await;
    assert_eq!((g.sha256, g.blake3), (Some(sha(&data)), None));

    // Replaced by bytes nobody completed: refused again.
    put_object(&p.objects, &key, b"something else").await;
    let g = ask(&mut ws, task, download()).await;
    assert!(g.url.is_none());
    let e = g.error.unwrap();
    assert!(
        e.starts_with("input in.txt: object \"data/in.txt\" changed after it was verified"),
        "{e}"
    );
}

#[tokio::test]
async fn a_node_gets_urls_only_for_its_own_running_attempts_named_files() {
    let p = platform().await;
    let (store, addr) = (p.store.clone(), p.addr);
    let (node_a, token_a) = provision(&store).await;
    let (_, token_b) = provision(&store).await;
    let spec = TaskSpecDraft {
        project_id: Some(Uuid::new_v4()),
        code_repo_url: Some("https://example.com/code.git".into()),
        code_commit_id: Some("a".repeat(40)),
        env_repo_url: Some("https://example.com/env.git".into()),
        env_commit_id: Some("b".repeat(40)),
        dockerfile_path: Some("Dockerfile".into()),
        inputs: Some(vec![InputDraft {
            name: Some("in.txt".into()),
            object: Some("missing/in.txt".into()),
        }]),
        outputs: Some(vec![OutputDraft {
            name: Some("model".into()),
            path: Some("model.bin".into()),
        }]),
        ..Default::default()
    }
    .validate(UrlPolicy::default())
    .unwrap();
    let task_id = support::submit_spec(&store, spec).await;
    support::assign(&store, task_id, node_a).await;

    let mut a = join(addr, &token_a).await;
    let mut b = join(addr, &token_b).await;
    let data = b"weights".to_vec();
    let upload = TransferOp::Upload {
        output: "model".into(),
        size: data.len() as u64,
        sha256: Some(sha(&data)),
        parts: 1,
    };

    let g = ask(&mut b, task_id, upload.clone()).await;
    assert_eq!(
        g.error.as_deref(),
        Some("attempt 1 of this task is not running on this node")
    );
    assert!(g.url.is_none());

    let other = TransferOp::Upload {
        output: "secrets".into(),
        size: 1,
        sha256: Some(sha(b"x")),
        parts: 1,
    };
    let g = ask(&mut a, task_id, other).await;
    assert_eq!(
        g.error.as_deref(),
        Some("the task has no output named \"secrets\"")
    );

    let download = TransferOp::Download {
        input: "in.txt".into(),
    };
    let g = ask(&mut a, task_id, download).await;
    let e = g.error.unwrap();
    assert!(e.contains("does not exist in the project's store"), "{e}");

    // The real upload: a URL bound to this output's key, then the record.
    let g = ask(&mut a, task_id, upload).await;
    assert_eq!(g.error, None);
    let url = g.url.unwrap();
    assert!(url.contains(&format!("/tasks/{task_id}/1/model?")), "{url}");
    let mut put = reqwest::Client::new().put(&url).body(data.clone());
    for (k, v) in &g.headers {
        put = put.header(k, v);
    }
    assert!(put.send().await.unwrap().status().is_success());
    // A completion that lies about the content is refused, and deletes it.
    let lie = TransferOp::Complete {
        output: "model".into(),
        upload_id: None,
        parts: vec![],
        size: 999,
        sha256: sha(&data),
    };
    let e = ask(&mut a, task_id, lie).await.error.unwrap();
    assert!(e.contains("the object was deleted"), "{e}");
    let task = store.load::<Task>(&task_id.to_string()).await.unwrap();
    assert!(task.unwrap().state.artifacts.is_empty());
}

/// PUTs `body` to a granted URL with its signed headers.
async fn put_granted(g: &TransferGrant, body: Vec<u8>) -> reqwest::Response {
    let mut put = reqwest::Client::new()
        .put(g.url.as_deref().unwrap())
        .body(body);
    for (k, v) in &g.headers {
        put = put.header(k, v);
    }
    put.send().await.unwrap()
}

#[tokio::test]
async fn a_multipart_upload_names_the_whole_hash_at_completion_and_each_part_is_checked() {
    let p = platform().await;
    let (node, token) = provision(&p.store).await;
    let project_id = Uuid::new_v4();
    let task_id = assigned_task(&p.store, project_id, "any/in.txt", node).await;
    let mut ws = join(p.addr, &token).await;
    let part = 5 * 1024 * 1024;
    let data: Vec<u8> = (0..part + 1000).map(|i| (i * 7 % 251) as u8).collect();
    let size = data.len() as u64;
    let start = |sha256: Option<String>, parts: u32| TransferOp::Upload {
        output: "model".into(),
        size,
        sha256,
        parts,
    };

    // One PUT is bound to the file's hash, so it must come first.
    let e = ask(&mut ws, task_id, start(None, 1)).await.error.unwrap();
    assert_eq!(
        e,
        "output model: a one-part upload names the file's sha256 at its start"
    );

    let g = ask(&mut ws, task_id, start(None, 2)).await;
    assert_eq!(g.error, None);
    let upload_id = g.upload_id.unwrap();
    let mut uploaded = Vec::new();
    for (i, body) in data.chunks(part).enumerate() {
        let number = i as u32 + 1;
        let op = TransferOp::UploadPart {
            output: "model".into(),
            upload_id: upload_id.clone(),
            part_number: number,
            sha256: sha(body),
        };
        let g = ask(&mut ws, task_id, op).await;
        assert_eq!(g.error, None);
        // The store takes no other body than the one the part was hashed as.
        let mut changed = body.to_vec();
        changed[body.len() / 2] ^= 1;
        let refused = put_granted(&g, changed).await;
        assert!(!refused.status().is_success(), "{}", refused.status());
        let sent = put_granted(&g, body.to_vec()).await;
        assert!(sent.status().is_success(), "{}", sent.status());
        let etag = sent.headers()["etag"].to_str().unwrap().to_string();
        uploaded.push(UploadedPart {
            part_number: number,
            etag,
        });
    }
    let complete = |sha256: String| TransferOp::Complete {
        output: "model".into(),
        upload_id: Some(upload_id.clone()),
        parts: uploaded.clone(),
        size,
        sha256,
    };
    let e = ask(&mut ws, task_id, complete("A".repeat(64)))
        .await
        .error
        .unwrap();
    assert_eq!(e, "sha256 must be 64 lower-case hex digits");
    let g = ask(&mut ws, task_id, complete(sha(&data))).await;
    assert_eq!(g.error, None);

    let task = p.store.load::<Task>(&task_id.to_string()).await.unwrap();
    let artifacts = task.unwrap().state.artifacts;
    assert_eq!(artifacts.len(), 1);
    assert_eq!(
        (artifacts[0].size, artifacts[0].sha256.as_str()),
        (size, sha(&data).as_str())
    );
    let stored = p
        .objects
        .read_back(&artifacts[0].key, size)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored,
        objects::ReadBack::Whole {
            size,
            sha256: sha(&data),
            blake3: blake3::hash(&data).to_hex().to_string(),
        },
        "the store holds exactly what was recorded"
    );
}

#[tokio::test]
async fn a_multipart_upload_naming_its_hash_at_the_start_is_still_accepted() {
    let p = platform().await;
    let (node, token) = provision(&p.store).await;
    let task_id = assigned_task(&p.store, Uuid::new_v4(), "any/in.txt", node).await;
    let mut ws = join(p.addr, &token).await;
    let part = 5 * 1024 * 1024;
    let data: Vec<u8> = (0..part + 10).map(|i| (i % 13) as u8).collect();
    let size = data.len() as u64;
    // What agents sent before the hash could wait for the completion.
    let start = TransferOp::Upload {
        output: "model".into(),
        size,
        sha256: Some(sha(&data)),
        parts: 2,
    };
    let g = ask(&mut ws, task_id, start).await;
    assert_eq!(g.error, None);
    let upload_id = g.upload_id.unwrap();
    let mut uploaded = Vec::new();
    for (i, body) in data.chunks(part).enumerate() {
        let number = i as u32 + 1;
        let op = TransferOp::UploadPart {
            output: "model".into(),
            upload_id: upload_id.clone(),
            part_number: number,
            sha256: sha(body),
        };
        let g = ask(&mut ws, task_id, op).await;
        let sent = put_granted(&g, body.to_vec()).await;
        assert!(sent.status().is_success(), "{}", sent.status());
        let etag = sent.headers()["etag"].to_str().unwrap().to_string();
        uploaded.push(UploadedPart {
            part_number: number,
            etag,
        });
    }
    let complete = TransferOp::Complete {
        output: "model".into(),
        upload_id: Some(upload_id),
        parts: uploaded,
        size,
        sha256: sha(&data),
    };
    assert_eq!(ask(&mut ws, task_id, complete).await.error, None);
    let task = p.store.load::<Task>(&task_id.to_string()).await.unwrap();
    let artifacts = task.unwrap().state.artifacts;
    let info = p.objects.head(&artifacts[0].key).await.unwrap().unwrap();
    assert_eq!(
        (info.size, info.sha256),
        (size, Some(sha(&data))),
        "the store keeps the hash named at the start"
    );
}
