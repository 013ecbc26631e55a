//! Signing in and the read commands: whoami, tasks, task, logs, cancel,
//! timeline, nodes.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde_json::Value;
use uuid::Uuid;

use super::{print_json, print_table, task_exit_status, Conn, Output};
use crate::api::Client;
use crate::config::{self, Config, Settings};
use crate::error::{Error, Result};
use crate::follow;
use crate::types::{Page, Task, TimelineEntry, TimelinePage};

/// Flags of `unidesk login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The server's address, such as https://unidesk.example.org (default:
    /// UNIDESK_SERVER, else the one saved before).
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// The token; without it, it is read from standard input (prompted
    /// for on a terminal). An admin issues tokens with
    /// POST /api/v1/users/NAME/tokens.
    #[arg(long)]
    token: Option<String>,
    /// A PEM file of the private CA that signed the server's certificate;
    /// saved with the rest.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    #[command(flatten)]
    out: Output,
}

fn read_token() -> Result<String> {
    let stdin = std::io::stdin();
    if std::io::IsTerminal::is_terminal(&stdin) {
        eprint!("token: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin
        .read_line(&mut line)
        .map_err(|e| Error::Io(format!("reading the token: {e}")))?;
    Ok(line.trim().to_string())
}

/// `unidesk login`.
pub(super) async fn login(args: LoginArgs) -> Result<u8> {
    let path = config::path()?;
    let saved = Config::load(&path)?;
    let server = args
        .server
        .or_else(|| {
            std::env::var("UNIDESK_SERVER")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .or(saved.server.clone())
        .ok_or_else(|| Error::Usage("which server? pass --server URL".into()))?;
    let server = config::normalise_server(&server)?;
    let token = match args.token {
        Some(t) => t,
        None => read_token()?,
    };
    let token = token.trim().to_string();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::Usage(
            "the token is empty or holds white space: paste it as it was issued".into(),
        ));
    }
    let ca_file = args
        .ca_file
        .or(saved.ca_file.clone())
        .map(|f| std::path::absolute(&f).unwrap_or(f));
    let settings = Settings {
        server: server.clone(),
        token: Some(token.clone()),
        ca_file: ca_file.clone(),
    };
    let me = Client::new(&settings)?.me().await?;
    Config {
        server: Some(server.clone()),
        token: Some(token),
        ca_file,
    }
    .save(&path)?;
    if args.out.json {
        print_json(&me)?;
    } else {
        outln!(
            "signed in to {server} as {}{} (saved in {})",
            me.name,
            if me.admin { ", an admin" } else { "" },
            path.display()
        );
    }
    Ok(0)
}

/// `unidesk whoami`.
pub(super) async fn whoami(conn: &Conn, out: Output) -> Result<u8> {
    let client = conn.client()?;
    let me = client.me().await?;
    if out.json {
        print_json(&me)?;
    } else {
        outln!(
            "{} on {}{}",
            me.name,
            client.server(),
            if me.admin { " (admin)" } else { "" }
        );
    }
    Ok(0)
}

/// Flags of `unidesk tasks`.
#[derive(Debug, Args)]
pub struct TasksArgs {
    /// Only this project's tasks (a name or an id).
    #[arg(long, short)]
    project: Option<String>,
    /// Only tasks in this state (queued, running, succeeded, failed…).
    #[arg(long, short)]
    state: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    #[command(flatten)]
    conn: Conn,
    #[command(flatten)]
    out: Output,
}

/// A time as `2026-01-02 03:04:05` (UTC), from RFC 3339.
fn when(v: &Value) -> String {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

/// The names of the project and the nodes a task names, for people; an id
/// whose name cannot be had (a node since removed, the server refusing)
/// shows alone.
struct Names {
    project: Option<String>,
    nodes: std::collections::HashMap<String, String>,
}

impl Names {
    async fn of(client: &Client, t: &Value) -> Names {
        let name = |path: String| async move {
            let found: Option<Value> = client.get(&path, &[]).await.ok();
            found.and_then(|v| v["name"].as_str().map(str::to_owned))
        };
        let project = match t["project_id"].as_str() {
            Some(id) => name(format!("/projects/{id}")).await,
            None => None,
        };
        let mut ids: Vec<&str> = t["attempts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| &a["node_id"])
            .chain([&t["node_id"]])
            .filter_map(Value::as_str)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut nodes = std::collections::HashMap::new();
        for id in ids {
            if let Some(n) = name(format!("/nodes/{id}")).await {
                nodes.insert(id.to_owned(), n);
            }
        }
        Names { project, nodes }
    }

    fn project(&self, id: &Value) -> String {
        named(self.project.as_deref(), id)
    }

    fn node(&self, id: &Value) -> String {
        named(
            id.as_str()
                .and_then(|i| self.nodes.get(i))
                .map(String::as_str),
            id,
        )
    }

    /// The node's name alone, or its id without one.
    fn node_name(&self, id: &Value) -> String {
        match id.as_str().and_then(|i| self.nodes.get(i)) {
            Some(name) => name.clone(),
            None => text(id),
        }
    }
}

/// `name (id)`, or the id alone without a name.
fn named(name: Option<&str>, id: &Value) -> String {
    match name {
        Some(name) => format!("{name} ({})", text(id)),
        None => text(id),
    }
}

/// `: ` and the first line of an attempt's reason (`…` when it has more,
/// such as a build's last lines, which the task's own reason shows whole);
/// nothing when it has none.
fn attempt_reason(v: &Value) -> String {
    let Some(reason) = v.as_str().map(str::trim).filter(|r| !r.is_empty()) else {
        return String::new();
    };
    match reason.split_once('\n') {
        Some((first, _)) => format!(": {} …", first.trim_end()),
        None => format!(": {reason}"),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn command_line(task: &Value) -> String {
    let words: Vec<String> = task["spec"]["command"]
        .as_array()
        .map(|a| a.iter().map(text).collect())
        .unwrap_or_default();
    let line = words.join(" ");
    if line.chars().count() > 60 {
        format!("{}…", line.chars().take(59).collect::<String>())
    } else {
        line
    }
}

/// `unidesk tasks`.
pub(super) async fn tasks(args: TasksArgs) -> Result<u8> {
    let client = args.conn.client()?;
    let mut query = vec![("limit", args.limit.clamp(1, 500).to_string())];
    if let Some(p) = &args.project {
        query.push(("project", client.project(p).await?.id.to_string()));
    }
    if let Some(s) = &args.state {
        query.push(("state", s.clone()));
    }
    let page: Page<Value> = client.get("/tasks", &query).await?;
    if args.out.json {
        print_json(&page.items)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = page
        .items
        .iter()
        .map(|t| {
            vec![
                text(&t["id"]),
                text(&t["state"]),
                text(&t["attempt"]),
                when(&t["submitted_at"]),
                command_line(t),
            ]
        })
        .collect();
    print_table(&["ID", "STATE", "ATTEMPT", "SUBMITTED", "COMMAND"], &rows);
    Ok(0)
}

/// `unidesk task ID`.
pub(super) async fn task(conn: &Conn, id: Uuid, out: Output) -> Result<u8> {
    let client = conn.client()?;
    let t: Value = client.get(&format!("/tasks/{id}"), &[]).await?;
    if out.json {
        print_json(&t)?;
        return Ok(0);
    }
    let spec = &t["spec"];
    let names = Names::of(&client, &t).await;
    let mut lines = vec![
        ("task", text(&t["id"])),
        ("state", text(&t["state"])),
        ("project", names.project(&t["project_id"])),
        ("attempt", text(&t["attempt"])),
    ];
    if !t["node_id"].is_null() {
        lines.push(("node", names.node(&t["node_id"])));
    }
    let optional = [
        ("stage", &t["stage"]),
        ("detail", &t["stage_detail"]),
        ("exit code", &t["exit_code"]),
        ("reason", &t["reason"]),
        ("not before", &t["not_before"]),
    ];
    for (k, v) in optional {
        if !v.is_null() {
            lines.push((k, text(v)));
        }
    }
    lines.push(("command", command_line(&t)));
    lines.push((
        "code",
        format!(
            "{} @ {}",
            text(&spec["code_repo_url"]),
            text(&spec["code_commit_id"])
        ),
    ));
    lines.push((
        "env",
        format!(
            "{} @ {} : {}",
            text(&spec["env_repo_url"]),
            text(&spec["env_commit_id"]),
            text(&spec["dockerfile_path"])
        ),
    ));
    lines.push((
        "submitted",
        format!(
            "{} by {}",
            when(&t["submitted_at"]),
            text(&t["submitted_by"])
        ),
    ));
    if !t["finished_at"].is_null() {
        lines.push(("finished", when(&t["finished_at"])));
    }
    if t["cancel_requested"] == Value::Bool(true) {
        lines.push(("cancel", "requested".into()));
    }
    for (k, v) in lines {
        outln!("{:<11}{v}", format!("{k}:"));
    }
    // Why a queued task waits, when the server says.
    if let Some(queue) = t.get("queue").filter(|q| q.is_object()) {
        outln!("{:<11}{}", "waiting:", text(&queue["summary"]));
        if let Some(position) = queue.get("position").filter(|p| !p.is_null()) {
            outln!("{:<11}{}", "in line:", text(position));
        }
        for reason in queue["reasons"].as_array().into_iter().flatten() {
            let fields: Vec<String> = reason
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| *k != "kind")
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect();
            outln!("  - {} {}", text(&reason["kind"]), fields.join(" "));
        }
    }
    if let Some(attempts) = t["attempts"].as_array().filter(|a| !a.is_empty()) {
        outln!("attempts:");
        for a in attempts {
            outln!(
                "  #{} node {} assigned {} ended {} {}{}",
                text(&a["number"]),
                names.node_name(&a["node_id"]),
                when(&a["assigned_at"]),
                when(&a["ended_at"]),
                text(&a["outcome"]),
                attempt_reason(&a["reason"])
            );
        }
    }
    if let Some(artifacts) = t["artifacts"].as_array().filter(|a| !a.is_empty()) {
        outln!("artifacts:");
        for a in artifacts {
            outln!(
                "  {} ({} bytes, attempt {}) sha256 {}",
                text(&a["name"]),
                text(&a["size"]),
                text(&a["attempt"]),
                text(&a["sha256"])
            );
        }
    }
    if let Some(removed) = t["output_removed"].as_array().filter(|a| !a.is_empty()) {
        for r in removed {
            outln!("output removed: {r}");
        }
    }
    Ok(0)
}

/// Flags of `unidesk logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The task's id.
    id: Uuid,
    /// Follow the output as it is produced until the task ends, then exit
    /// with the task's status; reconnects after a dropped connection.
    #[arg(long, short)]
    follow: bool,
    /// The attempt, from 1 (default: the current one); not with -f.
    #[arg(long, conflicts_with = "follow")]
    attempt: Option<u32>,
    #[command(flatten)]
    conn: Conn,
    #[command(flatten)]
    out: Output,
}

#[derive(Debug, serde::Deserialize)]
struct LogPage {
    #[serde(default)]
    next_offset: u64,
    #[serde(default)]
    data: String,
    #[serde(default)]
    complete: bool,
}

/// `unidesk logs ID [-f]`.
pub(super) async fn logs(args: LogsArgs) -> Result<u8> {
    let client = args.conn.client()?;
    if args.follow {
        let json = args.out.json;
        let task = follow::logs(&client, args.id, false, |data| {
            if json {
                outln!("{}", serde_json::json!({ "data": data }));
            } else {
                super::out(data.as_bytes());
            }
        })
        .await?;
        report_end(&task);
        return Ok(task_exit_status(&task));
    }
    let mut offset = 0u64;
    let mut all = String::new();
    loop {
        let mut query = vec![("offset", offset.to_string())];
        if let Some(a) = args.attempt {
            query.push(("attempt", a.to_string()));
        }
        let page: LogPage = client
            .get(&format!("/tasks/{}/logs", args.id), &query)
            .await?;
        if args.out.json {
            all.push_str(&page.data);
        } else {
            super::out(page.data.as_bytes());
        }
        if page.complete || page.next_offset <= offset || page.data.is_empty() {
            break;
        }
        offset = page.next_offset;
    }
    if args.out.json {
        print_json(&serde_json::json!({"task_id": args.id, "data": all}))?;
    }
    Ok(0)
}

/// Says on standard error how a followed task ended, unless it succeeded.
pub(super) fn report_end(task: &Task) {
    if task.state != "succeeded" {
        let mut line = format!("unidesk: task {} {}", task.id, task.state);
        if let Some(code) = task.exit_code {
            line.push_str(&format!(" with exit code {code}"));
        }
        if let Some(reason) = &task.reason {
            line.push_str(&format!(": {reason}"));
        }
        eprintln!("{line}");
    }
}

/// `unidesk cancel ID`.
pub(super) async fn cancel(conn: &Conn, id: Uuid, out: Output) -> Result<u8> {
    let client = conn.client()?;
    let task = client.cancel(id).await?;
    if out.json {
        print_json(&task)?;
    } else {
        outln!("cancel requested for task {id} (now {})", task.state);
    }
    Ok(0)
}

/// Flags of `unidesk timeline`.
#[derive(Debug, Args)]
pub struct TimelineArgs {
    /// Keep printing new events as they are committed.
    #[arg(long, short)]
    follow: bool,
    /// Only this task's events.
    #[arg(long)]
    task: Option<Uuid>,
    /// Only this node's events (a name or an id).
    #[arg(long)]
    node: Option<String>,
    /// Only this project's events (a name or an id).
    #[arg(long)]
    project: Option<String>,
    /// How many past events to show first.
    #[arg(long, default_value_t = 20)]
    limit: u32,
    #[command(flatten)]
    conn: Conn,
    #[command(flatten)]
    out: Output,
}

fn print_entry(e: &TimelineEntry, json: bool) {
    if json {
        if let Ok(line) = serde_json::to_string(e) {
            outln!("{line}");
        }
    } else {
        outln!(
            "{:>8}  {}  {:<24} {}",
            e.position,
            when(&Value::String(e.recorded_at.clone())),
            e.event_type,
            e.summary
        );
    }
}

/// The id of node `name_or_id`.
async fn node_id(client: &Client, name_or_id: &str) -> Result<Uuid> {
    if let Ok(id) = Uuid::parse_str(name_or_id) {
        return Ok(id);
    }
    let nodes: Vec<Value> = client.all("/nodes", &[]).await?;
    nodes
        .iter()
        .find(|n| n["name"] == name_or_id)
        .and_then(|n| n["id"].as_str())
        .and_then(|id| Uuid::parse_str(id).ok())
        .ok_or_else(|| Error::Refused {
            status: 404,
            problems: vec![crate::error::Problem {
                detail: format!("there is no node named {name_or_id:?}"),
                field: Some("node".into()),
            }],
        })
}

/// `unidesk timeline [-f]`.
pub(super) async fn timeline(args: TimelineArgs) -> Result<u8> {
    let client = args.conn.client()?;
    let mut query: follow::TimelineQuery = Vec::new();
    if let Some(t) = args.task {
        query.push(("task", t.to_string()));
    }
    if let Some(n) = &args.node {
        query.push(("node", node_id(&client, n).await?.to_string()));
    }
    if let Some(p) = &args.project {
        query.push(("project", client.project(p).await?.id.to_string()));
    }
    let mut page_query = query.clone();
    page_query.push(("limit", args.limit.clamp(1, 500).to_string()));
    let page: TimelinePage = client.get("/timeline", &page_query).await?;
    if args.out.json && !args.follow {
        let oldest_first: Vec<&TimelineEntry> = page.items.iter().rev().collect();
        print_json(&oldest_first)?;
        return Ok(0);
    }
    for e in page.items.iter().rev() {
        print_entry(e, args.out.json);
    }
    if args.follow {
        let json = args.out.json;
        follow::timeline(&client, &query, page.live_after, false, |e| {
            print_entry(e, json)
        })
        .await?;
    }
    Ok(0)
}

/// `unidesk nodes`.
/// Flags of `unidesk projects`.
#[derive(Debug, Args)]
pub struct ProjectsArgs {
    /// Make a project instead of listing them.
    #[command(subcommand)]
    command: Option<ProjectsCommand>,
    #[command(flatten)]
    conn: Conn,
    #[command(flatten)]
    out: Output,
}

/// What `unidesk projects` does besides listing.
#[derive(Debug, clap::Subcommand)]
pub enum ProjectsCommand {
    /// Make a project (admins only); you become its owner.
    Create {
        /// Its unique name.
        name: String,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        out: Output,
    },
}

/// `unidesk projects [create NAME]`.
pub(super) async fn projects(args: ProjectsArgs) -> Result<u8> {
    if let Some(ProjectsCommand::Create {
        name,
        description,
        conn,
        out,
    }) = args.command
    {
        let made: Value = conn
            .client()?
            .post(
                "/projects",
                &serde_json::json!({"name": name, "description": description}),
                None,
            )
            .await?;
        if out.json {
            print_json(&made)?;
        } else {
            outln!("project {} {}", text(&made["name"]), text(&made["id"]));
        }
        return Ok(0);
    }
    let projects = args.conn.client()?.projects().await?;
    if args.out.json {
        print_json(&projects)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = projects
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.id.to_string(),
                if p.archived { "archived" } else { "" }.to_string(),
            ]
        })
        .collect();
    print_table(&["NAME", "ID", ""], &rows);
    Ok(0)
}

pub(super) async fn nodes(conn: &Conn, out: Output) -> Result<u8> {
    let client = conn.client()?;
    let nodes: Vec<Value> = client.all("/nodes", &[]).await?;
    if out.json {
        print_json(&nodes)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let r = &n["resources"];
            let labels: Vec<String> = n["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect();
            let mut status = text(&n["status"]);
            if n["drained"] == Value::Bool(true) {
                status.push_str(",drained");
            }
            vec![
                text(&n["name"]),
                status,
                text(&r["cpus"]),
                r["memory_mb"]
                    .as_u64()
                    .map(|m| format!("{:.1}G", m as f64 / 1024.0))
                    .unwrap_or_else(|| "-".into()),
                r["gpus"]
                    .as_array()
                    .map(|g| g.len().to_string())
                    .unwrap_or_else(|| "-".into()),
                labels.join(","),
            ]
        })
        .collect();
    print_table(
        &["NAME", "STATUS", "CPUS", "MEMORY", "GPUS", "LABELS"],
        &rows,
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_attempts_reason_shows_its_first_line_and_says_when_more_follow() {
        assert_eq!(attempt_reason(&Value::Null), "");
        assert_eq!(attempt_reason(&json!("  ")), "");
        assert_eq!(
            attempt_reason(&json!("the node went offline")),
            ": the node went offline"
        );
        assert_eq!(
            attempt_reason(&json!("building the image failed:\nStep 1/3\nCOPY failed")),
            ": building the image failed: …"
        );
    }
}
