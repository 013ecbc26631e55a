//! What a node must get right for long work: GPU devices by index, taking
//! over containers after an agent restart, tasks kept apart, paths kept
//! inside their repositories, and a full disk reported as such.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use node_agent::docker::{self, ContainerSpec};
use node_agent::executor::{self, Context, Report, StatusReport};
use node_agent::git_auth::GitAuth;
use node_agent::supervisor::Supervisor;
use protocol::ReportedState;
use tokio::sync::mpsc;

use crate::support::{self, context, env_repo, output, repo, spec, statuses, BASE_IMAGE};

/// Reads reports until a final status; returns all of them.
async fn until_final(rx: &mut mpsc::Receiver<Report>, within: Duration) -> Vec<Report> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let report = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no final report within {within:?}: {seen:?}"))
            .unwrap_or_else(|| panic!("reports ended early: {seen:?}"));
        let done = matches!(&report, Report::Status(s) if s.is_final());
        seen.push(report);
        if done {
            return seen;
        }
    }
}

/// Reads reports until the container runs; returns its id.
async fn until_running(rx: &mut mpsc::Receiver<Report>) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let report = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("the container never ran")
            .expect("reports ended before the container ran");
        if let Report::Status(StatusReport {
            state: ReportedState::Running,
            container: Some(id),
            ..
        }) = report
        {
            return id;
        }
    }
}

fn last_status(reports: &[Report]) -> StatusReport {
    statuses(reports).last().copied().cloned().unwrap()
}

#[tokio::test]
async fn gpus_are_requested_by_device_index() {
    support::base_image().await;
    let docker = support::docker().await;
    let work = tempfile::tempdir().unwrap();
    let env = BTreeMap::new();
    let command = vec!["true".to_owned()];
    let spec = ContainerSpec {
        image: BASE_IMAGE,
        command: &command,
        env: &env,
        workspace: work.path(),
        labels: HashMap::new(),
        cpus: 2.0,
        memory_mb: 1024,
        gpus: &[1, 3],
        pids_limit: docker::PIDS_LIMIT,
        network: docker::NetworkMode::Bridge,
        layer_limit_mb: None,
        log_file_bytes: docker::CONTAINER_LOG_FILE_BYTES,
    };
    // Created, not started: this machine has no GPUs, but the request is
    // what Docker hands to the NVIDIA runtime on one that does.
    let id = docker::create_container(&docker, &spec).await.unwrap();
    let inspected = docker.inspect_container(&id, None).await.unwrap();
    docker::remove_container(&docker, &id).await.unwrap();
    let host = inspected.host_config.unwrap();
    let requests = host.device_requests.unwrap();
    assert_eq!(requests.len(), 1);
    let gpus = &requests[0];
    assert_eq!(gpus.driver.as_deref(), Some("nvidia"));
    assert_eq!(
        gpus.device_ids.as_deref(),
        Some(&["1".to_owned(), "3".to_owned()][..])
    );
    assert_eq!(gpus.capabilities, Some(vec![vec!["gpu".to_owned()]]));
    assert!(
        matches!(gpus.count, None | Some(0)),
        "devices by index, not a count: {gpus:?}"
    );
    assert_eq!(host.nano_cpus, Some(2_000_000_000));
    assert_eq!(host.memory, Some(1024 * 1024 * 1024));
    assert_eq!(host.pids_limit, Some(docker::PIDS_LIMIT));
}

#[tokio::test]
async fn a_restarted_agent_adopts_its_containers_and_reports_their_end() {
    support::base_image().await;
    let (ctx, work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    // One attempt keeps running across the restart, one ends while no
    // agent watches.
    let mut long = spec(&code, &env, "echo one; sleep 4; echo two");
    long.timeout_s = Some(600);
    let short = spec(&code, &env, "echo done; exit 4");
    let mut ids = Vec::new();
    for s in [long.clone(), short.clone()] {
        let (_canceller, signal) = executor::cancel_pair();
        let (tx, mut rx) = mpsc::channel(64);
        let handle = tokio::spawn(executor::run(s, Arc::clone(&ctx), tx, signal));
        ids.push(until_running(&mut rx).await);
        // The agent dies: nothing of it stops the container.
        handle.abort();
    }
    // The short attempt ends while no agent runs: the new one adopts one
    // container still running and one already exited.
    let docker = support::docker().await;
    support::eventually(
        "the short attempt's container to exit",
        Duration::from_secs(60),
        || async {
            let state = docker
                .inspect_container(&ids[1], None)
                .await
                .unwrap()
                .state
                .unwrap_or_default();
            (state.running != Some(true)).then_some(())
        },
    )
    .await;

    // A new agent process on the same work directory.
    let again = Arc::new(
        Context::new(support::docker().await, work.path())
            .unwrap()
            .with_timeout_grace(Duration::from_secs(1)),
    );
    assert_eq!(again.agent_label(), ctx.agent_label());
    let (tx, mut rx) = mpsc::channel(256);
    let supervisor = Supervisor::new(Arc::clone(&again), tx);
    supervisor.adopt_leftovers().await;
    let mut running: Vec<_> = supervisor
        .running()
        .into_iter()
        .map(|r| (r.task_id, r.container.unwrap()))
        .collect();
    running.sort();
    let mut expected = vec![
        (long.task_id, ids[0].clone()),
        (short.task_id, ids[1].clone()),
    ];
    expected.sort();
    assert_eq!(running, expected, "both attempts are listed for the hello");

    let mut by_task: HashMap<uuid::Uuid, Vec<Report>> = HashMap::new();
    while by_task
        .values()
        .filter(|r| matches!(r.last(), Some(Report::Status(s)) if s.is_final()))
        .count()
        < 2
    {
        let report = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("the adopted attempts did not end")
            .unwrap();
        by_task.entry(report.attempt().0).or_default().push(report);
    }
    let long_reports = &by_task[&long.task_id];
    assert_eq!(statuses(long_reports)[0].state, ReportedState::Running);
    assert_eq!(
        statuses(long_reports)[0].container.as_deref(),
        Some(&*ids[0])
    );
    assert_eq!(output(long_reports), "one\ntwo\n", "output from the start");
    assert_eq!(last_status(long_reports).state, ReportedState::Succeeded);
    let short_reports = &by_task[&short.task_id];
    assert_eq!(output(short_reports), "done\n");
    let end = last_status(short_reports);
    assert_eq!((end.state, end.exit_code), (ReportedState::Failed, Some(4)));
    assert!(!end.node_fault, "its own exit is the task's: {end:?}");
    // Stopped, they stay until the server has their ends.
    for id in &ids {
        let state = again.docker().inspect_container(id, None).await.unwrap();
        assert_eq!(state.state.unwrap().running, Some(false));
    }
    support::release(&again, &long).await;
    support::release(&again, &short).await;
    for id in &ids {
        assert!(
            again.docker().inspect_container(id, None).await.is_err(),
            "container {id} removed"
        );
    }
    assert!(supervisor.running().is_empty());
    support::remove_env_image(&again, &env).await;
}

/// A new agent process on `work`: a fresh context and supervisor, which
/// adopts what the previous one left.
async fn restarted(work: &Path) -> (Arc<Context>, Supervisor, mpsc::Receiver<Report>) {
    let again = Arc::new(
        Context::new(support::docker().await, work)
            .unwrap()
            .with_timeout_grace(Duration::from_secs(1)),
    );
    let (tx, rx) = mpsc::channel(256);
    let supervisor = Supervisor::new(Arc::clone(&again), tx);
    supervisor.adopt_leftovers().await;
    (again, supervisor, rx)
}

#[tokio::test]
async fn an_adopted_container_that_ended_within_its_limit_reports_its_exit_however_late() {
    support::base_image().await;
    let (ctx, work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut task = spec(&code, &env, "echo hi; sleep 1; exit 5");
    task.timeout_s = Some(3);
    let (_canceller, signal) = executor::cancel_pair();
    let (tx, mut rx) = mpsc::channel(64);
    let handle = tokio::spawn(executor::run(task.clone(), Arc::clone(&ctx), tx, signal));
    let id = until_running(&mut rx).await;
    handle.abort();
    // It ends within its limit while no agent runs; the next agent comes
    // after the limit has passed.
    let docker = support::docker().await;
    support::eventually(
        "the container to end and its time limit to pass",
        Duration::from_secs(60),
        || async {
            let state = docker
                .inspect_container(&id, None)
                .await
                .unwrap()
                .state
                .unwrap_or_default();
            let started =
                chrono::DateTime::parse_from_rfc3339(state.started_at.as_deref()?).ok()?;
            let since = chrono::Utc::now() - started.with_timezone(&chrono::Utc);
            (state.running == Some(false) && since > chrono::Duration::seconds(4)).then_some(())
        },
    )
    .await;
    let (again, _supervisor, mut rx) = restarted(work.path()).await;
    let reports = until_final(&mut rx, Duration::from_secs(60)).await;
    let end = last_status(&reports);
    assert_eq!(
        (end.state, end.exit_code),
        (ReportedState::Failed, Some(5)),
        "{reports:?}"
    );
    assert_eq!(output(&reports), "hi\n");
    support::release(&again, &task).await;
    support::remove_env_image(&again, &env).await;
}

#[tokio::test]
async fn a_container_docker_stopped_while_no_agent_ran_is_the_nodes_failure() {
    // An agent in a container goes down with Docker: when Docker restarts
    // without `live-restore`, the agent and the task are stopped together,
    // and the next agent finds the task's container stopped.
    support::base_image().await;
    let (ctx, work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    // A shell that handles SIGTERM ends 143; one that does not (PID 1
    // ignores it) is killed when the stop's timeout runs out: 137.
    let answers = spec(
        &code,
        &env,
        "trap 'exit 143' TERM; echo up; while true; do sleep 0.2; done",
    );
    let ignores = spec(&code, &env, "echo up; sleep 300");
    let mut ids = Vec::new();
    for s in [answers.clone(), ignores.clone()] {
        let (_canceller, signal) = executor::cancel_pair();
        let (tx, mut rx) = mpsc::channel(64);
        let handle = tokio::spawn(executor::run(s, Arc::clone(&ctx), tx, signal));
        ids.push(until_running(&mut rx).await);
        handle.abort();
    }
    let docker = support::docker().await;
    for id in &ids {
        docker
            .stop_container(
                id,
                Some(
                    bollard::query_parameters::StopContainerOptionsBuilder::default()
                        .t(1)
                        .build(),
                ),
            )
            .await
            .unwrap();
    }
    let (again, _supervisor, mut rx) = restarted(work.path()).await;
    let mut ends = HashMap::new();
    while ends.len() < 2 {
        let reports = until_final(&mut rx, Duration::from_secs(60)).await;
        let end = last_status(&reports).clone();
        ends.insert(end.task_id, end);
    }
    for (task, code) in [(&answers, 143), (&ignores, 137)] {
        let end = &ends[&task.task_id];
        assert_eq!(
            (end.state, end.exit_code, end.node_fault),
            (ReportedState::Failed, Some(code), true),
            "{end:?}"
        );
        assert_eq!(
            end.message.clone().unwrap(),
            format!(
                "ended with exit status {code} while no agent watched it, as containers do when \
                 Docker or the machine restarts"
            )
        );
        support::release(&again, task).await;
    }
    support::remove_env_image(&again, &env).await;
}

#[tokio::test]
async fn an_agent_restarted_after_it_stopped_a_container_reports_why_it_stopped_it() {
    support::base_image().await;
    let (ctx, work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut task = spec(&code, &env, "echo started; sleep 300");
    task.timeout_s = Some(2);
    let (_canceller, signal) = executor::cancel_pair();
    let (tx, mut rx) = mpsc::channel(64);
    executor::run(task.clone(), Arc::clone(&ctx), tx, signal).await;
    let first = last_status(&until_final(&mut rx, Duration::from_secs(60)).await);
    assert_eq!(first.state, ReportedState::TimedOut);
    // The agent dies before its report is stored: the stopped container
    // (exit status 137 or 143) is all the next one finds.
    let (again, _supervisor, mut rx) = restarted(work.path()).await;
    let reports = until_final(&mut rx, Duration::from_secs(60)).await;
    let end = last_status(&reports);
    assert_eq!(
        (end.state, end.exit_code, end.message.as_deref()),
        (
            ReportedState::TimedOut,
            None,
            Some("stopped at the time limit of 2 s")
        ),
        "{reports:?}"
    );
    support::release(&again, &task).await;
    support::remove_env_image(&again, &env).await;
}

#[tokio::test]
async fn a_task_cannot_see_another_tasks_workspace() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let env = env_repo("");
    let mine = repo(&[("mine.txt", "mine")]);
    let theirs = repo(&[("theirs.txt", "theirs")]);
    let (canceller, signal) = executor::cancel_pair();
    let (tx, mut rx) = mpsc::channel(64);
    let other = spec(
        &theirs,
        &env,
        "echo hidden > /workspace/secret-of-theirs.txt; sleep 300",
    );
    let handle = tokio::spawn(executor::run(other.clone(), Arc::clone(&ctx), tx, signal));
    until_running(&mut rx).await;
    let (_c, signal) = executor::cancel_pair();
    let (tx, mut looking) = mpsc::channel(256);
    let probe = spec(
        &mine,
        &env,
        "find / -name 'secret-of-*' -o -name 'theirs.txt' 2>/dev/null; ls /workspace; ls /workspace/..",
    );
    executor::run(probe.clone(), Arc::clone(&ctx), tx, signal).await;
    let reports = until_final(&mut looking, Duration::from_secs(60)).await;
    canceller.cancel(Duration::from_secs(0));
    handle.await.unwrap();
    support::release(&ctx, &probe).await;
    support::release(&ctx, &other).await;
    let seen = output(&reports);
    assert!(!seen.contains("secret-of-theirs"), "{seen}");
    assert!(!seen.contains("theirs.txt"), "{seen}");
    assert!(seen.contains("mine.txt"), "{seen}");
    support::remove_env_image(&ctx, &env).await;
}

/// A repository whose `Dockerfile` is a symbolic link to `target`.
fn repo_with_linked_dockerfile(target: &str) -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.org"])
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    git(&["init", "-q"]);
    std::os::unix::fs::symlink(target, dir.path().join("Dockerfile")).unwrap();
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "link"]);
    let commit = git(&["rev-parse", "HEAD"]);
    let url = format!("file://{}", dir.path().display());
    (dir, url, commit)
}

#[tokio::test]
async fn a_dockerfile_linking_outside_its_repository_is_refused() {
    let (ctx, _work) = context().await;
    let code = repo(&[("a", "a")]);
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(outside.path(), format!("FROM {BASE_IMAGE}\n")).unwrap();
    let (_dir, url, commit) = repo_with_linked_dockerfile(&outside.path().to_string_lossy());
    let mut task = spec(&code, &support::env_repo(""), "true");
    task.env_repo_url = url;
    task.env_commit_id = commit;
    let (_c, signal) = executor::cancel_pair();
    let (tx, mut rx) = mpsc::channel(64);
    executor::run(task, Arc::clone(&ctx), tx, signal).await;
    let end = last_status(&until_final(&mut rx, Duration::from_secs(60)).await);
    assert_eq!(end.state, ReportedState::Failed);
    assert_eq!(
        end.message.as_deref(),
        Some("Dockerfile Dockerfile is a link to somewhere outside the env repository")
    );
}

/// A 2 MiB tmpfs mounted on a fresh directory, unmounted on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a small tmpfs needs root (the test suite runs as root)"
        );
        SmallDisk(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_task_with_a_clear_reason_and_the_agent_goes_on() {
    support::base_image().await;
    let disk = SmallDisk::new();
    let ctx = Arc::new(
        Context::new(support::docker().await, disk.path())
            .unwrap()
            .with_timeout_grace(Duration::from_secs(1)),
    );
    // 3 MiB that do not compress: more than the disk holds.
    let noise: String = (0..3 * 1024 * 1024 / 64)
        .map(|i| {
            format!(
                "{:064x}\n",
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
            )
        })
        .collect();
    let big = repo(&[("weights.txt", &noise)]);
    let env = env_repo("");
    let (_c, signal) = executor::cancel_pair();
    let (tx, mut rx) = mpsc::channel(64);
    executor::run(spec(&big, &env, "true"), Arc::clone(&ctx), tx, signal).await;
    let end = last_status(&until_final(&mut rx, Duration::from_secs(60)).await);
    assert_eq!(end.state, ReportedState::Failed);
    let message = end.message.unwrap();
    assert!(message.starts_with("the node's disk is full"), "{message}");
    assert!(
        message.contains(&*disk.path().to_string_lossy()),
        "{message}"
    );

    // A small task on the same node still runs.
    let small = repo(&[("a", "a")]);
    let (_c, signal) = executor::cancel_pair();
    let (tx, mut rx) = mpsc::channel(64);
    let task = spec(&small, &env, "cat /workspace/a");
    executor::run(task.clone(), Arc::clone(&ctx), tx, signal).await;
    support::release(&ctx, &task).await;
    let reports = until_final(&mut rx, Duration::from_secs(120)).await;
    assert_eq!(
        last_status(&reports).state,
        ReportedState::Succeeded,
        "{reports:?}"
    );
    assert_eq!(output(&reports), "a", "{reports:?}");
    support::remove_env_image(&ctx, &env).await;
}

/// `git daemon` serving the repositories under a directory, stopped on drop.
struct GitDaemon {
    child: std::process::Child,
    port: u16,
}

impl GitDaemon {
    async fn start(base: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // `git daemon` would run git-daemon as a child of its own, which
        // killing `git` leaves behind: start git-daemon itself.
        let exec_path = git_in(base, &["--exec-path"]);
        let child = Command::new(Path::new(&exec_path).join("git-daemon"))
            .arg("--export-all")
            .arg("--reuseaddr")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .spawn()
            .unwrap();
        support::eventually(
            "git daemon to listen on its port",
            Duration::from_secs(10),
            || async {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(drop)
            },
        )
        .await;
        GitDaemon { child, port }
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn git_in(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.org"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn a_new_commit_fetches_only_what_is_missing_over_the_git_protocol() {
    let served = tempfile::tempdir().unwrap();
    let repo = served.path().join("project");
    std::fs::create_dir_all(&repo).unwrap();
    git_in(&repo, &["init", "-q", "-b", "main"]);
    for i in 0..20 {
        std::fs::write(
            repo.join(format!("file{i}.txt")),
            format!("{i}\n").repeat(500),
        )
        .unwrap();
    }
    git_in(&repo, &["add", "-A"]);
    git_in(&repo, &["commit", "-q", "-m", "first"]);
    let first = git_in(&repo, &["rev-parse", "HEAD"]);
    let daemon = GitDaemon::start(served.path()).await;
    let url = format!("git://127.0.0.1:{}/project", daemon.port);
    let cache = node_agent::git::GitCache::new(served.path().join("cache"));
    let work = tempfile::tempdir().unwrap();
    let root = node_agent::beneath::Root::open(work.path(), "the checkouts").unwrap();
    let dest = |name: &str| root.create_dir(name, "a checkout").unwrap();

    // A fresh clone: every object, counted in bytes too.
    let clone = cache
        .checkout(&url, &first, &dest("a"), &GitAuth::default())
        .await
        .unwrap();
    assert!(!clone.from_cache && !clone.fell_back, "{clone:?}");
    assert_eq!(clone.objects, 22, "20 blobs, a tree and a commit");
    assert!(clone.bytes > 0, "{clone:?}");

    // One file changes: a blob, a tree and a commit come, nothing else.
    std::fs::write(repo.join("file0.txt"), "changed\n").unwrap();
    git_in(&repo, &["commit", "-q", "-am", "second"]);
    let second = git_in(&repo, &["rev-parse", "HEAD"]);
    let delta = cache
        .checkout(&url, &second, &dest("b"), &GitAuth::default())
        .await
        .unwrap();
    assert_eq!(delta.objects, 3, "{delta:?}");
    assert!(
        delta.bytes > 0 && delta.bytes < clone.bytes,
        "{delta:?} vs {clone:?}"
    );
    assert_eq!(
        std::fs::read_to_string(work.path().join("b/file0.txt")).unwrap(),
        "changed\n"
    );

    // Cached now: nothing fetched at all.
    let again = cache
        .checkout(&url, &second, &dest("c"), &GitAuth::default())
        .await
        .unwrap();
    assert!(again.from_cache, "{again:?}");

    // A commit that is no branch tip any more: git daemon does not serve
    // commits by id, so all branches and tags are fetched, and it is found.
    std::fs::write(repo.join("file1.txt"), "third\n").unwrap();
    git_in(&repo, &["commit", "-q", "-am", "third"]);
    let third = git_in(&repo, &["rev-parse", "HEAD"]);
    std::fs::write(repo.join("file2.txt"), "fourth\n").unwrap();
    git_in(&repo, &["commit", "-q", "-am", "fourth"]);
    let old = cache
        .checkout(&url, &third, &dest("d"), &GitAuth::default())
        .await
        .unwrap();
    assert!(old.fell_back, "{old:?}");
    assert_eq!(
        std::fs::read_to_string(work.path().join("d/file1.txt")).unwrap(),
        "third\n"
    );
}
