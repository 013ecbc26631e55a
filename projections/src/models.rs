//! The read models: tasks, nodes, projects (with members), users and the
//! timeline.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::PgConnection;
use store::outbox::RecordedEvent;
use uuid::Uuid;

use std::collections::HashMap;
use std::sync::Arc;

use crate::fill::DocFiller;
use crate::{summary, Filler, Projection, ProjectionError, SetError};
use cqrs_es::Aggregate;
use domain::node::Node;
use domain::project::Project;
use domain::task::Task;
use domain::user::UserEvent;

/// Every read model, in the order the projector advances them.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(Docs::<Tasks>::new()),
        Arc::new(Docs::<Nodes>::new()),
        Arc::new(Projects),
        Arc::new(Users),
        Arc::new(Timeline::new()),
    ]
}

pub(crate) fn undecodable(event: &RecordedEvent, reason: impl ToString) -> ProjectionError {
    ProjectionError::Undecodable {
        position: event.position,
        event_type: event.event_type.clone(),
        reason: reason.to_string(),
    }
}

pub(crate) fn decode<E: DeserializeOwned>(event: &RecordedEvent) -> Result<E, ProjectionError> {
    // Decoded from the borrowed value: no copy of the payload.
    E::deserialize(&event.payload).map_err(|e| undecodable(event, e))
}

/// One aggregate's row of a model after a batch.
struct Folded<'e, A> {
    id: Uuid,
    state: A,
    /// The first event applied: its position orders a new row.
    first: &'e RecordedEvent,
    /// The last event applied.
    last: &'e RecordedEvent,
}

impl<'e, A> Folded<'e, A> {
    fn row(&self) -> Row<'_, A> {
        Row {
            state: &self.state,
            first: self.first,
            last: self.last,
        }
    }
}

/// One aggregate's row of a [`DocModel`], to be written.
pub(crate) struct Row<'r, A> {
    /// Its state after `last`.
    pub state: &'r A,
    /// The first event applied since the row was last written: its
    /// position orders a row written for the first time.
    pub first: &'r RecordedEvent,
    /// The last event applied.
    pub last: &'r RecordedEvent,
}

/// A read model with one row per aggregate of one type, holding the
/// aggregate's state as a JSON document beside the columns lists filter
/// and sort on.
pub(crate) trait DocModel: Send + Sync + 'static {
    /// The aggregate, whose state is the document.
    type State: Aggregate + Clone;
    /// The model's name, also its checkpoint's.
    const NAME: &'static str;
    /// The model's table, the one holding its rows.
    const TABLE: &'static str;
    /// Every table the model writes, [`DocModel::TABLE`] and those it keeps
    /// beside it: a rebuild builds and swaps them all.
    const TABLES: &'static [&'static str] = &[Self::TABLE];
    /// Why `state` cannot be written as a row, if it cannot (its events
    /// began without the one that creates the aggregate).
    fn unfit(state: &Self::State) -> Option<&'static str>;
    /// About how many bytes `state` takes in memory: what a rebuild
    /// counts against the rows it may hold ([`crate::ROWS_HELD`]).
    fn weight(_state: &Self::State) -> usize {
        crate::ROW_BYTES
    }
    /// Writes `rows`: each a new row or a later state of a row written
    /// before, which it replaces.
    fn write<'a>(
        conn: &'a mut PgConnection,
        rows: &'a [Row<'a, Self::State>],
    ) -> BoxFuture<'a, Result<(), SetError>>;
    /// Writes `rows`, none of which the table holds yet: by `COPY` where
    /// the model can, else as [`DocModel::write`].
    fn write_new<'a>(
        conn: &'a mut PgConnection,
        rows: &'a [Row<'a, Self::State>],
    ) -> BoxFuture<'a, Result<(), SetError>> {
        Self::write(conn, rows)
    }
}

/// The projection of doc model `M`.
struct Docs<M>(std::marker::PhantomData<fn() -> M>);

impl<M> Docs<M> {
    fn new() -> Self {
        Docs(std::marker::PhantomData)
    }
}

impl<M: DocModel> Projection for Docs<M> {
    fn name(&self) -> &'static str {
        M::NAME
    }
    fn tables(&self) -> &'static [&'static str] {
        M::TABLES
    }
    fn apply_set<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [&'a RecordedEvent],
    ) -> Option<BoxFuture<'a, Result<(), SetError>>> {
        Some(Box::pin(apply_docs::<M>(conn, events)))
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        ev: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move { apply_docs::<M>(conn, &[ev]).await.map_err(|e| e.error) })
    }
    fn filler(&self, rows_held: usize) -> Option<Box<dyn Filler>> {
        Some(Box::new(DocFiller::<M>::new(rows_held)))
    }
}

/// Applies `events` to doc model `M` on `conn`: the batch's rows read,
/// folded and written back, one statement each.
async fn apply_docs<M: DocModel>(
    conn: &mut PgConnection,
    events: &[&RecordedEvent],
) -> Result<(), SetError> {
    let folded = fold_docs::<M::State>(conn, M::TABLE, events).await?;
    if folded.is_empty() {
        return Ok(());
    }
    let rows: Vec<Row<'_, M::State>> = folded.iter().map(Folded::row).collect();
    M::write(conn, &rows).await
}

/// For a batch: loads the rows of `table` of every aggregate of type `A`
/// the batch names, in one statement (no row locks: the model's
/// checkpoint, locked by the caller, keeps every other writer out), applies each newer event in order,
/// and returns the rows that changed, in the order of their first event.
async fn fold_docs<'e, A>(
    conn: &mut PgConnection,
    table: &str,
    events: &[&'e RecordedEvent],
) -> Result<Vec<Folded<'e, A>>, SetError>
where
    A: Aggregate,
{
    let mut ids = Vec::new();
    let mut mine = Vec::new();
    for &ev in events.iter().filter(|e| e.aggregate_type == A::TYPE) {
        let id: Uuid = ev
            .aggregate_id
            .parse()
            .map_err(|e| SetError::at(ev, undecodable(ev, e)))?;
        ids.push(id);
        mine.push((id, ev));
    }
    if mine.is_empty() {
        return Ok(Vec::new());
    }
    ids.sort_unstable();
    ids.dedup();
    // The documents as text, decoded straight into the aggregate: no JSON
    // tree built and dropped per row.
    let rows: Vec<(Uuid, i64, String)> = sqlx::query_as(&format!(
        "SELECT id, last_sequence, doc::text FROM {table} WHERE id = ANY($1)"
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut stored: HashMap<Uuid, (i64, String)> = rows
        .into_iter()
        .map(|(id, last, doc)| (id, (last, doc)))
        .collect();
    // Per aggregate: its state and last sequence, and its index in `out`
    // once changed.
    let mut states: HashMap<Uuid, (A, i64, Option<usize>)> = HashMap::new();
    let mut out: Vec<Folded<'e, A>> = Vec::new();
    for (id, ev) in mine {
        let entry = match states.entry(id) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let (state, last) = match stored.remove(&id) {
                    Some((last, doc)) => (
                        serde_json::from_str(&doc)
                            .map_err(|e| SetError::at(ev, undecodable(ev, e)))?,
                        last,
                    ),
                    None => (A::default(), 0),
                };
                v.insert((state, last, None))
            }
        };
        if ev.sequence <= entry.1 {
            continue;
        }
        entry.0.apply(decode(ev).map_err(|e| SetError::at(ev, e))?);
        entry.1 = ev.sequence;
        match entry.2 {
            Some(i) => out[i].last = ev,
            None => {
                entry.2 = Some(out.len());
                out.push(Folded {
                    id,
                    state: A::default(),
                    first: ev,
                    last: ev,
                });
            }
        }
    }
    for (id, (state, _, index)) in states {
        if let Some(i) = index {
            debug_assert_eq!(out[i].id, id);
            out[i].state = state;
        }
    }
    Ok(out)
}

/// A row's document, as the text of its JSON (written as `$n::jsonb`).
fn doc<T: Serialize>(v: &T, event: &RecordedEvent) -> Result<String, ProjectionError> {
    serde_json::to_string(v).map_err(|e| undecodable(event, e))
}

fn at_or(t: Option<DateTime<Utc>>, event: &RecordedEvent) -> DateTime<Utc> {
    t.unwrap_or(event.recorded_at)
}

/// Tasks with their state, for lists and the scheduler's queue.
pub(crate) struct Tasks;

/// Why a task's state cannot be a row.
const TASK_UNFIT: &str = "task event before TaskSubmitted";

impl DocModel for Tasks {
    type State = Task;
    const NAME: &'static str = crate::read::tasks::CHECKPOINT;
    const TABLE: &'static str = "task_view";
    const TABLES: &'static [&'static str] = &["task_view", "task_counts"];
    fn unfit(task: &Task) -> Option<&'static str> {
        (task.id.is_none() || task.spec.is_none()).then_some(TASK_UNFIT)
    }
    fn weight(task: &Task) -> usize {
        // What may be large, counted; the rest a fixed share. A spec is
        // bounded only by the request's size, a megabyte by default.
        let map = |m: &std::collections::BTreeMap<String, String>| -> usize {
            m.iter().map(|(k, v)| k.len() + v.len() + 64).sum()
        };
        let spec = task.spec.as_ref().map_or(0, |s| {
            s.command.iter().map(|a| a.len() + 32).sum::<usize>()
                + map(&s.env)
                + map(&s.labels)
                + (s.inputs.len() + s.outputs.len() + s.env_secrets.len()) * 256
        });
        let text = |t: &Option<String>| t.as_ref().map_or(0, String::len);
        2048 + spec
            + text(&task.reason)
            + text(&task.stage_detail)
            + (task.attempts.len() + task.artifacts.len() + task.refused_reports.len()) * 512
    }
    fn write<'a>(
        conn: &'a mut PgConnection,
        rows: &'a [Row<'a, Task>],
    ) -> BoxFuture<'a, Result<(), SetError>> {
        Box::pin(Self::write_all(conn, rows))
    }
    fn write_new<'a>(
        conn: &'a mut PgConnection,
        rows: &'a [Row<'a, Task>],
    ) -> BoxFuture<'a, Result<(), SetError>> {
        Box::pin(Self::copy_all(conn, rows))
    }
}

/// Adds `delta` (`project_id`, `state`, `n`: a change of the number of
/// tasks, never zero) to `task_counts`, leaving no row at zero. Every part
/// sees the table as it was before the statement, and only one writer
/// writes a model's tables at a time (the projector holding the model's
/// checkpoint, or a rebuild on its own tables), so the three parts touch
/// separate rows: those kept, those going to zero and those new.
const COUNT_DELTA: &str = ", kept AS (UPDATE task_counts c SET tasks = c.tasks + d.n FROM delta d \
       WHERE c.project_id = d.project_id AND c.state = d.state AND c.tasks + d.n <> 0), \
     gone AS (DELETE FROM task_counts c USING delta d \
       WHERE c.project_id = d.project_id AND c.state = d.state AND c.tasks + d.n = 0) \
     INSERT INTO task_counts (project_id, state, tasks) \
     SELECT d.project_id, d.state, d.n FROM delta d WHERE NOT EXISTS \
       (SELECT 1 FROM task_counts c WHERE c.project_id = d.project_id AND c.state = d.state)";

/// Counts the tasks of `task_view` again and puts the counts right in
/// `task_counts` where they differ, with the tasks model's checkpoint
/// locked so that no projector writes either meanwhile. Returns how many
/// (project, state) counts were wrong: none unless something wrote
/// `task_view` without its counts, such as a server of an earlier version
/// still projecting while the migration that added them ran.
///
/// # Errors
/// A database error.
pub(crate) async fn recount_tasks(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    store::outbox::load_checkpoint(&mut tx, Tasks::NAME, true).await?;
    let wrong: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT project_id, state, count(*) AS tasks FROM task_view \
           GROUP BY project_id, state) a \
         FULL JOIN task_counts c ON c.project_id = a.project_id AND c.state = a.state \
         WHERE a.tasks IS DISTINCT FROM c.tasks",
    )
    .fetch_one(&mut *tx)
    .await?;
    if wrong > 0 {
        sqlx::query("DELETE FROM task_counts")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO task_counts (project_id, state, tasks) \
             SELECT project_id, state, count(*) FROM task_view GROUP BY project_id, state",
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(wrong)
}

/// A task's row of `task_view`, column by column.
struct TaskColumns<'r> {
    id: Uuid,
    project_id: Uuid,
    state: &'r str,
    priority: i32,
    node_id: Option<Uuid>,
    attempt: i32,
    submitted_by: String,
    submitted_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    list_position: i64,
    last_sequence: i64,
    doc: String,
}

impl<'r> TaskColumns<'r> {
    fn of(row: &Row<'r, Task>) -> Result<Self, SetError> {
        let Row {
            state: task,
            first,
            last,
        } = *row;
        let (Some(id), Some(spec)) = (task.id, task.spec.as_ref()) else {
            return Err(SetError::at(first, undecodable(first, TASK_UNFIT)));
        };
        Ok(TaskColumns {
            id,
            project_id: spec.project_id,
            state: task.state.as_str(),
            priority: spec.priority,
            node_id: task.node_id,
            attempt: task.attempt as i32,
            submitted_by: task
                .submitted_by
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            submitted_at: at_or(task.submitted_at, last),
            updated_at: at_or(task.updated_at, last),
            list_position: first.position,
            last_sequence: last.sequence,
            doc: doc(task, last).map_err(|e| SetError::at(last, e))?,
        })
    }
}

impl Tasks {
    /// New rows, by `COPY`: none of them is in the table.
    async fn copy_all(conn: &mut PgConnection, rows: &[Row<'_, Task>]) -> Result<(), SetError> {
        let mut line = CopyLine(String::with_capacity(rows.len() * 2048));
        let mut projects = Vec::with_capacity(rows.len());
        let mut states = Vec::with_capacity(rows.len());
        for row in rows {
            let t = TaskColumns::of(row)?;
            projects.push(t.project_id);
            states.push(t.state);
            line.value(t.id);
            line.value(t.project_id);
            line.text(t.state);
            line.value(t.priority);
            line.maybe(t.node_id);
            line.value(t.attempt);
            line.text(&t.submitted_by);
            line.time(t.submitted_at);
            line.time(t.updated_at);
            line.value(t.list_position);
            line.value(t.last_sequence);
            line.text(&t.doc);
            line.end();
        }
        line.send(
            conn,
            "COPY task_view (id, project_id, state, priority, node_id, attempt, submitted_by, \
               submitted_at, updated_at, list_position, last_sequence, doc) FROM STDIN",
        )
        .await?;
        // The rows are new: each adds one to its project's and state's count.
        sqlx::query(&format!(
            "WITH delta AS (SELECT project_id, state, count(*) AS n FROM unnest($1::uuid[], $2::text[]) \
               AS r(project_id, state) GROUP BY project_id, state) {COUNT_DELTA}"
        ))
        .bind(&projects)
        .bind(&states)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn write_all(conn: &mut PgConnection, rows: &[Row<'_, Task>]) -> Result<(), SetError> {
        let n = rows.len();
        let (mut ids, mut projects, mut states, mut priorities) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut nodes, mut attempts, mut by, mut submitted) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut updated, mut positions, mut sequences, mut docs) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for row in rows {
            let t = TaskColumns::of(row)?;
            ids.push(t.id);
            projects.push(t.project_id);
            states.push(t.state);
            priorities.push(t.priority);
            nodes.push(t.node_id);
            attempts.push(t.attempt);
            by.push(t.submitted_by);
            submitted.push(t.submitted_at);
            updated.push(t.updated_at);
            positions.push(t.list_position);
            sequences.push(t.last_sequence);
            docs.push(t.doc);
        }
        // Every part of the statement sees the table as it was before it:
        // `before` holds the rows' old states, which the counts lose, and
        // `after` their new ones, which they gain.
        sqlx::query(&format!(
            "WITH before AS (SELECT project_id, state FROM task_view WHERE id = ANY($1)), \
             after AS (INSERT INTO task_view (id, project_id, state, priority, node_id, attempt, submitted_by, \
               submitted_at, updated_at, list_position, last_sequence, doc) \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::uuid[], $6::int[], \
               $7::text[], $8::timestamptz[], $9::timestamptz[], $10::bigint[], $11::bigint[], $12::text[]::jsonb[]) \
             ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, node_id = EXCLUDED.node_id, \
               attempt = EXCLUDED.attempt, updated_at = EXCLUDED.updated_at, \
               last_sequence = EXCLUDED.last_sequence, doc = EXCLUDED.doc \
             RETURNING project_id, state), \
             delta AS (SELECT project_id, state, sum(n) AS n FROM \
               (SELECT project_id, state, 1 AS n FROM after \
                UNION ALL SELECT project_id, state, -1 FROM before) c \
               GROUP BY project_id, state HAVING sum(n) <> 0) \
             {COUNT_DELTA}"
        ))
        .bind(&ids)
        .bind(&projects)
        .bind(&states)
        .bind(&priorities)
        .bind(&nodes)
        .bind(&attempts)
        .bind(&by)
        .bind(&submitted)
        .bind(&updated)
        .bind(&positions)
        .bind(&sequences)
        .bind(&docs)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// Nodes with their status.
struct Nodes;

/// Why a node's state cannot be a row.
const NODE_UNFIT: &str = "node event before NodeProvisioned";

impl DocModel for Nodes {
    type State = Node;
    const NAME: &'static str = crate::read::nodes::CHECKPOINT;
    const TABLE: &'static str = "node_view";
    fn unfit(node: &Node) -> Option<&'static str> {
        node.id.is_none().then_some(NODE_UNFIT)
    }
    fn write<'a>(
        conn: &'a mut PgConnection,
        rows: &'a [Row<'a, Node>],
    ) -> BoxFuture<'a, Result<(), SetError>> {
        Box::pin(Self::write_all(conn, rows))
    }
}

impl Nodes {
    async fn write_all(conn: &mut PgConnection, rows: &[Row<'_, Node>]) -> Result<(), SetError> {
        let n = rows.len();
        let (mut ids, mut names, mut statuses, mut drained) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut provisioned, mut updated, mut sequences, mut docs) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for row in rows {
            let Row {
                state: node,
                first,
                last,
                ..
            } = row;
            let Some(id) = node.id else {
                return Err(SetError::at(first, undecodable(first, NODE_UNFIT)));
            };
            ids.push(id);
            names.push(node.name.clone());
            statuses.push(node.status.as_str());
            drained.push(node.drained);
            provisioned.push(at_or(node.provisioned_at, last));
            updated.push(at_or(node.updated_at, last));
            sequences.push(last.sequence);
            docs.push(doc(node, last).map_err(|e| SetError::at(last, e))?);
        }
        sqlx::query(
            "INSERT INTO node_view (id, name, status, drained, provisioned_at, updated_at, last_sequence, doc) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bool[], $5::timestamptz[], \
               $6::timestamptz[], $7::bigint[], $8::text[]::jsonb[]) \
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, status = EXCLUDED.status, \
               drained = EXCLUDED.drained, updated_at = EXCLUDED.updated_at, \
               last_sequence = EXCLUDED.last_sequence, doc = EXCLUDED.doc",
        )
        .bind(&ids)
        .bind(&names)
        .bind(&statuses)
        .bind(&drained)
        .bind(&provisioned)
        .bind(&updated)
        .bind(&sequences)
        .bind(&docs)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// Projects and their members.
struct Projects;

impl Projection for Projects {
    fn name(&self) -> &'static str {
        crate::read::projects::CHECKPOINT
    }
    fn tables(&self) -> &'static [&'static str] {
        &["project_member_view", "project_view"]
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        ev: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            let folded = fold_docs::<Project>(conn, "project_view", &[ev])
                .await
                .map_err(|e| e.error)?;
            let Some(Folded { state: project, .. }) = folded.into_iter().next() else {
                return Ok(());
            };
            let Some(id) = project.id else {
                return Err(undecodable(ev, "project event before ProjectCreated"));
            };
            sqlx::query(
                "INSERT INTO project_view (id, name, archived, created_at, updated_at, last_sequence, doc) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) \
                 ON CONFLICT (id) DO UPDATE SET name = $2, archived = $3, updated_at = $5, \
                   last_sequence = $6, doc = $7::jsonb",
            )
            .bind(id)
            .bind(&project.name)
            .bind(project.archived)
            .bind(at_or(project.created_at, ev))
            .bind(at_or(project.updated_at, ev))
            .bind(ev.sequence)
            .bind(doc(&project, ev)?)
            .execute(&mut *conn)
            .await?;
            sqlx::query("DELETE FROM project_member_view WHERE project_id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            let (users, roles): (Vec<String>, Vec<String>) = project
                .members
                .iter()
                .map(|(u, r)| (u.clone(), r.as_str().to_string()))
                .unzip();
            sqlx::query(
                "INSERT INTO project_member_view (project_id, user_name, role) \
                 SELECT $1, * FROM unnest($2::text[], $3::text[])",
            )
            .bind(id)
            .bind(users)
            .bind(roles)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
    }
}

/// Users, without anything secret.
struct Users;

impl Projection for Users {
    fn name(&self) -> &'static str {
        crate::read::users::CHECKPOINT
    }
    fn tables(&self) -> &'static [&'static str] {
        &["user_view"]
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        ev: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            if ev.aggregate_type != "user" {
                return Ok(());
            }
            let last: Option<i64> = sqlx::query_scalar(
                "SELECT last_sequence FROM user_view WHERE name = $1 FOR UPDATE",
            )
            .bind(&ev.aggregate_id)
            .fetch_optional(&mut *conn)
            .await?;
            if last.is_some_and(|l| ev.sequence <= l) {
                return Ok(());
            }
            let delta = match decode::<UserEvent>(ev)? {
                UserEvent::Created {
                    name, admin, at, ..
                } => {
                    sqlx::query(
                        "INSERT INTO user_view (name, admin, created_at, tokens, last_sequence) \
                         VALUES ($1, $2, $3, 0, $4) ON CONFLICT (name) DO NOTHING",
                    )
                    .bind(name.as_str())
                    .bind(admin)
                    .bind(at)
                    .bind(ev.sequence)
                    .execute(&mut *conn)
                    .await?;
                    return Ok(());
                }
                UserEvent::TokenIssued { .. } => 1,
                UserEvent::TokenRevoked { .. } => -1,
            };
            sqlx::query(
                "UPDATE user_view SET tokens = tokens + $2, last_sequence = $3 WHERE name = $1",
            )
            .bind(&ev.aggregate_id)
            .bind(delta)
            .bind(ev.sequence)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
    }
}

/// Every event with its actor and a one-line summary.
struct Timeline {
    /// What the rows take from an aggregate's first event (a task's
    /// project, a node's name), remembered: a first event never changes,
    /// and reading it again for every later event would cost a query and
    /// the decoding of a whole task spec each time.
    firsts: std::sync::Mutex<hashlink::LruCache<(Kind, Uuid), First>>,
}

/// How many aggregates' first facts the timeline remembers.
const FIRSTS_KEPT: usize = 65_536;

/// The aggregates whose first event the timeline reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Task,
    Node,
}

/// What a first event tells the timeline.
#[derive(Debug, Clone)]
enum First {
    /// A task's project; none when its first event names none, which
    /// makes its events unappliable.
    Project(Option<Uuid>),
    /// A node's name, if its first event gives one.
    Name(Option<String>),
}

/// The project a task's first event names, as the timeline keeps it.
fn task_project(first: &serde_json::Value) -> Option<Uuid> {
    first
        .pointer("/Submitted/spec/project_id")
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse().ok())
}

/// The name a node's first event gives it.
fn node_name(first: &serde_json::Value) -> Option<String> {
    first
        .pointer("/Provisioned/name")
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

/// Keeps what the first event of aggregate `id` says. Only what it does
/// say: one that says nothing may be an undecodable event an operator
/// mends, and is read again until then.
fn remember(kept: &mut hashlink::LruCache<(Kind, Uuid), First>, id: Uuid, fact: &(Kind, First)) {
    if matches!(fact.1, First::Project(Some(_)) | First::Name(Some(_))) {
        kept.insert((fact.0, id), fact.1.clone());
    }
}

/// The timeline's columns, in the order its writes give them.
macro_rules! timeline_columns {
    () => {
        "position, txid, aggregate_type, aggregate_id, sequence, event_type, \
         actor, recorded_at, project_id, summary, node_id"
    };
}

impl Timeline {
    fn new() -> Self {
        let kept = hashlink::LruCache::new(FIRSTS_KEPT);
        Timeline {
            firsts: std::sync::Mutex::new(kept),
        }
    }

    /// The first facts of the tasks and nodes `events` refer to: from
    /// memory, the rest in one query. A task whose first event is not in
    /// the log is absent.
    async fn firsts(
        &self,
        conn: &mut PgConnection,
        events: &[&RecordedEvent],
        node_ids: &[Option<Uuid>],
    ) -> Result<HashMap<(Kind, Uuid), First>, sqlx::Error> {
        let mut wanted: Vec<(Kind, Uuid)> = events
            .iter()
            .filter(|e| e.aggregate_type == "task")
            .filter_map(|e| e.aggregate_id.parse().ok().map(|id| (Kind::Task, id)))
            .chain(node_ids.iter().flatten().map(|&id| (Kind::Node, id)))
            .collect();
        wanted.sort_unstable_by_key(|&(k, id)| (k as u8, id));
        wanted.dedup();
        let mut known = HashMap::with_capacity(wanted.len());
        let (mut tasks, mut nodes) = (Vec::new(), Vec::new());
        {
            let mut kept = self.firsts.lock().unwrap_or_else(|e| e.into_inner());
            // A first event in the batch is the one the query below would
            // read: a rebuild, and a burst of new tasks, find theirs here.
            for ev in events.iter().filter(|e| e.sequence == 1) {
                let Ok(id) = ev.aggregate_id.parse::<Uuid>() else {
                    continue;
                };
                let fact = match ev.aggregate_type.as_str() {
                    "task" => (Kind::Task, First::Project(task_project(&ev.payload))),
                    "node" => (Kind::Node, First::Name(node_name(&ev.payload))),
                    _ => continue,
                };
                remember(&mut kept, id, &fact);
            }
            for key in wanted {
                match kept.get(&key) {
                    Some(first) => {
                        known.insert(key, first.clone());
                    }
                    None if key.0 == Kind::Task => tasks.push(key.1.to_string()),
                    None => nodes.push(key.1.to_string()),
                }
            }
        }
        if tasks.is_empty() && nodes.is_empty() {
            return Ok(known);
        }
        let read: Vec<(String, String, serde_json::Value)> = sqlx::query_as(
            "SELECT aggregate_type, aggregate_id, payload FROM events WHERE sequence = 1 AND \
               ((aggregate_type = 'task' AND aggregate_id = ANY($1)) \
                OR (aggregate_type = 'node' AND aggregate_id = ANY($2)))",
        )
        .bind(&tasks)
        .bind(&nodes)
        .fetch_all(&mut *conn)
        .await?;
        let mut kept = self.firsts.lock().unwrap_or_else(|e| e.into_inner());
        for (kind, id, payload) in read {
            let Ok(id) = id.parse::<Uuid>() else { continue };
            let fact = match kind.as_str() {
                "task" => (Kind::Task, First::Project(task_project(&payload))),
                _ => (Kind::Node, First::Name(node_name(&payload))),
            };
            remember(&mut kept, id, &fact);
            known.insert((fact.0, id), fact.1);
        }
        Ok(known)
    }

    /// The timeline's rows of `events`, one per event, in their order.
    async fn rows<'e>(
        &self,
        conn: &mut PgConnection,
        events: &[&'e RecordedEvent],
    ) -> Result<Vec<Line<'e>>, SetError> {
        let node_ids: Vec<Option<Uuid>> = events.iter().map(|e| summary::node_of(e)).collect();
        let firsts = self.firsts(conn, events, &node_ids).await?;
        let mut rows = Vec::with_capacity(events.len());
        for (&ev, node_id) in events.iter().zip(node_ids) {
            let project_id: Option<Uuid> = match ev.aggregate_type.as_str() {
                "project" => ev.aggregate_id.parse().ok(),
                "task" => {
                    let id = ev.aggregate_id.parse().ok();
                    match id.and_then(|id| firsts.get(&(Kind::Task, id))) {
                        Some(First::Project(Some(project))) => Some(*project),
                        Some(_) => {
                            return Err(SetError::at(
                                ev,
                                undecodable(ev, "the task's first event names no project"),
                            ))
                        }
                        None => None,
                    }
                }
                _ => None,
            };
            let name = node_id.and_then(|n| match firsts.get(&(Kind::Node, n)) {
                Some(First::Name(name)) => name.clone(),
                _ => None,
            });
            let summary = summary::summarize(ev, name.as_deref())
                .map_err(|e| SetError::at(ev, undecodable(ev, e)))?;
            rows.push(Line {
                event: ev,
                project_id,
                summary,
                node_id,
            });
        }
        Ok(rows)
    }

    async fn apply_all(
        &self,
        conn: &mut PgConnection,
        events: &[&RecordedEvent],
    ) -> Result<(), SetError> {
        let rows = self.rows(conn, events).await?;
        let n = rows.len();
        let mut cols = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut more = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for row in &rows {
            let ev = row.event;
            cols.0.push(ev.position);
            cols.1.push(ev.txid);
            cols.2.push(ev.aggregate_type.as_str());
            cols.3.push(ev.aggregate_id.as_str());
            cols.4.push(ev.sequence);
            cols.5.push(ev.event_type.as_str());
            more.0.push(ev.actor());
            more.1.push(ev.recorded_at);
            more.2.push(row.project_id);
            more.3.push(row.summary.as_str());
            more.4.push(row.node_id);
        }
        sqlx::query(
            concat!("INSERT INTO timeline (", timeline_columns!(), ") \
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], \
               $6::text[], $7::text[], $8::timestamptz[], $9::uuid[], $10::text[], $11::uuid[]) \
             ON CONFLICT (position) DO NOTHING"),
        )
        .bind(&cols.0)
        .bind(&cols.1)
        .bind(&cols.2)
        .bind(&cols.3)
        .bind(&cols.4)
        .bind(&cols.5)
        .bind(&more.0)
        .bind(&more.1)
        .bind(&more.2)
        .bind(&more.3)
        .bind(&more.4)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Writes the rows of `events` by `COPY`: for a rebuild's new table,
    /// which holds none of them yet.
    async fn copy_all(
        &self,
        conn: &mut PgConnection,
        events: &[&RecordedEvent],
    ) -> Result<(), SetError> {
        let rows = self.rows(conn, events).await?;
        let mut text = String::with_capacity(rows.len() * 256);
        for row in &rows {
            row.copy_text(&mut text);
        }
        CopyLine(text)
            .send(
                conn,
                concat!("COPY timeline (", timeline_columns!(), ") FROM STDIN"),
            )
            .await
    }
}

/// One event's row of the timeline.
struct Line<'e> {
    event: &'e RecordedEvent,
    project_id: Option<Uuid>,
    summary: String,
    node_id: Option<Uuid>,
}

impl Line<'_> {
    /// Appends the row as a line of `COPY`'s text format.
    fn copy_text(&self, out: &mut String) {
        use std::fmt::Write;
        let ev = self.event;
        // Writing to a String cannot fail.
        let _ = write!(out, "{}\t{}\t", ev.position, ev.txid);
        copy_field(out, &ev.aggregate_type);
        copy_field(out, &ev.aggregate_id);
        let _ = write!(out, "{}\t", ev.sequence);
        copy_field(out, &ev.event_type);
        copy_field(out, ev.actor());
        let _ = write!(
            out,
            "{}\t",
            as_bound(ev.recorded_at).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        );
        match self.project_id {
            Some(id) => {
                let _ = write!(out, "{id}\t");
            }
            None => out.push_str("\\N\t"),
        }
        copy_field(out, &self.summary);
        match self.node_id {
            Some(id) => {
                let _ = writeln!(out, "{id}");
            }
            None => out.push_str("\\N\n"),
        }
    }
}

/// `t` as the database stores it when it is bound as a parameter (as
/// [`Timeline::apply_all`] binds it): whole microseconds since
/// 2000-01-01, the rest dropped toward that date. Written as text, the
/// database would round the nanoseconds instead, and a rebuild's row
/// would differ from the projector's by a microsecond.
fn as_bound(t: DateTime<Utc>) -> DateTime<Utc> {
    let Some(epoch) = DateTime::from_timestamp(946_684_800, 0) else {
        return t;
    };
    match (t - epoch).num_microseconds() {
        Some(us) => epoch + chrono::Duration::microseconds(us),
        None => t,
    }
}

/// Rows in `COPY`'s text format, built field by field.
struct CopyLine(String);

impl CopyLine {
    /// A field of text.
    fn text(&mut self, value: &str) {
        copy_field(&mut self.0, value);
    }

    /// A field that is written as it displays.
    fn value(&mut self, value: impl std::fmt::Display) {
        use std::fmt::Write;
        // Writing to a String cannot fail.
        let _ = write!(self.0, "{value}\t");
    }

    /// A field that may be NULL.
    fn maybe(&mut self, value: Option<impl std::fmt::Display>) {
        match value {
            Some(v) => self.value(v),
            None => self.0.push_str("\\N\t"),
        }
    }

    /// A time, as binding it would store it ([`as_bound`]).
    fn time(&mut self, t: DateTime<Utc>) {
        self.value(as_bound(t).to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    }

    /// Ends the row.
    fn end(&mut self) {
        if self.0.ends_with('\t') {
            self.0.pop();
        }
        self.0.push('\n');
    }

    /// Sends the rows by `statement`, a `COPY … FROM STDIN`.
    async fn send(self, conn: &mut PgConnection, statement: &str) -> Result<(), SetError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut copy = conn.copy_in_raw(statement).await?;
        if let Err(e) = copy.send(self.0.as_bytes()).await {
            let _ = copy.abort("the rows could not be sent").await;
            return Err(e.into());
        }
        copy.finish().await?;
        Ok(())
    }
}

/// Appends `value` as a field of `COPY`'s text format and a tab: the
/// backslash and the characters that separate fields and rows escaped.
fn copy_field(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\t');
}

impl Projection for Timeline {
    fn name(&self) -> &'static str {
        crate::read::timeline::CHECKPOINT
    }
    /// Each event is a row of its own.
    fn per_aggregate(&self) -> bool {
        false
    }
    fn tables(&self) -> &'static [&'static str] {
        &["timeline"]
    }
    fn apply_set<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [&'a RecordedEvent],
    ) -> Option<BoxFuture<'a, Result<(), SetError>>> {
        Some(Box::pin(self.apply_all(conn, events)))
    }
    fn fill_set<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [&'a RecordedEvent],
    ) -> Option<BoxFuture<'a, Result<(), SetError>>> {
        Some(Box::pin(self.copy_all(conn, events)))
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        ev: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move { self.apply_all(conn, &[ev]).await.map_err(|e| e.error) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(t)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    #[test]
    fn a_time_is_written_as_binding_it_would_store_it() {
        // Whole microseconds, the rest dropped toward 2000-01-01: down
        // after it, up before it; what has no rest stays.
        for (given, stored) in [
            (
                "2026-01-02T03:04:05.520177696Z",
                "2026-01-02T03:04:05.520177Z",
            ),
            (
                "1999-12-31T23:59:59.123456789Z",
                "1999-12-31T23:59:59.123457Z",
            ),
            ("2026-01-02T03:04:05.5Z", "2026-01-02T03:04:05.500000Z"),
        ] {
            assert_eq!(
                as_bound(at(given)).to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                stored
            );
        }
    }
}
