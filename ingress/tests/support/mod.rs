//! What the ingress tests share: the platform side (a served ingress,
//! nodes and tasks written through the real event store) and the agent
//! side's WebSocket dial. Each test file uses part of it.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::net::SocketAddr;

use chrono::Utc;
use domain::node::{Node, NodeCommand};
use domain::spec::{TaskSpec, TaskSpecDraft, UrlPolicy};
use domain::task::{Task, TaskCommand};
use domain::Actor;
use ingress::Ingress;
use store::{tokens, Store};
use uuid::Uuid;

pub use testkit::agent::{dial, Ws};

/// The admin every platform-side command is made by.
pub fn admin() -> Actor {
    Actor::User("admin".into())
}

/// Serves `ingress`'s router on a port of 127.0.0.1; returns the address.
pub async fn serve(ingress: &Ingress) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = ingress.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// Serves `ingress` and runs its outbox consumer until the test ends.
pub async fn serve_and_run(ingress: Ingress) -> SocketAddr {
    let addr = serve(&ingress).await;
    tokio::spawn(async move { ingress.run(std::future::pending()).await });
    addr
}

/// Provisions a node as an admin would; returns its id and token.
pub async fn provision(store: &Store) -> (Uuid, String) {
    let node_id = Uuid::now_v7();
    let issued = tokens::issue_node(node_id);
    let now = Utc::now();
    let command = NodeCommand::Provision {
        node_id,
        name: format!("node-{}", &node_id.simple().to_string()[24..]),
        labels: Default::default(),
        token_fingerprint: issued.fingerprint,
        max_resources: Default::default(),
        by: admin(),
        at: now,
    };
    store
        .execute::<Node>(&node_id.to_string(), command, &admin(), now)
        .await
        .unwrap();
    (node_id, issued.token)
}

/// Executes `command` on task `id` as the admin.
pub async fn task(store: &Store, id: Uuid, command: TaskCommand) {
    store
        .execute::<Task>(&id.to_string(), command, &admin(), Utc::now())
        .await
        .unwrap();
}

/// Submits a task (a training run in a pinned environment); returns its id.
pub async fn submit(store: &Store) -> Uuid {
    let spec = TaskSpecDraft {
        project_id: Some(Uuid::new_v4()),
        code_repo_url: Some("https://example.com/code.git".into()),
        code_commit_id: Some("a".repeat(40)),
        env_repo_url: Some("https://example.com/env.git".into()),
        env_commit_id: Some("b".repeat(40)),
        dockerfile_path: Some("docker/Dockerfile".into()),
        command: Some(vec!["python".into(), "train.py".into()]),
        env: Some([("SEED".to_string(), "1".to_string())].into()),
        timeout_s: Some(3600),
        network: Some("none".into()),
        ..Default::default()
    }
    .validate(UrlPolicy::default())
    .unwrap();
    submit_spec(store, spec).await
}

/// Submits a task with `spec`; returns its id.
pub async fn submit_spec(store: &Store, spec: TaskSpec) -> Uuid {
    let task_id = Uuid::now_v7();
    let submit = TaskCommand::Submit {
        task_id,
        spec,
        by: admin(),
        at: Utc::now(),
    };
    task(store, task_id, submit).await;
    task_id
}

/// Places the task's next attempt on `node_id`, as the scheduler would.
pub async fn assign(store: &Store, task_id: Uuid, node_id: Uuid) {
    let assign = TaskCommand::Assign {
        node_id,
        gpus: vec![],
        reason: "test".into(),
        at: Utc::now(),
    };
    task(store, task_id, assign).await;
}

/// A submitted task whose first attempt is placed on `node_id`.
pub async fn submit_and_assign(store: &Store, node_id: Uuid) -> Uuid {
    let task_id = submit(store).await;
    assign(store, task_id, node_id).await;
    task_id
}

/// Dials with a token that must be accepted.
pub async fn connect(addr: SocketAddr, token: &str) -> Ws {
    dial(addr, Some(token)).await.unwrap()
}
