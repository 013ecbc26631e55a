//! The validated parts of a task specification.
//!
//! Input is parsed into these newtypes at the edge (`CommitId::parse(s)?`);
//! inside the platform the types guarantee validity, so a task that was
//! accepted can always be fetched, built and run as written.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Name;

/// Kept here too, where callers have long found it.
pub use crate::name::validate_name;

/// A reason why one field of an input is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The field's path in the request body, such as `resources.cpus`.
    pub field: String,
    /// What is wrong, in words a person can act on.
    pub reason: String,
    /// Whether the value is fine but taken: another item of the same
    /// request names it already.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub taken: bool,
}

impl FieldError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            taken: false,
        }
    }

    /// A new error for `field`, whose value another item names already.
    pub fn taken(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            taken: true,
            ..Self::new(field, reason)
        }
    }
}

/// A full git commit id: 40 hexadecimal digits (SHA-1) or 64 (SHA-256),
/// kept in lower case. Abbreviated ids are refused because they can become
/// ambiguous as a repository grows, and a task must name exactly one commit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommitId(String);

impl CommitId {
    /// Parses a full commit id.
    ///
    /// # Errors
    /// A reason when `s` is not 40 or 64 hexadecimal digits.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() != 40 && s.len() != 64 {
            return Err(format!(
                "must be a full commit id of 40 (or 64) hexadecimal digits, got {} characters",
                s.chars().count()
            ));
        }
        if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("must contain only hexadecimal digits 0-9 and a-f".into());
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CommitId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}
impl From<CommitId> for String {
    fn from(c: CommitId) -> String {
        c.0
    }
}
impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A path to a Dockerfile inside the env repository: relative, with `/`
/// separators, never absolute and never climbing out with `..`. Stored
/// normalised (`./a//b` becomes `a/b`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DockerfilePath(String);

impl DockerfilePath {
    /// Parses and normalises a path inside a repository.
    ///
    /// # Errors
    /// A reason when the path is empty, absolute, uses `\`, contains `..`
    /// or a NUL, or is longer than 1024 bytes.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > 1024 {
            return Err("must be at most 1024 bytes".into());
        }
        if s.contains('\0') || s.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        if s.contains('\\') {
            return Err("must use / as the separator".into());
        }
        if s.starts_with('/') || s.as_bytes().get(1) == Some(&b':') {
            return Err("must be relative to the env repository, not absolute".into());
        }
        let mut parts = Vec::new();
        for part in s.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err("must not contain '..': it would leave the repository".into()),
                p => parts.push(p),
            }
        }
        if parts.is_empty() {
            return Err("must name a file".into());
        }
        if parts.first().is_some_and(|p| *p == ".git") {
            return Err("must not point into .git".into());
        }
        Ok(Self(parts.join("/")))
    }

    /// The normalised path.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DockerfilePath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}
impl From<DockerfilePath> for String {
    fn from(c: DockerfilePath) -> String {
        c.0
    }
}
impl fmt::Display for DockerfilePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which repository URLs a server accepts beyond `https`, `ssh` and `git`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UrlPolicy {
    /// Whether `file://` URLs are accepted. Only sensible when agents run
    /// on the same machine as the repositories (as with `unidesk dev`).
    pub allow_file: bool,
}

/// What a user is told when a repository URL looks like it carries a
/// secret: the URL is stored as it was given.
pub const NO_CREDENTIALS_IN_URLS: &str = "credentials never go in a URL: it is stored in the \
     task's events, which everyone who can see the task reads; give nodes access to private \
     repositories another way (an ssh deploy key or a git credential helper on the node)";

/// The longest ssh user name accepted in a repository URL. Real login names
/// are short; a long one is far more likely a token put where a user name
/// goes.
const MAX_SSH_USER: usize = 32;

/// Prefixes of access tokens that hosting services hand out and that people
/// paste in front of `@`; refused as ssh user names even when short.
const TOKEN_PREFIXES: &[&str] = &[
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "gldt-",
    "x-access-token",
    "x-token-auth",
    "x-oauth-basic",
    "oauth2",
];

/// A git repository URL with scheme `https`, `ssh` or `git`, the scp-like
/// `user@host:path` form (ssh), or `file://` where the server allows it.
///
/// Nothing that can carry a secret is accepted, so that none reaches the
/// event log: no user information at all in `https`, `git` and `file`
/// URLs (`user:pass@`, `token@`), only a plain short user name such as
/// `git@` with `ssh` and the scp-like form, no query string or fragment
/// (`?`, `#`: git never needs them, and they are where tokens hide), no
/// percent-encoding in the host part (`%40`, `%3A` disguise `@` and `:`),
/// and nothing but printable ASCII (no whitespace, control or invisible
/// characters; other characters of a path are percent-encoded).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RepoUrl(String);

/// Whether `c` is invisible or reorders text (soft hyphen, zero-width and
/// bidirectional marks, byte-order mark): such characters make a URL read
/// differently from what git is given.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{34f}'
            | '\u{61c}'
            | '\u{115f}'
            | '\u{1160}'
            | '\u{17b4}'
            | '\u{17b5}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{3164}'
            | '\u{fe00}'..='\u{fe0f}'
            | '\u{feff}'
            | '\u{ffa0}'
            | '\u{fff0}'..='\u{fffb}'
    )
}

/// Why a `%` before the path is refused.
fn percent_encoded() -> String {
    format!(
        "must not percent-encode anything before the path (%40 and %3A disguise the '@' and ':' \
         of credentials); {NO_CREDENTIALS_IN_URLS}"
    )
}

/// Checks `host` or `host:port` (IPv6 in brackets): ASCII letters, digits,
/// `.`, `-` and `_`, and a numeric port.
fn check_host(host_port: &str) -> Result<(), String> {
    let port = if let Some(inner) = host_port.strip_prefix('[') {
        let Some((v6, after)) = inner.split_once(']') else {
            return Err("has an unclosed '[' in its host".into());
        };
        let v6_ok = !v6.is_empty()
            && v6
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.');
        if !v6_ok {
            return Err(
                "must name a host: an IPv6 address in brackets holds only hex digits, ':' and '.'"
                    .into(),
            );
        }
        match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("has characters after its IPv6 address")?,
            ),
        }
    } else {
        let (host, port) = match host_port.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        };
        if host.is_empty() {
            return Err("must name a host".into());
        }
        let name_ok = !host.starts_with('-')
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !name_ok {
            return Err(
                "must name a host of ASCII letters, digits, '.', '-' and '_' (no percent-encoding; \
                 give international names in their xn-- form)"
                    .into(),
            );
        }
        port
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.chars().all(|c| c.is_ascii_digit()) {
            return Err("must have a port of 1 to 5 digits after ':'".into());
        }
    }
    Ok(())
}

/// Checks the user name before `@` of an ssh URL: a plain login name, never
/// a password or a token.
fn check_ssh_user(user: &str) -> Result<(), String> {
    let plain = user
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && user.len() <= MAX_SSH_USER;
    let lower = user.to_ascii_lowercase();
    if !plain || TOKEN_PREFIXES.iter().any(|p| lower.starts_with(p)) {
        return Err(format!(
            "may hold only a plain ssh user name before '@' (such as git@), \
             never a password or a token; {NO_CREDENTIALS_IN_URLS}"
        ));
    }
    Ok(())
}

impl RepoUrl {
    /// Parses a repository URL under `policy`.
    ///
    /// # Errors
    /// A reason a person can act on when the scheme is not allowed, the URL
    /// is malformed, could carry a credential (user information other than
    /// an ssh user name, a query string or fragment, percent-encoding in the
    /// host part), holds whitespace, control or invisible characters, or
    /// starts with `-`.
    pub fn parse(s: &str, policy: UrlPolicy) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > 2048 {
            return Err("must be at most 2048 bytes".into());
        }
        if s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || invisible(c))
        {
            return Err("must not contain whitespace, control or invisible characters".into());
        }
        if s.starts_with('-') {
            return Err("must not start with '-'".into());
        }
        if !s.is_ascii() {
            return Err(
                "must be ASCII: percent-encode other characters of the path, and give \
                 international host names in their xn-- form"
                    .into(),
            );
        }
        if s.contains(['?', '#']) {
            return Err(format!(
                "must not contain '?' or '#': git needs no query string or fragment, and \
                 that is where tokens hide; {NO_CREDENTIALS_IN_URLS}"
            ));
        }
        if let Some((scheme, rest)) = s.split_once("://") {
            let scheme = scheme.to_ascii_lowercase();
            let authority = rest.split('/').next().unwrap_or_default();
            if authority.contains('%') {
                return Err(percent_encoded());
            }
            let credentials = || {
                format!(
                    "must not hold user information before '@' in {scheme} URLs (user:password@ \
                     or token@); {NO_CREDENTIALS_IN_URLS}"
                )
            };
            match scheme.as_str() {
                "https" | "git" => {
                    if authority.contains('@') {
                        return Err(credentials());
                    }
                    check_host(authority)?;
                    if rest.len() <= authority.len() + 1 {
                        return Err("must name a repository path".into());
                    }
                }
                "ssh" => {
                    let host = match authority.rsplit_once('@') {
                        Some((user, host)) => {
                            check_ssh_user(user)?;
                            host
                        }
                        None => authority,
                    };
                    check_host(host)?;
                    if rest.len() <= authority.len() + 1 {
                        return Err("must name a repository path".into());
                    }
                }
                "file" => {
                    if !policy.allow_file {
                        return Err(
                            "file:// URLs are not allowed on this server; use https, ssh or git"
                                .into(),
                        );
                    }
                    if authority.contains('@') {
                        return Err(credentials());
                    }
                    if !rest.starts_with('/') {
                        return Err("file:// URLs must hold an absolute path".into());
                    }
                }
                other => {
                    return Err(format!(
                        "scheme {other:?} is not allowed; use https, ssh or git"
                    ))
                }
            }
            return Ok(Self(s.to_string()));
        }
        Self::parse_scp_like(s)
    }

    /// The scp-like form `[user@]host:path`, which git treats as ssh when
    /// no `/` comes before the first `:`.
    fn parse_scp_like(s: &str) -> Result<Self, String> {
        const SHAPE: &str = "must be a URL with scheme https, ssh or git (or user@host:path)";
        let Some((user_host, path)) = s.split_once(':') else {
            return Err(SHAPE.into());
        };
        if user_host.is_empty() || path.is_empty() || user_host.contains('/') {
            return Err(SHAPE.into());
        }
        if user_host.contains('%') {
            return Err(percent_encoded());
        }
        // `transport::address` runs a git remote helper, not ssh.
        if path.starts_with(':') {
            return Err(
                "must not name a git transport with '::'; use https, ssh or git URLs".into(),
            );
        }
        // An '@' after the first ':' means `user:secret@host:path`.
        if path.contains('@') {
            return Err(format!(
                "must not hold a password or token (user:secret@host); {NO_CREDENTIALS_IN_URLS}"
            ));
        }
        let host = match user_host.rsplit_once('@') {
            Some((user, host)) => {
                check_ssh_user(user)?;
                host
            }
            None => user_host,
        };
        if host.starts_with('[') {
            return Err(SHAPE.into());
        }
        check_host(host)?;
        Ok(Self(s.to_string()))
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a task needs from a node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU cores, fractions allowed (0.5 is half a core).
    pub cpus: f64,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Whole GPUs.
    pub gpus: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpus: 1.0,
            memory_mb: 1024,
            gpus: 0,
        }
    }
}

impl Resources {
    /// CPU in thousandths of a core, the unit the scheduler adds up.
    pub fn millicpus(&self) -> u64 {
        (self.cpus * 1000.0).round() as u64
    }
}

/// A validated task specification: what to run, where it comes from and
/// what it needs. Immutable once submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The project the task belongs to.
    pub project_id: Uuid,
    /// The repository holding the code.
    pub code_repo_url: RepoUrl,
    /// The exact code commit to run.
    pub code_commit_id: CommitId,
    /// The repository holding the environment definition.
    pub env_repo_url: RepoUrl,
    /// The exact env commit to build.
    pub env_commit_id: CommitId,
    /// The Dockerfile inside the env repository.
    pub dockerfile_path: DockerfilePath,
    /// The argv to run; empty runs the image's default command.
    pub command: Vec<String>,
    /// Environment variables for the container.
    pub env: BTreeMap<String, String>,
    /// CPUs, memory and GPUs the task needs.
    pub resources: Resources,
    /// Node labels the task requires (all must match).
    pub labels: BTreeMap<String, String>,
    /// Higher runs first; ties go to the oldest.
    pub priority: i32,
    /// Wall-clock limit of one attempt's run, if any.
    pub timeout_s: Option<u64>,
    /// How many times the task is retried after its node is lost.
    pub max_retries: u32,
    /// Objects of the project's store downloaded into the workspace before
    /// the command runs; absent in tasks submitted before inputs existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<Input>,
    /// Files of the workspace uploaded to the store once the command ended,
    /// also when it failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<Output>,
    /// The network the task's container gets; absent in tasks submitted
    /// before the field existed, which get the node's choice.
    #[serde(default, skip_serializing_if = "TaskNetwork::is_node_default")]
    pub network: TaskNetwork,
    /// Environment variables whose values are secrets of the task's
    /// project, by variable: the spec (and so the log) holds only the
    /// secret's name; the node fetches the value for the running attempt.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_secrets: BTreeMap<String, Name>,
    /// The secrets git fetches the repositories with.
    #[serde(default, skip_serializing_if = "GitCredentials::is_empty")]
    pub git_credentials: GitCredentials,
}

/// Which project secrets git uses for a task's two repositories: an SSH
/// private key for `ssh://` and `user@host:path` URLs, a token (or
/// `user:token`) for `https://` ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitCredentials {
    /// For `code_repo_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Name>,
    /// For `env_repo_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Name>,
    /// SSH host keys (`known_hosts` lines) the repositories' hosts must
    /// show, besides those the node trusts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<Name>,
}

impl GitCredentials {
    /// Whether it names no secret.
    pub fn is_empty(&self) -> bool {
        self.code.is_none() && self.env.is_none() && self.known_hosts.is_none()
    }
}

impl TaskSpec {
    /// Every project secret the task names, each once, with the first
    /// field naming it (`env_secrets.VAR`, `git_credentials.code`).
    pub fn secrets(&self) -> BTreeMap<&Name, String> {
        let mut named = BTreeMap::new();
        for (var, secret) in &self.env_secrets {
            named
                .entry(secret)
                .or_insert_with(|| format!("env_secrets.{var}"));
        }
        for (field, secret) in [
            ("code", &self.git_credentials.code),
            ("env", &self.git_credentials.env),
            ("known_hosts", &self.git_credentials.known_hosts),
        ] {
            if let Some(secret) = secret {
                named
                    .entry(secret)
                    .or_insert_with(|| format!("git_credentials.{field}"));
            }
        }
        named
    }
}

/// The network a task's container gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskNetwork {
    /// Whatever the node runs tasks with (`--task-network`).
    #[default]
    Node,
    /// No network at all: the container has only its loopback interface,
    /// whatever the node's choice.
    None,
}

impl TaskNetwork {
    /// Parses the submitted form: only `none` can be asked for; leaving
    /// the field out leaves the choice to the node.
    ///
    /// # Errors
    /// A reason for any other value.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            other => Err(format!(
                "must be \"none\" (or left out for the node's choice), got {other:?}"
            )),
        }
    }

    /// Whether this is the node's choice, the value a spec had before the
    /// field existed.
    pub fn is_node_default(&self) -> bool {
        *self == Self::Node
    }

    /// The submitted form: `Some("none")`, or `None` for the node's choice.
    pub fn as_submitted(&self) -> Option<&'static str> {
        match self {
            Self::Node => None,
            Self::None => Some("none"),
        }
    }
}

/// Whether `name` is an environment variable that decides which GPUs a
/// container sees (`NVIDIA_VISIBLE_DEVICES`, `CUDA_VISIBLE_DEVICES` or any
/// `NVIDIA_*`, in any case). Only the node sets these, from the devices
/// the scheduler assigned: a task that could set them could reach GPUs
/// other tasks hold.
pub fn is_gpu_visibility_variable(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper.starts_with("NVIDIA_") || upper == "CUDA_VISIBLE_DEVICES"
}

/// The prefix of the environment variables the node sets in every task
/// container ([`TASK_ID_VARIABLE`], [`ATTEMPT_VARIABLE`]); a task may set
/// none of its own.
pub const PLATFORM_VARIABLE_PREFIX: &str = "UNIDESK_";

/// The variable that holds the task's id in its container.
pub const TASK_ID_VARIABLE: &str = "UNIDESK_TASK_ID";

/// The variable that holds the attempt's number (from 1) in its container:
/// a command can tell a retry from a first run, to resume from what an
/// earlier attempt saved.
pub const ATTEMPT_VARIABLE: &str = "UNIDESK_ATTEMPT";

/// Whether `name` is in the platform's namespace (`UNIDESK_*`, in any case).
pub fn is_platform_variable(name: &str) -> bool {
    name.get(..PLATFORM_VARIABLE_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(PLATFORM_VARIABLE_PREFIX))
}

/// The raw, unvalidated form of a resources request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesDraft {
    /// CPU cores.
    pub cpus: Option<f64>,
    /// Memory in MiB.
    pub memory_mb: Option<i64>,
    /// Whole GPUs.
    pub gpus: Option<i64>,
}

/// The raw, unvalidated form of a task submission, as it arrives at the
/// edge. [`TaskSpecDraft::validate`] names every field that is wrong at once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpecDraft {
    /// See [`TaskSpec::project_id`].
    pub project_id: Option<Uuid>,
    /// See [`TaskSpec::code_repo_url`].
    pub code_repo_url: Option<String>,
    /// See [`TaskSpec::code_commit_id`].
    pub code_commit_id: Option<String>,
    /// See [`TaskSpec::env_repo_url`].
    pub env_repo_url: Option<String>,
    /// See [`TaskSpec::env_commit_id`].
    pub env_commit_id: Option<String>,
    /// See [`TaskSpec::dockerfile_path`].
    pub dockerfile_path: Option<String>,
    /// See [`TaskSpec::command`].
    pub command: Option<Vec<String>>,
    /// See [`TaskSpec::env`].
    pub env: Option<BTreeMap<String, String>>,
    /// See [`TaskSpec::resources`].
    pub resources: Option<ResourcesDraft>,
    /// See [`TaskSpec::labels`].
    pub labels: Option<BTreeMap<String, String>>,
    /// See [`TaskSpec::priority`].
    pub priority: Option<i64>,
    /// See [`TaskSpec::timeout_s`].
    pub timeout_s: Option<i64>,
    /// See [`TaskSpec::max_retries`].
    pub max_retries: Option<i64>,
    /// See [`TaskSpec::inputs`].
    pub inputs: Option<Vec<InputDraft>>,
    /// See [`TaskSpec::outputs`].
    pub outputs: Option<Vec<OutputDraft>>,
    /// See [`TaskSpec::network`]: `"none"`, or absent for the node's
    /// choice.
    pub network: Option<String>,
    /// See [`TaskSpec::env_secrets`]: variable to secret name.
    pub env_secrets: Option<BTreeMap<String, String>>,
    /// See [`TaskSpec::git_credentials`]: `code` and `env` to secret name.
    pub git_credentials: Option<GitCredentialsDraft>,
}

/// The raw form of [`GitCredentials`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitCredentialsDraft {
    /// See [`GitCredentials::code`].
    pub code: Option<String>,
    /// See [`GitCredentials::env`].
    pub env: Option<String>,
    /// See [`GitCredentials::known_hosts`].
    pub known_hosts: Option<String>,
}

/// Limits on a task specification.
pub mod limits {
    /// Most arguments in `command`.
    pub const MAX_ARGS: usize = 1024;
    /// Most bytes in one argument.
    pub const MAX_ARG_BYTES: usize = 64 * 1024;
    /// Most environment variables.
    pub const MAX_ENV: usize = 256;
    /// Most bytes in one environment value.
    pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
    /// Most labels.
    pub const MAX_LABELS: usize = 64;
    /// Largest `timeout_s`: one year.
    pub const MAX_TIMEOUT_S: i64 = 365 * 24 * 3600;
    /// Largest `max_retries`.
    pub const MAX_RETRIES: i64 = 100;
    /// Default `max_retries`: a task survives two lost nodes.
    pub const DEFAULT_RETRIES: u32 = 2;
    /// Most inputs of one task.
    pub const MAX_INPUTS: usize = 64;
    /// Most outputs of one task.
    pub const MAX_OUTPUTS: usize = 64;
    /// Longest object name or workspace path, in bytes.
    pub const MAX_PATH_BYTES: usize = 512;
    /// Longest output name, in bytes.
    pub const MAX_OUTPUT_NAME_BYTES: usize = 128;
}

/// Checks one label map (used for task selectors and node labels).
///
/// # Errors
/// A [`FieldError`] under `field` naming the first bad key or value.
pub fn validate_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), FieldError> {
    if labels.len() > limits::MAX_LABELS {
        return Err(FieldError::new(
            field,
            format!("at most {} labels", limits::MAX_LABELS),
        ));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
        if !key_ok {
            return Err(FieldError::new(
                format!("{field}.{k}"),
                "label keys are 1-63 characters of letters, digits, '.', '_', '-' or '/', starting with a letter or digit",
            ));
        }
        let value_ok = v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !value_ok {
            return Err(FieldError::new(
                format!("{field}.{k}"),
                "label values are at most 63 characters of letters, digits, '.', '_' or '-'",
            ));
        }
    }
    Ok(())
}

fn required<T>(errors: &mut Vec<FieldError>, field: &str, v: Option<T>) -> Option<T> {
    if v.is_none() {
        errors.push(FieldError::new(field, "is required"));
    }
    v
}

fn parsed<T>(
    errors: &mut Vec<FieldError>,
    field: &str,
    v: Option<String>,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Option<T> {
    let s = required(errors, field, v)?;
    parse(&s)
        .map_err(|reason| errors.push(FieldError::new(field, reason)))
        .ok()
}

fn ranged(
    errors: &mut Vec<FieldError>,
    field: &str,
    v: i64,
    range: std::ops::RangeInclusive<i64>,
) -> Option<i64> {
    if range.contains(&v) {
        Some(v)
    } else {
        errors.push(FieldError::new(
            field,
            format!(
                "must be between {} and {}, got {v}",
                range.start(),
                range.end()
            ),
        ));
        None
    }
}

impl ResourcesDraft {
    fn validate(self, errors: &mut Vec<FieldError>) -> Resources {
        let d = Resources::default();
        let cpus = match self.cpus {
            None => d.cpus,
            Some(c) if c.is_finite() && c > 0.0 && c <= 4096.0 => c,
            Some(c) => {
                errors.push(FieldError::new(
                    "resources.cpus",
                    format!("must be more than 0 and at most 4096, got {c}"),
                ));
                d.cpus
            }
        };
        let memory_mb = self
            .memory_mb
            .and_then(|m| ranged(errors, "resources.memory_mb", m, 1..=64 * 1024 * 1024))
            .map_or(d.memory_mb, |m| m as u64);
        let gpus = self
            .gpus
            .and_then(|g| ranged(errors, "resources.gpus", g, 0..=64))
            .map_or(d.gpus, |g| g as u32);
        Resources {
            cpus,
            memory_mb,
            gpus,
        }
    }
}

impl TaskSpecDraft {
    /// Validates every field and returns the spec, or every problem found.
    ///
    /// # Errors
    /// One [`FieldError`] per bad or missing field.
    pub fn validate(self, policy: UrlPolicy) -> Result<TaskSpec, Vec<FieldError>> {
        let mut e = Vec::new();
        let project_id = required(&mut e, "project_id", self.project_id);
        let url = |s: &str| RepoUrl::parse(s, policy);
        let code_repo_url = parsed(&mut e, "code_repo_url", self.code_repo_url, url);
        let code_commit_id = parsed(
            &mut e,
            "code_commit_id",
            self.code_commit_id,
            CommitId::parse,
        );
        let env_repo_url = parsed(&mut e, "env_repo_url", self.env_repo_url, url);
        let env_commit_id = parsed(&mut e, "env_commit_id", self.env_commit_id, CommitId::parse);
        let dockerfile_path = parsed(
            &mut e,
            "dockerfile_path",
            self.dockerfile_path,
            DockerfilePath::parse,
        );
        let command = self.command.unwrap_or_default();
        if command.len() > limits::MAX_ARGS {
            e.push(FieldError::new(
                "command",
                format!("at most {} arguments", limits::MAX_ARGS),
            ));
        }
        for (i, arg) in command.iter().enumerate() {
            if arg.contains('\0') || arg.len() > limits::MAX_ARG_BYTES {
                e.push(FieldError::new(
                    format!("command[{i}]"),
                    "must be at most 64 KiB without NUL bytes",
                ));
            }
        }
        let env = self.env.unwrap_or_default();
        if env.len() > limits::MAX_ENV {
            e.push(FieldError::new(
                "env",
                format!("at most {} variables", limits::MAX_ENV),
            ));
        }
        for (k, v) in &env {
            check_variable(&mut e, "env", k);
            if v.contains('\0') || v.len() > limits::MAX_ENV_VALUE_BYTES {
                e.push(FieldError::new(
                    format!("env.{k}"),
                    "values are at most 32 KiB without NUL bytes",
                ));
            }
        }
        let mut env_secrets = BTreeMap::new();
        let drafted = self.env_secrets.unwrap_or_default();
        if drafted.len() > limits::MAX_ENV {
            e.push(FieldError::new(
                "env_secrets",
                format!("at most {} variables", limits::MAX_ENV),
            ));
        }
        // A variable also in `env` gets the secret's value (the agent sets
        // secrets last).
        for (k, secret) in drafted {
            check_variable(&mut e, "env_secrets", &k);
            match Name::parse(&secret) {
                Ok(name) => {
                    env_secrets.insert(k, name);
                }
                Err(err) => e.push(FieldError::new(
                    format!("env_secrets.{k}"),
                    format!("a secret's name {err}"),
                )),
            }
        }
        let drafted = self.git_credentials.unwrap_or_default();
        let mut credential = |field: &str, name: Option<String>| {
            name.and_then(|n| match Name::parse(&n) {
                Ok(name) => Some(name),
                Err(err) => {
                    e.push(FieldError::new(
                        format!("git_credentials.{field}"),
                        format!("a secret's name {err}"),
                    ));
                    None
                }
            })
        };
        let git_credentials = GitCredentials {
            code: credential("code", drafted.code),
            env: credential("env", drafted.env),
            known_hosts: credential("known_hosts", drafted.known_hosts),
        };
        let resources = self.resources.unwrap_or_default().validate(&mut e);
        let labels = self.labels.unwrap_or_default();
        if let Err(err) = validate_labels("labels", &labels) {
            e.push(err);
        }
        let priority = self
            .priority
            .and_then(|p| ranged(&mut e, "priority", p, -1000..=1000))
            .unwrap_or(0) as i32;
        let timeout_s = self
            .timeout_s
            .and_then(|t| ranged(&mut e, "timeout_s", t, 1..=limits::MAX_TIMEOUT_S))
            .map(|t| t as u64);
        let max_retries = self
            .max_retries
            .and_then(|r| ranged(&mut e, "max_retries", r, 0..=limits::MAX_RETRIES))
            .map_or(limits::DEFAULT_RETRIES, |r| r as u32);
        let inputs = validate_inputs(&mut e, self.inputs.unwrap_or_default());
        let outputs = validate_outputs(&mut e, self.outputs.unwrap_or_default());
        let network = match self.network.as_deref().map(TaskNetwork::parse) {
            None => TaskNetwork::Node,
            Some(Ok(network)) => network,
            Some(Err(reason)) => {
                e.push(FieldError::new("network", reason));
                TaskNetwork::Node
            }
        };
        match (
            project_id,
            code_repo_url,
            code_commit_id,
            env_repo_url,
            env_commit_id,
            dockerfile_path,
        ) {
            (Some(project_id), Some(cru), Some(cci), Some(eru), Some(eci), Some(dp))
                if e.is_empty() =>
            {
                Ok(TaskSpec {
                    project_id,
                    code_repo_url: cru,
                    code_commit_id: cci,
                    env_repo_url: eru,
                    env_commit_id: eci,
                    dockerfile_path: dp,
                    command,
                    env,
                    resources,
                    labels,
                    priority,
                    timeout_s,
                    max_retries,
                    inputs,
                    outputs,
                    network,
                    env_secrets,
                    git_credentials,
                })
            }
            _ => Err(e),
        }
    }
}

/// Checks the name of an environment variable set through `field`
/// (`env` or `env_secrets`).
fn check_variable(e: &mut Vec<FieldError>, field: &str, k: &str) {
    let name_ok = k
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && k.len() <= 256;
    if !name_ok {
        e.push(FieldError::new(
            format!("{field}.{k}"),
            "names are letters, digits and '_', not starting with a digit",
        ));
    }
    if is_gpu_visibility_variable(k) {
        e.push(FieldError::new(
            format!("{field}.{k}"),
            "NVIDIA_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES and NVIDIA_* are set by the node \
             from the GPUs assigned to the task; ask for GPUs with resources.gpus",
        ));
    }
    if is_platform_variable(k) {
        e.push(FieldError::new(
            format!("{field}.{k}"),
            format!(
                "UNIDESK_* are set by the node ({TASK_ID_VARIABLE}, {ATTEMPT_VARIABLE}); \
                 name the variable otherwise"
            ),
        ));
    }
}

/// Checks one `/`-separated relative path and returns it normalised (`./a//b`
/// becomes `a/b`): segments of letters, digits and `. _ - + = @ ,`, never
/// `..`, never absolute, at most [`limits::MAX_PATH_BYTES`] bytes.
fn relative_path(s: &str, what: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > limits::MAX_PATH_BYTES {
        return Err(format!("must be at most {} bytes", limits::MAX_PATH_BYTES));
    }
    if s.starts_with('/') || s.as_bytes().get(1) == Some(&b':') {
        return Err(format!("must be relative to {what}, not absolute"));
    }
    if s.contains('\\') {
        return Err("must use / as the separator".into());
    }
    let mut parts = Vec::new();
    for part in s.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("must not contain '..': it would leave {what}")),
            p if p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+=@,".contains(&b)) =>
            {
                parts.push(p)
            }
            _ => {
                return Err(
                    "may hold only letters, digits and . _ - + = @ , between the / separators"
                        .into(),
                )
            }
        }
    }
    if parts.is_empty() {
        return Err("must name a file".into());
    }
    Ok(parts.join("/"))
}

/// The name of an object in a project's store, such as
/// `datasets/imagenet/train.tar`: a relative path (see the rules of
/// [`WorkspacePath`]). Each project has its own namespace, so the same name
/// in two projects names two objects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ObjectName(String);

impl ObjectName {
    /// Parses and normalises an object name.
    ///
    /// # Errors
    /// A reason when the name is empty, absolute, climbs with `..`, holds
    /// other characters than letters, digits and `. _ - + = @ ,` between its
    /// `/` separators, or is longer than 512 bytes.
    pub fn parse(s: &str) -> Result<Self, String> {
        relative_path(s, "the project's store").map(Self)
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A file's path inside a task's workspace (the code checkout, mounted at
/// `/workspace`): relative, normalised, never climbing out with `..` and
/// never inside `.git`. A symbolic link inside the workspace can still
/// point out of it; the agent refuses to follow such a link.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkspacePath(String);

impl WorkspacePath {
    /// Parses and normalises a workspace path.
    ///
    /// # Errors
    /// As for [`ObjectName::parse`], and when the path points into `.git`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let p = relative_path(s, "the workspace")?;
        if p == ".git" || p.starts_with(".git/") {
            return Err("must not point into .git".into());
        }
        Ok(Self(p))
    }

    /// The normalised path.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The name of a task's output: 1-128 letters, digits, `.`, `_` or `-`,
/// unique within the task. Its stored object is named after it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OutputName(String);

impl OutputName {
    /// Parses an output name.
    ///
    /// # Errors
    /// A reason when the name does not fit.
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= limits::MAX_OUTPUT_NAME_BYTES
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(format!(
                "must be 1-{} letters, digits, '.', '_' or '-'",
                limits::MAX_OUTPUT_NAME_BYTES
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                Self::parse(&s)
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_newtype!(ObjectName);
string_newtype!(WorkspacePath);
string_newtype!(OutputName);

/// An object downloaded into the workspace before the command runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// Where the file goes in the workspace; also how the input is named
    /// on the timeline and in errors.
    pub name: WorkspacePath,
    /// The object of the task's project to download.
    pub object: ObjectName,
}

/// A workspace file uploaded once the command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// The output's name: the artifact's name.
    pub name: OutputName,
    /// The file in the workspace.
    pub path: WorkspacePath,
}

/// The raw form of an [`Input`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputDraft {
    /// See [`Input::name`].
    pub name: Option<String>,
    /// See [`Input::object`].
    pub object: Option<String>,
}

/// The raw form of an [`Output`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputDraft {
    /// See [`Output::name`].
    pub name: Option<String>,
    /// See [`Output::path`].
    pub path: Option<String>,
}

fn validate_inputs(e: &mut Vec<FieldError>, drafts: Vec<InputDraft>) -> Vec<Input> {
    if drafts.len() > limits::MAX_INPUTS {
        e.push(FieldError::new(
            "inputs",
            format!("at most {} inputs", limits::MAX_INPUTS),
        ));
        return Vec::new();
    }
    let mut inputs: Vec<Input> = Vec::new();
    for (i, d) in drafts.into_iter().enumerate() {
        let name = parsed(
            e,
            &format!("inputs[{i}].name"),
            d.name,
            WorkspacePath::parse,
        );
        let object = parsed(
            e,
            &format!("inputs[{i}].object"),
            d.object,
            ObjectName::parse,
        );
        if let (Some(name), Some(object)) = (name, object) {
            if inputs.iter().any(|x| x.name == name) {
                e.push(FieldError::taken(
                    format!("inputs[{i}].name"),
                    format!("{name} is named by another input already"),
                ));
            }
            inputs.push(Input { name, object });
        }
    }
    inputs
}

fn validate_outputs(e: &mut Vec<FieldError>, drafts: Vec<OutputDraft>) -> Vec<Output> {
    if drafts.len() > limits::MAX_OUTPUTS {
        e.push(FieldError::new(
            "outputs",
            format!("at most {} outputs", limits::MAX_OUTPUTS),
        ));
        return Vec::new();
    }
    let mut outputs: Vec<Output> = Vec::new();
    for (i, d) in drafts.into_iter().enumerate() {
        let name = parsed(e, &format!("outputs[{i}].name"), d.name, OutputName::parse);
        let path = parsed(
            e,
            &format!("outputs[{i}].path"),
            d.path,
            WorkspacePath::parse,
        );
        if let (Some(name), Some(path)) = (name, path) {
            if outputs.iter().any(|x| x.name == name) {
                e.push(FieldError::taken(
                    format!("outputs[{i}].name"),
                    format!("{name} is the name of another output already"),
                ));
            }
            outputs.push(Output { name, path });
        }
    }
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn draft() -> TaskSpecDraft {
        TaskSpecDraft {
            project_id: Some(Uuid::nil()),
            code_repo_url: Some("https://example.com/a/code.git".into()),
            code_commit_id: Some(SHA.into()),
            env_repo_url: Some("git@example.com:a/env.git".into()),
            env_commit_id: Some(SHA.to_uppercase()),
            dockerfile_path: Some("./docker//gpu/Dockerfile".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_complete_draft_becomes_a_normalised_spec_with_defaults() {
        let spec = draft().validate(UrlPolicy::default()).unwrap();
        assert_eq!(spec.dockerfile_path.as_str(), "docker/gpu/Dockerfile");
        assert_eq!(spec.env_commit_id.as_str(), SHA);
        assert_eq!(spec.resources, Resources::default());
        assert_eq!(spec.max_retries, limits::DEFAULT_RETRIES);
        assert_eq!(spec.priority, 0);
    }

    #[test]
    fn short_and_non_hex_commit_ids_are_refused() {
        assert!(CommitId::parse("abc1234").is_err());
        assert!(CommitId::parse(&"g".repeat(40)).is_err());
        assert!(CommitId::parse(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn dockerfile_paths_cannot_leave_the_repository() {
        for bad in [
            "/etc/passwd",
            "../Dockerfile",
            "a/../../b",
            "a\\b",
            "",
            ".",
            "C:/x",
            ".git/config",
        ] {
            assert!(DockerfilePath::parse(bad).is_err(), "{bad} was accepted");
        }
        assert_eq!(DockerfilePath::parse("a/./b").unwrap().as_str(), "a/b");
    }

    #[test]
    fn only_https_ssh_and_git_urls_pass_unless_file_is_allowed() {
        let p = UrlPolicy::default();
        assert!(RepoUrl::parse("https://h/r.git", p).is_ok());
        assert!(RepoUrl::parse("ssh://git@h:22/r.git", p).is_ok());
        assert!(RepoUrl::parse("git://h/r", p).is_ok());
        assert!(RepoUrl::parse("git@h:r.git", p).is_ok());
        assert!(RepoUrl::parse("http://h/r.git", p).is_err());
        assert!(RepoUrl::parse("ftp://h/r.git", p).is_err());
        assert!(RepoUrl::parse("https://u:secret@h/r.git", p).is_err());
        assert!(RepoUrl::parse("-uhttps://h/r", p).is_err());
        assert!(RepoUrl::parse("file:///srv/r.git", p).is_err());
        let dev = UrlPolicy { allow_file: true };
        assert!(RepoUrl::parse("file:///srv/r.git", dev).is_ok());
        assert!(RepoUrl::parse("file://relative", dev).is_err());
    }

    /// Repository URLs that carry, or could smuggle, a credential; each must
    /// be refused with a reason that says why.
    const HOSTILE_URLS: &[(&str, &str)] = &[
        ("https://u:secret@h/r.git", "credentials never go in a URL"),
        (
            "https://ghp_0123456789abcdef0123456789abcdef0123@github.com/o/r.git",
            "credentials never go in a URL",
        ),
        (
            "https://x-access-token:ghs_abc@github.com/o/r.git",
            "credentials never go in a URL",
        ),
        (
            "https://oauth2:glpat-abc@gitlab.com/o/r.git",
            "credentials never go in a URL",
        ),
        ("https://token@h/r.git", "credentials never go in a URL"),
        ("https://@h/r.git", "credentials never go in a URL"),
        ("HTTPS://U:P@H/r.git", "credentials never go in a URL"),
        ("git://u@h/r.git", "credentials never go in a URL"),
        ("git://u:p@h/r.git", "credentials never go in a URL"),
        ("https://h/r.git?private_token=abc", "'?' or '#'"),
        ("https://h/r.git?access_token=abc&x=1", "'?' or '#'"),
        ("https://h/r.git#token=abc", "'?' or '#'"),
        ("https://h?token=abc/r.git", "'?' or '#'"),
        ("git@h:r.git?token=abc", "'?' or '#'"),
        ("ssh://git@h/r.git#x", "'?' or '#'"),
        ("https://u%3Apass%40h/r.git", "percent-encode"),
        ("https://u%3Apass@h/r.git", "percent-encode"),
        ("https://h%40evil.com/r.git", "percent-encode"),
        ("ssh://git%40h/r.git", "percent-encode"),
        ("git%3Apass@h:r.git", "percent-encode"),
        ("ssh://git:secret@h/r.git", "credentials never go in a URL"),
        ("ssh://git:@h/r.git", "credentials never go in a URL"),
        (
            "ssh://ghp_0123456789abcdef0123456789abcdef0123@h/r.git",
            "credentials never go in a URL",
        ),
        ("ssh://ghp_short@h/r.git", "credentials never go in a URL"),
        (
            "ssh://x-access-token@h/r.git",
            "credentials never go in a URL",
        ),
        ("ssh://a@b@h/r.git", "credentials never go in a URL"),
        ("ssh://@h/r.git", "credentials never go in a URL"),
        ("git:secret@h:r.git", "credentials never go in a URL"),
        (
            "ghp_0123456789abcdef0123456789abcdef0123@github.com:o/r.git",
            "credentials never go in a URL",
        ),
        (
            "x-access-token@github.com:o/r.git",
            "credentials never go in a URL",
        ),
        ("https://h\\@evil/r.git", "credentials never go in a URL"),
        ("https://h\\evil/r.git", "ASCII letters"),
        ("https://h /r.git", "whitespace"),
        ("https://h/r.git\n", "whitespace"),
        ("https://h/r.git\t", "whitespace"),
        ("https://h/r\u{0}.git", "whitespace"),
        ("https://h/r\u{7f}.git", "whitespace"),
        ("https://h/r\u{a0}.git", "whitespace"),
        ("https://h/r\u{3000}.git", "whitespace"),
        ("https://h/r\u{2028}.git", "whitespace"),
        ("https://u\u{200b}:p@h/r.git", "invisible"),
        ("https://h/r\u{202e}tig.git", "invisible"),
        ("https://h/r\u{feff}.git", "invisible"),
        ("https://h\u{ff20}evil/r.git", "ASCII"),
        ("https://h:/r.git", "port"),
        ("https://h:443x/r.git", "port"),
        ("https://[::1/r.git", "unclosed"),
        ("ext::sh -c touch% /tmp/pwned", "whitespace"),
        ("ext::sh%20-c%20id", "'::'"),
        ("fd::17", "'::'"),
    ];

    #[test]
    fn urls_that_could_carry_a_credential_are_refused_saying_why() {
        let dev = UrlPolicy { allow_file: true };
        for (url, why) in HOSTILE_URLS {
            match RepoUrl::parse(url, dev) {
                Ok(_) => panic!("{url:?} was accepted"),
                Err(reason) => assert!(
                    reason.contains(why),
                    "{url:?} was refused with {reason:?}, which does not say {why:?}"
                ),
            }
        }
        for url in [
            "file://u:p@/srv/r.git",
            "file://token@/srv/r.git",
            "file:///srv/r.git?token=x",
        ] {
            assert!(RepoUrl::parse(url, dev).is_err(), "{url:?} was accepted");
        }
    }

    #[test]
    fn repository_urls_are_printable_ascii_with_the_rest_percent_encoded() {
        let dev = UrlPolicy { allow_file: true };
        for url in [
            "https://h/répertoire.git",
            "git@h:répertoire.git",
            "https://hôte.example/r.git",
        ] {
            let refused = RepoUrl::parse(url, dev).expect_err(url);
            assert!(refused.contains("ASCII"), "{url:?}: {refused}");
        }
    }

    #[test]
    fn ordinary_repository_urls_still_pass() {
        let dev = UrlPolicy { allow_file: true };
        for url in [
            "https://github.com/org/code.git",
            "https://git.example.com:8443/group/sub/repo.git",
            "https://[2001:db8::1]:8443/r.git",
            "https://h/@scope/r.git",
            "https://h/a%20b.git",
            "https://h/r%C3%A9pertoire.git",
            "git://h/r",
            "ssh://h/r.git",
            "ssh://git@h:2222/r.git",
            "ssh://deploy-bot@[::1]/srv/r.git",
            "git@github.com:org/code.git",
            "h:r.git",
            "file:///srv/r.git",
        ] {
            assert!(
                RepoUrl::parse(url, dev).is_ok(),
                "{url:?} was refused: {:?}",
                RepoUrl::parse(url, dev)
            );
        }
    }

    #[test]
    fn each_bad_repository_url_names_its_field() {
        let mut d = draft();
        d.code_repo_url = Some("https://u:p@h/r.git".into());
        d.env_repo_url = Some("https://h/e.git?token=x".into());
        let errs = d.validate(UrlPolicy::default()).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["code_repo_url", "env_repo_url"]);
        assert!(errs
            .iter()
            .all(|e| e.reason.contains(NO_CREDENTIALS_IN_URLS)));
        assert!(errs.iter().all(|e| !e.reason.contains("secret")));
    }

    #[test]
    fn every_bad_field_is_named_at_once() {
        let mut d = draft();
        d.code_commit_id = Some("abc".into());
        d.dockerfile_path = None;
        d.resources = Some(ResourcesDraft {
            cpus: Some(-1.0),
            memory_mb: Some(-5),
            gpus: None,
        });
        let errs = d.validate(UrlPolicy::default()).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "code_commit_id",
                "dockerfile_path",
                "resources.cpus",
                "resources.memory_mb"
            ]
        );
    }

    #[test]
    fn inputs_and_outputs_stay_inside_the_workspace_and_the_store() {
        let mut d = draft();
        d.inputs = Some(vec![
            InputDraft {
                name: Some("./data//train.tar".into()),
                object: Some("datasets/train.tar".into()),
            },
            InputDraft {
                name: Some("../etc/passwd".into()),
                object: Some("/abs".into()),
            },
            InputDraft {
                name: Some(".git/config".into()),
                object: None,
            },
        ]);
        d.outputs = Some(vec![
            OutputDraft {
                name: Some("model".into()),
                path: Some("out/model.bin".into()),
            },
            OutputDraft {
                name: Some("model".into()),
                path: Some("a/../../b".into()),
            },
            OutputDraft {
                name: Some("bad name".into()),
                path: Some("ok".into()),
            },
        ]);
        let errs = d.clone().validate(UrlPolicy::default()).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "inputs[1].name",
                "inputs[1].object",
                "inputs[2].name",
                "inputs[2].object",
                "outputs[1].path",
                "outputs[2].name"
            ]
        );
        d.inputs.as_mut().unwrap().truncate(1);
        d.outputs.as_mut().unwrap().truncate(1);
        let spec = d.validate(UrlPolicy::default()).unwrap();
        assert_eq!(spec.inputs[0].name.as_str(), "data/train.tar");
        assert_eq!(spec.outputs[0].path.as_str(), "out/model.bin");
    }

    #[test]
    fn output_names_are_unique_and_counts_are_bounded() {
        let mut d = draft();
        let out = |n: &str| OutputDraft {
            name: Some(n.into()),
            path: Some(format!("{n}.bin")),
        };
        d.outputs = Some(vec![out("a"), out("a")]);
        let errs = d.clone().validate(UrlPolicy::default()).unwrap_err();
        assert_eq!(errs[0].field, "outputs[1].name");
        d.outputs = Some(
            (0..=limits::MAX_OUTPUTS)
                .map(|i| out(&i.to_string()))
                .collect(),
        );
        let errs = d.validate(UrlPolicy::default()).unwrap_err();
        assert_eq!(errs[0].field, "outputs");
    }

    #[test]
    fn a_spec_stored_before_inputs_existed_still_loads() {
        let spec = draft().validate(UrlPolicy::default()).unwrap();
        let mut json = serde_json::to_value(&spec).unwrap();
        assert!(json.get("inputs").is_none());
        json.as_object_mut().unwrap().remove("outputs");
        let back: TaskSpec = serde_json::from_value(json).unwrap();
        assert!(back.inputs.is_empty() && back.outputs.is_empty());
    }

    #[test]
    fn the_platforms_variables_cannot_be_set_by_a_task() {
        for (field, name) in [
            ("env", "UNIDESK_ATTEMPT"),
            ("env", "unidesk_task_id"),
            ("env", "UNIDESK_"),
            ("env_secrets", "Unidesk_Token"),
        ] {
            let mut d = draft();
            let vars = Some(BTreeMap::from([(name.to_owned(), "x".to_owned())]));
            if field == "env" {
                d.env = vars;
            } else {
                d.env_secrets = vars;
            }
            let errs = d.validate(UrlPolicy::default()).unwrap_err();
            assert_eq!(errs.len(), 1, "{name}: {errs:?}");
            assert_eq!(errs[0].field, format!("{field}.{name}"));
            assert!(errs[0].reason.contains("UNIDESK_ATTEMPT"), "{errs:?}");
        }
        let mut d = draft();
        d.env = Some(BTreeMap::from([(
            "MY_UNIDESK_X".to_owned(),
            "x".to_owned(),
        )]));
        d.validate(UrlPolicy::default()).unwrap();
        assert!(!is_platform_variable("UNIDESK"));
        assert!(!is_platform_variable("Ü"));
    }

    #[test]
    fn gpu_visibility_cannot_be_set_through_env_in_any_case() {
        for name in [
            "NVIDIA_VISIBLE_DEVICES",
            "nvidia_visible_devices",
            "Cuda_Visible_Devices",
            "CUDA_VISIBLE_DEVICES",
            "NVIDIA_DRIVER_CAPABILITIES",
            "NVIDIA_",
        ] {
            let mut d = draft();
            d.env = Some(BTreeMap::from([
                ("HOME".to_owned(), "/workspace".to_owned()),
                (name.to_owned(), "all".to_owned()),
            ]));
            let errs = d.validate(UrlPolicy::default()).unwrap_err();
            assert_eq!(errs.len(), 1, "{name}: {errs:?}");
            assert_eq!(errs[0].field, format!("env.{name}"));
            assert!(errs[0].reason.contains("resources.gpus"), "{errs:?}");
        }
        for name in [
            "CUDA_HOME",
            "MY_NVIDIA_VISIBLE_DEVICES",
            "NVIDIAX",
            "CUDA_VISIBLE",
        ] {
            let mut d = draft();
            d.env = Some(BTreeMap::from([(name.to_owned(), "1".to_owned())]));
            assert!(d.validate(UrlPolicy::default()).is_ok(), "{name} refused");
        }
    }

    #[test]
    fn a_task_may_ask_for_no_network_and_nothing_else() {
        let spec = draft().validate(UrlPolicy::default()).unwrap();
        assert_eq!(spec.network, TaskNetwork::Node);
        let mut d = draft();
        d.network = Some("none".into());
        let spec = d.validate(UrlPolicy::default()).unwrap();
        assert_eq!(spec.network, TaskNetwork::None);
        assert_eq!(serde_json::to_value(&spec).unwrap()["network"], "none");
        for bad in ["host", "bridge", "None", "", "container:abc"] {
            let mut d = draft();
            d.network = Some(bad.into());
            let errs = d.validate(UrlPolicy::default()).unwrap_err();
            assert_eq!(errs[0].field, "network", "{bad}");
        }
    }

    #[test]
    fn a_spec_stored_before_the_network_field_still_loads_with_the_nodes_choice() {
        let spec = draft().validate(UrlPolicy::default()).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert!(json.get("network").is_none(), "the default is not written");
        let back: TaskSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back.network, TaskNetwork::Node);
        assert_eq!(back, spec);
    }

    #[test]
    fn secrets_are_named_by_variable_and_repository_and_checked() {
        let mut d = draft();
        d.env = Some(BTreeMap::from([("MODE".into(), "fast".into())]));
        d.env_secrets = Some(BTreeMap::from([
            ("WANDB_API_KEY".into(), "wandb".into()),
            ("HF_TOKEN".into(), "hf".into()),
        ]));
        d.git_credentials = Some(GitCredentialsDraft {
            code: Some("deploy-key".into()),
            env: Some("wandb".into()),
            known_hosts: Some("hosts".into()),
        });
        let spec = d.validate(UrlPolicy::default()).unwrap();
        let named: Vec<(String, String)> = spec
            .secrets()
            .into_iter()
            .map(|(n, f)| (n.to_string(), f))
            .collect();
        assert_eq!(
            named,
            [
                ("deploy-key".into(), "git_credentials.code".into()),
                ("hf".into(), "env_secrets.HF_TOKEN".into()),
                ("hosts".into(), "git_credentials.known_hosts".into()),
                ("wandb".into(), "env_secrets.WANDB_API_KEY".into()),
            ]
        );

        let mut d = draft();
        d.env = Some(BTreeMap::from([("TOKEN".into(), "plain".into())]));
        d.env_secrets = Some(BTreeMap::from([
            ("TOKEN".into(), "tok".into()),
            ("1BAD".into(), "tok".into()),
            ("CUDA_VISIBLE_DEVICES".into(), "tok".into()),
            ("GOOD".into(), "Not A Name".into()),
        ]));
        d.git_credentials = Some(GitCredentialsDraft {
            code: Some("../key".into()),
            env: None,
            known_hosts: None,
        });
        let errs = d.validate(UrlPolicy::default()).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "env_secrets.1BAD",
                "env_secrets.CUDA_VISIBLE_DEVICES",
                "env_secrets.GOOD",
                "git_credentials.code"
            ]
        );
    }

    #[test]
    fn a_spec_without_secrets_is_stored_as_before() {
        let spec = draft().validate(UrlPolicy::default()).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert!(json.get("env_secrets").is_none() && json.get("git_credentials").is_none());
        let back: TaskSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
    }
}
