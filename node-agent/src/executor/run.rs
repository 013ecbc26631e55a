//! The run pipeline of one attempt: accepted, prepared, inputs in place,
//! container started and followed, outputs uploaded, final state
//! reported. Once a container exists, it and the workspace stay until
//! [`release`](super::release()); an attempt that never got one has its
//! workspace removed before its final report.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use protocol::{ReportedState, RunTask, SecretValues, TransferOp};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::docker::{self, ContainerSpec};

use super::cancel::CancelSignal;
use super::context::Context;
use super::prepare::{explain, prepare};
use super::report::{Ending, Mask, Report, Reporter};
use super::task_files::{download_inputs, note_outputs, upload_outputs};
use super::watch::{watch, DiskWatch, Limits};
use super::workspace::remove_workspace;

/// Runs one attempt to its end, sending every report to `reports`; see the
/// module documentation for the sequence. `cancel` stops it at any point.
#[tracing::instrument(skip_all, fields(task_id = %spec.task_id, attempt = spec.attempt))]
pub async fn run(
    spec: RunTask,
    ctx: Arc<Context>,
    reports: mpsc::Sender<Report>,
    mut cancel: CancelSignal,
) {
    let out = Reporter::new(spec.task_id, spec.attempt, reports);
    out.status(ReportedState::Accepted, |_| {}).await;
    let mut made_container = false;
    let ending = match secrets(&spec, &ctx, &mut cancel).await {
        Ok(secrets) => {
            let values = secrets.0.values().cloned().map(Zeroizing::new).collect();
            let out = out.clone().masking(Mask::Values(Arc::new(values)));
            attempt(
                &spec,
                &secrets,
                &ctx,
                &out,
                &mut cancel,
                &mut made_container,
            )
            .await
        }
        Err(ending) => ending,
    };
    if !made_container {
        // Nothing to adopt after a restart: the directory goes now, not
        // once the server has the report.
        remove_workspace(&ctx, spec.task_id, spec.attempt).await;
    }
    tracing::info!(state = ?ending.state, message = ending.message.as_deref(), "attempt ended");
    out.ended(ending).await;
}

/// The values of the secrets the task names, asked from the server right
/// before the attempt needs them; none when it names none.
async fn secrets(
    spec: &RunTask,
    ctx: &Context,
    cancel: &mut CancelSignal,
) -> Result<SecretValues, Ending> {
    if !spec.needs_secrets() {
        return Ok(SecretValues::default());
    }
    let asked = ctx
        .files()
        .broker()
        .ask(spec.task_id, spec.attempt, TransferOp::Secrets);
    tokio::select! {
        answer = asked => match answer {
            Ok(grant) => Ok(grant.secrets),
            Err(e) => Err(Ending::failed(format!("the task's secrets: {e}"))),
        },
        _ = cancel.cancelled() => {
            Err(Ending::plain(ReportedState::Cancelled, Some("cancelled while preparing".into())))
        }
    }
}

/// The attempt from preparation to outputs; `made_container` is set once
/// its container exists.
async fn attempt(
    spec: &RunTask,
    secrets: &SecretValues,
    ctx: &Context,
    out: &Reporter,
    cancel: &mut CancelSignal,
    made_container: &mut bool,
) -> Ending {
    let (workspace, image) = tokio::select! {
        prepared = prepare(spec, secrets, ctx, out) => match prepared {
            Ok(prepared) => prepared,
            Err(e) => return Ending::failed(explain(&e, &ctx.work_dir)),
        },
        _ = cancel.cancelled() => {
            return Ending::plain(ReportedState::Cancelled, Some("cancelled while preparing".into()));
        }
    };
    let code = &workspace.code;
    if !spec.inputs.is_empty() {
        tokio::select! {
            fetched = download_inputs(spec, ctx, out, code) => {
                if let Err(e) = fetched {
                    return Ending::failed(e);
                }
            }
            _ = cancel.cancelled() => {
                return Ending::plain(ReportedState::Cancelled, Some("cancelled while downloading inputs".into()));
            }
        }
    }
    if !spec.outputs.is_empty() {
        note_outputs(&workspace.dir, &spec.outputs).await;
    }
    let ending = run_container(
        spec,
        secrets,
        ctx,
        out,
        cancel,
        code.path(),
        &image,
        made_container,
    )
    .await;
    upload_outputs(
        ctx,
        (spec.task_id, spec.attempt),
        &spec.outputs,
        Ok(code),
        ending,
    )
    .await
}

/// Creates, starts and follows the container until it ends; it is kept,
/// stopped, until the server has the attempt's end.
#[expect(
    clippy::too_many_arguments,
    reason = "the steps of one attempt, each needed"
)]
async fn run_container(
    spec: &RunTask,
    secrets: &SecretValues,
    ctx: &Context,
    out: &Reporter,
    cancel: &mut CancelSignal,
    code: &Path,
    image: &str,
    made_container: &mut bool,
) -> Ending {
    let labels = HashMap::from([
        (docker::LABEL_TASK.to_owned(), spec.task_id.to_string()),
        (docker::LABEL_ATTEMPT.to_owned(), spec.attempt.to_string()),
        (docker::LABEL_AGENT.to_owned(), ctx.agent_label.clone()),
    ]);
    let mut labels = labels;
    if let Some(t) = spec.timeout_s {
        labels.insert(docker::LABEL_TIMEOUT.to_owned(), t.to_string());
    }
    // The server refuses such tasks; an older or misbehaving one must not
    // get them run either.
    let mut env = spec.env.clone();
    for (var, secret) in &spec.env_secrets {
        match secrets.0.get(secret) {
            Some(value) => {
                env.insert(var.clone(), value.clone());
            }
            None => {
                return Ending::failed(format!(
                    "the server did not hand over secret {secret} for {var}"
                ))
            }
        }
    }
    if !spec.env_secrets.is_empty() {
        // A restarted agent asks for the values again to mask the output.
        labels.insert(docker::LABEL_SECRETS.to_owned(), "1".to_owned());
    }
    if let Some(refusal) = docker::refused_env(&env) {
        return Ending::failed(refusal);
    }
    let confinement = &ctx.confinement;
    let container = ContainerSpec {
        image,
        command: &spec.command,
        env: &env,
        workspace: code,
        labels,
        cpus: spec.cpus,
        memory_mb: spec.memory_mb,
        gpus: &spec.gpus,
        pids_limit: confinement.pids_limit,
        network: confinement.network.for_task(spec.network),
        layer_limit_mb: None,
    };
    let created = ctx
        .layer_quota
        .create(&ctx.docker, &container, confinement.workspace.limit_mb)
        .await;
    let (id, layer_limited) = match created {
        Ok(created) => created,
        Err(e) => return Ending::failed(e),
    };
    *made_container = true;
    let disk = DiskWatch {
        workspace: code.to_owned(),
        count_layer: !layer_limited,
    };
    follow_container(spec, ctx, out, cancel, &id, disk).await
}

/// Starts the container, streams its output, and waits for the first of:
/// its exit, a cancel, the time limit.
async fn follow_container(
    spec: &RunTask,
    ctx: &Context,
    out: &Reporter,
    cancel: &mut CancelSignal,
    id: &str,
    disk: DiskWatch,
) -> Ending {
    if let Err(e) = docker::start_container(&ctx.docker, id).await {
        return Ending::failed(e);
    }
    out.status(ReportedState::Running, |s| {
        s.container = Some(id.to_owned())
    })
    .await;
    let limits = Limits {
        timeout_s: spec.timeout_s,
        left: spec.timeout_s.map(Duration::from_secs),
        memory_mb: spec.memory_mb,
        disk,
    };
    watch(ctx, out, cancel, id, limits).await
}
