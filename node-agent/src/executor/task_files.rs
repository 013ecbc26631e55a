//! A task's files: inputs downloaded into the workspace before the command
//! runs, outputs uploaded from it afterwards, and the note of the outputs
//! that lets an adopted attempt upload them too.

use protocol::{ReportedState, RunTask};

use crate::beneath::{blocking, PathError, Root};
use crate::transfer;

use super::context::Context;
use super::report::{Ending, Reporter};
use super::{STAGE_INPUTS, STAGE_INPUTS_READY};

/// The file in an attempt's directory (beside, not inside, the workspace
/// the container sees) naming its outputs, so an agent that adopts the
/// container after a restart still uploads them.
const OUTPUTS_FILE: &str = "outputs.json";

/// Writes the outputs into the attempt's directory (beside the workspace
/// the container sees), so an agent that adopts the container after a
/// restart still uploads them.
pub(super) async fn note_outputs(dir: &Root, outputs: &[protocol::TaskOutput]) {
    let Ok(json) = serde_json::to_vec(outputs) else {
        return;
    };
    let written = match dir.try_clone() {
        Ok(dir) => blocking(move || dir.write(OUTPUTS_FILE, &json)).await,
        Err(e) => Err(PathError::Io {
            path: OUTPUTS_FILE.into(),
            source: e,
        }),
    };
    if let Err(e) = written {
        tracing::warn!(error = %e, "could not note the outputs for a later adoption");
    }
}

/// The outputs noted by [`note_outputs`]; none when there is no note.
pub(super) async fn noted_outputs(dir: &Root) -> Vec<protocol::TaskOutput> {
    let Ok(dir) = dir.try_clone() else {
        return Vec::new();
    };
    match blocking(move || dir.read_small(OUTPUTS_FILE)).await {
        Ok(json) => serde_json::from_slice(&json).unwrap_or_default(),
        Err(PathError::Missing { .. }) => Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the noted outputs");
            Vec::new()
        }
    }
}

/// Downloads every input into the workspace, reporting the stage.
pub(super) async fn download_inputs(
    spec: &RunTask,
    ctx: &Context,
    out: &Reporter,
    code: &Root,
) -> Result<(), String> {
    out.stage(STAGE_INPUTS).await;
    let started = std::time::Instant::now();
    let mut total = 0;
    for input in &spec.inputs {
        let moved = ctx
            .files
            .download(spec.task_id, spec.attempt, input, code)
            .await?;
        tracing::info!(input = %input.name, size = moved.size, sha256 = %moved.sha256, "input downloaded");
        total += moved.size;
    }
    let detail = transfer::summary(total, spec.inputs.len(), started);
    out.stage_done(STAGE_INPUTS_READY, detail).await;
    Ok(())
}

/// Uploads every output once the container ended (also when it failed or
/// timed out; not after a cancel). Outputs that fail do not stop the others;
/// they fail the attempt, saying which and why. `code` is the workspace, or
/// why it could not be opened.
pub(super) async fn upload_outputs(
    ctx: &Context,
    (task_id, attempt): (uuid::Uuid, u32),
    outputs: &[protocol::TaskOutput],
    code: Result<&Root, PathError>,
    ending: Ending,
) -> Ending {
    if outputs.is_empty() || ending.state == ReportedState::Cancelled {
        return ending;
    }
    let code = match code {
        Ok(code) => code,
        Err(e) => {
            let what = format!("no output could be uploaded: {e}");
            return with_failures(ending, what);
        }
    };
    let mut failures = Vec::new();
    for output in outputs {
        match ctx.files.upload(task_id, attempt, output, code).await {
            Ok(moved) => {
                tracing::info!(output = %output.name, size = moved.size, sha256 = %moved.sha256, "output uploaded")
            }
            Err(e) => {
                tracing::warn!(output = %output.name, error = %e, "output not uploaded");
                failures.push(e);
            }
        }
    }
    if failures.is_empty() {
        return ending;
    }
    with_failures(ending, failures.join("; "))
}

/// `ending`, failed (or with its reason extended) by what went wrong with
/// the outputs.
fn with_failures(ending: Ending, what: String) -> Ending {
    match ending.state {
        ReportedState::Succeeded => Ending::failed(format!("the command succeeded, but {what}")),
        _ => Ending {
            message: Some(match ending.message {
                Some(m) => format!("{m}; {what}"),
                None => what,
            }),
            ..ending
        },
    }
}

/// A copy of a path error, to report it once more.
pub(super) fn clone_error(e: &PathError) -> PathError {
    PathError::Io {
        path: String::new(),
        source: std::io::Error::other(e.to_string()),
    }
}
