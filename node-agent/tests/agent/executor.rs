//! The executor against real Docker and real git repositories.

use std::sync::Arc;
use std::time::{Duration, Instant};

use node_agent::executor::{self, CancelSignal, Canceller, Context, Report, StatusReport};
use protocol::{ReportedState, RunTask};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::support::{self, context, env_repo, output, repo, run_kept, spec, statuses, tag_of};

/// Runs an attempt to its end, releases what it left, and returns every
/// report.
async fn run(ctx: &Arc<Context>, spec: RunTask) -> Vec<Report> {
    let reports = run_kept(ctx, spec.clone()).await;
    support::release(ctx, &spec).await;
    reports
}

/// A started attempt whose reports the test reads as they come.
struct Started {
    canceller: Canceller,
    rx: mpsc::Receiver<Report>,
    seen: Vec<Report>,
    handle: JoinHandle<()>,
}

fn start(ctx: &Arc<Context>, spec: RunTask) -> Started {
    let (canceller, signal): (Canceller, CancelSignal) = executor::cancel_pair();
    let (tx, rx) = mpsc::channel(64);
    let handle = tokio::spawn(executor::run(spec, Arc::clone(ctx), tx, signal));
    Started {
        canceller,
        rx,
        seen: Vec::new(),
        handle,
    }
}

impl Started {
    /// Reads reports until one in `state`; returns it.
    async fn until(&mut self, state: ReportedState, within: Duration) -> StatusReport {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let report = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no {state:?} within {within:?}: {:?}", self.seen))
                .unwrap_or_else(|| panic!("ended without {state:?}: {:?}", self.seen));
            self.seen.push(report.clone());
            if let Report::Status(s) = report {
                if s.state == state {
                    return s;
                }
            }
        }
    }
}

fn states(reports: &[Report]) -> Vec<(ReportedState, Option<String>)> {
    statuses(reports)
        .iter()
        .map(|s| (s.state, s.stage.clone()))
        .collect()
}

/// The preparing stages among `reports` that are one of `names`, in the
/// order they were reported.
fn stages_among<'a>(reports: &'a [Report], names: &[&str]) -> Vec<&'a str> {
    statuses(reports)
        .into_iter()
        .filter(|s| s.state == ReportedState::Preparing)
        .filter_map(|s| s.stage.as_deref())
        .filter(|stage| names.contains(stage))
        .collect()
}

fn last(reports: &[Report]) -> &StatusReport {
    statuses(reports).last().copied().unwrap()
}

async fn assert_container_gone(ctx: &Context, id: &str) {
    let err = ctx.docker().inspect_container(id, None).await.unwrap_err();
    assert!(
        matches!(
            err,
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                ..
            }
        ),
        "container {id} still exists: {err}"
    );
}

#[tokio::test]
async fn a_task_knows_which_task_and_attempt_it_is_whatever_its_env_says() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut task = spec(
        &code,
        &env,
        "echo \"$UNIDESK_TASK_ID $UNIDESK_ATTEMPT $KEPT\"",
    );
    task.attempt = 3;
    // What a server that did not refuse them could pass on.
    task.env.insert("UNIDESK_ATTEMPT".into(), "99".into());
    task.env
        .insert("UNIDESK_TASK_ID".into(), "someone-else".into());
    task.env.insert("KEPT".into(), "kept".into());
    let reports = run(&ctx, task.clone()).await;
    assert_eq!(
        last(&reports).state,
        ReportedState::Succeeded,
        "{reports:?}"
    );
    assert_eq!(output(&reports), format!("{} 3 kept\n", task.task_id));
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn a_task_that_prints_and_exits_0_succeeds_with_its_output_in_order() {
    support::base_image().await;
    let (ctx, work) = context().await;
    let code = repo(&[("hello.txt", "from the code repo\n")]);
    let env = env_repo("RUN echo built-into-image > /built.txt");
    let mut spec = spec(
        &code,
        &env,
        "cat /workspace/hello.txt; echo out; echo err >&2; cat /built.txt; echo \"$GREETING\"",
    );
    spec.env.insert("GREETING".into(), "hi there".into());
    let reports = run_kept(&ctx, spec.clone()).await;

    // The code and the image are prepared side by side: each side's stages
    // come in order, all of them between accepted and running.
    let seen = states(&reports);
    assert_eq!(seen.first(), Some(&(ReportedState::Accepted, None)));
    assert_eq!(
        seen[seen.len() - 2..],
        [
            (ReportedState::Running, None),
            (ReportedState::Succeeded, None)
        ]
    );
    assert!(seen[1..seen.len() - 2]
        .iter()
        .all(|(s, _)| *s == ReportedState::Preparing));
    assert_eq!(
        stages_among(
            &reports,
            &[executor::STAGE_CODE, executor::STAGE_CODE_READY]
        ),
        [executor::STAGE_CODE, executor::STAGE_CODE_READY]
    );
    let image_stages = [
        executor::STAGE_ENV,
        executor::STAGE_ENV_READY,
        executor::STAGE_IMAGE,
        executor::STAGE_IMAGE_READY,
    ];
    assert_eq!(stages_among(&reports, &image_stages), image_stages);
    assert_eq!(seen.len(), 9, "{seen:?}");
    let details = |reports: &[Report]| -> Vec<(String, String)> {
        statuses(reports)
            .iter()
            .filter(|s| s.state == ReportedState::Preparing)
            .filter_map(|s| Some((s.stage.clone()?, s.message.clone()?)))
            .collect()
    };
    let detail = |found: &[(String, String)], stage: &str| -> String {
        found
            .iter()
            .find(|(s, _)| s == stage)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("no detail for {stage}: {found:?}"))
    };
    let first = details(&reports);
    assert_eq!(first.len(), 3, "{first:?}");
    let code_ready = detail(&first, executor::STAGE_CODE_READY);
    assert!(
        code_ready.starts_with(&format!("commit {}: fetched ", &code.commit[..12])),
        "{first:?}"
    );
    assert!(
        detail(&first, executor::STAGE_ENV_READY).contains(": fetched "),
        "{first:?}"
    );
    assert!(
        detail(&first, executor::STAGE_IMAGE_READY).contains(" built in "),
        "{first:?}"
    );
    let running = statuses(&reports)[seen.len() - 2];
    let container = running.container.clone().unwrap();
    // Docker copies stdout and stderr through separate pipes: each stream
    // keeps its order, but not their interleaving.
    let text = output(&reports);
    let stdout: Vec<&str> = text.lines().filter(|l| *l != "err").collect();
    assert_eq!(
        stdout,
        vec!["from the code repo", "out", "built-into-image", "hi there"]
    );
    assert_eq!(text.lines().filter(|l| *l == "err").count(), 1, "{text:?}");
    assert!(
        matches!(reports.last(), Some(Report::Status(s)) if s.state == ReportedState::Succeeded),
        "all output comes before the final state"
    );
    // Until the server has the end, the stopped container keeps Docker's
    // record of it, and the directory stays.
    let kept = ctx
        .docker()
        .inspect_container(&container, None)
        .await
        .unwrap()
        .state
        .unwrap();
    assert_eq!((kept.running, kept.exit_code), (Some(false), Some(0)));
    let tasks = work.path().join("tasks");
    assert_eq!(std::fs::read_dir(&tasks).unwrap().count(), 1);
    executor::release(&ctx, spec.task_id, spec.attempt)
        .await
        .unwrap();
    assert_container_gone(&ctx, &container).await;
    assert_eq!(
        std::fs::read_dir(tasks).unwrap().count(),
        0,
        "workspace removed"
    );
    executor::release(&ctx, spec.task_id, spec.attempt)
        .await
        .expect("releasing twice is fine");
    // The same task again: code and image come from the node's caches.
    let mut again = spec.clone();
    again.attempt += 1;
    let reports = run(&ctx, again).await;
    assert_eq!(last(&reports).state, ReportedState::Succeeded);
    let mut second = details(&reports);
    second.sort();
    let mut expected = vec![
        (
            executor::STAGE_CODE_READY.to_owned(),
            format!("commit {}: from cache", &code.commit[..12]),
        ),
        (
            executor::STAGE_ENV_READY.to_owned(),
            format!(
                "commit {}: image cached; env not checked out",
                &env.commit[..12]
            ),
        ),
        (
            executor::STAGE_IMAGE_READY.to_owned(),
            format!("{} cached", tag_of(&spec)),
        ),
    ];
    expected.sort();
    assert_eq!(second, expected);
    assert!(
        stages_among(&reports, &[executor::STAGE_ENV, executor::STAGE_IMAGE]).is_empty(),
        "nothing is fetched or built for a cached image: {:?}",
        states(&reports)
    );
    support::remove_image(ctx.docker(), &tag_of(&spec)).await;
}

#[tokio::test]
async fn a_non_zero_exit_fails_with_its_status() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let reports = run(&ctx, spec(&code, &env, "echo bye; exit 3")).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::Failed);
    assert_eq!(end.exit_code, Some(3));
    assert_eq!(end.message.as_deref(), Some("exited with status 3"));
    assert_eq!(output(&reports), "bye\n");
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn a_commit_that_does_not_exist_fails_with_a_clear_message() {
    let (ctx, _work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut spec = spec(&code, &env, "true");
    spec.code_commit_id = "0123456789abcdef0123456789abcdef01234567".into();
    let reports = run(&ctx, spec).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::Failed);
    assert_eq!(
        end.message.as_deref(),
        Some(&*format!(
            "code commit 0123456789abcdef0123456789abcdef01234567 not found in {}",
            code.url
        ))
    );
    assert!(!states(&reports)
        .iter()
        .any(|(s, _)| *s == ReportedState::Running));
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn a_missing_dockerfile_fails_naming_the_path_and_commit() {
    let (ctx, _work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut spec = spec(&code, &env, "true");
    spec.dockerfile_path = "gpu/Dockerfile".into();
    let reports = run(&ctx, spec).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::Failed);
    assert_eq!(
        end.message.as_deref(),
        Some(&*format!(
            "Dockerfile gpu/Dockerfile not found in env repository at {}",
            env.commit
        ))
    );
}

#[tokio::test]
async fn a_failing_build_reports_the_last_lines_of_its_output() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let code = repo(&[("a", "a")]);
    let env = env_repo("RUN echo preparing-the-thing && echo the-build-broke >&2 && exit 7");
    let reports = run(&ctx, spec(&code, &env, "true")).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::Failed);
    let message = end.message.clone().unwrap();
    assert!(
        message.starts_with("building the image failed:"),
        "{message}"
    );
    assert!(message.contains("the-build-broke"), "{message}");
    assert!(message.contains('7'), "{message}");
    assert!(message.lines().count() <= 21, "{message}");
}

#[tokio::test]
async fn the_image_is_built_once_and_then_reused() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let code = repo(&[("a", "a")]);
    let env = env_repo("RUN echo layer > /layer.txt");
    let first = spec(&code, &env, "cat /layer.txt");
    let reports = run(&ctx, first.clone()).await;
    assert_eq!(last(&reports).state, ReportedState::Succeeded);
    assert_eq!(ctx.images_built(), 1);
    let reports = run(&ctx, spec(&code, &env, "cat /layer.txt")).await;
    assert_eq!(last(&reports).state, ReportedState::Succeeded);
    assert_eq!(output(&reports), "layer\n");
    assert_eq!(ctx.images_built(), 1, "the second attempt built nothing");
    let cache = ctx.cache().await;
    assert!(cache.images.contains(&tag_of(&first)), "{cache:?}");
    assert!(cache.commits.contains(&code.commit), "{cache:?}");
    support::remove_image(ctx.docker(), &tag_of(&first)).await;
}

#[tokio::test]
async fn attempts_on_the_same_repositories_run_side_by_side() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let (code, env) = (repo(&[("n", "shared\n")]), env_repo(""));
    let runs = (0..3).map(|_| run(&ctx, spec(&code, &env, "cat /workspace/n")));
    for reports in futures::future::join_all(runs).await {
        assert_eq!(
            last(&reports).state,
            ReportedState::Succeeded,
            "{reports:?}"
        );
        assert_eq!(output(&reports), "shared\n");
    }
    support::remove_env_image(&ctx, &env).await;
}

/// Output read more slowly than the container wrote it (behind a slow
/// server, on a busy node) is all reported, and the end only after it:
/// the end does not wait a fixed time for the output and leave the rest to
/// be cut off when the container is removed.
#[tokio::test]
async fn output_read_slowly_is_all_reported_before_the_end() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    // 8 MB of 64-byte lines, then a last one: over a hundred chunks, far
    // more than the reports channel holds, so the output is read at the
    // pace this test takes the reports.
    let line = "0123456789".repeat(6) + "abc";
    let script = format!("yes {line} | head -n 125000; echo LAST-LINE");
    let mut attempt = start(&ctx, spec(&code, &env, &script));
    attempt
        .until(ReportedState::Running, Duration::from_secs(120))
        .await;
    let reading = Instant::now();
    let end = loop {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let report = tokio::time::timeout(Duration::from_secs(60), attempt.rx.recv())
            .await
            .expect("a report within a minute")
            .expect("the attempt ended without a final state");
        attempt.seen.push(report.clone());
        if let Report::Status(s) = report {
            if s.state != ReportedState::Running {
                break s;
            }
        }
    };
    // The reader lagged the container's exit by far more than the ten
    // seconds the end used to wait for it.
    let took = reading.elapsed();
    assert!(took > Duration::from_secs(15), "read in {took:?}");
    assert_eq!(end.state, ReportedState::Succeeded, "{end:?}");
    attempt.handle.await.unwrap();
    if let Ok(late) = attempt.rx.try_recv() {
        let what = match late {
            Report::Log(log) => format!("output at offset {}", log.offset),
            Report::Status(s) => format!("{:?}", s.state),
        };
        panic!("a report after the end: {what}");
    }
    let text = output(&attempt.seen);
    assert!(!text.contains("[unidesk:"), "{}", &text[text.len() - 300..]);
    assert!(text.ends_with(&format!("{line}\nLAST-LINE\n")));
    assert_eq!(text.lines().filter(|l| *l == line).count(), 125_000);
    executor::release(&ctx, end.task_id, end.attempt)
        .await
        .unwrap();
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn output_docker_rotated_away_before_it_was_read_leaves_whole_lines_to_the_last() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let ctx = Arc::new(
        Arc::into_inner(ctx)
            .unwrap()
            .with_container_log_bytes(1024 * 1024),
    );
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    // 16 MB in 64-byte lines, then a last one; Docker keeps the newest
    // 2 MiB of it, and the agent's reading is held back (the reports are
    // not taken) until the container has exited, so far more than that
    // waits to be read when it does.
    let line = "0123456789".repeat(6) + "abc";
    let script = format!("yes {line} | head -n 250000; echo LAST-LINE");
    let mut attempt = start(&ctx, spec(&code, &env, &script));
    let running = attempt
        .until(ReportedState::Running, Duration::from_secs(120))
        .await;
    let id = running.container.unwrap();
    support::eventually("the container's exit", Duration::from_secs(120), || async {
        let state = ctx
            .docker()
            .inspect_container(&id, None)
            .await
            .ok()?
            .state?;
        (state.running == Some(false)).then_some(())
    })
    .await;
    let end = attempt
        .until(ReportedState::Succeeded, Duration::from_secs(120))
        .await;
    attempt.handle.await.unwrap();
    assert!(attempt.rx.try_recv().is_err(), "nothing after the end");
    // Docker's follow under rotation skips the rest of a file, and may
    // read the next one twice: which of it the agent can name depends on
    // when the follow saw each rotation (unit tests in `output` hold the
    // rule). What holds every time: output without gaps in its offsets,
    // made of whole lines, at most one marker, the last line there, and
    // fewer lines than printed, so nothing hung on the lost middle.
    let text = output(&attempt.seen);
    assert!(
        !text.contains("[unidesk: the rest"),
        "{}",
        &text[text.len() - 300..]
    );
    assert!(text.matches(executor::ROTATED_MARKER).count() <= 1);
    let unmarked = text.replace(executor::ROTATED_MARKER, "\n");
    let odd: Vec<&str> = unmarked
        .lines()
        .filter(|l| *l != line && *l != "LAST-LINE" && !l.is_empty())
        .take(3)
        .collect();
    assert!(odd.is_empty(), "lines no one printed: {odd:?}");
    assert!(text.lines().any(|l| l == "LAST-LINE"));
    let lines = text.lines().filter(|l| *l == line).count();
    assert!(
        lines < 250_000,
        "all {lines} lines were read: nothing was missing"
    );
    executor::release(&ctx, end.task_id, end.attempt)
        .await
        .unwrap();
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn cancelling_a_running_task_stops_it_within_seconds() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut attempt = start(&ctx, spec(&code, &env, "sleep 300"));
    let running = attempt
        .until(ReportedState::Running, Duration::from_secs(120))
        .await;
    let asked = Instant::now();
    attempt.canceller.cancel(Duration::from_secs(1));
    let end = attempt
        .until(ReportedState::Cancelled, Duration::from_secs(15))
        .await;
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(end.exit_code, None);
    attempt.handle.await.unwrap();
    let id = running.container.unwrap();
    let stopped = ctx.docker().inspect_container(&id, None).await.unwrap();
    assert_eq!(stopped.state.unwrap().running, Some(false));
    executor::release(&ctx, end.task_id, end.attempt)
        .await
        .unwrap();
    assert_container_gone(&ctx, &id).await;
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn a_task_past_its_time_limit_times_out_and_is_removed() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut spec = spec(&code, &env, "echo started; sleep 300");
    spec.timeout_s = Some(2);
    let reports = run(&ctx, spec).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::TimedOut);
    assert_eq!(output(&reports), "started\n");
    let running = statuses(&reports)
        .into_iter()
        .find(|s| s.state == ReportedState::Running)
        .unwrap();
    assert_container_gone(&ctx, running.container.as_deref().unwrap()).await;
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn the_container_has_the_limits_labels_and_workspace_mount() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let spec = spec(&code, &env, "sleep 300");
    let mut attempt = start(&ctx, spec.clone());
    let running = attempt
        .until(ReportedState::Running, Duration::from_secs(120))
        .await;
    let id = running.container.unwrap();
    let inspected = ctx.docker().inspect_container(&id, None).await.unwrap();
    attempt.canceller.cancel(Duration::from_secs(0));
    let host = inspected.host_config.unwrap();
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.memory, Some(64 * 1024 * 1024));
    assert_eq!(host.memory_swap, Some(64 * 1024 * 1024));
    assert_eq!(host.pids_limit, Some(node_agent::docker::PIDS_LIMIT));
    let bind = &host.binds.unwrap()[0];
    assert!(bind.ends_with("/code:/workspace:rw"), "{bind}");
    let config = inspected.config.unwrap();
    let labels = config.labels.unwrap();
    assert_eq!(labels["unidesk.task_id"], spec.task_id.to_string());
    assert_eq!(labels["unidesk.attempt"], "1");
    assert_eq!(labels["unidesk.agent"], ctx.agent_label());
    assert_eq!(config.working_dir.as_deref(), Some("/workspace"));
    attempt
        .until(ReportedState::Cancelled, Duration::from_secs(15))
        .await;
    attempt.handle.await.unwrap();
    support::release(&ctx, &spec).await;
    assert_container_gone(&ctx, &id).await;
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn a_command_that_cannot_start_fails_with_dockers_message() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut spec = spec(&code, &env, "");
    spec.command = vec!["/no/such/program".into()];
    let reports = run(&ctx, spec).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::Failed);
    let message = end.message.clone().unwrap();
    assert!(
        message.starts_with("starting the container failed:"),
        "{message}"
    );
    assert!(message.contains("/no/such/program"), "{message}");
    assert!(
        !end.node_fault,
        "Docker refused the task's command: {end:?}"
    );
    support::remove_env_image(&ctx, &env).await;
}

/// A script that runs past 16 MiB, after the moment containerd needs to
/// watch a new container's memory. Docker reports a kill before that as
/// no more than a SIGKILL, and the failure then says so.
const EAT_AFTER_A_MOMENT: &str =
    "sleep 2; x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}";

#[tokio::test]
async fn running_out_of_memory_is_named_in_the_failure() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut spec = spec(&code, &env, EAT_AFTER_A_MOMENT);
    spec.memory_mb = 16;
    let reports = run(&ctx, spec).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::Failed, "{reports:?}");
    assert_eq!(
        end.message.as_deref(),
        Some("killed: out of memory (limit 16 MiB)")
    );
    assert!(!end.node_fault);
    support::remove_env_image(&ctx, &env).await;
}

/// Runs `script` in [`support::BASE_IMAGE`] under `memory_mb` MiB (no
/// swap) with no agent around it, and returns how
/// [`node_agent::docker::wait_exit`] says it ended.
async fn plain_exit(memory_mb: i64, script: &str) -> node_agent::docker::Exit {
    use bollard::models::{ContainerCreateBody, HostConfig};
    let docker = support::docker().await;
    let body = ContainerCreateBody {
        image: Some(support::BASE_IMAGE.into()),
        cmd: Some(vec!["sh".into(), "-c".into(), script.into()]),
        host_config: Some(HostConfig {
            memory: Some(memory_mb * 1024 * 1024),
            memory_swap: Some(memory_mb * 1024 * 1024),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = docker.create_container(None, body).await.unwrap().id;
    node_agent::docker::start_container(&docker, &id)
        .await
        .unwrap();
    let exit = node_agent::docker::wait_exit(&docker, &id).await.unwrap();
    node_agent::docker::remove_container(&docker, &id)
        .await
        .unwrap();
    exit
}

#[tokio::test]
async fn every_container_the_kernel_kills_for_memory_is_said_to_be_even_when_docker_hears_it_late()
{
    // Docker may record such a container's exit before the kernel's word
    // that it killed it, and then its `OOMKilled` stays false: on a loaded
    // machine one in sixteen of these did. Many at once make that likely.
    support::base_image().await;
    let exits = (0..12).map(|_| plain_exit(16, EAT_AFTER_A_MOMENT));
    let exits = futures::future::join_all(exits).await;
    for exit in &exits {
        assert_eq!(exit.code, 137, "{exits:?}");
    }
    let named = exits.iter().filter(|e| e.oom_killed).count();
    assert_eq!(named, exits.len(), "{exits:?}");
}

#[tokio::test]
async fn a_process_killed_by_anything_but_the_memory_limit_is_not_said_to_be_out_of_memory() {
    // A process ends with status 137 after a SIGKILL from anyone; the
    // shell passes on its child's.
    support::base_image().await;
    let exit = plain_exit(64, "sleep 60 & kill -9 $!; wait $!").await;
    assert_eq!(
        exit,
        node_agent::docker::Exit {
            code: 137,
            oom_killed: false,
            amid_outage: false,
        }
    );
}

/// An executor context on a fresh work directory whose Docker is reached
/// through a [`support::DockerLink`] the test can cut.
async fn linked_context() -> (support::DockerLink, Arc<Context>, tempfile::TempDir) {
    let link = support::DockerLink::start();
    let work = tempfile::tempdir().unwrap();
    let docker = node_agent::docker::connect(Some(link.host()))
        .await
        .unwrap();
    let ctx = Arc::new(Context::new(docker, work.path()).unwrap());
    (link, ctx, work)
}

#[tokio::test]
async fn an_agent_that_starts_before_docker_answers_waits_for_it() {
    let link = support::DockerLink::start();
    link.cut();
    let connecting = tokio::spawn({
        let host = link.host().to_owned();
        async move { node_agent::docker::connect(Some(&host)).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!connecting.is_finished(), "it gave up at once");
    link.mend();
    let docker = tokio::time::timeout(Duration::from_secs(30), connecting)
        .await
        .expect("it connects once Docker answers")
        .unwrap()
        .expect("a client");
    docker.ping().await.unwrap();
}

#[tokio::test]
async fn a_task_lives_through_docker_not_answering_for_a_while_and_its_output_is_whole() {
    support::base_image().await;
    let (link, ctx, _work) = linked_context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let task = spec(
        &code,
        &env,
        "for i in $(seq 1 14); do echo line $i; sleep 0.5; done",
    );
    let mut attempt = start(&ctx, task.clone());
    attempt
        .until(ReportedState::Running, Duration::from_secs(120))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Every connection to Docker drops, and none gets through for 3 s: the
    // follow of the output and the wait for the exit break off mid-run.
    link.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    link.mend();
    attempt
        .until(ReportedState::Succeeded, Duration::from_secs(60))
        .await;
    attempt.handle.await.unwrap();
    while let Ok(report) = attempt.rx.try_recv() {
        attempt.seen.push(report);
    }
    let expected: String = (1..=14).map(|i| format!("line {i}\n")).collect();
    assert_eq!(output(&attempt.seen), expected);
    support::release(&ctx, &task).await;
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn an_attempt_docker_does_not_answer_for_fails_as_the_nodes_fault() {
    support::base_image().await;
    let (link, ctx, _work) = linked_context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let task = spec(&code, &env, "true");
    link.cut();
    let reports = run_kept(&ctx, task.clone()).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::Failed, "{reports:?}");
    assert!(end.node_fault, "{end:?}");
    let message = end.message.clone().unwrap();
    assert!(message.contains("Docker did not answer"), "{message}");
    link.mend();
    support::release(&ctx, &task).await;
}

#[tokio::test]
async fn a_container_docker_stops_while_it_does_not_answer_is_the_nodes_failure_not_the_tasks() {
    stopped_by_a_docker_restart(DockerGoes::BeforeTheStop).await;
}

#[tokio::test]
async fn a_container_docker_stops_as_it_shuts_its_api_is_the_nodes_failure_not_the_tasks() {
    stopped_by_a_docker_restart(DockerGoes::AsTheWaitIsAnswered).await;
}

/// When a Docker restarting stops the agent's answers, relative to its
/// stop of the task's container.
enum DockerGoes {
    /// The daemon died: every connection is cut, then its containers are
    /// stopped when it comes back.
    BeforeTheStop,
    /// The daemon shuts its API, answers the requests it still holds (the
    /// agent's wait for the container's end among them) as it stops its
    /// containers, and answers nothing after.
    AsTheWaitIsAnswered,
}

/// What a daemon restarted without `live-restore` does to a running task:
/// its API goes away, it stops its containers (SIGTERM, then SIGKILL) and
/// it answers again once it is back. The attempt fails as the node's
/// fault, with its output whole.
async fn stopped_by_a_docker_restart(goes: DockerGoes) {
    support::base_image().await;
    let (link, ctx, _work) = linked_context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let task = spec(
        &code,
        &env,
        "trap 'echo stopped by docker; exit 143' TERM; echo working; \
         while true; do sleep 0.2; done",
    );
    let mut attempt = start(&ctx, task.clone());
    let running = attempt
        .until(ReportedState::Running, Duration::from_secs(120))
        .await;
    let id = running.container.clone().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    match goes {
        DockerGoes::BeforeTheStop => link.cut(),
        DockerGoes::AsTheWaitIsAnswered => link.cut_after(b"\"StatusCode\""),
    }
    let docker = support::docker().await;
    docker
        .stop_container(
            &id,
            Some(
                bollard::query_parameters::StopContainerOptionsBuilder::default()
                    .t(5)
                    .build(),
            ),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    link.mend();
    let end = attempt
        .until(ReportedState::Failed, Duration::from_secs(60))
        .await;
    attempt.handle.await.unwrap();
    while let Ok(report) = attempt.rx.try_recv() {
        attempt.seen.push(report);
    }
    assert!(end.node_fault, "{end:?}");
    assert_eq!(end.exit_code, Some(143), "{end:?}");
    assert_eq!(
        end.message.as_deref(),
        Some(
            "ended with exit status 143 while Docker was not answering (a Docker restart stops \
             its containers)"
        )
    );
    // The output up to its end is whole, the last words included.
    assert_eq!(output(&attempt.seen), "working\nstopped by docker\n");
    support::release(&ctx, &task).await;
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn a_task_that_fails_after_docker_answers_again_fails_as_its_own() {
    // An outage long over says nothing of a later end: the container ends
    // seconds after the agent saw it running again, however loaded the
    // machine.
    support::base_image().await;
    let (link, ctx, _work) = linked_context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let task = spec(&code, &env, "sleep 8; echo giving up; exit 3");
    let mut attempt = start(&ctx, task.clone());
    attempt
        .until(ReportedState::Running, Duration::from_secs(120))
        .await;
    link.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    link.mend();
    let end = attempt
        .until(ReportedState::Failed, Duration::from_secs(60))
        .await;
    attempt.handle.await.unwrap();
    assert!(!end.node_fault, "{end:?}");
    assert_eq!(
        (end.exit_code, end.message.as_deref()),
        (Some(3), Some("exited with status 3"))
    );
    support::release(&ctx, &task).await;
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn a_cancel_while_docker_does_not_answer_stops_the_container_once_it_does() {
    support::base_image().await;
    let (link, ctx, _work) = linked_context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let task = spec(&code, &env, "sleep 120");
    let mut attempt = start(&ctx, task.clone());
    let running = attempt
        .until(ReportedState::Running, Duration::from_secs(120))
        .await;
    let id = running.container.clone().unwrap();
    link.cut();
    attempt.canceller.cancel(Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    link.mend();
    attempt
        .until(ReportedState::Cancelled, Duration::from_secs(60))
        .await;
    attempt.handle.await.unwrap();
    // Stopped, not left running until the attempt is released.
    let state = support::docker()
        .await
        .inspect_container(&id, None)
        .await
        .unwrap()
        .state
        .unwrap();
    assert_eq!(state.running, Some(false), "{state:?}");
    support::release(&ctx, &task).await;
    support::remove_env_image(&ctx, &env).await;
}

/// Runs a first attempt of `code` in `env` so that its image is on the
/// node; returns its spec.
async fn image_on_node(ctx: &Arc<Context>, code: &support::Repo, env: &support::Repo) -> RunTask {
    let first = spec(code, env, "true");
    let reports = run(ctx, first.clone()).await;
    assert_eq!(
        last(&reports).state,
        ReportedState::Succeeded,
        "{reports:?}"
    );
    first
}

/// A spec of a new task on `env`'s cached image whose code is fetched from
/// `stalled`, so its checkout hangs until the test releases it.
fn stalled_spec(
    code: &support::Repo,
    env: &support::Repo,
    stalled: &support::StalledGit,
) -> RunTask {
    let mut task = spec(code, env, "echo the command ran");
    task.code_repo_url = stalled.url("code.git");
    task
}

#[tokio::test]
async fn a_checkout_that_fails_after_the_container_was_created_leaves_no_container() {
    support::base_image().await;
    let (ctx, work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    image_on_node(&ctx, &code, &env).await;
    let mut stalled = support::StalledGit::start();
    let task = stalled_spec(&code, &env, &stalled);
    let mut attempt = start(&ctx, task.clone());
    // The image is cached: the container is made while the code is still
    // being fetched, and not started.
    let id = support::created_container(&ctx, &task).await;
    stalled.release();
    let end = attempt
        .until(ReportedState::Failed, Duration::from_secs(60))
        .await;
    attempt.handle.await.unwrap();
    let message = end.message.unwrap();
    assert!(
        message.starts_with(&format!(
            "code repository {} could not be fetched: ",
            stalled.url("code.git")
        )),
        "{message}"
    );
    assert!(
        !states(&attempt.seen)
            .iter()
            .any(|(s, _)| *s == ReportedState::Running),
        "{:?}",
        attempt.seen
    );
    assert_container_gone(&ctx, &id).await;
    assert!(support::attempt_containers(&ctx, &task).await.is_empty());
    assert_eq!(
        std::fs::read_dir(work.path().join("tasks"))
            .unwrap()
            .count(),
        0,
        "the workspace is removed with the container"
    );
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn a_cancel_while_the_code_is_fetched_beside_a_created_container_leaves_no_container() {
    support::base_image().await;
    let (ctx, work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    image_on_node(&ctx, &code, &env).await;
    let stalled = support::StalledGit::start();
    let task = stalled_spec(&code, &env, &stalled);
    let mut attempt = start(&ctx, task.clone());
    let id = support::created_container(&ctx, &task).await;
    attempt.canceller.cancel(Duration::from_secs(1));
    let end = attempt
        .until(ReportedState::Cancelled, Duration::from_secs(60))
        .await;
    attempt.handle.await.unwrap();
    assert_eq!(end.message.as_deref(), Some("cancelled while preparing"));
    assert_container_gone(&ctx, &id).await;
    assert!(support::attempt_containers(&ctx, &task).await.is_empty());
    assert_eq!(
        std::fs::read_dir(work.path().join("tasks"))
            .unwrap()
            .count(),
        0
    );
    drop(stalled);
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn a_container_an_agent_created_but_never_started_is_removed_not_adopted() {
    support::base_image().await;
    let (ctx, work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    image_on_node(&ctx, &code, &env).await;
    let stalled = support::StalledGit::start();
    let task = stalled_spec(&code, &env, &stalled);
    let attempt = start(&ctx, task.clone());
    let id = support::created_container(&ctx, &task).await;
    // The agent dies while the code is still being fetched.
    attempt.handle.abort();
    let _ = attempt.handle.await;

    let again = start_again_adopting_nothing(work.path()).await;
    assert_container_gone(&again, &id).await;
    let left = everything_in(&work.path().join("tasks"));
    assert!(left.is_empty(), "its workspace is removed too: {left:?}");
    drop(stalled);
    support::remove_env_image(&again, &env).await;
}

#[tokio::test]
async fn the_directory_of_an_attempt_stopped_before_it_had_a_container_goes_at_the_next_start() {
    let (ctx, work) = context().await;
    let stalled = support::StalledGit::start();
    let mut task = stalled_spec(&repo(&[("a", "a")]), &env_repo(""), &stalled);
    // Neither the code nor the image can be had: no container is made.
    task.env_repo_url = stalled.url("env.git");
    let attempt = start(&ctx, task.clone());
    let tasks = work.path().join("tasks");
    let dir = tasks.join(format!("{}-{}", task.task_id, task.attempt));
    support::eventually("the attempt's directory", Duration::from_secs(60), || {
        let made = dir.join("code").is_dir();
        async move { made.then_some(()) }
    })
    .await;
    // The agent dies while both are still being fetched.
    attempt.handle.abort();
    let _ = attempt.handle.await;
    assert!(support::attempt_containers(&ctx, &task).await.is_empty());
    // What is not an attempt's directory is no business of the sweep.
    std::fs::create_dir(tasks.join("kept-by-someone")).unwrap();
    std::fs::write(tasks.join(format!("{}-01", task.task_id)), "x").unwrap();

    start_again_adopting_nothing(work.path()).await;
    assert!(!dir.exists(), "the attempt's directory is removed");
    let mut left: Vec<_> = std::fs::read_dir(&tasks)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [format!("{}-01", task.task_id), "kept-by-someone".to_owned()]
    );
    drop(stalled);
}

#[tokio::test]
async fn a_cached_image_needs_no_env_repository_and_an_unknown_one_still_fails_clearly() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let code = repo(&[("a", "a")]);
    let env = env_repo("RUN echo from-the-cached-image > /cached.txt");
    let mut task = spec(&code, &env, "cat /cached.txt");
    let reports = run(&ctx, task.clone()).await;
    assert_eq!(
        last(&reports).state,
        ReportedState::Succeeded,
        "{reports:?}"
    );
    let (env_url, env_commit) = (env.url.clone(), env.commit.clone());
    // The env repository is gone: nothing can fetch from it any more.
    drop(env);

    task.task_id = uuid::Uuid::new_v4();
    let reports = run(&ctx, task.clone()).await;
    assert_eq!(
        last(&reports).state,
        ReportedState::Succeeded,
        "{reports:?}"
    );
    assert_eq!(output(&reports), "from-the-cached-image\n");
    let env_ready = statuses(&reports)
        .into_iter()
        .find(|s| s.stage.as_deref() == Some(executor::STAGE_ENV_READY))
        .and_then(|s| s.message.clone());
    assert_eq!(
        env_ready,
        Some(format!(
            "commit {}: image cached; env not checked out",
            &env_commit[..12]
        ))
    );

    // Another env commit: its image is not on the node, and the repository
    // cannot be reached to build it.
    let mut unknown = task.clone();
    unknown.task_id = uuid::Uuid::new_v4();
    unknown.env_commit_id = "0123456789abcdef0123456789abcdef01234567".into();
    let reports = run(&ctx, unknown).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::Failed);
    let message = end.message.clone().unwrap();
    assert!(
        message.starts_with(&format!("env repository {env_url} could not be fetched: ")),
        "{message}"
    );
    support::remove_image(ctx.docker(), &tag_of(&task)).await;
}

/// Starts the agent again on `work`, as after a crash, and takes over
/// what it left: checks nothing is adopted or reported.
async fn start_again_adopting_nothing(work: &std::path::Path) -> Arc<Context> {
    let again = Arc::new(Context::new(support::docker().await, work).unwrap());
    let (tx, mut rx) = mpsc::channel(64);
    let supervisor = node_agent::supervisor::Supervisor::new(Arc::clone(&again), tx);
    supervisor.adopt_leftovers().await;
    assert!(supervisor.running().is_empty(), "nothing was adopted");
    assert!(rx.try_recv().is_err(), "nothing is reported for it");
    again
}

/// Every path under `dir`, for a failure's message.
fn everything_in(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        found.push(entry.path().display().to_string());
        if entry.file_type().unwrap().is_dir() {
            found.extend(everything_in(&entry.path()));
        }
    }
    found
}
