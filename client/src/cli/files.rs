//! `unidesk objects put` and `unidesk artifacts`: files to and from the
//! object store, with progress on a terminal.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use uuid::Uuid;

use super::{print_json, print_table, Conn, Output};
use crate::error::{Error, Result};
use crate::transfer::{self, Bar, Progress, Silent};

/// Flags of `unidesk objects put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// The file to upload.
    file: PathBuf,
    /// Its name in the project's store (tasks name it as an input), such
    /// as datasets/train.tar.
    name: String,
    /// The project (a name or an id; default: UNIDESK_PROJECT, the
    /// repository's .unidesk.toml, or your only project).
    #[arg(long, short)]
    project: Option<String>,
    /// No progress bar, even on a terminal.
    #[arg(long, short)]
    quiet: bool,
    /// Where the server is.
    #[command(flatten)]
    conn: Conn,
    /// How to print.
    #[command(flatten)]
    out: Output,
}

fn progress(quiet: bool) -> Box<dyn Progress> {
    if quiet {
        Box::new(Silent)
    } else {
        Box::new(Bar::new())
    }
}

/// `unidesk objects put FILE NAME`.
pub(super) async fn put(args: PutArgs) -> Result<u8> {
    let client = args.conn.client()?;
    let here = std::env::current_dir().map_err(|e| Error::Io(e.to_string()))?;
    let project = super::submit::project(&client, args.project.as_deref(), &here).await?;
    if !args.file.is_file() {
        return Err(Error::Usage(format!(
            "{} is not a file",
            args.file.display()
        )));
    }
    let bar = progress(args.quiet);
    let done = transfer::upload(&client, project, &args.file, &args.name, bar.as_ref()).await?;
    if args.out.json {
        print_json(&done)?;
    } else {
        let resumed = if done.parts_resumed > 0 {
            format!(
                " (resumed: {} part(s) were sent before)",
                done.parts_resumed
            )
        } else {
            String::new()
        };
        outln!(
            "{} stored: {} bytes, sha256 {}{resumed}",
            done.object.name,
            done.object.size,
            done.object.sha256
        );
    }
    Ok(0)
}

/// `unidesk artifacts …`.
#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// List a task's stored outputs.
    List {
        /// The task's id.
        task: Uuid,
        /// Where the server is.
        #[command(flatten)]
        conn: Conn,
        /// How to print.
        #[command(flatten)]
        out: Output,
    },
    /// Download a task's outputs (all, or the one named), checked by
    /// SHA-256; a cut-off download continues where it stopped.
    Get {
        /// The task's id.
        task: Uuid,
        /// Only this output.
        name: Option<String>,
        /// Where to put them (created when missing).
        #[arg(long, short, default_value = ".")]
        output: PathBuf,
        /// No progress bar, even on a terminal.
        #[arg(long, short)]
        quiet: bool,
        /// Where the server is.
        #[command(flatten)]
        conn: Conn,
        /// How to print.
        #[command(flatten)]
        out: Output,
    },
}

/// Runs an artifacts command.
pub(super) async fn artifacts(command: ArtifactsCommand) -> Result<u8> {
    match command {
        ArtifactsCommand::List { task, conn, out } => {
            let client = conn.client()?;
            let list = client.artifacts(task).await?;
            if out.json {
                print_json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|a| {
                        vec![
                            a.name.clone(),
                            a.attempt.to_string(),
                            a.size.to_string(),
                            a.sha256.clone(),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "ATTEMPT", "BYTES", "SHA256"], &rows);
            }
            Ok(0)
        }
        ArtifactsCommand::Get {
            task,
            name,
            output,
            quiet,
            conn,
            out,
        } => {
            let client = conn.client()?;
            let mut list = client.artifacts(task).await?;
            // The latest attempt's output of each name.
            list.sort_by(|a, b| a.name.cmp(&b.name).then(b.attempt.cmp(&a.attempt)));
            list.dedup_by(|a, b| a.name == b.name);
            if let Some(wanted) = &name {
                list.retain(|a| &a.name == wanted);
                if list.is_empty() {
                    return Err(Error::Refused {
                        status: 404,
                        problems: vec![crate::error::Problem {
                            detail: format!("task {task} has no stored output named {wanted:?}"),
                            field: Some("name".into()),
                        }],
                    });
                }
            }
            let bar = progress(quiet);
            let mut done = Vec::new();
            for a in &list {
                if a.name.contains(['/', '\\']) || a.name == "." || a.name == ".." {
                    return Err(Error::Other(format!(
                        "the server named an output {:?} that is no plain file name",
                        a.name
                    )));
                }
                let dest = output.join(&a.name);
                let url = client.download_url(&a.download).await?;
                transfer::download(&client, &url, &dest, a.size, &a.sha256, bar.as_ref()).await?;
                if !out.json {
                    outln!("{} ({} bytes, sha256 {})", dest.display(), a.size, a.sha256);
                }
                done.push(serde_json::json!({
                    "name": a.name, "path": dest, "size": a.size, "sha256": a.sha256,
                    "attempt": a.attempt
                }));
            }
            if out.json {
                print_json(&done)?;
            }
            Ok(0)
        }
    }
}
