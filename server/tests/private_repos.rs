//! Private repositories end to end, on real processes: `unidesk serve`
//! with a secrets key, the `unidesk-agent` binary, a real OpenSSH `sshd`
//! that lets one deploy key into `git-shell`, and a real HTTPS git server
//! (`git http-backend` behind TLS, signed by a private CA, asking for a
//! token). Tasks fetch their code with their project's secrets; a project
//! without the key is refused the commit even though the node has it
//! cached; unknown or changed host keys and refused credentials fail the
//! task saying so.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use support::sshd::{run, Sshd};
use support::{agent_binary, base_image, repo, task_in, Agents, EnvImage, BASE};

/// The token the HTTPS server asks for.
const TOKEN: &str = "ghp_private-Token-4f2a9c";

/// The HTTPS git server; stopped when dropped.
struct GitHttps {
    child: Child,
    port: u16,
}

impl Drop for GitHttps {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private CA and a certificate for 127.0.0.1 it signed: (CA, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |name: &str| dir.join(name).display().to_string();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &p("server.key"),
        "-out",
        &p("server.csr"),
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p("san.ext"),
        "-out",
        &p("server.pem"),
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

impl GitHttps {
    async fn start(root: &Path, dir: &Path) -> (GitHttps, PathBuf) {
        let (ca, cert, key) = certificates(dir);
        let port_file = dir.join("https.port");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/git_https.py");
        let child = Command::new("python3")
            .arg(script)
            .args([root, &port_file, &cert, &key])
            .arg(TOKEN)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let port = testkit::eventually(
            "the HTTPS git server to listen",
            Duration::from_secs(20),
            || async {
                std::fs::read_to_string(&port_file)
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            },
        )
        .await;
        (GitHttps { child, port }, ca)
    }
}

struct Setup {
    _server: testkit::process::ServerProcess,
    api: testkit::process::Api,
    _db: testkit::TestDb,
    dir: tempfile::TempDir,
    env: (String, String),
    /// The private code repository, its commit, and its path.
    code: (String, PathBuf),
    sshd: Sshd,
    https: GitHttps,
    _agents: Agents,
    _image: EnvImage,
}

impl Setup {
    async fn start() -> Setup {
        base_image();
        let db = testkit::fresh_db().await;
        let dir = tempfile::tempdir().unwrap();
        let server = support::serve_with_secrets(&db.url, dir.path()).await;
        let api = server.api();
        let repos = dir.path().join("repos");
        let (_, commit) = repo(&repos, "code", &[("secret.txt", "private code\n")]);
        let env = repo(
            dir.path(),
            "env",
            &[("Dockerfile", &format!("FROM {BASE}\n"))],
        );
        let keys = dir.path().join("ssh");
        std::fs::create_dir_all(&keys).unwrap();
        let sshd = Sshd::start(
            &keys,
            r#"restrict,command="git-shell -c \"$SSH_ORIGINAL_COMMAND\"""#,
        )
        .await;
        let (https, ca) = GitHttps::start(&repos, dir.path()).await;

        let node = api.post("/nodes", json!({"name": "private-node"})).await;
        let agent = Command::new(agent_binary())
            .args(["--server", &server.ws()])
            .args(["--reconnect-min-ms", "100", "--reconnect-max-ms", "1000"])
            .arg("--work-dir")
            .arg(dir.path().join("agent"))
            .args(["--cpus", "2", "--memory-mb", "2048", "--no-gpus"])
            .env("UNIDESK_NODE_TOKEN", node["token"].as_str().unwrap())
            // libgit2's TLS trusts the private CA the HTTPS server uses.
            .env("SSL_CERT_FILE", &ca)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let setup = Setup {
            _server: server,
            api,
            _db: db,
            _image: EnvImage::of(&env, "Dockerfile"),
            env,
            code: (commit, repos.join("code")),
            sshd,
            https,
            dir,
            _agents: Agents(vec![agent]),
        };
        support::node_online(&setup.api, node["id"].as_str().unwrap()).await;
        setup
    }

    fn ssh_url(&self) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            self.sshd.user,
            self.sshd.port,
            self.code.1.display()
        )
    }

    fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}/code", self.https.port)
    }

    async fn project(&self, name: &str, secrets: &[(&str, &str)]) -> String {
        let id = self.api.post("/projects", json!({"name": name})).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        for (secret, value) in secrets {
            let (status, body) = self
                .api
                .call(
                    Method::PUT,
                    &format!("/projects/{id}/secrets/{secret}"),
                    Some(json!({"value": value})),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
        id
    }

    /// Runs a task of `project` printing the private file of `url`; the
    /// task once it ended.
    async fn run(&self, project: &str, url: &str, credentials: Value) -> Value {
        self.run_at(project, url, &self.code.0, credentials).await
    }

    /// [`Setup::run`] at `commit`.
    async fn run_at(&self, project: &str, url: &str, commit: &str, credentials: Value) -> Value {
        let task = json!({
            "project_id": project,
            "code_repo_url": url, "code_commit_id": commit,
            "env_repo_url": self.env.0, "env_commit_id": self.env.1,
            "dockerfile_path": "Dockerfile",
            "command": ["cat", "secret.txt"],
            "resources": {"cpus": 0.25, "memory_mb": 64},
            "git_credentials": credentials,
        });
        let id = self.api.post("/tasks", task).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let mut done = task_in(&self.api, &id, &["succeeded", "failed"]).await;
        done["logs"] = self.api.get(&format!("/tasks/{id}/logs")).await["data"].clone();
        done
    }

    fn deploy_key(&self) -> String {
        std::fs::read_to_string(&self.sshd.client_key).unwrap()
    }

    fn known_hosts(&self) -> String {
        format!("[127.0.0.1]:{} {}\n", self.sshd.port, self.sshd.host_key)
    }
}

fn reason(task: &Value) -> String {
    task["reason"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn private_repositories_are_fetched_with_the_projects_secrets_and_refused_without_them() {
    let s = Setup::start().await;
    let (key, hosts) = (s.deploy_key(), s.known_hosts());
    let lab = s
        .project(
            "private-lab",
            &[("deploy-key", &key), ("hosts", &hosts), ("token", TOKEN)],
        )
        .await;

    // Over SSH with the deploy key, the host checked against the secret.
    let ssh = s
        .run(
            &lab,
            &s.ssh_url(),
            json!({"code": "deploy-key", "known_hosts": "hosts"}),
        )
        .await;
    assert_eq!(ssh["state"], "succeeded", "{ssh}");
    assert_eq!(ssh["logs"], "private code\n");
    // Over HTTPS with the token.
    let https = s.run(&lab, &s.https_url(), json!({"code": "token"})).await;
    assert_eq!(https["state"], "succeeded", "{https}");
    assert_eq!(https["logs"], "private code\n");

    // Another project, with no key, is refused the commit the node has
    // cached, over both.
    let outsider = s.project("outsider", &[("hosts", &hosts)]).await;
    let refused = s
        .run(&outsider, &s.ssh_url(), json!({"known_hosts": "hosts"}))
        .await;
    assert_eq!(refused["state"], "failed", "{refused}");
    assert!(
        reason(&refused).contains("asks for credentials"),
        "{refused}"
    );
    let refused = s.run(&outsider, &s.https_url(), json!({})).await;
    assert_eq!(refused["state"], "failed", "{refused}");
    assert!(
        reason(&refused).contains("asks for credentials"),
        "{refused}"
    );

    // A wrong token is refused; so is the right key to a host whose key
    // nobody listed, or whose key is not the one listed.
    let other_key = s.dir.path().join("other");
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            other_key.to_str().unwrap(),
        ],
    );
    let other_pub = std::fs::read_to_string(other_key.with_extension("pub")).unwrap();
    let wrong_hosts = format!(
        "[127.0.0.1]:{} {}\n",
        s.sshd.port,
        other_pub
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mixed = s
        .project(
            "mixed",
            &[
                ("deploy-key", &key),
                ("wrong-hosts", &wrong_hosts),
                ("bad-token", "ghp_not-it"),
            ],
        )
        .await;
    let bad = s
        .run(&mixed, &s.https_url(), json!({"code": "bad-token"}))
        .await;
    assert_eq!(bad["state"], "failed", "{bad}");
    assert!(reason(&bad).contains("authentication refused"), "{bad}");
    // (A commit the node has not fetched yet: with the same key, a cached
    // one is read from the cache without asking the host anything.)
    let code = s.code.1.clone();
    std::fs::write(code.join("secret.txt"), "private code, v2\n").unwrap();
    let fresh = support::sh(
        &code,
        "git -c user.name=t -c user.email=t@t commit -qam v2 && git rev-parse HEAD",
    );
    let unknown = s
        .run_at(&mixed, &s.ssh_url(), &fresh, json!({"code": "deploy-key"}))
        .await;
    assert_eq!(unknown["state"], "failed", "{unknown}");
    assert!(reason(&unknown).contains("is unknown"), "{unknown}");
    let changed = s
        .run_at(
            &mixed,
            &s.ssh_url(),
            &fresh,
            json!({"code": "deploy-key", "known_hosts": "wrong-hosts"}),
        )
        .await;
    assert_eq!(changed["state"], "failed", "{changed}");
    assert!(reason(&changed).contains("not the one known"), "{changed}");

    // No value anywhere a user or an export can read.
    let mut readable = Vec::new();
    for path in [
        "/events?limit=1000",
        "/timeline?limit=500",
        "/tasks?limit=100",
    ] {
        readable.push(s.api.get(path).await.to_string());
    }
    let readable = readable.join("\n");
    let key_body = key.lines().nth(1).unwrap();
    for value in [TOKEN, key_body] {
        assert!(!readable.contains(value), "a secret leaked");
    }
}
