//! The outbox consumer: delivers what the log asks of the nodes connected
//! to this process.
//!
//! It starts at the head of the outbox, with its checkpoint in memory only:
//! whatever happened before is picked up by each session when it connects
//! (see [`crate::commands`]). Sessions read their pending commands only
//! after the consumer's starting point is fixed, so no event falls between
//! the two. Per batch it reacts to
//!
//! - `TaskAssigned` to a node connected here, and `TaskCancelRequested`:
//!   the task is loaded once per batch and what its *current* state wants
//!   of its node is sent (see [`crate::commands::wanted`]);
//! - `NodeHostSshRequested` for a node connected here: the host command
//!   goes to its session (see [`crate::host_ssh`]);
//! - `TaskLost` and `TaskTimedOut`: the attempt's node, if connected here,
//!   gets `cancel_task`, so a container the platform gave up on (the
//!   watchdog timed it out, or the node was presumed gone) stops;
//! - `NodeTokenRevoked`: the node's session is closed at once;
//! - `NodeConnected` with another session than ours, and
//!   `NodeMarkedOffline`, newer than our session's `NodeConnected`: ours is
//!   stale and is closed (the agent reconnects if it is still there).
//!
//! A task whose events this version cannot read (its aggregate does not
//! load) cannot be delivered: the event that asked for it is recorded as a
//! dead letter of the consumer [`CONSUMER`] and passed over, so the other
//! tasks' commands still go out. A database that cannot be reached fails
//! the batch, which is tried again.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use domain::task::Task;
use futures::StreamExt;
use store::outbox::{self, Checkpoint, RecordedEvent};
use store::{StoreError, Wakeup};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::commands::{self, PendingError};
use crate::registry::Ending;
use crate::Ingress;

/// Events read per batch.
pub(crate) const BATCH: i64 = 500;

/// The consumer name of the ingress's dead letters.
pub const CONSUMER: &str = "ingress";

/// Tasks loaded at once while delivering one batch.
pub(crate) const LOADS_IN_FLIGHT: usize = 8;

/// Follows the outbox for `ingress`, forever: [`Ingress::deliver_once`]
/// whenever the log may have grown. Errors are logged and retried after a
/// pause.
pub(crate) async fn follow(ingress: &Ingress) {
    let pool = ingress.store().pool().clone();
    while let Err(e) = ingress.start_point().await {
        tracing::warn!(error = %e, "reading the outbox head failed; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut local = outbox::local_events(ingress.store().pool());
    let mut wake = Wakeup::new(pool, ingress.config().poll).await;
    loop {
        deliver_local(ingress, &mut local).await;
        if let Err(e) = ingress.deliver_once().await {
            tracing::warn!(error = %e, "delivering commands failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        } else if ingress.held_back.load(Ordering::Relaxed) {
            // Committed events wait behind an older transaction, which may
            // end without notifying anyone: look again shortly.
            wake.soon();
        }
        wake.wait().await;
    }
}

/// The most assignments remembered as delivered early; past it the
/// memory is dropped (the outbox's copies are then sent again, which
/// agents ignore).
const SENT_EARLY: usize = 10_000;

/// Delivers the assignments this process just committed (a scheduler
/// leading here) to nodes connected here, before the outbox shows them,
/// and remembers them so the outbox's copies are not sent again. Anything
/// that fails here is left to the outbox path.
async fn deliver_local(ingress: &Ingress, local: &mut outbox::LocalEvents) {
    let mut assigned = Vec::new();
    loop {
        let event = match local.try_recv() {
            Ok(e) => e,
            Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => break,
        };
        if event.aggregate_type != "task" || event.event_type != "TaskAssigned" {
            continue;
        }
        let Ok(task_id) = Uuid::try_parse(&event.aggregate_id) else {
            continue;
        };
        let node = serde_json::from_str::<serde_json::Value>(&event.payload)
            .ok()
            .and_then(|p| p.get("Assigned").and_then(commands::assigned_node));
        if let Some(node) = node.filter(|n| ingress.registry.contains(*n)) {
            assigned.push((task_id, event.sequence, node));
        }
    }
    // The outbox path got to some first.
    assigned.retain(|(task_id, sequence, _)| {
        !ingress
            .sent_early
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(*task_id, *sequence))
    });
    let grace_s = ingress.config().cancel_grace_s;
    let none_running = HashSet::new();
    let store = ingress.store();
    let mut loaded = futures::stream::iter(assigned)
        .map(|(task_id, sequence, node)| async move {
            (
                task_id,
                sequence,
                node,
                commands::task_since(store, task_id, sequence).await,
            )
        })
        .buffered(LOADS_IN_FLIGHT);
    while let Some((task_id, sequence, node, task)) = loaded.next().await {
        // Anything failing here is left unmarked, for the outbox path.
        let Ok(Some(task)) = task else { continue };
        if task.node_id != Some(node) {
            continue;
        }
        for command in commands::wanted(&task, node, &none_running, grace_s) {
            ingress.registry.send(node, &command.frame);
        }
        first_to_deliver(ingress, task_id, sequence);
    }
}

/// Whether assignment `sequence` of `task_id` is met here for the first
/// time, by the outbox path or the local one: the second to meet it leaves
/// it (its commands were sent by the first). An assignment only one path
/// meets (committed by another process, or missed locally) stays
/// remembered until [`SENT_EARLY`] are, then all are forgotten.
fn first_to_deliver(ingress: &Ingress, task_id: Uuid, sequence: i64) -> bool {
    let mut met = ingress.sent_early.lock().unwrap_or_else(|e| e.into_inner());
    if met.remove(&(task_id, sequence)) {
        return false;
    }
    if met.len() >= SENT_EARLY {
        met.clear();
    }
    met.insert((task_id, sequence));
    true
}

/// Reads and handles one batch after `after`; returns where it ended and
/// how many events it read, or `None` when there was nothing new.
///
/// # Errors
/// A database error; the batch is handled again from `after` next time
/// (what was already sent is sent again, which agents ignore).
pub(crate) async fn run_once(
    ingress: &Ingress,
    after: Checkpoint,
) -> Result<Option<(Checkpoint, usize)>, PendingError> {
    let (events, held) = outbox::read_after_held(ingress.store().pool(), after, BATCH).await?;
    ingress.held_back.store(held, Ordering::Relaxed);
    let Some(last) = events.last().map(RecordedEvent::checkpoint) else {
        return Ok(None);
    };
    let mut tasks: Vec<(Uuid, usize, i64)> = Vec::new();
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    let mut given_up = Vec::new();
    for (i, event) in events.iter().enumerate() {
        if let Some(task_id) = handle(ingress, event) {
            match seen.entry(task_id) {
                Entry::Occupied(at) => tasks[*at.get()].2 = event.sequence,
                Entry::Vacant(at) => {
                    at.insert(tasks.len());
                    tasks.push((task_id, i, event.sequence));
                }
            }
        }
        if let Some((task_id, attempt)) = given_up_attempt(ingress, event) {
            given_up.push((task_id, attempt, event));
        }
    }
    deliver(ingress, &events, tasks).await?;
    stop(ingress, given_up).await?;
    Ok(Some((last, events.len())))
}

/// The task and attempt of a `TaskLost` or `TaskTimedOut`, when some node
/// is connected here.
fn given_up_attempt(ingress: &Ingress, event: &RecordedEvent) -> Option<(Uuid, u32)> {
    if event.aggregate_type != "task"
        || !matches!(event.event_type.as_str(), "TaskLost" | "TaskTimedOut")
        || ingress.registry.len() == 0
    {
        return None;
    }
    let task_id = Uuid::try_parse(&event.aggregate_id).ok()?;
    let attempt = event.body().get("attempt")?.as_u64()?;
    Some((task_id, u32::try_from(attempt).ok()?))
}

/// Whether loading `task_id` failed for good: its stored events do not
/// fit this version. Then the `event` that asked for it is recorded as a
/// dead letter and passed over; otherwise the error fails the batch.
async fn unreadable(
    ingress: &Ingress,
    task_id: Uuid,
    event: &RecordedEvent,
    error: PendingError,
) -> Result<(), PendingError> {
    let store = ingress.store();
    let Err(StoreError::Corrupt(why)) = store.load::<Task>(&task_id.to_string()).await else {
        return Err(error);
    };
    tracing::error!(
        %task_id,
        position = event.position,
        event_type = %event.event_type,
        error = %why,
        "a task's events cannot be read; its commands cannot be delivered"
    );
    store::dead_letters::record(store.pool(), CONSUMER, event, &error.to_string()).await?;
    Ok(())
}

/// Sends `cancel_task` for given-up attempts to their nodes connected here.
async fn stop(
    ingress: &Ingress,
    attempts: Vec<(Uuid, u32, &RecordedEvent)>,
) -> Result<(), PendingError> {
    let grace_s = ingress.config().cancel_grace_s;
    for (task_id, attempt, event) in attempts {
        let task = match commands::load_task(ingress.store(), task_id).await {
            Ok(task) => task,
            Err(e) => {
                unreadable(ingress, task_id, event, e).await?;
                continue;
            }
        };
        let Some(task) = task else {
            continue;
        };
        if let Some((node_id, command)) = commands::stop_given_up(&task, attempt, grace_s) {
            if ingress.registry.send(node_id, &command.frame) {
                tracing::info!(%node_id, %task_id, attempt, "asking the node to stop an attempt the platform gave up");
            }
        }
    }
    Ok(())
}

/// Acts on a node event; returns the task a task event may concern.
fn handle(ingress: &Ingress, event: &RecordedEvent) -> Option<Uuid> {
    let registry = &ingress.registry;
    let id = Uuid::try_parse(&event.aggregate_id).ok()?;
    match (event.aggregate_type.as_str(), event.event_type.as_str()) {
        ("task", "TaskAssigned") => commands::assigned_node(event.body())
            .filter(|node| registry.contains(*node))
            .filter(|_| first_to_deliver(ingress, id, event.sequence))
            .map(|_| id),
        ("task", "TaskCancelRequested") => (registry.len() > 0).then_some(id),
        ("node", "NodeTokenRevoked") => {
            registry.close(id, |_, _| true, Ending::Revoked);
            None
        }
        ("node", "NodeConnected") => {
            let theirs = event
                .body()
                .get("session")
                .and_then(|s| s.as_str())
                .and_then(|s| Uuid::try_parse(s).ok());
            registry.close(
                id,
                |ours, connected_seq| Some(ours) != theirs && event.sequence > connected_seq,
                Ending::Replaced,
            );
            None
        }
        ("node", "NodeHostSshRequested") => {
            if registry.contains(id) {
                if let Some(pending) = crate::host_ssh::Pending::requested(event) {
                    registry.send_host_ssh(id, pending);
                }
            }
            None
        }
        ("node", "NodeMarkedOffline") => {
            registry.close(
                id,
                |_, connected_seq| event.sequence > connected_seq,
                Ending::Offline,
            );
            None
        }
        _ => None,
    }
}

/// Sends what each task's current state wants of its node, if that node is
/// connected here.
/// `tasks` are task ids with the index in `events` of the first event
/// that named them and the sequence of the last: each task's state is
/// taken as of that event or later, as this process remembers it when it
/// appended that far itself (see [`commands::task_since`]), else loaded.
async fn deliver(
    ingress: &Ingress,
    events: &[RecordedEvent],
    tasks: Vec<(Uuid, usize, i64)>,
) -> Result<(), PendingError> {
    let store = ingress.store();
    let mut loaded = futures::stream::iter(tasks)
        .map(|(task_id, i, sequence)| async move {
            (
                task_id,
                i,
                commands::task_since(store, task_id, sequence).await,
            )
        })
        .buffered(LOADS_IN_FLIGHT);
    let none_running = HashSet::new();
    while let Some((task_id, i, task)) = loaded.next().await {
        let task = match task {
            Ok(task) => task,
            Err(e) => match events.get(i) {
                Some(event) => {
                    unreadable(ingress, task_id, event, e).await?;
                    continue;
                }
                None => return Err(e),
            },
        };
        let Some(task) = task else { continue };
        let Some(node_id) = task.node_id.filter(|n| ingress.registry.contains(*n)) else {
            continue;
        };
        let grace_s = ingress.config().cancel_grace_s;
        for command in commands::wanted(&task, node_id, &none_running, grace_s) {
            if ingress.registry.send(node_id, &command.frame) {
                tracing::debug!(%node_id, task_id = %command.task_id, kind = command.kind, "command queued");
            }
        }
    }
    Ok(())
}
