//! UniDesk's Prometheus metrics, in the text format 0.0.4 that
//! `promtool check metrics` checks.
//!
//! Each server process holds one [`Metrics`]: a registry of what the
//! process itself counts (HTTP requests, agent sessions and their reports,
//! task latencies, the process's CPU and memory), and the platform's
//! gauges, read from the database when scraped ([`platform`]). Every role
//! serves it at `/metrics`: the API listener, the small listener of a
//! process without an API, and the optional private metrics listener
//! (`--metrics-listen`).
//!
//! Labels never carry ids, node or user names, or anything secret, and
//! each has a bounded set of values: HTTP routes are route templates,
//! statuses and methods come from short lists, and project names appear
//! only on the private listener ([`Scope::Private`]), at most
//! [`platform::MAX_PROJECTS`] of them.

pub mod health;
pub mod http;
pub mod ingress;
pub mod platform;
pub mod tasks;

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};

use futures::future::BoxFuture;
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};
use store::Store;

pub use ingress::IngressMetrics;
/// The metrics library, for the families other crates define and
/// [`Metrics::register`].
pub use prometheus;

/// The content type of a scrape's answer: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Who a scrape is for, which decides whether project names appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// A listener anyone may reach (the API's): no project names, since
    /// the API shows a project only to its members.
    #[default]
    Public,
    /// The metrics listener, meant for the monitoring network only: also
    /// tasks per project, labelled with the project's name.
    Private,
}

/// A refresher run before each scrape, such as one setting a gauge from a
/// count kept elsewhere.
type Hook = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// The metrics of one process. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    health: health::HealthChecks,
    hooks: Mutex<Vec<Hook>>,
    platform: platform::Platform,
    http: http::HttpMetrics,
    ingress: OnceLock<IngressMetrics>,
    tasks: OnceLock<tasks::TaskLatencies>,
    observer: OnceLock<Arc<tasks::LatencyObserver>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The metrics of a process working on `store`, whose database's size
    /// is judged by `limits` (the budget of `--db-budget-gb`).
    pub fn new(store: &Store, limits: store::health::Limits) -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        register(
            &registry,
            prometheus::process_collector::ProcessCollector::for_self(),
        );
        let http = http::HttpMetrics::new();
        http.register(&registry);
        let metrics = Self {
            inner: Arc::new(Inner {
                registry,
                health: health::HealthChecks::new(store.pool().clone(), limits),
                hooks: Mutex::new(Vec::new()),
                platform: platform::Platform::new(store.pool().clone(), limits),
                http,
                ingress: OnceLock::new(),
                tasks: OnceLock::new(),
                observer: OnceLock::new(),
            }),
        };
        metrics.count_aggregate_loads(store);
        metrics
    }

    /// The platform's health figures, shared by `/readyz` and `/metrics`.
    pub fn health(&self) -> &health::HealthChecks {
        &self.inner.health
    }

    /// Registers `collector` (a counter, gauge or histogram, or a family of
    /// them) to be scraped with the rest. A name already registered is
    /// logged and the collector left out.
    pub fn register<C: Collector + 'static>(&self, collector: C) {
        register(&self.inner.registry, collector);
    }

    /// Runs `refresh` before every scrape, such as to set a gauge from a
    /// count kept elsewhere.
    pub fn on_scrape<F, Fut>(&self, refresh: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let hook: Hook = Arc::new(move || Box::pin(refresh()));
        self.inner
            .hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(hook);
    }

    /// The agent ingress's counters, registered on first use.
    pub fn ingress(&self) -> &IngressMetrics {
        self.inner.ingress.get_or_init(|| {
            let m = IngressMetrics::new();
            m.register(&self.inner.registry);
            self.inner.platform.add_consumer("ingress", m.clone());
            m
        })
    }

    /// The task latency histograms, registered on first use.
    pub fn task_latencies(&self) -> &tasks::TaskLatencies {
        self.inner.tasks.get_or_init(|| {
            let m = tasks::TaskLatencies::new();
            m.register(&self.inner.registry);
            m
        })
    }

    /// The observer that fills [`Metrics::task_latencies`] from the batches
    /// a projector of this process commits, for
    /// [`projections::Projector::with_observer`]: give it to every
    /// projector that applies the tasks read model (the projector role's
    /// and the scheduler's). One observer serves them all, so the earlier
    /// times one of them committed serve the transitions another commits.
    pub fn projector_observer(&self) -> Arc<dyn projections::Observer> {
        self.inner
            .observer
            .get_or_init(|| {
                Arc::new(tasks::LatencyObserver::new(
                    self.inner.platform.pool().clone(),
                    self.task_latencies().clone(),
                ))
            })
            .clone()
    }

    /// `router` with every request counted and timed by route template,
    /// method and status ([`http`]).
    pub fn track_http<S: Clone + Send + Sync + 'static>(
        &self,
        router: axum::Router<S>,
    ) -> axum::Router<S> {
        self.inner.http.track(router)
    }

    /// Everything, as a scrape for `scope` answers it: the hooks run, the
    /// platform's gauges measured (or taken from a measurement at most
    /// [`platform::FRESH_FOR`] old), all in the text format 0.0.4.
    pub async fn render(&self, scope: Scope) -> String {
        let hooks: Vec<Hook> = self
            .inner
            .hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for hook in hooks {
            hook().await;
        }
        let mut families = self.inner.registry.gather();
        families.extend(
            self.inner
                .platform
                .families(&self.inner.health, scope)
                .await,
        );
        encode(families)
    }

    /// `unidesk_aggregate_loads_total`, from the store's own counts.
    fn count_aggregate_loads(&self, store: &Store) {
        let loads = counter_vec(
            "unidesk_aggregate_loads_total",
            "Aggregates loaded from the event log by this process.",
            &["aggregate_type"],
        );
        self.register(loads.clone());
        let store = store.clone();
        self.on_scrape(move || {
            for (aggregate_type, n) in store.aggregate_loads().all() {
                let counter = loads.with_label_values(&[aggregate_type]);
                // The store counts; the counter follows it up.
                counter.inc_by(n.saturating_sub(counter.get()));
            }
            std::future::ready(())
        });
    }
}

/// Families in the text format, sorted by name.
fn encode(mut families: Vec<MetricFamily>) -> String {
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::error!(error = %e, "encoding the metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Registers `collector` in `registry`, logging a refusal (a name taken
/// twice: a mistake of this code, never of its input).
fn register<C: Collector + 'static>(registry: &Registry, collector: C) {
    if let Err(e) = registry.register(Box::new(collector)) {
        tracing::error!(error = %e, "a metric could not be registered");
    }
}

/// A counter family. The names and labels are constants of this crate,
/// checked by its tests; a bad one is a mistake of this code.
fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("a valid counter definition")
}

/// A gauge family, as [`counter_vec`].
fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> prometheus::IntGaugeVec {
    prometheus::IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid gauge definition")
}

/// A histogram family with `buckets`, as [`counter_vec`].
fn histogram_vec(
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::HistogramVec {
    prometheus::HistogramVec::new(
        prometheus::HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("a valid histogram definition")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_family_is_defined_once_and_a_scrape_without_a_database_says_so() {
        // Nothing listens on port 1: the platform's figures cannot be read.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_millis(200))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        let store = Store::new(pool);
        let metrics = Metrics::new(&store, store::health::Limits::default());
        metrics
            .ingress()
            .report(ingress::ReportKind::Log, ingress::ReportOutcome::Stored);
        metrics.ingress().set_connected(2);
        metrics.task_latencies();
        let text = metrics.render(Scope::Private).await;
        for line in [
            "unidesk_database_up 0",
            "unidesk_ingress_agents_connected 2",
            "unidesk_ingress_reports_total{kind=\"log\",outcome=\"stored\"} 1",
            "unidesk_task_submit_to_assign_seconds_count 0",
            "unidesk_aggregate_loads_total{aggregate_type=\"task\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("unidesk_tasks{"), "{text}");
        // Each family once: nothing was registered twice.
        let mut types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let all = types.len();
        types.dedup();
        assert_eq!(types.len(), all);
    }
}
