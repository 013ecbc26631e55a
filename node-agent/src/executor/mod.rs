//! Running one attempt of a task, from checkout to cleanup.
//!
//! [`run()`] reports, in order: `accepted`; `preparing` with its stages;
//! `running` with the container id; the container's output as log chunks;
//! and exactly one final state: `succeeded`, `failed`, `cancelled` or
//! `timed_out`. All log chunks are reported before the final state. The
//! stages come from two sides that run side by side, so the two sides'
//! stages interleave: the code (`fetching code`, `code ready`, then any
//! inputs) and the image (`fetching environment`, `environment ready`,
//! `building image`, `image ready`; only the two `ready` stages, saying
//! so, when the image is on the node already and the env repository is
//! not needed). A failure at any step
//! ends the attempt `failed` with a message a person can act on; nothing
//! here panics or returns an error to the caller.
//!
//! The stopped container and the attempt's directory are kept until the
//! server has stored the final report: [`release()`] removes them then (the
//! connection calls it). An agent killed in between finds either the
//! report in its journal or the container with Docker's record of its
//! end, never neither. An attempt that never started a container has its
//! directory (and a container created for it) removed before its final
//! report. The git mirror and the image
//! stay cached.
//!
//! Every file of an attempt is reached through [`Root`](crate::beneath::Root) handles
//! ([`crate::beneath`]): the attempt's directory `<work dir>/tasks/<task>-<n>`
//! holds the code checkout the container sees (`code/`, also where inputs
//! land and outputs are read), the env checkout (`env/`, the build context)
//! and the agent's own note of the outputs. A repository or a task that puts
//! links anywhere in there cannot make the agent read or write outside.
//!
//! The work is split by concern: `report` holds what an attempt tells the
//! server, `cancel` how it is stopped, `context` what every attempt shares,
//! `workspace` and `prepare` the directory, checkouts and image it needs,
//! `task_files` its inputs and outputs, `run` the pipeline from start to
//! final state, `watch` how a started container is held to its limits,
//! `output` how its output becomes log chunks, `adopt` how a container
//! left by a previous run is taken over, and `release` what is removed
//! once the server has the attempt's end.

mod adopt;
mod cancel;
mod context;
mod output;
mod prepare;
mod release;
mod report;
mod run;
mod task_files;
mod watch;
mod workspace;

pub use adopt::{adopt, discard};
pub use cancel::{cancel_pair, CancelSignal, Canceller};
pub use context::Context;
pub use output::{past_limit_marker, ROTATED_MARKER};
pub use release::release;
pub use report::{LogReport, Report, StatusReport};
pub use run::run;
pub use workspace::sweep_workspaces;

/// The stage reported while the code is fetched.
pub const STAGE_CODE: &str = "fetching code";
/// The stage reported while the env repository is fetched.
pub const STAGE_ENV: &str = "fetching environment";
/// The stage reported while the image is built or found.
pub const STAGE_IMAGE: &str = "building image";
/// The stage reported once the code is in the workspace, with where it came
/// from (`from cache`, `fetched 12 objects, 3.1 KiB`).
pub const STAGE_CODE_READY: &str = "code ready";
/// The stage reported once the env repository is checked out, likewise.
pub const STAGE_ENV_READY: &str = "environment ready";
/// The stage reported once the image exists, with whether it was reused or
/// built.
pub const STAGE_IMAGE_READY: &str = "image ready";
/// The stage reported while the task's inputs are downloaded.
pub const STAGE_INPUTS: &str = "downloading inputs";
/// The stage reported once every input is in the workspace, with how much
/// arrived how fast.
pub const STAGE_INPUTS_READY: &str = "inputs ready";
