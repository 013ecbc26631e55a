//! The limits on what one caller can make the server do, over real HTTP
//! against a real PostgreSQL: bad tokens cost no aggregate load, tokens
//! expire and are bounded per user, live streams are bounded per user,
//! every list is paged, and requests are rate limited per token.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::time::Duration;

use api::{Config, RateLimit};
use chrono::Utc;
use domain::task::{Task, TaskCommand};
use domain::Actor;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use store::Store;
use uuid::Uuid;

mod support;

use support::{minimal_task as task_body, Answer, App};

async fn start() -> App {
    App::start(Config::default()).await
}

impl App {
    /// Creates project `name` as the admin; its id.
    async fn project(&self, name: &str) -> String {
        self.project_as(&self.admin, name).await
    }

    /// Submits the smallest task to `project` as the admin; its id.
    async fn submit(&self, project: &str) -> String {
        self.submit_as(&self.admin, task_body(project)).await
    }

    /// Every page of `path` (which has no query yet) with `limit`, by
    /// `next_cursor`: the items of each page in order.
    async fn pages(&self, path: &str, token: &str, limit: usize) -> Vec<Vec<Value>> {
        let mut pages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{path}?limit={limit}");
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let page = self.get(&url, token).await;
            let body = page.expect(200);
            let items = body["items"].as_array().unwrap().clone();
            assert!(items.len() <= limit, "{path}: a page longer than its limit");
            pages.push(items);
            match body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return pages,
            }
            assert!(pages.len() < 1000, "{path}: paging does not end");
        }
    }
}

fn field(items: &[Vec<Value>], name: &str) -> Vec<String> {
    items
        .iter()
        .flatten()
        .map(|i| match &i[name] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// A token with `user` and `id` and a well-formed secret.
fn forged(user: &str, id: &str) -> String {
    let id: Uuid = id.parse().unwrap();
    format!("udu~{user}~{}~{}", id.simple(), "A".repeat(43))
}

#[tokio::test]
async fn a_bad_token_is_refused_without_loading_any_aggregate() {
    let app = start().await;
    let dana = app.user("dana").await;
    app.user("eve").await;
    let (revoked, revoked_id) = app.token("dana", json!({})).await;
    app.delete(
        &format!("/api/v1/users/dana/tokens/{revoked_id}"),
        &app.admin,
    )
    .await
    .expect(204);
    let (expiring, expiring_id) = app.token("dana", json!({"expires_in_s": 1})).await;
    app.get("/api/v1/projects", &expiring).await.expect(200);
    let (_, dana_id) = app.token("dana", json!({})).await;
    let (node, _) = api::provision_node(
        &app.store,
        "gpu-1",
        Default::default(),
        &Actor::System("test".into()),
    )
    .await
    .unwrap();
    let node_token = store::tokens::issue_node(node.id.unwrap()).token;
    testkit::eventually("the token expiring", Duration::from_secs(10), || async {
        (app.get("/api/v1/projects", &expiring).await.status == StatusCode::UNAUTHORIZED)
            .then_some(())
    })
    .await;

    let loads = app.store.aggregate_loads().total();
    let metrics_before = app.call(Method::GET, "/metrics", None, None).await;
    let bad: Vec<(String, &str)> = vec![
        ("garbage".into(), "invalid"),
        ("udu~dana~x~y".into(), "invalid"),
        (format!("{dana}x"), "invalid"),
        (forged("dana", &Uuid::now_v7().to_string()), "invalid"),
        (forged("dana", &dana_id), "invalid"),
        (forged("eve", &dana_id), "invalid"),
        (dana.replace("udu~dana~", "udu~eve~"), "invalid"),
        (revoked, "revoked"),
        (expiring.clone(), "the token expired"),
        (node_token, "node tokens"),
        ("x".repeat(8000), "invalid"),
    ];
    for (token, says) in &bad {
        for path in ["/api/v1/users/dana", "/api/v1/tasks", "/api/v1/timeline"] {
            let answer = app.get(path, token).await;
            answer.expect(401);
            assert!(
                answer.detail().contains(says),
                "{token:.30}: {}",
                answer.detail()
            );
            assert_eq!(answer.headers["www-authenticate"], "Bearer");
        }
    }
    assert_eq!(
        app.store.aggregate_loads().total(),
        loads,
        "a refused token loaded an aggregate"
    );
    // /metrics says the same: the user aggregate was not loaded in between.
    let metrics_after = app.call(Method::GET, "/metrics", None, None).await;
    let user_loads = |m: &Answer| {
        m.body
            .as_str()
            .unwrap()
            .lines()
            .find(|l| l.starts_with("unidesk_aggregate_loads_total{aggregate_type=\"user\"}"))
            .unwrap()
            .to_string()
    };
    assert_eq!(user_loads(&metrics_before), user_loads(&metrics_after));

    // The good token still works, and reading the user loads it.
    app.get("/api/v1/users/dana", &dana).await.expect(200);
    assert!(app.store.aggregate_loads().get("user") > 0);
    let metrics = app.call(Method::GET, "/metrics", None, None).await;
    assert!(metrics.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let _ = expiring_id;
}

#[tokio::test]
async fn a_new_token_works_on_another_replica_at_once_and_a_revoked_one_stops_there_at_once() {
    let db = testkit::fresh_db().await;
    let one = App::start_on(db.pool.clone(), Config::default(), None).await;
    let other_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.url)
        .await
        .unwrap();
    let two = App::start_on(other_pool, Config::default(), None).await;
    one.user("fay").await;
    for _ in 0..5 {
        let (token, id) = one.token("fay", json!({})).await;
        two.get("/api/v1/projects", &token).await.expect(200);
        one.delete(&format!("/api/v1/users/fay/tokens/{id}"), &one.admin)
            .await
            .expect(204);
        let refused = two.get("/api/v1/projects", &token).await;
        refused.expect(401);
        assert!(refused.detail().contains("revoked"));
    }
}

#[tokio::test]
async fn the_migration_finds_the_users_and_tokens_of_an_older_log() {
    let db = testkit::fresh_db().await;
    // The log as an older version left it: user events without the
    // token table.
    sqlx::raw_sql(
        "DROP TRIGGER events_to_auth ON events; DROP FUNCTION events_to_auth(); \
         DROP FUNCTION auth_apply(text, text, json); DROP TABLE auth_tokens, auth_users; \
         DROP INDEX node_view_page, project_view_page; \
         DELETE FROM _sqlx_migrations WHERE version = 13;",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let store = Store::new(db.pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let admin = api::bootstrap_admin(&store, &dir.path().join("admin.token"))
        .await
        .unwrap();
    let ivy = store::tokens::issue_user("ivy", Uuid::now_v7());
    let gone = store::tokens::issue_user("ivy", Uuid::now_v7());
    let actor = Actor::System("old".into());
    let now = Utc::now();
    use domain::user::{User, UserCommand};
    let run = |c: UserCommand| {
        let store = store.clone();
        let actor = actor.clone();
        async move { store.execute::<User>("ivy", c, &actor, now).await.unwrap() }
    };
    run(UserCommand::Create {
        name: "ivy".into(),
        admin: false,
        by: actor.clone(),
        at: now,
    })
    .await;
    for issued in [&ivy, &gone] {
        let Some(store::tokens::Presented::User { token_id, .. }) =
            store::tokens::parse(&issued.token)
        else {
            panic!("a user token")
        };
        run(UserCommand::IssueToken {
            token_id,
            fingerprint: issued.fingerprint.clone(),
            label: "old".into(),
            by: actor.clone(),
            at: now,
            expires_at: None,
            max_live: usize::MAX,
        })
        .await;
    }
    let Some(store::tokens::Presented::User {
        token_id: gone_id, ..
    }) = store::tokens::parse(&gone.token)
    else {
        panic!("a user token")
    };
    run(UserCommand::RevokeToken {
        token_id: gone_id,
        by: actor.clone(),
        at: now,
    })
    .await;

    store::migrate(&db.pool).await.unwrap();
    let app = App::start_on(db.pool.clone(), Config::default(), None).await;
    app.get("/api/v1/projects", &ivy.token).await.expect(200);
    let me = app.get("/api/v1/users/ivy", &ivy.token).await;
    assert_eq!(me.expect(200)["admin"], false);
    // The admin's token of before still works, as an admin's.
    app.get("/api/v1/users", &admin).await.expect(200);
    let refused = app.get("/api/v1/projects", &gone.token).await;
    refused.expect(401);
    assert!(refused.detail().contains("revoked"), "{}", refused.detail());
}

#[tokio::test]
async fn tokens_expire_when_asked_and_bad_expiries_are_refused_with_their_field() {
    let app = start().await;
    let gus = app.user("gus").await;
    let before = app.events().await;
    for (body, field) in [
        (json!({"expires_in_s": 0}), "expires_in_s"),
        (json!({"expires_in_s": -5}), "expires_in_s"),
        (json!({"expires_in_s": 31_536_001}), "expires_in_s"),
        (json!({"expires_in_s": "soon"}), "expires_in_s"),
        (json!({"expires_in_s": 1e30}), "expires_in_s"),
        (json!({"expires_at": "yesterday"}), "expires_at"),
        (
            json!({"expires_in_s": 60, "expires_at": (Utc::now() + chrono::Duration::hours(1)).to_rfc3339()}),
            "expires_at",
        ),
        (json!({"expires": 60}), "expires"),
    ] {
        app.post("/api/v1/users/gus/tokens", &gus, body.clone())
            .await
            .expect_error(422, field);
    }
    // Well-formed, but not between now and a year from now: the time of
    // the request decides, so it is a conflict.
    for at in ["2001-01-01T00:00:00Z", "9999-01-01T00:00:00Z"] {
        app.post(
            "/api/v1/users/gus/tokens",
            &gus,
            json!({ "expires_at": at }),
        )
        .await
        .expect_error(409, "expires_at");
    }
    assert_eq!(app.events().await, before, "a refused token was recorded");

    let at = (Utc::now() + chrono::Duration::days(30))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let issued = app
        .post(
            "/api/v1/users/gus/tokens",
            &gus,
            json!({"expires_at": at, "label": "ci"}),
        )
        .await;
    let issued = issued.expect(201).clone();
    assert_eq!(
        issued["expires_at"]
            .as_str()
            .unwrap()
            .parse::<chrono::DateTime<Utc>>()
            .unwrap(),
        at.parse::<chrono::DateTime<Utc>>().unwrap()
    );
    let token = issued["token"].as_str().unwrap();
    app.get("/api/v1/projects", token).await.expect(200);
    let never = app
        .post(
            "/api/v1/users/gus/tokens",
            &gus,
            json!({"expires_at": null}),
        )
        .await;
    assert_eq!(never.expect(201)["expires_at"], Value::Null);
    let me = app.get("/api/v1/users/gus", &gus).await;
    let tokens = me.expect(200)["tokens"].as_array().unwrap().clone();
    assert_eq!(tokens.len(), 3);
    assert!(tokens
        .iter()
        .any(|t| t["label"] == "ci" && t["expires_at"].is_string()));
}

#[tokio::test]
async fn a_user_holds_a_bounded_number_of_live_tokens_even_when_asking_all_at_once() {
    let app = App::start(Config {
        max_tokens_per_user: 3,
        ..Config::default()
    })
    .await;
    let hal = app.user("hal").await;
    let attempts = futures::future::join_all(
        (0..10).map(|_| app.post("/api/v1/users/hal/tokens", &hal, json!({}))),
    )
    .await;
    let issued: Vec<_> = attempts
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .collect();
    assert_eq!(issued.len(), 2, "the first token and two more");
    for refused in attempts.iter().filter(|a| a.status != StatusCode::CREATED) {
        refused.expect(409);
        assert!(
            refused.detail().contains("revoke one"),
            "{}",
            refused.detail()
        );
    }
    let id = issued[0].body["token_id"].as_str().unwrap();
    app.delete(&format!("/api/v1/users/hal/tokens/{id}"), &hal)
        .await
        .expect(204);
    app.post("/api/v1/users/hal/tokens", &hal, json!({}))
        .await
        .expect(201);
    app.post("/api/v1/users/hal/tokens", &hal, json!({}))
        .await
        .expect(409);
    // Every token, revoked ones too, is listed page by page.
    let pages = app.pages("/api/v1/users/hal/tokens", &hal, 2).await;
    assert_eq!(field(&pages, "token_id").len(), 4);
    assert_eq!(
        pages
            .iter()
            .flatten()
            .filter(|t| t["revoked_at"].is_string())
            .count(),
        1
    );
    let live = app.get("/api/v1/users/hal", &hal).await;
    assert_eq!(live.expect(200)["tokens"].as_array().unwrap().len(), 3);
}

/// Opens a live stream: the response, with its body still open.
async fn open(app: &App, path: &str, token: &str) -> reqwest::Response {
    app.client
        .get(format!("{}{path}", app.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_user_opens_a_bounded_number_of_live_streams_and_a_closed_one_frees_its_slot() {
    let app = App::start(Config {
        max_streams_per_user: 3,
        ..Config::default()
    })
    .await;
    let ann = app.user("ann").await;
    let bob = app.user("bob").await;
    let project = app.project("streams").await;
    app.post(
        &format!("/api/v1/projects/{project}/members"),
        &app.admin,
        json!({"user": "ann", "role": "viewer"}),
    )
    .await
    .expect(200);
    let task = app.submit(&project).await;
    let logs = format!("/api/v1/tasks/{task}/logs?follow=true");

    let mut streams = Vec::new();
    for path in ["/api/v1/timeline/stream", &logs, "/api/v1/timeline/stream"] {
        let r = open(&app, path, &ann).await;
        assert_eq!(r.status(), 200, "{path}");
        streams.push(r);
    }
    assert_eq!(app.state.stream_slots().open("ann"), 3);
    for path in ["/api/v1/timeline/stream", &logs] {
        let refused = open(&app, path, &ann).await;
        assert_eq!(refused.status(), 429);
        let retry: u64 = refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry >= 1);
        let body: Value = refused.json().await.unwrap();
        assert!(body["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("live streams"));
    }
    // Another user is not affected, and plain requests are not streams.
    let other = open(&app, "/api/v1/timeline/stream", &bob).await;
    assert_eq!(other.status(), 200);
    app.get(&format!("/api/v1/tasks/{task}/logs"), &ann)
        .await
        .expect(200);

    // Closing one gives its slot back as soon as the server sees it.
    drop(streams.remove(1));
    testkit::eventually(
        "the closed stream's slot coming back",
        Duration::from_secs(10),
        || async { (app.state.stream_slots().open("ann") == 2).then_some(()) },
    )
    .await;
    let again = open(&app, &logs, &ann).await;
    assert_eq!(again.status(), 200);
    assert_eq!(
        open(&app, "/api/v1/timeline/stream", &ann).await.status(),
        429
    );
    let metrics = app.call(Method::GET, "/metrics", None, None).await;
    let text = metrics.body.as_str().unwrap();
    assert!(text.contains("unidesk_streams_refused_total 3"), "{text}");
    assert!(text.contains("unidesk_streams_open 4"), "{text}");
    drop(streams);
    drop(again);
    drop(other);
    testkit::eventually(
        "every slot coming back",
        Duration::from_secs(10),
        || async { (app.state.stream_slots().total() == 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn every_list_pages_through_all_its_items_once_in_order() {
    let app = start().await;
    let mut users = vec!["admin".to_string()];
    for i in 0..7 {
        let name = format!("u{i}");
        app.user(&name).await;
        users.push(name);
    }
    users.sort();
    let mut projects = Vec::new();
    for i in 0..7 {
        projects.push(app.project(&format!("p{i}")).await);
    }
    for i in 0..7 {
        api::provision_node(
            &app.store,
            &format!("n{i}"),
            Default::default(),
            &Actor::System("test".into()),
        )
        .await
        .unwrap();
    }
    let mut tasks = Vec::new();
    for _ in 0..7 {
        tasks.push(app.submit(&projects[0]).await);
    }
    app.catch_up().await;

    let pages = app.pages("/api/v1/users", &app.admin, 3).await;
    assert_eq!(pages.len(), 3);
    assert_eq!(field(&pages, "name"), users);
    let pages = app.pages("/api/v1/projects", &app.admin, 3).await;
    assert_eq!(
        field(&pages, "name"),
        ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]
    );
    let pages = app.pages("/api/v1/nodes", &app.admin, 3).await;
    assert_eq!(
        field(&pages, "name"),
        ["n0", "n1", "n2", "n3", "n4", "n5", "n6"]
    );
    let pages = app.pages("/api/v1/tasks", &app.admin, 3).await;
    tasks.reverse();
    assert_eq!(field(&pages, "id"), tasks);

    // A member sees their projects only, paged the same way.
    let u0 = app.token("u0", json!({})).await.0;
    for p in [&projects[1], &projects[4], &projects[6]] {
        app.post(
            &format!("/api/v1/projects/{p}/members"),
            &app.admin,
            json!({"user": "u0", "role": "viewer"}),
        )
        .await
        .expect(200);
    }
    app.catch_up().await;
    let pages = app.pages("/api/v1/projects", &u0, 2).await;
    assert_eq!(field(&pages, "name"), ["p1", "p4", "p6"]);

    // The log and the timeline, paged, are the log and the timeline whole.
    let whole = app.get("/api/v1/events?limit=1000", &app.admin).await;
    let whole: Vec<String> = whole.expect(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].to_string())
        .collect();
    assert!(whole.len() > 20);
    let pages = app.pages("/api/v1/events", &app.admin, 7).await;
    assert_eq!(field(&pages, "position"), whole);
    let whole = app.get("/api/v1/timeline?limit=500", &app.admin).await;
    let whole: Vec<String> = whole.expect(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].to_string())
        .collect();
    let pages = app.pages("/api/v1/timeline", &app.admin, 7).await;
    assert_eq!(field(&pages, "position"), whole);

    // A task's outputs.
    let task = tasks[0].clone();
    let node = Uuid::new_v4();
    let system = Actor::System("test".into());
    let run = |c: TaskCommand| {
        let store = app.store.clone();
        let (task, system) = (task.clone(), system.clone());
        async move {
            store
                .execute::<Task>(&task, c, &system, Utc::now())
                .await
                .unwrap()
        }
    };
    run(TaskCommand::Assign {
        node_id: node,
        gpus: vec![],
        reason: "test".into(),
        at: Utc::now(),
    })
    .await;
    run(TaskCommand::Accept {
        node_id: node,
        attempt: 1,
        at: Utc::now(),
    })
    .await;
    for i in 0..7 {
        run(TaskCommand::RecordArtifact {
            node_id: node,
            attempt: 1,
            name: format!("out-{i}"),
            key: format!("k/{i}"),
            size: i,
            sha256: "ab".repeat(32),
            at: Utc::now(),
        })
        .await;
    }
    let pages = app
        .pages(&format!("/api/v1/tasks/{task}/artifacts"), &app.admin, 3)
        .await;
    assert_eq!(pages.len(), 3);
    assert_eq!(
        field(&pages, "name"),
        (0..7).map(|i| format!("out-{i}")).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn paging_while_others_add_items_skips_and_repeats_nothing() {
    let app = start().await;
    let mut first = BTreeSet::new();
    for i in 0..12 {
        let name = format!("m{i:02}");
        app.user(&name).await;
        first.insert(name);
    }
    first.insert("admin".into());
    app.catch_up().await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut added = 0;
    loop {
        let url = match &cursor {
            Some(c) => format!("/api/v1/users?limit=4&cursor={c}"),
            None => "/api/v1/users?limit=4".into(),
        };
        let page = app.get(&url, &app.admin).await;
        let body = page.expect(200).clone();
        seen.extend(
            body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["name"].as_str().unwrap().to_string()),
        );
        // Between pages, users sorting before, among and after the ones
        // already seen.
        for name in [
            format!("a{added}"),
            format!("m05x{added}"),
            format!("z{added}"),
        ] {
            app.user(&name).await;
        }
        added += 1;
        app.catch_up().await;
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "not in order");
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "an item was shown twice");
    assert!(first.is_subset(&unique), "an item was skipped: {seen:?}");
}

#[tokio::test]
async fn bad_limits_and_cursors_are_refused_with_their_parameter_named() {
    let app = start().await;
    let project = app.project("p").await;
    let task = app.submit(&project).await;
    app.catch_up().await;
    let nodes = app.get("/api/v1/nodes?limit=1", &app.admin).await;
    let _ = nodes.expect(200);
    app.user("kim").await;
    app.user("lee").await;
    app.catch_up().await;
    let users_cursor = app.get("/api/v1/users?limit=1", &app.admin).await.body["next_cursor"]
        .as_str()
        .unwrap()
        .to_string();
    for path in [
        "/api/v1/users".to_string(),
        "/api/v1/projects".into(),
        "/api/v1/nodes".into(),
        "/api/v1/tasks".into(),
        "/api/v1/events".into(),
        "/api/v1/timeline".into(),
        "/api/v1/users/admin/tokens".into(),
        format!("/api/v1/tasks/{task}/artifacts"),
    ] {
        for limit in ["0", "-1", "100000", "x", "1.5"] {
            app.get(&format!("{path}?limit={limit}"), &app.admin)
                .await
                .expect_error(400, "limit");
        }
        for cursor in ["garbage", "%00", "dXNlcnM6"] {
            app.get(&format!("{path}?cursor={cursor}"), &app.admin)
                .await
                .expect_error(400, "cursor");
        }
        if path != "/api/v1/users" {
            app.get(&format!("{path}?cursor={users_cursor}"), &app.admin)
                .await
                .expect_error(400, "cursor");
        }
    }
    app.get("/api/v1/events?after=0&cursor=x", &app.admin)
        .await
        .expect_error(400, "cursor");
    app.get("/api/v1/timeline?before=1&cursor=x", &app.admin)
        .await
        .expect_error(400, "cursor");
}

fn limited(per_s: u32, burst: u32) -> Config {
    Config {
        rate_limit: Some(RateLimit {
            per_s: NonZeroU32::new(per_s).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }),
        ..Config::default()
    }
}

#[tokio::test]
async fn a_burst_past_the_rate_limit_waits_as_long_as_retry_after_says_and_no_longer() {
    let app = App::start(limited(1, 5)).await;
    let mia = app.user("mia").await;
    let (ned, ned_id) = app.token("admin", json!({})).await;

    let mut answers = Vec::new();
    for _ in 0..20 {
        let a = app.get("/api/v1/projects", &mia).await;
        let limited = a.status == StatusCode::TOO_MANY_REQUESTS;
        answers.push(a);
        if limited {
            break;
        }
    }
    assert!(
        answers[..5].iter().all(|a| a.status == 200),
        "the burst is allowed"
    );
    let refused = answers.last().unwrap();
    refused.expect(429);
    assert!(
        refused.detail().contains("this token"),
        "{}",
        refused.detail()
    );
    let wait = refused.retry_after();
    assert!((1..=2).contains(&wait), "Retry-After: {wait}");

    // Another token is not affected; probes and the scrape are not limited.
    app.get("/api/v1/projects", &ned).await.expect(200);
    for _ in 0..10 {
        app.call(Method::GET, "/healthz", None, None)
            .await
            .expect(200);
        app.call(Method::GET, "/metrics", None, None)
            .await
            .expect(200);
    }
    // Somebody sending mia's token id with a made-up secret spends the
    // allowance of their own address, not hers.
    let mia_id = app.get("/api/v1/users/mia/tokens", &ned).await.body["items"][0]["token_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut forged_limited = false;
    for _ in 0..20 {
        let a = app.get("/api/v1/projects", &forged("mia", &mia_id)).await;
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            assert!(
                a.detail().contains("without a valid token"),
                "{}",
                a.detail()
            );
            forged_limited = true;
            break;
        }
        a.expect(401);
    }
    assert!(forged_limited, "requests with bad tokens are limited too");

    tokio::time::sleep(Duration::from_secs(wait)).await;
    app.get("/api/v1/projects", &mia).await.expect(200);
    let metrics = app.call(Method::GET, "/metrics", None, None).await;
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("unidesk_rate_limited_total ")
                && l != "unidesk_rate_limited_total 0"),
        "{text}"
    );
    let _ = ned_id;
}

#[tokio::test]
async fn the_openapi_document_names_the_429_of_every_limited_route() {
    let app = start().await;
    let doc = app
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    let doc = doc.expect(200);
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let limited = op["responses"].get("429");
            if ["/healthz", "/readyz", "/metrics"].contains(&path.as_str()) {
                assert!(limited.is_none(), "{method} {path}");
            } else {
                let limited = limited.unwrap_or_else(|| panic!("{method} {path} has no 429"));
                assert!(
                    limited["headers"].get("Retry-After").is_some(),
                    "{method} {path}"
                );
            }
        }
    }
}
