//! Host SSH: an admin's emergency command, run over SSH from the agent to
//! the machine it runs on.
//!
//! Nodes have no public address, so the server cannot reach a node's host;
//! the agent can. It runs inside WSL or a container on that host, and with
//! `--host-ssh user@host[:port]` (and usually `--host-ssh-key`) it runs the
//! system `ssh` client to it. This is for probes and repairs, never for
//! tasks: each command has a hard time limit (the client is killed), an
//! output cap (64 KiB; the rest is counted and dropped), and never blocks
//! anything else the agent does (each runs in a task of its own, at most
//! [`MAX_RUNNING`] at once).
//!
//! A time limit that kills the SSH client closes the connection; what the
//! remote command does then is up to the host (on a POSIX host without a
//! terminal, a command that never writes may run on until it ends).
//!
//! Host keys: with `--host-ssh-known-hosts` the host must already be in
//! that file (`StrictHostKeyChecking=yes`); without it, the agent keeps its
//! own file in its work directory and trusts the key it sees first
//! (`accept-new`), refusing a changed key afterwards.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use protocol::{HostSsh, HostSshResult, MAX_FRAME_BYTES, MAX_HOST_SSH_OUTPUT_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use uuid::Uuid;

use crate::supervisor::RecentSet;

/// The most host commands running at once on one node.
pub const MAX_RUNNING: usize = 4;

/// The longest wait for the SSH connection itself.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long output is still read after the process ended or was killed: a
/// child it left behind may hold its pipes open.
const DRAIN: Duration = Duration::from_secs(1);

/// How many handled request ids are remembered, so a resent command does
/// not run twice.
const SEEN_REQUESTS: usize = 1024;

/// The error an agent started without `--host-ssh` answers with.
pub const NOT_CONFIGURED: &str =
    "this node has no host SSH target configured; start the agent with --host-ssh";

/// Where to SSH to: `user@host` or `user@host:port` (`user@[v6]:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The remote user.
    pub user: String,
    /// The host name or address.
    pub host: String,
    /// The SSH port.
    pub port: u16,
}

/// A `--host-ssh` value that is not `user@host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host SSH target {0:?} must be user@host or user@host:port")]
pub struct TargetError(String);

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || TargetError(text.to_string());
        let (user, rest) = text.trim().split_once('@').ok_or_else(bad)?;
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        let port = match port {
            None => 22,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?,
        };
        let plain = |s: &str| {
            !s.is_empty()
                && !s.starts_with('-')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-:%".contains(&b))
        };
        if !plain(user) || user.contains(':') || !plain(host) {
            return Err(bad());
        }
        Ok(Target {
            user: user.to_string(),
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

/// How to reach the host, checked at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where to connect.
    pub target: Target,
    /// The private key to log in with; ssh's defaults without one.
    pub identity: Option<PathBuf>,
    /// The known-hosts file.
    pub known_hosts: PathBuf,
    /// Whether `known_hosts` must already hold the host's key (`true`), or
    /// the first key seen is trusted and kept there (`false`).
    pub strict_host_keys: bool,
    /// The SSH client program.
    pub program: PathBuf,
}

impl Config {
    /// A configuration for `target`. Without `known_hosts`, the agent's own
    /// file `host_ssh_known_hosts` in `work_dir` is used and the first key
    /// seen is trusted.
    pub fn new(
        target: Target,
        identity: Option<PathBuf>,
        known_hosts: Option<PathBuf>,
        work_dir: &Path,
    ) -> Self {
        let strict_host_keys = known_hosts.is_some();
        Config {
            target,
            identity,
            known_hosts: known_hosts.unwrap_or_else(|| work_dir.join("host_ssh_known_hosts")),
            strict_host_keys,
            program: PathBuf::from("ssh"),
        }
    }

    /// The `ssh` invocation for `remote` with at most `limit` to connect.
    pub fn command(&self, remote: &str, limit: Duration) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.program);
        let option = |c: &mut tokio::process::Command, o: String| {
            c.arg("-o").arg(o);
        };
        option(&mut c, "BatchMode=yes".into());
        option(
            &mut c,
            format!(
                "ConnectTimeout={}",
                limit.min(CONNECT_TIMEOUT).as_secs().max(1)
            ),
        );
        option(
            &mut c,
            format!(
                "StrictHostKeyChecking={}",
                if self.strict_host_keys {
                    "yes"
                } else {
                    "accept-new"
                }
            ),
        );
        option(
            &mut c,
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
        );
        option(&mut c, "GlobalKnownHostsFile=/dev/null".into());
        option(&mut c, "ServerAliveInterval=5".into());
        option(&mut c, "ServerAliveCountMax=3".into());
        option(&mut c, "LogLevel=ERROR".into());
        if let Some(key) = &self.identity {
            c.arg("-i").arg(key);
            option(&mut c, "IdentitiesOnly=yes".into());
        }
        c.arg("-p").arg(self.target.port.to_string());
        c.arg("-l").arg(&self.target.user);
        c.arg("--").arg(&self.target.host).arg(remote);
        c
    }
}

/// Checks a configuration before the agent declares it: the key can be
/// read and the SSH client runs.
///
/// # Errors
/// Why host SSH cannot work, for a person.
pub fn check(config: &Config) -> Result<(), String> {
    if let Some(key) = &config.identity {
        std::fs::File::open(key)
            .map_err(|e| format!("cannot read the host SSH key {}: {e}", key.display()))?;
    }
    if config.strict_host_keys && !config.known_hosts.is_file() {
        return Err(format!(
            "the known-hosts file {} does not exist",
            config.known_hosts.display()
        ));
    }
    let version = std::process::Command::new(&config.program)
        .arg("-V")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match version {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "--host-ssh needs the OpenSSH client ({}): {e}",
            config.program.display()
        )),
    }
}

/// How one bounded run ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// The exit status; `None` when killed or never started.
    pub exit_code: Option<i32>,
    /// Standard output and error as they came, at most the cap.
    pub output: String,
    /// Whether output beyond the cap was dropped.
    pub truncated: bool,
    /// How many bytes were dropped.
    pub dropped: u64,
    /// Whether the time limit killed it.
    pub timed_out: bool,
    /// How long it ran.
    pub duration: Duration,
    /// Why it did not run.
    pub error: Option<String>,
}

/// Output kept up to a cap; the rest is counted.
#[derive(Debug)]
struct Capped {
    data: Vec<u8>,
    cap: usize,
    dropped: u64,
}

impl Capped {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.data.len());
        let kept = bytes.len().min(room);
        self.data.extend_from_slice(&bytes[..kept]);
        self.dropped += (bytes.len() - kept) as u64;
    }
}

async fn pump(stream: Option<impl AsyncRead + Unpin>, into: &Mutex<Capped>) {
    let Some(mut stream) = stream else { return };
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => into
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(&buf[..n]),
        }
    }
}

/// Runs `command` with stdin closed, killing it after `limit`, keeping at
/// most `cap` bytes of its standard output and error (interleaved as they
/// arrive). Never fails: a process that cannot start is an [`Outcome`]
/// with an `error`.
pub async fn run_bounded(
    mut command: tokio::process::Command,
    limit: Duration,
    cap: usize,
) -> Outcome {
    let program = command.as_std().get_program().to_string_lossy().to_string();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Outcome {
                error: Some(format!("could not start {program}: {e}")),
                ..Outcome::default()
            }
        }
    };
    let output = Mutex::new(Capped {
        data: Vec::new(),
        cap,
        dropped: 0,
    });
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let reading = async {
        tokio::join!(pump(stdout, &output), pump(stderr, &output));
    };
    tokio::pin!(reading);
    let mut read_all = false;
    let deadline = started + limit;
    let status = loop {
        tokio::select! {
            status = child.wait() => break Some(status),
            () = &mut reading, if !read_all => read_all = true,
            () = tokio::time::sleep_until(deadline) => break None,
        }
    };
    let (exit_code, timed_out, error) = match status {
        Some(Ok(status)) => (status.code(), false, None),
        Some(Err(e)) => (None, false, Some(format!("waiting for {program}: {e}"))),
        None => {
            let _ = child.kill().await;
            (None, true, None)
        }
    };
    let duration = started.elapsed();
    if !read_all {
        let _ = tokio::time::timeout(DRAIN, &mut reading).await;
    }
    let (data, dropped) = {
        let mut captured = output.lock().unwrap_or_else(PoisonError::into_inner);
        (std::mem::take(&mut captured.data), captured.dropped)
    };
    let (text, cut) = text(&data, cap);
    Outcome {
        exit_code,
        output: text,
        truncated: dropped > 0 || cut,
        dropped,
        timed_out,
        duration,
        error,
    }
}

/// Bytes as UTF-8 text (invalid sequences replaced, NUL as U+FFFD), cut to
/// `cap` bytes on a character boundary; whether it was cut.
fn text(bytes: &[u8], cap: usize) -> (String, bool) {
    let mut text = String::from_utf8_lossy(bytes).replace('\0', "\u{fffd}");
    if text.len() <= cap {
        return (text, false);
    }
    let mut end = cap;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    (text, true)
}

/// The result frame for `outcome`, with its output cut further if the
/// encoded frame would not fit (control characters grow sixfold in JSON).
pub fn result(id: u64, request_id: Uuid, outcome: Outcome) -> HostSshResult {
    let mut result = HostSshResult {
        id,
        request_id,
        exit_code: outcome.exit_code,
        output: outcome.output,
        truncated: outcome.truncated,
        timed_out: outcome.timed_out,
        duration_ms: u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
        error: outcome.error,
    };
    let budget = MAX_FRAME_BYTES - 4096;
    while protocol::encode(&protocol::AgentMessage::HostSshResult(result.clone())).len() > budget {
        let (cut, _) = text(result.output.as_bytes(), result.output.len() / 2);
        result.output = cut;
        result.truncated = true;
    }
    result
}

/// Where the ids of host command results start: far above the report
/// queue's, which count from 1, so one `received{id}` names one of them.
pub const RESULT_ID_BASE: u64 = 1 << 63;

/// The most results kept while the server has not answered; older ones are
/// dropped (their waiter gave up long ago).
const MAX_UNANSWERED: usize = 64;

/// Results waiting for the server's `received`: sent in every session
/// until answered, like reports (see [`crate::connection::queue`]).
#[derive(Debug)]
pub struct Outbox {
    entries: std::collections::VecDeque<(HostSshResult, bool)>,
    next_id: u64,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            entries: Default::default(),
            next_id: RESULT_ID_BASE,
        }
    }
}

impl Outbox {
    /// Whether `id` is a result's id rather than a report's.
    pub fn owns(id: u64) -> bool {
        id >= RESULT_ID_BASE
    }

    /// Queues a result and gives it the next id.
    pub fn push(&mut self, mut result: HostSshResult) {
        result.id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(RESULT_ID_BASE);
        self.entries.push_back((result, false));
        if self.entries.len() > MAX_UNANSWERED {
            if let Some((old, _)) = self.entries.pop_front() {
                tracing::warn!(request_id = %old.request_id, "dropping an unanswered host command result");
            }
        }
    }

    /// The next result to send in this session; it counts as sent.
    pub fn next_message(&mut self) -> Option<protocol::AgentMessage> {
        let (result, sent) = self.entries.iter_mut().find(|(_, sent)| !*sent)?;
        *sent = true;
        Some(protocol::AgentMessage::HostSshResult(result.clone()))
    }

    /// The server answered `received{id}`; returns whether it was queued.
    pub fn answer(&mut self, id: u64) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(r, _)| r.id != id);
        self.entries.len() != before
    }

    /// A new session: every unanswered result goes out again.
    pub fn rewind(&mut self) {
        for (_, sent) in &mut self.entries {
            *sent = false;
        }
    }

    /// How many results wait for an answer.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Runs host commands as they arrive and sends each result to the channel
/// the connection drains into its report queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Runner {
    config: Option<Arc<Config>>,
    results: mpsc::Sender<HostSshResult>,
    seen: Arc<Mutex<RecentSet<Uuid>>>,
    slots: Arc<Semaphore>,
}

impl Runner {
    /// A runner for `config` (`None`: this node has no host SSH target and
    /// every command is answered with [`NOT_CONFIGURED`]).
    pub fn new(config: Option<Config>, results: mpsc::Sender<HostSshResult>) -> Self {
        Runner {
            config: config.map(Arc::new),
            results,
            seen: Arc::new(Mutex::new(RecentSet::new(SEEN_REQUESTS))),
            slots: Arc::new(Semaphore::new(MAX_RUNNING)),
        }
    }

    /// Whether a target is configured, as the hello declares.
    pub fn configured(&self) -> bool {
        self.config.is_some()
    }

    /// Starts `request` in a task of its own; a request handled before is
    /// ignored. Returns at once.
    pub fn handle(&self, request: HostSsh) {
        let request_id = request.request_id;
        let fresh = self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(request_id);
        if !fresh {
            tracing::debug!(%request_id, "host command already handled");
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = me.run(&request).await;
            tracing::info!(
                %request_id,
                exit_code = ?outcome.exit_code,
                timed_out = outcome.timed_out,
                dropped = outcome.dropped,
                error = ?outcome.error,
                "host command ended"
            );
            // The connection gives the result its report id.
            let _ = me.results.send(result(0, request_id, outcome)).await;
        });
    }

    async fn run(&self, request: &HostSsh) -> Outcome {
        let refused = |error: String| Outcome {
            error: Some(error),
            ..Outcome::default()
        };
        let Some(config) = &self.config else {
            return refused(NOT_CONFIGURED.into());
        };
        let Ok(_slot) = self.slots.try_acquire() else {
            return refused(format!(
                "{MAX_RUNNING} host commands are already running on this node; try again when one has ended"
            ));
        };
        if request.command.trim().is_empty() || request.command.contains('\0') {
            return refused("the command is empty or holds a NUL character".into());
        }
        let limit =
            Duration::from_secs(request.timeout_s.clamp(1, protocol::MAX_HOST_SSH_TIMEOUT_S));
        let cap = usize::try_from(request.output_limit)
            .unwrap_or(usize::MAX)
            .min(MAX_HOST_SSH_OUTPUT_BYTES);
        tracing::info!(
            request_id = %request.request_id,
            target = %config.target,
            timeout_s = limit.as_secs(),
            "running a host command over SSH"
        );
        run_bounded(config.command(&request.command, limit), limit, cap).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn targets_are_user_at_host_with_an_optional_port() {
        let t: Target = "admin@192.168.65.254".parse().unwrap();
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port),
            ("admin", "192.168.65.254", 22)
        );
        let t: Target = "me@host.docker.internal:2222".parse().unwrap();
        assert_eq!(t.port, 2222);
        let t: Target = "me@[fe80::1]:22".parse().unwrap();
        assert_eq!(t.host, "fe80::1");
        assert_eq!(t.to_string(), "me@[fe80::1]:22");
        for bad in [
            "host",
            "@host",
            "me@",
            "me@host:0",
            "me@host:x",
            "me@-oProxyCommand=x",
            "-x@h",
            "me@h st",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_ssh_invocation_is_batch_mode_with_the_key_port_and_known_hosts() {
        let config = Config::new(
            "me@h:2222".parse().unwrap(),
            Some("/k/id".into()),
            None,
            Path::new("/work"),
        );
        let c = config.command("echo hi", Duration::from_secs(3));
        let args: Vec<String> = c
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().to_string())
            .collect();
        let joined = args.join(" ");
        for part in [
            "-o BatchMode=yes",
            "-o ConnectTimeout=3",
            "-o StrictHostKeyChecking=accept-new",
            "-o UserKnownHostsFile=/work/host_ssh_known_hosts",
            "-i /k/id",
            "-p 2222",
            "-l me",
            "-- h echo hi",
        ] {
            assert!(joined.contains(part), "{part} missing from {joined}");
        }
        assert_eq!(args.last().map(String::as_str), Some("echo hi"));
        let strict = Config::new(
            "me@h".parse().unwrap(),
            None,
            Some("/etc/kh".into()),
            Path::new("/work"),
        );
        let joined: Vec<String> = strict
            .command("x", Duration::from_secs(60))
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().to_string())
            .collect();
        assert!(joined.contains(&"StrictHostKeyChecking=yes".to_string()));
        assert!(joined.contains(&"ConnectTimeout=10".to_string()));
    }

    #[tokio::test]
    async fn output_and_exit_status_are_captured() {
        let o = run_bounded(
            sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(10),
            1024,
        )
        .await;
        assert_eq!(o.exit_code, Some(3));
        assert!(
            o.output.contains("out\n") && o.output.contains("err\n"),
            "{o:?}"
        );
        assert!(!o.truncated && !o.timed_out && o.error.is_none());
    }

    #[tokio::test]
    async fn output_beyond_the_cap_is_counted_and_dropped() {
        let o = run_bounded(
            sh("head -c 1048576 /dev/zero | tr '\\0' x"),
            Duration::from_secs(20),
            MAX_HOST_SSH_OUTPUT_BYTES,
        )
        .await;
        assert_eq!(o.exit_code, Some(0));
        assert!(o.truncated);
        assert_eq!(o.output.len(), MAX_HOST_SSH_OUTPUT_BYTES);
        assert_eq!(o.dropped, 1_048_576 - MAX_HOST_SSH_OUTPUT_BYTES as u64);
    }

    #[tokio::test]
    async fn the_time_limit_kills_the_process() {
        let mut sleep = tokio::process::Command::new("sleep");
        sleep.arg("30");
        let started = std::time::Instant::now();
        let o = run_bounded(sleep, Duration::from_millis(500), 1024).await;
        assert!(o.timed_out);
        assert_eq!(o.exit_code, None);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // A child left behind holding the pipes does not hold the answer.
        let started = std::time::Instant::now();
        let o = run_bounded(
            sh("echo started; sleep 30"),
            Duration::from_millis(500),
            1024,
        )
        .await;
        assert!(o.timed_out);
        assert!(o.output.contains("started"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_is_an_error_not_a_panic() {
        let o = run_bounded(
            tokio::process::Command::new("/nonexistent/ssh"),
            Duration::from_secs(1),
            1024,
        )
        .await;
        assert!(o.error.unwrap().contains("/nonexistent/ssh"));
    }

    #[test]
    fn a_result_always_fits_in_a_frame() {
        let outcome = Outcome {
            output: "\u{1}".repeat(MAX_HOST_SSH_OUTPUT_BYTES),
            exit_code: Some(0),
            ..Outcome::default()
        };
        let r = result(1, Uuid::nil(), outcome);
        assert!(r.truncated);
        let frame = protocol::encode(&protocol::AgentMessage::HostSshResult(r));
        assert!(frame.len() <= MAX_FRAME_BYTES);
    }

    #[test]
    fn results_are_resent_until_answered_under_ids_of_their_own() {
        let r = |n: u128| result(0, Uuid::from_u128(n), Outcome::default());
        let mut outbox = Outbox::default();
        outbox.push(r(1));
        outbox.push(r(2));
        let first: Vec<u64> = std::iter::from_fn(|| outbox.next_message())
            .map(|m| match m {
                protocol::AgentMessage::HostSshResult(r) => r.id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(first, vec![RESULT_ID_BASE, RESULT_ID_BASE + 1]);
        assert!(first.iter().all(|id| Outbox::owns(*id)) && !Outbox::owns(7));
        assert!(outbox.answer(RESULT_ID_BASE));
        assert!(!outbox.answer(RESULT_ID_BASE));
        assert!(outbox.next_message().is_none());
        outbox.rewind();
        assert!(outbox.next_message().is_some());
        assert_eq!(outbox.len(), 1);
        for n in 0..100 {
            outbox.push(r(n));
        }
        assert_eq!(outbox.len(), MAX_UNANSWERED);
    }

    #[tokio::test]
    async fn an_agent_without_a_target_answers_with_a_clear_error() {
        let (tx, mut rx) = mpsc::channel(4);
        let runner = Runner::new(None, tx);
        assert!(!runner.configured());
        let request = HostSsh {
            request_id: Uuid::from_u128(1),
            command: "uptime".into(),
            timeout_s: 5,
            output_limit: 1024,
        };
        runner.handle(request.clone());
        runner.handle(request);
        let r = rx.recv().await.unwrap();
        assert_eq!(r.error.as_deref(), Some(NOT_CONFIGURED));
        assert_eq!(r.exit_code, None);
        // The same request again is not run twice.
        let again = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(again.is_err(), "{again:?}");
    }
}
