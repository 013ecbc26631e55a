//! A real `unidesk serve` or `unidesk dev` process for an end-to-end test
//! or a benchmark: started with the caller's flags on a free port, waited
//! for until `/readyz` answers, its admin token read, and stopped cleanly
//! when dropped (SIGTERM, then SIGKILL if it has not exited in time).
//!
//! ```no_run
//! # async fn example(unidesk: &std::path::Path, db_url: &str) {
//! // In a test of the server crate: `env!("CARGO_BIN_EXE_unidesk")`.
//! let server = testkit::process::Launch::serve(unidesk)
//!     .args(["--poll-ms", "100"])
//!     .env("DATABASE_URL", db_url)
//!     .start()
//!     .await
//!     .expect("starting unidesk serve");
//! let projects = server.api().get("/projects").await;
//! # }
//! ```

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::time::Instant;

use crate::wait::free_port;

/// How long a stopped server gets to exit before it is killed.
const STOP_PATIENCE: Duration = Duration::from_secs(20);

/// Why a server process did not come up.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The executable could not be started.
    #[error("starting {exe}: {source}")]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The process exited before it was ready.
    #[error("unidesk {command} exited before it was ready: {status}")]
    Exited {
        /// `serve` or `dev`.
        command: &'static str,
        /// How it exited.
        status: ExitStatus,
    },
    /// The process was not ready in time.
    #[error("unidesk {command} was not ready within {within:?}")]
    NotReady {
        /// `serve` or `dev`.
        command: &'static str,
        /// The time it was given.
        within: Duration,
    },
    /// The admin token file could not be read.
    #[error("reading the admin token: {0}")]
    Token(#[source] std::io::Error),
    /// The log file could not be created.
    #[error("creating the server's log: {0}")]
    Log(#[source] std::io::Error),
    /// Waiting on or signalling the process failed.
    #[error("controlling the server process: {0}")]
    Control(String),
}

/// Which command the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `unidesk serve`: the token is written to a file this handle names.
    Serve,
    /// `unidesk dev`: the token is read from its `admin token:` line.
    Dev,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Serve => "serve",
            Mode::Dev => "dev",
        }
    }
}

/// How to start a server process: the executable, the command and the
/// caller's flags and environment. `--listen` (and for `serve`,
/// `--admin-token-file`) are added by [`Launch::start`].
#[derive(Debug)]
#[must_use]
pub struct Launch {
    exe: PathBuf,
    mode: Mode,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    current_dir: Option<PathBuf>,
    stdout: bool,
    log: Option<PathBuf>,
    ready_within: Duration,
    port: Option<u16>,
}

impl Launch {
    /// `exe serve`, every role in one process.
    pub fn serve(exe: impl Into<PathBuf>) -> Launch {
        Launch::new(exe.into(), Mode::Serve)
    }

    /// `exe dev`: the single-machine platform with its own directory.
    pub fn dev(exe: impl Into<PathBuf>) -> Launch {
        Launch::new(exe.into(), Mode::Dev)
    }

    fn new(exe: PathBuf, mode: Mode) -> Launch {
        Launch {
            exe,
            mode,
            args: Vec::new(),
            env: Vec::new(),
            current_dir: None,
            stdout: false,
            log: None,
            ready_within: Duration::from_secs(120),
            port: None,
        }
    }

    /// Listens on `port` of 127.0.0.1 instead of a free one: a server
    /// started again where its agents will dial it.
    pub fn port(mut self, port: u16) -> Launch {
        self.port = Some(port);
        self
    }

    /// Adds one flag or value.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Launch {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds flags and values.
    pub fn args<I, S>(mut self, args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable of the process.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Launch {
        self.env
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes an environment variable the test process has.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Launch {
        self.env.push((key.as_ref().to_owned(), None));
        self
    }

    /// Runs the process in `dir` (where `dev` keeps `.unidesk`).
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Launch {
        self.current_dir = Some(dir.into());
        self
    }

    /// Lets the process's standard output through (it is discarded by
    /// default, except `dev`'s token line).
    pub fn show_stdout(mut self) -> Launch {
        self.stdout = true;
        self
    }

    /// Writes the process's standard output and error to `path` (a
    /// benchmark keeps the server's log). `dev`'s token is then read from
    /// `.unidesk/admin.token` in its directory instead of its output.
    pub fn log_to(mut self, path: impl Into<PathBuf>) -> Launch {
        self.log = Some(path.into());
        self
    }

    /// How long the process may take to be ready (120 s by default: `dev`
    /// may create a PostgreSQL cluster first).
    pub fn ready_within(mut self, within: Duration) -> Launch {
        self.ready_within = within;
        self
    }

    /// Starts the process on a free port of 127.0.0.1 (or the one given
    /// with [`Launch::port`]) and waits until
    /// `/readyz` answers 200 and the admin token is known.
    ///
    /// # Errors
    /// When the process cannot start, exits, or is not ready in time; it
    /// is stopped before the error returns.
    pub async fn start(self) -> Result<ServerProcess, ProcessError> {
        let port = self.port.unwrap_or_else(free_port);
        let files = tempfile::tempdir().map_err(ProcessError::Token)?;
        let token_file = files.path().join("admin.token");
        let mut command = Command::new(&self.exe);
        command
            .arg(self.mode.name())
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        if self.mode == Mode::Serve {
            command.arg("--admin-token-file").arg(&token_file);
        }
        command.args(&self.args);
        for (key, value) in &self.env {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        command.stdin(Stdio::null());
        let piped = self.mode == Mode::Dev && self.log.is_none();
        if let Some(log) = &self.log {
            let out = std::fs::File::create(log).map_err(ProcessError::Log)?;
            command.stderr(out.try_clone().map_err(ProcessError::Log)?);
            command.stdout(out);
        } else if piped {
            command.stdout(Stdio::piped());
        } else if !self.stdout {
            command.stdout(Stdio::null());
        }
        let token_file = match (&self.log, self.mode) {
            (Some(_), Mode::Dev) => self
                .current_dir
                .clone()
                .unwrap_or_default()
                .join(".unidesk")
                .join("admin.token"),
            _ => token_file,
        };
        let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
            exe: self.exe.clone(),
            source,
        })?;
        let dev_token = match child.stdout.take() {
            Some(stdout) if piped => Some(token_line(stdout, self.stdout)),
            _ => None,
        };
        let mut server = ServerProcess {
            child: Some(child),
            command: self.mode.name(),
            port,
            base: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            http: reqwest::Client::new(),
            _files: files,
        };
        server.token = server
            .await_ready(&token_file, dev_token, self.ready_within)
            .await?;
        Ok(server)
    }
}

/// Reads `dev`'s standard output on a thread, passing it on when asked,
/// and sends the token of its `admin token:` line.
fn token_line(stdout: std::process::ChildStdout, show: bool) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if show {
                println!("{line}");
            }
            if let Some(token) = line.strip_prefix("admin token: ") {
                let _ = tx.send(token.trim().to_string());
            }
        }
    });
    rx
}

/// A running `unidesk serve` or `unidesk dev`; stopped when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
    command: &'static str,
    port: u16,
    base: String,
    token: String,
    http: reqwest::Client,
    /// Holds the admin token file of `serve`.
    _files: tempfile::TempDir,
}

impl ServerProcess {
    async fn await_ready(
        &mut self,
        token_file: &Path,
        dev_token: Option<std::sync::mpsc::Receiver<String>>,
        within: Duration,
    ) -> Result<String, ProcessError> {
        let deadline = Instant::now() + within;
        let mut token = None;
        loop {
            if let Some(status) = self.try_wait()? {
                return Err(ProcessError::Exited {
                    command: self.command,
                    status,
                });
            }
            if token.is_none() {
                token = match &dev_token {
                    Some(rx) => rx.try_recv().ok(),
                    None if token_file.exists() => Some(
                        std::fs::read_to_string(token_file)
                            .map_err(ProcessError::Token)?
                            .trim()
                            .to_string(),
                    )
                    .filter(|t| !t.is_empty()),
                    None => None,
                };
            }
            if let Some(token) = &token {
                let ready = self.http.get(self.url("/readyz")).send().await;
                if ready.is_ok_and(|r| r.status() == 200) {
                    return Ok(token.clone());
                }
            }
            if Instant::now() >= deadline {
                return Err(ProcessError::NotReady {
                    command: self.command,
                    within,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        match &mut self.child {
            Some(child) => child
                .try_wait()
                .map_err(|e| ProcessError::Control(e.to_string())),
            None => Ok(None),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `ws://127.0.0.1:PORT`, where agents connect.
    pub fn ws(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// The port the process listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `base` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The bootstrap admin token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A client of `/api/v1` with the admin token.
    pub fn api(&self) -> Api {
        Api {
            http: self.http.clone(),
            base: format!("{}/api/v1", self.base),
            token: self.token.clone(),
        }
    }

    /// Sends `signal` and waits at most `within` for the process to exit;
    /// kills it after that.
    ///
    /// # Errors
    /// When the process cannot be signalled, or had to be killed.
    pub async fn signal_and_wait(
        &mut self,
        signal: Signal,
        within: Duration,
    ) -> Result<ExitStatus, ProcessError> {
        let mut child = self.signal(signal)?;
        let deadline = Instant::now() + within;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(None) => return Err(self.killed(child, signal, within)),
                Err(e) => return Err(ProcessError::Control(e.to_string())),
            }
        }
    }

    /// Stops the process with SIGTERM and returns how it exited.
    ///
    /// # Errors
    /// As [`ServerProcess::signal_and_wait`].
    pub async fn stop(mut self) -> Result<ExitStatus, ProcessError> {
        self.signal_and_wait(Signal::SIGTERM, STOP_PATIENCE).await
    }

    /// Takes the child and sends it `signal`.
    fn signal(&mut self, signal: Signal) -> Result<Child, ProcessError> {
        let Some(child) = self.child.take() else {
            return Err(ProcessError::Control("already stopped".into()));
        };
        let pid = i32::try_from(child.id())
            .map_err(|e| ProcessError::Control(format!("pid out of range: {e}")))?;
        kill(Pid::from_raw(pid), signal).map_err(|e| ProcessError::Control(e.to_string()))?;
        Ok(child)
    }

    fn killed(&self, mut child: Child, signal: Signal, within: Duration) -> ProcessError {
        let _ = child.kill();
        let _ = child.wait();
        ProcessError::Control(format!(
            "unidesk {} did not exit within {within:?} of {signal}; killed",
            self.command
        ))
    }

    /// Kills the process at once, as a crash or power loss would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    /// SIGTERM, then up to [`STOP_PATIENCE`] for the process to exit,
    /// then SIGKILL. Blocks the thread: a drop cannot await.
    fn drop(&mut self) {
        let Ok(mut child) = self.signal(Signal::SIGTERM) else {
            return;
        };
        let deadline = std::time::Instant::now() + STOP_PATIENCE;
        while std::time::Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.killed(child, Signal::SIGTERM, STOP_PATIENCE);
    }
}

/// A client of a server's `/api/v1` with one bearer token. Its methods
/// panic on a transport error: they are for tests, which stop there.
#[derive(Debug, Clone)]
pub struct Api {
    /// The HTTP client.
    pub http: reqwest::Client,
    /// `http://127.0.0.1:PORT/api/v1`.
    pub base: String,
    /// The bearer token sent with every request.
    pub token: String,
}

impl Api {
    /// The same server with another token.
    pub fn with_token(&self, token: impl Into<String>) -> Api {
        Api {
            token: token.into(),
            ..self.clone()
        }
    }

    /// Sends a request and returns the status and the body, as JSON when
    /// it is, else as a JSON string.
    ///
    /// # Panics
    /// When the request cannot be sent or its body read.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: reading the body: {e}"));
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `GET path`, which must answer 200.
    ///
    /// # Panics
    /// On any other status, with the body.
    pub async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// `POST path` with `body`, which must succeed (2xx).
    ///
    /// # Panics
    /// On any other status, with the body.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        let (status, answer) = self.call(reqwest::Method::POST, path, Some(body)).await;
        assert!(
            (200..300).contains(&status),
            "POST {path}: {status} {answer}"
        );
        answer
    }
}
