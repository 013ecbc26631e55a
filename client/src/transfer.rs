//! Uploads into a project's store and downloads of a task's outputs,
//! straight to and from the object store through presigned URLs, checked
//! by SHA-256 and resumable.
//!
//! An upload of several parts keeps a small state file in the user's
//! cache directory (`$XDG_CACHE_HOME/unidesk/uploads/`), named by the
//! server, project, object name and the file's SHA-256: the upload's id,
//! its part URLs and the ETag of every part the store took. A run cut off
//! (a dropped connection, Ctrl-C) leaves it behind, and the next run of the
//! same upload sends only the parts still missing, as long as the URLs are
//! valid; after that it starts a new upload. A download goes to
//! `NAME.part` next to its destination and continues from its length.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::api::Client;
use crate::error::{transport, Error, Result};
use crate::types::{StoredObject, Upload};

/// Bytes read from a file at a time.
const BUFFER: usize = 1024 * 1024;

/// How often a part (or a download) is tried before the run gives up.
const TRIES: u32 = 3;

/// Seconds before its URLs expire that a saved upload is no longer
/// resumed but started again.
const EXPIRY_MARGIN_S: i64 = 60;

/// Reports the progress of a transfer: bytes so far of a total.
pub trait Progress: Send + Sync {
    /// A new phase (`hashing`, `uploading`…) of `total` bytes, `done`
    /// of which are done already.
    fn start(&self, phase: &str, total: u64, done: u64);
    /// `n` more bytes are done.
    fn advance(&self, n: u64);
    /// The phase is over.
    fn finish(&self);
}

/// Progress that nobody sees.
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: u64, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// A progress bar on standard error (`indicatif`).
pub struct Bar(indicatif::ProgressBar);

impl Bar {
    /// A bar, hidden unless standard error is a terminal.
    pub fn new() -> Bar {
        let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            indicatif::ProgressBar::new(0)
        } else {
            indicatif::ProgressBar::hidden()
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        Bar(bar)
    }
}

impl Default for Bar {
    fn default() -> Self {
        Bar::new()
    }
}

impl Progress for Bar {
    fn start(&self, phase: &str, total: u64, done: u64) {
        self.0.reset();
        self.0.set_length(total);
        self.0.set_position(done);
        self.0.set_message(phase.to_string());
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// What an upload did.
#[derive(Debug, Clone, Serialize)]
pub struct Uploaded {
    /// The object as the server verified it.
    pub object: StoredObject,
    /// Parts sent by this run.
    pub parts_sent: u32,
    /// Parts an earlier, cut-off run had sent already.
    pub parts_resumed: u32,
    /// Bytes sent by this run.
    pub bytes_sent: u64,
}

/// What is kept between runs of one upload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    server: String,
    project: Uuid,
    size: u64,
    sha256: String,
    /// When the URLs were handed out (Unix seconds).
    started_at: i64,
    upload: Upload,
    /// Part number to ETag, of the parts the store took.
    done: BTreeMap<u32, String>,
}

/// The directory of upload state files.
fn state_dir() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("UNIDESK_CACHE_DIR") {
        return Ok(PathBuf::from(dir).join("uploads"));
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("unidesk").join("uploads"));
    }
    match var("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache/unidesk/uploads")),
        None => Err(Error::Usage(
            "no cache directory for the upload's state: set HOME or XDG_CACHE_HOME".into(),
        )),
    }
}

fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Saved {
    fn path(server: &str, project: Uuid, name: &str, sha256: &str) -> Result<PathBuf> {
        let key = hex::encode(Sha256::digest(
            format!("{server}\n{project}\n{name}").as_bytes(),
        ));
        Ok(state_dir()?.join(format!("{}-{}.json", &sha256[..16], &key[..16])))
    }

    fn load(path: &Path) -> Option<Saved> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn store(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| Error::Io(format!("saving {}: {e}", path.display()));
        let dir = path.parent().unwrap_or(Path::new("."));
        crate::config::create_private_dir(dir).map_err(io)?;
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec(self).map_err(|e| Error::Other(e.to_string()))?;
        let mut file = crate::config::private_file(&tmp).map_err(io)?;
        file.write_all(&text).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    fn fresh(&self) -> bool {
        self.started_at + self.upload.expires_in_s as i64 - EXPIRY_MARGIN_S > now_s()
    }
}

/// The SHA-256 of the first `size` bytes of `file`, as hex.
///
/// # Errors
/// [`Error::Io`] when it cannot be read.
pub async fn sha256_file(path: &Path, progress: &dyn Progress) -> Result<(u64, String)> {
    let path = path.to_path_buf();
    let size = std::fs::metadata(&path)
        .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?
        .len();
    progress.start("hashing", size, 0);
    // Hashing is CPU work: off the async threads, a buffer at a time.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let work = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use std::io::Read;
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; BUFFER];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            let _ = tx.send(n as u64);
        }
        Ok(hex::encode(hasher.finalize()))
    });
    while let Some(n) = rx.recv().await {
        progress.advance(n);
    }
    progress.finish();
    let sha = work
        .await
        .map_err(|e| Error::Other(e.to_string()))?
        .map_err(|e| Error::Io(format!("reading the file: {e}")))?;
    Ok((size, sha))
}

/// Uploads `file` as object `name` of `project`, resuming an earlier run
/// of the same upload that was cut off.
///
/// # Errors
/// [`Error::Io`] for the file, [`Error::Unreachable`] when the server or
/// the store cannot be reached (run again to resume), [`Error::Refused`]
/// with the server's words (a mismatch at the completion among them).
pub async fn upload(
    client: &Client,
    project: Uuid,
    file: &Path,
    name: &str,
    progress: &dyn Progress,
) -> Result<Uploaded> {
    let (size, sha256) = sha256_file(file, progress).await?;
    let state = Saved::path(client.server(), project, name, &sha256)?;
    let saved = Saved::load(&state)
        .filter(|s| s.size == size && s.sha256 == sha256 && s.project == project)
        .filter(|s| s.server == client.server() && s.fresh());
    let resumed = saved.is_some();
    let mut saved = match saved {
        Some(s) => s,
        None => Saved {
            server: client.server().to_string(),
            project,
            size,
            sha256: sha256.clone(),
            started_at: now_s(),
            upload: client.start_upload(project, name, size, &sha256).await?,
            done: BTreeMap::new(),
        },
    };
    let handle = Arc::new(
        std::fs::File::open(file).map_err(|e| Error::Io(format!("{}: {e}", file.display())))?,
    );
    let upload_id = saved
        .upload
        .upload_id
        .clone()
        .ok_or_else(|| Error::Other("the server named no upload id".into()))?;
    let parts_resumed = saved.done.len() as u32;
    let mut parts_sent = 0;
    let mut bytes_sent = 0;
    if saved.upload.method == "multipart" {
        let part_size = saved
            .upload
            .part_size
            .filter(|p| *p > 0)
            .ok_or_else(|| Error::Other("the server named no part size".into()))?;
        saved.store(&state)?;
        let done_bytes: u64 = saved
            .done
            .keys()
            .map(|n| part_len(size, part_size, *n))
            .sum();
        progress.start("uploading", size, done_bytes);
        let parts = saved.upload.parts.clone();
        for part in parts {
            if saved.done.contains_key(&part.part_number) {
                continue;
            }
            let offset = u64::from(part.part_number - 1) * part_size;
            let len = part_len(size, part_size, part.part_number);
            let etag = put_with_retries(
                client,
                &part.url,
                &BTreeMap::new(),
                &handle,
                offset,
                len,
                progress,
            )
            .await?;
            saved.done.insert(part.part_number, etag);
            saved.store(&state)?;
            parts_sent += 1;
            bytes_sent += len;
        }
        progress.finish();
    } else {
        let url = saved
            .upload
            .url
            .clone()
            .ok_or_else(|| Error::Other("the server named no upload URL".into()))?;
        progress.start("uploading", size, 0);
        put_with_retries(
            client,
            &url,
            &saved.upload.headers,
            &handle,
            0,
            size,
            progress,
        )
        .await?;
        progress.finish();
        parts_sent = 1;
        bytes_sent = size;
    }
    let parts: Vec<(u32, String)> = saved.done.clone().into_iter().collect();
    let object = match client
        .complete_upload(project, &saved.upload.name, &upload_id, &parts)
        .await
    {
        Ok(object) => object,
        // Aborted meanwhile (its URLs expired): forget it; a new run
        // starts afresh.
        Err(e) if resumed && e.status() == Some(409) => {
            let _ = std::fs::remove_file(&state);
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let _ = std::fs::remove_file(&state);
    if object.sha256 != sha256 || object.size != size {
        return Err(Error::Other(format!(
            "the store holds {} bytes with SHA-256 {}, not {size} bytes with {sha256}",
            object.size, object.sha256
        )));
    }
    Ok(Uploaded {
        object,
        parts_sent,
        parts_resumed,
        bytes_sent,
    })
}

/// The length of part `n` (from 1) of a `size`-byte file.
fn part_len(size: u64, part_size: u64, n: u32) -> u64 {
    let start = u64::from(n - 1) * part_size;
    size.saturating_sub(start).min(part_size)
}

async fn put_with_retries(
    client: &Client,
    url: &str,
    headers: &BTreeMap<String, String>,
    file: &Arc<std::fs::File>,
    offset: u64,
    len: u64,
    progress: &dyn Progress,
) -> Result<String> {
    let mut last = None;
    for n in 0..TRIES {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(300 << n)).await;
        }
        match put(client, url, headers, file, offset, len, progress).await {
            Ok(etag) => return Ok(etag),
            Err(e @ Error::Unreachable { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::Other("no try was made".into())))
}

async fn put(
    client: &Client,
    url: &str,
    headers: &BTreeMap<String, String>,
    file: &Arc<std::fs::File>,
    offset: u64,
    len: u64,
    progress: &dyn Progress,
) -> Result<String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let body = read_range(Arc::clone(file), offset, len).inspect(move |chunk| {
        if let Ok(c) = chunk {
            let _ = tx.send(c.len() as u64);
        }
    });
    let mut request = client
        .plain()
        .put(url)
        .header(reqwest::header::CONTENT_LENGTH, len)
        .body(reqwest::Body::wrap_stream(body));
    for (k, v) in headers {
        request = request.header(k, v);
    }
    let sending = request.send();
    tokio::pin!(sending);
    let response = loop {
        tokio::select! {
            r = &mut sending => break r,
            Some(n) = rx.recv() => progress.advance(n),
        }
    };
    let response = response.map_err(|e| Error::Unreachable {
        server: "the object store".into(),
        detail: transport(e),
    })?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(Error::Other(store_refusal(status, &body)));
    }
    Ok(response
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string())
}

/// What the store said when it refused, without the URL.
fn store_refusal(status: reqwest::StatusCode, body: &str) -> String {
    let field = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{name}>"))? + start;
        Some(body[start..end].to_string())
    };
    match (field("Code"), field("Message")) {
        (Some(c), Some(m)) => format!("the object store refused with {status} {c}: {m}"),
        (Some(c), None) => format!("the object store refused with {status} {c}"),
        _ => format!("the object store refused with {status}"),
    }
}

/// `len` bytes of `file` from `offset`, as a stream of chunks.
fn read_range(
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    futures::stream::try_unfold(0u64, move |sent| {
        let file = Arc::clone(&file);
        async move {
            if sent == len {
                return Ok(None);
            }
            let want = (len - sent).min(BUFFER as u64);
            let at = offset + sent;
            let buf = tokio::task::spawn_blocking(move || read_at(&file, at, want))
                .await
                .map_err(std::io::Error::other)??;
            if buf.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file became shorter while it was sent",
                ));
            }
            let n = buf.len() as u64;
            Ok(Some((bytes::Bytes::from(buf), sent + n)))
        }
    })
}

#[cfg(unix)]
fn read_at(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

#[cfg(not(unix))]
fn read_at(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek};
    let mut f = file.try_clone()?;
    f.seek(std::io::SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.take(len).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Downloads `url` (a presigned URL) to `dest`, expecting `size` bytes
/// with `sha256`: into `dest.part` first, continued from its length by a
/// ranged request when a run was cut off, renamed to `dest` once the
/// SHA-256 matches.
///
/// # Errors
/// [`Error::Unreachable`] when the store cannot be reached (run again to
/// resume), [`Error::Other`] when what arrived does not match (the part
/// file is removed).
pub async fn download(
    client: &Client,
    url: &str,
    dest: &Path,
    size: u64,
    sha256: &str,
    progress: &dyn Progress,
) -> Result<()> {
    let part = {
        let mut name = dest.file_name().unwrap_or_default().to_os_string();
        name.push(".part");
        dest.with_file_name(name)
    };
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("{}: {e}", dir.display())))?;
    }
    let io = |e: std::io::Error| Error::Io(format!("{}: {e}", part.display()));
    let mut hasher = Sha256::new();
    let mut have = 0u64;
    // What an earlier run left: hashed again, then continued.
    if let Ok(existing) = std::fs::read(&part) {
        if existing.len() as u64 <= size {
            hasher.update(&existing);
            have = existing.len() as u64;
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&part)
        .map_err(io)?;
    if have == 0 {
        file.set_len(0).map_err(io)?;
    }
    progress.start("download", size, have);
    let mut last = None;
    for n in 0..TRIES {
        if have >= size {
            break;
        }
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(300 << n)).await;
        }
        let mut request = client.plain().get(url);
        if have > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                last = Some(Error::Unreachable {
                    server: "the object store".into(),
                    detail: transport(e),
                });
                continue;
            }
        };
        let status = response.status();
        if have > 0 && status == reqwest::StatusCode::OK {
            // The store ignored the range: start over.
            file.set_len(0).map_err(io)?;
            hasher = Sha256::new();
            have = 0;
            progress.start("download", size, 0);
        } else if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(Error::Other(store_refusal(status, &body)));
        }
        let mut body = response.bytes_stream();
        let mut broke = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => {
                    file.write_all(&chunk).map_err(io)?;
                    hasher.update(&chunk);
                    have += chunk.len() as u64;
                    progress.advance(chunk.len() as u64);
                }
                Err(e) => {
                    broke = Some(transport(e));
                    break;
                }
            }
        }
        if let Some(why) = broke {
            last = Some(Error::Unreachable {
                server: "the object store".into(),
                detail: why,
            });
        }
    }
    progress.finish();
    file.sync_all().map_err(io)?;
    if have < size {
        return Err(last.unwrap_or_else(|| {
            Error::Other(format!("the download ended after {have} of {size} bytes"))
        }));
    }
    let got = hex::encode(hasher.finalize());
    if have != size || got != sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(Error::Other(format!(
            "{} arrived corrupted: {have} bytes with SHA-256 {got}, expected {size} bytes with {sha256}",
            dest.display()
        )));
    }
    std::fs::rename(&part, dest).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_file_and_the_last_is_shorter() {
        assert_eq!(part_len(10, 4, 1), 4);
        assert_eq!(part_len(10, 4, 3), 2);
        assert_eq!(part_len(8, 4, 2), 4);
    }
}
