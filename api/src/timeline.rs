//! The audit timeline: which events a reader asked for, which of them the
//! reader may see, and the live feed that delivers new ones.
//!
//! Pages are read from the `timeline` read model (indexed for every filter,
//! newest first). New events are read from the outbox, in its global
//! order, by one [`TimelineFeed`] per process: it LISTENs on one
//! connection, reads each new batch once, summarises it once with the same
//! functions as the read model ([`projections::summary`]) and broadcasts it
//! to every subscriber of the process, each of which keeps only what its
//! filter asks for and its caller may see. A subscriber holds no database
//! connection while it waits.
//!
//! A subscriber first catches up from the outbox by itself (from where its
//! page ended, or from its `Last-Event-ID`), then takes the broadcast,
//! dropping what it already has. Nothing falls between the two: whatever
//! was broadcast before it subscribed was visible before its catch-up read.
//! One that falls behind the broadcast (a slow client) catches up from the
//! outbox again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use store::outbox::{self, Checkpoint, Filter, RecordedEvent};
use store::Wakeup;
use tokio::sync::{broadcast, watch, OnceCell};
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::parse_uuid;
use crate::schema::timeline::TimelineEntry;

/// The aggregate types of the log.
pub const AGGREGATE_TYPES: [&str; 4] = ["task", "project", "node", "user"];

/// How often the feed reads the outbox when no NOTIFY woke it.
pub const POLL: Duration = Duration::from_millis(500);

/// Events read from the outbox at a time.
pub const BATCH: i64 = 500;

/// Batches the broadcast keeps for subscribers that are behind; one that
/// falls further behind catches up from the outbox.
const BACKLOG: usize = 256;

/// Names and projects remembered before the caches are emptied.
const CACHE_LIMIT: usize = 50_000;

/// What a reader asked for. Every field narrows the timeline further.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimelineFilter {
    /// Only events of aggregates of this type.
    pub aggregate_type: Option<String>,
    /// Only the events of this aggregate (with `aggregate_type`).
    pub aggregate_id: Option<String>,
    /// Only events of this project and its tasks.
    pub project: Option<Uuid>,
    /// Only events of this node and task events placing work on it or
    /// losing it there.
    pub node: Option<Uuid>,
    /// Only events of this type.
    pub event_type: Option<String>,
    /// Only events at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only events before this time.
    pub until: Option<DateTime<Utc>>,
    /// Whether two filters contradict each other (a task and another
    /// aggregate type), so that nothing matches.
    pub contradictory: bool,
}

/// The filter parameters as they arrive, before they are checked.
#[derive(Debug, Clone, Default)]
pub struct RawFilter<'a> {
    /// `task=<id>`.
    pub task: Option<&'a str>,
    /// `node=<id>`.
    pub node: Option<&'a str>,
    /// `project=<id>`.
    pub project: Option<&'a str>,
    /// `aggregate_type=task|node|project|user`.
    pub aggregate_type: Option<&'a str>,
    /// `event_type=TaskAssigned`.
    pub event_type: Option<&'a str>,
    /// `since=<RFC 3339>`.
    pub since: Option<&'a str>,
    /// `until=<RFC 3339>`.
    pub until: Option<&'a str>,
}

impl TimelineFilter {
    /// Checks the parameters one by one.
    ///
    /// # Errors
    /// 400 naming the first bad parameter.
    pub fn parse(raw: &RawFilter<'_>) -> Result<Self, ApiError> {
        let mut filter = Self::default();
        if let Some(t) = raw.aggregate_type {
            let t = t.trim();
            if !AGGREGATE_TYPES.contains(&t) {
                return Err(ApiError::bad_request(
                    "aggregate_type",
                    format!("{t:?} is not one of {}", AGGREGATE_TYPES.join(", ")),
                ));
            }
            filter.aggregate_type = Some(t.to_string());
        }
        if let Some(task) = raw.task {
            let id = parse_uuid("task", task)?;
            // With another aggregate type, the filters together match
            // nothing, as every filter narrows the result.
            filter.contradictory = filter
                .aggregate_type
                .as_deref()
                .is_some_and(|t| t != "task");
            filter.aggregate_type = Some("task".into());
            filter.aggregate_id = Some(id.to_string());
        }
        filter.project = raw.project.map(|p| parse_uuid("project", p)).transpose()?;
        filter.node = raw.node.map(|n| parse_uuid("node", n)).transpose()?;
        if let Some(t) = raw.event_type {
            let t = t.trim();
            if t.is_empty() || t.len() > 64 || !t.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(ApiError::bad_request(
                    "event_type",
                    format!("must be an event type such as TaskAssigned, got {t:?}"),
                ));
            }
            filter.event_type = Some(t.to_string());
        }
        filter.since = raw.since.map(|s| parse_time("since", s)).transpose()?;
        filter.until = raw.until.map(|s| parse_time("until", s)).transpose()?;
        Ok(filter)
    }

    /// Whether `entry` is one the reader asked for.
    pub fn matches(&self, entry: &TimelineEntry) -> bool {
        !self.contradictory
            && self
                .aggregate_type
                .as_deref()
                .is_none_or(|t| entry.aggregate_type == t)
            && self
                .aggregate_id
                .as_deref()
                .is_none_or(|id| entry.aggregate_id == id)
            && self.project.is_none_or(|p| entry.project_id == Some(p))
            && self.node.is_none_or(|n| entry.node_id == Some(n))
            && self
                .event_type
                .as_deref()
                .is_none_or(|t| entry.event_type == t)
            && self.since.is_none_or(|t| entry.recorded_at >= t)
            && self.until.is_none_or(|t| entry.recorded_at < t)
    }

    /// The part of the filter the outbox can apply itself.
    pub fn outbox_filter(&self) -> Filter {
        Filter {
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
        }
    }
}

/// An RFC 3339 time, such as `2026-05-01T12:00:00Z`.
fn parse_time(field: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            ApiError::bad_request(
                field,
                format!("must be an RFC 3339 time such as 2026-05-01T12:00:00Z, got {value:?}"),
            )
        })
}

/// Which events of the log a caller may see, exactly as the REST API lets
/// them read events: admins everything; anybody else the events of the
/// projects they are a member of and of those projects' tasks, every
/// node's events but its host SSH ones
/// ([`crate::access::ADMIN_ONLY_EVENT_TYPES`]), and their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    /// An admin: the whole log.
    All,
    /// A member of these projects.
    Member {
        /// The user's name.
        user: String,
        /// Their projects.
        projects: HashSet<Uuid>,
    },
}

impl Visibility {
    /// What `caller` may see now, from the membership read model (as the
    /// lists of tasks and projects read it).
    ///
    /// # Errors
    /// A database error.
    pub async fn of(pool: &sqlx::PgPool, caller: &Caller) -> Result<Self, ApiError> {
        if caller.admin {
            return Ok(Self::All);
        }
        let projects = projections::read::projects::of_member(pool, &caller.user).await?;
        Ok(Self::Member {
            user: caller.user.clone(),
            projects: projects.into_iter().collect(),
        })
    }

    /// Whether the caller may see `entry`.
    pub fn allows(&self, entry: &TimelineEntry) -> bool {
        match self {
            Self::All => true,
            Self::Member { .. } if crate::access::admin_only(&entry.event_type) => false,
            Self::Member { user, projects } => match entry.aggregate_type.as_str() {
                "node" => true,
                "user" => entry.aggregate_id == *user,
                _ => entry.project_id.is_some_and(|p| projects.contains(&p)),
            },
        }
    }
}

/// An event on the timeline with its place in the global order.
#[derive(Debug, Clone)]
pub struct Item {
    /// Where it stands in the log.
    pub checkpoint: Checkpoint,
    /// The event as shown.
    pub entry: TimelineEntry,
}

/// What the timeline needs to know of other aggregates to show an event:
/// the project of each task and the name of each node. Neither ever
/// changes, so both are remembered.
#[derive(Debug, Default)]
struct Names {
    projects: HashMap<String, Option<Uuid>>,
    nodes: HashMap<Uuid, String>,
}

/// Builds timeline entries from outbox events, as the timeline read model
/// does: the same summaries, projects and nodes.
#[derive(Debug, Clone, Default)]
pub struct Builder {
    names: Arc<Mutex<Names>>,
}

impl Builder {
    /// The entries of `events`, in their order.
    ///
    /// # Errors
    /// A database error while looking up projects or node names.
    pub async fn build(
        &self,
        pool: &sqlx::PgPool,
        events: &[RecordedEvent],
    ) -> Result<Vec<Item>, sqlx::Error> {
        let (tasks, nodes) = {
            let names = self.lock();
            let tasks: BTreeSet<String> = events
                .iter()
                .filter(|e| e.aggregate_type == "task")
                .filter(|e| !names.projects.contains_key(&e.aggregate_id))
                .map(|e| e.aggregate_id.clone())
                .collect();
            let nodes: BTreeSet<String> = events
                .iter()
                .filter_map(projections::summary::node_of)
                .filter(|n| !names.nodes.contains_key(n))
                .map(|n| n.to_string())
                .collect();
            (tasks, nodes)
        };
        let task_projects: Vec<(String, Option<String>)> = if tasks.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as(
                "SELECT aggregate_id, payload -> 'Submitted' -> 'spec' ->> 'project_id' FROM events \
                 WHERE aggregate_type = 'task' AND sequence = 1 AND aggregate_id = ANY($1)",
            )
            .bind(tasks.into_iter().collect::<Vec<_>>())
            .fetch_all(pool)
            .await?
        };
        let node_names: Vec<(String, Option<String>)> = if nodes.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as(
                "SELECT aggregate_id, payload -> 'Provisioned' ->> 'name' FROM events \
                 WHERE aggregate_type = 'node' AND sequence = 1 AND aggregate_id = ANY($1)",
            )
            .bind(nodes.into_iter().collect::<Vec<_>>())
            .fetch_all(pool)
            .await?
        };
        let mut names = self.lock();
        if names.projects.len() + names.nodes.len() > CACHE_LIMIT {
            *names = Names::default();
        }
        for (task, project) in task_projects {
            let project = project.and_then(|p| p.parse().ok());
            names.projects.insert(task, project);
        }
        for (node, name) in node_names {
            if let (Ok(node), Some(name)) = (node.parse(), name) {
                names.nodes.insert(node, name);
            }
        }
        Ok(events.iter().map(|e| item(e, &names)).collect())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One event as the timeline shows it.
fn item(event: &RecordedEvent, names: &Names) -> Item {
    let node_id = projections::summary::node_of(event);
    let node_name = node_id
        .and_then(|n| names.nodes.get(&n))
        .map(String::as_str);
    let project_id = match event.aggregate_type.as_str() {
        "project" => event.aggregate_id.parse().ok(),
        "task" => names.projects.get(&event.aggregate_id).copied().flatten(),
        _ => None,
    };
    let summary = projections::summary::summarize(event, node_name)
        .unwrap_or_else(|_| format!("{} (not readable by this version)", event.event_type));
    Item {
        checkpoint: event.checkpoint(),
        entry: TimelineEntry {
            position: event.position,
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            sequence: event.sequence,
            event_type: event.event_type.clone(),
            actor: event.actor().to_string(),
            recorded_at: event.recorded_at,
            project_id,
            node_id,
            summary,
        },
    }
}

/// The live timeline of this process: one reader of the outbox whose
/// batches every subscriber shares. Cheap to clone; nothing runs until the
/// first subscriber.
#[derive(Clone)]
pub struct TimelineFeed {
    inner: Arc<FeedInner>,
}

struct FeedInner {
    pool: sqlx::PgPool,
    builder: Builder,
    sender: broadcast::Sender<Arc<Vec<Item>>>,
    started: OnceCell<()>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for TimelineFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimelineFeed").finish_non_exhaustive()
    }
}

/// A subscription to the feed: batches broadcast from now on.
pub struct Subscription {
    /// The batches.
    pub batches: broadcast::Receiver<Arc<Vec<Item>>>,
    /// Becomes true when the server shuts down.
    pub stop: watch::Receiver<bool>,
}

impl TimelineFeed {
    /// A feed on `pool`.
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self {
            inner: Arc::new(FeedInner {
                pool,
                builder: Builder::default(),
                sender: broadcast::channel(BACKLOG).0,
                started: OnceCell::new(),
                stop: watch::channel(false).0,
            }),
        }
    }

    /// The builder of entries, shared with subscribers' catch-up reads so
    /// that both remember the same names.
    pub fn builder(&self) -> &Builder {
        &self.inner.builder
    }

    /// Subscribes to every batch read from now on, starting the reader
    /// first if it does not run. A subscriber must catch up from the outbox
    /// after this returns, not before.
    ///
    /// # Errors
    /// A database error while starting the reader.
    pub async fn subscribe(&self) -> Result<Subscription, sqlx::Error> {
        self.inner
            .started
            .get_or_try_init(|| async {
                let head = outbox::head(&self.inner.pool).await?;
                tokio::spawn(run(Arc::downgrade(&self.inner), head));
                Ok::<_, sqlx::Error>(())
            })
            .await?;
        Ok(Subscription {
            batches: self.inner.sender.subscribe(),
            stop: self.inner.stop.subscribe(),
        })
    }

    /// Ends every stream at its next step; streams that start later end at
    /// once. Called when the server shuts down, so that open streams do not
    /// hold it up: clients reconnect elsewhere with their last event id.
    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
    }

    /// How many streams are subscribed in this process.
    pub fn subscribers(&self) -> usize {
        self.inner.sender.receiver_count()
    }
}

/// Reads the outbox from `head` on and broadcasts each batch, until the
/// feed is gone or stopped.
async fn run(inner: Weak<FeedInner>, head: Checkpoint) {
    let Some((pool, mut stop)) = inner
        .upgrade()
        .map(|i| (i.pool.clone(), i.stop.subscribe()))
    else {
        return;
    };
    let mut wake = Wakeup::new(pool.clone(), POLL).await;
    let mut at = head;
    loop {
        if *stop.borrow() {
            return;
        }
        let Some(feed) = inner.upgrade() else {
            return;
        };
        match read(&feed, at).await {
            Ok(Some((next, full))) => {
                at = next;
                if full {
                    continue;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the timeline feed cannot read the outbox; retrying");
                drop(feed);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        drop(feed);
        tokio::select! {
            () = wake.wait() => {}
            _ = stop.changed() => return,
        }
    }
}

/// Reads one batch after `at` and broadcasts it when anybody listens.
/// Returns where the batch ended and whether it was full.
async fn read(feed: &FeedInner, at: Checkpoint) -> Result<Option<(Checkpoint, bool)>, sqlx::Error> {
    let events = outbox::read_after(&feed.pool, at, BATCH, &Filter::default()).await?;
    let Some(last) = events.last().map(RecordedEvent::checkpoint) else {
        return Ok(None);
    };
    // Counted after the read: a subscriber that came later catches up from
    // the outbox and finds this batch there.
    if feed.sender.receiver_count() > 0 {
        let items = feed.builder.build(&feed.pool, &events).await?;
        let _ = feed.sender.send(Arc::new(items));
    }
    Ok(Some((last, events.len() as i64 == BATCH)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, id: &str, project: Option<Uuid>) -> TimelineEntry {
        TimelineEntry {
            position: 1,
            aggregate_type: kind.into(),
            aggregate_id: id.into(),
            sequence: 1,
            event_type: "TaskSubmitted".into(),
            actor: "user:alice".into(),
            recorded_at: Utc::now(),
            project_id: project,
            node_id: None,
            summary: String::new(),
        }
    }

    #[test]
    fn members_see_their_projects_every_node_and_themselves() {
        let mine = Uuid::new_v4();
        let theirs = Uuid::new_v4();
        let v = Visibility::Member {
            user: "alice".into(),
            projects: HashSet::from([mine]),
        };
        assert!(v.allows(&entry("task", "t", Some(mine))));
        assert!(v.allows(&entry("project", &mine.to_string(), Some(mine))));
        assert!(!v.allows(&entry("task", "t", Some(theirs))));
        assert!(!v.allows(&entry("task", "t", None)));
        assert!(v.allows(&entry("node", "n", None)));
        assert!(v.allows(&entry("user", "alice", None)));
        assert!(!v.allows(&entry("user", "bob", None)));
        assert!(Visibility::All.allows(&entry("user", "bob", None)));
    }

    #[test]
    fn bad_filters_name_their_parameter() {
        let cases = [
            (
                RawFilter {
                    task: Some("x"),
                    ..Default::default()
                },
                "task",
            ),
            (
                RawFilter {
                    aggregate_type: Some("file"),
                    ..Default::default()
                },
                "aggregate_type",
            ),
            (
                RawFilter {
                    event_type: Some("Task Assigned"),
                    ..Default::default()
                },
                "event_type",
            ),
            (
                RawFilter {
                    since: Some("yesterday"),
                    ..Default::default()
                },
                "since",
            ),
        ];
        for (raw, field) in cases {
            match TimelineFilter::parse(&raw) {
                Err(ApiError::BadRequest(p)) => assert_eq!(p[0].field.as_deref(), Some(field)),
                other => panic!("{raw:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn filters_that_contradict_each_other_match_nothing() {
        for raw in [
            RawFilter {
                since: Some("2026-01-02T00:00:00Z"),
                until: Some("2026-01-01T00:00:00Z"),
                ..Default::default()
            },
            RawFilter {
                task: Some("00000000-0000-0000-0000-000000000001"),
                aggregate_type: Some("node"),
                ..Default::default()
            },
        ] {
            let filter = TimelineFilter::parse(&raw).expect("filters combine");
            let mut e = entry("node", "00000000-0000-0000-0000-000000000001", None);
            e.recorded_at = "2026-01-01T12:00:00Z".parse().expect("a time");
            assert!(!filter.matches(&e), "{raw:?}");
        }
    }

    #[test]
    fn a_filter_matches_on_every_field_it_names() {
        let project = Uuid::new_v4();
        let filter = TimelineFilter::parse(&RawFilter {
            project: Some(&project.to_string()),
            event_type: Some("TaskSubmitted"),
            since: Some("2000-01-01T00:00:00Z"),
            ..Default::default()
        })
        .expect("a good filter");
        assert!(filter.matches(&entry("task", "t", Some(project))));
        assert!(!filter.matches(&entry("task", "t", Some(Uuid::new_v4()))));
        let mut other_type = entry("task", "t", Some(project));
        other_type.event_type = "TaskAssigned".into();
        assert!(!filter.matches(&other_type));
    }
}
