//! `GET /api/v1/tasks`: tasks newest first, from the task read model, with
//! cursor pagination.
//!
//! The list is eventually consistent: a task just submitted appears once
//! the projector has applied its event (usually within milliseconds);
//! `GET /api/v1/tasks/{id}` always reads the task itself.

use axum::extract::State;
use axum::Json;
use domain::task::TaskState;
use projections::read::tasks::TaskFilter;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{parse_limit, parse_uuid, Query};
use crate::fresh::{Applied, Prefer};
use crate::schema::task::{Task, TaskPage};
use crate::{access, page, AppState};

/// Tasks per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 50;
/// The most tasks per page.
pub const MAX_LIMIT: i64 = 500;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// Filters and paging of the task list. Parameters arrive as text and are
/// parsed one by one, so that an error names its parameter.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListTasks {
    /// Only this project's tasks.
    #[param(value_type = Option<Uuid>)]
    project: Option<String>,
    /// Only tasks in this state (`queued`, `running`, `succeeded`, ...).
    #[param(value_type = Option<String>, example = "queued", pattern = "^(queued|assigned|accepted|preparing|running|succeeded|failed|timed_out|cancelled)$")]
    state: Option<String>,
    /// Only tasks whose current attempt is on this node.
    #[param(value_type = Option<Uuid>)]
    node: Option<String>,
    /// Tasks per page, 1 to 500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// The list's name in its cursors.
const LIST: &str = "tasks";

/// Tasks the caller may see, newest first.
#[utoipa::path(
    get,
    path = "/tasks",
    tag = "tasks",
    params(ListTasks, ("Prefer" = Option<String>, Header, description = "`fresh`: wait, at most 5 s, until the list shows everything committed before this request")),
    responses(
        (status = 200, description = "One page of tasks", body = TaskPage, headers(("Preference-Applied" = String, description = "`fresh` when the list shows everything committed before the request"))),
        (status = 400, description = "A bad parameter, named", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "The project filter names a project that is not the caller's", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    prefer: Prefer,
    Query(q): Query<ListTasks>,
) -> Result<(Applied, Json<TaskPage>), ApiError> {
    let project = q
        .project
        .as_deref()
        .map(|p| parse_uuid("project", p))
        .transpose()?;
    let task_state = q
        .state
        .as_deref()
        .map(|s| {
            TaskState::parse(s.trim()).ok_or_else(|| {
                let names: Vec<_> = TaskState::ALL[1..].iter().map(|s| s.as_str()).collect();
                ApiError::bad_request("state", format!("{s:?} is not one of {}", names.join(", ")))
            })
        })
        .transpose()?;
    let node = q
        .node
        .as_deref()
        .map(|n| parse_uuid("node", n))
        .transpose()?;
    let limit = parse_limit("limit", q.limit.as_deref(), DEFAULT_LIMIT, MAX_LIMIT)?;
    let before = q
        .cursor
        .as_deref()
        .map(|c| page::decode::<i64>(LIST, c))
        .transpose()?;
    // A project filter is checked against the project itself; without one,
    // non-admins see the projects the member read model lists for them.
    let member = match project {
        Some(p) => {
            access::project(&state, &caller, p, Some("project")).await?;
            None
        }
        None if caller.admin => None,
        None => Some(caller.user.as_str()),
    };
    let filter = TaskFilter {
        project,
        state: task_state,
        node,
        before,
        member,
    };
    let applied = prefer
        .wait_for(
            &state,
            &[
                projections::read::tasks::CHECKPOINT,
                projections::read::projects::CHECKPOINT,
            ],
        )
        .await?;
    let rows = projections::read::tasks::page(state.pool(), &filter, limit + 1).await?;
    let more = rows.len() as i64 > limit;
    let mut items = Vec::with_capacity(rows.len());
    let mut last = None;
    for row in rows.into_iter().take(limit as usize) {
        items.push(Task::try_from(row.task)?);
        last = Some(row.list_position);
    }
    Ok((
        applied,
        Json(TaskPage {
            items,
            next_cursor: last.filter(|_| more).map(|p| page::encode(LIST, &p)),
        }),
    ))
}
