//! Rebuilding read models while the server runs.
//!
//! A rebuild replays the whole log, which takes minutes on a large one. Done
//! in one transaction, that transaction would be the oldest one running for
//! all that time, and every outbox consumer (the projector, the scheduler,
//! the ingress) only reads events of transactions older than the oldest one
//! still running: the whole platform would stand still until the rebuild
//! ends. So the new content is built apart, in short transactions, and
//! switched in by one short transaction at the end:
//!
//! 1. On its own connection, the rebuild creates a temporary table for each
//!    table of the chosen models, `LIKE` the live one with its keys and
//!    indexes and with the same name. On that connection the temporary
//!    table shadows the live one, so the projections' own statements fill
//!    it unchanged; nobody else sees it.
//! 2. It replays the log into them in batches, one transaction each.
//! 3. One transaction locks the models' checkpoints (the running projector
//!    skips a locked checkpoint), applies the events that arrived since
//!    step 2, replaces the live rows with the rebuilt ones, and stores the
//!    checkpoints. Readers see the old rows until it commits, the new ones
//!    after.

use std::time::Instant;

use sqlx::{Connection, PgConnection};
use store::outbox::{self, Checkpoint, Filter, RecordedEvent};

use crate::{Projection, ProjectionError};

/// Events read and applied per transaction while building.
const BATCH: i64 = 5000;

/// A progress line is logged every this many events.
const PROGRESS_EVERY: usize = 100_000;

/// A live table and its temporary shadow.
struct Shadow {
    /// The table's name as the projections write it, such as `task_view`:
    /// on the rebuild's connection it names the shadow.
    name: &'static str,
    /// The live table, schema-qualified and quoted.
    live: String,
    /// The columns copied from the shadow into the live table.
    columns: String,
}

/// Runs a rebuild of `chosen` on `conn`, a connection nobody else uses
/// and that is closed afterwards.
pub(crate) async fn run(
    conn: &mut PgConnection,
    chosen: &[&dyn Projection],
) -> Result<usize, ProjectionError> {
    let started = Instant::now();
    // Temporary tables live in this session's memory up to this size, and
    // the setting must come before the session's first temporary table.
    sqlx::query("SET temp_buffers = '256MB'")
        .execute(&mut *conn)
        .await?;
    let mut shadows = Vec::new();
    for p in chosen {
        for table in p.tables() {
            shadows.push(shadow(conn, table).await?);
        }
        // The checkpoint row exists before the switch locks it.
        outbox::load_checkpoint(conn, p.name(), false).await?;
    }
    let mut at = Checkpoint::default();
    let mut applied = 0;
    let mut read = 0;
    loop {
        let mut tx = conn.begin().await?;
        let n = apply_batch(&mut tx, chosen, &mut at).await?;
        tx.commit().await?;
        if n == 0 {
            break;
        }
        if (read + n) / PROGRESS_EVERY > read / PROGRESS_EVERY {
            tracing::info!(events = read + n, "rebuilding read models");
        }
        read += n;
        applied += n * chosen.len();
    }
    let built = started.elapsed();
    let switching = Instant::now();
    let mut tx = conn.begin().await?;
    let mut names: Vec<&str> = chosen.iter().map(|p| p.name()).collect();
    names.sort_unstable();
    for name in &names {
        outbox::load_checkpoint(&mut tx, name, true).await?;
    }
    loop {
        let n = apply_batch(&mut tx, chosen, &mut at).await?;
        if n == 0 {
            break;
        }
        read += n;
        applied += n * chosen.len();
    }
    // Delete in the order the models list their tables, insert in reverse,
    // as a model lists a table before the one it refers to.
    for s in &shadows {
        sqlx::query(&format!("DELETE FROM {}", s.live))
            .execute(&mut *tx)
            .await?;
    }
    for s in shadows.iter().rev() {
        sqlx::query(&format!(
            "INSERT INTO {} ({cols}) SELECT {cols} FROM pg_temp.{}",
            s.live,
            quote(s.name),
            cols = s.columns
        ))
        .execute(&mut *tx)
        .await?;
    }
    for name in &names {
        outbox::save_checkpoint(&mut tx, name, at).await?;
    }
    tx.commit().await?;
    tracing::info!(
        events = read,
        models = ?names,
        build_s = built.as_secs_f64(),
        switch_s = switching.elapsed().as_secs_f64(),
        "read models rebuilt"
    );
    Ok(applied)
}

/// Reads one batch after `at`, applies it to every chosen model and moves
/// `at` past it. Returns how many events were read.
async fn apply_batch(
    conn: &mut PgConnection,
    chosen: &[&dyn Projection],
    at: &mut Checkpoint,
) -> Result<usize, ProjectionError> {
    let events = outbox::read_after(&mut *conn, *at, BATCH, &Filter::default()).await?;
    let Some(last) = events.last().map(RecordedEvent::checkpoint) else {
        return Ok(0);
    };
    for event in &events {
        for p in chosen {
            p.apply(conn, event).await?;
        }
    }
    *at = last;
    Ok(events.len())
}

/// Creates the temporary shadow of live table `table`.
async fn shadow(conn: &mut PgConnection, table: &'static str) -> Result<Shadow, sqlx::Error> {
    let (live, columns): (String, String) = sqlx::query_as(
        "SELECT format('%I.%I', n.nspname, c.relname), \
           (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) FROM pg_attribute a \
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.oid = to_regclass($1) AND n.nspname NOT LIKE 'pg_temp%'",
    )
    .bind(quote(table))
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "CREATE TEMPORARY TABLE {} (LIKE {live} INCLUDING ALL)",
        quote(table)
    ))
    .execute(&mut *conn)
    .await?;
    Ok(Shadow {
        name: table,
        live,
        columns,
    })
}

/// `name` as a quoted SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
