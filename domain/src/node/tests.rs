//! Given/when/then tests of the node's life: provisioning, sessions,
//! offline, drain and revocation. Host SSH has its own file.

use cqrs_es::test::TestFramework;
use uuid::Uuid;

use super::*;
use crate::name::NameError;
use crate::testing::{admin, at, name};

mod host_ssh;

type F = TestFramework<Node>;

fn session() -> Uuid {
    Uuid::from_u128(11)
}
fn provisioned() -> NodeEvent {
    NodeEvent::Provisioned {
        node_id: Uuid::from_u128(7),
        name: name("gpu-3"),
        labels: [("gpu".to_string(), "a100".to_string())].into(),
        token_fingerprint: "ff".into(),
        max_resources: ResourceLimits::default(),
        by: admin(),
        at: at(0),
    }
}
fn resources() -> NodeResources {
    NodeResources {
        cpus: 8.0,
        memory_mb: 32768,
        gpus: vec![],
    }
}
fn connect() -> NodeCommand {
    NodeCommand::Connect {
        session: session(),
        agent_version: "0.1.0".into(),
        resources: resources(),
        labels: Default::default(),
        at: at(1),
    }
}
fn connected() -> NodeEvent {
    NodeEvent::Connected {
        session: session(),
        agent_version: "0.1.0".into(),
        resources: resources(),
        labels: Default::default(),
        at: at(1),
    }
}
fn revoked() -> NodeEvent {
    NodeEvent::TokenRevoked {
        by: admin(),
        at: at(2),
    }
}

#[test]
fn provisioning_creates_the_node_once() {
    let provision = NodeCommand::Provision {
        node_id: Uuid::from_u128(7),
        name: "gpu-3".into(),
        labels: [("gpu".to_string(), "a100".to_string())].into(),
        token_fingerprint: "ff".into(),
        max_resources: ResourceLimits::default(),
        by: admin(),
        at: at(0),
    };
    F::with(())
        .given_no_previous_events()
        .when(provision.clone())
        .then_expect_events(vec![provisioned()]);
    F::with(())
        .given(vec![provisioned()])
        .when(provision)
        .then_expect_error(NodeError::AlreadyExists);
}

#[test]
fn a_node_whose_name_is_not_a_name_is_refused() {
    F::with(())
        .given_no_previous_events()
        .when(NodeCommand::Provision {
            node_id: Uuid::from_u128(7),
            name: "GPU 3".into(),
            labels: Default::default(),
            token_fingerprint: "ff".into(),
            max_resources: ResourceLimits::default(),
            by: admin(),
            at: at(0),
        })
        .then_expect_error_message(&format!("name: {NameError}"));
}

#[test]
fn an_unknown_node_cannot_connect() {
    F::with(())
        .given_no_previous_events()
        .when(connect())
        .then_expect_error(NodeError::NotFound);
}

#[test]
fn a_provisioned_node_connects_and_a_revoked_one_cannot() {
    F::with(())
        .given(vec![provisioned()])
        .when(connect())
        .then_expect_events(vec![connected()]);
    F::with(())
        .given(vec![provisioned(), revoked()])
        .when(connect())
        .then_expect_error(NodeError::Revoked);
}

#[test]
fn only_the_current_session_can_disconnect() {
    let disconnect = |s: Uuid| NodeCommand::Disconnect {
        session: s,
        reason: "closed".into(),
        at: at(3),
    };
    F::with(())
        .given(vec![provisioned(), connected()])
        .when(disconnect(session()))
        .then_expect_events(vec![NodeEvent::Disconnected {
            session: session(),
            reason: "closed".into(),
            at: at(3),
        }]);
    F::with(())
        .given(vec![provisioned(), connected()])
        .when(disconnect(Uuid::from_u128(99)))
        .then_expect_events(vec![]);
}

#[test]
fn an_online_node_is_marked_offline_once() {
    let mark = NodeCommand::MarkOffline {
        last_seen: at(1),
        at: at(91),
    };
    F::with(())
        .given(vec![provisioned(), connected()])
        .when(mark.clone())
        .then_expect_events(vec![NodeEvent::MarkedOffline {
            last_seen: at(1),
            at: at(91),
        }]);
    F::with(())
        .given(vec![
            provisioned(),
            connected(),
            NodeEvent::MarkedOffline {
                last_seen: at(1),
                at: at(91),
            },
        ])
        .when(mark)
        .then_expect_events(vec![]);
}

#[test]
fn drain_and_undrain_are_idempotent() {
    let drain = NodeCommand::Drain {
        by: admin(),
        at: at(4),
    };
    let drained = NodeEvent::Drained {
        by: admin(),
        at: at(4),
    };
    F::with(())
        .given(vec![provisioned()])
        .when(drain.clone())
        .then_expect_events(vec![drained.clone()]);
    F::with(())
        .given(vec![provisioned(), drained.clone()])
        .when(drain)
        .then_expect_events(vec![]);
    F::with(())
        .given(vec![provisioned()])
        .when(NodeCommand::Undrain {
            by: admin(),
            at: at(5),
        })
        .then_expect_events(vec![]);
    F::with(())
        .given(vec![provisioned(), drained])
        .when(NodeCommand::Undrain {
            by: admin(),
            at: at(5),
        })
        .then_expect_events(vec![NodeEvent::Undrained {
            by: admin(),
            at: at(5),
        }]);
}

#[test]
fn a_revoked_node_cannot_be_drained_or_undrained() {
    F::with(())
        .given(vec![provisioned(), revoked()])
        .when(NodeCommand::Drain {
            by: admin(),
            at: at(4),
        })
        .then_expect_error(NodeError::Revoked);
}

#[test]
fn revoking_is_recorded_once() {
    let revoke = NodeCommand::RevokeToken {
        by: admin(),
        at: at(2),
    };
    F::with(())
        .given(vec![provisioned(), connected()])
        .when(revoke.clone())
        .then_expect_events(vec![revoked()]);
    F::with(())
        .given(vec![provisioned(), revoked()])
        .when(revoke)
        .then_expect_events(vec![]);
}

#[test]
fn labels_the_agent_declares_are_kept_apart_and_never_matched() {
    let mut n = Node::default();
    n.apply_event(provisioned());
    let mut c = connected();
    if let NodeEvent::Connected { labels, .. } = &mut c {
        labels.insert("gpu".into(), "none".into());
        labels.insert("os".into(), "wsl".into());
    }
    n.apply_event(c);
    assert_eq!(n.labels, [("gpu".to_string(), "a100".to_string())].into());
    assert_eq!(n.declared_labels["gpu"], "none");
    assert_eq!(n.declared_labels["os"], "wsl");
}
