//! A process the fault harness starts, kills, freezes and starts again:
//! one role of `unidesk serve` or one `unidesk-agent`, always with the same
//! command line (so the same port and the same work directory), its output
//! appended to one log across its lives.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// One restartable process.
#[derive(Debug)]
pub struct Proc {
    /// What the harness calls it in its report (`ingress`, `real-0`).
    pub name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    log: PathBuf,
    child: Option<Child>,
    frozen: bool,
    /// How many times it was started.
    pub starts: u32,
}

impl Proc {
    /// A process that runs `program` with `args`, writing to `log`; not
    /// started yet.
    pub fn new<I, S>(name: &str, program: impl Into<PathBuf>, args: I, log: &Path) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Proc {
            name: name.to_string(),
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            log: log.to_path_buf(),
            child: None,
            frozen: false,
            starts: 0,
        }
    }

    /// Sets an environment variable for every start.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Proc {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Its log, appended to by every start.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The size of its log now, to read only what a later start writes.
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// Starts the process; it is killed if the harness drops it.
    ///
    /// # Errors
    /// When it is already running or cannot be started.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.running() {
            bail!("{} is already running", self.name);
        }
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let err = out.try_clone().context("cloning the log's handle")?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        self.frozen = false;
        self.starts += 1;
        Ok(())
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether it runs (a frozen process runs).
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// How it exited, once it has and was not reaped before.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Whether it is stopped by [`Proc::freeze`].
    pub fn frozen(&self) -> bool {
        self.frozen
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} is not running", self.name))?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal} to {}", self.name))
    }

    /// `kill -9`, and waits until it is gone.
    ///
    /// # Errors
    /// When it was not running.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGKILL)?;
        if let Some(mut child) = self.child.take() {
            let _ = child.wait().await;
        }
        self.frozen = false;
        Ok(())
    }

    /// `SIGSTOP`: the process stays, with its connections, and does nothing.
    ///
    /// # Errors
    /// When it is not running.
    pub fn freeze(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)?;
        self.frozen = true;
        Ok(())
    }

    /// `SIGCONT` after [`Proc::freeze`].
    ///
    /// # Errors
    /// When it is not running.
    pub fn thaw(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)?;
        self.frozen = false;
        Ok(())
    }

    /// SIGTERM, then up to `within` for it to exit, then SIGKILL; how long
    /// it took and how it exited.
    ///
    /// # Errors
    /// When it had to be killed.
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<(Duration, ExitStatus)> {
        if self.frozen {
            self.thaw()?;
        }
        let asked = Instant::now();
        if self.signal(Signal::SIGTERM).is_err() {
            bail!("{} was not running", self.name);
        }
        let Some(mut child) = self.child.take() else {
            bail!("{} was not running", self.name);
        };
        match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => Ok((asked.elapsed(), status.context("waiting for the process")?)),
            Err(_) => {
                let _ = child.kill().await;
                bail!(
                    "{} did not exit within {within:?} of SIGTERM; killed",
                    self.name
                )
            }
        }
    }

    /// Whether its log has a line containing `needle` written after byte
    /// `from`.
    pub fn logged_since(&self, from: u64, needle: &str) -> bool {
        let Ok(text) = std::fs::read(&self.log) else {
            return false;
        };
        let from = usize::try_from(from).unwrap_or(usize::MAX).min(text.len());
        String::from_utf8_lossy(&text[from..]).contains(needle)
    }

    /// The last `n` lines of its log, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}
