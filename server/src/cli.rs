//! The command line: flags with environment fallbacks, checked at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use sqlx::PgPool;

use crate::{dev, replay, roles};

/// UniDesk: a distributed work platform.
#[derive(Debug, Parser)]
#[command(name = "unidesk", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything on this machine: a private PostgreSQL under
    /// ./.unidesk (unless DATABASE_URL is set) and every role.
    Dev(dev::DevArgs),
    /// Run server roles against an existing database.
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate(DbArgs),
    /// Inspect or rebuild the read models.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Manage compute nodes.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Print an aggregate's state event by event, or check that this build
    /// can apply every stored event (--check).
    Replay {
        #[command(flatten)]
        args: replay::ReplayArgs,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Export the event log as a file, or import one into another database.
    Events {
        #[command(subcommand)]
        command: replay::EventsCommand,
    },
    /// Files in a project's store (`put`), or the S3-compatible object
    /// store itself served alone (`serve`).
    Objects {
        /// Which.
        #[command(subcommand)]
        command: ObjectsCommand,
    },
    /// The user commands: sign in, submit, follow, fetch.
    #[command(flatten)]
    User(unidesk_client::cli::Command),
    /// Print shell completions: bash, zsh, fish, elvish or powershell.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum ObjectsCommand {
    /// Upload a file into a project's store through presigned URLs:
    /// multipart, resumable, checked by SHA-256.
    Put(unidesk_client::cli::PutArgs),
    /// Serve the S3-compatible object store alone (the one `dev` embeds),
    /// keeping objects under --dir.
    Serve(crate::objects_server::ObjectsArgs),
}

/// A user command, which talks to a server over its API rather than to a
/// database, and ends with an exit status of its own.
#[derive(Debug)]
pub enum UserCommand {
    /// One of the client's commands.
    Client(unidesk_client::cli::Command),
    /// `objects put`.
    Put(unidesk_client::cli::PutArgs),
    /// `completions SHELL`.
    Completions(clap_complete::Shell),
}

impl Cli {
    /// The user command this is, or the command line back when it is an
    /// admin or server command.
    ///
    /// # Errors
    /// `self`, when it is not a user command.
    pub fn into_user(self) -> Result<UserCommand, Box<Cli>> {
        match self.command {
            Command::User(c) => Ok(UserCommand::Client(c)),
            Command::Objects {
                command: ObjectsCommand::Put(args),
            } => Ok(UserCommand::Put(args)),
            Command::Completions { shell } => Ok(UserCommand::Completions(shell)),
            command => Err(Box::new(Cli { command })),
        }
    }
}

/// Runs a user command; its exit status says how it went (0 ok, 1 the
/// task failed, 2 usage, 3 not found or forbidden, 4 unreachable).
pub async fn run_user(command: UserCommand) -> std::process::ExitCode {
    match command {
        UserCommand::Client(c) => unidesk_client::cli::run(c).await,
        UserCommand::Put(args) => unidesk_client::cli::run_put(args).await,
        UserCommand::Completions(shell) => {
            use clap::CommandFactory;
            unidesk_client::cli::completions(shell, &mut Cli::command(), "unidesk");
            std::process::ExitCode::SUCCESS
        }
    }
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Provision a node and print its agent's token (shown once).
    Add {
        /// The node's unique name, such as gpu-3.
        name: String,
        /// A label tasks can select the node by, as key=value; repeatable.
        /// Only these count for placement: labels the agent declares wait
        /// for an admin to accept them.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// The most CPU cores the node may claim, whatever its agent
        /// declares.
        #[arg(long)]
        max_cpus: Option<f64>,
        /// The most memory in MiB the node may claim.
        #[arg(long)]
        max_memory_mb: Option<i64>,
        /// How many of the GPUs the agent declares count (the first ones).
        #[arg(long)]
        max_gpus: Option<i64>,
        #[command(flatten)]
        db: DbArgs,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

#[derive(Debug, Subcommand)]
enum ProjectionsCommand {
    /// Drop read models and rebuild them from the event log.
    Rebuild {
        /// Only this read model (tasks, nodes, projects, users, timeline).
        name: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Show each read model's checkpoint, lag and dead letters (events an
    /// outbox consumer could not apply), the oldest open transaction and
    /// the database's size against its budget.
    Status {
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Try dead letters again once their cause is fixed: events that apply
    /// now are applied and their dead letters removed. Exits with status 1
    /// while some remain.
    Retry {
        /// Only this consumer (tasks, nodes, projects, users, timeline,
        /// ingress).
        name: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
}

/// Where the database is.
#[derive(Debug, Args)]
pub struct DbArgs {
    /// PostgreSQL connection URL. Defaults to the private cluster of a
    /// `unidesk dev` running in this directory.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// The roles a `serve` process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// REST API and web views.
    Api,
    /// Read models from the outbox.
    Projector,
    /// Agent WebSockets at /agent/v1/ws.
    Ingress,
    /// Placement, liveness and timeouts (one leader at a time).
    Scheduler,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Api, Role::Projector, Role::Ingress, Role::Scheduler];
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Which roles to run.
    #[arg(
        long,
        env = "UNIDESK_ROLES",
        value_delimiter = ',',
        default_value = "api,projector,ingress,scheduler"
    )]
    roles: Vec<Role>,
    /// Where the API and the agents' WebSocket listen, and `/healthz`,
    /// `/readyz` and `/metrics` whatever the roles.
    #[arg(long, env = "UNIDESK_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    server: roles::ServerArgs,
    /// Where to write a bootstrap admin token when no admin exists yet.
    #[arg(long, env = "UNIDESK_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

/// How long start-up waits for the database to accept a connection.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Connects to `url` with a server process's pool
/// ([`store::pool_options`]: requests wait little for a connection), waiting
/// up to [`CONNECT_WAIT`] at start-up for a database that is still coming
/// up.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    connect_with(url, store::pool_options()).await
}

/// [`connect`] for `serve` and `dev`: every connection of the pool also
/// gets `timeouts` ([`store::with_session_timeouts`]), so that nothing of
/// the server's own can hold the outbox consumers back for long.
pub async fn connect_server(url: &str, timeouts: store::SessionTimeouts) -> anyhow::Result<PgPool> {
    connect_with(
        url,
        store::with_session_timeouts(store::pool_options(), timeouts),
    )
    .await
}

async fn connect_with(url: &str, options: sqlx::postgres::PgPoolOptions) -> anyhow::Result<PgPool> {
    let pool = options
        .connect_lazy(url)
        .context("reading the database URL")?;
    let deadline = tokio::time::Instant::now() + CONNECT_WAIT;
    loop {
        match pool.acquire().await {
            Ok(_) => return Ok(pool),
            Err(e) if store::is_unavailable(&e) && tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "waiting for PostgreSQL");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).context("connecting to PostgreSQL"),
        }
    }
}

/// The database URL from the flag, the environment, or a `unidesk dev`
/// running in this directory.
fn database_url(db: &DbArgs) -> anyhow::Result<String> {
    if let Some(url) = &db.database_url {
        return Ok(url.clone());
    }
    match dev::running_url(std::path::Path::new(dev::DEFAULT_DIR))? {
        Some(url) => Ok(url),
        None => bail!(
            "no database: pass --database-url or set DATABASE_URL, \
             or run this in a directory where `unidesk dev` is running"
        ),
    }
}

/// Runs the chosen command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Objects {
            command: ObjectsCommand::Serve(args),
        } => crate::objects_server::run(args).await,
        Command::User(_)
        | Command::Completions { .. }
        | Command::Objects {
            command: ObjectsCommand::Put(_),
        } => bail!("a user command: run it with run_user"),
        Command::Serve(args) => {
            let pool =
                connect_server(&database_url(&args.db)?, args.server.session_timeouts()).await?;
            store::migrate(&pool).await.context("applying migrations")?;
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("listening on {}", args.listen))?;
            let store = store::Store::new(pool.clone());
            if let Some(file) = &args.admin_token_file {
                api::bootstrap_admin(&store, file)
                    .await
                    .context("creating the bootstrap admin token")?;
                eprintln!("admin token in {}", file.display());
            }
            let mut server = args.server.clone();
            server.objects = crate::objects::connect(&server.s3).await?;
            if let Some(file) = &server.secrets_key_file {
                let key = store::secrets::SecretsKey::load(file)?;
                tracing::info!(key_id = key.id(), "project secrets sealed with this key");
                server.secrets_key = Some(key);
            }
            let services = roles::start(store, listener, &args.roles, &server)?;
            tracing::info!(listen = %args.listen, roles = ?args.roles, "serving");
            roles::shutdown_signal().await;
            services.stop().await;
            pool.close().await;
            Ok(())
        }
        Command::Migrate(db) => {
            let pool = connect(&database_url(&db)?).await?;
            store::migrate(&pool).await.context("applying migrations")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Node {
            command:
                NodeCommand::Add {
                    name,
                    labels,
                    max_cpus,
                    max_memory_mb,
                    max_gpus,
                    db,
                },
        } => {
            let pool = connect(&database_url(&db)?).await?;
            let store = store::Store::new(pool);
            let actor = domain::Actor::System("cli".into());
            let max = domain::node::ResourceLimitsDraft {
                cpus: max_cpus,
                memory_mb: max_memory_mb,
                gpus: max_gpus,
            };
            let (node, token) = api::provision_node_with_limits(
                &store,
                &name,
                labels.into_iter().collect(),
                max,
                &actor,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.detail()))
            .context("provisioning the node")?;
            println!(
                "node {name} provisioned with id {}",
                node.id.unwrap_or_default()
            );
            println!("token (shown once): {token}");
            // The token goes in a file: on a command line every user of
            // the node could read it in the process list.
            println!(
                "run on the node, with the token in a file only its agent reads: \
                 unidesk-agent --server <the server's ws:// or wss:// address> --token-file <file>"
            );
            Ok(())
        }
        Command::Replay { args, db } => {
            let pool = connect(&database_url(&db)?).await?;
            replay::run_replay(args, &pool).await
        }
        Command::Events { command } => {
            let pool = connect(&database_url(command.db())?).await?;
            replay::run_events(command, &pool).await
        }
        Command::Projections { command } => match command {
            ProjectionsCommand::Rebuild { name, db } => {
                let pool = connect(&database_url(&db)?).await?;
                let projector = projections::Projector::new(pool);
                let r = projector.rebuild_report(name.as_deref()).await?;
                println!(
                    "rebuilt {} from {} events ({} event applications) in {:.2} s \
                     (indexes {:.2} s); readers switched to the new content in {:.3} s",
                    name.as_deref().unwrap_or("all read models"),
                    r.events,
                    r.applications,
                    (r.build + r.switch).as_secs_f64(),
                    r.indexes.as_secs_f64(),
                    r.switch.as_secs_f64()
                );
                Ok(())
            }
            ProjectionsCommand::Status { json, db } => {
                let pool = connect(&database_url(&db)?).await?;
                crate::status::print(&pool, json).await
            }
            ProjectionsCommand::Retry { name, db } => {
                let pool = connect(&database_url(&db)?).await?;
                crate::status::retry(&pool, name.as_deref()).await
            }
        },
    }
}
