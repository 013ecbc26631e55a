//! Log chunks into `task_log`, within bounds the agent cannot talk its way
//! past.
//!
//! - **Whole chains.** A chunk is stored only where it continues the
//!   attempt's stored output (at 0, or exactly where the stored output
//!   ends); one that starts on a stored chunk is a resend and changes
//!   nothing, and one that overlaps the stored end (output read again by
//!   an agent that adopted its container after a restart) adds only its
//!   part past that end. A chunk that would leave a gap is refused. An
//!   honest agent never sends one: it reports in order, a session handles
//!   its frames in order and ends at the first chunk it could not store,
//!   and after a reconnect the agent sends everything unanswered again,
//!   oldest first. So a reader never sees a gap or a byte twice, and an
//!   attempt's stored bytes are exactly where its output ends.
//! - **A size cap per attempt** ([`LogLimits::max_bytes_per_attempt`]).
//!   The chunk that crosses the cap is cut there and [`cut_marker`] is
//!   stored right after the cut; every later chunk is acknowledged, so the
//!   agent forgets it, and dropped. Readers see the marker as the output's
//!   last line and the attempt still completes.
//! - **A rate bound per session** ([`LogLimits::bytes_per_s`]): a token
//!   bucket charged with each stored chunk's bytes plus [`CHUNK_COST`].
//!   When it runs dry the session waits before it answers and before it
//!   reads the next frame. That is back pressure on the agent: its window
//!   of unanswered reports fills, its report queue stops sending, and its
//!   own per-attempt bound replaces the middle of the waiting output with
//!   a marker line. A chatty task therefore costs the database at most the
//!   rate per connected node, whatever it prints.
//! - **Wake-ups.** After storing output (or a final report) the session
//!   pokes a [`LogNotifier`], which sends at most one batch of NOTIFYs on
//!   [`store::task_log::CHANNEL`] per [`NOTIFY_EVERY`], one per task id,
//!   outside any write transaction.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

/// What a stored chunk costs the rate bound beyond its bytes: a row, a
/// round trip and a commit, whatever its size, so that many tiny chunks
/// are not cheaper than a few big ones.
pub const CHUNK_COST: u64 = 4096;

/// The least time between two batches of NOTIFYs from one process.
pub const NOTIFY_EVERY: Duration = Duration::from_millis(20);

/// The least rate [`LogLimits::bytes_per_s`] may be set to (other than 0,
/// no bound): slower, one full chunk would keep a session from reading its
/// socket for more than a second.
pub const MIN_BYTES_PER_S: u64 = 64 * 1024;

/// Bounds on what agents may store as task output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// The most output bytes stored per attempt; past it, one marker line
    /// and nothing more.
    pub max_bytes_per_attempt: u64,
    /// The sustained rate, in bytes per second, at which one session may
    /// store output (plus [`CHUNK_COST`] per chunk); 0 for no bound.
    pub bytes_per_s: u64,
    /// How much a session may store at once before the rate applies.
    pub burst_bytes: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_bytes_per_attempt: 64 * 1024 * 1024,
            bytes_per_s: 1024 * 1024,
            burst_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The line stored where an attempt's output was cut at `cap` bytes.
pub fn cut_marker(cap: u64) -> String {
    format!(
        "\n[unidesk: output cut at {}; the rest of this attempt's output was dropped]\n",
        size(cap)
    )
}

fn size(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    const KIB: u64 = 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// What to store for a chunk at `offset` under a cap of `cap` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Capped<'a> {
    /// All of it.
    Whole(&'a str),
    /// Its first part and the marker (the chunk reaches the cap).
    Cut(String),
    /// Nothing: it lies past the cap.
    Dropped,
}

/// Applies the cap to a chunk of `data` at `offset`. The cut falls on a
/// character boundary at or before the cap.
pub(crate) fn capped(offset: u64, data: &str, cap: u64) -> Capped<'_> {
    let end = offset.saturating_add(data.len() as u64);
    if end <= cap {
        return Capped::Whole(data);
    }
    if offset > cap {
        return Capped::Dropped;
    }
    let mut keep = (cap - offset) as usize;
    while !data.is_char_boundary(keep) {
        keep -= 1;
    }
    Capped::Cut(format!("{}{}", &data[..keep], cut_marker(cap)))
}

/// Where a chunk stands against the stored chain of its attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// It continues the chain: store it.
    Next,
    /// A chunk starting at its offset and reaching at least as far is
    /// stored: it is a resend. `end` is where that stored chunk ends.
    Stored { end: u64 },
    /// It would leave a gap or overlap the chain, which ends at `end`.
    Wrong { end: u64 },
}

/// Where a chunk of `len` bytes at `offset` stands, from the stored chunk
/// with the greatest offset at or before it. A chunk starting where a stored
/// one starts is a resend only when it ends within it: one reaching further
/// (the output read again after a restart, gathered into larger chunks)
/// overlaps the chain, and its new part is kept.
pub(crate) async fn place(
    pool: &PgPool,
    task_id: Uuid,
    attempt: i32,
    offset: i64,
    len: u64,
) -> Result<Place, sqlx::Error> {
    let before: Option<(i64, i64)> = sqlx::query_as(
        "SELECT \"offset\", \"offset\" + octet_length(data) FROM task_log \
         WHERE task_id = $1 AND attempt = $2 AND \"offset\" <= $3 \
         ORDER BY \"offset\" DESC LIMIT 1",
    )
    .bind(task_id)
    .bind(attempt)
    .bind(offset)
    .fetch_optional(pool)
    .await?;
    let reach = (offset as u64).saturating_add(len);
    Ok(match before {
        None if offset == 0 => Place::Next,
        None => Place::Wrong { end: 0 },
        Some((start, end)) if start == offset && reach <= end as u64 => {
            Place::Stored { end: end as u64 }
        }
        Some((_, end)) if end == offset => Place::Next,
        Some((_, end)) => {
            // The chain may go on past the chunk found: report its end.
            let last = store::task_log::stored_end(pool, task_id, attempt as u32).await?;
            Place::Wrong {
                end: last.unwrap_or(end as u64),
            }
        }
    })
}

/// Stores one chunk that continues the chain, and says whether it did: a
/// concurrent writer of the same chunk makes this a no-op. `data` is bounded by
/// [`protocol::bounds::output`]: no NUL, which PostgreSQL text cannot hold.
pub(crate) async fn insert(
    pool: &PgPool,
    task_id: Uuid,
    attempt: i32,
    offset: i64,
    data: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO task_log (task_id, attempt, \"offset\", data) VALUES ($1, $2, $3, $4) \
         ON CONFLICT DO NOTHING",
    )
    .bind(task_id)
    .bind(attempt)
    .bind(offset)
    .bind(data)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// A token bucket: how long a session should wait after storing output.
#[derive(Debug)]
pub(crate) struct Pace {
    per_s: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Pace {
    /// A full bucket for `limits`.
    pub(crate) fn new(limits: &LogLimits) -> Self {
        let burst = limits.burst_bytes.max(CHUNK_COST) as f64;
        Self {
            per_s: limits.bytes_per_s as f64,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes `cost` from the bucket; returns how long to wait before the
    /// bucket is no longer in debt, if it is.
    pub(crate) fn charge(&mut self, cost: u64) -> Option<Duration> {
        self.charge_at(cost, Instant::now())
    }

    fn charge_at(&mut self, cost: u64, now: Instant) -> Option<Duration> {
        if self.per_s <= 0.0 {
            return None;
        }
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.per_s;
        self.at = now;
        self.tokens = (self.tokens + refill).min(self.burst) - cost as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.per_s))
    }
}

/// Coalesces wake-ups for log followers: sessions poke task ids, one task
/// sends them in batches.
#[derive(Clone, Default)]
pub(crate) struct LogNotifier {
    inner: Arc<NotifierInner>,
}

impl std::fmt::Debug for LogNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogNotifier").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct NotifierInner {
    /// Task ids to announce; at most one per task a session wrote for
    /// since the last batch.
    pending: Mutex<HashSet<Uuid>>,
    wake: Notify,
}

impl LogNotifier {
    /// Asks for a NOTIFY for `task_id` soon. Never blocks.
    pub(crate) fn poke(&self, task_id: Uuid) {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(task_id);
        self.inner.wake.notify_one();
    }

    /// Sends the poked task ids, one batch per [`NOTIFY_EVERY`] at most,
    /// until dropped. A failed batch is logged and forgotten: followers
    /// also poll.
    pub(crate) async fn run(&self, pool: &PgPool) {
        loop {
            self.inner.wake.notified().await;
            let ids: Vec<Uuid> = self
                .inner
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain()
                .collect();
            if !ids.is_empty() {
                let sent =
                    sqlx::query("SELECT pg_notify($1, id::text) FROM unnest($2::uuid[]) AS id")
                        .bind(store::task_log::CHANNEL)
                        .bind(&ids)
                        .execute(pool)
                        .await;
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "task_log notify failed; followers will poll");
                }
            }
            tokio::time::sleep(NOTIFY_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_crossing_the_cap_is_cut_there_and_marked() {
        assert_eq!(capped(0, "abc", 10), Capped::Whole("abc"));
        assert_eq!(capped(7, "abc", 10), Capped::Whole("abc"));
        assert_eq!(
            capped(8, "abcd", 10),
            Capped::Cut(format!("ab{}", cut_marker(10)))
        );
        assert_eq!(capped(10, "x", 10), Capped::Cut(cut_marker(10)));
        assert_eq!(capped(11, "x", 10), Capped::Dropped);
        // Never inside a character.
        assert_eq!(
            capped(0, "aé", 2),
            Capped::Cut(format!("a{}", cut_marker(2)))
        );
    }

    #[test]
    fn the_marker_names_the_cap_in_its_unit() {
        assert!(cut_marker(64 * 1024 * 1024).contains("cut at 64 MiB"));
        assert!(cut_marker(2048).contains("cut at 2 KiB"));
        assert!(cut_marker(1000).contains("cut at 1000 bytes"));
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut pace = Pace::new(&LogLimits {
            max_bytes_per_attempt: 0,
            bytes_per_s: 1000,
            burst_bytes: 5000,
        });
        let t0 = pace.at;
        assert_eq!(pace.charge_at(5000, t0), None);
        assert_eq!(pace.charge_at(1000, t0), Some(Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(pace.charge_at(500, t1), Some(Duration::from_millis(500)));
        // Idle time refills no more than the burst.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!(pace.charge_at(5500, t2), Some(Duration::from_millis(500)));
        let mut free = Pace::new(&LogLimits {
            bytes_per_s: 0,
            ..LogLimits::default()
        });
        assert_eq!(free.charge(u64::MAX / 2), None);
    }
}
