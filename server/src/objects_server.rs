//! `unidesk objects serve`: the S3-compatible object store of `unidesk dev`
//! ([`objects::embedded`], s3s over plain files) served alone, for a
//! deployment that keeps its objects on a volume of its own rather than in
//! MinIO, Garage or AWS S3.
//!
//! It serves one bucket under `--dir` and accepts only requests signed with
//! one access key and secret, which it reads from files (or the
//! environment) so that they never appear on a command line. The servers
//! are pointed at it with the ordinary `--s3-*` flags and the same keys.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use objects::embedded::Embedded;
use objects::Secret;

/// Where the store listens, keeps its objects, and which key it accepts.
#[derive(Debug, Args)]
pub struct ObjectsArgs {
    /// Where the S3 endpoint listens.
    #[arg(long, env = "UNIDESK_OBJECTS_LISTEN", default_value = "0.0.0.0:9000")]
    listen: SocketAddr,
    /// Where the objects are kept, one directory per bucket (created when
    /// missing).
    #[arg(long, env = "UNIDESK_OBJECTS_DIR", default_value = "./objects")]
    dir: PathBuf,
    /// The one bucket served: lower-case letters, digits and '-'.
    #[arg(long, env = "UNIDESK_S3_BUCKET", default_value = "unidesk")]
    bucket: String,
    /// A file holding the access key id requests must be signed with.
    #[arg(long, env = "UNIDESK_S3_ACCESS_KEY_FILE")]
    access_key_file: Option<PathBuf>,
    /// The access key id itself, when no file is given.
    #[arg(long, env = "UNIDESK_S3_ACCESS_KEY", hide_env_values = true)]
    access_key: Option<String>,
    /// A file holding the secret access key.
    #[arg(long, env = "UNIDESK_S3_SECRET_KEY_FILE")]
    secret_key_file: Option<PathBuf>,
    /// The secret access key itself (prefer the file, or the environment
    /// variable), when no file is given.
    #[arg(long, env = "UNIDESK_S3_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
}

/// The fewest characters a secret key may have.
const MIN_SECRET_LEN: usize = 16;

/// A key from `file` if given, else from `value`: trimmed, never empty.
fn key(what: &str, file: Option<&Path>, value: Option<&str>) -> anyhow::Result<String> {
    let text = match (file, value) {
        (Some(file), _) => std::fs::read_to_string(file)
            .with_context(|| format!("reading the {what} from {}", file.display()))?,
        (None, Some(value)) => value.to_string(),
        (None, None) => bail!(
            "no {what}: pass --{flag}-file (UNIDESK_S3_{env}_FILE) or set UNIDESK_S3_{env}",
            flag = what.replace(' ', "-"),
            env = what.to_uppercase().replace(' ', "_"),
        ),
    };
    let key = text.trim();
    if key.is_empty() {
        bail!("the {what} is empty");
    }
    if key.chars().any(char::is_whitespace) {
        bail!("the {what} holds white space inside it");
    }
    Ok(key.to_string())
}

impl ObjectsArgs {
    /// The store these arguments describe, its directory created.
    fn store(&self) -> anyhow::Result<Embedded> {
        let access = key(
            "access key",
            self.access_key_file.as_deref(),
            self.access_key.as_deref(),
        )?;
        let secret = key(
            "secret key",
            self.secret_key_file.as_deref(),
            self.secret_key.as_deref(),
        )?;
        if secret.len() < MIN_SECRET_LEN {
            bail!("the secret key is shorter than {MIN_SECRET_LEN} characters");
        }
        Embedded::new(&self.dir, &self.bucket, &access, Secret::new(secret))
            .with_context(|| format!("the object store under {}", self.dir.display()))
    }
}

/// Serves the store until `shutdown` completes.
pub async fn serve(
    args: &ObjectsArgs,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = args.store()?;
    store.run(listener, shutdown).await?;
    Ok(())
}

/// `unidesk objects serve`: serves the store until Ctrl-C or SIGTERM.
pub async fn run(args: ObjectsArgs) -> anyhow::Result<()> {
    // Checked before binding, so that a bad key is the error shown.
    args.store()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("the object store cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, dir = %args.dir.display(), bucket = %args.bucket,
        "object store serving");
    serve(&args, listener, crate::roles::shutdown_signal()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> ObjectsArgs {
        ObjectsArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            dir: dir.join("objects"),
            bucket: "unidesk".into(),
            access_key_file: None,
            access_key: Some("unidesk".into()),
            secret_key_file: None,
            secret_key: Some("0123456789abcdef0123".into()),
        }
    }

    #[test]
    fn a_key_file_wins_over_the_value_and_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "from-file\n").unwrap();
        assert_eq!(
            key("access key", Some(&file), Some("from-env")).unwrap(),
            "from-file"
        );
        assert_eq!(key("access key", None, Some(" v ")).unwrap(), "v");
    }

    #[test]
    fn missing_empty_or_unreadable_keys_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let err = key("secret key", None, None).unwrap_err().to_string();
        assert!(err.contains("--secret-key-file"), "{err}");
        assert!(err.contains("UNIDESK_S3_SECRET_KEY"), "{err}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = key("secret key", Some(&empty), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty"), "{err}");
        let missing = dir.path().join("missing");
        let err = format!("{:#}", key("access key", Some(&missing), None).unwrap_err());
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn a_short_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        a.secret_key = Some("short".into());
        let err = a.store().unwrap_err().to_string();
        assert!(err.contains("shorter than 16"), "{err}");
    }

    #[tokio::test]
    async fn a_client_with_the_keys_is_served_and_one_with_other_keys_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = {
            let a = args(dir.path());
            tokio::spawn(async move {
                serve(&a, listener, async {
                    let _ = stopped.await;
                })
                .await
            })
        };
        let config = a
            .store()
            .unwrap()
            .client_config(&endpoint, std::time::Duration::from_secs(60));
        let good = objects::ObjectStore::new(&config).unwrap();
        good.check().await.expect("the right keys are accepted");
        let mut wrong = config.clone();
        wrong.secret_key = Secret::new("another-secret-of-20c");
        let bad = objects::ObjectStore::new(&wrong).unwrap();
        assert!(bad.check().await.is_err(), "a wrong secret must be refused");
        assert!(dir.path().join("objects/unidesk").is_dir());
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
