//! The event log as a file: [`export`] writes events as hash-chained JSON
//! lines, [`import`] loads such a file into another database, so that a
//! production history can be replayed on a laptop.
//!
//! # Format
//!
//! One JSON object per line, UTF-8, `\n` after each:
//!
//! ```text
//! {"format":"unidesk-events","version":1,"exported_at":…,"exported_by":…,"aggregate_type":null,"aggregate_id":null,"after":null}
//! {"position":1,"txid":742,"recorded_at":…,"aggregate_type":"task","aggregate_id":…,"sequence":1,"event_type":"TaskSubmitted","event_version":"1","payload":{…},"metadata":{…},"hash":"9f2c…"}
//! …
//! {"end":{"events":1234,"hash":"51d0…"}}
//! ```
//!
//! Events come in the log's global order (outbox `(txid, position)`), with
//! every column needed to put them back. Each event line ends with a `hash`:
//! the hex SHA-256 of the previous line's hash, a newline, and the line's
//! bytes before `,"hash":`; the header's hash, which starts the chain, is
//! the SHA-256 of `unidesk-events\n` and the header line. The end line
//! repeats the number of events and the last hash. So an edited, removed,
//! added or moved line breaks the chain at that line, a stream cut short
//! has no end line, and a line from another export does not fit the chain.
//! The chain is a checksum, not a signature: whoever edits a file on
//! purpose can compute a new chain. Compare the final hash `export` prints
//! with the one `import` prints to know a file is the one exported.
//!
//! # Import rules
//!
//! An import runs in one transaction (nothing is written unless all of it
//! is) that blocks other writers of the log until it ends. A whole export
//! (without `after`) goes only into a database without events. An export
//! made with `after` continues an earlier one: it goes only into a database
//! that holds events already, and each aggregate must go on exactly where
//! the database's copy ends. In every case each aggregate's events are
//! numbered 1, 2, 3, … without gaps. Events keep their order, payload,
//! metadata and recording time; outbox positions and transaction ids are
//! the target's own. Node and project names are claimed as on the source,
//! and what attempts hold on nodes ([`crate::holds`]) follows the events.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use crate::outbox::{self, Checkpoint, Filter};

/// The `format` of an export's header.
pub const FORMAT: &str = "unidesk-events";

/// The version of the format this build writes and reads.
pub const VERSION: u32 = 1;

/// The longest line an import reads. Events are small (a host command's
/// output, the largest, is at most 64 KiB); a longer line is no export.
pub const MAX_LINE: usize = 16 << 20;

/// Events read from the database, and written to it, per round trip.
const CHUNK: usize = 1000;

/// What an event line ends with before its hash's hex digits.
const HASH_FIELD: &str = ",\"hash\":\"";

/// The bytes an event line's hash takes at its end: the field, 64 hex
/// digits, a quote and the closing brace.
const HASH_SUFFIX_LEN: usize = HASH_FIELD.len() + 64 + 2;

/// The first line of an export: what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format's version, [`VERSION`].
    pub version: u32,
    /// When the export was made.
    pub exported_at: DateTime<Utc>,
    /// The program that made it, such as `unidesk 0.1.0`.
    pub exported_by: String,
    /// Only events of this aggregate type, when set.
    pub aggregate_type: Option<String>,
    /// Only events of this aggregate, when set.
    pub aggregate_id: Option<String>,
    /// Only events after this outbox position of the source, when set:
    /// the export continues an earlier one.
    pub after: Option<i64>,
}

/// One event as exported, without its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedEvent {
    /// Its outbox position on the source.
    pub position: i64,
    /// The id of the transaction that wrote it on the source.
    pub txid: i64,
    /// When the source's outbox recorded it.
    pub recorded_at: DateTime<Utc>,
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
    /// The event as stored.
    pub payload: serde_json::Value,
    /// The event's metadata as stored (actor and time).
    pub metadata: serde_json::Value,
}

/// The last line of an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct End {
    end: EndBody,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndBody {
    events: u64,
    hash: String,
}

/// Which events to export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Only events of this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only events of this aggregate.
    pub aggregate_id: Option<String>,
    /// Only events after this outbox position, to continue an earlier
    /// export.
    pub after: Option<i64>,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Events written.
    pub events: u64,
    /// The outbox position of the last event written: pass it as `after`
    /// to export what comes next.
    pub last_position: Option<i64>,
    /// The final hash of the chain, also on the end line.
    pub hash: String,
}

/// What an import loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// The file's header.
    pub header: Header,
    /// Events imported.
    pub events: u64,
    /// Aggregates they belong to.
    pub aggregates: usize,
    /// The final hash of the chain.
    pub hash: String,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// `after` names no event.
    #[error("no event has outbox position {0}: pass the last position of an earlier export")]
    UnknownPosition(i64),
    /// Writing the output failed.
    #[error("writing the export: {0}")]
    Io(#[from] io::Error),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Why an import was refused; nothing was written in every case.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file is no export, or not this one as it was written.
    #[error("line {line}: {reason}")]
    Refused {
        /// The first bad line, from 1.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The database cannot take this file.
    #[error("{0}")]
    Target(String),
    /// Reading the file failed.
    #[error("reading the file: {0}")]
    Io(#[from] io::Error),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

fn refused(line: u64, reason: impl Into<String>) -> ImportError {
    ImportError::Refused {
        line,
        reason: reason.into(),
    }
}

/// The running hash of an export.
struct Chain(String);

impl Chain {
    fn start(header_line: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(FORMAT.as_bytes());
        h.update(b"\n");
        h.update(header_line);
        Self(hex::encode(h.finalize()))
    }

    /// The hash of an event line whose bytes before the hash are `body`.
    fn next(&self, body: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(self.0.as_bytes());
        h.update(b"\n");
        h.update(body);
        hex::encode(h.finalize())
    }
}

const SELECT: &str = "SELECT e.position, e.txid::text::bigint AS txid, e.recorded_at, \
    e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload, e.metadata \
    FROM events e";

fn exported(row: &PgRow) -> Result<ExportedEvent, sqlx::Error> {
    Ok(ExportedEvent {
        position: row.try_get("position")?,
        txid: row.try_get("txid")?,
        recorded_at: row.try_get("recorded_at")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
    })
}

/// Writes the chosen events to `out` in the log's global order, as the
/// log stands when the export starts (waiting for transactions still open
/// then to end): events committed later are left for the next export
/// (`after` the returned last position).
///
/// # Errors
/// [`ExportError::UnknownPosition`] when `after` names no event, an I/O
/// error writing `out`, or a database error.
pub async fn export(
    pool: &PgPool,
    options: &ExportOptions,
    out: &mut impl Write,
) -> Result<ExportSummary, ExportError> {
    let mut at = match options.after {
        Some(p) => outbox::checkpoint_of(pool, p)
            .await?
            .ok_or(ExportError::UnknownPosition(p))?,
        None => Checkpoint::default(),
    };
    let head = committed_head(pool).await?;
    let filter = Filter {
        aggregate_type: options.aggregate_type.clone(),
        aggregate_id: options.aggregate_id.clone(),
    };
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        exported_at: Utc::now(),
        exported_by: concat!("unidesk ", env!("CARGO_PKG_VERSION")).into(),
        aggregate_type: filter.aggregate_type.clone(),
        aggregate_id: filter.aggregate_id.clone(),
        after: options.after,
    };
    let header_line = serde_json::to_vec(&header).map_err(io::Error::other)?;
    out.write_all(&header_line)?;
    out.write_all(b"\n")?;
    let mut chain = Chain::start(&header_line);
    let mut events = 0;
    let mut last_position = None;
    let sql = format!(
        "{SELECT} WHERE (e.txid, e.position) > ($1::text::xid8, $2) \
         AND (e.txid, e.position) <= ($6::text::xid8, $7) \
         AND ($4::text IS NULL OR e.aggregate_type = $4) \
         AND ($5::text IS NULL OR e.aggregate_id = $5) \
         ORDER BY e.txid, e.position LIMIT $3"
    );
    loop {
        let batch = sqlx::query(&sql)
            .bind(at.txid.to_string())
            .bind(at.position)
            .bind(CHUNK as i64)
            .bind(filter.aggregate_type.as_deref())
            .bind(filter.aggregate_id.as_deref())
            .bind(head.txid.to_string())
            .bind(head.position)
            .try_map(|row: PgRow| exported(&row))
            .fetch_all(pool)
            .await?;
        let Some(last) = batch.last() else { break };
        at = Checkpoint {
            txid: last.txid,
            position: last.position,
        };
        for event in &batch {
            let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
            line.pop(); // the closing brace; the hash goes before it
            let hash = chain.next(&line);
            line.extend_from_slice(HASH_FIELD.as_bytes());
            line.extend_from_slice(hash.as_bytes());
            line.extend_from_slice(b"\"}\n");
            out.write_all(&line)?;
            chain = Chain(hash);
            events += 1;
            last_position = Some(event.position);
        }
    }
    let end = End {
        end: EndBody {
            events,
            hash: chain.0.clone(),
        },
    };
    serde_json::to_writer(&mut *out, &end).map_err(io::Error::other)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(ExportSummary {
        events,
        last_position,
        hash: chain.0,
    })
}

/// One line of the input.
struct Line {
    /// Its bytes without the `\n`.
    bytes: Vec<u8>,
    /// Whether a `\n` ended it: every line of an export has one, so the
    /// last line without is where a copy was cut short.
    complete: bool,
}

/// The longest an export waits for transactions older than the newest
/// committed event to end.
const WAIT_FOR_OLDER: Duration = Duration::from_secs(30);

/// Where the export ends: the newest event committed when it starts, once
/// every older transaction has ended (so nothing can still appear before
/// it in the log's order). Should one stay open longer than
/// [`WAIT_FOR_OLDER`], the export ends where readers can see to.
async fn committed_head(pool: &PgPool) -> Result<Checkpoint, sqlx::Error> {
    let target = outbox::committed_head(pool).await?;
    let deadline = tokio::time::Instant::now() + WAIT_FOR_OLDER;
    loop {
        let visible = outbox::head(pool).await?;
        if visible >= target {
            return Ok(target);
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                ?target,
                ?visible,
                "an old transaction is still open: exporting what readers can see"
            );
            return Ok(visible);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at the end of the
/// input.
fn read_line(input: &mut impl BufRead, line_no: u64) -> Result<Option<Line>, ImportError> {
    let mut bytes = Vec::new();
    loop {
        let available = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if available.is_empty() {
            return Ok((!bytes.is_empty()).then_some(Line {
                bytes,
                complete: false,
            }));
        }
        let (taken, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if bytes.len() + taken > MAX_LINE {
            return Err(refused(
                line_no,
                format!("longer than {} MiB: not an events export", MAX_LINE >> 20),
            ));
        }
        bytes.extend_from_slice(&available[..taken]);
        input.consume(taken + usize::from(done));
        if done {
            return Ok(Some(Line {
                bytes,
                complete: true,
            }));
        }
    }
}

/// Where the import stands.
struct Importer<'a> {
    tx: &'a mut PgConnection,
    /// Whether the file continues events already in the database.
    continues: bool,
    chunk: Vec<(u64, ExportedEvent)>,
    /// Aggregates met for the first time in `chunk`, by index into it.
    new_in_chunk: Vec<usize>,
    /// Each aggregate's last sequence read so far.
    seen: HashMap<(String, String), i64>,
    events: u64,
}

impl Importer<'_> {
    /// Takes event line `line_no`, checking it follows its aggregate's
    /// previous event in the file.
    async fn push(&mut self, line_no: u64, event: ExportedEvent) -> Result<(), ImportError> {
        let who = describe(&event);
        if event.aggregate_type.is_empty() || event.aggregate_id.is_empty() {
            return Err(refused(line_no, "an event without aggregate type or id"));
        }
        let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
        match self.seen.get_mut(&key) {
            Some(last) if event.sequence == *last + 1 => *last = event.sequence,
            Some(last) if event.sequence <= *last => {
                return Err(refused(
                    line_no,
                    format!(
                        "{who} comes after #{last} of the same aggregate: events are repeated or out of order"
                    ),
                ))
            }
            Some(last) => {
                return Err(refused(
                    line_no,
                    format!(
                        "{who} follows #{last}: {} missing",
                        missing(*last + 1, event.sequence - 1)
                    ),
                ))
            }
            None => {
                if !self.continues && event.sequence != 1 {
                    return Err(refused(
                        line_no,
                        format!(
                            "{who} is the first event of its aggregate in the file: {} missing",
                            missing(1, event.sequence - 1)
                        ),
                    ));
                }
                self.seen.insert(key, event.sequence);
                self.new_in_chunk.push(self.chunk.len());
            }
        }
        self.chunk.push((line_no, event));
        if self.chunk.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes the events taken so far.
    async fn flush(&mut self) -> Result<(), ImportError> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        if self.continues {
            self.check_continuation().await?;
        }
        let n = self.chunk.len();
        let mut types = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut sequences = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        let mut recorded = Vec::with_capacity(n);
        for (_, e) in self.chunk.drain(..) {
            types.push(e.aggregate_type);
            ids.push(e.aggregate_id);
            sequences.push(e.sequence);
            event_types.push(e.event_type);
            versions.push(e.event_version);
            payloads.push(e.payload.to_string());
            metadata.push(e.metadata.to_string());
            recorded.push(e.recorded_at);
        }
        self.new_in_chunk.clear();
        // Inserted one by one in file order, so the events take positions
        // in that order; each keeps the time it was first recorded.
        sqlx::query(
            "INSERT INTO events \
                (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, recorded_at) \
             SELECT t, i, s, et, v, p::json, m::json, r \
             FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], \
                         $8::timestamptz[]) \
               WITH ORDINALITY AS u(t, i, s, et, v, p, m, r, n) ORDER BY n",
        )
        .bind(&types)
        .bind(&ids)
        .bind(&sequences)
        .bind(&event_types)
        .bind(&versions)
        .bind(&payloads)
        .bind(&metadata)
        .bind(&recorded)
        .execute(&mut *self.tx)
        .await?;
        self.events += n as u64;
        Ok(())
    }

    /// For a continuing file: each aggregate met first in this chunk must
    /// go on right after the database's last event of it.
    async fn check_continuation(&mut self) -> Result<(), ImportError> {
        let firsts: Vec<&(u64, ExportedEvent)> =
            self.new_in_chunk.iter().map(|i| &self.chunk[*i]).collect();
        let types: Vec<&str> = firsts
            .iter()
            .map(|(_, e)| e.aggregate_type.as_str())
            .collect();
        let ids: Vec<&str> = firsts
            .iter()
            .map(|(_, e)| e.aggregate_id.as_str())
            .collect();
        let held: HashMap<(String, String), i64> = sqlx::query_as::<_, (String, String, i64)>(
            "SELECT e.aggregate_type, e.aggregate_id, max(e.sequence) FROM events e \
             JOIN unnest($1::text[], $2::text[]) AS u(t, i) ON e.aggregate_type = u.t AND e.aggregate_id = u.i \
             GROUP BY 1, 2",
        )
        .bind(&types)
        .bind(&ids)
        .fetch_all(&mut *self.tx)
        .await?
        .into_iter()
        .map(|(t, i, s)| ((t, i), s))
        .collect();
        for (line_no, e) in firsts {
            let last = held
                .get(&(e.aggregate_type.clone(), e.aggregate_id.clone()))
                .copied()
                .unwrap_or(0);
            if e.sequence != last + 1 {
                let who = describe(e);
                let reason = if e.sequence <= last {
                    format!("{who} is already in the database, which holds #1..#{last} of it")
                } else if last == 0 {
                    format!(
                        "{who} is the first of its aggregate here, and the database has none: {} missing",
                        missing(1, e.sequence - 1)
                    )
                } else {
                    format!(
                        "{who} does not continue the database's copy, which ends at #{last}: {} missing",
                        missing(last + 1, e.sequence - 1)
                    )
                };
                return Err(refused(*line_no, reason));
            }
        }
        Ok(())
    }
}

/// `task 0193… #3 (TaskStarted)`.
fn describe(e: &ExportedEvent) -> String {
    format!(
        "{} {} #{} ({})",
        e.aggregate_type, e.aggregate_id, e.sequence, e.event_type
    )
}

/// `#4 is` or `#4..#6 are`.
fn missing(from: i64, to: i64) -> String {
    if from == to {
        format!("#{from} is")
    } else {
        format!("#{from}..#{to} are")
    }
}

fn cut_short(line_no: u64) -> ImportError {
    refused(
        line_no,
        "the file ends in the middle of this line: it was cut short",
    )
}

/// Parses and checks the header line.
fn header(line: &[u8]) -> Result<Header, ImportError> {
    let header: Header = serde_json::from_slice(line).map_err(|e| {
        refused(
            1,
            format!(
                "not the header of an events export ({e}); make one with `unidesk events export`"
            ),
        )
    })?;
    if header.format != FORMAT {
        return Err(refused(
            1,
            format!("the format is {:?}, not {FORMAT:?}", header.format),
        ));
    }
    if header.version != VERSION {
        return Err(refused(
            1,
            format!(
                "format version {} is not the version {VERSION} this build reads",
                header.version
            ),
        ));
    }
    Ok(header)
}

/// Splits an event line into the bytes its hash covers and the hash it
/// states, and checks the hash follows `chain`.
fn verify<'a>(
    line: &'a [u8],
    line_no: u64,
    chain: &Chain,
) -> Result<(&'a [u8], String), ImportError> {
    let split = line.len().checked_sub(HASH_SUFFIX_LEN);
    let Some((body, suffix)) = split.map(|at| line.split_at(at)) else {
        return Err(refused(
            line_no,
            "not an event line: it has no hash at its end",
        ));
    };
    let stated = suffix
        .strip_prefix(HASH_FIELD.as_bytes())
        .and_then(|s| s.strip_suffix(b"\"}"))
        .filter(|h| {
            h.iter()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or_else(|| refused(line_no, "not an event line: it has no hash at its end"))?;
    let stated = String::from_utf8_lossy(stated).into_owned();
    let expected = chain.next(body);
    if stated != expected {
        return Err(refused(
            line_no,
            "the hash chain breaks here: this line was changed, or lines before it were \
             removed, added or moved, or it comes from another export",
        ));
    }
    Ok((body, stated))
}

/// Imports an export from `input` into the database of `pool`, in one
/// transaction. Applies nothing to the read models: the projector does,
/// or `Projector::catch_up` right after.
///
/// # Errors
/// [`ImportError::Refused`] naming the first bad line for a file that is
/// no export or not intact (edited, cut short, reordered, spliced, gaps in
/// an aggregate's sequence), [`ImportError::Target`] for a database that
/// cannot take it, or an I/O or database error. Nothing is written in
/// every case.
pub async fn import(pool: &PgPool, input: &mut impl BufRead) -> Result<ImportSummary, ImportError> {
    let (header, chain) = read_header(input)?;
    let mut tx = pool.begin().await?;
    claim_target(&mut tx, &header).await?;
    let mut importer = Importer {
        tx: &mut tx,
        continues: header.after.is_some(),
        chunk: Vec::with_capacity(CHUNK),
        new_in_chunk: Vec::new(),
        seen: HashMap::new(),
        events: 0,
    };
    let (hash, end_line) = import_events(input, &mut importer, chain).await?;
    if read_line(input, end_line + 1)?.is_some() {
        return Err(refused(end_line + 1, "a line follows the end line"));
    }
    importer.flush().await?;
    let (events, aggregates) = (importer.events, importer.seen.len());
    claim_names(&mut tx).await?;
    tx.commit().await?;
    Ok(ImportSummary {
        header,
        events,
        aggregates,
        hash,
    })
}

/// Reads and checks the header line, which starts the hash chain.
fn read_header(input: &mut impl BufRead) -> Result<(Header, Chain), ImportError> {
    let Some(first) = read_line(input, 1)? else {
        return Err(refused(1, "the file is empty: not an events export"));
    };
    Ok((header(&first.bytes)?, Chain::start(&first.bytes)))
}

/// Blocks other writers of the log until the import ends, so the checks
/// hold, and checks the database may take the export: a whole one only
/// where there are no events, one that continues another only where there
/// are.
async fn claim_target(tx: &mut PgConnection, header: &Header) -> Result<(), ImportError> {
    sqlx::query("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    // History is put back as it was: the holds of attempts follow the
    // imported events without the checks a scheduler's assignment passes
    // (its leader's term belongs to the source's log).
    sqlx::query("SET LOCAL unidesk.restoring = 'on'")
        .execute(&mut *tx)
        .await?;
    let holds_events: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM events)")
        .fetch_one(&mut *tx)
        .await?;
    match (header.after, holds_events) {
        (None, true) => Err(ImportError::Target(
            "the database already holds events: a whole export is imported only into a \
             database without any (create a new one and run `unidesk migrate` on it)"
                .into(),
        )),
        (Some(after), false) => Err(ImportError::Target(format!(
            "this export continues another one (it holds the events after position {after} \
             of its source), and the database holds no events: import the export it \
             continues first"
        ))),
        _ => Ok(()),
    }
}

/// Reads the event lines after the header into `importer`, each checked
/// against the chain and the log's order, up to the end line, which must
/// count them and close the chain; returns the chain's last hash and the
/// end line's number.
async fn import_events(
    input: &mut impl BufRead,
    importer: &mut Importer<'_>,
    mut chain: Chain,
) -> Result<(String, u64), ImportError> {
    let mut line_no = 1;
    let mut previous: Option<Checkpoint> = None;
    loop {
        line_no += 1;
        let Some(line) = read_line(input, line_no)? else {
            return Err(refused(
                line_no,
                "the file ends without its end line: it was cut short",
            ));
        };
        if line.bytes.starts_with(b"{\"end\":") {
            let counted = importer.events + importer.chunk.len() as u64;
            check_end(&line, line_no, counted, &chain)?;
            return Ok((chain.0, line_no));
        }
        let (event, hash) = event_line(&line, line_no, &chain)?;
        let here = Checkpoint {
            txid: event.txid,
            position: event.position,
        };
        if previous.is_some_and(|p| here <= p) {
            return Err(refused(
                line_no,
                "events are not in the log's order (txid, position)",
            ));
        }
        previous = Some(here);
        chain = Chain(hash);
        importer.push(line_no, event).await?;
    }
}

/// Checks the end line: it counts the `counted` events read and repeats
/// the chain's last hash.
fn check_end(line: &Line, line_no: u64, counted: u64, chain: &Chain) -> Result<(), ImportError> {
    // The end line alone may lack its newline (an editor may have
    // dropped it); a broken one without is a copy cut short.
    let end: End = match serde_json::from_slice(&line.bytes) {
        Ok(end) => end,
        Err(_) if !line.complete => return Err(cut_short(line_no)),
        Err(e) => return Err(refused(line_no, format!("not an end line: {e}"))),
    };
    if end.end.events != counted {
        return Err(refused(
            line_no,
            format!(
                "the end line counts {} events, the file holds {counted}: lines were removed or added",
                end.end.events,
            ),
        ));
    }
    if end.end.hash != chain.0 {
        return Err(refused(
            line_no,
            "the end line's hash is not the chain's: the file was changed",
        ));
    }
    Ok(())
}

/// Reads an event line that must follow `chain`; returns the event and
/// its hash.
fn event_line(
    line: &Line,
    line_no: u64,
    chain: &Chain,
) -> Result<(ExportedEvent, String), ImportError> {
    if !line.complete {
        return Err(cut_short(line_no));
    }
    let (body, hash) = verify(&line.bytes, line_no, chain)?;
    let mut json = body.to_vec();
    json.push(b'}');
    let event = serde_json::from_slice(&json)
        .map_err(|e| refused(line_no, format!("not an event line: {e}")))?;
    Ok((event, hash))
}

/// Claims nodes' and projects' names as creating them did on the source.
async fn claim_names(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO name_claims (kind, name, aggregate_id) \
         SELECT aggregate_type, COALESCE(payload -> 'Provisioned' ->> 'name', payload -> 'Created' ->> 'name'), \
           aggregate_id \
         FROM events WHERE aggregate_type IN ('node', 'project') AND sequence = 1 \
           AND event_type IN ('NodeProvisioned', 'ProjectCreated') \
         ON CONFLICT DO NOTHING",
    )
    .execute(tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_refused_without_reading_them_whole() {
        let big = vec![b'x'; MAX_LINE + 10];
        let mut input = io::Cursor::new(big);
        assert!(matches!(
            read_line(&mut input, 7),
            Err(ImportError::Refused { line: 7, .. })
        ));
    }

    #[test]
    fn lines_are_split_at_newlines_and_the_last_may_lack_one() {
        let mut input = io::Cursor::new(b"a\n\nbc".to_vec());
        let mut next = || {
            read_line(&mut input, 1)
                .ok()
                .flatten()
                .map(|l| (l.bytes, l.complete))
        };
        assert_eq!(next(), Some((b"a".to_vec(), true)));
        assert_eq!(next(), Some((vec![], true)));
        assert_eq!(next(), Some((b"bc".to_vec(), false)));
        assert_eq!(next(), None);
    }

    #[test]
    fn a_hash_covers_the_line_and_the_one_before() {
        let chain = Chain::start(b"{}");
        let line = format!("{{\"a\":1{HASH_FIELD}{}\"}}", chain.next(b"{\"a\":1"));
        assert!(verify(line.as_bytes(), 2, &chain).is_ok());
        let edited = line.replace("\"a\":1", "\"a\":2");
        assert!(verify(edited.as_bytes(), 2, &chain).is_err());
        let other = Chain::start(b"{ }");
        assert!(verify(line.as_bytes(), 2, &other).is_err());
        assert!(verify(b"{\"a\":1}", 2, &chain).is_err());
    }
}
