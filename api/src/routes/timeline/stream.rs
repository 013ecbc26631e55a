//! `GET /api/v1/timeline/stream`: new timeline events as Server-Sent
//! Events, from the outbox, as they are committed ([`crate::timeline`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use store::outbox::{self, Checkpoint};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::extract::Query;
use crate::timeline::{self, Item, RawFilter, Subscription, TimelineFilter, Visibility};
use crate::AppState;

/// How often an idle stream sends a comment, so proxies keep it open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How often a stream checks again what its caller may see: a member who
/// left a project stops receiving its events within this time.
pub const ACCESS_RECHECK: Duration = Duration::from_secs(10);

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream))
}

/// Which events to follow: the filters of `GET /timeline`, and where to
/// start.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StreamTimeline {
    /// Only this task's events.
    #[param(value_type = Option<Uuid>)]
    task: Option<String>,
    /// Only this node's events and the task events that name it.
    #[param(value_type = Option<Uuid>)]
    node: Option<String>,
    /// Only this project's events and its tasks'.
    #[param(value_type = Option<Uuid>)]
    project: Option<String>,
    /// Only events of `task`, `node`, `project` or `user` aggregates.
    #[param(value_type = Option<String>, pattern = "^(task|project|node|user)$")]
    aggregate_type: Option<String>,
    /// Only events of this type.
    #[param(value_type = Option<String>, pattern = "^[A-Za-z0-9]{1,64}$")]
    event_type: Option<String>,
    /// Only events at or after this time (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    since: Option<String>,
    /// Only events before this time (RFC 3339).
    #[param(value_type = Option<DateTime<Utc>>)]
    until: Option<String>,
    /// Start after the event at this position: a page's `live_after`, or
    /// 0 for the start of the log. Without it (and without
    /// `Last-Event-ID`) the stream starts with the next event committed.
    #[param(value_type = Option<i64>, minimum = 0)]
    after: Option<String>,
}

/// New events on the timeline, live, as Server-Sent Events.
///
/// - `event: ready`, once: everything up to now was sent, events arrive as
///   they are committed from here on;
/// - `event: timeline`, `id: <position>`, data a [`TimelineEntry`] as
///   `GET /timeline` lists it, oldest first, each event once;
/// - comments every 15 s while nothing happens.
///
/// Takes the filters of `GET /timeline`, checked the same way, and shows
/// the caller exactly what that route would (checked again every 10 s, so
/// a member who leaves a project stops receiving its events and a revoked
/// token ends the stream). To resume,
/// send the last id received as `Last-Event-ID`: the stream goes on right
/// after that event.
///
/// A user holds at most a configured number of live streams (timeline
/// streams and log follows together, 16 by default) on one server; one
/// more is refused with 429 and `Retry-After` until one of theirs closes.
///
/// [`TimelineEntry`]: crate::schema::timeline::TimelineEntry
#[utoipa::path(
    get,
    path = "/timeline/stream",
    tag = "events",
    params(
        StreamTimeline,
        ("Last-Event-ID" = Option<String>, Header, pattern = "^([0-9]{1,18})?$",
            description = "The id (position) of the last event received, to resume right after it")
    ),
    responses(
        (status = 200, description = "A stream of Server-Sent Events", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad parameter or Last-Event-ID, named", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "The task, project or node filtered on does not exist or is not the caller's", body = ErrorBody),
        (status = 429, description = "Too many requests, or the caller holds the most live streams allowed; see Retry-After", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<StreamTimeline>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let filter = TimelineFilter::parse(&RawFilter {
        task: q.task.as_deref(),
        node: q.node.as_deref(),
        project: q.project.as_deref(),
        aggregate_type: q.aggregate_type.as_deref(),
        event_type: q.event_type.as_deref(),
        since: q.since.as_deref(),
        until: q.until.as_deref(),
    })?;
    // Both are checked; Last-Event-ID, sent by a reconnecting client,
    // takes precedence.
    let given = position("after", q.after.as_deref())?;
    // Empty, as EventSource leaves it after an event without id, it is
    // absent.
    let last = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("?"))
        .filter(|v| !v.trim().is_empty());
    let (field, after) = match position("Last-Event-ID", last)? {
        Some(p) => ("Last-Event-ID", Some(p)),
        None => ("after", given),
    };
    super::check_filter(&state, &caller, &filter).await?;
    let slot = crate::limits::stream_slot(&state, &caller)?;
    let visibility = Visibility::of(state.pool(), &caller).await?;
    // Subscribed before the start is looked up and before the catch-up
    // read, so that nothing falls between them.
    let subscription = state.timeline().subscribe().await?;
    let at = match after {
        None => outbox::head(state.pool()).await?,
        Some(0) => Checkpoint::default(),
        Some(position) => outbox::checkpoint_of(state.pool(), position)
            .await?
            .ok_or_else(|| {
                ApiError::not_found_field(
                    field,
                    format!("there is no event at position {position}"),
                )
            })?,
    };
    let follow = Follow {
        _slot: slot,
        state,
        caller,
        filter,
        visibility,
        at,
        subscription,
        pending: VecDeque::new(),
        caught_up: false,
        ready: false,
        checked: Instant::now(),
    };
    let events = futures::stream::unfold(follow, |mut f| async move {
        match f.next_event().await {
            Ok(Some(event)) => Some((Ok::<_, Infallible>(event), f)),
            Ok(None) | Err(ApiError::NotFound(_) | ApiError::Unauthorized(_)) => None,
            Err(e) => {
                tracing::warn!(error = %e, "a timeline stream ended early");
                None
            }
        }
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Proxies such as nginx would otherwise hold events back.
    let headers = response.headers_mut();
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// Parameter `field`, an event position: 1 to 19 digits.
fn position(field: &str, raw: Option<&str>) -> Result<Option<i64>, ApiError> {
    raw.map(|raw| {
        let digits = raw.trim();
        let ok = (1..=19).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
        ok.then(|| digits.parse::<i64>().ok())
            .flatten()
            .ok_or_else(|| {
                ApiError::bad_request(field, format!("must be an event position, got {raw:?}"))
            })
    })
    .transpose()
}

/// One subscriber's place in the log.
struct Follow {
    /// The caller's stream slot, given back when the client leaves.
    _slot: crate::limits::StreamSlot,
    state: AppState,
    caller: Caller,
    filter: TimelineFilter,
    visibility: Visibility,
    /// The last event delivered or passed over.
    at: Checkpoint,
    subscription: Subscription,
    /// Events read but not sent yet.
    pending: VecDeque<Item>,
    /// Whether the outbox has been read up to what the broadcast carries.
    caught_up: bool,
    /// Whether `ready` was sent.
    ready: bool,
    /// When access was last checked.
    checked: Instant,
}

impl Follow {
    /// The next event to send, waiting as long as it takes; `None` when the
    /// stream is over.
    async fn next_event(&mut self) -> Result<Option<Event>, ApiError> {
        loop {
            if *self.subscription.stop.borrow() {
                return Ok(None);
            }
            if let Some(item) = self.pending.pop_front() {
                return Ok(Some(
                    Event::default()
                        .event("timeline")
                        .id(item.entry.position.to_string())
                        .json_data(&item.entry)
                        .map_err(|e| ApiError::internal(format!("encoding an event: {e}")))?,
                ));
            }
            if !self.caught_up {
                self.catch_up().await?;
                continue;
            }
            if !self.ready {
                self.ready = true;
                return Ok(Some(Event::default().event("ready").data(
                    serde_json::json!({ "after": self.at.position }).to_string(),
                )));
            }
            if self.checked.elapsed() >= ACCESS_RECHECK {
                self.recheck().await?;
            }
            tokio::select! {
                received = self.subscription.batches.recv() => match received {
                    Ok(batch) => self.take(batch.as_slice()),
                    // Fell behind the broadcast: read the gap from the outbox.
                    Err(RecvError::Lagged(_)) => self.caught_up = false,
                    Err(RecvError::Closed) => return Ok(None),
                },
                _ = self.subscription.stop.changed() => return Ok(None),
                () = tokio::time::sleep_until(self.checked + ACCESS_RECHECK) => {}
            }
        }
    }

    /// Reads one batch from the outbox after `at`.
    async fn catch_up(&mut self) -> Result<(), ApiError> {
        let pool = self.state.pool();
        let events =
            outbox::read_after(pool, self.at, timeline::BATCH, &self.filter.outbox_filter())
                .await?;
        if (events.len() as i64) < timeline::BATCH {
            self.caught_up = true;
        }
        let items = self.state.timeline().builder().build(pool, &events).await?;
        self.take(&items);
        Ok(())
    }

    /// Keeps what is new, asked for and visible.
    fn take(&mut self, items: &[Item]) {
        for item in items {
            if item.checkpoint <= self.at {
                continue;
            }
            self.at = item.checkpoint;
            if self.filter.matches(&item.entry) && self.visibility.allows(&item.entry) {
                self.pending.push_back(item.clone());
            }
        }
    }

    /// Checks again the caller's token and what they may see; a revoked
    /// token, or a filter naming a task or project that is no longer
    /// theirs, ends the stream.
    async fn recheck(&mut self) -> Result<(), ApiError> {
        self.caller = self.caller.refresh(self.state.store()).await?;
        super::check_filter(&self.state, &self.caller, &self.filter).await?;
        self.visibility = Visibility::of(self.state.pool(), &self.caller).await?;
        self.checked = Instant::now();
        Ok(())
    }
}
