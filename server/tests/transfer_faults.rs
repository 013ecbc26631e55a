//! The agent's transfer code against faults: the embedded S3 store behind a
//! proxy that breaks connections and refuses requests on purpose. A broken
//! download resumes where it stopped; a failed part is sent again alone; a
//! file that changes or shrinks while it is sent fails its upload and
//! nothing is stored. URLs are signed before each request as the ingress
//! signs them.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly at the first surprise"
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use futures::StreamExt;
use node_agent::transfer::{Broker, Files};
use objects::embedded::{fresh_credentials, Embedded};
use objects::ObjectStore;
use protocol::{AgentMessage, TaskInput, TaskOutput, TransferGrant, TransferOp};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const KEY: &str = "faults/object";
const PART: u64 = 5 * 1024 * 1024;

/// Something done to the file while it is uploaded.
type Hook = Box<dyn FnOnce() + Send>;

/// What the proxy saw and what it should break.
#[derive(Default)]
struct Faults {
    /// Every request: method, whether it asked for a range, part number.
    seen: Vec<(String, bool, Option<u32>)>,
    /// Cut the body of the first GET after this many bytes.
    cut_first_get_after: Option<usize>,
    /// Refuse the first PUT of this part number.
    refuse_part: Option<u32>,
    /// At the first PUT of this part number (`None`: a one-part upload),
    /// run this, then refuse the PUT.
    on_put: Option<(Option<u32>, Hook)>,
    /// How many completions the signer was asked for.
    completions: usize,
    /// Hold the first PUT of part `.0` until a PUT of part `.1` arrives
    /// (at most [`HOLD`]).
    hold_part: Option<(u32, u32)>,
    /// The SHA-256 and BLAKE3 download grants name, as the ingress names
    /// those the server recorded when it verified the object.
    digests: Option<(String, String)>,
    /// Whether that PUT arrived while the first was held.
    overlapped: bool,
    /// PUTs between their arrival and the store's answer, now and at most.
    puts_open: usize,
    most_puts_open: usize,
}

/// How long a held PUT waits for the one it waits for.
const HOLD: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Proxy {
    store: String,
    faults: Arc<Mutex<Faults>>,
    client: reqwest::Client,
}

fn part_number(query: &str) -> Option<u32> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("partNumber="))
        .and_then(|n| n.parse().ok())
}

async fn forward(State(p): State<Proxy>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let ranged = parts.headers.contains_key("range");
    let part = part_number(parts.uri.query().unwrap_or_default());
    let (cut, refuse, hook) = {
        let mut f = p.faults.lock().unwrap();
        f.seen.push((parts.method.to_string(), ranged, part));
        let gets = f.seen.iter().filter(|s| s.0 == "GET").count();
        let cut = if parts.method == "GET" && gets == 1 {
            f.cut_first_get_after
        } else {
            None
        };
        let mut refuse = parts.method == "PUT" && part.is_some() && f.refuse_part == part;
        if refuse {
            f.refuse_part = None;
        }
        let mut hook = None;
        if parts.method == "PUT" && f.on_put.as_ref().is_some_and(|(n, _)| *n == part) {
            hook = f.on_put.take().map(|(_, hook)| hook);
            refuse = true;
        }
        (cut, refuse, hook)
    };
    if let Some(hook) = hook {
        hook();
    }
    if refuse {
        return Response::builder().status(503).body(Body::empty()).unwrap();
    }
    // A PUT is open from its arrival, held or not, to the store's answer.
    let put = parts.method == "PUT";
    if put {
        let mut f = p.faults.lock().unwrap();
        f.puts_open += 1;
        f.most_puts_open = f.most_puts_open.max(f.puts_open);
    }
    let held_for = {
        let mut f = p.faults.lock().unwrap();
        match f.hold_part {
            Some((held, until)) if parts.method == "PUT" && part == Some(held) => {
                f.hold_part = None;
                Some(until)
            }
            _ => None,
        }
    };
    if let Some(until) = held_for {
        let since = tokio::time::Instant::now();
        while since.elapsed() < HOLD {
            let arrived = p
                .faults
                .lock()
                .unwrap()
                .seen
                .iter()
                .any(|s| s.0 == "PUT" && s.2 == Some(until));
            if arrived {
                p.faults.lock().unwrap().overlapped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Every header goes on unchanged, `Host` included: it is signed.
    let mut out = p
        .client
        .request(parts.method.clone(), format!("{}{}", p.store, parts.uri))
        .body(reqwest::Body::wrap_stream(body.into_data_stream()));
    for (k, v) in &parts.headers {
        out = out.header(k, v);
    }
    let answer = out.send().await.unwrap();
    if put {
        p.faults.lock().unwrap().puts_open -= 1;
    }
    let mut response = Response::builder().status(answer.status());
    for (k, v) in answer.headers() {
        response = response.header(k, v);
    }
    let mut sent = 0usize;
    let stream = answer.bytes_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        sent += chunk.len();
        match cut {
            Some(limit) if sent > limit => Err(std::io::Error::other("cut on purpose")),
            _ => Ok(chunk),
        }
    });
    response.body(Body::from_stream(stream)).unwrap()
}

/// Signs as the ingress does, for one object.
async fn sign(store: &ObjectStore, faults: &Mutex<Faults>, op: TransferOp) -> TransferGrant {
    match op {
        TransferOp::Secrets => TransferGrant {
            error: Some("these tasks name no secrets".into()),
            ..TransferGrant::default()
        },
        TransferOp::Download { .. } => {
            let info = store.head(KEY).await.unwrap().unwrap();
            let (sha256, blake3) = match faults.lock().unwrap().digests.clone() {
                Some((sha256, blake3)) => (Some(sha256), Some(blake3)),
                None => (info.sha256, None),
            };
            TransferGrant {
                url: Some(store.presign_get(KEY, None).await.unwrap()),
                size: Some(info.size),
                sha256,
                blake3,
                ..TransferGrant::default()
            }
        }
        TransferOp::Upload {
            sha256, parts: 1, ..
        } => {
            let p = store.presign_put(KEY, sha256.as_deref()).await.unwrap();
            TransferGrant {
                url: Some(p.url),
                headers: p.headers,
                ..TransferGrant::default()
            }
        }
        TransferOp::Upload { sha256, .. } => TransferGrant {
            upload_id: Some(store.start_multipart(KEY, sha256.as_deref()).await.unwrap()),
            ..TransferGrant::default()
        },
        TransferOp::UploadPart {
            upload_id,
            part_number,
            sha256,
            ..
        } => {
            let p = store
                .presign_part(KEY, &upload_id, part_number, Some(&sha256))
                .await
                .unwrap();
            TransferGrant {
                url: Some(p.url),
                headers: p.headers,
                ..TransferGrant::default()
            }
        }
        TransferOp::Complete {
            upload_id, parts, ..
        } => {
            faults.lock().unwrap().completions += 1;
            if let Some(id) = upload_id {
                let parts: Vec<_> = parts.into_iter().map(|p| (p.part_number, p.etag)).collect();
                store.complete_multipart(KEY, &id, &parts).await.unwrap();
            }
            TransferGrant::default()
        }
    }
}

struct Rig {
    files: Files,
    faults: Arc<Mutex<Faults>>,
    store: ObjectStore,
    root: tempfile::TempDir,
}

/// The embedded store, the proxy in front of it, and the agent's `Files`
/// with a signer answering its requests.
async fn rig() -> Rig {
    let root = tempfile::tempdir().unwrap();
    let (access, secret) = fresh_credentials();
    let embedded = Embedded::new(&root.path().join("objects"), "unidesk", &access, secret).unwrap();
    let store_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let store_url = format!("http://{}", store_listener.local_addr().unwrap());
    let proxy_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy_listener.local_addr().unwrap());
    // The server calls the store directly; URLs name the proxy.
    let mut config = embedded.client_config(&store_url, Duration::from_secs(60));
    config.public_endpoint = Some(proxy_url);
    let store = ObjectStore::new(&config).unwrap();
    tokio::spawn(embedded.run(store_listener, std::future::pending()));

    let faults = Arc::new(Mutex::new(Faults::default()));
    let proxy = Proxy {
        store: store_url,
        faults: Arc::clone(&faults),
        client: reqwest::Client::new(),
    };
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    tokio::spawn(async move { axum::serve(proxy_listener, app).await });

    let broker = Arc::new(Broker::default());
    let signer = Arc::clone(&broker);
    let (signing, seen) = (store.clone(), Arc::clone(&faults));
    tokio::spawn(async move {
        loop {
            signer.wanted().await;
            while let Some(AgentMessage::TransferRequest(r)) = signer.next_message() {
                let grant = sign(&signing, &seen, r.op).await;
                signer.answer(TransferGrant { id: r.id, ..grant });
            }
        }
    });
    std::fs::create_dir_all(root.path().join("work")).unwrap();
    Rig {
        files: Files::new(broker, PART),
        faults,
        store,
        root,
    }
}

/// Writes `content` to `model.bin` in the workspace and uploads it as
/// output `model`; checks the size and SHA-256 the upload reports.
async fn upload_model(rig: &Rig, content: &[u8]) {
    let work = rig.root.path().join("work");
    std::fs::write(work.join("model.bin"), content).unwrap();
    let output = TaskOutput {
        name: "model".into(),
        path: "model.bin".into(),
    };
    let up = rig
        .files
        .upload(Uuid::nil(), 1, &output, &workspace(&work))
        .await
        .unwrap();
    assert_eq!(
        (up.size, up.sha256.as_str()),
        (content.len() as u64, sha(content).as_str())
    );
}

/// Downloads output `model` to `copy/model.bin` in the workspace: what
/// the download reported, or why it failed.
async fn try_download_model(rig: &Rig) -> Result<node_agent::transfer::Moved, String> {
    let work = rig.root.path().join("work");
    let input = TaskInput {
        name: "copy/model.bin".into(),
        object: "model".into(),
    };
    rig.files
        .download(Uuid::nil(), 1, &input, &workspace(&work))
        .await
}

/// Downloads output `model` to `copy/model.bin` in the workspace; checks
/// that the file there is `content` and that the download hashed it so.
async fn download_model(rig: &Rig, content: &[u8]) {
    let work = rig.root.path().join("work");
    let down = try_download_model(rig).await.unwrap();
    assert_eq!(down.sha256, sha(content));
    assert!(
        std::fs::read(work.join("copy/model.bin")).unwrap() == content,
        "the stored object is the file"
    );
}

/// The part numbers of the PUTs the proxy saw (`None`: a one-part upload),
/// in the order they arrived.
fn puts(rig: &Rig) -> Vec<Option<u32>> {
    let f = rig.faults.lock().unwrap();
    f.seen
        .iter()
        .filter(|s| s.0 == "PUT")
        .map(|s| s.2)
        .collect()
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn data(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test]
async fn a_failed_part_is_sent_again_alone_and_a_broken_download_resumes_where_it_stopped() {
    let rig = rig().await;
    let content = data(2 * PART + 4321);
    rig.faults.lock().unwrap().refuse_part = Some(2);
    upload_model(&rig, &content).await;
    // Two parts go at a time: part 3 may go between part 2's tries.
    let mut puts = puts(&rig);
    puts.sort_unstable();
    assert_eq!(
        puts,
        [Some(1), Some(2), Some(2), Some(3)],
        "only part 2 went twice"
    );

    rig.faults.lock().unwrap().cut_first_get_after = Some(3 * 1024 * 1024);
    download_model(&rig, &content).await;
    let gets: Vec<_> = {
        let f = rig.faults.lock().unwrap();
        f.seen
            .iter()
            .filter(|s| s.0 == "GET")
            .map(|s| s.1)
            .collect()
    };
    assert_eq!(
        gets,
        [false, true],
        "the second GET asked for the rest only"
    );
}

#[tokio::test]
async fn a_download_checked_by_its_blake3_resumes_where_it_stopped_and_refuses_other_bytes() {
    let rig = rig().await;
    let content = data(2 * PART + 777);
    upload_model(&rig, &content).await;
    rig.faults.lock().unwrap().digests =
        Some((sha(&content), blake3::hash(&content).to_hex().to_string()));
    rig.faults.lock().unwrap().cut_first_get_after = Some(3 * 1024 * 1024);
    // Checked against the BLAKE3 across both GETs; the SHA-256 reported
    // is the one the grant names for those bytes.
    download_model(&rig, &content).await;

    // The grant names the BLAKE3 of other bytes: the bytes the store
    // sends are refused, naming the digest that did not match.
    let mut other = content.clone();
    other[PART as usize] ^= 1;
    let wrong = blake3::hash(&other).to_hex().to_string();
    rig.faults.lock().unwrap().digests = Some((sha(&content), wrong.clone()));
    let e = try_download_model(&rig).await.unwrap_err();
    assert!(
        e.contains("arrived corrupted: its BLAKE3 is")
            && e.contains(&format!("the server verified {wrong}")),
        "{e}"
    );
}

#[tokio::test]
async fn an_upload_sends_two_parts_at_a_time_never_more_and_stores_them_whole() {
    let rig = rig().await;
    let content = data(5 * PART + 99);
    // Part 1 is held at the store's door until part 2 arrives: an agent
    // sending one part at a time would wait out the hold instead.
    rig.faults.lock().unwrap().hold_part = Some((1, 2));
    upload_model(&rig, &content).await;
    {
        let f = rig.faults.lock().unwrap();
        assert!(f.overlapped, "part 2 was not sent while part 1 was open");
        assert_eq!(f.most_puts_open, 2, "parts open at once");
    }
    let mut puts = puts(&rig);
    puts.sort_unstable();
    assert_eq!(
        puts,
        (1..=6).map(Some).collect::<Vec<_>>(),
        "each part once"
    );
    download_model(&rig, &content).await;
}

#[tokio::test]
async fn a_part_refused_every_time_fails_the_upload_saying_which() {
    let rig = rig().await;
    let work = rig.root.path().join("work");
    std::fs::write(work.join("a.bin"), data(PART + 1)).unwrap();
    let output = TaskOutput {
        name: "a".into(),
        path: "a.bin".into(),
    };
    // The proxy refuses part 2 once per arming; arm it before every try.
    // This re-arming period is no wait for a condition: it keeps the fault
    // set faster than the uploader's backoff between tries.
    let faults = Arc::clone(&rig.faults);
    let rearm = tokio::spawn(async move {
        loop {
            faults.lock().unwrap().refuse_part = Some(2);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let e = rig
        .files
        .upload(Uuid::nil(), 1, &output, &workspace(&work))
        .await
        .unwrap_err();
    rearm.abort();
    assert!(
        e.starts_with("output a: part 2 of 2: failed 5 times"),
        "{e}"
    );
    assert!(e.contains("503"), "{e}");
}

/// Uploads `content` as `name`, running `hook` at the first PUT of part
/// `part` (`None`: a one-part upload) and refusing that PUT; returns the
/// upload's error and the parts PUT, in order.
async fn upload_changing(
    content: &[u8],
    part: Option<u32>,
    hook: impl FnOnce(&std::path::Path) + Send + 'static,
) -> (String, Vec<Option<u32>>, Rig) {
    let rig = rig().await;
    let work = rig.root.path().join("work");
    let path = work.join("out.bin");
    std::fs::write(&path, content).unwrap();
    rig.faults.lock().unwrap().on_put = Some((part, Box::new(move || hook(&path))));
    let output = TaskOutput {
        name: "out".into(),
        path: "out.bin".into(),
    };
    let e = rig
        .files
        .upload(Uuid::nil(), 1, &output, &workspace(&work))
        .await
        .unwrap_err();
    (e, puts(&rig), rig)
}

/// Flips the byte at `offset` of the file at `path`, keeping its size.
fn flip(path: &std::path::Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], offset).unwrap();
}

/// Nothing was completed, and the store holds no object.
async fn nothing_stored(rig: &Rig) {
    assert_eq!(rig.faults.lock().unwrap().completions, 0, "no completion");
    assert_eq!(rig.store.head(KEY).await.unwrap(), None, "no object");
}

#[tokio::test]
async fn a_file_changed_while_its_parts_are_sent_fails_at_once_and_nothing_is_stored() {
    let content = data(2 * PART + 4321);
    let (e, puts, rig) = upload_changing(&content, Some(2), |path| flip(path, PART + 77)).await;
    assert!(
        e.starts_with("output out: part 2 of 3: the file changed while it was uploaded"),
        "{e}"
    );
    // Part 3 may have gone beside part 2; nothing went twice.
    let mut parts = puts.clone();
    parts.sort_unstable();
    parts.dedup();
    assert!(
        parts == [Some(1), Some(2)] || parts == [Some(1), Some(2), Some(3)],
        "{puts:?}"
    );
    assert_eq!(
        puts.len(),
        parts.len(),
        "part 2 was not tried again: {puts:?}"
    );
    nothing_stored(&rig).await;
}

#[tokio::test]
async fn a_file_changed_while_it_is_sent_in_one_put_fails_and_nothing_is_stored() {
    let content = data(PART / 2);
    let (e, puts, rig) = upload_changing(&content, None, |path| flip(path, 12345)).await;
    assert!(
        e.starts_with("output out: the file changed while it was uploaded"),
        "{e}"
    );
    assert_eq!(puts, [None]);
    nothing_stored(&rig).await;
}

#[tokio::test]
async fn a_file_that_shrinks_while_it_is_sent_fails_and_nothing_is_stored() {
    let content = data(2 * PART + 4321);
    let (e, _, rig) = upload_changing(&content, Some(2), |path| {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(PART + 10).unwrap();
    })
    .await;
    assert!(
        e.starts_with("output out: part 2 of 3: the file became shorter while it was uploaded"),
        "{e}"
    );
    nothing_stored(&rig).await;
}

/// The work directory, held open as the agent holds a workspace.
fn workspace(path: &std::path::Path) -> node_agent::beneath::Root {
    node_agent::beneath::Root::open(path, "the workspace").unwrap()
}
