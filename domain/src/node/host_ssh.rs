//! Running a command on a node's host over SSH: an admin's request and its
//! result are events on the node, so every command run on a host is on its
//! timeline. The bounds here keep requests, results and the open requests
//! a node holds small.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Node, NodeError, NodeEvent, NodeStatus};
use crate::Actor;

/// The longest host SSH command, in bytes.
pub const MAX_HOST_SSH_COMMAND_BYTES: usize = 4096;

/// The longest time limit of a host SSH command, in seconds.
pub const MAX_HOST_SSH_TIMEOUT_S: u64 = 600;

/// The most output bytes a host SSH result keeps.
pub const MAX_HOST_SSH_OUTPUT_BYTES: usize = 64 * 1024;

/// The longest error text a host SSH result keeps, in bytes.
pub const MAX_HOST_SSH_ERROR_BYTES: usize = 1024;

/// How long after its time limit the answer to a host SSH request is
/// awaited: delivery, the SSH handshake and the way back. Past it, whoever
/// waits records that no answer came.
pub const HOST_SSH_ANSWER_GRACE_S: u64 = 15;

/// How long after its answer was due an unfinished host SSH request is
/// forgotten by the aggregate, so that one whose waiter died never keeps
/// the node's state growing.
pub const HOST_SSH_FORGET_AFTER_S: u64 = 300;

/// The most host SSH requests open on one node at once.
pub const MAX_OPEN_HOST_SSH: usize = 8;

/// Checks an admin's host SSH command and time limit.
///
/// # Errors
/// A [`crate::spec::FieldError`] naming `command` or `timeout_s`.
pub fn validate_host_ssh(command: &str, timeout_s: u64) -> Result<(), crate::spec::FieldError> {
    use crate::spec::FieldError;
    if command.trim().is_empty() {
        return Err(FieldError::new("command", "must not be empty"));
    }
    if command.len() > MAX_HOST_SSH_COMMAND_BYTES {
        return Err(FieldError::new(
            "command",
            format!("must be at most {MAX_HOST_SSH_COMMAND_BYTES} bytes"),
        ));
    }
    if command.contains('\0') {
        return Err(FieldError::new(
            "command",
            "must not contain NUL characters",
        ));
    }
    if !(1..=MAX_HOST_SSH_TIMEOUT_S).contains(&timeout_s) {
        return Err(FieldError::new(
            "timeout_s",
            format!("must be 1 to {MAX_HOST_SSH_TIMEOUT_S} seconds"),
        ));
    }
    Ok(())
}

/// How a host SSH command ended, as the node reported it (or as the waiter
/// recorded it when no answer came).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostSshOutcome {
    /// The SSH client's exit status; `None` when it was killed at the time
    /// limit or never ran.
    pub exit_code: Option<i32>,
    /// Standard output and error, at most [`MAX_HOST_SSH_OUTPUT_BYTES`].
    pub output: String,
    /// Whether output beyond the limit was dropped.
    pub truncated: bool,
    /// Whether the time limit stopped it.
    pub timed_out: bool,
    /// How long it ran, in milliseconds.
    pub duration_ms: u64,
    /// Why it did not run, or why no answer came.
    pub error: Option<String>,
}

/// A host SSH request that has not ended yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenHostSsh {
    /// The command line.
    pub command: String,
    /// The time limit in seconds.
    pub timeout_s: u64,
    /// Who asked.
    pub by: Actor,
    /// When.
    pub at: DateTime<Utc>,
}

impl OpenHostSsh {
    /// When the time limit of the command ends, counted from the request:
    /// the command must not start on the node after this.
    pub fn time_limit_ends(&self) -> DateTime<Utc> {
        self.at + seconds(self.timeout_s)
    }

    /// When the answer is due at the latest.
    pub fn answer_due(&self) -> DateTime<Utc> {
        self.time_limit_ends() + seconds(HOST_SSH_ANSWER_GRACE_S)
    }

    /// Whether the request's answer is so long overdue that it is dropped.
    fn forgotten_by(&self, now: DateTime<Utc>) -> bool {
        now > self.answer_due() + seconds(HOST_SSH_FORGET_AFTER_S)
    }
}

/// `s` seconds, saturating far beyond any bound here.
fn seconds(s: u64) -> chrono::Duration {
    chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000))
}

impl Node {
    /// Decides on a new request: the node must be online, the command
    /// acceptable and fewer than [`MAX_OPEN_HOST_SSH`] waiting; the same
    /// request again appends nothing.
    pub(super) fn request_host_ssh(
        &self,
        request_id: Uuid,
        command: String,
        timeout_s: u64,
        by: Actor,
        at: DateTime<Utc>,
    ) -> Result<Vec<NodeEvent>, NodeError> {
        match self.status {
            NodeStatus::Revoked => return Err(NodeError::Revoked),
            NodeStatus::Online => {}
            _ => return Err(NodeError::NotOnline),
        }
        validate_host_ssh(&command, timeout_s)
            .map_err(|e| NodeError::InvalidHostSsh(format!("{}: {}", e.field, e.reason)))?;
        if let Some(open) = self.host_ssh.get(&request_id) {
            // The same request again changes nothing; another under its id
            // is refused.
            return if open.command == command && open.timeout_s == timeout_s && open.by == by {
                Ok(vec![])
            } else {
                Err(NodeError::InvalidHostSsh(format!(
                    "request {request_id} exists already"
                )))
            };
        }
        let waiting = self
            .host_ssh
            .values()
            .filter(|open| at <= open.answer_due())
            .count();
        if waiting >= MAX_OPEN_HOST_SSH {
            return Err(NodeError::TooManyHostSsh);
        }
        Ok(vec![NodeEvent::HostSshRequested {
            request_id,
            command,
            timeout_s,
            by,
            at,
        }])
    }

    /// Decides on a result: it must answer an open request and fit the
    /// output and error bounds.
    pub(super) fn finish_host_ssh(
        &self,
        request_id: Uuid,
        result: HostSshOutcome,
        at: DateTime<Utc>,
    ) -> Result<Vec<NodeEvent>, NodeError> {
        if !self.host_ssh.contains_key(&request_id) {
            return Err(NodeError::UnknownHostSsh(request_id));
        }
        if result.output.len() > MAX_HOST_SSH_OUTPUT_BYTES {
            return Err(NodeError::InvalidHostSsh(format!(
                "output must be at most {MAX_HOST_SSH_OUTPUT_BYTES} bytes"
            )));
        }
        if result
            .error
            .as_ref()
            .is_some_and(|e| e.len() > MAX_HOST_SSH_ERROR_BYTES)
        {
            return Err(NodeError::InvalidHostSsh(format!(
                "error must be at most {MAX_HOST_SSH_ERROR_BYTES} bytes"
            )));
        }
        Ok(vec![NodeEvent::HostSshFinished {
            request_id,
            result,
            at,
        }])
    }

    /// Notes a new open request, first forgetting those whose answer is
    /// long overdue.
    pub(super) fn open_host_ssh(&mut self, request_id: Uuid, open: OpenHostSsh) {
        self.host_ssh.retain(|_, o| !o.forgotten_by(open.at));
        self.host_ssh.insert(request_id, open);
    }
}
