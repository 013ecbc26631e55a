//! The events of a project: past tense, versioned, never edited once
//! stored.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Role;
use crate::{Actor, Name};

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
    /// A secret got a value: its first (`version` 1) or a new one. The
    /// value is kept sealed outside the log under `value_id`.
    SecretSet {
        /// The secret's name.
        name: Name,
        /// Its version, counting every value it ever had.
        version: u32,
        /// Where the sealed value is kept.
        value_id: Uuid,
        /// Who set it.
        by: Actor,
        /// When.
        at: DateTime<Utc>,
    },
    /// A secret was deleted; its value is gone.
    SecretDeleted {
        /// The secret's name.
        name: Name,
        /// The version it had.
        version: u32,
        /// Who deleted it.
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
            ProjectEvent::SecretSet { .. } => "ProjectSecretSet",
            ProjectEvent::SecretDeleted { .. } => "ProjectSecretDeleted",
            ProjectEvent::Archived { .. } => "ProjectArchived",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
