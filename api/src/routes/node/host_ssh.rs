//! `POST /api/v1/nodes/{id}/host-ssh`: run an admin's command on a node's
//! host over SSH and wait for how it ended.
//!
//! For emergency maintenance only: a probe or a repair with a hard time
//! limit and an output cap, never scheduled and never a way to run tasks.
//! The request and its result are events of the node, so both are on its
//! timeline. The server cannot reach a node's host (nodes sit behind NAT):
//! the command goes to the node's agent, which runs `ssh` to its own host
//! with the target it was started with (`--host-ssh`).
//!
//! The handler appends `NodeHostSshRequested`, then waits for
//! `NodeHostSshFinished` of that request, up to the time limit plus
//! [`HOST_SSH_ANSWER_GRACE_S`]. When no answer comes it records one
//! itself ("no answer from the node within N s"), so the timeline never
//! shows a request without an end, and a late answer from the node is
//! refused rather than recorded twice. The wait runs in a task of its own:
//! a client that hangs up does not stop it from recording the end.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use domain::node::{
    HostSshOutcome, Node, NodeCommand, NodeError, NodeEvent, HOST_SSH_ANSWER_GRACE_S,
};
use domain::Actor;
use store::StoreError;
use tokio::time::Instant;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, Path};
use crate::schema::host_ssh::{HostSshResult, RunHostSsh, DEFAULT_TIMEOUT_S};
use crate::AppState;

/// How often the log is read for the result while waiting.
pub const POLL: Duration = Duration::from_millis(100);

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(host_ssh))
}

/// Runs a command on the node's host over SSH, through the node's agent,
/// and answers when it ends. Admins only; for emergency maintenance. The
/// node must be online and its agent started with `--host-ssh`. The
/// request and its result appear on the node's timeline, for admins only.
#[utoipa::path(
    post,
    path = "/nodes/{id}/host-ssh",
    tag = "nodes",
    params(("id" = Uuid, Path, description = "The node's id")),
    request_body = RunHostSsh,
    responses(
        (status = 200, description = "The command ran (or was stopped at its time limit)", body = HostSshResult),
        (status = 400, description = "Malformed JSON or id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "The node is not online, has no host SSH target, or is busy with other host commands", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid command or timeout_s, named", body = ErrorBody),
        (status = 504, description = "The node did not answer in time; recorded as unanswered", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn host_ssh(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    body: Result<JsonBody<RunHostSsh>, ApiError>,
) -> Result<Json<HostSshResult>, ApiError> {
    caller.require_admin("run commands on a node's host")?;
    let JsonBody(body) = body?;
    let timeout_s = body.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
    domain::node::validate_host_ssh(&body.command, timeout_s)
        .map_err(|e| ApiError::invalid(e.field, e.reason))?;
    let request_id = Uuid::now_v7();
    let now = Utc::now();
    let command = NodeCommand::RequestHostSsh {
        request_id,
        command: body.command,
        timeout_s,
        by: caller.actor(),
        at: now,
    };
    let executed = state
        .store()
        .execute::<Node>(&id.to_string(), command, &caller.actor(), now)
        .await
        .map_err(refused)?;
    let name = executed.state.name.clone();
    let waiting = tokio::spawn(wait(
        state.clone(),
        id,
        request_id,
        executed.sequence,
        timeout_s,
    ));
    let outcome = waiting
        .await
        .map_err(|e| ApiError::internal(format!("waiting for a host command: {e}")))??;
    let Some(outcome) = outcome else {
        return Err(ApiError::GatewayTimeout(format!(
            "no answer from node {name} within {} s; the request is on its timeline as unanswered (request {request_id})",
            timeout_s + HOST_SSH_ANSWER_GRACE_S
        )));
    };
    if let (Some(error), None, false) = (&outcome.error, outcome.exit_code, outcome.timed_out) {
        return Err(ApiError::conflict(format!(
            "the command did not run on the host of node {name}: {error} (request {request_id})"
        )));
    }
    Ok(Json(HostSshResult::new(request_id, outcome)))
}

/// The node's refusals in words an admin can act on.
fn refused(e: StoreError<NodeError>) -> ApiError {
    match e {
        StoreError::Rejected(NodeError::NotOnline) => ApiError::conflict(
            "the node is not online: host SSH runs through the node's connected agent",
        ),
        other => other.into(),
    }
}

/// Waits for the result of `request_id` on node `node_id` (its request is
/// event `requested_seq`). `None` when no answer came in time, which is
/// then recorded.
async fn wait(
    state: AppState,
    node_id: Uuid,
    request_id: Uuid,
    requested_seq: usize,
    timeout_s: u64,
) -> Result<Option<HostSshOutcome>, ApiError> {
    let waited_s = timeout_s + HOST_SSH_ANSWER_GRACE_S;
    let deadline = Instant::now() + Duration::from_secs(waited_s);
    let mut after = i64::try_from(requested_seq).unwrap_or(i64::MAX);
    loop {
        if let Some(outcome) = finished(&state, node_id, request_id, &mut after).await? {
            return Ok(Some(outcome));
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let at = Utc::now();
    let command = NodeCommand::FinishHostSsh {
        request_id,
        result: HostSshOutcome {
            error: Some(format!("no answer from the node within {waited_s} s")),
            ..HostSshOutcome::default()
        },
        at,
    };
    let actor = Actor::System("api".into());
    match state
        .store()
        .execute::<Node>(&node_id.to_string(), command, &actor, at)
        .await
    {
        Ok(_) => Ok(None),
        // The answer came in the last moment.
        Err(StoreError::Rejected(NodeError::UnknownHostSsh(_))) => {
            finished(&state, node_id, request_id, &mut after).await
        }
        Err(e) => Err(e.into()),
    }
}

/// The result of `request_id` if node `node_id` has it after sequence
/// `after`, which moves past every result read.
async fn finished(
    state: &AppState,
    node_id: Uuid,
    request_id: Uuid,
    after: &mut i64,
) -> Result<Option<HostSshOutcome>, ApiError> {
    let rows: Vec<(i64, serde_json::Value)> = sqlx::query_as(
        "SELECT sequence, payload FROM events \
         WHERE aggregate_type = 'node' AND aggregate_id = $1 AND sequence > $2 \
           AND event_type = 'NodeHostSshFinished' \
         ORDER BY sequence",
    )
    .bind(node_id.to_string())
    .bind(*after)
    .fetch_all(state.pool())
    .await?;
    for (sequence, payload) in rows {
        *after = sequence;
        let event: NodeEvent = serde_json::from_value(payload)
            .map_err(|e| ApiError::internal(format!("reading NodeHostSshFinished: {e}")))?;
        if let NodeEvent::HostSshFinished {
            request_id: r,
            result,
            ..
        } = event
        {
            if r == request_id {
                return Ok(Some(result));
            }
        }
    }
    Ok(None)
}
