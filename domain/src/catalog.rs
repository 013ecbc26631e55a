//! Every event type of every aggregate, read from the event enums themselves.
//!
//! The event enums are serde externally-tagged enums whose
//! [`cqrs_es::DomainEvent::event_type`] is the aggregate's name followed by
//! the variant's name (`TaskSubmitted`). Serde's derived `Deserialize` hands
//! the variant names to [`serde::Deserializer::deserialize_enum`]; the small
//! deserializer here records them and stops, so a new variant shows up in the
//! catalog without anyone keeping a list.

use std::fmt;

use serde::de::{self, Deserialize, Visitor};

use crate::node::NodeEvent;
use crate::project::ProjectEvent;
use crate::task::TaskEvent;
use crate::user::UserEvent;

/// One event type and the aggregate whose events carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventType {
    /// The stored event type, such as `TaskSubmitted`.
    pub event_type: String,
    /// The aggregate in lower case: `task`, `node`, `project` or `user`.
    pub aggregate: &'static str,
}

/// Every event type, task first, then node, project and user, each in the
/// order its enum declares them.
pub fn event_types() -> Vec<EventType> {
    let mut all = Vec::new();
    push::<TaskEvent>(&mut all, "task", "Task");
    push::<NodeEvent>(&mut all, "node", "Node");
    push::<ProjectEvent>(&mut all, "project", "Project");
    push::<UserEvent>(&mut all, "user", "User");
    all
}

fn push<'de, E: Deserialize<'de>>(all: &mut Vec<EventType>, aggregate: &'static str, prefix: &str) {
    for variant in variant_names::<E>() {
        all.push(EventType {
            event_type: format!("{prefix}{variant}"),
            aggregate,
        });
    }
}

/// The variant names serde knows for the enum `E`; empty for a type that is
/// not an enum.
fn variant_names<'de, E: Deserialize<'de>>() -> &'static [&'static str] {
    let mut recorder = VariantRecorder { variants: &[] };
    // The recorder always answers with an error once it has the names.
    let _ = E::deserialize(&mut recorder);
    recorder.variants
}

struct VariantRecorder {
    variants: &'static [&'static str],
}

#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("variant names recorded")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop
    }
}

impl<'de> de::Deserializer<'de> for &mut VariantRecorder {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        self.variants = variants;
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use cqrs_es::DomainEvent;
    use uuid::Uuid;

    use super::*;
    use crate::Actor;

    fn listed(event: &impl DomainEvent, aggregate: &str) -> bool {
        let name = event.event_type();
        event_types()
            .iter()
            .any(|t| t.event_type == name && t.aggregate == aggregate)
    }

    #[test]
    fn the_catalog_names_each_event_the_way_its_event_type_does() {
        let at = Utc::now();
        let by = Actor::User("ada".into());
        assert!(listed(&TaskEvent::Cancelled { attempt: None, at }, "task"));
        assert!(listed(
            &TaskEvent::Lost {
                node_id: Uuid::nil(),
                attempt: 1,
                reason: "gone".into(),
                at,
            },
            "task"
        ));
        assert!(listed(&NodeEvent::Drained { by: by.clone(), at }, "node"));
        assert!(listed(
            &ProjectEvent::Archived { by: by.clone(), at },
            "project"
        ));
        assert!(listed(
            &UserEvent::TokenRevoked {
                token_id: Uuid::nil(),
                by,
                at,
            },
            "user"
        ));
    }

    #[test]
    fn the_catalog_holds_every_variant_of_every_event_enum_once() {
        let all = event_types();
        let count = |aggregate: &str| all.iter().filter(|t| t.aggregate == aggregate).count();
        assert_eq!(count("task"), 14);
        assert_eq!(count("node"), 12);
        assert_eq!(count("project"), 8);
        assert_eq!(count("user"), 3);
        let mut names: Vec<&str> = all.iter().map(|t| t.event_type.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert!(names.contains(&"NodeHostSshRequested"));
        assert!(names.contains(&"TaskArtifactRecorded"));
        assert!(names.contains(&"ProjectSecretSet"));
    }
}
