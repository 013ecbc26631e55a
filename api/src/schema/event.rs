//! Events of the log as the API shows them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use store::RecordedEvent;
use utoipa::ToSchema;

/// Fields of event payloads that are never shown: token fingerprints are
/// not secrets, but nothing a client does needs them, and the less that
/// leaves about credentials the better.
const HIDDEN_FIELDS: [&str; 2] = ["fingerprint", "token_fingerprint"];

/// An event's fields without the variant wrapper and without credentials'
/// fingerprints.
pub fn public_payload(body: &Value) -> Value {
    let mut body = body.clone();
    if let Value::Object(map) = &mut body {
        for field in HIDDEN_FIELDS {
            map.remove(field);
        }
    }
    body
}

/// An event stored payload `{"Variant": {...}}` without its wrapper.
pub fn unwrap_variant(payload: &Value) -> &Value {
    match payload {
        Value::Object(m) if m.len() == 1 => m.values().next().unwrap_or(payload),
        other => other,
    }
}

/// One event of the log, in the global order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Event {
    /// Its outbox position: the global order, and what `after` takes.
    pub position: i64,
    /// `task`, `node`, `project` or `user`.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// Its number within the aggregate, from 1.
    pub sequence: i64,
    /// Such as `TaskSubmitted`.
    pub event_type: String,
    /// The version of the event's shape.
    pub event_version: String,
    /// Who caused it, such as `user:alice`.
    pub actor: String,
    /// When it happened.
    pub recorded_at: DateTime<Utc>,
    /// The event's fields.
    #[schema(value_type = Object)]
    pub payload: Value,
    /// What happened, in one line, as the timeline says it.
    #[schema(example = "user:alice drained node gpu-3: no new tasks")]
    pub summary: Option<String>,
}

impl From<&RecordedEvent> for Event {
    fn from(e: &RecordedEvent) -> Self {
        Self {
            position: e.position,
            aggregate_type: e.aggregate_type.clone(),
            aggregate_id: e.aggregate_id.clone(),
            sequence: e.sequence,
            event_type: e.event_type.clone(),
            event_version: e.event_version.clone(),
            actor: e.actor().to_string(),
            recorded_at: e.recorded_at,
            payload: public_payload(e.body()),
            summary: None,
        }
    }
}

/// A page of events in the global order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventPage {
    /// The events.
    pub items: Vec<Event>,
    /// Pass as `after` to read on: the last position returned, or the
    /// `after` given when nothing new was visible.
    pub next_after: Option<i64>,
    /// Pass as `cursor` to get the next page; absent when this page holds
    /// the last events committed so far (`next_after` still follows the
    /// log from there).
    pub next_cursor: Option<String>,
}

/// One event of one aggregate, as replayed from the log.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventRecord {
    /// Its number within the aggregate, from 1.
    pub sequence: u64,
    /// Such as `TaskSubmitted`.
    pub event_type: String,
    /// The version of the event's shape.
    pub event_version: String,
    /// Who caused it.
    pub actor: Option<String>,
    /// When, as recorded by the command.
    pub at: Option<DateTime<Utc>>,
    /// The event's fields.
    #[schema(value_type = Object)]
    pub payload: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_removed_from_payloads() {
        let body = serde_json::json!({"token_id": "x", "fingerprint": "ab", "label": "l"});
        assert_eq!(
            public_payload(&body),
            serde_json::json!({"token_id": "x", "label": "l"})
        );
    }
}
