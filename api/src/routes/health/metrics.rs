//! `GET /metrics`: counters of this process in Prometheus's text format,
//! without authentication so that a scraper needs no token. They say how
//! much work requests caused and how often the limits refused some; no
//! names, ids or secrets.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&state),
    )
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
