//! The audit timeline as the API shows it: one line per event, newest
//! first, and one event in full with the state it left behind.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::schema::event::Event;

/// One event on the timeline: who did what, when, in one line.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TimelineEntry {
    /// Its outbox position: its id, what `before`, `after` and
    /// `GET /events/{position}` take.
    pub position: i64,
    /// `task`, `node`, `project` or `user`.
    pub aggregate_type: String,
    /// The aggregate's id (a user's name for `user`).
    pub aggregate_id: String,
    /// Its number within the aggregate, from 1.
    pub sequence: i64,
    /// Such as `TaskAssigned`.
    pub event_type: String,
    /// Who caused it, such as `user:alice` or `system:scheduler`.
    pub actor: String,
    /// When it happened.
    pub recorded_at: DateTime<Utc>,
    /// The project of a task or project event; absent for others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_id: Option<Uuid>,
    /// The node the event concerns: a node's own events, and task events
    /// that place an attempt on a node or lose it there; absent for
    /// others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<Uuid>,
    /// What happened, in one line, as every view of the log says it.
    #[schema(
        example = "system:scheduler assigned attempt 2 to node gpu-3: 2 GPUs free, image cached"
    )]
    pub summary: String,
}

/// A page of the timeline, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TimelinePage {
    /// The events, newest first.
    pub items: Vec<TimelineEntry>,
    /// Pass as `before` for the next, older page; absent on the last one.
    pub next_before: Option<i64>,
    /// The same as `next_before`, as a `cursor` like every list's; absent
    /// on the last page.
    pub next_cursor: Option<String>,
    /// Pass as `after` to `GET /timeline/stream` to receive, live, every
    /// event this page could not contain yet: the page and the stream
    /// together miss nothing and repeat nothing.
    pub live_after: i64,
}

/// One event in full, with the aggregate's state right before and right
/// after it, so that a reader sees what it changed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventDetail {
    /// The event with its fields and its one-line summary.
    pub event: Event,
    /// Its metadata as stored: who caused it (`actor`) and when (`at`).
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// The aggregate as it was before the event; absent for its first
    /// event.
    #[schema(value_type = Option<Object>)]
    pub before: Option<Value>,
    /// The aggregate as the event left it, in the shape
    /// `GET /tasks/{id}`, `/nodes/{id}`, `/projects/{id}` or
    /// `/users/{name}` shows it.
    #[schema(value_type = Object)]
    pub after: Value,
}
