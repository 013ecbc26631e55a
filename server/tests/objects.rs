//! Large files end to end across real processes: `unidesk serve` pointed
//! at the embedded S3 store (s3s over s3s-fs, served by this test process
//! on a local port), a real `unidesk-agent` over a real WebSocket, real
//! Docker containers and real git repositories. The agent and the API
//! move every byte through presigned URLs.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::path::PathBuf;
use std::time::Duration;

use objects::embedded::{fresh_credentials, Embedded};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use support::{base_image, repo, repo_with_links, spawn_agent, Agents, EnvImage, BASE};
use testkit::process::{Api, Launch, ServerProcess};

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

struct Platform {
    /// `http://127.0.0.1:PORT` of the server.
    base: String,
    api: Api,
    dir: tempfile::TempDir,
    /// Where the embedded store listens.
    store: String,
    /// Where the embedded store keeps its bucket's files.
    bucket_dir: PathBuf,
    stop_store: Option<tokio::sync::oneshot::Sender<()>>,
    project: String,
    code: (String, String),
    env: (String, String),
    _agent: Agents,
    _server: ServerProcess,
    _image: EnvImage,
}

impl Platform {
    async fn start() -> Platform {
        base_image();
        let db = testkit::fresh_db().await;
        let dir = tempfile::tempdir().unwrap();
        // The embedded store, in this process.
        let (access, secret) = fresh_credentials();
        let objects_root = dir.path().join("objects");
        let embedded = Embedded::new(&objects_root, "unidesk", &access, secret.clone()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let store = listener.local_addr().unwrap().to_string();
        let endpoint = format!("http://{store}");
        let (stop_store, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(embedded.run(listener, async {
            let _ = stopped.await;
        }));

        let server = support::serve_with(
            &db.url,
            &[
                "--allow-file-urls",
                "--heartbeat-s",
                "1",
                "--poll-ms",
                "100",
                "--s3-part-mb",
                "5",
            ],
            |launch| {
                launch
                    .args(["--s3-endpoint", &endpoint, "--s3-bucket", "unidesk"])
                    .env("UNIDESK_S3_ACCESS_KEY", &access)
                    .env("UNIDESK_S3_SECRET_KEY", secret.expose())
            },
        )
        .await;
        // Downloads answer with a redirect to the store, which the tests
        // look at rather than follow.
        let api = Api {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            ..server.api()
        };
        let code = repo(dir.path(), "code", &[("README", "code\n")]);
        let env = repo(
            dir.path(),
            "env",
            &[("Dockerfile", &format!("FROM {BASE}\n"))],
        );
        let project = api.post("/projects", json!({"name": "files"})).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let node = api.post("/nodes", json!({"name": "worker"})).await;
        let agent = spawn_agent(
            &server.ws(),
            node["token"].as_str().unwrap(),
            &dir.path().join("agent"),
            &[
                "--cpus",
                "2",
                "--memory-mb",
                "2048",
                "--no-gpus",
                "--part-mb",
                "5",
            ],
        );
        Platform {
            base: server.base().to_string(),
            api,
            bucket_dir: objects_root.join("unidesk"),
            dir,
            store,
            stop_store: Some(stop_store),
            project,
            code,
            _image: EnvImage::of(&env, "Dockerfile"),
            env,
            _agent: Agents(vec![agent]),
            _server: server,
        }
    }

    /// Sends `data` as object `name` of the project through the API, in
    /// one PUT, without completing the upload; returns its `upload_id`.
    async fn send(&self, name: &str, data: &[u8]) -> Value {
        let up = self
            .api
            .post(
                &format!("/projects/{}/objects", self.project),
                json!({"name": name, "size": data.len(), "sha256": sha(data)}),
            )
            .await;
        let mut req = reqwest::Client::new()
            .put(up["url"].as_str().unwrap())
            .body(data.to_vec());
        for (k, v) in up["headers"].as_object().unwrap() {
            req = req.header(k, v.as_str().unwrap());
        }
        assert!(req.send().await.unwrap().status().is_success());
        up["upload_id"].clone()
    }

    /// Uploads `data` as object `name` of the project through the API, in
    /// one PUT or in parts, and completes the upload, so tasks may use it.
    async fn upload(&self, name: &str, data: &[u8]) {
        let up = self
            .api
            .post(
                &format!("/projects/{}/objects", self.project),
                json!({"name": name, "size": data.len(), "sha256": sha(data)}),
            )
            .await;
        let client = reqwest::Client::new();
        let mut complete = json!({"name": name, "upload_id": up["upload_id"]});
        if up["method"] == "put" {
            let mut req = client.put(up["url"].as_str().unwrap()).body(data.to_vec());
            for (k, v) in up["headers"].as_object().unwrap() {
                req = req.header(k, v.as_str().unwrap());
            }
            assert!(req.send().await.unwrap().status().is_success());
        } else {
            let size = up["part_size"].as_u64().unwrap() as usize;
            let mut parts = Vec::new();
            for (i, (part, chunk)) in up["parts"]
                .as_array()
                .unwrap()
                .iter()
                .zip(data.chunks(size))
                .enumerate()
            {
                let r = client
                    .put(part["url"].as_str().unwrap())
                    .body(chunk.to_vec())
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
                let etag = r.headers()["etag"].to_str().unwrap().to_string();
                parts.push(json!({"part_number": i + 1, "etag": etag}));
            }
            complete["parts"] = json!(parts);
        }
        let stored = self
            .api
            .post(
                &format!("/projects/{}/objects/complete", self.project),
                complete,
            )
            .await;
        assert_eq!(stored["sha256"], sha(data), "{stored}");
    }

    /// A task running `script` with `inputs` and `outputs`.
    fn task(&self, script: &str, inputs: Value, outputs: Value) -> Value {
        json!({
            "project_id": self.project,
            "code_repo_url": self.code.0, "code_commit_id": self.code.1,
            "env_repo_url": self.env.0, "env_commit_id": self.env.1,
            "dockerfile_path": "Dockerfile",
            "command": ["sh", "-c", script],
            "resources": {"cpus": 1, "memory_mb": 256},
            "inputs": inputs, "outputs": outputs, "max_retries": 0
        })
    }

    /// Submits a task running `script` with `inputs` and `outputs`; waits
    /// for its end.
    async fn run(&self, script: &str, inputs: Value, outputs: Value) -> Value {
        let t = self
            .api
            .post("/tasks", self.task(script, inputs, outputs))
            .await;
        let id = t["id"].as_str().unwrap();
        support::task_in(
            &self.api,
            id,
            &["succeeded", "failed", "timed_out", "cancelled"],
        )
        .await
    }

    async fn artifacts(&self, task: &Value) -> Vec<Value> {
        let id = task["id"].as_str().unwrap();
        self.api.get(&format!("/tasks/{id}/artifacts")).await["items"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Follows an artifact's download redirect and returns the content.
    async fn download(&self, artifact: &Value) -> Vec<u8> {
        let r = self
            .api
            .http
            .get(format!(
                "{}{}",
                self.base,
                artifact["download"].as_str().unwrap()
            ))
            .bearer_auth(&self.api.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 302);
        let url = r.headers()["location"].to_str().unwrap().to_string();
        reqwest::get(url)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec()
    }

    async fn timeline(&self, task: &Value) -> String {
        let id = task["id"].as_str().unwrap();
        let page = self
            .api
            .get(&format!(
                "/events?aggregate_type=task&aggregate_id={id}&limit=1000"
            ))
            .await;
        page.to_string()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn inputs_reach_the_workspace_and_outputs_are_kept_also_when_the_task_fails() {
    let p = Platform::start().await;
    let input = b"training data\n".repeat(100);
    p.upload("datasets/train.txt", &input).await;
    // 6 MiB and a bit: uploaded in two parts, verified at completion.
    let weights: Vec<u8> = (0..6 * 1024 * 1024 + 7).map(|i| (i % 253) as u8).collect();
    p.upload("datasets/weights.bin", &weights).await;
    // 12 MiB of output: more than two 5 MiB parts.
    let script = format!(
        "mkdir -p out && cp data/train.txt out/copy.txt \
         && [ \"$(sha256sum w.bin | cut -d' ' -f1)\" = {} ] \
         && head -c 12582912 /dev/urandom > out/big.bin && echo done && exit 3",
        sha(&weights)
    );
    let done = p
        .run(
            &script,
            json!([
                {"name": "data/train.txt", "object": "datasets/train.txt"},
                {"name": "w.bin", "object": "datasets/weights.bin"}
            ]),
            json!([{"name": "copy", "path": "out/copy.txt"}, {"name": "big", "path": "out/big.bin"}]),
        )
        .await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["exit_code"], 3, "{done}");
    assert!(
        p.timeline(&done).await.contains("inputs ready"),
        "the timeline names the input stage"
    );
    let artifacts = p.artifacts(&done).await;
    assert_eq!(artifacts.len(), 2, "{artifacts:?}");
    let copy = artifacts.iter().find(|a| a["name"] == "copy").unwrap();
    assert_eq!(copy["size"], input.len());
    assert_eq!(copy["sha256"], sha(&input));
    assert_eq!(p.download(copy).await, input);
    let big = artifacts.iter().find(|a| a["name"] == "big").unwrap();
    assert_eq!(big["size"], 12_582_912);
    let content = p.download(big).await;
    assert_eq!(content.len(), 12_582_912);
    assert_eq!(big["sha256"], sha(&content));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_and_outputs_and_a_dead_store_fail_the_task_clearly_keeping_the_rest() {
    let mut p = Platform::start().await;
    // An output leading out of the workspace, one missing, one fine.
    let done = p
        .run(
            "mkdir -p out && echo ok > out/ok.txt && ln -s /etc/hostname out/link",
            json!([]),
            json!([
                {"name": "good", "path": "out/ok.txt"},
                {"name": "escape", "path": "out/link"},
                {"name": "missing", "path": "out/nothing.bin"}
            ]),
        )
        .await;
    assert_eq!(done["state"], "failed", "{done}");
    let reason = done["reason"].as_str().unwrap();
    assert!(reason.contains("the command succeeded"), "{reason}");
    assert!(
        reason.contains("output escape: out/link leads out of the workspace"),
        "{reason}"
    );
    assert!(
        reason.contains("output missing: out/nothing.bin does not exist"),
        "{reason}"
    );
    let artifacts = p.artifacts(&done).await;
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    assert_eq!(artifacts[0]["name"], "good");
    assert_eq!(p.download(&artifacts[0]).await, b"ok\n");

    // An input no completed upload verified is refused at submission.
    let task = p.task(
        "echo never",
        json!([{"name": "x", "object": "nowhere/x"}]),
        json!([]),
    );
    let (status, e) = p
        .api
        .call(reqwest::Method::POST, "/tasks", Some(task))
        .await;
    assert_eq!(status, 409, "{e}");
    assert_eq!(e["errors"][0]["field"], "inputs[0].object", "{e}");

    // An input replaced, after its upload was verified, by bytes whose
    // upload was never completed: the node is refused it, the command
    // never runs.
    let first = b"first version\n".repeat(10);
    p.upload("datasets/v.txt", &first).await;
    p.send("datasets/v.txt", b"second version, never completed\n")
        .await;
    let done = p
        .run(
            "echo never",
            json!([{"name": "v.txt", "object": "datasets/v.txt"}]),
            json!([]),
        )
        .await;
    assert_eq!(done["state"], "failed", "{done}");
    let reason = done["reason"].as_str().unwrap();
    assert!(
        reason.contains("input v.txt: object \"datasets/v.txt\" changed after it was verified"),
        "{reason}"
    );

    // An input whose stored bytes were corrupted after the upload.
    let data = b"exact bytes\n".repeat(50);
    p.upload("datasets/c.txt", &data).await;
    let stored = p
        .bucket_dir
        .join(format!("projects/{}/objects/datasets/c.txt", p.project));
    let mut bad = std::fs::read(&stored).unwrap();
    bad[3] ^= 0x20;
    std::fs::write(&stored, bad).unwrap();
    let done = p
        .run(
            "cat c.txt",
            json!([{"name": "c.txt", "object": "datasets/c.txt"}]),
            json!([]),
        )
        .await;
    assert_eq!(done["state"], "failed");
    let reason = done["reason"].as_str().unwrap();
    assert!(
        reason.contains("input c.txt: object \"datasets/c.txt\" arrived corrupted"),
        "{reason}"
    );

    // The store goes away: the output fails, saying why.
    let _ = p.stop_store.take().unwrap().send(());
    testkit::eventually(
        "the object store to stop listening",
        Duration::from_secs(10),
        || async {
            tokio::net::TcpStream::connect(&p.store)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    let done = p
        .run(
            "echo x > o.txt",
            json!([]),
            json!([{"name": "o", "path": "o.txt"}]),
        )
        .await;
    assert_eq!(done["state"], "failed", "{done}");
    let reason = done["reason"].as_str().unwrap();
    assert!(reason.contains("output o:"), "{reason}");
    assert!(reason.contains("cannot reach the store"), "{reason}");
    assert!(
        !reason.contains("X-Amz-Signature"),
        "a URL leaked: {reason}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_with_links_cannot_make_the_agent_touch_the_nodes_files() {
    let mut p = Platform::start().await;
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, "the node's own file\n").unwrap();
    let untouched = |outside: &std::path::Path| {
        let names: Vec<_> = std::fs::read_dir(outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
        assert_eq!(
            std::fs::read_to_string(outside.join("secret")).unwrap(),
            "the node's own file\n"
        );
    };
    // The code repository commits links to the node's files: a directory
    // an input would land in, a file at an input's name, and the temporary
    // name an agent could derive for a download.
    p.code = repo_with_links(
        p.dir.path(),
        "links",
        &[("README", "code\n")],
        &[
            ("data", outside.path().to_str().unwrap()),
            ("model.bin", secret.to_str().unwrap()),
            (".model.bin.unidesk-partial", secret.to_str().unwrap()),
        ],
    );
    p.upload("payload", b"written by a task's owner\n").await;

    let done = p
        .run(
            "echo never",
            json!([{"name": "data/secret", "object": "payload"}]),
            json!([]),
        )
        .await;
    assert_eq!(done["state"], "failed", "{done}");
    let reason = done["reason"].as_str().unwrap();
    assert!(
        reason.contains("input data/secret: data/secret leads out of the workspace"),
        "{reason}"
    );
    untouched(outside.path());

    let done = p
        .run(
            "cat model.bin",
            json!([{"name": "model.bin", "object": "payload"}]),
            json!([]),
        )
        .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    untouched(outside.path());

    // A task links an output to the node's file at run time: not uploaded.
    let done = p
        .run(
            &format!("ln -s {} leak", secret.display()),
            json!([]),
            json!([{"name": "leak", "path": "leak"}]),
        )
        .await;
    assert_eq!(done["state"], "failed", "{done}");
    assert!(
        done["reason"]
            .as_str()
            .unwrap()
            .contains("output leak: leak leads out of the workspace"),
        "{done}"
    );
    assert!(p.artifacts(&done).await.is_empty());
    untouched(outside.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_serves_an_embedded_store_from_its_own_directory() {
    let db = testkit::fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    let dev = Launch::dev(env!("CARGO_BIN_EXE_unidesk"))
        .arg("--no-agent")
        .current_dir(dir.path())
        .env("DATABASE_URL", &db.url)
        .start()
        .await
        .unwrap();
    let api = dev.api();
    let project = api.post("/projects", json!({"name": "dev-files"})).await;
    let project = project["id"].as_str().unwrap();
    let data = b"kept on this machine\n".to_vec();
    support::put_object(&api, project, "notes/a.txt", &data).await;
    let stored = dir.path().join(format!(
        ".unidesk/objects/unidesk/projects/{project}/objects/notes/a.txt"
    ));
    assert_eq!(std::fs::read(stored).unwrap(), data);
}
