//! `GET /readyz`: the database answers and its schema is the one this build
//! expects, so requests can be served; and whether the platform is
//! degraded: an outbox consumer skipped events it could not apply, a long
//! open transaction holds every consumer back, or the database is nearly
//! over its size budget. A degraded server still answers 200 (it serves,
//! and every replica sees the same database: taking them all out of a
//! load balancer would help nobody), with `status: degraded` and the
//! reasons. It is public, so it gives counts and ages, never aggregate
//! ids or error texts (`unidesk projections status` shows those).

use axum::extract::State;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ErrorBody};
use crate::schema::health::{Checks, DeadLetters, Health, OldestTransaction};
use crate::AppState;

/// This route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(readyz))
}

/// Whether the database is reachable and fully migrated, and whether the
/// platform is degraded (with the reasons and what was measured).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready (`status: ready`), or serving but degraded (`status: degraded`, with `reasons`)", body = Health),
        (status = 503, description = "Database unreachable or not migrated", body = ErrorBody)
    )
)]
async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    match store::migrations_current(state.pool()).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(ApiError::Unavailable(
                "the database schema is not migrated to this version; run `unidesk migrate`".into(),
            ))
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness check could not reach the database");
            return Err(ApiError::Unavailable("the database is unreachable".into()));
        }
    }
    let health = state.health();
    let report = match health.report().await {
        Ok(report) => report,
        Err(e) if store::is_unavailable(&e) => {
            tracing::warn!(error = %e, "readiness check could not reach the database");
            return Err(ApiError::Unavailable("the database is unreachable".into()));
        }
        Err(e) => {
            tracing::error!(error = %e, "readiness checks failed");
            let mut answer = Health::status("degraded");
            answer.reasons = vec!["the readiness checks failed; see the server's log".into()];
            return Ok(Json(answer));
        }
    };
    let limits = health.limits();
    let reasons = report.problems(limits);
    Ok(Json(Health {
        status: if reasons.is_empty() {
            "ready"
        } else {
            "degraded"
        }
        .into(),
        reasons,
        checks: Some(Checks {
            dead_letters: report
                .dead_letters
                .iter()
                .map(|(consumer, count)| DeadLetters {
                    consumer: consumer.clone(),
                    count: *count,
                })
                .collect(),
            oldest_transaction: report.oldest_transaction.map(|t| OldestTransaction {
                age_s: (t.age.as_secs_f64() * 1000.0).round() / 1000.0,
                pid: t.pid,
                state: t.state,
            }),
            database_bytes: report.database_bytes,
            database_budget_bytes: (limits.db_budget_bytes > 0).then_some(limits.db_budget_bytes),
            task_output_refused: report.output_refused,
        }),
    }))
}
