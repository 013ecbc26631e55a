//! [`Client`]: the REST API under `/api/v1` with a bearer token, errors
//! read from the server's `{"errors": [...]}` body, and safe retries.

use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::config::Settings;
use crate::error::{transport, Error, Problem, Result};
use crate::types::{Artifact, Page, Project, StoredObject, Task, Upload, User};

/// How many times a request that may be sent again (a read, or a write
/// with an `Idempotency-Key`) is tried while the server is unreachable or
/// answers 502, 503 or 504.
const TRIES: u32 = 4;

/// The lists the server reads from read models, a moment behind the event
/// log. They are asked for with `Prefer: fresh`, so that they show
/// everything committed before the request: a project created by the
/// previous command is in the next command's list.
const FRESH_LISTS: [&str; 5] = ["/projects", "/nodes", "/users", "/tasks", "/timeline"];

/// Whether an answer says it honoured `Prefer: fresh`.
fn applied_fresh(headers: &reqwest::header::HeaderMap) -> bool {
    headers
        .get_all("Preference-Applied")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("fresh"))
}

/// Tells the user, once per process, that a list may lack the newest
/// changes: the server's read models had not caught up with its event log
/// within the time it waits for them.
fn warn_stale(path: &str) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!(
            "warning: the list at {path} may be missing the newest changes: \
             the server's read models are behind its event log"
        );
    }
}

/// A signed-in connection to one UniDesk server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    server: String,
    token: Option<String>,
    http: reqwest::Client,
    /// For presigned URLs: no token, no API base.
    plain: reqwest::Client,
}

/// The error body of every refusal.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<Problem>,
}

/// Reads the PEM bundle `ca_file`.
fn certificates(ca_file: &Path) -> Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(ca_file)
        .map_err(|e| Error::Usage(format!("reading the CA file {}: {e}", ca_file.display())))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| Error::Usage(format!("the CA file {}: {e}", ca_file.display())))?;
    if certs.is_empty() {
        return Err(Error::Usage(format!(
            "the CA file {} holds no certificate",
            ca_file.display()
        )));
    }
    Ok(certs)
}

impl Client {
    /// A client of the server `settings` name.
    ///
    /// # Errors
    /// [`Error::Usage`] when the CA file cannot be read.
    pub fn new(settings: &Settings) -> Result<Client> {
        let certs = match &settings.ca_file {
            Some(file) => certificates(file)?,
            None => Vec::new(),
        };
        let builder = || {
            let mut b = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(15))
                .read_timeout(Duration::from_secs(120))
                .user_agent(concat!("unidesk-client/", env!("CARGO_PKG_VERSION")));
            for cert in &certs {
                b = b.add_root_certificate(cert.clone());
            }
            b
        };
        let build = |b: reqwest::ClientBuilder| {
            b.build()
                .map_err(|e| Error::Other(format!("setting up HTTPS: {}", transport(e))))
        };
        Ok(Client {
            server: settings.server.clone(),
            token: settings.token.clone(),
            // Redirects are followed by hand, so that the token never
            // travels to where one points (a presigned URL).
            http: build(builder().redirect(reqwest::redirect::Policy::none()))?,
            plain: build(builder())?,
        })
    }

    /// The server's address.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The HTTP client for presigned URLs (no token is ever sent with it).
    pub fn plain(&self) -> &reqwest::Client {
        &self.plain
    }

    /// The URL of an API path (`/tasks`).
    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.server)
    }

    fn unreachable(&self, detail: String) -> Error {
        Error::Unreachable {
            server: self.server.clone(),
            detail,
        }
    }

    /// A request to `path` with the token.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, self.url(path));
        if let Some(token) = &self.token {
            r = r.bearer_auth(token);
        }
        r
    }

    /// Sends `request`, again while the server is unreachable or
    /// unavailable when `retry` (reads, idempotent writes), and returns a
    /// successful answer.
    ///
    /// # Errors
    /// [`Error::Unreachable`], or [`Error::Refused`] with the server's
    /// problems.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
        retry: bool,
    ) -> Result<reqwest::Response> {
        let tries = if retry { TRIES } else { 1 };
        let mut last = None;
        for n in 0..tries {
            if n > 0 {
                tokio::time::sleep(Duration::from_millis(250 << (n - 1).min(4))).await;
            }
            let Some(attempt) = request.try_clone() else {
                return self.answer(request.send().await).await;
            };
            match self.answer(attempt.send().await).await {
                Err(e @ Error::Unreachable { .. }) => last = Some(e),
                Err(Error::Refused { status, problems })
                    if matches!(status, 502..=504) && n + 1 < tries =>
                {
                    last = Some(Error::Refused { status, problems });
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| self.unreachable("no attempt was made".into())))
    }

    async fn answer(&self, sent: reqwest::Result<reqwest::Response>) -> Result<reqwest::Response> {
        let response = sent.map_err(|e| self.unreachable(transport(e)))?;
        let status = response.status();
        if status.is_success() || status.is_redirection() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let problems = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.errors)
            .unwrap_or_default();
        if status == StatusCode::SERVICE_UNAVAILABLE && problems.is_empty() {
            return Err(self.unreachable(format!("it answered {status}")));
        }
        Err(Error::Refused {
            status: status.as_u16(),
            problems,
        })
    }

    /// `GET path` with `query`, read as `T`.
    ///
    /// # Errors
    /// As [`Client::send`]; [`Error::Other`] for an answer that is not `T`.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T> {
        let mut request = self.request(Method::GET, path).query(query);
        let fresh = FRESH_LISTS.contains(&path);
        if fresh {
            request = request.header("Prefer", "fresh");
        }
        let response = self.send(request, true).await?;
        if fresh && !applied_fresh(response.headers()) {
            warn_stale(path);
        }
        json(response).await
    }

    /// `POST path` with the JSON `body`; with `idempotency_key`, sent
    /// again after a lost answer.
    ///
    /// # Errors
    /// As [`Client::get`].
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> Result<T> {
        let mut request = self.request(Method::POST, path).json(body);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let response = self.send(request, idempotency_key.is_some()).await?;
        json(response).await
    }

    /// Every page of the list at `path`.
    ///
    /// # Errors
    /// As [`Client::get`].
    pub async fn all<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<T>> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = query.to_vec();
            q.push(("limit", "500".into()));
            if let Some(c) = cursor.take() {
                q.push(("cursor", c));
            }
            let page: Page<T> = self.get(path, &q).await?;
            items.extend(page.items);
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(items),
            }
        }
    }

    /// The signed-in user.
    ///
    /// # Errors
    /// As [`Client::get`]; 401 for a bad token.
    pub async fn me(&self) -> Result<User> {
        self.get("/me", &[]).await
    }

    /// One task.
    ///
    /// # Errors
    /// As [`Client::get`]; 404 when it does not exist or is hidden.
    pub async fn task(&self, id: Uuid) -> Result<Task> {
        self.get(&format!("/tasks/{id}"), &[]).await
    }

    /// Asks for `id` to be cancelled.
    ///
    /// # Errors
    /// As [`Client::post`].
    pub async fn cancel(&self, id: Uuid) -> Result<Task> {
        let key = Uuid::new_v4().to_string();
        let request = self
            .request(Method::POST, &format!("/tasks/{id}/cancel"))
            .header("Idempotency-Key", key);
        json(self.send(request, true).await?).await
    }

    /// Submits the specification `spec` (the body of `POST /tasks`) once,
    /// however often it has to be sent.
    ///
    /// # Errors
    /// As [`Client::post`]; 422 names each bad field.
    pub async fn submit(&self, spec: &Value) -> Result<Task> {
        let key = Uuid::new_v4().to_string();
        self.post("/tasks", spec, Some(&key)).await
    }

    /// The project named `name_or_id` (a name or an id) among the caller's.
    ///
    /// # Errors
    /// 404-like [`Error::Refused`] when there is none.
    pub async fn project(&self, name_or_id: &str) -> Result<Project> {
        if let Ok(id) = Uuid::parse_str(name_or_id) {
            return self.get(&format!("/projects/{id}"), &[]).await;
        }
        let projects: Vec<Project> = self.all("/projects", &[]).await?;
        projects
            .into_iter()
            .find(|p| p.name == name_or_id)
            .ok_or_else(|| Error::Refused {
                status: 404,
                problems: vec![Problem {
                    detail: format!("you are in no project named {name_or_id:?}"),
                    field: Some("project".into()),
                }],
            })
    }

    /// Every project the caller sees.
    ///
    /// # Errors
    /// As [`Client::get`].
    pub async fn projects(&self) -> Result<Vec<Project>> {
        self.all("/projects", &[]).await
    }

    /// A task's stored outputs.
    ///
    /// # Errors
    /// As [`Client::get`].
    pub async fn artifacts(&self, task: Uuid) -> Result<Vec<Artifact>> {
        self.all(&format!("/tasks/{task}/artifacts"), &[]).await
    }

    /// Where the bytes of artifact `download` (its API path) are: the
    /// presigned URL its redirect names.
    ///
    /// # Errors
    /// As [`Client::send`]; [`Error::Other`] without a redirect.
    pub async fn download_url(&self, download: &str) -> Result<String> {
        let path = download.strip_prefix("/api/v1").unwrap_or(download);
        let response = self.send(self.request(Method::GET, path), true).await?;
        response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| Error::Other("the server named no download URL".into()))
    }

    /// Starts an upload of `size` bytes with `sha256` as object `name` of
    /// `project`.
    ///
    /// # Errors
    /// As [`Client::post`].
    pub async fn start_upload(
        &self,
        project: Uuid,
        name: &str,
        size: u64,
        sha256: &str,
    ) -> Result<Upload> {
        let body = serde_json::json!({"name": name, "size": size, "sha256": sha256});
        self.post(&format!("/projects/{project}/objects"), &body, None)
            .await
    }

    /// Completes an upload: the server checks the stored object.
    ///
    /// # Errors
    /// As [`Client::post`]; 409 when the upload was aborted meanwhile.
    pub async fn complete_upload(
        &self,
        project: Uuid,
        name: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<StoredObject> {
        let mut body = serde_json::json!({"name": name, "upload_id": upload_id});
        if !parts.is_empty() {
            body["parts"] = parts
                .iter()
                .map(|(n, etag)| serde_json::json!({"part_number": n, "etag": etag}))
                .collect();
        }
        // Completing a completed upload answers the same object: safe to
        // send again.
        let response = self
            .send(
                self.request(
                    Method::POST,
                    &format!("/projects/{project}/objects/complete"),
                )
                .json(&body),
                true,
            )
            .await?;
        json(response).await
    }
}

/// The body of `response` as `T`.
async fn json<T: DeserializeOwned>(response: reqwest::Response) -> Result<T> {
    let bytes = response
        .bytes()
        .await
        .map_err(|e| Error::Other(format!("reading the answer: {}", transport(e))))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Other(format!("the server's answer is not what was expected: {e}")))
}
