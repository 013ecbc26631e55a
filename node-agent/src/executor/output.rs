//! A container's output, reported as log chunks: followed while it runs,
//! and caught up once it stopped for what the follow missed.

use std::time::Duration;

use bollard::Docker;
use futures::StreamExt;
use tokio::sync::oneshot;

use crate::docker;
use crate::logs::LogChunker;

use super::report::Reporter;

/// How long buffered output may wait before it is reported.
const LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// Reports the container's output as log chunks until it ends.
///
/// Docker sometimes ends a follow before it has written the container's
/// last, unterminated line (the line is logged when the output pipe
/// closes, racing the follower). So once `exited` fires, the entries
/// logged after the last one seen are read again without following.
pub(super) async fn pump_output(
    docker: Docker,
    id: String,
    out: Reporter,
    exited: oneshot::Receiver<()>,
) {
    let mut chunker = LogChunker::new();
    let mut last_seen = None;
    let mut complete = follow_output(&docker, &id, &out, &mut chunker, &mut last_seen).await;
    if complete && exited.await.is_ok() {
        complete = catch_up(&docker, &id, &mut chunker, last_seen).await;
    }
    if !complete {
        tracing::warn!("the container's output could not be read to its end");
    }
    for chunk in chunker.finish() {
        out.log(chunk).await;
    }
}

/// Follows the output until the container stops; false if reading failed.
async fn follow_output(
    docker: &Docker,
    id: &str,
    out: &Reporter,
    chunker: &mut LogChunker,
    last_seen: &mut Option<chrono::DateTime<chrono::Utc>>,
) -> bool {
    let mut output = std::pin::pin!(docker::output(docker, id, true, 0));
    let mut flush = tokio::time::interval(LOG_FLUSH_INTERVAL);
    loop {
        tokio::select! {
            item = output.next() => match item {
                Some(Ok(entry)) => {
                    if entry.at.is_some() {
                        *last_seen = entry.at;
                    }
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

/// Adds the entries of a stopped container logged after `last_seen`.
async fn catch_up(
    docker: &Docker,
    id: &str,
    chunker: &mut LogChunker,
    last_seen: Option<chrono::DateTime<chrono::Utc>>,
) -> bool {
    let since = last_seen.map_or(0, |t| i32::try_from(t.timestamp()).unwrap_or(0));
    let mut output = std::pin::pin!(docker::output(docker, id, false, since));
    while let Some(item) = output.next().await {
        match item {
            Ok(entry) => {
                let newer = match (entry.at, last_seen) {
                    (Some(at), Some(seen)) => at > seen,
                    (_, None) => true,
                    (None, Some(_)) => false,
                };
                if newer {
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
