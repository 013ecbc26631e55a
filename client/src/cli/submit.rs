//! `unidesk submit`: a task from the checkout the user works in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::{print_json, task_exit_status, Conn, Output};
use crate::api::Client;
use crate::error::{Error, Result};
use crate::git;
use crate::project_file::{self, ProjectFile};

/// Flags of `unidesk submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The project (a name or an id; default: UNIDESK_PROJECT, then
    /// .unidesk.toml, then your only project).
    #[arg(long, short)]
    project: Option<String>,
    /// The environment's repository: a local checkout or a URL, with an
    /// optional @COMMIT (or @branch, @tag); default: UNIDESK_ENV, then
    /// .unidesk.toml, then the code's own checkout.
    #[arg(long, value_name = "DIR_OR_URL[@COMMIT]")]
    env: Option<String>,
    /// The Dockerfile's path in the env repository (default:
    /// UNIDESK_DOCKERFILE, then .unidesk.toml, then Dockerfile).
    #[arg(long)]
    dockerfile: Option<String>,
    /// The code checkout (default: the current directory).
    #[arg(long, short = 'C', value_name = "DIR")]
    code: Option<PathBuf>,
    /// The git remote nodes fetch the code from (default: the branch's
    /// upstream, else origin).
    #[arg(long)]
    remote: Option<String>,
    /// CPU cores, fractions allowed.
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory, such as 32G or 512M.
    #[arg(long)]
    memory: Option<String>,
    /// Whole GPUs.
    #[arg(long)]
    gpus: Option<i64>,
    /// A node label the task needs, key=value; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = pair)]
    labels: Vec<(String, String)>,
    /// Time limit of one attempt, such as 24h or 90m.
    #[arg(long)]
    timeout: Option<String>,
    /// Retries after a lost node.
    #[arg(long)]
    retries: Option<i64>,
    /// Scheduling priority, -1000 to 1000.
    #[arg(long, allow_negative_numbers = true)]
    priority: Option<i64>,
    /// An object of the project's store to download first,
    /// path-in-workspace=object; repeatable.
    #[arg(long = "input", value_name = "NAME=OBJECT", value_parser = pair)]
    inputs: Vec<(String, String)>,
    /// A workspace file to store when the command ends, name=path;
    /// repeatable.
    #[arg(long = "output", value_name = "NAME=PATH", value_parser = pair)]
    outputs: Vec<(String, String)>,
    /// An environment variable set from a project secret, VAR=secret;
    /// repeatable.
    #[arg(long = "secret-env", value_name = "VAR=SECRET", value_parser = pair)]
    secret_env: Vec<(String, String)>,
    /// An environment variable, VAR=value; repeatable.
    #[arg(long = "env-var", short = 'e', value_name = "VAR=VALUE", value_parser = pair)]
    env_vars: Vec<(String, String)>,
    /// `none` to run without network.
    #[arg(long)]
    network: Option<String>,
    /// Stream the output until the task ends, then exit with its status.
    #[arg(long, short)]
    follow: bool,
    #[command(flatten)]
    conn: Conn,
    #[command(flatten)]
    out: Output,
    /// The command to run, after `--`; empty runs the image's own.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn pair(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The project's id: `flag`, else `UNIDESK_PROJECT`, else the
/// `.unidesk.toml` of the repository `dir` is in, else the caller's only
/// project.
///
/// # Errors
/// [`Error::Usage`] when none of these names one; 404 for a name that is
/// not the caller's.
pub(super) async fn project(client: &Client, flag: Option<&str>, dir: &Path) -> Result<Uuid> {
    let from_file = || {
        let root = git::checkout(dir, None, None)
            .map(|c| c.root)
            .ok()
            .or_else(|| Some(dir.to_path_buf()))?;
        ProjectFile::load(&root).ok()?.project
    };
    let named = flag
        .map(str::to_string)
        .or_else(|| env_var("UNIDESK_PROJECT"))
        .or_else(from_file);
    if let Some(name) = named {
        return Ok(client.project(&name).await?.id);
    }
    let mine: Vec<_> = client
        .projects()
        .await?
        .into_iter()
        .filter(|p| !p.archived)
        .collect();
    match mine.as_slice() {
        [only] => Ok(only.id),
        [] => Err(Error::Usage(
            "you are in no project: ask a maintainer to add you to one".into(),
        )),
        many => Err(Error::Usage(format!(
            "which project? pass --project NAME, set UNIDESK_PROJECT, or put `project = \"NAME\"` \
             in .unidesk.toml (yours: {})",
            many.iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Warns on standard error that uncommitted changes will not run.
fn warn_uncommitted(c: &git::Checkout) {
    if !c.uncommitted.is_empty() {
        eprintln!(
            "warning: {} has {} uncommitted change(s) that will not run; the task runs commit {} \
             (commit and push them to include them):",
            c.root.display(),
            c.uncommitted.len(),
            &c.commit[..12.min(c.commit.len())]
        );
        for line in c.uncommitted.iter().take(10) {
            eprintln!("  {line}");
        }
    }
}

/// The env repository's URL and commit from `DIR_OR_URL[@COMMIT]`, a
/// directory relative to `base`.
fn resolve_env(spec: &str, base: &Path) -> Result<(String, String)> {
    let (what, rev) = git::split_rev(spec);
    let dir = base.join(what);
    if !what.contains("://") && dir.is_dir() {
        let c = git::checkout(&dir, rev, None)?;
        if rev.is_none() {
            warn_uncommitted(&c);
        }
        git::require_pushed(&c)?;
        return Ok((c.url, c.commit));
    }
    if !what.contains("://") && !what.contains(':') {
        return Err(Error::Usage(format!(
            "--env {spec:?}: no such directory, and not a repository URL"
        )));
    }
    Ok((what.to_string(), git::remote_commit(what, rev)?))
}

fn insert_map(body: &mut Map<String, Value>, key: &str, map: BTreeMap<String, String>) {
    if !map.is_empty() {
        body.insert(key.into(), json!(map));
    }
}

/// `unidesk submit`.
pub(super) async fn run(args: SubmitArgs) -> Result<u8> {
    let here = std::env::current_dir().map_err(|e| Error::Io(e.to_string()))?;
    let code_dir = args.code.clone().unwrap_or_else(|| here.clone());
    let file_probe = git::checkout(&code_dir, None, None).map(|c| c.root);
    let file = match &file_probe {
        Ok(root) => ProjectFile::load(root)?,
        Err(_) => ProjectFile::default(),
    };
    let remote = args.remote.clone().or(file.remote.clone());
    let code = git::checkout(&code_dir, None, remote.as_deref())?;
    warn_uncommitted(&code);
    git::require_pushed(&code)?;

    let client = args.conn.client()?;
    let project = project(&client, args.project.as_deref(), &code.root).await?;

    let (env_url, env_commit) = match (args.env.clone(), env_var("UNIDESK_ENV"), file.env.clone()) {
        (Some(spec), _, _) | (None, Some(spec), _) => resolve_env(&spec, &here)?,
        (None, None, Some(spec)) => resolve_env(&spec, &code.root)?,
        (None, None, None) => (code.url.clone(), code.commit.clone()),
    };
    let dockerfile = args
        .dockerfile
        .clone()
        .or_else(|| env_var("UNIDESK_DOCKERFILE"))
        .or(file.dockerfile.clone())
        .unwrap_or_else(|| "Dockerfile".into());

    let mut body = Map::new();
    body.insert("project_id".into(), json!(project));
    body.insert("code_repo_url".into(), json!(code.url));
    body.insert("code_commit_id".into(), json!(code.commit));
    body.insert("env_repo_url".into(), json!(env_url));
    body.insert("env_commit_id".into(), json!(env_commit));
    body.insert("dockerfile_path".into(), json!(dockerfile));
    if !args.command.is_empty() {
        body.insert("command".into(), json!(args.command));
    }
    let usage = |what: &str, e: String| Error::Usage(format!("{what}: {e}"));
    let mut resources = Map::new();
    if let Some(cpus) = args.cpus.or(file.cpus) {
        resources.insert("cpus".into(), json!(cpus));
    }
    let memory = match (&args.memory, &file.memory) {
        (Some(m), _) => Some(project_file::parse_memory(m).map_err(|e| usage("--memory", e))?),
        (None, Some(v)) => Some(
            project_file::parse_memory(&project_file::value_text(v))
                .map_err(|e| usage("memory in .unidesk.toml", e))?,
        ),
        (None, None) => None,
    };
    if let Some(m) = memory {
        resources.insert("memory_mb".into(), json!(m));
    }
    if let Some(g) = args.gpus.or(file.gpus) {
        resources.insert("gpus".into(), json!(g));
    }
    if !resources.is_empty() {
        body.insert("resources".into(), Value::Object(resources));
    }
    let timeout = match (&args.timeout, &file.timeout) {
        (Some(t), _) => Some(project_file::parse_duration(t).map_err(|e| usage("--timeout", e))?),
        (None, Some(v)) => Some(
            project_file::parse_duration(&project_file::value_text(v))
                .map_err(|e| usage("timeout in .unidesk.toml", e))?,
        ),
        (None, None) => None,
    };
    if let Some(t) = timeout {
        body.insert("timeout_s".into(), json!(t));
    }
    if let Some(r) = args.retries.or(file.retries) {
        body.insert("max_retries".into(), json!(r));
    }
    if let Some(p) = args.priority.or(file.priority) {
        body.insert("priority".into(), json!(p));
    }
    if let Some(n) = args.network.clone().or(file.network.clone()) {
        body.insert("network".into(), json!(n));
    }
    // Flags add to (and override) what the file says.
    let merged = |from_file: &BTreeMap<String, String>, flags: &[(String, String)]| {
        let mut m = from_file.clone();
        m.extend(flags.iter().cloned());
        m
    };
    insert_map(&mut body, "labels", merged(&file.labels, &args.labels));
    insert_map(&mut body, "env", merged(&file.env_vars, &args.env_vars));
    insert_map(
        &mut body,
        "env_secrets",
        merged(&file.secret_env, &args.secret_env),
    );
    let inputs = merged(&file.inputs, &args.inputs);
    if !inputs.is_empty() {
        let list: Vec<Value> = inputs
            .into_iter()
            .map(|(name, object)| json!({"name": name, "object": object}))
            .collect();
        body.insert("inputs".into(), Value::Array(list));
    }
    let outputs = merged(&file.outputs, &args.outputs);
    if !outputs.is_empty() {
        let list: Vec<Value> = outputs
            .into_iter()
            .map(|(name, path)| json!({"name": name, "path": path}))
            .collect();
        body.insert("outputs".into(), Value::Array(list));
    }

    let task = client.submit(&Value::Object(body)).await?;
    if args.out.json {
        print_json(&task)?;
    } else if args.follow {
        eprintln!(
            "unidesk: task {} queued: commit {} of {}",
            task.id,
            &code.commit[..12.min(code.commit.len())],
            code.url
        );
    } else {
        outln!("{}", task.id);
        eprintln!(
            "unidesk: task {} queued: commit {} of {}; follow it with `unidesk logs -f {}`",
            task.id,
            &code.commit[..12.min(code.commit.len())],
            code.url,
            task.id
        );
    }
    if !args.follow {
        return Ok(0);
    }
    let json = args.out.json;
    let ended = crate::follow::logs(&client, task.id, false, |data| {
        if json {
            outln!("{}", json!({ "data": data }));
        } else {
            super::out(data.as_bytes());
        }
    })
    .await?;
    super::show::report_end(&ended);
    Ok(task_exit_status(&ended))
}
