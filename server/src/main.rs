//! `unidesk`: the UniDesk server and its admin tools.
//!
//! One binary runs any set of the stateless roles (`serve --roles
//! api,projector`), a whole single-machine platform (`dev`), schema
//! migrations (`migrate`) and read-model maintenance (`projections`).

use clap::Parser;
use unidesk::cli;

/// The server allocates and frees many small buffers per request, event
/// and frame (JSON documents, rows, protocol messages); mimalloc does that
/// in a fraction of the time glibc's allocator took under load (see
/// BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = match cli::Cli::parse().into_user() {
        Ok(user) => return cli::run_user(user).await,
        Err(cli) => *cli,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
