//! Holding a started container to its limits: it runs until the first of
//! its exit, a cancel, the time limit or a disk limit breach, and its
//! output is drained before the ending is known.

use std::path::PathBuf;
use std::time::Duration;

use protocol::ReportedState;
use tokio::sync::oneshot;

use crate::disk;
use crate::docker::{self, DockerError, Exit};

use super::cancel::CancelSignal;
use super::context::Context;
use super::output::pump_output;
use super::report::{Ending, Reporter};

/// How long to wait for the rest of the output once the container stopped.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What a started container is held to.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    /// The task's time limit, for the message.
    pub(super) timeout_s: Option<u64>,
    /// How much of it is left.
    pub(super) left: Option<Duration>,
    /// The memory limit, for the out-of-memory message.
    pub(super) memory_mb: u64,
    /// What counts against the workspace limit.
    pub(super) disk: DiskWatch,
}

/// What [`disk::watch`] measures for one container.
#[derive(Debug, Clone)]
pub(super) struct DiskWatch {
    /// The host directory mounted at `/workspace`.
    pub(super) workspace: PathBuf,
    /// Whether the writable layer counts too (it has no quota of its own).
    pub(super) count_layer: bool,
}

/// Streams a started container's output and waits for the first of: its
/// exit, a cancel, the time limit.
pub(super) async fn watch(
    ctx: &Context,
    out: &Reporter,
    cancel: &mut CancelSignal,
    id: &str,
    limits: Limits,
) -> Ending {
    let (exited, on_exit) = oneshot::channel();
    let pump = tokio::spawn(pump_output(
        ctx.docker.clone(),
        id.to_owned(),
        out.clone(),
        on_exit,
    ));
    let ending = tokio::select! {
        exit = docker::wait_exit(&ctx.docker, id) => ended(exit, limits.memory_mb),
        grace = cancel.cancelled() => {
            stop(ctx, id, grace).await;
            Ending::plain(ReportedState::Cancelled, None)
        }
        _ = sleep_or_forever(limits.left) => {
            stop(ctx, id, ctx.timeout_grace).await;
            let secs = limits.timeout_s.unwrap_or_default();
            Ending::plain(ReportedState::TimedOut, Some(format!("stopped at the time limit of {secs} s")))
        }
        breach = disk::watch(
            ctx.docker.clone(),
            id.to_owned(),
            limits.disk.workspace.clone(),
            limits.disk.count_layer,
            ctx.confinement.workspace,
        ) => {
            tracing::warn!(%breach, "stopping the container for its disk use");
            stop(ctx, id, ctx.timeout_grace).await;
            Ending::failed(breach)
        }
    };
    // The receiver is gone if the output reader already stopped.
    let _ = exited.send(());
    match tokio::time::timeout(LOG_DRAIN_TIMEOUT, pump).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "output reader stopped"),
        Err(_) => tracing::warn!("the container's output did not end; some may be missing"),
    }
    ending
}

fn ended(exit: Result<Exit, DockerError>, memory_mb: u64) -> Ending {
    match exit {
        Ok(Exit { code: 0, .. }) => Ending::plain(ReportedState::Succeeded, None),
        Ok(Exit { code, oom_killed }) => Ending {
            state: ReportedState::Failed,
            exit_code: Some(code),
            message: Some(if oom_killed {
                format!("killed: out of memory (limit {memory_mb} MiB)")
            } else {
                format!("exited with status {code}")
            }),
        },
        Err(e) => Ending::failed(e),
    }
}

async fn stop(ctx: &Context, id: &str, grace: Duration) {
    if let Err(e) = docker::stop_container(&ctx.docker, id, grace).await {
        tracing::warn!(container = %id, error = %e, "stop failed; removing the container");
        if let Err(e) = docker::remove_container(&ctx.docker, id).await {
            tracing::warn!(container = %id, error = %e, "could not remove the container");
        }
    }
}

async fn sleep_or_forever(limit: Option<Duration>) {
    match limit {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_become_final_states() {
        let ok = ended(
            Ok(Exit {
                code: 0,
                oom_killed: false,
            }),
            64,
        );
        assert_eq!(ok.state, ReportedState::Succeeded);
        let bad = ended(
            Ok(Exit {
                code: 3,
                oom_killed: false,
            }),
            64,
        );
        assert_eq!(bad.exit_code, Some(3));
        assert_eq!(bad.message.as_deref(), Some("exited with status 3"));
        let oom = ended(
            Ok(Exit {
                code: 137,
                oom_killed: true,
            }),
            64,
        );
        assert_eq!(
            oom.message.as_deref(),
            Some("killed: out of memory (limit 64 MiB)")
        );
    }
}
