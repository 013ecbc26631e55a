//! `unidesk-agent`: joins this machine to a UniDesk server and runs its
//! tasks in Docker.
//!
//! ```text
//! unidesk-agent --server wss://unidesk.example.org --token-file /etc/unidesk/token \
//!     --label zone=lab --work-dir /var/lib/unidesk-agent
//! ```
//!
//! Exit status 2 means the server refused the token; the agent never exits
//! because of a network error.
//!
//! The work directory holds `git/` (bare mirrors of repositories),
//! `tasks/<task>-<attempt>/` (each attempt's checkout, build context and
//! notes, kept until the server has the attempt's end) and `journal/`
//! (reports the server has not acknowledged yet, sent again after a
//! restart). Keep it on a local disk that survives a reboot.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use node_agent::connection::{self, Agent, Token};
use node_agent::executor::Context;
use node_agent::{disk, docker, host_ssh, resources};
use tracing_subscriber::EnvFilter;

/// The most labels the server accepts from a node.
const MAX_LABELS: usize = 64;

/// Joins this machine to a UniDesk server and runs its tasks in Docker.
#[derive(Parser)]
#[command(name = "unidesk-agent", version, about)]
struct Cli {
    /// The server, as ws://HOST:PORT or wss://HOST:PORT.
    #[arg(long, env = "UNIDESK_SERVER")]
    server: String,
    /// The node token an admin issued for this machine.
    #[arg(long, env = "UNIDESK_NODE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the node token (wins over --token).
    #[arg(long, env = "UNIDESK_NODE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM file of the private CA that signed the server's certificate
    /// (wss); object transfers trust it too, besides the public roots.
    #[arg(long, env = "UNIDESK_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// A label KEY=VALUE the node declares; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// CPU cores to declare instead of the detected number.
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory in MiB to declare instead of the detected size.
    #[arg(long)]
    memory_mb: Option<u64>,
    /// Number of GPUs to declare instead of those nvidia-smi lists.
    #[arg(long, conflicts_with = "no_gpus")]
    gpus: Option<u32>,
    /// Declare no GPUs.
    #[arg(long)]
    no_gpus: bool,
    /// Git mirrors (git/), task workspaces and build contexts (tasks/),
    /// and the journal of reports the server has not acknowledged yet
    /// (journal/, sent again after a restart). Keep it across reboots.
    #[arg(long, env = "UNIDESK_WORK_DIR", default_value = "./.unidesk-agent")]
    work_dir: PathBuf,
    /// The most the report journal holds, in MiB: past it the oldest
    /// unacknowledged output is forgotten first; final statuses are always
    /// kept.
    #[arg(long, env = "UNIDESK_JOURNAL_MAX_MB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1024 * 1024))]
    journal_max_mb: u64,
    /// Part size of multipart uploads of task outputs, in MiB (5 or more):
    /// a part that fails is sent again alone.
    #[arg(long, env = "UNIDESK_PART_MB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(5..=5 * 1024))]
    part_mb: u64,
    /// Upper bound of the first reconnect delay, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    reconnect_min_ms: u64,
    /// Largest reconnect delay, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    reconnect_max_ms: u64,
    /// The most processes (threads included) one task container may run.
    #[arg(long, env = "UNIDESK_TASK_PIDS_LIMIT", default_value_t = docker::PIDS_LIMIT,
          value_parser = clap::value_parser!(i64).range(16..=1_000_000))]
    task_pids_limit: i64,
    /// The network task containers get: bridge (Docker's default bridge)
    /// or none (loopback only). A task may always ask for none.
    #[arg(long, env = "UNIDESK_TASK_NETWORK", default_value = "bridge",
          value_parser = ["bridge", "none"])]
    task_network: String,
    /// Memory of each image build step in MiB, without swap.
    #[arg(long, env = "UNIDESK_BUILD_MEMORY_MB", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(64..=1024 * 1024))]
    build_memory_mb: u64,
    /// CPU cores of each image build step; the node's declared CPUs by
    /// default.
    #[arg(long, env = "UNIDESK_BUILD_CPUS")]
    build_cpus: Option<f64>,
    /// How large one task's workspace may grow, in MiB (the container's
    /// own writable layer included where Docker cannot limit it apart).
    #[arg(long, env = "UNIDESK_WORKSPACE_LIMIT_MB", default_value_t = 100 * 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    workspace_limit_mb: u64,
    /// Seconds between two measurements of a running task's workspace.
    #[arg(long, env = "UNIDESK_WORKSPACE_CHECK_S", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    workspace_check_s: u64,
    /// MiB the prepared trees of recently checked-out commits, and their
    /// spare copies, may hold together in the work directory: a task on a
    /// commit the node checked out lately gets a copy of its files (its
    /// spare, moved in) instead of a new read of the repository. 0 keeps
    /// none.
    #[arg(long, env = "UNIDESK_PREPARED_TREES_MB", default_value_t = 2048)]
    prepared_trees_mb: u64,
    /// Docker daemon address (unix:///… or tcp://…); the local socket by default.
    #[arg(long, env = "DOCKER_HOST")]
    docker_host: Option<String>,
    /// Lets admins run emergency commands on this machine's host over SSH,
    /// as USER@HOST or USER@HOST:PORT (from WSL: the Windows host; from a
    /// container: the Docker host). Needs the OpenSSH client.
    #[arg(long, env = "UNIDESK_HOST_SSH", value_name = "USER@HOST[:PORT]")]
    host_ssh: Option<host_ssh::Target>,
    /// The private key --host-ssh logs in with (ssh's defaults without it).
    #[arg(long, env = "UNIDESK_HOST_SSH_KEY", requires = "host_ssh")]
    host_ssh_key: Option<PathBuf>,
    /// A known_hosts file that must already hold the host's key. Without
    /// it, the first key seen is trusted and kept in the work directory.
    #[arg(long, env = "UNIDESK_HOST_SSH_KNOWN_HOSTS", requires = "host_ssh")]
    host_ssh_known_hosts: Option<PathBuf>,
    /// A known_hosts file of SSH git hosts every task may fetch from
    /// (plain or hashed names). A task's own `known_hosts` secret adds to
    /// it; an SSH host whose key is in neither is refused.
    #[arg(long, env = "UNIDESK_GIT_KNOWN_HOSTS")]
    git_known_hosts: Option<PathBuf>,
}

/// Parses `KEY=VALUE` with the rules the server applies to node labels, so
/// a bad label stops start-up instead of every hello being refused.
fn parse_label(text: &str) -> Result<(String, String), String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(format!("{text:?} is not KEY=VALUE"));
    };
    let key_ok = (1..=63).contains(&key.len())
        && key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if !key_ok {
        return Err(format!(
            "label key {key:?}: 1-63 letters, digits, '.', '_', '-' or '/', starting with a letter or digit"
        ));
    }
    let value_ok = value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !value_ok {
        return Err(format!(
            "label value {value:?}: at most 63 letters, digits, '.', '_' or '-'"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match start(cli).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn start(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = config(&cli)?;
    let docker = docker::connect(cli.docker_host.as_deref())
        .await
        .context("connecting to Docker")?;
    let (confinement, build) = task_limits(&cli, config.resources.cpus)?;
    let mut ctx = Context::new(docker, &cli.work_dir)
        .with_context(|| format!("preparing the work directory {}", cli.work_dir.display()))?
        .with_part_bytes(cli.part_mb * 1024 * 1024)
        .with_confinement(confinement)
        .with_build_limits(build)
        .with_prepared_bytes(cli.prepared_trees_mb.saturating_mul(1024 * 1024))
        .with_git_known_hosts(cli.git_known_hosts.clone());
    if let Some(ca_file) = &cli.ca_file {
        // The object store is often behind the same gateway, with a
        // certificate of the same private CA.
        ctx = ctx
            .with_ca_file(ca_file)
            .map_err(|e| anyhow::anyhow!("--ca-file for object transfers: {e}"))?;
    }
    tracing::info!(
        server = %config.server,
        work_dir = %ctx.work_dir().display(),
        cpus = config.resources.cpus,
        memory_mb = config.resources.memory_mb,
        gpus = config.resources.gpus.len(),
        task_network = confinement.network.as_docker(),
        task_pids_limit = confinement.pids_limit,
        workspace_limit_mb = confinement.workspace.limit_mb,
        build_memory_mb = build.memory_mb,
        build_cpus = build.cpus,
        prepared_trees_mb = cli.prepared_trees_mb,
        "unidesk-agent starting"
    );
    let host = host_ssh_config(&cli, ctx.work_dir())?;
    let limits = connection::queue::Limits {
        journal_bytes: cli.journal_max_mb * 1024 * 1024,
        ..Default::default()
    };
    let journal = ctx.work_dir().join(connection::journal::DIR);
    let mut agent = Agent::with_limits(config, Arc::new(ctx), limits).with_context(|| {
        format!(
            "starting the agent (its report journal: {})",
            journal.display()
        )
    })?;
    if let Some(host) = host {
        tracing::info!(target = %host.target, "admins may run commands on this host over SSH");
        agent = agent.with_host_ssh(host);
    }
    tokio::select! {
        refused = agent.run() => {
            tracing::error!("{refused}");
            Ok(ExitCode::from(2))
        }
        _ = shutdown_signal() => {
            tracing::info!("stopping; running containers are adopted on the next start");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn config(cli: &Cli) -> anyhow::Result<connection::Config> {
    let token = match (&cli.token_file, &cli.token) {
        (Some(path), _) => Token::new(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))?,
        ),
        (None, Some(token)) => Token::new(token),
        (None, None) => {
            anyhow::bail!("no node token: pass --token, --token-file or set UNIDESK_NODE_TOKEN")
        }
    };
    anyhow::ensure!(!token.expose().is_empty(), "the node token is empty");
    anyhow::ensure!(
        cli.labels.len() <= MAX_LABELS,
        "at most {MAX_LABELS} labels"
    );
    anyhow::ensure!(
        cli.reconnect_min_ms > 0 && cli.reconnect_min_ms <= cli.reconnect_max_ms,
        "--reconnect-min-ms must be positive and at most --reconnect-max-ms"
    );
    let mut resources = resources::detect();
    if let Some(cpus) = cli.cpus {
        anyhow::ensure!(cpus > 0.0, "--cpus must be positive");
        resources.cpus = cpus;
    }
    if let Some(memory_mb) = cli.memory_mb {
        resources.memory_mb = memory_mb;
    }
    if cli.no_gpus {
        resources.gpus.clear();
    } else if let Some(n) = cli.gpus {
        resources.gpus = resources::override_gpu_count(resources.gpus, n);
    }
    Ok(connection::Config {
        server: connection::server_address(&cli.server)?,
        token,
        tls: connection::tls_config(cli.ca_file.as_deref())?,
        labels: cli.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        resources,
        reconnect_min: Duration::from_millis(cli.reconnect_min_ms),
        reconnect_max: Duration::from_millis(cli.reconnect_max_ms),
    })
}

/// How task containers and image builds are confined, from the flags;
/// builds get the node's declared CPUs unless `--build-cpus` says.
fn task_limits(
    cli: &Cli,
    node_cpus: f64,
) -> anyhow::Result<(docker::Confinement, docker::BuildLimits)> {
    let build_cpus = cli.build_cpus.unwrap_or(node_cpus);
    anyhow::ensure!(
        build_cpus.is_finite() && build_cpus >= 0.01,
        "--build-cpus must be at least 0.01"
    );
    let network = cli
        .task_network
        .parse()
        .map_err(|e| anyhow::anyhow!("--task-network: {e}"))?;
    let confinement = docker::Confinement {
        pids_limit: cli.task_pids_limit,
        network,
        workspace: disk::WorkspaceLimit {
            limit_mb: cli.workspace_limit_mb,
            interval: Duration::from_secs(cli.workspace_check_s),
        },
    };
    let build = docker::BuildLimits {
        memory_mb: cli.build_memory_mb,
        cpus: build_cpus,
    };
    Ok((confinement, build))
}

/// The host SSH settings, checked, when `--host-ssh` is given.
fn host_ssh_config(
    cli: &Cli,
    work_dir: &std::path::Path,
) -> anyhow::Result<Option<host_ssh::Config>> {
    let Some(target) = &cli.host_ssh else {
        return Ok(None);
    };
    let config = host_ssh::Config::new(
        target.clone(),
        cli.host_ssh_key.clone(),
        cli.host_ssh_known_hosts.clone(),
        work_dir,
    );
    host_ssh::check(&config).map_err(|e| anyhow::anyhow!("--host-ssh: {e}"))?;
    Ok(Some(config))
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_servers_rules() {
        assert_eq!(
            parse_label("zone=lab-1").unwrap(),
            ("zone".into(), "lab-1".into())
        );
        assert_eq!(
            parse_label("gpu.kind=").unwrap(),
            ("gpu.kind".into(), String::new())
        );
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=x").is_err());
        assert!(parse_label("-zone=x").is_err());
        assert!(parse_label("zone=a b").is_err());
    }

    #[test]
    fn the_cli_reads_flags_and_checks_them() {
        let cli = Cli::try_parse_from([
            "unidesk-agent",
            "--server",
            "ws://h:8080",
            "--token",
            "t",
            "--label",
            "a=b",
            "--gpus",
            "2",
        ])
        .unwrap();
        let config = config(&cli).unwrap();
        assert_eq!(config.server, "ws://h:8080");
        assert_eq!(config.resources.gpus.len(), 2);
        assert_eq!(config.labels["a"], "b");
        assert!(Cli::try_parse_from([
            "unidesk-agent",
            "--server",
            "x",
            "--gpus",
            "1",
            "--no-gpus"
        ])
        .is_err());
    }

    #[test]
    fn containment_flags_have_safe_defaults_and_are_checked() {
        let base = ["unidesk-agent", "--server", "ws://h:8080", "--token", "t"];
        let cli = Cli::try_parse_from(base).unwrap();
        let (confinement, build) = task_limits(&cli, 6.0).unwrap();
        assert_eq!(confinement.pids_limit, docker::PIDS_LIMIT);
        assert_eq!(confinement.network, docker::NetworkMode::Bridge);
        assert_eq!(confinement.workspace.limit_mb, 100 * 1024);
        assert_eq!(confinement.workspace.interval, Duration::from_secs(30));
        assert_eq!((build.memory_mb, build.cpus), (4096, 6.0));
        let args = |extra: &[&'static str]| base.iter().chain(extra).copied().collect::<Vec<_>>();
        let cli = Cli::try_parse_from(args(&[
            "--task-network",
            "none",
            "--task-pids-limit",
            "32",
            "--build-memory-mb",
            "8192",
            "--build-cpus",
            "1.5",
            "--workspace-limit-mb",
            "5",
            "--workspace-check-s",
            "1",
        ]))
        .unwrap();
        let (confinement, build) = task_limits(&cli, 6.0).unwrap();
        assert_eq!(confinement.network, docker::NetworkMode::None);
        assert_eq!(confinement.pids_limit, 32);
        assert_eq!(confinement.workspace.limit_mb, 5);
        assert_eq!((build.memory_mb, build.cpus), (8192, 1.5));
        for bad in [
            &["--task-network", "host"][..],
            &["--task-pids-limit", "0"],
            &["--task-pids-limit", "-1"],
            &["--workspace-limit-mb", "0"],
            &["--workspace-check-s", "0"],
            &["--build-memory-mb", "1"],
        ] {
            assert!(Cli::try_parse_from(args(bad)).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from(args(&["--build-cpus", "0"])).unwrap();
        assert!(task_limits(&cli, 6.0).is_err());
    }

    #[test]
    fn host_ssh_takes_a_target_and_a_key_that_exists() {
        let base = ["unidesk-agent", "--server", "ws://h:8080", "--token", "t"];
        let cli = Cli::try_parse_from(base).unwrap();
        assert!(host_ssh_config(&cli, std::path::Path::new("/w"))
            .unwrap()
            .is_none());
        let args = |extra: &[&'static str]| base.iter().chain(extra).copied().collect::<Vec<_>>();
        assert!(Cli::try_parse_from(args(&["--host-ssh", "nobody"])).is_err());
        assert!(Cli::try_parse_from(args(&["--host-ssh-key", "/k"])).is_err());
        let cli = Cli::try_parse_from(args(&[
            "--host-ssh",
            "me@host.docker.internal:2222",
            "--host-ssh-key",
            "/nonexistent/key",
        ]))
        .unwrap();
        let err = host_ssh_config(&cli, std::path::Path::new("/w")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/key"), "{err}");
    }
}
