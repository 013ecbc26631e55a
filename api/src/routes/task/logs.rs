//! `GET /api/v1/tasks/{id}/logs`: an attempt's output as stored from its
//! node's log chunks, from any byte offset.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{Path, Query};
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
    #[param(value_type = Option<u32>, minimum = 1)]
    attempt: Option<String>,
    /// The byte offset to start at; 0 when absent.
    #[param(value_type = Option<u64>)]
    offset: Option<String>,
    /// The most bytes to return (at most 4 MiB, the default).
    #[param(value_type = Option<u64>)]
    limit: Option<String>,
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
}

fn number(field: &str, v: Option<&str>) -> Result<Option<u64>, ApiError> {
    v.map(|s| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(field, format!("must be a whole number, got {s:?}")))
    })
    .transpose()
}

/// An attempt's output from a byte offset.
#[utoipa::path(
    get,
    path = "/tasks/{id}/logs",
    tag = "tasks",
    params(("id" = Uuid, Path, description = "The task's id"), LogQuery),
    responses(
        (status = 200, description = "The output from `offset`", body = TaskLog),
        (status = 400, description = "Malformed id, attempt, offset or limit", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such task or attempt", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    Query(q): Query<LogQuery>,
) -> Result<Json<TaskLog>, ApiError> {
    let attempt = number("attempt", q.attempt.as_deref())?;
    let offset = number("offset", q.offset.as_deref())?.unwrap_or(0);
    let limit = number("limit", q.limit.as_deref())?
        .map_or(MAX_BYTES, |l| (l as usize).clamp(1, MAX_BYTES));
    let task = access::task(&state, &caller, id).await?.task;
    let attempt = match attempt {
        None => task.attempt,
        Some(a) if a >= 1 && a <= u64::from(task.attempt) => a as u32,
        Some(a) => {
            return Err(ApiError::not_found_field(
                "attempt",
                format!(
                    "task {id} has {} attempt(s); there is no attempt {a}",
                    task.attempt
                ),
            ))
        }
    };
    let ended = task
        .attempts
        .iter()
        .find(|a| a.number == attempt)
        .is_none_or(|a| a.ended_at.is_some());
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT \"offset\", data FROM task_log WHERE task_id = $1 AND attempt = $2 \
         AND \"offset\" + octet_length(data) > $3 ORDER BY \"offset\"",
    )
    .bind(id)
    .bind(attempt as i32)
    .bind(offset as i64)
    .fetch_all(state.pool())
    .await
    .map_err(|e| ApiError::internal(format!("reading task_log: {e}")))?;
    let (data, next_offset) = assemble(&rows, offset, limit);
    let complete = ended
        && rows
            .last()
            .is_none_or(|(o, d)| next_offset >= *o as u64 + d.len() as u64);
    Ok(Json(TaskLog {
        task_id: id,
        attempt,
        offset,
        next_offset,
        data,
        complete,
    }))
}

/// Joins contiguous chunks from `offset`, at most `limit` bytes, cut on
/// character boundaries. Stops at a gap (a chunk not yet stored).
fn assemble(rows: &[(i64, String)], offset: u64, limit: usize) -> (String, u64) {
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
