//! Given/when/then tests of every Task command, rejections included.

use cqrs_es::test::TestFramework;
use uuid::Uuid;

use super::*;
use crate::spec::{CommitId, DockerfilePath, RepoUrl, Resources, TaskSpec, UrlPolicy};
use crate::testing::{at, user};
use crate::Actor;

type F = TestFramework<Task>;

fn task_id() -> Uuid {
    Uuid::from_u128(1)
}
fn node() -> Uuid {
    Uuid::from_u128(7)
}
fn other_node() -> Uuid {
    Uuid::from_u128(8)
}
fn alice() -> Actor {
    user("alice")
}

fn spec(max_retries: u32) -> TaskSpec {
    let sha = CommitId::parse(&"a".repeat(40)).unwrap();
    let url = RepoUrl::parse("https://example.com/r.git", UrlPolicy::default()).unwrap();
    TaskSpec {
        project_id: Uuid::from_u128(3),
        code_repo_url: url.clone(),
        code_commit_id: sha.clone(),
        env_repo_url: url,
        env_commit_id: sha,
        dockerfile_path: DockerfilePath::parse("Dockerfile").unwrap(),
        command: vec!["python".into(), "train.py".into()],
        env: Default::default(),
        resources: Resources::default(),
        labels: Default::default(),
        priority: 0,
        timeout_s: Some(60),
        max_retries,
        inputs: Vec::new(),
        outputs: Vec::new(),
        network: Default::default(),
        env_secrets: Default::default(),
        git_credentials: Default::default(),
    }
}

fn submitted(max_retries: u32) -> TaskEvent {
    TaskEvent::Submitted {
        task_id: task_id(),
        spec: Box::new(spec(max_retries)),
        by: alice(),
        at: at(0),
    }
}
fn assigned(attempt: u32, node_id: Uuid) -> TaskEvent {
    TaskEvent::Assigned {
        node_id,
        attempt,
        gpus: vec![],
        reason: "fits".into(),
        term: None,
        capacity: None,
        at: at(1),
    }
}
fn accepted(attempt: u32) -> TaskEvent {
    TaskEvent::Accepted { attempt, at: at(2) }
}
fn started(attempt: u32) -> TaskEvent {
    TaskEvent::Started {
        attempt,
        container: "c1".into(),
        at: at(3),
    }
}
fn running() -> Vec<TaskEvent> {
    vec![submitted(1), assigned(1, node()), accepted(1), started(1)]
}
fn exited(attempt: u32, outcome: Outcome) -> TaskCommand {
    TaskCommand::ReportExited {
        node_id: node(),
        attempt,
        outcome,
        at: at(9),
    }
}
fn lost(attempt: u32) -> TaskCommand {
    TaskCommand::MarkLost {
        node_id: node(),
        attempt,
        reason: "node went offline".into(),
        at: at(5),
    }
}

#[test]
fn submitting_queues_the_task() {
    F::with(())
        .given_no_previous_events()
        .when(TaskCommand::Submit {
            task_id: task_id(),
            spec: spec(1),
            by: alice(),
            at: at(0),
        })
        .then_expect_events(vec![submitted(1)]);
}

#[test]
fn submitting_twice_is_refused() {
    F::with(())
        .given(vec![submitted(1)])
        .when(TaskCommand::Submit {
            task_id: task_id(),
            spec: spec(1),
            by: alice(),
            at: at(0),
        })
        .then_expect_error(TaskError::AlreadyExists);
}

#[test]
fn assigning_a_queued_task_starts_attempt_one() {
    F::with(())
        .given(vec![submitted(1)])
        .when(TaskCommand::Assign {
            node_id: node(),
            gpus: vec![],
            reason: "fits".into(),
            at: at(1),
        })
        .then_expect_events(vec![assigned(1, node())]);
}

#[test]
fn an_assigned_task_is_never_assigned_again() {
    F::with(())
        .given(vec![submitted(1), assigned(1, node())])
        .when(TaskCommand::Assign {
            node_id: other_node(),
            gpus: vec![],
            reason: "fits".into(),
            at: at(1),
        })
        .then_expect_error(TaskError::InvalidTransition {
            state: TaskState::Assigned,
            action: "assign",
        });
}

#[test]
fn commands_on_a_task_never_submitted_say_not_found() {
    F::with(())
        .given_no_previous_events()
        .when(TaskCommand::RequestCancel {
            by: alice(),
            at: at(1),
        })
        .then_expect_error(TaskError::NotFound);
    F::with(())
        .given_no_previous_events()
        .when(TaskCommand::Accept {
            node_id: node(),
            attempt: 1,
            at: at(1),
        })
        .then_expect_error(TaskError::NotFound);
}

#[test]
fn the_node_accepts_then_a_repeated_accept_appends_nothing() {
    F::with(())
        .given(vec![submitted(1), assigned(1, node())])
        .when(TaskCommand::Accept {
            node_id: node(),
            attempt: 1,
            at: at(2),
        })
        .then_expect_events(vec![accepted(1)]);
    F::with(())
        .given(vec![submitted(1), assigned(1, node()), accepted(1)])
        .when(TaskCommand::Accept {
            node_id: node(),
            attempt: 1,
            at: at(2),
        })
        .then_expect_events(vec![]);
}

#[test]
fn a_report_from_another_node_is_rejected() {
    F::with(())
        .given(vec![submitted(1), assigned(1, node())])
        .when(TaskCommand::Accept {
            node_id: other_node(),
            attempt: 1,
            at: at(2),
        })
        .then_expect_error(TaskError::WrongNode {
            assigned: node(),
            reporter: other_node(),
        });
}

#[test]
fn preparing_stages_are_recorded_once_each() {
    let prep = |stage: &str| TaskCommand::ReportPreparing {
        node_id: node(),
        attempt: 1,
        stage: stage.into(),
        detail: None,
        at: at(2),
    };
    let prepared = TaskEvent::Preparing {
        attempt: 1,
        stage: "fetching code".into(),
        detail: None,
        at: at(2),
    };
    F::with(())
        .given(vec![submitted(1), assigned(1, node()), accepted(1)])
        .when(prep("fetching code"))
        .then_expect_events(vec![prepared.clone()]);
    F::with(())
        .given(vec![
            submitted(1),
            assigned(1, node()),
            accepted(1),
            prepared.clone(),
        ])
        .when(prep("fetching code"))
        .then_expect_events(vec![]);
    F::with(())
        .given(running())
        .when(prep("fetching code"))
        .then_expect_error(TaskError::InvalidTransition {
            state: TaskState::Running,
            action: "report preparing for",
        });
}

#[test]
fn a_started_report_moves_the_task_to_running_once() {
    let start = |container: &str| TaskCommand::ReportStarted {
        node_id: node(),
        attempt: 1,
        container: container.into(),
        at: at(3),
    };
    F::with(())
        .given(vec![submitted(1), assigned(1, node()), accepted(1)])
        .when(start("c1"))
        .then_expect_events(vec![started(1)]);
    F::with(())
        .given(running())
        .when(start("c1"))
        .then_expect_events(vec![]);
    F::with(())
        .given(running())
        .when(start("c2"))
        .then_expect_error(TaskError::ConflictingReport {
            attempt: 1,
            outcome: "running in container c1".into(),
        });
}

#[test]
fn a_successful_exit_ends_the_task_and_a_repeat_appends_nothing() {
    let mut done = running();
    done.push(TaskEvent::Succeeded {
        attempt: 1,
        at: at(9),
    });
    F::with(())
        .given(running())
        .when(exited(1, Outcome::Succeeded))
        .then_expect_events(vec![TaskEvent::Succeeded {
            attempt: 1,
            at: at(9),
        }]);
    F::with(())
        .given(done.clone())
        .when(exited(1, Outcome::Succeeded))
        .then_expect_events(vec![]);
    F::with(())
        .given(done)
        .when(exited(1, Outcome::Cancelled))
        .then_expect_error(TaskError::ConflictingReport {
            attempt: 1,
            outcome: "succeeded".into(),
        });
}

#[test]
fn a_failed_exit_keeps_the_exit_code_and_reason() {
    let failure = Outcome::Failed {
        exit_code: Some(3),
        reason: "exited with status 3".into(),
    };
    let validator = F::with(()).given(running()).when(exited(1, failure));
    let events = validator.inspect_result().unwrap();
    let mut task = Task::default();
    for e in running().into_iter().chain(events) {
        task.apply_event(e);
    }
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.exit_code, Some(3));
    assert_eq!(task.reason.as_deref(), Some("exited with status 3"));
    assert_eq!(task.attempts[0].outcome.as_deref(), Some("failed"));
    assert_eq!(
        task.attempts[0].reason.as_deref(),
        Some("exited with status 3")
    );
}

#[test]
fn the_node_may_report_a_timeout_and_the_watchdog_too() {
    F::with(())
        .given(running())
        .when(exited(1, Outcome::TimedOut))
        .then_expect_events(vec![TaskEvent::TimedOut {
            attempt: 1,
            by: Actor::Node(node().to_string()),
            at: at(9),
        }]);
    let scheduler = Actor::System("scheduler".into());
    F::with(())
        .given(running())
        .when(TaskCommand::TimeOut {
            attempt: 1,
            by: scheduler.clone(),
            at: at(9),
        })
        .then_expect_events(vec![TaskEvent::TimedOut {
            attempt: 1,
            by: scheduler,
            at: at(9),
        }]);
}

#[test]
fn a_watchdog_timeout_for_an_old_attempt_is_rejected() {
    F::with(())
        .given(running())
        .when(TaskCommand::TimeOut {
            attempt: 2,
            by: Actor::System("scheduler".into()),
            at: at(9),
        })
        .then_expect_error(TaskError::StaleAttempt {
            current: 1,
            reported: 2,
        });
}

#[test]
fn cancelling_a_queued_task_ends_it_at_once() {
    F::with(())
        .given(vec![submitted(1)])
        .when(TaskCommand::RequestCancel {
            by: alice(),
            at: at(4),
        })
        .then_expect_events(vec![
            TaskEvent::CancelRequested {
                by: alice(),
                at: at(4),
            },
            TaskEvent::Cancelled {
                attempt: None,
                at: at(4),
            },
        ]);
}

#[test]
fn cancelling_a_running_task_asks_its_node_once() {
    let req = TaskEvent::CancelRequested {
        by: alice(),
        at: at(4),
    };
    F::with(())
        .given(running())
        .when(TaskCommand::RequestCancel {
            by: alice(),
            at: at(4),
        })
        .then_expect_events(vec![req.clone()]);
    let mut given = running();
    given.push(req);
    F::with(())
        .given(given.clone())
        .when(TaskCommand::RequestCancel {
            by: alice(),
            at: at(4),
        })
        .then_expect_events(vec![]);
    F::with(())
        .given(given)
        .when(exited(1, Outcome::Cancelled))
        .then_expect_events(vec![TaskEvent::Cancelled {
            attempt: Some(1),
            at: at(9),
        }]);
}

#[test]
fn a_finished_task_cannot_be_cancelled() {
    let mut given = running();
    given.push(TaskEvent::Succeeded {
        attempt: 1,
        at: at(9),
    });
    F::with(())
        .given(given)
        .when(TaskCommand::RequestCancel {
            by: alice(),
            at: at(10),
        })
        .then_expect_error(TaskError::InvalidTransition {
            state: TaskState::Succeeded,
            action: "cancel",
        });
}

#[test]
fn a_lost_attempt_is_requeued_while_retries_remain() {
    F::with(())
        .given(running())
        .when(lost(1))
        .then_expect_events(vec![
            TaskEvent::Lost {
                node_id: node(),
                attempt: 1,
                reason: "node went offline".into(),
                at: at(5),
            },
            TaskEvent::Requeued {
                previous_attempt: 1,
                not_before: Some(at(10)),
                at: at(5),
            },
        ]);
}

#[test]
fn losing_an_attempt_lost_already_changes_nothing_but_other_nodes_and_attempts_are_refused() {
    let mut history = running();
    history.push(TaskEvent::Lost {
        node_id: node(),
        attempt: 1,
        reason: "the node could not run attempt 1: Docker did not answer".into(),
        at: at(5),
    });
    history.push(TaskEvent::Requeued {
        previous_attempt: 1,
        not_before: Some(at(10)),
        at: at(5),
    });
    // The agent sends its report again after a reconnect.
    F::with(())
        .given(history.clone())
        .when(lost(1))
        .then_expect_events(vec![]);
    F::with(())
        .given(history.clone())
        .when(TaskCommand::MarkLost {
            node_id: other_node(),
            attempt: 1,
            reason: "not its attempt".into(),
            at: at(6),
        })
        .then_expect_error(TaskError::WrongNode {
            assigned: node(),
            reporter: other_node(),
        });
    history.push(assigned(2, other_node()));
    F::with(())
        .given(history)
        .when(lost(1))
        .then_expect_error(TaskError::StaleAttempt {
            current: 2,
            reported: 1,
        });
}

#[test]
fn retries_back_off_exponentially_up_to_a_cap() {
    assert_eq!(retry_backoff(1).num_seconds(), 5);
    assert_eq!(retry_backoff(2).num_seconds(), 10);
    assert_eq!(retry_backoff(3).num_seconds(), 20);
    assert_eq!(retry_backoff(7).num_seconds(), 300);
    assert_eq!(retry_backoff(u32::MAX).num_seconds(), 300);
    let mut t = Task::default();
    for e in running() {
        t.apply_event(e);
    }
    for e in t.decide(lost(1)).unwrap() {
        t.apply_event(e);
    }
    assert_eq!(t.state, TaskState::Queued);
    assert_eq!(t.not_before, Some(at(10)));
    t.apply_event(assigned(2, other_node()));
    assert_eq!(t.not_before, None, "a placed attempt has no backoff left");
}

fn gpu_spec(gpus: u32) -> TaskEvent {
    let mut s = spec(1);
    s.resources.gpus = gpus;
    TaskEvent::Submitted {
        task_id: task_id(),
        spec: Box::new(s),
        by: alice(),
        at: at(0),
    }
}

#[test]
fn an_assignment_names_exactly_the_gpus_the_task_asks_for() {
    let assign = |gpus: Vec<u32>| TaskCommand::Assign {
        node_id: node(),
        gpus,
        reason: "fits".into(),
        at: at(1),
    };
    F::with(())
        .given(vec![gpu_spec(2)])
        .when(assign(vec![1, 3]))
        .then_expect_events(vec![TaskEvent::Assigned {
            node_id: node(),
            attempt: 1,
            gpus: vec![1, 3],
            reason: "fits".into(),
            term: None,
            capacity: None,
            at: at(1),
        }]);
    for bad in [vec![], vec![1], vec![1, 1], vec![0, 1, 2]] {
        let refused = F::with(())
            .given(vec![gpu_spec(2)])
            .when(assign(bad.clone()))
            .inspect_result();
        assert!(
            matches!(refused, Err(TaskError::InvalidAssignment(_))),
            "{bad:?} was not refused"
        );
    }
    let mut t = Task::default();
    t.apply_event(gpu_spec(2));
    for e in t.decide(assign(vec![0, 2])).unwrap() {
        t.apply_event(e);
    }
    assert_eq!(t.gpus(), &[0, 2]);
    for e in t.decide(lost(1)).unwrap() {
        t.apply_event(e);
    }
    assert!(t.gpus().is_empty(), "a lost attempt frees its GPUs");
}

#[test]
fn a_lost_attempt_fails_the_task_when_no_retries_remain() {
    let given = vec![submitted(0), assigned(1, node()), accepted(1), started(1)];
    let events = F::with(())
        .given(given)
        .when(lost(1))
        .inspect_result()
        .unwrap();
    assert!(matches!(events[1], TaskEvent::Failed { ref reason, .. }
        if reason.contains("no retries left") && reason.contains("max_retries = 0")));
}

#[test]
fn a_lost_attempt_of_a_cancelled_task_ends_it_cancelled() {
    let mut given = running();
    given.push(TaskEvent::CancelRequested {
        by: alice(),
        at: at(4),
    });
    let events = F::with(())
        .given(given)
        .when(lost(1))
        .inspect_result()
        .unwrap();
    assert!(matches!(
        events[1],
        TaskEvent::Cancelled {
            attempt: Some(1),
            ..
        }
    ));
}

#[test]
fn report_for_a_superseded_attempt_is_rejected() {
    let mut history = running();
    history.push(TaskEvent::Lost {
        node_id: node(),
        attempt: 1,
        reason: "offline".into(),
        at: at(5),
    });
    history.push(TaskEvent::Requeued {
        previous_attempt: 1,
        not_before: None,
        at: at(5),
    });
    // The node comes back and reports the old attempt before a new one exists.
    F::with(())
        .given(history.clone())
        .when(exited(1, Outcome::Succeeded))
        .then_expect_error(TaskError::ConflictingReport {
            attempt: 1,
            outcome: "lost".into(),
        });
    // Once attempt 2 runs elsewhere, attempt 1's reports are stale.
    history.push(assigned(2, other_node()));
    F::with(())
        .given(history)
        .when(exited(1, Outcome::Succeeded))
        .then_expect_error(TaskError::StaleAttempt {
            current: 2,
            reported: 1,
        });
}

#[test]
fn artifacts_are_recorded_once_per_attempt_and_name() {
    let record = TaskCommand::RecordArtifact {
        node_id: node(),
        attempt: 1,
        name: "model".into(),
        key: "k".into(),
        size: 10,
        sha256: "ab".into(),
        at: at(8),
    };
    let recorded = TaskEvent::ArtifactRecorded {
        attempt: 1,
        name: "model".into(),
        key: "k".into(),
        size: 10,
        sha256: "ab".into(),
        at: at(8),
    };
    F::with(())
        .given(running())
        .when(record.clone())
        .then_expect_events(vec![recorded.clone()]);
    let mut given = running();
    given.push(recorded);
    F::with(())
        .given(given)
        .when(record)
        .then_expect_events(vec![]);
}

#[test]
fn an_output_of_a_failed_attempt_is_kept_with_a_stable_id() {
    let mut given = running();
    given.push(TaskEvent::Failed {
        attempt: Some(1),
        exit_code: Some(1),
        reason: "exited with status 1".into(),
        at: at(7),
    });
    let recorded = TaskEvent::ArtifactRecorded {
        attempt: 1,
        name: "log".into(),
        key: "k".into(),
        size: 3,
        sha256: "cd".into(),
        at: at(8),
    };
    F::with(())
        .given(given.clone())
        .when(TaskCommand::RecordArtifact {
            node_id: node(),
            attempt: 1,
            name: "log".into(),
            key: "k".into(),
            size: 3,
            sha256: "cd".into(),
            at: at(8),
        })
        .then_expect_events(vec![recorded.clone()]);
    let mut t = Task::default();
    for e in given.into_iter().chain([recorded]) {
        t.apply_event(e);
    }
    assert_eq!(t.artifacts[0].id, Artifact::id_for(task_id(), 1, "log"));
}

#[test]
fn retries_left_counts_the_attempts_used() {
    let mut t = Task::default();
    for e in running() {
        t.apply_event(e);
    }
    assert_eq!(t.retries_left(), 1);
}

#[test]
fn a_refused_report_is_recorded_once_for_its_own_node_and_leaves_the_task_as_it_was() {
    let refuse = |node_id, report| TaskCommand::RecordRefusedReport {
        node_id,
        attempt: 1,
        report,
        state: "running".into(),
        reason: "container: holds a control character".into(),
        at: at(8),
    };
    let refused = |report| TaskEvent::ReportRefused {
        node_id: node(),
        attempt: 1,
        report,
        state: "running".into(),
        reason: "container: holds a control character".into(),
        at: at(8),
    };
    F::with(())
        .given(running())
        .when(refuse(node(), 5))
        .then_expect_events(vec![refused(5)]);
    let mut given = running();
    given.push(refused(5));
    F::with(())
        .given(given.clone())
        .when(refuse(node(), 5))
        .then_expect_events(vec![]);
    F::with(())
        .given(running())
        .when(refuse(other_node(), 5))
        .then_expect_error(TaskError::WrongNode {
            assigned: node(),
            reporter: other_node(),
        });
    // A bounded number per task.
    let mut full = running();
    full.extend((0..MAX_REFUSED_REPORTS as u64).map(refused));
    F::with(())
        .given(full)
        .when(refuse(node(), 1000))
        .then_expect_events(vec![]);
    let mut before = Task::default();
    for e in running() {
        before.apply_event(e);
    }
    let mut after = before.clone();
    after.apply_event(refused(5));
    after.refused_reports.clear();
    assert_eq!(after, before);
}

fn undeliverable(attempt: u32) -> TaskCommand {
    TaskCommand::FailUndeliverable {
        attempt,
        reason: "run_task is 300000 bytes, more than the 262144 of a frame".into(),
        at: at(4),
    }
}

#[test]
fn an_undeliverable_attempt_fails_the_task_without_a_retry_and_once() {
    let failed = TaskEvent::Failed {
        attempt: Some(1),
        exit_code: None,
        reason: "run_task is 300000 bytes, more than the 262144 of a frame".into(),
        at: at(4),
    };
    F::with(())
        .given(vec![submitted(2), assigned(1, node())])
        .when(undeliverable(1))
        .then_expect_events(vec![failed.clone()]);
    F::with(())
        .given(vec![submitted(2), assigned(1, node()), failed])
        .when(undeliverable(1))
        .then_expect_events(vec![]);
}

#[test]
fn only_an_assigned_current_attempt_can_be_undeliverable() {
    F::with(())
        .given(running())
        .when(undeliverable(1))
        .then_expect_error(TaskError::InvalidTransition {
            state: TaskState::Running,
            action: "fail as undeliverable",
        });
    F::with(())
        .given(vec![submitted(2), assigned(1, node())])
        .when(undeliverable(2))
        .then_expect_error(TaskError::StaleAttempt {
            current: 1,
            reported: 2,
        });
    F::with(())
        .given_no_previous_events()
        .when(undeliverable(1))
        .then_expect_error(TaskError::NotFound);
}

#[test]
fn a_leaders_assignment_carries_its_term_and_the_capacity_it_saw() {
    let capacity = Capacity {
        millicpus: 8000,
        memory_mb: 16384,
    };
    F::with(())
        .given(vec![gpu_spec(1)])
        .when(TaskCommand::AssignAsLeader {
            node_id: node(),
            gpus: vec![2],
            reason: "fits".into(),
            term: 7,
            capacity,
            at: at(1),
        })
        .then_expect_events(vec![TaskEvent::Assigned {
            node_id: node(),
            attempt: 1,
            gpus: vec![2],
            reason: "fits".into(),
            term: Some(7),
            capacity: Some(capacity),
            at: at(1),
        }]);
    // The same rules as any assignment: GPUs as asked, a queued task only.
    F::with(())
        .given(vec![gpu_spec(1), assigned(1, node())])
        .when(TaskCommand::AssignAsLeader {
            node_id: node(),
            gpus: vec![2],
            reason: "fits".into(),
            term: 7,
            capacity,
            at: at(1),
        })
        .then_expect_error(TaskError::InvalidTransition {
            state: TaskState::Assigned,
            action: "assign",
        });
}

#[test]
fn an_assignment_stored_before_terms_existed_still_reads() {
    let stored = serde_json::json!({"Assigned": {
        "node_id": node(), "attempt": 1, "gpus": [0], "reason": "fits",
        "at": "2024-01-01T00:00:00Z"
    }});
    let event: TaskEvent = serde_json::from_value(stored).unwrap();
    assert!(matches!(
        event,
        TaskEvent::Assigned {
            term: None,
            capacity: None,
            ..
        }
    ));
    // And one without a term is written as before.
    let written = serde_json::to_value(assigned(1, node())).unwrap();
    assert!(written["Assigned"].get("term").is_none(), "{written}");
}
