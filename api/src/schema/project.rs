//! Projects, their members and quota.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;

/// The body of `POST /api/v1/projects`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// A unique name: 1-63 lower-case letters, digits, '.', '_' or '-'.
    #[schema(
        example = "vision",
        pattern = "^[a-z0-9][a-z0-9._-]*$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// What the project is for.
    #[serde(default)]
    pub description: Option<String>,
}

/// The body of `POST /api/v1/projects/{id}/members`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    /// An existing user's name.
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]*$", min_length = 1, max_length = 63)]
    pub user: String,
    /// `maintainer`, `member` or `viewer`.
    #[schema(example = "member", pattern = "^(maintainer|member|viewer)$")]
    pub role: String,
}

/// The body of `PUT /api/v1/projects/{id}/quota`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetQuota {
    /// The most tasks of the project that may hold nodes at once, 0 or
    /// more; `null` removes the limit. Required, so that a forgotten field
    /// never lifts a limit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, required = true, minimum = 0, maximum = 4294967295_i64)]
    pub max_running: Option<Option<i64>>,
}

/// Tells a field given as `null` (`Some(None)`) from a missing one (`None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

/// A member of a project.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Member {
    /// The user's name.
    pub user: String,
    /// `maintainer`, `member` or `viewer`.
    pub role: String,
}

/// A project as it stands.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Project {
    /// Its id.
    pub id: Uuid,
    /// Its unique name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Who created it.
    pub owner: String,
    /// Its members, by name.
    pub members: Vec<Member>,
    /// The running-task limit; absent when unlimited.
    pub max_running: Option<u32>,
    /// Whether it is archived: read-only, no new tasks.
    pub archived: bool,
    /// When it was created.
    pub created_at: Option<DateTime<Utc>>,
    /// When it last changed.
    pub updated_at: Option<DateTime<Utc>>,
}

impl TryFrom<domain::project::Project> for Project {
    type Error = ApiError;

    fn try_from(p: domain::project::Project) -> Result<Self, ApiError> {
        let Some(id) = p.id else {
            return Err(ApiError::internal("a project state without id"));
        };
        Ok(Self {
            id,
            name: p.name,
            description: p.description,
            owner: p.owner,
            members: p
                .members
                .into_iter()
                .map(|(user, role)| Member {
                    user,
                    role: role.as_str().to_string(),
                })
                .collect(),
            max_running: p.max_running,
            archived: p.archived,
            created_at: p.created_at,
            updated_at: p.updated_at,
        })
    }
}

/// A page of projects, by name.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProjectList {
    /// The projects.
    pub items: Vec<Project>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}
