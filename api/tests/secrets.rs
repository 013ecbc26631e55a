//! Project secrets over HTTP: maintainers set, rotate and delete them,
//! members see their names and versions, and no value ever comes back out:
//! not from an answer, the event log, the outbox or the timeline.

mod support;

use serde_json::json;
use support::App;

/// A value that would be found wherever it leaked.
const VALUE: &str = "wandb-Zq8vN3kLp0xR7tY2";
const ROTATED: &str = "wandb-second-Hh4Jj6Kk8Ll0";

async fn start() -> App {
    App::start(api::Config {
        users_create_projects: true,
        ..api::Config::default()
    })
    .await
}

#[tokio::test]
async fn maintainers_set_and_rotate_secrets_and_members_see_only_names_and_versions() {
    let app = start().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let eve = app.user("eve").await;
    let project = app.project_as(&alice, "vision").await;
    app.add_member(&project, "bob", "member").await;
    let path = format!("/api/v1/projects/{project}/secrets/wandb");

    let set = app.put(&path, &alice, json!({"value": VALUE})).await;
    let set = set.expect(200).clone();
    assert_eq!(set["name"], "wandb");
    assert_eq!(set["version"], 1);
    assert_eq!(set["set_by"], "user:alice");
    assert!(!set.to_string().contains(VALUE));

    // A member may use it, not set it; an outsider does not see the project.
    app.put(&path, &bob, json!({"value": "bob-was-here"}))
        .await
        .expect(403);
    app.get(&format!("/api/v1/projects/{project}/secrets"), &eve)
        .await
        .expect(404);
    let list = app
        .get(&format!("/api/v1/projects/{project}/secrets"), &bob)
        .await;
    let list = list.expect(200).clone();
    assert_eq!(list["items"].as_array().expect("items").len(), 1, "{list}");
    assert_eq!(list["items"][0]["version"], 1);
    assert!(list["items"][0].get("value").is_none(), "{list}");

    let rotated = app.put(&path, &alice, json!({"value": ROTATED})).await;
    assert_eq!(rotated.expect(200)["version"], 2);
    // One sealed value is kept per secret: the replaced one is gone.
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM project_secret_values")
        .fetch_one(&app.pool)
        .await
        .expect("a database answer");
    assert_eq!(rows, 1);

    app.delete(&path, &bob).await.expect(403);
    app.delete(&path, &alice).await.expect(204);
    app.delete(&path, &alice).await.expect_error(404, "name");
    let list = app
        .get(&format!("/api/v1/projects/{project}/secrets"), &alice)
        .await;
    assert_eq!(list.expect(200)["items"], json!([]));
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM project_secret_values")
        .fetch_one(&app.pool)
        .await
        .expect("a database answer");
    assert_eq!(rows, 0, "a deleted secret's value is gone");

    // Set again, its versions go on.
    let again = app.put(&path, &alice, json!({"value": VALUE})).await;
    assert_eq!(again.expect(200)["version"], 3);
}

#[tokio::test]
async fn no_value_is_found_in_the_log_the_outbox_the_timeline_or_any_answer() {
    let app = start().await;
    let alice = app.user("alice").await;
    let project = app.project_as(&alice, "vision").await;
    let path = format!("/api/v1/projects/{project}/secrets/wandb");
    app.put(&path, &alice, json!({"value": VALUE}))
        .await
        .expect(200);
    app.put(&path, &alice, json!({"value": ROTATED}))
        .await
        .expect(200);
    app.catch_up().await;

    let mut seen = Vec::new();
    for (table, column) in [("events", "payload"), ("events", "metadata")] {
        let rows: Vec<(String,)> = sqlx::query_as(&format!("SELECT {column}::text FROM {table}"))
            .fetch_all(&app.pool)
            .await
            .expect("a database answer");
        seen.extend(rows.into_iter().map(|(t,)| t));
    }
    for path in [
        "/api/v1/events?limit=500".to_string(),
        "/api/v1/timeline?limit=500".to_string(),
        format!("/api/v1/projects/{project}"),
        format!("/api/v1/projects/{project}/secrets"),
    ] {
        seen.push(app.get(&path, &app.admin).await.expect(200).to_string());
    }
    let all = seen.join("\n");
    assert!(all.contains("ProjectSecretSet"), "the log records the set");
    assert!(all.contains("rotated secret wandb (version 2)"), "{all}");
    for value in [VALUE, ROTATED] {
        assert!(!all.contains(value), "{value} leaked");
    }
    // What is stored is sealed, not the value.
    let sealed: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT sealed FROM project_secret_values")
        .fetch_all(&app.pool)
        .await
        .expect("a database answer");
    for (bytes,) in sealed {
        assert!(!bytes
            .windows(ROTATED.len())
            .any(|w| w == ROTATED.as_bytes()));
    }
}

#[tokio::test]
async fn bad_secret_names_and_values_are_refused_naming_the_field() {
    let app = start().await;
    let alice = app.user("alice").await;
    let project = app.project_as(&alice, "vision").await;
    let at = |name: &str| format!("/api/v1/projects/{project}/secrets/{name}");
    app.put(&at("Bad%20Name"), &alice, json!({"value": VALUE}))
        .await
        .expect_error(422, "name");
    for (body, field) in [
        (json!({"value": "abc"}), "value"),
        (json!({"value": "abc\u{0}def"}), "value"),
        (json!({"value": "x".repeat(16 * 1024 + 1)}), "value"),
        (json!({"value": "é".repeat(16 * 1024 + 1)}), "value"),
    ] {
        app.put(&at("wandb"), &alice, body)
            .await
            .expect_error(422, field);
    }
    app.put(&at("wandb"), &alice, json!({"value": VALUE, "shown": true}))
        .await
        .expect(422);
    app.put(&at("wandb"), &alice, json!({})).await.expect(422);
    let list = app
        .get(&format!("/api/v1/projects/{project}/secrets"), &alice)
        .await;
    assert_eq!(list.expect(200)["items"], json!([]), "nothing was kept");
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM project_secret_values")
        .fetch_one(&app.pool)
        .await
        .expect("a database answer");
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn a_task_names_secrets_that_exist_in_its_project_and_shows_only_their_names() {
    let app = start().await;
    let alice = app.user("alice").await;
    let project = app.project_as(&alice, "vision").await;
    let other = app.project_as(&alice, "other").await;
    app.put(
        &format!("/api/v1/projects/{other}/secrets/deploy-key"),
        &alice,
        json!({"value": VALUE}),
    )
    .await
    .expect(200);
    app.put(
        &format!("/api/v1/projects/{project}/secrets/wandb"),
        &alice,
        json!({"value": VALUE}),
    )
    .await
    .expect(200);

    // Another project's secret is not this one's.
    let mut task = support::minimal_task(&project);
    task["env_secrets"] = json!({"WANDB_API_KEY": "wandb"});
    task["git_credentials"] = json!({"code": "deploy-key"});
    app.post("/api/v1/tasks", &alice, task.clone())
        .await
        .expect_error(404, "git_credentials.code");
    task["env_secrets"] = json!({"WANDB_API_KEY": "missing"});
    task["git_credentials"] = json!({"env": "wandb"});
    app.post("/api/v1/tasks", &alice, task.clone())
        .await
        .expect_error(404, "env_secrets.WANDB_API_KEY");
    task["env_secrets"] = json!({"WANDB_API_KEY": "wandb"});
    task["git_credentials"] = json!({"env": "wandb", "ssh": "x"});
    app.post("/api/v1/tasks", &alice, task.clone())
        .await
        .expect(422);

    task["git_credentials"] = json!({"env": "wandb"});
    let created = app.post("/api/v1/tasks", &alice, task).await;
    let created = created.expect(201).clone();
    assert_eq!(
        created["spec"]["env_secrets"],
        json!({"WANDB_API_KEY": "wandb"})
    );
    assert_eq!(created["spec"]["git_credentials"], json!({"env": "wandb"}));
    assert!(!created.to_string().contains(VALUE));
}
