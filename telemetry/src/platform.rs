//! The platform's gauges, read from the database when scraped: tasks by
//! state (and by project, on the private listener), the queue, every
//! outbox consumer's lag and dead letters, the oldest open transaction, and
//! the database's size against its budget.
//!
//! They describe the platform, not the process, so every process reports
//! the same values (except the ingress's lag, which is its own): aggregate
//! them with `max` across instances, not `sum`. One measurement answers
//! every scrape for [`FRESH_FOR`], so scrapes arriving together cost the
//! database one; the health figures (dead letters, the oldest transaction,
//! the database's size, degraded) are the ones `/readyz` reports at the
//! same moment ([`crate::health::HealthChecks`]). When the database cannot
//! be read, `unidesk_database_up` is 0 and the other platform gauges are
//! left out rather than shown stale.

use std::collections::BTreeMap;
use std::sync::Mutex as SyncMutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use domain::task::TaskState;
use projections::read::tasks::StateCount;
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntGauge, Registry};
use sqlx::PgPool;
use store::health::{budget_used, Limits, Report, BUDGET_WARN};
use tokio::sync::Mutex;

use crate::IngressMetrics;

/// How long one measurement answers every scrape.
pub const FRESH_FOR: Duration = crate::health::FRESH_FOR;

/// The most projects named in `unidesk_project_tasks`: the ones with the
/// most unfinished tasks (then the most tasks, then by name); the others
/// are summed under [`OTHER_PROJECTS`].
pub const MAX_PROJECTS: usize = 100;

/// The project label of the projects past [`MAX_PROJECTS`]. No project
/// name has parentheses, so it cannot be taken for one.
pub const OTHER_PROJECTS: &str = "(other)";

/// The project label of tasks whose project the projects read model does
/// not know (yet).
pub const UNKNOWN_PROJECT: &str = "(unknown)";

/// What one measurement found.
#[derive(Debug, Clone)]
struct Figures {
    tasks: Vec<StateCount>,
    ready: i64,
    lags: Vec<(String, i64)>,
    output_bytes: i64,
}

/// The platform's gauges of one process.
pub(crate) struct Platform {
    pool: PgPool,
    limits: Limits,
    last: Mutex<Option<(Instant, Option<Figures>)>>,
    /// Outbox consumers of this process with their position in memory
    /// (the ingress's), by consumer name.
    consumers: SyncMutex<Vec<(&'static str, IngressMetrics)>>,
}

impl Platform {
    pub(crate) fn new(pool: PgPool, limits: Limits) -> Self {
        Self {
            pool,
            limits,
            last: Mutex::new(None),
            consumers: SyncMutex::new(Vec::new()),
        }
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Adds this process's outbox consumer `name`, whose position `metrics`
    /// records, to `unidesk_outbox_lag_events`.
    pub(crate) fn add_consumer(&self, name: &'static str, metrics: IngressMetrics) {
        self.consumers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((name, metrics));
    }

    /// The families for a scrape for `scope`.
    pub(crate) async fn families(
        &self,
        health: &crate::health::HealthChecks,
        scope: crate::Scope,
    ) -> Vec<MetricFamily> {
        let figures = match health.report().await {
            Ok(report) => self.figures().await.map(|f| (f, report)),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot measure the database's health");
                None
            }
        };
        let registry = Registry::new();
        let up = IntGauge::new(
            "unidesk_database_up",
            "1 when this scrape could read the platform's figures from the database; 0 when not (and the other platform gauges are left out).",
        )
        .expect("a valid gauge definition");
        up.set(i64::from(figures.is_some()));
        crate::register(&registry, up);
        if let Some((figures, report)) = figures {
            self.fill(&registry, &figures, &report, scope);
        }
        registry.gather()
    }

    /// A measurement at most [`FRESH_FOR`] old; `None` when the database
    /// could not be read. Callers arriving while one is measured wait for
    /// it.
    async fn figures(&self) -> Option<Figures> {
        let mut last = self.last.lock().await;
        if let Some((at, figures)) = last.as_ref() {
            if at.elapsed() < FRESH_FOR {
                return figures.clone();
            }
        }
        let figures = match self.measure().await {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the platform's figures from the database");
                None
            }
        };
        *last = Some((Instant::now(), figures.clone()));
        figures
    }

    async fn measure(&self) -> Result<Figures, String> {
        let pool = &self.pool;
        let tasks = projections::read::tasks::counts(pool)
            .await
            .map_err(|e| e.to_string())?;
        let ready = projections::read::tasks::ready_to_place(pool, Utc::now())
            .await
            .map_err(|e| e.to_string())?;
        let mut lags: Vec<(String, i64)> = projections::Projector::new(pool.clone())
            .status()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|s| (s.name.to_string(), s.lag))
            .collect();
        let consumers: Vec<(&'static str, Option<store::outbox::Checkpoint>)> = self
            .consumers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(name, m)| (*name, m.delivered_at()))
            .collect();
        for (name, at) in consumers {
            // Before its first step the consumer has no position to be
            // behind of.
            if let Some(at) = at {
                let behind = store::outbox::behind(pool, at)
                    .await
                    .map_err(|e| e.to_string())?;
                lags.push((name.to_string(), behind));
            }
        }
        let output_bytes = store::task_log::total_bytes(pool)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Figures {
            tasks,
            ready,
            lags,
            output_bytes,
        })
    }

    fn fill(&self, registry: &Registry, f: &Figures, report: &Report, scope: crate::Scope) {
        let gauge = |name: &str, help: &str, value: i64| {
            let g = IntGauge::new(name, help).expect("a valid gauge definition");
            g.set(value);
            crate::register(registry, g);
        };

        let by_state = crate::gauge_vec(
            "unidesk_tasks",
            "Tasks in each state, all projects together (from the tasks read model).",
            &["state"],
        );
        for state in TaskState::ALL.into_iter().filter(|s| *s != TaskState::New) {
            let n = f
                .tasks
                .iter()
                .filter(|c| c.state == state)
                .map(|c| c.tasks)
                .sum();
            by_state.with_label_values(&[state.as_str()]).set(n);
        }
        crate::register(registry, by_state);

        if scope == crate::Scope::Private {
            let by_project = crate::gauge_vec(
                "unidesk_project_tasks",
                "Tasks in each state per project, by the project's name (the private metrics listener only; past the 100 projects with the most unfinished tasks, the rest are summed as \"(other)\").",
                &["project", "state"],
            );
            for ((project, state), n) in per_project(&f.tasks) {
                by_project.with_label_values(&[&project, state]).set(n);
            }
            crate::register(registry, by_project);
        }

        gauge(
            "unidesk_queue_depth",
            "Queued tasks the scheduler may place now (queued, any retry backoff over).",
            f.ready,
        );

        let lag = crate::gauge_vec(
            "unidesk_outbox_lag_events",
            "Events an outbox consumer has not applied yet (behind the outbox head): each read model, and this process's ingress.",
            &["consumer"],
        );
        for (consumer, n) in &f.lags {
            lag.with_label_values(&[consumer.as_str()]).set(*n);
        }
        crate::register(registry, lag);

        let dead = crate::gauge_vec(
            "unidesk_dead_letters",
            "Events an outbox consumer skipped because it could not apply them.",
            &["consumer"],
        );
        for (consumer, _) in &f.lags {
            dead.with_label_values(&[consumer.as_str()]).set(0);
        }
        for (consumer, n) in &report.dead_letters {
            dead.with_label_values(&[consumer.as_str()]).set(*n);
        }
        crate::register(registry, dead);

        let age = Gauge::new(
            "unidesk_oldest_transaction_seconds",
            "Age of the oldest open transaction with an id on the database server (0 when none); it holds every outbox consumer back.",
        )
        .expect("a valid gauge definition");
        age.set(
            report
                .oldest_transaction
                .as_ref()
                .map_or(0.0, |t| (t.age.as_secs_f64() * 1000.0).round() / 1000.0),
        );
        crate::register(registry, age);

        let budget = self.limits.db_budget_bytes;
        let used = budget_used(report.database_bytes, budget);
        gauge(
            "unidesk_database_bytes",
            "Size of the database on disk.",
            report.database_bytes,
        );
        gauge(
            "unidesk_database_budget_bytes",
            "The database's size budget (--db-budget-gb; 0 when none).",
            i64::try_from(budget).unwrap_or(i64::MAX),
        );
        gauge(
            "unidesk_database_budget_warning",
            "1 when the database uses at least 80% of its budget.",
            i64::from(used.is_some_and(|u| u >= BUDGET_WARN)),
        );
        gauge(
            "unidesk_task_output_refused",
            "1 while task output is refused because the database is over its budget.",
            i64::from(report.output_refused),
        );
        gauge(
            "unidesk_degraded",
            "1 when /readyz says degraded.",
            i64::from(!report.problems(&self.limits).is_empty()),
        );
        gauge(
            "unidesk_task_output_bytes",
            "Task output kept in the database, in bytes.",
            f.output_bytes,
        );
    }
}

/// Task counts by (project label, state): the [`MAX_PROJECTS`] projects
/// with the most unfinished tasks by name, the rest under
/// [`OTHER_PROJECTS`].
fn per_project(counts: &[StateCount]) -> BTreeMap<(String, &'static str), i64> {
    // (unfinished, total) per project.
    let mut weight: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for c in counts {
        let w = weight
            .entry(c.project.as_deref().unwrap_or(UNKNOWN_PROJECT))
            .or_default();
        if !c.state.is_terminal() {
            w.0 += c.tasks;
        }
        w.1 += c.tasks;
    }
    let mut ranked: Vec<(&str, (i64, i64))> = weight.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let named: std::collections::HashSet<&str> = ranked
        .iter()
        .take(MAX_PROJECTS)
        .map(|(name, _)| *name)
        .collect();
    let mut out = BTreeMap::new();
    for c in counts {
        let project = c.project.as_deref().unwrap_or(UNKNOWN_PROJECT);
        let label = if named.contains(project) {
            project
        } else {
            OTHER_PROJECTS
        };
        *out.entry((label.to_string(), c.state.as_str()))
            .or_default() += c.tasks;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(project: &str, state: TaskState, tasks: i64) -> StateCount {
        StateCount {
            project: Some(project.into()),
            state,
            tasks,
        }
    }

    #[test]
    fn projects_past_the_limit_are_summed_as_other() {
        let mut counts = Vec::new();
        for i in 0..MAX_PROJECTS + 5 {
            // The first five have the fewest unfinished tasks.
            counts.push(count(&format!("p{i:03}"), TaskState::Queued, i as i64));
            counts.push(count(&format!("p{i:03}"), TaskState::Succeeded, 1000));
        }
        let out = per_project(&counts);
        let projects: std::collections::HashSet<&str> =
            out.keys().map(|(p, _)| p.as_str()).collect();
        assert_eq!(projects.len(), MAX_PROJECTS + 1);
        assert!(!projects.contains("p000") && projects.contains("p005"));
        assert_eq!(out[&(OTHER_PROJECTS.to_string(), "queued")], 1 + 2 + 3 + 4);
        assert_eq!(out[&(OTHER_PROJECTS.to_string(), "succeeded")], 5000);
        assert_eq!(out[&("p104".to_string(), "queued")], 104);
    }

    #[test]
    fn tasks_of_an_unknown_project_are_labelled_so() {
        let counts = [StateCount {
            project: None,
            state: TaskState::Running,
            tasks: 2,
        }];
        let out = per_project(&counts);
        assert_eq!(out[&(UNKNOWN_PROJECT.to_string(), "running")], 2);
    }
}
