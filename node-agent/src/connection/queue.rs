//! The report queue: reliable delivery of status reports and log chunks.
//!
//! Every report gets an increasing agent-local `id` when it is queued and
//! stays queued until the server answers `received{id}`. Reports go out in
//! id order, at most [`Limits::in_flight`] unanswered at once; after a
//! reconnect, [`ReportQueue::rewind`] sends every unanswered one again, in
//! order, before anything newer.
//!
//! Status reports are never dropped. Log output that was never sent is
//! bounded per attempt ([`Limits::log_bytes_per_attempt`]): past it, the
//! middle of the unsent output is replaced by one marker line,
//! `[unidesk: N bytes of output dropped: …]`, keeping the first part and
//! the newest part. That happens while the server is unreachable, and
//! also when a task prints faster than the server takes output (it bounds
//! the rate per node and answers slowly past it): either way the agent's
//! memory stays flat however much a task prints. Offsets after the marker are moved so the
//! server still sees a stream without gaps (`offset + len` of each chunk is
//! the next chunk's `offset`). A chunk that was ever sent is never changed:
//! the server may have stored it.
//!
//! A queue opened on a directory ([`ReportQueue::open`]) keeps a
//! [`Journal`] there: a final status is journaled (with the attempt's
//! output not sent yet) as it is queued, a log chunk at the latest when it
//! is sent, and either is fsynced before it counts as sent. What the
//! journal holds is queued again, before anything new, when the agent
//! starts. A final status stays in the journal after its `received` until
//! the attempt's container and directory are gone ([`ReportQueue::settled`]),
//! so a restart in between finds the report, not an orphaned container.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;

use protocol::{AgentMessage, LogChunk, Status};

use super::journal::{self, Journal, Record, Replayed};
use crate::executor::{LogReport, Report, StatusReport};
use crate::supervisor::AttemptKey;

/// Bookkeeping cost of one queued entry beyond its text.
const ENTRY_COST: usize = 64;

/// The bounds of a [`ReportQueue`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most reports sent and not yet answered.
    pub in_flight: usize,
    /// Most log bytes (plus a small cost per chunk) queued for one attempt.
    pub log_bytes_per_attempt: usize,
    /// Most bytes of live records in the journal; past it the oldest log
    /// chunks are forgotten by the journal, never final statuses.
    pub journal_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            in_flight: 128,
            log_bytes_per_attempt: 4 * 1024 * 1024,
            journal_bytes: journal::DEFAULT_MAX_BYTES,
        }
    }
}

#[derive(Debug)]
enum Item {
    Status(StatusReport),
    Log {
        key: AttemptKey,
        offset: u64,
        data: String,
        /// Set on a marker: how many bytes it stands for.
        dropped: Option<u64>,
    },
}

#[derive(Debug)]
struct Entry {
    id: u64,
    /// Sent in some session; such an entry is never changed or dropped.
    sent: bool,
    /// In the journal; such an entry is never changed either.
    journaled: bool,
    item: Item,
}

impl Entry {
    fn cost(&self) -> usize {
        match &self.item {
            Item::Log { data, .. } => data.len() + ENTRY_COST,
            Item::Status(_) => ENTRY_COST,
        }
    }

    fn log_of(&self, key: AttemptKey) -> bool {
        matches!(&self.item, Item::Log { key: k, .. } if *k == key)
    }

    fn is_final(&self) -> bool {
        matches!(&self.item, Item::Status(s) if s.is_final())
    }

    /// Whether it may still change: never sent nor journaled.
    fn open(&self) -> bool {
        !self.sent && !self.journaled
    }

    fn key(&self) -> AttemptKey {
        match &self.item {
            Item::Status(s) => (s.task_id, s.attempt),
            Item::Log { key, .. } => *key,
        }
    }
}

/// A report the server answered, as [`ReportQueue::answer`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    /// The report's id.
    pub id: u64,
    /// Its task.
    pub task_id: uuid::Uuid,
    /// Its attempt.
    pub attempt: u32,
    /// What it was, for a log line: `log chunk` or the state it reported.
    pub what: String,
    /// Whether it was the attempt's final status: the attempt's container
    /// and directory may go now, and then [`ReportQueue::settled`] drops it
    /// from the journal.
    pub ends_attempt: bool,
}

/// Per attempt: queued log bytes and the offset correction after drops.
#[derive(Debug, Default)]
struct AttemptLog {
    queued: usize,
    /// Added to the executor's offsets: marker length minus dropped bytes.
    shift: i64,
}

/// The queue of reports waiting for the server's `received`.
#[derive(Debug, Default)]
pub struct ReportQueue {
    entries: VecDeque<Entry>,
    /// Index of the next entry to send in this session.
    cursor: usize,
    next_id: u64,
    logs: HashMap<AttemptKey, AttemptLog>,
    limits: Limits,
    journal: Option<Journal>,
}

impl ReportQueue {
    /// An empty queue with these bounds.
    pub fn new(limits: Limits) -> Self {
        ReportQueue {
            limits,
            next_id: 1,
            ..ReportQueue::default()
        }
    }

    /// A queue journaled in `dir` (see the module documentation), holding
    /// first what the journal held.
    ///
    /// # Errors
    /// The I/O error when the journal cannot be created, read or written.
    pub fn open(limits: Limits, dir: &Path) -> std::io::Result<Self> {
        let (journal, replay) = Journal::open(dir, limits.journal_bytes)?;
        let mut queue = ReportQueue::new(limits);
        queue.next_id = replay.next_id;
        for report in replay.reports {
            let (id, item) = match report {
                Replayed::Status(s) => (s.id, Item::Status(status_report(s))),
                Replayed::Log(l) => (
                    l.id,
                    Item::Log {
                        key: (l.task_id, l.attempt),
                        offset: l.offset,
                        data: l.data,
                        dropped: None,
                    },
                ),
            };
            let entry = Entry {
                id,
                sent: true,
                journaled: true,
                item,
            };
            if let Item::Log { key, .. } = entry.item {
                queue.logs.entry(key).or_default().queued += entry.cost();
            }
            queue.entries.push_back(entry);
        }
        queue.journal = Some(journal);
        Ok(queue)
    }

    /// The attempts whose final status waits for an answer: they ended
    /// here, so they are neither adopted nor run again.
    pub fn ended_attempts(&self) -> BTreeSet<AttemptKey> {
        self.entries
            .iter()
            .filter(|e| e.is_final())
            .map(Entry::key)
            .collect()
    }

    /// How many reports the journal holds (0 without one).
    pub fn journaled(&self) -> usize {
        self.journal.as_ref().map_or(0, Journal::len)
    }

    /// How many reports wait for an answer (sent or not).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Queues a report and gives it the next id.
    pub fn push(&mut self, report: Report) {
        let id = self.next_id;
        self.next_id += 1;
        let item = match report {
            Report::Status(status) => {
                if status.is_final() {
                    self.logs.remove(&(status.task_id, status.attempt));
                }
                Item::Status(status)
            }
            Report::Log(log) => self.log_item(log),
        };
        let entry = Entry {
            id,
            sent: false,
            journaled: false,
            item,
        };
        if entry.is_final() {
            let key = entry.key();
            self.entries.push_back(entry);
            self.journal_end(key);
            return;
        }
        if let Item::Log { key, .. } = entry.item {
            let over = {
                let state = self.logs.entry(key).or_default();
                state.queued += entry.cost();
                state.queued > self.limits.log_bytes_per_attempt
            };
            self.entries.push_back(entry);
            if over {
                self.shed(key);
            }
        } else {
            self.entries.push_back(entry);
        }
    }

    fn log_item(&mut self, log: LogReport) -> Item {
        let key = (log.task_id, log.attempt);
        let shift = self.logs.get(&key).map_or(0, |s| s.shift);
        Item::Log {
            key,
            offset: log.offset.saturating_add_signed(shift),
            data: log.data,
            dropped: None,
        }
    }

    /// Journals an attempt's final status, just queued, with the output
    /// of the attempt not journaled yet: none of it changes any more.
    fn journal_end(&mut self, key: AttemptKey) {
        let Some(journal) = self.journal.as_mut() else {
            return;
        };
        let records: Vec<(usize, Record)> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.journaled && (e.log_of(key) || (e.is_final() && e.key() == key)))
            .map(|(i, e)| (i, record(e)))
            .collect();
        write(journal, &mut self.entries, records);
    }

    /// The next reports to send in this session, as many as the in-flight
    /// window allows; they count as sent from now on. Log chunks among
    /// them are journaled (one fsync) before they are returned.
    pub fn next_batch(&mut self) -> Vec<AgentMessage> {
        let end = self.entries.len().min(self.limits.in_flight);
        if self.cursor >= end {
            return Vec::new();
        }
        let batch = self.cursor..end;
        self.cursor = end;
        if let Some(journal) = self.journal.as_mut() {
            let records: Vec<(usize, Record)> = batch
                .clone()
                .filter(|&i| {
                    let e = &self.entries[i];
                    !e.journaled && matches!(e.item, Item::Log { .. })
                })
                .map(|i| (i, record(&self.entries[i])))
                .collect();
            write(journal, &mut self.entries, records);
        }
        batch
            .map(|i| {
                let entry = &mut self.entries[i];
                entry.sent = true;
                message(entry)
            })
            .collect()
    }

    /// The server answered `received{id}` (stored, or refused for good):
    /// forget that report, and drop it from the journal unless it ended
    /// its attempt (see [`ReportQueue::settled`]). Returns what it was;
    /// `None` when it was not queued.
    pub fn answer(&mut self, id: u64) -> Option<Answered> {
        let at = self.entries.binary_search_by_key(&id, |e| e.id).ok()?;
        let entry = self.entries.remove(at)?;
        if at < self.cursor {
            self.cursor -= 1;
        }
        let (task_id, attempt) = entry.key();
        let answered = Answered {
            id,
            task_id,
            attempt,
            what: match &entry.item {
                Item::Status(s) => format!("status {}", state_name(s.state)),
                Item::Log { .. } => "log chunk".into(),
            },
            ends_attempt: entry.is_final(),
        };
        if let Item::Log { key, .. } = entry.item {
            if let Some(state) = self.logs.get_mut(&key) {
                state.queued = state.queued.saturating_sub(entry.cost());
            }
        }
        if entry.journaled && !answered.ends_attempt {
            self.settled(id);
        }
        Some(answered)
    }

    /// Drops an answered final status from the journal, once its attempt's
    /// container and directory are gone.
    pub fn settled(&mut self, id: u64) {
        if let Some(journal) = self.journal.as_mut() {
            if let Err(e) = journal.done(&[id]) {
                tracing::warn!(id, error = %e, "could not update the report journal");
            }
        }
    }

    /// The attempts with status reports still waiting for an answer (an
    /// attempt that ended here but whose end the server has not stored yet
    /// is still this node's business).
    pub fn attempts(&self) -> std::collections::BTreeSet<AttemptKey> {
        self.entries
            .iter()
            .filter_map(|e| match &e.item {
                Item::Status(s) => Some((s.task_id, s.attempt)),
                Item::Log { .. } => None,
            })
            .collect()
    }

    /// A new session: everything unanswered goes out again, oldest first.
    pub fn rewind(&mut self) {
        self.cursor = 0;
    }

    /// Replaces the middle of `key`'s never-sent output with a marker, so
    /// its queued bytes drop to three quarters of the limit.
    fn shed(&mut self, key: AttemptKey) {
        let limit = self.limits.log_bytes_per_attempt;
        let unsent: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.entries[i].open() && self.entries[i].log_of(key))
            .collect();
        let Some(marker) = self.marker_position(&unsent, limit / 4) else {
            return;
        };
        let last = unsent.last().copied().unwrap_or(marker);
        let old_end = end_offset(&self.entries[last]);
        let mut queued = self.logs.get(&key).map_or(0, |s| s.queued);
        let mut dropped = match &self.entries[marker].item {
            Item::Log { data, dropped, .. } => {
                queued = queued.saturating_sub(data.len());
                dropped.unwrap_or(data.len() as u64)
            }
            Item::Status(_) => 0,
        };
        let mut removed = HashSet::new();
        for &i in unsent.iter().skip_while(|&&i| i <= marker) {
            if queued <= limit * 3 / 4 || i == last {
                break;
            }
            queued = queued.saturating_sub(self.entries[i].cost());
            dropped += text_len(&self.entries[i]);
            removed.insert(self.entries[i].id);
        }
        let text = marker_text(dropped);
        queued += text.len();
        if let Item::Log {
            data, dropped: d, ..
        } = &mut self.entries[marker].item
        {
            *data = text;
            *d = Some(dropped);
        }
        self.entries.retain(|e| !removed.contains(&e.id));
        let new_end = self.renumber_after(key, marker);
        if let Some(state) = self.logs.get_mut(&key) {
            state.queued = queued;
            state.shift += new_end as i64 - old_end as i64;
        }
    }

    /// Where the marker goes: the existing unsent marker, or the first
    /// unsent chunk after `head` bytes; `None` if nothing can be dropped.
    fn marker_position(&self, unsent: &[usize], head: usize) -> Option<usize> {
        let existing = unsent.iter().copied().find(|&i| {
            matches!(
                self.entries[i].item,
                Item::Log {
                    dropped: Some(_),
                    ..
                }
            )
        });
        if existing.is_some() {
            return existing;
        }
        let mut kept = 0;
        let position = unsent.iter().position(|&i| {
            kept += self.entries[i].cost();
            kept > head
        })?;
        // Keep the newest chunk; a marker needs something after it.
        let at = position + 1;
        (at + 1 < unsent.len()).then(|| unsent[at])
    }

    /// Makes `key`'s chunks from `marker` on contiguous; returns the end.
    fn renumber_after(&mut self, key: AttemptKey, marker: usize) -> u64 {
        let mut next = None;
        for entry in self.entries.iter_mut().skip(marker) {
            if let Item::Log {
                key: k,
                offset,
                data,
                ..
            } = &mut entry.item
            {
                if *k != key {
                    continue;
                }
                if let Some(n) = next {
                    *offset = n;
                }
                next = Some(*offset + data.len() as u64);
            }
        }
        next.unwrap_or_default()
    }
}

fn text_len(entry: &Entry) -> u64 {
    match &entry.item {
        Item::Log { data, .. } => data.len() as u64,
        Item::Status(_) => 0,
    }
}

fn end_offset(entry: &Entry) -> u64 {
    match &entry.item {
        Item::Log { offset, data, .. } => offset + data.len() as u64,
        Item::Status(_) => 0,
    }
}

/// The line that stands for dropped output.
pub fn marker_text(dropped: u64) -> String {
    format!(
        "\n[unidesk: {dropped} bytes of output dropped: the task printed faster than \
         the server took it, or the server was unreachable]\n"
    )
}

/// Appends `records` (each with its entry's index) to the journal and
/// marks their entries journaled; a failure is logged and leaves them in
/// memory only.
fn write(journal: &mut Journal, entries: &mut VecDeque<Entry>, records: Vec<(usize, Record)>) {
    if records.is_empty() {
        return;
    }
    let (at, records): (Vec<usize>, Vec<Record>) = records.into_iter().unzip();
    match journal.append(&records) {
        Ok(()) => {
            for i in at {
                entries[i].journaled = true;
            }
        }
        Err(e) => tracing::warn!(
            reports = records.len(),
            error = %e,
            "could not write the report journal; these reports would not survive a restart"
        ),
    }
}

/// An entry as its journal record.
fn record(entry: &Entry) -> Record {
    match message(entry) {
        AgentMessage::Status(s) => Record::Status(s),
        AgentMessage::Log(l) => Record::Log(l),
        _ => Record::Done { id: entry.id },
    }
}

/// A status read back from the journal.
fn status_report(s: Status) -> StatusReport {
    StatusReport {
        task_id: s.task_id,
        attempt: s.attempt,
        state: s.state,
        stage: s.stage,
        container: s.container,
        exit_code: s.exit_code,
        message: s.message,
        node_fault: s.node_fault,
    }
}

/// A state's name on the wire.
fn state_name(state: protocol::ReportedState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{state:?}"))
}

fn message(entry: &Entry) -> AgentMessage {
    match &entry.item {
        Item::Status(s) => AgentMessage::Status(Status {
            id: entry.id,
            task_id: s.task_id,
            attempt: s.attempt,
            state: s.state,
            stage: s.stage.clone(),
            container: s.container.clone(),
            exit_code: s.exit_code,
            message: s.message.clone(),
            node_fault: s.node_fault,
        }),
        Item::Log {
            key, offset, data, ..
        } => AgentMessage::Log(LogChunk {
            id: entry.id,
            task_id: key.0,
            attempt: key.1,
            offset: *offset,
            data: data.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::ReportedState;
    use uuid::Uuid;

    fn status(task: Uuid, state: ReportedState) -> Report {
        Report::Status(StatusReport::new(task, 1, state))
    }

    fn log(task: Uuid, offset: u64, data: &str) -> Report {
        Report::Log(LogReport {
            task_id: task,
            attempt: 1,
            offset,
            data: data.into(),
        })
    }

    fn id(m: &AgentMessage) -> u64 {
        match m {
            AgentMessage::Status(s) => s.id,
            AgentMessage::Log(l) => l.id,
            _ => 0,
        }
    }

    fn drain(q: &mut ReportQueue) -> Vec<AgentMessage> {
        std::iter::from_fn(|| Some(q.next_batch()).filter(|b| !b.is_empty()))
            .flatten()
            .collect()
    }

    #[test]
    fn unanswered_reports_are_resent_in_order_after_a_reconnect() {
        let task = Uuid::new_v4();
        let mut q = ReportQueue::new(Limits::default());
        q.push(status(task, ReportedState::Accepted));
        q.push(log(task, 0, "a"));
        q.push(status(task, ReportedState::Running));
        let first: Vec<u64> = drain(&mut q).iter().map(id).collect();
        assert_eq!(first, vec![1, 2, 3]);
        assert!(q.answer(2).is_some());
        assert!(q.answer(2).is_none(), "an id is answered once");
        q.push(status(task, ReportedState::Succeeded));
        q.rewind();
        let again: Vec<u64> = drain(&mut q).iter().map(id).collect();
        assert_eq!(again, vec![1, 3, 4]);
        for n in [1, 3, 4] {
            q.answer(n);
        }
        q.rewind();
        assert!(q.is_empty());
        assert!(q.next_batch().is_empty());
    }

    #[test]
    fn no_more_than_the_window_is_in_flight() {
        let task = Uuid::new_v4();
        let mut q = ReportQueue::new(Limits {
            in_flight: 2,
            ..Limits::default()
        });
        for _ in 0..3 {
            q.push(status(task, ReportedState::Preparing));
        }
        assert_eq!(drain(&mut q).len(), 2);
        q.answer(1);
        assert_eq!(drain(&mut q).iter().map(id).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn output_beyond_the_limit_loses_its_middle_without_gaps() {
        let task = Uuid::new_v4();
        let limit = 10_000;
        let mut q = ReportQueue::new(Limits {
            in_flight: 1000,
            log_bytes_per_attempt: limit,
            ..Limits::default()
        });
        q.push(log(task, 0, "first line sent before the disconnect\n"));
        drain(&mut q);
        let line = "x".repeat(99) + "\n";
        let mut offset = 38;
        for _ in 0..500 {
            q.push(log(task, offset, &line));
            offset += 100;
        }
        q.push(status(task, ReportedState::Succeeded));
        q.rewind();
        let messages = drain(&mut q);
        let logs: Vec<&LogChunk> = messages
            .iter()
            .filter_map(|m| match m {
                AgentMessage::Log(l) => Some(l),
                _ => None,
            })
            .collect();
        assert_eq!(logs[0].data, "first line sent before the disconnect\n");
        let mut next = 0;
        for l in &logs {
            assert_eq!(l.offset, next, "no gap before id {}", l.id);
            next += l.data.len() as u64;
        }
        let markers: Vec<&&LogChunk> = logs
            .iter()
            .filter(|l| l.data.contains("[unidesk:"))
            .collect();
        assert_eq!(markers.len(), 1);
        let kept: usize = logs.iter().map(|l| l.data.len()).sum();
        assert!(kept <= limit, "kept {kept}");
        let dropped: u64 = markers[0]
            .data
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap();
        let kept_output = kept as u64 - markers[0].data.len() as u64;
        assert_eq!(
            kept_output + dropped,
            offset,
            "every byte is kept or counted"
        );
        assert_eq!(logs.last().unwrap().data, line, "the newest output is kept");
        assert!(matches!(messages.last(), Some(AgentMessage::Status(_))));
    }

    /// What the queue holds, in bytes of text plus bookkeeping.
    fn held(q: &ReportQueue) -> usize {
        q.entries.iter().map(Entry::cost).sum()
    }

    #[test]
    fn a_task_printing_forever_to_a_slow_server_keeps_the_queue_bounded() {
        let task = Uuid::new_v4();
        let limits = Limits::default();
        let mut q = ReportQueue::new(limits);
        let chunk = "p".repeat(protocol::MAX_LOG_CHUNK_BYTES - 1) + "\n";
        let bound = limits.log_bytes_per_attempt
            + limits.in_flight * (chunk.len() + ENTRY_COST)
            + 2 * (chunk.len() + ENTRY_COST);
        let mut logs: Vec<LogChunk> = Vec::new();
        let mut in_flight = VecDeque::new();
        let mut send = |q: &mut ReportQueue, in_flight: &mut VecDeque<u64>| {
            for m in drain(q) {
                in_flight.push_back(id(&m));
                if let AgentMessage::Log(l) = m {
                    logs.push(l);
                }
            }
        };
        let mut most = 0;
        let mut offset = 0;
        // 256 MiB of output; the server answers one report in twenty.
        for i in 0..4096u64 {
            q.push(log(task, offset, &chunk));
            offset += chunk.len() as u64;
            send(&mut q, &mut in_flight);
            if i % 20 == 0 {
                if let Some(id) = in_flight.pop_front() {
                    q.answer(id);
                }
            }
            most = most.max(held(&q));
        }
        assert!(most <= bound, "held {most} bytes, bound {bound}");
        // The server catches up: what it got is one stream without gaps,
        // every byte either kept or counted by a marker.
        while let Some(id) = in_flight.pop_front() {
            q.answer(id);
            send(&mut q, &mut in_flight);
        }
        assert!(q.is_empty());
        let mut next = 0;
        let (mut markers, mut marker_bytes, mut dropped) = (0, 0, 0);
        for l in &logs {
            assert_eq!(l.offset, next, "no gap before id {}", l.id);
            next += l.data.len() as u64;
            if l.data.contains("[unidesk:") {
                markers += 1;
                marker_bytes += l.data.len() as u64;
                dropped += l
                    .data
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap();
            }
        }
        assert!(markers >= 1);
        assert_eq!(
            next - marker_bytes + dropped,
            offset,
            "every byte kept or counted"
        );
        assert_eq!(
            logs.last().unwrap().data,
            chunk,
            "the newest output is kept"
        );
    }

    #[test]
    fn statuses_are_never_dropped() {
        let task = Uuid::new_v4();
        let mut q = ReportQueue::new(Limits {
            in_flight: 1000,
            log_bytes_per_attempt: 1000,
            ..Limits::default()
        });
        for i in 0..100 {
            q.push(status(task, ReportedState::Preparing));
            q.push(log(task, i * 50, &"y".repeat(50)));
        }
        let statuses = drain(&mut q)
            .iter()
            .filter(|m| matches!(m, AgentMessage::Status(_)))
            .count();
        assert_eq!(statuses, 100);
    }

    fn ids(messages: &[AgentMessage]) -> Vec<u64> {
        messages.iter().map(id).collect()
    }

    #[test]
    fn a_final_status_and_the_output_before_it_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let task = Uuid::new_v4();
        let mut q = ReportQueue::open(Limits::default(), dir.path()).unwrap();
        q.push(status(task, ReportedState::Running));
        q.push(log(task, 0, "sent\n"));
        assert_eq!(ids(&drain(&mut q)), vec![1, 2]);
        // Never sent: the server was gone when the attempt ended.
        q.push(log(task, 5, "tail\n"));
        let mut end = StatusReport::new(task, 1, ReportedState::Failed);
        end.exit_code = Some(3);
        q.push(Report::Status(end));
        assert_eq!(q.journaled(), 3, "running is not journaled");
        drop(q);

        let mut q = ReportQueue::open(Limits::default(), dir.path()).unwrap();
        assert_eq!(q.ended_attempts(), BTreeSet::from([(task, 1)]));
        assert_eq!(q.attempts(), BTreeSet::from([(task, 1)]));
        q.push(status(Uuid::new_v4(), ReportedState::Accepted));
        let again = drain(&mut q);
        assert_eq!(ids(&again), vec![2, 3, 4, 5], "in order, new ids after");
        let AgentMessage::Log(tail) = &again[1] else {
            panic!("{again:?}")
        };
        assert_eq!((tail.offset, tail.data.as_str()), (5, "tail\n"));
        let AgentMessage::Status(s) = &again[2] else {
            panic!("{again:?}")
        };
        assert_eq!((s.state, s.exit_code), (ReportedState::Failed, Some(3)));
    }

    #[test]
    fn answered_reports_leave_the_journal_and_a_final_one_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let task = Uuid::new_v4();
        let mut q = ReportQueue::open(Limits::default(), dir.path()).unwrap();
        q.push(log(task, 0, "a\n"));
        q.push(log(task, 2, "b\n"));
        q.push(status(task, ReportedState::Succeeded));
        drain(&mut q);
        let refused = q.answer(1).unwrap();
        assert_eq!(
            (refused.task_id, refused.attempt, refused.what.as_str()),
            (task, 1, "log chunk")
        );
        assert!(!refused.ends_attempt);
        let end = q.answer(3).unwrap();
        assert!(end.ends_attempt);
        assert_eq!(end.what, "status succeeded");
        assert_eq!(q.journaled(), 2, "the final status waits to be settled");
        drop(q);
        let mut q = ReportQueue::open(Limits::default(), dir.path()).unwrap();
        assert_eq!(ids(&drain(&mut q)), vec![2, 3], "refused chunk not resent");
        q.answer(2);
        q.answer(3);
        q.settled(3);
        assert_eq!(q.journaled(), 0);
        drop(q);
        let q = ReportQueue::open(Limits::default(), dir.path()).unwrap();
        assert!(q.is_empty());
    }
}
