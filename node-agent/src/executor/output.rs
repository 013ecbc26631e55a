//! A container's output, reported as log chunks: followed while it runs,
//! and caught up once it stopped for what the follow missed.

use std::time::Duration;

use bollard::Docker;
use futures::StreamExt;
use tokio::sync::oneshot;

use crate::docker;
use crate::logs::LogChunker;

use super::report::{Mask, Reporter};

/// How long buffered output may wait before it is reported.
const LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// Reports the container's output as log chunks until it ends.
///
/// Docker sometimes ends a follow before it has written the container's
/// last, unterminated line (the line is logged when the output pipe
/// closes, racing the follower). So once `exited` fires, the entries of
/// the last seconds are read again without following, and those the
/// follow did not see are added.
pub(super) async fn pump_output(
    docker: Docker,
    id: String,
    out: Reporter,
    exited: oneshot::Receiver<()>,
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
    let mut complete = follow_output(&docker, &id, &out, &mut chunker, &mut seen).await;
    if complete && exited.await.is_ok() {
        complete = catch_up(&docker, &id, &mut chunker, &seen).await;
    }
    if !complete {
        tracing::warn!("the container's output could not be read to its end");
    }
    for chunk in chunker.finish() {
        out.log(chunk).await;
    }
}

/// How far back from the newest entry seen the catch-up looks. stdout and
/// stderr are stamped by two copiers, so the log's order is not the
/// order of its timestamps: an entry written after another can carry an
/// earlier time, by far less than this.
const CATCH_UP_WINDOW: chrono::Duration = chrono::Duration::seconds(2);

/// The entries a follow saw: the newest time, and every time within
/// [`CATCH_UP_WINDOW`] of it, so that a catch-up adds each entry once.
#[derive(Debug, Default)]
struct Seen {
    newest: Option<chrono::DateTime<chrono::Utc>>,
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
        let newest = self.newest.map_or(at, |n| n.max(at));
        self.newest = Some(newest);
        self.recent.insert(at);
        let horizon = newest - CATCH_UP_WINDOW;
        while self.recent.first().is_some_and(|t| *t < horizon) {
            self.recent.pop_first();
        }
    }
}

/// Follows the output until the container stops; false if reading failed.
async fn follow_output(
    docker: &Docker,
    id: &str,
    out: &Reporter,
    chunker: &mut LogChunker,
    seen: &mut Seen,
) -> bool {
    let mut output = std::pin::pin!(docker::output(docker, id, true, 0));
    let mut flush = tokio::time::interval(LOG_FLUSH_INTERVAL);
    loop {
        tokio::select! {
            item = output.next() => match item {
                Some(Ok(entry)) => {
                    seen.note(entry.at);
                    chunker.push(&entry.data);
                    while chunker.has_full_chunk() {
                        if let Some(chunk) = chunker.take() {
                            out.log(chunk).await;
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading the output failed");
                    return false;
                }
                None => return true,
            },
            _ = flush.tick() => {
                if let Some(chunk) = chunker.take() {
                    out.log(chunk).await;
                }
            }
        }
    }
}

/// Adds the entries of a stopped container the follow did not see.
async fn catch_up(docker: &Docker, id: &str, chunker: &mut LogChunker, seen: &Seen) -> bool {
    if seen.unstamped {
        return true;
    }
    let horizon = seen.newest.map(|n| n - CATCH_UP_WINDOW);
    let since = horizon.map_or(0, |t| i32::try_from(t.timestamp()).unwrap_or(0));
    let mut output = std::pin::pin!(docker::output(docker, id, false, since));
    while let Some(item) = output.next().await {
        match item {
            Ok(entry) => {
                let missed = match (entry.at, horizon) {
                    (Some(at), Some(horizon)) => at >= horizon && !seen.recent.contains(&at),
                    (_, None) => true,
                    (None, Some(_)) => false,
                };
                if missed {
                    tracing::debug!(bytes = entry.data.len(), "output the follow missed");
                    chunker.push(&entry.data);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the rest of the output failed");
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

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
