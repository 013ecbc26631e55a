//! Histories that several tests build the same way, written into the log
//! as the API and the ingress write them.

use chrono::Utc;
use domain::node::{HostSshOutcome, Node, NodeCommand};
use domain::Actor;
use store::Store;
use uuid::Uuid;

/// The output the node reports for [`host_command_then_drain`]'s command.
pub const HOST_OUTPUT: &str = "marker-output\n";

/// On `node`: the admin runs `command` over host SSH and the node answers
/// it (exit 0, [`HOST_OUTPUT`]), then the admin drains and undrains the
/// node. Four events: `NodeHostSshRequested`, `NodeHostSshFinished`,
/// `NodeDrained`, `NodeUndrained`.
///
/// # Panics
/// When the log refuses one of the commands.
pub async fn host_command_then_drain(store: &Store, node: &str, command: &str) {
    let request_id = Uuid::now_v7();
    let admin = Actor::User("admin".into());
    let at = Utc::now();
    let steps = [
        (
            NodeCommand::RequestHostSsh {
                request_id,
                command: command.into(),
                timeout_s: 30,
                by: admin.clone(),
                at,
            },
            admin.clone(),
        ),
        (
            NodeCommand::FinishHostSsh {
                request_id,
                result: HostSshOutcome {
                    exit_code: Some(0),
                    output: HOST_OUTPUT.into(),
                    duration_ms: 7,
                    ..HostSshOutcome::default()
                },
                at,
            },
            Actor::Node(node.to_string()),
        ),
        (
            NodeCommand::Drain {
                by: admin.clone(),
                at,
            },
            admin.clone(),
        ),
        (
            NodeCommand::Undrain {
                by: admin.clone(),
                at,
            },
            admin,
        ),
    ];
    for (command, actor) in steps {
        if let Err(e) = store.execute::<Node>(node, command, &actor, at).await {
            panic!("a node command of the host-command scene: {e}");
        }
    }
}

/// On task `task`: the scheduler assigns its next attempt (number
/// `attempt`) to `node` and the node accepts it, then issues `then` (its
/// reports, a loss) in order.
///
/// # Panics
/// When the log refuses one of the commands.
pub async fn attempt_on(
    store: &Store,
    task: &str,
    node: Uuid,
    attempt: u32,
    then: impl IntoIterator<Item = domain::task::TaskCommand>,
) {
    use domain::task::{Task, TaskCommand};
    let (scheduler, on_node) = (
        Actor::System("scheduler".into()),
        Actor::Node(node.to_string()),
    );
    let placed = [
        (
            TaskCommand::Assign {
                node_id: node,
                gpus: vec![],
                reason: "test".into(),
                at: Utc::now(),
            },
            &scheduler,
        ),
        (
            TaskCommand::Accept {
                node_id: node,
                attempt,
                at: Utc::now(),
            },
            &on_node,
        ),
    ];
    let steps = placed
        .into_iter()
        .chain(then.into_iter().map(|command| (command, &on_node)));
    for (command, actor) in steps {
        store
            .execute::<Task>(task, command, actor, Utc::now())
            .await
            .expect("the command is accepted");
    }
}
