//! One placement round: the queue, what nodes and projects already hold
//! (read models plus this scheduler's own placements they do not show
//! yet), [`placement::place`], and the assignments committed as commands.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use domain::task::{Task, TaskCommand, TaskError};
use projections::read::{self, tasks::Holding, tasks::QueuedTask};
use store::StoreError;
use uuid::Uuid;

use super::placement::{self, Candidate, Placement, Queued};
use super::{actor, Outcome, Pending, Scheduler};

/// How long a placement of ours may stay unseen by the read models before
/// it is no longer counted.
const PENDING_FOR_S: i64 = 60;

impl Scheduler {
    /// Places as many queued tasks as fit, in order, and assigns them.
    pub(super) async fn placement(
        &self,
        now: DateTime<Utc>,
        outcome: &mut Outcome,
    ) -> Result<(), sqlx::Error> {
        // Our own placements the read model does not show yet: skipped in
        // the query (so the queue behind them is seen), counted as held.
        let pending = self.recent_placements(now);
        let pending_ids: Vec<Uuid> = pending.iter().map(|p| p.task.id).collect();
        let queued_rows = self.queued(now, &pending_ids).await?;
        let holding = self.holding().await?;
        let pending = self.still_pending(pending, &pending_ids).await?;
        if queued_rows.is_empty() {
            return Ok(());
        }
        let mut nodes = self.candidates().await?;
        let mut running = occupy(&mut nodes, &holding, &pending);
        let queue = queue(queued_rows);
        let quota = self.quotas(&queue).await?;
        let tasks: HashMap<Uuid, Queued> = queue.iter().map(|t| (t.id, t.clone())).collect();
        for p in placement::place(queue, &mut nodes, &mut running, &quota) {
            self.commit(p, &tasks, now, outcome).await;
        }
        Ok(())
    }

    /// Our placements of the last minute; older ones are forgotten.
    fn recent_placements(&self, now: DateTime<Utc>) -> Vec<Pending> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|_, x| now - x.at < chrono::Duration::seconds(PENDING_FOR_S));
        p.values().cloned().collect()
    }

    /// The queue, highest priority and oldest first, without `pending` and
    /// without tasks waiting out a retry backoff; at most a batch.
    async fn queued(
        &self,
        now: DateTime<Utc>,
        pending: &[Uuid],
    ) -> Result<Vec<QueuedTask>, sqlx::Error> {
        read::tasks::queued(self.pool(), self.config.batch, pending, now).await
    }

    /// The tasks holding a node.
    async fn holding(&self) -> Result<Vec<Holding>, sqlx::Error> {
        read::tasks::holding(self.pool()).await
    }

    /// Of `pending`, the placements the read model still shows queued; the
    /// others are forgotten. Once the read model no longer shows a
    /// placement queued, it counts there (holding its node) or it has
    /// already ended.
    async fn still_pending(
        &self,
        pending: Vec<Pending>,
        pending_ids: &[Uuid],
    ) -> Result<Vec<Pending>, sqlx::Error> {
        let lagging: HashSet<Uuid> = read::tasks::still_queued(self.pool(), pending_ids)
            .await?
            .into_iter()
            .collect();
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|id, _| lagging.contains(id));
        Ok(pending
            .into_iter()
            .filter(|x| lagging.contains(&x.task.id))
            .collect())
    }

    /// The most running tasks of each project of `queue` that has a limit.
    async fn quotas(&self, queue: &[Queued]) -> Result<HashMap<Uuid, u32>, sqlx::Error> {
        let projects: Vec<Uuid> = queue.iter().map(|t| t.project).collect();
        Ok(read::projects::running_limits(self.pool(), &projects)
            .await?
            .into_iter()
            .map(|(id, n)| (id, n.max(0) as u32))
            .collect())
    }

    /// Assigns the task of placement `p`, counting it and remembering it
    /// as pending until the read models show it; a task no longer queued
    /// is passed over.
    async fn commit(
        &self,
        p: Placement,
        tasks: &HashMap<Uuid, Queued>,
        now: DateTime<Utc>,
        outcome: &mut Outcome,
    ) {
        let cmd = TaskCommand::Assign {
            node_id: p.node,
            gpus: p.gpus.clone(),
            reason: p.reason,
            at: now,
        };
        match self
            .store
            .execute::<Task>(&p.task.to_string(), cmd, &actor(), now)
            .await
        {
            Ok(_) => {
                outcome.assigned += 1;
                if let Some(t) = tasks.get(&p.task) {
                    self.pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(
                            p.task,
                            Pending {
                                node: p.node,
                                project: t.project,
                                task: t.clone(),
                                gpus: p.gpus,
                                at: now,
                            },
                        );
                }
            }
            Err(StoreError::Rejected(TaskError::InvalidTransition { .. })) => {}
            Err(e) => tracing::warn!(task = %p.task, error = %e, "cannot assign"),
        }
    }
}

/// Marks on `nodes` what the `holding` tasks and our `pending` placements
/// use; returns how many tasks each project runs.
fn occupy(nodes: &mut [Candidate], holding: &[Holding], pending: &[Pending]) -> HashMap<Uuid, u32> {
    let mut running: HashMap<Uuid, u32> = HashMap::new();
    let by_id: HashMap<Uuid, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    for h in holding {
        *running.entry(h.project).or_default() += 1;
        if let (Some(&i), Some(r)) = (by_id.get(&h.node), &h.resources) {
            nodes[i].hold(r.millicpus(), r.memory_mb, &h.gpus);
        }
    }
    for p in pending {
        *running.entry(p.project).or_default() += 1;
        if let Some(&i) = by_id.get(&p.node) {
            nodes[i].hold(p.task.millicpus, p.task.memory_mb, &p.gpus);
        }
    }
    running
}

/// The queued tasks as placement sees them; one whose spec cannot be read
/// is logged and left out.
fn queue(rows: Vec<QueuedTask>) -> Vec<Queued> {
    let mut queue = Vec::with_capacity(rows.len());
    for QueuedTask {
        id,
        project,
        priority,
        spec,
    } in rows
    {
        match spec {
            Ok(s) => queue.push(Queued {
                id,
                project,
                priority,
                millicpus: s.resources.millicpus(),
                memory_mb: s.resources.memory_mb,
                gpus: s.resources.gpus,
                image: protocol::env_image_tag(
                    s.env_repo_url.as_str(),
                    s.env_commit_id.as_str(),
                    s.dockerfile_path.as_str(),
                ),
                code_commit: s.code_commit_id.to_string(),
                labels: s.labels,
            }),
            Err(e) => tracing::error!(task = %id, error = %e, "unreadable spec in task_view"),
        }
    }
    queue
}
