//! What may be asked of a task, and the rules that decide the answer.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Capacity, Task, TaskError, TaskEvent, TaskState};
use crate::aggregate::decided_by;
use crate::spec::TaskSpec;
use crate::Actor;

/// How an attempt ended, as reported by its node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Outcome {
    /// Exit status 0.
    Succeeded,
    /// Anything else that ends the task.
    Failed {
        /// The exit status, if the command ran.
        exit_code: Option<i64>,
        /// Why, for a person.
        reason: String,
    },
    /// Stopped after a cancel request.
    Cancelled,
    /// Stopped by the node at the task's time limit.
    TimedOut,
}

/// The commands of the Task aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[expect(
    clippy::large_enum_variant,
    reason = "a command lives for one call; boxing the spec would only add noise"
)]
pub enum TaskCommand {
    /// Queue a new task.
    Submit {
        /// The new task's id.
        task_id: Uuid,
        /// What to run.
        spec: TaskSpec,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Place the next attempt on a node, outside a scheduler leader's term
    /// (tools and tests): the store accepts it only while no scheduler
    /// holds the leader's lease. The scheduler uses
    /// [`TaskCommand::AssignAsLeader`].
    Assign {
        /// The node.
        node_id: Uuid,
        /// The node's GPU device indices given to the attempt: exactly as
        /// many as the task asks for, each once.
        gpus: Vec<u32>,
        /// Why this node, for the timeline.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Place the next attempt on a node as the scheduler leader of `term`,
    /// which saw the node able to give `capacity`. The store appends it
    /// only while `term` is the current leader's and the node can hold the
    /// attempt (its GPU devices free, CPU and memory within `capacity`).
    AssignAsLeader {
        /// The node.
        node_id: Uuid,
        /// The node's GPU device indices given to the attempt: exactly as
        /// many as the task asks for, each once.
        gpus: Vec<u32>,
        /// Why this node, for the timeline.
        reason: String,
        /// The leader's term.
        term: u64,
        /// What the node could give, as the leader saw it.
        capacity: Capacity,
        /// When.
        at: DateTime<Utc>,
    },
    /// The node took the attempt on.
    Accept {
        /// The reporting node.
        node_id: Uuid,
        /// The attempt it reports for.
        attempt: u32,
        /// When.
        at: DateTime<Utc>,
    },
    /// The node is preparing the attempt.
    ReportPreparing {
        /// The reporting node.
        node_id: Uuid,
        /// The attempt.
        attempt: u32,
        /// Which step.
        stage: String,
        /// What the step found, for the timeline.
        detail: Option<String>,
        /// When.
        at: DateTime<Utc>,
    },
    /// The attempt's container started.
    ReportStarted {
        /// The reporting node.
        node_id: Uuid,
        /// The attempt.
        attempt: u32,
        /// The container id.
        container: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The attempt ended.
    ReportExited {
        /// The reporting node.
        node_id: Uuid,
        /// The attempt.
        attempt: u32,
        /// How.
        outcome: Outcome,
        /// When.
        at: DateTime<Utc>,
    },
    /// Stop the task: at once when queued, through its node otherwise.
    RequestCancel {
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// The attempt's node went away (the scheduler's liveness check).
    MarkLost {
        /// The node that was lost.
        node_id: Uuid,
        /// The attempt it held.
        attempt: u32,
        /// Why, for the timeline.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The attempt ran past `timeout_s`.
    TimeOut {
        /// The attempt.
        attempt: u32,
        /// Who noticed.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// The platform cannot hand the assigned attempt to its node: its
    /// command is larger than any frame the agent takes. The task fails
    /// with `reason` instead of waiting for a delivery that can never
    /// happen; retrying would meet the same limit.
    FailUndeliverable {
        /// The attempt that could not be delivered.
        attempt: u32,
        /// Why, naming the size and the limit.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// An output of the attempt was stored.
    RecordArtifact {
        /// The reporting node.
        node_id: Uuid,
        /// The attempt.
        attempt: u32,
        /// The output's name.
        name: String,
        /// The object key.
        key: String,
        /// Bytes.
        size: u64,
        /// Hex SHA-256.
        sha256: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The platform refused a report of the attempt's node for good (it
    /// could never be stored); say so on the task's timeline.
    RecordRefusedReport {
        /// The reporting node.
        node_id: Uuid,
        /// The attempt the report was about.
        attempt: u32,
        /// The report's id on the node.
        report: u64,
        /// The state it reported, such as `failed`.
        state: String,
        /// Why it was refused, written by the platform (never the report's
        /// own text).
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
}

/// The most refused reports a task records; later ones are answered but
/// leave no event, so a node cannot flood a task's timeline.
pub const MAX_REFUSED_REPORTS: usize = 16;

/// The pause before attempt `previous_attempt + 1` after attempt
/// `previous_attempt` was lost: 5 s, doubling with every further attempt,
/// at most 5 minutes. A node that keeps losing work is not hammered, and a
/// flapping network gets time to settle.
pub fn retry_backoff(previous_attempt: u32) -> chrono::Duration {
    const BASE_S: i64 = 5;
    const MAX_S: i64 = 300;
    let doublings = previous_attempt.saturating_sub(1).min(16);
    chrono::Duration::seconds((BASE_S << doublings).min(MAX_S))
}

/// The event that ends a live attempt as its node reported; a time-out
/// the node reports is recorded as the node's.
fn exit_event(node_id: Uuid, attempt: u32, outcome: Outcome, at: DateTime<Utc>) -> TaskEvent {
    match outcome {
        Outcome::Succeeded => TaskEvent::Succeeded { attempt, at },
        Outcome::Failed { exit_code, reason } => TaskEvent::Failed {
            attempt: Some(attempt),
            exit_code,
            reason,
            at,
        },
        Outcome::Cancelled => TaskEvent::Cancelled {
            attempt: Some(attempt),
            at,
        },
        Outcome::TimedOut => TaskEvent::TimedOut {
            attempt,
            by: crate::Actor::Node(node_id.to_string()),
            at,
        },
    }
}

/// How a report relates to the task's current attempt.
enum Report {
    /// The attempt is live on this node.
    Live,
    /// The attempt already ended; the report may only repeat how.
    Ended,
}

impl Task {
    /// Checks that `node_id` may report for `attempt`.
    fn check_report(&self, node_id: Uuid, attempt: u32) -> Result<Report, TaskError> {
        if self.state == TaskState::New {
            return Err(TaskError::NotFound);
        }
        let Some(last) = self.attempts.last() else {
            return Err(TaskError::StaleAttempt {
                current: 0,
                reported: attempt,
            });
        };
        if attempt != self.attempt {
            return Err(TaskError::StaleAttempt {
                current: self.attempt,
                reported: attempt,
            });
        }
        if last.node_id != node_id {
            return Err(TaskError::WrongNode {
                assigned: last.node_id,
                reporter: node_id,
            });
        }
        if self.state.holds_node() {
            return Ok(Report::Live);
        }
        if let Some(outcome) = last.outcome.as_deref().filter(|o| *o == "lost") {
            return Err(TaskError::ConflictingReport {
                attempt,
                outcome: outcome.to_string(),
            });
        }
        Ok(Report::Ended)
    }

    fn transition_error(&self, action: &'static str) -> TaskError {
        if self.state == TaskState::New {
            TaskError::NotFound
        } else {
            TaskError::InvalidTransition {
                state: self.state,
                action,
            }
        }
    }

    /// A report that an attempt which already ended ended: nothing when
    /// it repeats how, a conflict when it says otherwise.
    fn repeated_exit(&self, attempt: u32, outcome: &Outcome) -> Result<Vec<TaskEvent>, TaskError> {
        let same = match (outcome, self.state) {
            (Outcome::Succeeded, TaskState::Succeeded)
            | (Outcome::Cancelled, TaskState::Cancelled)
            | (Outcome::TimedOut, TaskState::TimedOut) => true,
            (Outcome::Failed { exit_code, reason }, TaskState::Failed) => {
                *exit_code == self.exit_code && Some(reason.as_str()) == self.reason.as_deref()
            }
            _ => false,
        };
        if same {
            Ok(vec![])
        } else {
            Err(TaskError::ConflictingReport {
                attempt,
                outcome: self.state.to_string(),
            })
        }
    }

    /// The events of losing the live `attempt`: [`TaskEvent::Lost`], then
    /// what follows it ([`Task::after_loss`]).
    fn lose(
        &self,
        node_id: Uuid,
        attempt: u32,
        reason: String,
        at: DateTime<Utc>,
    ) -> Vec<TaskEvent> {
        let next = self.after_loss(attempt, &reason, at);
        vec![
            TaskEvent::Lost {
                node_id,
                attempt,
                reason,
                at,
            },
            next,
        ]
    }

    /// What follows a lost attempt: cancelled when a cancel was asked for,
    /// else requeued after [`retry_backoff`] while retries are left, else
    /// failed, saying why and after how many attempts.
    fn after_loss(&self, attempt: u32, reason: &str, at: DateTime<Utc>) -> TaskEvent {
        if self.cancel_requested {
            TaskEvent::Cancelled {
                attempt: Some(attempt),
                at,
            }
        } else if self.retries_left() > 0 {
            TaskEvent::Requeued {
                previous_attempt: attempt,
                not_before: Some(at + retry_backoff(attempt)),
                at,
            }
        } else {
            let max = self.spec.as_ref().map_or(0, |s| s.max_retries);
            TaskEvent::Failed {
                attempt: Some(attempt),
                exit_code: None,
                reason: format!(
                    "{reason}; no retries left after {attempt} attempt(s) (max_retries = {max})"
                ),
                at,
            }
        }
    }

    /// The event of placing the next attempt on `node_id` with `gpus`,
    /// under a leader's term and the capacity it saw when `fence` is given.
    fn assign(
        &self,
        node_id: Uuid,
        gpus: Vec<u32>,
        reason: String,
        fence: Option<(u64, Capacity)>,
        at: DateTime<Utc>,
    ) -> Result<Vec<TaskEvent>, TaskError> {
        if self.state != TaskState::Queued {
            return Err(self.transition_error("assign"));
        }
        let wanted = self.spec.as_ref().map_or(0, |s| s.resources.gpus);
        let mut distinct = gpus.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if gpus.len() != wanted as usize || distinct.len() != gpus.len() {
            return Err(TaskError::InvalidAssignment(format!(
                "the task needs {wanted} distinct GPU device(s), the placement names {gpus:?}"
            )));
        }
        Ok(vec![TaskEvent::Assigned {
            node_id,
            attempt: self.attempt + 1,
            gpus,
            reason,
            term: fence.map(|(t, _)| t),
            capacity: fence.map(|(_, c)| c),
            at,
        }])
    }

    /// Decides which events `command` produces, without changing anything.
    ///
    /// # Errors
    /// A [`TaskError`] when the command is refused; nothing is appended.
    pub fn decide(&self, command: TaskCommand) -> Result<Vec<TaskEvent>, TaskError> {
        use TaskCommand as C;
        use TaskEvent as E;
        match command {
            C::Submit {
                task_id,
                spec,
                by,
                at,
            } => {
                if self.state != TaskState::New {
                    return Err(TaskError::AlreadyExists);
                }
                Ok(vec![E::Submitted {
                    task_id,
                    spec: Box::new(spec),
                    by,
                    at,
                }])
            }
            C::Assign {
                node_id,
                gpus,
                reason,
                at,
            } => self.assign(node_id, gpus, reason, None, at),
            C::AssignAsLeader {
                node_id,
                gpus,
                reason,
                term,
                capacity,
                at,
            } => self.assign(node_id, gpus, reason, Some((term, capacity)), at),
            C::Accept {
                node_id,
                attempt,
                at,
            } => match self.check_report(node_id, attempt)? {
                Report::Live if self.state == TaskState::Assigned => {
                    Ok(vec![E::Accepted { attempt, at }])
                }
                _ => Ok(vec![]),
            },
            C::ReportPreparing {
                node_id,
                attempt,
                stage,
                detail,
                at,
            } => match self.check_report(node_id, attempt)? {
                Report::Live => match self.state {
                    TaskState::Preparing
                        if self.stage.as_deref() == Some(stage.as_str())
                            && self.stage_detail == detail =>
                    {
                        Ok(vec![])
                    }
                    TaskState::Assigned | TaskState::Accepted | TaskState::Preparing => {
                        Ok(vec![E::Preparing {
                            attempt,
                            stage,
                            detail,
                            at,
                        }])
                    }
                    _ => Err(self.transition_error("report preparing for")),
                },
                Report::Ended => Err(self.transition_error("report preparing for")),
            },
            C::ReportStarted {
                node_id,
                attempt,
                container,
                at,
            } => match self.check_report(node_id, attempt)? {
                Report::Live if self.state == TaskState::Running => {
                    if self.container.as_deref() == Some(container.as_str()) {
                        Ok(vec![])
                    } else {
                        Err(TaskError::ConflictingReport {
                            attempt,
                            outcome: format!(
                                "running in container {}",
                                self.container.as_deref().unwrap_or("?")
                            ),
                        })
                    }
                }
                Report::Live => Ok(vec![E::Started {
                    attempt,
                    container,
                    at,
                }]),
                Report::Ended => Err(self.transition_error("report started for")),
            },
            C::ReportExited {
                node_id,
                attempt,
                outcome,
                at,
            } => match self.check_report(node_id, attempt)? {
                Report::Live => Ok(vec![exit_event(node_id, attempt, outcome, at)]),
                Report::Ended => self.repeated_exit(attempt, &outcome),
            },
            C::RequestCancel { by, at } => match self.state {
                TaskState::Queued => Ok(vec![
                    E::CancelRequested { by, at },
                    E::Cancelled { attempt: None, at },
                ]),
                s if s.holds_node() && self.cancel_requested => Ok(vec![]),
                s if s.holds_node() => Ok(vec![E::CancelRequested { by, at }]),
                _ => Err(self.transition_error("cancel")),
            },
            C::MarkLost {
                node_id,
                attempt,
                reason,
                at,
            } => match self.check_report(node_id, attempt) {
                Ok(Report::Live) => Ok(self.lose(node_id, attempt, reason, at)),
                Ok(Report::Ended) => Ok(vec![]),
                // Lost already: an agent's report that its node failed the
                // attempt, sent again after a reconnect.
                Err(TaskError::ConflictingReport { outcome, .. }) if outcome == "lost" => {
                    Ok(vec![])
                }
                Err(e) => Err(e),
            },
            C::TimeOut { attempt, by, at } => {
                if self.state == TaskState::New {
                    return Err(TaskError::NotFound);
                }
                if attempt != self.attempt {
                    return Err(TaskError::StaleAttempt {
                        current: self.attempt,
                        reported: attempt,
                    });
                }
                match self.state {
                    TaskState::TimedOut => Ok(vec![]),
                    s if s.holds_node() => Ok(vec![E::TimedOut { attempt, by, at }]),
                    _ => Err(self.transition_error("time out")),
                }
            }
            C::FailUndeliverable {
                attempt,
                reason,
                at,
            } => {
                if self.state == TaskState::New {
                    return Err(TaskError::NotFound);
                }
                if attempt != self.attempt {
                    return Err(TaskError::StaleAttempt {
                        current: self.attempt,
                        reported: attempt,
                    });
                }
                match self.state {
                    TaskState::Assigned => Ok(vec![E::Failed {
                        attempt: Some(attempt),
                        exit_code: None,
                        reason,
                        at,
                    }]),
                    TaskState::Failed if self.reason.as_deref() == Some(reason.as_str()) => {
                        Ok(vec![])
                    }
                    _ => Err(self.transition_error("fail as undeliverable")),
                }
            }
            C::RecordArtifact {
                node_id,
                attempt,
                name,
                key,
                size,
                sha256,
                at,
            } => {
                if self.state == TaskState::New {
                    return Err(TaskError::NotFound);
                }
                let Some(a) = self.attempts.iter().find(|a| a.number == attempt) else {
                    return Err(TaskError::StaleAttempt {
                        current: self.attempt,
                        reported: attempt,
                    });
                };
                if a.node_id != node_id {
                    return Err(TaskError::WrongNode {
                        assigned: a.node_id,
                        reporter: node_id,
                    });
                }
                if let Some(existing) = self
                    .artifacts
                    .iter()
                    .find(|x| x.attempt == attempt && x.name == name)
                {
                    return if existing.key == key
                        && existing.size == size
                        && existing.sha256 == sha256
                    {
                        Ok(vec![])
                    } else {
                        Err(TaskError::ConflictingReport {
                            attempt,
                            outcome: format!("artifact {name} recorded with other content"),
                        })
                    };
                }
                Ok(vec![E::ArtifactRecorded {
                    attempt,
                    name,
                    key,
                    size,
                    sha256,
                    at,
                }])
            }
            C::RecordRefusedReport {
                node_id,
                attempt,
                report,
                state,
                reason,
                at,
            } => self.record_refused_report(node_id, attempt, report, state, reason, at),
        }
    }

    /// One `ReportRefused` per report of the attempt's own node, up to
    /// [`MAX_REFUSED_REPORTS`]; the same report again appends nothing.
    fn record_refused_report(
        &self,
        node_id: Uuid,
        attempt: u32,
        report: u64,
        state: String,
        reason: String,
        at: DateTime<Utc>,
    ) -> Result<Vec<TaskEvent>, TaskError> {
        if self.state == TaskState::New {
            return Err(TaskError::NotFound);
        }
        let Some(a) = self.attempts.iter().find(|a| a.number == attempt) else {
            return Err(TaskError::StaleAttempt {
                current: self.attempt,
                reported: attempt,
            });
        };
        if a.node_id != node_id {
            return Err(TaskError::WrongNode {
                assigned: a.node_id,
                reporter: node_id,
            });
        }
        let seen = self
            .refused_reports
            .iter()
            .any(|r| r.attempt == attempt && r.report == report);
        if seen || self.refused_reports.len() >= MAX_REFUSED_REPORTS {
            return Ok(vec![]);
        }
        Ok(vec![TaskEvent::ReportRefused {
            node_id,
            attempt,
            report,
            state,
            reason,
            at,
        }])
    }
}

decided_by!(Task, "task", TaskCommand, TaskEvent, TaskError);
