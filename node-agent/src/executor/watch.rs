//! Holding a started container to its limits: it runs until the first of
//! its exit, a cancel, the time limit or a disk limit breach, and its
//! output is drained before the ending is known.
//!
//! Before the agent stops a container it notes why in the attempt's
//! directory, so a restart after the stop reports the cause. When the
//! time limit comes, Docker's record of the container's end decides: one
//! that ended within its limit (while nobody watched, or at the last
//! moment) is reported as it ended, not as timed out.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use protocol::ReportedState;
use tokio::sync::oneshot;

use crate::disk;
use crate::docker::{self, DockerError, Exit};

use super::cancel::CancelSignal;
use super::context::Context;
use super::output;
use super::report::{Ending, Reporter};
use super::workspace::note_stop;

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
    let draining = output::start(
        ctx.docker.clone(),
        id.to_owned(),
        out.clone(),
        on_exit,
        Arc::clone(&ctx.output_limit),
    );
    let ending = tokio::select! {
        exit = docker::wait_exit(&ctx.docker, id) => ended(exit, limits.memory_mb),
        grace = cancel.cancelled() => {
            let ending = Ending::plain(ReportedState::Cancelled, None);
            note_stop(ctx, out.key(), &ending).await;
            stop(ctx, id, grace).await;
            ending
        }
        _ = sleep_or_forever(limits.left) => {
            match ended_within(ctx, id, limits.timeout_s).await {
                Some(exit) => ended(Ok(exit), limits.memory_mb),
                None => {
                    let secs = limits.timeout_s.unwrap_or_default();
                    let ending = Ending::plain(ReportedState::TimedOut, Some(format!("stopped at the time limit of {secs} s")));
                    note_stop(ctx, out.key(), &ending).await;
                    stop(ctx, id, ctx.timeout_grace).await;
                    ending
                }
            }
        }
        breach = disk::watch(
            ctx.docker.clone(),
            id.to_owned(),
            limits.disk.workspace.clone(),
            limits.disk.count_layer,
            ctx.confinement.workspace,
        ) => {
            tracing::warn!(%breach, "stopping the container for its disk use");
            let ending = Ending::failed(breach);
            note_stop(ctx, out.key(), &ending).await;
            stop(ctx, id, ctx.timeout_grace).await;
            ending
        }
    };
    // The receiver is gone if the output reader already stopped.
    let _ = exited.send(());
    draining
        .wait(ending.state == ReportedState::Cancelled)
        .await;
    ending
}

/// How the container ended, if Docker recorded an end within
/// `timeout_s` of its start.
async fn ended_within(ctx: &Context, id: &str, timeout_s: Option<u64>) -> Option<Exit> {
    let recorded = match docker::recorded_exit(&ctx.docker, id).await {
        Ok(recorded) => recorded?,
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell how the container ended");
            return None;
        }
    };
    let limit = Duration::from_secs(timeout_s?);
    (recorded.ran_for < limit).then_some(recorded.exit)
}

/// The ending of a container found stopped after a restart, from Docker's
/// record: within its time limit it is its exit; past it, it timed out.
///
/// A container stopped the way Docker stops its containers when it, or
/// the machine, goes down (SIGTERM, then SIGKILL: status 143 or 137 with
/// no out-of-memory kill) or finds gone when it comes back (255) is taken
/// as stopped by the node: an agent running in Docker goes down with them,
/// so no agent saw Docker go.
pub(super) fn recorded_ending(
    recorded: docker::RecordedExit,
    timeout_s: Option<u64>,
    memory_mb: u64,
) -> Ending {
    let exit = recorded.exit;
    match timeout_s {
        Some(secs) if recorded.ran_for >= Duration::from_secs(secs) => Ending::plain(
            ReportedState::TimedOut,
            Some(format!(
                "ran past the time limit of {secs} s while no agent watched (exit status {})",
                exit.code
            )),
        ),
        _ if !exit.oom_killed && RESTART_STATUSES.contains(&exit.code) => Ending {
            state: ReportedState::Failed,
            exit_code: Some(exit.code),
            message: Some(format!(
                "ended with exit status {} while no agent watched it, as containers do when \
                 Docker or the machine restarts",
                exit.code
            )),
            node_fault: true,
        },
        _ => ended(Ok(exit), memory_mb),
    }
}

/// The statuses Docker records for a container it stopped as it went down
/// (143: SIGTERM; 137: SIGKILL, after the stop timeout) or found without
/// its process when it came back (255).
const RESTART_STATUSES: [i64; 3] = [143, docker::KILLED_STATUS, 255];

fn ended(exit: Result<Exit, DockerError>, memory_mb: u64) -> Ending {
    match exit {
        Ok(Exit { code: 0, .. }) => Ending::plain(ReportedState::Succeeded, None),
        // A daemon restarted without `live-restore` stops its containers
        // (SIGTERM, then SIGKILL; a task may answer the SIGTERM with any
        // status): an end Docker's own outage framed is the node's.
        Ok(Exit {
            code,
            oom_killed: false,
            amid_outage: true,
        }) => Ending {
            state: ReportedState::Failed,
            exit_code: Some(code),
            message: Some(format!(
                "ended with exit status {code} while Docker was not answering (a Docker restart \
                 stops its containers)"
            )),
            node_fault: true,
        },
        Ok(Exit {
            code, oom_killed, ..
        }) => Ending {
            state: ReportedState::Failed,
            exit_code: Some(code),
            message: Some(if oom_killed {
                format!("killed: out of memory (limit {memory_mb} MiB)")
            } else if code == docker::KILLED_STATUS {
                // The kernel's kill of a process that ran out of memory
                // in its first moments can reach no one (see
                // `docker::OOM_EVENT_GRACE`): say what is known.
                format!(
                    "killed by SIGKILL (exit status {code}); Docker reported no out-of-memory \
                     kill (limit {memory_mb} MiB)"
                )
            } else {
                format!("exited with status {code}")
            }),
            node_fault: false,
        },
        Err(e) => Ending::docker(&e),
    }
}

/// Stops the container, asking again while Docker does not answer (for up
/// to [`docker::DOCKER_OUTAGE_MOST`]); one Docker refuses to stop is
/// removed.
async fn stop(ctx: &Context, id: &str, grace: Duration) {
    let stopped = docker::until_answered(|| docker::stop_container(&ctx.docker, id, grace)).await;
    if let Err(e) = stopped {
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
                amid_outage: false,
            }),
            64,
        );
        assert_eq!(ok.state, ReportedState::Succeeded);
        let bad = ended(
            Ok(Exit {
                code: 3,
                oom_killed: false,
                amid_outage: false,
            }),
            64,
        );
        assert_eq!(bad.exit_code, Some(3));
        assert_eq!(bad.message.as_deref(), Some("exited with status 3"));
        let oom = ended(
            Ok(Exit {
                code: 137,
                oom_killed: true,
                amid_outage: false,
            }),
            64,
        );
        assert_eq!(
            oom.message.as_deref(),
            Some("killed: out of memory (limit 64 MiB)")
        );
        let killed = ended(
            Ok(Exit {
                code: 137,
                oom_killed: false,
                amid_outage: false,
            }),
            64,
        );
        assert_eq!(
            killed.message.as_deref(),
            Some(
                "killed by SIGKILL (exit status 137); Docker reported no out-of-memory kill \
                 (limit 64 MiB)"
            )
        );
    }

    #[test]
    fn an_end_amid_a_docker_outage_is_the_nodes_unless_it_succeeded_or_ran_out_of_memory() {
        let amid = |code, oom_killed| {
            ended(
                Ok(Exit {
                    code,
                    oom_killed,
                    amid_outage: true,
                }),
                64,
            )
        };
        let stopped = amid(143, false);
        assert_eq!(
            (stopped.state, stopped.exit_code, stopped.node_fault),
            (ReportedState::Failed, Some(143), true)
        );
        assert_eq!(
            stopped.message.as_deref(),
            Some(
                "ended with exit status 143 while Docker was not answering (a Docker restart \
                 stops its containers)"
            )
        );
        assert!(amid(1, false).node_fault);
        let ok = amid(0, false);
        assert_eq!((ok.state, ok.node_fault), (ReportedState::Succeeded, false));
        let oom = amid(137, true);
        assert_eq!(
            (oom.node_fault, oom.message.as_deref()),
            (false, Some("killed: out of memory (limit 64 MiB)"))
        );
    }

    #[test]
    fn a_recorded_exit_within_the_limit_is_the_ending_and_one_past_it_timed_out() {
        let recorded = |secs, code| docker::RecordedExit {
            exit: Exit {
                code,
                oom_killed: false,
                amid_outage: false,
            },
            ran_for: Duration::from_secs(secs),
        };
        let within = recorded_ending(recorded(2, 5), Some(10), 64);
        assert_eq!(
            (within.state, within.exit_code),
            (ReportedState::Failed, Some(5))
        );
        let ok = recorded_ending(recorded(2, 0), Some(10), 64);
        assert_eq!(ok.state, ReportedState::Succeeded);
        let past = recorded_ending(recorded(11, 137), Some(10), 64);
        assert_eq!(past.state, ReportedState::TimedOut);
        let unlimited = recorded_ending(recorded(100_000, 1), None, 64);
        assert_eq!(unlimited.exit_code, Some(1));
        assert!(!unlimited.node_fault);
        for code in [143, 137, 255] {
            let stopped = recorded_ending(recorded(2, code), Some(10), 64);
            assert_eq!(
                (stopped.state, stopped.exit_code, stopped.node_fault),
                (ReportedState::Failed, Some(code), true)
            );
        }
        let oom = recorded_ending(
            docker::RecordedExit {
                exit: Exit {
                    code: 137,
                    oom_killed: true,
                    amid_outage: false,
                },
                ran_for: Duration::from_secs(2),
            },
            None,
            64,
        );
        assert!(!oom.node_fault, "{oom:?}");
    }
}
