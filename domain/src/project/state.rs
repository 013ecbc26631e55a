//! The Project aggregate's state and how each event changes it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ProjectEvent, Role};

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
