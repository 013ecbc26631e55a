//! What an attempt leaves on the node until the server has its end: its
//! container (stopped, with Docker's record of how it ended) and its
//! directory. A restart before the server stored the final report still
//! finds them, so the attempt is reported as it ended; [`release`] removes
//! them once the server stored (or refused for good) that report.

use crate::beneath::blocking;
use crate::docker;

use super::context::Context;
use super::workspace::attempt_dir;

/// Removes what attempt `attempt` of `task_id` left here: its containers
/// (found by their labels, so also those of a previous run of this agent)
/// and its directory under `<work dir>/tasks`. Nothing left is fine.
///
/// # Errors
/// What Docker or the file system said, for a person; whatever could be
/// removed is gone, and calling again retries the rest.
pub async fn release(ctx: &Context, task_id: uuid::Uuid, attempt: u32) -> Result<(), String> {
    let mut problems = Vec::new();
    match docker::attempt_containers(&ctx.docker, &ctx.agent_label, task_id, attempt).await {
        Ok(ids) => {
            for id in ids {
                if let Err(e) = docker::remove_container(&ctx.docker, &id).await {
                    problems.push(format!("container {id}: {e}"));
                }
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    match ctx.tasks.try_clone() {
        Ok(tasks) => {
            let name = attempt_dir(task_id, attempt);
            if let Err(e) = blocking(move || tasks.remove(&name)).await {
                problems.push(format!("the attempt's directory: {e}"));
            }
        }
        Err(e) => problems.push(format!("the attempts' directory: {e}")),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
