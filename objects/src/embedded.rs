//! The embedded S3-compatible store of `unidesk dev`: s3s-fs keeps objects
//! as plain files under a directory, and s3s speaks the S3 protocol for it,
//! checking every request's SigV4 signature (header or presigned query,
//! with expiry) against one access key.
//!
//! It runs inside the server process on a listener of its own: presigned
//! URLs name the store's host and path, so it cannot share the API's.

use std::future::Future;
use std::path::{Path, PathBuf};

use axum::error_handling::HandleError;
use axum::http::StatusCode;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;

use crate::served::Served;
use crate::store::{Config, ObjectError, Secret};

/// Credentials for the embedded store: an access key and a fresh random
/// secret, made at each start (URLs signed before a restart stop working,
/// which short-lived URLs do soon anyway).
pub fn fresh_credentials() -> (String, Secret) {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let secret: String = (0..40)
        .map(|_| {
            const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            CHARS[rng.gen_range(0..CHARS.len())] as char
        })
        .collect();
    ("unidesk-dev".to_string(), Secret::new(secret))
}

/// An S3-compatible store over a local directory.
pub struct Embedded {
    root: PathBuf,
    bucket: String,
    access_key: String,
    secret_key: Secret,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("root", &self.root)
            .field("bucket", &self.bucket)
            .finish()
    }
}

impl Embedded {
    /// A store keeping objects under `root`, with the one bucket `bucket`
    /// (created as a directory when missing), accepting only requests signed
    /// with `access_key` and `secret_key`.
    ///
    /// # Errors
    /// [`ObjectError::Config`] when the directories cannot be created or
    /// the bucket name is not a plain name.
    pub fn new(
        root: &Path,
        bucket: &str,
        access_key: &str,
        secret_key: Secret,
    ) -> Result<Self, ObjectError> {
        let plain = !bucket.is_empty()
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !plain {
            return Err(ObjectError::Config(format!(
                "bucket {bucket:?} must be lower-case letters, digits and '-'"
            )));
        }
        std::fs::create_dir_all(root.join(bucket)).map_err(|e| {
            ObjectError::Config(format!("creating {}: {e}", root.join(bucket).display()))
        })?;
        let root = root
            .canonicalize()
            .map_err(|e| ObjectError::Config(format!("{}: {e}", root.display())))?;
        Ok(Self {
            root,
            bucket: bucket.to_string(),
            access_key: access_key.to_string(),
            secret_key,
        })
    }

    /// The configuration of an [`crate::ObjectStore`] for this store when
    /// it serves at `endpoint` (such as `http://127.0.0.1:9000`).
    pub fn client_config(&self, endpoint: &str, url_ttl: std::time::Duration) -> Config {
        Config {
            endpoint: Some(endpoint.to_string()),
            public_endpoint: None,
            bucket: self.bucket.clone(),
            region: "us-east-1".into(),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
            url_ttl,
        }
    }

    /// The S3 service as an axum router, to serve on a listener of its own.
    ///
    /// # Errors
    /// [`ObjectError::Config`] when the directory cannot be used.
    pub fn router(&self) -> Result<axum::Router, ObjectError> {
        let fs = s3s_fs::FileSystem::new(&self.root)
            .map_err(|e| ObjectError::Config(format!("{}: {e:?}", self.root.display())))?;
        let mut builder = S3ServiceBuilder::new(Served::new(fs, self.root.clone()));
        builder.set_auth(SimpleAuth::from_single(
            self.access_key.clone(),
            self.secret_key.expose().to_string(),
        ));
        let service = builder.build();
        let service = HandleError::new(service, |e: s3s::HttpError| async move {
            tracing::warn!(error = ?e, "embedded object store failed a request");
            StatusCode::INTERNAL_SERVER_ERROR
        });
        Ok(axum::Router::new().fallback_service(service))
    }

    /// Serves the store on `listener` until `shutdown` completes.
    ///
    /// # Errors
    /// [`ObjectError::Config`] when the directory cannot be used.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ObjectError> {
        let router = self.router()?;
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| ObjectError::Store(format!("serving the embedded store: {e}")))
    }
}
