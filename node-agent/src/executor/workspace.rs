//! An attempt's directory under `<work dir>/tasks`: made empty before the
//! attempt, removed with everything in it once the server has the
//! attempt's end ([`release`](super::release())). Beside the workspace the
//! container sees, it holds the agent's notes on the attempt: its outputs,
//! and why the agent stopped its container (cancel, time limit, disk), so
//! an agent that restarts after the stop reports that cause rather than
//! the exit status the stop caused.

use crate::beneath::{blocking, PathError, Root};
use crate::docker;

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

/// The attempt an attempt's directory name is for, if it is one
/// ([`attempt_dir`]'s format).
fn attempt_of(name: &str) -> Option<(uuid::Uuid, u32)> {
    let (task, attempt) = name.rsplit_once('-')?;
    let key = (uuid::Uuid::try_parse(task).ok()?, attempt.parse().ok()?);
    // Only the name the agent writes: not `+1` or `01` for attempt 1.
    (attempt_dir(key.0, key.1) == name).then_some(key)
}

/// Removes the directories a previous run of this agent left in
/// `<work dir>/tasks` for attempts that have no container and that `keep`
/// does not name: an agent that stopped while an attempt was being
/// prepared (its code fetched, its image built) left its directory before
/// any container existed, and nothing else would remove it. An attempt
/// whose containers Docker cannot list, or still lists after about two
/// seconds, keeps its directory; names that are no attempt's are left
/// alone. Called once, when the agent starts,
/// after the leftover containers were adopted or discarded and before any
/// attempt runs.
pub async fn sweep_workspaces(ctx: &Context, keep: impl Fn((uuid::Uuid, u32)) -> bool) {
    let listed = match ctx.tasks.try_clone() {
        Ok(tasks) => {
            blocking(move || {
                let entries = tasks.dir().entries().map_err(|source| PathError::Io {
                    path: tasks.path().display().to_string(),
                    source,
                })?;
                Ok(entries
                    .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                    .filter_map(|name| attempt_of(&name))
                    .collect::<Vec<_>>())
            })
            .await
        }
        Err(source) => Err(PathError::Io {
            path: ctx.tasks.path().display().to_string(),
            source,
        }),
    };
    let attempts = match listed {
        Ok(attempts) => attempts,
        Err(e) => {
            tracing::warn!(error = %e, "could not list the attempts' directories");
            return;
        }
    };
    for (task_id, attempt) in attempts {
        if keep((task_id, attempt)) {
            continue;
        }
        // A container listed here was neither adopted nor discarded: one
        // whose create or removal Docker was still finishing. A moment
        // settles which.
        let listed = docker::until_settled(
            || docker::attempt_containers(&ctx.docker, &ctx.agent_label, task_id, attempt),
            |listed| !matches!(listed, Ok(containers) if !containers.is_empty()),
        )
        .await;
        match listed {
            Ok(containers) if containers.is_empty() => {
                tracing::info!(%task_id, attempt, "removing the directory of an attempt a previous run left without a container");
                remove_workspace(ctx, task_id, attempt).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%task_id, attempt, error = %e, "keeping an attempt's directory: its containers could not be listed");
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_names_the_agent_writes_are_attempts() {
        let task = uuid::Uuid::new_v4();
        assert_eq!(attempt_of(&attempt_dir(task, 3)), Some((task, 3)));
        assert_eq!(attempt_of(&attempt_dir(task, 0)), Some((task, 0)));
        for other in [
            format!("{task}"),
            format!("{task}-"),
            format!("{task}-+3"),
            format!("{task}-03"),
            format!("{task}-x"),
            format!("{}-3", task.simple()),
            format!("{}-3", task.to_string().to_uppercase()),
            "lost+found".to_owned(),
            ".tmp-3".to_owned(),
        ] {
            assert_eq!(attempt_of(&other), None, "{other}");
        }
    }
}
