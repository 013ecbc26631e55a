//! What the platform wants of a node, as `run_task` and `cancel_task`
//! frames.
//!
//! Commands are never stored: they are read off the tasks themselves. A
//! task assigned to a node and not yet accepted wants `run_task`; a task
//! still holding a node after a cancel request wants `cancel_task`. So a
//! command stays wanted until the agent reports on it, and every reconnect
//! sends it again under the same `command_id`, which the agent uses to drop
//! what it has already handled.

use std::collections::{BTreeSet, HashSet};

use chrono::Utc;
use domain::spec::TaskSpec;
use domain::task::{Task, TaskCommand, TaskState};
use domain::Actor;
use protocol::{Command, RunTask, ServerMessage};
use sqlx::PgPool;
use store::outbox::{self, Checkpoint, Filter};
use store::{Store, StoreError};
use uuid::Uuid;

/// The checkpoint name of the read model that fills `task_view`. Events
/// after it are not in `task_view` yet and are read from the outbox.
pub(crate) const TASK_VIEW_CHECKPOINT: &str = projections::read::tasks::CHECKPOINT;

/// The most outbox events read, per connecting agent, to cover what the
/// projector has not yet written to `task_view`. The projector normally
/// lags by milliseconds; when it is this far behind, later assignments
/// reach the agent through the outbox consumer or its next reconnect.
pub(crate) const MAX_PROJECTION_GAP: i64 = 5_000;

/// Why the wanted commands could not be worked out or delivered.
#[derive(Debug, thiserror::Error)]
pub enum PendingError {
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A task could not be loaded.
    #[error("loading task {task_id}: {reason}")]
    Load {
        /// The task.
        task_id: Uuid,
        /// Why.
        reason: String,
    },
}

/// One command for an agent, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    /// The task it is about.
    pub task_id: Uuid,
    /// `run_task` or `cancel_task`.
    pub kind: &'static str,
    /// The frame.
    pub frame: String,
}

/// The `cancel_task` frame for an attempt.
pub(crate) fn cancel_task(task_id: Uuid, attempt: u32, grace_s: u64) -> Encoded {
    let message = ServerMessage::Command {
        command_id: protocol::command_id("cancel_task", task_id, attempt),
        command: Command::CancelTask {
            task_id,
            attempt,
            grace_s,
        },
    };
    Encoded {
        task_id,
        kind: "cancel_task",
        frame: protocol::encode(&message),
    }
}

/// The `run_task` message for attempt `attempt` of task `task_id`, run
/// with `spec` on the node's GPUs `gpus`: the one conversion of a task into
/// what its agent is sent, used to deliver it and, at submission, to
/// measure it ([`check_run_task_fits`]).
pub fn run_task_message(
    task_id: Uuid,
    attempt: u32,
    spec: &TaskSpec,
    gpus: &[u32],
) -> ServerMessage {
    ServerMessage::Command {
        command_id: protocol::command_id("run_task", task_id, attempt),
        command: Command::RunTask(RunTask {
            task_id,
            attempt,
            code_repo_url: spec.code_repo_url.as_str().to_string(),
            code_commit_id: spec.code_commit_id.as_str().to_string(),
            env_repo_url: spec.env_repo_url.as_str().to_string(),
            env_commit_id: spec.env_commit_id.as_str().to_string(),
            dockerfile_path: spec.dockerfile_path.as_str().to_string(),
            command: spec.command.clone(),
            env: spec.env.clone(),
            cpus: spec.resources.cpus,
            memory_mb: spec.resources.memory_mb,
            gpus: gpus.to_vec(),
            timeout_s: spec.timeout_s,
            inputs: spec
                .inputs
                .iter()
                .map(|i| protocol::TaskInput {
                    name: i.name.to_string(),
                    object: i.object.to_string(),
                })
                .collect(),
            outputs: spec
                .outputs
                .iter()
                .map(|o| protocol::TaskOutput {
                    name: o.name.to_string(),
                    path: o.path.to_string(),
                })
                .collect(),
            network: match spec.network {
                domain::spec::TaskNetwork::Node => protocol::TaskNetwork::Node,
                domain::spec::TaskNetwork::None => protocol::TaskNetwork::None,
            },
            env_secrets: spec
                .env_secrets
                .iter()
                .map(|(var, secret)| (var.clone(), secret.to_string()))
                .collect(),
            code_credential: spec.git_credentials.code.as_ref().map(|n| n.to_string()),
            env_credential: spec.git_credentials.env.as_ref().map(|n| n.to_string()),
            known_hosts: spec
                .git_credentials
                .known_hosts
                .as_ref()
                .map(|n| n.to_string()),
        }),
    }
}

/// A task's `run_task` does not fit in one frame to its agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the task's run_task command to its agent would be {bytes} bytes, more than the \
     {limit} bytes one frame may carry; shorten its command or environment"
)]
pub struct TooLargeForFrame {
    /// The encoded command's size in bytes.
    pub bytes: usize,
    /// [`protocol::MAX_FRAME_BYTES`].
    pub limit: usize,
}

/// Checks that every `run_task` a task with `spec` can ever be sent fits
/// in one frame, whatever attempt and GPUs the scheduler later gives it:
/// the command is encoded with the widest values those can take (attempt
/// and GPU indices of `u32::MAX`, as many GPUs as the spec asks for).
/// Returns that size.
///
/// # Errors
/// [`TooLargeForFrame`] naming the size and the limit.
pub fn check_run_task_fits(task_id: Uuid, spec: &TaskSpec) -> Result<usize, TooLargeForFrame> {
    // More GPU indices than a frame has bytes can never fit: building
    // that many already measures too large.
    let wanted = usize::try_from(spec.resources.gpus).unwrap_or(usize::MAX);
    let gpus = vec![u32::MAX; wanted.min(protocol::MAX_FRAME_BYTES)];
    let bytes = protocol::encode(&run_task_message(task_id, u32::MAX, spec, &gpus)).len();
    if bytes > protocol::MAX_FRAME_BYTES {
        return Err(TooLargeForFrame {
            bytes,
            limit: protocol::MAX_FRAME_BYTES,
        });
    }
    Ok(bytes)
}

/// The `run_task` frame for a task's current attempt; `None` for a task
/// without a spec.
///
/// # Errors
/// [`TooLargeForFrame`] when the frame would exceed
/// [`protocol::MAX_FRAME_BYTES`] (the agent would refuse it);
/// [`load_task`] fails such a task before it gets here.
pub(crate) fn run_task(task: &Task) -> Result<Option<Encoded>, TooLargeForFrame> {
    let (Some(task_id), Some(spec)) = (task.id, task.spec.as_ref()) else {
        return Ok(None);
    };
    let message = run_task_message(task_id, task.attempt, spec, task.gpus());
    let frame = protocol::encode(&message);
    if frame.len() > protocol::MAX_FRAME_BYTES {
        return Err(TooLargeForFrame {
            bytes: frame.len(),
            limit: protocol::MAX_FRAME_BYTES,
        });
    }
    Ok(Some(Encoded {
        task_id,
        kind: "run_task",
        frame,
    }))
}

/// What `task` wants of node `node_id` right now, in the order to send it.
/// Attempts in `running` are already running on the node and get no
/// `run_task`.
///
/// An attempt asked to cancel before its node accepted it gets
/// `cancel_task` and then `run_task`: the agent remembers the cancel, and
/// when the run arrives it reports the attempt cancelled without starting
/// it (an agent never reports on an attempt it was never asked to run).
pub(crate) fn wanted(
    task: &Task,
    node_id: Uuid,
    running: &HashSet<(Uuid, u32)>,
    grace_s: u64,
) -> Vec<Encoded> {
    let Some(task_id) = task.id else {
        return Vec::new();
    };
    if task.node_id != Some(node_id) || !task.state.holds_node() {
        return Vec::new();
    }
    let mut wanted = Vec::new();
    if task.cancel_requested {
        wanted.push(cancel_task(task_id, task.attempt, grace_s));
    }
    if task.state == TaskState::Assigned && !running.contains(&(task_id, task.attempt)) {
        match run_task(task) {
            Ok(run) => wanted.extend(run),
            // Not loaded through `load_task`, which fails such a task.
            Err(e) => tracing::error!(%task_id, error = %e, "run_task cannot be delivered"),
        }
    }
    wanted
}

/// `cancel_task` for attempt `attempt` of `task` when the platform gave it
/// up (lost, or timed out by the server's watchdog) while its node may still
/// run it, with the node to send it to. The agent ignores a cancel for an
/// attempt it no longer runs.
pub(crate) fn stop_given_up(task: &Task, attempt: u32, grace_s: u64) -> Option<(Uuid, Encoded)> {
    let task_id = task.id?;
    let a = task.attempts.iter().find(|a| a.number == attempt)?;
    let given_up = matches!(a.outcome.as_deref(), Some("lost" | "timed_out"));
    given_up.then(|| (a.node_id, cancel_task(task_id, attempt, grace_s)))
}

/// Loads task `task_id`; `None` when it does not exist.
///
/// An assigned task whose `run_task` cannot fit a frame (one submitted
/// before the API measured commands at submission) is failed here with
/// the reason, and returned failed: every path that delivers commands
/// loads its tasks through this, so no command is ever left undeliverable
/// in silence with its task holding a node.
///
/// # Errors
/// [`PendingError::Load`] when the log cannot be read or written.
pub(crate) async fn load_task(store: &Store, task_id: Uuid) -> Result<Option<Task>, PendingError> {
    let task = store
        .load::<Task>(&task_id.to_string())
        .await
        .map(|loaded| loaded.map(|l| l.state))
        .map_err(|e| PendingError::Load {
            task_id,
            reason: e.to_string(),
        })?;
    let Some(task) = task else { return Ok(None) };
    deliverable(store, task_id, task).await
}

/// Task `task_id` as of its event `sequence` or later: as this process
/// remembers it when it remembers it that far (it appended that event
/// itself, so no load is needed), else as [`load_task`] loads it. Checked
/// for a `run_task` that cannot be delivered like [`load_task`]'s.
///
/// # Errors
/// As [`load_task`].
pub(crate) async fn task_since(
    store: &Store,
    task_id: Uuid,
    sequence: i64,
) -> Result<Option<Task>, PendingError> {
    match store.remembered::<Task>(&task_id.to_string()) {
        Some(known) if known.sequence as i64 >= sequence => {
            deliverable(store, task_id, known.state).await
        }
        _ => load_task(store, task_id).await,
    }
}

/// `task` itself, or, when it is assigned and its `run_task` cannot fit a
/// frame, the task failed for it (see [`load_task`]).
async fn deliverable(
    store: &Store,
    task_id: Uuid,
    task: Task,
) -> Result<Option<Task>, PendingError> {
    let load_error = |reason: String| PendingError::Load { task_id, reason };
    if task.state != TaskState::Assigned {
        return Ok(Some(task));
    }
    let Err(too_large) = run_task(&task) else {
        return Ok(Some(task));
    };
    tracing::warn!(%task_id, attempt = task.attempt, error = %too_large, "failing a task whose run_task cannot be delivered");
    let at = Utc::now();
    let command = TaskCommand::FailUndeliverable {
        attempt: task.attempt,
        reason: format!("cannot be delivered to its node: {too_large}"),
        at,
    };
    let actor = Actor::System("ingress".into());
    match store
        .execute::<Task>(&task_id.to_string(), command, &actor, at)
        .await
    {
        Ok(executed) => Ok(Some(executed.state)),
        // Its state moved on meanwhile (cancelled, lost, failed by another
        // replica): whatever it is now decides.
        Err(StoreError::Rejected(_)) => store
            .load::<Task>(&task_id.to_string())
            .await
            .map(|loaded| loaded.map(|l| l.state))
            .map_err(|e| load_error(e.to_string())),
        Err(e) => Err(load_error(e.to_string())),
    }
}

/// The tasks that may want something of node `node_id`: those `task_view`
/// shows holding it, and those the outbox shows assigned to it or asked to
/// cancel since the projector's checkpoint.
///
/// The checkpoint is read before `task_view`, and the projector writes both
/// in one transaction, so the view read is at least as new as the
/// checkpoint and nothing falls between the two.
///
/// # Errors
/// A database error.
pub(crate) async fn candidates(
    pool: &PgPool,
    node_id: Uuid,
) -> Result<BTreeSet<Uuid>, sqlx::Error> {
    let from: Option<(i64, i64)> =
        sqlx::query_as("SELECT txid, position FROM checkpoints WHERE name = $1")
            .bind(TASK_VIEW_CHECKPOINT)
            .fetch_optional(pool)
            .await?;
    let mut at = from
        .map(|(txid, position)| Checkpoint { txid, position })
        .unwrap_or_default();
    let mut ids: BTreeSet<Uuid> = projections::read::tasks::held_by(pool, node_id)
        .await?
        .into_iter()
        .collect();
    let filter = Filter {
        aggregate_type: Some("task".into()),
        aggregate_id: None,
    };
    let mut read = 0;
    while read < MAX_PROJECTION_GAP {
        let events = outbox::read_after(pool, at, 500, &filter).await?;
        let Some(last) = events.last() else { break };
        at = last.checkpoint();
        read += events.len() as i64;
        for event in &events {
            let wanted = match event.event_type.as_str() {
                "TaskAssigned" => assigned_node(event.body()) == Some(node_id),
                "TaskCancelRequested" => true,
                _ => false,
            };
            if let (true, Ok(id)) = (wanted, Uuid::try_parse(&event.aggregate_id)) {
                ids.insert(id);
            }
        }
    }
    if read >= MAX_PROJECTION_GAP {
        tracing::warn!(
            %node_id,
            "task_view is more than {MAX_PROJECTION_GAP} events behind; \
             pending commands may reach the agent late"
        );
    }
    Ok(ids)
}

/// The node of a `TaskAssigned` event's body.
pub(crate) fn assigned_node(body: &serde_json::Value) -> Option<Uuid> {
    body.get("node_id")
        .and_then(|n| n.as_str())
        .and_then(|n| Uuid::try_parse(n).ok())
}

#[cfg(test)]
mod tests {
    use domain::spec::{TaskSpecDraft, UrlPolicy};

    use super::*;

    fn spec(env_bytes: usize, gpus: i64) -> TaskSpec {
        let value = "v".repeat(domain::spec::limits::MAX_ENV_VALUE_BYTES);
        let vars = env_bytes / value.len();
        TaskSpecDraft {
            project_id: Some(Uuid::from_u128(1)),
            code_repo_url: Some("https://example.com/code.git".into()),
            code_commit_id: Some("a".repeat(40)),
            env_repo_url: Some("https://example.com/env.git".into()),
            env_commit_id: Some("b".repeat(40)),
            dockerfile_path: Some("Dockerfile".into()),
            env: Some(
                (0..vars)
                    .map(|i| (format!("V{i}"), value.clone()))
                    .collect(),
            ),
            resources: Some(domain::spec::ResourcesDraft {
                gpus: Some(gpus),
                ..Default::default()
            }),
            ..Default::default()
        }
        .validate(UrlPolicy::default())
        .expect("a valid spec")
    }

    #[test]
    fn a_spec_that_passes_the_check_fits_a_frame_for_every_attempt_and_placement() {
        let task_id = Uuid::now_v7();
        let spec = spec(224 * 1024, 8);
        let measured = check_run_task_fits(task_id, &spec).expect("fits");
        for (attempt, gpus) in [(1, vec![0, 1, 2, 3, 4, 5, 6, 7]), (101, vec![7; 8])] {
            let sent = protocol::encode(&run_task_message(task_id, attempt, &spec, &gpus)).len();
            assert!(sent <= measured, "{sent} > {measured}");
        }
    }

    #[test]
    fn a_spec_too_large_for_a_frame_is_named_with_its_size_and_the_limit() {
        let e = check_run_task_fits(Uuid::now_v7(), &spec(640 * 1024, 0)).expect_err("too large");
        assert!(e.bytes > 640 * 1024);
        assert_eq!(e.limit, protocol::MAX_FRAME_BYTES);
        let text = e.to_string();
        assert!(
            text.contains(&e.bytes.to_string()) && text.contains("262144"),
            "{text}"
        );
    }
}
