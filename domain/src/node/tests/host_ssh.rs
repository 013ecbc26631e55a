//! Given/when/then tests of host SSH: who may ask, what is refused, and how
//! few requests a node keeps open.

use cqrs_es::test::TestFramework;
use uuid::Uuid;

use super::{connected, provisioned, revoked, session};
use crate::node::*;
use crate::testing::{admin, at, state_after};

type F = TestFramework<Node>;

fn request_ssh(id: u128, at_s: i64) -> NodeCommand {
    NodeCommand::RequestHostSsh {
        request_id: Uuid::from_u128(id),
        command: "nvidia-smi".into(),
        timeout_s: 30,
        by: admin(),
        at: at(at_s),
    }
}
fn ssh_requested(id: u128, at_s: i64) -> NodeEvent {
    NodeEvent::HostSshRequested {
        request_id: Uuid::from_u128(id),
        command: "nvidia-smi".into(),
        timeout_s: 30,
        by: admin(),
        at: at(at_s),
    }
}
fn exited(code: i32) -> HostSshOutcome {
    HostSshOutcome {
        exit_code: Some(code),
        output: "GPU 0: A100\n".into(),
        duration_ms: 120,
        ..HostSshOutcome::default()
    }
}
fn finish_ssh(id: u128, at_s: i64) -> NodeCommand {
    NodeCommand::FinishHostSsh {
        request_id: Uuid::from_u128(id),
        result: exited(0),
        at: at(at_s),
    }
}
fn ssh_finished(id: u128, at_s: i64) -> NodeEvent {
    NodeEvent::HostSshFinished {
        request_id: Uuid::from_u128(id),
        result: exited(0),
        at: at(at_s),
    }
}

#[test]
fn an_admin_may_run_a_host_command_on_an_online_node() {
    F::with(())
        .given(vec![provisioned(), connected()])
        .when(request_ssh(1, 5))
        .then_expect_events(vec![ssh_requested(1, 5)]);
    F::with(())
        .given(vec![provisioned(), connected(), ssh_requested(1, 5)])
        .when(request_ssh(1, 5))
        .then_expect_events(vec![]);
}

#[test]
fn host_ssh_is_refused_for_a_node_that_is_not_online() {
    F::with(())
        .given(vec![provisioned()])
        .when(request_ssh(1, 5))
        .then_expect_error(NodeError::NotOnline);
    F::with(())
        .given(vec![
            provisioned(),
            connected(),
            NodeEvent::Disconnected {
                session: session(),
                reason: "gone".into(),
                at: at(3),
            },
        ])
        .when(request_ssh(1, 5))
        .then_expect_error(NodeError::NotOnline);
    F::with(())
        .given(vec![provisioned(), connected(), revoked()])
        .when(request_ssh(1, 5))
        .then_expect_error(NodeError::Revoked);
    F::with(())
        .given_no_previous_events()
        .when(request_ssh(1, 5))
        .then_expect_error(NodeError::NotFound);
}

#[test]
fn a_bad_host_command_is_refused() {
    for (command, timeout_s) in [("  ", 30), ("a\0b", 30), ("ls", 0), ("ls", 601)] {
        F::with(())
            .given(vec![provisioned(), connected()])
            .when(NodeCommand::RequestHostSsh {
                request_id: Uuid::from_u128(1),
                command: command.into(),
                timeout_s,
                by: admin(),
                at: at(5),
            })
            .then_expect_error_message(
                &validate_host_ssh(command, timeout_s)
                    .map(|()| String::new())
                    .unwrap_or_else(|e| format!("{}: {}", e.field, e.reason)),
            );
    }
    assert!(validate_host_ssh(&"x".repeat(MAX_HOST_SSH_COMMAND_BYTES + 1), 5).is_err());
    assert!(validate_host_ssh("echo hello; id -un", 600).is_ok());
}

#[test]
fn a_host_ssh_result_is_recorded_once() {
    F::with(())
        .given(vec![provisioned(), connected(), ssh_requested(1, 5)])
        .when(finish_ssh(1, 6))
        .then_expect_events(vec![ssh_finished(1, 6)]);
    // A late answer after the waiter recorded that none came.
    F::with(())
        .given(vec![
            provisioned(),
            connected(),
            ssh_requested(1, 5),
            ssh_finished(1, 50),
        ])
        .when(finish_ssh(1, 51))
        .then_expect_error(NodeError::UnknownHostSsh(Uuid::from_u128(1)));
}

#[test]
fn a_result_for_an_unknown_request_is_refused() {
    F::with(())
        .given(vec![provisioned(), connected(), ssh_requested(1, 5)])
        .when(finish_ssh(2, 6))
        .then_expect_error(NodeError::UnknownHostSsh(Uuid::from_u128(2)));
}

#[test]
fn a_result_larger_than_the_output_cap_is_refused() {
    F::with(())
        .given(vec![provisioned(), connected(), ssh_requested(1, 5)])
        .when(NodeCommand::FinishHostSsh {
            request_id: Uuid::from_u128(1),
            result: HostSshOutcome {
                output: "x".repeat(MAX_HOST_SSH_OUTPUT_BYTES + 1),
                truncated: true,
                ..HostSshOutcome::default()
            },
            at: at(6),
        })
        .then_expect_error_message(&format!(
            "output must be at most {MAX_HOST_SSH_OUTPUT_BYTES} bytes"
        ));
}

#[test]
fn only_a_few_host_ssh_requests_wait_at_once_and_old_ones_are_forgotten() {
    let mut given = vec![provisioned(), connected()];
    given.extend((0..MAX_OPEN_HOST_SSH as u128).map(|i| ssh_requested(i, 5)));
    F::with(())
        .given(given.clone())
        .when(request_ssh(100, 6))
        .then_expect_error(NodeError::TooManyHostSsh);
    // Once their answers are overdue they no longer count …
    let later = 5 + 30 + HOST_SSH_ANSWER_GRACE_S as i64 + 1;
    F::with(())
        .given(given.clone())
        .when(request_ssh(100, later))
        .then_expect_events(vec![ssh_requested(100, later)]);
    // … and long after that the state drops them.
    let mut n: Node = state_after(given);
    assert_eq!(n.host_ssh.len(), MAX_OPEN_HOST_SSH);
    let much_later = later + HOST_SSH_FORGET_AFTER_S as i64;
    n.apply_event(ssh_requested(100, much_later));
    assert_eq!(
        n.host_ssh.keys().collect::<Vec<_>>(),
        [&Uuid::from_u128(100)]
    );
    n.apply_event(ssh_finished(100, much_later + 1));
    assert!(n.host_ssh.is_empty());
}

#[test]
fn a_node_with_open_host_ssh_requests_survives_a_snapshot() {
    let n: Node = state_after([provisioned(), connected(), ssh_requested(1, 5)]);
    let json = serde_json::to_value(&n).unwrap();
    assert_eq!(serde_json::from_value::<Node>(json.clone()).unwrap(), n);
    // A snapshot written before host SSH existed still loads.
    let mut old = json;
    old.as_object_mut().unwrap().remove("host_ssh");
    let loaded: Node = serde_json::from_value(old).unwrap();
    assert!(loaded.host_ssh.is_empty());
}
