//! Project secrets as the API shows them: names, versions, who set them
//! and when. A value goes in (`PUT`) and never comes out.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of `PUT /api/v1/projects/{id}/secrets/{name}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    /// The value: 4 to 16384 characters of text without NUL (an API
    /// token, an SSH private key, a `known_hosts` file). It is sealed at
    /// once, never shown again, and masked as `***` in task output.
    #[schema(
        example = "wandb-0123456789abcdef",
        min_length = 4,
        max_length = 16384,
        pattern = "^[^\\u0000]*$"
    )]
    pub value: String,
}

impl std::fmt::Debug for SetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSecret").finish_non_exhaustive()
    }
}

/// One secret of a project, without its value.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Secret {
    /// Its name.
    #[schema(example = "wandb")]
    pub name: String,
    /// Its version: 1 when first set, one more at every new value.
    pub version: u32,
    /// Who set its current value, as `user:<name>`.
    #[schema(example = "user:alice")]
    pub set_by: String,
    /// When.
    pub set_at: DateTime<Utc>,
}

/// A project's secrets, by name.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SecretList {
    /// The secrets.
    pub items: Vec<Secret>,
}

impl SecretList {
    /// The live secrets of `project`.
    pub fn of(project: &domain::project::Project) -> Self {
        SecretList {
            items: project
                .secrets
                .iter()
                .filter(|(_, s)| s.value_id.is_some())
                .map(|(name, s)| Secret::of(name, s))
                .collect(),
        }
    }
}

impl Secret {
    /// `secret`, named `name`.
    pub fn of(name: &domain::Name, secret: &domain::project::Secret) -> Self {
        Secret {
            name: name.to_string(),
            version: secret.version,
            set_by: secret.by.to_string(),
            set_at: secret.at,
        }
    }
}
