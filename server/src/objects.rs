//! The object store's flags: any S3 service for `unidesk serve`, the
//! embedded one for `unidesk dev`.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use objects::{Config, ObjectStore, Secret};

/// Where task inputs, outputs and uploaded objects are kept: an
/// S3-compatible service (MinIO, Garage, AWS). Without `--s3-bucket` the
/// server has no store, and tasks with inputs or outputs are refused.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// The S3 endpoint the server calls, such as `http://minio:9000`; leave
    /// it out for AWS S3 in `--s3-region`.
    #[arg(long, env = "UNIDESK_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// The endpoint written into presigned URLs, when nodes and users reach
    /// the store at another address than the server does.
    #[arg(long, env = "UNIDESK_S3_PUBLIC_ENDPOINT")]
    pub s3_public_endpoint: Option<String>,
    /// The bucket (it must exist).
    #[arg(long, env = "UNIDESK_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// The region in signatures.
    #[arg(long, env = "UNIDESK_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// The access key id.
    #[arg(long, env = "UNIDESK_S3_ACCESS_KEY", hide_env_values = true)]
    pub s3_access_key: Option<String>,
    /// The secret access key (prefer the environment variable).
    #[arg(long, env = "UNIDESK_S3_SECRET_KEY", hide_env_values = true,
          value_parser = parse_secret)]
    pub s3_secret_key: Option<Secret>,
    /// How long presigned URLs stay valid, in seconds. Nodes ask for one
    /// right before each transfer, so minutes are plenty.
    #[arg(long, env = "UNIDESK_S3_URL_TTL_S", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(10..=7 * 24 * 3600))]
    pub s3_url_ttl_s: u64,
    /// Part size of multipart uploads through the API, in MiB (5 or more).
    #[arg(long, env = "UNIDESK_S3_PART_MB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(5..=5 * 1024))]
    pub s3_part_mb: u64,
    /// How long after its URLs expired an upload through the API that was
    /// never completed is aborted (its parts deleted from the store), in
    /// seconds.
    #[arg(long, env = "UNIDESK_S3_UPLOAD_GRACE_S", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(0..=30 * 24 * 3600))]
    pub s3_upload_grace_s: u64,
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s.trim()))
}

impl S3Args {
    /// No store: the defaults of `serve` without `--s3-*` flags.
    pub fn defaults() -> Self {
        Self {
            s3_endpoint: None,
            s3_public_endpoint: None,
            s3_bucket: None,
            s3_region: "us-east-1".into(),
            s3_access_key: None,
            s3_secret_key: None,
            s3_url_ttl_s: 900,
            s3_part_mb: 64,
            s3_upload_grace_s: 3600,
        }
    }

    /// The part size of multipart uploads through the API.
    pub fn part_bytes(&self) -> u64 {
        self.s3_part_mb * 1024 * 1024
    }

    /// How long presigned URLs stay valid.
    pub fn url_ttl(&self) -> Duration {
        Duration::from_secs(self.s3_url_ttl_s)
    }

    /// How long past its URLs' expiry an uncompleted upload is kept.
    pub fn upload_grace(&self) -> Duration {
        Duration::from_secs(self.s3_upload_grace_s)
    }
}

/// The store the flags name, checked by listing its bucket; `None` when
/// no bucket is given.
///
/// # Errors
/// A bucket without keys, a malformed endpoint, or a store that refuses
/// or cannot be reached: the server does not start.
pub async fn connect(args: &S3Args) -> anyhow::Result<Option<ObjectStore>> {
    let Some(bucket) = &args.s3_bucket else {
        if args.s3_endpoint.is_some() {
            bail!("--s3-endpoint needs --s3-bucket (UNIDESK_S3_BUCKET)");
        }
        return Ok(None);
    };
    let (Some(access_key), Some(secret_key)) = (&args.s3_access_key, &args.s3_secret_key) else {
        bail!(
            "--s3-bucket needs --s3-access-key and --s3-secret-key \
             (UNIDESK_S3_ACCESS_KEY, UNIDESK_S3_SECRET_KEY)"
        );
    };
    let config = Config {
        endpoint: args.s3_endpoint.clone(),
        public_endpoint: args.s3_public_endpoint.clone(),
        bucket: bucket.clone(),
        region: args.s3_region.clone(),
        access_key: access_key.clone(),
        secret_key: secret_key.clone(),
        url_ttl: args.url_ttl(),
    };
    let store = ObjectStore::new(&config).context("the object store's flags")?;
    store
        .check()
        .await
        .with_context(|| format!("checking the object store's bucket {bucket:?}"))?;
    tracing::info!(?store, "object store ready");
    Ok(Some(store))
}
