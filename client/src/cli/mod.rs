//! The user commands of `unidesk` (and of the standalone `unidesk-cli`):
//! clap definitions and what each command does. [`Command`] is flattened
//! into the server binary's own command line; [`run`] runs one and
//! returns the exit status it means ([`crate::error`]).

/// `println!` that ends the command quietly when standard output's reader
/// has gone ([`out`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::out(format!("{}\n", format_args!($($arg)*)).as_bytes())
    };
}

mod files;
mod show;
mod submit;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::api::Client;
use crate::config::{self, Settings};
use crate::error::{Error, Result};

pub use files::{ArtifactsCommand, PutArgs};
pub use submit::SubmitArgs;

/// Where the server is, for one command: flags over `UNIDESK_SERVER` /
/// `UNIDESK_CA_FILE` over the configuration file.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// The server's address (default: UNIDESK_SERVER, else the one
    /// `unidesk login` saved).
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// A PEM file of the private CA that signed the server's certificate.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

impl Conn {
    /// The settings these flags, the environment and the file make.
    ///
    /// # Errors
    /// [`Error::Usage`] when no server is known.
    pub fn settings(&self) -> Result<Settings> {
        Settings::resolve(
            &config::path()?,
            self.server.as_deref(),
            self.ca_file.as_deref(),
        )
    }

    /// A client signed in with the token.
    ///
    /// # Errors
    /// [`Error::Usage`] when no server or no token is known.
    pub fn client(&self) -> Result<Client> {
        let settings = self.settings()?;
        if settings.token.is_none() {
            return Err(Error::Usage(
                "not signed in: run `unidesk login`, or set UNIDESK_TOKEN".into(),
            ));
        }
        Client::new(&settings)
    }
}

/// `--json` of a read command.
#[derive(Debug, Clone, Copy, Args)]
pub struct Output {
    /// Print JSON (what the API answered) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The user commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Save the server's address and your token (mode 0600 in your
    /// configuration directory).
    Login(show::LoginArgs),
    /// Who the token belongs to, on which server.
    Whoami {
        /// Where the server is.
        #[command(flatten)]
        conn: Conn,
        /// How to print.
        #[command(flatten)]
        out: Output,
    },
    /// Run a command on the platform: the code is this checkout's HEAD
    /// commit, which must be pushed.
    Submit(Box<SubmitArgs>),
    /// List tasks, newest first.
    Tasks(show::TasksArgs),
    /// One task: its state, attempts, node, why it waits or ended.
    Task {
        /// The task's id.
        id: uuid::Uuid,
        /// Where the server is.
        #[command(flatten)]
        conn: Conn,
        /// How to print.
        #[command(flatten)]
        out: Output,
    },
    /// A task's output; with -f, as it is produced, until the task ends.
    Logs(show::LogsArgs),
    /// Ask for a task to be cancelled.
    Cancel {
        /// The task's id.
        id: uuid::Uuid,
        /// Where the server is.
        #[command(flatten)]
        conn: Conn,
        /// How to print.
        #[command(flatten)]
        out: Output,
    },
    /// The events of the log, oldest first; with -f, live.
    Timeline(show::TimelineArgs),
    /// Your projects; `projects create NAME` makes one (admins only).
    Projects(show::ProjectsArgs),
    /// The compute nodes.
    Nodes {
        /// Where the server is.
        #[command(flatten)]
        conn: Conn,
        /// How to print.
        #[command(flatten)]
        out: Output,
    },
    /// A task's stored outputs.
    Artifacts {
        /// Which.
        #[command(subcommand)]
        command: ArtifactsCommand,
    },
}

/// Runs `command`; returns the exit status it means, having printed any
/// error on standard error.
pub async fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Login(args) => show::login(args).await,
        Command::Whoami { conn, out } => show::whoami(&conn, out).await,
        Command::Submit(args) => submit::run(*args).await,
        Command::Tasks(args) => show::tasks(args).await,
        Command::Task { id, conn, out } => show::task(&conn, id, out).await,
        Command::Logs(args) => show::logs(args).await,
        Command::Cancel { id, conn, out } => show::cancel(&conn, id, out).await,
        Command::Timeline(args) => show::timeline(args).await,
        Command::Projects(args) => show::projects(args).await,
        Command::Nodes { conn, out } => show::nodes(&conn, out).await,
        Command::Artifacts { command } => files::artifacts(command).await,
    };
    finish(result)
}

/// Runs `unidesk objects put`.
pub async fn run_put(args: PutArgs) -> ExitCode {
    finish(files::put(args).await)
}

/// The exit code of a command's result, printing its error.
fn finish(result: Result<u8>) -> ExitCode {
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// Prints completions for `shell` of the command line `command`, whose
/// binary is called `name`.
pub fn completions(shell: clap_complete::Shell, command: &mut clap::Command, name: &str) {
    // Into a buffer first: a closed pipe (`| head`) is no panic.
    let mut script = Vec::new();
    clap_complete::generate(shell, command, name, &mut script);
    out(&script);
}

/// Writes `bytes` to standard output at once. When its reader has gone
/// (`unidesk tasks | head`, `unidesk logs -f | grep -m1 done`), the command
/// ends quietly with status 0, as other command-line tools end, instead of
/// panicking or following a task for output nobody reads; any other
/// failure to write ends it with the error.
pub(crate) fn out(bytes: &[u8]) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to standard output: {e}");
        std::process::exit(1);
    }
}

/// Prints `value` as pretty JSON on standard output.
pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Other(e.to_string()))?;
    outln!("{text}");
    Ok(())
}

/// Prints rows as a table with a heading, columns padded to their widest
/// cell (the last column is not padded).
pub(crate) fn print_table(heading: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = heading.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        outln!("{}", text.join("  ").trim_end());
    };
    line(heading.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// The exit status a finished task means: 0 when it succeeded, its own
/// exit code when it failed with one (1 to 255), 1 otherwise.
pub fn task_exit_status(task: &crate::types::Task) -> u8 {
    match task.state.as_str() {
        "succeeded" => 0,
        "failed" => task
            .exit_code
            .and_then(|c| u8::try_from(c).ok())
            .filter(|c| *c != 0)
            .unwrap_or(1),
        _ => 1,
    }
}
