//! Containers a previous run of this agent left behind: one that never
//! started is discarded, one that started is taken over to its end.

use std::sync::Arc;
use std::time::Duration;

use protocol::ReportedState;
use tokio::sync::mpsc;

use crate::beneath::{blocking, PathError};
use crate::docker;

use super::cancel::CancelSignal;
use super::context::Context;
use super::report::{Ending, Report, Reporter};
use super::task_files::{clone_error, noted_outputs, upload_outputs};
use super::watch::{watch, DiskWatch, Limits};
use super::workspace::{attempt_dir, remove_workspace};

/// Removes a container a previous run of this agent created but never
/// started, and its workspace: the attempt did not get to run, and the
/// server gives it up (and retries it) when the agent does not list it.
pub async fn discard(found: &docker::Leftover, ctx: &Context) {
    tracing::info!(task_id = %found.task_id, attempt = found.attempt, "removing a container a previous run never started");
    if let Err(e) = docker::remove_container(&ctx.docker, &found.id).await {
        tracing::warn!(container = %found.id, error = %e, "could not remove the container");
    }
    remove_workspace(ctx, found.task_id, found.attempt).await;
}

/// Takes over a started container a previous run of this agent left behind
/// (see [`discard`] for one that never started): reports
/// it running (again), follows its output from the start (the server keeps
/// only what it does not have yet), and reports how it ended, also when it
/// ended while no agent watched. A container still running is held to the
/// rest of its time limit; one that already ended reports the exit Docker
/// recorded, however long ago its limit passed. A cancel stops it as for
/// any attempt.
#[tracing::instrument(skip_all, fields(task_id = %found.task_id, attempt = found.attempt, container = %found.id))]
pub async fn adopt(
    found: docker::Leftover,
    ctx: Arc<Context>,
    reports: mpsc::Sender<Report>,
    mut cancel: CancelSignal,
) {
    let out = Reporter::new(found.task_id, found.attempt, reports);
    tracing::info!("adopting a container left by a previous run");
    out.status(ReportedState::Running, |s| {
        s.container = Some(found.id.clone())
    })
    .await;
    let elapsed = found.running_for.unwrap_or_default();
    // A container that already ended ended as Docker recorded it: the time
    // limit is for one still running, not for how long no agent watched.
    let left = match found.timeout_s {
        Some(t) if !found.finished => Some(Duration::from_secs(t).saturating_sub(elapsed)),
        _ => None,
    };
    let limits = Limits {
        timeout_s: found.timeout_s,
        left,
        memory_mb: found.memory_mb,
        disk: DiskWatch {
            workspace: ctx
                .tasks
                .path()
                .join(attempt_dir(found.task_id, found.attempt))
                .join("code"),
            count_layer: !found.layer_limited,
        },
    };
    let ending = watch(&ctx, &out, &mut cancel, &found.id, limits).await;
    if let Err(e) = docker::remove_container(&ctx.docker, &found.id).await {
        tracing::warn!(error = %e, "could not remove the container");
    }
    let ending = upload_adopted_outputs(&ctx, &found, ending).await;
    remove_workspace(&ctx, found.task_id, found.attempt).await;
    tracing::info!(state = ?ending.state, message = ending.message.as_deref(), "adopted attempt ended");
    out.ended(ending).await;
}

/// Uploads the outputs an adopted attempt noted before the restart.
async fn upload_adopted_outputs(ctx: &Context, found: &docker::Leftover, ending: Ending) -> Ending {
    let name = attempt_dir(found.task_id, found.attempt);
    let workspace = match ctx.tasks.try_clone() {
        Ok(tasks) => {
            blocking(move || {
                let dir = tasks.sub_dir(&name, "the attempt's directory")?;
                let code = dir.sub_dir("code", "the workspace");
                Ok((dir, code))
            })
            .await
        }
        Err(source) => Err(PathError::Io {
            path: String::new(),
            source,
        }),
    };
    let (dir, code) = match workspace {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "the adopted attempt's directory is gone; no outputs");
            return ending;
        }
    };
    let outputs = noted_outputs(&dir).await;
    let key = (found.task_id, found.attempt);
    upload_outputs(
        ctx,
        key,
        &outputs,
        code.as_ref().map_err(clone_error),
        ending,
    )
    .await
}
