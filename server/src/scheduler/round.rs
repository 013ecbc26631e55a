//! One placement round: the queue (in memory, [`super::queue`]) and what
//! its tasks hold on nodes and count against projects, [`placement::place`],
//! and the assignments committed as commands under the leader's term (the
//! store's reservations, exact at every commit, refuse one the queue's
//! view got wrong).

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, Utc};
use domain::task::{Capacity, Task, TaskCommand, TaskError};
use projections::read::{self, tasks::QueuedTask};
use store::holds::Hold;
use store::StoreError;
use uuid::Uuid;

use super::placement::{self, Candidate, Placement, Queued};
use super::{actor, Outcome, Scheduler, CANDIDATES_FOR, REFRESH_AFTER};

/// Whether a round goes on after an assignment.
enum Next {
    /// Assign the next placement.
    Continue,
    /// This scheduler no longer surely leads: decide nothing more.
    Stop,
}

impl Scheduler {
    /// Places as many queued tasks as fit, in order, and assigns them as
    /// the leader of `term`.
    ///
    /// Task events this process committed (the API's submissions, an
    /// agent's report that freed a node) are placed on at once, and the
    /// outbox, which brings what other processes committed, is read after
    /// the round's assignments, and placed on again if it brought anything
    /// new: a submission reaches its node without waiting for that read.
    /// What a round places on is checked where it matters:
    /// the task's own log refuses an assignment of a task no longer
    /// queued, and the store's reservations one beyond a node's capacity
    /// or on a GPU device already held.
    pub(super) async fn placement(
        &self,
        term: u64,
        now: DateTime<Utc>,
        outcome: &mut Outcome,
    ) -> Result<(), sqlx::Error> {
        let quick = {
            let mut known = self.queue.lock().await;
            let quick = known.follow_local(&self.store, term).await?;
            if !quick {
                known.follow_outbox(&self.store).await?;
            }
            quick
        };
        self.place(term, now, outcome).await?;
        if quick {
            let news = self.queue.lock().await.follow_outbox(&self.store).await?;
            if news {
                // Another process's submission, or a node it freed or
                // brought: placed now, not at the next wake-up.
                self.place(term, now, outcome).await?;
            }
        }
        Ok(())
    }

    /// Places the queued tasks the queue knows of on the nodes, and
    /// assigns them as the leader of `term`.
    async fn place(
        &self,
        term: u64,
        now: DateTime<Utc>,
        outcome: &mut Outcome,
    ) -> Result<(), sqlx::Error> {
        let known = self.queue.lock().await;
        if !known.any_queued() {
            return Ok(());
        }
        // What the queue's tasks hold: the store refuses an assignment
        // that would reserve more than a node has, however late this is.
        let holds = known.holds();
        let queued_rows = known.queued(self.config.batch.max(0) as usize, now);
        drop(known);
        if queued_rows.is_empty() {
            return Ok(());
        }
        *self.placed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let Some(mut nodes) = self.current_candidates().await? else {
            return Ok(());
        };
        let capacity: HashMap<Uuid, Capacity> = nodes
            .iter()
            .map(|n| {
                let c = Capacity {
                    millicpus: n.millicpus,
                    memory_mb: n.memory_mb,
                };
                (n.id, c)
            })
            .collect();
        let mut running = occupy(&mut nodes, &holds);
        let queue = queue(queued_rows);
        let quota = self.quotas(&queue).await?;
        for p in placement::place(queue, &mut nodes, &mut running, &quota) {
            let Some(&c) = capacity.get(&p.node) else {
                continue;
            };
            if let Next::Stop = self.commit(term, p, c, now, outcome).await {
                break;
            }
        }
        Ok(())
    }

    /// The most running tasks of each project of `queue` that has a limit,
    /// from the projects read model. Limits read while the read model
    /// reflected every project event the queue has seen are remembered for
    /// [`CANDIDATES_FOR`] and serve the next rounds until a project event
    /// goes by: a busy leader places many times a second and limits rarely
    /// change, so a round usually reads none.
    async fn quotas(&self, queue: &[Queued]) -> Result<HashMap<Uuid, u32>, sqlx::Error> {
        let mut projects: Vec<Uuid> = queue.iter().map(|t| t.project).collect();
        projects.sort_unstable();
        projects.dedup();
        self.limits_of(&projects, false).await
    }

    /// While placement is busy ([`Scheduler::placing`]), reads the
    /// remembered projects' limits again once they are [`REFRESH_AFTER`]
    /// old, beside placement, so that a placement round seldom waits for
    /// the read.
    pub(super) async fn refresh_limits(&self) {
        let projects: Vec<Uuid> = match self
            .limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some((when, _, limits)) if when.elapsed() >= REFRESH_AFTER => {
                let mut projects: Vec<Uuid> = limits.keys().copied().collect();
                projects.sort_unstable();
                projects
            }
            _ => return,
        };
        if !self.placing() {
            return;
        }
        if let Err(e) = self.limits_of(&projects, true).await {
            tracing::debug!(error = %e, "reading the projects' limits failed; placement reads them");
        }
    }

    /// The most running tasks of each of `projects` that has a limit:
    /// remembered ones while current (unless `reread`), else read.
    async fn limits_of(
        &self,
        projects: &[Uuid],
        reread: bool,
    ) -> Result<HashMap<Uuid, u32>, sqlx::Error> {
        let limit_of = |known: &HashMap<Uuid, Option<u32>>| -> HashMap<Uuid, u32> {
            projects
                .iter()
                .filter_map(|p| Some((*p, (*known.get(p)?)?)))
                .collect()
        };
        let remembered = self
            .limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|_| !reread)
            .filter(|(when, _, limits)| {
                when.elapsed() < CANDIDATES_FOR && projects.iter().all(|p| limits.contains_key(p))
            })
            .map(|(_, at, limits)| (*at, limit_of(limits)));
        if let Some((at, limits)) = remembered {
            if self.queue.lock().await.projects_current_at(Some(at)) {
                return Ok(limits);
            }
        }
        let fresh = {
            let (rows, at) = read::projects::running_limits_at(self.pool(), projects).await?;
            let read: HashMap<Uuid, u32> = rows
                .into_iter()
                .map(|(id, n)| (id, n.max(0) as u32))
                .collect();
            let mut fresh: HashMap<Uuid, Option<u32>> = projects
                .iter()
                .map(|p| (*p, read.get(p).copied()))
                .collect();
            if self.queue.lock().await.projects_current_at(at) {
                if let Some(at) = at {
                    let mut known = self.limits.lock().unwrap_or_else(|e| e.into_inner());
                    // What is remembered and still current joins what was
                    // just read, so a round with a new project reads only
                    // until the next expiry.
                    if let Some((when, kept_at, kept)) = known.take() {
                        if when.elapsed() < CANDIDATES_FOR && kept_at <= at {
                            for (p, l) in kept {
                                fresh.entry(p).or_insert(l);
                            }
                        }
                    }
                    *known = Some((Instant::now(), at, fresh.clone()));
                }
            }
            fresh
        };
        Ok(limit_of(&fresh))
    }

    /// Assigns the task of placement `p` as the leader of `term`, for a
    /// node that could give `capacity`, if this scheduler surely still
    /// leads. A task no longer queued is passed over, and so is a
    /// reservation the store refuses; a fenced assignment ends the
    /// leadership.
    async fn commit(
        &self,
        term: u64,
        p: Placement,
        capacity: Capacity,
        now: DateTime<Utc>,
        outcome: &mut Outcome,
    ) -> Next {
        if !self.leadership.sure(term) {
            return Next::Stop;
        }
        let cmd = TaskCommand::AssignAsLeader {
            node_id: p.node,
            gpus: p.gpus,
            reason: p.reason,
            term,
            capacity,
            at: now,
        };
        match self
            .store
            .execute::<Task>(&p.task.to_string(), cmd, &actor(), now)
            .await
        {
            Ok(_) => outcome.assigned += 1,
            Err(StoreError::Rejected(TaskError::InvalidTransition { .. })) => {}
            Err(StoreError::Rejected(TaskError::Fenced(why))) => {
                tracing::warn!(task = %p.task, term, %why, "the store refused an assignment");
                self.leadership.step_down(&format!(
                    "the store refused an assignment of term {term}: {why}"
                ));
                return Next::Stop;
            }
            Err(StoreError::Rejected(TaskError::NotReserved(why))) => {
                tracing::warn!(task = %p.task, node = %p.node, %why, "cannot reserve; moving on");
            }
            Err(e) => tracing::warn!(task = %p.task, error = %e, "cannot assign"),
        }
        Next::Continue
    }
}

/// Marks on `nodes` what `holds` reserve; returns how many tasks each
/// project runs.
pub(super) fn occupy(nodes: &mut [Candidate], holds: &[Hold]) -> HashMap<Uuid, u32> {
    let mut running: HashMap<Uuid, u32> = HashMap::new();
    let by_id: HashMap<Uuid, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    for h in holds {
        if let Some(project) = h.project {
            *running.entry(project).or_default() += 1;
        }
        if let Some(&i) = by_id.get(&h.node) {
            nodes[i].hold(h.millicpus, h.memory_mb, &h.gpus);
        }
    }
    running
}

/// The queued tasks as placement sees them; one whose spec cannot be read
/// is logged and left out.
pub(super) fn queue(rows: Vec<QueuedTask>) -> Vec<Queued> {
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
