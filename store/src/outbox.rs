//! The outbox: the event log in one global order, and how consumers are
//! woken.
//!
//! Each event row carries its place in that order, written by the events
//! table's column defaults as the row is inserted: `position` from a
//! sequence and `txid`, the writing transaction's id (the view `outbox`
//! shows those columns). Positions are taken before commit, so a lower position can
//! become visible after a higher one; a reader that only asked for
//! `position > checkpoint` would skip it forever. Readers here only see rows
//! whose transaction is older than every transaction still running
//! (`txid < pg_snapshot_xmin(pg_current_snapshot())`) and order them by
//! `(txid, position)`: that prefix of the log never changes once seen.
//!
//! Wake-ups: writers poke a [`Notifier`] after each commit, which sends a
//! `NOTIFY` at once, with at most one in flight (pokes while one is in
//! flight make exactly one more). Consumers in the same process are woken
//! straight away as well, without the round trip through the database, and
//! skip the notifications their own process sent (each carries a random id
//! of the process): those would only have them read again what they read.
//! A consumer drains every notification pending when it wakes, re-reads
//! soon when events committed but still held back by an older open
//! transaction exist ([`held_back`], [`Wakeup::soon`]), and also polls on a
//! bounded interval, so a lost notification delays nothing by more than
//! that interval.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgExecutor, PgPool, Row};
use tokio::sync::Notify;

/// The channel consumers LISTEN on.
pub const CHANNEL: &str = "unidesk_outbox";

/// What this process's NOTIFYs carry: its consumers are woken by
/// [`COMMITS`] already, so a notification carrying it is skipped, and only
/// other processes' commits wake them through the database.
static SENDER: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| uuid::Uuid::new_v4().to_string());

/// Commits of this process, counted, for consumers in the same process.
static COMMITS: std::sync::LazyLock<tokio::sync::watch::Sender<u64>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(0));

/// How many committed events a consumer of this process may fall behind
/// on before it misses some ([`Local`]); it reads them from the outbox then.
const LOCAL_EVENTS: usize = 4096;

/// The events this process committed, handed to its consumers at once.
static LOCAL: std::sync::LazyLock<tokio::sync::broadcast::Sender<Arc<Committed>>> =
    std::sync::LazyLock::new(|| tokio::sync::broadcast::channel(LOCAL_EVENTS).0);

/// An event this process just committed, as its consumers see it before
/// they can read it from the outbox: the fast path between the API, the
/// scheduler and the ingress of one process. The outbox stays the source of
/// truth: a consumer must handle the same event again from there (its
/// sequence tells it has), and anything it missed here (it fell behind, or
/// another process committed it) it reads there.
#[derive(Debug)]
pub struct Committed {
    /// `task`, `node`, `project` or `user`.
    pub aggregate_type: &'static str,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// Its number within the aggregate.
    pub sequence: i64,
    /// Such as `TaskAssigned`.
    pub event_type: String,
    /// The event as stored, JSON text.
    pub payload: String,
    /// The database it was committed to ([`database_of`]).
    pub database: u64,
}

/// Which database a pool writes to, as local events name it: a hash of its
/// host (or socket), port and database name. Two pools of one process on
/// one database (the scheduler's own, say) name it alike.
pub fn database_of(pool: &PgPool) -> u64 {
    use std::hash::{Hash, Hasher};
    let options = pool.connect_options();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    options.get_host().hash(&mut hasher);
    options.get_socket().hash(&mut hasher);
    options.get_port().hash(&mut hasher);
    options.get_database().hash(&mut hasher);
    hasher.finish()
}

/// Hands `events`, just committed, to this process's consumers, if it has
/// any.
pub(crate) fn publish(events: impl IntoIterator<Item = Committed>) {
    if LOCAL.receiver_count() == 0 {
        return;
    }
    for e in events {
        // No receiver left is fine: nobody here consumes.
        let _ = LOCAL.send(Arc::new(e));
    }
}

/// Events this process commits from now on to the database of `pool`, in
/// commit order per aggregate.
pub fn local_events(pool: &PgPool) -> LocalEvents {
    LocalEvents {
        rx: LOCAL.subscribe(),
        database: database_of(pool),
    }
}

/// The events this process commits to one database ([`local_events`]);
/// those it commits to others (a process may hold pools on several, as a
/// test binary does) are passed over.
#[derive(Debug)]
pub struct LocalEvents {
    rx: tokio::sync::broadcast::Receiver<Arc<Committed>>,
    database: u64,
}

impl LocalEvents {
    /// The next event, if one is waiting.
    ///
    /// # Errors
    /// As [`tokio::sync::broadcast::Receiver::try_recv`]: none waiting,
    /// or some missed (the outbox has them).
    pub fn try_recv(
        &mut self,
    ) -> Result<Arc<Committed>, tokio::sync::broadcast::error::TryRecvError> {
        loop {
            let event = self.rx.try_recv()?;
            if event.database == self.database {
                return Ok(event);
            }
        }
    }
}

/// A place in the global order of the log: the last `(txid, position)` read.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Checkpoint {
    /// The transaction id of the last event read.
    pub txid: i64,
    /// The outbox position of the last event read.
    pub position: i64,
}

/// One event of the log with its place in the global order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Its outbox position, the id it is referred to by.
    pub position: i64,
    /// The id of the transaction that wrote it.
    pub txid: i64,
    /// `task`, `node`, `project` or `user`.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// Its number within the aggregate, from 1.
    pub sequence: i64,
    /// Such as `TaskSubmitted`.
    pub event_type: String,
    /// The version of the event's shape.
    pub event_version: String,
    /// The event as stored: `{"Variant": {...}}`.
    pub payload: serde_json::Value,
    /// `actor` and `at`.
    pub metadata: serde_json::Value,
    /// When it was appended.
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    /// The event without its payload and metadata (both `null`): what
    /// names it, for a record that must not keep the event's content.
    pub fn without_payload(&self) -> RecordedEvent {
        RecordedEvent {
            position: self.position,
            txid: self.txid,
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            sequence: self.sequence,
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
            payload: serde_json::Value::Null,
            metadata: serde_json::Value::Null,
            recorded_at: self.recorded_at,
        }
    }

    /// Where this event stands in the global order.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            txid: self.txid,
            position: self.position,
        }
    }

    /// The actor from the metadata, such as `user:alice`.
    pub fn actor(&self) -> &str {
        self.metadata
            .get("actor")
            .and_then(|a| a.as_str())
            .unwrap_or("unknown")
    }

    /// The event's fields without the variant wrapper.
    pub fn body(&self) -> &serde_json::Value {
        match &self.payload {
            serde_json::Value::Object(m) if m.len() == 1 => {
                m.values().next().unwrap_or(&self.payload)
            }
            other => other,
        }
    }

    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        let metadata: serde_json::Value = row.try_get("metadata")?;
        let recorded_at = metadata
            .get("at")
            .and_then(|a| a.as_str())
            .and_then(|a| DateTime::parse_from_rfc3339(a).ok())
            .map(|a| a.with_timezone(&Utc));
        Ok(Self {
            position: row.try_get("position")?,
            txid: row.try_get("txid")?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            payload: row.try_get("payload")?,
            recorded_at: match recorded_at {
                Some(t) => t,
                None => row.try_get("recorded_at")?,
            },
            metadata,
        })
    }
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only this aggregate id.
    pub aggregate_id: Option<String>,
}

const SELECT: &str = "SELECT e.position, e.txid::text::bigint AS txid, e.recorded_at, \
    e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload, e.metadata \
    FROM events e";

/// The events after the checkpoint `($1, $2)` that readers may see: only
/// those of transactions older than every one still running.
const READABLE_AFTER: &str = "(e.txid, e.position) > ($1::text::xid8, $2) \
    AND e.txid < pg_snapshot_xmin(pg_current_snapshot())";

/// Over `events`: whether some committed event is not readable yet, held
/// back by an older transaction still running ([`held_back`]).
const HELD_BACK: &str = "COALESCE(max(txid) >= pg_snapshot_xmin(pg_current_snapshot()), false)";

/// Reads up to `limit` events after `after` in the global order, only from
/// transactions that have all finished, so nothing read later can sort
/// before what was read now.
///
/// # Errors
/// A database error.
pub async fn read_after<'e>(
    db: impl PgExecutor<'e>,
    after: Checkpoint,
    limit: i64,
    filter: &Filter,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    read_after_except(db, after, limit, filter, &[]).await
}

/// As [`read_after`], leaving out events of the types in `except`: the
/// `limit` counts only the events returned, so a reader that may not see
/// some types still gets full pages.
///
/// # Errors
/// A database error.
pub async fn read_after_except<'e>(
    db: impl PgExecutor<'e>,
    after: Checkpoint,
    limit: i64,
    filter: &Filter,
    except: &[&str],
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let sql = format!(
        "{SELECT} WHERE {READABLE_AFTER} \
         AND ($4::text IS NULL OR e.aggregate_type = $4) \
         AND ($5::text IS NULL OR e.aggregate_id = $5) \
         AND NOT (e.event_type = ANY($6)) \
         ORDER BY e.txid, e.position LIMIT $3"
    );
    sqlx::query(&sql)
        .bind(after.txid.to_string())
        .bind(after.position)
        .bind(limit)
        .bind(filter.aggregate_type.as_deref())
        .bind(filter.aggregate_id.as_deref())
        .bind(except)
        .try_map(|row: PgRow| RecordedEvent::from_row(&row))
        .fetch_all(db)
        .await
}

/// As [`read_after`] with the default filter, and whether events have
/// committed that it could not return yet, held back by an older open
/// transaction ([`held_back`]), from the same snapshot: a consumer that
/// follows the log learns both in one statement after every wake-up.
///
/// # Errors
/// A database error.
pub async fn read_after_held<'e>(
    db: impl PgExecutor<'e>,
    after: Checkpoint,
    limit: i64,
) -> Result<(Vec<RecordedEvent>, bool), sqlx::Error> {
    let sql = format!(
        "SELECT h.held, r.* FROM (SELECT {HELD_BACK} AS held FROM events) h \
         LEFT JOIN LATERAL ({SELECT} WHERE {READABLE_AFTER} \
            ORDER BY e.txid, e.position LIMIT $3) r ON true \
         ORDER BY r.txid, r.position"
    );
    let rows = sqlx::query(&sql)
        .bind(after.txid.to_string())
        .bind(after.position)
        .bind(limit)
        .fetch_all(db)
        .await?;
    let held = match rows.first() {
        Some(row) => row.try_get("held")?,
        None => false,
    };
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        // The one row of an empty read has no event.
        if row.try_get::<Option<i64>, _>("position")?.is_some() {
            events.push(RecordedEvent::from_row(row)?);
        }
    }
    Ok((events, held))
}

/// The event at outbox `position`, whether or not readers in the global
/// order may see it yet; `None` when there is none.
///
/// # Errors
/// A database error.
pub async fn read_at<'e>(
    db: impl PgExecutor<'e>,
    position: i64,
) -> Result<Option<RecordedEvent>, sqlx::Error> {
    sqlx::query(&format!("{SELECT} WHERE e.position = $1"))
        .bind(position)
        .try_map(|row: PgRow| RecordedEvent::from_row(&row))
        .fetch_optional(db)
        .await
}

/// The checkpoint of the event at outbox `position`, to continue reading
/// after it; `None` when there is no such event.
///
/// # Errors
/// A database error.
pub async fn checkpoint_of<'e>(
    db: impl PgExecutor<'e>,
    position: i64,
) -> Result<Option<Checkpoint>, sqlx::Error> {
    let txid: Option<i64> =
        sqlx::query_scalar("SELECT txid::text::bigint FROM events WHERE position = $1")
            .bind(position)
            .fetch_optional(db)
            .await?;
    Ok(txid.map(|txid| Checkpoint { txid, position }))
}

/// The checkpoint of the newest event readers may already see: where a
/// consumer stands once it has caught up.
///
/// # Errors
/// A database error.
pub async fn head<'e>(db: impl PgExecutor<'e>) -> Result<Checkpoint, sqlx::Error> {
    newest(db, VISIBLE).await
}

/// How many events readers may already see that come after `at`: how far
/// a consumer standing at `at` is behind the head.
///
/// # Errors
/// A database error.
pub async fn behind<'e>(db: impl PgExecutor<'e>, at: Checkpoint) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE (txid, position) > ($1::text::xid8, $2) \
         AND txid < pg_snapshot_xmin(pg_current_snapshot())",
    )
    .bind(at.txid.to_string())
    .bind(at.position)
    .fetch_one(db)
    .await
}

/// The checkpoint of the newest committed event, visible to readers or not
/// yet (an older transaction still open holds readers back). A consumer
/// that reaches it has seen everything committed before this call.
///
/// # Errors
/// A database error.
pub async fn committed_head<'e>(db: impl PgExecutor<'e>) -> Result<Checkpoint, sqlx::Error> {
    newest(db, "").await
}

/// `head`'s filter: events readers may already see.
const VISIBLE: &str = "WHERE e.txid < pg_snapshot_xmin(pg_current_snapshot())";

/// The newest event's checkpoint among those `filter` (a `WHERE` clause
/// over `events e`, or nothing) keeps. The order names the table's own
/// columns: a bare `txid` in `ORDER BY` would be the output column, the
/// `bigint` cast, which no index holds, and every call would read and sort
/// the whole log.
fn newest_sql(filter: &str) -> String {
    format!(
        "SELECT e.txid::text::bigint AS txid, e.position FROM events e {filter} \
         ORDER BY e.txid DESC, e.position DESC LIMIT 1"
    )
}

async fn newest<'e>(db: impl PgExecutor<'e>, filter: &str) -> Result<Checkpoint, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(&newest_sql(filter))
        .fetch_optional(db)
        .await?;
    Ok(row
        .map(|(txid, position)| Checkpoint { txid, position })
        .unwrap_or_default())
}

/// Loads consumer `name`'s checkpoint, creating it at the start of the log.
/// With `for_update` the row stays locked until the transaction ends, so
/// two copies of one consumer never process the same batch.
///
/// # Errors
/// A database error.
pub async fn load_checkpoint(
    conn: &mut sqlx::PgConnection,
    name: &str,
    for_update: bool,
) -> Result<Checkpoint, sqlx::Error> {
    sqlx::query("INSERT INTO checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    let sql = if for_update {
        "SELECT txid, position FROM checkpoints WHERE name = $1 FOR UPDATE"
    } else {
        "SELECT txid, position FROM checkpoints WHERE name = $1"
    };
    let (txid, position): (i64, i64) = sqlx::query_as(sql).bind(name).fetch_one(conn).await?;
    Ok(Checkpoint { txid, position })
}

/// Locks consumer `name`'s checkpoint for this transaction unless another
/// copy of the consumer holds it right now (then `None`: that copy is doing
/// the work, and waiting for it would only serialise the two).
///
/// # Errors
/// A database error.
pub async fn try_lock_checkpoint(
    conn: &mut sqlx::PgConnection,
    name: &str,
) -> Result<Option<Checkpoint>, sqlx::Error> {
    let lock = || {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT txid, position FROM checkpoints WHERE name = $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(name)
    };
    // The row exists but for a consumer's very first step: one statement.
    if let Some((txid, position)) = lock().fetch_optional(&mut *conn).await? {
        return Ok(Some(Checkpoint { txid, position }));
    }
    // Locked by another consumer, or not there yet.
    sqlx::query("INSERT INTO checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    let row = lock().fetch_optional(conn).await?;
    Ok(row.map(|(txid, position)| Checkpoint { txid, position }))
}

/// Stores consumer `name`'s checkpoint; call it in the transaction that
/// made the consumer's changes, so both commit or neither does.
///
/// # Errors
/// A database error.
pub async fn save_checkpoint(
    conn: &mut sqlx::PgConnection,
    name: &str,
    at: Checkpoint,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO checkpoints (name, txid, position) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET txid = EXCLUDED.txid, position = EXCLUDED.position",
    )
    .bind(name)
    .bind(at.txid)
    .bind(at.position)
    .execute(conn)
    .await?;
    Ok(())
}

/// Sends NOTIFYs after commits: at once, with at most one in flight
/// however many writers poke it, outside any event transaction (a NOTIFY
/// inside each one would serialise all commits on a global lock).
#[derive(Clone)]
pub struct Notifier {
    wake: Arc<Notify>,
}

impl Notifier {
    /// Starts the notifier's task on `pool`.
    pub fn spawn(pool: PgPool) -> Self {
        let wake = Arc::new(Notify::new());
        let w = wake.clone();
        tokio::spawn(async move {
            // Ends when every Notifier clone is gone and no permit is left.
            while Arc::strong_count(&w) > 1 {
                tokio::select! {
                    _ = w.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
                if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(SENDER.as_str())
                    .execute(&pool)
                    .await
                {
                    tracing::debug!(error = %e, "outbox notify failed; consumers will poll");
                }
            }
        });
        Self { wake }
    }

    /// Wakes this process's consumers and asks for a NOTIFY for everyone
    /// else's. Never blocks.
    pub fn poke(&self) {
        COMMITS.send_modify(|n| *n = n.wrapping_add(1));
        self.wake.notify_one();
    }
}

/// Whether events have committed that readers in the global order may not
/// see yet, held back by an older transaction still open: a consumer that
/// caught up should read again soon rather than wait for the next
/// notification (the transaction holding them back may write no event and
/// notify nobody when it ends).
///
/// # Errors
/// A database error.
pub async fn held_back<'e>(db: impl PgExecutor<'e>) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(&format!("SELECT {HELD_BACK} FROM events"))
        .fetch_one(db)
        .await
}

/// Waits for new events: returns when a NOTIFY arrives, a commit of this
/// process lands, or after the poll interval, whichever comes first.
pub struct Wakeup {
    pool: PgPool,
    listener: Option<PgListener>,
    poll: Duration,
    commits: tokio::sync::watch::Receiver<u64>,
    /// The short wait [`Wakeup::soon`] asked for, for the next wait only.
    armed: Option<Duration>,
    /// The last short wait, doubled by the next [`Wakeup::soon`].
    last: Option<Duration>,
}

/// The first wait after [`Wakeup::soon`]; each further one doubles, up to
/// the poll interval.
const SOON: Duration = Duration::from_millis(1);

impl Wakeup {
    /// A waker on `pool` that polls at least every `poll`.
    pub async fn new(pool: PgPool, poll: Duration) -> Self {
        let mut w = Self {
            pool,
            listener: None,
            poll,
            commits: COMMITS.subscribe(),
            armed: None,
            last: None,
        };
        w.listen().await;
        w
    }

    async fn listen(&mut self) {
        match PgListener::connect_with(&self.pool).await {
            Ok(mut l) => match l.listen(CHANNEL).await {
                Ok(()) => self.listener = Some(l),
                Err(e) => tracing::warn!(error = %e, "LISTEN failed; polling only"),
            },
            Err(e) => tracing::warn!(error = %e, "LISTEN connection failed; polling only"),
        }
    }

    /// Makes the next [`Wakeup::wait`] return after a short while even
    /// without a notification: 1 ms, doubling each time it is asked for
    /// again right after, up to the poll interval. For a consumer that
    /// knows events are held back ([`held_back`]).
    pub fn soon(&mut self) {
        let next = self.last.map_or(SOON, |d| (d * 2).min(self.poll));
        self.armed = Some(next);
        self.last = Some(next);
    }

    /// Waits for a notification, a commit of this process or the poll
    /// interval (or the short wait [`Wakeup::soon`] asked for), then takes
    /// every notification already received: one read answers them all.
    pub async fn wait(&mut self) {
        let limit = match self.armed.take() {
            Some(d) => d,
            None => {
                self.last = None;
                self.poll
            }
        };
        match self.listener.as_mut() {
            None => {
                tokio::select! {
                    _ = tokio::time::sleep(limit) => {}
                    _ = self.commits.changed() => {}
                }
                if self.last.is_none() {
                    self.listen().await;
                }
            }
            Some(listener) => {
                let deadline = tokio::time::Instant::now() + limit;
                loop {
                    tokio::select! {
                        r = tokio::time::timeout_at(deadline, listener.try_recv()) => match r {
                            // This process's own commit: its poke of
                            // `commits` woke this consumer already.
                            Ok(Ok(Some(n))) if n.payload() == SENDER.as_str() => continue,
                            // Another process's commit, the interval, or a
                            // dropped connection (notifications may have been
                            // lost: the caller reads anyway, and we
                            // reconnect).
                            Err(_) | Ok(Ok(_)) => {}
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "LISTEN connection failed; reconnecting");
                                self.listener = None;
                            }
                        },
                        _ = self.commits.changed() => {}
                    }
                    break;
                }
            }
        }
        if let Some(l) = self.listener.as_mut() {
            while l.next_buffered().is_some() {}
        }
        self.commits.borrow_and_update();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the head's queries cost does not grow with the log: each is
    /// one step down the `(txid, position)` index, never a sort of every
    /// event (as when its order named the `bigint` cast).
    #[tokio::test]
    async fn the_heads_are_read_from_the_index_not_by_sorting_the_log() {
        let db = testkit::fresh_db().await;
        sqlx::query(
            "INSERT INTO events \
                (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             SELECT 'node', 'n' || (i % 100), i / 100 + 1, 'NodeRenamed', '1', '{}', '{}' \
             FROM generate_series(0, 19999) AS i",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE events")
            .execute(&db.pool)
            .await
            .unwrap();
        let (newest_txid, newest_position): (i64, i64) = sqlx::query_as(
            "SELECT txid::text::bigint, position FROM events ORDER BY position DESC LIMIT 1",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let newest = Checkpoint {
            txid: newest_txid,
            position: newest_position,
        };
        assert_eq!(committed_head(&db.pool).await.unwrap(), newest);
        assert_eq!(head(&db.pool).await.unwrap(), newest);
        for filter in ["", VISIBLE] {
            let (plan,): (serde_json::Value,) =
                sqlx::query_as(&format!("EXPLAIN (FORMAT JSON) {}", newest_sql(filter)))
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            let plan = plan.to_string();
            assert!(
                !plan.contains("Sort") && plan.contains("events_order"),
                "{filter:?}: {plan}"
            );
        }
    }
}
