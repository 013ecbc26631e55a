//! Task inputs and outputs: streamed between the workspace and the object
//! store through presigned URLs, never through the WebSocket.
//!
//! The agent holds no credentials for the store. Right before each transfer
//! (each part of a multipart upload, each retry) it asks the server for a
//! URL over its session ([`Broker`]); the server signs one for exactly that
//! object and method, valid for minutes. Files are read and written in
//! small buffers, so memory stays flat whatever their size:
//!
//! - a download is written to a temporary file next to its destination (on
//!   a blocking thread that hashes it too, while the connection is read)
//!   and renamed into place only
//!   once its size and SHA-256 match what the server said; a broken connection resumes from the bytes already
//!   written (a `Range` request on a fresh URL);
//! - every file is reached through a [`Root`] handle on the workspace
//!   ([`crate::beneath`]): a destination, its directories or its temporary
//!   file, and an output, are never reached through a link out of the
//!   workspace, and an output is read from the very handle whose type was
//!   checked;
//! - an upload up to the part size is hashed, then sent in one PUT; a
//!   larger one goes in parts, two at a time (one is sent
//!   while the store finishes the one before), hashed on a blocking thread
//!   one part ahead of the parts being sent (the whole file's SHA-256
//!   folded in the same pass, in order). Each body carries its SHA-256 in
//!   a signed header, so the store refuses a part that differs from what
//!   was hashed, and a failed part is sent again alone, unless the file
//!   changed under it: then the upload fails at once. The server completes
//!   the upload with the whole file's SHA-256, checks the stored size and
//!   records the output: the stored object is exactly the bytes the whole
//!   hash was computed over, as every part was checked against the same
//!   pass.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use protocol::{AgentMessage, TaskInput, TaskOutput, TransferGrant, TransferOp, TransferRequest};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, Notify};
use uuid::Uuid;

use crate::beneath::{blocking, Root};

/// The default part size of multipart uploads.
pub const PART_BYTES: u64 = 64 * 1024 * 1024;
/// How many parts of one upload are sent at once. With one, the
/// connection idles while the store takes in the end of each part and
/// while the next URL is asked for; two keep it busy. Each part is read
/// from the file as it is sent, so memory does not grow with it.
const PARTS_IN_FLIGHT: usize = 2;
/// How long the server may take to answer a request for a URL.
const ASK_TIMEOUT: Duration = Duration::from_secs(60);
/// How often one transfer (one part) is tried before the output fails.
const TRIES: u32 = 5;
/// The read buffer: what one transfer holds in memory at a time.
const BUFFER: usize = 256 * 1024;
/// The read buffer of the hashing thread.
const HASH_BUFFER: usize = 1024 * 1024;
/// How many received chunks may wait for the download's writer.
const SINK_CHUNKS: usize = 16;
/// What a download gathers from the network before handing it to its
/// writer: the network gives a few KiB at a time, and waking the writer's
/// thread for each would cost more than the bytes.
const SINK_CHUNK_BYTES: usize = 256 * 1024;

/// Why a transfer failed, for the task's reason.
pub type TransferError = String;

/// Requests for URLs, waiting for the session to send them and for the
/// server's answers. Shared by the executors and the connection.
#[derive(Debug, Default)]
pub struct Broker {
    state: Mutex<BrokerState>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct BrokerState {
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
}

#[derive(Debug)]
struct Pending {
    request: TransferRequest,
    sent: bool,
    reply: oneshot::Sender<TransferGrant>,
}

impl Broker {
    fn state(&self) -> MutexGuard<'_, BrokerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks the server for what `op` needs for attempt `attempt` of
    /// `task_id`, and waits for the answer.
    ///
    /// # Errors
    /// The server's refusal, or that it did not answer in time (also while
    /// the agent is disconnected).
    pub async fn ask(
        &self,
        task_id: Uuid,
        attempt: u32,
        op: TransferOp,
    ) -> Result<TransferGrant, TransferError> {
        let (reply, answer) = oneshot::channel();
        let id = {
            let mut state = self.state();
            state.next_id += 1;
            let id = state.next_id;
            let request = TransferRequest {
                id,
                task_id,
                attempt,
                op,
            };
            state.pending.insert(
                id,
                Pending {
                    request,
                    sent: false,
                    reply,
                },
            );
            id
        };
        self.wake.notify_one();
        let answered = tokio::time::timeout(ASK_TIMEOUT, answer).await;
        self.state().pending.remove(&id);
        match answered {
            Ok(Ok(grant)) => match grant.error {
                Some(error) => Err(error),
                None => Ok(grant),
            },
            _ => Err(format!(
                "the server did not answer a request for a transfer URL within {} s",
                ASK_TIMEOUT.as_secs()
            )),
        }
    }

    /// Resolves when a request waits to be sent.
    pub async fn wanted(&self) {
        self.wake.notified().await;
    }

    /// After a reconnect: every unanswered request is sent again.
    pub fn rewind(&self) {
        for p in self.state().pending.values_mut() {
            p.sent = false;
        }
    }

    /// The next request to send in this session, if any.
    pub fn next_message(&self) -> Option<AgentMessage> {
        let mut state = self.state();
        let p = state.pending.values_mut().find(|p| !p.sent)?;
        p.sent = true;
        Some(AgentMessage::TransferRequest(p.request.clone()))
    }

    /// Hands the server's answer to the request waiting for it; an answer
    /// nobody waits for any more is dropped.
    pub fn answer(&self, grant: TransferGrant) {
        if let Some(p) = self.state().pending.remove(&grant.id) {
            let _ = p.reply.send(grant);
        }
    }
}

/// Moves an attempt's files. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Files {
    broker: Arc<Broker>,
    client: reqwest::Client,
    part_bytes: u64,
}

/// What a finished transfer moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// Bytes.
    pub size: u64,
    /// SHA-256, lower-case hex.
    pub sha256: String,
}

/// The HTTP client of transfers: the public roots, and the certificates
/// in `extra_roots` besides.
fn client(extra_roots: &[reqwest::Certificate]) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120));
    for cert in extra_roots {
        builder = builder.add_root_certificate(cert.clone());
    }
    builder.build().unwrap_or_default()
}

impl Files {
    /// Transfers asking `broker` for URLs, cutting uploads into parts of
    /// `part_bytes` (at least the store's minimum of 5 MiB).
    pub fn new(broker: Arc<Broker>, part_bytes: u64) -> Self {
        Files {
            broker,
            client: client(&[]),
            part_bytes: part_bytes.max(5 * 1024 * 1024),
        }
    }

    /// The same transfers, trusting the certificates of the PEM file
    /// `ca_file` (the private CA of `--ca-file`) besides the public roots:
    /// an object store behind the same gateway as the server has a
    /// certificate that CA signed.
    ///
    /// # Errors
    /// The file cannot be read or holds no certificate.
    pub fn with_ca_file(mut self, ca_file: &std::path::Path) -> Result<Self, String> {
        let pem = std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", ca_file.display()));
        }
        self.client = client(&certs);
        Ok(self)
    }

    /// The broker the connection serves.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Downloads input `input` of the attempt into `root/<input.name>`.
    ///
    /// # Errors
    /// Why, naming the input: it does not exist, the store cannot be
    /// reached, the path leads out of `root`, the content arrived short or
    /// corrupted.
    pub async fn download(
        &self,
        task_id: Uuid,
        attempt: u32,
        input: &TaskInput,
        root: &Root,
    ) -> Result<Moved, TransferError> {
        let name = &input.name;
        let root = root.try_clone().map_err(|e| format!("input {name}: {e}"))?;
        let rel = input.name.clone();
        let (new, file) = blocking(move || root.new_file(&rel))
            .await
            .map_err(|e| format!("input {name}: {e}"))?;
        let moved = self
            .fetch(task_id, attempt, input, file)
            .await
            .map_err(|e| format!("input {name}: {e}"))?;
        blocking(move || new.persist())
            .await
            .map_err(|e| format!("input {name}: {e}"))?;
        Ok(moved)
    }

    async fn fetch(
        &self,
        task_id: Uuid,
        attempt: u32,
        input: &TaskInput,
        file: std::fs::File,
    ) -> Result<Moved, TransferError> {
        let mut file = Some(file);
        let mut sink: Option<Sink> = None;
        let mut expected = None;
        let mut last_error = String::new();
        for _ in 0..TRIES {
            let op = TransferOp::Download {
                input: input.name.clone(),
            };
            let grant = self.broker.ask(task_id, attempt, op).await?;
            let (Some(url), Some(size)) = (grant.url, grant.size) else {
                return Err("the server sent no URL".into());
            };
            let want = Want::of(grant.sha256, grant.blake3)?;
            // The first grant says how the bytes are checked; one that
            // asks for another check (a server upgraded midway) cannot be
            // honoured with the bytes already hashed.
            let sink = match (&mut sink, file.take()) {
                (Some(sink), _) if sink.check == want.check() => sink,
                (Some(_), _) => {
                    return Err(
                        "the server changed how the download is checked while it was under way"
                            .into(),
                    )
                }
                (None, Some(file)) => sink.insert(Sink::start(file, want.check())),
                (None, None) => return Err("no file to download into".into()),
            };
            expected = Some((size, want));
            let got = self.get_from(&url, sink).await;
            if let Some(e) = sink.broken.clone() {
                return Err(e);
            }
            let written = sink.written;
            match got {
                Ok(()) if written >= size => break,
                Ok(()) => {
                    tracing::warn!(input = %input.name, written, size, "download ended early; resuming");
                    last_error = "the connection ended early".into();
                }
                Err(e) if written > size => return Err(e),
                Err(e) => {
                    tracing::warn!(input = %input.name, written, error = %e, "download interrupted; resuming");
                    last_error = e;
                }
            }
        }
        let (Some(sink), Some((size, want))) = (sink, expected) else {
            return Err("no download was possible".into());
        };
        let (written, got) = sink.finish().await?;
        if written != size {
            return Err(format!(
                "the download of object {:?} is truncated: {written} of {size} bytes arrived ({last_error})",
                input.object
            ));
        }
        if let Some(digest) = want.digest() {
            if got != digest {
                return Err(format!(
                    "object {:?} arrived corrupted: its {} is {got}, the server verified {digest}",
                    input.object,
                    want.check().name()
                ));
            }
        }
        let sha256 = match want {
            Want::Sha256(_) => got,
            // The bytes are those whose SHA-256 the server verified when it
            // read the upload back and computed this BLAKE3 of them.
            Want::Blake3 { sha256, .. } => sha256,
        };
        Ok(Moved { size, sha256 })
    }

    /// Appends the object from the bytes `sink` holds on.
    async fn get_from(&self, url: &str, sink: &mut Sink) -> Result<(), TransferError> {
        let from = sink.written;
        let mut request = self.client.get(url);
        if from > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("cannot reach the store: {}", without_url(e)))?;
        let status = response.status();
        if from > 0 && status == reqwest::StatusCode::OK {
            // The store ignored the range: start over.
            sink.restart().await?;
        } else if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(store_refusal(status, &body));
        }
        let mut body = response.bytes_stream();
        let mut gathered = bytes::BytesMut::new();
        let ended = loop {
            match body.next().await {
                None => break Ok(()),
                Some(Err(e)) => break Err(format!("the connection broke: {}", without_url(e))),
                Some(Ok(chunk)) if gathered.is_empty() && chunk.len() >= SINK_CHUNK_BYTES => {
                    sink.write(chunk).await?;
                }
                Some(Ok(chunk)) => {
                    if gathered.is_empty() {
                        gathered.reserve(SINK_CHUNK_BYTES);
                    }
                    gathered.extend_from_slice(&chunk);
                    if gathered.len() >= SINK_CHUNK_BYTES {
                        sink.write(gathered.split().freeze()).await?;
                    }
                }
            }
        };
        // What arrived before the end or a break is written too, so a
        // resumed download asks only for the bytes after it.
        if !gathered.is_empty() {
            sink.write(gathered.freeze()).await?;
        }
        ended
    }

    /// Uploads output `output` of the attempt from `root/<output.path>`;
    /// the server records it once the store holds it intact.
    ///
    /// # Errors
    /// Why, naming the output: the file is missing, not a regular file or
    /// leads out of `root`, the store cannot be reached or refused a part
    /// every time, or the server refused the upload.
    pub async fn upload(
        &self,
        task_id: Uuid,
        attempt: u32,
        output: &TaskOutput,
        root: &Root,
    ) -> Result<Moved, TransferError> {
        let name = &output.name;
        let root = root
            .try_clone()
            .map_err(|e| format!("output {name}: {e}"))?;
        let rel = output.path.clone();
        let (file, meta) = blocking(move || root.open_file(&rel))
            .await
            .map_err(|e| format!("output {name}: {e}"))?;
        self.send(task_id, attempt, output, Arc::new(file), meta.len())
            .await
            .map_err(|e| format!("output {name}: {e}"))
    }

    /// Sends the first `size` bytes of `file`, an open output.
    async fn send(
        &self,
        task_id: Uuid,
        attempt: u32,
        output: &TaskOutput,
        file: Arc<std::fs::File>,
        size: u64,
    ) -> Result<Moved, TransferError> {
        let part_bytes = part_size(size, self.part_bytes);
        if size <= part_bytes {
            // One PUT: its SHA-256 is signed into the URL, so it comes first.
            let sha256 = hash_range(Arc::clone(&file), 0, size).await?;
            let start = TransferOp::Upload {
                output: output.name.clone(),
                size,
                sha256: Some(sha256.clone()),
                parts: 1,
            };
            let body = Body {
                file: &file,
                offset: 0,
                len: size,
                sha256: &sha256,
            };
            self.put_with_retries(task_id, attempt, &start, body)
                .await?;
            let complete = TransferOp::Complete {
                output: output.name.clone(),
                upload_id: None,
                parts: Vec::new(),
                size,
                sha256: sha256.clone(),
            };
            self.broker.ask(task_id, attempt, complete).await?;
            return Ok(Moved { size, sha256 });
        }
        let parts = u32::try_from(size.div_ceil(part_bytes))
            .map_err(|_| "the file needs too many parts".to_string())?;
        // The whole file's SHA-256 is known only once every part is hashed:
        // it comes with the completion.
        let start = TransferOp::Upload {
            output: output.name.clone(),
            size,
            sha256: None,
            parts,
        };
        let grant = self.broker.ask(task_id, attempt, start).await?;
        let id = grant.upload_id.ok_or("the server sent no upload id")?;
        let mut hashes = hash_ahead(Arc::clone(&file), size, part_bytes);
        let mut sending = futures::stream::FuturesOrdered::new();
        let mut uploaded = Vec::with_capacity(parts as usize);
        let mut next = 1;
        while uploaded.len() < parts as usize {
            let room = next <= parts && sending.len() < PARTS_IN_FLIGHT;
            tokio::select! {
                // A part's end first: its failure ends the upload before
                // another part starts.
                biased;
                sent = sending.next(), if !sending.is_empty() => {
                    let Some(sent) = sent else { continue };
                    uploaded.push(sent?);
                }
                sha256 = hashes.recv(), if room => {
                    let sha256 = sha256
                        .unwrap_or_else(|| Err("hashing the file stopped early".into()))?;
                    let number = next;
                    next += 1;
                    let (output, id, file) = (&output.name, &id, &file);
                    sending.push_back(async move {
                        let offset = u64::from(number - 1) * part_bytes;
                        let op = TransferOp::UploadPart {
                            output: output.clone(),
                            upload_id: id.clone(),
                            part_number: number,
                            sha256: sha256.clone(),
                        };
                        let body = Body {
                            file,
                            offset,
                            len: part_bytes.min(size - offset),
                            sha256: &sha256,
                        };
                        let etag = self
                            .put_with_retries(task_id, attempt, &op, body)
                            .await
                            .map_err(|e| format!("part {number} of {parts}: {e}"))?;
                        Ok::<_, TransferError>(protocol::UploadedPart {
                            part_number: number,
                            etag,
                        })
                    });
                }
                else => return Err("the upload's parts stopped early".into()),
            }
        }
        drop(sending);
        let whole = hashes
            .recv()
            .await
            .unwrap_or_else(|| Err("hashing the file stopped early".into()))?;
        let complete = TransferOp::Complete {
            output: output.name.clone(),
            upload_id: Some(id),
            parts: uploaded,
            size,
            sha256: whole.clone(),
        };
        self.broker.ask(task_id, attempt, complete).await?;
        Ok(Moved {
            size,
            sha256: whole,
        })
    }

    /// Asks for a URL with `op` and PUTs `body` to it until the store takes
    /// it, at most [`TRIES`] times, pausing a little longer each time; returns
    /// the ETag. After a failed try the bytes are hashed again: when they no
    /// longer match (the file changed or shrank while it was sent), trying
    /// again cannot help and the upload fails at once.
    async fn put_with_retries(
        &self,
        task_id: Uuid,
        attempt: u32,
        op: &TransferOp,
        body: Body<'_>,
    ) -> Result<String, TransferError> {
        let mut last = String::new();
        for i in 0..TRIES {
            let tried = match self.broker.ask(task_id, attempt, op.clone()).await {
                Ok(grant) => self.put(&grant, body.file, body.offset, body.len).await,
                Err(e) => Err(e),
            };
            match tried {
                Ok(etag) => return Ok(etag),
                Err(e) => {
                    tracing::warn!(try_ = i + 1, error = %e, "transfer failed; trying again");
                    last = e;
                }
            }
            let now = hash_range(Arc::clone(body.file), body.offset, body.len).await?;
            if now != body.sha256 {
                return Err(format!(
                    "the file changed while it was uploaded: bytes {} to {} no longer have \
                     the SHA-256 they were hashed with ({last})",
                    body.offset,
                    body.offset + body.len
                ));
            }
            if i + 1 < TRIES {
                tokio::time::sleep(Duration::from_millis(200 << i)).await;
            }
        }
        Err(format!("failed {TRIES} times, last: {last}"))
    }

    /// PUTs `len` bytes of `file` from `offset` to the granted URL; returns
    /// the ETag the store answered.
    async fn put(
        &self,
        grant: &TransferGrant,
        file: &Arc<std::fs::File>,
        offset: u64,
        len: u64,
    ) -> Result<String, TransferError> {
        let url = grant.url.as_deref().ok_or("the server sent no URL")?;
        let body = reqwest::Body::wrap_stream(read_range(Arc::clone(file), offset, len));
        let mut request = self
            .client
            .put(url)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body);
        for (k, v) in &grant.headers {
            request = request.header(k, v);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("cannot reach the store: {}", without_url(e)))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(store_refusal(status, &body));
        }
        Ok(response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string())
    }
}

/// How a download's bytes are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Their SHA-256, as the server verified it.
    Sha256,
    /// Their BLAKE3, which the server computed beside the SHA-256 it
    /// verified: a third of SHA-256's CPU here, which on two cores took a
    /// download from 0.6 of `curl`'s speed to about 0.9 of it (see
    /// BENCHMARKS.md).
    Blake3,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::Sha256 => "SHA-256",
            Check::Blake3 => "BLAKE3",
        }
    }
}

/// What a download grant says the bytes must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// The SHA-256 the server verified, when it knows one.
    Sha256(Option<String>),
    /// The BLAKE3 the server computed of the bytes whose SHA-256 it
    /// verified.
    Blake3 {
        /// Checked.
        blake3: String,
        /// Reported.
        sha256: String,
    },
}

impl Want {
    /// From a grant's digests. A BLAKE3 comes with the SHA-256 it stands
    /// for, or the grant is refused.
    fn of(sha256: Option<String>, blake3: Option<String>) -> Result<Want, TransferError> {
        match (blake3, sha256) {
            (Some(blake3), Some(sha256)) => Ok(Want::Blake3 { blake3, sha256 }),
            (Some(_), None) => {
                Err("the server named a BLAKE3 without the SHA-256 it verified".into())
            }
            (None, sha256) => Ok(Want::Sha256(sha256)),
        }
    }

    fn check(&self) -> Check {
        match self {
            Want::Sha256(_) => Check::Sha256,
            Want::Blake3 { .. } => Check::Blake3,
        }
    }

    /// The digest the bytes must have, when one is known.
    fn digest(&self) -> Option<&str> {
        match self {
            Want::Sha256(sha256) => sha256.as_deref(),
            Want::Blake3 { blake3, .. } => Some(blake3),
        }
    }
}

/// What the download's writer is handed.
enum Write {
    /// The next bytes.
    Chunk(bytes::Bytes),
    /// Empty the file and start again.
    Restart,
}

/// Where a download goes: a blocking thread writes the chunks to the file
/// and another hashes them, so the connection is read while the disk is
/// written.
/// At most [`SINK_CHUNKS`] chunks wait for it.
///
/// The file is not flushed to disk. An input lives in its attempt's
/// workspace, which no crash of the machine hands to anything again: an
/// attempt whose container never started is discarded with its workspace,
/// and one that started is reported as Docker recorded its end, a new
/// attempt downloading afresh. Flushing would only make the download wait
/// for the disk to write what the page cache already holds (a plain
/// `curl -o` does not wait for it either); what the task reads is checked
/// against the SHA-256 as it arrives.
struct Sink {
    /// How the bytes are hashed.
    check: Check,
    tx: tokio::sync::mpsc::Sender<Write>,
    done: Option<tokio::task::JoinHandle<Result<(u64, String), TransferError>>>,
    /// Bytes handed to the writer.
    written: u64,
    /// Why the writer stopped, once it did.
    broken: Option<TransferError>,
}

impl Sink {
    fn start(file: std::fs::File, check: Check) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(SINK_CHUNKS);
        let done = tokio::task::spawn_blocking(move || write_download(file, rx, check));
        Sink {
            check,
            tx,
            done: Some(done),
            written: 0,
            broken: None,
        }
    }

    async fn send(&mut self, w: Write) -> Result<(), TransferError> {
        if self.tx.send(w).await.is_ok() {
            return Ok(());
        }
        let e = match self.done.take() {
            Some(done) => match done.await {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => "writing the file stopped".to_string(),
                Err(e) => format!("writing the file: {e}"),
            },
            None => "writing the file stopped".to_string(),
        };
        self.broken = Some(e.clone());
        Err(e)
    }

    async fn write(&mut self, chunk: bytes::Bytes) -> Result<(), TransferError> {
        let n = chunk.len() as u64;
        self.send(Write::Chunk(chunk)).await?;
        self.written += n;
        Ok(())
    }

    async fn restart(&mut self) -> Result<(), TransferError> {
        self.send(Write::Restart).await?;
        self.written = 0;
        Ok(())
    }

    /// Waits for the writer to write the last chunk; returns how many
    /// bytes it wrote and their digest ([`Sink::check`]'s, in hex).
    async fn finish(self) -> Result<(u64, String), TransferError> {
        let Sink {
            tx, done, broken, ..
        } = self;
        drop(tx);
        if let Some(e) = broken {
            return Err(e);
        }
        match done {
            Some(done) => done
                .await
                .unwrap_or_else(|e| Err(format!("writing the file: {e}"))),
            None => Err("writing the file stopped".into()),
        }
    }
}

/// The writer of a [`Sink`], on a blocking thread: writes what `rx` hands
/// it until it closes, while a thread of its own hashes the same chunks
/// ([`Hashing`]): hashing costs about as much CPU as writing to the page
/// cache, and done one after the other on one thread they were the
/// download's slowest step.
fn write_download(
    mut file: std::fs::File,
    mut rx: tokio::sync::mpsc::Receiver<Write>,
    check: Check,
) -> Result<(u64, String), TransferError> {
    use std::io::{Seek, Write as _};
    let writing = |e: std::io::Error| format!("writing the file: {e}");
    // The chunks come gathered (SINK_CHUNK_BYTES) and are written as they
    // are: no buffer copies them once more.
    let mut hashing = Hashing::start(check);
    let mut written = 0u64;
    while let Some(w) = rx.blocking_recv() {
        match w {
            Write::Chunk(chunk) => {
                let n = chunk.len() as u64;
                hashing.update(chunk.clone());
                file.write_all(&chunk).map_err(writing)?;
                written += n;
            }
            Write::Restart => {
                file.set_len(0).map_err(writing)?;
                file.rewind().map_err(writing)?;
                hashing.restart();
                written = 0;
            }
        }
    }
    Ok((written, hashing.finish()?))
}

/// A hash of a download's bytes, of either [`Check`].
enum Hasher {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    fn new(check: Check) -> Self {
        match check {
            Check::Sha256 => Hasher::Sha256(Sha256::new()),
            Check::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// Starts over, as a new hasher of the same kind.
    fn restart(&mut self) {
        *self = match self {
            Hasher::Sha256(_) => Hasher::new(Check::Sha256),
            Hasher::Blake3(_) => Hasher::new(Check::Blake3),
        };
    }

    /// The digest in lower-case hex.
    fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }
}

/// A digest computed on a thread of its own from the chunks handed to it
/// (at most [`SINK_CHUNKS`] wait), or on the caller's thread when no
/// thread could be started.
enum Hashing {
    /// Chunks go to the thread; `None` starts over.
    Thread {
        chunks: std::sync::mpsc::SyncSender<Option<bytes::Bytes>>,
        digest: std::thread::JoinHandle<String>,
    },
    /// Hashed where they are handed over.
    Here(Hasher),
}

impl Hashing {
    fn start(check: Check) -> Self {
        let (chunks, rx) = std::sync::mpsc::sync_channel::<Option<bytes::Bytes>>(SINK_CHUNKS);
        let spawned = std::thread::Builder::new()
            .name("download-hash".into())
            .spawn(move || {
                let mut hasher = Hasher::new(check);
                for chunk in rx {
                    match chunk {
                        Some(chunk) => hasher.update(&chunk),
                        None => hasher.restart(),
                    }
                }
                hasher.finish()
            });
        match spawned {
            Ok(digest) => Hashing::Thread { chunks, digest },
            Err(e) => {
                tracing::debug!(error = %e, "no thread to hash the download on; hashing as it is written");
                Hashing::Here(Hasher::new(check))
            }
        }
    }

    fn update(&mut self, chunk: bytes::Bytes) {
        match self {
            // The thread ends only when the sender is dropped, so the send
            // cannot fail while `self` lives.
            Hashing::Thread { chunks, .. } => {
                let _ = chunks.send(Some(chunk));
            }
            Hashing::Here(hasher) => hasher.update(&chunk),
        }
    }

    fn restart(&mut self) {
        match self {
            Hashing::Thread { chunks, .. } => {
                let _ = chunks.send(None);
            }
            Hashing::Here(hasher) => hasher.restart(),
        }
    }

    /// The digest of every chunk since the last restart, in hex.
    fn finish(self) -> Result<String, TransferError> {
        match self {
            Hashing::Thread { chunks, digest } => {
                drop(chunks);
                digest
                    .join()
                    .map_err(|_| "hashing the download failed".to_string())
            }
            Hashing::Here(hasher) => Ok(hasher.finish()),
        }
    }
}

/// A transport error in words, with its causes, never the URL (a presigned
/// URL is a credential while it lives).
fn without_url(e: reqwest::Error) -> String {
    use std::error::Error as _;
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
        (Some(c), Some(m)) => format!("the store refused with {status} {c}: {m}"),
        (Some(c), None) => format!("the store refused with {status} {c}"),
        _ => format!("the store refused with {status}"),
    }
}

/// The part size for a file of `size` bytes: `preferred`, or larger when
/// the file would need more than [`protocol::MAX_UPLOAD_PARTS`] parts.
fn part_size(size: u64, preferred: u64) -> u64 {
    let max_parts = u64::from(protocol::MAX_UPLOAD_PARTS);
    let needed = size.div_ceil(max_parts);
    let mib = 1024 * 1024;
    preferred.max(needed.div_ceil(mib) * mib)
}

/// What one PUT sends: `len` bytes of `file` from `offset`, whose SHA-256
/// is `sha256`.
#[derive(Clone, Copy)]
struct Body<'a> {
    file: &'a Arc<std::fs::File>,
    offset: u64,
    len: u64,
    sha256: &'a str,
}

/// Why hashing stopped when the file ended before `size` bytes.
const SHORTER: &str = "the file became shorter while it was uploaded";

/// Hashes `len` bytes of `file` from `offset` on a blocking thread, each
/// buffer read passed to `each`, and returns their SHA-256.
fn hash_blocking(
    file: &std::fs::File,
    offset: u64,
    len: u64,
    mut each: impl FnMut(&[u8]),
) -> Result<String, TransferError> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; HASH_BUFFER.min(usize::try_from(len).unwrap_or(HASH_BUFFER))];
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from(len - done).map_or(buf.len(), |l| l.min(buf.len()));
        match file.read_at(&mut buf[..want], offset + done) {
            Ok(0) => return Err(SHORTER.into()),
            Ok(n) => {
                hasher.update(&buf[..n]);
                each(&buf[..n]);
                done += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the file: {e}")),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The SHA-256 of `len` bytes of `file` from `offset`, hashed on the
/// blocking pool.
async fn hash_range(
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
) -> Result<String, TransferError> {
    tokio::task::spawn_blocking(move || hash_blocking(&file, offset, len, |_| {}))
        .await
        .unwrap_or_else(|e| Err(format!("hashing the file: {e}")))
}

/// Hashes the first `size` bytes of `file` in parts of `part_bytes` on a
/// blocking thread: the answer yields each part's SHA-256 in order, then the
/// whole file's, or the error that stopped it. The thread keeps at most one
/// part ahead of the reader and stops when the answer is dropped.
fn hash_ahead(
    file: Arc<std::fs::File>,
    size: u64,
    part_bytes: u64,
) -> tokio::sync::mpsc::Receiver<Result<String, TransferError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::task::spawn_blocking(move || {
        let mut whole = Sha256::new();
        let mut offset = 0;
        while offset < size {
            let len = part_bytes.min(size - offset);
            let part = hash_blocking(&file, offset, len, |buf| whole.update(buf));
            let failed = part.is_err();
            if tx.blocking_send(part).is_err() || failed {
                return;
            }
            offset += len;
        }
        let _ = tx.blocking_send(Ok(hex::encode(whole.finalize())));
    });
    rx
}

/// Up to `len` bytes of `file` from `offset` (fewer at its end), read on
/// the blocking pool without moving a shared file position.
async fn read_at(file: Arc<std::fs::File>, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
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
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// `len` bytes of `file` from `offset`, as a stream of small chunks.
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
            let buf = read_at(file, offset + sent, (len - sent).min(BUFFER as u64)).await?;
            if buf.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    SHORTER,
                ));
            }
            let n = buf.len() as u64;
            Ok(Some((bytes::Bytes::from(buf), sent + n)))
        }
    })
}

/// A human figure of a byte count: `3.1 KiB`, `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `n` bytes moved in `elapsed`, for the timeline: `1.5 GiB in 3.2 s`.
pub fn summary(n: u64, files: usize, started: Instant) -> String {
    format!(
        "{files} file(s), {} in {:.1} s",
        human_bytes(n),
        started.elapsed().as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_download_that_starts_over_is_written_and_hashed_from_its_new_start() {
        for check in [Check::Sha256, Check::Blake3] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("input");
            let mut sink = Sink::start(std::fs::File::create(&path).unwrap(), check);
            let piece = |b: u8| bytes::Bytes::from(vec![b; SINK_CHUNK_BYTES + 3]);
            for b in 0..(2 * SINK_CHUNKS as u8) {
                sink.write(piece(b)).await.unwrap();
            }
            // The store ignored a range: everything so far is dropped.
            sink.restart().await.unwrap();
            let mut want = Vec::new();
            for b in [7, 8, 9] {
                sink.write(piece(b)).await.unwrap();
                want.extend_from_slice(&piece(b));
            }
            let (written, digest) = sink.finish().await.unwrap();
            assert_eq!(written, want.len() as u64);
            let expected = match check {
                Check::Sha256 => hex::encode(Sha256::digest(&want)),
                Check::Blake3 => blake3::hash(&want).to_hex().to_string(),
            };
            assert_eq!(digest, expected, "{check:?}");
            assert!(
                std::fs::read(&path).unwrap() == want,
                "the file holds other bytes"
            );
        }
    }

    #[test]
    fn a_grant_says_how_the_bytes_are_checked_and_a_blake3_needs_its_sha256() {
        let (sha, b3) = ("a".repeat(64), "b".repeat(64));
        let both = Want::of(Some(sha.clone()), Some(b3.clone())).unwrap();
        assert_eq!(
            (both.check(), both.digest()),
            (Check::Blake3, Some(b3.as_str()))
        );
        let old = Want::of(Some(sha.clone()), None).unwrap();
        assert_eq!(
            (old.check(), old.digest()),
            (Check::Sha256, Some(sha.as_str()))
        );
        let unknown = Want::of(None, None).unwrap();
        assert_eq!((unknown.check(), unknown.digest()), (Check::Sha256, None));
        assert_eq!(
            Want::of(None, Some(b3)).unwrap_err(),
            "the server named a BLAKE3 without the SHA-256 it verified"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_or_missing_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(Arc::default(), PART_BYTES);
        let missing = dir.path().join("missing.pem");
        let err = files.clone().with_ca_file(&missing).unwrap_err();
        assert!(err.contains("missing.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = files.with_ca_file(&empty).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
    }

    #[test]
    fn huge_files_get_larger_parts_so_the_completion_fits_a_frame() {
        assert_eq!(part_size(10, PART_BYTES), PART_BYTES);
        let huge = 1024 * PART_BYTES * 4;
        let p = part_size(huge, PART_BYTES);
        assert!(huge.div_ceil(p) <= u64::from(protocol::MAX_UPLOAD_PARTS));
        assert_eq!(p % (1024 * 1024), 0);
    }

    #[tokio::test]
    async fn parts_are_hashed_in_order_then_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(11 * 1024 * 1024)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let part = 5 * 1024 * 1024;
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let size = data.len() as u64;
        let mut hashes = hash_ahead(Arc::clone(&file), size, part);
        let mut got = Vec::new();
        while let Some(h) = hashes.recv().await {
            got.push(h.unwrap());
        }
        let want: Vec<String> = data
            .chunks(part as usize)
            .chain([&data[..]])
            .map(|c| hex::encode(Sha256::digest(c)))
            .collect();
        assert_eq!(got, want, "three parts, then the whole file");
        assert_eq!(
            hash_range(Arc::clone(&file), part, part).await.unwrap(),
            want[1]
        );
        // Asked for more than the file holds: the file became shorter.
        let mut hashes = hash_ahead(file, size + 1, part);
        assert!(hashes.recv().await.unwrap().is_ok());
        assert!(hashes.recv().await.unwrap().is_ok());
        assert_eq!(hashes.recv().await.unwrap().unwrap_err(), SHORTER);
        assert!(hashes.recv().await.is_none(), "nothing after the error");
    }

    #[tokio::test]
    async fn outputs_that_leave_the_workspace_are_refused_before_any_url_is_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("code");
        std::fs::create_dir_all(path.join("out")).unwrap();
        std::os::unix::fs::symlink("/etc", path.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", path.join("host")).unwrap();
        let root = Root::open(&path, "the workspace").unwrap();
        let files = Files::new(Arc::default(), PART_BYTES);
        let output = |path: &str| TaskOutput {
            name: "o".into(),
            path: path.into(),
        };
        for (rel, says) in [
            ("host", "host leads out of the workspace"),
            ("etc/hostname", "etc/hostname leads out of the workspace"),
            ("missing", "missing does not exist"),
            ("out", "out is not a regular file"),
        ] {
            let e = files
                .upload(Uuid::nil(), 1, &output(rel), &root)
                .await
                .unwrap_err();
            assert!(e.starts_with("output o: ") && e.contains(says), "{e}");
        }
        assert!(
            files.broker().next_message().is_none(),
            "nothing was asked of the server"
        );
        let input = TaskInput {
            name: "etc/x".into(),
            object: "o".into(),
        };
        let e = files
            .download(Uuid::nil(), 1, &input, &root)
            .await
            .unwrap_err();
        assert!(e.contains("etc/x leads out of the workspace"), "{e}");
        assert!(files.broker().next_message().is_none());
    }

    #[tokio::test]
    async fn the_broker_hands_each_answer_to_its_request() {
        let broker = Arc::new(Broker::default());
        let b = Arc::clone(&broker);
        let asked = tokio::spawn(async move {
            b.ask(Uuid::nil(), 1, TransferOp::Download { input: "x".into() })
                .await
        });
        let id = loop {
            if let Some(AgentMessage::TransferRequest(r)) = broker.next_message() {
                break r.id;
            }
            tokio::task::yield_now().await;
        };
        assert!(broker.next_message().is_none());
        broker.rewind();
        assert!(
            broker.next_message().is_some(),
            "sent again after a reconnect"
        );
        broker.answer(TransferGrant {
            id,
            error: Some("no such input".into()),
            ..TransferGrant::default()
        });
        assert_eq!(asked.await.unwrap().unwrap_err(), "no such input");
    }
}
