//! What an attempt tells the server: its changes of state and its output,
//! and how it ended.

use protocol::ReportedState;
use tokio::sync::mpsc;

use crate::logs::Chunk;

/// Something an executor tells the server, before it gets a report id.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// A change of state.
    Status(StatusReport),
    /// A piece of output.
    Log(LogReport),
}

impl Report {
    /// The attempt the report is about.
    pub fn attempt(&self) -> (uuid::Uuid, u32) {
        match self {
            Report::Status(s) => (s.task_id, s.attempt),
            Report::Log(l) => (l.task_id, l.attempt),
        }
    }
}

/// A change of an attempt's state; see [`protocol::Status`].
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    /// The task.
    pub task_id: uuid::Uuid,
    /// The attempt.
    pub attempt: u32,
    /// The new state.
    pub state: ReportedState,
    /// With `preparing`: the stage.
    pub stage: Option<String>,
    /// With `running`: the container id.
    pub container: Option<String>,
    /// With `failed`: the exit status, if the command ran.
    pub exit_code: Option<i64>,
    /// Why, for a person.
    pub message: Option<String>,
    /// With `failed`: the node, not the task, kept the attempt from its
    /// end; see [`protocol::Status::node_fault`].
    pub node_fault: bool,
}

impl StatusReport {
    /// A bare report of `state`.
    pub fn new(task_id: uuid::Uuid, attempt: u32, state: ReportedState) -> Self {
        StatusReport {
            task_id,
            attempt,
            state,
            stage: None,
            container: None,
            exit_code: None,
            message: None,
            node_fault: false,
        }
    }

    /// Whether this state ends the attempt.
    pub fn is_final(&self) -> bool {
        !matches!(
            self.state,
            ReportedState::Accepted | ReportedState::Preparing | ReportedState::Running
        )
    }
}

/// A piece of an attempt's output; see [`protocol::LogChunk`].
#[derive(Debug, Clone, PartialEq)]
pub struct LogReport {
    /// The task.
    pub task_id: uuid::Uuid,
    /// The attempt.
    pub attempt: u32,
    /// Byte offset of `data` in the attempt's output.
    pub offset: u64,
    /// The text.
    pub data: String,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct Ending {
    pub(super) state: ReportedState,
    pub(super) exit_code: Option<i64>,
    pub(super) message: Option<String>,
    /// The node, not the task, kept the attempt from its end (absent in
    /// endings noted before it existed).
    #[serde(default)]
    pub(super) node_fault: bool,
}

impl Ending {
    pub(super) fn failed(message: impl std::fmt::Display) -> Self {
        Ending {
            state: ReportedState::Failed,
            exit_code: None,
            message: Some(message.to_string()),
            node_fault: false,
        }
    }

    /// The failure Docker's `error` caused: the node's fault when Docker
    /// did not answer, the task's otherwise (Docker refused what it asked
    /// for: a bad image, a command that does not exist).
    pub(super) fn docker(error: &crate::docker::DockerError) -> Self {
        Ending {
            node_fault: error.is_unanswered(),
            ..Ending::failed(error)
        }
    }

    pub(super) fn plain(state: ReportedState, message: Option<String>) -> Self {
        Ending {
            state,
            exit_code: None,
            message,
            node_fault: false,
        }
    }
}

/// Sends one attempt's reports.
#[derive(Debug, Clone)]
pub(super) struct Reporter {
    task_id: uuid::Uuid,
    attempt: u32,
    tx: mpsc::Sender<Report>,
    mask: Mask,
}

/// What of the attempt's output may be reported.
#[derive(Clone, Default)]
pub(super) enum Mask {
    /// All of it, as it is.
    #[default]
    Nothing,
    /// All of it, with these secrets' values masked.
    Values(std::sync::Arc<Vec<zeroize::Zeroizing<String>>>),
    /// None of it: the secrets it may hold are not known here, for this
    /// reason.
    Withhold(String),
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mask::Nothing => f.write_str("Nothing"),
            Mask::Values(v) => write!(f, "Values({} secrets)", v.len()),
            Mask::Withhold(why) => write!(f, "Withhold({why:?})"),
        }
    }
}

impl Reporter {
    /// Sends the reports of `attempt` of `task_id` to `tx`.
    pub(super) fn new(task_id: uuid::Uuid, attempt: u32, tx: mpsc::Sender<Report>) -> Self {
        Reporter {
            task_id,
            attempt,
            tx,
            mask: Mask::Nothing,
        }
    }

    /// The same reporter masking what `mask` says in the attempt's output
    /// and messages.
    pub(super) fn masking(mut self, mask: Mask) -> Self {
        self.mask = mask;
        self
    }

    /// What it masks.
    pub(super) fn mask(&self) -> &Mask {
        &self.mask
    }

    /// `text` with every secret's value masked.
    fn masked(&self, text: String) -> String {
        match &self.mask {
            Mask::Values(values) => values.iter().fold(text, |t, v| {
                if !v.is_empty() && t.contains(v.as_str()) {
                    t.replace(v.as_str(), crate::logs::MASK)
                } else {
                    t
                }
            }),
            Mask::Nothing | Mask::Withhold(_) => text,
        }
    }

    /// The attempt it reports on.
    pub(super) fn key(&self) -> (uuid::Uuid, u32) {
        (self.task_id, self.attempt)
    }

    /// Reports the final state.
    pub(super) async fn ended(&self, ending: Ending) {
        self.status(ending.state, |s| {
            s.exit_code = ending.exit_code;
            s.message = ending.message;
            s.node_fault = ending.node_fault;
        })
        .await;
    }

    pub(super) async fn send(&self, report: Report) {
        if self.tx.send(report).await.is_err() {
            tracing::debug!("report dropped: the agent is shutting down");
        }
    }

    pub(super) async fn status(&self, state: ReportedState, fill: impl FnOnce(&mut StatusReport)) {
        let mut status = StatusReport::new(self.task_id, self.attempt, state);
        fill(&mut status);
        status.message = status.message.map(|m| self.masked(m));
        self.send(Report::Status(status)).await;
    }

    pub(super) async fn stage(&self, stage: &str) {
        self.status(ReportedState::Preparing, |s| s.stage = Some(stage.into()))
            .await;
    }

    pub(super) async fn stage_done(&self, stage: &str, detail: String) {
        self.status(ReportedState::Preparing, |s| {
            s.stage = Some(stage.into());
            s.message = Some(detail);
        })
        .await;
    }

    pub(super) async fn log(&self, chunk: Chunk) {
        self.send(Report::Log(LogReport {
            task_id: self.task_id,
            attempt: self.attempt,
            offset: chunk.offset,
            data: chunk.data,
        }))
        .await;
    }
}
