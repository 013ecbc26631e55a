//! Sealed secret values on a real PostgreSQL: they open only with the key
//! and in the place they were sealed for, and a key file is made once,
//! for its owner only.

use std::os::unix::fs::PermissionsExt;

use store::secrets::{self, SecretsError, SecretsKey};
use uuid::Uuid;

#[tokio::test]
async fn a_value_opens_with_its_key_in_its_place_and_nowhere_else() {
    let db = testkit::fresh_db().await;
    store::migrate(&db.pool).await.expect("migrations");
    let key = SecretsKey::from_bytes(rand::random());
    let (project, value_id) = (Uuid::now_v7(), Uuid::now_v7());
    secrets::store_value(&db.pool, &key, project, "token", value_id, b"s3cr3t-value")
        .await
        .expect("stored");
    let opened = secrets::open_value(&db.pool, &key, project, "token", value_id)
        .await
        .expect("opened");
    assert_eq!(opened.as_slice(), b"s3cr3t-value");

    let other = SecretsKey::from_bytes(rand::random());
    match secrets::open_value(&db.pool, &other, project, "token", value_id).await {
        Err(SecretsError::OtherKey {
            sealed_with,
            server,
        }) => assert_eq!(
            (sealed_with.as_str(), server.as_str()),
            (key.id(), other.id())
        ),
        other => panic!("expected OtherKey, got {other:?}"),
    }
    // Moved to another secret's name, or altered, it does not open.
    sqlx::query("UPDATE project_secret_values SET name = 'other' WHERE value_id = $1")
        .bind(value_id)
        .execute(&db.pool)
        .await
        .expect("moved");
    assert!(matches!(
        secrets::open_value(&db.pool, &key, project, "other", value_id).await,
        Err(SecretsError::Damaged)
    ));
    assert!(matches!(
        secrets::open_value(&db.pool, &key, project, "token", value_id).await,
        Err(SecretsError::Missing)
    ));
    assert!(matches!(
        secrets::store_value(
            &db.pool,
            &key,
            project,
            "big",
            Uuid::now_v7(),
            &vec![b'x'; secrets::MAX_VALUE_BYTES + 1]
        )
        .await,
        Err(SecretsError::TooLarge(_))
    ));
}

#[test]
fn a_key_file_is_made_once_for_its_owner_and_a_bad_one_is_named() {
    let dir = tempfile::tempdir().expect("a directory");
    let path = dir.path().join("secrets.key");
    let made = SecretsKey::create(&path).expect("made");
    let mode = std::fs::metadata(&path)
        .expect("the file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = SecretsKey::create(&path).expect("read back");
    assert_eq!(made.id(), again.id(), "an existing key is kept");
    assert!(!format!("{made:?}").contains(&std::fs::read_to_string(&path).expect("text")));

    std::fs::write(&path, "not hex at all").expect("written");
    let bad = SecretsKey::load(&path).expect_err("refused");
    assert!(bad.to_string().contains("64 hex digits"), "{bad}");
}
