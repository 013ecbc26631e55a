//! The sessions this process holds, by node.
//!
//! The outbox consumer and newer sessions reach a session only through the
//! small channel kept here; the session's own task owns its socket. Only
//! the registry holds a session's sender, so taking an entry out of the map
//! also ends the session: its receiver yields whatever was queued and then
//! `None`.
//!
//! The map sits behind a `std::sync::Mutex`, not a Tokio one: no
//! asynchronous operation ever runs while it is held, and every critical
//! section is a map lookup and a `try_send`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;
use uuid::Uuid;

/// Room for commands queued for one session. A session drains its queue as
/// fast as its socket takes frames; one that falls this far behind is
/// closed (its agent reconnects and gets every pending command again), so
/// a stuck agent never holds the consumer back.
pub(crate) const QUEUE: usize = 16;

/// Why the server ends a session from outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The node connected again, here or through another ingress.
    Replaced,
    /// The node's token was revoked.
    Revoked,
    /// The platform marked the node offline while this session was open:
    /// the agent must connect again to be online.
    Offline,
    /// This process is stopping.
    ShuttingDown,
}

/// Something for a session to do, sent by others.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// Send this encoded server frame.
    Frame(Box<str>),
    /// Close the session.
    Close(Ending),
}

struct Entry {
    session: Uuid,
    /// The sequence number of the session's `NodeConnected` in the node's
    /// stream: node events at or before it predate the session.
    connected_seq: i64,
    tx: mpsc::Sender<Outgoing>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<Uuid, Entry>,
    closing: bool,
}

/// The sessions of this process, by node id. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    state: Arc<Mutex<State>>,
}

/// The registry is closing: this process is shutting down.
#[derive(Debug)]
pub(crate) struct ShuttingDown;

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent map (every
        // section is a single insert, remove or lookup), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `session` as node `node_id`'s session here. An older
    /// session of the node in this process is told it was replaced.
    ///
    /// # Errors
    /// [`ShuttingDown`] once [`Registry::close_all`] was called.
    pub(crate) fn register(
        &self,
        node_id: Uuid,
        session: Uuid,
        connected_seq: i64,
    ) -> Result<mpsc::Receiver<Outgoing>, ShuttingDown> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut state = self.lock();
        if state.closing {
            return Err(ShuttingDown);
        }
        let entry = Entry {
            session,
            connected_seq,
            tx,
        };
        if let Some(old) = state.sessions.insert(node_id, entry) {
            let _ = old.tx.try_send(Outgoing::Close(Ending::Replaced));
        }
        Ok(rx)
    }

    /// Forgets `session` if it is still node `node_id`'s session here.
    pub(crate) fn unregister(&self, node_id: Uuid, session: Uuid) {
        let mut state = self.lock();
        if state.sessions.get(&node_id).map(|e| e.session) == Some(session) {
            state.sessions.remove(&node_id);
        }
    }

    /// Whether node `node_id` has a session here.
    pub(crate) fn contains(&self, node_id: Uuid) -> bool {
        self.lock().sessions.contains_key(&node_id)
    }

    /// How many sessions are registered.
    pub(crate) fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Queues `frame` for node `node_id`'s session, if it has one here.
    /// A session whose queue is full is dropped. Returns whether the frame
    /// was queued.
    pub(crate) fn send(&self, node_id: Uuid, frame: &str) -> bool {
        let mut state = self.lock();
        let Some(entry) = state.sessions.get(&node_id) else {
            return false;
        };
        match entry.tx.try_send(Outgoing::Frame(frame.into())) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(%node_id, "agent is not reading its commands; closing its session");
                state.sessions.remove(&node_id);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                state.sessions.remove(&node_id);
                false
            }
        }
    }

    /// Ends node `node_id`'s session here when `which` says it should.
    pub(crate) fn close(&self, node_id: Uuid, which: impl FnOnce(Uuid, i64) -> bool, why: Ending) {
        let mut state = self.lock();
        let Some(entry) = state.sessions.get(&node_id) else {
            return;
        };
        if !which(entry.session, entry.connected_seq) {
            return;
        }
        if let Some(entry) = state.sessions.remove(&node_id) {
            let _ = entry.tx.try_send(Outgoing::Close(why));
        }
    }

    /// Refuses new sessions from now on and asks every current one to
    /// close. Each stays registered until its task has said goodbye, so
    /// [`Registry::len`] tells when all are gone.
    pub(crate) fn close_all(&self) {
        let mut state = self.lock();
        state.closing = true;
        state.sessions.retain(|_, entry| {
            // A session too busy to take the request is dropped instead.
            entry
                .tx
                .try_send(Outgoing::Close(Ending::ShuttingDown))
                .is_ok()
        });
    }
}
