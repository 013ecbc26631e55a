//! Replaying the log for people: one aggregate's history event by event,
//! with what each event changed ([`replay`]), and a check that the current
//! code can still read and apply every stored event ([`check()`]).
//!
//! Both read the `events` table in each aggregate's own order, never
//! snapshots or read models, and explain events with the same
//! [`summary`](crate::summary) functions as the timeline, so the command
//! line and the web view never disagree.

mod check;
mod diff;

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, DomainEvent};
use domain::node::Node;
use domain::project::Project;
use domain::task::Task;
use domain::user::User;
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use store::outbox::RecordedEvent;
use uuid::Uuid;

pub use check::{check, CheckReport, Problem};
pub use diff::{diff, Change};

use crate::summary;

/// The kinds of aggregate in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// [`Task`], keyed by uuid.
    Task,
    /// [`Node`], keyed by uuid; found by name too.
    Node,
    /// [`Project`], keyed by uuid; found by name too.
    Project,
    /// [`User`], keyed by name.
    User,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 4] = [Kind::Task, Kind::Node, Kind::Project, Kind::User];

    /// The aggregate type as stored, such as `task`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Task => Task::TYPE,
            Kind::Node => Node::TYPE,
            Kind::Project => Project::TYPE,
            Kind::User => User::TYPE,
        }
    }

    /// The kind stored as `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a replay stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// After every event.
    End,
    /// After the event with this sequence number.
    Sequence(i64),
    /// After the last event recorded at or before this time.
    Time(DateTime<Utc>),
}

impl Until {
    fn includes(self, event: &RecordedEvent) -> bool {
        match self {
            Until::End => true,
            Until::Sequence(s) => event.sequence <= s,
            Until::Time(t) => event.recorded_at <= t,
        }
    }
}

/// One event of a replay and what it did.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The event as stored, with its place in the global order.
    pub event: RecordedEvent,
    /// Its one-line summary, as on the timeline.
    pub summary: String,
    /// What it changed in the aggregate's state.
    pub changes: Vec<Change>,
    /// The aggregate's state after it.
    pub state: Value,
}

/// An event the current code cannot apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    /// Its sequence number.
    pub sequence: i64,
    /// Its stored type.
    pub event_type: String,
    /// Why it cannot be applied.
    pub reason: String,
}

/// One aggregate's history, replayed.
#[derive(Debug, Clone, Serialize)]
pub struct Replay {
    /// The aggregate's kind.
    #[serde(serialize_with = "as_str")]
    pub kind: Kind,
    /// Its id.
    pub id: String,
    /// The events replayed, in order, up to the bound asked for.
    pub steps: Vec<Step>,
    /// How many events the aggregate has in the log.
    pub total: usize,
    /// The event the replay stopped at because it cannot be applied.
    pub broken: Option<Broken>,
}

fn as_str<S: serde::Serializer>(kind: &Kind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(kind.as_str())
}

/// Why an aggregate could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No aggregate has that id (or name).
    #[error("{0}")]
    NotFound(String),
    /// The bound excludes every event.
    #[error("{0}")]
    NothingBefore(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Replays aggregate `key` of `kind` (an id; a node or project may also be
/// named) from its first event up to `until`.
///
/// A stored event that does not fit the current event types ends the
/// replay early: the steps before it are returned with
/// [`Replay::broken`] saying why.
///
/// # Errors
/// [`ReplayError::NotFound`] for an unknown aggregate,
/// [`ReplayError::NothingBefore`] when `until` lies before its first
/// event, or a database error.
pub async fn replay(
    pool: &PgPool,
    kind: Kind,
    key: &str,
    until: Until,
) -> Result<Replay, ReplayError> {
    let id = resolve(pool, kind, key).await?;
    let events = load(pool, kind.as_str(), &id).await?;
    let Some(first) = events.first() else {
        return Err(ReplayError::NotFound(format!(
            "no {kind} has id {id}: it has no events"
        )));
    };
    if !until.includes(first) {
        return Err(ReplayError::NothingBefore(format!(
            "{kind} {id} did not exist yet: its first event is #{} at {}",
            first.sequence,
            first
                .recorded_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        )));
    }
    let total = events.len();
    let chosen: Vec<RecordedEvent> = events
        .into_iter()
        .take_while(|e| until.includes(e))
        .collect();
    let names = NodeNames::load(pool, &chosen).await?;
    let (steps, broken) = match kind {
        Kind::Task => steps::<Task>(&chosen, &names),
        Kind::Node => steps::<Node>(&chosen, &names),
        Kind::Project => steps::<Project>(&chosen, &names),
        Kind::User => steps::<User>(&chosen, &names),
    };
    Ok(Replay {
        kind,
        id,
        steps,
        total,
        broken,
    })
}

/// Turns `key` into an aggregate id.
async fn resolve(pool: &PgPool, kind: Kind, key: &str) -> Result<String, ReplayError> {
    if kind == Kind::User {
        return Ok(key.to_string());
    }
    if let Ok(id) = key.parse::<Uuid>() {
        return Ok(id.to_string());
    }
    if kind == Kind::Task {
        return Err(ReplayError::NotFound(format!(
            "{key:?} is not a task id: task ids are UUIDs"
        )));
    }
    store::names::lookup(pool, kind.as_str(), key)
        .await?
        .ok_or_else(|| ReplayError::NotFound(format!("no {kind} has the id or name {key:?}")))
}

/// Reads a stored event row, whether or not the outbox holds it.
pub(crate) fn recorded(row: &PgRow) -> Result<RecordedEvent, sqlx::Error> {
    let metadata: Value = row.try_get("metadata")?;
    let stored_at: Option<DateTime<Utc>> = row.try_get("recorded_at")?;
    let recorded_at = metadata
        .get("at")
        .and_then(Value::as_str)
        .and_then(|a| DateTime::parse_from_rfc3339(a).ok())
        .map(|a| a.with_timezone(&Utc))
        .or(stored_at)
        .unwrap_or_default();
    Ok(RecordedEvent {
        position: row.try_get::<Option<i64>, _>("position")?.unwrap_or(0),
        txid: row.try_get::<Option<i64>, _>("txid")?.unwrap_or(0),
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: row.try_get("payload")?,
        metadata,
        recorded_at,
    })
}

/// The columns [`recorded`] reads, from `events e`.
pub(crate) const COLUMNS: &str = "e.position, e.txid::text::bigint AS txid, e.recorded_at, \
    e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload, e.metadata";

/// One aggregate's events in sequence order.
async fn load(pool: &PgPool, kind: &str, id: &str) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM events e \
         WHERE e.aggregate_type = $1 AND e.aggregate_id = $2 ORDER BY e.sequence"
    ))
    .bind(kind)
    .bind(id)
    .try_map(|row: PgRow| recorded(&row))
    .fetch_all(pool)
    .await
}

/// The names of the nodes some events refer to, for their summaries.
struct NodeNames(HashMap<Uuid, String>);

impl NodeNames {
    async fn load(pool: &PgPool, events: &[RecordedEvent]) -> Result<Self, sqlx::Error> {
        let mut ids: Vec<String> = events
            .iter()
            .filter_map(summary::node_of)
            .map(|id| id.to_string())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT aggregate_id, payload -> 'Provisioned' ->> 'name' FROM events \
             WHERE aggregate_type = 'node' AND sequence = 1 AND aggregate_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(pool)
        .await?;
        Ok(Self(
            rows.into_iter()
                .filter_map(|(id, name)| Some((id.parse().ok()?, name?)))
                .collect(),
        ))
    }

    fn of(&self, event: &RecordedEvent) -> Option<&str> {
        summary::node_of(event)
            .and_then(|id| self.0.get(&id))
            .map(String::as_str)
    }
}

/// Applies `events` to a new `A` one by one.
fn steps<A>(events: &[RecordedEvent], names: &NodeNames) -> (Vec<Step>, Option<Broken>)
where
    A: Aggregate,
{
    let mut state = A::default();
    let mut before = serde_json::to_value(&state).unwrap_or(Value::Null);
    let mut out = Vec::with_capacity(events.len());
    for event in events {
        let broken = |reason: String| Broken {
            sequence: event.sequence,
            event_type: event.event_type.clone(),
            reason,
        };
        let decoded: A::Event = match serde_json::from_value(event.payload.clone()) {
            Ok(e) => e,
            Err(e) => {
                let reason = format!("its payload does not fit {} events: {e}", A::TYPE);
                return (out, Some(broken(reason)));
            }
        };
        if decoded.event_type() != event.event_type {
            let reason = format!(
                "it is stored as {} but its payload is a {}",
                event.event_type,
                decoded.event_type()
            );
            return (out, Some(broken(reason)));
        }
        state.apply(decoded);
        let after = serde_json::to_value(&state).unwrap_or(Value::Null);
        let summary = summary::summarize(event, names.of(event))
            .unwrap_or_else(|e| format!("(no summary: {e})"));
        out.push(Step {
            event: event.clone(),
            summary,
            changes: diff(&before, &after),
            state: after.clone(),
        });
        before = after;
    }
    (out, None)
}
