//! `unidesk-s3-bench`: how fast a large file moves through presigned URLs
//! to and from the embedded object store with the agent's code, next to
//! plain `curl` transfers of the same file to the same store and a plain
//! `cp` on the same disk, all in the same run, and how much memory the
//! agent's transfer code needs meanwhile.
//!
//! The store (s3s over s3s-fs) runs in this process. Each agent transfer
//! runs in a child process of its own (this binary again, `transfer …`)
//! using the agent's own code (`node_agent::transfer::Files`): it asks for
//! a URL before each request exactly as an agent does, answered by a
//! signer with the server's logic, and reports its peak resident memory
//! (`VmHWM`). The reference is `curl`: a multipart upload whose parts are
//! each one `curl -T -` of that byte range to a presigned URL (the upload
//! created and completed by the server's own calls, as for the agent), and
//! a `curl -o` download; curl hashes nothing and the store checks no
//! SHA-256 of its bodies. The agent checks its download against the
//! file's BLAKE3, which the signer names as the ingress names the one the
//! server computed when it read the upload back. Each figure is the median of a few rounds, the
//! agent going first every other round and the disk flushed before each
//! transfer: otherwise whoever went second paid for writing back the
//! gigabyte the first had just stored.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use node_agent::transfer::{Broker, Files};
use objects::embedded::{fresh_credentials, Embedded};
use objects::{Config, ObjectStore, Secret};
use protocol::{AgentMessage, TaskInput, TaskOutput, TransferGrant, TransferOp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "unidesk-s3-bench",
    about = "Large-file throughput through presigned URLs"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Step>,
    /// Size of the test file in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Where to write the test file and the store's objects (one disk).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Part size of the upload, in MiB.
    #[arg(long, default_value_t = 64)]
    part_mib: u64,
    /// Rounds of the four transfers; the figures are each one's median.
    /// Every other round the agent goes first, and the disk is flushed
    /// before each transfer, so neither side pays for the other's writes.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

#[derive(Debug, Subcommand)]
enum Step {
    /// One transfer with the agent's code (run by the bench itself).
    Transfer {
        /// `up` or `down`.
        direction: String,
        /// The store's endpoint.
        endpoint: String,
        /// The directory the file is in (or goes to).
        root: PathBuf,
        /// The file's name in `root`.
        file: String,
        /// Part size in bytes.
        part_bytes: u64,
    },
}

/// What one transfer process reports.
#[derive(Debug, Serialize, Deserialize)]
struct Measured {
    seconds: f64,
    bytes: u64,
    sha256: String,
    vmhwm_kib: u64,
    baseline_kib: u64,
    /// CPU time (user + system) the transfer process used.
    cpu_seconds: f64,
}

const KEY: &str = "bench/big.bin";
/// Where the reference upload goes.
const CURL_KEY: &str = "bench/curl.bin";

fn vmhwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time used by this process so far, from `/proc/self/stat` (ticks of
/// 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Answers the agent's requests for URLs as the server does; a download's
/// grant names `verified`, the object's SHA-256 and BLAKE3 as the server
/// would have recorded them when it read the upload back.
async fn sign(
    store: &ObjectStore,
    op: TransferOp,
    verified: Option<&(String, String)>,
) -> Result<TransferGrant, String> {
    let e = |e: objects::ObjectError| e.to_string();
    Ok(match op {
        TransferOp::Secrets => return Err("this benchmark's tasks name no secrets".into()),
        TransferOp::Download { .. } => {
            let info = store.head(KEY).await.map_err(e)?.ok_or("no object")?;
            TransferGrant {
                url: Some(store.presign_get(KEY, None).await.map_err(e)?),
                size: Some(info.size),
                sha256: verified.map(|v| v.0.clone()).or(info.sha256),
                blake3: verified.map(|v| v.1.clone()),
                ..TransferGrant::default()
            }
        }
        TransferOp::Upload {
            sha256, parts: 1, ..
        } => {
            let p = store.presign_put(KEY, sha256.as_deref()).await.map_err(e)?;
            TransferGrant {
                url: Some(p.url),
                headers: p.headers,
                ..TransferGrant::default()
            }
        }
        TransferOp::Upload { sha256, .. } => TransferGrant {
            upload_id: Some(
                store
                    .start_multipart(KEY, sha256.as_deref())
                    .await
                    .map_err(e)?,
            ),
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
                .map_err(e)?;
            TransferGrant {
                url: Some(p.url),
                headers: p.headers,
                ..TransferGrant::default()
            }
        }
        TransferOp::Complete {
            upload_id,
            parts,
            size,
            ..
        } => {
            if let Some(id) = upload_id {
                let parts: Vec<_> = parts.into_iter().map(|p| (p.part_number, p.etag)).collect();
                store
                    .complete_multipart(KEY, &id, &parts)
                    .await
                    .map_err(e)?;
            }
            let info = store.head(KEY).await.map_err(e)?.ok_or("no object")?;
            if info.size != size {
                return Err(format!("stored {} bytes, sent {size}", info.size));
            }
            TransferGrant::default()
        }
    })
}

async fn transfer(
    direction: &str,
    endpoint: &str,
    root: &Path,
    file: &str,
    part_bytes: u64,
) -> anyhow::Result<Measured> {
    let baseline_kib = vmhwm_kib();
    let store = ObjectStore::new(&Config {
        endpoint: Some(endpoint.to_string()),
        public_endpoint: None,
        bucket: "unidesk".into(),
        region: "us-east-1".into(),
        access_key: std::env::var("BENCH_ACCESS_KEY")?,
        secret_key: Secret::new(std::env::var("BENCH_SECRET_KEY")?),
        url_ttl: Duration::from_secs(900),
    })?;
    let verified = std::env::var("BENCH_SHA256")
        .ok()
        .zip(std::env::var("BENCH_BLAKE3").ok());
    let broker = Arc::new(Broker::default());
    let signer = Arc::clone(&broker);
    tokio::spawn(async move {
        loop {
            signer.wanted().await;
            while let Some(AgentMessage::TransferRequest(r)) = signer.next_message() {
                let grant = match sign(&store, r.op, verified.as_ref()).await {
                    Ok(g) => TransferGrant { id: r.id, ..g },
                    Err(error) => TransferGrant {
                        id: r.id,
                        error: Some(error),
                        ..TransferGrant::default()
                    },
                };
                signer.answer(grant);
            }
        }
    });
    let files = Files::new(broker, part_bytes);
    let root = node_agent::beneath::Root::open(root, "the work directory")
        .with_context(|| format!("opening {}", root.display()))?;
    let root = &root;
    let started = Instant::now();
    let moved = match direction {
        "up" => {
            let output = TaskOutput {
                name: "big".into(),
                path: file.into(),
            };
            files.upload(Uuid::nil(), 1, &output, root).await
        }
        "down" => {
            let input = TaskInput {
                name: file.into(),
                object: "big".into(),
            };
            files.download(Uuid::nil(), 1, &input, root).await
        }
        other => bail!("direction {other:?} is neither up nor down"),
    }
    .map_err(|e| anyhow::anyhow!(e))?;
    Ok(Measured {
        seconds: started.elapsed().as_secs_f64(),
        bytes: moved.size,
        sha256: moved.sha256,
        vmhwm_kib: vmhwm_kib(),
        baseline_kib,
        cpu_seconds: cpu_seconds(),
    })
}

/// Writes `mib` MiB of incompressible bytes; returns their SHA-256 and
/// BLAKE3.
async fn make_file(path: &Path, mib: u64) -> anyhow::Result<(String, String)> {
    use rand::RngCore;
    let mut f = tokio::fs::File::create(path).await?;
    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut hash = Sha256::new();
    let mut b3 = blake3::Hasher::new();
    for _ in 0..mib {
        rng.fill_bytes(&mut buf);
        hash.update(&buf);
        b3.update(&buf);
        f.write_all(&buf).await?;
    }
    f.sync_all().await?;
    Ok((
        hex::encode(hash.finalize()),
        b3.finalize().to_hex().to_string(),
    ))
}

fn child(
    direction: &str,
    endpoint: &str,
    root: &Path,
    file: &str,
    part_bytes: u64,
    keys: &(String, Secret),
    (sha256, blake3): (&str, &str),
) -> anyhow::Result<Measured> {
    let out = Command::new(std::env::current_exe()?)
        .args(["transfer", direction, endpoint])
        .arg(root)
        .args([file, &part_bytes.to_string()])
        .env("BENCH_SHA256", sha256)
        .env("BENCH_BLAKE3", blake3)
        .env("BENCH_ACCESS_KEY", &keys.0)
        .env("BENCH_SECRET_KEY", keys.1.expose())
        .output()
        .context("running a transfer process")?;
    if !out.status.success() {
        bail!("{direction}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// PUTs `len` bytes of `file` from `offset` to `url` with `curl -T -`,
/// the bytes fed through its standard input; returns the ETag the store
/// answered.
fn curl_put(url: &str, file: &Path, offset: u64, len: u64) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::process::Stdio;
    let mut curl = Command::new("curl")
        .args(["-sS", "--fail-with-body", "-X", "PUT", "-T", "-"])
        .args(["-H", &format!("Content-Length: {len}"), "-H", "Expect:"])
        .args(["-o", "/dev/null", "-w", "%header{etag}", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running curl")?;
    let mut stdin = curl.stdin.take().context("curl's standard input")?;
    let source = std::fs::File::open(file)?;
    let mut buf = vec![0u8; 1024 * 1024];
    let mut sent = 0u64;
    while sent < len {
        let want = (len - sent).min(buf.len() as u64) as usize;
        let n = source.read_at(&mut buf[..want], offset + sent)?;
        if n == 0 {
            bail!("{} ended early", file.display());
        }
        stdin.write_all(&buf[..n])?;
        sent += n as u64;
    }
    drop(stdin);
    let out = curl.wait_with_output()?;
    if !out.status.success() {
        bail!("curl PUT: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The reference upload: a multipart upload of `file` whose parts are each
/// sent by one `curl`, one after the other. Returns the seconds it took.
async fn curl_up(store: &ObjectStore, file: &Path, size: u64, part: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let id = store.start_multipart(CURL_KEY, None).await?;
    let mut parts = Vec::new();
    let mut offset = 0;
    while offset < size {
        let number = parts.len() as u32 + 1;
        let len = part.min(size - offset);
        let url = store.presign_part(CURL_KEY, &id, number, None).await?.url;
        let file = file.to_path_buf();
        let etag =
            tokio::task::spawn_blocking(move || curl_put(&url, &file, offset, len)).await??;
        parts.push((number, etag));
        offset += len;
    }
    store.complete_multipart(CURL_KEY, &id, &parts).await?;
    let seconds = started.elapsed().as_secs_f64();
    let info = store
        .head(CURL_KEY)
        .await?
        .context("curl's upload is missing")?;
    if info.size != size {
        bail!("curl's upload stored {} of {size} bytes", info.size);
    }
    Ok(seconds)
}

/// The reference download: `curl -o` of object `key` into `dest`. Returns
/// the seconds it took.
async fn curl_down(store: &ObjectStore, key: &str, dest: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let url = store.presign_get(key, None).await?;
    let dest = dest.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--fail", "-o"])
            .arg(&dest)
            .arg(&url)
            .output()
    })
    .await??;
    if !out.status.success() {
        bail!("curl GET: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Flushes every dirty page to disk, so that the next transfer does not
/// pay for writing back what the one before it stored.
fn settle() -> anyhow::Result<()> {
    let status = Command::new("sync").status().context("running sync")?;
    if !status.success() {
        bail!("sync failed");
    }
    Ok(())
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

impl Measured {
    /// The rounds' median time and CPU time, their largest peak memory.
    fn median(rounds: &[Measured]) -> Measured {
        let first = &rounds[0];
        Measured {
            seconds: median(rounds.iter().map(|m| m.seconds).collect()),
            bytes: first.bytes,
            sha256: first.sha256.clone(),
            vmhwm_kib: rounds.iter().map(|m| m.vmhwm_kib).max().unwrap_or(0),
            baseline_kib: first.baseline_kib,
            cpu_seconds: median(rounds.iter().map(|m| m.cpu_seconds).collect()),
        }
    }
}

/// The SHA-256 of the file at `path`, lower-case hex.
fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hash = Sha256::new();
    std::io::copy(&mut f, &mut hash)?;
    Ok(hex::encode(hash.finalize()))
}

fn mib_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / seconds.max(1e-9)
}

async fn bench(cli: &Cli) -> anyhow::Result<()> {
    let dir = match &cli.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir_in(".")?,
    };
    let root = dir.path().join("work");
    std::fs::create_dir_all(&root)?;
    let file = root.join("big.bin");
    eprintln!("writing {} MiB to {}", cli.mib, file.display());
    let (sha, blake3) = make_file(&file, cli.mib).await?;
    let bytes = cli.mib * 1024 * 1024;

    let started = Instant::now();
    let status = Command::new("cp")
        .arg(&file)
        .arg(root.join("copy.bin"))
        .status()?;
    let cp_s = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("cp failed");
    }
    std::fs::remove_file(root.join("copy.bin"))?;

    let keys = fresh_credentials();
    let embedded = Embedded::new(
        &dir.path().join("objects"),
        "unidesk",
        &keys.0,
        keys.1.clone(),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(embedded.run(listener, std::future::pending()));

    let part = cli.part_mib * 1024 * 1024;
    let signer = ObjectStore::new(&Config {
        endpoint: Some(endpoint.clone()),
        public_endpoint: None,
        bucket: "unidesk".into(),
        region: "us-east-1".into(),
        access_key: keys.0.clone(),
        secret_key: keys.1.clone(),
        url_ttl: Duration::from_secs(900),
    })?;
    let agent = |direction: &'static str, file: &'static str| {
        let (endpoint, root, keys) = (endpoint.clone(), root.clone(), keys.clone());
        let (sha, blake3) = (sha.clone(), blake3.clone());
        tokio::task::spawn_blocking(move || {
            child(
                direction,
                &endpoint,
                &root,
                file,
                part,
                &keys,
                (&sha, &blake3),
            )
        })
    };

    let rounds = cli.rounds.max(1);
    let (mut curl_ups, mut curl_downs) = (Vec::new(), Vec::new());
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let agent_first = round % 2 == 1;
        eprintln!(
            "round {} of {rounds}: upload and download, {} first",
            round + 1,
            if agent_first { "the agent" } else { "curl" }
        );
        for agent_turn in [agent_first, !agent_first] {
            settle()?;
            if agent_turn {
                let up = agent("up", "big.bin").await??;
                if up.sha256 != sha {
                    bail!("the upload hashed {} but the file is {sha}", up.sha256);
                }
                ups.push(up);
            } else {
                curl_ups.push(curl_up(&signer, &file, bytes, part).await?);
            }
        }
        for agent_turn in [agent_first, !agent_first] {
            settle()?;
            if agent_turn {
                let down = agent("down", "down.bin").await??;
                if down.sha256 != sha || down.bytes != bytes {
                    bail!("the download does not match the file");
                }
                std::fs::remove_file(root.join("down.bin"))?;
                downs.push(down);
            } else {
                let curl_file = root.join("curl.bin");
                curl_downs.push(curl_down(&signer, KEY, &curl_file).await?);
                if sha256_of(&curl_file)? != sha {
                    bail!("curl's download does not match the file");
                }
                std::fs::remove_file(&curl_file)?;
            }
        }
    }
    let curl_up_s = median(curl_ups.clone());
    let curl_down_s = median(curl_downs.clone());
    let up = Measured::median(&ups);
    let down = Measured::median(&downs);

    println!(
        "medians of {rounds} round(s); peak RSS is the largest of the rounds, CPU time the median"
    );
    println!("| what | MiB | seconds | MiB/s | peak RSS of the transfer process | its CPU time |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| `cp` on the same disk | {} | {cp_s:.2} | {:.0} | | |",
        cli.mib,
        mib_s(bytes, cp_s)
    );
    println!(
        "| `curl` upload, parts of {} MiB | {} | {curl_up_s:.2} | {:.0} | | |",
        cli.part_mib,
        cli.mib,
        mib_s(bytes, curl_up_s)
    );
    println!(
        "| `curl` download | {} | {curl_down_s:.2} | {:.0} | | |",
        cli.mib,
        mib_s(bytes, curl_down_s)
    );
    for (what, m) in [
        ("agent upload, parts of {part} MiB", &up),
        ("agent download", &down),
    ] {
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.1} MiB (at start {:.1} MiB) | {:.1} s |",
            what.replace("{part}", &cli.part_mib.to_string()),
            cli.mib,
            m.seconds,
            mib_s(m.bytes, m.seconds),
            m.vmhwm_kib as f64 / 1024.0,
            m.baseline_kib as f64 / 1024.0,
            m.cpu_seconds
        );
    }
    for (way, curl_s, m, curls, agents) in [
        ("up", curl_up_s, &up, &curl_ups, &ups),
        ("down", curl_down_s, &down, &curl_downs, &downs),
    ] {
        let each: Vec<String> = curls
            .iter()
            .zip(agents.iter())
            .map(|(c, a)| format!("{:.2}", c / a.seconds))
            .collect();
        println!(
            "s3: {way:<4} {} MiB: curl {:.0} MiB/s, agent {:.0} MiB/s, agent/curl {:.2} (rounds: {})",
            cli.mib,
            mib_s(bytes, curl_s),
            mib_s(bytes, m.seconds),
            curl_s / m.seconds,
            each.join(", ")
        );
    }
    println!(
        "s3: peak RSS of the agent's transfer process: up {:.1} MiB, down {:.1} MiB",
        up.vmhwm_kib as f64 / 1024.0,
        down.vmhwm_kib as f64 / 1024.0
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Step::Transfer {
            direction,
            endpoint,
            root,
            file,
            part_bytes,
        }) => {
            let m = transfer(direction, endpoint, root, file, *part_bytes).await?;
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        None => bench(&cli).await,
    }
}
