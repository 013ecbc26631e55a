//! Who may create projects, through the server's own flags and roles on a
//! real PostgreSQL: admins only by default, every user with
//! `--users-create-projects` (on `serve` and on `dev`).

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use clap::Parser;
use serde_json::{json, Value};
use store::Store;
use unidesk::cli::{Cli, Role};
use unidesk::roles::{self, ServerArgs};

/// The server's flags alone, as `serve` takes them.
#[derive(Debug, Parser)]
struct Flags {
    #[command(flatten)]
    server: ServerArgs,
}

/// Starts the API with `args`; returns its address, an admin token and a
/// token of the user `ivy`.
async fn start(args: &ServerArgs) -> (String, String, String, roles::Services) {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let admin = api::bootstrap_admin(&store, &dir.path().join("admin.token"))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
    let services = roles::start(store, listener, &[Role::Api], args).unwrap();
    post(&base, &admin, "/users", json!({"name": "ivy"})).await;
    let (_, issued) = post(&base, &admin, "/users/ivy/tokens", json!({})).await;
    let ivy = issued["token"].as_str().unwrap().to_string();
    (base, admin, ivy, services)
}

async fn post(base: &str, token: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn users_create_projects_only_when_the_server_is_started_to_let_them() {
    let default = Flags::try_parse_from(["serve"]).unwrap().server;
    assert!(!default.users_create_projects);
    let (base, admin, ivy, services) = start(&default).await;
    let (status, refused) = post(&base, &ivy, "/projects", json!({"name": "mine"})).await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(
        refused["errors"][0]["detail"],
        "only admins may create projects on this server"
    );
    let (status, made) = post(&base, &admin, "/projects", json!({"name": "mine"})).await;
    assert_eq!(status, 201, "{made}");
    services.stop().await;

    let open = Flags::try_parse_from(["serve", "--users-create-projects"])
        .unwrap()
        .server;
    assert!(open.users_create_projects);
    let (base, _, ivy, services) = start(&open).await;
    let (status, made) = post(&base, &ivy, "/projects", json!({"name": "mine"})).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(
        made["members"],
        json!([{"user": "ivy", "role": "maintainer"}])
    );
    services.stop().await;
}

#[test]
fn serve_and_dev_both_take_the_flag() {
    for command in ["serve", "dev"] {
        Cli::try_parse_from(["unidesk", command, "--users-create-projects"])
            .unwrap_or_else(|e| panic!("{command}: {e}"));
        assert!(Cli::try_parse_from(["unidesk", command, "--users-create-project"]).is_err());
    }
}
