//! Why a project command was refused.

use crate::name::NameError;

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
    /// The project has no secret of this name.
    #[error("the project has no secret {0:?}")]
    NoSuchSecret(String),
    /// The secret changed meanwhile: its next version is another.
    #[error("secret {name} changed meanwhile (its next version is {next}); try again")]
    SecretChanged {
        /// The secret.
        name: crate::Name,
        /// Its next version now.
        next: u32,
    },
    /// The project holds as many secrets as it may.
    #[error("a project holds at most {0} secrets; delete one first")]
    TooManySecrets(usize),
    /// The name does not fit the rules of a name.
    #[error("{0}")]
    InvalidName(#[from] NameError),
}
