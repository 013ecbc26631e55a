//! The commands of a project and the decisions on them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Project, ProjectError, ProjectEvent, Role, MAX_SECRETS};
use crate::aggregate::decided_by;
use crate::{Actor, Name};

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
    /// Set a secret's value (a new version of it): the value itself is
    /// never part of a command or an event, only the id under which the
    /// server keeps it sealed, outside the log.
    SetSecret {
        /// The secret's name.
        name: String,
        /// The version this value becomes: one past the secret's last
        /// version (a deleted secret's versions count too), so two
        /// concurrent sets cannot both win.
        version: u32,
        /// Where the sealed value is kept.
        value_id: Uuid,
        /// Who asks.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// Delete a secret.
    DeleteSecret {
        /// The secret's name.
        name: String,
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

impl Project {
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
        // taken off it and its secrets deleted: archiving must not leave
        // access that a maintainer can no longer withdraw.
        if self.archived {
            match command {
                C::Archive { .. } => return Ok(vec![]),
                C::RemoveMember { .. } | C::DeleteSecret { .. } => {}
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
            C::SetSecret {
                name,
                version,
                value_id,
                by,
                at,
            } => {
                let name = Name::parse(&name)?;
                let live = self.live_secrets();
                if !self.secrets.contains_key(&name) && live >= MAX_SECRETS {
                    return Err(ProjectError::TooManySecrets(MAX_SECRETS));
                }
                let next = self.secrets.get(&name).map_or(1, |s| s.version + 1);
                if version != next {
                    return Err(ProjectError::SecretChanged { name, next });
                }
                vec![E::SecretSet {
                    name,
                    version,
                    value_id,
                    by,
                    at,
                }]
            }
            C::DeleteSecret { name, by, at } => {
                let name = Name::parse(&name)?;
                match self.secret(&name) {
                    Some(secret) => vec![E::SecretDeleted {
                        name,
                        version: secret.version,
                        by,
                        at,
                    }],
                    None => return Err(ProjectError::NoSuchSecret(name.to_string())),
                }
            }
            C::Archive { by, at } => vec![E::Archived { by, at }],
        })
    }
}

decided_by!(
    Project,
    "project",
    ProjectCommand,
    ProjectEvent,
    ProjectError
);
