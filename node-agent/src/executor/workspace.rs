//! An attempt's directory under `<work dir>/tasks`: made empty before the
//! attempt, removed with everything in it once the server has the
//! attempt's end ([`release`](super::release())). Beside the workspace the
//! container sees, it holds the agent's notes on the attempt: its outputs,
//! and why the agent stopped its container (cancel, time limit, disk), so
//! an agent that restarts after the stop reports that cause rather than
//! the exit status the stop caused.

use crate::beneath::{blocking, PathError, Root};

use super::context::Context;
use super::prepare::PrepareError;
use super::report::Ending;

/// The note of why the agent stopped an attempt's container.
const STOP_NOTE: &str = "stopped.json";

/// The name of an attempt's directory under `<work dir>/tasks`.
pub(super) fn attempt_dir(task_id: uuid::Uuid, attempt: u32) -> String {
    format!("{task_id}-{attempt}")
}

/// An attempt's directories, held open.
#[derive(Debug)]
pub(super) struct Workspace {
    /// `<work dir>/tasks/<task>-<attempt>`: the agent's notes.
    pub(super) dir: Root,
    /// `code/` in it: the code checkout, where inputs land and outputs are
    /// read; the container's `/workspace`.
    pub(super) code: Root,
}

/// An empty directory for the attempt, with `code/` (shared with the
/// container, [`Root::shared`]) and `env/` in it; returns the workspace
/// and the env checkout's directory.
pub(super) async fn fresh_workspace(
    ctx: &Context,
    task_id: uuid::Uuid,
    attempt: u32,
) -> Result<(Workspace, Root), PrepareError> {
    let tasks = ctx.tasks.try_clone().map_err(|source| {
        PrepareError::Workspace(PathError::Io {
            path: ctx.tasks.path().display().to_string(),
            source,
        })
    })?;
    let name = attempt_dir(task_id, attempt);
    blocking(move || {
        let dir = tasks.fresh_dir(&name, "the attempt's directory")?;
        let code = dir.create_dir("code", "the workspace")?;
        // The container may run as any user: the workspace is its to
        // read and write (`tasks/` above keeps everyone else out).
        let code = code.shared().map_err(|source| PathError::Io {
            path: "code".into(),
            source,
        })?;
        let env = dir.create_dir("env", "the env repository")?;
        Ok((Workspace { dir, code }, env))
    })
    .await
    .map_err(PrepareError::Workspace)
}

/// Removes the attempt's directory with everything in it; links in it are
/// removed, never followed.
pub(super) async fn remove_workspace(ctx: &Context, task_id: uuid::Uuid, attempt: u32) {
    let tasks = match ctx.tasks.try_clone() {
        Ok(tasks) => tasks,
        Err(e) => {
            tracing::warn!(error = %e, "could not remove the workspace");
            return;
        }
    };
    let name = attempt_dir(task_id, attempt);
    if let Err(e) = blocking(move || tasks.remove(&name)).await {
        tracing::warn!(error = %e, "could not remove the workspace");
    }
}

/// Notes, durably, why the agent is about to stop the attempt's container.
pub(super) async fn note_stop(
    ctx: &Context,
    (task_id, attempt): (uuid::Uuid, u32),
    ending: &Ending,
) {
    let Ok(json) = serde_json::to_vec(ending) else {
        return;
    };
    let written = match ctx.tasks.try_clone() {
        Ok(tasks) => {
            let name = attempt_dir(task_id, attempt);
            blocking(move || {
                tasks
                    .sub_dir(&name, "the attempt's directory")?
                    .write(STOP_NOTE, &json)
            })
            .await
        }
        Err(source) => Err(PathError::Io {
            path: STOP_NOTE.into(),
            source,
        }),
    };
    if let Err(e) = written {
        tracing::warn!(error = %e, "could not note why the container is stopped");
    }
}

/// Why the agent stopped the attempt's container, if it noted it.
pub(super) async fn noted_stop(
    ctx: &Context,
    (task_id, attempt): (uuid::Uuid, u32),
) -> Option<Ending> {
    let tasks = ctx.tasks.try_clone().ok()?;
    let name = attempt_dir(task_id, attempt);
    let read = blocking(move || {
        tasks
            .sub_dir(&name, "the attempt's directory")?
            .read_small(STOP_NOTE)
    })
    .await;
    match read {
        Ok(json) => serde_json::from_slice(&json)
            .inspect_err(|e| tracing::warn!(error = %e, "ignoring an unreadable stop note"))
            .ok(),
        Err(PathError::Missing { .. }) => None,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the stop note");
            None
        }
    }
}
