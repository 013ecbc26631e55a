//! Task containers cannot gain the host: each test runs a real container
//! that tries an escape (new privileges, capabilities, device nodes, raw
//! sockets, chroot, the Docker socket, host mounts, a fork bomb, a build
//! eating memory, an image widening its GPUs, a workspace filling the
//! disk, the network) and checks that it fails, saying why where the
//! agent is the one who stops it. Where a probe could pass for the wrong
//! reason, a control run without the limit shows that it would succeed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::LogsOptionsBuilder;
use futures::StreamExt;
use node_agent::disk::WorkspaceLimit;
use node_agent::docker::{self, BuildLimits, Confinement, NetworkMode};
use node_agent::executor::{self, Context, Report, StatusReport};
use node_agent::supervisor::Supervisor;
use protocol::{ReportedState, RunTask, TaskNetwork};
use tokio::sync::mpsc;

use crate::support::{self, env_repo, output, repo, spec, statuses, BASE_IMAGE};

/// The capabilities the README documents, with their bit numbers in
/// `/proc/<pid>/status` (linux/capability.h).
const DOCUMENTED_CAPABILITIES: [(&str, u32); 7] = [
    ("CHOWN", 0),
    ("DAC_OVERRIDE", 1),
    ("FOWNER", 3),
    ("FSETID", 4),
    ("KILL", 5),
    ("SETGID", 6),
    ("SETUID", 7),
];

/// An executor context on a fresh work directory, confined as given.
async fn confined(confinement: Confinement) -> (Arc<Context>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::new(support::docker().await, dir.path())
        .unwrap()
        .with_timeout_grace(Duration::from_secs(1))
        .with_confinement(confinement);
    (Arc::new(ctx), dir)
}

/// Runs an attempt to its end and returns every report.
async fn run(ctx: &Arc<Context>, spec: RunTask) -> Vec<Report> {
    let (_canceller, signal) = executor::cancel_pair();
    let (tx, mut rx) = mpsc::channel(256);
    let run = executor::run(spec.clone(), Arc::clone(ctx), tx, signal);
    tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the attempt did not end within 5 minutes");
    let mut reports = Vec::new();
    while let Some(report) = rx.recv().await {
        reports.push(report);
    }
    support::release(ctx, &spec).await;
    reports
}

fn last(reports: &[Report]) -> StatusReport {
    statuses(reports).last().copied().cloned().unwrap()
}

/// Runs `script` to success in a fresh env image and returns its output.
async fn succeeds(ctx: &Arc<Context>, script: &str) -> String {
    let (code, env) = (repo(&[("code.txt", "the code")]), env_repo(""));
    let reports = run(ctx, spec(&code, &env, script)).await;
    support::remove_env_image(ctx, &env).await;
    assert_eq!(
        last(&reports).state,
        ReportedState::Succeeded,
        "{reports:?}"
    );
    output(&reports)
}

/// Runs `script` in `BASE_IMAGE` with Docker's defaults (its own default
/// capabilities, no agent in between) and returns its output: the control
/// that shows a probe can succeed.
async fn with_dockers_defaults(script: &str) -> String {
    support::base_image().await;
    let docker = support::docker().await;
    let body = ContainerCreateBody {
        image: Some(BASE_IMAGE.into()),
        cmd: Some(vec!["sh".into(), "-c".into(), script.into()]),
        host_config: Some(HostConfig::default()),
        ..Default::default()
    };
    let id = docker.create_container(None, body).await.unwrap().id;
    docker::start_container(&docker, &id).await.unwrap();
    docker::wait_exit(&docker, &id).await.unwrap();
    let options = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .build();
    let mut logs = std::pin::pin!(docker.logs(&id, Some(options)));
    let mut text = String::new();
    while let Some(chunk) = logs.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap().into_bytes()));
    }
    docker::remove_container(&docker, &id).await.unwrap();
    text
}

/// The value of `field` in `/proc/self/status` output.
fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .trim()
}

#[tokio::test]
async fn a_task_has_no_new_privileges_and_exactly_the_documented_capabilities() {
    support::base_image().await;
    let (ctx, _work) = confined(Confinement::default()).await;
    let status = succeeds(&ctx, "cat /proc/self/status").await;
    assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{status}");
    let expected: u64 = DOCUMENTED_CAPABILITIES
        .iter()
        .map(|(_, bit)| 1u64 << bit)
        .sum();
    let expected = format!("{expected:016x}");
    assert_eq!(expected, "00000000000000fb");
    for set in ["CapEff", "CapBnd", "CapPrm"] {
        assert_eq!(status_field(&status, set), expected, "{set}: {status}");
    }
    assert_eq!(status_field(&status, "CapAmb"), "0000000000000000");
    let mut documented: Vec<&str> = DOCUMENTED_CAPABILITIES.iter().map(|(n, _)| *n).collect();
    let mut constant = docker::TASK_CAPABILITIES.to_vec();
    documented.sort_unstable();
    constant.sort_unstable();
    assert_eq!(
        constant, documented,
        "the list in the code is the documented one"
    );
}

#[tokio::test]
async fn device_nodes_raw_sockets_and_chroot_are_refused() {
    let probe = "mknod /workspace/mem c 1 1 && echo mknod-worked || echo mknod-refused; \
                 ping -c 1 -W 2 127.0.0.1 >/dev/null 2>&1 && echo ping-worked || echo ping-refused; \
                 chroot / true && echo chroot-worked || echo chroot-refused";
    let control = with_dockers_defaults(&probe.replace("/workspace/mem", "/mem")).await;
    for worked in ["mknod-worked", "ping-worked", "chroot-worked"] {
        assert!(control.contains(worked), "the probe cannot tell: {control}");
    }
    let (ctx, _work) = confined(Confinement::default()).await;
    let seen = succeeds(&ctx, probe).await;
    for refused in ["mknod-refused", "ping-refused", "chroot-refused"] {
        assert!(seen.contains(refused), "{refused}: {seen}");
    }
    assert!(!seen.contains("worked"), "{seen}");
}

/// One line of `/proc/self/mountinfo`: the root of the mount within its
/// filesystem, where it is mounted, and the filesystem's type.
struct Mount {
    root: String,
    point: String,
    fstype: String,
}

fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-").unwrap();
            Mount {
                root: fields[3].to_owned(),
                point: fields[4].to_owned(),
                fstype: fields[dash + 1].to_owned(),
            }
        })
        .collect()
}

#[tokio::test]
async fn no_docker_socket_and_no_host_path_but_the_workspace_is_mounted() {
    support::base_image().await;
    assert!(
        Path::new("/var/run/docker.sock").exists(),
        "this host has a Docker socket a task could be handed"
    );
    let (ctx, _work) = confined(Confinement::default()).await;
    let (code, env) = (repo(&[("code.txt", "the code")]), env_repo(""));
    let task = spec(
        &code,
        &env,
        "for s in /var/run/docker.sock /run/docker.sock; do [ -e $s ] && echo found $s; done; \
         find / -path /proc -prune -o -path /sys -prune -o -name '*.sock' -print 2>/dev/null; \
         echo ===; cat /etc/hostname; echo ===; cat /proc/self/mountinfo; echo ===; cat code.txt",
    );
    let task_id = task.task_id.to_string();
    let reports = run(&ctx, task).await;
    support::remove_env_image(&ctx, &env).await;
    assert_eq!(
        last(&reports).state,
        ReportedState::Succeeded,
        "{reports:?}"
    );
    let text = output(&reports);
    let parts: Vec<&str> = text.split("===\n").collect();
    let [sockets, hostname, mountinfo, code_file] = parts[..] else {
        panic!("{text}")
    };
    assert_eq!(sockets, "", "a socket is reachable: {sockets}");
    assert_eq!(code_file, "the code", "the workspace is the task's code");

    // Kernel filesystems are the container's own; only files of a real
    // filesystem can come from the host, and those are exactly: the
    // image's root, the workspace, and the three files Docker writes for
    // every container in its own directory.
    let hostname = hostname.trim();
    let virtual_fs = [
        "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
    ];
    let mut from_disk = Vec::new();
    for mount in mounts(mountinfo) {
        if virtual_fs.contains(&mount.fstype.as_str()) {
            // A fresh tmpfs, or Docker masking a /proc file with the
            // container's own /dev/null; never a part of a host tmpfs
            // such as /run, where the host's Docker socket lives.
            if mount.fstype == "tmpfs" {
                assert!(
                    mount.root == "/" || mount.root == "/null",
                    "{} comes from a host tmpfs: {}",
                    mount.point,
                    mount.root
                );
            }
            continue;
        }
        match mount.point.as_str() {
            "/" => {}
            "/workspace" => assert!(mount.root.contains(&task_id), "{}", mount.root),
            "/etc/hosts" | "/etc/hostname" | "/etc/resolv.conf" => {
                let file = mount.point.rsplit('/').next().unwrap();
                assert!(
                    mount.root.contains("/containers/")
                        && mount.root.contains(hostname)
                        && mount.root.ends_with(&format!("/{file}")),
                    "{}: {}",
                    mount.point,
                    mount.root
                );
            }
            other => panic!("a host path is mounted at {other}: {}", mount.root),
        }
        from_disk.push(mount.point);
    }
    from_disk.sort();
    assert_eq!(
        from_disk,
        [
            "/",
            "/etc/hostname",
            "/etc/hosts",
            "/etc/resolv.conf",
            "/workspace"
        ]
    );
}

#[tokio::test]
async fn a_fork_bomb_stops_at_the_nodes_process_limit() {
    support::base_image().await;
    let bomb = "i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done; echo started-all";
    let (roomy, _w) = confined(Confinement {
        pids_limit: 64,
        ..Confinement::default()
    })
    .await;
    assert_eq!(succeeds(&roomy, bomb).await, "started-all\n", "the control");

    let (ctx, _work) = confined(Confinement {
        pids_limit: 24,
        ..Confinement::default()
    })
    .await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let reports = run(&ctx, spec(&code, &env, bomb)).await;
    support::remove_env_image(&ctx, &env).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::Failed, "{reports:?}");
    let text = output(&reports);
    assert!(text.contains("can't fork"), "{text}");
    assert!(!text.contains("started-all"), "{text}");
}

#[tokio::test]
async fn a_build_step_past_the_build_memory_limit_fails_the_build_saying_so() {
    support::base_image().await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = Arc::new(
        Context::new(support::docker().await, dir.path())
            .unwrap()
            .with_build_limits(BuildLimits {
                memory_mb: 32,
                cpus: 1.0,
            }),
    );
    let code = repo(&[("a", "a")]);
    // After a moment: containerd does not yet watch the memory of a step
    // in its first moments, and no one hears of a kill then.
    let env = env_repo("RUN sleep 2; x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}");
    let reports = run(&ctx, spec(&code, &env, "true")).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::Failed, "{reports:?}");
    let message = end.message.unwrap();
    assert!(
        message.starts_with(
            "building the image failed: a build step ran out of memory; \
             this node gives image builds 32 MiB (--build-memory-mb):"
        ),
        "{message}"
    );
    assert!(
        message.contains("137"),
        "the step's own failure follows: {message}"
    );
    assert!(!statuses(&reports)
        .iter()
        .any(|s| s.state == ReportedState::Running));
}

#[tokio::test]
async fn build_steps_run_under_the_build_limits_also_past_2_gib() {
    support::base_image().await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = Arc::new(
        Context::new(support::docker().await, dir.path())
            .unwrap()
            .with_build_limits(BuildLimits {
                memory_mb: 4096,
                cpus: 1.5,
            }),
    );
    let env = env_repo(
        "RUN if [ -f /sys/fs/cgroup/memory.max ]; \
         then cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; \
         else cat /sys/fs/cgroup/memory/memory.limit_in_bytes \
         /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us; \
         fi > /build-limits",
    );
    let text = succeeds_in(&ctx, &env, "cat /build-limits").await;
    let limits: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(limits, ["4294967296", "150000", "100000"], "{text}");
}

/// Like [`succeeds`], in the image of `env`.
async fn succeeds_in(ctx: &Arc<Context>, env: &support::Repo, script: &str) -> String {
    let code = repo(&[("a", "a")]);
    let reports = run(ctx, spec(&code, env, script)).await;
    support::remove_env_image(ctx, env).await;
    assert_eq!(
        last(&reports).state,
        ReportedState::Succeeded,
        "{reports:?}"
    );
    output(&reports)
}

#[tokio::test]
async fn an_image_that_shows_every_gpu_still_sees_none_unless_assigned() {
    support::base_image().await;
    let (ctx, _work) = confined(Confinement::default()).await;
    let env = env_repo("ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=all");
    let seen = succeeds_in(&ctx, &env, "echo \"$NVIDIA_VISIBLE_DEVICES\"").await;
    assert_eq!(seen, "void\n");
}

#[tokio::test]
async fn a_task_setting_gpu_visibility_itself_is_refused_by_the_agent() {
    support::base_image().await;
    let (ctx, _work) = confined(Confinement::default()).await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    for name in [
        "NVIDIA_VISIBLE_DEVICES",
        "cuda_visible_devices",
        "NVIDIA_DRIVER_CAPABILITIES",
    ] {
        let mut task = spec(&code, &env, "echo ran");
        task.env.insert(name.into(), "all".into());
        let reports = run(&ctx, task).await;
        let end = last(&reports);
        assert_eq!(end.state, ReportedState::Failed, "{reports:?}");
        let message = end.message.unwrap();
        assert!(message.starts_with(&format!("env.{name}: ")), "{message}");
        assert_eq!(output(&reports), "", "the command never ran");
    }
    support::remove_env_image(&ctx, &env).await;
}

/// A node whose workspaces may hold 5 MiB, measured every second.
fn small_workspaces() -> Confinement {
    Confinement {
        workspace: WorkspaceLimit {
            limit_mb: 5,
            interval: Duration::from_secs(1),
        },
        ..Confinement::default()
    }
}

#[tokio::test]
async fn a_task_writing_past_its_workspace_limit_fails_and_the_node_runs_the_next() {
    support::base_image().await;
    let (ctx, _work) = confined(small_workspaces()).await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut task = spec(
        &code,
        &env,
        "dd if=/dev/zero of=/workspace/big bs=1M count=20 2>/dev/null; echo written; sleep 300",
    );
    task.timeout_s = Some(240);
    let reports = run(&ctx, task).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::Failed, "{reports:?}");
    let message = end.message.unwrap();
    assert!(
        message.starts_with("the task's workspace grew past its limit of 5 MiB ("),
        "{message}"
    );
    assert!(message.contains("MiB used"), "{message}");
    assert_eq!(output(&reports), "written\n");

    // Links to the whole host do not count: they are never followed.
    let next = succeeds_in(
        &ctx,
        &env,
        "ln -s / /workspace/host; ln -s /workspace /workspace/loop; mkdir -p d; ln -s /etc d/etc; \
         dd if=/dev/zero of=/workspace/small bs=1M count=2 2>/dev/null; sleep 3; echo fine",
    )
    .await;
    assert_eq!(next, "fine\n");
}

#[tokio::test]
async fn what_a_task_writes_outside_its_workspace_counts_where_docker_cannot_limit_it() {
    support::base_image().await;
    let (ctx, _work) = confined(small_workspaces()).await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut task = spec(
        &code,
        &env,
        "dd if=/dev/zero of=/big bs=1M count=20 2>&1 | grep -o 'No space left on device'; \
         echo written; sleep 300",
    );
    task.timeout_s = Some(60);
    let reports = run(&ctx, task).await;
    support::remove_env_image(&ctx, &env).await;
    let end = last(&reports);
    match ctx.layer_quota() {
        Some(false) => {
            assert_eq!(end.state, ReportedState::Failed, "{reports:?}");
            let message = end.message.unwrap();
            assert!(
                message.starts_with("the task's workspace grew past its limit of 5 MiB ("),
                "{message}"
            );
            assert!(
                message.contains("in the container's own files"),
                "{message}"
            );
        }
        Some(true) => {
            // The storage driver stops the write itself.
            assert!(
                output(&reports).starts_with("No space left on device"),
                "{reports:?}"
            );
        }
        None => panic!("the container was never created: {reports:?}"),
    }
}

#[tokio::test]
async fn an_adopted_container_is_still_held_to_the_workspace_limit() {
    support::base_image().await;
    let (ctx, work) = confined(Confinement::default()).await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut task = spec(
        &code,
        &env,
        "sleep 4; dd if=/dev/zero of=/workspace/big bs=1M count=20 2>/dev/null; sleep 300",
    );
    task.timeout_s = Some(600);
    let (_canceller, signal) = executor::cancel_pair();
    let (tx, mut rx) = mpsc::channel(64);
    let handle = tokio::spawn(executor::run(task.clone(), Arc::clone(&ctx), tx, signal));
    loop {
        let report = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("the container never ran")
            .expect("reports ended before the container ran");
        if matches!(&report, Report::Status(s) if s.state == ReportedState::Running) {
            break;
        }
    }
    // The agent dies; a new one with a small workspace limit takes over.
    handle.abort();
    let again = Arc::new(
        Context::new(support::docker().await, work.path())
            .unwrap()
            .with_timeout_grace(Duration::from_secs(1))
            .with_confinement(small_workspaces()),
    );
    let (tx, mut rx) = mpsc::channel(256);
    let supervisor = Supervisor::new(Arc::clone(&again), tx);
    supervisor.adopt_leftovers().await;
    let mut seen = Vec::new();
    let end = loop {
        let report = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("the adopted attempt did not end: {seen:?}"))
            .unwrap();
        seen.push(report.clone());
        if let Report::Status(s) = report {
            if s.is_final() {
                break s;
            }
        }
    };
    assert_eq!(end.task_id, task.task_id);
    assert_eq!(end.state, ReportedState::Failed, "{seen:?}");
    let message = end.message.unwrap();
    assert!(
        message.starts_with("the task's workspace grew past its limit of 5 MiB ("),
        "{message}"
    );
    support::release(&again, &task).await;
    support::remove_env_image(&again, &env).await;
}

/// The interfaces in `/proc/net/dev` output.
fn interfaces(dev: &str) -> Vec<String> {
    let mut names: Vec<String> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_task_asking_for_no_network_or_on_a_node_without_has_only_loopback() {
    support::base_image().await;
    let (bridged, _w) = confined(Confinement::default()).await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let probe = "cat /proc/net/dev";
    let run_probe = |ctx: Arc<Context>, network: TaskNetwork| {
        let mut task = spec(&code, &env, probe);
        task.network = network;
        async move {
            let reports = run(&ctx, task).await;
            assert_eq!(
                last(&reports).state,
                ReportedState::Succeeded,
                "{reports:?}"
            );
            interfaces(&output(&reports))
        }
    };
    let control = run_probe(Arc::clone(&bridged), TaskNetwork::Node).await;
    assert!(
        control.len() > 1 && control.contains(&"lo".to_owned()),
        "{control:?}"
    );
    assert_eq!(
        run_probe(Arc::clone(&bridged), TaskNetwork::None).await,
        ["lo"]
    );

    let (offline, _w) = confined(Confinement {
        network: NetworkMode::None,
        ..Confinement::default()
    })
    .await;
    assert_eq!(
        run_probe(Arc::clone(&offline), TaskNetwork::Node).await,
        ["lo"]
    );
    support::remove_env_image(&bridged, &env).await;
}

#[tokio::test]
async fn the_container_is_created_with_the_nodes_confinement() {
    support::base_image().await;
    let (ctx, _work) = confined(Confinement {
        pids_limit: 99,
        network: NetworkMode::None,
        ..Confinement::default()
    })
    .await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let (canceller, signal) = executor::cancel_pair();
    let (tx, mut rx) = mpsc::channel(64);
    let task = spec(&code, &env, "sleep 300");
    let handle = tokio::spawn(executor::run(task.clone(), Arc::clone(&ctx), tx, signal));
    let id = loop {
        let report = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("the container never ran")
            .unwrap();
        if let Report::Status(StatusReport {
            state: ReportedState::Running,
            container: Some(id),
            ..
        }) = report
        {
            break id;
        }
    };
    let inspected = ctx.docker().inspect_container(&id, None).await.unwrap();
    canceller.cancel(Duration::from_secs(0));
    handle.await.unwrap();
    support::release(&ctx, &task).await;
    let host = inspected.host_config.unwrap();
    assert_eq!(host.pids_limit, Some(99));
    assert_eq!(host.privileged, Some(false));
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    assert_eq!(host.security_opt.unwrap(), ["no-new-privileges:true"]);
    assert_eq!(host.cap_drop.unwrap(), ["ALL"]);
    let binds = host.binds.unwrap();
    assert_eq!(binds.len(), 1, "{binds:?}");
    assert!(binds[0].ends_with("/code:/workspace:rw"), "{binds:?}");
    assert!(host.devices.unwrap_or_default().is_empty());
    let vars: HashMap<String, String> = inspected
        .config
        .unwrap()
        .env
        .unwrap()
        .iter()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(vars["NVIDIA_VISIBLE_DEVICES"], "void");
    support::remove_env_image(&ctx, &env).await;
}
