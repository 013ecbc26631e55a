//! The first admin: a fresh installation needs one user who can create all
//! the others.
//!
//! [`bootstrap_admin`] is idempotent, so the server can call it at every
//! start: it creates the user `admin` once, and keeps the token it wrote
//! to the token file for as long as that token still authenticates.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::Utc;
use domain::user::{User, UserCommand, UserError};
use domain::Actor;
use store::{tokens, Store, StoreError};
use uuid::Uuid;

use crate::auth::authenticate;
use crate::error::ApiError;

/// The name of the first admin.
pub const ADMIN: &str = "admin";

/// The label of the tokens bootstrap issues.
pub const TOKEN_LABEL: &str = "bootstrap";

/// Why the first admin could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A user named `admin` exists but is not an admin.
    #[error("a user named {ADMIN:?} exists but is not an admin; refusing to hand out its token")]
    NotAdmin,
    /// The event log could not be read or written.
    #[error("event log: {0}")]
    Store(String),
    /// The token file could not be written.
    #[error("writing the admin token to {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

impl From<StoreError<UserError>> for BootstrapError {
    fn from(e: StoreError<UserError>) -> Self {
        Self::Store(e.to_string())
    }
}

/// Ensures the admin user exists and returns a token for it: the one in
/// `token_file` when it still authenticates, else a new one written there
/// with mode 0600 (its directory is created if needed).
///
/// # Errors
/// [`BootstrapError::NotAdmin`] when `admin` exists without admin rights,
/// [`BootstrapError::Store`] when the log fails, [`BootstrapError::Io`]
/// when the file cannot be written.
pub async fn bootstrap_admin(store: &Store, token_file: &Path) -> Result<String, BootstrapError> {
    let actor = Actor::System("bootstrap".into());
    ensure_admin(store, &actor).await?;
    if let Ok(text) = std::fs::read_to_string(token_file) {
        let token = text.trim();
        match authenticate(store, token).await {
            Ok(caller) if caller.admin && caller.user == ADMIN => return Ok(token.to_string()),
            Ok(_) | Err(ApiError::Unauthorized(_)) => {
                tracing::info!(file = %token_file.display(), "the stored admin token no longer works; issuing a new one");
            }
            Err(e) => return Err(BootstrapError::Store(e.to_string())),
        }
    }
    let token_id = Uuid::now_v7();
    let issued = tokens::issue_user(ADMIN, token_id);
    let now = Utc::now();
    let command = UserCommand::IssueToken {
        token_id,
        fingerprint: issued.fingerprint.clone(),
        label: TOKEN_LABEL.into(),
        by: actor.clone(),
        at: now,
        expires_at: None,
        max_live: usize::MAX,
    };
    store.execute::<User>(ADMIN, command, &actor, now).await?;
    write_secret(token_file, &issued.token).map_err(|source| BootstrapError::Io {
        path: token_file.to_path_buf(),
        source,
    })?;
    tracing::info!(file = %token_file.display(), %token_id, "issued a new admin token");
    Ok(issued.token)
}

/// Creates the admin user unless it exists; another replica creating it at
/// the same moment is fine.
async fn ensure_admin(store: &Store, actor: &Actor) -> Result<(), BootstrapError> {
    let existing = store.load::<User>(ADMIN).await?;
    let user = match existing {
        Some(loaded) if loaded.state.exists() => loaded.state,
        _ => {
            let now = Utc::now();
            let command = UserCommand::Create {
                name: ADMIN.into(),
                admin: true,
                by: actor.clone(),
                at: now,
            };
            match store.execute::<User>(ADMIN, command, actor, now).await {
                Ok(executed) => executed.state,
                Err(StoreError::Rejected(UserError::AlreadyExists)) => store
                    .load::<User>(ADMIN)
                    .await?
                    .map(|l| l.state)
                    .unwrap_or_default(),
                Err(e) => return Err(e.into()),
            }
        }
    };
    if user.admin {
        Ok(())
    } else {
        Err(BootstrapError::NotAdmin)
    }
}

/// Writes `secret` to `path` readable by its owner only, replacing the file
/// atomically so a crash never leaves half a token behind.
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "token".into());
    let tmp = dir.join(format!(".{file_name}.{}.tmp", Uuid::new_v4().simple()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
