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
    /// Send this host command, if the agent can run it and it is not too
    /// late (the session decides, at the moment of sending).
    HostSsh(Box<crate::host_ssh::Pending>),
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
        self.push(node_id, Outgoing::Frame(frame.into()))
    }

    /// Queues host command `pending` for node `node_id`'s session, if it
    /// has one here, like [`Registry::send`].
    pub(crate) fn send_host_ssh(&self, node_id: Uuid, pending: crate::host_ssh::Pending) -> bool {
        self.push(node_id, Outgoing::HostSsh(Box::new(pending)))
    }

    fn push(&self, node_id: Uuid, out: Outgoing) -> bool {
        let mut state = self.lock();
        let Some(entry) = state.sessions.get(&node_id) else {
            return false;
        };
        match entry.tx.try_send(out) {
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
    /// [`Registry::len`] tells when all are gone. Returns the sessions
    /// asked, as (node, session): their ends are for the caller to record.
    pub(crate) fn close_all(&self) -> Vec<(Uuid, Uuid)> {
        let mut state = self.lock();
        state.closing = true;
        let mut asked = Vec::with_capacity(state.sessions.len());
        state.sessions.retain(|node_id, entry| {
            // A session too busy to take the request is dropped instead
            // (and records its own end).
            let taken = entry
                .tx
                .try_send(Outgoing::Close(Ending::ShuttingDown))
                .is_ok();
            if taken {
                asked.push((*node_id, entry.session));
            }
            taken
        });
        asked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed_with(rx: &mut mpsc::Receiver<Outgoing>) -> Option<Ending> {
        match rx.try_recv() {
            Ok(Outgoing::Close(why)) => Some(why),
            _ => None,
        }
    }

    #[test]
    fn a_second_session_of_a_node_replaces_the_first() {
        let registry = Registry::default();
        let node = Uuid::from_u128(1);
        let mut first = registry.register(node, Uuid::from_u128(10), 2).unwrap();
        let _second = registry.register(node, Uuid::from_u128(11), 3).unwrap();
        assert_eq!(closed_with(&mut first), Some(Ending::Replaced));
        assert_eq!(registry.len(), 1);
        // The first one leaving does not take the second one's place away.
        registry.unregister(node, Uuid::from_u128(10));
        assert!(registry.contains(node));
        registry.unregister(node, Uuid::from_u128(11));
        assert!(!registry.contains(node));
    }

    #[test]
    fn close_asks_the_session_itself_before_ending_it() {
        let registry = Registry::default();
        let node = Uuid::from_u128(1);
        let mut rx = registry.register(node, Uuid::from_u128(10), 5).unwrap();
        registry.close(node, |_, seq| 4 > seq, Ending::Replaced);
        assert!(registry.contains(node));
        registry.close(node, |_, seq| 6 > seq, Ending::Offline);
        assert!(!registry.contains(node));
        assert_eq!(closed_with(&mut rx), Some(Ending::Offline));
    }

    #[test]
    fn a_session_that_stops_reading_is_dropped_not_waited_for() {
        let registry = Registry::default();
        let node = Uuid::from_u128(1);
        let mut rx = registry.register(node, Uuid::from_u128(10), 1).unwrap();
        for _ in 0..QUEUE {
            assert!(registry.send(node, "{}"));
        }
        assert!(!registry.send(node, "{}"));
        assert!(!registry.contains(node));
        // It still gets what was queued, then the end of its queue.
        for _ in 0..QUEUE {
            assert!(matches!(rx.try_recv(), Ok(Outgoing::Frame(_))));
        }
        assert!(matches!(
            rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn after_close_all_no_session_may_register() {
        let registry = Registry::default();
        let mut rx = registry
            .register(Uuid::from_u128(1), Uuid::from_u128(10), 1)
            .unwrap();
        let asked = registry.close_all();
        assert_eq!(asked, vec![(Uuid::from_u128(1), Uuid::from_u128(10))]);
        assert_eq!(closed_with(&mut rx), Some(Ending::ShuttingDown));
        // Still counted until the session itself has gone.
        assert_eq!(registry.len(), 1);
        assert!(registry
            .register(Uuid::from_u128(2), Uuid::from_u128(20), 1)
            .is_err());
    }
}
