//! The run pipeline of one attempt: accepted, prepared, inputs in place,
//! container started and followed, outputs uploaded, final state
//! reported.
//!
//! The preparation has two sides that run side by side once the
//! workspace exists: the code side checks the code out into it and
//! downloads the inputs; the container side finds (or builds) the image
//! and creates the container, with the workspace already mounted but not
//! started. The container starts only once both sides are done, so its
//! command sees the whole checkout and every input. When either side fails
//! or the attempt is cancelled, the other side stops too, and a container
//! already created is removed before the final report.
//!
//! Once a container has started (or failed to start), it and the
//! workspace stay until [`release`](super::release()); an attempt that
//! never started one has its workspace removed before its final report.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use protocol::{ReportedState, RunTask, SecretValues, TransferOp};
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

use crate::beneath::Root;
use crate::docker::{self, ContainerSpec};

use super::cancel::CancelSignal;
use super::context::Context;
use super::prepare::{env_image, fetch_code, make_workspace, prepare_failed};
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
/// its container has been started (or was kept after failing to start).
async fn attempt(
    spec: &RunTask,
    secrets: &SecretValues,
    ctx: &Context,
    out: &Reporter,
    cancel: &mut CancelSignal,
    made_container: &mut bool,
) -> Ending {
    let recipe = match Recipe::of(spec, secrets, ctx) {
        Ok(recipe) => recipe,
        Err(ending) => return ending,
    };
    let (workspace, env) = match make_workspace(spec, ctx).await {
        Ok(made) => made,
        Err(e) => return prepare_failed(&e, &ctx.work_dir),
    };
    let code = &workspace.code;
    let halt = Halt::default();
    let (code_side, container_side) = tokio::join!(
        code_side(spec, secrets, ctx, out, cancel.clone(), &halt, code),
        container_side(
            spec,
            secrets,
            ctx,
            out,
            cancel.clone(),
            &halt,
            &env,
            &recipe,
            code.path()
        ),
    );
    let created = match (code_side, container_side) {
        (Ok(()), Ok(created)) => created,
        (code_side, container_side) => {
            if let Ok(created) = &container_side {
                discard_unstarted(ctx, &created.id).await;
            }
            return first_ending(code_side.err(), container_side.err());
        }
    };
    if !spec.outputs.is_empty() {
        note_outputs(&workspace.dir, &spec.outputs).await;
    }
    *made_container = true;
    let disk = DiskWatch {
        workspace: code.path().to_owned(),
        count_layer: !created.layer_limited,
    };
    let ending = follow_container(spec, ctx, out, cancel, &created.id, disk).await;
    upload_outputs(
        ctx,
        (spec.task_id, spec.attempt),
        &spec.outputs,
        Ok(code),
        ending,
    )
    .await
}

/// Why one side of the preparation stopped early.
#[derive(Debug)]
enum Stop {
    /// It failed or was cancelled, and the attempt ends so.
    Ended(Ending),
    /// The other side ended the attempt.
    Halted,
}

/// Raised by the first side of the preparation that fails, so the other
/// stops too.
#[derive(Debug)]
struct Halt(watch::Sender<bool>);

impl Default for Halt {
    fn default() -> Self {
        Halt(watch::Sender::new(false))
    }
}

impl Halt {
    fn raise(&self) {
        self.0.send_replace(true);
    }

    fn is_raised(&self) -> bool {
        *self.0.borrow()
    }

    async fn raised(&self) {
        let mut seen = self.0.subscribe();
        // The sender lives as long as `self`: this only returns once raised.
        let _ = seen.wait_for(|raised| *raised).await;
    }
}

/// Runs `work` until it ends, the attempt is cancelled (ending it
/// `cancelled` with `when` as the message) or `halt` is raised.
async fn guarded<T>(
    work: impl std::future::Future<Output = T>,
    cancel: &mut CancelSignal,
    halt: &Halt,
    when: &str,
) -> Result<T, Stop> {
    tokio::select! {
        done = work => Ok(done),
        _ = cancel.cancelled() => {
            Err(Stop::Ended(Ending::plain(ReportedState::Cancelled, Some(when.to_owned()))))
        }
        () = halt.raised() => Err(Stop::Halted),
    }
}

/// The ending of an attempt whose preparation stopped: the code side's
/// failure or cancel first (as when the code was checked out before
/// anything else), else the container side's.
fn first_ending(code_side: Option<Stop>, container_side: Option<Stop>) -> Ending {
    match (code_side, container_side) {
        (Some(Stop::Ended(ending)), _) | (_, Some(Stop::Ended(ending))) => ending,
        // Neither side ends the attempt without saying why; this is only
        // here so that nothing panics.
        _ => Ending::failed("preparing the attempt stopped without a reason"),
    }
}

/// The code side of the preparation: the checkout, then the inputs, both
/// into the workspace. Raises `halt` when it fails or is cancelled.
async fn code_side(
    spec: &RunTask,
    secrets: &SecretValues,
    ctx: &Context,
    out: &Reporter,
    mut cancel: CancelSignal,
    halt: &Halt,
    code: &Root,
) -> Result<(), Stop> {
    let done = async {
        let fetched = fetch_code(spec, secrets, ctx, out, code);
        guarded(fetched, &mut cancel, halt, "cancelled while preparing")
            .await?
            .map_err(|e| Stop::Ended(prepare_failed(&e, &ctx.work_dir)))?;
        if !spec.inputs.is_empty() {
            let fetched = download_inputs(spec, ctx, out, code);
            guarded(
                fetched,
                &mut cancel,
                halt,
                "cancelled while downloading inputs",
            )
            .await?
            .map_err(|e| Stop::Ended(Ending::failed(e)))?;
        }
        Ok(())
    }
    .await;
    if matches!(done, Err(Stop::Ended(_))) {
        halt.raise();
    }
    done
}

/// The container side of the preparation: the image (found, or built from
/// an env checkout), then the container, created but not started, with
/// the workspace mounted while the code side still fills it. Raises
/// `halt` when it fails or is cancelled.
///
/// Once asked for, the container's creation is always awaited to its end
/// (neither a cancel nor the other side's failure abandons it half-way),
/// so a container Docker made is always known to the caller, which starts
/// it or removes it. A restarted agent removes one left never started
/// ([`discard`](super::discard)).
#[expect(
    clippy::too_many_arguments,
    reason = "the parts of one attempt the container needs, each needed"
)]
async fn container_side(
    spec: &RunTask,
    secrets: &SecretValues,
    ctx: &Context,
    out: &Reporter,
    mut cancel: CancelSignal,
    halt: &Halt,
    env: &Root,
    recipe: &Recipe<'_>,
    workspace: &Path,
) -> Result<Created, Stop> {
    let image = env_image(spec, secrets, ctx, out, env);
    let image = guarded(image, &mut cancel, halt, "cancelled while preparing")
        .await
        .and_then(|found| found.map_err(|e| Stop::Ended(prepare_failed(&e, &ctx.work_dir))));
    let image = match image {
        Ok(image) => image,
        Err(stop) => {
            if matches!(stop, Stop::Ended(_)) {
                halt.raise();
            }
            return Err(stop);
        }
    };
    if cancel.is_cancelled() {
        return Err(Stop::Ended(Ending::plain(
            ReportedState::Cancelled,
            Some("cancelled while preparing".to_owned()),
        )));
    }
    if halt.is_raised() {
        // The code side has ended the attempt: no container for it.
        return Err(Stop::Halted);
    }
    match recipe.create(ctx, &image, workspace).await {
        Ok(created) => Ok(created),
        Err(e) => {
            halt.raise();
            Err(Stop::Ended(Ending::docker(&e)))
        }
    }
}

/// Removes a container that was created but never started, because the
/// attempt ended before it could start. Should Docker refuse, the
/// container is still removed once the server has the attempt's end
/// ([`release`](super::release())), or by the next start of the agent.
async fn discard_unstarted(ctx: &Context, id: &str) {
    if let Err(e) = docker::remove_container(&ctx.docker, id).await {
        tracing::warn!(container = %id, error = %e, "could not remove the container that never started");
    }
}

/// A created, not yet started, container.
#[derive(Debug)]
struct Created {
    /// Its id.
    id: String,
    /// Whether Docker limits its writable layer itself.
    layer_limited: bool,
}

/// What the attempt's container gets besides its image and workspace: its
/// labels and environment, checked before anything is prepared.
#[derive(Debug)]
struct Recipe<'a> {
    spec: &'a RunTask,
    labels: HashMap<String, String>,
    env: std::collections::BTreeMap<String, String>,
}

impl<'a> Recipe<'a> {
    /// The container's labels and environment, the task's secrets put in;
    /// the attempt's failure when a secret is missing or a variable is one
    /// the node sets.
    fn of(spec: &'a RunTask, secrets: &SecretValues, ctx: &Context) -> Result<Self, Ending> {
        let mut labels = HashMap::from([
            (docker::LABEL_TASK.to_owned(), spec.task_id.to_string()),
            (docker::LABEL_ATTEMPT.to_owned(), spec.attempt.to_string()),
            (docker::LABEL_AGENT.to_owned(), ctx.agent_label.clone()),
        ]);
        if let Some(t) = spec.timeout_s {
            labels.insert(docker::LABEL_TIMEOUT.to_owned(), t.to_string());
        }
        // The server refuses such tasks; an older or misbehaving one must
        // not get them run either.
        let mut env = spec.env.clone();
        for (var, secret) in &spec.env_secrets {
            match secrets.0.get(secret) {
                Some(value) => {
                    env.insert(var.clone(), value.clone());
                }
                None => {
                    return Err(Ending::failed(format!(
                        "the server did not hand over secret {secret} for {var}"
                    )))
                }
            }
        }
        if !spec.env_secrets.is_empty() {
            // A restarted agent asks for the values again to mask the
            // output.
            labels.insert(docker::LABEL_SECRETS.to_owned(), "1".to_owned());
        }
        if let Some(refusal) = docker::refused_env(&env) {
            return Err(Ending::failed(refusal));
        }
        // The node's word on which task and attempt this is, whatever a
        // server that did not refuse such variables let through.
        env.insert(
            docker::TASK_ID_VARIABLE.to_owned(),
            spec.task_id.to_string(),
        );
        env.insert(
            docker::ATTEMPT_VARIABLE.to_owned(),
            spec.attempt.to_string(),
        );
        Ok(Recipe { spec, labels, env })
    }

    /// Creates the container of `spec`'s command in `image` with
    /// `workspace` mounted, without starting it.
    async fn create(
        &self,
        ctx: &Context,
        image: &str,
        workspace: &Path,
    ) -> Result<Created, docker::DockerError> {
        let spec = self.spec;
        let confinement = &ctx.confinement;
        let container = ContainerSpec {
            image,
            command: &spec.command,
            env: &self.env,
            workspace,
            labels: self.labels.clone(),
            cpus: spec.cpus,
            memory_mb: spec.memory_mb,
            gpus: &spec.gpus,
            pids_limit: confinement.pids_limit,
            network: confinement.network.for_task(spec.network),
            layer_limit_mb: None,
            log_file_bytes: ctx.container_log_bytes,
        };
        let (id, layer_limited) = ctx
            .layer_quota
            .create(&ctx.docker, &container, confinement.workspace.limit_mb)
            .await?;
        Ok(Created { id, layer_limited })
    }
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
        return Ending::docker(&e);
    }
    out.status(ReportedState::Running, |s| {
        s.container = Some(id.to_owned())
    })
    .await;
    // The start no longer needs the machine: the next checkout's copy can
    // be made now.
    ctx.git.make_spares();
    let limits = Limits {
        timeout_s: spec.timeout_s,
        left: spec.timeout_s.map(Duration::from_secs),
        memory_mb: spec.memory_mb,
        disk,
    };
    watch(ctx, out, cancel, id, limits).await
}
