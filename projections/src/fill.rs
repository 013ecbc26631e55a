//! Filling a doc model's new table in a rebuild from rows held in memory
//! (see [`Filler`]).
//!
//! Applied batch by batch as the live projector applies them
//! ([`crate::models`]'s `apply_docs`), a rebuild reads back from the new
//! table, decodes, encodes and writes again the row of every aggregate
//! whose events straddle two batches (most of a busy log's tasks), and
//! every later state of a node, in every batch that names it. Here the
//! rows stay in memory (the most recently changed, bounded in number and
//! in bytes); each is written when it is let go of, to make room or at
//! the end, and read back only if a later event names it again.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use cqrs_es::Aggregate;
use futures::future::BoxFuture;
use hashlink::LinkedHashMap;
use sqlx::PgConnection;
use store::outbox::RecordedEvent;
use uuid::Uuid;

use crate::models::{decode, undecodable, DocModel, Row};
use crate::{Filler, SetError};

/// The most rows written in one transaction: every outbox consumer
/// waits for the oldest transaction open, so each stays short.
const WRITE_ROWS: usize = 500;

/// An aggregate's row held in memory.
struct Held<A> {
    state: A,
    /// The sequence of the last event applied.
    sequence: i64,
    /// The first event applied since the row was last read or written
    /// (without its payload): it orders a row written for the first time.
    first: RecordedEvent,
    /// The last event applied, without its payload.
    last: RecordedEvent,
    /// About how many bytes `state` takes ([`DocModel::weight`]).
    weight: usize,
}

impl<A> Held<A> {
    fn row(&self) -> Row<'_, A> {
        Row {
            state: &self.state,
            first: &self.first,
            last: &self.last,
        }
    }
}

/// What the last fill or finish changed, kept once its transaction
/// commits.
struct Staged<A> {
    /// The rows the batch changed, in their new state, in the order of
    /// their first event in it.
    changed: Vec<(Uuid, Held<A>)>,
    /// The rows written and let go of.
    let_go: Vec<Uuid>,
}

/// The [`Filler`] of doc model `M`.
pub(crate) struct DocFiller<M: DocModel> {
    /// The rows held, the least recently changed first.
    held: LinkedHashMap<Uuid, Held<M::State>>,
    /// The most rows held, and the most bytes they may take; beyond
    /// either, the least recently changed rows are written and let go of
    /// until a quarter of each is free.
    most: usize,
    budget: usize,
    /// What the rows held take, by [`DocModel::weight`].
    bytes: usize,
    /// The aggregates whose rows were written and let go of: the table
    /// holds them.
    written: HashSet<Uuid>,
    staged: Option<Staged<M::State>>,
}

impl<M: DocModel> DocFiller<M> {
    /// A filler holding at most `most` rows (at least one) of
    /// [`crate::ROW_BYTES`] each on average.
    pub(crate) fn new(most: usize) -> Self {
        let most = most.max(1);
        DocFiller {
            held: LinkedHashMap::new(),
            most,
            budget: most.saturating_mul(crate::ROW_BYTES),
            bytes: 0,
            written: HashSet::new(),
            staged: None,
        }
    }

    async fn fill_batch(
        &mut self,
        conn: &mut PgConnection,
        events: &[&RecordedEvent],
    ) -> Result<(), SetError> {
        self.staged = None;
        let mut mine = Vec::new();
        for &ev in events
            .iter()
            .filter(|e| e.aggregate_type == <M::State as Aggregate>::TYPE)
        {
            let id: Uuid = ev
                .aggregate_id
                .parse()
                .map_err(|e| SetError::at(ev, undecodable(ev, e)))?;
            mine.push((id, ev));
        }
        // Rows let go of earlier that the batch names again: read back.
        let mut back: Vec<Uuid> = mine
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !self.held.contains_key(id) && self.written.contains(id))
            .collect();
        back.sort_unstable();
        back.dedup();
        let mut stored: HashMap<Uuid, (i64, String)> = if back.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as::<_, (Uuid, i64, String)>(&format!(
                "SELECT id, last_sequence, doc::text FROM {} WHERE id = ANY($1)",
                M::TABLE
            ))
            .bind(&back)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|(id, sequence, doc)| (id, (sequence, doc)))
            .collect()
        };

        // Each aggregate's state is folded on a copy, so that what is held
        // stays as it was should the transaction be rolled back.
        let mut folds: HashMap<Uuid, Fold<'_, M::State>> = HashMap::new();
        for (id, ev) in mine {
            let fold = match folds.entry(id) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => {
                    let fold = match self.held.get(&id) {
                        Some(h) => Fold::new(h.state.clone(), h.sequence, Some(h.first.clone())),
                        None => match stored.remove(&id) {
                            Some((sequence, doc)) => Fold::new(
                                serde_json::from_str(&doc)
                                    .map_err(|e| SetError::at(ev, undecodable(ev, e)))?,
                                sequence,
                                None,
                            ),
                            None => Fold::new(M::State::default(), 0, None),
                        },
                    };
                    v.insert(fold)
                }
            };
            if ev.sequence <= fold.sequence {
                continue;
            }
            fold.state
                .apply(decode(ev).map_err(|e| SetError::at(ev, e))?);
            fold.sequence = ev.sequence;
            fold.batch_first.get_or_insert(ev);
            fold.last = Some(ev);
        }
        let mut changed: Vec<(&RecordedEvent, Uuid, Fold<'_, M::State>)> = folds
            .into_iter()
            .filter_map(|(id, fold)| Some((fold.batch_first?, id, fold)))
            .collect();
        changed.sort_unstable_by_key(|(first, _, _)| first.position);
        let mut staged = Staged {
            changed: Vec::with_capacity(changed.len()),
            let_go: Vec::new(),
        };
        for (batch_first, id, fold) in changed {
            // As writing the row would find, blaming the same event.
            if let Some(why) = M::unfit(&fold.state) {
                return Err(SetError::at(batch_first, undecodable(batch_first, why)));
            }
            let last = fold.last.unwrap_or(batch_first);
            staged.changed.push((
                id,
                Held {
                    weight: M::weight(&fold.state),
                    state: fold.state,
                    sequence: fold.sequence,
                    first: fold.first.unwrap_or_else(|| batch_first.without_payload()),
                    last: last.without_payload(),
                },
            ));
        }

        // What would be held once the batch commits.
        let mut count = self.held.len();
        let mut bytes = self.bytes;
        for (id, new) in &staged.changed {
            match self.held.get(id) {
                Some(old) => bytes = bytes.saturating_sub(old.weight),
                None => count += 1,
            }
            bytes += new.weight;
        }
        if count > self.most || bytes > self.budget {
            let (keep, keep_bytes) = (self.most - self.most / 4, self.budget - self.budget / 4);
            let changing: HashSet<Uuid> = staged.changed.iter().map(|(id, _)| *id).collect();
            for (id, held) in &self.held {
                if (count <= keep && bytes <= keep_bytes) || staged.let_go.len() >= WRITE_ROWS {
                    break;
                }
                if changing.contains(id) {
                    continue;
                }
                staged.let_go.push(*id);
                count -= 1;
                bytes = bytes.saturating_sub(held.weight);
            }
            let rows = staged
                .let_go
                .iter()
                .filter_map(|id| self.held.get(id).map(|h| (*id, h)));
            self.write(conn, rows).await?;
        }
        self.staged = Some(staged);
        Ok(())
    }

    /// Writes `rows`, at most [`WRITE_ROWS`] of them: the ones never
    /// written as new rows, the others over the rows the table holds.
    async fn write<'h>(
        &self,
        conn: &mut PgConnection,
        rows: impl Iterator<Item = (Uuid, &'h Held<M::State>)>,
    ) -> Result<(), SetError>
    where
        M::State: 'h,
    {
        let (again, new): (Vec<_>, Vec<_>) = rows.partition(|(id, _)| self.written.contains(id));
        let rows = |part: Vec<(Uuid, &'h Held<M::State>)>| -> Vec<Row<'h, M::State>> {
            part.into_iter().map(|(_, h)| h.row()).collect()
        };
        for chunk in rows(new).chunks(WRITE_ROWS) {
            M::write_new(conn, chunk).await?;
        }
        for chunk in rows(again).chunks(WRITE_ROWS) {
            M::write(conn, chunk).await?;
        }
        Ok(())
    }

    async fn finish_some(&mut self, conn: &mut PgConnection) -> Result<bool, SetError> {
        self.staged = None;
        let let_go: Vec<Uuid> = self.held.keys().take(WRITE_ROWS).copied().collect();
        self.write(
            conn,
            let_go
                .iter()
                .filter_map(|id| self.held.get(id).map(|h| (*id, h))),
        )
        .await?;
        let done = let_go.len() == self.held.len();
        self.staged = Some(Staged {
            changed: Vec::new(),
            let_go,
        });
        Ok(done)
    }
}

/// One aggregate's state while a batch is folded.
struct Fold<'e, A> {
    state: A,
    sequence: i64,
    /// The held row's first event, when the row was held.
    first: Option<RecordedEvent>,
    /// The first event of the batch applied.
    batch_first: Option<&'e RecordedEvent>,
    /// The last event of the batch applied.
    last: Option<&'e RecordedEvent>,
}

impl<A> Fold<'_, A> {
    fn new(state: A, sequence: i64, first: Option<RecordedEvent>) -> Self {
        Fold {
            state,
            sequence,
            first,
            batch_first: None,
            last: None,
        }
    }
}

impl<M: DocModel> Filler for DocFiller<M> {
    fn fill<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
        events: &'a [&'a RecordedEvent],
    ) -> BoxFuture<'a, Result<(), SetError>> {
        Box::pin(self.fill_batch(conn, events))
    }

    fn finish<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
    ) -> BoxFuture<'a, Result<bool, SetError>> {
        Box::pin(self.finish_some(conn))
    }

    fn committed(&mut self) {
        let Some(staged) = self.staged.take() else {
            return;
        };
        for id in staged.let_go {
            if let Some(gone) = self.held.remove(&id) {
                self.bytes = self.bytes.saturating_sub(gone.weight);
            }
            self.written.insert(id);
        }
        for (id, held) in staged.changed {
            // Removed first, so that it moves to the most recent end.
            if let Some(old) = self.held.remove(&id) {
                self.bytes = self.bytes.saturating_sub(old.weight);
            }
            self.bytes += held.weight;
            self.held.insert(id, held);
        }
    }

    fn rolled_back(&mut self) {
        self.staged = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Tasks;
    use chrono::Utc;
    use cqrs_es::DomainEvent;
    use domain::spec::TaskSpecDraft;
    use domain::task::{Task, TaskCommand};
    use domain::Actor;
    use sqlx::Connection;

    /// A task's submission with an environment variable of `env_bytes`,
    /// at the next position.
    fn submitted(project: Uuid, position: &mut i64, env_bytes: usize) -> RecordedEvent {
        let id = Uuid::new_v4();
        let spec = testkit::spec(TaskSpecDraft {
            command: Some(vec!["true".into()]),
            env: Some([("BIG".to_string(), "x".repeat(env_bytes))].into()),
            ..testkit::spec_draft(project)
        });
        let (now, by) = (Utc::now(), Actor::User("admin".into()));
        let events = Task::default()
            .decide(TaskCommand::Submit {
                task_id: id,
                spec,
                by: by.clone(),
                at: now,
            })
            .unwrap();
        *position += 1;
        RecordedEvent {
            position: *position,
            txid: 1,
            aggregate_type: "task".into(),
            aggregate_id: id.to_string(),
            sequence: 1,
            event_type: events[0].event_type(),
            event_version: events[0].event_version(),
            payload: serde_json::to_value(&events[0]).unwrap(),
            metadata: serde_json::json!({"actor": by.to_string(), "at": now}),
            recorded_at: now,
        }
    }

    #[tokio::test]
    async fn large_rows_are_let_go_of_for_their_bytes_before_their_number_and_all_are_written() {
        let db = testkit::fresh_db().await;
        let mut conn = db.pool.acquire().await.unwrap();
        let project = Uuid::new_v4();
        // Seven rows of 8 KiB on average may be held; rows of 30 KB.
        let mut filler = DocFiller::<Tasks>::new(7);
        let mut position = 0;
        for batch in 0..5 {
            let events: Vec<RecordedEvent> = (0..3)
                .map(|_| submitted(project, &mut position, 30_000))
                .collect();
            let events: Vec<&RecordedEvent> = events.iter().collect();
            let mut tx = conn.begin().await.unwrap();
            filler.fill_batch(&mut tx, &events).await.unwrap();
            tx.commit().await.unwrap();
            filler.committed();
            // Six rows are fewer than seven, yet their bytes are over:
            // every row the batch did not change is let go of.
            assert_eq!(filler.held.len(), 3, "after batch {batch}");
            assert!(
                filler.bytes > 90_000 && filler.bytes < 110_000,
                "{}",
                filler.bytes
            );
        }
        loop {
            let mut tx = conn.begin().await.unwrap();
            let done = filler.finish_some(&mut tx).await.unwrap();
            tx.commit().await.unwrap();
            filler.committed();
            if done {
                break;
            }
        }
        assert!(filler.held.is_empty());
        assert_eq!(filler.bytes, 0);
        let written: Vec<i32> =
            sqlx::query_scalar("SELECT length(doc->'spec'->'env'->>'BIG') FROM task_view")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(written, vec![30_000; 15]);
    }
}
