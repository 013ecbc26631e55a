//! What the agent ingress of a process counts: agent sessions, heartbeats
//! (and late ones), reports stored and refused, and task output stored.
//! No node names or ids: the figures are the process's totals.

use std::sync::{Arc, Mutex};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use store::outbox::Checkpoint;

/// A heartbeat arriving more than this many heartbeat intervals after the
/// previous one (or after the session began) is late.
pub const LATE_AFTER_INTERVALS: f64 = 1.5;

/// What an agent sent that the ingress stores, for the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// A task's state report.
    Status,
    /// A chunk of a task's output.
    Log,
    /// The result of a host command.
    HostSsh,
}

impl ReportKind {
    fn label(self) -> &'static str {
        match self {
            ReportKind::Status => "status",
            ReportKind::Log => "log",
            ReportKind::HostSsh => "host_ssh",
        }
    }
}

/// What became of a report, for the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Stored, or found stored already.
    Stored,
    /// Refused for good, and the agent told so.
    Refused,
    /// Not stored this time (the database failed); the agent sends it
    /// again.
    Retry,
}

impl ReportOutcome {
    fn label(self) -> &'static str {
        match self {
            ReportOutcome::Stored => "stored",
            ReportOutcome::Refused => "refused",
            ReportOutcome::Retry => "retry",
        }
    }
}

/// The ingress's families. Cheap to clone; clones share the counts. One
/// made with [`IngressMetrics::default`] counts for nobody (an ingress
/// built without a process's [`crate::Metrics`]).
#[derive(Debug, Clone)]
pub struct IngressMetrics {
    connected: IntGauge,
    heartbeats: IntCounter,
    late_heartbeats: IntCounter,
    reports: IntCounterVec,
    log_bytes: IntCounter,
    /// How far the ingress's outbox consumer has delivered, for its lag.
    delivered: Arc<Mutex<Option<Checkpoint>>>,
}

impl Default for IngressMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl IngressMetrics {
    pub(crate) fn new() -> Self {
        let gauge =
            |name: &str, help: &str| IntGauge::new(name, help).expect("a valid gauge definition");
        let counter = |name: &str, help: &str| {
            IntCounter::new(name, help).expect("a valid counter definition")
        };
        Self {
            connected: gauge(
                "unidesk_ingress_agents_connected",
                "Agent sessions open on this process.",
            ),
            heartbeats: counter(
                "unidesk_ingress_heartbeats_total",
                "Heartbeats received from agents.",
            ),
            late_heartbeats: counter(
                "unidesk_ingress_heartbeats_late_total",
                "Heartbeats that came more than 1.5 heartbeat intervals after the session's previous one (or its start).",
            ),
            reports: crate::counter_vec(
                "unidesk_ingress_reports_total",
                "Reports from agents by kind (status, log, host_ssh) and outcome (stored; refused for good; retry: not stored this time, the agent sends it again).",
                &["kind", "outcome"],
            ),
            log_bytes: counter(
                "unidesk_ingress_log_bytes_total",
                "Bytes of task output stored.",
            ),
            delivered: Arc::default(),
        }
    }

    pub(crate) fn register(&self, registry: &Registry) {
        crate::register(registry, self.connected.clone());
        crate::register(registry, self.heartbeats.clone());
        crate::register(registry, self.late_heartbeats.clone());
        crate::register(registry, self.reports.clone());
        crate::register(registry, self.log_bytes.clone());
    }

    /// Sets the number of open agent sessions.
    pub fn set_connected(&self, sessions: usize) {
        self.connected
            .set(i64::try_from(sessions).unwrap_or(i64::MAX));
    }

    /// Counts a heartbeat that came `gap_s` seconds after the previous one
    /// of its session, which should come every `interval_s` seconds.
    pub fn heartbeat(&self, gap_s: f64, interval_s: f64) {
        self.heartbeats.inc();
        if gap_s > interval_s * LATE_AFTER_INTERVALS {
            self.late_heartbeats.inc();
        }
    }

    /// Counts a report of `kind` with `outcome`.
    pub fn report(&self, kind: ReportKind, outcome: ReportOutcome) {
        self.reports
            .with_label_values(&[kind.label(), outcome.label()])
            .inc();
    }

    /// Counts `bytes` of task output stored.
    pub fn log_stored(&self, bytes: usize) {
        self.log_bytes.inc_by(bytes as u64);
    }

    /// Records how far the ingress's outbox consumer has delivered: its
    /// lag (`unidesk_outbox_lag_events{consumer="ingress"}`) counts the
    /// events after it.
    pub fn delivered(&self, at: Checkpoint) {
        *self
            .delivered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(at);
    }

    /// Where the ingress's outbox consumer stands; `None` before it started.
    pub(crate) fn delivered_at(&self) -> Option<Checkpoint> {
        *self
            .delivered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
