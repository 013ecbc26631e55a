//! Following a task's output and the timeline live, over Server-Sent
//! Events, through dropped connections and server restarts: every event
//! carries an id, and a reconnect sends the last one as `Last-Event-ID`,
//! so the server goes on right after it — no gap, no byte twice.

use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use reqwest::Method;
use serde::Deserialize;
use tokio::time::Instant;
use uuid::Uuid;

use crate::api::Client;
use crate::error::{transport, Error, Result};
use crate::types::{Task, TimelineEntry};

/// How long a follower keeps reconnecting to a server it cannot reach
/// before it gives up.
pub const RECONNECT_FOR: Duration = Duration::from_secs(600);

/// One Server-Sent Event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// Its `event:` (`message` when none was given).
    pub event: String,
    /// Its `data:` lines, joined by `\n`.
    pub data: String,
    /// Its `id:`, when it had one.
    pub id: Option<String>,
}

/// Reads Server-Sent Events from a response body.
pub struct SseReader {
    body: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
    current: SseEvent,
    has_data: bool,
}

impl SseReader {
    /// Reads the events of `response`.
    pub fn new(response: reqwest::Response) -> SseReader {
        SseReader {
            body: response.bytes_stream().boxed(),
            buf: Vec::new(),
            current: SseEvent::default(),
            has_data: false,
        }
    }

    /// The next event; `None` when the stream ended.
    ///
    /// # Errors
    /// The connection broke (in words).
    pub async fn next(&mut self) -> std::result::Result<Option<SseEvent>, String> {
        loop {
            while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if let Some(event) = self.line(&String::from_utf8_lossy(&line)) {
                    return Ok(Some(event));
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(transport(e)),
                None => return Ok(None),
            }
        }
    }

    /// Takes one line; an event when it ends one.
    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let event = std::mem::take(&mut self.current);
            let had = std::mem::take(&mut self.has_data);
            return (had || !event.event.is_empty()).then(|| SseEvent {
                event: if event.event.is_empty() {
                    "message".into()
                } else {
                    event.event
                },
                ..event
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.current.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            "id" => self.current.id = Some(value.to_string()),
            _ => {}
        }
        None
    }
}

#[derive(Debug, Deserialize)]
struct LogData {
    attempt: u32,
    offset: u64,
    next_offset: u64,
    #[serde(default)]
    data: String,
}

#[derive(Debug, Deserialize)]
struct EndData {
    attempt: u32,
    state: String,
}

/// Tells the user, on standard error, when the connection is lost and
/// found again; quiet when `quiet`.
struct Outage {
    since: Option<Instant>,
    quiet: bool,
}

impl Outage {
    fn lost(&mut self, why: &str) -> Result<()> {
        match self.since {
            None => {
                if !self.quiet {
                    eprintln!("unidesk: connection lost ({why}); reconnecting");
                }
                self.since = Some(Instant::now());
                Ok(())
            }
            Some(since) if since.elapsed() > RECONNECT_FOR => Err(Error::Unreachable {
                server: String::new(),
                detail: format!(
                    "gave up reconnecting after {} s: {why}",
                    RECONNECT_FOR.as_secs()
                ),
            }),
            Some(_) => Ok(()),
        }
    }

    fn found(&mut self) {
        if self.since.take().is_some() && !self.quiet {
            eprintln!("unidesk: reconnected");
        }
    }

    /// Sends `request` for a stream: the response, or `None` after an
    /// outage that may pass (counted, and waited out) so the caller asks
    /// again.
    async fn connect(
        &mut self,
        client: &Client,
        request: reqwest::RequestBuilder,
    ) -> Result<Option<reqwest::Response>> {
        match client.send(request, false).await {
            Ok(r) => {
                self.found();
                Ok(Some(r))
            }
            Err(e) if passing(&e) => {
                self.lost(&e.to_string())?;
                self.pause().await;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn pause(&self) {
        let waited = self.since.map_or(Duration::ZERO, |s| s.elapsed());
        let pause = if waited < Duration::from_secs(5) {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(1)
        };
        tokio::time::sleep(pause).await;
    }
}

/// Whether a failure is one a reconnect may cure.
fn passing(e: &Error) -> bool {
    match e {
        Error::Unreachable { .. } => true,
        Error::Refused { status, .. } => *status == 429 || *status >= 500,
        _ => false,
    }
}

/// Follows the output of task `id` from its current (or first) attempt
/// until the task ends, handing each piece to `out` exactly once, across
/// lost attempts and lost connections. Returns the task as it ended.
///
/// # Errors
/// [`Error::Refused`] (not found, forbidden), or [`Error::Unreachable`]
/// once the server was unreachable for [`RECONNECT_FOR`].
pub async fn logs(
    client: &Client,
    id: Uuid,
    quiet: bool,
    mut out: impl FnMut(&str),
) -> Result<Task> {
    let mut attempt: Option<u32> = None;
    let mut offset: u64 = 0;
    let mut outage = Outage { since: None, quiet };
    loop {
        let mut request = client
            .request(Method::GET, &format!("/tasks/{id}/logs"))
            .query(&[("follow", "true")]);
        if let Some(a) = attempt {
            request = request.header("Last-Event-ID", format!("{a}:{offset}"));
        }
        let Some(response) = outage.connect(client, request).await? else {
            continue;
        };
        let mut events = SseReader::new(response);
        let ended = loop {
            match events.next().await {
                Ok(Some(event)) if event.event == "log" => {
                    let Ok(log) = serde_json::from_str::<LogData>(&event.data) else {
                        continue;
                    };
                    if attempt != Some(log.attempt) {
                        attempt = Some(log.attempt);
                        offset = log.offset;
                    }
                    if log.next_offset <= offset {
                        continue;
                    }
                    let skip = offset.saturating_sub(log.offset) as usize;
                    out(log.data.get(skip..).unwrap_or(&log.data));
                    offset = log.next_offset;
                }
                Ok(Some(event)) if event.event == "end" => {
                    break serde_json::from_str::<EndData>(&event.data).ok();
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    outage.lost("the server closed the stream")?;
                    break None;
                }
                Err(why) => {
                    outage.lost(&why)?;
                    break None;
                }
            }
        };
        let Some(end) = ended else {
            outage.pause().await;
            continue;
        };
        // The attempt is over; the task may go on with another.
        loop {
            let task = match client.task(id).await {
                Ok(task) => task,
                Err(e) if passing(&e) => {
                    outage.lost(&e.to_string())?;
                    outage.pause().await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if task.is_terminal() {
                return Ok(task);
            }
            if task.attempt > end.attempt {
                if !quiet && end.attempt > 0 {
                    let why = task
                        .attempt_reason(end.attempt)
                        .and_then(|r| r.lines().next())
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default();
                    eprintln!(
                        "unidesk: attempt {} ended ({}{why}); following attempt {}",
                        end.attempt, end.state, task.attempt
                    );
                }
                attempt = Some(task.attempt);
                offset = 0;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Which timeline events to follow: the query of `GET /timeline`.
pub type TimelineQuery = Vec<(&'static str, String)>;

/// Follows the timeline after position `after` (everything new when
/// `None`), handing each event to `out` once, across lost connections.
/// Returns only on an error.
///
/// # Errors
/// As [`logs`].
pub async fn timeline(
    client: &Client,
    query: &TimelineQuery,
    after: Option<i64>,
    quiet: bool,
    mut out: impl FnMut(&TimelineEntry),
) -> Result<()> {
    let mut last = after;
    let mut outage = Outage { since: None, quiet };
    loop {
        let mut request = client.request(Method::GET, "/timeline/stream").query(query);
        if let Some(position) = last {
            request = request.header("Last-Event-ID", position.to_string());
        }
        let Some(response) = outage.connect(client, request).await? else {
            continue;
        };
        let mut events = SseReader::new(response);
        loop {
            match events.next().await {
                Ok(Some(event)) if event.event == "timeline" => {
                    if let Ok(entry) = serde_json::from_str::<TimelineEntry>(&event.data) {
                        // The log's order is not that of positions: take
                        // each as it comes, resume after the last one.
                        last = Some(entry.position);
                        out(&entry);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    outage.lost("the server closed the stream")?;
                    break;
                }
                Err(why) => {
                    outage.lost(&why)?;
                    break;
                }
            }
        }
        outage.pause().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_make_events_and_comments_are_skipped() {
        let mut r = SseReader {
            body: futures::stream::empty().boxed(),
            buf: Vec::new(),
            current: SseEvent::default(),
            has_data: false,
        };
        let lines = [
            ": keep-alive",
            "event: log",
            "id: 1:5",
            "data: {\"a\":1}",
            "",
        ];
        let mut got = Vec::new();
        for l in lines {
            got.extend(r.line(l));
        }
        assert_eq!(
            got,
            vec![SseEvent {
                event: "log".into(),
                data: "{\"a\":1}".into(),
                id: Some("1:5".into()),
            }]
        );
        assert_eq!(r.line(""), None, "an empty line alone is no event");
    }
}
