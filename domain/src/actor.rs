//! Who caused a change: a user, a node, or a part of the platform.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The author of a command, recorded as event metadata (`actor`) so the
/// timeline can say who did what.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Actor {
    /// A person or a program acting with a user's API token.
    User(String),
    /// A node agent, by node id.
    Node(String),
    /// A role of the platform itself, such as `scheduler`.
    System(String),
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::User(id) => write!(f, "user:{id}"),
            Actor::Node(id) => write!(f, "node:{id}"),
            Actor::System(id) => write!(f, "system:{id}"),
        }
    }
}

/// The error for a string that is not `user:…`, `node:…` or `system:…`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an actor: {0:?} (expected user:<id>, node:<id> or system:<name>)")]
pub struct ActorParseError(String);

impl FromStr for Actor {
    type Err = ActorParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, id) = s.split_once(':').ok_or_else(|| ActorParseError(s.into()))?;
        if id.is_empty() {
            return Err(ActorParseError(s.into()));
        }
        match kind {
            "user" => Ok(Actor::User(id.into())),
            "node" => Ok(Actor::Node(id.into())),
            "system" => Ok(Actor::System(id.into())),
            _ => Err(ActorParseError(s.into())),
        }
    }
}

impl TryFrom<String> for Actor {
    type Error = ActorParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Actor> for String {
    fn from(a: Actor) -> String {
        a.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actors_round_trip_through_their_text_form() {
        for a in [
            Actor::User("alice".into()),
            Actor::Node("7f3c".into()),
            Actor::System("scheduler".into()),
        ] {
            assert_eq!(a.to_string().parse::<Actor>().unwrap(), a);
        }
        assert!("robot:x".parse::<Actor>().is_err());
        assert!("user:".parse::<Actor>().is_err());
    }
}
