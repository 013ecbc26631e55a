//! A container's output, reported as log chunks: followed while it runs,
//! followed on from where it was when Docker breaks the follow off (or
//! stops answering for a while), and caught up once it stopped for what
//! the follow missed.
//!
//! The attempt's end is reported only after its output: the watcher
//! waits for the reader ([`Draining::wait`]) as long as it keeps reading.
//! When it reads nothing for [`DRAIN_STALL`], or is still reading
//! [`DRAIN_MOST`] after the container stopped ([`DRAIN_STALL`] after a
//! cancel), it is told to stop, and
//! the output then ends with a line saying what is missing and why; so
//! does output that Docker stopped giving. Nothing is lost without a word.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use futures::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::docker;
use crate::logs::LogChunker;

use super::report::{Mask, Reporter};

/// How long buffered output may wait before it is reported.
const LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// How long after a follow ends the watcher may take to say the container
/// stopped (it looks into a SIGKILL for up to
/// [`docker::OOM_EVENT_GRACE`]) before the follow is taken to have ended
/// early and is followed on.
const FOLLOW_END_GRACE: Duration = Duration::from_secs(5);

/// How long the reader may read nothing, once the container stopped,
/// before it is told to give up.
pub(super) const DRAIN_STALL: Duration = Duration::from_secs(10);

/// How long the reader may go on reading after the container stopped (a
/// task that printed gigabytes), before it is told to give up.
pub(super) const DRAIN_MOST: Duration = Duration::from_secs(300);

/// The line that ends output the reader could not read to its end.
pub fn missing_marker(why: &str) -> String {
    format!("\n[unidesk: the rest of this attempt's output could not be read, if there was more: {why}]\n")
}

/// The line put where Docker may have discarded output before the agent
/// read it. A follow that lags behind Docker's rotation of the log files
/// skips the rest of the file it was reading (and may read the next one
/// twice); the agent says so where it can tell: when the entry the follow
/// read last is gone from the files, or when the files hold, before it,
/// entries the follow never read.
pub const ROTATED_MARKER: &str =
    "\n[unidesk: output may be missing here: Docker rotated it out of \
     the container's log files before the agent read it; what follows may be out of order]\n";

/// The line that ends output the agent stopped reading because the server
/// keeps no more of an attempt's output than `limit` bytes. Past the
/// limit the server stores its own marker and drops this one; it shows
/// where output was dropped before (the agent's reports could not keep up)
/// and the server's limit was not reached.
pub fn past_limit_marker(limit: u64) -> String {
    format!(
        "\n[unidesk: output past {} was not read: the server keeps no more of an attempt's output]\n",
        crate::git::human_bytes(limit)
    )
}

/// The reader of a container's output, as the watcher holds it.
pub(super) struct Draining {
    pump: JoinHandle<()>,
    /// Bytes read from Docker so far.
    read: Arc<AtomicU64>,
    /// Set to why the reader must give up.
    stop: watch::Sender<Option<String>>,
}

/// Starts reading the container's output into `out`; `exited` fires once
/// the container stopped.
pub(super) fn start(
    docker: Docker,
    id: String,
    out: Reporter,
    exited: oneshot::Receiver<()>,
    limit: Arc<AtomicU64>,
) -> Draining {
    let read = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = watch::channel(None);
    let pump = tokio::spawn(pump_output(
        docker,
        id,
        out,
        exited,
        Arc::clone(&read),
        stopped,
        limit,
    ));
    Draining { pump, read, stop }
}

impl Draining {
    /// Waits for the reader to report all the output, once the container
    /// stopped: as long as it keeps reading, for at most [`DRAIN_MOST`],
    /// or [`DRAIN_STALL`] in all for an attempt the user cancelled (they
    /// asked for it to end, not for the rest of its output). Past either
    /// bound it is told to give up, and it ends the output with
    /// [`missing_marker`].
    pub(super) async fn wait(self, cancelled: bool) {
        let most = if cancelled { DRAIN_STALL } else { DRAIN_MOST };
        self.wait_within(DRAIN_STALL, most).await;
    }

    async fn wait_within(self, stall: Duration, most: Duration) {
        let Draining {
            mut pump,
            read,
            stop,
        } = self;
        let started = tokio::time::Instant::now();
        let mut before = read.load(Ordering::Relaxed);
        let why = loop {
            match tokio::time::timeout(stall, &mut pump).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "output reader stopped");
                    return;
                }
                Err(_) => {}
            }
            let now = read.load(Ordering::Relaxed);
            if now == before {
                break format!(
                    "none was read for {} s after the container stopped",
                    stall.as_secs()
                );
            }
            if started.elapsed() >= most {
                break format!(
                    "it was still being read {} s after the container stopped",
                    most.as_secs()
                );
            }
            before = now;
        };
        tracing::warn!(%why, "giving up on the rest of the container's output");
        let _ = stop.send(Some(why));
        // It stops at its next read, says so in the output and ends.
        if tokio::time::timeout(stall, pump).await.is_err() {
            tracing::warn!(
                "the output reader did not stop; its last output may come after the end"
            );
        }
    }
}

/// Reports the container's output as log chunks until it ends.
///
/// Docker sometimes ends a follow before it has written the container's
/// last, unterminated line (the line is logged when the output pipe
/// closes, racing the follower). So once `exited` fires, the entries of
/// the last seconds are read again without following, and those the
/// follow did not see are added. Output it could not read to its end
/// (Docker failed, or `stop` said why to give up) ends with
/// [`missing_marker`]. Once more was reported than the server keeps of
/// an attempt (`limit`, read as it changes), reading stops, whether the
/// container runs on or not, and the output ends with
/// [`past_limit_marker`].
async fn pump_output(
    docker: Docker,
    id: String,
    out: Reporter,
    exited: oneshot::Receiver<()>,
    read: Arc<AtomicU64>,
    mut stop: watch::Receiver<Option<String>>,
    limit: Arc<AtomicU64>,
) {
    let mut chunker = match out.mask() {
        Mask::Values(values) => LogChunker::new().masking(values.iter().map(|v| v.to_string())),
        Mask::Nothing => LogChunker::new(),
        Mask::Withhold(why) => {
            // Nothing of it goes out: say why, once.
            let mut chunker = LogChunker::new();
            chunker
                .push(format!("[unidesk: this attempt's output is not shown: {why}]\n").as_bytes());
            for chunk in chunker.finish() {
                out.log(chunk).await;
            }
            let _ = exited.await;
            return;
        }
    };
    let mut seen = Seen::default();
    let mut reading = Reading {
        chunker: &mut chunker,
        read: &read,
        stop: &mut stop,
        limit: &limit,
    };
    let mut exited = exited;
    let mut outage = docker::Outage::default();
    let mut done = read_output(&docker, &id, &out, &mut reading, &mut seen, true).await;
    loop {
        match &done {
            // Docker ends a follow when the container stops. One it ended
            // otherwise, or broke off, is followed on from what was read.
            Ok(Read::All) => match tokio::time::timeout(FOLLOW_END_GRACE, &mut exited).await {
                Ok(Ok(())) => {
                    done = read_output(&docker, &id, &out, &mut reading, &mut seen, false).await;
                    break;
                }
                Ok(Err(_)) => break,
                Err(_) => tracing::info!("Docker ended the follow of a running container"),
            },
            Err(Unread::Unanswered(e)) if !seen.unstamped => {
                let e = e.clone();
                tokio::select! {
                    biased;
                    why = reading.stopped() => {
                        done = Err(Unread::Told(why));
                        break;
                    }
                    asking = outage.pause(&e) => if !asking {
                        break;
                    }
                }
            }
            _ => break,
        }
        let before = read.load(Ordering::Relaxed);
        done = read_output(&docker, &id, &out, &mut reading, &mut seen, true).await;
        if read.load(Ordering::Relaxed) > before || done.is_ok() {
            outage.over();
        }
    }
    match done.map_err(Unread::why) {
        Ok(Read::All) => {}
        Ok(Read::PastLimit(limit)) => {
            tracing::info!(
                limit,
                "stopped reading the container's output past the server's limit"
            );
            chunker.push(past_limit_marker(limit).as_bytes());
        }
        Err(why) => {
            tracing::warn!(%why, "the container's output could not be read to its end");
            chunker.push(missing_marker(&why).as_bytes());
        }
    }
    for chunk in chunker.finish() {
        out.log(chunk).await;
    }
}

/// How far a read of the output went, when nothing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// To the end.
    All,
    /// Past the server's limit on an attempt's output, this one.
    PastLimit(u64),
}

/// Why a read of the output ended before the output did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unread {
    /// The watcher said to give up, and why.
    Told(String),
    /// Docker did not answer (asking again may succeed).
    Unanswered(String),
    /// Docker failed the read.
    Failed(String),
}

impl Unread {
    fn why(self) -> String {
        match self {
            Unread::Told(why) | Unread::Unanswered(why) | Unread::Failed(why) => why,
        }
    }

    fn of(e: &docker::DockerError) -> Self {
        if e.is_unanswered() {
            Unread::Unanswered(e.to_string())
        } else {
            Unread::Failed(e.to_string())
        }
    }
}

/// What a read of the output adds to, counts and listens to.
struct Reading<'a> {
    chunker: &'a mut LogChunker,
    /// Bytes read, for the watcher.
    read: &'a AtomicU64,
    /// Why to give up, once told.
    stop: &'a mut watch::Receiver<Option<String>>,
    /// The server's limit on an attempt's output.
    limit: &'a AtomicU64,
}

impl Reading<'_> {
    fn push(&mut self, data: &[u8]) {
        self.read.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.chunker.push(data);
    }

    /// Reports every full chunk waiting, so memory stays flat however
    /// much is read.
    async fn report_full(&mut self, out: &Reporter) {
        while self.chunker.has_full_chunk() {
            if let Some(chunk) = self.chunker.take() {
                out.log(chunk).await;
            }
        }
    }

    /// The server's limit, once more than it was reported.
    fn past_limit(&self) -> Option<u64> {
        let limit = self.limit.load(Ordering::Relaxed);
        (self.chunker.taken() > limit).then_some(limit)
    }

    /// Why to give up, once told; never returns before.
    async fn stopped(&mut self) -> String {
        loop {
            if let Some(why) = self.stop.borrow_and_update().clone() {
                return why;
            }
            if self.stop.changed().await.is_err() {
                // The watcher is gone without a word: nothing will say
                // stop.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// How far back from the newest entry seen the catch-up looks. stdout and
/// stderr are stamped by two copiers, so the log's order is not the
/// order of its timestamps: an entry written after another can carry an
/// earlier time, by far less than this.
const CATCH_UP_WINDOW: chrono::Duration = chrono::Duration::seconds(2);

/// The entries a follow saw: the newest time, and every time within
/// [`CATCH_UP_WINDOW`] of it, so that a catch-up adds each entry once.
#[derive(Debug, Default, Clone)]
struct Seen {
    newest: Option<chrono::DateTime<chrono::Utc>>,
    /// The time of the last entry read, in the log's order.
    last: Option<chrono::DateTime<chrono::Utc>>,
    recent: std::collections::BTreeSet<chrono::DateTime<chrono::Utc>>,
    /// Whether an entry without a time was seen: a catch-up could not
    /// tell it apart, so there is none.
    unstamped: bool,
}

impl Seen {
    fn note(&mut self, at: Option<chrono::DateTime<chrono::Utc>>) {
        let Some(at) = at else {
            self.unstamped = true;
            return;
        };
        self.last = Some(at);
        let newest = self.newest.map_or(at, |n| n.max(at));
        self.newest = Some(newest);
        self.recent.insert(at);
        let horizon = newest - CATCH_UP_WINDOW;
        while self.recent.first().is_some_and(|t| *t < horizon) {
            self.recent.pop_first();
        }
    }
}

/// Reads the container's output after the entries `seen` holds, noting
/// each entry it adds there and reporting full chunks as they come:
/// following it until the container stops (`follow`), or what the log
/// holds now. Ends early once more than the server's limit was reported.
///
/// With nothing seen yet it reads from the start. Otherwise it reads
/// again from [`CATCH_UP_WINDOW`] before the newest entry seen and adds
/// the entries not seen: after a follow that Docker ended before the
/// container's last line (see [`pump_output`]), that Docker broke off,
/// or that lagged behind Docker's rotation of the log files (the follow
/// ends early and this is the rest of the output, hundreds of megabytes
/// of it).
///
/// The log files hold a run of the output up to its end. When that run
/// no longer starts at or before the last entry read (no entry carries
/// its time, to the nanosecond), Docker discarded what came right after
/// it: [`ROTATED_MARKER`] goes before the rest.
async fn read_output(
    docker: &Docker,
    id: &str,
    out: &Reporter,
    reading: &mut Reading<'_>,
    seen: &mut Seen,
    follow: bool,
) -> Result<Read, Unread> {
    if seen.unstamped {
        // Entries without a time cannot be told apart: none is read twice.
        return Ok(Read::All);
    }
    let before = seen.clone();
    let horizon = before.newest.map(|n| n - CATCH_UP_WINDOW);
    let since = horizon.map_or(0, |t| i32::try_from(t.timestamp()).unwrap_or(0));
    let mut output = std::pin::pin!(docker::output(docker, id, follow, since));
    let mut joining = Joining::new(&before);
    let mut flush = tokio::time::interval(LOG_FLUSH_INTERVAL);
    loop {
        // Sends happen in the branches' bodies, never raced: a chunk taken
        // from the chunker is always reported, so offsets have no gap.
        let item = tokio::select! {
            biased;
            why = reading.stopped() => return Err(Unread::Told(why)),
            item = output.next() => item,
            _ = flush.tick(), if follow => {
                if let Some(chunk) = reading.chunker.take() {
                    out.log(chunk).await;
                }
                continue;
            }
        };
        let entry = match item {
            None => return Ok(Read::All),
            Some(Ok(entry)) => entry,
            Some(Err(e)) => {
                // One Docker did not answer is told of once, by the outage.
                if e.is_unanswered() {
                    tracing::debug!(error = %e, follow, "reading the output failed");
                } else {
                    tracing::warn!(error = %e, follow, "reading the output failed");
                }
                return Err(Unread::of(&e));
            }
        };
        let missed = match (entry.at, horizon) {
            (Some(at), Some(horizon)) => at >= horizon && !before.recent.contains(&at),
            (_, None) => true,
            (None, Some(_)) => false,
        };
        if joining.marker_before(entry.at, missed) {
            tracing::warn!("Docker rotated out output the follow had not read");
            reading.push(ROTATED_MARKER.as_bytes());
        }
        if missed {
            if horizon.is_some() {
                tracing::debug!(bytes = entry.data.len(), "output the follow missed");
            }
            seen.note(entry.at);
            reading.push(&entry.data);
            reading.report_full(out).await;
            if let Some(limit) = reading.past_limit() {
                return Ok(Read::PastLimit(limit));
            }
        }
    }
}

/// Tells, entry by entry of a catch-up in the log's order, whether
/// [`ROTATED_MARKER`] goes before the next entry the follow missed. The
/// log files hold a run of the output up to its end, so they hold the
/// entry the follow read last, unless Docker discarded what came after
/// it; and an entry the follow missed before that one is one it skipped.
/// The marker goes in once.
struct Joining {
    /// The time of the entry the follow read last, to the nanosecond.
    last: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether that entry was met, or the marker is in.
    joined: bool,
}

impl Joining {
    fn new(seen: &Seen) -> Self {
        Joining {
            last: seen.last,
            // Nothing to look for when the follow read nothing.
            joined: seen.last.is_none(),
        }
    }

    /// Notes the next entry (at `at`, `missed` by the follow); whether the
    /// marker goes before it.
    fn marker_before(&mut self, at: Option<chrono::DateTime<chrono::Utc>>, missed: bool) -> bool {
        self.joined |= at.is_some() && at == self.last;
        let marker = missed && !self.joined;
        self.joined |= marker;
        marker
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen_up_to(last: i64) -> Seen {
        let mut seen = Seen::default();
        for t in 1..=last {
            seen.note(Some(at(t)));
        }
        seen
    }

    /// Where markers go in a catch-up of `entries` (time, missed).
    fn markers(seen: &Seen, entries: &[(i64, bool)]) -> Vec<i64> {
        let mut joining = Joining::new(seen);
        entries
            .iter()
            .filter(|(t, missed)| joining.marker_before(Some(at(*t)), *missed))
            .map(|(t, _)| *t)
            .collect()
    }

    #[test]
    fn a_catch_up_that_meets_the_last_entry_read_adds_no_marker() {
        let seen = seen_up_to(5);
        assert!(markers(&seen, &[(4, false), (5, false), (6, true), (7, true)]).is_empty());
    }

    #[test]
    fn a_catch_up_without_the_last_entry_read_says_where_output_is_missing_once() {
        let seen = seen_up_to(5);
        assert_eq!(markers(&seen, &[(8, true), (9, true)]), [8]);
    }

    #[test]
    fn entries_the_follow_skipped_before_its_last_one_are_marked() {
        // The follow jumped from 2 to 5: 3 and 4 are still in the files.
        let mut seen = seen_up_to(2);
        seen.note(Some(at(5)));
        assert_eq!(
            markers(&seen, &[(3, true), (4, true), (5, false), (6, true)]),
            [3]
        );
    }

    #[test]
    fn a_follow_that_read_nothing_has_nothing_missing_to_name() {
        assert!(markers(&Seen::default(), &[(1, true), (2, true)]).is_empty());
    }

    /// A reader doing `work` with the counter and the stop signal a real
    /// one has; the receiver is a copy to read what it was told.
    fn reader<F, Fut>(work: F) -> (Draining, watch::Receiver<Option<String>>)
    where
        F: FnOnce(Arc<AtomicU64>, watch::Receiver<Option<String>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let read = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = watch::channel(None);
        let told = stopped.clone();
        let pump = tokio::spawn(work(Arc::clone(&read), stopped));
        (Draining { pump, read, stop }, told)
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_keeps_reading_is_waited_for_past_the_stall() {
        let (draining, told) = reader(|read, _| async move {
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                read.fetch_add(1, Ordering::Relaxed);
            }
        });
        let started = tokio::time::Instant::now();
        draining
            .wait_within(Duration::from_secs(10), DRAIN_MOST)
            .await;
        assert!(started.elapsed() >= Duration::from_secs(50));
        assert_eq!(*told.borrow(), None);
    }

    /// A reader that reads until told to stop, then returns why.
    fn stoppable(
        every: Option<Duration>,
    ) -> (
        Draining,
        watch::Receiver<Option<String>>,
        oneshot::Receiver<String>,
    ) {
        let (gave_up, why) = oneshot::channel();
        let (draining, told) = reader(move |read, mut stop| async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(every.unwrap_or(Duration::MAX)) => {
                        read.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let _ = gave_up.send(stop.borrow().clone().unwrap_or_default());
        });
        (draining, told, why)
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_reads_nothing_for_the_stall_is_told_why_and_ends() {
        let (draining, told, why) = stoppable(None);
        let started = tokio::time::Instant::now();
        draining
            .wait_within(Duration::from_secs(10), Duration::from_secs(300))
            .await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(20),
            "{waited:?}"
        );
        let why = why.await.expect("the reader was told");
        assert_eq!(why, "none was read for 10 s after the container stopped");
        assert_eq!(told.borrow().as_deref(), Some(why.as_str()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_still_reading_at_the_most_is_told_why_and_ends() {
        let (draining, _, why) = stoppable(Some(Duration::from_secs(1)));
        let started = tokio::time::Instant::now();
        draining
            .wait_within(Duration::from_secs(10), Duration::from_secs(60))
            .await;
        assert!(started.elapsed() >= Duration::from_secs(60));
        assert_eq!(
            why.await.expect("the reader was told"),
            "it was still being read 60 s after the container stopped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_attempt_waits_for_its_output_only_as_long_as_the_stall() {
        let (draining, _, why) = stoppable(Some(Duration::from_secs(1)));
        let started = tokio::time::Instant::now();
        draining.wait(true).await;
        let waited = started.elapsed();
        assert!(
            waited >= DRAIN_STALL && waited < 2 * DRAIN_STALL,
            "{waited:?}"
        );
        assert_eq!(
            why.await.expect("the reader was told"),
            "it was still being read 10 s after the container stopped"
        );
    }

    #[test]
    fn the_marker_is_a_line_of_its_own_saying_why() {
        let line = missing_marker("Docker went away");
        assert!(line.starts_with("\n[unidesk: ") && line.ends_with("Docker went away]\n"));
        assert_eq!(line.trim().lines().count(), 1);
    }

    fn at(ms: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap_or_default()
    }

    #[test]
    fn an_entry_stamped_earlier_than_one_before_it_leaves_the_newest_time_and_both_known() {
        let mut seen = Seen::default();
        // stdout's lines, then a stderr line stamped before the last two.
        for ms in [0, 500, 900, 400] {
            seen.note(Some(at(ms)));
        }
        assert_eq!(seen.newest, Some(at(900)));
        assert!([0, 400, 500, 900]
            .iter()
            .all(|ms| seen.recent.contains(&at(*ms))));
        // Times far behind the newest are forgotten; the window stays small.
        seen.note(Some(at(10_000)));
        assert_eq!(seen.recent.len(), 1);
        assert!(!seen.unstamped);
        seen.note(None);
        assert!(seen.unstamped);
    }
}
