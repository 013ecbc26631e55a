//! The agent ↔ ingress protocol of UniDesk.
//!
//! An agent dials `wss://<server>/agent/v1/ws` with `Authorization: Bearer
//! <node token>`; the server never dials a node. Every frame is one JSON
//! text message with a `type` and the `protocol` version it was written
//! for. Unknown types, malformed JSON and frames over [`MAX_FRAME_BYTES`] are
//! answered with an [`ServerMessage::Error`] and the connection is closed.
//!
//! Delivery is at-least-once both ways:
//! - server → agent [`Command`]s carry a `command_id` derived from what they
//!   ask ([`command_id`]), are acknowledged with [`AgentMessage::Ack`], are
//!   sent again after every reconnect while still wanted, and the agent
//!   ignores an id it has already handled;
//! - agent → server [`Status`] reports, [`LogChunk`]s and
//!   [`HostSshResult`]s carry an agent-local `id`; the server answers
//!   [`ServerMessage::Received`] once the report is stored (or refused for
//!   good), and the agent resends whatever was not answered after it
//!   reconnects. Reports are idempotent on `(task, attempt, state)`, log
//!   chunks on `(task, attempt, offset)`, and a host SSH result is recorded
//!   once per request.
//!
//! A [`Command::HostSsh`] differs from task commands: an admin waits for it,
//! so the server resends it only while that admin's window is open, with
//! its time limit cut to what is left of the window.
//!
//! What the server keeps of each message (storable text, caps on every
//! text and list) is decided in [`bounds`].
//!
//! This crate depends on no other crate of the project, so the agent links
//! nothing of the server.

pub mod bounds;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The protocol version this build speaks: the `protocol` of every frame
/// it writes.
pub const VERSION: u32 = 1;

/// The oldest protocol version this build still reads. The server accepts
/// agents whose frames carry a version from `OLDEST_VERSION` to
/// [`VERSION`] (refusing others with `protocol_version`, naming the range),
/// so agents can be upgraded one by one after the server.
///
/// Within that range the protocol only grows: a new version may add
/// optional fields (absent ones read as their default) and new messages,
/// and the server sends a new message only to agents whose hello says they
/// speak it. A change an older agent could not read raises
/// `OLDEST_VERSION`. An agent reads frames of any version from
/// `OLDEST_VERSION` up, newer ones included ([`decode_newer`]), since the
/// server is upgraded first.
pub const OLDEST_VERSION: u32 = 1;

/// The WebSocket path on the server.
pub const PATH: &str = "/agent/v1/ws";

/// The largest frame either side accepts.
pub const MAX_FRAME_BYTES: usize = 256 * 1024;

/// The most log bytes an agent puts in one [`LogChunk`].
pub const MAX_LOG_CHUNK_BYTES: usize = 64 * 1024;

/// The most output bytes a [`HostSshResult`] carries: a host probe is for
/// a person to read, and its result must fit in one frame.
pub const MAX_HOST_SSH_OUTPUT_BYTES: usize = 64 * 1024;

/// The longest command a [`HostSsh`] may carry, in bytes.
pub const MAX_HOST_SSH_COMMAND_BYTES: usize = 4096;

/// The longest time limit of a [`HostSsh`], in seconds.
pub const MAX_HOST_SSH_TIMEOUT_S: u64 = 600;

/// Everything the agent sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The first message of every session.
    Hello(Hello),
    /// Sent every `heartbeat_s` seconds from [`ServerMessage::Welcome`].
    Heartbeat {
        /// Counts up within a session.
        seq: u64,
    },
    /// A command was received and will be handled.
    Ack {
        /// The command's id.
        command_id: Uuid,
    },
    /// A change of an attempt's state.
    Status(Status),
    /// Output of an attempt.
    Log(LogChunk),
    /// How a [`Command::HostSsh`] ended.
    HostSshResult(HostSshResult),
    /// What the node has cached now, sent when it changed during a session
    /// (a commit fetched, an image built); it replaces the hello's lists,
    /// so the scheduler's preference for cached nodes stays current.
    Cache(Cache),
    /// Asks for a presigned URL for one transfer of a task's input or
    /// output, right before the transfer; answered by
    /// [`ServerMessage::TransferUrl`] with the same `id`.
    TransferRequest(TransferRequest),
}

/// Everything the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[expect(
    clippy::large_enum_variant,
    reason = "a message lives for one frame; boxing its commands buys nothing"
)]
pub enum ServerMessage {
    /// The answer to a valid [`Hello`].
    Welcome {
        /// The node's id.
        node_id: Uuid,
        /// This session's id.
        session: Uuid,
        /// How often to send heartbeats.
        heartbeat_s: u64,
        /// The most output bytes the server stores per attempt; past it,
        /// one marker line and nothing more. An agent reads a container's
        /// output no further than that. Absent from older servers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output_limit_bytes: Option<u64>,
    },
    /// Something to do.
    Command {
        /// Identifies the command across resends.
        command_id: Uuid,
        /// What to do.
        command: Command,
    },
    /// A report, log chunk or host SSH result with this agent-local id is
    /// stored, or was refused for good (`error`); either way, do not send
    /// it again.
    Received {
        /// The report's id.
        id: u64,
        /// Why it was refused, if it was.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The answer to a [`AgentMessage::TransferRequest`].
    TransferUrl(TransferGrant),
    /// A problem with the session; the server closes it after this.
    Error {
        /// A stable code: `bad_frame`, `unknown_type`, `too_large`,
        /// `protocol_version`, `hello_expected`, `revoked`, `replaced`.
        code: String,
        /// What went wrong, for a person.
        message: String,
    },
}

/// What a node declares when it connects.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's version.
    pub agent_version: String,
    /// What the node has.
    pub resources: Resources,
    /// Labels the node declares: the server shows them but matches tasks
    /// only against labels an admin set or accepted.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Attempts the agent is still running.
    #[serde(default)]
    pub running: Vec<RunningAttempt>,
    /// What the node has cached, so the scheduler can prefer it.
    #[serde(default)]
    pub cache: Cache,
    /// Whether the agent was started with a host SSH target and so can run
    /// [`Command::HostSsh`]. Agents older than the field say nothing, which
    /// reads as `false`.
    #[serde(default)]
    pub host_ssh: bool,
}

/// A node's resources.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// CPU cores.
    pub cpus: f64,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// GPUs.
    #[serde(default)]
    pub gpus: Vec<Gpu>,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    /// The device index.
    pub index: u32,
    /// The model name.
    pub name: String,
    /// Memory in MiB.
    pub memory_mb: u64,
}

/// An attempt the agent still runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningAttempt {
    /// The task.
    pub task_id: Uuid,
    /// The attempt.
    pub attempt: u32,
    /// Its container, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// What a node has cached.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Cache {
    /// Image tags built from env repositories.
    #[serde(default)]
    pub images: Vec<String>,
    /// Commit ids present in the git cache.
    #[serde(default)]
    pub commits: Vec<String>,
}

/// The state an agent reports for an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedState {
    /// The agent took the attempt on.
    Accepted,
    /// Fetching code, building the image, fetching inputs (see `stage`).
    Preparing,
    /// The container started (see `container`).
    Running,
    /// Exit status 0.
    Succeeded,
    /// It failed (see `exit_code` and `message`).
    Failed,
    /// Stopped after a cancel command.
    Cancelled,
    /// Stopped at the task's time limit.
    TimedOut,
}

/// A report about one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Agent-local id, answered by [`ServerMessage::Received`].
    pub id: u64,
    /// The task.
    pub task_id: Uuid,
    /// The attempt.
    pub attempt: u32,
    /// The new state.
    pub state: ReportedState,
    /// With `preparing`: which step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// With `running`: the container id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// With `failed`: the exit status, if the command ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// With `failed`: why, for a person; with `preparing`: what the step
    /// found (`from cache`, `fetched 12 objects`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// With `failed`: the node, not the task, kept the attempt from its
    /// end (its Docker did not answer), so the server gives the attempt up
    /// as lost and retries the task while `max_retries` allows. Only a
    /// `failed` report may carry it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node_fault: bool,
}

/// A piece of an attempt's output (stdout and stderr interleaved).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogChunk {
    /// Agent-local id, answered by [`ServerMessage::Received`].
    pub id: u64,
    /// The task.
    pub task_id: Uuid,
    /// The attempt.
    pub attempt: u32,
    /// Byte offset of `data` in the attempt's output.
    pub offset: u64,
    /// The bytes, as UTF-8 (invalid sequences replaced).
    pub data: String,
}

/// What the server asks of an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[expect(
    clippy::large_enum_variant,
    reason = "a command is decoded, handled and dropped; boxing buys nothing"
)]
pub enum Command {
    /// Run an attempt of a task.
    RunTask(RunTask),
    /// Stop an attempt: SIGTERM, `grace_s` seconds, then SIGKILL.
    CancelTask {
        /// The task.
        task_id: Uuid,
        /// The attempt.
        attempt: u32,
        /// Seconds between SIGTERM and SIGKILL.
        grace_s: u64,
    },
    /// Run one command on the node's own host over SSH, for emergency
    /// maintenance; never part of a task.
    HostSsh(HostSsh),
}

/// An admin's command for the node's host, run by the agent over SSH to the
/// target it was started with (`--host-ssh`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSsh {
    /// The request, named again in the [`HostSshResult`].
    pub request_id: Uuid,
    /// The command line, run by the remote user's shell; at most
    /// [`MAX_HOST_SSH_COMMAND_BYTES`].
    pub command: String,
    /// The hard limit: the SSH client is killed after this many seconds,
    /// counted from when the agent starts it.
    pub timeout_s: u64,
    /// The most output bytes to keep; the agent never keeps more than
    /// [`MAX_HOST_SSH_OUTPUT_BYTES`].
    pub output_limit: u64,
}

/// How a [`HostSsh`] ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSshResult {
    /// Agent-local id, answered by [`ServerMessage::Received`].
    pub id: u64,
    /// The request.
    pub request_id: Uuid,
    /// The SSH client's exit status (the remote command's, or 255 when SSH
    /// itself failed); `None` when it was killed or never started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Standard output and standard error as they came, as UTF-8 (invalid
    /// sequences replaced), cut at the output limit.
    #[serde(default)]
    pub output: String,
    /// Whether output was dropped beyond the limit.
    #[serde(default)]
    pub truncated: bool,
    /// Whether the time limit killed the command.
    #[serde(default)]
    pub timed_out: bool,
    /// How long it ran, in milliseconds.
    #[serde(default)]
    pub duration_ms: u64,
    /// Why the command could not run at all (no host SSH target, no `ssh`
    /// client, too many at once), for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Everything an agent needs to run one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunTask {
    /// The task.
    pub task_id: Uuid,
    /// The attempt.
    pub attempt: u32,
    /// The code repository.
    pub code_repo_url: String,
    /// The full code commit id.
    pub code_commit_id: String,
    /// The env repository.
    pub env_repo_url: String,
    /// The full env commit id.
    pub env_commit_id: String,
    /// The Dockerfile inside the env repository, relative and normalised.
    pub dockerfile_path: String,
    /// The argv; empty runs the image's default command.
    pub command: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// CPU cores for the container.
    pub cpus: f64,
    /// Memory limit in MiB.
    pub memory_mb: u64,
    /// GPU device indices handed to this attempt.
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// Wall-clock limit of the run, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Objects to download into the workspace before the command runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<TaskInput>,
    /// Workspace files to upload once the command ended, also when it
    /// failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<TaskOutput>,
    /// The network the task asked for; the node's own choice when absent.
    #[serde(default, skip_serializing_if = "TaskNetwork::is_node_default")]
    pub network: TaskNetwork,
    /// Environment variables set from project secrets: variable to the
    /// secret's name. The values are asked for with
    /// [`TransferOp::Secrets`] when the attempt needs them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_secrets: BTreeMap<String, String>,
    /// The secret git fetches `code_repo_url` with, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_credential: Option<String>,
    /// The secret git fetches `env_repo_url` with, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_credential: Option<String>,
    /// The secret holding `known_hosts` lines the repositories' SSH hosts
    /// are checked against, besides the node's own, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<String>,
}

impl RunTask {
    /// Whether the attempt needs any secret.
    pub fn needs_secrets(&self) -> bool {
        !self.env_secrets.is_empty()
            || self.code_credential.is_some()
            || self.env_credential.is_some()
            || self.known_hosts.is_some()
    }
}

/// The network of a [`RunTask`]'s container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskNetwork {
    /// What the node runs tasks with (its `--task-network`).
    #[default]
    Node,
    /// No network: only a loopback interface.
    None,
}

impl TaskNetwork {
    /// Whether the node chooses.
    pub fn is_node_default(&self) -> bool {
        *self == TaskNetwork::Node
    }
}

/// An input of a [`RunTask`]. The agent asks for its URL by `name` when it
/// is about to download it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInput {
    /// Its path in the workspace, relative and normalised.
    pub name: String,
    /// The object of the task's project, for messages.
    pub object: String,
}

/// An output of a [`RunTask`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutput {
    /// Its name.
    pub name: String,
    /// The file in the workspace, relative and normalised.
    pub path: String,
}

/// The most parts an agent splits one upload into, so that the list of
/// parts completing it fits in one frame.
pub const MAX_UPLOAD_PARTS: u32 = 2000;

/// A request for a presigned URL. The server answers only for an attempt
/// of this node that is still running, and only for an input or output the
/// task's spec names: a node can reach no other object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRequest {
    /// Agent-local id, named again in the answer.
    pub id: u64,
    /// The task.
    pub task_id: Uuid,
    /// The attempt.
    pub attempt: u32,
    /// What the URL is for.
    #[serde(flatten)]
    pub op: TransferOp,
}

/// What a [`TransferRequest`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum TransferOp {
    /// A GET URL for the input named `input`; the answer carries the
    /// object's size and, when known, SHA-256, to check the download by.
    Download {
        /// The input's name.
        input: String,
    },
    /// Begins the upload of output `output`: a PUT URL when `parts` is 1,
    /// otherwise the id of a new multipart upload.
    Upload {
        /// The output's name.
        output: String,
        /// The file's size.
        size: u64,
        /// The file's SHA-256, lower-case hex: required when `parts` is 1
        /// (the URL binds the body to it). A multipart upload leaves it out,
        /// so the file need not be read before its first part is sent: each
        /// part names its own, and [`TransferOp::Complete`] the whole file's.
        /// (Agents before this was optional send it for every upload; it is
        /// still accepted.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        /// Into how many parts it is cut, 1 to [`MAX_UPLOAD_PARTS`].
        parts: u32,
    },
    /// A PUT URL for one part of a multipart upload.
    UploadPart {
        /// The output's name.
        output: String,
        /// The upload from the answer to [`TransferOp::Upload`].
        upload_id: String,
        /// From 1.
        part_number: u32,
        /// The part's SHA-256: the store refuses a body that does not
        /// match.
        sha256: String,
    },
    /// Ends an upload: the server completes a multipart upload from
    /// `parts`, checks the stored object's size and SHA-256 and records the
    /// output. Answered without a URL.
    Complete {
        /// The output's name.
        output: String,
        /// The multipart upload, if it was one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upload_id: Option<String>,
        /// Every part, in order (empty for a single PUT).
        #[serde(default)]
        parts: Vec<UploadedPart>,
        /// The file's size.
        size: u64,
        /// The file's SHA-256, lower-case hex, the one the output is
        /// recorded with.
        sha256: String,
    },
    /// The values of the project secrets the attempt's task names (its
    /// `env_secrets` and `git_credentials`), asked right before they are
    /// needed; the answer's `secrets` holds them.
    Secrets,
}

/// One uploaded part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadedPart {
    /// From 1.
    pub part_number: u32,
    /// The ETag the store answered.
    pub etag: String,
}

/// The answer to a [`TransferRequest`]: a URL, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TransferGrant {
    /// The request's id.
    pub id: u64,
    /// The presigned URL, valid for a short time, for one object and one
    /// method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Headers to send with the URL, unchanged (they are signed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// With a download: the object's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// With a download: the object's SHA-256, when it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// With a download: the object's BLAKE3 (lower-case hex), when the
    /// server computed one as it verified the object's SHA-256. The agent
    /// then checks the bytes against it instead: the same assurance for a
    /// third of the CPU. Always sent with `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// With the start of a multipart upload: its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// Why the request was refused, for a person; the transfer fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// With [`TransferOp::Secrets`]: the values of the secrets the task
    /// names, by secret name.
    #[serde(default, skip_serializing_if = "SecretValues::is_empty")]
    pub secrets: SecretValues,
}

/// Values of project secrets by secret name, as the server hands them to
/// the node running an attempt. Their `Debug` shows names only, so no log
/// line of either side can carry a value.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretValues(pub BTreeMap<String, String>);

impl SecretValues {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set()
            .entries(self.0.keys().map(|k| format!("{k}=***")))
            .finish()
    }
}

/// The stable id of a command: the same request always gets the same id, so
/// an agent can drop a resent command it has already handled.
pub fn command_id(kind: &str, task_id: Uuid, attempt: u32) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("unidesk/{kind}/{task_id}/{attempt}").as_bytes(),
    )
}

/// The stable id of the command that carries host SSH request
/// `request_id`, so a resent one is dropped by the agent.
pub fn host_ssh_command_id(request_id: Uuid) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("unidesk/host_ssh/{request_id}").as_bytes(),
    )
}

/// The repository part of every environment's image tag.
pub const ENV_IMAGE_REPOSITORY: &str = "unidesk-env";

/// The Docker image tag of an environment: the same on every node, so the
/// scheduler can tell which nodes already hold a task's image.
pub fn env_image_tag(env_repo_url: &str, env_commit_id: &str, dockerfile_path: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!(
        "{env_repo_url}\n{env_commit_id}\n{dockerfile_path}"
    ));
    format!("{ENV_IMAGE_REPOSITORY}:{}", &hex::encode(digest)[..24])
}

/// A frame as it travels: the message plus the protocol version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame<M> {
    /// The protocol version the sender speaks.
    pub protocol: u32,
    /// The message.
    #[serde(flatten)]
    pub message: M,
}

/// The longest text of a [`DecodeError::Malformed`]: the JSON parser
/// quotes what it could not read, and that is the sender's text.
pub const MAX_DECODE_ERROR_BYTES: usize = 256;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    /// Written for a protocol version outside what this side reads.
    #[error(
        "protocol version {0} is not supported: this side reads versions {OLDEST_VERSION} to {VERSION}"
    )]
    Version(u32),
    /// Not JSON, a `type` this side does not know, or a missing field. The
    /// parser's text, made one line of at most [`MAX_DECODE_ERROR_BYTES`]
    /// (see [`bounds::line`]).
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl DecodeError {
    /// The code to send in [`ServerMessage::Error`].
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::TooLarge(_) => "too_large",
            DecodeError::Version(_) => "protocol_version",
            DecodeError::Malformed(m) if m.contains("unknown variant") => "unknown_type",
            DecodeError::Malformed(_) => "bad_frame",
        }
    }
}

/// Encodes a message as a frame of this protocol version.
pub fn encode<M: Serialize>(message: &M) -> String {
    #[derive(Serialize)]
    struct Out<'a, M> {
        protocol: u32,
        #[serde(flatten)]
        message: &'a M,
    }
    // Serialising these plain types to a string cannot fail.
    serde_json::to_string(&Out {
        protocol: VERSION,
        message,
    })
    .unwrap_or_default()
}

/// Decodes a frame, checking its size and that its version is one this
/// side reads ([`OLDEST_VERSION`] to [`VERSION`]): how the server reads
/// agents.
///
/// # Errors
/// A [`DecodeError`] saying what is wrong with the frame.
pub fn decode<M: for<'de> Deserialize<'de>>(text: &str) -> Result<M, DecodeError> {
    decode_within(text, VERSION)
}

/// Decodes a frame like [`decode`], but also one of a newer version than
/// this side's: how an agent reads a server that was upgraded before it
/// (see [`OLDEST_VERSION`]).
///
/// # Errors
/// A [`DecodeError`] saying what is wrong with the frame.
pub fn decode_newer<M: for<'de> Deserialize<'de>>(text: &str) -> Result<M, DecodeError> {
    decode_within(text, u32::MAX)
}

/// Decodes a frame of a version from [`OLDEST_VERSION`] to `newest`.
fn decode_within<M: for<'de> Deserialize<'de>>(text: &str, newest: u32) -> Result<M, DecodeError> {
    if text.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge(text.len()));
    }
    #[derive(Deserialize)]
    struct Version {
        protocol: Option<u32>,
    }
    let malformed = |e: serde_json::Error| {
        DecodeError::Malformed(bounds::line(&e.to_string(), MAX_DECODE_ERROR_BYTES))
    };
    let v: Version = serde_json::from_str(text).map_err(malformed)?;
    match v.protocol {
        Some(v) if (OLDEST_VERSION..=newest).contains(&v) => {}
        Some(other) => return Err(DecodeError::Version(other)),
        None => return Err(DecodeError::Malformed("missing field `protocol`".into())),
    }
    let frame: Frame<M> = serde_json::from_str(text).map_err(malformed)?;
    Ok(frame.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_type_and_version() {
        let m = AgentMessage::Heartbeat { seq: 7 };
        let text = encode(&m);
        assert_eq!(text, r#"{"protocol":1,"type":"heartbeat","seq":7}"#);
        assert_eq!(decode::<AgentMessage>(&text).unwrap(), m);
        let c = ServerMessage::Command {
            command_id: command_id("run_task", Uuid::nil(), 1),
            command: Command::CancelTask {
                task_id: Uuid::nil(),
                attempt: 1,
                grace_s: 10,
            },
        };
        assert_eq!(decode::<ServerMessage>(&encode(&c)).unwrap(), c);
    }

    #[test]
    fn host_ssh_messages_round_trip() {
        let request_id = Uuid::new_v4();
        let c = ServerMessage::Command {
            command_id: host_ssh_command_id(request_id),
            command: Command::HostSsh(HostSsh {
                request_id,
                command: "nvidia-smi -L".into(),
                timeout_s: 30,
                output_limit: MAX_HOST_SSH_OUTPUT_BYTES as u64,
            }),
        };
        let text = encode(&c);
        assert!(text.contains(r#""kind":"host_ssh""#), "{text}");
        assert_eq!(decode::<ServerMessage>(&text).unwrap(), c);
        let r = AgentMessage::HostSshResult(HostSshResult {
            id: 4,
            request_id,
            exit_code: Some(0),
            output: "GPU 0: A100\n".into(),
            truncated: false,
            timed_out: false,
            duration_ms: 120,
            error: None,
        });
        let text = encode(&r);
        assert!(text.contains(r#""type":"host_ssh_result""#), "{text}");
        assert_eq!(decode::<AgentMessage>(&text).unwrap(), r);
        let refused: AgentMessage = decode(&format!(
            r#"{{"protocol":1,"type":"host_ssh_result","id":5,"request_id":"{request_id}","error":"no target"}}"#
        ))
        .unwrap();
        let AgentMessage::HostSshResult(refused) = refused else {
            panic!("not a result: {refused:?}")
        };
        assert_eq!(refused.exit_code, None);
        assert_eq!(refused.error.as_deref(), Some("no target"));
    }

    #[test]
    fn a_run_task_without_network_leaves_it_to_the_node() {
        let old = r#"{"task_id":"00000000-0000-0000-0000-000000000000","attempt":1,
            "code_repo_url":"u","code_commit_id":"c","env_repo_url":"u","env_commit_id":"c",
            "dockerfile_path":"Dockerfile","command":[],"cpus":1,"memory_mb":64}"#;
        let run: RunTask = serde_json::from_str(old).unwrap();
        assert_eq!(run.network, TaskNetwork::Node);
        assert!(!serde_json::to_string(&run).unwrap().contains("network"));
        let offline = RunTask {
            network: TaskNetwork::None,
            ..run
        };
        let text = serde_json::to_string(&offline).unwrap();
        assert!(text.contains(r#""network":"none""#), "{text}");
        assert_eq!(serde_json::from_str::<RunTask>(&text).unwrap(), offline);
    }

    #[test]
    fn a_hello_without_host_ssh_reads_as_false() {
        let hello: AgentMessage = decode(
            r#"{"protocol":1,"type":"hello","agent_version":"0.1.0","resources":{"cpus":1,"memory_mb":1}}"#,
        )
        .unwrap();
        let AgentMessage::Hello(hello) = hello else {
            panic!("not a hello")
        };
        assert!(!hello.host_ssh);
    }

    #[test]
    fn the_largest_host_ssh_result_fits_in_a_frame() {
        // Printable output is escaped at most twice over (`"` and `\\`).
        let r = AgentMessage::HostSshResult(HostSshResult {
            id: u64::MAX,
            request_id: Uuid::max(),
            exit_code: Some(i32::MIN),
            output: "\"".repeat(MAX_HOST_SSH_OUTPUT_BYTES),
            truncated: true,
            timed_out: true,
            duration_ms: u64::MAX,
            error: Some("e".repeat(1024)),
        });
        assert!(encode(&r).len() <= MAX_FRAME_BYTES);
    }

    #[test]
    fn host_ssh_command_ids_are_stable_and_distinct() {
        let r = Uuid::new_v4();
        assert_eq!(host_ssh_command_id(r), host_ssh_command_id(r));
        assert_ne!(host_ssh_command_id(r), host_ssh_command_id(Uuid::new_v4()));
        assert_ne!(host_ssh_command_id(r), command_id("run_task", r, 0));
    }

    #[test]
    fn an_agent_reads_a_newer_server_and_ignores_what_it_added() {
        let newer = r#"{"protocol":2,"type":"received","id":7,"since_v2":"ignored"}"#;
        assert_eq!(
            decode_newer::<ServerMessage>(newer).unwrap(),
            ServerMessage::Received { id: 7, error: None }
        );
        assert_eq!(
            decode::<ServerMessage>(newer).unwrap_err().code(),
            "protocol_version",
            "the server side refuses versions past its own"
        );
        assert_eq!(
            decode_newer::<ServerMessage>(r#"{"protocol":0,"type":"received","id":7}"#)
                .unwrap_err()
                .code(),
            "protocol_version"
        );
    }

    #[test]
    fn bad_frames_are_named() {
        let unknown = decode::<AgentMessage>(r#"{"protocol":1,"type":"launch_missiles"}"#);
        assert_eq!(unknown.unwrap_err().code(), "unknown_type");
        let version = decode::<AgentMessage>(r#"{"protocol":9,"type":"heartbeat","seq":1}"#);
        let version = version.unwrap_err();
        assert_eq!(version.code(), "protocol_version");
        assert!(
            version.to_string().contains("reads versions 1 to 1"),
            "the refusal names the range: {version}"
        );
        let older = decode::<AgentMessage>(r#"{"protocol":0,"type":"heartbeat","seq":1}"#);
        assert_eq!(older.unwrap_err().code(), "protocol_version");
        assert_eq!(
            decode::<AgentMessage>("not json").unwrap_err().code(),
            "bad_frame"
        );
        let big = format!(
            r#"{{"protocol":1,"type":"heartbeat","pad":"{}"}}"#,
            "x".repeat(MAX_FRAME_BYTES)
        );
        assert_eq!(
            decode::<AgentMessage>(&big).unwrap_err().code(),
            "too_large"
        );
        let missing = decode::<AgentMessage>(r#"{"protocol":1,"type":"heartbeat"}"#);
        assert_eq!(missing.unwrap_err().code(), "bad_frame");
    }

    #[test]
    fn a_decode_error_quotes_the_frame_on_one_short_line() {
        let hostile = format!(
            r#"{{"protocol":1,"type":"x\n2026-01-01 ERROR forged\u0000{}"}}"#,
            "y".repeat(200_000)
        );
        let e = decode::<AgentMessage>(&hostile).unwrap_err();
        assert_eq!(e.code(), "unknown_type");
        let DecodeError::Malformed(text) = &e else {
            panic!("{e:?}")
        };
        assert!(text.len() <= MAX_DECODE_ERROR_BYTES, "{}", text.len());
        assert!(!text.contains(['\n', '\0']), "{text:?}");
        let seq = format!(
            r#"{{"protocol":1,"type":"heartbeat","seq":"{}\n"}}"#,
            "z".repeat(100_000)
        );
        let e = decode::<AgentMessage>(&seq).unwrap_err();
        assert!(e.to_string().len() < 300, "{e}");
    }

    #[test]
    fn transfer_messages_round_trip() {
        let r = AgentMessage::TransferRequest(TransferRequest {
            id: 3,
            task_id: Uuid::nil(),
            attempt: 1,
            op: TransferOp::UploadPart {
                output: "model".into(),
                upload_id: "u".into(),
                part_number: 2,
                sha256: "a".repeat(64),
            },
        });
        let text = encode(&r);
        assert!(text.contains(r#""type":"transfer_request""#), "{text}");
        assert!(text.contains(r#""op":"upload_part""#), "{text}");
        assert_eq!(decode::<AgentMessage>(&text).unwrap(), r);
        let g = ServerMessage::TransferUrl(TransferGrant {
            id: 3,
            url: Some("http://s/b/k?X-Amz-Signature=1".into()),
            ..TransferGrant::default()
        });
        assert_eq!(decode::<ServerMessage>(&encode(&g)).unwrap(), g);
        let download = ServerMessage::TransferUrl(TransferGrant {
            id: 4,
            url: Some("http://s/b/k?X-Amz-Signature=2".into()),
            size: Some(7),
            sha256: Some("a".repeat(64)),
            blake3: Some("b".repeat(64)),
            ..TransferGrant::default()
        });
        let text = encode(&download);
        assert_eq!(decode::<ServerMessage>(&text).unwrap(), download);
        // A grant without a BLAKE3 (an older server's) still decodes.
        let older = text.replace(&format!(",\"blake3\":\"{}\"", "b".repeat(64)), "");
        assert_ne!(older, text);
        let ServerMessage::TransferUrl(g) = decode::<ServerMessage>(&older).unwrap() else {
            panic!("not a grant: {older}");
        };
        assert_eq!((g.sha256, g.blake3), (Some("a".repeat(64)), None));
    }

    #[test]
    fn the_largest_completion_fits_in_a_frame() {
        let r = AgentMessage::TransferRequest(TransferRequest {
            id: u64::MAX,
            task_id: Uuid::max(),
            attempt: u32::MAX,
            op: TransferOp::Complete {
                output: "o".repeat(128),
                upload_id: Some("u".repeat(1024)),
                parts: (1..=MAX_UPLOAD_PARTS)
                    .map(|n| UploadedPart {
                        part_number: n,
                        etag: format!("\"{}-10000\"", "f".repeat(32)),
                    })
                    .collect(),
                size: u64::MAX,
                sha256: "f".repeat(64),
            },
        });
        assert!(encode(&r).len() <= MAX_FRAME_BYTES);
    }

    #[test]
    fn an_environment_has_one_image_tag() {
        let a = env_image_tag("https://h/e.git", &"a".repeat(40), "Dockerfile");
        assert_eq!(
            a,
            env_image_tag("https://h/e.git", &"a".repeat(40), "Dockerfile")
        );
        assert_ne!(
            a,
            env_image_tag("https://h/e.git", &"a".repeat(40), "gpu/Dockerfile")
        );
        assert!(a.starts_with("unidesk-env:") && a.len() == "unidesk-env:".len() + 24);
    }

    #[test]
    fn command_ids_are_stable_per_request() {
        let t = Uuid::new_v4();
        assert_eq!(command_id("run_task", t, 1), command_id("run_task", t, 1));
        assert_ne!(command_id("run_task", t, 1), command_id("run_task", t, 2));
        assert_ne!(
            command_id("run_task", t, 1),
            command_id("cancel_task", t, 1)
        );
    }
}
