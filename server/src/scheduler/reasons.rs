//! Keeping `task_queue_reasons` current: once per poll interval the leader
//! explains every queued task ([`explain`]) and writes only what changed
//! since it last wrote ([`store::queue_reasons::record`]), in one
//! statement, so a long queue that stays as it is costs no writes. It
//! does so at most once per `explain_every`, so a busy cluster, whose
//! free room changes with every task placed or ended, rewrites the
//! explanations of a long queue no more often than that.
//!
//! What was recorded is kept in memory under the leader's term; a new term
//! starts from the table (after removing the rows of tasks no longer
//! queued), so a change of leader rewrites nothing that still holds.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use projections::read;
use store::queue_reasons::Explanation;
use uuid::Uuid;

use super::explain::{self, Cluster, Unavailable, Waiting};
use super::round::{occupy, queue};
use super::Scheduler;

/// What this leader last recorded.
#[derive(Debug, Default)]
pub(super) struct Recorded {
    /// The term it was recorded (or loaded) under.
    term: Option<u64>,
    /// Each task's attempt and explanation, as stored.
    tasks: HashMap<Uuid, (u32, Explanation)>,
    /// When the queue was last explained.
    at: Option<DateTime<Utc>>,
}

impl Scheduler {
    /// Explains the queue as the leader of `term` at `now` and records
    /// what changed, unless it was explained less than `explain_every`
    /// ago under the same term. A failure is logged: explanations wait for
    /// the next round, placement does not.
    pub(super) async fn explain_queue(&self, term: u64, now: DateTime<Utc>) {
        if let Err(e) = self.record_reasons(term, now).await {
            tracing::warn!(error = %e, "cannot record why queued tasks wait");
        }
    }

    async fn record_reasons(&self, term: u64, now: DateTime<Utc>) -> Result<(), sqlx::Error> {
        let mut recorded = self.reasons.lock().await;
        if recorded.term != Some(term) {
            recorded.tasks = store::queue_reasons::load(self.pool())
                .await?
                .into_iter()
                .map(|r| (r.task, (r.attempt, r.explanation)))
                .collect();
            recorded.term = Some(term);
            recorded.at = None;
        }
        let every = chrono::Duration::from_std(self.config.explain_every).unwrap_or_default();
        if recorded.at.is_some_and(|at| now >= at && now - at < every) {
            return Ok(());
        }
        recorded.at = Some(now);
        let holds = store::holds::all(self.pool()).await?;
        let holding: HashSet<Uuid> = holds.iter().map(|h| h.task).collect();
        let (rows, waits) = {
            let known = self.queue.lock().await;
            let mut rows = known.queued(usize::MAX, DateTime::<Utc>::MAX_UTC);
            // A task holding a node is not waiting, whatever the queue has
            // not folded in yet.
            rows.retain(|r| !holding.contains(&r.id));
            let waits: HashMap<Uuid, (u32, Option<DateTime<Utc>>)> = rows
                .iter()
                .filter_map(|r| known.wait_of(&r.id).map(|w| (r.id, w)))
                .collect();
            (rows, waits)
        };
        if rows.is_empty() && recorded.tasks.is_empty() {
            return Ok(());
        }
        let waiting: Vec<Waiting> = queue(rows)
            .into_iter()
            .filter_map(|task| {
                let &(attempt, not_before) = waits.get(&task.id)?;
                Some(Waiting {
                    task,
                    attempt,
                    not_before,
                })
            })
            .collect();
        let mut nodes = self.candidates().await?;
        // Tasks explained last time that hold a node now were placed since:
        // a task that fits the nodes without them lost its room to them.
        let before = if holds.iter().any(|h| recorded.tasks.contains_key(&h.task)) {
            let mut before = nodes.clone();
            let earlier: Vec<_> = holds
                .iter()
                .filter(|h| !recorded.tasks.contains_key(&h.task))
                .cloned()
                .collect();
            occupy(&mut before, &earlier);
            Some(before)
        } else {
            None
        };
        let running = occupy(&mut nodes, &holds);
        let projects: Vec<Uuid> = waiting.iter().map(|w| w.task.project).collect();
        let quota: HashMap<Uuid, u32> = read::projects::running_limits(self.pool(), &projects)
            .await?
            .into_iter()
            .map(|(id, n)| (id, n.max(0) as u32))
            .collect();
        let unavailable: Vec<Unavailable> = read::nodes::unplaceable(self.pool())
            .await?
            .into_iter()
            .map(|n| Unavailable {
                offline: !n.online,
                labels: n.labels,
            })
            .collect();
        let cluster = Cluster {
            nodes: &nodes,
            before: before.as_deref(),
            unavailable: &unavailable,
            running: &running,
            quota: &quota,
        };
        let explained = explain::explain(&waiting, &cluster, now);
        let current: HashSet<Uuid> = explained.iter().map(|(id, _, _)| *id).collect();
        let changed: Vec<(Uuid, u32, &Explanation)> = explained
            .iter()
            .filter(|(id, attempt, e)| {
                recorded
                    .tasks
                    .get(id)
                    .is_none_or(|(a, old)| a != attempt || old != e)
            })
            .map(|(id, attempt, e)| (*id, *attempt, e))
            .collect();
        let gone: Vec<Uuid> = recorded
            .tasks
            .keys()
            .filter(|id| !current.contains(id))
            .copied()
            .collect();
        if changed.is_empty() && gone.is_empty() {
            return Ok(());
        }
        if !self.leadership.sure(term) {
            return Ok(());
        }
        store::queue_reasons::record(self.pool(), term, now, &changed, &gone).await?;
        tracing::debug!(
            changed = changed.len(),
            gone = gone.len(),
            "recorded why queued tasks wait"
        );
        for id in &gone {
            recorded.tasks.remove(id);
        }
        for (id, attempt, e) in changed {
            recorded.tasks.insert(id, (attempt, e.clone()));
        }
        Ok(())
    }
}
