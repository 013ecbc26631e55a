//! The API's answers as the client reads them: only what it uses is
//! typed, every field is optional or defaulted, and whatever else an
//! answer carries is kept in `other`, so a newer server never breaks an
//! older client.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// A page of a list: its items and the cursor of the next page.
#[derive(Debug, Clone, Deserialize)]
pub struct Page<T> {
    /// The items.
    #[serde(default = "Vec::new")]
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last one.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// A user (`GET /me`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct User {
    /// Their name.
    pub name: String,
    /// Whether they administer the platform.
    #[serde(default)]
    pub admin: bool,
    /// Everything else the server said.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// A project.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Project {
    /// Its id.
    pub id: Uuid,
    /// Its unique name.
    pub name: String,
    /// Whether it takes no new tasks.
    #[serde(default)]
    pub archived: bool,
    /// Everything else the server said.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// What a task runs.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct TaskSpec {
    /// The code repository.
    #[serde(default)]
    pub code_repo_url: String,
    /// The code commit.
    #[serde(default)]
    pub code_commit_id: String,
    /// The env repository.
    #[serde(default)]
    pub env_repo_url: String,
    /// The env commit.
    #[serde(default)]
    pub env_commit_id: String,
    /// The Dockerfile in the env repository.
    #[serde(default)]
    pub dockerfile_path: String,
    /// The argv.
    #[serde(default)]
    pub command: Vec<String>,
    /// Everything else the server said.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// A task as it stands.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Task {
    /// Its id.
    pub id: Uuid,
    /// Its project.
    #[serde(default)]
    pub project_id: Option<Uuid>,
    /// `queued`, `assigned`, `accepted`, `preparing`, `running`,
    /// `succeeded`, `failed`, `timed_out` or `cancelled`.
    #[serde(default)]
    pub state: String,
    /// What it runs.
    #[serde(default)]
    pub spec: TaskSpec,
    /// The current attempt, 0 before the first.
    #[serde(default)]
    pub attempt: u32,
    /// The node of the current attempt.
    #[serde(default)]
    pub node_id: Option<Uuid>,
    /// The command's exit status, once known.
    #[serde(default)]
    pub exit_code: Option<i64>,
    /// Why it ended as it did, when it did not succeed.
    #[serde(default)]
    pub reason: Option<String>,
    /// Everything else the server said (attempts, artifacts, why it
    /// waits…).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl Task {
    /// Whether the task has ended for good.
    pub fn is_terminal(&self) -> bool {
        is_terminal(&self.state)
    }

    /// Why attempt `number` ended, when the server says.
    pub fn attempt_reason(&self, number: u32) -> Option<&str> {
        self.other
            .get("attempts")?
            .as_array()?
            .iter()
            .find(|a| a["number"].as_u64() == Some(u64::from(number)))?["reason"]
            .as_str()
    }
}

/// Whether a task in `state` has ended for good.
pub fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "timed_out" | "cancelled")
}

/// A stored output of a task (`GET /tasks/{id}/artifacts`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Artifact {
    /// Its id.
    pub id: Uuid,
    /// The attempt that produced it.
    #[serde(default)]
    pub attempt: u32,
    /// The output's name.
    pub name: String,
    /// Bytes.
    #[serde(default)]
    pub size: u64,
    /// Hex SHA-256.
    #[serde(default)]
    pub sha256: String,
    /// The API path that redirects to a presigned download URL.
    #[serde(default)]
    pub download: String,
}

/// Where to send an object's bytes (`POST /projects/{id}/objects`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Upload {
    /// The object's normalised name.
    pub name: String,
    /// `put` or `multipart`.
    pub method: String,
    /// With `put`: the presigned URL.
    #[serde(default)]
    pub url: Option<String>,
    /// Headers to send with every PUT, unchanged.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The id the completion names.
    #[serde(default)]
    pub upload_id: Option<String>,
    /// With `multipart`: bytes per part.
    #[serde(default)]
    pub part_size: Option<u64>,
    /// With `multipart`: a URL per part, in order.
    #[serde(default)]
    pub parts: Vec<PartUrl>,
    /// Seconds the URLs stay valid.
    #[serde(default)]
    pub expires_in_s: u64,
}

/// A presigned URL for one part.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PartUrl {
    /// From 1.
    pub part_number: u32,
    /// Where to PUT the part.
    pub url: String,
}

/// An object the store holds, verified.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct StoredObject {
    /// Its name in the project's store.
    pub name: String,
    /// Bytes.
    #[serde(default)]
    pub size: u64,
    /// Its SHA-256.
    #[serde(default)]
    pub sha256: String,
}

/// One event of the timeline.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TimelineEntry {
    /// Its position in the log: its id.
    pub position: i64,
    /// `task`, `node`, `project` or `user`.
    #[serde(default)]
    pub aggregate_type: String,
    /// The aggregate's id.
    #[serde(default)]
    pub aggregate_id: String,
    /// Such as `TaskAssigned`.
    #[serde(default)]
    pub event_type: String,
    /// Who caused it.
    #[serde(default)]
    pub actor: String,
    /// When it happened (RFC 3339).
    #[serde(default)]
    pub recorded_at: String,
    /// What happened, in one line.
    #[serde(default)]
    pub summary: String,
    /// Everything else the server said.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// A page of the timeline, newest first.
#[derive(Debug, Clone, Deserialize)]
pub struct TimelinePage {
    /// The events, newest first.
    #[serde(default)]
    pub items: Vec<TimelineEntry>,
    /// Where a live stream goes on from without a gap.
    #[serde(default)]
    pub live_after: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempts_reason_is_found_by_its_number() {
        let task: Task = serde_json::from_value(serde_json::json!({
            "id": "01a2538d-4445-7620-b854-a1edf190d874",
            "state": "running",
            "attempt": 2,
            "attempts": [
                {"number": 1, "outcome": "lost", "reason": "the node went offline"},
                {"number": 2, "outcome": null, "reason": null},
            ],
        }))
        .unwrap();
        assert_eq!(task.attempt_reason(1), Some("the node went offline"));
        assert_eq!(task.attempt_reason(2), None);
        assert_eq!(task.attempt_reason(3), None);
    }
}
