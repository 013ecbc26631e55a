//! `GET /api/v1/tasks/{id}/logs`: an attempt's output as stored from its
//! node's log chunks, from any byte offset, as one JSON page or, with
//! `follow=true`, as a stream of Server-Sent Events ([`crate::live_logs`]).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Path, Query};
use crate::live_logs::{self, Start};
use crate::schema::task::OutputRemoved;
use crate::{access, AppState};

/// The most bytes returned by one call.
pub const MAX_BYTES: usize = 4 * 1024 * 1024;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(logs))
}

/// Which part of which attempt's output.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// The attempt, from 1; the current one when absent.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 4294967295_i64)]
    attempt: Option<String>,
    /// The byte offset to start at; 0 when absent.
    #[param(value_type = Option<u64>)]
    offset: Option<String>,
    /// The most bytes to return (at most 4 MiB, the default); not with
    /// `follow`.
    #[param(value_type = Option<u64>)]
    limit: Option<String>,
    /// `true` to stream the output as Server-Sent Events as it is
    /// produced, until the attempt ends.
    #[param(value_type = Option<bool>)]
    follow: Option<String>,
}

/// A piece of an attempt's output.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskLog {
    /// The task.
    pub task_id: Uuid,
    /// The attempt; 0 when the task never ran.
    pub attempt: u32,
    /// Where `data` starts in the attempt's output.
    pub offset: u64,
    /// Where to continue reading.
    pub next_offset: u64,
    /// The output (stdout and stderr interleaved).
    pub data: String,
    /// Whether the attempt has ended and `next_offset` is its end: no more
    /// output will come.
    pub complete: bool,
    /// The part of this attempt's output that is no longer (or was never)
    /// stored, and why; absent when nothing is missing. Output removed by
    /// retention reads as empty and complete, with this saying so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed: Option<OutputRemoved>,
}

/// A whole number from 0 to `i64::MAX`, as the document's `int64` says.
fn number(field: &str, v: Option<&str>) -> Result<Option<u64>, ApiError> {
    v.map(|s| {
        s.trim()
            .parse::<i64>()
            .ok()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or(())
            .map_err(|_| ApiError::bad_request(field, format!("must be a whole number, got {s:?}")))
    })
    .transpose()
}

fn flag(field: &str, v: Option<&str>) -> Result<bool, ApiError> {
    match v.map(str::trim) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1" | "") => Ok(true),
        Some(other) => Err(ApiError::bad_request(
            field,
            format!("must be true or false, got {other:?}"),
        )),
    }
}

/// An attempt's output from a byte offset, or followed live.
///
/// Without `follow`, one JSON page of the output from `offset`: read on
/// from `next_offset` until `complete`.
///
/// With `follow=true` the answer is `text/event-stream` (Server-Sent
/// Events) that delivers the output as the node produces it:
///
/// - `event: log`, `id: <attempt>:<next_offset>`, data
///   `{"attempt", "offset", "next_offset", "data"}`: the next piece of
///   output (at most 256 KiB), with no gap and no byte twice;
/// - `event: end`, data `{"attempt", "state", "next_offset"}`, once the
///   attempt has ended (`state`: `succeeded`, `failed`, `timed_out`,
///   `cancelled` or `lost`) and all its output has been sent; then the
///   stream closes. A task that ends without ever running ends with
///   attempt 0;
/// - comments every 15 s while nothing happens.
///
/// Without `attempt` the stream follows the current attempt, waiting for
/// the first one if the task has not run yet. A reconnecting client sends
/// the last id it received as `Last-Event-ID` (browsers' `EventSource`
/// does so by itself), which takes precedence over `attempt` and
/// `offset`, and gets exactly the rest.
///
/// A user holds at most a configured number of live streams (log follows
/// and timeline streams together, 16 by default) on one server; one more
/// is refused with 429 and `Retry-After` until one of theirs closes.
///
/// The platform keeps at most a configured amount of output per attempt
/// (64 MiB by default); output past it ends with the line
/// `[unidesk: output cut at …; the rest of this attempt's output was
/// dropped]`. Output a node could not send fast enough is replaced by a
/// line `[unidesk: N bytes of output dropped …]`. Output of finished tasks
/// is removed after a configured retention or past an output budget, and
/// output is refused while the database is over its size budget: then
/// `removed` (and the `end` event's `removed`) says from where and why.
#[utoipa::path(
    get,
    path = "/tasks/{id}/logs",
    tag = "tasks",
    params(
        ("id" = Uuid, Path, description = "The task's id"),
        LogQuery,
        ("Last-Event-ID" = Option<String>, Header, pattern = "^([1-9][0-9]{0,8}:[0-9]{1,18})?$",
            description = "With `follow`: the id of the last event received, `<attempt>:<offset>`, to resume after it; empty is absent")
    ),
    responses(
        (status = 200, description = "The output from `offset`; with `follow=true`, a stream of Server-Sent Events",
            content(
                (TaskLog = "application/json"),
                (String = "text/event-stream")
            )),
        (status = 400, description = "Malformed id, attempt, offset, limit, follow or Last-Event-ID", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such task or attempt", body = ErrorBody),
        (status = 429, description = "Too many requests, or (with `follow`) the caller holds the most live streams allowed; see Retry-After", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let mut attempt = number("attempt", q.attempt.as_deref())?;
    let mut offset = number("offset", q.offset.as_deref())?.unwrap_or(0);
    let limit = number("limit", q.limit.as_deref())?
        .map_or(MAX_BYTES, |l| (l as usize).clamp(1, MAX_BYTES));
    let follow = flag("follow", q.follow.as_deref())?;
    // Checked whenever sent; it only counts with `follow`. Empty, as
    // EventSource leaves it after an event without id, it is absent.
    let resume = headers
        .get("last-event-id")
        .filter(|last| !last.as_bytes().trim_ascii().is_empty())
        .map(|last| {
            let last = last.to_str().map_err(|_| {
                ApiError::bad_request("Last-Event-ID", "must be <attempt>:<offset>")
            })?;
            live_logs::parse_event_id(last)
        })
        .transpose()?;
    if let Some(start) = resume.filter(|_| follow) {
        attempt = start.attempt.map(u64::from);
        offset = start.offset;
    }
    let task = access::task(&state, &caller, id).await?.task;
    if follow {
        // Checked like below, but a task that has not run yet is waited for.
        if let Some(a) = attempt {
            checked_attempt(id, &task, a)?;
        }
        let start = Start {
            attempt: attempt.map(|a| a as u32),
            offset,
        };
        let slot = crate::limits::stream_slot(&state, &caller)?;
        return Ok(live_logs::respond(state, caller, id, start, slot));
    }
    let attempt = match attempt {
        None => task.attempt,
        Some(a) => checked_attempt(id, &task, a)?,
    };
    let ended = task
        .attempts
        .iter()
        .find(|a| a.number == attempt)
        .is_none_or(|a| a.ended_at.is_some());
    // The page is read after the end was seen, so a complete answer holds
    // everything the attempt stored.
    let rows: Vec<(i64, String)> = store::task_log::page(state.pool(), id, attempt, offset, limit)
        .await
        .map_err(|e| ApiError::internal(format!("reading task_log: {e}")))?
        .into_iter()
        .map(|c| (c.offset, c.data))
        .collect();
    let (data, next_offset) = assemble(&rows, offset, limit);
    let complete = ended
        && store::task_log::stored_end(state.pool(), id, attempt)
            .await
            .map_err(|e| ApiError::internal(format!("reading task_log: {e}")))?
            .is_none_or(|end| next_offset >= end);
    let removed = removed(&state, id, attempt).await?;
    Ok(Json(TaskLog {
        task_id: id,
        attempt,
        offset,
        next_offset,
        data,
        complete,
        removed,
    })
    .into_response())
}

/// What is missing of `attempt`'s output, if anything.
pub(crate) async fn removed(
    state: &AppState,
    task_id: Uuid,
    attempt: u32,
) -> Result<Option<OutputRemoved>, ApiError> {
    Ok(store::task_log::removed(state.pool(), task_id)
        .await
        .map_err(|e| ApiError::internal(format!("reading task_log_removed: {e}")))?
        .into_iter()
        .find(|r| r.attempt == attempt)
        .map(Into::into))
}

/// Attempt `a` of `task`, when it has one.
fn checked_attempt(id: Uuid, task: &domain::task::Task, a: u64) -> Result<u32, ApiError> {
    match a {
        a if a >= 1 && a <= u64::from(task.attempt) => Ok(a as u32),
        a => Err(ApiError::not_found_field(
            "attempt",
            format!(
                "task {id} has {} attempt(s); there is no attempt {a}",
                task.attempt
            ),
        )),
    }
}

/// Joins contiguous chunks from `offset`, at most `limit` bytes, cut on
/// character boundaries. Stops at a gap (a chunk not yet stored).
pub(crate) fn assemble(rows: &[(i64, String)], offset: u64, limit: usize) -> (String, u64) {
    let mut out = String::new();
    let mut at = offset;
    for (start, data) in rows {
        let start = *start as u64;
        if start > at {
            break;
        }
        let mut skip = (at - start) as usize;
        while skip < data.len() && !data.is_char_boundary(skip) {
            skip += 1;
        }
        let rest = data.get(skip..).unwrap_or_default();
        let mut take = rest.len().min(limit - out.len());
        while take > 0 && !rest.is_char_boundary(take) {
            take -= 1;
        }
        out.push_str(&rest[..take]);
        at = start + (skip + take) as u64;
        if out.len() >= limit || take < rest.len() {
            break;
        }
    }
    (out, at)
}

#[cfg(test)]
mod tests {
    use super::assemble;

    #[test]
    fn chunks_join_from_any_offset_and_stop_at_a_gap() {
        let rows = vec![
            (0, "hello ".to_string()),
            (6, "world\n".to_string()),
            (20, "late".to_string()),
        ];
        assert_eq!(assemble(&rows, 0, 100), ("hello world\n".to_string(), 12));
        assert_eq!(assemble(&rows, 3, 100), ("lo world\n".to_string(), 12));
        assert_eq!(assemble(&rows, 0, 8), ("hello wo".to_string(), 8));
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        let rows = vec![(0, "añb".to_string())];
        assert_eq!(assemble(&rows, 0, 2), ("a".to_string(), 1));
    }
}
