//! Host SSH: an admin's command for a node's host and how it ended.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The time limit when a request names none, in seconds.
pub const DEFAULT_TIMEOUT_S: u64 = 30;

/// The body of `POST /api/v1/nodes/{id}/host-ssh`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunHostSsh {
    /// The command line, run by the remote user's shell on the node's host:
    /// 1 to 4096 bytes, no NUL characters.
    #[schema(
        example = "nvidia-smi; uptime",
        min_length = 1,
        max_length = 4096,
        pattern = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"
    )]
    pub command: String,
    /// The hard time limit in seconds, 1 to 600 (default 30). The SSH
    /// client is killed when it is reached.
    #[serde(default)]
    #[schema(example = 30, minimum = 1, maximum = 600)]
    pub timeout_s: Option<u64>,
}

/// How a host command ended.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HostSshResult {
    /// The request, as the node's timeline names it.
    pub request_id: Uuid,
    /// The exit status of the SSH client: the remote command's, or 255
    /// when SSH itself failed (see `output`). `null` when the time limit
    /// killed it.
    pub exit_code: Option<i32>,
    /// Standard output and error as they came, at most 64 KiB.
    pub output: String,
    /// Whether output beyond 64 KiB was dropped.
    pub truncated: bool,
    /// Whether the time limit stopped the command.
    pub timed_out: bool,
    /// How long it ran, in milliseconds.
    pub duration_ms: u64,
    /// Why it did not run, if it did not.
    pub error: Option<String>,
}

impl HostSshResult {
    /// The result of request `request_id` as recorded.
    pub fn new(request_id: Uuid, outcome: domain::node::HostSshOutcome) -> Self {
        Self {
            request_id,
            exit_code: outcome.exit_code,
            output: outcome.output,
            truncated: outcome.truncated,
            timed_out: outcome.timed_out,
            duration_ms: outcome.duration_ms,
            error: outcome.error,
        }
    }
}
