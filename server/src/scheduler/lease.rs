//! The scheduler's side of the leader's lease ([`store::leader`]): taking
//! it when it has expired, renewing it, and knowing before every decision
//! whether it is still surely held.
//!
//! "Surely" is measured on this process's monotonic clock from the moment
//! a take or renewal was *sent*: the database set the lease's end at least
//! that late, so until `sent + lease` minus a margin nobody else can have
//! taken it. A process frozen past that point (SIGSTOP, a stalled VM)
//! finds the moment passed when it resumes and stands down before it
//! decides anything; whatever it had in flight carries its old term, which
//! the store refuses once a new leader took over.
//!
//! The lease's connections ask the database to drop them when their peer
//! vanishes ([`pool`]), so a leader whose host is gone leaves no session
//! (and no lock) behind for more than a few seconds. On this side (sqlx
//! sets no TCP keepalive of its own) every request about the lease is
//! bounded by a timeout instead, and one that runs out ends the leadership.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

/// A lease held by this process.
#[derive(Debug, Clone, Copy)]
struct Held {
    term: u64,
    /// Until this instant nobody else can hold the lease.
    sure_until: Instant,
    /// When the lease was last taken or renewed (the request's start).
    renewed: Instant,
    /// When the term began, by the scheduler's clock.
    since: DateTime<Utc>,
}

/// This process's claim on the leader's lease.
#[derive(Debug)]
pub(super) struct Leadership {
    pool: PgPool,
    holder: String,
    lease: Duration,
    /// `std::sync::Mutex`, not Tokio's: held only to read or replace the
    /// value, never across an await.
    held: Mutex<Option<Held>>,
}

impl Leadership {
    /// A claim on `pool` for leases of `lease`, not yet leading.
    pub(super) fn new(pool: PgPool, lease: Duration) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "scheduler".into());
        Self {
            pool,
            holder: format!("{host}:{}:{}", std::process::id(), Uuid::new_v4()),
            lease,
            held: Mutex::new(None),
        }
    }

    fn get(&self) -> Option<Held> {
        *self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, held: Option<Held>) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
    }

    /// The margin kept before a lease's end: for the time an assignment
    /// takes to reach the database after its check, and for clocks that
    /// run at slightly different rates.
    fn margin(&self) -> Duration {
        (self.lease / 5).max(Duration::from_millis(200))
    }

    /// How often a held lease is renewed.
    pub(super) fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// How often a standby tries to take the lease.
    pub(super) fn standby_poll(&self) -> Duration {
        (self.lease / 5).clamp(Duration::from_millis(100), Duration::from_secs(2))
    }

    /// Whether this process surely holds the lease of `term` now. Past the
    /// point where it can be sure, it stands down.
    pub(super) fn sure(&self, term: u64) -> bool {
        match self.get() {
            Some(h) if h.term == term && Instant::now() < h.sure_until => true,
            Some(h) if h.term == term => {
                self.step_down("the lease may have run out (its renewal is overdue)");
                false
            }
            _ => false,
        }
    }

    /// When the current term began, while one is held.
    pub(super) fn since(&self) -> Option<DateTime<Utc>> {
        self.get().map(|h| h.since)
    }

    /// The term held, while surely held.
    pub(super) fn term(&self) -> Option<u64> {
        let h = self.get()?;
        self.sure(h.term).then_some(h.term)
    }

    /// Stops leading: nothing more is decided under the term held.
    pub(super) fn step_down(&self, why: &str) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.take() {
            tracing::warn!(term = h.term, why, "scheduler stands down");
        }
    }

    /// Leads if it can: renews a held lease when a renewal is due, or takes
    /// the lease when it has expired. Returns the term held, if any.
    pub(super) async fn keep(&self) -> Option<u64> {
        if let Some(term) = self.term() {
            return self.renew_if_due(term).await.then_some(term);
        }
        self.take().await
    }

    /// Renews the lease of `term` when a renewal is due; whether it is
    /// still held. A renewal that fails, or does not answer within a third
    /// of the lease, ends the leadership: the lease can no longer be
    /// trusted to last.
    pub(super) async fn renew_if_due(&self, term: u64) -> bool {
        let Some(held) = self.get().filter(|h| h.term == term) else {
            return false;
        };
        if held.renewed.elapsed() < self.renew_every() {
            return self.sure(term);
        }
        let sent = Instant::now();
        let renewed = tokio::time::timeout(
            self.renew_every(),
            store::leader::renew(&self.pool, &self.holder, term as i64, self.lease),
        )
        .await;
        match renewed {
            Ok(Ok(true)) => {
                let mut current = self.held.lock().unwrap_or_else(|e| e.into_inner());
                // Stood down meanwhile: a late renewal does not bring the
                // term back.
                if let Some(h) = current.as_mut().filter(|h| h.term == term) {
                    h.renewed = sent;
                    h.sure_until = sent + self.lease - self.margin();
                }
                drop(current);
                self.sure(term)
            }
            Ok(Ok(false)) => {
                self.step_down("another scheduler holds the lease");
                false
            }
            Ok(Err(e)) => {
                self.step_down(&format!("renewing the lease failed: {e}"));
                false
            }
            Err(_) => {
                self.step_down("renewing the lease took too long");
                false
            }
        }
    }

    /// Takes the lease when it has expired (or is still this process's),
    /// starting a new term.
    async fn take(&self) -> Option<u64> {
        let sent = Instant::now();
        let since = Utc::now();
        let taken = tokio::time::timeout(
            self.lease,
            store::leader::take(&self.pool, &self.holder, self.lease),
        )
        .await;
        let term = match taken {
            Ok(Ok(Some(term))) => term.max(0) as u64,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot reach the scheduler lease");
                return None;
            }
            Err(_) => return None,
        };
        self.set(Some(Held {
            term,
            sure_until: sent + self.lease - self.margin(),
            renewed: sent,
            since,
        }));
        tracing::info!(term, holder = %self.holder, "scheduler leads");
        self.sure(term).then_some(term)
    }

    /// Gives the lease up, so that a standby takes over at once.
    pub(super) async fn release(&self) {
        let Some(held) = self.get() else { return };
        self.set(None);
        if let Err(e) = store::leader::release(&self.pool, &self.holder, held.term as i64).await {
            tracing::warn!(error = %e, "releasing the scheduler lease failed");
        }
    }
}

/// A pool for the scheduler, on `options`, whose sessions the database
/// ends within about `lease / 2` of their peer vanishing (TCP keepalives
/// and `tcp_user_timeout`, set per session on the server) and which are
/// never left idle inside a transaction for that long: a frozen or vanished
/// leader holds no lock that would keep a new leader waiting.
pub(super) fn pool(options: &PgConnectOptions, lease: Duration) -> PgPool {
    let gone_ms = (lease.as_millis() / 2).max(1000);
    let idle_s = (lease.as_secs() / 5).max(1);
    let options = options.clone().options([
        ("tcp_keepalives_idle", idle_s.to_string()),
        ("tcp_keepalives_interval", "1".to_string()),
        ("tcp_keepalives_count", "3".to_string()),
        ("tcp_user_timeout", gone_ms.to_string()),
        ("idle_in_transaction_session_timeout", gone_ms.to_string()),
    ]);
    store::pool_options()
        .max_connections(8)
        .connect_lazy_with(options)
}
