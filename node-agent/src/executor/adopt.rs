//! Containers a previous run of this agent left behind: one that never
//! started is discarded, one that started is taken over to its end, and
//! one that ended meanwhile is reported as Docker recorded its end.

use std::sync::Arc;
use std::time::Duration;

use protocol::{ReportedState, TransferOp};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::beneath::{blocking, PathError};
use crate::docker;

use super::cancel::CancelSignal;
use super::context::Context;
use super::report::{Ending, Mask, Report, Reporter};
use super::task_files::{clone_error, noted_outputs, upload_outputs};
use super::watch::{recorded_ending, watch, DiskWatch, Limits};
use super::workspace::{attempt_dir, noted_stop, remove_workspace};

/// Removes a container a previous run of this agent created but never
/// started, and its workspace: the attempt did not get to run, and the
/// server gives it up (and retries it) when the agent does not list it.
///
/// A run that died while Docker was still creating the container (or a
/// second one, made when the first create was refused) can leave Docker
/// finishing that create after this one starts: every container Docker
/// lists for the attempt is removed, and they are listed again, until
/// none is left ([`docker::until_settled`]). The workspace goes once none
/// is; else the next start finds what is left.
pub async fn discard(found: &docker::Leftover, ctx: &Context) {
    tracing::info!(task_id = %found.task_id, attempt = found.attempt, "removing a container a previous run never started");
    let list =
        || docker::attempt_containers(&ctx.docker, &ctx.agent_label, found.task_id, found.attempt);
    let left = docker::until_settled(
        || async {
            let listed = list().await;
            let ids = listed.as_deref().unwrap_or(std::slice::from_ref(&found.id));
            for id in ids {
                if let Err(e) = docker::remove_container(&ctx.docker, id).await {
                    tracing::warn!(container = %id, error = %e, "could not remove the container");
                }
            }
            list().await
        },
        |left| matches!(left, Ok(ids) if ids.is_empty()),
    )
    .await;
    match left {
        Ok(ids) if ids.is_empty() => remove_workspace(ctx, found.task_id, found.attempt).await,
        Ok(ids) => {
            tracing::warn!(task_id = %found.task_id, attempt = found.attempt, containers = ?ids, "the attempt's containers are still there; the next start removes them");
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not list the attempt's containers; the next start removes what is left");
        }
    }
}

/// Takes over a started container a previous run of this agent left behind
/// (see [`discard`] for one that never started): reports
/// it running (again), follows its output from the start (the server keeps
/// only what it does not have yet), and reports how it ended, also when it
/// ended while no agent watched. The rest of its time limit still applies,
/// and a cancel stops it as for any attempt.
///
/// How it ended is, in order: why the previous agent stopped it, if it
/// noted that; Docker's record of its end (`ExitCode`, `FinishedAt` and
/// `StartedAt`), so a container that ended within its time limit is
/// reported with its exit however long ago that was; and for one still
/// running, how it ends now. The container and the attempt's directory
/// stay until the server has the report ([`release`](super::release())).
#[tracing::instrument(skip_all, fields(task_id = %found.task_id, attempt = found.attempt, container = %found.id))]
pub async fn adopt(
    found: docker::Leftover,
    ctx: Arc<Context>,
    reports: mpsc::Sender<Report>,
    mut cancel: CancelSignal,
) {
    let out = Reporter::new(found.task_id, found.attempt, reports);
    let out = if found.uses_secrets {
        // Its output may hold secrets: asked again to mask them, or none
        // of it is shown.
        let asked = ctx
            .files()
            .broker()
            .ask(found.task_id, found.attempt, TransferOp::Secrets)
            .await;
        out.masking(match asked {
            Ok(grant) => Mask::Values(Arc::new(
                grant.secrets.0.into_values().map(Zeroizing::new).collect(),
            )),
            Err(e) => Mask::Withhold(format!(
                "the secrets it may contain could not be fetched to mask them ({e})"
            )),
        })
    } else {
        out
    };
    tracing::info!(
        ended = found.exit.is_some(),
        "adopting a container left by a previous run"
    );
    out.status(ReportedState::Running, |s| {
        s.container = Some(found.id.clone())
    })
    .await;
    let elapsed = found.running_for.unwrap_or_default();
    let limits = Limits {
        timeout_s: found.timeout_s,
        // A container that has ended is judged by its record, not by the
        // time since it started.
        left: found
            .timeout_s
            .filter(|_| found.exit.is_none())
            .map(|t| Duration::from_secs(t).saturating_sub(elapsed)),
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
    let watched = watch(&ctx, &out, &mut cancel, &found.id, limits).await;
    let ending = match (noted_stop(&ctx, out.key()).await, found.exit) {
        (Some(noted), _) => noted,
        (None, Some(recorded)) => recorded_ending(recorded, found.timeout_s, found.memory_mb),
        (None, None) => watched,
    };
    let ending = upload_adopted_outputs(&ctx, &found, ending).await;
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
