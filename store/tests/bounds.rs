//! What keeps the platform from being held back or filled up, against a
//! real PostgreSQL: the server pool's session timeouts, the oldest open
//! transaction as a second connection holds one, and task output counted,
//! removed and refused.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};
use store::task_log::{self, RemovedBy};
use store::SessionTimeouts;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(20);

async fn alive(pool: &PgPool, pid: i32) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
        .bind(pid)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_server_pool_ends_its_own_transaction_left_idle() {
    let db = testkit::fresh_db().await;
    let timeouts = SessionTimeouts {
        idle_in_transaction: Duration::from_secs(1),
        statement: Duration::from_secs(30),
    };
    let pool = store::with_session_timeouts(store::pool_options(), timeouts)
        .connect(&db.url)
        .await
        .unwrap();
    let shown: (String, String) =
        sqlx::query_as("SELECT current_setting('idle_in_transaction_session_timeout'), current_setting('statement_timeout')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(shown, ("1s".to_string(), "30s".to_string()));

    // A transaction with an id, then nothing: as a handler that forgot to
    // commit would leave it.
    let mut tx = pool.begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx)
        .await
        .unwrap();
    let has_id: bool =
        sqlx::query_scalar("SELECT backend_xid IS NOT NULL FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(has_id);
    testkit::eventually(
        "the idle transaction's session to end",
        PATIENCE,
        || async { (!alive(&db.pool, pid).await).then_some(()) },
    )
    .await;
    assert!(
        sqlx::query("SELECT 1").execute(&mut *tx).await.is_err(),
        "the transaction is gone"
    );
    drop(tx);
    // The pool goes on with a new connection.
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
}

#[tokio::test]
async fn a_statement_past_the_timeout_is_cancelled_as_a_failure_that_may_pass() {
    let db = testkit::fresh_db().await;
    let timeouts = SessionTimeouts {
        idle_in_transaction: Duration::ZERO,
        statement: Duration::from_millis(300),
    };
    let pool = store::with_session_timeouts(store::pool_options(), timeouts)
        .connect(&db.url)
        .await
        .unwrap();
    let err = sqlx::query("SELECT pg_sleep(5)")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(store::is_transient(&err), "{err}");
    assert!(!store::is_unavailable(&err), "{err}");
    // Migrations run on a connection without the timeouts.
    store::migrate(&pool).await.unwrap();
}

#[tokio::test]
async fn the_oldest_open_transaction_is_reported_with_its_age_until_it_ends() {
    let db = testkit::fresh_db().await;
    // A read-only transaction has no id and holds nobody back.
    let mut reader = PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN; SELECT 1")
        .execute(&mut reader)
        .await
        .unwrap();
    let reader_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut reader)
        .await
        .unwrap();
    let oldest = store::health::oldest_transaction(&db.pool).await.unwrap();
    assert!(
        oldest.as_ref().is_none_or(|t| t.pid != Some(reader_pid)),
        "{oldest:?}"
    );

    let mut holder = PgConnection::connect(&db.url).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    sqlx::raw_sql("SET application_name = 'holder'; BEGIN; SELECT pg_current_xact_id()")
        .execute(&mut holder)
        .await
        .unwrap();
    // Other tests share the server: theirs may be older for a moment.
    let t = testkit::eventually(
        "the transaction to be the oldest, a second old",
        PATIENCE,
        || async {
            store::health::oldest_transaction(&db.pool)
                .await
                .unwrap()
                .filter(|t| t.age >= Duration::from_secs(1) && t.pid == Some(pid))
        },
    )
    .await;
    assert_eq!(t.application.as_deref(), Some("holder"));
    assert_eq!(t.state.as_deref(), Some("idle in transaction"));
    assert_eq!(t.database.as_deref(), Some(db.name.as_str()));
    let report = store::health::Report::measure(&db.pool).await.unwrap();
    let limits = store::health::Limits {
        db_budget_bytes: 0,
        stall_after: Duration::from_millis(500),
    };
    let problems = report.problems(&limits);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains(&format!("pid {pid}")), "{problems:?}");

    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let oldest = store::health::oldest_transaction(&db.pool).await.unwrap();
    assert!(
        oldest.as_ref().is_none_or(|t| t.pid != Some(pid)),
        "{oldest:?}"
    );
}

async fn chunk(
    pool: &PgPool,
    task: Uuid,
    attempt: i32,
    offset: i64,
    data: &str,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO task_log (task_id, attempt, \"offset\", data) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
        .bind(task)
        .bind(attempt)
        .bind(offset)
        .bind(data)
        .execute(pool)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn output_is_counted_removed_in_batches_and_refused_while_over_budget() {
    let db = testkit::fresh_db().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for i in 0..5 {
        chunk(&db.pool, a, 1, i * 10, "0123456789").await.unwrap();
    }
    chunk(&db.pool, a, 2, 0, "xyz").await.unwrap();
    chunk(&db.pool, b, 1, 0, "hello").await.unwrap();
    // A chunk sent twice is stored, and counted, once.
    chunk(&db.pool, b, 1, 0, "hello").await.unwrap();
    assert_eq!(task_log::total_bytes(&db.pool).await.unwrap(), 58);

    task_log::mark_removed(&db.pool, a, RemovedBy::Retention)
        .await
        .unwrap();
    let removed = task_log::removed(&db.pool, a).await.unwrap();
    assert_eq!(
        removed
            .iter()
            .map(|r| (r.attempt, r.from_offset, r.reason))
            .collect::<Vec<_>>(),
        vec![(1, 0, RemovedBy::Retention), (2, 0, RemovedBy::Retention)]
    );
    let mut batches = Vec::new();
    loop {
        let n = task_log::remove_batch(&db.pool, a, 4).await.unwrap();
        batches.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(batches, vec![4, 2, 0]);
    assert_eq!(task_log::total_bytes(&db.pool).await.unwrap(), 5);
    assert_eq!(task_log::stored_end(&db.pool, b, 1).await.unwrap(), Some(5));

    // Over the database's budget: chunks are refused, for good, with a
    // code of their own; events are not concerned.
    store::health::record_storage(&db.pool, 100, 10, true)
        .await
        .unwrap();
    let err = chunk(&db.pool, b, 1, 5, " world").await.unwrap_err();
    assert!(task_log::is_refused(&err), "{err}");
    assert!(!store::is_transient(&err), "{err}");
    task_log::record_refused(&db.pool, b, 1, 5).await.unwrap();
    task_log::record_refused(&db.pool, b, 1, 11).await.unwrap();
    let removed = task_log::removed(&db.pool, b).await.unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(
        (removed[0].from_offset, removed[0].reason),
        (5, RemovedBy::DbBudget)
    );
    let storage = store::health::storage(&db.pool).await.unwrap();
    assert!(storage.output_refused);
    assert!(storage.measured_at.is_some());

    store::health::record_storage(&db.pool, 100, 1000, false)
        .await
        .unwrap();
    chunk(&db.pool, b, 1, 5, " world").await.unwrap();
    assert_eq!(
        task_log::stored_end(&db.pool, b, 1).await.unwrap(),
        Some(11)
    );
}
