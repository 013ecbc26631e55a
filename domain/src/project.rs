//! The Project aggregate: a named group of tasks, its members and its quota.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::decided_by;
use crate::name::NameError;
use crate::{Actor, Name};

/// What a member may do in a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees everything in the project.
    Viewer,
    /// Also submits and cancels tasks.
    Member,
    /// Also manages members, quota and the project itself.
    Maintainer,
}

impl Role {
    /// Parses `viewer`, `member` or `maintainer`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Role::Viewer),
            "member" => Some(Role::Member),
            "maintainer" => Some(Role::Maintainer),
            _ => None,
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Member => "member",
            Role::Maintainer => "maintainer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The events of a project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProjectEvent {
    /// The project was created; its owner is its first maintainer.
    Created {
        /// Its id.
        project_id: Uuid,
        /// Its name.
        name: Name,
        /// What it is for.
        description: String,
        /// Who created it.
        owner: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The project was renamed.
    Renamed {
        /// The new name.
        name: Name,
        /// Who renamed it.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// A user joined, or their role changed.
    MemberAdded {
        /// The user's name.
        user: String,
        /// Their role.
        role: Role,
        /// Who added them.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// A user left.
    MemberRemoved {
        /// The user's name.
        user: String,
        /// Who removed them.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// The most tasks of the project that may hold nodes at once changed.
    QuotaSet {
        /// The limit; `None` means no limit.
        max_running: Option<u32>,
        /// Who set it.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// The project was archived: read-only, no new tasks; members can
    /// still be removed.
    Archived {
        /// Who archived it.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
}

impl DomainEvent for ProjectEvent {
    fn event_type(&self) -> String {
        match self {
            ProjectEvent::Created { .. } => "ProjectCreated",
            ProjectEvent::Renamed { .. } => "ProjectRenamed",
            ProjectEvent::MemberAdded { .. } => "ProjectMemberAdded",
            ProjectEvent::MemberRemoved { .. } => "ProjectMemberRemoved",
            ProjectEvent::QuotaSet { .. } => "ProjectQuotaSet",
            ProjectEvent::Archived { .. } => "ProjectArchived",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}

/// The commands of a project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProjectCommand {
    /// Create the project.
    Create {
        /// Its id.
        project_id: Uuid,
        /// Its name.
        name: String,
        /// What it is for.
        description: String,
        /// The creating user, who becomes its maintainer.
        owner: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Rename it.
    Rename {
        /// The new name.
        name: String,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Add a member or change their role.
    AddMember {
        /// The user's name.
        user: String,
        /// The role.
        role: Role,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Remove a member.
    RemoveMember {
        /// The user's name.
        user: String,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Set the running-task limit.
    SetQuota {
        /// The limit; `None` removes it.
        max_running: Option<u32>,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Archive it.
    Archive {
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
}

/// Why a project command was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProjectError {
    /// The project does not exist.
    #[error("project not found")]
    NotFound,
    /// A project with this id exists already.
    #[error("project already exists")]
    AlreadyExists,
    /// The project is archived and read-only.
    #[error("project is archived")]
    Archived,
    /// The user is not a member.
    #[error("{0} is not a member of the project")]
    NotAMember(String),
    /// The change would leave the project without a maintainer.
    #[error("a project needs at least one maintainer")]
    LastMaintainer,
    /// The name does not fit the rules of a name.
    #[error("{0}")]
    InvalidName(#[from] NameError),
}

/// The Project aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Project {
    /// Its id; `None` before creation.
    pub id: Option<Uuid>,
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Who created it.
    pub owner: String,
    /// Members by user name.
    pub members: BTreeMap<String, Role>,
    /// The running-task limit.
    pub max_running: Option<u32>,
    /// Whether it is archived.
    pub archived: bool,
    /// When it was created.
    pub created_at: Option<DateTime<Utc>>,
    /// When it last changed.
    pub updated_at: Option<DateTime<Utc>>,
}

impl Project {
    /// The role of `user`, if a member.
    pub fn role_of(&self, user: &str) -> Option<Role> {
        self.members.get(user).copied()
    }

    fn maintainers_without(&self, user: &str) -> usize {
        self.members
            .iter()
            .filter(|(u, r)| u.as_str() != user && **r == Role::Maintainer)
            .count()
    }

    /// Decides which events `command` produces, without changing anything.
    ///
    /// # Errors
    /// A [`ProjectError`] when the command is refused; nothing is appended.
    pub fn decide(&self, command: ProjectCommand) -> Result<Vec<ProjectEvent>, ProjectError> {
        use ProjectCommand as C;
        use ProjectEvent as E;
        if let C::Create {
            project_id,
            name,
            description,
            owner,
            at,
        } = command
        {
            if self.id.is_some() {
                return Err(ProjectError::AlreadyExists);
            }
            let name = Name::parse(&name)?;
            return Ok(vec![E::Created {
                project_id,
                name,
                description,
                owner,
                at,
            }]);
        }
        if self.id.is_none() {
            return Err(ProjectError::NotFound);
        }
        // An archived project is read-only, except that people can still be
        // taken off it: archiving must not leave someone with access that a
        // maintainer can no longer withdraw.
        if self.archived {
            match command {
                C::Archive { .. } => return Ok(vec![]),
                C::RemoveMember { .. } => {}
                _ => return Err(ProjectError::Archived),
            }
        }
        Ok(match command {
            C::Create { .. } => unreachable!("handled above"),
            C::Rename { name, by, at } => {
                if name == self.name {
                    vec![]
                } else {
                    let name = Name::parse(&name)?;
                    vec![E::Renamed { name, by, at }]
                }
            }
            C::AddMember { user, role, by, at } => {
                if self.role_of(&user) == Some(role) {
                    vec![]
                } else {
                    if self.role_of(&user) == Some(Role::Maintainer)
                        && self.maintainers_without(&user) == 0
                    {
                        return Err(ProjectError::LastMaintainer);
                    }
                    vec![E::MemberAdded { user, role, by, at }]
                }
            }
            C::RemoveMember { user, by, at } => {
                match self.role_of(&user) {
                    None => return Err(ProjectError::NotAMember(user)),
                    Some(Role::Maintainer) if self.maintainers_without(&user) == 0 => {
                        return Err(ProjectError::LastMaintainer)
                    }
                    Some(_) => {}
                }
                vec![E::MemberRemoved { user, by, at }]
            }
            C::SetQuota {
                max_running,
                by,
                at,
            } => {
                if max_running == self.max_running {
                    vec![]
                } else {
                    vec![E::QuotaSet {
                        max_running,
                        by,
                        at,
                    }]
                }
            }
            C::Archive { by, at } => vec![E::Archived { by, at }],
        })
    }

    /// Applies one event.
    pub fn apply_event(&mut self, event: ProjectEvent) {
        match event {
            ProjectEvent::Created {
                project_id,
                name,
                description,
                owner,
                at,
            } => {
                self.id = Some(project_id);
                self.name = name.into();
                self.description = description;
                self.members.insert(owner.clone(), Role::Maintainer);
                self.owner = owner;
                self.created_at = Some(at);
                self.updated_at = Some(at);
            }
            ProjectEvent::Renamed { name, at, .. } => {
                self.name = name.into();
                self.updated_at = Some(at);
            }
            ProjectEvent::MemberAdded { user, role, at, .. } => {
                self.members.insert(user, role);
                self.updated_at = Some(at);
            }
            ProjectEvent::MemberRemoved { user, at, .. } => {
                self.members.remove(&user);
                self.updated_at = Some(at);
            }
            ProjectEvent::QuotaSet {
                max_running, at, ..
            } => {
                self.max_running = max_running;
                self.updated_at = Some(at);
            }
            ProjectEvent::Archived { at, .. } => {
                self.archived = true;
                self.updated_at = Some(at);
            }
        }
    }
}

decided_by!(
    Project,
    "project",
    ProjectCommand,
    ProjectEvent,
    ProjectError
);

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::testing::{at, name, user};

    type F = TestFramework<Project>;

    fn alice() -> Actor {
        user("alice")
    }
    fn created() -> ProjectEvent {
        ProjectEvent::Created {
            project_id: Uuid::from_u128(3),
            name: name("vision"),
            description: String::new(),
            owner: "alice".into(),
            at: at(0),
        }
    }
    fn add(user: &str, role: Role) -> ProjectCommand {
        ProjectCommand::AddMember {
            user: user.into(),
            role,
            by: alice(),
            at: at(1),
        }
    }
    fn added(user: &str, role: Role) -> ProjectEvent {
        ProjectEvent::MemberAdded {
            user: user.into(),
            role,
            by: alice(),
            at: at(1),
        }
    }
    fn archived() -> ProjectEvent {
        ProjectEvent::Archived {
            by: alice(),
            at: at(2),
        }
    }

    #[test]
    fn creating_makes_the_owner_a_maintainer() {
        let mut p = Project::default();
        let events = F::with(())
            .given_no_previous_events()
            .when(ProjectCommand::Create {
                project_id: Uuid::from_u128(3),
                name: "vision".into(),
                description: String::new(),
                owner: "alice".into(),
                at: at(0),
            })
            .inspect_result()
            .unwrap();
        assert_eq!(events, vec![created()]);
        p.apply_event(created());
        assert_eq!(p.role_of("alice"), Some(Role::Maintainer));
    }

    #[test]
    fn creating_twice_is_refused() {
        F::with(())
            .given(vec![created()])
            .when(ProjectCommand::Create {
                project_id: Uuid::from_u128(3),
                name: "x".into(),
                description: String::new(),
                owner: "bob".into(),
                at: at(0),
            })
            .then_expect_error(ProjectError::AlreadyExists);
    }

    #[test]
    fn a_project_is_neither_created_nor_renamed_to_a_bad_name() {
        F::with(())
            .given_no_previous_events()
            .when(ProjectCommand::Create {
                project_id: Uuid::from_u128(3),
                name: "-vision".into(),
                description: String::new(),
                owner: "bob".into(),
                at: at(0),
            })
            .then_expect_error(ProjectError::InvalidName(NameError));
        F::with(())
            .given(vec![created()])
            .when(ProjectCommand::Rename {
                name: "Vision 2".into(),
                by: alice(),
                at: at(1),
            })
            .then_expect_error(ProjectError::InvalidName(NameError));
    }

    #[test]
    fn commands_on_a_missing_project_say_not_found() {
        F::with(())
            .given_no_previous_events()
            .when(add("bob", Role::Member))
            .then_expect_error(ProjectError::NotFound);
    }

    #[test]
    fn adding_a_member_twice_with_the_same_role_appends_nothing() {
        F::with(())
            .given(vec![created()])
            .when(add("bob", Role::Viewer))
            .then_expect_events(vec![added("bob", Role::Viewer)]);
        F::with(())
            .given(vec![created(), added("bob", Role::Viewer)])
            .when(add("bob", Role::Viewer))
            .then_expect_events(vec![]);
        F::with(())
            .given(vec![created(), added("bob", Role::Viewer)])
            .when(add("bob", Role::Member))
            .then_expect_events(vec![added("bob", Role::Member)]);
    }

    #[test]
    fn the_last_maintainer_can_neither_leave_nor_be_demoted() {
        F::with(())
            .given(vec![created()])
            .when(ProjectCommand::RemoveMember {
                user: "alice".into(),
                by: alice(),
                at: at(1),
            })
            .then_expect_error(ProjectError::LastMaintainer);
        F::with(())
            .given(vec![created()])
            .when(add("alice", Role::Viewer))
            .then_expect_error(ProjectError::LastMaintainer);
    }

    #[test]
    fn removing_a_stranger_is_refused() {
        F::with(())
            .given(vec![created()])
            .when(ProjectCommand::RemoveMember {
                user: "carol".into(),
                by: alice(),
                at: at(1),
            })
            .then_expect_error(ProjectError::NotAMember("carol".into()));
    }

    #[test]
    fn a_quota_is_set_and_an_unchanged_one_appends_nothing() {
        let set = ProjectCommand::SetQuota {
            max_running: Some(4),
            by: alice(),
            at: at(1),
        };
        let was_set = ProjectEvent::QuotaSet {
            max_running: Some(4),
            by: alice(),
            at: at(1),
        };
        F::with(())
            .given(vec![created()])
            .when(set.clone())
            .then_expect_events(vec![was_set.clone()]);
        F::with(())
            .given(vec![created(), was_set])
            .when(set)
            .then_expect_events(vec![]);
    }

    #[test]
    fn renaming_records_the_new_name() {
        F::with(())
            .given(vec![created()])
            .when(ProjectCommand::Rename {
                name: "vision2".into(),
                by: alice(),
                at: at(1),
            })
            .then_expect_events(vec![ProjectEvent::Renamed {
                name: name("vision2"),
                by: alice(),
                at: at(1),
            }]);
    }

    #[test]
    fn an_archived_project_is_read_only() {
        F::with(())
            .given(vec![created()])
            .when(ProjectCommand::Archive {
                by: alice(),
                at: at(2),
            })
            .then_expect_events(vec![archived()]);
        F::with(())
            .given(vec![created(), archived()])
            .when(add("bob", Role::Member))
            .then_expect_error(ProjectError::Archived);
        F::with(())
            .given(vec![created(), archived()])
            .when(ProjectCommand::Archive {
                by: alice(),
                at: at(3),
            })
            .then_expect_events(vec![]);
    }

    fn remove(user: &str) -> ProjectCommand {
        ProjectCommand::RemoveMember {
            user: user.into(),
            by: alice(),
            at: at(3),
        }
    }

    #[test]
    fn a_member_of_an_archived_project_can_still_be_removed() {
        F::with(())
            .given(vec![created(), added("bob", Role::Member), archived()])
            .when(remove("bob"))
            .then_expect_events(vec![ProjectEvent::MemberRemoved {
                user: "bob".into(),
                by: alice(),
                at: at(3),
            }]);
    }

    #[test]
    fn removal_from_an_archived_project_keeps_its_other_rules() {
        F::with(())
            .given(vec![created(), archived()])
            .when(remove("alice"))
            .then_expect_error(ProjectError::LastMaintainer);
        F::with(())
            .given(vec![created(), archived()])
            .when(remove("carol"))
            .then_expect_error(ProjectError::NotAMember("carol".into()));
    }

    #[test]
    fn an_archived_project_refuses_every_other_change() {
        let given = || vec![created(), added("bob", Role::Member), archived()];
        F::with(())
            .given(given())
            .when(add("bob", Role::Maintainer))
            .then_expect_error(ProjectError::Archived);
        F::with(())
            .given(given())
            .when(ProjectCommand::Rename {
                name: "vision2".into(),
                by: alice(),
                at: at(3),
            })
            .then_expect_error(ProjectError::Archived);
        F::with(())
            .given(given())
            .when(ProjectCommand::SetQuota {
                max_running: Some(1),
                by: alice(),
                at: at(3),
            })
            .then_expect_error(ProjectError::Archived);
    }
}
