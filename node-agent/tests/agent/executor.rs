//! The executor against real Docker and real git repositories.

use std::sync::Arc;
use std::time::{Duration, Instant};

use node_agent::executor::{self, CancelSignal, Canceller, Context, Report, StatusReport};
use protocol::{ReportedState, RunTask};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::support::{self, context, env_repo, output, repo, spec, statuses, tag_of};

/// Runs an attempt to its end and returns every report; its container and
/// directory are kept, as until the server has the attempt's end.
async fn run_kept(ctx: &Arc<Context>, spec: RunTask) -> Vec<Report> {
    let (_canceller, signal) = executor::cancel_pair();
    let (tx, mut rx) = mpsc::channel(64);
    executor::run(spec, Arc::clone(ctx), tx, signal).await;
    let mut reports = Vec::new();
    while let Some(report) = rx.recv().await {
        reports.push(report);
    }
    reports
}

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

    let stage = |s: &str| (ReportedState::Preparing, Some(s.to_owned()));
    assert_eq!(
        states(&reports),
        vec![
            (ReportedState::Accepted, None),
            stage(executor::STAGE_CODE),
            stage(executor::STAGE_CODE_READY),
            stage(executor::STAGE_ENV),
            stage(executor::STAGE_ENV_READY),
            stage(executor::STAGE_IMAGE),
            stage(executor::STAGE_IMAGE_READY),
            (ReportedState::Running, None),
            (ReportedState::Succeeded, None),
        ]
    );
    let details = |reports: &[Report]| -> Vec<String> {
        statuses(reports)
            .iter()
            .filter(|s| s.state == ReportedState::Preparing)
            .filter_map(|s| s.message.clone())
            .collect()
    };
    let first = details(&reports);
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(
        first[0].starts_with(&format!("commit {}: fetched ", &code.commit[..12])),
        "{first:?}"
    );
    assert!(first[1].contains(": fetched "), "{first:?}");
    assert!(first[2].contains(" built in "), "{first:?}");
    let running = statuses(&reports)[7];
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
    let second = details(&reports);
    assert_eq!(
        second,
        vec![
            format!("commit {}: from cache", &code.commit[..12]),
            format!("commit {}: from cache", &env.commit[..12]),
            format!("{} cached", tag_of(&spec)),
        ]
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
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn running_out_of_memory_is_named_in_the_failure() {
    support::base_image().await;
    let (ctx, _work) = context().await;
    let (code, env) = (repo(&[("a", "a")]), env_repo(""));
    let mut spec = spec(
        &code,
        &env,
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}",
    );
    spec.memory_mb = 16;
    let reports = run(&ctx, spec).await;
    let end = last(&reports);
    assert_eq!(end.state, ReportedState::Failed, "{reports:?}");
    assert_eq!(
        end.message.as_deref(),
        Some("killed: out of memory (limit 16 MiB)")
    );
    support::remove_env_image(&ctx, &env).await;
}
