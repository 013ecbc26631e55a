//! UniDesk's REST API under `/api/v1`.
//!
//! Every request is authenticated with a bearer token ([`auth::Caller`]),
//! every input is parsed and validated at the edge before anything is
//! appended to the log, and every error leaves as one JSON envelope
//! ([`ApiError`]). Commands go to the event log through [`store::Store`];
//! single resources are read from their aggregates (so a client reads its own
//! writes at once), lists from the read models the projector maintains.
//!
//! The server binary uses [`AppState::new`], [`router`] and
//! [`bootstrap_admin`]; the OpenAPI document is generated from the handlers
//! themselves and served at `/api/v1/openapi.json` ([`openapi()`]).

pub mod access;
pub mod auth;
pub mod bootstrap;
pub mod error;
pub mod extract;
pub mod fresh;
pub mod health;
pub mod idempotency;
pub mod limits;
pub mod live_logs;
pub mod openapi;
pub mod page;
mod provision;
pub mod routes;
pub mod schema;
pub mod timeline;
pub mod web;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use domain::spec::UrlPolicy;
use store::Store;
use tower_http::trace::TraceLayer;

pub use auth::Caller;
pub use bootstrap::{bootstrap_admin, BootstrapError};
pub use error::ApiError;
pub use limits::{RateLimit, StreamSlots};
pub use live_logs::LogFollowers;
pub use openapi::openapi;
pub use provision::{provision_node, provision_node_with_limits};
pub use timeline::TimelineFeed;

/// The largest request body accepted by default: 1 MiB, far above any
/// legitimate task specification and small enough that a client cannot
/// make the server buffer much.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// The part size of multipart uploads unless configured: 64 MiB.
pub const DEFAULT_PART_BYTES: u64 = 64 * 1024 * 1024;

/// Why object routes and tasks with inputs or outputs are refused.
pub const NO_OBJECT_STORE: &str =
    "this server has no object store configured (start it with --s3-endpoint and --s3-bucket)";

/// How the API behaves, fixed at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Which repository URL schemes task submissions may use.
    pub url_policy: UrlPolicy,
    /// The largest request body in bytes; larger ones get 413.
    pub body_limit: usize,
    /// Whether every user may create projects; by default only admins
    /// may, as creating projects is an admin's decision.
    pub users_create_projects: bool,
    /// The most live (unrevoked, unexpired) tokens a user may hold; issuing
    /// one more answers 409.
    pub max_tokens_per_user: usize,
    /// The most live streams (log follows and timeline streams together)
    /// one user may hold open on this process; one more answers 429.
    pub max_streams_per_user: usize,
    /// The request rate allowed per token (and per client address for
    /// requests without a valid token); `None` for no limit.
    pub rate_limit: Option<RateLimit>,
    /// What `/readyz` calls degraded: the database's size budget and how
    /// old an open transaction may get.
    pub health: store::health::Limits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url_policy: UrlPolicy::default(),
            body_limit: DEFAULT_BODY_LIMIT,
            users_create_projects: false,
            max_tokens_per_user: limits::DEFAULT_MAX_TOKENS_PER_USER,
            max_streams_per_user: limits::DEFAULT_MAX_STREAMS_PER_USER,
            rate_limit: Some(RateLimit::default()),
            health: store::health::Limits::default(),
        }
    }
}

/// What every handler shares: the event log and the configuration.
/// Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    store: Store,
    config: Arc<Config>,
    followers: LogFollowers,
    objects: Option<objects::ObjectStore>,
    part_bytes: u64,
    timeline: TimelineFeed,
    limiter: Option<Arc<limits::Limiter>>,
    stream_slots: StreamSlots,
    limit_counters: Arc<limits::LimitCounters>,
    secrets_key: Option<store::secrets::SecretsKey>,
    metrics: telemetry::Metrics,
}

impl AppState {
    /// State for a router over `store`, with metrics of its own (see
    /// [`AppState::with_metrics`] to share the process's).
    pub fn new(store: Store, config: Config) -> Self {
        let metrics = telemetry::Metrics::new(&store, config.health);
        let state = Self::unregistered(store, config, metrics.clone());
        state.register_metrics(&metrics);
        state
    }

    /// State whose API counters are not (yet) in `metrics`.
    fn unregistered(store: Store, config: Config, metrics: telemetry::Metrics) -> Self {
        Self {
            metrics,
            followers: LogFollowers::new(store.pool().clone()),
            objects: None,
            part_bytes: DEFAULT_PART_BYTES,
            timeline: TimelineFeed::new(store.pool().clone()),
            limiter: config.rate_limit.map(|l| Arc::new(limits::Limiter::new(l))),
            stream_slots: StreamSlots::new(config.max_streams_per_user),
            limit_counters: Arc::default(),
            secrets_key: None,
            store,
            config: Arc::new(config),
        }
    }

    /// The same state counting into the process's `metrics`, which its
    /// `/metrics` serves and whose health figures its `/readyz` reports:
    /// the API's own counters (rate limit and stream refusals, open
    /// streams) are registered there.
    pub fn with_metrics(mut self, metrics: telemetry::Metrics) -> Self {
        self.register_metrics(&metrics);
        self.metrics = metrics;
        self
    }

    fn register_metrics(&self, metrics: &telemetry::Metrics) {
        metrics.register(self.limit_counters.rate_limited.clone());
        metrics.register(self.limit_counters.streams_refused.clone());
        let slots = self.stream_slots.clone();
        match telemetry::prometheus::PullingGauge::new(
            "unidesk_streams_open",
            "Live streams (log follows and timeline streams) open on this process.",
            Box::new(move || slots.total() as f64),
        ) {
            Ok(gauge) => metrics.register(gauge),
            Err(e) => tracing::error!(error = %e, "the open streams gauge could not be made"),
        }
    }

    /// The metrics of this process, which `/metrics` serves.
    pub fn metrics(&self) -> &telemetry::Metrics {
        &self.metrics
    }

    /// The event log.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The connection pool, for reading read models.
    pub fn pool(&self) -> &sqlx::PgPool {
        self.store.pool()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The live log followers of this process; [`LogFollowers::stop`] ends
    /// their streams at shutdown.
    pub fn log_followers(&self) -> &LogFollowers {
        &self.followers
    }

    /// The same state signing upload and download URLs with `objects`,
    /// cutting uploads larger than `part_bytes` into parts of that size.
    /// Without a store, object routes answer 409 and tasks with inputs or
    /// outputs are refused.
    pub fn with_objects(mut self, objects: Option<objects::ObjectStore>, part_bytes: u64) -> Self {
        self.objects = objects;
        self.part_bytes = part_bytes.max(objects::MIN_PART_BYTES);
        self
    }

    /// The same state sealing project secrets with `key`. Without a key,
    /// secrets cannot be set (409 naming `--secrets-key-file`).
    pub fn with_secrets_key(mut self, key: Option<store::secrets::SecretsKey>) -> Self {
        self.secrets_key = key;
        self
    }

    /// The key that seals project secrets.
    ///
    /// # Errors
    /// 409 when the server has none.
    pub fn secrets_key(&self) -> Result<&store::secrets::SecretsKey, ApiError> {
        self.secrets_key.as_ref().ok_or_else(|| {
            ApiError::conflict(
                "this server has no secrets key: start it with --secrets-key-file to keep project secrets",
            )
        })
    }

    /// The object store.
    ///
    /// # Errors
    /// 409 when the server has none.
    pub fn objects(&self) -> Result<&objects::ObjectStore, ApiError> {
        self.objects
            .as_ref()
            .ok_or_else(|| ApiError::conflict(NO_OBJECT_STORE))
    }

    /// The part size of multipart uploads.
    pub fn part_bytes(&self) -> u64 {
        self.part_bytes
    }

    /// The live timeline of this process; [`TimelineFeed::stop`] ends its
    /// streams at shutdown.
    pub fn timeline(&self) -> &TimelineFeed {
        &self.timeline
    }

    /// The open live streams of this process, per user.
    pub fn stream_slots(&self) -> &StreamSlots {
        &self.stream_slots
    }

    /// How often the limits refused something, for `/metrics`.
    pub fn limit_counters(&self) -> &limits::LimitCounters {
        &self.limit_counters
    }

    /// The platform's health as `/readyz` and `/metrics` report it.
    pub fn health(&self) -> &health::HealthChecks {
        self.metrics.health()
    }

    pub(crate) fn limiter(&self) -> Option<&limits::Limiter> {
        self.limiter.as_deref()
    }
}

/// The whole HTTP surface: `/healthz`, `/readyz`, `/metrics`,
/// `/api/v1/...`, `/api/v1/openapi.json` and the web view at `/` ([`web`]),
/// with the body limit, the rate limit ([`limits`]), request tracing and
/// JSON errors for unknown routes and methods.
///
/// The rate limit counts requests without a valid token by client address,
/// which it finds when the router is served with
/// `into_make_service_with_connect_info::<SocketAddr>()`; without that
/// they share one allowance.
pub fn router(state: AppState) -> axum::Router {
    let body_limit = state.config.body_limit;
    let (router, doc) = routes::all().split_for_parts();
    router
        .merge(web::router())
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::Extension(Arc::new(openapi::finish(doc))))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::rate_limit,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Only `/healthz`, `/readyz` and `/metrics`, answered with `store`'s
/// database judged by `limits` and this process's `metrics`, as a scrape
/// for `scope` answers: for a process without the API, and for the
/// metrics listener of any process. Unknown routes answer 404.
pub fn probes(
    store: Store,
    limits: store::health::Limits,
    metrics: telemetry::Metrics,
    scope: telemetry::Scope,
) -> axum::Router {
    let config = Config {
        health: limits,
        ..Config::default()
    };
    let state = AppState::unregistered(store, config, metrics);
    let (router, _) = routes::health::router().split_for_parts();
    router
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::Extension(scope))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
