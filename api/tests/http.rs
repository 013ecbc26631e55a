//! The REST API over real HTTP against a real PostgreSQL: a fresh database
//! per test, the router served on port 0, called with reqwest.

use std::collections::BTreeSet;

use api::Config;
use reqwest::Method;
use serde_json::{json, Value};

mod support;

use support::{App, SHA};

/// A server that lets every user create projects, so that tests can make
/// a user a project's first maintainer by letting them create it. The
/// default (admins only) is tested with `App::start(Config::default())`.
async fn start() -> App {
    App::start(Config {
        users_create_projects: true,
        ..Config::default()
    })
    .await
}

impl App {
    /// Creates project `name` as the holder of `token`; its id.
    async fn project(&self, token: &str, name: &str) -> String {
        self.project_as(token, name).await
    }

    /// Submits this file's usual task to `project` as the holder of
    /// `token`; its id.
    async fn submit(&self, token: &str, project: &str) -> String {
        self.submit_as(token, task_body(project)).await
    }
}

fn task_body(project: &str) -> Value {
    json!({
        "project_id": project,
        "code_repo_url": "https://git.example.com/lab/code.git",
        "code_commit_id": SHA,
        "env_repo_url": "git@git.example.com:lab/env.git",
        "env_commit_id": SHA.to_uppercase(),
        "dockerfile_path": "./docker//Dockerfile",
        "command": ["python", "train.py"],
        "env": {"EPOCHS": "3"},
        "resources": {"cpus": 2, "memory_mb": 4096, "gpus": 0},
        "labels": {"gpu": "a100"},
        "priority": 5,
        "timeout_s": 3600
    })
}

fn with(mut body: Value, pointer: &str, value: Option<Value>) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
    let target = if parent.is_empty() {
        &mut body
    } else {
        body.pointer_mut(parent).expect("the parent exists")
    };
    let map = target.as_object_mut().expect("an object");
    match value {
        Some(v) => map.insert(key.to_string(), v),
        None => map.remove(key),
    };
    body
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|t| t["id"].as_str().expect("an id").to_string())
        .collect()
}

#[tokio::test]
async fn the_full_happy_path_from_bootstrap_to_the_state_at_a_sequence() {
    let app = start().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let project = app.project(&alice, "vision").await;
    app.add_member(&project, "bob", "member").await;

    let shown = app.get(&format!("/api/v1/projects/{project}"), &bob).await;
    let members = &shown.expect(200)["members"];
    assert_eq!(
        members,
        &json!([{"user": "alice", "role": "maintainer"}, {"user": "bob", "role": "member"}])
    );

    let submitted = app.post("/api/v1/tasks", &bob, task_body(&project)).await;
    let task = submitted.expect(201);
    let id = task["id"].as_str().expect("an id").to_string();
    assert_eq!(task["state"], "queued");
    assert_eq!(task["project_id"], project.as_str());
    assert_eq!(task["submitted_by"], "user:bob");
    assert_eq!(task["spec"]["dockerfile_path"], "docker/Dockerfile");
    assert_eq!(task["spec"]["env_commit_id"], SHA);
    assert_eq!(
        task["spec"]["resources"],
        json!({"cpus": 2.0, "memory_mb": 4096, "gpus": 0})
    );
    assert_eq!(
        submitted.headers["location"].to_str().expect("text"),
        format!("/api/v1/tasks/{id}")
    );

    let fetched = app.get(&format!("/api/v1/tasks/{id}"), &alice).await;
    let mut fetched = fetched.expect(200).clone();
    // Only GET says why a queued task waits.
    let queue = fetched
        .as_object_mut()
        .expect("an object")
        .remove("queue")
        .expect("why it waits");
    assert_eq!(&fetched, task);
    assert_eq!(queue["summary"], "waiting for the scheduler to look at it");

    let second = app.submit(&alice, &project).await;
    let third = app.submit(&bob, &project).await;
    app.catch_up().await;
    let first_page = app.get("/api/v1/tasks?limit=2", &bob).await;
    let first_page = first_page.expect(200);
    assert_eq!(ids(first_page), [third.clone(), second.clone()]);
    let cursor = first_page["next_cursor"].as_str().expect("a next cursor");
    let second_page = app
        .get(&format!("/api/v1/tasks?limit=2&cursor={cursor}"), &bob)
        .await;
    let second_page = second_page.expect(200);
    assert_eq!(ids(second_page), [id.as_str()]);
    assert!(second_page["next_cursor"].is_null());
    let filtered = app
        .get(
            &format!("/api/v1/tasks?project={project}&state=queued&limit=500"),
            &bob,
        )
        .await;
    assert_eq!(ids(filtered.expect(200)).len(), 3);

    let cancelled = app
        .post_empty(&format!("/api/v1/tasks/{id}/cancel"), &bob)
        .await;
    let cancelled = cancelled.expect(200);
    assert_eq!(cancelled["state"], "cancelled");
    assert_eq!(cancelled["cancel_requested"], true);

    app.settle().await;
    let history = app
        .get(
            &format!("/api/v1/events?aggregate_type=task&aggregate_id={id}"),
            &bob,
        )
        .await;
    let history = history.expect(200);
    let types: Vec<_> = history["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["event_type"].as_str().expect("a type").to_string())
        .collect();
    assert_eq!(
        types,
        ["TaskSubmitted", "TaskCancelRequested", "TaskCancelled"]
    );
    let first_event = &history["items"][0];
    assert_eq!(first_event["actor"], "user:bob");
    assert_eq!(first_event["sequence"], 1);
    assert_eq!(first_event["payload"]["spec"]["code_commit_id"], SHA);
    assert_eq!(history["next_after"], history["items"][2]["position"]);

    let at_one = app
        .get(&format!("/api/v1/tasks/{id}/state?at_sequence=1"), &bob)
        .await;
    let at_one = at_one.expect(200);
    assert_eq!(at_one["state"]["state"], "queued");
    assert_eq!(at_one["event"]["event_type"], "TaskSubmitted");
    assert_eq!(at_one["event"]["actor"], "user:bob");
    assert_eq!(at_one["last_sequence"], 3);
    let at_three = app
        .get(&format!("/api/v1/tasks/{id}/state?at_sequence=3"), &bob)
        .await;
    assert_eq!(at_three.expect(200)["state"]["state"], "cancelled");
    let latest = app.get(&format!("/api/v1/tasks/{id}/state"), &bob).await;
    assert_eq!(latest.expect(200)["event"]["sequence"], 3);
    app.get(&format!("/api/v1/tasks/{id}/state?at_sequence=4"), &bob)
        .await
        .expect_error(404, "at_sequence");
    for bad in ["0", "-1", "x"] {
        app.get(&format!("/api/v1/tasks/{id}/state?at_sequence={bad}"), &bob)
            .await
            .expect_error(400, "at_sequence");
    }
}

#[tokio::test]
async fn bootstrap_is_idempotent_keeps_its_file_private_and_replaces_a_revoked_token() {
    let app = start().await;
    let again = api::bootstrap_admin(&app.store, &app.token_file)
        .await
        .expect("bootstrap again");
    assert_eq!(again, app.admin);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&app.token_file)
            .expect("the token file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let me = app.get("/api/v1/users/admin", &app.admin).await;
    let me = me.expect(200);
    assert_eq!(me["admin"], true);
    let token_id = me["tokens"][0]["token_id"].as_str().expect("a token id");
    assert_eq!(me["tokens"][0]["label"], "bootstrap");
    assert!(!me.to_string().contains("fingerprint"));

    app.call(
        Method::DELETE,
        &format!("/api/v1/users/admin/tokens/{token_id}"),
        Some(&app.admin),
        None,
    )
    .await
    .expect(204);
    let fresh = api::bootstrap_admin(&app.store, &app.token_file)
        .await
        .expect("bootstrap after revocation");
    assert_ne!(fresh, app.admin);
    assert_eq!(
        std::fs::read_to_string(&app.token_file)
            .expect("the token file")
            .trim(),
        fresh
    );
    app.get("/api/v1/users", &fresh).await.expect(200);
}

#[tokio::test]
async fn every_bad_task_input_is_refused_with_its_field_named_and_nothing_appended() {
    let app = start().await;
    let project = app.project(&app.admin, "inputs").await;
    let good = task_body(&project);
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "short commit id",
            with(good.clone(), "/code_commit_id", Some(json!("abc1234"))),
            422,
            "code_commit_id",
        ),
        (
            "non-hex commit id",
            with(good.clone(), "/env_commit_id", Some(json!("z".repeat(40)))),
            422,
            "env_commit_id",
        ),
        (
            "absolute dockerfile",
            with(good.clone(), "/dockerfile_path", Some(json!("/etc/passwd"))),
            422,
            "dockerfile_path",
        ),
        (
            "dockerfile leaving the repo",
            with(
                good.clone(),
                "/dockerfile_path",
                Some(json!("a/../../Dockerfile")),
            ),
            422,
            "dockerfile_path",
        ),
        (
            "http scheme",
            with(
                good.clone(),
                "/code_repo_url",
                Some(json!("http://h/r.git")),
            ),
            422,
            "code_repo_url",
        ),
        (
            "file scheme",
            with(
                good.clone(),
                "/env_repo_url",
                Some(json!("file:///srv/env.git")),
            ),
            422,
            "env_repo_url",
        ),
        (
            "ftp scheme",
            with(
                good.clone(),
                "/env_repo_url",
                Some(json!("ftp://h/env.git")),
            ),
            422,
            "env_repo_url",
        ),
        (
            "missing code repo",
            with(good.clone(), "/code_repo_url", None),
            422,
            "code_repo_url",
        ),
        (
            "missing project",
            with(good.clone(), "/project_id", None),
            422,
            "project_id",
        ),
        (
            "negative cpus",
            with(good.clone(), "/resources/cpus", Some(json!(-1))),
            422,
            "resources.cpus",
        ),
        (
            "negative memory",
            with(good.clone(), "/resources/memory_mb", Some(json!(-5))),
            422,
            "resources.memory_mb",
        ),
        (
            "negative gpus",
            with(good.clone(), "/resources/gpus", Some(json!(-1))),
            422,
            "resources.gpus",
        ),
        (
            "cpus of the wrong type",
            with(good.clone(), "/resources/cpus", Some(json!("many"))),
            422,
            "resources.cpus",
        ),
        (
            "a malformed project id",
            with(good.clone(), "/project_id", Some(json!("not-a-uuid"))),
            422,
            "project_id",
        ),
        (
            "an unknown field",
            with(good.clone(), "/colour", Some(json!("blue"))),
            422,
            "colour",
        ),
        (
            "an unknown nested field",
            with(good.clone(), "/resources/tpus", Some(json!(1))),
            422,
            "resources.tpus",
        ),
        (
            "a bad label",
            with(good.clone(), "/labels", Some(json!({"": "x"}))),
            422,
            "labels.",
        ),
        (
            "an unknown project",
            with(good.clone(), "/project_id", Some(json!(uuid_v4()))),
            404,
            "project_id",
        ),
    ];
    let before = app.events().await;
    for (case, body, status, field) in cases {
        let answer = app.post("/api/v1/tasks", &app.admin, body).await;
        assert_eq!(answer.status.as_u16(), status, "{case}: {:?}", answer.body);
        assert!(
            answer.fields().iter().any(|f| f == field),
            "{case}: {:?}",
            answer.body
        );
        assert!(!answer.details().is_empty(), "{case} has no reason");
    }
    assert_eq!(
        app.events().await,
        before,
        "a refused submission appended events"
    );

    let many = with(
        with(good.clone(), "/code_commit_id", Some(json!("abc"))),
        "/dockerfile_path",
        Some(json!("/abs")),
    );
    let many = with(many, "/resources/cpus", Some(json!(0)));
    let answer = app.post("/api/v1/tasks", &app.admin, many).await;
    answer.expect(422);
    assert_eq!(
        answer.fields(),
        ["code_commit_id", "dockerfile_path", "resources.cpus"]
    );

    let url = format!("{}/api/v1/tasks", app.base);
    let raw = |body: String, content_type: Option<&str>| {
        let mut request = app.client.post(&url).bearer_auth(&app.admin).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        request
    };
    let malformed = app
        .send(raw("{\"project_id\": ".into(), Some("application/json")))
        .await;
    malformed.expect_error(400, "project_id");
    let not_an_object = app
        .send(raw("[1, 2]".into(), Some("application/json")))
        .await;
    assert_eq!(
        not_an_object.status.as_u16(),
        422,
        "{:?}",
        not_an_object.body
    );
    let wrong_type = app.send(raw(good.to_string(), Some("text/plain"))).await;
    wrong_type.expect(415);
    let no_type = app.send(raw(good.to_string(), None)).await;
    no_type.expect(415);
    let huge = with(
        good.clone(),
        "/command",
        Some(json!(["x".repeat(1_500_000)])),
    );
    let too_large = app
        .send(raw(huge.to_string(), Some("application/json")))
        .await;
    too_large.expect(413);
    assert!(!too_large.errors().is_empty());
    assert_eq!(
        app.events().await,
        before,
        "a refused request appended events"
    );

    let fine = app
        .send(raw(
            good.to_string(),
            Some("application/json; charset=utf-8"),
        ))
        .await;
    fine.expect(201);
}

#[tokio::test]
async fn a_task_cannot_set_the_variables_the_node_sets() {
    let app = start().await;
    let project = app.project(&app.admin, "vars").await;
    let before = app.events().await;
    for name in ["UNIDESK_ATTEMPT", "UNIDESK_TASK_ID", "unidesk_anything"] {
        let body = with(
            task_body(&project),
            &format!("/env/{name}"),
            Some(json!("1")),
        );
        let answer = app.post("/api/v1/tasks", &app.admin, body).await;
        answer.expect_error(422, &format!("env.{name}"));
        assert!(
            answer.details().contains("set by the node"),
            "{:?}",
            answer.body
        );
    }
    assert_eq!(
        app.events().await,
        before,
        "a refused submission appended events"
    );
}

#[tokio::test]
async fn gpu_visibility_cannot_be_set_through_a_tasks_env() {
    let app = start().await;
    let project = app.project(&app.admin, "gpus").await;
    let good = task_body(&project);
    let before = app.events().await;
    for name in [
        "NVIDIA_VISIBLE_DEVICES",
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
        "nvidia_visible_devices",
    ] {
        let body = with(good.clone(), &format!("/env/{name}"), Some(json!("all")));
        let answer = app.post("/api/v1/tasks", &app.admin, body).await;
        answer.expect_error(422, &format!("env.{name}"));
        assert!(
            answer.details().contains("resources.gpus"),
            "{:?}",
            answer.body
        );
    }
    assert_eq!(
        app.events().await,
        before,
        "a refused submission appended events"
    );
}

#[tokio::test]
async fn a_task_may_ask_for_no_network_and_sees_it_in_its_spec() {
    let app = start().await;
    let project = app.project(&app.admin, "offline").await;
    let good = task_body(&project);
    let answer = app
        .post(
            "/api/v1/tasks",
            &app.admin,
            with(good.clone(), "/network", Some(json!("host"))),
        )
        .await;
    answer.expect_error(422, "network");
    let offline = app
        .post(
            "/api/v1/tasks",
            &app.admin,
            with(good.clone(), "/network", Some(json!("none"))),
        )
        .await;
    assert_eq!(offline.expect(201)["spec"]["network"], "none");
    let default = app.post("/api/v1/tasks", &app.admin, good).await;
    assert!(
        default.expect(201)["spec"].get("network").is_none(),
        "absent means the node's choice: {:?}",
        default.body
    );
}

fn uuid_v4() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn file_urls_are_accepted_only_where_the_server_allows_them() {
    let app = App::start(Config {
        url_policy: domain::spec::UrlPolicy { allow_file: true },
        users_create_projects: true,
        ..Config::default()
    })
    .await;
    let project = app.project(&app.admin, "local").await;
    let body = with(
        task_body(&project),
        "/env_repo_url",
        Some(json!("file:///srv/env.git")),
    );
    let answer = app.post("/api/v1/tasks", &app.admin, body).await;
    assert_eq!(
        answer.expect(201)["spec"]["env_repo_url"],
        "file:///srv/env.git"
    );
}

#[tokio::test]
async fn a_member_of_one_project_gets_404_for_everything_of_another() {
    let app = start().await;
    let alice = app.user("alice").await;
    let carol = app.user("carol").await;
    let a = app.project(&alice, "project-a").await;
    let b = app.project(&alice, "project-b").await;
    app.add_member(&a, "carol", "member").await;
    let task_a = app.submit(&carol, &a).await;
    let task_b = app.submit(&alice, &b).await;
    app.catch_up().await;
    let before = app.events().await;

    for path in [
        format!("/api/v1/projects/{b}"),
        format!("/api/v1/tasks/{task_b}"),
        format!("/api/v1/tasks/{task_b}/state?at_sequence=1"),
        format!("/api/v1/events?aggregate_type=task&aggregate_id={task_b}"),
        format!("/api/v1/events?aggregate_type=project&aggregate_id={b}"),
    ] {
        let answer = app.get(&path, &carol).await;
        assert_eq!(answer.status.as_u16(), 404, "{path}: {:?}", answer.body);
    }
    app.get(&format!("/api/v1/tasks?project={b}"), &carol)
        .await
        .expect_error(404, "project");
    app.post("/api/v1/tasks", &carol, task_body(&b))
        .await
        .expect_error(404, "project_id");
    for path in [
        format!("/api/v1/tasks/{task_b}/cancel"),
        format!("/api/v1/projects/{b}/archive"),
    ] {
        let answer = app.post_empty(&path, &carol).await;
        assert_eq!(answer.status.as_u16(), 404, "{path}: {:?}", answer.body);
    }
    let join = app
        .post(
            &format!("/api/v1/projects/{b}/members"),
            &carol,
            json!({"user": "carol", "role": "maintainer"}),
        )
        .await;
    join.expect(404);
    let kick = app
        .call(
            Method::DELETE,
            &format!("/api/v1/projects/{b}/members/alice"),
            Some(&carol),
            None,
        )
        .await;
    kick.expect(404);
    assert_eq!(app.events().await, before);

    let tasks = app.get("/api/v1/tasks", &carol).await;
    assert_eq!(ids(tasks.expect(200)), [task_a.as_str()]);
    let projects = app.get("/api/v1/projects", &carol).await;
    assert_eq!(ids(projects.expect(200)), [a.as_str()]);
    let everything = app.get("/api/v1/tasks", &app.admin).await;
    assert_eq!(ids(everything.expect(200)), [task_b, task_a]);
    let all_projects = app.get("/api/v1/projects", &app.admin).await;
    assert_eq!(ids(all_projects.expect(200)).len(), 2);
}

#[tokio::test]
async fn a_viewer_reads_but_cannot_submit_or_cancel() {
    let app = start().await;
    let alice = app.user("alice").await;
    let victor = app.user("victor").await;
    let project = app.project(&alice, "watched").await;
    app.add_member(&project, "victor", "viewer").await;
    let task = app.submit(&alice, &project).await;
    let before = app.events().await;

    app.get(&format!("/api/v1/tasks/{task}"), &victor)
        .await
        .expect(200);
    app.get(&format!("/api/v1/projects/{project}"), &victor)
        .await
        .expect(200);
    app.post("/api/v1/tasks", &victor, task_body(&project))
        .await
        .expect(403);
    app.post_empty(&format!("/api/v1/tasks/{task}/cancel"), &victor)
        .await
        .expect(403);
    app.post_empty(&format!("/api/v1/projects/{project}/archive"), &victor)
        .await
        .expect(403);
    app.post(
        &format!("/api/v1/projects/{project}/members"),
        &victor,
        json!({"user": "victor", "role": "maintainer"}),
    )
    .await
    .expect_error(404, "user");
    assert_eq!(app.events().await, before);
}

#[tokio::test]
async fn a_revoked_token_stops_working_at_once_and_a_new_one_works_at_once() {
    let app = start().await;
    let dana = app.user("dana").await;
    app.get("/api/v1/users/dana", &dana).await.expect(200);
    let second = app
        .post("/api/v1/users/dana/tokens", &dana, json!({}))
        .await;
    let second = second.expect(201).clone();
    let second_token = second["token"].as_str().expect("a token").to_string();
    app.get("/api/v1/projects", &second_token).await.expect(200);

    let token_id = second["token_id"].as_str().expect("a token id");
    app.call(
        Method::DELETE,
        &format!("/api/v1/users/dana/tokens/{token_id}"),
        Some(&dana),
        None,
    )
    .await
    .expect(204);
    let refused = app.get("/api/v1/projects", &second_token).await;
    refused.expect(401);
    assert_eq!(refused.headers["www-authenticate"], "Bearer");
    app.get("/api/v1/projects", &dana).await.expect(200);

    let unlabelled = app.post_empty("/api/v1/users/dana/tokens", &dana).await;
    let third = unlabelled.expect(201)["token"]
        .as_str()
        .expect("a token")
        .to_string();
    app.get("/api/v1/projects", &third).await.expect(200);
    app.call(
        Method::DELETE,
        &format!("/api/v1/users/dana/tokens/{}", uuid_v4()),
        Some(&dana),
        None,
    )
    .await
    .expect_error(404, "token_id");
}

#[tokio::test]
async fn requests_without_a_valid_user_token_get_401_with_a_bearer_challenge() {
    let app = start().await;
    let node = app
        .post("/api/v1/nodes", &app.admin, json!({"name": "gpu-1"}))
        .await;
    let node_token = node.expect(201)["token"]
        .as_str()
        .expect("a token")
        .to_string();
    let mut forged = app.admin.clone();
    forged.pop();
    forged.push(if app.admin.ends_with('A') { 'B' } else { 'A' });
    let before = app.events().await;
    for token in [
        None,
        Some("garbage"),
        Some(node_token.as_str()),
        Some(forged.as_str()),
    ] {
        let answer = app
            .call(
                Method::POST,
                "/api/v1/projects",
                token,
                Some(json!({"name": "x"})),
            )
            .await;
        answer.expect(401);
        assert_eq!(answer.headers["www-authenticate"], "Bearer", "{token:?}");
        assert!(!answer.details().is_empty());
    }
    let basic = app
        .send(
            app.client
                .get(format!("{}/api/v1/tasks", app.base))
                .header("authorization", "Basic YWRtaW46YWRtaW4="),
        )
        .await;
    basic.expect(401);
    assert_eq!(app.events().await, before);
}

#[tokio::test]
async fn cancelling_a_finished_task_is_a_conflict_with_the_domains_message() {
    let app = start().await;
    let project = app.project(&app.admin, "done").await;
    let task = app.submit(&app.admin, &project).await;
    app.post_empty(&format!("/api/v1/tasks/{task}/cancel"), &app.admin)
        .await
        .expect(200);
    let before = app.events().await;
    let again = app
        .post_empty(&format!("/api/v1/tasks/{task}/cancel"), &app.admin)
        .await;
    again.expect(409);
    assert!(
        again
            .details()
            .contains("cannot cancel a task that is cancelled"),
        "{:?}",
        again.body
    );
    assert_eq!(app.events().await, before);
    app.post_empty(&format!("/api/v1/tasks/{}/cancel", uuid_v4()), &app.admin)
        .await
        .expect(404);
    app.get("/api/v1/tasks/not-a-uuid", &app.admin)
        .await
        .expect_error(400, "id");
}

#[tokio::test]
async fn task_list_parameters_are_checked_and_named() {
    let app = start().await;
    for (query, field) in [
        ("state=sleeping", "state"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("cursor=garbage", "cursor"),
        ("project=nope", "project"),
        ("node=nope", "node"),
        ("colour=blue", "colour"),
    ] {
        app.get(&format!("/api/v1/tasks?{query}"), &app.admin)
            .await
            .expect_error(400, field);
    }
    let empty = app
        .get("/api/v1/tasks?limit=500&state=running", &app.admin)
        .await;
    assert_eq!(
        empty.expect(200),
        &json!({"items": [], "next_cursor": null})
    );
}

#[tokio::test]
async fn events_are_read_in_global_order_and_only_where_the_caller_may_look() {
    let app = start().await;
    let erin = app.user("erin").await;
    let project = app.project(&erin, "history").await;
    app.submit(&erin, &project).await;
    app.settle().await;

    let all = app.get("/api/v1/events?limit=1000", &app.admin).await;
    let all = all.expect(200).clone();
    let items = all["items"].as_array().expect("items");
    assert_eq!(items.len() as i64, app.events().await);
    let positions: Vec<i64> = items
        .iter()
        .map(|e| e["position"].as_i64().expect("a position"))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert!(
        !all.to_string().contains("fingerprint"),
        "a fingerprint leaked"
    );

    let first_two = app.get("/api/v1/events?limit=2", &app.admin).await;
    let after = first_two.expect(200)["next_after"]
        .as_i64()
        .expect("next_after");
    let rest = app
        .get(&format!("/api/v1/events?after={after}"), &app.admin)
        .await;
    assert_eq!(
        rest.expect(200)["items"].as_array().expect("items").len(),
        items.len() - 2
    );
    let users = app
        .get("/api/v1/events?aggregate_type=user", &app.admin)
        .await;
    assert!(users.expect(200)["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|e| e["aggregate_type"] == "user"));
    let caught_up = app
        .get(
            &format!("/api/v1/events?after={}", positions[positions.len() - 1]),
            &app.admin,
        )
        .await;
    assert_eq!(
        caught_up.expect(200)["next_after"],
        positions[positions.len() - 1]
    );

    app.get("/api/v1/events?after=999999", &app.admin)
        .await
        .expect_error(404, "after");
    app.get("/api/v1/events?after=-3", &app.admin)
        .await
        .expect_error(400, "after");
    app.get("/api/v1/events?limit=0", &app.admin)
        .await
        .expect_error(400, "limit");
    app.get("/api/v1/events?aggregate_type=robot", &app.admin)
        .await
        .expect_error(400, "aggregate_type");
    app.get(
        "/api/v1/events?aggregate_type=task&aggregate_id=Nope",
        &app.admin,
    )
    .await
    .expect_error(400, "aggregate_id");
    // A name that is no UUID names no task.
    app.get(
        "/api/v1/events?aggregate_type=task&aggregate_id=nope",
        &app.admin,
    )
    .await
    .expect_error(404, "aggregate_id");

    app.get("/api/v1/events", &erin).await.expect(403);
    app.get(
        "/api/v1/events?aggregate_type=user&aggregate_id=admin",
        &erin,
    )
    .await
    .expect(403);
    let mine = app
        .get(
            "/api/v1/events?aggregate_type=user&aggregate_id=erin",
            &erin,
        )
        .await;
    let mine = mine.expect(200);
    assert_eq!(mine["items"][1]["event_type"], "UserTokenIssued");
    assert!(mine["items"][1]["payload"].get("fingerprint").is_none());
    let of_project = app
        .get(
            &format!("/api/v1/events?aggregate_type=project&aggregate_id={project}"),
            &erin,
        )
        .await;
    assert_eq!(
        of_project.expect(200)["items"][0]["event_type"],
        "ProjectCreated"
    );
}

#[tokio::test]
async fn nodes_are_provisioned_by_admins_with_a_token_shown_once_and_unique_names() {
    let app = start().await;
    let frank = app.user("frank").await;
    let before = app.events().await;
    app.post("/api/v1/nodes", &frank, json!({"name": "gpu-1"}))
        .await
        .expect(403);
    app.post("/api/v1/nodes", &app.admin, json!({"name": "GPU 1"}))
        .await
        .expect_error(422, "name");
    app.post(
        "/api/v1/nodes",
        &app.admin,
        json!({"name": "gpu-1", "labels": {"-bad": "x"}}),
    )
    .await
    .expect_error(422, "labels.-bad");
    app.post("/api/v1/nodes", &app.admin, json!({"labels": {}}))
        .await
        .expect_error(422, "name");
    assert_eq!(app.events().await, before);

    let created = app
        .post(
            "/api/v1/nodes",
            &app.admin,
            json!({"name": "gpu-1", "labels": {"gpu": "a100"}}),
        )
        .await;
    let created = created.expect(201).clone();
    let id = created["id"].as_str().expect("an id").to_string();
    assert!(created["token"]
        .as_str()
        .expect("a token")
        .starts_with("udn~"));
    assert_eq!(created["status"], "provisioned");
    assert_eq!(created["labels"], json!({"gpu": "a100"}));
    assert!(!created.to_string().contains("fingerprint"));

    let before = app.events().await;
    app.post("/api/v1/nodes", &app.admin, json!({"name": "gpu-1"}))
        .await
        .expect_error(409, "name");
    assert_eq!(app.events().await, before);

    let shown = app.get(&format!("/api/v1/nodes/{id}"), &frank).await;
    let shown = shown.expect(200);
    assert!(shown.get("token").is_none());
    assert!(!shown.to_string().contains("fingerprint"));
    app.get(&format!("/api/v1/nodes/{}", uuid_v4()), &frank)
        .await
        .expect(404);

    app.post_empty(&format!("/api/v1/nodes/{id}/drain"), &frank)
        .await
        .expect(403);
    let drained = app
        .post_empty(&format!("/api/v1/nodes/{id}/drain"), &app.admin)
        .await;
    assert_eq!(drained.expect(200)["drained"], true);
    let undrained = app
        .post_empty(&format!("/api/v1/nodes/{id}/undrain"), &app.admin)
        .await;
    assert_eq!(undrained.expect(200)["drained"], false);
    let revoked = app
        .post_empty(&format!("/api/v1/nodes/{id}/revoke"), &app.admin)
        .await;
    assert_eq!(revoked.expect(200)["status"], "revoked");
    app.post_empty(&format!("/api/v1/nodes/{}/drain", uuid_v4()), &app.admin)
        .await
        .expect(404);

    app.catch_up().await;
    let list = app.get("/api/v1/nodes", &frank).await;
    let list = list.expect(200);
    assert_eq!(ids(list), [id]);
    assert!(!list.to_string().contains("fingerprint"));
}

/// Connects node `id` as the ingress records an agent's hello, declaring
/// `labels` and 64 CPUs, 512 GiB and 8 GPUs.
async fn claim(app: &App, id: &str, labels: Value) {
    let at = chrono::Utc::now();
    let connect = domain::node::NodeCommand::Connect {
        session: uuid::Uuid::now_v7(),
        agent_version: "0.1.0-test".into(),
        resources: domain::node::NodeResources {
            cpus: 64.0,
            memory_mb: 512 * 1024,
            gpus: (0..8)
                .map(|index| domain::node::Gpu {
                    index,
                    name: "A100".into(),
                    memory_mb: 81920,
                })
                .collect(),
        },
        labels: serde_json::from_value(labels).expect("labels"),
        at,
    };
    app.store
        .execute::<domain::node::Node>(id, connect, &domain::Actor::Node(id.to_string()), at)
        .await
        .expect("connect");
}

#[tokio::test]
async fn only_admins_set_or_accept_node_labels_and_maxima() {
    let app = start().await;
    let frank = app.user("frank").await;
    let created = app
        .post("/api/v1/nodes", &app.admin, json!({"name": "gpu-1"}))
        .await;
    let id = created.expect(201)["id"]
        .as_str()
        .expect("an id")
        .to_string();
    claim(&app, &id, json!({"gpu": "a100"})).await;
    let before = app.events().await;
    let labels = format!("/api/v1/nodes/{id}/labels");
    let accept = format!("/api/v1/nodes/{id}/labels/accept");
    let limits = format!("/api/v1/nodes/{id}/limits");
    for body in [json!({"labels": {"gpu": "a100"}}), json!({"labels": 5})] {
        app.put(&labels, &frank, body).await.expect(403);
    }
    app.post_empty(&accept, &frank).await.expect(403);
    app.post(&accept, &frank, json!({"keys": ["gpu"]}))
        .await
        .expect(403);
    for body in [
        json!({"cpus": 64, "memory_mb": null, "gpus": 8}),
        json!({"cpus": -1}),
    ] {
        app.put(&limits, &frank, body).await.expect(403);
    }
    app.post(
        "/api/v1/nodes",
        &frank,
        json!({"name": "gpu-2", "max_resources": {"cpus": 64}}),
    )
    .await
    .expect(403);
    assert_eq!(app.events().await, before);
    let shown = app.get(&format!("/api/v1/nodes/{id}"), &frank).await;
    assert_eq!(shown.expect(200)["labels"], json!({}));
}

#[tokio::test]
async fn malformed_node_label_and_maximum_bodies_get_422_naming_the_field() {
    let app = start().await;
    let created = app
        .post("/api/v1/nodes", &app.admin, json!({"name": "gpu-1"}))
        .await;
    let id = created.expect(201)["id"]
        .as_str()
        .expect("an id")
        .to_string();
    claim(&app, &id, json!({"gpu": "a100"})).await;
    let before = app.events().await;
    let labels = format!("/api/v1/nodes/{id}/labels");
    let too_many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (body, field) in [
        (json!({}), "labels"),
        (json!({"labels": null}), "labels"),
        (json!({"labels": ["gpu=a100"]}), "labels"),
        (json!({"labels": {"gpu": 5}}), "labels.gpu"),
        (json!({"labels": {"gpu": "a 100"}}), "labels.gpu"),
        (json!({"labels": {"-gpu": "a100"}}), "labels.-gpu"),
        (json!({"labels": {"gpu": "x".repeat(64)}}), "labels.gpu"),
        (json!({"labels": {}, "accept": true}), "accept"),
        (json!({"labels": too_many}), "labels"),
    ] {
        app.put(&labels, &app.admin, body.clone())
            .await
            .expect_error(422, field);
    }
    let accept = format!("/api/v1/nodes/{id}/labels/accept");
    // A key the agent does not declare (now) is nothing to accept.
    app.post(&accept, &app.admin, json!({"keys": ["gpu", "os"]}))
        .await
        .expect_error(409, "keys[1]");
    for (body, field) in [
        (json!({"keys": "gpu"}), "keys"),
        (json!({"keys": [1]}), "keys[0]"),
        (json!({"labels": {"gpu": "h100"}}), "labels"),
    ] {
        app.post(&accept, &app.admin, body)
            .await
            .expect_error(422, field);
    }
    let limits = format!("/api/v1/nodes/{id}/limits");
    let missing = app.put(&limits, &app.admin, json!({})).await;
    missing.expect(422);
    assert_eq!(missing.fields(), ["cpus", "memory_mb", "gpus"]);
    for (body, field) in [
        (json!({"cpus": 0, "memory_mb": null, "gpus": null}), "cpus"),
        (json!({"cpus": -4, "memory_mb": null, "gpus": null}), "cpus"),
        (
            json!({"cpus": "four", "memory_mb": null, "gpus": null}),
            "cpus",
        ),
        (
            json!({"cpus": 1e9, "memory_mb": null, "gpus": null}),
            "cpus",
        ),
        (
            json!({"cpus": null, "memory_mb": 0, "gpus": null}),
            "memory_mb",
        ),
        (json!({"cpus": null, "memory_mb": null, "gpus": -1}), "gpus"),
        (
            json!({"cpus": null, "memory_mb": null, "gpus": 1.5}),
            "gpus",
        ),
        (json!({"cpus": null, "memory_mb": null}), "gpus"),
        (
            json!({"cpus": 4, "memory_mb": null, "gpus": 1, "disk": 1}),
            "disk",
        ),
    ] {
        app.put(&limits, &app.admin, body)
            .await
            .expect_error(422, field);
    }
    for (body, field) in [
        (
            json!({"name": "gpu-2", "max_resources": {"cpus": 0}}),
            "max_resources.cpus",
        ),
        (
            json!({"name": "gpu-2", "max_resources": {"gpus": -1}}),
            "max_resources.gpus",
        ),
        (
            json!({"name": "gpu-2", "max_resources": {"disk": 1}}),
            "max_resources.disk",
        ),
        (
            json!({"name": "gpu-2", "max_resources": 4}),
            "max_resources",
        ),
    ] {
        app.post("/api/v1/nodes", &app.admin, body)
            .await
            .expect_error(422, field);
    }
    assert_eq!(app.events().await, before);
    // Nothing was lost: the name is still free.
    app.post("/api/v1/nodes", &app.admin, json!({"name": "gpu-2"}))
        .await
        .expect(201);
}

#[tokio::test]
async fn an_admin_decides_which_labels_and_how_much_of_a_node_count() {
    let app = start().await;
    let frank = app.user("frank").await;
    let created = app
        .post(
            "/api/v1/nodes",
            &app.admin,
            json!({"name": "gpu-1", "labels": {"zone": "lab"},
                   "max_resources": {"cpus": 4, "gpus": 1}}),
        )
        .await;
    let created = created.expect(201).clone();
    let id = created["id"].as_str().expect("an id").to_string();
    assert_eq!(
        created["max_resources"],
        json!({"cpus": 4.0, "memory_mb": null, "gpus": 1})
    );
    assert_eq!(created["resources"], Value::Null);
    claim(
        &app,
        &id,
        json!({"gpu": "a100", "os": "linux", "zone": "dc1"}),
    )
    .await;

    let node = app.get(&format!("/api/v1/nodes/{id}"), &frank).await;
    let node = node.expect(200).clone();
    assert_eq!(node["labels"], json!({"zone": "lab"}));
    assert_eq!(
        node["declared_labels"],
        json!({"gpu": "a100", "os": "linux", "zone": "dc1"})
    );
    assert_eq!(node["resources"]["cpus"], 4.0);
    assert_eq!(node["resources"]["memory_mb"], 512 * 1024);
    assert_eq!(node["resources"]["gpus"].as_array().map(Vec::len), Some(1));
    assert_eq!(node["resources"]["gpus"][0]["index"], 0);
    assert_eq!(node["declared_resources"]["cpus"], 64.0);
    assert_eq!(
        node["declared_resources"]["gpus"].as_array().map(Vec::len),
        Some(8)
    );

    // Accepting one declared key adds it with its declared value.
    let accept = format!("/api/v1/nodes/{id}/labels/accept");
    let accepted = app
        .post(&accept, &app.admin, json!({"keys": ["gpu"]}))
        .await;
    assert_eq!(
        accepted.expect(200)["labels"],
        json!({"gpu": "a100", "zone": "lab"})
    );
    // Accepting without a body takes the rest, the declared zone included.
    let all = app.post_empty(&accept, &app.admin).await;
    assert_eq!(
        all.expect(200)["labels"],
        json!({"gpu": "a100", "os": "linux", "zone": "dc1"})
    );
    let before = app.events().await;
    app.post_empty(&accept, &app.admin).await.expect(200);
    assert_eq!(
        app.events().await,
        before,
        "accepting again appends nothing"
    );

    // Replacing the set drops whatever is not in it.
    let labels = format!("/api/v1/nodes/{id}/labels");
    let set = app
        .put(&labels, &app.admin, json!({"labels": {"gpu": "h100"}}))
        .await;
    let set = set.expect(200).clone();
    assert_eq!(set["labels"], json!({"gpu": "h100"}));
    assert_eq!(set["declared_labels"]["gpu"], "a100");

    // Lifting the CPU maximum counts what is declared; GPUs stay capped.
    let limits = format!("/api/v1/nodes/{id}/limits");
    let lifted = app
        .put(
            &limits,
            &app.admin,
            json!({"cpus": null, "memory_mb": 65536, "gpus": 2}),
        )
        .await;
    let lifted = lifted.expect(200).clone();
    assert_eq!(lifted["resources"]["cpus"], 64.0);
    assert_eq!(lifted["resources"]["memory_mb"], 65536);
    assert_eq!(
        lifted["resources"]["gpus"].as_array().map(Vec::len),
        Some(2)
    );

    app.catch_up().await;
    let list = app.get("/api/v1/nodes", &frank).await;
    let listed = &list.expect(200)["items"][0];
    assert_eq!(listed["labels"], json!({"gpu": "h100"}));
    assert_eq!(listed["max_resources"]["memory_mb"], 65536);
    assert_eq!(listed["resources"]["memory_mb"], 65536);
    let timeline: Vec<String> = sqlx::query_scalar(
        "SELECT summary FROM timeline WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(&id)
    .fetch_all(&app.pool)
    .await
    .expect("the timeline");
    assert!(
        timeline.contains(&"user:admin set the labels of node gpu-1 to gpu=h100".to_string()),
        "{timeline:?}"
    );

    let nobody = uuid_v4();
    app.put(
        &format!("/api/v1/nodes/{nobody}/labels"),
        &app.admin,
        json!({"labels": {}}),
    )
    .await
    .expect(404);
    app.post_empty(&format!("/api/v1/nodes/{nobody}/labels/accept"), &app.admin)
        .await
        .expect(404);
    app.put(
        &format!("/api/v1/nodes/{nobody}/limits"),
        &app.admin,
        json!({"cpus": 1, "memory_mb": null, "gpus": null}),
    )
    .await
    .expect(404);
    app.post_empty(&format!("/api/v1/nodes/{id}/revoke"), &app.admin)
        .await
        .expect(200);
    app.put(&labels, &app.admin, json!({"labels": {}}))
        .await
        .expect(409);
}

#[tokio::test]
async fn projects_have_unique_names_checked_roles_an_admin_quota_and_an_archive() {
    let app = start().await;
    let gina = app.user("gina").await;
    app.user("hank").await;
    let project = app.project(&gina, "quota").await;
    let members = format!("/api/v1/projects/{project}/members");
    let quota = format!("/api/v1/projects/{project}/quota");
    let before = app.events().await;

    app.post("/api/v1/projects", &gina, json!({"name": "quota"}))
        .await
        .expect_error(409, "name");
    app.post("/api/v1/projects", &gina, json!({"name": "Bad Name"}))
        .await
        .expect_error(422, "name");
    app.post("/api/v1/projects", &gina, json!({"description": "no name"}))
        .await
        .expect_error(422, "name");
    app.post(&members, &gina, json!({"user": "hank", "role": "owner"}))
        .await
        .expect_error(422, "role");
    app.post(&members, &gina, json!({"user": "nobody", "role": "member"}))
        .await
        .expect_error(404, "user");
    app.call(
        Method::DELETE,
        &format!("{members}/hank"),
        Some(&gina),
        None,
    )
    .await
    .expect_error(404, "user");
    app.call(
        Method::DELETE,
        &format!("{members}/gina"),
        Some(&gina),
        None,
    )
    .await
    .expect(409);
    app.put(&quota, &gina, json!({"max_running": 3}))
        .await
        .expect(403);
    app.put(&quota, &app.admin, json!({"max_running": -1}))
        .await
        .expect_error(422, "max_running");
    app.put(&quota, &app.admin, json!({}))
        .await
        .expect_error(422, "max_running");
    app.put(&quota, &app.admin, json!({"max_running": "3"}))
        .await
        .expect_error(422, "max_running");
    assert_eq!(app.events().await, before);

    assert_eq!(
        app.put(&quota, &app.admin, json!({"max_running": 3}))
            .await
            .expect(200)["max_running"],
        3
    );
    assert!(app
        .put(&quota, &app.admin, json!({"max_running": null}))
        .await
        .expect(200)["max_running"]
        .is_null());
    app.call(
        Method::PUT,
        &format!("/api/v1/projects/{}/quota", uuid_v4()),
        Some(&app.admin),
        Some(json!({"max_running": 1})),
    )
    .await
    .expect(404);

    let added = app
        .post(&members, &gina, json!({"user": "hank", "role": "member"}))
        .await;
    assert_eq!(
        added.expect(200)["members"][1],
        json!({"user": "hank", "role": "member"})
    );
    let archived = app
        .post_empty(&format!("/api/v1/projects/{project}/archive"), &gina)
        .await;
    assert_eq!(archived.expect(200)["archived"], true);
    let before = app.events().await;
    app.post("/api/v1/tasks", &gina, task_body(&project))
        .await
        .expect_error(409, "project_id");
    app.post(&members, &gina, json!({"user": "hank", "role": "viewer"}))
        .await
        .expect(409);
    assert_eq!(app.events().await, before);
}

#[tokio::test]
async fn users_are_managed_by_admins_and_tokens_by_their_owners() {
    let app = start().await;
    let ivy = app.user("ivy").await;
    app.user("jack").await;
    let before = app.events().await;
    app.post("/api/v1/users", &ivy, json!({"name": "kate"}))
        .await
        .expect(403);
    app.get("/api/v1/users", &ivy).await.expect(403);
    app.post("/api/v1/users", &app.admin, json!({"name": "Kate!"}))
        .await
        .expect_error(422, "name");
    app.post("/api/v1/users", &app.admin, json!({"name": "ivy"}))
        .await
        .expect_error(409, "name");
    app.post("/api/v1/users", &app.admin, json!({"admin": true}))
        .await
        .expect_error(422, "name");
    app.post(
        "/api/v1/users",
        &app.admin,
        json!({"name": "kate", "admin": "yes"}),
    )
    .await
    .expect_error(422, "admin");
    app.post("/api/v1/users/jack/tokens", &ivy, json!({}))
        .await
        .expect(403);
    app.get("/api/v1/users/jack", &ivy).await.expect(403);
    app.post("/api/v1/users/nobody/tokens", &app.admin, json!({}))
        .await
        .expect(404);
    app.post(
        "/api/v1/users/ivy/tokens",
        &ivy,
        json!({"label": "x".repeat(101)}),
    )
    .await
    .expect_error(422, "label");
    assert_eq!(app.events().await, before);

    let created = app
        .post(
            "/api/v1/users",
            &app.admin,
            json!({"name": "kate", "admin": true}),
        )
        .await;
    assert_eq!(
        created.expect(201),
        &json!({"name": "kate", "admin": true, "created_at": created.body["created_at"], "tokens": []})
    );
    app.catch_up().await;
    let list = app.get("/api/v1/users", &app.admin).await;
    let names: Vec<_> = list.expect(200)["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|u| u["name"].as_str().expect("a name").to_string())
        .collect();
    assert_eq!(names, ["admin", "ivy", "jack", "kate"]);
}

#[tokio::test]
async fn health_and_readiness_answer_in_json() {
    let app = start().await;
    let health = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(health.expect(200), &json!({"status": "ok"}));
    let ready = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(ready.expect(200)["status"], "ready");
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&app.pool)
    .await
    .expect("forget a migration");
    let unready = app.call(Method::GET, "/readyz", None, None).await;
    unready.expect(503);
    assert!(unready.details().contains("migrate"));
}

#[tokio::test]
async fn users_see_the_server_version_and_the_agent_protocols_it_accepts() {
    let app = start().await;
    app.get("/api/v1/version", "udu~not-a-token")
        .await
        .expect(401);
    let version = app.get("/api/v1/version", &app.admin).await;
    let version = version.expect(200);
    assert_eq!(version["server"], env!("CARGO_PKG_VERSION"));
    let (oldest, newest) = (
        version["agent_protocol"]["oldest"].as_u64().unwrap(),
        version["agent_protocol"]["newest"].as_u64().unwrap(),
    );
    assert!(oldest >= 1 && oldest <= newest, "{version}");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_json_envelope() {
    let app = start().await;
    let missing = app.get("/api/v1/nothing-here", &app.admin).await;
    missing.expect(404);
    assert!(missing.details().contains("no route"));
    let wrong_method = app
        .call(Method::PATCH, "/api/v1/tasks", Some(&app.admin), None)
        .await;
    wrong_method.expect(405);
    assert!(!wrong_method.errors().is_empty());
}

/// Every operation the API must offer, as (method, path).
const EXPECTED_ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/api/v1/openapi.json"),
    ("post", "/api/v1/users"),
    ("get", "/api/v1/users"),
    ("get", "/api/v1/users/{name}"),
    ("get", "/api/v1/me"),
    ("post", "/api/v1/users/{name}/tokens"),
    ("get", "/api/v1/users/{name}/tokens"),
    ("delete", "/api/v1/users/{name}/tokens/{token_id}"),
    ("post", "/api/v1/projects"),
    ("get", "/api/v1/projects"),
    ("get", "/api/v1/projects/{id}"),
    ("post", "/api/v1/projects/{id}/members"),
    ("delete", "/api/v1/projects/{id}/members/{user}"),
    ("put", "/api/v1/projects/{id}/quota"),
    ("post", "/api/v1/projects/{id}/archive"),
    ("get", "/api/v1/projects/{id}/secrets"),
    ("put", "/api/v1/projects/{id}/secrets/{name}"),
    ("delete", "/api/v1/projects/{id}/secrets/{name}"),
    ("post", "/api/v1/tasks"),
    ("get", "/api/v1/tasks"),
    ("get", "/api/v1/tasks/{id}"),
    ("post", "/api/v1/tasks/{id}/cancel"),
    ("get", "/api/v1/tasks/{id}/state"),
    ("get", "/api/v1/tasks/{id}/logs"),
    ("get", "/api/v1/tasks/{id}/artifacts"),
    ("post", "/api/v1/projects/{id}/objects"),
    ("post", "/api/v1/projects/{id}/objects/complete"),
    ("get", "/api/v1/artifacts/{id}/download"),
    ("post", "/api/v1/nodes"),
    ("get", "/api/v1/nodes"),
    ("get", "/api/v1/nodes/{id}"),
    ("post", "/api/v1/nodes/{id}/drain"),
    ("post", "/api/v1/nodes/{id}/undrain"),
    ("post", "/api/v1/nodes/{id}/revoke"),
    ("post", "/api/v1/nodes/{id}/host-ssh"),
    ("put", "/api/v1/nodes/{id}/labels"),
    ("post", "/api/v1/nodes/{id}/labels/accept"),
    ("put", "/api/v1/nodes/{id}/limits"),
    ("get", "/api/v1/events"),
    ("get", "/api/v1/events/{position}"),
    ("get", "/api/v1/event-types"),
    ("get", "/api/v1/timeline"),
    ("get", "/api/v1/timeline/stream"),
    ("get", "/api/v1/version"),
];

#[tokio::test]
async fn the_openapi_document_covers_every_route_and_every_documented_route_is_served() {
    let app = start().await;
    let doc = app
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    let doc = doc.expect(200).clone();
    assert_eq!(doc, api::openapi::document());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearer"]["description"]})
    );

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            documented.insert((method.clone(), path.clone()));
            let public = path == "/healthz"
                || path == "/readyz"
                || path == "/metrics"
                || path.ends_with("openapi.json");
            assert_eq!(
                operation.get("security").is_some(),
                !public,
                "{method} {path} has the wrong security"
            );
        }
    }
    let expected: BTreeSet<_> = EXPECTED_ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, expected);

    // Every documented operation is served: unauthenticated, each answers
    // 401 (or 200 when public), never the router's 404 or 405.
    let id = uuid_v4();
    for (method, path) in &documented {
        let concrete = path
            .replace("{id}", &id)
            .replace("{token_id}", &id)
            .replace("{name}", "admin")
            .replace("{user}", "admin");
        let method: Method = method.to_uppercase().parse().expect("a method");
        let answer = app.call(method.clone(), &concrete, None, None).await;
        let status = answer.status.as_u16();
        assert!(
            status == 401 || status == 200,
            "{method} {concrete} answered {status}: {:?}",
            answer.body
        );
    }
}

/// A node whose agent is connected, as the ingress would record it.
async fn online_node(app: &App, name: &str) -> String {
    let created = app
        .post("/api/v1/nodes", &app.admin, json!({ "name": name }))
        .await;
    let id = created.expect(201)["id"]
        .as_str()
        .expect("an id")
        .to_string();
    let at = chrono::Utc::now();
    let connect = domain::node::NodeCommand::Connect {
        session: uuid::Uuid::now_v7(),
        agent_version: "0.1.0-test".into(),
        resources: domain::node::NodeResources::default(),
        labels: Default::default(),
        at,
    };
    app.store
        .execute::<domain::node::Node>(&id, connect, &domain::Actor::Node(id.clone()), at)
        .await
        .expect("connect");
    id
}

#[tokio::test]
async fn host_ssh_is_for_admins_checks_its_input_and_needs_an_online_node() {
    let app = start().await;
    let frank = app.user("frank").await;
    let created = app
        .post("/api/v1/nodes", &app.admin, json!({"name": "gpu-1"}))
        .await;
    let offline = created.expect(201)["id"]
        .as_str()
        .expect("an id")
        .to_string();
    let online = online_node(&app, "gpu-2").await;
    let path = format!("/api/v1/nodes/{online}/host-ssh");
    let before = app.events().await;

    app.call(Method::POST, &path, None, Some(json!({"command": "id"})))
        .await
        .expect(401);
    // Admins only, whatever the body says.
    app.post(&path, &frank, json!({"command": "id"}))
        .await
        .expect(403);
    app.post(&path, &frank, json!({"command": ""}))
        .await
        .expect(403);
    for (body, field) in [
        (json!({"command": ""}), "command"),
        (json!({"command": "   "}), "command"),
        (json!({"command": "a\0b"}), "command"),
        (json!({"command": "x".repeat(4097)}), "command"),
        (json!({"command": 7}), "command"),
        (json!({"timeout_s": 5}), "command"),
        (json!({"command": "id", "timeout_s": 0}), "timeout_s"),
        (json!({"command": "id", "timeout_s": 601}), "timeout_s"),
        (json!({"command": "id", "timeout_s": -1}), "timeout_s"),
        (json!({"command": "id", "user": "root"}), "user"),
    ] {
        app.post(&path, &app.admin, body.clone())
            .await
            .expect_error(422, field);
    }
    app.post(
        &format!("/api/v1/nodes/{}/host-ssh", uuid_v4()),
        &app.admin,
        json!({"command": "id"}),
    )
    .await
    .expect(404);
    let refused = app
        .post(
            &format!("/api/v1/nodes/{offline}/host-ssh"),
            &app.admin,
            json!({"command": "id"}),
        )
        .await;
    refused.expect(409);
    assert!(
        refused.details().contains("not online"),
        "{:?}",
        refused.body
    );
    assert_eq!(app.events().await, before, "nothing is appended");
}

#[tokio::test]
async fn host_ssh_answers_with_the_nodes_result_and_records_when_none_comes() {
    let app = start().await;
    let frank = app.user("frank").await;
    let id = online_node(&app, "gpu-3").await;
    let path = format!("/api/v1/nodes/{id}/host-ssh");

    // Stands in for the ingress: answers the first request it sees.
    let store = app.store.clone();
    let node = id.clone();
    let answering = tokio::spawn(async move {
        loop {
            let state = store
                .load::<domain::node::Node>(&node)
                .await
                .expect("load")
                .expect("the node")
                .state;
            if let Some(request_id) = state.host_ssh.keys().next().copied() {
                let at = chrono::Utc::now();
                let finish = domain::node::NodeCommand::FinishHostSsh {
                    request_id,
                    result: domain::node::HostSshOutcome {
                        exit_code: Some(0),
                        output: "hello\nroot\n".into(),
                        duration_ms: 42,
                        ..Default::default()
                    },
                    at,
                };
                store
                    .execute::<domain::node::Node>(
                        &node,
                        finish,
                        &domain::Actor::Node(node.clone()),
                        at,
                    )
                    .await
                    .expect("finish");
                return request_id;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    let ran = app
        .post(&path, &app.admin, json!({"command": "echo hello; id -un"}))
        .await;
    let ran = ran.expect(200).clone();
    let request_id = answering.await.expect("answered");
    assert_eq!(ran["request_id"], request_id.to_string());
    assert_eq!(ran["exit_code"], 0);
    assert_eq!(ran["output"], "hello\nroot\n");
    assert_eq!(ran["timed_out"], false);

    // Nobody answers this one: after its limit and the grace it is
    // recorded as unanswered, and a late answer is refused.
    let started = std::time::Instant::now();
    let unanswered = app
        .post(
            &path,
            &app.admin,
            json!({"command": "uptime", "timeout_s": 1}),
        )
        .await;
    unanswered.expect(504);
    assert!(
        unanswered.details().contains("no answer"),
        "{:?}",
        unanswered.body
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let state = app
        .store
        .load::<domain::node::Node>(&id)
        .await
        .expect("load")
        .expect("the node")
        .state;
    assert!(state.host_ssh.is_empty(), "nothing is left waiting");

    app.settle().await;
    let timeline = app
        .get(
            &format!("/api/v1/events?aggregate_type=node&aggregate_id={id}"),
            &app.admin,
        )
        .await;
    let items = timeline.expect(200)["items"]
        .as_array()
        .expect("items")
        .clone();
    let host: Vec<&Value> = items
        .iter()
        .filter(|e| {
            e["event_type"]
                .as_str()
                .unwrap_or_default()
                .contains("HostSsh")
        })
        .collect();
    let summaries: Vec<&str> = host
        .iter()
        .map(|e| e["summary"].as_str().expect("a summary"))
        .collect();
    assert_eq!(
        summaries,
        [
            "user:admin ran on the host of node gpu-3 over SSH: `echo hello; id -un` (time limit 30 s)",
            "host SSH on node gpu-3 exited 0 in 42 ms, 11 B output",
            "user:admin ran on the host of node gpu-3 over SSH: `uptime` (time limit 1 s)",
            "host SSH on node gpu-3 failed: no answer from the node within 16 s",
        ]
    );
    assert_eq!(host[1]["payload"]["result"]["output"], "hello\nroot\n");
    assert_eq!(host[3]["actor"], "system:api");
    // Host commands, their summaries and their output are for admins only:
    // to anybody else the events are not there at all.
    let seen_by_frank = app
        .get(
            &format!("/api/v1/events?aggregate_type=node&aggregate_id={id}"),
            &frank,
        )
        .await;
    let types: Vec<&str> = seen_by_frank.expect(200)["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["event_type"].as_str().expect("a type"))
        .collect();
    assert_eq!(types, ["NodeProvisioned", "NodeConnected"]);
    let shown = seen_by_frank.body.to_string();
    for secret in ["echo hello", "uptime", "root\\n", "exited 0", "no answer"] {
        assert!(!shown.contains(secret), "{secret:?} in {shown}");
    }
    for event in &host {
        let position = event["position"].as_i64().expect("a position");
        let one = app.get(&format!("/api/v1/events/{position}"), &frank).await;
        one.expect(404);
        assert_eq!(
            one.details(),
            format!("there is no event at position {position}"),
            "as if there were none"
        );
        app.get(&format!("/api/v1/events/{position}"), &app.admin)
            .await
            .expect(200);
    }
}

#[tokio::test]
async fn only_admins_create_projects_unless_the_server_lets_every_user() {
    let app = App::start(Config::default()).await;
    let ivy = app.user("ivy").await;
    let before = app.events().await;
    let refused = app
        .post("/api/v1/projects", &ivy, json!({"name": "mine"}))
        .await;
    refused.expect(403);
    assert_eq!(
        refused.details(),
        "only admins may create projects on this server"
    );
    // Refused before anything else is looked at, and nothing is kept: not
    // an event, not the name.
    app.post("/api/v1/projects", &ivy, json!({"name": "Bad Name"}))
        .await
        .expect(403);
    assert_eq!(app.events().await, before);
    let project = app.project(&app.admin, "mine").await;
    let shown = app
        .get(&format!("/api/v1/projects/{project}"), &app.admin)
        .await;
    assert_eq!(shown.expect(200)["members"][0]["user"], "admin");

    let open = start().await;
    let ivy = open.user("ivy").await;
    let project = open.project(&ivy, "mine").await;
    let shown = open.get(&format!("/api/v1/projects/{project}"), &ivy).await;
    assert_eq!(
        shown.expect(200)["members"],
        json!([{"user": "ivy", "role": "maintainer"}])
    );
}

#[tokio::test]
async fn adding_members_tells_a_non_admin_nothing_about_which_users_exist() {
    let app = start().await;
    let gina = app.user("gina").await;
    let vic = app.user("vic").await;
    let mia = app.user("mia").await;
    let olga = app.user("olga").await;
    app.user("hank").await;
    let project = app.project(&gina, "probe").await;
    app.add_member(&project, "vic", "viewer").await;
    app.add_member(&project, "mia", "member").await;
    let members = format!("/api/v1/projects/{project}/members");
    let before = app.events().await;

    let add = |token: &str, user: &str| {
        let request = app
            .client
            .post(format!("{}{members}", app.base))
            .bearer_auth(token)
            .json(&json!({"user": user, "role": "member"}));
        app.send(request)
    };
    // A maintainer naming nobody, and a viewer or member naming anybody,
    // get one answer: same status, field and words.
    let no_such_user = add(&gina, "ghost").await;
    no_such_user.expect_error(404, "user");
    assert_eq!(
        no_such_user.details(),
        "no user named \"ghost\" can be added to this project (the user must exist and only \
         maintainers may add members)"
    );
    for token in [&vic, &mia] {
        let not_allowed = add(token, "ghost").await;
        assert_eq!(not_allowed.status, no_such_user.status);
        assert_eq!(not_allowed.body, no_such_user.body);
        let existing = add(token, "hank").await;
        assert_eq!(existing.status, no_such_user.status);
        assert_eq!(
            existing.body.to_string().replace("hank", "ghost"),
            no_such_user.body.to_string(),
            "the answer differs in nothing but the name"
        );
    }
    // Somebody outside the project does not see it, whoever they name.
    let outside_nobody = add(&olga, "ghost").await;
    let outside_somebody = add(&olga, "hank").await;
    outside_nobody.expect(404);
    assert!(outside_nobody.fields().is_empty());
    assert_eq!(outside_nobody.body, outside_somebody.body);
    // Names that cannot exist are refused as names, for everybody alike.
    add(&vic, "Bad Name").await.expect_error(422, "user");
    // Admins get the precise answer.
    let admin = add(&app.admin, "ghost").await;
    admin.expect_error(404, "user");
    assert_eq!(admin.details(), "there is no user named \"ghost\"");
    assert_eq!(app.events().await, before, "nothing was appended");

    // A maintainer can add those who exist: that is what the route is for.
    let added = add(&gina, "hank").await;
    assert!(added.expect(200)["members"]
        .as_array()
        .expect("members")
        .contains(&json!({"user": "hank", "role": "member"})));

    // An archived project answers 409 before any user is looked up.
    app.post_empty(&format!("/api/v1/projects/{project}/archive"), &gina)
        .await
        .expect(200);
    let before = app.events().await;
    let nobody = add(&gina, "ghost").await;
    let somebody = add(&gina, "olga").await;
    nobody.expect(409);
    assert_eq!(nobody.body, somebody.body);
    assert_eq!(app.events().await, before);
}

#[tokio::test]
async fn a_maintainer_still_removes_members_of_an_archived_project() {
    let app = start().await;
    let gina = app.user("gina").await;
    let hank = app.user("hank").await;
    let vic = app.user("vic").await;
    let project = app.project(&gina, "old").await;
    app.add_member(&project, "hank", "member").await;
    app.add_member(&project, "vic", "viewer").await;
    app.post_empty(&format!("/api/v1/projects/{project}/archive"), &gina)
        .await
        .expect(200);
    let member = |user: &str| format!("/api/v1/projects/{project}/members/{user}");

    // Removing is what an archive still allows, under the usual rules.
    app.call(Method::DELETE, &member("gina"), Some(&vic), None)
        .await
        .expect(403);
    app.call(Method::DELETE, &member("gina"), Some(&gina), None)
        .await
        .expect(409);
    let removed = app
        .call(Method::DELETE, &member("hank"), Some(&gina), None)
        .await;
    let shown = removed.expect(200);
    assert_eq!(shown["archived"], true);
    assert_eq!(
        shown["members"],
        json!([{"user": "gina", "role": "maintainer"}, {"user": "vic", "role": "viewer"}])
    );
    app.get(&format!("/api/v1/projects/{project}"), &hank)
        .await
        .expect(404);
    // A member may still leave.
    app.call(Method::DELETE, &member("vic"), Some(&vic), None)
        .await
        .expect(200);

    // Everything else stays refused.
    let before = app.events().await;
    app.post(
        &format!("/api/v1/projects/{project}/members"),
        &gina,
        json!({"user": "hank", "role": "member"}),
    )
    .await
    .expect(409);
    app.put(
        &format!("/api/v1/projects/{project}/quota"),
        &app.admin,
        json!({"max_running": 2}),
    )
    .await
    .expect(409);
    app.post("/api/v1/tasks", &gina, task_body(&project))
        .await
        .expect_error(409, "project_id");
    assert_eq!(app.events().await, before);
}

#[tokio::test]
async fn a_member_removed_through_another_server_submits_nothing_more_through_this_one() {
    let a = start().await;
    let gina = a.user("gina").await;
    let hank = a.user("hank").await;
    let project = a.project(&gina, "shared").await;
    a.add_member(&project, "hank", "member").await;
    // `a` has decided on the project and remembers hank in it.
    a.submit(&hank, &project).await;
    // A second server on the same database removes him.
    let b = App::start_on(a.pool.clone(), Config::default(), None).await;
    b.call(
        Method::DELETE,
        &format!("/api/v1/projects/{project}/members/hank"),
        Some(&gina),
        None,
    )
    .await
    .expect(200);
    let before = a.events().await;
    a.post("/api/v1/tasks", &hank, task_body(&project))
        .await
        .expect_error(404, "project_id");
    a.get(&format!("/api/v1/projects/{project}"), &hank)
        .await
        .expect(404);
    assert_eq!(a.events().await, before, "nothing was appended");
}

/// Repository URLs that would put a credential into the event log.
const URLS_WITH_CREDENTIALS: &[&str] = &[
    "https://alice:hunter2@git.example.com/lab/code.git",
    "https://ghp_0123456789abcdef0123456789abcdef0123@github.com/lab/code.git",
    "https://x-access-token:ghs_hunter2@github.com/lab/code.git",
    "https://hunter2@git.example.com/lab/code.git",
    "https://git.example.com/lab/code.git?private_token=hunter2",
    "https://git.example.com/lab/code.git#hunter2",
    "https://alice%3Ahunter2%40git.example.com/lab/code.git",
    "https://alice%3Ahunter2@git.example.com/lab/code.git",
    "git://alice@git.example.com/lab/code.git",
    "ssh://git:hunter2@git.example.com/lab/code.git",
    "ssh://ghp_0123456789abcdef0123456789abcdef0123@github.com/lab/code.git",
    "git:hunter2@git.example.com:lab/code.git",
    "x-access-token@github.com:lab/code.git",
    "https://alice\u{200b}:hunter2@git.example.com/lab/code.git",
    "https://git.example.com/lab/code.git\n?token=hunter2",
];

#[tokio::test]
async fn a_task_whose_repository_url_holds_a_credential_is_refused_naming_the_field() {
    let app = start().await;
    let project = app.project(&app.admin, "creds").await;
    let before = app.events().await;
    for field in ["code_repo_url", "env_repo_url"] {
        for url in URLS_WITH_CREDENTIALS {
            let body = with(task_body(&project), &format!("/{field}"), Some(json!(url)));
            let refused = app.post("/api/v1/tasks", &app.admin, body).await;
            refused.expect_error(422, field);
            assert_eq!(refused.fields(), [field], "{url:?}");
            let detail = refused.details();
            assert!(
                !detail.contains("hunter2") && !detail.contains("ghp_0123"),
                "the answer repeats no secret: {detail}"
            );
            if !url.contains(['\n', '\u{200b}']) {
                assert!(
                    detail.contains("credentials never go in a URL"),
                    "{url:?}: {detail}"
                );
            }
        }
    }
    app.settle().await;
    assert_eq!(app.events().await, before, "nothing was appended");
    let logged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE payload::text LIKE '%hunter2%' \
         OR metadata::text LIKE '%hunter2%'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("search the log");
    assert_eq!(logged, 0);
    // A plain ssh user name is how private repositories are reached.
    let body = with(
        task_body(&project),
        "/code_repo_url",
        Some(json!("ssh://git@git.example.com:2222/lab/code.git")),
    );
    app.post("/api/v1/tasks", &app.admin, body)
        .await
        .expect(201);
}

#[tokio::test]
async fn a_whole_number_written_with_a_zero_fraction_is_that_number_and_a_body_must_be_an_object() {
    let app = start().await;
    let project = app.project(&app.admin, "floats").await;
    let quota = format!("/api/v1/projects/{project}/quota");
    let answer = app
        .put(&quota, &app.admin, json!({"max_running": 3.0}))
        .await;
    assert_eq!(answer.expect(200)["max_running"], 3);
    app.put(&quota, &app.admin, json!({"max_running": 3.5}))
        .await
        .expect_error(422, "max_running");
    app.put(&quota, &app.admin, json!([null]))
        .await
        .expect_error(422, "body");
    // An optional body given as null is no body.
    app.post("/api/v1/users/admin/tokens", &app.admin, Value::Null)
        .await
        .expect(201);
}

#[tokio::test]
async fn the_document_names_every_status_an_operation_answers_and_describes_the_stream_events() {
    let app = start().await;
    let doc = app
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await
        .expect(200)
        .clone();
    let mut ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            let id = operation["operationId"].as_str().expect("an operationId");
            assert!(ids.insert(id.to_string()), "{id} is not unique");
            let statuses = operation["responses"].as_object().expect("responses");
            let has = |s: &str| statuses.contains_key(s);
            if operation.get("security").is_some() {
                assert!(has("401") && has("429"), "{method} {path}");
            }
            if operation.get("requestBody").is_some() {
                for s in ["400", "413", "415", "422"] {
                    assert!(has(s), "{method} {path} lacks {s}");
                }
            }
            if path.starts_with("/api/v1") && method != "get" {
                assert!(has("409"), "{method} {path} lacks 409");
            }
        }
    }
    let stream = &doc["paths"]["/api/v1/timeline/stream"]["get"]["responses"]["200"]["content"]
        ["text/event-stream"]["schema"]["oneOf"];
    let events: Vec<_> = stream
        .as_array()
        .expect("the timeline stream's events")
        .iter()
        .map(|e| e["properties"]["event"]["const"].clone())
        .collect();
    assert_eq!(events, [json!("timeline"), json!("ready")]);
    assert_eq!(
        stream[0]["properties"]["data"]["contentSchema"]["$ref"],
        "#/components/schemas/TimelineEntry"
    );
    let logs = &doc["paths"]["/api/v1/tasks/{id}/logs"]["get"]["responses"]["200"]["content"]
        ["text/event-stream"]["schema"]["oneOf"];
    assert_eq!(logs.as_array().map(Vec::len), Some(2));
}

/// A submission is decided on the project as the server remembers it, and
/// guarded by it: a membership another process changed since counts.
#[tokio::test]
async fn a_membership_changed_by_another_process_counts_for_the_next_submission() {
    use domain::project::{Project, ProjectCommand, Role};
    let app = start().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let project = app.project(&app.admin, "shared").await;
    app.add_member(&project, "alice", "member").await;
    // The server now remembers the project with alice in it.
    app.submit(&alice, &project).await;

    let elsewhere = store::Store::new(app.pool.clone());
    let admin = domain::Actor::User("admin".into());
    let change = |command: ProjectCommand| {
        let (elsewhere, admin, project) = (&elsewhere, &admin, &project);
        async move {
            elsewhere
                .execute::<Project>(project, command, admin, chrono::Utc::now())
                .await
                .expect("the other process changes the project");
        }
    };
    change(ProjectCommand::RemoveMember {
        user: "alice".into(),
        by: admin.clone(),
        at: chrono::Utc::now(),
    })
    .await;
    let before = app.events().await;
    app.post("/api/v1/tasks", &alice, task_body(&project))
        .await
        .expect_error(404, "project_id");
    assert_eq!(app.events().await, before, "a task was appended");

    change(ProjectCommand::AddMember {
        user: "bob".into(),
        role: Role::Member,
        by: admin.clone(),
        at: chrono::Utc::now(),
    })
    .await;
    app.submit(&bob, &project).await;
}
