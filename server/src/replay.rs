//! `unidesk replay` and `unidesk events`: debugging against the event log
//! of a database, or of an exported file imported into another one.
//!
//! - `replay task|node|project|user ID` prints an aggregate's history event
//!   by event, each with its summary and what it changed in the state
//!   (`--final` for the last state only, `--json` for machines);
//! - `replay --check` reports every stored event the current code cannot
//!   apply, and fails when there is any;
//! - `events export` and `events import` move the log between databases as
//!   hash-chained JSON lines ([`store::export`]).

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand, ValueEnum};
use projections::replay::{self, Change, CheckReport, Kind, Replay, Until};
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::cli::DbArgs;

/// The kinds of aggregate, as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum KindArg {
    /// A task, by id.
    Task,
    /// A node, by id or name.
    Node,
    /// A project, by id or name.
    Project,
    /// A user, by name.
    User,
}

impl From<KindArg> for Kind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Task => Kind::Task,
            KindArg::Node => Kind::Node,
            KindArg::Project => Kind::Project,
            KindArg::User => Kind::User,
        }
    }
}

/// `unidesk replay`.
#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// The aggregate's kind.
    #[arg(value_enum, required_unless_present = "check")]
    kind: Option<KindArg>,
    /// The aggregate's id; a node or a project may be given by name, a
    /// user is given by name.
    #[arg(required_unless_present = "check")]
    id: Option<String>,
    /// Stop after the event with this sequence number.
    #[arg(long, value_name = "N", conflicts_with = "until")]
    until_seq: Option<i64>,
    /// Stop after the last event recorded at or before this time, such as
    /// 2026-11-28T10:00:00Z (UTC when no offset is given).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// Print only the state after the last event replayed.
    #[arg(long = "final", conflicts_with = "states")]
    final_only: bool,
    /// Print the whole state after each event, besides what changed.
    #[arg(long)]
    states: bool,
    /// Print JSON: one object per event (or the final state, or the
    /// check's report).
    #[arg(long)]
    json: bool,
    /// Replay every aggregate and report each stored event this build can
    /// no longer apply; exits with status 1 when there is any.
    #[arg(long, conflicts_with_all = ["kind", "id", "until_seq", "until", "final_only", "states"])]
    check: bool,
}

/// `unidesk events …`.
#[derive(Debug, Subcommand)]
pub(crate) enum EventsCommand {
    /// Write events in the log's order as hash-chained JSON lines (to
    /// stdout unless --output is given).
    Export {
        /// Only events of this kind of aggregate.
        #[arg(long, value_enum)]
        aggregate_type: Option<KindArg>,
        /// Only events of this aggregate (its id; a user's name).
        #[arg(long, value_name = "ID")]
        aggregate_id: Option<String>,
        /// Only events after this outbox position: the last position of
        /// an earlier export, which this one continues.
        #[arg(long, value_name = "POS")]
        after: Option<i64>,
        /// Write to this file, complete or not at all, instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Load an export into a database without events (or, for an export
    /// made with --after, into the one holding what it continues), in one
    /// transaction, after applying the migrations; then bring the read
    /// models up to date.
    Import {
        /// The export; `-` reads stdin.
        file: PathBuf,
        /// Leave the read models to a running projector.
        #[arg(long)]
        no_projections: bool,
        #[command(flatten)]
        db: DbArgs,
    },
}

impl EventsCommand {
    /// Where the database is.
    pub(crate) fn db(&self) -> &DbArgs {
        match self {
            EventsCommand::Export { db, .. } | EventsCommand::Import { db, .. } => db,
        }
    }
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Ok(t.and_utc());
        }
    }
    Err(format!(
        "{s:?} is not a time: write it as 2026-11-28T10:00:00Z (RFC 3339; UTC without an offset)"
    ))
}

/// `1 event`, `2 events`.
fn count(n: impl Into<u64>, word: &str) -> String {
    match n.into() {
        1 => format!("1 {word}"),
        n => format!("{n} {word}s"),
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Runs `unidesk replay` against `pool`.
///
/// # Errors
/// An unknown aggregate, a bound before its first event, an event that
/// cannot be applied, problems found by `--check`, or a database error.
pub(crate) async fn run_replay(args: ReplayArgs, pool: &PgPool) -> anyhow::Result<()> {
    let mut out = BufWriter::new(io::stdout().lock());
    if args.check {
        let report = replay::check(pool).await.context("checking the log")?;
        print_check(&mut out, &report, args.json)?;
        out.flush()?;
        if !report.problems.is_empty() {
            bail!(
                "{} stored event(s) or snapshot(s) cannot be taken by this build",
                report.problems.len()
            );
        }
        return Ok(());
    }
    let (Some(kind), Some(id)) = (args.kind, args.id) else {
        bail!("name an aggregate (`unidesk replay task ID`) or pass --check");
    };
    let until = match (args.until_seq, args.until) {
        (Some(n), _) => Until::Sequence(n),
        (None, Some(t)) => Until::Time(t),
        (None, None) => Until::End,
    };
    let replayed = replay::replay(pool, kind.into(), &id, until).await?;
    if args.final_only {
        print_final(&mut out, &replayed, args.json)?;
    } else {
        print_steps(&mut out, &replayed, args.json, args.states)?;
    }
    out.flush()?;
    if let Some(b) = &replayed.broken {
        bail!(
            "{} {} #{} ({}) cannot be applied by this build: {}",
            replayed.kind,
            replayed.id,
            b.sequence,
            b.event_type,
            b.reason
        );
    }
    let shown = replayed.steps.len();
    if shown < replayed.total {
        eprintln!(
            "stopped after #{} of {}",
            replayed.steps.last().map_or(0, |s| s.event.sequence),
            count(replayed.total as u64, "event")
        );
    }
    Ok(())
}

/// A value on one line, cut when long.
fn short(v: &Value) -> String {
    const MAX: usize = 160;
    let s = v.to_string();
    if s.chars().count() <= MAX {
        s
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut}…")
    }
}

fn change_line(c: &Change) -> String {
    match (&c.old, &c.new) {
        (Some(old), Some(new)) => format!("{}: {} → {}", c.path, short(old), short(new)),
        (None, Some(new)) => format!("+ {}: {}", c.path, short(new)),
        (Some(old), None) => format!("- {}: {}", c.path, short(old)),
        (None, None) => c.path.clone(),
    }
}

fn print_steps(out: &mut impl Write, r: &Replay, as_json: bool, states: bool) -> io::Result<()> {
    if !as_json {
        writeln!(
            out,
            "{} {}: {}",
            r.kind,
            r.id,
            count(r.total as u64, "event")
        )?;
    }
    for step in &r.steps {
        let e = &step.event;
        if as_json {
            let mut line = json!({
                "aggregate_type": e.aggregate_type,
                "aggregate_id": e.aggregate_id,
                "sequence": e.sequence,
                "position": e.position,
                "recorded_at": e.recorded_at,
                "actor": e.actor(),
                "event_type": e.event_type,
                "event_version": e.event_version,
                "summary": step.summary,
                "payload": e.payload,
                "changes": step.changes,
            });
            if states {
                line["state"] = step.state.clone();
            }
            writeln!(out, "{line}")?;
            continue;
        }
        writeln!(
            out,
            "\n#{}  {}  {}  {}",
            e.sequence,
            time(e.recorded_at),
            e.actor(),
            e.event_type
        )?;
        writeln!(out, "    {}", step.summary)?;
        if step.changes.is_empty() {
            writeln!(out, "    (no change to the state)")?;
        }
        for c in &step.changes {
            writeln!(out, "    {}", change_line(c))?;
        }
        if states {
            let pretty = serde_json::to_string_pretty(&step.state).map_err(io::Error::other)?;
            for line in pretty.lines() {
                writeln!(out, "    | {line}")?;
            }
        }
    }
    Ok(())
}

fn print_final(out: &mut impl Write, r: &Replay, as_json: bool) -> io::Result<()> {
    let Some(last) = r.steps.last() else {
        return Ok(());
    };
    let e = &last.event;
    if as_json {
        let doc = json!({
            "aggregate_type": e.aggregate_type,
            "aggregate_id": e.aggregate_id,
            "sequence": e.sequence,
            "event_type": e.event_type,
            "recorded_at": e.recorded_at,
            "state": last.state,
        });
        return writeln!(out, "{doc}");
    }
    writeln!(
        out,
        "{} {} after #{} of {} ({} at {}):",
        r.kind,
        r.id,
        e.sequence,
        r.total,
        e.event_type,
        time(e.recorded_at)
    )?;
    let pretty = serde_json::to_string_pretty(&last.state).map_err(io::Error::other)?;
    writeln!(out, "{pretty}")
}

fn print_check(out: &mut impl Write, report: &CheckReport, as_json: bool) -> io::Result<()> {
    if as_json {
        let doc = serde_json::to_string(report).map_err(io::Error::other)?;
        return writeln!(out, "{doc}");
    }
    for p in &report.problems {
        let at = match (&p.sequence, &p.event_type) {
            (Some(s), Some(t)) => format!(" #{s} {t}"),
            (Some(s), None) => format!(" #{s}"),
            _ => String::new(),
        };
        writeln!(
            out,
            "{} {}{at}: {}",
            p.aggregate_type, p.aggregate_id, p.reason
        )?;
    }
    writeln!(
        out,
        "checked {}, {} and {}: {}",
        count(report.aggregates, "aggregate"),
        count(report.events, "event"),
        count(report.snapshots, "snapshot"),
        match report.problems.len() {
            0 => "every event can be applied by this build".to_string(),
            1 => "1 problem".to_string(),
            n => format!("{n} problems"),
        }
    )
}

/// Runs `unidesk events …` against `pool`.
///
/// # Errors
/// Bad options, an unreadable or refused file (nothing is imported then),
/// an unwritable output, or a database error.
pub(crate) async fn run_events(command: EventsCommand, pool: &PgPool) -> anyhow::Result<()> {
    match command {
        EventsCommand::Export {
            aggregate_type,
            aggregate_id,
            after,
            output,
            ..
        } => {
            let options = store::export::ExportOptions {
                aggregate_type: aggregate_type.map(|k| Kind::from(k).as_str().to_string()),
                aggregate_id,
                after,
            };
            let summary = match &output {
                Some(path) => export_to_file(pool, &options, path).await?,
                None => {
                    let mut out = BufWriter::with_capacity(1 << 20, io::stdout().lock());
                    store::export::export(pool, &options, &mut out)
                        .await
                        .context("exporting events")?
                }
            };
            eprintln!(
                "exported {}; final hash {}",
                count(summary.events, "event"),
                summary.hash
            );
            if let Some(p) = summary.last_position {
                eprintln!("to export what comes next: unidesk events export --after {p}");
            }
            Ok(())
        }
        EventsCommand::Import {
            file,
            no_projections,
            ..
        } => {
            // A new database needs the schema first, as `unidesk migrate`
            // gives it.
            store::migrate(pool)
                .await
                .context("applying migrations to the target database")?;
            let imported = if file.as_os_str() == "-" {
                let mut input = BufReader::with_capacity(1 << 20, io::stdin().lock());
                store::export::import(pool, &mut input).await
            } else {
                let f = File::open(&file).with_context(|| format!("opening {}", file.display()))?;
                let mut input = BufReader::with_capacity(1 << 20, f);
                store::export::import(pool, &mut input).await
            };
            let summary = imported
                .with_context(|| format!("importing {}: nothing was imported", file.display()))?;
            println!(
                "imported {} of {}; final hash {}",
                count(summary.events, "event"),
                count(summary.aggregates as u64, "aggregate"),
                summary.hash
            );
            if !no_projections {
                let applied = projections::Projector::new(pool.clone())
                    .catch_up()
                    .await
                    .context("bringing the read models up to date after the import")?;
                println!("read models up to date ({applied} event applications)");
            }
            Ok(())
        }
    }
}

/// Exports into `path` through a temporary file beside it, renamed into
/// place only when complete.
async fn export_to_file(
    pool: &PgPool,
    options: &store::export::ExportOptions,
    path: &Path,
) -> anyhow::Result<store::export::ExportSummary> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, tmp);
    let summary = store::export::export(pool, options, &mut out)
        .await
        .context("exporting events")?;
    let tmp = out
        .into_inner()
        .map_err(|e| e.into_error())
        .context("writing the export")?;
    tmp.as_file().sync_all().context("writing the export")?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_utc_without_an_offset() {
        let t = parse_time("2026-11-28T10:00:00Z").expect("rfc3339");
        assert_eq!(parse_time("2026-11-28T11:00:00+01:00"), Ok(t));
        assert_eq!(parse_time("2026-11-28 10:00:00"), Ok(t));
        assert_eq!(parse_time("2026-11-28T10:00:00.000"), Ok(t));
        assert!(parse_time("yesterday").is_err());
    }
}
