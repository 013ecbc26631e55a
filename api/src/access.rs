//! Who may see and do what in a project.
//!
//! Admins see and do everything. Anybody else sees a project, and its tasks,
//! only as one of its members; to everyone else the project does not exist
//! (404, never 403, so that ids cannot be probed). Among members, viewers
//! read, members also submit and cancel tasks, maintainers also manage the
//! project. Membership is read from the Project aggregate itself, so a new
//! member can act at once.

use domain::project::{Project, Role};
use domain::task::Task;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

/// A project the caller may see, with the caller's standing in it.
#[derive(Debug, Clone)]
pub struct ProjectAccess {
    /// The project's current state.
    pub project: Project,
    /// The caller's role, when a member.
    pub role: Option<Role>,
    /// Whether the caller is an admin.
    pub admin: bool,
}

impl ProjectAccess {
    /// Refuses callers below `min` (admins always pass).
    ///
    /// # Errors
    /// 403 saying which role `what` needs.
    pub fn require(&self, min: Role, what: &str) -> Result<(), ApiError> {
        if self.admin || self.role.is_some_and(|r| r >= min) {
            return Ok(());
        }
        let have = self.role.map_or("no role", Role::as_str);
        let need = match min {
            Role::Viewer => "a viewer or more",
            Role::Member => "a member or maintainer",
            Role::Maintainer => "a maintainer",
        };
        Err(ApiError::Forbidden(format!(
            "only {need} of the project may {what}; you are {have}"
        )))
    }
}

/// Loads project `id` if the caller may see it.
///
/// # Errors
/// 404 (naming `field` when given) when it does not exist or the caller is
/// neither a member nor an admin; 500 when the log cannot be read.
pub async fn project(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    field: Option<&str>,
) -> Result<ProjectAccess, ApiError> {
    Ok(project_at(state, caller, id, field).await?.0)
}

/// [`project`], with the sequence of the project's last event it saw.
///
/// # Errors
/// As [`project`].
pub async fn project_at(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
    field: Option<&str>,
) -> Result<(ProjectAccess, usize), ApiError> {
    let loaded = state.store().load::<Project>(&id.to_string()).await?;
    seen_by(caller, id, loaded, field)
}

/// Project `id` as this process remembers it (it may be behind the log),
/// if the caller may see it there: for a decision whose events are
/// appended only while the project has no event after the returned
/// sequence (`store::Store::execute_guarded`). `None` when it remembers
/// no such thing; a refusal is only ever decided on [`project_at`].
pub fn remembered_project(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
) -> Option<(ProjectAccess, usize)> {
    let loaded = state.store().remembered::<Project>(&id.to_string());
    seen_by(caller, id, loaded, None).ok()
}

/// The caller's access to `loaded`, project `id`.
fn seen_by(
    caller: &Caller,
    id: Uuid,
    loaded: Option<store::Loaded<Project>>,
    field: Option<&str>,
) -> Result<(ProjectAccess, usize), ApiError> {
    let hidden = || {
        let detail = format!("project {id} not found");
        match field {
            Some(f) => ApiError::not_found_field(f, detail),
            None => ApiError::not_found(detail),
        }
    };
    let Some(loaded) = loaded else {
        return Err(hidden());
    };
    let role = loaded.state.role_of(&caller.user);
    if role.is_none() && !caller.admin {
        return Err(hidden());
    }
    let access = ProjectAccess {
        project: loaded.state,
        role,
        admin: caller.admin,
    };
    Ok((access, loaded.sequence))
}

/// A task the caller may see, with their access to its project.
#[derive(Debug, Clone)]
pub struct TaskAccess {
    /// The task's current state.
    pub task: Task,
    /// The sequence number of its last event.
    pub sequence: usize,
    /// The caller's standing in the task's project.
    pub project: ProjectAccess,
}

/// Loads task `id` if the caller may see its project.
///
/// # Errors
/// 404 when it does not exist or its project is hidden from the caller;
/// 500 when the log cannot be read.
pub async fn task(state: &AppState, caller: &Caller, id: Uuid) -> Result<TaskAccess, ApiError> {
    let hidden = || ApiError::not_found(format!("task {id} not found"));
    let Some(loaded) = state.store().load::<Task>(&id.to_string()).await? else {
        return Err(hidden());
    };
    let Some(project_id) = loaded.state.spec.as_ref().map(|s| s.project_id) else {
        return Err(ApiError::internal(format!(
            "task {id} has events but no spec"
        )));
    };
    let project = match project(state, caller, project_id, None).await {
        Ok(p) => p,
        Err(ApiError::NotFound(_)) => return Err(hidden()),
        Err(e) => return Err(e),
    };
    Ok(TaskAccess {
        task: loaded.state,
        sequence: loaded.sequence,
        project,
    })
}

/// The event types only admins see: a host SSH command, its one-line
/// summary and its output tell a node's host details (and a command line
/// may hold more) that are no user's business. For anybody else these
/// events are absent from every read path (`/events`, `/events/{position}`,
/// `/timeline`, `/timeline/stream` and the web view built on them), not
/// shown as placeholders, and pages still come back full.
pub const ADMIN_ONLY_EVENT_TYPES: [&str; 2] = ["NodeHostSshRequested", "NodeHostSshFinished"];

/// Whether events of `event_type` are for admins only.
pub fn admin_only(event_type: &str) -> bool {
    ADMIN_ONLY_EVENT_TYPES.contains(&event_type)
}

/// The event types `caller` may not see: none for admins.
pub fn hidden_event_types(caller: &Caller) -> &'static [&'static str] {
    if caller.admin {
        &[]
    } else {
        &ADMIN_ONLY_EVENT_TYPES
    }
}
