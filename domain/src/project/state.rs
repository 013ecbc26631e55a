//! The Project aggregate's state and how each event changes it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ProjectEvent, Role};
use crate::{Actor, Name};

/// What the log says of one secret of a project; never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    /// Its last version.
    pub version: u32,
    /// Where its sealed value is kept; `None` once deleted.
    pub value_id: Option<Uuid>,
    /// Who last set or deleted it.
    pub by: Actor,
    /// When.
    pub at: DateTime<Utc>,
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
    /// Its secrets by name, deleted ones included (their versions go on
    /// counting when one is set again).
    #[serde(default)]
    pub secrets: BTreeMap<Name, Secret>,
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

    /// The secret `name`, unless it does not exist or was deleted.
    pub fn secret(&self, name: &Name) -> Option<&Secret> {
        self.secrets.get(name).filter(|s| s.value_id.is_some())
    }

    /// How many secrets the project has (deleted ones not counted).
    pub fn live_secrets(&self) -> usize {
        self.secrets
            .values()
            .filter(|s| s.value_id.is_some())
            .count()
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
            ProjectEvent::SecretSet {
                name,
                version,
                value_id,
                by,
                at,
            } => {
                self.secrets.insert(
                    name,
                    Secret {
                        version,
                        value_id: Some(value_id),
                        by,
                        at,
                    },
                );
                self.updated_at = Some(at);
            }
            ProjectEvent::SecretDeleted {
                name,
                version,
                by,
                at,
            } => {
                self.secrets.insert(
                    name,
                    Secret {
                        version,
                        value_id: None,
                        by,
                        at,
                    },
                );
                self.updated_at = Some(at);
            }
            ProjectEvent::Archived { at, .. } => {
                self.archived = true;
                self.updated_at = Some(at);
            }
        }
    }
}
