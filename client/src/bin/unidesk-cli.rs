//! `unidesk-cli`: the user commands of `unidesk` alone, in a small binary
//! without the server.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// UniDesk from the command line: submit, follow, fetch.
#[derive(Debug, Parser)]
#[command(name = "unidesk-cli", version)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    #[command(flatten)]
    User(unidesk_client::cli::Command),
    /// Files in a project's store.
    Objects {
        #[command(subcommand)]
        command: Objects,
    },
    /// Print shell completions: bash, zsh, fish, elvish or powershell.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum Objects {
    /// Upload a file into the project's store (resumable, checked by
    /// SHA-256).
    Put(unidesk_client::cli::PutArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Top::User(command) => unidesk_client::cli::run(command).await,
        Top::Objects {
            command: Objects::Put(args),
        } => unidesk_client::cli::run_put(args).await,
        Top::Completions { shell } => {
            unidesk_client::cli::completions(shell, &mut Cli::command(), "unidesk-cli");
            ExitCode::SUCCESS
        }
    }
}
