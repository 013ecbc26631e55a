//! Project secrets' values: sealed with the server's secrets key and kept
//! in `project_secret_values`, outside the event log. The log (the
//! `Project` aggregate) says which value id is a secret's current value;
//! this module seals, stores, finds and opens values by that id.
//!
//! The key is 32 random bytes, written as 64 hex digits in a file only the
//! server reads (`--secrets-key-file`; [`SecretsKey::create`] makes one).
//! Values are sealed with XChaCha20-Poly1305 under a random 24-byte nonce,
//! with the project, the secret's name and the value id as associated
//! data, so a sealed value moved to another row does not open. A value
//! sealed under another key says so, naming both keys' ids, instead of
//! failing as garbage.

use std::io::Write;
use std::path::Path;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

/// The largest secret value, in bytes: an SSH key or a `known_hosts` file
/// fits many times over.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// The server's key for sealing secret values.
#[derive(Clone)]
pub struct SecretsKey {
    key: Zeroizing<[u8; 32]>,
    id: String,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// What went wrong with the key, a value or its row.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The key file could not be read or written.
    #[error("secrets key file {path}: {error}")]
    KeyFile {
        /// The file.
        path: String,
        /// What the file system said.
        error: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("secrets key file {0} must hold 64 hex digits (32 random bytes); `unidesk dev` or `unidesk secrets-key` makes one")]
    BadKey(String),
    /// The value is larger than [`MAX_VALUE_BYTES`].
    #[error("a secret's value is at most {MAX_VALUE_BYTES} bytes; this one has {0}")]
    TooLarge(usize),
    /// The value was sealed under another key.
    #[error("this secret was sealed with key {sealed_with}, but the server's key is {server}: start the server with the key it was set with, or set the secret again")]
    OtherKey {
        /// The key id the value names.
        sealed_with: String,
        /// The server's key id.
        server: String,
    },
    /// The value does not open: its row was altered or moved.
    #[error("the stored value of this secret is damaged; set it again")]
    Damaged,
    /// No value is stored under the id.
    #[error("the value of this secret is missing; set it again")]
    Missing,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl SecretsKey {
    /// The key held by `bytes`.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let id = hex::encode(&Sha256::digest(bytes)[..8]);
        SecretsKey {
            key: Zeroizing::new(bytes),
            id,
        }
    }

    /// Reads the key from `path` (64 hex digits, surrounding whitespace
    /// ignored).
    ///
    /// # Errors
    /// [`SecretsError::KeyFile`] or [`SecretsError::BadKey`].
    pub fn load(path: &Path) -> Result<Self, SecretsError> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|error| {
            SecretsError::KeyFile {
                path: path.display().to_string(),
                error,
            }
        })?);
        let mut bytes = [0u8; 32];
        let decoded = hex::decode_to_slice(text.trim(), &mut bytes);
        if decoded.is_err() {
            bytes.zeroize();
            return Err(SecretsError::BadKey(path.display().to_string()));
        }
        Ok(Self::from_bytes(bytes))
    }

    /// Makes a new random key at `path`, readable by its owner only, unless
    /// a file is there already; then reads the key it holds.
    ///
    /// # Errors
    /// [`SecretsError::KeyFile`] or [`SecretsError::BadKey`].
    pub fn create(path: &Path) -> Result<Self, SecretsError> {
        let io = |error| SecretsError::KeyFile {
            path: path.display().to_string(),
            error,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(path) {
            Ok(mut file) => {
                let key = XChaCha20Poly1305::generate_key(&mut OsRng);
                let text = Zeroizing::new(hex::encode(key.as_slice()));
                file.write_all(text.as_bytes()).map_err(io)?;
                file.sync_all().map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        Self::load(path)
    }

    /// The key's id: the first 8 bytes of its SHA-256, in hex. Safe to
    /// show and log.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.key.as_slice().into())
    }
}

/// What binds a sealed value to its place.
fn associated_data(project_id: Uuid, name: &str, value_id: Uuid) -> Vec<u8> {
    format!("unidesk-secret:v1:{project_id}:{name}:{value_id}").into_bytes()
}

/// Seals `value` as the value `value_id` of secret `name` of `project_id`
/// and stores it. The secret does not have this value until a
/// `SecretSet` event names `value_id`.
///
/// # Errors
/// [`SecretsError::TooLarge`] or the database's error.
pub async fn store_value(
    pool: &PgPool,
    key: &SecretsKey,
    project_id: Uuid,
    name: &str,
    value_id: Uuid,
    value: &[u8],
) -> Result<(), SecretsError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(SecretsError::TooLarge(value.len()));
    }
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let sealed = key
        .cipher()
        .encrypt(
            &nonce,
            Payload {
                msg: value,
                aad: &associated_data(project_id, name, value_id),
            },
        )
        // Sealing fails only for inputs of gigabytes.
        .map_err(|_| SecretsError::TooLarge(value.len()))?;
    sqlx::query(
        "INSERT INTO project_secret_values (value_id, project_id, name, key_id, nonce, sealed)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(value_id)
    .bind(project_id)
    .bind(name)
    .bind(key.id())
    .bind(nonce.as_slice())
    .bind(sealed)
    .execute(pool)
    .await?;
    Ok(())
}

/// Opens the value `value_id` of secret `name` of `project_id`.
///
/// # Errors
/// [`SecretsError::Missing`], [`SecretsError::OtherKey`],
/// [`SecretsError::Damaged`] or the database's error.
pub async fn open_value(
    pool: &PgPool,
    key: &SecretsKey,
    project_id: Uuid,
    name: &str,
    value_id: Uuid,
) -> Result<Zeroizing<Vec<u8>>, SecretsError> {
    let row: Option<(String, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT key_id, nonce, sealed FROM project_secret_values
         WHERE value_id = $1 AND project_id = $2 AND name = $3",
    )
    .bind(value_id)
    .bind(project_id)
    .bind(name)
    .fetch_optional(pool)
    .await?;
    let (key_id, nonce, sealed) = row.ok_or(SecretsError::Missing)?;
    if key_id != key.id() {
        return Err(SecretsError::OtherKey {
            sealed_with: key_id,
            server: key.id().to_owned(),
        });
    }
    if nonce.len() != 24 {
        return Err(SecretsError::Damaged);
    }
    key.cipher()
        .decrypt(
            nonce.as_slice().into(),
            Payload {
                msg: &sealed,
                aad: &associated_data(project_id, name, value_id),
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| SecretsError::Damaged)
}

/// Removes the values of secret `name` of `project_id` that are no
/// longer wanted once an event made `current` its value (`None`: it was
/// deleted): the value `replaced` that event replaced, and strays (values
/// of sets that lost a race) older than an hour. A value stored within
/// the hour may belong to a set still under way, and is left to the next
/// clean-up.
///
/// # Errors
/// The database's error.
pub async fn remove_old_values(
    pool: &PgPool,
    project_id: Uuid,
    name: &str,
    replaced: Option<Uuid>,
    current: Option<Uuid>,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM project_secret_values
         WHERE project_id = $1 AND name = $2 AND value_id IS DISTINCT FROM $4
           AND (value_id = $3 OR created_at < now() - interval '1 hour')",
    )
    .bind(project_id)
    .bind(name)
    .bind(replaced)
    .bind(current)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
