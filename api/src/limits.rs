//! Limits on what one caller can make the server do: a request rate per
//! token and a number of open live streams per user.
//!
//! The rate limit is a layer in front of every route but `/healthz`,
//! `/readyz` and `/metrics` (the agents' WebSocket is served by the
//! ingress's own router and never passes here). It authenticates the
//! request first — by parsing, then one indexed lookup, never an aggregate
//! load ([`crate::auth`]) — and leaves the outcome in the request for the
//! handler's [`Caller`] extractor. A request with a valid token is counted
//! against that token (by its id); any other request against the client's
//! address, so that nobody can use up another user's allowance by sending
//! their token id with a made-up secret. Counting uses GCRA from the
//! `governor` crate; a refused request gets 429 with `Retry-After` in whole
//! seconds, rounded up, so that a client waiting that long is let in.
//!
//! Stream slots are counted per user and per API process: the SSE routes
//! take a [`StreamSlot`] before they answer, and the slot is given back
//! when the stream's state is dropped, which happens as soon as the client
//! goes away or the stream ends.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use telemetry::prometheus::IntCounter;
use uuid::Uuid;

use crate::auth::{self, Authenticated, Caller};
use crate::error::ApiError;
use crate::AppState;

/// Requests per second one token may make unless configured.
pub const DEFAULT_RATE_PER_S: u32 = 100;
/// Requests one token may make at once, above the steady rate, unless
/// configured.
pub const DEFAULT_RATE_BURST: u32 = 400;
/// Live tokens one user may hold unless configured.
pub const DEFAULT_MAX_TOKENS_PER_USER: usize = 20;
/// Open live streams one user may hold on one API process unless
/// configured.
pub const DEFAULT_MAX_STREAMS_PER_USER: usize = 16;
/// What a client refused a stream is told to wait: slots free up when
/// other streams of the same user end, which nothing here can foresee.
pub const STREAM_RETRY_AFTER_S: u64 = 5;

/// Paths that are never rate limited: probes and the metrics scrape.
const EXEMPT: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// How often keys that have not been seen for a while are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A steady request rate with a burst above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per second, sustained.
    pub per_s: NonZeroU32,
    /// Requests allowed at once after a quiet spell.
    pub burst: NonZeroU32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_s: NonZeroU32::new(DEFAULT_RATE_PER_S).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(DEFAULT_RATE_BURST).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// Whom a request is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    /// A valid user token, by id.
    Token(Uuid),
    /// The client's address, for requests without a valid token; `None`
    /// when the server was not given connection information.
    Peer(Option<IpAddr>),
}

type Keyed = RateLimiter<Key, DefaultKeyedStateStore<Key>, DefaultClock>;

/// The request counters of one process.
pub(crate) struct Limiter {
    keyed: Keyed,
    /// When keys were last swept.
    swept: Mutex<Instant>,
}

impl Limiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        Self {
            keyed: RateLimiter::keyed(Quota::per_second(limit.per_s).allow_burst(limit.burst)),
            swept: Mutex::new(Instant::now()),
        }
    }

    /// Counts one request of `key`; the wait before the next one may pass
    /// when this one may not.
    fn check(&self, key: &Key) -> Result<(), Duration> {
        self.sweep();
        self.keyed
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.keyed.clock().now()))
    }

    /// Forgets keys whose counters are back to full, now and then, so that
    /// a stream of one-off client addresses does not grow the map forever.
    fn sweep(&self) {
        let mut swept = self.swept.lock().unwrap_or_else(PoisonError::into_inner);
        if swept.elapsed() >= SWEEP_EVERY {
            *swept = Instant::now();
            drop(swept);
            self.keyed.retain_recent();
            self.keyed.shrink_to_fit();
        }
    }
}

/// Counters of refusals by the limits, for `/metrics`.
#[derive(Debug, Clone)]
pub struct LimitCounters {
    /// Requests refused by the rate limit.
    pub rate_limited: IntCounter,
    /// Streams refused because their user held too many.
    pub streams_refused: IntCounter,
}

impl Default for LimitCounters {
    fn default() -> Self {
        let counter = |name: &str, help: &str| {
            IntCounter::new(name, help).expect("a valid counter definition")
        };
        Self {
            rate_limited: counter(
                "unidesk_rate_limited_total",
                "Requests refused with 429 by the request rate limit.",
            ),
            streams_refused: counter(
                "unidesk_streams_refused_total",
                "Live streams refused with 429 because their user held the most allowed.",
            ),
        }
    }
}

/// Whole seconds to wait, rounded up and at least 1: a client that waits
/// `Retry-After` seconds must be let in.
fn whole_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// The rate limit layer: authenticates, counts, and refuses with 429 past
/// the limit. See the module's documentation.
pub(crate) async fn rate_limit(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(limiter) = state.limiter() else {
        return next.run(request).await;
    };
    if EXEMPT.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let token = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(store::tokens::bearer)
        .map(str::to_string);
    let mut key = Key::Peer(
        request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip()),
    );
    if let Some(token) = token {
        match auth::authenticate(state.store(), &token).await {
            Ok(caller) => {
                key = Key::Token(caller.token_id);
                request
                    .extensions_mut()
                    .insert(Authenticated(Ok::<Caller, String>(caller)));
            }
            Err(ApiError::Unauthorized(detail)) => {
                request.extensions_mut().insert(Authenticated(Err(detail)));
            }
            // The database cannot be reached: asking again in the
            // handler's extractor would only make the caller wait twice.
            Err(unavailable @ ApiError::Unavailable(_)) => return unavailable.into_response(),
            // The database failed otherwise: the handler's extractor tries
            // again and answers for it.
            Err(_) => {}
        }
    }
    match limiter.check(&key) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            state.limit_counters().rate_limited.inc();
            let seconds = whole_seconds(wait);
            let whom = match key {
                Key::Token(_) => "this token",
                Key::Peer(_) => "requests without a valid token from this address",
            };
            ApiError::TooManyRequests {
                detail: format!(
                    "too many requests for {whom}; try again in {seconds} s (Retry-After)"
                ),
                retry_after_s: seconds,
            }
            .into_response()
        }
    }
}

/// Open live streams per user in this process.
#[derive(Debug, Clone)]
pub struct StreamSlots {
    inner: Arc<SlotsInner>,
}

#[derive(Debug)]
struct SlotsInner {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

impl StreamSlots {
    /// At most `max` open streams per user.
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::new(SlotsInner {
                max,
                open: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A slot for one more stream of `user`.
    ///
    /// # Errors
    /// 429 with `Retry-After` when `user` holds the most streams already.
    pub fn take(&self, user: &str) -> Result<StreamSlot, ApiError> {
        let mut open = self.inner.lock();
        let n = open.entry(user.to_string()).or_insert(0);
        if *n >= self.inner.max {
            let max = self.inner.max;
            drop(open);
            return Err(ApiError::TooManyRequests {
                detail: format!(
                    "{user} has {max} live streams open on this server, the most allowed; \
                     close one (or wait for one to end) and try again"
                ),
                retry_after_s: STREAM_RETRY_AFTER_S,
            });
        }
        *n += 1;
        Ok(StreamSlot {
            slots: self.inner.clone(),
            user: user.to_string(),
        })
    }

    /// How many streams `user` holds open.
    pub fn open(&self, user: &str) -> usize {
        self.inner.lock().get(user).copied().unwrap_or(0)
    }

    /// How many streams are open in all.
    pub fn total(&self) -> usize {
        self.inner.lock().values().sum()
    }
}

impl SlotsInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One open stream's place; given back when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    slots: Arc<SlotsInner>,
    user: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.lock();
        if let Some(n) = open.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// Takes a stream slot for `caller`, counting a refusal.
///
/// # Errors
/// 429 when the caller holds the most streams already.
pub(crate) fn stream_slot(state: &AppState, caller: &Caller) -> Result<StreamSlot, ApiError> {
    state
        .stream_slots()
        .take(&caller.user)
        .inspect_err(|_| state.limit_counters().streams_refused.inc())
}

/// Documents the rate limit's 429 on every operation of `doc` it applies
/// to, with its `Retry-After` header, so that no route can forget it.
/// Operations that already document a 429 (the streams, for their own
/// limit) keep their description and gain the header.
pub fn document(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::header::HeaderBuilder;
    use utoipa::openapi::{ContentBuilder, Object, Ref, RefOr, ResponseBuilder, Type};
    let retry_after = || {
        HeaderBuilder::new()
            .schema(Object::with_type(Type::Integer))
            .description(Some("Whole seconds to wait before trying again"))
            .build()
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        if EXEMPT.contains(&path.as_str()) {
            continue;
        }
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for operation in operations.into_iter().flatten() {
            let responses = &mut operation.responses.responses;
            match responses.get_mut("429") {
                Some(RefOr::T(response)) => {
                    response
                        .headers
                        .entry("Retry-After".into())
                        .or_insert_with(retry_after);
                }
                Some(RefOr::Ref(_)) => {}
                None => {
                    let response = ResponseBuilder::new()
                        .description("Too many requests for this token (or, without a valid token, from this address); see Retry-After")
                        .header("Retry-After", retry_after())
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name("ErrorBody")))
                                .build(),
                        )
                        .build();
                    responses.insert("429".into(), RefOr::T(response));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_round_up_to_whole_seconds_of_at_least_one() {
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn a_user_holds_at_most_max_slots_and_a_dropped_one_is_given_back() {
        let slots = StreamSlots::new(2);
        let a = slots.take("ann").expect("first");
        let _b = slots.take("ann").expect("second");
        assert!(matches!(
            slots.take("ann"),
            Err(ApiError::TooManyRequests { .. })
        ));
        let _other = slots.take("bob").expect("another user is not affected");
        drop(a);
        assert_eq!(slots.open("ann"), 1);
        let _c = slots.take("ann").expect("a freed slot");
        assert_eq!(slots.total(), 3);
    }

    #[test]
    fn a_burst_past_the_limit_is_refused_with_a_wait() {
        let limiter = Limiter::new(RateLimit {
            per_s: NonZeroU32::MIN,
            burst: NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN),
        });
        let key = Key::Token(Uuid::nil());
        for _ in 0..3 {
            assert!(limiter.check(&key).is_ok());
        }
        let wait = limiter.check(&key).expect_err("past the burst");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(limiter.check(&Key::Peer(None)).is_ok());
    }
}
