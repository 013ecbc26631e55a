//! The report journal: what the server has not acknowledged yet, on disk.
//!
//! An attempt's final status, and every log chunk once it is sent (or
//! once its attempt's final status is queued, whichever comes first), is
//! appended to `<work dir>/journal/reports.log` and fsynced before it
//! counts as sent. A restarted agent, after `kill -9` or a reboot, reads
//! the journal back and sends what it holds again, in id order. Other
//! statuses (accepted, preparing, running) are not journaled: they mean
//! nothing once the process that sent them is gone, and an attempt that
//! survives a restart is reported running again when it is adopted.
//!
//! Each record is one line: 16 hex digits of the SHA-256 of the JSON that
//! follows, a space, and the JSON ([`Record`]). A `done` record forgets an
//! earlier one (the server answered `received`); it is written without
//! fsync, since at worst a report the server already has is sent again,
//! which the server ignores. Once nothing is left unanswered the file is
//! truncated; otherwise it is rewritten (to a new file, fsynced, renamed)
//! when dead records outweigh live ones.
//!
//! Reading back never stops the agent: a torn last record (the process
//! died while writing it) and lines that fail their checksum, do not parse
//! or are longer than [`MAX_RECORD_BYTES`] are skipped with a warning. The
//! file is rewritten clean after reading, so nothing is ever appended
//! after a torn tail.
//!
//! The journal is bounded ([`Journal::open`]'s `max_bytes`): past the
//! bound, the oldest log chunks are forgotten first (they are still sent
//! while the agent lives, but would not survive a crash), with a warning
//! saying how many. Final statuses are never forgotten.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::host_ssh::RESULT_ID_BASE;

/// The journal's directory under the agent's work directory.
pub const DIR: &str = "journal";
/// The journal file in [`DIR`].
pub const FILE: &str = "reports.log";
/// Where a rewrite is prepared before it replaces [`FILE`].
const NEW_FILE: &str = "reports.log.new";
/// The longest record read back; a longer line is garbage (a log chunk
/// of 64 KiB is at most about 400 KiB of JSON, every byte escaped).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Dead records below this are not worth a rewrite.
const COMPACT_MIN_BYTES: u64 = 1024 * 1024;
/// The default bound of the live records.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// A status report, as sent.
    Status(protocol::Status),
    /// A log chunk, as sent.
    Log(protocol::LogChunk),
    /// The report with this id needs no journal any more.
    Done {
        /// Its id.
        id: u64,
    },
    /// Ids below this were used; written first by every rewrite, so ids
    /// keep growing across restarts.
    Next {
        /// The next free id.
        id: u64,
    },
}

impl Record {
    /// The id of a report record.
    fn report_id(&self) -> Option<u64> {
        match self {
            Record::Status(s) => Some(s.id),
            Record::Log(l) => Some(l.id),
            Record::Done { .. } | Record::Next { .. } => None,
        }
    }
}

/// A report read back from the journal.
#[derive(Debug, Clone, PartialEq)]
pub enum Replayed {
    /// A final status.
    Status(protocol::Status),
    /// A log chunk.
    Log(protocol::LogChunk),
}

impl Replayed {
    fn id(&self) -> u64 {
        match self {
            Replayed::Status(s) => s.id,
            Replayed::Log(l) => l.id,
        }
    }

    fn record(&self) -> Record {
        match self {
            Replayed::Status(s) => Record::Status(s.clone()),
            Replayed::Log(l) => Record::Log(l.clone()),
        }
    }
}

/// What reading the journal back found.
#[derive(Debug, Default)]
pub struct Replay {
    /// The reports still unanswered, in id order.
    pub reports: Vec<Replayed>,
    /// The first id not used yet.
    pub next_id: u64,
    /// Lines skipped as corrupt (checksum, JSON, length or id).
    pub corrupt: usize,
    /// Bytes of a torn last record, skipped.
    pub torn: usize,
}

/// A live record: its size in the file, and whether it may be forgotten
/// past the bound.
#[derive(Debug, Clone, Copy)]
struct Live {
    bytes: u64,
    log: bool,
}

/// The open journal. Its methods do blocking I/O (fsync); it is used
/// under the report queue's lock, for a few milliseconds at a time.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    file: File,
    /// The file's length.
    size: u64,
    live: BTreeMap<u64, Live>,
    live_bytes: u64,
    max_bytes: u64,
    /// Above every id journaled so far.
    next_id: u64,
}

impl Journal {
    /// Opens (creating it if needed) the journal in `dir`, reads back what
    /// it holds and rewrites it clean; live records beyond `max_bytes`
    /// lose their oldest log chunks.
    ///
    /// # Errors
    /// The I/O error when `dir` or its files cannot be created, read as a
    /// whole or written. Damaged content is no error: it is skipped and
    /// counted in the [`Replay`].
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<(Journal, Replay)> {
        std::fs::create_dir_all(dir)?;
        let mut replay = match File::open(dir.join(FILE)) {
            Ok(file) => read(file)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Replay::default(),
            Err(e) => return Err(e),
        };
        replay.next_id = replay.next_id.max(1);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(FILE))?;
        let mut journal = Journal {
            dir: dir.to_owned(),
            file,
            size: 0,
            live: BTreeMap::new(),
            live_bytes: 0,
            max_bytes,
            next_id: replay.next_id,
        };
        for report in &replay.reports {
            let bytes = line(&report.record())?.len() as u64;
            journal.track(report.id(), bytes, matches!(report, Replayed::Log(_)));
        }
        let forgotten = journal.over_bound();
        for id in &forgotten {
            journal.untrack(*id);
        }
        replay.reports.retain(|r| !forgotten.contains(&r.id()));
        let live: Vec<Record> = replay.reports.iter().map(Replayed::record).collect();
        journal.rewrite(&live)?;
        if replay.torn > 0 {
            tracing::warn!(
                bytes = replay.torn,
                "skipped a torn last record of the report journal (the agent stopped while writing it)"
            );
        }
        if replay.corrupt > 0 {
            tracing::warn!(
                records = replay.corrupt,
                "skipped damaged records of the report journal"
            );
        }
        if !replay.reports.is_empty() {
            tracing::info!(
                reports = replay.reports.len(),
                "unanswered reports read back from the journal; they are sent again"
            );
        }
        Ok((journal, replay))
    }

    /// How many reports the journal holds.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Appends report records and fsyncs them: once this returns `Ok` they
    /// survive a crash. Past the bound, the oldest log chunks are
    /// forgotten (see the module documentation).
    ///
    /// # Errors
    /// The I/O error; the file is cut back to where it was, so a failed
    /// append leaves no partial record.
    pub fn append(&mut self, records: &[Record]) -> io::Result<()> {
        let mut buffer = Vec::new();
        let mut added = Vec::new();
        for record in records {
            let Some(id) = record.report_id() else {
                continue;
            };
            let text = line(record)?;
            added.push((id, text.len() as u64, matches!(record, Record::Log(_))));
            buffer.extend_from_slice(&text);
        }
        if buffer.is_empty() {
            return Ok(());
        }
        let written = self
            .file
            .write_all(&buffer)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Best effort: a partial line would be skipped when read back,
            // but nothing must be appended to it.
            let _ = self.file.set_len(self.size);
            return Err(e);
        }
        self.size += buffer.len() as u64;
        for (id, bytes, log) in added {
            self.next_id = self.next_id.max(id.saturating_add(1));
            self.track(id, bytes, log);
        }
        let forgotten = self.over_bound();
        if !forgotten.is_empty() {
            self.forget(&forgotten)?;
        }
        Ok(())
    }

    /// Forgets the reports `ids` (answered by the server), and compacts
    /// the file when that leaves it mostly dead. Ids it does not hold are
    /// ignored.
    ///
    /// # Errors
    /// The I/O error of writing the `done` records or of the compaction.
    pub fn done(&mut self, ids: &[u64]) -> io::Result<()> {
        let held: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| self.live.contains_key(id))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        self.forget(&held)?;
        self.compact()
    }

    /// Writes `done` records for `ids` and stops tracking them.
    fn forget(&mut self, ids: &[u64]) -> io::Result<()> {
        let mut buffer = Vec::new();
        for &id in ids {
            if self.untrack(id) {
                buffer.extend_from_slice(&line(&Record::Done { id })?);
            }
        }
        self.file.write_all(&buffer)?;
        self.size += buffer.len() as u64;
        Ok(())
    }

    fn track(&mut self, id: u64, bytes: u64, log: bool) {
        self.untrack(id);
        self.live.insert(id, Live { bytes, log });
        self.live_bytes += bytes;
    }

    /// Stops tracking `id`; whether it was tracked.
    fn untrack(&mut self, id: u64) -> bool {
        let Some(old) = self.live.remove(&id) else {
            return false;
        };
        self.live_bytes -= old.bytes;
        true
    }

    /// The oldest log chunks to forget so the live records fit the bound.
    fn over_bound(&self) -> Vec<u64> {
        let mut forgotten = Vec::new();
        let mut live_bytes = self.live_bytes;
        let mut bytes = 0;
        for (&id, live) in &self.live {
            if live_bytes <= self.max_bytes {
                break;
            }
            if live.log {
                live_bytes -= live.bytes;
                bytes += live.bytes;
                forgotten.push(id);
            }
        }
        if !forgotten.is_empty() {
            tracing::warn!(
                chunks = forgotten.len(),
                bytes,
                max_bytes = self.max_bytes,
                "the report journal is full: its oldest log chunks are forgotten (still sent while \
                 this agent runs, lost if it stops first); final statuses are always kept"
            );
        }
        forgotten
    }

    /// Truncates the file when nothing is live; rewrites it when dead
    /// records outweigh live ones.
    fn compact(&mut self) -> io::Result<()> {
        let dead = self.size.saturating_sub(self.live_bytes);
        if self.live.is_empty() {
            // Appends go to the end, wherever that is now.
            self.file.set_len(0)?;
            self.size = 0;
            let next = line(&Record::Next { id: self.next_id })?;
            self.file.write_all(&next)?;
            self.file.sync_data()?;
            self.size = next.len() as u64;
            return Ok(());
        }
        if dead <= self.live_bytes.max(COMPACT_MIN_BYTES) {
            return Ok(());
        }
        let file = File::open(self.dir.join(FILE))?;
        let replay = read(file)?;
        let live: Vec<Record> = replay
            .reports
            .iter()
            .filter(|r| self.live.contains_key(&r.id()))
            .map(Replayed::record)
            .collect();
        self.rewrite(&live)
    }

    /// Replaces the file by `Next` and `live`, atomically: a new file,
    /// fsynced, renamed over the old one, the directory fsynced.
    fn rewrite(&mut self, live: &[Record]) -> io::Result<()> {
        let mut buffer = line(&Record::Next { id: self.next_id })?;
        for record in live {
            buffer.extend_from_slice(&line(record)?);
        }
        let new_path = self.dir.join(NEW_FILE);
        let mut new = File::create(&new_path)?;
        new.write_all(&buffer)?;
        new.sync_all()?;
        std::fs::rename(&new_path, self.dir.join(FILE))?;
        File::open(&self.dir)?.sync_all()?;
        self.file = OpenOptions::new().append(true).open(self.dir.join(FILE))?;
        self.size = buffer.len() as u64;
        Ok(())
    }
}

/// `record` as one journal line.
fn line(record: &Record) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(record).map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(json.len() + 18);
    out.extend_from_slice(checksum(&json).as_bytes());
    out.push(b' ');
    out.extend_from_slice(&json);
    out.push(b'\n');
    Ok(out)
}

fn checksum(json: &[u8]) -> String {
    hex::encode(&Sha256::digest(json)[..8])
}

/// Reads every record of `file`: reports not marked done, in id order.
fn read(file: File) -> io::Result<Replay> {
    let mut reader = BufReader::new(file);
    let mut replay = Replay::default();
    let mut reports: BTreeMap<u64, Replayed> = BTreeMap::new();
    let mut line = Vec::new();
    // Set while the rest of an overlong line is passed over.
    let mut overlong = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let part = &buf[..newline.unwrap_or(buf.len())];
        if !overlong {
            if line.len() + part.len() > MAX_RECORD_BYTES {
                overlong = true;
                line.clear();
            } else {
                line.extend_from_slice(part);
            }
        }
        let used = part.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            if overlong {
                replay.corrupt += 1;
                overlong = false;
            } else {
                apply(&line, &mut reports, &mut replay);
            }
            line.clear();
        }
    }
    if overlong || !line.is_empty() {
        replay.torn = line.len().max(1);
    }
    replay.reports = reports.into_values().collect();
    Ok(replay)
}

/// Applies one complete line to what was read so far.
fn apply(line: &[u8], reports: &mut BTreeMap<u64, Replayed>, replay: &mut Replay) {
    let Some(record) = parse(line) else {
        if !line.is_empty() {
            replay.corrupt += 1;
        }
        return;
    };
    let seen = |id: u64, replay: &mut Replay| replay.next_id = replay.next_id.max(id + 1);
    match record {
        Record::Status(status) => {
            seen(status.id, replay);
            reports.entry(status.id).or_insert(Replayed::Status(status));
        }
        Record::Log(log) => {
            seen(log.id, replay);
            reports.entry(log.id).or_insert(Replayed::Log(log));
        }
        Record::Done { id } => {
            seen(id, replay);
            reports.remove(&id);
        }
        Record::Next { id } => replay.next_id = replay.next_id.max(id),
    }
}

/// One line's record, if its checksum holds and it makes sense.
fn parse(line: &[u8]) -> Option<Record> {
    let (sum, json) = line.split_at_checked(16)?;
    let json = json.strip_prefix(b" ")?;
    if checksum(json).as_bytes() != sum {
        return None;
    }
    let record: Record = serde_json::from_slice(json).ok()?;
    let id = match &record {
        Record::Status(s) => s.id,
        Record::Log(l) => l.id,
        Record::Done { id } | Record::Next { id } => *id,
    };
    // Report ids are below the host command results' ids; `Next` may
    // name the first of those.
    let fits = match record {
        Record::Next { .. } => id <= RESULT_ID_BASE,
        _ => id > 0 && id < RESULT_ID_BASE,
    };
    fits.then_some(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::ReportedState;
    use uuid::Uuid;

    fn status(id: u64, task: Uuid, state: ReportedState) -> Record {
        Record::Status(protocol::Status {
            id,
            task_id: task,
            attempt: 1,
            state,
            stage: None,
            container: None,
            exit_code: Some(3),
            message: Some("exited with status 3".into()),
            node_fault: false,
        })
    }

    fn log(id: u64, task: Uuid, offset: u64, data: &str) -> Record {
        Record::Log(protocol::LogChunk {
            id,
            task_id: task,
            attempt: 1,
            offset,
            data: data.into(),
        })
    }

    fn ids(replay: &Replay) -> Vec<u64> {
        replay.reports.iter().map(Replayed::id).collect()
    }

    fn file_of(dir: &Path) -> Vec<u8> {
        std::fs::read(dir.join(FILE)).unwrap()
    }

    #[test]
    fn what_is_appended_is_read_back_in_order_until_it_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let task = Uuid::new_v4();
        let (mut journal, replay) = Journal::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert!(replay.reports.is_empty());
        assert_eq!(replay.next_id, 1);
        journal
            .append(&[log(2, task, 0, "a\n"), log(3, task, 2, "b\n")])
            .unwrap();
        journal
            .append(&[status(5, task, ReportedState::Failed)])
            .unwrap();
        journal.done(&[2]).unwrap();
        drop(journal);

        let (mut journal, replay) = Journal::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(ids(&replay), vec![3, 5]);
        assert_eq!(
            replay.reports[1].record(),
            status(5, task, ReportedState::Failed)
        );
        assert_eq!(replay.next_id, 6, "ids keep growing across restarts");
        assert_eq!((replay.torn, replay.corrupt), (0, 0));
        journal.done(&[3, 5, 99]).unwrap();
        assert!(journal.is_empty());
        let text = String::from_utf8(file_of(dir.path())).unwrap();
        assert_eq!(text.lines().count(), 1, "compacted to its next id: {text}");
        drop(journal);
        let (_, replay) = Journal::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert!(replay.reports.is_empty());
        assert_eq!(replay.next_id, 6);
    }

    #[test]
    fn a_torn_last_record_and_garbage_are_skipped_and_the_rest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let task = Uuid::new_v4();
        let (mut journal, _) = Journal::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        journal.append(&[log(1, task, 0, "kept\n")]).unwrap();
        journal
            .append(&[status(2, task, ReportedState::Succeeded)])
            .unwrap();
        drop(journal);
        let whole = line(&status(3, task, ReportedState::Failed)).unwrap();
        let mut bytes = file_of(dir.path());
        // Garbage in the middle: not JSON, a bad checksum, a huge line.
        bytes.extend_from_slice(b"\x00\xffnot a record at all\n");
        let mut forged = line(&log(7, task, 5, "forged\n")).unwrap();
        forged[0] ^= 1;
        bytes.extend_from_slice(&forged);
        bytes.extend(std::iter::repeat_n(b'x', MAX_RECORD_BYTES + 10));
        bytes.push(b'\n');
        // A record of an id the host command results use.
        bytes.extend_from_slice(&line(&log(RESULT_ID_BASE, task, 0, "no\n")).unwrap());
        // The process died while writing the last record.
        bytes.extend_from_slice(&whole[..whole.len() / 2]);
        std::fs::write(dir.path().join(FILE), &bytes).unwrap();

        let (mut journal, replay) = Journal::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(ids(&replay), vec![1, 2]);
        assert_eq!(replay.corrupt, 4);
        assert_eq!(replay.torn, whole.len() / 2);
        // The file was rewritten clean: a new record is not glued to the
        // torn one.
        journal
            .append(&[status(4, task, ReportedState::Failed)])
            .unwrap();
        drop(journal);
        let (_, replay) = Journal::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(ids(&replay), vec![1, 2, 4]);
        assert_eq!((replay.torn, replay.corrupt), (0, 0));
    }

    #[test]
    fn an_empty_or_binary_file_is_no_error() {
        for content in [&b""[..], b"\n\n\n", &[0u8; 4096], b"\xff\xfe\xfd"] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path()).unwrap();
            std::fs::write(dir.path().join(FILE), content).unwrap();
            let (journal, replay) = Journal::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
            assert!(replay.reports.is_empty() && journal.is_empty());
        }
    }

    #[test]
    fn past_the_bound_the_oldest_log_chunks_go_and_final_statuses_stay() {
        let dir = tempfile::tempdir().unwrap();
        let task = Uuid::new_v4();
        let chunk = "y".repeat(1000);
        let (mut journal, _) = Journal::open(dir.path(), 5000).unwrap();
        journal
            .append(&[status(1, task, ReportedState::Failed)])
            .unwrap();
        for id in 2..=20 {
            journal
                .append(&[log(id, task, (id - 2) * 1000, &chunk)])
                .unwrap();
        }
        journal
            .append(&[status(21, task, ReportedState::Succeeded)])
            .unwrap();
        assert!(journal.live_bytes <= 5000, "{}", journal.live_bytes);
        drop(journal);
        let (_, replay) = Journal::open(dir.path(), 5000).unwrap();
        let kept = ids(&replay);
        assert_eq!(kept.first(), Some(&1), "the final status stays: {kept:?}");
        assert_eq!(kept.last(), Some(&21));
        assert!(kept.contains(&20), "the newest output stays: {kept:?}");
        assert!(!kept.contains(&2), "the oldest output goes: {kept:?}");
        // A bound smaller than the final statuses keeps them all the same.
        let (_, replay) = Journal::open(dir.path(), 10).unwrap();
        assert_eq!(ids(&replay), vec![1, 21]);
    }

    #[test]
    fn dead_records_are_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let task = Uuid::new_v4();
        let chunk = "z".repeat(60_000);
        let (mut journal, _) = Journal::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        journal
            .append(&[status(1, task, ReportedState::Failed)])
            .unwrap();
        for id in 2..100 {
            journal.append(&[log(id, task, 0, &chunk)]).unwrap();
            journal.done(&[id]).unwrap();
        }
        let size = file_of(dir.path()).len();
        assert!(size < 2 * COMPACT_MIN_BYTES as usize, "{size} bytes");
        drop(journal);
        let (_, replay) = Journal::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(ids(&replay), vec![1]);
    }
}
