//! The scheduler role: placement, liveness and run timeouts.
//!
//! One scheduler leads at a time: it holds a PostgreSQL advisory lock on a
//! connection of its own, and standbys wait on the same lock and take over
//! when the leader's session ends. Every decision is a command on an
//! aggregate with optimistic concurrency, so even two leaders for a moment
//! could never assign one task twice.

pub mod placement;
mod round;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::node::{Node, NodeCommand, NodeResources};
use domain::task::{Task, TaskCommand};
use domain::Actor;
use projections::{read, Projector};
use sqlx::{Connection, PgConnection, PgPool};
use store::{Store, Wakeup};
use uuid::Uuid;

use placement::{Candidate, Queued};

/// The advisory lock the leader holds ("UniDesk1" in ASCII).
pub const LEADER_LOCK: i64 = 0x556e_6944_6573_6b31;

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// A node is offline, and its tasks lost, after this long without a
    /// heartbeat.
    pub offline_after: Duration,
    /// How long past `timeout_s` the server waits for the node's own
    /// timeout report before timing a task out itself.
    pub timeout_grace: Duration,
    /// How often to look again when no event wakes the scheduler.
    pub poll: Duration,
    /// The most queued tasks considered per round.
    pub batch: i64,
    /// An attempt assigned this long ago that its (connected) node has not
    /// accepted is given up and the task requeued.
    pub accept_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            offline_after: Duration::from_secs(90),
            timeout_grace: Duration::from_secs(30),
            poll: Duration::from_millis(500),
            batch: 2000,
            accept_timeout: Duration::from_secs(120),
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Tasks placed on nodes.
    pub assigned: usize,
    /// Nodes marked offline.
    pub offline: usize,
    /// Attempts given up because their node went away.
    pub lost: usize,
    /// Tasks timed out by the watchdog.
    pub timed_out: usize,
}

/// A placement made but maybe not yet visible in the read models.
#[derive(Debug, Clone)]
struct Pending {
    node: Uuid,
    project: Uuid,
    task: Queued,
    gpus: Vec<u32>,
    at: DateTime<Utc>,
}

/// The scheduler.
pub struct Scheduler {
    store: Store,
    config: Config,
    projector: Projector,
    pending: Mutex<HashMap<Uuid, Pending>>,
}

fn actor() -> Actor {
    Actor::System("scheduler".into())
}

impl Scheduler {
    /// A scheduler on `store`.
    pub fn new(store: Store, config: Config) -> Self {
        let projector = Projector::only(store.pool().clone(), &["tasks", "nodes", "projects"])
            .unwrap_or_else(|_| unreachable!("these read models exist"));
        Self {
            store,
            config,
            projector,
            pending: Mutex::new(HashMap::new()),
        }
    }

    fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    /// Runs until `shutdown`: waits to lead, then schedules on every wake-up
    /// until the lock's connection is lost (then waits to lead again).
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let lock = tokio::select! {
                _ = &mut shutdown => return,
                lock = self.lead() => lock,
            };
            let mut lock = match lock {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take the scheduler lock; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            tracing::info!("scheduler is leading");
            let mut wake = Wakeup::new(self.pool().clone(), self.config.poll).await;
            loop {
                if let Err(e) = sqlx::query("SELECT 1").execute(&mut lock).await {
                    tracing::warn!(error = %e, "lost the scheduler lock's connection; standing by");
                    break;
                }
                match self.run_once(Utc::now()).await {
                    Ok(o) if o != Outcome::default() => tracing::debug!(?o, "scheduled"),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "scheduling round failed"),
                }
                tokio::select! {
                    _ = &mut shutdown => {
                        let _ = lock.close().await;
                        return;
                    }
                    _ = wake.wait() => {}
                }
            }
        }
    }

    /// Opens a connection of its own and blocks on the leader lock.
    async fn lead(&self) -> Result<PgConnection, sqlx::Error> {
        let options = self.pool().connect_options();
        let mut conn = PgConnection::connect_with(&options).await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .execute(&mut conn)
            .await?;
        Ok(conn)
    }

    /// One round: liveness, timeouts, then placement, as of `now`.
    ///
    /// # Errors
    /// A database error; a refused command is logged and skipped.
    #[tracing::instrument(name = "scheduler_round", skip_all, fields(%now))]
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<Outcome, sqlx::Error> {
        if let Err(e) = self.projector.drain().await {
            tracing::warn!(error = %e, "read models could not catch up");
        }
        let mut outcome = Outcome::default();
        // Timeouts first: an attempt past its time limit on a node that
        // went away ends timed out, not lost and retried.
        self.timeouts(now, &mut outcome).await?;
        self.liveness(now, &mut outcome).await?;
        self.placement(now, &mut outcome).await?;
        Ok(outcome)
    }

    async fn liveness(&self, now: DateTime<Utc>, outcome: &mut Outcome) -> Result<(), sqlx::Error> {
        let cutoff =
            now - chrono::Duration::from_std(self.config.offline_after).unwrap_or_default();
        // Online nodes whose heartbeats stopped.
        let silent = read::nodes::silent_online(self.pool(), cutoff).await?;
        for read::nodes::Silent {
            id: node,
            last_seen,
        } in silent
        {
            let cmd = NodeCommand::MarkOffline { last_seen, at: now };
            match self
                .store
                .execute::<Node>(&node.to_string(), cmd, &actor(), now)
                .await
            {
                Ok(r) if !r.events.is_empty() => outcome.offline += 1,
                Ok(_) => {}
                Err(e) => tracing::warn!(%node, error = %e, "cannot mark node offline"),
            }
        }
        // Attempts on nodes that are gone: silent too long, or revoked.
        let lost = read::tasks::held_on_gone_nodes(self.pool(), cutoff, now).await?;
        for read::tasks::HeldAttempt {
            task,
            attempt,
            node,
            name,
            status,
            last_seen,
            overdue,
        } in lost
        {
            if overdue {
                self.time_out(task, attempt as u32, now, outcome).await;
                continue;
            }
            let reason = if status == "revoked" {
                format!("node {name}'s token was revoked")
            } else {
                let silent = last_seen.map_or(self.config.offline_after.as_secs() as i64, |l| {
                    (now - l).num_seconds()
                });
                format!("node {name} sent no heartbeat for {silent} s")
            };
            let cmd = TaskCommand::MarkLost {
                node_id: node,
                attempt: attempt as u32,
                reason,
                at: now,
            };
            if self.command_task(task, cmd, now, "mark attempt lost").await {
                outcome.lost += 1;
            }
        }
        self.unaccepted(now, outcome).await
    }

    /// Attempts assigned to a node that never took them on: the agent is
    /// connected but stuck, or the command cannot reach it. The attempt is
    /// given up like a lost one, so the task runs elsewhere (retries and
    /// backoff apply).
    async fn unaccepted(
        &self,
        now: DateTime<Utc>,
        outcome: &mut Outcome,
    ) -> Result<(), sqlx::Error> {
        let limit = self.config.accept_timeout;
        let cutoff = now - chrono::Duration::from_std(limit).unwrap_or_default();
        let stuck = read::tasks::unaccepted(self.pool(), cutoff).await?;
        for read::tasks::Unaccepted {
            task,
            attempt,
            node,
            node_name: name,
        } in stuck
        {
            let cmd = TaskCommand::MarkLost {
                node_id: node,
                attempt: attempt as u32,
                reason: format!(
                    "node {name} did not accept the attempt within {} s",
                    limit.as_secs()
                ),
                at: now,
            };
            if self
                .command_task(task, cmd, now, "give up an unaccepted attempt")
                .await
            {
                outcome.lost += 1;
            }
        }
        Ok(())
    }

    async fn timeouts(&self, now: DateTime<Utc>, outcome: &mut Outcome) -> Result<(), sqlx::Error> {
        let grace = self.config.timeout_grace.as_secs_f64();
        let overdue = read::tasks::overdue(self.pool(), now, grace).await?;
        for read::tasks::Attempt { task, attempt } in overdue {
            self.time_out(task, attempt as u32, now, outcome).await;
        }
        Ok(())
    }

    /// Times out an attempt past its limit; the ingress then asks its node
    /// to stop the container, if the node is still there.
    async fn time_out(&self, task: Uuid, attempt: u32, now: DateTime<Utc>, outcome: &mut Outcome) {
        let cmd = TaskCommand::TimeOut {
            attempt,
            by: actor(),
            at: now,
        };
        if self.command_task(task, cmd, now, "time out").await {
            outcome.timed_out += 1;
        }
    }

    /// Runs `cmd` on `task` as the scheduler; whether it appended
    /// anything. A refusal (the task moved on meanwhile) is logged as
    /// "cannot `what`".
    async fn command_task(
        &self,
        task: Uuid,
        cmd: TaskCommand,
        now: DateTime<Utc>,
        what: &str,
    ) -> bool {
        match self
            .store
            .execute::<Task>(&task.to_string(), cmd, &actor(), now)
            .await
        {
            Ok(r) => !r.events.is_empty(),
            Err(e) => {
                tracing::debug!(%task, error = %e, "cannot {what}");
                false
            }
        }
    }

    /// Online, undrained nodes with a recent heartbeat, and their caches.
    async fn candidates(&self) -> Result<Vec<Candidate>, sqlx::Error> {
        let rows = read::nodes::placeable(self.pool()).await?;
        let mut out = Vec::with_capacity(rows.len());
        for read::nodes::Placeable {
            id,
            node,
            images,
            commits,
        } in rows
        {
            let Ok(node) = node else {
                tracing::error!(%id, "unreadable node in node_view");
                continue;
            };
            // Only what an admin vouched for: the labels an admin set, and
            // what the agent declared clamped to the node's maximum.
            let r = node
                .effective_resources()
                .unwrap_or_else(NodeResources::default);
            out.push(Candidate {
                id,
                labels: node.labels,
                name: node.name,
                millicpus: (r.cpus * 1000.0).round() as u64,
                memory_mb: r.memory_mb,
                gpus: r.gpus.iter().map(|g| g.index).collect(),
                used_millicpus: 0,
                used_memory_mb: 0,
                used_gpus: Default::default(),
                images: images.into_iter().collect(),
                commits: commits.into_iter().collect(),
            });
        }
        Ok(out)
    }
}
