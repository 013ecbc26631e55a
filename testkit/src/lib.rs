//! Test support for UniDesk's crates: a real PostgreSQL server for the test
//! run and a fresh, fully migrated database for each test; real `unidesk`
//! processes ([`process`]); waiting without fixed sleeps ([`eventually`],
//! [`stays`]); and a headless browser ([`browser`]). The benchmarks start
//! their servers with the same [`process`] code.
//!
//! The server is the one named by `UNIDESK_TEST_DATABASE_URL` when that is
//! set (`ops/test.sh` starts one for the whole run); otherwise each test
//! process starts one private, throwaway cluster of its own with the
//! system's PostgreSQL ([`pgcluster::LocalCluster::start_ephemeral`]),
//! which disappears when the process exits.
//!
//! Migrating a database for every test would be slow, so the migrations run
//! once per server into a template database named after a hash of the
//! migrations, and each test copies it with `CREATE DATABASE … TEMPLATE`.
//!
//! ```no_run
//! # async fn example() {
//! let db = testkit::fresh_db().await;
//! let one: i32 = sqlx::query_scalar("SELECT 1")
//!     .fetch_one(&db.pool)
//!     .await
//!     .expect("SELECT 1");
//! assert_eq!(one, 1);
//! # }
//! ```
//!
//! Only strings live in the process-wide state: each `#[tokio::test]` runs
//! its own runtime, and a pool made in one runtime breaks in the next.

pub mod agent;
pub mod browser;
pub mod process;
pub mod scenes;
mod wait;

pub use wait::{eventually, free_port, stays, try_eventually};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgcluster::LocalCluster;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;
use uuid::Uuid;

/// The environment variable naming the server to test against: a URL for a
/// user who may `CREATE DATABASE`, usually to the `postgres` database.
pub const DATABASE_URL_ENV: &str = "UNIDESK_TEST_DATABASE_URL";

/// Serialises template creation among test processes sharing a server
/// (the bytes of "unidesk\0").
const TEMPLATE_LOCK: i64 = 0x756e_6964_6573_6b00;

/// Test databases on a shared server older than this are dropped, so that
/// a long-lived development server does not fill up with them.
const STALE_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Connections in each test's pool: enough for tests with many concurrent
/// writers, few enough for many tests side by side on one server.
const POOL_SIZE: u32 = 20;

/// A database of its own for one test, migrated to the latest schema.
///
/// The database is not dropped when the value is: it goes with the private
/// cluster when the process exits, and on a shared server test databases
/// older than a day are dropped by a later run.
#[derive(Debug)]
pub struct TestDb {
    /// A pool on the database, made in the calling test's runtime.
    pub pool: PgPool,
    /// The database's URL, as a superuser, for code under test that
    /// connects by itself (a server process, a second pool).
    pub url: String,
    /// The database's name.
    pub name: String,
}

/// The test server, shared by every test of this process.
struct Server {
    /// The URL of the maintenance database.
    admin_url: String,
    /// The migrated template database.
    template: String,
    /// Kept for the life of the process; never dropped, the cluster's
    /// watchdog stops it when the process exits.
    _cluster: Option<LocalCluster>,
}

/// The server, or why there is none: one failure is reported by every test
/// instead of each trying again.
static SERVER: OnceCell<Result<Server, String>> = OnceCell::const_new();

/// A fresh database for one test, with every migration applied.
///
/// # Panics
/// When no server can be had (PostgreSQL not installed and
/// `UNIDESK_TEST_DATABASE_URL` not set, or that server unreachable), or the
/// migrations fail: the message says which and what to do.
pub async fn fresh_db() -> TestDb {
    let server = server().await;
    new_database(server, &format!(r#"TEMPLATE "{}""#, server.template)).await
}

/// A new database on `server`, made with `options` (`TEMPLATE "t"`, or
/// nothing for an empty one).
async fn new_database(server: &Server, options: &str) -> TestDb {
    let name = format!("test_{}_{}", unix_time(), Uuid::new_v4().simple());
    let mut admin = admin_connection(&server.admin_url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query(&format!(r#"CREATE DATABASE "{name}" {options}"#))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
    let _ = admin.close().await;
    let url = with_database(&server.admin_url, &name);
    let pool = PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connecting to test database {name}: {e}"));
    TestDb { pool, url, name }
}

/// A fresh database with only the migrations whose file names sort before
/// `before` applied (`"0015"`: up to `0014_…`), for a test of what a later
/// migration does to a log written under the earlier schema. The test
/// applies the rest with `store::migrate`.
///
/// # Panics
/// As [`fresh_db`], or when the earlier migrations fail.
pub async fn db_migrated_before(before: &str) -> TestDb {
    let db = new_database(server().await, "").await;
    let earlier = tempfile::tempdir().unwrap_or_else(|e| panic!("a temporary directory: {e}"));
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let files = std::fs::read_dir(&all).unwrap_or_else(|e| panic!("{}: {e}", all.display()));
    for file in files {
        let path = file
            .unwrap_or_else(|e| panic!("{}: {e}", all.display()))
            .path();
        let file_name = path.file_name().map(|n| n.to_string_lossy().to_string());
        if let Some(file_name) = file_name.filter(|n| n.as_str() < before) {
            std::fs::copy(&path, earlier.path().join(&file_name))
                .unwrap_or_else(|e| panic!("copying {}: {e}", path.display()));
        }
    }
    sqlx::migrate::Migrator::new(earlier.path())
        .await
        .unwrap_or_else(|e| panic!("reading the migrations before {before}: {e}"))
        .run(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("applying the migrations before {before}: {e}"));
    db
}

/// The URL of the test server's maintenance database (`postgres`, or the
/// one named in `UNIDESK_TEST_DATABASE_URL`), as a user who may create
/// databases, for tests that make databases of their own.
///
/// # Panics
/// As [`fresh_db`].
pub async fn server_url() -> String {
    server().await.admin_url.clone()
}

async fn server() -> &'static Server {
    match SERVER.get_or_init(start_server).await {
        Ok(server) => server,
        Err(message) => panic!("{message}"),
    }
}

async fn start_server() -> Result<Server, String> {
    let (admin_url, cluster) = match std::env::var(DATABASE_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => (url, None),
        _ => {
            let cluster = LocalCluster::start_ephemeral().await.map_err(|e| {
                format!(
                    "starting a private PostgreSQL cluster for the tests: {e}\n\
                     (or set {DATABASE_URL_ENV} to a server where you may CREATE DATABASE)"
                )
            })?;
            (cluster.admin_url_for("postgres"), Some(cluster))
        }
    };
    let template = template_name();
    let mut admin = admin_connection(&admin_url).await?;
    let built = ensure_template(&mut admin, &admin_url, &template).await;
    if cluster.is_none() {
        drop_stale_databases(&mut admin).await;
    }
    let _ = admin.close().await;
    built.map_err(|e| format!("preparing the migrated template database {template}: {e}"))?;
    Ok(Server {
        admin_url,
        template,
        _cluster: cluster,
    })
}

async fn admin_connection(url: &str) -> Result<PgConnection, String> {
    PgConnection::connect(url).await.map_err(|e| {
        format!(
            "connecting to the test server (from {DATABASE_URL_ENV} if set, else the private cluster): {e}"
        )
    })
}

/// `unidesk_template_<hash>`, the hash covering every migration's version,
/// description and checksum, so that a changed migration gets a new
/// template while unchanged ones are shared by every run on a server.
fn template_name() -> String {
    let mut hash = Sha256::new();
    for migration in store::MIGRATOR.iter() {
        hash.update(migration.version.to_le_bytes());
        hash.update(migration.description.as_bytes());
        hash.update(&migration.checksum);
    }
    format!("unidesk_template_{}", &hex::encode(hash.finalize())[..16])
}

/// Creates and migrates the template unless it exists, under an advisory
/// lock so that test processes sharing a server build it once. It is built
/// under a temporary name and renamed when complete, so a process that
/// dies half-way leaves no half-migrated template behind.
async fn ensure_template(
    admin: &mut PgConnection,
    admin_url: &str,
    template: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(TEMPLATE_LOCK)
        .execute(&mut *admin)
        .await?;
    let built = build_template(admin, admin_url, template).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(TEMPLATE_LOCK)
        .execute(&mut *admin)
        .await;
    built.and(unlocked.map(drop))
}

async fn build_template(
    admin: &mut PgConnection,
    admin_url: &str,
    template: &str,
) -> Result<(), sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(template)
            .fetch_one(&mut *admin)
            .await?;
    if exists {
        return Ok(());
    }
    let building = format!("{template}_build");
    execute(
        admin,
        &format!(r#"DROP DATABASE IF EXISTS "{building}" WITH (FORCE)"#),
    )
    .await?;
    execute(admin, &format!(r#"CREATE DATABASE "{building}""#)).await?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&with_database(admin_url, &building))
        .await?;
    let migrated = store::migrate(&pool).await;
    pool.close().await;
    migrated.map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
    // The migrating session may take a moment to end on the server, and
    // a database in use cannot be renamed.
    let rename = format!(r#"ALTER DATABASE "{building}" RENAME TO "{template}""#);
    let mut attempts = 0;
    loop {
        match execute(admin, &rename).await {
            Ok(()) => break,
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("55006") && attempts < 200 =>
            {
                // Besides our closing session, an autovacuum worker may have
                // entered the new database: end whoever is still in it.
                attempts += 1;
                let _ = sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(&building)
                .execute(&mut *admin)
                .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
    // No connections to the template, ever: `CREATE DATABASE … TEMPLATE`
    // fails while the template has any.
    execute(
        admin,
        &format!(r#"ALTER DATABASE "{template}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"#),
    )
    .await
}

/// Drops test databases left on a shared server by runs more than a day
/// ago, skipping any still in use.
async fn drop_stale_databases(admin: &mut PgConnection) {
    let names: Vec<String> = sqlx::query_scalar(
        r"SELECT datname FROM pg_database WHERE datname ~ '^test_[0-9]+_[0-9a-f]{32}$'",
    )
    .fetch_all(&mut *admin)
    .await
    .unwrap_or_default();
    let cutoff = unix_time().saturating_sub(STALE_AFTER.as_secs());
    for name in names {
        let created = name
            .split('_')
            .nth(1)
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        if created < cutoff {
            let _ = execute(admin, &format!(r#"DROP DATABASE IF EXISTS "{name}""#)).await;
        }
    }
}

async fn execute(conn: &mut PgConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::query(sql).execute(conn).await.map(drop)
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `url` with its database replaced by `db`, keeping the query.
fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (address, query) = match rest.split_once('?') {
        Some((address, query)) => (address, Some(query)),
        None => (rest, None),
    };
    let authority = address.split_once('/').map_or(address, |(a, _)| a);
    match query {
        Some(query) => format!("{scheme}://{authority}/{db}?{query}"),
        None => format!("{scheme}://{authority}/{db}"),
    }
}

/// A task specification for `project` with every required field and
/// nothing else (repositories on `example.com`, the default Dockerfile,
/// the image's own command): what a test sets its own fields on, as
/// `TaskSpecDraft { command: …, ..testkit::spec_draft(project) }`.
pub fn spec_draft(project: Uuid) -> domain::spec::TaskSpecDraft {
    domain::spec::TaskSpecDraft {
        project_id: Some(project),
        code_repo_url: Some("https://example.com/c.git".into()),
        code_commit_id: Some("a".repeat(40)),
        env_repo_url: Some("https://example.com/e.git".into()),
        env_commit_id: Some("b".repeat(40)),
        dockerfile_path: Some("Dockerfile".into()),
        ..Default::default()
    }
}

/// `draft` validated under the default URL policy.
///
/// # Panics
/// When the draft is not a valid specification: the test is wrong.
pub fn spec(draft: domain::spec::TaskSpecDraft) -> domain::spec::TaskSpec {
    draft
        .validate(domain::spec::UrlPolicy::default())
        .unwrap_or_else(|e| panic!("a test's task specification is invalid: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn has_events_table(pool: &PgPool) -> bool {
        sqlx::query_scalar("SELECT to_regclass('events') IS NOT NULL")
            .fetch_one(pool)
            .await
            .expect("query")
    }

    #[tokio::test]
    async fn two_fresh_databases_are_distinct_and_migrated() {
        let (a, b) = (fresh_db().await, fresh_db().await);
        assert_ne!(a.name, b.name);
        assert!(has_events_table(&a.pool).await);
        assert!(has_events_table(&b.pool).await);

        let current: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&a.pool)
            .await
            .expect("current_database");
        assert_eq!(current, a.name);

        sqlx::query("INSERT INTO events VALUES ('Probe', 'p-1', 1, 'Probed', '1', '{}', '{}')")
            .execute(&a.pool)
            .await
            .expect("insert");
        let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&b.pool)
            .await
            .expect("count");
        assert_eq!(seen, 0, "a write to one test database shows in another");
    }

    #[tokio::test]
    async fn a_fresh_database_answers_at_its_url() {
        let db = fresh_db().await;
        let mut conn = PgConnection::connect(&db.url).await.expect("connect");
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(&mut conn)
            .await
            .expect("migrations");
        assert_eq!(applied, store::MIGRATOR.iter().count() as i64);
        let _ = conn.close().await;
    }

    #[tokio::test]
    async fn the_server_url_allows_creating_databases() {
        let url = server_url().await;
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        let name = format!("own_{}", Uuid::new_v4().simple());
        execute(&mut conn, &format!(r#"CREATE DATABASE "{name}""#))
            .await
            .expect("create");
        execute(&mut conn, &format!(r#"DROP DATABASE "{name}""#))
            .await
            .expect("drop");
        let _ = conn.close().await;
    }

    #[test]
    fn with_database_replaces_only_the_database() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5432/postgres", "test_1"),
            "postgres://u:p@127.0.0.1:5432/test_1"
        );
        assert_eq!(
            with_database("postgresql://u@db:5432/main?sslmode=require", "t"),
            "postgresql://u@db:5432/t?sslmode=require"
        );
        assert_eq!(with_database("postgres://u@db", "t"), "postgres://u@db/t");
    }
}
