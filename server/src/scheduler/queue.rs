//! The leader's queue, in memory: every task not yet ended, as the task
//! aggregate itself folds its events, loaded from one consistent snapshot
//! of the `tasks` read model when leadership begins and folded forward
//! from the events this process commits and from the outbox. A submission
//! reaches placement without waiting for the read model or the outbox, and
//! a round reads neither the queue nor what nodes hold from the database
//! ([`Queue::holds`]); the read model stays for the API.
//!
//! The snapshot is the read model's rows of unfinished tasks together with
//! the read model's own checkpoint, read in one repeatable-read
//! transaction, so the rows reflect exactly the events up to the
//! checkpoint; folding goes on from there. An event that does not follow
//! the sequence this queue knows for its task (a task the snapshot left out
//! as ended, or one the read model could not apply) makes the queue load
//! that task from the log instead. A task seen ending is remembered as
//! ended (a bounded number of them), so the events the outbox brings of it
//! after this process's own commits ended it are passed over, not loaded.
//! A new term loads the queue afresh.

use std::collections::{HashMap, HashSet, VecDeque};

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::task::{Task, TaskEvent, TaskState};
use projections::read::tasks::QueuedTask;
use sqlx::PgPool;
use store::outbox::{self, Checkpoint, RecordedEvent};
use store::Store;
use uuid::Uuid;

/// Events read from the outbox at once.
const READ: i64 = 5000;

/// Ended tasks remembered, so that their later events (which the outbox
/// brings after the process's own commits were folded) are passed over
/// without loading them; one forgotten is loaded once more, no more.
const ENDED: usize = 65_536;

/// A task and the sequence of its last event folded in.
struct Known {
    task: Task,
    sequence: i64,
}

/// What kinds of event [`Queue::take_local`] folded in or noted.
#[derive(Debug, Default, Clone, Copy)]
struct Local {
    /// A node event went by.
    nodes: bool,
    /// A project event went by.
    projects: bool,
    /// A task event was folded in.
    tasks: bool,
}

/// The unfinished tasks, as of `at`.
pub(super) struct Queue {
    /// Task events this process commits (the API's submissions, this
    /// scheduler's own assignments), folded in before the outbox is read.
    local: outbox::LocalEvents,
    /// Where in the outbox the queue stands; `None` until loaded.
    at: Option<Checkpoint>,
    /// The leader's term it was loaded under: a new term loads afresh.
    term: Option<u64>,
    /// Where in the outbox the nodes read model must stand for candidates
    /// read from it to reflect every node event the queue has seen: the
    /// last node event folded, the snapshot it was loaded from, or the
    /// log's head when this process committed a node event.
    node_event: Option<Checkpoint>,
    /// The same for project events and the projects read model (the
    /// projects' running limits placement reads).
    project_event: Option<Checkpoint>,
    tasks: HashMap<Uuid, Known>,
    /// Tasks seen ending, the oldest leaving first: an ended task never
    /// waits for a node again, whatever events follow.
    ended: Ended,
    /// Whether the last read of the outbox found events committed but held
    /// back by an older open transaction ([`outbox::held_back`]).
    held_back: bool,
}

/// A bounded set of the ids of tasks the queue saw end.
#[derive(Default)]
struct Ended {
    ids: HashSet<Uuid>,
    order: VecDeque<Uuid>,
}

impl Ended {
    fn contains(&self, id: &Uuid) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: Uuid) {
        if !self.ids.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > ENDED {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
    }
}

impl Queue {
    /// An empty queue, loaded at its first round, following the events
    /// this process commits to the database of `pool`.
    pub fn new(pool: &PgPool) -> Self {
        Self {
            local: outbox::local_events(pool),
            at: None,
            term: None,
            node_event: None,
            project_event: None,
            tasks: HashMap::new(),
            ended: Ended::default(),
            held_back: false,
        }
    }
}

impl Queue {
    /// Folds in the task events this process committed since the last
    /// call, straight away: a submission is placed without waiting to be
    /// readable in the outbox (an older transaction may hold it back
    /// there). Each is folded only when it follows what the queue knows of
    /// its task; the outbox brings everything else, and these again.
    /// Returns what kinds of event were among them.
    fn take_local(&mut self) -> Local {
        use tokio::sync::broadcast::error::TryRecvError;
        let mut local = Local::default();
        loop {
            let event = match self.local.try_recv() {
                Ok(e) => e,
                // Missed some: the outbox has them.
                Err(TryRecvError::Lagged(_)) => continue,
                Err(TryRecvError::Empty | TryRecvError::Closed) => return local,
            };
            if event.aggregate_type != Task::TYPE {
                local.nodes |= event.aggregate_type == "node";
                local.projects |= event.aggregate_type == "project";
                continue;
            }
            let Ok(id) = Uuid::try_parse(&event.aggregate_id) else {
                continue;
            };
            if self.ended.contains(&id) {
                continue;
            }
            let follows = match self.tasks.get(&id) {
                Some(k) => event.sequence == k.sequence + 1,
                None => event.sequence == 1,
            };
            if !follows {
                continue;
            }
            let Ok(e) = serde_json::from_str::<TaskEvent>(&event.payload) else {
                continue;
            };
            let known = self.tasks.entry(id).or_insert_with(|| Known {
                task: Task::default(),
                sequence: 0,
            });
            known.task.apply(e);
            known.sequence = event.sequence;
            local.tasks = true;
            if known.task.state.is_terminal() {
                self.end(id);
            }
        }
    }

    /// What the tasks holding a node hold there, as folded so far. It may
    /// still count an attempt another process ended a moment ago, until
    /// the outbox brings that, and counts this leader's own assignments as
    /// soon as they commit.
    pub fn holds(&self) -> Vec<store::holds::Hold> {
        self.tasks
            .iter()
            .filter(|(_, k)| k.task.state.holds_node())
            .filter_map(|(id, k)| {
                let t = &k.task;
                let spec = t.spec.as_ref()?;
                let node = t.node_id?;
                let gpus = t
                    .attempts
                    .iter()
                    .rev()
                    .find(|a| a.number == t.attempt)
                    .map(|a| a.gpus.clone())
                    .unwrap_or_default();
                Some(store::holds::Hold {
                    task: *id,
                    attempt: t.attempt,
                    node,
                    project: Some(spec.project_id),
                    millicpus: spec.resources.millicpus(),
                    memory_mb: spec.resources.memory_mb,
                    gpus,
                })
            })
            .collect()
    }

    /// Forgets task `id`, which ended, and remembers that it did.
    fn end(&mut self, id: Uuid) {
        self.tasks.remove(&id);
        self.ended.insert(id);
    }

    /// Loads the queue when it was not loaded under leader's `term`, then
    /// folds in the task events this process committed since the last
    /// call ([`Queue::take_local`]); whether there were any, on a queue
    /// that was loaded already. What other processes committed waits for
    /// [`Queue::follow_outbox`].
    ///
    /// # Errors
    /// A database error; the queue stays where it was.
    pub async fn follow_local(&mut self, store: &Store, term: u64) -> Result<bool, sqlx::Error> {
        let mut loaded = false;
        if self.at.is_none() || self.term != Some(term) {
            self.load(store.pool()).await?;
            self.term = Some(term);
            self.node_event = self.at;
            self.project_event = self.at;
            loaded = true;
        }
        let Local {
            nodes,
            projects,
            tasks,
        } = self.take_local();
        if nodes || projects {
            // Committed, so at or before the log's head: the read model
            // must get there first.
            let head = Some(outbox::committed_head(store.pool()).await?);
            if nodes {
                self.node_event = self.node_event.max(head);
            }
            if projects {
                self.project_event = self.project_event.max(head);
            }
        }
        Ok(tasks && !loaded)
    }

    /// Folds in every event the outbox shows after where the queue stands;
    /// whether any told the queue something new (a task event it had not
    /// folded in, a node or project event).
    ///
    /// # Errors
    /// A database error; the queue stays where it was.
    pub async fn follow_outbox(&mut self, store: &Store) -> Result<bool, sqlx::Error> {
        // Every event: where node events go by tells placement whether the
        // nodes it read are current.
        let mut news = false;
        loop {
            let Some(at) = self.at else { return Ok(news) };
            let (events, held) = outbox::read_after_held(store.pool(), at, READ).await?;
            self.held_back = held;
            let Some(last) = events.last().map(RecordedEvent::checkpoint) else {
                return Ok(news);
            };
            for event in &events {
                news |= self.fold(store, event).await;
            }
            self.at = Some(last);
            if (events.len() as i64) < READ {
                return Ok(news);
            }
        }
    }

    /// Whether the last read of the outbox found events it could not show
    /// yet, held back by an older open transaction that may end without
    /// notifying anyone: the caller should look again soon.
    pub fn held_back(&self) -> bool {
        self.held_back
    }

    /// The read model's unfinished tasks and its checkpoint, consistent
    /// with each other.
    async fn load(&mut self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let at: Option<(i64, i64)> =
            sqlx::query_as("SELECT txid, position FROM checkpoints WHERE name = $1")
                .bind(projections::read::tasks::CHECKPOINT)
                .fetch_optional(&mut *tx)
                .await?;
        let rows: Vec<(Uuid, i64, serde_json::Value)> = sqlx::query_as(LIVE_TASKS)
            .bind(live_states())
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        self.tasks.clear();
        for (id, sequence, doc) in rows {
            match serde_json::from_value::<Task>(doc) {
                Ok(task) => {
                    self.tasks.insert(id, Known { task, sequence });
                }
                // Loaded from the log when its next event comes.
                Err(e) => tracing::error!(task = %id, error = %e, "unreadable task in task_view"),
            }
        }
        self.at = Some(
            at.map_or_else(Checkpoint::default, |(txid, position)| Checkpoint {
                txid,
                position,
            }),
        );
        Ok(())
    }

    /// Whether nodes read from the nodes read model when it stood at
    /// `at` (`None`: not known) reflect every node event this queue has
    /// seen.
    pub fn nodes_current_at(&self, at: Option<Checkpoint>) -> bool {
        reflects(self.node_event, at)
    }

    /// Whether projects read from the projects read model when it stood
    /// at `at` reflect every project event this queue has seen.
    pub fn projects_current_at(&self, at: Option<Checkpoint>) -> bool {
        reflects(self.project_event, at)
    }

    /// Folds `event` into its task.
    async fn fold(&mut self, store: &Store, event: &RecordedEvent) -> bool {
        if event.aggregate_type != Task::TYPE {
            match event.aggregate_type.as_str() {
                "node" => self.node_event = self.node_event.max(Some(event.checkpoint())),
                "project" => self.project_event = self.project_event.max(Some(event.checkpoint())),
                _ => return false,
            }
            return true;
        }
        let Ok(id) = Uuid::try_parse(&event.aggregate_id) else {
            tracing::error!(aggregate_id = %event.aggregate_id, "a task event with a malformed id");
            return false;
        };
        if self.ended.contains(&id) {
            return false;
        }
        let follows = match self.tasks.get(&id) {
            Some(k) if event.sequence <= k.sequence => return false,
            Some(k) => event.sequence == k.sequence + 1,
            None => event.sequence == 1,
        };
        let decoded = if follows {
            serde_json::from_value::<TaskEvent>(event.payload.clone()).ok()
        } else {
            None
        };
        match decoded {
            Some(e) => {
                let known = self.tasks.entry(id).or_insert_with(|| Known {
                    task: Task::default(),
                    sequence: 0,
                });
                known.task.apply(e);
                known.sequence = event.sequence;
            }
            None => match store.load::<Task>(&id.to_string()).await {
                Ok(Some(loaded)) => {
                    self.tasks.insert(
                        id,
                        Known {
                            task: loaded.state,
                            sequence: loaded.sequence as i64,
                        },
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    // Placement passes the task over until it can be read.
                    tracing::error!(task = %id, error = %e, "cannot load a task for the queue");
                    self.tasks.remove(&id);
                }
            },
        }
        if self
            .tasks
            .get(&id)
            .is_some_and(|k| k.task.state.is_terminal())
        {
            self.end(id);
        }
        true
    }

    /// Whether any task waits for a node.
    pub fn any_queued(&self) -> bool {
        self.tasks
            .values()
            .any(|k| k.task.state == TaskState::Queued)
    }

    /// The attempt queued task `id` waits after (0 before its first) and
    /// the end of its retry backoff; `None` when it is not queued.
    pub fn wait_of(&self, id: &Uuid) -> Option<(u32, Option<DateTime<Utc>>)> {
        self.tasks
            .get(id)
            .filter(|k| k.task.state == TaskState::Queued)
            .map(|k| (k.task.attempt, k.task.not_before))
    }

    /// Up to `limit` queued tasks, highest priority and oldest first,
    /// without those whose retry backoff lasts past `now`: what placement
    /// considers.
    pub fn queued(&self, limit: usize, now: DateTime<Utc>) -> Vec<QueuedTask> {
        let mut queued: Vec<(&Uuid, &Task)> = self
            .tasks
            .iter()
            .filter(|(_, k)| {
                k.task.state == TaskState::Queued && k.task.not_before.is_none_or(|t| t <= now)
            })
            .filter_map(|(id, k)| k.task.spec.as_ref().map(|_| (id, &k.task)))
            .collect();
        let key = |t: &Task| t.spec.as_ref().map_or(0, |s| s.priority);
        first_in_order(&mut queued, limit, |(a_id, a), (b_id, b)| {
            key(b)
                .cmp(&key(a))
                .then(a.submitted_at.cmp(&b.submitted_at))
                .then(a_id.cmp(b_id))
        });
        queued
            .into_iter()
            .filter_map(|(id, t)| {
                let spec = t.spec.clone()?;
                Some(QueuedTask {
                    id: *id,
                    project: spec.project_id,
                    priority: spec.priority,
                    spec: Ok(spec),
                })
            })
            .collect()
    }
}

/// The tasks the queue starts from: those not ended, by the states index
/// (`NOT IN` the ended states would read every task ever run).
const LIVE_TASKS: &str = "SELECT id, last_sequence, doc FROM task_view WHERE state = ANY($1)";

/// The states of a task that has not ended, as `task_view` stores them.
fn live_states() -> Vec<&'static str> {
    TaskState::ALL
        .into_iter()
        .filter(|s| !s.is_terminal())
        .map(TaskState::as_str)
        .collect()
}

/// Leaves in `items` the first `limit` of them in `order` (a total order),
/// sorted: only those are sorted, after a linear selection, as a round
/// takes a batch from a queue that may hold many thousands.
fn first_in_order<T>(
    items: &mut Vec<T>,
    limit: usize,
    mut order: impl FnMut(&T, &T) -> std::cmp::Ordering,
) {
    if limit == 0 {
        items.clear();
        return;
    }
    if limit < items.len() {
        items.select_nth_unstable_by(limit - 1, &mut order);
        items.truncate(limit);
    }
    items.sort_by(order);
}

/// Whether a read model standing at `at` (`None`: not known) reflects the
/// event at `event` (`None`: none seen).
fn reflects(event: Option<Checkpoint>, at: Option<Checkpoint>) -> bool {
    match (event, at) {
        (None, _) => true,
        (Some(event), Some(at)) => at >= event,
        (Some(event), None) => event == Checkpoint::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::{first_in_order, live_states, LIVE_TASKS};

    /// Taking the lead reads the tasks not ended through the states index,
    /// whatever the number of tasks that ended before: with 20,000 of them,
    /// the plan scans no table and the live ones are all found.
    #[tokio::test]
    async fn the_queue_loads_the_live_tasks_by_index_not_by_reading_every_task() {
        let db = testkit::fresh_db().await;
        sqlx::query(
            "INSERT INTO task_view (id, project_id, state, priority, node_id, attempt, \
                submitted_by, submitted_at, updated_at, list_position, last_sequence, doc) \
             SELECT gen_random_uuid(), gen_random_uuid(), \
                    (ARRAY['succeeded', 'failed', 'timed_out', 'cancelled', 'queued', 'running'])[1 + i % 6], \
                    0, NULL, 1, 'u', now(), now(), i, 1, '{}' \
             FROM generate_series(1, 20000) AS i",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        // Fewer live ones, as in a log with a long history.
        sqlx::query(
            "DELETE FROM task_view WHERE state IN ('queued', 'running') AND list_position > 60",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE task_view")
            .execute(&db.pool)
            .await
            .unwrap();
        let live: Vec<(uuid::Uuid, i64, serde_json::Value)> = sqlx::query_as(LIVE_TASKS)
            .bind(live_states())
            .fetch_all(&db.pool)
            .await
            .unwrap();
        assert_eq!(live.len(), 20);
        let (plan,): (serde_json::Value,) =
            sqlx::query_as(&format!("EXPLAIN (FORMAT JSON) {LIVE_TASKS}"))
                .bind(live_states())
                .fetch_one(&db.pool)
                .await
                .unwrap();
        let plan = plan.to_string();
        assert!(
            !plan.contains("Seq Scan") && plan.contains("task_view_state"),
            "{plan}"
        );
        assert_eq!(
            live_states(),
            [
                "new",
                "queued",
                "assigned",
                "accepted",
                "preparing",
                "running"
            ]
        );
    }

    #[test]
    fn the_first_in_order_are_those_a_whole_sort_puts_first() {
        // Many ties on the first key, each broken by the second, as the
        // queue breaks ties of priority and submission time by task id.
        let items: Vec<(u8, u32)> = (0..500u32)
            .map(|i| {
                (
                    (i.wrapping_mul(7919) % 5) as u8,
                    i.wrapping_mul(2_654_435_761) % 1000,
                )
            })
            .collect();
        let order = |a: &(u8, u32), b: &(u8, u32)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
        let mut sorted = items.clone();
        sorted.sort_by(order);
        for limit in [0, 1, 2, 17, 499, 500, 501, usize::MAX] {
            let mut first = items.clone();
            first_in_order(&mut first, limit, order);
            assert_eq!(first, sorted[..limit.min(sorted.len())], "limit {limit}");
        }
    }
}
