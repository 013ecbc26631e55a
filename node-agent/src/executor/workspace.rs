//! An attempt's directory under `<work dir>/tasks`: made empty before the
//! attempt, removed with everything in it afterwards.

use crate::beneath::{blocking, PathError, Root};

use super::context::Context;
use super::prepare::PrepareError;

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

/// An empty directory for the attempt, with `code/` and `env/` in it;
/// returns the workspace and the env checkout's directory.
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
