//! Commands from the server, turned into executors.
//!
//! The supervisor remembers which attempts run here (for the hello after a
//! reconnect), which command ids it has handled (so a resent command is
//! dropped), and which attempts finished or were cancelled before they
//! started. Every memory here is bounded.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use protocol::{Command, ReportedState, RunTask, RunningAttempt};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::executor::{self, Canceller, Context, Report, StatusReport};

/// How many handled command ids are remembered.
const SEEN_COMMANDS: usize = 4096;
/// How many finished attempts are remembered.
const FINISHED_ATTEMPTS: usize = 1024;

/// A task and attempt.
pub type AttemptKey = (Uuid, u32);

/// A set that forgets its oldest entries beyond a capacity.
#[derive(Debug)]
pub struct RecentSet<T> {
    order: VecDeque<T>,
    members: HashSet<T>,
    capacity: usize,
}

impl<T: Eq + Hash + Clone> RecentSet<T> {
    /// An empty set holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        RecentSet {
            order: VecDeque::new(),
            members: HashSet::new(),
            capacity,
        }
    }

    /// Adds `value`; false if it was there already.
    pub fn insert(&mut self, value: T) -> bool {
        if !self.members.insert(value.clone()) {
            return false;
        }
        self.order.push_back(value);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.members.remove(&old);
            }
        }
        true
    }

    /// Whether `value` is in the set.
    pub fn contains(&self, value: &T) -> bool {
        self.members.contains(value)
    }

    /// Removes `value`; false if it was not there.
    pub fn remove(&mut self, value: &T) -> bool {
        if !self.members.remove(value) {
            return false;
        }
        self.order.retain(|v| v != value);
        true
    }
}

#[derive(Debug)]
struct Running {
    canceller: Canceller,
    container: Option<String>,
}

#[derive(Debug)]
struct State {
    running: HashMap<AttemptKey, Running>,
    seen: RecentSet<Uuid>,
    finished: RecentSet<AttemptKey>,
    cancelled_early: RecentSet<AttemptKey>,
}

/// Handles commands and keeps track of running attempts. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    ctx: Arc<Context>,
    reports: mpsc::Sender<Report>,
    state: Arc<Mutex<State>>,
}

impl Supervisor {
    /// A supervisor whose executors use `ctx` and send to `reports`.
    pub fn new(ctx: Arc<Context>, reports: mpsc::Sender<Report>) -> Self {
        let state = State {
            running: HashMap::new(),
            seen: RecentSet::new(SEEN_COMMANDS),
            finished: RecentSet::new(FINISHED_ATTEMPTS),
            cancelled_early: RecentSet::new(FINISHED_ATTEMPTS),
        };
        Supervisor {
            ctx,
            reports,
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// The state, held only for map updates, never across an `.await`.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Handles one command; a `command_id` handled before is ignored. The
    /// caller acknowledges every command, duplicate or not.
    pub fn handle(&self, command_id: Uuid, command: Command) {
        if !self.state().seen.insert(command_id) {
            tracing::debug!(%command_id, "command already handled");
            return;
        }
        match command {
            Command::RunTask(spec) => self.start(spec),
            Command::CancelTask {
                task_id,
                attempt,
                grace_s,
            } => self.cancel((task_id, attempt), Duration::from_secs(grace_s)),
            // Host commands are no task: the connection hands them to the
            // host SSH runner before they would get here.
            Command::HostSsh(request) => {
                tracing::warn!(request_id = %request.request_id, "host_ssh is not run by the task supervisor");
            }
        }
    }

    /// The attempts running here, with their containers once started.
    pub fn running(&self) -> Vec<RunningAttempt> {
        self.state()
            .running
            .iter()
            .map(|(&(task_id, attempt), r)| RunningAttempt {
                task_id,
                attempt,
                container: r.container.clone(),
            })
            .collect()
    }

    /// Looks at a report on its way to the server, to learn container ids.
    pub fn observe(&self, report: &Report) {
        if let Report::Status(s) = report {
            if s.state == ReportedState::Running {
                if let Some(r) = self.state().running.get_mut(&(s.task_id, s.attempt)) {
                    r.container.clone_from(&s.container);
                }
            }
        }
    }

    /// Notes attempts that ended here before a restart (their final
    /// reports were read back from the journal): they are neither adopted
    /// nor run again; their containers go once the server has their end.
    pub fn note_ended(&self, ended: impl IntoIterator<Item = AttemptKey>) {
        let mut state = self.state();
        for key in ended {
            state.finished.insert(key);
        }
    }

    /// Takes over the containers a previous run of this agent left behind
    /// (found by their labels), before the first hello lists them: started
    /// ones are followed to their end like any attempt (one that ended
    /// meanwhile is reported as it ended), never-started ones are removed.
    /// The server then keeps or cancels each. Attempts noted as ended
    /// ([`Supervisor::note_ended`]) are left alone. Last, the directories
    /// of attempts left with no container at all (the agent stopped while
    /// one was prepared) are removed
    /// ([`sweep_workspaces`](executor::sweep_workspaces)).
    pub async fn adopt_leftovers(&self) {
        for found in self.ctx.leftovers().await {
            if self
                .state()
                .finished
                .contains(&(found.task_id, found.attempt))
            {
                tracing::info!(task_id = %found.task_id, attempt = found.attempt, container = %found.id, "keeping the container of an attempt whose end is journaled until the server has it");
                continue;
            }
            if found.running_for.is_none() {
                executor::discard(&found, &self.ctx).await;
                continue;
            }
            let key = (found.task_id, found.attempt);
            let (canceller, signal) = executor::cancel_pair();
            {
                let mut state = self.state();
                if state.running.contains_key(&key) {
                    continue;
                }
                let running = Running {
                    canceller,
                    container: Some(found.id.clone()),
                };
                state.running.insert(key, running);
            }
            let (ctx, reports) = (Arc::clone(&self.ctx), self.reports.clone());
            self.spawn_attempt(key, executor::adopt(found, ctx, reports, signal));
        }
        executor::sweep_workspaces(&self.ctx, |key| {
            let state = self.state();
            state.running.contains_key(&key) || state.finished.contains(&key)
        })
        .await;
    }

    fn start(&self, spec: RunTask) {
        let key = (spec.task_id, spec.attempt);
        let (canceller, signal) = executor::cancel_pair();
        {
            let mut state = self.state();
            if state.running.contains_key(&key) || state.finished.contains(&key) {
                tracing::info!(task_id = %key.0, attempt = key.1, "attempt already run here; ignoring");
                return;
            }
            if state.cancelled_early.remove(&key) {
                drop(state);
                self.report_cancelled_early(key);
                return;
            }
            let running = Running {
                canceller,
                container: None,
            };
            state.running.insert(key, running);
        }
        tracing::info!(task_id = %key.0, attempt = key.1, "starting attempt");
        let (ctx, reports) = (Arc::clone(&self.ctx), self.reports.clone());
        self.spawn_attempt(key, executor::run(spec, ctx, reports, signal));
    }

    /// Runs an executor and keeps the books: the attempt counts as running
    /// until it ends, and a panic still ends it with a final report.
    fn spawn_attempt(
        &self,
        key: AttemptKey,
        executor: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (reports, me) = (self.reports.clone(), self.clone());
        tokio::spawn(async move {
            let work = tokio::spawn(executor);
            if let Err(e) = work.await {
                tracing::error!(error = %e, "executor stopped unexpectedly");
                let mut failed = StatusReport::new(key.0, key.1, ReportedState::Failed);
                failed.message = Some("internal error in the node agent; see its log".into());
                // Best effort: the agent is probably shutting down if this fails.
                let _ = reports.send(Report::Status(failed)).await;
            }
            let mut state = me.state();
            state.running.remove(&key);
            state.finished.insert(key);
        });
    }

    fn cancel(&self, key: AttemptKey, grace: Duration) {
        let mut state = self.state();
        if let Some(running) = state.running.get(&key) {
            tracing::info!(task_id = %key.0, attempt = key.1, ?grace, "cancelling attempt");
            running.canceller.cancel(grace);
        } else if state.finished.contains(&key) {
            tracing::info!(task_id = %key.0, attempt = key.1, "cancel for an attempt that already ended here; ignoring");
        } else {
            tracing::info!(task_id = %key.0, attempt = key.1, "cancel for an attempt not started here; it will not start");
            state.cancelled_early.insert(key);
        }
    }

    fn report_cancelled_early(&self, key: AttemptKey) {
        tracing::info!(task_id = %key.0, attempt = key.1, "attempt was cancelled before it started");
        let mut status = StatusReport::new(key.0, key.1, ReportedState::Cancelled);
        status.message = Some("cancelled before it started".into());
        let reports = self.reports.clone();
        tokio::spawn(async move {
            let _ = reports.send(Report::Status(status)).await;
        });
        self.state().finished.insert(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_sets_forget_the_oldest() {
        let mut set = RecentSet::new(2);
        assert!(set.insert(1));
        assert!(!set.insert(1));
        assert!(set.insert(2));
        assert!(set.insert(3));
        assert!(!set.contains(&1));
        assert!(set.contains(&2) && set.contains(&3));
        assert!(set.remove(&2));
        assert!(!set.contains(&2));
    }
}
