//! The scheduler role: placement, liveness and run timeouts.
//!
//! One scheduler leads at a time, holding a lease in the database
//! ([`store::leader`]) that it renews every few seconds; a standby takes
//! over once the lease has expired, with a new term. The leader checks
//! that it surely still holds its lease before every decision, and every
//! assignment names its term: the store refuses one whose term is no
//! longer current, so a leader that was frozen or cut off and comes back
//! cannot place anything next to its successor. The store also reserves
//! each assignment's GPU devices, CPU and memory in the same transaction
//! ([`store::holds`]), and the leader places from those reservations.
//!
//! A node is gone when the platform could hear it and it stayed silent for
//! `offline_after`: silence counts only from when this scheduler began to
//! lead, from its recovery after the database was out of reach, and from
//! when an ingress has been alive without a break ([`heard_since`]), so a
//! restart or an outage never makes every node look gone.
//!
//! [`heard_since`]: Scheduler::heard_since

mod explain;
mod lease;
pub mod placement;
mod queue;
mod reasons;
mod round;

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::node::{Node, NodeCommand, NodeResources};
use domain::task::{Task, TaskCommand};
use domain::Actor;
use projections::{read, Projector};
use sqlx::PgPool;
use store::{Store, Wakeup};
use uuid::Uuid;

use lease::Leadership;
use placement::Candidate;

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
    /// How long the leader's lease lasts unless renewed: a standby takes
    /// over this long (at most) after the leader stops renewing it. The
    /// leader renews it every third of this.
    pub lease: Duration,
    /// The least time between two explanations of why queued tasks wait
    /// (`task_queue_reasons`): they follow the cluster this much behind at
    /// most, and a busy cluster rewrites them no more often.
    pub explain_every: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            offline_after: Duration::from_secs(90),
            timeout_grace: Duration::from_secs(30),
            poll: Duration::from_millis(500),
            batch: 2000,
            accept_timeout: Duration::from_secs(120),
            lease: Duration::from_secs(10),
            explain_every: Duration::from_secs(2),
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
    /// The leader's term the round ran under; `None` when another
    /// scheduler leads and this one did nothing.
    pub term: Option<u64>,
}

impl Outcome {
    /// Whether the round decided anything.
    pub fn decided(&self) -> bool {
        self.assigned + self.offline + self.lost + self.timed_out > 0
    }
}

/// How long candidate nodes read for one placement round may serve the
/// next ones (when no node event went by): what nodes report of their
/// caches is not an event.
const CANDIDATES_FOR: Duration = Duration::from_millis(1000);

/// How old remembered candidates and limits are when housekeeping reads
/// them again while placement is busy, so that it finds them current.
const REFRESH_AFTER: Duration = Duration::from_millis(750);

/// How long after placement last had tasks to place it counts as busy.
const PLACING_WITHIN: Duration = Duration::from_secs(5);

/// What a round does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// The read models' catch-up, timeouts, liveness, then placement.
    Full,
    /// Placement only: what a commit wakes the leader for.
    Placement,
    /// Everything but placement, once per poll interval beside it.
    Housekeeping,
}

/// Whether the database was out of reach, and when it came back.
#[derive(Debug, Default, Clone, Copy)]
struct Reach {
    /// The last round failed.
    failing: bool,
    /// When a round first succeeded again after failing ones.
    recovered_at: Option<DateTime<Utc>>,
}

/// The scheduler.
pub struct Scheduler {
    store: Store,
    config: Config,
    projector: Projector,
    leadership: Leadership,
    reach: Mutex<Reach>,
    queue: tokio::sync::Mutex<queue::Queue>,
    /// The nodes read model alone, brought up to date before placing when
    /// a node event went by.
    nodes_projector: Projector,
    /// The candidates last read while current, when, and where the nodes
    /// read model stood.
    candidates: Mutex<Option<(std::time::Instant, store::Checkpoint, Vec<Candidate>)>>,
    /// When placement last had tasks to place: while it has lately,
    /// housekeeping keeps the candidates and limits current for it.
    placed_at: Mutex<Option<std::time::Instant>>,
    /// Projects' running limits as last read while current (`None`: no
    /// limit), when, and where the projects read model stood.
    #[allow(clippy::type_complexity)]
    limits: Mutex<
        Option<(
            std::time::Instant,
            store::Checkpoint,
            std::collections::HashMap<Uuid, Option<u32>>,
        )>,
    >,
    reasons: tokio::sync::Mutex<reasons::Recorded>,
    /// Where the read models stood after the last housekeeping round's
    /// catch-up: moved since, another projector keeps them current.
    read_models_at: tokio::sync::Mutex<Option<Vec<store::Checkpoint>>>,
}

fn actor() -> Actor {
    Actor::System("scheduler".into())
}

impl Scheduler {
    /// A scheduler on `store`'s database. It works on connections of its
    /// own ([`lease::pool`]), so that a vanished leader's sessions end
    /// within seconds. Call inside a Tokio runtime.
    pub fn new(store: Store, config: Config) -> Self {
        let pool = lease::pool(&store.pool().connect_options(), config.lease);
        let projector = Projector::only(pool.clone(), &["tasks", "nodes", "projects"])
            .unwrap_or_else(|_| unreachable!("these read models exist"));
        let nodes_projector = Projector::only(pool.clone(), &["nodes"])
            .unwrap_or_else(|_| unreachable!("this read model exists"));
        Self {
            store: store.on_pool(pool.clone()),
            leadership: Leadership::new(pool, config.lease),
            config,
            projector,
            reach: Mutex::new(Reach::default()),
            queue: tokio::sync::Mutex::new(queue::Queue::new(store.pool())),
            nodes_projector,
            candidates: Mutex::new(None),
            limits: Mutex::new(None),
            placed_at: Mutex::new(None),
            reasons: tokio::sync::Mutex::default(),
            read_models_at: tokio::sync::Mutex::default(),
        }
    }

    /// The same scheduler telling `observer` of the read-model batches its
    /// catch-up commits before a round, as the projector role does: either
    /// may apply a batch, so both must tell (the task latencies of
    /// `/metrics` are observed this way).
    pub fn with_observer(mut self, observer: std::sync::Arc<dyn projections::Observer>) -> Self {
        self.projector = self.projector.with_observer(observer);
        self
    }

    fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    /// Runs until `shutdown`: stands by until the lease can be taken, then
    /// places on every wake-up, renewing the lease, until it is lost (then
    /// stands by again). Liveness, timeouts and the read models' catch-up
    /// run beside placement, once per poll interval, so a placement never
    /// waits for them. At shutdown the lease is given up, so a standby
    /// takes over at once.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = shutdown => {
                if self.leadership.term().is_some() {
                    self.leadership.release().await;
                }
            }
            _ = self.place_on_wake() => {}
            _ = self.keep_house() => {}
        }
    }

    /// Placement rounds, one per wake-up, for as long as this runs;
    /// leadership is taken and renewed here.
    async fn place_on_wake(&self) {
        let mut wake: Option<Wakeup> = None;
        loop {
            self.logged(
                self.while_renewing(self.lead(Round::Placement, Utc::now()))
                    .await,
            );
            if self.leadership.term().is_none() {
                wake = None;
                tokio::time::sleep(self.leadership.standby_poll()).await;
                continue;
            }
            let wake = match &mut wake {
                Some(w) => w,
                None => wake.insert(Wakeup::new(self.pool().clone(), self.config.poll).await),
            };
            if self.queue.lock().await.held_back() {
                // Committed events wait behind an older transaction, which
                // may end without notifying anyone: look again shortly.
                wake.soon();
            }
            tokio::select! {
                _ = wake.wait() => {}
                _ = tokio::time::sleep(self.leadership.renew_every()) => {}
            }
        }
    }

    /// The read models' catch-up, timeouts and liveness once per poll
    /// interval while this scheduler leads.
    async fn keep_house(&self) {
        loop {
            if self.leadership.term().is_some() {
                self.logged(
                    self.while_renewing(self.lead(Round::Housekeeping, Utc::now()))
                        .await,
                );
                self.refresh_candidates().await;
                self.refresh_limits().await;
            }
            tokio::time::sleep(self.config.poll).await;
        }
    }

    /// Whether placement had tasks to place within the last
    /// [`PLACING_WITHIN`].
    pub(super) fn placing(&self) -> bool {
        self.placed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < PLACING_WITHIN)
    }

    /// While placement is busy ([`Scheduler::placing`]), reads the
    /// candidate nodes again once they are [`REFRESH_AFTER`] old, beside
    /// placement: a placement round then seldom waits for the two reads
    /// (only after a node event, which makes what was read stale at once),
    /// and they are read about as often as before. Otherwise nothing is
    /// read: an idle cluster of thousands of nodes is not read over and
    /// over for no placement.
    async fn refresh_candidates(&self) {
        let due = self
            .candidates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(when, _, _)| when.elapsed() >= REFRESH_AFTER);
        if !due || !self.placing() {
            return;
        }
        if let Err(e) = self.read_candidates().await {
            tracing::debug!(error = %e, "reading the candidate nodes failed; placement reads them");
        }
    }

    fn logged(&self, round: Result<Outcome, sqlx::Error>) {
        match round {
            Ok(o) if o.decided() => tracing::debug!(?o, "scheduled"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "scheduling round failed"),
        }
    }

    /// Runs `work`, renewing the lease whenever a renewal is due meanwhile
    /// (a round placing thousands of tasks outlasts a lease).
    async fn while_renewing<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                () = tokio::time::sleep(self.leadership.renew_every() / 2) => {
                    if let Some(term) = self.leadership.term() {
                        self.leadership.renew_if_due(term).await;
                    }
                }
            }
        }
    }

    /// One round as the leader, as of `now`: takes or renews the lease
    /// first, then liveness, timeouts and placement, each decision made
    /// only while the lease is surely held. When another scheduler leads,
    /// does nothing and says so (`term` is `None`).
    ///
    /// # Errors
    /// A database error; a refused command is logged and skipped.
    #[tracing::instrument(name = "scheduler_round", skip_all, fields(%now))]
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<Outcome, sqlx::Error> {
        self.lead(Round::Full, now).await
    }

    /// A round of `work` as the leader, as of `now` (see
    /// [`Scheduler::run_once`]).
    async fn lead(&self, work: Round, now: DateTime<Utc>) -> Result<Outcome, sqlx::Error> {
        let Some(term) = self.leadership.keep().await else {
            return Ok(Outcome::default());
        };
        let round = match work {
            Round::Full => self.round(term, now, true).await,
            Round::Housekeeping => self.round(term, now, false).await,
            Round::Placement => {
                let mut outcome = Outcome {
                    term: Some(term),
                    ..Outcome::default()
                };
                self.placement(term, now, &mut outcome)
                    .await
                    .map(|()| outcome)
            }
        };
        let mut reach = self.reach.lock().unwrap_or_else(|e| e.into_inner());
        match &round {
            Err(_) => reach.failing = true,
            Ok(_) if reach.failing => {
                reach.failing = false;
                reach.recovered_at = Some(now);
            }
            Ok(_) => {}
        }
        round
    }

    async fn round(
        &self,
        term: u64,
        now: DateTime<Utc>,
        place: bool,
    ) -> Result<Outcome, sqlx::Error> {
        let drained = {
            let mut seen = self.read_models_at.lock().await;
            self.projector.drain_unless_moved(&mut seen).await
        };
        if let Err(e) = drained {
            tracing::warn!(error = %e, "read models could not catch up");
        }
        let mut outcome = Outcome {
            term: Some(term),
            ..Outcome::default()
        };
        // Timeouts first: an attempt past its time limit on a node that
        // went away ends timed out, not lost and retried.
        self.timeouts(term, now, &mut outcome).await?;
        self.liveness(term, now, &mut outcome).await?;
        if place {
            self.placement(term, now, &mut outcome).await?;
        }
        self.explain_queue(term, now).await;
        Ok(outcome)
    }

    /// Since when this scheduler could hear every node, as of `now`: the
    /// latest of when its term began, when it reached the database again
    /// after losing it, and since when an ingress has been alive without a
    /// break (`now` when none is alive: nothing is heard). A node's silence
    /// counts from no earlier, so after a restart, a change of leader or an
    /// outage every node gets a full window to be heard again.
    ///
    /// # Errors
    /// A database error.
    pub async fn heard_since(&self, now: DateTime<Utc>) -> Result<DateTime<Utc>, sqlx::Error> {
        let ingress: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT min(alive_since) FROM ingress_liveness \
             WHERE last_seen >= now() - make_interval(secs => $1)",
        )
        .bind(ingress::ALIVE_WITHIN.as_secs_f64())
        .fetch_one(self.pool())
        .await?;
        let recovered = self
            .reach
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recovered_at;
        Ok([
            Some(ingress.unwrap_or(now)),
            self.leadership.since(),
            recovered,
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(now))
    }

    /// The cutoff for a silence of `window` as of `now`, heard since
    /// `heard`: `now - window` once a whole window has been heard, else a
    /// time before anything (nothing has been silent that long yet).
    fn silent_before(now: DateTime<Utc>, heard: DateTime<Utc>, window: Duration) -> DateTime<Utc> {
        let cutoff = now - chrono::Duration::from_std(window).unwrap_or_default();
        if heard < cutoff {
            cutoff
        } else {
            DateTime::UNIX_EPOCH
        }
    }

    async fn liveness(
        &self,
        term: u64,
        now: DateTime<Utc>,
        outcome: &mut Outcome,
    ) -> Result<(), sqlx::Error> {
        let heard = self.heard_since(now).await?;
        let cutoff = Self::silent_before(now, heard, self.config.offline_after);
        // Online nodes whose heartbeats stopped.
        let silent = read::nodes::silent_online(self.pool(), cutoff).await?;
        for read::nodes::Silent {
            id: node,
            last_seen,
        } in silent
        {
            if !self.leadership.sure(term) {
                return Ok(());
            }
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
                self.time_out(term, task, attempt as u32, now, outcome)
                    .await;
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
            if self
                .command_task(term, task, cmd, now, "mark attempt lost")
                .await
            {
                outcome.lost += 1;
            }
        }
        self.unaccepted(term, now, heard, outcome).await
    }

    /// Attempts assigned to a node that never took them on: the agent is
    /// connected but stuck, or the command cannot reach it. The attempt is
    /// given up like a lost one, so the task runs elsewhere (retries and
    /// backoff apply). As with silence, the wait counts only from `heard`:
    /// an attempt the platform could not deliver during an outage is not
    /// given up for it.
    async fn unaccepted(
        &self,
        term: u64,
        now: DateTime<Utc>,
        heard: DateTime<Utc>,
        outcome: &mut Outcome,
    ) -> Result<(), sqlx::Error> {
        let limit = self.config.accept_timeout;
        let cutoff = Self::silent_before(now, heard, limit);
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
                .command_task(term, task, cmd, now, "give up an unaccepted attempt")
                .await
            {
                outcome.lost += 1;
            }
        }
        Ok(())
    }

    async fn timeouts(
        &self,
        term: u64,
        now: DateTime<Utc>,
        outcome: &mut Outcome,
    ) -> Result<(), sqlx::Error> {
        let grace = self.config.timeout_grace.as_secs_f64();
        let overdue = read::tasks::overdue(self.pool(), now, grace).await?;
        for read::tasks::Attempt { task, attempt } in overdue {
            self.time_out(term, task, attempt as u32, now, outcome)
                .await;
        }
        Ok(())
    }

    /// Times out an attempt past its limit; the ingress then asks its node
    /// to stop the container, if the node is still there.
    async fn time_out(
        &self,
        term: u64,
        task: Uuid,
        attempt: u32,
        now: DateTime<Utc>,
        outcome: &mut Outcome,
    ) {
        let cmd = TaskCommand::TimeOut {
            attempt,
            by: actor(),
            at: now,
        };
        if self.command_task(term, task, cmd, now, "time out").await {
            outcome.timed_out += 1;
        }
    }

    /// Runs `cmd` on `task` as the leader of `term`, while it surely
    /// leads; whether it appended anything. A refusal (the task moved on
    /// meanwhile) is logged as "cannot `what`".
    async fn command_task(
        &self,
        term: u64,
        task: Uuid,
        cmd: TaskCommand,
        now: DateTime<Utc>,
        what: &str,
    ) -> bool {
        if !self.leadership.sure(term) {
            return false;
        }
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

    /// [`Scheduler::candidates`] for a placement round, only once the
    /// nodes read model reflects every node event the queue has seen (so a
    /// task submitted after a node was drained, here or elsewhere, is never
    /// placed on it): the ones last read while they are current and younger
    /// than [`CANDIDATES_FOR`] (what nodes report of their caches is not an
    /// event), else read again after bringing the nodes read model up to
    /// date. `None` when it cannot be yet (the event is still held back in
    /// the outbox): placement waits for the next round. A busy leader places
    /// many times a second and its nodes rarely change meanwhile; what the
    /// nodes hold is read fresh every round ([`store::holds`]).
    async fn current_candidates(&self) -> Result<Option<Vec<Candidate>>, sqlx::Error> {
        let cached = self
            .candidates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some((when, at, nodes)) = cached {
            if when.elapsed() < CANDIDATES_FOR && self.queue.lock().await.nodes_current_at(Some(at))
            {
                return Ok(Some(nodes));
            }
        }
        self.read_candidates().await
    }

    /// The uncached half of [`Scheduler::current_candidates`]: reads the
    /// candidates when the nodes read model is current, and remembers them.
    async fn read_candidates(&self) -> Result<Option<Vec<Candidate>>, sqlx::Error> {
        let mut at = self.nodes_at().await?;
        if !self.queue.lock().await.nodes_current_at(at) {
            if let Err(e) = self.nodes_projector.drain().await {
                tracing::warn!(error = %e, "the nodes read model could not catch up");
            }
            at = self.nodes_at().await?;
            if !self.queue.lock().await.nodes_current_at(at) {
                return Ok(None);
            }
        }
        let nodes = self.candidates().await?;
        *self.candidates.lock().unwrap_or_else(|e| e.into_inner()) =
            at.map(|at| (std::time::Instant::now(), at, nodes.clone()));
        Ok(Some(nodes))
    }

    /// Where the nodes read model stands.
    async fn nodes_at(&self) -> Result<Option<store::Checkpoint>, sqlx::Error> {
        let at: Option<(i64, i64)> =
            sqlx::query_as("SELECT txid, position FROM checkpoints WHERE name = 'nodes'")
                .fetch_optional(self.pool())
                .await?;
        Ok(at.map(|(txid, position)| store::Checkpoint { txid, position }))
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
