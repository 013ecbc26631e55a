//! Reports and log chunks from an agent, turned into Task commands and
//! `task_log` rows.
//!
//! The reporting node is always the session's node, never one a frame
//! names, so an agent can only ever speak for itself; the Task aggregate
//! then refuses reports for attempts that are not this node's current one.
//!
//! Reports and chunks arrive here already bounded by
//! [`protocol::bounds`]. A report that can never be stored (it fails a
//! check, or the database refuses its data) is [`Answer::Unstorable`]:
//! the agent is told so and drops it, and the task's timeline says so
//! ([`record_refusal`]); only a failure that may pass (the database is
//! unreachable) is [`Answer::Later`].

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use domain::task::{Outcome, Task, TaskCommand, TaskError};
use domain::Actor;
use protocol::{LogChunk, ReportedState, Status};
use store::{Store, StoreError};
use uuid::Uuid;

use crate::logs::{self, Capped, LogLimits, LogNotifier, Pace, Place};

/// How many (task, attempt) answers a session remembers for log chunks
/// before it forgets them all and asks again.
pub(crate) const LOG_PERMISSIONS: usize = 256;

/// What became of a report or chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Stored (or already stored): answer `received{id}`.
    Stored,
    /// Refused for good: answer `received{id, error}`.
    Refused(String),
    /// Refused for good because it can never be stored (it fails a check,
    /// or the database refuses its data): answer `received{id, error}`
    /// and, for a report, say so on its task's timeline.
    Unstorable(String),
    /// Not stored this time (the database failed): answer nothing, the
    /// agent sends it again.
    Later(String),
}

/// The Task command for a report from `node_id`.
///
/// # Errors
/// Why the report itself is unacceptable, for `received{id, error}`.
pub(crate) fn command(
    node_id: Uuid,
    status: &Status,
    at: DateTime<Utc>,
) -> Result<TaskCommand, String> {
    let attempt = status.attempt;
    let bounded = |name: &str, value: &Option<String>| match value.as_deref().map(str::trim) {
        None | Some("") => Err(format!("a {} report needs its {name}", state_name(status))),
        Some(v) => Ok(v.to_string()),
    };
    let exited = |outcome| TaskCommand::ReportExited {
        node_id,
        attempt,
        outcome,
        at,
    };
    Ok(match status.state {
        ReportedState::Accepted => TaskCommand::Accept {
            node_id,
            attempt,
            at,
        },
        ReportedState::Preparing => TaskCommand::ReportPreparing {
            node_id,
            attempt,
            stage: bounded("stage", &status.stage)?,
            detail: status
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(|m| failure_reason(Some(m))),
            at,
        },
        ReportedState::Running => TaskCommand::ReportStarted {
            node_id,
            attempt,
            container: bounded("container", &status.container)?,
            at,
        },
        ReportedState::Succeeded => exited(Outcome::Succeeded),
        // The node kept the attempt from its end: given up as lost, it is
        // retried while the task's retries allow.
        ReportedState::Failed if status.node_fault => TaskCommand::MarkLost {
            node_id,
            attempt,
            reason: format!(
                "the node could not run attempt {attempt}: {}",
                failure_reason(status.message.as_deref())
            ),
            at,
        },
        ReportedState::Failed => exited(Outcome::Failed {
            exit_code: status.exit_code,
            reason: failure_reason(status.message.as_deref()),
        }),
        ReportedState::Cancelled => exited(Outcome::Cancelled),
        ReportedState::TimedOut => exited(Outcome::TimedOut),
    })
}

/// The reported state's name as the protocol writes it.
pub(crate) fn state_name(status: &Status) -> &'static str {
    match status.state {
        ReportedState::Accepted => "accepted",
        ReportedState::Preparing => "preparing",
        ReportedState::Running => "running",
        ReportedState::Succeeded => "succeeded",
        ReportedState::Failed => "failed",
        ReportedState::Cancelled => "cancelled",
        ReportedState::TimedOut => "timed_out",
    }
}

/// The agent's message (bounded already), or `failed`.
fn failure_reason(message: Option<&str>) -> String {
    match message.map(str::trim).filter(|m| !m.is_empty()) {
        None => "failed".into(),
        Some(m) => m.into(),
    }
}

/// Why a report was refused, for the agent. Whether the task exists, which
/// node holds it and which attempt is current are not the agent's business
/// unless the attempt is its own, so those refusals all read the same.
fn refusal(e: &TaskError, attempt: u32) -> String {
    match e {
        TaskError::NotFound | TaskError::WrongNode { .. } | TaskError::StaleAttempt { .. } => {
            not_ours(attempt)
        }
        other => other.to_string(),
    }
}

fn not_ours(attempt: u32) -> String {
    format!("attempt {attempt} of this task is not assigned to this node")
}

/// Executes a report from `node_id`, bounded by [`protocol::bounds`].
pub(crate) async fn report(store: &Store, node_id: Uuid, status: &Status) -> Answer {
    let at = Utc::now();
    let command = match command(node_id, status, at) {
        Ok(c) => c,
        Err(reason) => return Answer::Unstorable(reason),
    };
    let actor = Actor::Node(node_id.to_string());
    match store
        .execute::<Task>(&status.task_id.to_string(), command, &actor, at)
        .await
    {
        Ok(_) => Answer::Stored,
        Err(StoreError::Rejected(e)) => Answer::Refused(refusal(&e, status.attempt)),
        Err(StoreError::Unstorable { sqlstate, message }) => {
            tracing::warn!(%node_id, task_id = %status.task_id, sqlstate, error = %message, "the database refused a report");
            Answer::Unstorable(unstorable(&sqlstate))
        }
        Err(e) => Answer::Later(e.to_string()),
    }
}

/// Stores reports from `node_id` that arrived together, as [`report`]
/// would one by one and answered the same, each task's decided together
/// and appended in one statement. Returns each report's answer, in order.
/// A task's reports whose append fails (the database refused some event,
/// or is unreachable) are executed one by one instead, so each gets its
/// own answer.
pub(crate) async fn report_each(store: &Store, node_id: Uuid, statuses: &[Status]) -> Vec<Answer> {
    let at = Utc::now();
    let actor = Actor::Node(node_id.to_string());
    let mut answers: Vec<Option<Answer>> = vec![None; statuses.len()];
    let mut tasks: Vec<(Uuid, Vec<usize>)> = Vec::new();
    for (i, status) in statuses.iter().enumerate() {
        match tasks.iter_mut().find(|(task, _)| *task == status.task_id) {
            Some((_, reports)) => reports.push(i),
            None => tasks.push((status.task_id, vec![i])),
        }
    }
    for (task_id, reports) in tasks {
        let mut commands = Vec::with_capacity(reports.len());
        let mut decided = Vec::with_capacity(reports.len());
        for &i in &reports {
            match command(node_id, &statuses[i], at) {
                Ok(c) => {
                    commands.push(c);
                    decided.push(i);
                }
                Err(reason) => answers[i] = Some(Answer::Unstorable(reason)),
            }
        }
        let outcomes = match decided.len() {
            0 => continue,
            1 => None,
            _ => store
                .execute_each::<Task>(&task_id.to_string(), &commands, &actor, at)
                .await
                .ok(),
        };
        match outcomes {
            Some(outcomes) => {
                for (&i, outcome) in decided.iter().zip(outcomes) {
                    answers[i] = Some(match outcome {
                        Ok(()) => Answer::Stored,
                        Err(e) => Answer::Refused(refusal(&e, statuses[i].attempt)),
                    });
                }
            }
            None => {
                for &i in &decided {
                    answers[i] = Some(report(store, node_id, &statuses[i]).await);
                }
            }
        }
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Answer::Later("not handled".into())))
        .collect()
}

/// What an agent is told when the database refused its data; the
/// database's own message goes to the server's log only.
pub(crate) fn unstorable(sqlstate: &str) -> String {
    format!("the server's database refused to store it (SQLSTATE {sqlstate}); it never will")
}

/// Says on the task's timeline that `status` of node `node_id` was refused
/// for good because of `reason`. The Task aggregate records it once per
/// report and only for an attempt placed on this node, so a report about
/// another node's task leaves nothing; a failure here is only logged.
pub(crate) async fn record_refusal(store: &Store, node_id: Uuid, status: &Status, reason: &str) {
    let at = Utc::now();
    let command = TaskCommand::RecordRefusedReport {
        node_id,
        attempt: status.attempt,
        report: status.id,
        state: state_name(status).into(),
        reason: protocol::bounds::line(reason, protocol::bounds::MAX_REASON_BYTES),
        at,
    };
    let actor = Actor::Node(node_id.to_string());
    match store
        .execute::<Task>(&status.task_id.to_string(), command, &actor, at)
        .await
    {
        Ok(_) => {}
        Err(StoreError::Rejected(e)) => {
            tracing::debug!(%node_id, task_id = %status.task_id, error = %e, "a refused report of another node's attempt is not recorded");
        }
        Err(e) => {
            tracing::warn!(%node_id, task_id = %status.task_id, error = %e, "recording a refused report failed");
        }
    }
}

/// A session's log writer: which attempts it may write chunks for, where
/// each attempt's stored output ends as far as it knows, and its rate
/// bound. Each (task, attempt) is checked against the Task aggregate once,
/// not per chunk. The rules are in [`crate::logs`].
#[derive(Debug)]
pub(crate) struct LogPermissions {
    known: HashMap<(Uuid, u32), Result<Tail, String>>,
    limits: LogLimits,
    pace: Pace,
    notifier: LogNotifier,
    metrics: telemetry::IngressMetrics,
}

/// What a session knows of an attempt's stored output.
#[derive(Debug, Clone, Copy, Default)]
struct Tail {
    /// Where the stored chain ends, when this session knows: a chunk
    /// starting there is stored without asking the database first.
    end: Option<u64>,
}

impl LogPermissions {
    /// A writer bounded by `limits` that wakes followers through
    /// `notifier` and counts the bytes it stores in `metrics`.
    pub(crate) fn new(
        limits: LogLimits,
        notifier: LogNotifier,
        metrics: telemetry::IngressMetrics,
    ) -> Self {
        Self {
            known: HashMap::new(),
            pace: Pace::new(&limits),
            limits,
            notifier,
            metrics,
        }
    }

    /// A report was stored: when it ends an attempt, followers of the task
    /// are woken to see that its output is complete.
    pub(crate) fn reported(&self, status: &Status) {
        let ended = matches!(
            status.state,
            ReportedState::Succeeded
                | ReportedState::Failed
                | ReportedState::Cancelled
                | ReportedState::TimedOut
        );
        if ended {
            self.notifier.poke(status.task_id);
        }
    }

    /// Whether node `node_id` may write output for the chunk's attempt:
    /// the attempt must have been placed on this node. Output of an attempt
    /// that ended or was lost is still its own and is kept, so the last
    /// chunks may arrive after the final report.
    async fn check(
        &mut self,
        store: &Store,
        node_id: Uuid,
        chunk: &LogChunk,
    ) -> Result<&mut Tail, Answer> {
        let key = (chunk.task_id, chunk.attempt);
        if !self.known.contains_key(&key) {
            let task = match store.load::<Task>(&chunk.task_id.to_string()).await {
                Ok(task) => task.map(|t| t.state),
                Err(e) => return Err(Answer::Later(e.to_string())),
            };
            let placed_here = task.is_some_and(|t| {
                t.attempts
                    .iter()
                    .any(|a| a.number == chunk.attempt && a.node_id == node_id)
            });
            let verdict = if placed_here {
                Ok(Tail::default())
            } else {
                Err(not_ours(chunk.attempt))
            };
            if self.known.len() >= LOG_PERMISSIONS {
                self.known.clear();
            }
            self.known.insert(key, verdict);
        }
        match self.known.get_mut(&key) {
            Some(Ok(tail)) => Ok(tail),
            Some(Err(reason)) => Err(Answer::Refused(reason.clone())),
            None => Err(Answer::Later("forgotten".into())),
        }
    }

    /// Stores a chunk from node `node_id`, bounded by [`protocol::bounds`],
    /// once, within the attempt's cap; a chunk sent again changes nothing.
    /// Returns after the rate bound's wait, if any.
    pub(crate) async fn store(&mut self, store: &Store, node_id: Uuid, chunk: &LogChunk) -> Answer {
        let Ok(offset) = i64::try_from(chunk.offset) else {
            return Answer::Refused("offset is out of range".into());
        };
        let Ok(attempt) = i32::try_from(chunk.attempt) else {
            return Answer::Refused("attempt is out of range".into());
        };
        let cap = self.limits.max_bytes_per_attempt;
        let pool = store.pool();
        let tail = match self.check(store, node_id, chunk).await {
            Ok(tail) => tail,
            Err(answer) => return answer,
        };
        if chunk.data.is_empty() {
            return Answer::Stored;
        }
        let data = match logs::capped(chunk.offset, &chunk.data, cap) {
            Capped::Whole(data) => std::borrow::Cow::Borrowed(data),
            Capped::Cut(data) => std::borrow::Cow::Owned(data),
            // Acknowledged so the agent forgets it; never stored.
            Capped::Dropped => return Answer::Stored,
        };
        if tail.end != Some(chunk.offset) {
            match logs::place(pool, chunk.task_id, attempt, offset, data.len() as u64).await {
                Ok(Place::Next) => {}
                Ok(Place::Stored { end }) => {
                    tail.end = Some(end);
                    return Answer::Stored;
                }
                Ok(Place::Wrong { end }) => {
                    // An agent that restarted and adopted its container
                    // reads the output again from the start, cut into other
                    // chunks: what the server holds is acknowledged, and
                    // a chunk reaching past the stored end adds the rest.
                    let skip = end.checked_sub(chunk.offset).map(|n| n as usize);
                    match skip {
                        Some(n) if n >= data.len() => {
                            tail.end = Some(end);
                            return Answer::Stored;
                        }
                        Some(n) if data.is_char_boundary(n) => {
                            return self.append(store, chunk, attempt, end, &data[n..]).await;
                        }
                        _ => {
                            tail.end = None;
                            return Answer::Refused(format!(
                                "output of attempt {} continues at offset {end}, not {}",
                                chunk.attempt, chunk.offset
                            ));
                        }
                    }
                }
                Err(e) => return Answer::Later(e.to_string()),
            }
        }
        self.append(store, chunk, attempt, chunk.offset, &data)
            .await
    }

    /// Stores `data` at `at`, the end of the attempt's stored output, then
    /// pokes followers and applies the rate bound.
    async fn append(
        &mut self,
        store: &Store,
        chunk: &LogChunk,
        attempt: i32,
        at: u64,
        data: &str,
    ) -> Answer {
        let Ok(offset) = i64::try_from(at) else {
            return Answer::Refused("offset is out of range".into());
        };
        let key = (chunk.task_id, chunk.attempt);
        let inserted = logs::insert(store.pool(), chunk.task_id, attempt, offset, data).await;
        if let Err(e) = &inserted {
            if let Some(Ok(tail)) = self.known.get_mut(&key) {
                tail.end = None;
            }
            if store::task_log::is_refused(e) {
                // Over the database's budget: this attempt's output ends
                // here, and readers are told where and why.
                let refused = store::task_log::REFUSED.to_string();
                self.known.insert(key, Err(refused.clone()));
                if let Err(e) =
                    store::task_log::record_refused(store.pool(), chunk.task_id, attempt, offset)
                        .await
                {
                    tracing::warn!(task_id = %chunk.task_id, error = %e, "cannot record refused output");
                }
                return Answer::Refused(refused);
            }
            return Answer::Later(e.to_string());
        }
        if let Some(Ok(tail)) = self.known.get_mut(&key) {
            tail.end = Some(at + data.len() as u64);
        }
        if matches!(inserted, Ok(true)) {
            self.metrics.log_stored(data.len());
        }
        self.notifier.poke(chunk.task_id);
        if let Some(wait) = self.pace.charge(data.len() as u64 + logs::CHUNK_COST) {
            tokio::time::sleep(wait).await;
        }
        Answer::Stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: ReportedState) -> Status {
        Status {
            id: 1,
            task_id: Uuid::nil(),
            attempt: 2,
            state,
            stage: None,
            container: None,
            exit_code: None,
            message: None,
            node_fault: false,
        }
    }

    #[test]
    fn each_reported_state_becomes_its_task_command() {
        let node = Uuid::from_u128(7);
        let at = Utc::now();
        let mut s = status(ReportedState::Failed);
        s.exit_code = Some(3);
        assert_eq!(
            command(node, &s, at),
            Ok(TaskCommand::ReportExited {
                node_id: node,
                attempt: 2,
                outcome: Outcome::Failed {
                    exit_code: Some(3),
                    reason: "failed".into()
                },
                at
            })
        );
        assert!(matches!(
            command(node, &status(ReportedState::Accepted), at),
            Ok(TaskCommand::Accept { attempt: 2, .. })
        ));
        assert!(matches!(
            command(node, &status(ReportedState::TimedOut), at),
            Ok(TaskCommand::ReportExited {
                outcome: Outcome::TimedOut,
                ..
            })
        ));
    }

    #[test]
    fn a_failure_the_node_caused_gives_the_attempt_up_as_lost() {
        let node = Uuid::from_u128(7);
        let at = Utc::now();
        let mut s = status(ReportedState::Failed);
        s.node_fault = true;
        s.message = Some("creating the container failed: connection refused".into());
        assert_eq!(
            command(node, &s, at),
            Ok(TaskCommand::MarkLost {
                node_id: node,
                attempt: 2,
                reason: "the node could not run attempt 2: creating the container failed: \
                         connection refused"
                    .into(),
                at
            })
        );
    }

    #[test]
    fn preparing_and_running_reports_need_their_detail() {
        let node = Uuid::from_u128(7);
        let at = Utc::now();
        assert!(command(node, &status(ReportedState::Preparing), at).is_err());
        assert!(command(node, &status(ReportedState::Running), at).is_err());
        let mut s = status(ReportedState::Running);
        s.container = Some(" ".into());
        assert!(command(node, &s, at).is_err());
    }

    #[test]
    fn an_empty_failure_message_reads_failed() {
        assert_eq!(failure_reason(Some("  ")), "failed");
        assert_eq!(failure_reason(None), "failed");
        assert_eq!(failure_reason(Some(" out of memory\n")), "out of memory");
    }
}
