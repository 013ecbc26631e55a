//! `unidesk projections status` and `unidesk projections retry`: where each
//! read model stands, what every outbox consumer could not apply, what
//! holds the consumers back, and how full the database is.

use anyhow::{bail, Context};
use domain::task::Task;
use projections::Projector;
use serde::Serialize;
use sqlx::PgPool;
use store::dead_letters::{self, DeadLetter};
use store::health::{OldestTransaction, Storage};
use store::{Store, StoreError};

/// Everything `status` shows, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Overview {
    /// Each read model's checkpoint, lag and dead letter count.
    pub read_models: Vec<projections::Status>,
    /// Every dead letter of every consumer.
    pub dead_letters: Vec<DeadLetter>,
    /// The oldest open transaction with an id on the database server.
    pub oldest_transaction: Option<OldestTransaction>,
    /// The database's size now, in bytes.
    pub database_bytes: i64,
    /// The size and budget as the scheduler role last recorded them.
    pub storage: Storage,
}

/// Gathers the overview.
///
/// # Errors
/// A database error.
pub async fn overview(pool: &PgPool) -> anyhow::Result<Overview> {
    Ok(Overview {
        read_models: Projector::new(pool.clone()).status().await?,
        dead_letters: dead_letters::list(pool, None).await?,
        oldest_transaction: store::health::oldest_transaction(pool).await?,
        database_bytes: store::health::database_size(pool).await?,
        storage: store::health::storage(pool).await?,
    })
}

/// Prints the overview, as tables or (`json`) one JSON object.
///
/// # Errors
/// A database error.
pub async fn print(pool: &PgPool, json: bool) -> anyhow::Result<()> {
    let o = overview(pool).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&o)?);
        return Ok(());
    }
    println!(
        "{:<10} {:>12} {:>12} {:>8} {:>12}  state",
        "name", "txid", "position", "lag", "dead letters"
    );
    for s in &o.read_models {
        println!(
            "{:<10} {:>12} {:>12} {:>8} {:>12}  {}",
            s.name,
            s.checkpoint.txid,
            s.checkpoint.position,
            s.lag,
            s.dead_letters,
            if s.consistent {
                "ok"
            } else {
                "INCONSISTENT: retry or rebuild"
            }
        );
    }
    println!();
    if o.dead_letters.is_empty() {
        println!("dead letters: none");
    } else {
        println!("dead letters ({}):", o.dead_letters.len());
        for d in &o.dead_letters {
            println!(
                "  {} position {} ({} {} #{}, {}): {} attempt(s), first {}, last {}",
                d.consumer,
                d.position,
                d.aggregate_type,
                d.aggregate_id,
                d.sequence,
                d.event_type,
                d.attempts,
                d.first_seen.format("%Y-%m-%dT%H:%M:%SZ"),
                d.last_seen.format("%Y-%m-%dT%H:%M:%SZ"),
            );
            println!("    {}", d.error.replace('\n', " "));
        }
    }
    match &o.oldest_transaction {
        None => println!("oldest open transaction: none"),
        Some(t) => println!(
            "oldest open transaction: {:.1} s (pid {}, database {}, application {:?}, {})",
            t.age.as_secs_f64(),
            t.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            t.database.as_deref().unwrap_or("-"),
            t.application.as_deref().unwrap_or(""),
            t.state.as_deref().unwrap_or("-"),
        ),
    }
    let budget = o.storage.budget_bytes;
    if budget > 0 {
        println!(
            "database: {} bytes; budget {} bytes ({:.0}%); task output {}",
            o.database_bytes,
            budget,
            o.database_bytes as f64 * 100.0 / budget as f64,
            if o.storage.output_refused {
                "REFUSED"
            } else {
                "stored"
            }
        );
    } else {
        println!("database: {} bytes; no budget", o.database_bytes);
    }
    Ok(())
}

/// Retries the dead letters of consumer `name` (of all with `None`).
///
/// # Errors
/// An unknown name, a database error, or dead letters that remain.
pub async fn retry(pool: &PgPool, name: Option<&str>) -> anyhow::Result<()> {
    let mut cleared = 0;
    let mut remaining = 0;
    if name != Some(ingress::DEAD_LETTER_CONSUMER) {
        let r = Projector::new(pool.clone())
            .retry(name)
            .await
            .context("retrying read models' dead letters")?;
        cleared += r.cleared;
        remaining += r.remaining;
    }
    if name.is_none_or(|n| n == ingress::DEAD_LETTER_CONSUMER) {
        let (c, r) = retry_ingress(pool).await?;
        cleared += c;
        remaining += r;
    }
    println!("cleared {cleared} dead letter(s); {remaining} remain");
    if remaining > 0 {
        bail!(
            "{remaining} dead letter(s) remain: their events still cannot be applied \
             (see `unidesk projections status`)"
        );
    }
    Ok(())
}

/// The ingress's dead letters name tasks whose events could not be read:
/// each one whose task loads now is removed (the node gets the task's
/// commands when its agent next connects).
async fn retry_ingress(pool: &PgPool) -> anyhow::Result<(usize, usize)> {
    let store = Store::new(pool.clone());
    let (mut cleared, mut remaining) = (0, 0);
    for letter in dead_letters::list(pool, Some(ingress::DEAD_LETTER_CONSUMER)).await? {
        match store.load::<Task>(&letter.aggregate_id).await {
            Ok(_) => {
                dead_letters::remove(pool, &letter.consumer, letter.position).await?;
                cleared += 1;
            }
            Err(StoreError::Corrupt(why)) => {
                let event = store::outbox::read_at(pool, letter.position).await?;
                if let Some(event) = event {
                    dead_letters::record(pool, &letter.consumer, &event, &why).await?;
                }
                remaining += 1;
            }
            Err(e) => return Err(e).context("loading a task"),
        }
    }
    Ok((cleared, remaining))
}
