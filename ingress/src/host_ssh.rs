//! Host SSH requests: an admin's command for a node's host, delivered to
//! the node's session while the admin still waits, and its result turned
//! into `NodeHostSshFinished`.
//!
//! Unlike `run_task`, a host command is an emergency measure with a person
//! waiting for it, so it must never start long after that person stopped
//! waiting. Every time it is sent (from the outbox, or again after a
//! reconnect) its time limit is cut to what is left of the admin's window
//! (`requested at + timeout_s + START_SLACK`), and once less than a second
//! is left it is not sent at all. The command therefore always ends before
//! the API gives up on it (`HOST_SSH_ANSWER_GRACE_S` after its limit).
//!
//! A session whose agent did not declare a host SSH target in its `hello`
//! gets no command: the request is finished at once with an error that
//! says how to configure one, so an old or unconfigured agent never leaves
//! the admin waiting.

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::node::{
    HostSshOutcome, Node, NodeCommand, NodeError, NodeEvent, OpenHostSsh, MAX_HOST_SSH_OUTPUT_BYTES,
};
use domain::Actor;
use protocol::{Command, HostSsh, HostSshResult, ServerMessage};
use store::outbox::RecordedEvent;
use store::{Store, StoreError};
use uuid::Uuid;

use crate::reports::Answer;

/// How long past its time limit (counted from the request) a host command
/// may still be running on the node. Well inside the API's grace, so the
/// answer arrives before the API gives up.
pub(crate) const START_SLACK: Duration = Duration::from_secs(5);

/// The error recorded for a node whose agent has no host SSH target.
pub(crate) const NOT_CONFIGURED: &str =
    "this node has no host SSH target configured; start the agent with --host-ssh";

/// A host command waiting to be sent to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pending {
    /// The request.
    pub request_id: Uuid,
    /// The command line.
    pub command: String,
    /// The admin's time limit in seconds.
    pub timeout_s: u64,
    /// When the admin asked.
    pub requested_at: DateTime<Utc>,
}

impl Pending {
    /// From an open request of the Node aggregate.
    pub(crate) fn open(request_id: Uuid, open: &OpenHostSsh) -> Self {
        Self {
            request_id,
            command: open.command.clone(),
            timeout_s: open.timeout_s,
            requested_at: open.at,
        }
    }

    /// From a `NodeHostSshRequested` in the outbox; `None` for any other
    /// event.
    pub(crate) fn requested(event: &RecordedEvent) -> Option<Self> {
        match serde_json::from_value::<NodeEvent>(event.payload.clone()).ok()? {
            NodeEvent::HostSshRequested {
                request_id,
                command,
                timeout_s,
                at,
                ..
            } => Some(Self {
                request_id,
                command,
                timeout_s,
                requested_at: at,
            }),
            _ => None,
        }
    }

    /// The time limit to give the agent at `now`: the admin's, cut to what
    /// is left of the window; `None` when less than a second is left.
    pub(crate) fn limit_at(&self, now: DateTime<Utc>) -> Option<u64> {
        let window_ends = self.requested_at
            + chrono::Duration::seconds(i64::try_from(self.timeout_s).unwrap_or(i64::MAX / 2000))
            + chrono::Duration::from_std(START_SLACK).unwrap_or_default();
        let left = (window_ends - now).num_seconds();
        let left = u64::try_from(left).ok().filter(|s| *s >= 1)?;
        Some(left.min(self.timeout_s))
    }

    /// The `command` frame to send at `now`, or `None` when it is too late
    /// to start the command.
    pub(crate) fn frame(&self, now: DateTime<Utc>) -> Option<String> {
        let timeout_s = self.limit_at(now)?;
        let message = ServerMessage::Command {
            command_id: protocol::host_ssh_command_id(self.request_id),
            command: Command::HostSsh(HostSsh {
                request_id: self.request_id,
                command: self.command.clone(),
                timeout_s,
                output_limit: MAX_HOST_SSH_OUTPUT_BYTES as u64,
            }),
        };
        Some(protocol::encode(&message))
    }
}

/// The host commands node `node_id`'s new session should still get: its
/// open requests whose window has not closed, oldest first.
///
/// # Errors
/// The store's error loading the node.
pub(crate) async fn pending(
    store: &Store,
    node_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Vec<Pending>, StoreError<NodeError>> {
    let Some(node) = store.load::<Node>(&node_id.to_string()).await? else {
        return Ok(Vec::new());
    };
    let mut pending: Vec<Pending> = node
        .state
        .host_ssh
        .iter()
        .map(|(id, open)| Pending::open(*id, open))
        .filter(|p| p.limit_at(now).is_some())
        .collect();
    pending.sort_by_key(|p| p.requested_at);
    Ok(pending)
}

/// Finishes request `request_id` on node `node_id` with `error` and no
/// output, on behalf of the platform: for a node that cannot run it.
pub(crate) async fn refuse(store: &Store, node_id: Uuid, request_id: Uuid, error: &str) {
    let at = Utc::now();
    let command = NodeCommand::FinishHostSsh {
        request_id,
        result: HostSshOutcome {
            error: Some(error.to_string()),
            ..HostSshOutcome::default()
        },
        at,
    };
    let actor = Actor::System("ingress".into());
    match store
        .execute::<Node>(&node_id.to_string(), command, &actor, at)
        .await
    {
        Ok(_) | Err(StoreError::Rejected(NodeError::UnknownHostSsh(_))) => {}
        Err(e) => {
            tracing::warn!(%node_id, %request_id, error = %e, "recording a refused host SSH request failed");
        }
    }
}

/// The outcome to record for a result from an agent, bounded by
/// [`HostSshResult::bounded`] (its limits are the aggregate's).
pub(crate) fn outcome(result: HostSshResult) -> HostSshOutcome {
    let result = result.bounded();
    HostSshOutcome {
        exit_code: result.exit_code,
        output: result.output,
        truncated: result.truncated,
        timed_out: result.timed_out,
        duration_ms: result.duration_ms,
        error: result.error,
    }
}

/// Records the result of a host command that node `node_id` reports. The
/// request must be one of this node's own that still waits; a late answer
/// (the API already recorded that none came) is refused for good.
pub(crate) async fn finish(store: &Store, node_id: Uuid, result: HostSshResult) -> Answer {
    let at = Utc::now();
    let request_id = result.request_id;
    let command = NodeCommand::FinishHostSsh {
        request_id,
        result: outcome(result),
        at,
    };
    let actor = Actor::Node(node_id.to_string());
    match store
        .execute::<Node>(&node_id.to_string(), command, &actor, at)
        .await
    {
        Ok(_) => Answer::Stored,
        Err(StoreError::Rejected(NodeError::UnknownHostSsh(id))) => Answer::Refused(format!(
            "host SSH request {id} is not waiting for a result from this node (it ended, or the answer came too late)"
        )),
        Err(StoreError::Rejected(e)) => Answer::Refused(e.to_string()),
        Err(StoreError::Unstorable { sqlstate, message }) => {
            tracing::warn!(%node_id, %request_id, sqlstate, error = %message, "the database refused a host SSH result");
            Answer::Unstorable(crate::reports::unstorable(&sqlstate))
        }
        Err(e) => Answer::Later(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use domain::node::MAX_HOST_SSH_ERROR_BYTES;

    use super::*;

    fn pending(timeout_s: u64) -> Pending {
        Pending {
            request_id: Uuid::from_u128(1),
            command: "uptime".into(),
            timeout_s,
            requested_at: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
        }
    }

    fn after(p: &Pending, s: i64) -> DateTime<Utc> {
        p.requested_at + chrono::Duration::seconds(s)
    }

    #[test]
    fn a_host_command_gets_what_is_left_of_the_admins_window() {
        let p = pending(30);
        assert_eq!(p.limit_at(after(&p, 0)), Some(30));
        assert_eq!(p.limit_at(after(&p, 10)), Some(25));
        assert_eq!(p.limit_at(after(&p, 34)), Some(1));
        assert_eq!(p.limit_at(after(&p, 35)), None);
        assert_eq!(p.frame(after(&p, 600)), None);
    }

    #[test]
    fn a_host_command_frame_carries_its_stable_id_and_cut_limit() {
        let p = pending(30);
        let frame = p.frame(after(&p, 20)).unwrap();
        let Ok(ServerMessage::Command {
            command_id,
            command: Command::HostSsh(sent),
        }) = protocol::decode::<ServerMessage>(&frame)
        else {
            panic!("not a host_ssh command: {frame}")
        };
        assert_eq!(command_id, protocol::host_ssh_command_id(p.request_id));
        assert_eq!(sent.timeout_s, 15);
        assert_eq!(sent.command, "uptime");
    }

    #[test]
    fn results_are_cut_to_their_limits_and_lose_nul_characters() {
        let result = HostSshResult {
            id: 1,
            request_id: Uuid::nil(),
            exit_code: Some(0),
            output: format!("a\0{}", "é".repeat(MAX_HOST_SSH_OUTPUT_BYTES)),
            truncated: false,
            timed_out: false,
            duration_ms: 3,
            error: Some("x".repeat(MAX_HOST_SSH_ERROR_BYTES * 2)),
        };
        let o = outcome(result);
        assert!(o.truncated);
        assert!(o.output.len() <= MAX_HOST_SSH_OUTPUT_BYTES);
        assert!(o.output.starts_with("a\u{fffd}é"));
        assert!(o.error.unwrap().len() <= MAX_HOST_SSH_ERROR_BYTES);
        // The wire's limits are the aggregate's.
        assert_eq!(
            protocol::bounds::MAX_HOST_SSH_ERROR_BYTES,
            MAX_HOST_SSH_ERROR_BYTES
        );
        assert_eq!(
            protocol::MAX_HOST_SSH_OUTPUT_BYTES,
            MAX_HOST_SSH_OUTPUT_BYTES
        );
    }
}
