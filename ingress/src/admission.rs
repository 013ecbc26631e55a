//! How often a node may connect, one hello of a node at a time, and how
//! often a node's refused frames are told in the log and the timeline.
//!
//! Every connection that says a valid `hello` costs a `NodeConnected`
//! event and a round of reconciliation, so an agent that reconnects in a
//! loop (or a token in the hands of someone who opens 200 connections at
//! once) must not turn into 200 events. Per node, this process keeps:
//!
//! - a token bucket of connects ([`ConnectLimits`]): a hello beyond it is
//!   answered `error{code: "rate_limited"}` saying when to come back, and
//!   appends nothing;
//! - a turn: the hellos of one node are handled one after the other, from
//!   the check of the node to the `welcome`, so two sessions of one node
//!   never race to append `NodeConnected` (the later one replaces the
//!   earlier, as a reconnect does);
//! - a token bucket of notices ([`NOTICE_BURST`], one more every
//!   [`NOTICE_EVERY`]): each refused report, chunk or request takes one to
//!   be written to the log (and, for a report refused for good, to the
//!   task's timeline); past it refusals are only counted, and the next
//!   notice says how many were left out.
//!
//! The state lives in this process only: with several ingress replicas a
//! node may connect once per bucket on each, and the event store's
//! optimistic concurrency orders their writes. Entries of nodes whose
//! buckets are full again are dropped as the map grows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use std::time::Instant;

use uuid::Uuid;

/// How often one node may connect to one ingress process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectLimits {
    /// Connects allowed at once after a quiet time.
    pub burst: u32,
    /// After the burst, one more connect per this long.
    pub every: Duration,
}

impl Default for ConnectLimits {
    /// Five at once, then one every 10 s: an agent reconnecting after a
    /// dropped session never waits, one in a loop appends at most six
    /// `NodeConnected` a minute.
    fn default() -> Self {
        Self {
            burst: 5,
            every: Duration::from_secs(10),
        }
    }
}

/// Refusals of one node told at once after a quiet time.
pub const NOTICE_BURST: u32 = 10;

/// After [`NOTICE_BURST`], one more refusal told per this long.
pub const NOTICE_EVERY: Duration = Duration::from_secs(6);

/// Entries kept before the first sweep of idle ones.
const SWEEP_AT: usize = 1024;

/// A token bucket that starts full.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            at: now,
        }
    }

    fn refill(&mut self, burst: u32, every: Duration, now: Instant) {
        let per_s = 1.0 / every.as_secs_f64().max(1e-3);
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * per_s;
        self.tokens = (self.tokens + gained).min(f64::from(burst));
        self.at = now;
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, burst: u32, every: Duration, now: Instant) -> Result<(), Duration> {
        self.refill(burst, every, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(every.mul_f64(1.0 - self.tokens))
        }
    }

    fn is_full(mut self, burst: u32, every: Duration, now: Instant) -> bool {
        self.refill(burst, every, now);
        self.tokens >= f64::from(burst)
    }
}

/// One node's entry.
#[derive(Debug)]
struct Gate {
    connects: Bucket,
    notices: Bucket,
    /// Refusals not told since the last notice.
    untold: u64,
    /// Held by the hello being handled.
    turn: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug, Default)]
struct Gates {
    nodes: HashMap<Uuid, Gate>,
    sweep_at: usize,
}

/// Per-node connect limits, turns and notice limits of this process.
/// Cheap to clone; clones share the state.
#[derive(Debug, Clone, Default)]
pub(crate) struct Admission {
    limits: ConnectLimits,
    gates: Arc<Mutex<Gates>>,
}

impl Admission {
    /// Admission with `limits` on connects.
    pub(crate) fn new(limits: ConnectLimits) -> Self {
        Self {
            limits,
            gates: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Gates> {
        // Every section leaves the map consistent.
        self.gates.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on node `node_id`'s entry at `now`, made if missing;
    /// sweeps idle entries as the map grows.
    fn with_gate<T>(&self, node_id: Uuid, now: Instant, f: impl FnOnce(&mut Gate) -> T) -> T {
        let limits = self.limits;
        let mut gates = self.lock();
        if gates.nodes.len() >= gates.sweep_at.max(SWEEP_AT) {
            gates.nodes.retain(|_, g| {
                let idle = g.untold == 0
                    && Arc::strong_count(&g.turn) == 1
                    && g.connects.is_full(limits.burst, limits.every, now)
                    && g.notices.is_full(NOTICE_BURST, NOTICE_EVERY, now);
                !idle
            });
            gates.sweep_at = gates.nodes.len() * 2;
        }
        let gate = gates.nodes.entry(node_id).or_insert_with(|| Gate {
            connects: Bucket::full(limits.burst, now),
            notices: Bucket::full(NOTICE_BURST, now),
            untold: 0,
            turn: Arc::default(),
        });
        f(gate)
    }

    /// Lets node `node_id` connect now: its turn, to hold until the agent
    /// is welcomed.
    ///
    /// # Errors
    /// How long until it may connect again, when it connected too often.
    pub(crate) fn admit(&self, node_id: Uuid) -> Result<Arc<tokio::sync::Mutex<()>>, Duration> {
        self.admit_at(node_id, Instant::now())
    }

    fn admit_at(
        &self,
        node_id: Uuid,
        now: Instant,
    ) -> Result<Arc<tokio::sync::Mutex<()>>, Duration> {
        let ConnectLimits { burst, every } = self.limits;
        self.with_gate(node_id, now, |gate| {
            gate.connects.take(burst, every, now)?;
            Ok(Arc::clone(&gate.turn))
        })
    }

    /// Whether a refusal of node `node_id` may be told now: `Some(n)` with
    /// the number of refusals left untold before it, `None` (and one more
    /// untold) when the node's refusals were told too often.
    pub(crate) fn notice(&self, node_id: Uuid) -> Option<u64> {
        self.notice_at(node_id, Instant::now())
    }

    fn notice_at(&self, node_id: Uuid, now: Instant) -> Option<u64> {
        self.with_gate(node_id, now, |gate| {
            match gate.notices.take(NOTICE_BURST, NOTICE_EVERY, now) {
                Ok(()) => Some(std::mem::take(&mut gate.untold)),
                Err(_) => {
                    gate.untold += 1;
                    None
                }
            }
        })
    }

    /// How many nodes have an entry.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_connects_its_burst_then_at_the_rate() {
        let admission = Admission::new(ConnectLimits {
            burst: 2,
            every: Duration::from_secs(10),
        });
        let node = Uuid::from_u128(1);
        let t0 = Instant::now();
        assert!(admission.admit_at(node, t0).is_ok());
        assert!(admission.admit_at(node, t0).is_ok());
        let wait = admission.admit_at(node, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10));
        // Another node is not held back.
        assert!(admission.admit_at(Uuid::from_u128(2), t0).is_ok());
        let wait = admission
            .admit_at(node, t0 + Duration::from_secs(4))
            .unwrap_err();
        assert!(wait <= Duration::from_secs(6) && wait > Duration::from_secs(5));
        let t1 = t0 + Duration::from_secs(10);
        assert!(admission.admit_at(node, t1).is_ok());
        assert!(admission.admit_at(node, t1).is_err());
    }

    #[test]
    fn refusals_past_the_burst_are_counted_and_told_with_the_next_notice() {
        let admission = Admission::default();
        let node = Uuid::from_u128(1);
        let t0 = Instant::now();
        for _ in 0..NOTICE_BURST {
            assert_eq!(admission.notice_at(node, t0), Some(0));
        }
        for _ in 0..7 {
            assert_eq!(admission.notice_at(node, t0), None);
        }
        let t1 = t0 + NOTICE_EVERY;
        assert_eq!(admission.notice_at(node, t1), Some(7));
        assert_eq!(admission.notice_at(node, t1), None);
    }

    #[test]
    fn idle_nodes_are_forgotten_as_the_map_grows() {
        let admission = Admission::default();
        let t0 = Instant::now();
        let busy = Uuid::from_u128(u128::MAX);
        let turn = admission.admit_at(busy, t0).unwrap();
        for n in 1..SWEEP_AT as u128 {
            admission.admit_at(Uuid::from_u128(n), t0).unwrap();
        }
        assert_eq!(admission.len(), SWEEP_AT);
        let later = t0 + Duration::from_secs(3600);
        admission.admit_at(Uuid::from_u128(0), later).unwrap();
        // The busy node (its turn held) and the newest stay.
        assert_eq!(admission.len(), 2);
        drop(turn);
    }
}
