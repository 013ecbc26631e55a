//! `GET /metrics`: counters of this process in Prometheus's text format,
//! without authentication so that a scraper needs no token. They say how
//! much work requests caused and how often the limits refused some, and
//! gauges of the platform as a whole (dead letters per consumer, the
//! oldest open transaction, the database's size against its budget); no
//! names, ids or secrets.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use store::health::{budget_used, Limits, Report, BUDGET_WARN};

use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// This process's counters, in the Prometheus text format 0.0.4.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "The counters", content_type = "text/plain; version=0.0.4", body = String))
)]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut text = render(&state);
    match state.health().report().await {
        Ok(report) => render_health(&mut text, &report, state.health().limits()),
        // The gauges are left out; the counters above still count.
        Err(e) => tracing::warn!(error = %e, "metrics: cannot measure the database"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

/// The platform's gauges, from `report`.
fn render_health(out: &mut String, report: &Report, limits: &Limits) {
    out.push_str(
        "# HELP unidesk_dead_letters Events an outbox consumer skipped because it could not apply them.\n\
         # TYPE unidesk_dead_letters gauge\n",
    );
    for (consumer, n) in &report.dead_letters {
        let _ = writeln!(out, "unidesk_dead_letters{{consumer=\"{consumer}\"}} {n}");
    }
    let age = report
        .oldest_transaction
        .as_ref()
        .map_or(0.0, |t| t.age.as_secs_f64());
    let used = budget_used(report.database_bytes, limits.db_budget_bytes);
    let _ = write!(
        out,
        "# HELP unidesk_oldest_transaction_seconds Age of the oldest open transaction with an id on the database server (0 when none); it holds every outbox consumer back.\n\
         # TYPE unidesk_oldest_transaction_seconds gauge\n\
         unidesk_oldest_transaction_seconds {age:.3}\n\
         # HELP unidesk_database_bytes Size of the database on disk.\n\
         # TYPE unidesk_database_bytes gauge\n\
         unidesk_database_bytes {}\n\
         # HELP unidesk_database_budget_bytes The database's size budget (0 when none).\n\
         # TYPE unidesk_database_budget_bytes gauge\n\
         unidesk_database_budget_bytes {}\n\
         # HELP unidesk_database_budget_warning 1 when the database uses at least 80% of its budget.\n\
         # TYPE unidesk_database_budget_warning gauge\n\
         unidesk_database_budget_warning {}\n\
         # HELP unidesk_task_output_refused 1 while task output is refused because the database is over its budget.\n\
         # TYPE unidesk_task_output_refused gauge\n\
         unidesk_task_output_refused {}\n\
         # HELP unidesk_degraded 1 when /readyz says degraded.\n\
         # TYPE unidesk_degraded gauge\n\
         unidesk_degraded {}\n",
        report.database_bytes,
        limits.db_budget_bytes,
        u8::from(used.is_some_and(|u| u >= BUDGET_WARN)),
        u8::from(report.output_refused),
        u8::from(!report.problems(limits).is_empty()),
    );
}

/// The counters as text.
fn render(state: &AppState) -> String {
    let mut out = String::new();
    let loads = state.store().aggregate_loads();
    out.push_str(
        "# HELP unidesk_aggregate_loads_total Aggregates loaded from the event log by this process.\n\
         # TYPE unidesk_aggregate_loads_total counter\n",
    );
    for (aggregate_type, n) in loads.all() {
        let _ = writeln!(
            out,
            "unidesk_aggregate_loads_total{{aggregate_type=\"{aggregate_type}\"}} {n}"
        );
    }
    let limits = state.limit_counters();
    let _ = write!(
        out,
        "# HELP unidesk_rate_limited_total Requests refused with 429 by the request rate limit.\n\
         # TYPE unidesk_rate_limited_total counter\n\
         unidesk_rate_limited_total {}\n\
         # HELP unidesk_streams_refused_total Live streams refused with 429 because their user held the most allowed.\n\
         # TYPE unidesk_streams_refused_total counter\n\
         unidesk_streams_refused_total {}\n\
         # HELP unidesk_streams_open Live streams (log follows and timeline streams) open on this process.\n\
         # TYPE unidesk_streams_open gauge\n\
         unidesk_streams_open {}\n",
        limits.rate_limited.load(Ordering::Relaxed),
        limits.streams_refused.load(Ordering::Relaxed),
        state.stream_slots().total(),
    );
    out
}
