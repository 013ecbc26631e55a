//! The real `unidesk-agent` binary, killed with SIGKILL and started again on
//! the same work directory, against the in-test WebSocket server: what it
//! owes the server survives in its journal.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use node_agent::connection::journal;
use protocol::{AgentMessage, Command as AgentCommand, ReportedState, ServerMessage};
use uuid::Uuid;

use crate::connection::{
    answer, next_session, recv, report_id, send, server, until_final, welcome, Ws, RUN_WAIT, TOKEN,
};
use crate::support::{self, env_repo, repo, spec};

/// An agent process, killed with SIGKILL when dropped.
struct AgentProcess(Child);

impl AgentProcess {
    /// Starts the agent binary on `work`, writing its log to `log`.
    fn start(addr: std::net::SocketAddr, work: &Path, log: &Path) -> Self {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_unidesk-agent"))
            .args(["--server", &format!("ws://{addr}")])
            .args(["--reconnect-min-ms", "50", "--reconnect-max-ms", "200"])
            .args(["--cpus", "1", "--memory-mb", "512", "--no-gpus"])
            .arg("--work-dir")
            .arg(work)
            .env("UNIDESK_NODE_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        AgentProcess(child)
    }

    /// `kill -9`: no chance to write or remove anything.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn journal_file(work: &Path) -> PathBuf {
    work.join(journal::DIR).join(journal::FILE)
}

/// The reports the journal holds (its `status` and `log` records, live or
/// not yet compacted away).
fn journaled_reports(work: &Path) -> usize {
    let text = std::fs::read(journal_file(work)).unwrap_or_default();
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.contains(r#"{"record":"status""#) || l.contains(r#"{"record":"log""#))
        .count()
}

/// The containers of `task` in Docker, running or not.
async fn containers_of(task: Uuid) -> Vec<String> {
    let docker = support::docker().await;
    let filters = std::collections::HashMap::from([(
        "label",
        vec![format!("{}={task}", node_agent::docker::LABEL_TASK)],
    )]);
    let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    docker
        .list_containers(Some(options))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// Sends a command the agent acknowledges, and returns the reports it sent
/// before the acknowledgement: after a welcome, everything it resends.
async fn reports_before_probe(ws: &mut Ws) -> Vec<AgentMessage> {
    let probe = Uuid::new_v4();
    let command_id = protocol::command_id("cancel_task", probe, 1);
    let cancel = ServerMessage::Command {
        command_id,
        command: AgentCommand::CancelTask {
            task_id: probe,
            attempt: 1,
            grace_s: 1,
        },
    };
    send(ws, &cancel).await;
    let mut reports = Vec::new();
    loop {
        match recv(ws).await {
            AgentMessage::Ack { command_id: id } if id == command_id => return reports,
            message @ (AgentMessage::Status(_) | AgentMessage::Log(_)) => reports.push(message),
            _ => {}
        }
    }
}

fn log_of(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

#[tokio::test]
async fn a_killed_agent_sends_what_it_journaled_again_once_and_a_refused_report_never() {
    support::base_image().await;
    let (addr, mut sessions) = server().await;
    let work = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let task = spec(&code, &env, "echo one; echo two; exit 3");
    let mut agent = AgentProcess::start(addr, work.path(), &logs.path().join("1.log"));
    let mut ws = next_session(&mut sessions).await;
    welcome(&mut ws, 30).await;
    let command_id = protocol::command_id("run_task", task.task_id, task.attempt);
    let run = ServerMessage::Command {
        command_id,
        command: AgentCommand::RunTask(task.clone()),
    };
    send(&mut ws, &run).await;

    // The server stores nothing: the attempt ends with every report
    // unanswered, and the agent dies before any answer could come.
    let first = until_final(&mut ws, task.task_id).await;
    let Some(AgentMessage::Status(end)) = first.last() else {
        panic!("{first:?}")
    };
    assert_eq!((end.state, end.exit_code), (ReportedState::Failed, Some(3)));
    agent.kill();
    drop(ws);
    assert!(
        !containers_of(task.task_id).await.is_empty(),
        "the ended container is kept until the server has its end"
    );
    // It died while writing one more record: the journal ends torn.
    let mut torn = std::fs::OpenOptions::new()
        .append(true)
        .open(journal_file(work.path()))
        .unwrap();
    std::io::Write::write_all(
        &mut torn,
        br#"0123456789abcdef {"record":"log","id":4242,"tas"#,
    )
    .unwrap();
    drop(torn);

    let second_log = logs.path().join("2.log");
    let mut agent = AgentProcess::start(addr, work.path(), &second_log);
    let mut ws = next_session(&mut sessions).await;
    let hello = welcome(&mut ws, 30).await;
    assert!(
        hello
            .running
            .iter()
            .any(|r| (r.task_id, r.attempt) == (task.task_id, task.attempt)),
        "the attempt whose end is unanswered is still this node's: {hello:?}"
    );
    let resent = reports_before_probe(&mut ws).await;
    let mut expected: Vec<AgentMessage> = first
        .iter()
        .filter(|m| matches!(m, AgentMessage::Log(_)))
        .cloned()
        .collect();
    expected.push(first.last().unwrap().clone());
    assert_eq!(
        resent, expected,
        "the output and the end, once each, in order, under their ids; the \
         container is not adopted as well"
    );
    assert!(
        log_of(&second_log).contains("torn last record"),
        "{}",
        log_of(&second_log)
    );

    // The output is stored; the end is refused for good.
    for message in &resent {
        let id = report_id(message);
        let refused = matches!(message, AgentMessage::Status(_));
        answer(&mut ws, id, refused.then_some("refused\nfor good")).await;
    }
    let end_id = report_id(resent.last().unwrap());
    support::eventually(
        "the container removed and the journal emptied",
        Duration::from_secs(30),
        || async {
            (containers_of(task.task_id).await.is_empty() && journaled_reports(work.path()) == 0)
                .then_some(())
        },
    )
    .await;
    let log = log_of(&second_log);
    let warning = log
        .lines()
        .find(|l| l.contains("refused a report for good"))
        .unwrap_or_else(|| panic!("no warning: {log}"));
    for part in [
        format!("id={end_id}"),
        format!("task_id={}", task.task_id),
        "attempt=1".to_owned(),
        r#""refused\nfor good""#.to_owned(),
    ] {
        assert!(warning.contains(&part), "{part} missing: {warning}");
    }

    // Neither a new session nor a new process sends it again.
    drop(ws);
    let mut ws = next_session(&mut sessions).await;
    welcome(&mut ws, 30).await;
    assert_eq!(reports_before_probe(&mut ws).await, Vec::new());
    agent.kill();
    drop(ws);
    let _agent = AgentProcess::start(addr, work.path(), &logs.path().join("3.log"));
    let mut ws = next_session(&mut sessions).await;
    let hello = welcome(&mut ws, 30).await;
    assert!(hello.running.is_empty(), "{hello:?}");
    assert_eq!(reports_before_probe(&mut ws).await, Vec::new());
    support::remove_image(&support::docker().await, &support::tag_of(&task)).await;
}

#[tokio::test]
async fn a_second_agent_on_a_work_directory_in_use_is_refused_and_takes_it_once_free() {
    let (addr, mut sessions) = server().await;
    let work = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut first = AgentProcess::start(addr, work.path(), &logs.path().join("1.log"));
    let mut ws = next_session(&mut sessions).await;
    welcome(&mut ws, 30).await;

    let mut second = AgentProcess::start(addr, work.path(), &logs.path().join("2.log"));
    let status = tokio::time::timeout(
        RUN_WAIT,
        tokio::task::spawn_blocking(move || second.0.wait().unwrap()),
    )
    .await
    .expect("the second agent exits")
    .unwrap();
    assert!(!status.success(), "the second agent exits with an error");
    let said = log_of(&logs.path().join("2.log"));
    let expected = format!(
        "another agent is running on the work directory {} (process {})",
        work.path().canonicalize().unwrap().display(),
        first.0.id()
    );
    assert!(said.contains(&expected), "{said}");
    // It never reached the server, and the first one is still connected.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sessions.recv())
            .await
            .is_err(),
        "no second session"
    );
    assert!(first.0.try_wait().unwrap().is_none());

    // Once the first is gone (kill -9: nothing released by hand), the
    // next one starts.
    first.kill();
    drop(ws);
    let _third = AgentProcess::start(addr, work.path(), &logs.path().join("3.log"));
    let mut ws = next_session(&mut sessions).await;
    welcome(&mut ws, 30).await;
}
