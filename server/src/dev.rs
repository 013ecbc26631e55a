//! `unidesk dev`: the whole platform on one machine with zero set-up.
//!
//! A private PostgreSQL cluster is created under `./.unidesk/pg` with the
//! system's `initdb` (unless `DATABASE_URL` is given), migrations are
//! applied, a bootstrap admin token is written to `./.unidesk/admin.token`,
//! and every role runs until Ctrl-C, which stops PostgreSQL too. The next
//! start finds all data again.
//!
//! Everything under `./.unidesk` — the database, the tokens, the stored
//! objects, the agent's work — is for its owner only: the process runs
//! with umask 077, so whatever it (or PostgreSQL, or the object store)
//! creates later is too, and at start the permissions of a directory left
//! by an older version are narrowed to directories 0700 and files 0600
//! (executable bits of the owner kept). The agent's directory,
//! `./.unidesk/agent`, is narrowed itself but not walked: the agent sets
//! the modes below it (a task's workspace is open to its container,
//! whatever user that runs as, inside directories that are the agent's
//! alone), and a task's files are not for this walk to follow or change.
//! Run as root, PostgreSQL runs as the `postgres` user and must reach
//! `./.unidesk/pg`: the top directory then belongs to the `postgres` group
//! with mode 0710 (enter, not list or read), and stays closed to
//! everybody else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::cli::{connect_server, Role};
use crate::roles::{self, ServerArgs};

/// Where `dev` keeps its state, relative to the working directory.
pub const DEFAULT_DIR: &str = ".unidesk";

/// The embedded agent's work directory, in `dev`'s.
const AGENT_DIR: &str = "agent";

/// Flags of `unidesk dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the web UI and API listen.
    #[arg(long, env = "UNIDESK_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where to keep the database, tokens and objects.
    #[arg(long, env = "UNIDESK_DEV_DIR", default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Use this database instead of a private cluster.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Refuse `file://` repository URLs (allowed by default in dev, so
    /// local repositories work).
    #[arg(long)]
    no_file_urls: bool,
    /// Let every user create projects (by default only admins may).
    #[arg(long, env = "UNIDESK_USERS_CREATE_PROJECTS")]
    users_create_projects: bool,
    /// How often outbox consumers poll when no NOTIFY arrives, in ms.
    #[arg(long, env = "UNIDESK_POLL_MS", default_value_t = 250)]
    poll_ms: u64,
    /// Start no local agent (tasks then wait for nodes to join).
    #[arg(long)]
    no_agent: bool,
    /// Where the embedded S3-compatible object store listens (it keeps
    /// objects under `<dir>/objects`); port 0 picks a free one. Presigned
    /// URLs name this address, so nodes and users must reach it.
    #[arg(long, env = "UNIDESK_OBJECTS_LISTEN", default_value = "127.0.0.1:0")]
    objects_listen: SocketAddr,
    /// The address presigned URLs name instead of --objects-listen, such
    /// as http://my-laptop.lan:9000, when users and nodes reach the store
    /// through another name, a port forward or a proxy.
    #[arg(long, env = "UNIDESK_OBJECTS_PUBLIC_URL", value_name = "URL")]
    objects_public_url: Option<String>,
}

/// The bucket of the embedded object store.
pub const DEV_BUCKET: &str = "unidesk";

/// Starts the embedded object store under `dir/objects` on `listen`;
/// returns the store's client and the task serving it.
async fn embedded_objects(
    dir: &Path,
    listen: SocketAddr,
    public_url: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(objects::ObjectStore, tokio::task::JoinHandle<()>)> {
    let (access, secret) = objects::embedded::fresh_credentials();
    let embedded =
        objects::embedded::Embedded::new(&dir.join("objects"), DEV_BUCKET, &access, secret)
            .context("preparing the embedded object store")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!("the object store cannot listen on {listen} (--objects-listen)")
        })?;
    let bound = listener.local_addr()?;
    let host = if bound.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        bound.ip()
    };
    let endpoint = format!("http://{}", SocketAddr::new(host, bound.port()));
    let mut config =
        embedded.client_config(&endpoint, crate::objects::S3Args::defaults().url_ttl());
    config.public_endpoint = public_url.map(|u| u.trim_end_matches('/').to_string());
    let store = objects::ObjectStore::new(&config).context("the embedded object store")?;
    let handle = tokio::spawn(async move {
        if let Err(e) = embedded.run(listener, shutdown).await {
            tracing::error!(error = %e, "the embedded object store stopped");
        }
    });
    Ok((store, handle))
}

/// The name of the node `dev` runs on this machine.
pub const LOCAL_NODE: &str = "local";

/// Joins this machine as node `local` through a real WebSocket to this very
/// server, exactly as any other node joins. Its token is kept in
/// `dir/node.token`. Without Docker the platform still runs, without a node.
async fn local_agent(
    store: &store::Store,
    dir: &Path,
    listen: SocketAddr,
) -> Option<tokio::task::JoinHandle<()>> {
    match start_local_agent(store, dir, listen).await {
        Ok(handle) => Some(handle),
        Err(e) => {
            eprintln!("no local agent: {e:#}; tasks will wait for a node to join");
            None
        }
    }
}

async fn start_local_agent(
    store: &store::Store,
    dir: &Path,
    listen: SocketAddr,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use node_agent::connection::{self, Agent, Token};
    let docker = node_agent::docker::connect(None)
        .await
        .context("connecting to Docker")?;
    let token_file = dir.join("node.token");
    let token = match std::fs::read_to_string(&token_file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let (_, token) = api::provision_node(
                store,
                LOCAL_NODE,
                [("host".to_string(), "dev".to_string())].into(),
                &domain::Actor::System("dev".into()),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.detail()))
            .context("provisioning the local node")?;
            write_private(&token_file, &token)?;
            token
        }
    };
    let ctx = node_agent::executor::Context::new(docker, &dir.join(AGENT_DIR))
        .context("preparing the local agent's work directory")?;
    let host = if listen.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        listen.ip()
    };
    let config = connection::Config {
        server: connection::server_address(&format!(
            "ws://{}",
            SocketAddr::new(host, listen.port())
        ))?,
        token: Token::new(&token),
        tls: connection::tls_config(None)?,
        labels: Default::default(),
        resources: node_agent::resources::detect(),
        reconnect_min: std::time::Duration::from_millis(200),
        reconnect_max: std::time::Duration::from_secs(5),
    };
    let agent = Agent::new(config, std::sync::Arc::new(ctx)).context("starting the local agent")?;
    Ok(tokio::spawn(async move {
        let refused = agent.run().await;
        eprintln!("the local agent stopped: {refused}");
    }))
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// The URL of the private cluster of a `dev` running in `dir`, if any.
///
/// # Errors
/// When the cluster's files exist but cannot be read.
pub fn running_url(dir: &Path) -> anyhow::Result<Option<String>> {
    pgcluster::running_url(&dir.join("pg")).context("reading the dev cluster's settings")
}

/// Creates `dir` if needed and closes it and everything under it to anyone
/// but its owner (see the module's documentation for root).
fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    make_private(dir, &dir.join(AGENT_DIR))
        .with_context(|| format!("restricting the permissions under {}", dir.display()))?;
    #[cfg(unix)]
    if nix::unistd::geteuid().is_root() {
        use std::os::unix::fs::PermissionsExt;
        if let Some(group) = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .map(|u| u.gid)
        {
            nix::unistd::chown(dir, None, Some(group))
                .with_context(|| format!("giving {} to the postgres group", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))
                .with_context(|| format!("setting permissions of {}", dir.display()))?;
        }
    }
    Ok(())
}

/// Removes every group and other permission from `path` and everything
/// under it but what is under `unwalked`, and gives directories back their
/// owner's full access. Symbolic links are neither followed nor changed;
/// entries that vanish meanwhile (a running PostgreSQL removes files as it
/// likes) are skipped.
fn make_private(path: &Path, unwalked: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::io::ErrorKind::NotFound;
        use std::os::unix::fs::PermissionsExt;
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        let mode = meta.permissions().mode() & 0o7777;
        let wanted = if meta.is_dir() { 0o700 } else { mode & 0o700 };
        if mode != wanted {
            match std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted)) {
                Err(e) if e.kind() != NotFound => return Err(e),
                _ => {}
            }
        }
        if meta.is_dir() && path != unwalked {
            let entries = match std::fs::read_dir(path) {
                Ok(entries) => entries,
                Err(e) if e.kind() == NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for entry in entries {
                make_private(&entry?.path(), unwalked)?;
            }
        }
    }
    Ok(())
}

/// Makes everything this process creates from now on its owner's only.
fn private_umask() {
    #[cfg(unix)]
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Takes the directory for this process until the returned file is
/// dropped. A second `unidesk dev` on the same directory would share its
/// database, run a second agent under the same node token, and stop the
/// database under the first when it ends: it is refused, naming the
/// process that holds the directory.
fn hold_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use node_agent::dir_lock::{by_process, hold, HoldError};
    hold(dir, "dev.lock").map_err(|e| match e {
        HoldError::Held { holder, .. } => anyhow::anyhow!(
            "another unidesk dev is running in {}{}: stop it first, or start this one in another directory",
            dir.display(),
            by_process(holder)
        ),
        e @ HoldError::Io { .. } => anyhow::Error::new(e).context("locking the directory"),
    })
}

/// Runs the platform until Ctrl-C.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    private_umask();
    ensure_private_dir(&args.dir)?;
    let _only_one = hold_dir(&args.dir)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another unidesk running? choose another with --listen)",
                args.listen
            )
        })?;
    let (url, cluster) = match &args.database_url {
        Some(url) => (url.clone(), None),
        None => {
            eprintln!(
                "starting PostgreSQL under {}",
                args.dir.join("pg").display()
            );
            let cluster = pgcluster::LocalCluster::start(&args.dir.join("pg"))
                .await
                .context("starting the private PostgreSQL cluster")?;
            (cluster.url(), Some(cluster))
        }
    };
    let result = serve(&args, listener, &url).await;
    if let Some(cluster) = cluster {
        eprintln!("stopping PostgreSQL");
        cluster.stop().await.context("stopping PostgreSQL")?;
    }
    result
}

async fn serve(args: &DevArgs, listener: tokio::net::TcpListener, url: &str) -> anyhow::Result<()> {
    let pool = connect_server(url, ServerArgs::defaults().session_timeouts()).await?;
    store::migrate(&pool).await.context("applying migrations")?;
    let store = store::Store::new(pool.clone());
    let token_file = args.dir.join("admin.token");
    let token = api::bootstrap_admin(&store, &token_file)
        .await
        .context("creating the bootstrap admin token")?;
    let (stop_objects, objects_stopped) = tokio::sync::oneshot::channel::<()>();
    let (objects, objects_task) = embedded_objects(
        &args.dir,
        args.objects_listen,
        args.objects_public_url.as_deref(),
        async {
            let _ = objects_stopped.await;
        },
    )
    .await?;
    let objects_endpoint = objects.public_url();
    let secrets_key = store::secrets::SecretsKey::create(&args.dir.join("secrets.key"))?;
    let server = ServerArgs {
        secrets_key: Some(secrets_key),
        allow_file_urls: !args.no_file_urls,
        users_create_projects: args.users_create_projects,
        poll_ms: args.poll_ms,
        objects: Some(objects),
        ..ServerArgs::defaults()
    };
    let services = roles::start(store.clone(), listener, &Role::ALL, &server)?;
    let agent = if args.no_agent {
        None
    } else {
        local_agent(&store, &args.dir, args.listen).await
    };
    println!("UniDesk is running at http://{}", args.listen);
    println!(
        "object store (S3, objects under {}): {objects_endpoint}",
        args.dir.join("objects").display()
    );
    println!("admin token: {token}");
    println!(
        "(also in {}; Ctrl-C stops everything)",
        token_file.display()
    );
    roles::shutdown_signal().await;
    eprintln!("shutting down");
    if let Some(agent) = agent {
        agent.abort();
    }
    services.stop().await;
    let _ = stop_objects.send(());
    let _ = objects_task.await;
    pool.close().await;
    Ok(())
}
