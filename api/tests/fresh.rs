//! Lists asked for with `Prefer: fresh` show everything committed before
//! the request, over real HTTP against a real PostgreSQL. No projector runs
//! here unless a test runs one, so the read models stay behind the log
//! until the test lets them catch up: what a list shows then depends only
//! on whether it waited for them.

use std::time::{Duration, Instant};

use api::fresh::WAIT;
use api::Config;
use reqwest::header::HeaderValue;
use serde_json::{json, Value};

mod support;

use support::{minimal_task, Answer, App};

/// `GET path` as the holder of `token`, with `prefer` as its `Prefer`
/// header when given (any bytes a client could send).
async fn list(app: &App, path: &str, token: &str, prefer: Option<&[u8]>) -> Answer {
    let mut request = app
        .client
        .get(format!("{}{path}", app.base))
        .bearer_auth(token);
    if let Some(value) = prefer {
        request = request.header(
            "Prefer",
            HeaderValue::from_bytes(value).expect("a header value"),
        );
    }
    app.send(request).await
}

/// The `key` of every item of a list's page.
fn listed(answer: &Answer, key: &str) -> Vec<String> {
    answer.expect(200)["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item[key].as_str().expect("a string").to_string())
        .collect()
}

/// Whether the answer says it shows everything committed before it.
fn fresh(answer: &Answer) -> bool {
    answer
        .headers
        .get("preference-applied")
        .is_some_and(|v| v == "fresh")
}

/// A projector that applies everything committed, but only after `delay`.
fn late_projector(app: &App, delay: Duration) -> tokio::task::JoinHandle<()> {
    let pool = app.pool.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        projections::Projector::new(pool)
            .catch_up()
            .await
            .expect("projections catch up");
    })
}

#[tokio::test]
async fn a_fresh_list_waits_for_a_slow_projector_and_shows_what_was_just_made() {
    let app = App::start(Config::default()).await;
    let project = app.project_as(&app.admin, "made-now").await;
    let task = app.submit_as(&app.admin, minimal_task(&project)).await;
    app.post("/api/v1/users", &app.admin, json!({ "name": "newcomer" }))
        .await
        .expect(201);
    app.post("/api/v1/nodes", &app.admin, json!({ "name": "fresh-node" }))
        .await
        .expect(201);

    // Asked plainly, the list answers from the read model as it stands:
    // nothing has projected the new project yet.
    let plain = list(&app, "/api/v1/projects", &app.admin, None).await;
    assert!(!fresh(&plain));
    assert!(listed(&plain, "name").is_empty(), "{:?}", plain.body);

    // The projector comes a second later; the fresh list waits for it.
    let projector = late_projector(&app, Duration::from_secs(1));
    let projects = list(&app, "/api/v1/projects", &app.admin, Some(b"fresh")).await;
    assert!(fresh(&projects), "{:?}", projects.headers);
    assert_eq!(listed(&projects, "name"), ["made-now"]);
    projector.await.expect("the projector");

    let users = list(&app, "/api/v1/users", &app.admin, Some(b"fresh")).await;
    assert!(fresh(&users));
    assert!(listed(&users, "name").contains(&"newcomer".to_string()));
    let nodes = list(&app, "/api/v1/nodes", &app.admin, Some(b"fresh")).await;
    assert!(fresh(&nodes));
    assert_eq!(listed(&nodes, "name"), ["fresh-node"]);
    let tasks = list(
        &app,
        &format!("/api/v1/tasks?project={project}"),
        &app.admin,
        Some(b"fresh"),
    )
    .await;
    assert!(fresh(&tasks));
    assert_eq!(listed(&tasks, "id"), [task.as_str()]);
    let timeline = list(
        &app,
        &format!("/api/v1/timeline?task={task}"),
        &app.admin,
        Some(b"fresh"),
    )
    .await;
    assert!(fresh(&timeline));
    assert_eq!(listed(&timeline, "event_type"), ["TaskSubmitted"]);
}

#[tokio::test]
async fn every_list_waits_for_the_next_change_as_well_as_the_first() {
    // A member added after the projector's last round must see the project
    // and its tasks at once: the task list waits for the membership too.
    let app = App::start(Config::default()).await;
    let project = app.project_as(&app.admin, "shared").await;
    let task = app.submit_as(&app.admin, minimal_task(&project)).await;
    let ada = app.user("ada").await;
    app.catch_up().await;
    app.add_member(&project, "ada", "member").await;

    let before = list(&app, "/api/v1/tasks", &ada, None).await;
    assert!(listed(&before, "id").is_empty(), "{:?}", before.body);

    let projector = late_projector(&app, Duration::from_secs(1));
    let tasks = list(&app, "/api/v1/tasks", &ada, Some(b"fresh")).await;
    assert!(fresh(&tasks));
    assert_eq!(listed(&tasks, "id"), [task]);
    projector.await.expect("the projector");
    let projects = list(&app, "/api/v1/projects", &ada, Some(b"fresh")).await;
    assert_eq!(listed(&projects, "name"), ["shared"]);
}

#[tokio::test]
async fn a_fresh_list_of_a_stopped_projector_answers_after_the_wait_without_claiming_it() {
    let app = App::start(Config::default()).await;
    app.project_as(&app.admin, "unseen").await;

    let started = Instant::now();
    let stale = list(&app, "/api/v1/projects", &app.admin, Some(b"fresh")).await;
    let waited = started.elapsed();
    assert!(!fresh(&stale), "{:?}", stale.headers);
    assert!(listed(&stale, "name").is_empty(), "{:?}", stale.body);
    assert!(
        waited >= WAIT,
        "answered after {waited:?}, before the wait ran out"
    );

    app.catch_up().await;
    let caught_up = list(&app, "/api/v1/projects", &app.admin, Some(b"fresh")).await;
    assert!(fresh(&caught_up));
    assert_eq!(listed(&caught_up, "name"), ["unseen"]);
}

#[tokio::test]
async fn other_preferences_and_garbage_are_ignored_and_answered_at_once() {
    let app = App::start(Config::default()).await;
    app.project_as(&app.admin, "behind").await;
    let long = format!("wait=1;{}", "x".repeat(6000));
    for prefer in [
        &b"return=minimal"[..],
        b"freshness",
        b"return=fresh",
        b"\xff\xfe fresh",
        b",,;;==",
        long.as_bytes(),
    ] {
        let started = Instant::now();
        let answer = list(&app, "/api/v1/projects", &app.admin, Some(prefer)).await;
        let took = started.elapsed();
        assert!(!fresh(&answer), "{prefer:?}");
        assert!(listed(&answer, "name").is_empty(), "{prefer:?}");
        assert!(took < WAIT, "{prefer:?} waited {took:?}");
    }
    // Routes that read the log itself answer as always, fresh or not.
    let me = list(&app, "/api/v1/me", &app.admin, Some(b"fresh")).await;
    assert_eq!(me.expect(200)["name"], Value::from("admin"));
    assert!(!fresh(&me));
}
