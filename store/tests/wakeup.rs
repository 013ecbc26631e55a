//! Who wakes an outbox consumer. Alone in its test binary: this process's
//! commits wake every consumer of the process, so another test's commits
//! would wake the one watched here.

use std::time::Duration;

use sqlx::postgres::PgListener;
use store::{Store, Wakeup};

/// A consumer is woken by its own process's commit once, straight away, and
/// not again when the NOTIFY of that same commit comes back from the
/// database; another process's NOTIFY wakes it.
#[tokio::test]
async fn a_consumer_skips_its_own_process_notifications_and_wakes_for_another_process() {
    let db = testkit::fresh_db().await;
    let store = Store::new(db.pool.clone());
    let mut wake = Wakeup::new(db.pool.clone(), Duration::from_secs(60)).await;
    // What every other process listening sees.
    let mut other = PgListener::connect_with(&db.pool).await.unwrap();
    other.listen(store::outbox::CHANNEL).await.unwrap();

    // A commit of this process (what `Store` does after each append).
    store.notifier().poke();
    tokio::time::timeout(Duration::from_secs(10), wake.wait())
        .await
        .expect("this process's commit did not wake its consumer");
    let sent = tokio::time::timeout(Duration::from_secs(10), other.recv())
        .await
        .expect("no NOTIFY reached the database")
        .unwrap();
    assert!(
        !sent.payload().is_empty(),
        "the NOTIFY does not say which process sent it"
    );

    // The same NOTIFY reached the consumer's own listener too: it must not
    // make the consumer read again.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), wake.wait())
            .await
            .is_err(),
        "the consumer was woken again by its own process's NOTIFY"
    );

    // Another process's commit: its NOTIFY carries another sender.
    sqlx::query("SELECT pg_notify($1, 'another process')")
        .bind(store::outbox::CHANNEL)
        .execute(&db.pool)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), wake.wait())
        .await
        .expect("another process's NOTIFY did not wake the consumer");
}
