//! HTTP requests by route, method and status, and how long they took: a
//! middleware around a whole router.
//!
//! The route is the template the request matched (`/api/v1/tasks/{id}`),
//! never the path itself, so ids never become labels; requests that match
//! no route count as `(unmatched)`. Methods outside the standard few count
//! as `other`. The time is until the response's head is ready: a stream
//! (a followed log, the live timeline, an agent's WebSocket) counts until
//! it starts, not for as long as it lasts.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{HistogramVec, IntCounterVec, Registry};

/// The route label of a request that matched no route.
pub const UNMATCHED: &str = "(unmatched)";

/// Upper bounds of the request duration buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The HTTP families of a process. Cheap to clone; clones share the
/// counts.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl HttpMetrics {
    /// The families, not yet registered.
    pub(crate) fn new() -> Self {
        Self {
            requests: crate::counter_vec(
                "unidesk_http_requests_total",
                "HTTP requests answered, by route template, method and status.",
                &["route", "method", "status"],
            ),
            duration: crate::histogram_vec(
                "unidesk_http_request_duration_seconds",
                "Time from a request's arrival until its response's head was ready, by route template and method.",
                &["route", "method"],
                &BUCKETS,
            ),
        }
    }

    pub(crate) fn register(&self, registry: &Registry) {
        crate::register(registry, self.requests.clone());
        crate::register(registry, self.duration.clone());
    }

    /// `router` with every request counted.
    pub(crate) fn track<S: Clone + Send + Sync + 'static>(
        &self,
        router: axum::Router<S>,
    ) -> axum::Router<S> {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), count))
    }
}

/// The method as a label: the standard methods by name, others `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn count(State(metrics): State<HttpMetrics>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_string(), |p| p.as_str().to_string());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = response.status();
    metrics
        .duration
        .with_label_values(&[route.as_str(), method])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .with_label_values(&[route.as_str(), method, status.as_str()])
        .inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusual_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
        assert_eq!(method_label(&Method::CONNECT), "other");
    }
}
