//! Signing URLs and the server's own calls to the store.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use s3::bucket::Bucket;
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::serde_types::Part;
use s3::Region;

/// The smallest part of a multipart upload but the last (S3's rule).
pub const MIN_PART_BYTES: u64 = 5 * 1024 * 1024;

/// The most parts of one multipart upload (S3's rule).
pub const MAX_PARTS: u32 = 10_000;

/// The largest object (S3's rule: 5 TiB).
pub const MAX_OBJECT_BYTES: u64 = 5 * 1024 * 1024 * 1024 * 1024;

/// The user metadata that carries an object's SHA-256 (lower-case hex).
const SHA256_META: &str = "x-amz-meta-sha256";

/// How long the server's own calls (look, start, complete) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A secret that never shows in logs, errors or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for signing only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Where the store is and how to sign for it.
#[derive(Debug, Clone)]
pub struct Config {
    /// The S3 endpoint the server calls, such as `http://minio:9000`; `None`
    /// for AWS S3 in `region`. With an endpoint, objects are addressed
    /// path-style (`<endpoint>/<bucket>/<key>`), as MinIO and Garage expect.
    pub endpoint: Option<String>,
    /// The endpoint written into presigned URLs, when nodes and users reach
    /// the store at another address than the server does; `None` for
    /// `endpoint`.
    pub public_endpoint: Option<String>,
    /// The bucket; it must exist.
    pub bucket: String,
    /// The region in signatures (`us-east-1` for most non-AWS stores).
    pub region: String,
    /// The access key id.
    pub access_key: String,
    /// The secret access key.
    pub secret_key: Secret,
    /// How long a presigned URL stays valid.
    pub url_ttl: Duration,
}

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The configuration cannot work.
    #[error("object store configuration: {0}")]
    Config(String),
    /// The store answered with an error, or could not be reached.
    #[error("object store: {0}")]
    Store(String),
}

impl From<S3Error> for ObjectError {
    fn from(e: S3Error) -> Self {
        ObjectError::Store(describe(&e))
    }
}

/// The useful part of an S3 error: the status and the store's own code and
/// message, never the request's signature.
fn describe(e: &S3Error) -> String {
    match e {
        S3Error::HttpFailWithBody(status, body) => {
            let code = xml_field(body, "Code");
            let message = xml_field(body, "Message");
            match (code, message) {
                (Some(c), Some(m)) => format!("the store answered {status} {c}: {m}"),
                (Some(c), None) => format!("the store answered {status} {c}"),
                _ => format!("the store answered {status}"),
            }
        }
        other => format!("cannot reach the store: {other}"),
    }
}

fn xml_field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&format!("</{name}>"))? + start;
    Some(&body[start..end])
}

/// What the store says about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256 (lower-case hex) when it was stored with one.
    pub sha256: Option<String>,
}

/// What reading an object back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadBack {
    /// The whole object: its size, SHA-256 and BLAKE3 (lower-case hex).
    Whole {
        /// Bytes read.
        size: u64,
        /// The SHA-256 of those bytes.
        sha256: String,
        /// The BLAKE3 of the same bytes, which agents check downloads
        /// against.
        blake3: String,
    },
    /// More bytes than the reader would take; reading stopped there.
    Longer {
        /// The most bytes the reader would take.
        than: u64,
    },
}

/// A presigned request: the URL and the headers that must be sent with it
/// exactly as given (they are part of the signature).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presigned {
    /// The URL, valid until it expires.
    pub url: String,
    /// Headers to send unchanged.
    pub headers: BTreeMap<String, String>,
}

/// The object store as the server sees it: a signer and a client. Cheap to
/// clone.
#[derive(Clone)]
pub struct ObjectStore {
    /// For the server's own calls.
    internal: Box<Bucket>,
    /// For signing URLs that nodes and users follow.
    public: Box<Bucket>,
    ttl_secs: u32,
    bucket: String,
}

impl fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStore")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.internal.url())
            .field("public", &self.public.url())
            .field("ttl_secs", &self.ttl_secs)
            .finish()
    }
}

fn bucket(config: &Config, endpoint: Option<&str>) -> Result<Box<Bucket>, ObjectError> {
    let region = match endpoint {
        Some(endpoint) => {
            let endpoint = endpoint.trim_end_matches('/');
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(ObjectError::Config(format!(
                    "endpoint {endpoint:?} must start with http:// or https://"
                )));
            }
            Region::Custom {
                region: config.region.clone(),
                endpoint: endpoint.to_string(),
            }
        }
        None => config
            .region
            .parse()
            .map_err(|e| ObjectError::Config(format!("region {:?}: {e}", config.region)))?,
    };
    let credentials = Credentials::new(
        Some(&config.access_key),
        Some(config.secret_key.expose()),
        None,
        None,
        None,
    )
    .map_err(|e| ObjectError::Config(format!("credentials: {e}")))?;
    let bucket = Bucket::new(&config.bucket, region, credentials)
        .map_err(|e| ObjectError::Config(format!("bucket {:?}: {e}", config.bucket)))?;
    let bucket = if endpoint.is_some() {
        bucket.with_path_style()
    } else {
        bucket
    };
    bucket
        .with_request_timeout(CALL_TIMEOUT)
        .map_err(|e| ObjectError::Config(e.to_string()))
}

fn header(map: &mut HeaderMap, name: &'static str, value: &str) -> Result<(), ObjectError> {
    let value = HeaderValue::from_str(value)
        .map_err(|_| ObjectError::Config(format!("{name} cannot be sent as a header")))?;
    map.insert(HeaderName::from_static(name), value);
    Ok(())
}

fn headers_of(map: &HeaderMap) -> BTreeMap<String, String> {
    map.iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// Whether `s` is a SHA-256 in lower-case hex.
pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl ObjectStore {
    /// A store as `config` says. Nothing is contacted; [`ObjectStore::check`]
    /// does that.
    ///
    /// # Errors
    /// [`ObjectError::Config`] for an endpoint, region or TTL that cannot
    /// work.
    pub fn new(config: &Config) -> Result<Self, ObjectError> {
        if config.bucket.is_empty() || config.access_key.is_empty() {
            return Err(ObjectError::Config(
                "a bucket, an access key and a secret key are required".into(),
            ));
        }
        let ttl = config.url_ttl.as_secs();
        if !(1..=7 * 24 * 3600).contains(&ttl) {
            return Err(ObjectError::Config(format!(
                "URLs must live between 1 s and 7 days, not {ttl} s"
            )));
        }
        let internal = bucket(config, config.endpoint.as_deref())?;
        let public = match &config.public_endpoint {
            Some(p) => bucket(config, Some(p))?,
            None => internal.clone(),
        };
        Ok(Self {
            internal,
            public,
            ttl_secs: ttl as u32,
            bucket: config.bucket.clone(),
        })
    }

    /// The bucket's address as presigned URLs name it.
    pub fn public_url(&self) -> String {
        self.public.url()
    }

    /// How long the URLs this store signs stay valid, in seconds.
    pub fn url_ttl_secs(&self) -> u32 {
        self.ttl_secs
    }

    /// Checks that the bucket exists and the credentials are accepted.
    ///
    /// # Errors
    /// [`ObjectError::Store`] saying what the store answered.
    pub async fn check(&self) -> Result<(), ObjectError> {
        let listed = self
            .internal
            .list_page("unidesk-check/".into(), None, None, None, Some(1))
            .await;
        match listed {
            Ok((_, 200..=299)) => Ok(()),
            Ok((_, status)) => Err(ObjectError::Store(format!(
                "bucket {:?}: the store answered {status}",
                self.bucket
            ))),
            Err(e) => Err(ObjectError::Store(format!(
                "bucket {:?}: {}",
                self.bucket,
                describe(&e)
            ))),
        }
    }

    /// The size and SHA-256 of object `key`; `None` when there is none.
    ///
    /// # Errors
    /// [`ObjectError::Store`] when the store cannot be asked.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, ObjectError> {
        let (head, status) = match self.internal.head_object(key).await {
            Ok(found) => found,
            Err(S3Error::HttpFailWithBody(404, _)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match status {
            404 => return Ok(None),
            200..=299 => {}
            other => {
                return Err(ObjectError::Store(format!(
                    "the store answered {other} when asked about an object"
                )))
            }
        }
        let size = head
            .content_length
            .and_then(|l| u64::try_from(l).ok())
            .ok_or_else(|| ObjectError::Store("the store did not say an object's size".into()))?;
        let sha256 = head
            .metadata
            .unwrap_or_default()
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("sha256"))
            .map(|(_, v)| v.to_ascii_lowercase())
            .filter(|v| is_sha256(v));
        Ok(Some(ObjectInfo { size, sha256 }))
    }

    /// A URL that reads object `key` (GET). With `file_name`, a browser
    /// saves it under that name.
    ///
    /// # Errors
    /// [`ObjectError::Config`] when the URL cannot be signed.
    pub async fn presign_get(
        &self,
        key: &str,
        file_name: Option<&str>,
    ) -> Result<String, ObjectError> {
        let queries = file_name.map(|n| {
            let safe: String = n
                .chars()
                .map(|c| if c == '"' || c.is_control() { '_' } else { c })
                .collect();
            HashMap::from([(
                "response-content-disposition".to_string(),
                format!("attachment; filename=\"{safe}\""),
            )])
        });
        self.public
            .presign_get(key, self.ttl_secs, queries)
            .await
            .map_err(|e| ObjectError::Config(format!("signing a download: {e}")))
    }

    /// A URL that writes object `key` in one PUT. With `sha256`, the body
    /// must have exactly that SHA-256 (the store checks while it reads) and
    /// the object keeps it as metadata.
    ///
    /// # Errors
    /// [`ObjectError::Config`] for a malformed hash or when signing fails.
    pub async fn presign_put(
        &self,
        key: &str,
        sha256: Option<&str>,
    ) -> Result<Presigned, ObjectError> {
        let mut headers = HeaderMap::new();
        if let Some(sha) = sha256 {
            if !is_sha256(sha) {
                return Err(ObjectError::Config("sha256 must be 64 hex digits".into()));
            }
            header(&mut headers, "x-amz-content-sha256", sha)?;
            header(&mut headers, SHA256_META, sha)?;
        }
        let url = self
            .public
            .presign_put(key, self.ttl_secs, Some(headers.clone()), None)
            .await
            .map_err(|e| ObjectError::Config(format!("signing an upload: {e}")))?;
        Ok(Presigned {
            url,
            headers: headers_of(&headers),
        })
    }

    /// Starts a multipart upload of `key` whose whole content will have
    /// SHA-256 `sha256` (kept as metadata); returns the upload id.
    ///
    /// # Errors
    /// [`ObjectError::Store`] when the store refuses or cannot be reached.
    pub async fn start_multipart(
        &self,
        key: &str,
        sha256: Option<&str>,
    ) -> Result<String, ObjectError> {
        let bucket = match sha256 {
            Some(sha) => {
                let mut extra = HeaderMap::new();
                header(&mut extra, SHA256_META, sha)?;
                Box::new(
                    self.internal
                        .with_extra_headers(extra)
                        .map_err(|e| ObjectError::Config(e.to_string()))?,
                )
            }
            None => self.internal.clone(),
        };
        let started = bucket
            .initiate_multipart_upload(key, "application/octet-stream")
            .await?;
        Ok(started.upload_id)
    }

    /// A URL that writes part `part_number` (from 1) of multipart upload
    /// `upload_id` of `key`. With `sha256`, the part's body must have
    /// exactly that SHA-256.
    ///
    /// # Errors
    /// [`ObjectError::Config`] for a bad part number or hash.
    pub async fn presign_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        sha256: Option<&str>,
    ) -> Result<Presigned, ObjectError> {
        if !(1..=MAX_PARTS).contains(&part_number) {
            return Err(ObjectError::Config(format!(
                "part numbers run from 1 to {MAX_PARTS}"
            )));
        }
        let mut headers = HeaderMap::new();
        if let Some(sha) = sha256 {
            if !is_sha256(sha) {
                return Err(ObjectError::Config("sha256 must be 64 hex digits".into()));
            }
            header(&mut headers, "x-amz-content-sha256", sha)?;
        }
        let queries = HashMap::from([
            ("partNumber".to_string(), part_number.to_string()),
            ("uploadId".to_string(), upload_id.to_string()),
        ]);
        let url = self
            .public
            .presign_put(key, self.ttl_secs, Some(headers.clone()), Some(queries))
            .await
            .map_err(|e| ObjectError::Config(format!("signing a part upload: {e}")))?;
        Ok(Presigned {
            url,
            headers: headers_of(&headers),
        })
    }

    /// Completes multipart upload `upload_id` of `key` from `parts`
    /// (part number and ETag, in order).
    ///
    /// # Errors
    /// [`ObjectError::Store`] when the store refuses (a missing part, a
    /// wrong ETag) or cannot be reached.
    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<(), ObjectError> {
        let parts = parts
            .iter()
            .map(|(n, etag)| Part {
                part_number: *n,
                etag: etag.clone(),
            })
            .collect();
        let answer = self
            .internal
            .complete_multipart_upload(key, upload_id, parts)
            .await?;
        // rust-s3 without `fail-on-err` hands a refusal back as data.
        match answer.status_code() {
            200..=299 => Ok(()),
            status => Err(S3Error::HttpFailWithBody(
                status,
                String::from_utf8_lossy(answer.as_slice()).into_owned(),
            )
            .into()),
        }
    }

    /// Drops multipart upload `upload_id` of `key` and its parts. An upload
    /// the store no longer knows (`NoSuchUpload`) counts as dropped.
    ///
    /// # Errors
    /// [`ObjectError::Store`] when the store refuses or cannot be reached.
    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), ObjectError> {
        match self.internal.abort_upload(key, upload_id).await {
            Ok(()) => Ok(()),
            Err(S3Error::HttpFailWithBody(404, _)) => Ok(()),
            Err(S3Error::HttpFailWithBody(_, body))
                if xml_field(&body, "Code") == Some("NoSuchUpload") =>
            {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads object `key` back from the store in a stream and returns its
    /// size, SHA-256 and BLAKE3, never holding more than one network read in
    /// memory. Reading stops as soon as the object proves longer than
    /// `max_bytes` ([`ReadBack::Longer`]), so a wrong size costs no more
    /// than the size expected. `None` when there is no such object.
    ///
    /// # Errors
    /// [`ObjectError::Store`] when the store refuses, cannot be reached, or
    /// sends nothing for [`CALL_TIMEOUT`] in the middle of the object.
    pub async fn read_back(
        &self,
        key: &str,
        max_bytes: u64,
    ) -> Result<Option<ReadBack>, ObjectError> {
        use futures::StreamExt;
        use sha2::{Digest, Sha256};
        // The bucket's own timeout covers a whole request, and reading a
        // large object takes longer: each read gets the timeout instead.
        let mut reader = self.internal.clone();
        reader.set_request_timeout(None);
        let mut response = tokio::time::timeout(CALL_TIMEOUT, reader.get_object_stream(key))
            .await
            .map_err(|_| ObjectError::Store("the store did not answer a read".into()))??;
        match response.status_code {
            200..=299 => {}
            404 => return Ok(None),
            other => {
                return Err(ObjectError::Store(format!(
                    "the store answered {other} when an object was read"
                )))
            }
        }
        let mut hasher = Sha256::new();
        let mut blake3 = blake3::Hasher::new();
        let mut size: u64 = 0;
        let stream = response.bytes();
        loop {
            let next = tokio::time::timeout(CALL_TIMEOUT, stream.next())
                .await
                .map_err(|_| {
                    ObjectError::Store("the store stopped sending an object it was reading".into())
                })?;
            let Some(chunk) = next else { break };
            let chunk = chunk?;
            size += chunk.len() as u64;
            if size > max_bytes {
                return Ok(Some(ReadBack::Longer { than: max_bytes }));
            }
            hasher.update(&chunk);
            blake3.update(&chunk);
        }
        Ok(Some(ReadBack::Whole {
            size,
            sha256: hex::encode(hasher.finalize()),
            blake3: blake3.finalize().to_hex().to_string(),
        }))
    }

    /// Deletes object `key` (a transfer that turned out wrong).
    ///
    /// # Errors
    /// [`ObjectError::Store`] when the store refuses or cannot be reached.
    pub async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let response = self.internal.delete_object(key).await?;
        match response.status_code() {
            200..=299 | 404 => Ok(()),
            other => Err(ObjectError::Store(format!(
                "the store answered {other} to a delete"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_say_the_code_and_never_the_request() {
        let e = S3Error::HttpFailWithBody(
            403,
            "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>".into(),
        );
        assert_eq!(
            describe(&e),
            "the store answered 403 AccessDenied: Request has expired"
        );
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
