//! What the fault harness checks once the platform is quiet, from the
//! event log itself (the `events` table, read as stored JSON so that event
//! kinds and fields added later do not break the audit) and from the read
//! models.
//!
//! Every check yields [`Violation`]s of a stable kind:
//!
//! | kind | what was wrong |
//! |---|---|
//! | `task_not_ended` | a task has no terminal event |
//! | `task_ended_twice` | a task has more than one terminal event |
//! | `event_after_end` | a task changed after its terminal event |
//! | `attempt_out_of_order` | an attempt number skipped or repeated, or an attempt assigned while the one before still held its node |
//! | `attempt_not_ended` / `attempt_ended_twice` | an attempt without exactly one event ending it |
//! | `report_for_dead_attempt` | a report stored for an attempt that was not the live one |
//! | `gpu_double_hold` | two attempts held one GPU of a node at once (Assigned → end, in log order) |
//! | `gpu_double_use_on_node` | a simulated node was told to run two attempts on one GPU at once |
//! | `acked_report_missing` | a report the agent got `received` for is not in the log |
//! | `wrong_outcome` | a task ended other than its command does (exit code) |
//! | `false_offline` | a simulated node that was heartbeating throughout was taken for silent |
//! | `replay_check` | `unidesk replay --check` finds a problem |
//! | `read_model_differs` | a read model differs from a rebuild from the log |
//!
//! The harness itself adds `no_recovery` (the cluster was not whole again
//! in time after a fault), `slow_shutdown` (an ingress took more than 10 s
//! to exit on SIGTERM) and `duplicate_submission` (a `POST /tasks`
//! retried with the same idempotency key made two tasks; judged only when
//! the API documents such a key).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use protocol::ReportedState;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::sim::Journal;

/// One thing found wrong.
#[derive(Debug, Clone)]
pub struct Violation {
    /// A stable kind, such as `gpu_double_hold`.
    pub kind: &'static str,
    /// What exactly: task, attempt, node, events.
    pub detail: String,
}

impl Violation {
    fn new(kind: &'static str, detail: impl Into<String>) -> Violation {
        Violation {
            kind,
            detail: detail.into(),
        }
    }
}

/// Figures of the log the audit read.
#[derive(Debug, Default)]
pub struct Figures {
    /// Tasks submitted.
    pub tasks: usize,
    /// Attempts assigned.
    pub attempts: usize,
    /// Attempts lost.
    pub lost: usize,
    /// Tasks by how they ended (`TaskSucceeded`, …, `none`).
    pub outcomes: BTreeMap<String, usize>,
    /// Nodes marked offline.
    pub offline: usize,
    /// Events in the log.
    pub events: usize,
}

/// One stored event, as the audit reads it.
#[derive(Debug, Clone)]
struct Event {
    sequence: i64,
    event_type: String,
    /// The payload's body (inside its variant's name).
    body: Value,
    /// Its position in the log's global order.
    position: i64,
}

impl Event {
    fn attempt(&self) -> Option<u32> {
        self.body
            .get("attempt")
            .and_then(Value::as_u64)
            .and_then(|a| u32::try_from(a).ok())
    }

    fn at(&self) -> Option<DateTime<Utc>> {
        self.body
            .get("at")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
    }

    fn uuid(&self, field: &str) -> Option<Uuid> {
        self.body
            .get(field)
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
    }
}

/// What the harness knows of the simulated nodes, by node name.
pub struct SimView<'a> {
    /// Each simulated node's journal.
    pub journals: Vec<(String, &'a Journal)>,
    /// `--offline-after-s`.
    pub offline_after: chrono::Duration,
    /// The longest gap between heartbeats of a node that is fine.
    pub beat_gap: chrono::Duration,
}

/// Reads the whole log.
async fn load(pool: &PgPool) -> Result<BTreeMap<(String, String), Vec<Event>>, sqlx::Error> {
    let rows: Vec<(String, String, i64, String, String, i64)> = sqlx::query_as(
        "SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.payload::text, e.position \
         FROM events e \
         ORDER BY e.aggregate_type, e.aggregate_id, e.sequence",
    )
    .fetch_all(pool)
    .await?;
    let mut out: BTreeMap<(String, String), Vec<Event>> = BTreeMap::new();
    for (aggregate_type, aggregate_id, sequence, event_type, payload, position) in rows {
        let payload: Value = serde_json::from_str(&payload).unwrap_or(Value::Null);
        // Externally tagged: {"Assigned": {...}}; a unit variant is a string.
        let body = match payload {
            Value::Object(map) if map.len() == 1 => map
                .into_iter()
                .next()
                .map(|(_, v)| v)
                .unwrap_or(Value::Null),
            other => other,
        };
        out.entry((aggregate_type, aggregate_id))
            .or_default()
            .push(Event {
                sequence,
                event_type,
                body,
                position,
            });
    }
    Ok(out)
}

/// An attempt as the log tells it.
#[derive(Debug, Clone)]
struct Attempt {
    task: String,
    number: u32,
    node: Option<Uuid>,
    gpus: Vec<u32>,
    assigned_pos: i64,
    assigned_at: Option<DateTime<Utc>>,
    ends: Vec<(String, i64)>,
}

/// The expected end of a task, from its command.
fn expected_exit(command: &[String]) -> Option<i64> {
    match command {
        [sim, _, exit] if sim == "sim" => exit.parse().ok(),
        [sh, script, _, exit] if sh == "sh" && script == "run.sh" => exit.parse().ok(),
        _ => None,
    }
}

/// The event type a report becomes.
fn event_of(state: ReportedState) -> &'static str {
    match state {
        ReportedState::Accepted => "TaskAccepted",
        ReportedState::Preparing => "TaskPreparing",
        ReportedState::Running => "TaskStarted",
        ReportedState::Succeeded => "TaskSucceeded",
        ReportedState::Failed => "TaskFailed",
        ReportedState::Cancelled => "TaskCancelled",
        ReportedState::TimedOut => "TaskTimedOut",
    }
}

const TERMINAL: [&str; 4] = [
    "TaskSucceeded",
    "TaskFailed",
    "TaskTimedOut",
    "TaskCancelled",
];

/// Checks the log: tasks, attempts, GPUs, acknowledged reports, outcomes,
/// offline decisions and the outbox.
///
/// # Errors
/// A database error.
pub async fn audit_log(
    pool: &PgPool,
    sims: &SimView<'_>,
) -> Result<(Figures, Vec<Violation>), sqlx::Error> {
    let log = load(pool).await?;
    let mut figures = Figures::default();
    let mut violations = Vec::new();
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut node_names: HashMap<String, Uuid> = HashMap::new();
    for ((aggregate_type, id), events) in &log {
        figures.events += events.len();
        match aggregate_type.as_str() {
            "task" => {
                let found = audit_task(id, events, &mut figures, &mut violations);
                attempts.extend(found);
            }
            "node" => {
                for e in events {
                    if e.event_type == "NodeProvisioned" {
                        if let (Some(name), Ok(node)) =
                            (e.body.get("name").and_then(Value::as_str), id.parse())
                        {
                            node_names.insert(name.to_string(), node);
                        }
                    }
                    if e.event_type == "NodeMarkedOffline" {
                        figures.offline += 1;
                    }
                }
            }
            _ => {}
        }
    }
    figures.attempts = attempts.len();
    figures.lost = attempts
        .iter()
        .filter(|a| a.ends.iter().any(|(t, _)| t == "TaskLost"))
        .count();
    gpu_holds(&attempts, &mut violations);
    acked_reports(&log, sims, &node_names, &mut violations);
    false_offline(&log, sims, &node_names, &mut violations);
    for (name, journal) in &sims.journals {
        for what in &journal.physical {
            violations.push(Violation::new(
                "gpu_double_use_on_node",
                format!("{name}: {what}"),
            ));
        }
    }
    Ok((figures, violations))
}

/// Checks one task's stream; returns its attempts.
fn audit_task(
    id: &str,
    events: &[Event],
    figures: &mut Figures,
    violations: &mut Vec<Violation>,
) -> Vec<Attempt> {
    figures.tasks += 1;
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut ended: Option<&Event> = None;
    let mut terminal = 0;
    let mut expected = None;
    let live = |attempts: &[Attempt]| {
        attempts
            .last()
            .filter(|a| a.ends.is_empty())
            .map(|a| a.number)
    };
    for e in events {
        if let Some(end) = ended {
            if e.event_type != "TaskArtifactRecorded" && !TERMINAL.contains(&e.event_type.as_str())
            {
                violations.push(Violation::new(
                    "event_after_end",
                    format!(
                        "task {id}: {} (sequence {}) after {} (sequence {})",
                        e.event_type, e.sequence, end.event_type, end.sequence
                    ),
                ));
            }
        }
        match e.event_type.as_str() {
            "TaskSubmitted" => {
                let command: Vec<String> = e
                    .body
                    .pointer("/spec/command")
                    .and_then(|c| serde_json::from_value(c.clone()).ok())
                    .unwrap_or_default();
                expected = expected_exit(&command);
            }
            "TaskAssigned" => {
                let number = e.attempt().unwrap_or(0);
                let previous = attempts.last().map_or(0, |a| a.number);
                if number != previous + 1 {
                    violations.push(Violation::new(
                        "attempt_out_of_order",
                        format!("task {id}: attempt {number} assigned after attempt {previous}"),
                    ));
                }
                if let Some(holding) = live(&attempts) {
                    violations.push(Violation::new(
                        "attempt_out_of_order",
                        format!(
                            "task {id}: attempt {number} assigned (sequence {}) while attempt {holding} had not ended",
                            e.sequence
                        ),
                    ));
                }
                attempts.push(Attempt {
                    task: id.to_string(),
                    number,
                    node: e.uuid("node_id"),
                    gpus: e
                        .body
                        .get("gpus")
                        .and_then(|g| serde_json::from_value(g.clone()).ok())
                        .unwrap_or_default(),
                    assigned_pos: e.position,
                    assigned_at: e.at(),
                    ends: Vec::new(),
                });
            }
            "TaskAccepted" | "TaskPreparing" | "TaskStarted" => {
                let attempt = e.attempt();
                if attempt.is_none() || attempt != live(&attempts) {
                    violations.push(Violation::new(
                        "report_for_dead_attempt",
                        format!(
                            "task {id}: {} for attempt {attempt:?} (sequence {}) while the live attempt is {:?}",
                            e.event_type,
                            e.sequence,
                            live(&attempts)
                        ),
                    ));
                }
            }
            "TaskSucceeded" | "TaskFailed" | "TaskTimedOut" | "TaskCancelled" | "TaskLost" => {
                if let Some(number) = e.attempt() {
                    match attempts.iter_mut().find(|a| a.number == number) {
                        // The task's end after its attempt was lost (no
                        // retries left, or a cancel was asked for) names
                        // that attempt but does not end it again.
                        Some(a)
                            if e.event_type != "TaskLost"
                                && a.ends.iter().any(|(t, _)| t == "TaskLost") => {}
                        Some(a) => a.ends.push((e.event_type.clone(), e.position)),
                        None => violations.push(Violation::new(
                            "report_for_dead_attempt",
                            format!(
                                "task {id}: {} for attempt {number}, which was never assigned",
                                e.event_type
                            ),
                        )),
                    }
                }
                if e.event_type != "TaskLost" {
                    terminal += 1;
                    if terminal == 1 {
                        ended = Some(e);
                    }
                }
            }
            _ => {}
        }
    }
    let outcome = ended.map_or("none".to_string(), |e| e.event_type.clone());
    *figures.outcomes.entry(outcome).or_default() += 1;
    match terminal {
        0 => violations.push(Violation::new(
            "task_not_ended",
            format!(
                "task {id}: last event {} (attempts: {})",
                events.last().map_or("none", |e| e.event_type.as_str()),
                attempts.len()
            ),
        )),
        1 => {}
        n => violations.push(Violation::new(
            "task_ended_twice",
            format!(
                "task {id}: {n} terminal events: {}",
                events
                    .iter()
                    .filter(|e| TERMINAL.contains(&e.event_type.as_str()))
                    .map(|e| format!("{} (sequence {})", e.event_type, e.sequence))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
    for a in &attempts {
        match a.ends.len() {
            1 => {}
            0 if terminal == 0 => {}
            0 => violations.push(Violation::new(
                "attempt_not_ended",
                format!("task {id}: attempt {} has no event ending it", a.number),
            )),
            _ => violations.push(Violation::new(
                "attempt_ended_twice",
                format!(
                    "task {id}: attempt {} ended by {}",
                    a.number,
                    a.ends
                        .iter()
                        .map(|(t, _)| t.as_str())
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            )),
        }
    }
    if let (Some(end), Some(exit)) = (ended, expected) {
        outcome_check(id, end, exit, violations);
    }
    attempts
}

/// Whether `end` is how a command exiting with `exit` ends.
fn outcome_check(id: &str, end: &Event, exit: i64, violations: &mut Vec<Violation>) {
    let reason = end.body.get("reason").and_then(Value::as_str).unwrap_or("");
    let ok = match end.event_type.as_str() {
        "TaskSucceeded" => exit == 0,
        "TaskFailed" => match end.body.get("exit_code").and_then(Value::as_i64) {
            Some(code) => code == exit && exit != 0,
            // Lost more often than it may be retried: the platform's
            // honest answer under enough faults.
            None => reason.contains("no retries left"),
        },
        _ => false,
    };
    if !ok {
        violations.push(Violation::new(
            "wrong_outcome",
            format!(
                "task {id}: the command exits {exit}, the task ended {} (attempt {:?}, exit code {:?}, reason {reason:?})",
                end.event_type,
                end.attempt(),
                end.body.get("exit_code").and_then(Value::as_i64),
            ),
        ));
    }
}

/// No GPU of a node held by two attempts at once, in log order.
fn gpu_holds(attempts: &[Attempt], violations: &mut Vec<Violation>) {
    let mut by_gpu: BTreeMap<(Uuid, u32), Vec<&Attempt>> = BTreeMap::new();
    for a in attempts {
        if let Some(node) = a.node {
            for g in &a.gpus {
                by_gpu.entry((node, *g)).or_default().push(a);
            }
        }
    }
    for ((node, gpu), mut holders) in by_gpu {
        holders.sort_by_key(|a| a.assigned_pos);
        let mut open: Vec<&Attempt> = Vec::new();
        for a in holders {
            let start = a.assigned_pos;
            open.retain(|o| o.ends.iter().map(|(_, p)| *p).min().unwrap_or(i64::MAX) > start);
            for o in &open {
                violations.push(Violation::new(
                    "gpu_double_hold",
                    format!(
                        "node {node} GPU {gpu}: attempt {} of task {} assigned at {} (position {start}) while attempt {} of task {} held it (assigned at {}, position {}; ended at position {:?})",
                        a.number,
                        a.task,
                        a.assigned_at.map_or("?".into(), |t| t.to_rfc3339()),
                        o.number,
                        o.task,
                        o.assigned_at.map_or("?".into(), |t| t.to_rfc3339()),
                        o.assigned_pos,
                        o.ends.iter().map(|(_, p)| *p).min()
                    ),
                ));
            }
            open.push(a);
        }
    }
}

/// Every report a simulated agent got `received` for is in the log.
fn acked_reports(
    log: &BTreeMap<(String, String), Vec<Event>>,
    sims: &SimView<'_>,
    nodes: &HashMap<String, Uuid>,
    violations: &mut Vec<Violation>,
) {
    for (name, journal) in &sims.journals {
        for acked in &journal.acked {
            let wanted = event_of(acked.state);
            let found = log
                .get(&("task".to_string(), acked.task.to_string()))
                .is_some_and(|events| {
                    events
                        .iter()
                        .any(|e| e.event_type == wanted && e.attempt() == Some(acked.attempt))
                });
            if !found {
                violations.push(Violation::new(
                    "acked_report_missing",
                    format!(
                        "node {name} ({}): {:?} for attempt {} of task {} was answered received at {} but no {wanted} is in the log",
                        nodes.get(name).map(Uuid::to_string).unwrap_or_default(),
                        acked.state,
                        acked.attempt,
                        acked.task,
                        acked.at
                    ),
                ));
            }
        }
    }
}

/// No simulated node that was heartbeating throughout the offline window
/// was marked offline, or lost an attempt for silence.
fn false_offline(
    log: &BTreeMap<(String, String), Vec<Event>>,
    sims: &SimView<'_>,
    nodes: &HashMap<String, Uuid>,
    violations: &mut Vec<Violation>,
) {
    let journals: HashMap<Uuid, (&str, &Journal)> = sims
        .journals
        .iter()
        .filter_map(|(name, j)| nodes.get(name).map(|id| (*id, (name.as_str(), *j))))
        .collect();
    let judge = |node: Uuid, at: DateTime<Utc>, what: String, violations: &mut Vec<Violation>| {
        if let Some((name, journal)) = journals.get(&node) {
            if journal.beating_throughout(at - sims.offline_after, at, sims.beat_gap) {
                violations.push(Violation::new(
                    "false_offline",
                    format!(
                        "node {name} ({node}): {what} at {at}, though it sent heartbeats at most {} s apart on one session over the {} s before",
                        sims.beat_gap.num_seconds(),
                        sims.offline_after.num_seconds()
                    ),
                ));
            }
        }
    };
    for ((aggregate_type, id), events) in log {
        for e in events {
            let Some(at) = e.at() else { continue };
            match (aggregate_type.as_str(), e.event_type.as_str()) {
                ("node", "NodeMarkedOffline") => {
                    if let Ok(node) = id.parse() {
                        judge(node, at, "marked offline".into(), violations);
                    }
                }
                ("task", "TaskLost") => {
                    let reason = e.body.get("reason").and_then(Value::as_str).unwrap_or("");
                    if let (Some(node), true) = (e.uuid("node_id"), reason.contains("heartbeat")) {
                        judge(
                            node,
                            at,
                            format!("attempt {:?} of task {id} lost ({reason})", e.attempt()),
                            violations,
                        );
                    }
                }
                _ => {}
            }
        }
    }
}

/// Every event has its outbox row, and `unidesk replay --check` finds
/// nothing wrong.
///
/// # Errors
/// A database error.
pub async fn audit_replay(pool: &PgPool) -> Result<Vec<Violation>, sqlx::Error> {
    let report = projections::replay::check(pool).await?;
    Ok(report
        .problems
        .into_iter()
        .map(|p| {
            Violation::new(
                "replay_check",
                format!(
                    "{} {} event {:?} ({}): {}",
                    p.aggregate_type,
                    p.aggregate_id,
                    p.sequence,
                    p.event_type.unwrap_or_default(),
                    p.reason
                ),
            )
        })
        .collect())
}

/// The read models the projector writes, by table, and how to key a row
/// in a report.
pub const READ_MODELS: [(&str, &str); 7] = [
    ("task_view", "id"),
    ("task_counts", "project_id"),
    ("node_view", "id"),
    ("project_view", "id"),
    ("project_member_view", "user_name"),
    ("user_view", "name"),
    ("timeline", "position"),
];

/// Every row of every read model, as JSON text, sorted.
///
/// # Errors
/// A database error.
pub async fn read_models(
    pool: &PgPool,
) -> Result<BTreeMap<&'static str, Vec<String>>, sqlx::Error> {
    let mut out = BTreeMap::new();
    for (table, _) in READ_MODELS {
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT to_jsonb(t)::text FROM {table} t ORDER BY 1"
        ))
        .fetch_all(pool)
        .await?;
        out.insert(table, rows);
    }
    Ok(out)
}

/// The differences between the read models before and after a rebuild.
pub fn compare_read_models(
    live: &BTreeMap<&'static str, Vec<String>>,
    rebuilt: &BTreeMap<&'static str, Vec<String>>,
) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (table, key) in READ_MODELS {
        let a: std::collections::BTreeSet<&String> =
            live.get(table).into_iter().flatten().collect();
        let b: std::collections::BTreeSet<&String> =
            rebuilt.get(table).into_iter().flatten().collect();
        let key_of = |row: &str| {
            serde_json::from_str::<Value>(row)
                .ok()
                .and_then(|v| v.get(key).map(Value::to_string))
                .unwrap_or_default()
        };
        let only_live: Vec<&&String> = a.difference(&b).collect();
        let only_rebuilt: Vec<&&String> = b.difference(&a).collect();
        for row in only_live.iter().take(5) {
            let k = key_of(row);
            let other = only_rebuilt.iter().find(|r| key_of(r) == k);
            violations.push(Violation::new(
                "read_model_differs",
                format!(
                    "{table} {key}={k}: live {row} / rebuilt {}",
                    other.map_or("(no such row)".to_string(), |r| (**r).clone())
                ),
            ));
        }
        for row in only_rebuilt.iter().take(5) {
            let k = key_of(row);
            if !only_live.iter().any(|r| key_of(r) == k) {
                violations.push(Violation::new(
                    "read_model_differs",
                    format!("{table} {key}={k}: missing from the live model; rebuilt {row}"),
                ));
            }
        }
        if only_live.len() + only_rebuilt.len() > 10 {
            violations.push(Violation::new(
                "read_model_differs",
                format!(
                    "{table}: {} live rows and {} rebuilt rows differ in all",
                    only_live.len(),
                    only_rebuilt.len()
                ),
            ));
        }
    }
    violations
}
