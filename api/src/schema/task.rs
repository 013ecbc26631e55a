//! Tasks: the submission body, the task as shown, pages of tasks and a task's
//! state as of one event.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use domain::spec::{GitCredentialsDraft, InputDraft, OutputDraft, ResourcesDraft, TaskSpecDraft};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;
use crate::schema::event::EventRecord;

/// What to run: the body of `POST /api/v1/tasks`. Every field is checked
/// and every problem reported at once; unknown fields are refused.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitTask {
    /// The project the task belongs to; the caller must be one of its
    /// members or maintainers.
    #[schema(value_type = Uuid, required = true)]
    pub project_id: Option<Uuid>,
    /// The code repository: `https://`, `ssh://`, `git://` or `user@host:path`.
    ///
    /// Printable ASCII only (percent-encode the rest of a path), no query
    /// string or fragment, no user information but a plain ssh user name.
    /// The pattern says exactly that, except that the server also takes
    /// IPv6 hosts in brackets and `file://` URLs where it allows them.
    #[schema(value_type = String, required = true, max_length = 2048, example = "https://git.example.com/lab/model.git", pattern = r"^(?:(?:[hH][tT][tT][pP][sS]|[gG][iI][tT])://[A-Za-z0-9_.][A-Za-z0-9_.\-]*(?::[0-9]{1,5})?/[\x21\x22\x24-\x3e\x40-\x7e]+|[sS][sS][hH]://(?:(?!(?:[gG][hH][pP]_|[gG][hH][oO]_|[gG][hH][uU]_|[gG][hH][sS]_|[gG][hH][rR]_|[gG][iI][tT][hH][uU][bB]_[pP][aA][tT]_|[gG][lL][pP][aA][tT]-|[gG][lL][dD][tT]-|[xX]-[aA][cC][cC][eE][sS][sS]-[tT][oO][kK][eE][nN]|[xX]-[tT][oO][kK][eE][nN]-[aA][uU][tT][hH]|[xX]-[oO][aA][uU][tT][hH]-[bB][aA][sS][iI][cC]|[oO][aA][uU][tT][hH]2))[A-Za-z_][A-Za-z0-9._\-]{0,31}@)?[A-Za-z0-9_.][A-Za-z0-9_.\-]*(?::[0-9]{1,5})?/[\x21\x22\x24-\x3e\x40-\x7e]+|(?!.*://)(?:(?!(?:[gG][hH][pP]_|[gG][hH][oO]_|[gG][hH][uU]_|[gG][hH][sS]_|[gG][hH][rR]_|[gG][iI][tT][hH][uU][bB]_[pP][aA][tT]_|[gG][lL][pP][aA][tT]-|[gG][lL][dD][tT]-|[xX]-[aA][cC][cC][eE][sS][sS]-[tT][oO][kK][eE][nN]|[xX]-[tT][oO][kK][eE][nN]-[aA][uU][tT][hH]|[xX]-[oO][aA][uU][tT][hH]-[bB][aA][sS][iI][cC]|[oO][aA][uU][tT][hH]2))[A-Za-z_][A-Za-z0-9._\-]{0,31}@)?[A-Za-z0-9_.][A-Za-z0-9_.\-]*:(?!:)[\x21\x22\x24-\x3e\x41-\x7e]+)$")]
    pub code_repo_url: Option<String>,
    /// The full code commit id: 40 (or 64) hexadecimal digits.
    #[schema(value_type = String, required = true, example = "0123456789abcdef0123456789abcdef01234567", pattern = "^([0-9a-fA-F]{40}|[0-9a-fA-F]{64})$")]
    pub code_commit_id: Option<String>,
    /// The repository with the environment's Dockerfile, in the same forms
    /// as `code_repo_url`.
    #[schema(value_type = String, required = true, max_length = 2048, example = "git@git.example.com:lab/env.git", pattern = r"^(?:(?:[hH][tT][tT][pP][sS]|[gG][iI][tT])://[A-Za-z0-9_.][A-Za-z0-9_.\-]*(?::[0-9]{1,5})?/[\x21\x22\x24-\x3e\x40-\x7e]+|[sS][sS][hH]://(?:(?!(?:[gG][hH][pP]_|[gG][hH][oO]_|[gG][hH][uU]_|[gG][hH][sS]_|[gG][hH][rR]_|[gG][iI][tT][hH][uU][bB]_[pP][aA][tT]_|[gG][lL][pP][aA][tT]-|[gG][lL][dD][tT]-|[xX]-[aA][cC][cC][eE][sS][sS]-[tT][oO][kK][eE][nN]|[xX]-[tT][oO][kK][eE][nN]-[aA][uU][tT][hH]|[xX]-[oO][aA][uU][tT][hH]-[bB][aA][sS][iI][cC]|[oO][aA][uU][tT][hH]2))[A-Za-z_][A-Za-z0-9._\-]{0,31}@)?[A-Za-z0-9_.][A-Za-z0-9_.\-]*(?::[0-9]{1,5})?/[\x21\x22\x24-\x3e\x40-\x7e]+|(?!.*://)(?:(?!(?:[gG][hH][pP]_|[gG][hH][oO]_|[gG][hH][uU]_|[gG][hH][sS]_|[gG][hH][rR]_|[gG][iI][tT][hH][uU][bB]_[pP][aA][tT]_|[gG][lL][pP][aA][tT]-|[gG][lL][dD][tT]-|[xX]-[aA][cC][cC][eE][sS][sS]-[tT][oO][kK][eE][nN]|[xX]-[tT][oO][kK][eE][nN]-[aA][uU][tT][hH]|[xX]-[oO][aA][uU][tT][hH]-[bB][aA][sS][iI][cC]|[oO][aA][uU][tT][hH]2))[A-Za-z_][A-Za-z0-9._\-]{0,31}@)?[A-Za-z0-9_.][A-Za-z0-9_.\-]*:(?!:)[\x21\x22\x24-\x3e\x41-\x7e]+)$")]
    pub env_repo_url: Option<String>,
    /// The full env commit id.
    #[schema(value_type = String, required = true, example = "89abcdef0123456789abcdef0123456789abcdef", pattern = "^([0-9a-fA-F]{40}|[0-9a-fA-F]{64})$")]
    pub env_commit_id: Option<String>,
    /// The Dockerfile's path inside the env repository: relative, no `..`.
    #[schema(value_type = String, required = true, example = "docker/gpu/Dockerfile")]
    pub dockerfile_path: Option<String>,
    /// The argv to run; empty or absent runs the image's default command.
    pub command: Option<Vec<String>>,
    /// Environment variables. `NVIDIA_VISIBLE_DEVICES`,
    /// `CUDA_VISIBLE_DEVICES` and `NVIDIA_*` (in any case) are refused: the
    /// node sets them from the GPUs assigned to the task; so is `UNIDESK_*`:
    /// the node sets `UNIDESK_TASK_ID` and `UNIDESK_ATTEMPT` (from 1).
    pub env: Option<BTreeMap<String, String>>,
    /// What the task needs; defaults to 1 CPU, 1024 MiB, no GPU.
    pub resources: Option<SubmitResources>,
    /// Node labels the task requires.
    #[schema(schema_with = crate::schema::optional_labels)]
    pub labels: Option<BTreeMap<String, String>>,
    /// -1000 to 1000; higher runs first.
    #[schema(minimum = -1000, maximum = 1000)]
    pub priority: Option<i64>,
    /// Wall-clock limit of one attempt in seconds, 1 to 31536000 (a year).
    #[schema(minimum = 1, maximum = 31536000)]
    pub timeout_s: Option<i64>,
    /// Retries after a lost node, 0 to 100 (default 2).
    #[schema(minimum = 0, maximum = 100)]
    pub max_retries: Option<i64>,
    /// Objects of the project's store to download into the workspace
    /// before the command runs (at most 64).
    #[schema(max_items = 64)]
    pub inputs: Option<Vec<SubmitInput>>,
    /// Workspace files to upload once the command ended, also when it
    /// failed (at most 64).
    #[schema(max_items = 64)]
    pub outputs: Option<Vec<SubmitOutput>>,
    /// `none` runs the task without any network (only a loopback
    /// interface); absent leaves it to the node, which runs tasks on a
    /// bridge network unless its admin chose none for all.
    #[schema(value_type = Option<String>, example = "none", pattern = "^none$")]
    pub network: Option<String>,
    /// Environment variables whose values are secrets of the project, by
    /// variable: `{"WANDB_API_KEY": "wandb"}`. Each secret must exist; its
    /// value never enters the task, the log or any answer, and is masked
    /// as `***` in the task's output. A variable also given in `env` gets
    /// the secret's value.
    #[schema(example = json!({"WANDB_API_KEY": "wandb"}))]
    pub env_secrets: Option<BTreeMap<String, String>>,
    /// The secrets git fetches the repositories with: an SSH private key
    /// for `ssh://` or `user@host:path` URLs, a token (or `user:token`)
    /// for `https://` ones.
    pub git_credentials: Option<SubmitGitCredentials>,
}

/// Which project secrets git uses for the task's repositories.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitGitCredentials {
    /// The secret for `code_repo_url`.
    #[schema(example = "deploy-key", pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The secret for `env_repo_url`.
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// A secret holding `known_hosts` lines: the SSH host keys the
    /// repositories' hosts must show, besides those the node trusts. An
    /// unknown or changed host key fails the task.
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<String>,
}

/// An object to download into the workspace.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitInput {
    /// Where it goes in the workspace (the command's working directory),
    /// relative, no `..`.
    #[schema(example = "data/train.tar", value_type = String, required = true)]
    pub name: Option<String>,
    /// The object's name in the project's store, as uploaded.
    #[schema(example = "datasets/train.tar", value_type = String, required = true, max_length = 512, pattern = "^(?:\\.(?:/(?:\\.|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+))?)*/(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+)(?:/(?:\\.|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+))?)*|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+)(?:/(?:\\.|(?:[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*|\\.\\.[A-Za-z0-9._+=@,-]+))?)*)$")]
    pub object: Option<String>,
}

/// A workspace file to upload once the command ended.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitOutput {
    /// The output's name: letters, digits, `.`, `_`, `-`.
    #[schema(example = "model", value_type = String, required = true, pattern = "^(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\\.\\.[A-Za-z0-9._-]{1,126})$")]
    pub name: Option<String>,
    /// The file in the workspace, relative, no `..`.
    #[schema(example = "out/model.pt", value_type = String, required = true)]
    pub path: Option<String>,
}

/// What a task needs from a node.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitResources {
    /// CPU cores, more than 0 and at most 4096, fractions allowed.
    #[schema(exclusive_minimum = 0, maximum = 4096)]
    pub cpus: Option<f64>,
    /// Memory in MiB, 1 to 67108864 (64 TiB).
    #[schema(minimum = 1, maximum = 67108864)]
    pub memory_mb: Option<i64>,
    /// Whole GPUs, 0 to 64.
    #[schema(minimum = 0, maximum = 64)]
    pub gpus: Option<i64>,
}

impl From<SubmitTask> for TaskSpecDraft {
    fn from(s: SubmitTask) -> Self {
        TaskSpecDraft {
            project_id: s.project_id,
            code_repo_url: s.code_repo_url,
            code_commit_id: s.code_commit_id,
            env_repo_url: s.env_repo_url,
            env_commit_id: s.env_commit_id,
            dockerfile_path: s.dockerfile_path,
            command: s.command,
            env: s.env,
            resources: s.resources.map(|r| ResourcesDraft {
                cpus: r.cpus,
                memory_mb: r.memory_mb,
                gpus: r.gpus,
            }),
            labels: s.labels,
            priority: s.priority,
            timeout_s: s.timeout_s,
            max_retries: s.max_retries,
            inputs: s.inputs.map(|list| {
                list.into_iter()
                    .map(|i| InputDraft {
                        name: i.name,
                        object: i.object,
                    })
                    .collect()
            }),
            outputs: s.outputs.map(|list| {
                list.into_iter()
                    .map(|o| OutputDraft {
                        name: o.name,
                        path: o.path,
                    })
                    .collect()
            }),
            network: s.network,
            env_secrets: s.env_secrets,
            git_credentials: s.git_credentials.map(|g| GitCredentialsDraft {
                code: g.code,
                env: g.env,
                known_hosts: g.known_hosts,
            }),
        }
    }
}

/// What a task needs, after defaults were applied.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Resources {
    /// CPU cores.
    pub cpus: f64,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Whole GPUs.
    pub gpus: u32,
}

/// A validated, normalised task specification.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskSpec {
    /// The project.
    pub project_id: Uuid,
    /// The code repository.
    pub code_repo_url: String,
    /// The code commit, lower case.
    pub code_commit_id: String,
    /// The env repository.
    pub env_repo_url: String,
    /// The env commit, lower case.
    pub env_commit_id: String,
    /// The Dockerfile's normalised path.
    pub dockerfile_path: String,
    /// The argv.
    pub command: Vec<String>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// What it needs.
    pub resources: Resources,
    /// Required node labels.
    pub labels: BTreeMap<String, String>,
    /// Scheduling priority.
    pub priority: i32,
    /// Time limit of one attempt in seconds.
    pub timeout_s: Option<u64>,
    /// Retries after a lost node.
    pub max_retries: u32,
    /// Objects downloaded into the workspace before the command runs.
    pub inputs: Vec<TaskInput>,
    /// Workspace files uploaded once the command ended.
    pub outputs: Vec<TaskOutput>,
    /// `none` when the task runs without network; absent when the node
    /// chooses.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "none")]
    pub network: Option<String>,
    /// Environment variables set from project secrets: variable to the
    /// secret's name (never its value).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env_secrets: BTreeMap<String, String>,
    /// The secrets git fetches the repositories with, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_credentials: Option<SubmitGitCredentials>,
}

/// An input of a task.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskInput {
    /// Its path in the workspace.
    pub name: String,
    /// The object of the project's store.
    pub object: String,
}

/// An output of a task.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskOutput {
    /// Its name.
    pub name: String,
    /// The file in the workspace.
    pub path: String,
}

impl From<domain::spec::TaskSpec> for TaskSpec {
    fn from(s: domain::spec::TaskSpec) -> Self {
        Self {
            project_id: s.project_id,
            code_repo_url: s.code_repo_url.as_str().to_string(),
            code_commit_id: s.code_commit_id.as_str().to_string(),
            env_repo_url: s.env_repo_url.as_str().to_string(),
            env_commit_id: s.env_commit_id.as_str().to_string(),
            dockerfile_path: s.dockerfile_path.as_str().to_string(),
            command: s.command,
            env: s.env,
            resources: Resources {
                cpus: s.resources.cpus,
                memory_mb: s.resources.memory_mb,
                gpus: s.resources.gpus,
            },
            labels: s.labels,
            priority: s.priority,
            timeout_s: s.timeout_s,
            max_retries: s.max_retries,
            inputs: s
                .inputs
                .into_iter()
                .map(|i| TaskInput {
                    name: i.name.to_string(),
                    object: i.object.to_string(),
                })
                .collect(),
            outputs: s
                .outputs
                .into_iter()
                .map(|o| TaskOutput {
                    name: o.name.to_string(),
                    path: o.path.to_string(),
                })
                .collect(),
            network: s.network.as_submitted().map(str::to_owned),
            env_secrets: s
                .env_secrets
                .into_iter()
                .map(|(var, secret)| (var, secret.to_string()))
                .collect(),
            git_credentials: (!s.git_credentials.is_empty()).then(|| SubmitGitCredentials {
                code: s.git_credentials.code.map(|n| n.to_string()),
                env: s.git_credentials.env.map(|n| n.to_string()),
                known_hosts: s.git_credentials.known_hosts.map(|n| n.to_string()),
            }),
        }
    }
}

/// One try at running a task on one node.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Attempt {
    /// From 1.
    pub number: u32,
    /// The node it was placed on.
    pub node_id: Uuid,
    /// When it was placed.
    pub assigned_at: DateTime<Utc>,
    /// When its container started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// How it ended: a task state or `lost`.
    pub outcome: Option<String>,
    /// Why it ended, when it ended other than `succeeded`: the failure,
    /// or why the attempt was lost (its node went offline, its Docker did
    /// not answer…). Null for attempts that ended before attempts kept
    /// their reason, until the read models are rebuilt.
    pub reason: Option<String>,
    /// The node's GPU device indices it holds (or held).
    pub gpus: Vec<u32>,
}

/// A stored output of a task.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Artifact {
    /// The attempt that produced it.
    pub attempt: u32,
    /// Its name.
    pub name: String,
    /// Its object key.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// Hex SHA-256.
    pub sha256: String,
}

/// A task as it stands.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Task {
    /// Its id.
    pub id: Uuid,
    /// Its project.
    pub project_id: Uuid,
    /// `queued`, `assigned`, `accepted`, `preparing`, `running`,
    /// `succeeded`, `failed`, `timed_out` or `cancelled`.
    #[schema(example = "queued")]
    pub state: String,
    /// What it runs.
    pub spec: TaskSpec,
    /// Who submitted it, such as `user:alice`.
    pub submitted_by: Option<String>,
    /// When.
    pub submitted_at: Option<DateTime<Utc>>,
    /// The current attempt, 0 before the first.
    pub attempt: u32,
    /// The node holding the current attempt; absent when none does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<Uuid>,
    /// The preparation step, while preparing.
    pub stage: Option<String>,
    /// What that step found, such as `commit 1a2b3c4d5e6f: from cache`.
    pub stage_detail: Option<String>,
    /// A task requeued after a lost attempt is not placed before this time
    /// (the retry backoff).
    pub not_before: Option<DateTime<Utc>>,
    /// The current attempt's container.
    pub container: Option<String>,
    /// Whether a cancel was asked for.
    pub cancel_requested: bool,
    /// The exit status, once known.
    pub exit_code: Option<i64>,
    /// Why it ended as it did, when it did not succeed.
    pub reason: Option<String>,
    /// When its current attempt's container started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// When it last changed.
    pub updated_at: Option<DateTime<Utc>>,
    /// Every attempt so far.
    pub attempts: Vec<Attempt>,
    /// Stored outputs.
    pub artifacts: Vec<Artifact>,
    /// Output of its attempts that is no longer (or was never) stored, and
    /// why: retention, the output budget, or the database's size budget.
    /// Only `GET /tasks/{id}` says; absent when nothing is missing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub output_removed: Vec<OutputRemoved>,
    /// Why the task waits, while it is queued. Only `GET /tasks/{id}`
    /// says; absent when the task is not queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
}

/// Why a queued task waits, as the scheduler last explained it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct QueueStatus {
    /// One line for people.
    #[schema(
        example = "no online node carries label gpu=a100 (of 3 nodes: 1 offline, 2 lack label gpu=a100)"
    )]
    pub summary: String,
    /// What holds the task, as data, most telling first; empty while the
    /// scheduler has not looked at the task yet.
    pub reasons: Vec<QueueReason>,
    /// Since when this explanation holds; `null` while the scheduler has
    /// not looked at the task yet.
    pub since: Option<DateTime<Utc>>,
    /// The task's place in the queue, from 1: how many queued tasks of a
    /// higher priority, or of its priority and submitted before it, come
    /// first, plus one. Projects take turns within a priority, so it may
    /// be placed sooner.
    #[schema(minimum = 1)]
    pub position: u64,
}

/// One thing that holds a queued task. Nodes are counted once each, under
/// the first rule they break, in this order: offline, drained, label, cpu,
/// memory, gpus.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum QueueReason {
    /// No node has joined (or every one was revoked).
    NoNodes,
    /// Nodes offline or whose agent never connected.
    Offline {
        /// How many.
        nodes_filtered: u32,
        /// How many of them carry all the task's labels.
        with_labels: u32,
    },
    /// Online nodes an admin drained.
    Drained {
        /// How many.
        nodes_filtered: u32,
        /// How many of them carry all the task's labels.
        with_labels: u32,
    },
    /// Online, undrained nodes lacking a label the task needs.
    Label {
        /// The label, `key=value`.
        #[schema(example = "gpu=a100")]
        label: String,
        /// How many nodes lack it.
        nodes_filtered: u32,
    },
    /// Nodes with the task's labels but too little free CPU.
    Cpu {
        /// How many.
        nodes_filtered: u32,
        /// Cores the task needs.
        need: f64,
        /// The most free cores among those nodes.
        most_free: f64,
        /// The most cores any of them has at all.
        largest: f64,
    },
    /// Nodes with the task's labels but too little free memory.
    Memory {
        /// How many.
        nodes_filtered: u32,
        /// MiB the task needs.
        need_mb: u64,
        /// The most free MiB among those nodes.
        most_free_mb: u64,
        /// The most MiB any of them has at all.
        largest_mb: u64,
    },
    /// Nodes with the task's labels but too few free GPUs.
    Gpus {
        /// How many.
        nodes_filtered: u32,
        /// GPUs the task needs.
        need: u32,
        /// The most free GPUs among those nodes.
        most_free: u32,
        /// The most GPUs any of them has at all.
        largest: u32,
    },
    /// The task fitted a node, but tasks placed before it took the room.
    Taken,
    /// The project runs as many tasks as its `max_running` allows.
    Quota {
        /// The project's limit.
        max_running: u32,
        /// Its tasks holding nodes.
        running: u32,
    },
    /// A retried task waits out its backoff.
    Backoff {
        /// When the backoff ends.
        until: DateTime<Utc>,
    },
    /// The task fits a node and waits for its turn.
    InLine,
}

impl From<store::queue_reasons::Reason> for QueueReason {
    fn from(r: store::queue_reasons::Reason) -> Self {
        use store::queue_reasons::Reason as R;
        match r {
            R::NoNodes => Self::NoNodes,
            R::Offline {
                nodes_filtered,
                with_labels,
            } => Self::Offline {
                nodes_filtered,
                with_labels,
            },
            R::Drained {
                nodes_filtered,
                with_labels,
            } => Self::Drained {
                nodes_filtered,
                with_labels,
            },
            R::Label {
                label,
                nodes_filtered,
            } => Self::Label {
                label,
                nodes_filtered,
            },
            R::Cpu {
                nodes_filtered,
                need,
                most_free,
                largest,
            } => Self::Cpu {
                nodes_filtered,
                need,
                most_free,
                largest,
            },
            R::Memory {
                nodes_filtered,
                need_mb,
                most_free_mb,
                largest_mb,
            } => Self::Memory {
                nodes_filtered,
                need_mb,
                most_free_mb,
                largest_mb,
            },
            R::Gpus {
                nodes_filtered,
                need,
                most_free,
                largest,
            } => Self::Gpus {
                nodes_filtered,
                need,
                most_free,
                largest,
            },
            R::Taken => Self::Taken,
            R::Quota {
                max_running,
                running,
            } => Self::Quota {
                max_running,
                running,
            },
            R::Backoff { until } => Self::Backoff { until },
            R::InLine => Self::InLine,
        }
    }
}

/// Output of one attempt that is not, or no longer, stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct OutputRemoved {
    /// The attempt.
    pub attempt: u32,
    /// Where the missing output starts: 0 when all of it was removed.
    pub from_offset: u64,
    /// `retention` (the task finished longer ago than the server keeps
    /// output), `log_budget` (stored output passed its budget and this
    /// task's was among the oldest) or `db_budget` (the database was over
    /// its size budget when the output came, and the rest of the attempt's
    /// output was refused).
    #[schema(example = "retention")]
    pub reason: String,
    /// When.
    pub removed_at: DateTime<Utc>,
}

impl From<store::task_log::Removed> for OutputRemoved {
    fn from(r: store::task_log::Removed) -> Self {
        Self {
            attempt: r.attempt,
            from_offset: r.from_offset,
            reason: r.reason.as_str().to_string(),
            removed_at: r.at,
        }
    }
}

impl TryFrom<domain::task::Task> for Task {
    type Error = ApiError;

    fn try_from(t: domain::task::Task) -> Result<Self, ApiError> {
        let (Some(id), Some(spec)) = (t.id, t.spec) else {
            return Err(ApiError::internal("a task state without id or spec"));
        };
        Ok(Self {
            id,
            project_id: spec.project_id,
            state: t.state.as_str().to_string(),
            spec: spec.into(),
            submitted_by: t.submitted_by.map(|a| a.to_string()),
            submitted_at: t.submitted_at,
            attempt: t.attempt,
            node_id: t.node_id,
            stage: t.stage,
            stage_detail: t.stage_detail,
            not_before: t.not_before,
            container: t.container,
            cancel_requested: t.cancel_requested,
            exit_code: t.exit_code,
            // A task that succeeded after a lost attempt keeps that loss's
            // reason in its state; the attempts say what became of each.
            reason: t
                .reason
                .filter(|_| t.state != domain::task::TaskState::Succeeded),
            started_at: t.started_at,
            finished_at: t.finished_at,
            updated_at: t.updated_at,
            attempts: t
                .attempts
                .into_iter()
                .map(|a| Attempt {
                    number: a.number,
                    node_id: a.node_id,
                    assigned_at: a.assigned_at,
                    started_at: a.started_at,
                    ended_at: a.ended_at,
                    outcome: a.outcome,
                    reason: a.reason,
                    gpus: a.gpus,
                })
                .collect(),
            artifacts: t
                .artifacts
                .into_iter()
                .map(|a| Artifact {
                    attempt: a.attempt,
                    name: a.name,
                    key: a.key,
                    size: a.size,
                    sha256: a.sha256,
                })
                .collect(),
            output_removed: Vec::new(),
            queue: None,
        })
    }
}

/// One page of tasks, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskPage {
    /// The tasks.
    pub items: Vec<Task>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A task's state right after one of its events, replayed from the log.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskStateAt {
    /// The event the state is as of.
    pub event: EventRecord,
    /// The task's last sequence number now, to walk its history.
    pub last_sequence: u64,
    /// The task as it was right after `event`.
    pub state: Task,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_submission_body_has_exactly_the_fields_of_the_domain_draft() {
        let draft = serde_json::to_value(TaskSpecDraft::default()).expect("serialises");
        let mut draft_fields: Vec<_> = draft
            .as_object()
            .expect("an object")
            .keys()
            .cloned()
            .collect();
        draft_fields.sort();
        let schema = serde_json::to_value(<SubmitTask as utoipa::PartialSchema>::schema())
            .expect("serialises");
        let mut body_fields: Vec<_> = schema["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .cloned()
            .collect();
        body_fields.sort();
        assert_eq!(body_fields, draft_fields);
    }
}
