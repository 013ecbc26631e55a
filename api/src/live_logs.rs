//! Live task output: the Server-Sent Events behind
//! `GET /api/v1/tasks/{id}/logs?follow=true`.
//!
//! Output rows are not events, so the outbox does not announce them: the
//! ingress NOTIFYs [`store::task_log::CHANNEL`] with a task's id after
//! storing its output or the final report of one of its attempts. One
//! [`LogFollowers`] per process LISTENs on one connection, started with the
//! first follower, and fans each notification out to that task's followers
//! through a `watch` channel. A follower holds no database connection while
//! it waits; it reads when woken, or every [`POLL`] in case a notification
//! was lost (and all are woken when the listening connection drops).
//!
//! A stream reads one page of at most [`PAGE_BYTES`] at a time and only
//! when the client has taken the previous one, so the server's memory per
//! follower stays flat whatever the size of the output or the speed of the
//! client.
//!
//! Each `log` event's id is `<attempt>:<next offset>`; a client that
//! reconnects with it as `Last-Event-ID` gets exactly the rest. The stream
//! ends with an `end` event once the attempt has ended and everything it
//! stored has been sent. That rule is the one of the JSON route's
//! `complete`: an agent reports an attempt's output before its final
//! state, the ingress handles a connection's frames in order and stops at
//! the first it cannot store, so once the final state is in the log,
//! reading after seeing it finds all the output.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use axum::http::{header, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use domain::task::Task;
use serde::Serialize;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::limits::StreamSlot;
use crate::{access, AppState};

/// The most output one `log` event carries.
pub const PAGE_BYTES: usize = 256 * 1024;

/// How often a waiting follower looks without being woken.
pub const POLL: Duration = Duration::from_secs(3);

/// How often an idle stream sends a comment, so proxies keep it open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The least time between two reads of one follower woken by
/// notifications: a task printing without pause makes each follower read
/// a few times a second, not at every notification.
pub const MIN_READ_INTERVAL: Duration = Duration::from_millis(200);

/// How often a caught-up follower's access to the task's project is
/// checked again (in between, only the task is looked at).
pub const ACCESS_RECHECK: Duration = Duration::from_secs(10);

/// How long the listener waits before connecting again after a failure.
const RELISTEN: Duration = Duration::from_secs(1);

/// The wake-ups of this process's log followers. Cheap to clone.
#[derive(Clone)]
pub struct LogFollowers {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    /// Per followed task, a counter bumped at each wake-up. Entries go
    /// when their last follower has.
    tasks: Mutex<Tasks>,
    /// Set to end every stream (the server is shutting down).
    stop: watch::Sender<bool>,
}

#[derive(Default)]
struct Tasks {
    senders: HashMap<Uuid, watch::Sender<u64>>,
    /// Whether the listener runs.
    listening: bool,
    /// The map's size after its last sweep: sweep again at twice that.
    swept: usize,
}

impl std::fmt::Debug for LogFollowers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogFollowers").finish_non_exhaustive()
    }
}

impl LogFollowers {
    /// Followers on `pool`; nothing runs until the first one subscribes.
    pub fn new(pool: PgPool) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                tasks: Mutex::new(Tasks::default()),
                stop: watch::channel(false).0,
            }),
        }
    }

    /// Ends every stream at its next step; streams that start later end
    /// at once. Called when the server shuts down, so open streams do not
    /// hold it up: clients reconnect elsewhere with their last event id.
    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
    }

    /// A receiver that changes whenever `task_id`'s output may have grown;
    /// starts the listener if it does not run.
    fn subscribe(&self, task_id: Uuid) -> watch::Receiver<u64> {
        let mut tasks = self.inner.lock();
        if !tasks.listening {
            tasks.listening = true;
            tokio::spawn(listen(Arc::downgrade(&self.inner)));
        }
        if tasks.senders.len() >= (tasks.swept * 2).max(64) {
            tasks.senders.retain(|_, s| s.receiver_count() > 0);
            tasks.swept = tasks.senders.len();
        }
        tasks
            .senders
            .entry(task_id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// How many tasks have followers in this process.
    pub fn followed(&self) -> usize {
        self.inner
            .lock()
            .senders
            .values()
            .filter(|s| s.receiver_count() > 0)
            .count()
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self, task_id: Uuid) {
        let mut tasks = self.lock();
        if let Some(sender) = tasks.senders.get(&task_id) {
            if sender.receiver_count() == 0 {
                tasks.senders.remove(&task_id);
            } else {
                sender.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    fn wake_all(&self) {
        let mut tasks = self.lock();
        tasks.senders.retain(|_, s| s.receiver_count() > 0);
        for sender in tasks.senders.values() {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// LISTENs for the ingress's notifications and wakes the followers of
/// each task named, until the [`LogFollowers`] are gone. After a lost
/// connection every follower is woken, since notifications may have been
/// missed meanwhile.
async fn listen(inner: Weak<Inner>) {
    loop {
        let Some(pool) = inner.upgrade().map(|i| i.pool.clone()) else {
            return;
        };
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "log followers cannot LISTEN; they poll meanwhile");
                drop(pool);
                tokio::time::sleep(RELISTEN).await;
                continue;
            }
        };
        drop(pool);
        if let Err(e) = listener.listen(store::task_log::CHANNEL).await {
            tracing::warn!(error = %e, "log followers cannot LISTEN; they poll meanwhile");
            tokio::time::sleep(RELISTEN).await;
            continue;
        }
        if let Some(i) = inner.upgrade() {
            i.wake_all();
        }
        loop {
            let received = listener.try_recv().await;
            let Some(i) = inner.upgrade() else {
                return;
            };
            match received {
                Ok(Some(n)) => match n.payload().parse::<Uuid>() {
                    Ok(task_id) => i.wake(task_id),
                    Err(_) => i.wake_all(),
                },
                Ok(None) => i.wake_all(),
                Err(e) => {
                    tracing::warn!(error = %e, "the log followers' LISTEN failed; listening again");
                    i.wake_all();
                    break;
                }
            }
        }
        tokio::time::sleep(RELISTEN).await;
    }
}

/// Where a stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// The attempt; `None` for the current one, or the first one when the
    /// task has not run yet.
    pub attempt: Option<u32>,
    /// The byte offset in that attempt's output.
    pub offset: u64,
}

/// Parses a `Last-Event-ID` of a `log` or `end` event:
/// `<attempt>:<offset>`.
///
/// # Errors
/// A 400 naming the header when it is not of that form.
pub fn parse_event_id(id: &str) -> Result<Start, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "Last-Event-ID",
            format!("must be <attempt>:<offset> as sent in an event's id, got {id:?}"),
        )
    };
    // Exactly the form of the ids sent: no sign, no leading zero in the
    // attempt.
    let (attempt, offset) = id.trim().split_once(':').ok_or_else(bad)?;
    let digits = |s: &str, most: usize| {
        (1..=most).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(attempt, 9) || attempt.starts_with('0') || !digits(offset, 18) {
        return Err(bad());
    }
    let attempt: u32 = attempt.parse().map_err(|_| bad())?;
    let offset: u64 = offset.parse().map_err(|_| bad())?;
    Ok(Start {
        attempt: Some(attempt),
        offset,
    })
}

/// The event id that resumes after `offset` of `attempt`.
pub fn event_id(attempt: u32, offset: u64) -> String {
    format!("{attempt}:{offset}")
}

/// The data of a `log` event.
#[derive(Debug, Serialize)]
struct LogData<'a> {
    attempt: u32,
    /// Where `data` starts in the attempt's output.
    offset: u64,
    /// Where it ends: the offset to resume from.
    next_offset: u64,
    data: &'a str,
}

/// The data of the `end` event.
#[derive(Debug, Serialize)]
struct EndData<'a> {
    /// 0 when the task ended without ever running.
    attempt: u32,
    /// How the attempt ended: `succeeded`, `failed`, `timed_out`,
    /// `cancelled` or `lost`.
    state: &'a str,
    /// The end of its output.
    next_offset: u64,
    /// What of its output is no longer (or was never) stored, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    removed: Option<crate::schema::task::OutputRemoved>,
}

fn event(kind: &'static str, data: &impl Serialize) -> Event {
    Event::default()
        .event(kind)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().comment("unencodable event"))
}

/// The response of a follow request: the task is known to be visible to
/// `caller`; attempt numbers are checked by the caller. `slot` is held
/// until the stream is dropped.
pub(crate) fn respond(
    state: AppState,
    caller: Caller,
    task_id: Uuid,
    start: Start,
    slot: StreamSlot,
) -> Response {
    let followers = state.log_followers().clone();
    let follow = Follow {
        _slot: slot,
        wake: followers.subscribe(task_id),
        stop: followers.inner.stop.subscribe(),
        state,
        caller,
        task_id,
        attempt: start.attempt,
        offset: start.offset,
        ended: None,
        done: false,
        last_read: Instant::now(),
        access_checked: Some(Instant::now()),
    };
    let stream = futures::stream::unfold(follow, |mut f| async move {
        match f.next_event().await {
            Ok(Some(event)) => Some((Ok::<_, Infallible>(event), f)),
            Ok(None) => None,
            Err(ApiError::NotFound(_)) => None,
            Err(e) => {
                tracing::warn!(task_id = %f.task_id, error = %e, "a log stream ended early");
                None
            }
        }
    });
    let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE));
    // Proxies such as nginx would otherwise hold events back.
    let mut response = sse.into_response();
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One follower's place in one attempt's output.
struct Follow {
    /// The caller's stream slot, given back when the client leaves.
    _slot: StreamSlot,
    state: AppState,
    caller: Caller,
    task_id: Uuid,
    /// `None` until the task has an attempt.
    attempt: Option<u32>,
    /// Where the next event starts.
    offset: u64,
    /// How the attempt ended, once seen: from then on, an empty read means
    /// all its output has been sent.
    ended: Option<String>,
    done: bool,
    wake: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    /// When the output was last read.
    last_read: Instant,
    /// When access was last checked.
    access_checked: Option<Instant>,
}

impl Follow {
    /// The next event, waiting for output as long as it takes; `None` when
    /// the stream is over.
    async fn next_event(&mut self) -> Result<Option<Event>, ApiError> {
        loop {
            if self.done || *self.stop.borrow() {
                return Ok(None);
            }
            // Seen before reading: a wake-up during the read is not lost.
            self.wake.borrow_and_update();
            if let Some(attempt) = self.attempt {
                self.last_read = Instant::now();
                let pool = self.state.pool();
                let rows =
                    store::task_log::page(pool, self.task_id, attempt, self.offset, PAGE_BYTES)
                        .await?;
                let rows: Vec<(i64, String)> =
                    rows.into_iter().map(|c| (c.offset, c.data)).collect();
                let (data, next) =
                    crate::routes::task::logs::assemble(&rows, self.offset, PAGE_BYTES);
                if !data.is_empty() {
                    let start = next - data.len() as u64;
                    self.offset = next;
                    let data = LogData {
                        attempt,
                        offset: start,
                        next_offset: next,
                        data: &data,
                    };
                    return Ok(Some(event("log", &data).id(event_id(attempt, next))));
                }
                if let Some(outcome) = &self.ended {
                    // Nothing will fill a gap any more: go on after it.
                    if let Some((after, _)) = rows.iter().find(|(o, _)| *o as u64 > self.offset) {
                        self.offset = *after as u64;
                        continue;
                    }
                    self.done = true;
                    let removed =
                        crate::routes::task::logs::removed(&self.state, self.task_id, attempt)
                            .await?;
                    let end = EndData {
                        attempt,
                        state: outcome,
                        next_offset: self.offset,
                        removed,
                    };
                    return Ok(Some(event("end", &end).id(event_id(attempt, self.offset))));
                }
            }
            // Caught up: has the attempt ended (or begun)?
            let task = self.task().await?;
            match self.attempt {
                None if task.attempt >= 1 => {
                    self.attempt = Some(task.attempt);
                    continue;
                }
                None if task.state.is_terminal() => {
                    self.done = true;
                    let end = EndData {
                        attempt: 0,
                        state: task.state.as_str(),
                        next_offset: 0,
                        removed: None,
                    };
                    return Ok(Some(event("end", &end)));
                }
                None => {}
                Some(attempt) => {
                    if let Some(outcome) = outcome(&task, attempt) {
                        // Read once more: whatever was stored before the
                        // end was recorded is visible now.
                        self.ended = Some(outcome);
                        continue;
                    }
                }
            }
            self.wait().await;
        }
    }

    /// The task as it is now. The token and access are checked again now
    /// and then, so a revoked token or a member who left the project stops
    /// seeing its output.
    async fn task(&mut self) -> Result<Task, ApiError> {
        if self
            .access_checked
            .is_some_and(|at| at.elapsed() < ACCESS_RECHECK)
        {
            let loaded = self
                .state
                .store()
                .load::<Task>(&self.task_id.to_string())
                .await?;
            return loaded
                .map(|l| l.state)
                .ok_or_else(|| ApiError::not_found("task not found"));
        }
        self.caller = self.caller.refresh(self.state.store()).await?;
        let task = access::task(&self.state, &self.caller, self.task_id)
            .await?
            .task;
        self.access_checked = Some(Instant::now());
        Ok(task)
    }

    /// Waits for a wake-up, the poll interval or the stop.
    async fn wait(&mut self) {
        tokio::select! {
            changed = self.wake.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(POLL).await;
                } else {
                    tokio::time::sleep_until(self.last_read + MIN_READ_INTERVAL).await;
                }
            }
            () = tokio::time::sleep(POLL) => {}
            stopped = self.stop.changed() => {
                if stopped.is_err() {
                    self.done = true;
                }
            }
        }
    }
}

/// How `attempt` of `task` ended, if it has.
fn outcome(task: &Task, attempt: u32) -> Option<String> {
    match task.attempts.iter().find(|a| a.number == attempt) {
        None => Some("unknown".into()),
        Some(a) if a.ended_at.is_some() => {
            Some(a.outcome.clone().unwrap_or_else(|| "ended".into()))
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_round_trip_and_bad_ones_are_refused() {
        assert_eq!(
            parse_event_id(&event_id(3, 1234)).ok(),
            Some(Start {
                attempt: Some(3),
                offset: 1234
            })
        );
        for bad in ["", "3", "0:5", "x:1", "1:-2", "1:2:3"] {
            assert!(parse_event_id(bad).is_err(), "{bad:?}");
        }
    }
}
