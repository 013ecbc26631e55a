//! A private PostgreSQL cluster on this machine, for `unidesk dev` and the
//! tests.
//!
//! The cluster is made with the system's own `initdb` and run with `pg_ctl`.
//! It listens only on 127.0.0.1, on a port chosen on first start and reused
//! afterwards, and accepts only password logins for the superuser `unidesk`,
//! whose random password lives in a 0600 file beside the data.
//!
//! PostgreSQL refuses to run as root, so a root process runs every server
//! program as the `postgres` system user and hands the directory to it.
//!
//! A cluster directory holds:
//! - `data/`: the PostgreSQL data directory;
//! - `password`: the superuser's password;
//! - `port`: the TCP port of the last start;
//! - `server.log`: the server's log;
//! - `lock`: held while a process starts the cluster, so that two starts of
//!   one directory do not race;
//! - the unix socket, when the path is short enough for one (otherwise it
//!   lives in `/tmp/unidesk-pg-<hash>`).

use std::ffi::CString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::unistd::{Gid, Uid, User};
use sqlx::{Connection, PgConnection};
use tracing::{debug, info};

/// The superuser the cluster is created with.
const SUPERUSER: &str = "unidesk";
/// The database created for the application.
const DATABASE: &str = "unidesk";
/// Longest directory for the unix socket: `sun_path` holds 108 bytes,
/// and `/.s.PGSQL.NNNNN` and a terminating zero need 16 of them.
const MAX_SOCKET_DIR_LEN: usize = 90;
/// How many times a start tries when the port turns out to be taken or an
/// earlier server's backends are still on their way out.
const START_ATTEMPTS: usize = 5;
/// Seconds `pg_ctl` waits for the server to start or stop.
const PG_CTL_TIMEOUT_SECS: &str = "120";

/// The shell script of the watchdog that ties an ephemeral cluster to the
/// life of the process that started it. It waits until its stdin, a pipe
/// whose only writer is that process, reaches end of file (the process
/// dropped the cluster or exited, however it exited), then stops the server
/// and deletes the directory. Arguments: pg_ctl, data directory, cluster
/// directory. Hang-ups and Ctrl-C from a terminal are ignored: it runs in a
/// process group of its own, and only the pipe decides when it acts.
const WATCHDOG_SCRIPT: &str = r#"trap '' HUP INT
cat >/dev/null
"$1" stop -D "$2" -m immediate -w -t 60 >/dev/null 2>&1
rm -rf -- "$3"
"#;

/// Why a local cluster could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No PostgreSQL server programs on this machine.
    #[error(
        "initdb not found: install the PostgreSQL server (Debian/Ubuntu: apt-get install postgresql)"
    )]
    InitdbNotFound,
    /// `initdb` was found, but a program that belongs next to it was not.
    #[error(
        "{program} not found in {dir} next to initdb: the PostgreSQL server installation is incomplete (Debian/Ubuntu: apt-get install --reinstall postgresql)"
    )]
    ProgramMissing {
        /// The missing program.
        program: &'static str,
        /// The directory that holds `initdb`.
        dir: PathBuf,
    },
    /// The data directory was made by another major version than the
    /// server programs found.
    #[error(
        "the cluster in {data} was made by PostgreSQL {data_version}, but the server programs in {bin_dir} are version {found}: install PostgreSQL {data_version}, or move the directory away to start afresh"
    )]
    VersionMismatch {
        /// The data directory.
        data: PathBuf,
        /// The major version recorded in the data directory.
        data_version: String,
        /// The major version of the programs found.
        found: String,
        /// Where the programs were found.
        bin_dir: PathBuf,
    },
    /// Running as root, but there is no `postgres` user to run the server as.
    #[error(
        "no `postgres` user: PostgreSQL refuses to run as root, so a root process runs it as the `postgres` system user; create it (installing the PostgreSQL server does) or run as an ordinary user"
    )]
    NoPostgresUser,
    /// Looking up the `postgres` user failed.
    #[error("looking up the `postgres` user: {0}")]
    UserLookup(#[source] nix::Error),
    /// A directory on the way to the cluster is closed to the `postgres`
    /// user, who runs the server when we are root.
    #[error(
        "the `{user}` user cannot enter {dir}: PostgreSQL runs as `{user}` when started by root, so every directory above the cluster must be searchable by it; run `chmod o+x {dir}` or put the cluster elsewhere"
    )]
    NotTraversable {
        /// The user the server runs as.
        user: String,
        /// The first directory the user cannot enter.
        dir: PathBuf,
    },
    /// The directory holds a cluster but not its password file.
    #[error(
        "{0} is missing: the cluster's superuser password is unknown; restore the file, or delete the cluster directory to start afresh"
    )]
    PasswordMissing(PathBuf),
    /// The socket directory under /tmp exists but belongs to someone else.
    #[error(
        "{0} belongs to another user: it is the unix socket directory of this cluster; remove it or use a shorter cluster path"
    )]
    ForeignSocketDir(PathBuf),
    /// A file-system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A program could not be run at all.
    #[error("running {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A program ran and failed.
    #[error("{command} failed ({status}):\n{output}")]
    Command {
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// Its standard error and output.
        output: String,
    },
    /// The server did not start.
    #[error("PostgreSQL did not start; the end of {log}:\n{tail}")]
    StartFailed {
        /// The server log.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// A halted server could not have its port back: something else took
    /// it while the server was down.
    #[error("port {0} of the halted PostgreSQL was taken while it was down")]
    PortTaken(u16),
    /// The server runs but does not accept our connection.
    #[error("connecting to the local cluster on 127.0.0.1:{port}: {source}")]
    Connect {
        /// The server's port.
        port: u16,
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },
    /// Creating the `unidesk` database failed.
    #[error("creating the `unidesk` database: {0}")]
    CreateDatabase(#[source] sqlx::Error),
}

/// How to run a local cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Skip every fsync: `initdb --no-sync` and `fsync`, `synchronous_commit`
    /// and `full_page_writes` off. Much faster, and a crash of the machine
    /// can corrupt the cluster: for throwaway clusters (tests) only.
    pub no_sync: bool,
    /// The server's `max_connections`.
    pub max_connections: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            no_sync: false,
            max_connections: 200,
        }
    }
}

/// How [`LocalCluster::halt`] stops the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// `pg_ctl stop -m fast`: open sessions are ended and the server shuts
    /// down cleanly, as an operator's restart does.
    Fast,
    /// `pg_ctl stop -m immediate`: the server stops at once, as in a
    /// crash, and the next start recovers from the write-ahead log.
    Immediate,
}

/// A running private PostgreSQL cluster.
///
/// Dropping a cluster made by [`LocalCluster::start`] leaves the server
/// running (a later start reuses it); call [`LocalCluster::stop`] to stop it.
/// A cluster made by [`LocalCluster::start_ephemeral`] stops and disappears
/// when it is dropped or when the process exits, whichever comes first.
pub struct LocalCluster {
    root: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    bins: Bins,
    run_as: Option<RunAs>,
    port: u16,
    password: String,
    watchdog: Option<Watchdog>,
    /// The options it was started with, to start it again the same way.
    options: ClusterOptions,
}

impl fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCluster")
            .field("dir", &self.root)
            .field("port", &self.port)
            .field("password", &"<redacted>")
            .field("ephemeral", &self.watchdog.is_some())
            .finish_non_exhaustive()
    }
}

impl LocalCluster {
    /// Starts the cluster in `dir` (such as `./.unidesk/pg`), creating it
    /// first when `dir` holds none, with the default [`ClusterOptions`].
    ///
    /// A server still running on this directory, left by an earlier run, is
    /// reused. The database `unidesk` is created when missing.
    ///
    /// # Errors
    /// A [`ClusterError`] saying what to fix: PostgreSQL not installed, a
    /// directory the `postgres` user cannot enter, or the server failing to
    /// start (with the end of its log).
    pub async fn start(dir: &Path) -> Result<LocalCluster, ClusterError> {
        Self::start_with(dir, &ClusterOptions::default()).await
    }

    /// [`LocalCluster::start`] with chosen options. The options apply to a
    /// server this call starts; a server found running keeps its settings.
    ///
    /// # Errors
    /// As [`LocalCluster::start`].
    pub async fn start_with(
        dir: &Path,
        options: &ClusterOptions,
    ) -> Result<LocalCluster, ClusterError> {
        let run_as = run_as()?;
        fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
        let root = fs::canonicalize(dir).map_err(io_error("resolving", dir))?;
        Self::start_in(root, options, run_as, None).await
    }

    /// Starts a throwaway cluster in a fresh directory under the system's
    /// temporary directory, without fsync, for tests.
    ///
    /// The server stops and its directory is deleted when the returned value
    /// is dropped or stopped, or when this process exits in any way, even
    /// when the value is never dropped (as in a `static`): a watchdog shell
    /// process waits on a pipe whose only writer is this process, and acts
    /// when the pipe closes.
    ///
    /// # Errors
    /// As [`LocalCluster::start`].
    pub async fn start_ephemeral() -> Result<LocalCluster, ClusterError> {
        let run_as = run_as()?;
        let bins = find_bins(None)?;
        let root = make_temp_dir()?;
        if let Some(user) = &run_as {
            chown_tree(&root, user)?;
        }
        // The watchdog is up before anything else, so that it cleans up
        // after a start that fails or a process that dies half-way.
        let watchdog = Watchdog::spawn(&bins.pg_ctl(), &root, run_as.as_ref())?;
        let options = ClusterOptions {
            no_sync: true,
            ..ClusterOptions::default()
        };
        Self::start_in(root, &options, run_as, Some(watchdog)).await
    }

    /// The URL of the `unidesk` database, as the superuser `unidesk`.
    pub fn url(&self) -> String {
        self.admin_url_for(DATABASE)
    }

    /// The URL of database `db` on this cluster, as the superuser `unidesk`.
    pub fn admin_url_for(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// The TCP port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The server log, the first place to look when something goes wrong.
    pub fn log_file(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// Stops the server (`pg_ctl stop -m fast`: open sessions are ended and
    /// their transactions rolled back). An ephemeral cluster's directory is
    /// deleted too.
    ///
    /// # Errors
    /// A [`ClusterError::Command`] when `pg_ctl` fails and the server still
    /// runs.
    pub async fn stop(mut self) -> Result<(), ClusterError> {
        let mut stop = self.pg_ctl();
        stop.arg("stop").arg("-D").arg(&self.data).args([
            "-m",
            "fast",
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
        ]);
        let (command, output) = run(stop).await?;
        if !output.status.success() && self.running_port().await?.is_some() {
            return Err(command_failed(command, &output));
        }
        if self.socket_dir != self.root {
            let _ = fs::remove_dir(&self.socket_dir);
        }
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.finish().await;
        }
        info!(dir = %self.root.display(), "stopped PostgreSQL");
        Ok(())
    }

    /// Stops the server and keeps the cluster, to be started again by
    /// [`LocalCluster::resume`]: a database outage as its clients see it,
    /// for tests of how they ride one out. An ephemeral cluster still
    /// vanishes when dropped or when this process exits.
    ///
    /// A cluster without sync (an ephemeral one) also commits without
    /// waiting for its log (`synchronous_commit` off), so an
    /// [`StopMode::Immediate`] halt loses what was committed in the last
    /// moments, as a crash of a server set up so would; turn
    /// `synchronous_commit` on (`ALTER SYSTEM`) when that matters.
    ///
    /// # Errors
    /// A [`ClusterError::Command`] when `pg_ctl` fails and the server still
    /// runs.
    pub async fn halt(&self, mode: StopMode) -> Result<(), ClusterError> {
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let mut stop = self.pg_ctl();
        stop.arg("stop").arg("-D").arg(&self.data).args([
            "-m",
            mode,
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
        ]);
        let (command, output) = run(stop).await?;
        if !output.status.success() && self.running_port().await?.is_some() {
            return Err(command_failed(command, &output));
        }
        info!(dir = %self.root.display(), mode, "halted PostgreSQL");
        Ok(())
    }

    /// Starts a server stopped by [`LocalCluster::halt`] again, with the
    /// same settings and on the same port, so its clients' URLs work again.
    /// Does nothing when the server runs.
    ///
    /// # Errors
    /// [`ClusterError::PortTaken`] when the port stays taken for 30 s, or
    /// why the server did not start.
    pub async fn resume(&mut self) -> Result<(), ClusterError> {
        if self.running_port().await?.is_some() {
            return Ok(());
        }
        let port = self.port;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !port_is_free(port) {
            if std::time::Instant::now() > deadline {
                return Err(ClusterError::PortTaken(port));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let options = self.options.clone();
        self.launch(&options).await?;
        if self.port != port {
            let _ = self.halt(StopMode::Immediate).await;
            self.port = port;
            return Err(ClusterError::PortTaken(port));
        }
        Ok(())
    }

    async fn start_in(
        root: PathBuf,
        options: &ClusterOptions,
        run_as: Option<RunAs>,
        watchdog: Option<Watchdog>,
    ) -> Result<LocalCluster, ClusterError> {
        if let Some(user) = &run_as {
            check_traversable(&root, user)?;
        }
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(io_error("restricting", &root))?;
        let _lock = lock_dir(&root).await?;
        if let Some(user) = &run_as {
            chown_tree(&root, user)?;
        }
        let data = root.join("data");
        let data_version = read_pg_version(&data);
        let bins = find_bins(data_version.as_deref())?;
        if let Some(version) = &data_version {
            check_version(&bins, version, &data).await?;
        }
        let socket_dir = socket_dir(&root, run_as.as_ref())?;
        let mut cluster = LocalCluster {
            root,
            data,
            socket_dir,
            bins,
            run_as,
            port: 0,
            password: String::new(),
            watchdog,
            options: options.clone(),
        };
        if data_version.is_none() {
            cluster.init(options).await?;
        }
        cluster.password = cluster.read_password()?;
        match cluster.running_port().await? {
            Some(port) => {
                info!(dir = %cluster.root.display(), port, "reusing running PostgreSQL");
                cluster.port = port;
            }
            None => cluster.launch(options).await?,
        }
        cluster.write_owned(
            &cluster.root.join("port"),
            &format!("{}\n", cluster.port),
            0o600,
        )?;
        cluster.ensure_database().await?;
        Ok(cluster)
    }

    /// Creates the cluster with `initdb`.
    async fn init(&self, options: &ClusterOptions) -> Result<(), ClusterError> {
        info!(dir = %self.root.display(), "creating a PostgreSQL cluster");
        if self.data.exists() {
            // Left by an initdb that did not finish: no PG_VERSION in it.
            fs::remove_dir_all(&self.data).map_err(io_error("removing", &self.data))?;
        }
        let password_file = self.root.join("password");
        let password = hex::encode(rand::random::<[u8; 16]>());
        self.write_owned(&password_file, &format!("{password}\n"), 0o600)?;
        let mut initdb = self.command(&self.bins.initdb());
        initdb
            .arg("-D")
            .arg(&self.data)
            .args(["-U", SUPERUSER, "--auth=scram-sha-256", "-E", "UTF8"])
            .arg("--locale=C")
            .arg(format!("--pwfile={}", password_file.display()));
        if options.no_sync {
            initdb.arg("--no-sync");
        }
        let (command, output) = run(initdb).await?;
        if !output.status.success() {
            return Err(command_failed(command, &output));
        }
        let conf = self.data.join("postgresql.conf");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(io_error("opening", &conf))?;
        file.write_all(
            b"\n# UniDesk's settings, rewritten on every start.\ninclude_if_exists = 'unidesk.conf'\n",
        )
        .map_err(io_error("writing", &conf))?;
        Ok(())
    }

    /// Starts the server with `pg_ctl start`, on the remembered port when
    /// it is free and on a new one otherwise.
    async fn launch(&mut self, options: &ClusterOptions) -> Result<(), ClusterError> {
        let mut port = match read_port(&self.root) {
            Some(port) if port_is_free(port) => port,
            _ => free_port()?,
        };
        let log = self.log_file();
        for attempt in 1..=START_ATTEMPTS {
            self.write_conf(port, options)?;
            let log_start = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            let mut start = self.pg_ctl();
            start
                .arg("start")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", PG_CTL_TIMEOUT_SECS])
                // Out of our process group, so that Ctrl-C on `unidesk dev`
                // reaches us and not the server: we stop it in order.
                .process_group(0);
            let (command, output) = run(start).await?;
            if output.status.success() {
                info!(dir = %self.root.display(), port, "started PostgreSQL");
                self.port = port;
                return Ok(());
            }
            let tail = log_tail(&log, log_start);
            let port_taken = tail.contains("could not bind")
                || tail.contains("could not create any TCP/IP sockets");
            // Backends of a server that was killed outright live on for a
            // moment and keep its shared memory; the next try succeeds.
            let old_backends = tail.contains("pre-existing shared memory block");
            if attempt < START_ATTEMPTS && (port_taken || old_backends) {
                if port_taken {
                    debug!(port, "port taken, trying another");
                    port = free_port()?;
                } else {
                    debug!("backends of an earlier server still running, waiting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
            let tail = if tail.trim().is_empty() {
                command_failed(command, &output).to_string()
            } else {
                tail
            };
            return Err(ClusterError::StartFailed { log, tail });
        }
        unreachable!("the last attempt returns")
    }

    /// Writes `data/unidesk.conf`, which `postgresql.conf` includes.
    fn write_conf(&self, port: u16, options: &ClusterOptions) -> Result<(), ClusterError> {
        let socket_dir = self.socket_dir.to_string_lossy().replace('\'', "''");
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{socket_dir}'\nunix_socket_permissions = 0700\nmax_connections = {}\n",
            options.max_connections
        );
        if options.no_sync {
            conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        self.write_owned(&self.data.join("unidesk.conf"), &conf, 0o600)
    }

    /// The port of a server running on our data directory, if one is.
    async fn running_port(&self) -> Result<Option<u16>, ClusterError> {
        let mut status = self.pg_ctl();
        status.arg("status").arg("-D").arg(&self.data);
        let (_, output) = run(status).await?;
        if !output.status.success() {
            return Ok(None);
        }
        // Line 1 of postmaster.pid is the postmaster's pid, line 4 its port.
        let pid_file = self.data.join("postmaster.pid");
        let contents = fs::read_to_string(&pid_file).map_err(io_error("reading", &pid_file))?;
        let mut lines = contents.lines().map(str::trim);
        let pid: Option<u32> = lines.next().and_then(|l| l.parse().ok());
        if let Some(pid) = pid.filter(|&pid| is_zombie(pid)) {
            // Killed, and not yet reaped by init: it looks alive to pg_ctl
            // and to a new postmaster until it is.
            wait_for_reaping(pid).await;
            return Ok(None);
        }
        Ok(lines.nth(2).and_then(|l| l.parse().ok()))
    }

    async fn ensure_database(&self) -> Result<(), ClusterError> {
        let mut conn = connect(&self.admin_url_for("postgres"), self.port).await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE)
                .fetch_one(&mut conn)
                .await
                .map_err(ClusterError::CreateDatabase)?;
        if !exists {
            let created = sqlx::query("CREATE DATABASE unidesk")
                .execute(&mut conn)
                .await;
            match created {
                Ok(_) => info!("created database `unidesk`"),
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                Err(e) => return Err(ClusterError::CreateDatabase(e)),
            }
        }
        let _ = conn.close().await;
        Ok(())
    }

    fn read_password(&self) -> Result<String, ClusterError> {
        read_password(&self.root)
    }

    /// Writes a file with `mode`, owned by the user the server runs as.
    fn write_owned(&self, path: &Path, contents: &str, mode: u32) -> Result<(), ClusterError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .map_err(io_error("creating", path))?;
        file.write_all(contents.as_bytes())
            .map_err(io_error("writing", path))?;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_error("restricting", path))?;
        if let Some(user) = &self.run_as {
            std::os::unix::fs::lchown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .map_err(io_error("changing the owner of", path))?;
        }
        Ok(())
    }

    fn pg_ctl(&self) -> Command {
        self.command(&self.bins.pg_ctl())
    }

    fn command(&self, program: &Path) -> Command {
        server_command(program, self.run_as.as_ref())
    }
}

/// The user the server programs run as, when we are root.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: Uid,
    gid: Gid,
}

/// `None` when we are not root: the programs run as ourselves.
fn run_as() -> Result<Option<RunAs>, ClusterError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some(RunAs {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
        })),
        Ok(None) => Err(ClusterError::NoPostgresUser),
        Err(e) => Err(ClusterError::UserLookup(e)),
    }
}

/// A command for a PostgreSQL program, run as `run_as` if given, in `/`
/// (which the `postgres` user can always read), with a neutral locale and
/// no libpq settings from our environment.
fn server_command(program: &Path, run_as: Option<&RunAs>) -> Command {
    let mut command = Command::new(program);
    command
        .current_dir("/")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    for var in [
        "PGDATA",
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
        "PGPASSWORD",
        "PGPASSFILE",
    ] {
        command.env_remove(var);
    }
    if let Some(user) = run_as {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    command
}

/// Runs a command to completion, capturing its output.
async fn run(command: Command) -> Result<(String, Output), ClusterError> {
    let line = describe(&command);
    debug!(command = %line, "running");
    let output = tokio::process::Command::from(command)
        .output()
        .await
        .map_err(|source| ClusterError::Spawn {
            command: line.clone(),
            source,
        })?;
    Ok((line, output))
}

fn describe(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

fn command_failed(command: String, output: &Output) -> ClusterError {
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !stdout.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stdout.trim());
    }
    ClusterError::Command {
        command,
        status: output.status.to_string(),
        output: text,
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ClusterError {
    let path = path.to_path_buf();
    move |source| ClusterError::Io {
        action,
        path,
        source,
    }
}

/// The directory of the PostgreSQL server programs.
#[derive(Debug, Clone)]
struct Bins {
    dir: PathBuf,
}

impl Bins {
    fn initdb(&self) -> PathBuf {
        self.dir.join("initdb")
    }

    fn pg_ctl(&self) -> PathBuf {
        self.dir.join("pg_ctl")
    }

    fn postgres(&self) -> PathBuf {
        self.dir.join("postgres")
    }
}

/// Finds the server programs: those of `major` when a cluster of that
/// version exists, else `initdb` on `PATH`, else the newest of
/// `/usr/lib/postgresql/*/bin` (Debian and Ubuntu keep them there, off
/// `PATH`).
fn find_bins(major: Option<&str>) -> Result<Bins, ClusterError> {
    let mut candidates = Vec::new();
    if let Some(major) = major {
        candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
    }
    if let Some(initdb) = on_path("initdb") {
        // Through symlinks, to the directory that also holds pg_ctl.
        if let Some(dir) = fs::canonicalize(&initdb)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            candidates.push(dir);
        }
    }
    candidates.extend(debian_bin_dirs());
    let dir = candidates
        .into_iter()
        .find(|dir| is_executable(&dir.join("initdb")))
        .ok_or(ClusterError::InitdbNotFound)?;
    for program in ["pg_ctl", "postgres"] {
        if !is_executable(&dir.join(program)) {
            return Err(ClusterError::ProgramMissing { program, dir });
        }
    }
    Ok(Bins { dir })
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

/// `/usr/lib/postgresql/*/bin`, newest version first.
fn debian_bin_dirs() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/usr/lib/postgresql") else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version = name
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The major version a data directory was made by, if it holds a cluster.
fn read_pg_version(data: &Path) -> Option<String> {
    fs::read_to_string(data.join("PG_VERSION"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

async fn check_version(bins: &Bins, data_version: &str, data: &Path) -> Result<(), ClusterError> {
    let mut version = Command::new(bins.postgres());
    version.arg("--version").stdin(Stdio::null());
    let (command, output) = run(version).await?;
    if !output.status.success() {
        return Err(command_failed(command, &output));
    }
    // "postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)"
    let text = String::from_utf8_lossy(&output.stdout);
    let number = text
        .split_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or(&text)
        .split_whitespace()
        .next()
        .unwrap_or_default();
    let parts: Vec<&str> = number.split('.').collect();
    let found = match parts.first().and_then(|p| p.parse::<u32>().ok()) {
        // Before 10 the major version had two parts.
        Some(major) if major < 10 && parts.len() > 1 => format!("{}.{}", parts[0], parts[1]),
        _ => parts.first().copied().unwrap_or_default().to_owned(),
    };
    if found != data_version {
        return Err(ClusterError::VersionMismatch {
            data: data.to_path_buf(),
            data_version: data_version.to_owned(),
            found,
            bin_dir: bins.dir.clone(),
        });
    }
    Ok(())
}

/// Checks that `user` can enter every directory above `root`, so that the
/// server can reach its data, and names the first one it cannot.
fn check_traversable(root: &Path, user: &RunAs) -> Result<(), ClusterError> {
    let groups = CString::new(user.name.clone())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
        .unwrap_or_else(|| vec![user.gid]);
    for dir in root.ancestors().skip(1) {
        let meta = fs::metadata(dir).map_err(io_error("inspecting", dir))?;
        let mode = meta.mode();
        let searchable = if meta.uid() == user.uid.as_raw() {
            mode & 0o100 != 0
        } else if groups.contains(&Gid::from_raw(meta.gid())) {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            return Err(ClusterError::NotTraversable {
                user: user.name.clone(),
                dir: dir.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Gives `path` and everything under it to `user`.
fn chown_tree(path: &Path, user: &RunAs) -> Result<(), ClusterError> {
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        // A running server removes files as it likes.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("inspecting", path)(e)),
    };
    if meta.uid() != uid || meta.gid() != gid {
        match std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("changing the owner of", path)(e)),
        }
    }
    if meta.is_dir() {
        let entries = match fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("listing", path)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_error("listing", path))?;
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

/// Takes the start lock of a cluster directory, waiting for another
/// process that is starting it.
async fn lock_dir(root: &Path) -> Result<File, ClusterError> {
    let path = root.join("lock");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_error("creating", &path))?;
    let locked = tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .map_err(|e| io::Error::other(e.to_string()))
        .and_then(|r| r);
    locked.map_err(io_error("locking", &path))
}

/// The directory for the unix socket: the cluster directory when its path
/// is short enough, else a directory under `/tmp` named after it.
fn socket_dir(root: &Path, run_as: Option<&RunAs>) -> Result<PathBuf, ClusterError> {
    if root.as_os_str().len() <= MAX_SOCKET_DIR_LEN {
        return Ok(root.to_path_buf());
    }
    let dir = PathBuf::from(format!(
        "/tmp/unidesk-pg-{:016x}",
        fnv1a(root.as_os_str().as_encoded_bytes())
    ));
    let owner = run_as.map_or_else(nix::unistd::geteuid, |u| u.uid);
    match fs::create_dir(&dir) {
        Ok(()) => {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(io_error("restricting", &dir))?;
            if let Some(user) = run_as {
                std::os::unix::fs::lchown(&dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                    .map_err(io_error("changing the owner of", &dir))?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(&dir).map_err(io_error("inspecting", &dir))?;
            if !meta.is_dir() || meta.uid() != owner.as_raw() {
                return Err(ClusterError::ForeignSocketDir(dir));
            }
        }
        Err(e) => return Err(io_error("creating", &dir)(e)),
    }
    Ok(dir)
}

/// A stable hash for naming: FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A fresh directory under the system's temporary directory, 0700.
fn make_temp_dir() -> Result<PathBuf, ClusterError> {
    let base = std::env::temp_dir();
    loop {
        let dir = base.join(format!(
            "unidesk-pg-{}",
            hex::encode(rand::random::<[u8; 6]>())
        ));
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                    .map_err(io_error("restricting", &dir))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_error("creating", &dir)(e)),
        }
    }
}

/// The URL of the `unidesk` database of a cluster in `dir` whose server is
/// running (its `postmaster.pid` exists), so admin commands run beside a
/// `unidesk dev` find it by themselves. `None` when no cluster runs there.
///
/// # Errors
/// [`ClusterError::PasswordMissing`] or an I/O error when the cluster's
/// files exist but cannot be read.
pub fn running_url(dir: &Path) -> Result<Option<String>, ClusterError> {
    if !dir.join("data").join("postmaster.pid").exists() {
        return Ok(None);
    }
    let Some(port) = read_port(dir) else {
        return Ok(None);
    };
    let password = read_password(dir)?;
    Ok(Some(format!(
        "postgres://{SUPERUSER}:{password}@127.0.0.1:{port}/{DATABASE}"
    )))
}

fn read_password(root: &Path) -> Result<String, ClusterError> {
    let path = root.join("password");
    match fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim().to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ClusterError::PasswordMissing(path)),
        Err(e) => Err(io_error("reading", &path)(e)),
    }
}

fn read_port(root: &Path) -> Option<u16> {
    fs::read_to_string(root.join("port"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(io_error("finding a free port on", Path::new("127.0.0.1")))
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// The last lines written to the log since byte `from`.
fn log_tail(log: &Path, from: u64) -> String {
    const LINES: usize = 30;
    let mut text = Vec::new();
    if let Ok(mut file) = File::open(log) {
        let _ = file.seek(SeekFrom::Start(from));
        let _ = file.read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LINES)..].join("\n")
}

/// Whether `pid` is a process that has ended but not been reaped (Linux;
/// elsewhere, never).
fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "pid (comm) state ...", and comm may hold spaces and parentheses.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Waits up to 30 s for a zombie to be reaped.
async fn wait_for_reaping(pid: u32) {
    for _ in 0..300 {
        if !is_zombie(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connects, waiting briefly for a server that is still starting up.
async fn connect(url: &str, port: u16) -> Result<PgConnection, ClusterError> {
    let mut attempts = 0;
    loop {
        match PgConnection::connect(url).await {
            Ok(conn) => return Ok(conn),
            Err(e) => {
                let starting = match &e {
                    sqlx::Error::Io(_) => true,
                    // cannot_connect_now: starting up or recovering.
                    sqlx::Error::Database(db) => db.code().as_deref() == Some("57P03"),
                    _ => false,
                };
                attempts += 1;
                if !starting || attempts >= 50 {
                    return Err(ClusterError::Connect { port, source: e });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The watchdog of an ephemeral cluster; see [`WATCHDOG_SCRIPT`].
///
/// It holds a `std` child, not a tokio one, because an ephemeral cluster may
/// outlive the runtime that started it (a `static` shared by tests, each
/// with its own runtime).
struct Watchdog {
    child: Option<std::process::Child>,
}

impl Watchdog {
    fn spawn(pg_ctl: &Path, root: &Path, run_as: Option<&RunAs>) -> Result<Self, ClusterError> {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("unidesk-pg-watchdog")
            .arg(pg_ctl)
            .arg(root.join("data"))
            .arg(root)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        if let Some(user) = run_as {
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        // Our end of the pipe is close-on-exec, so no other child of this
        // process keeps it open after we are gone.
        let child = command.spawn().map_err(|source| ClusterError::Spawn {
            command: "sh (watchdog)".to_owned(),
            source,
        })?;
        Ok(Watchdog { child: Some(child) })
    }

    /// Lets the watchdog clean up, and waits until it has.
    async fn finish(mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take());
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take());
            // Reap it when it is done, without blocking the caller.
            std::thread::spawn(move || child.wait());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::PgPool;
    use std::net::TcpStream;
    use std::time::Instant;

    async fn select_one(url: &str) -> i32 {
        let pool = PgPool::connect(url).await.expect("connect");
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&pool)
            .await
            .expect("SELECT 1");
        pool.close().await;
        one
    }

    /// Waits up to 30 s for the directory to vanish and the port to close.
    async fn gone(dir: &Path, port: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let listening = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok();
            if !dir.exists() && !listening {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    #[tokio::test]
    async fn an_ephemeral_cluster_answers_queries_and_vanishes_when_stopped() {
        let cluster = LocalCluster::start_ephemeral().await.expect("start");
        assert_eq!(select_one(&cluster.url()).await, 1);
        assert_eq!(select_one(&cluster.admin_url_for("postgres")).await, 1);
        let (dir, port) = (cluster.dir().to_path_buf(), cluster.port());
        assert!(dir.join("data/PG_VERSION").exists());
        cluster.stop().await.expect("stop");
        assert!(!dir.exists(), "{} still exists", dir.display());
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
    }

    #[tokio::test]
    async fn a_dropped_ephemeral_cluster_stops_and_vanishes() {
        let cluster = LocalCluster::start_ephemeral().await.expect("start");
        let (dir, port) = (cluster.dir().to_path_buf(), cluster.port());
        drop(cluster);
        assert!(
            gone(&dir, port).await,
            "{} or port {port} remains",
            dir.display()
        );
    }

    /// Run by `an_ephemeral_cluster_vanishes_when_the_process_exits` in a
    /// child process: starts a cluster and exits without dropping it.
    #[tokio::test]
    #[ignore = "a helper run in a child process"]
    async fn exit_probe() {
        if std::env::var_os("UNIDESK_CLUSTER_EXIT_PROBE").is_none() {
            return;
        }
        let cluster = LocalCluster::start_ephemeral().await.expect("start");
        println!("PROBE {} {}", cluster.port(), cluster.dir().display());
        std::process::exit(0);
    }

    #[tokio::test]
    async fn an_ephemeral_cluster_vanishes_when_the_process_exits() {
        let exe = std::env::current_exe().expect("test binary");
        let output = tokio::process::Command::new(exe)
            .args(["tests::exit_probe", "--exact", "--ignored", "--nocapture"])
            .env("UNIDESK_CLUSTER_EXIT_PROBE", "1")
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run the probe");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let probe = stdout
            .lines()
            .find_map(|l| l.strip_prefix("PROBE "))
            .unwrap_or_else(|| {
                panic!(
                    "no probe line: {stdout}\n{}",
                    String::from_utf8_lossy(&output.stderr)
                )
            });
        let (port, dir) = probe.split_once(' ').expect("port and dir");
        let port: u16 = port.parse().expect("port");
        let dir = PathBuf::from(dir);
        assert!(
            gone(&dir, port).await,
            "{} or port {port} remains",
            dir.display()
        );
    }

    #[tokio::test]
    async fn a_halted_cluster_resumes_on_its_port_with_its_data() {
        let mut cluster = LocalCluster::start_ephemeral().await.expect("start");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&cluster.url())
            .await
            .expect("connect");
        // CHECKPOINT: the cluster commits without waiting for the log
        // (synchronous_commit off), so a crash may lose the last commits.
        for statement in [
            "CREATE TABLE kept (n int)",
            "INSERT INTO kept VALUES (7)",
            "CHECKPOINT",
        ] {
            sqlx::query(statement).execute(&pool).await.expect("write");
        }
        let port = cluster.port();
        for mode in [StopMode::Immediate, StopMode::Fast] {
            cluster.halt(mode).await.expect("halt");
            assert!(
                TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(),
                "still listening after {mode:?}"
            );
            cluster.resume().await.expect("resume");
            assert_eq!(cluster.port(), port);
            // The pool's old connection died with the server; a new one
            // reaches the same data.
            let mut kept = None;
            for _ in 0..50 {
                match sqlx::query_scalar::<_, i32>("SELECT n FROM kept")
                    .fetch_one(&pool)
                    .await
                {
                    Ok(n) => {
                        kept = Some(n);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            assert_eq!(kept, Some(7), "after {mode:?}");
        }
        pool.close().await;
        cluster.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn a_cluster_keeps_its_data_and_port_across_restarts() {
        // A deep directory, longer than a unix socket path may be, made
        // ourselves under /tmp so that the `postgres` user can reach it.
        let base = make_temp_dir().expect("temp dir");
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).expect("chmod");
        let dir =
            base.join("a-directory-name-long-enough-to-push-the-socket-path-over-the-limit/pg");
        assert!(dir.as_os_str().len() > MAX_SOCKET_DIR_LEN);

        let first = LocalCluster::start(&dir).await.expect("first start");
        let port = first.port();
        let pool = PgPool::connect(&first.url()).await.expect("connect");
        sqlx::query("CREATE TABLE kept (note text)")
            .execute(&pool)
            .await
            .expect("create");
        sqlx::query("INSERT INTO kept VALUES ('still here')")
            .execute(&pool)
            .await
            .expect("insert");
        pool.close().await;

        // A second start while the server runs reuses it.
        let again = LocalCluster::start(&dir)
            .await
            .expect("start while running");
        assert_eq!(again.port(), port);
        assert_eq!(again.url(), first.url());
        drop(again);

        first.stop().await.expect("stop");
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());

        let second = LocalCluster::start(&dir).await.expect("second start");
        assert_eq!(second.port(), port, "the port is remembered");
        let pool = PgPool::connect(&second.url()).await.expect("reconnect");
        let note: String = sqlx::query_scalar("SELECT note FROM kept")
            .fetch_one(&pool)
            .await
            .expect("select");
        assert_eq!(note, "still here");
        pool.close().await;

        // A server killed outright leaves a stale postmaster.pid and needs
        // crash recovery; the next start copes with both.
        let pid_file = fs::read_to_string(dir.join("data/postmaster.pid")).expect("pid file");
        let pid: i32 = pid_file
            .lines()
            .next()
            .and_then(|l| l.parse().ok())
            .expect("pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
            .expect("kill");
        let third = LocalCluster::start(&dir)
            .await
            .expect("start after a crash");
        let pool = PgPool::connect(&third.url()).await.expect("reconnect");
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM kept")
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(count, 1);
        pool.close().await;
        third.stop().await.expect("stop again");
        fs::remove_dir_all(&base).expect("clean up");
    }

    #[tokio::test]
    async fn a_directory_the_server_user_cannot_enter_is_named() {
        if !nix::unistd::geteuid().is_root() {
            return; // Only root hands the cluster to another user.
        }
        let base = make_temp_dir().expect("temp dir"); // 0700, root's
        let err = LocalCluster::start(&base.join("pg"))
            .await
            .expect_err("postgres cannot enter the directory");
        let message = err.to_string();
        fs::remove_dir_all(&base).expect("clean up");
        assert!(
            matches!(&err, ClusterError::NotTraversable { dir, .. } if *dir == base),
            "{message}"
        );
        assert!(message.contains(&base.display().to_string()), "{message}");
    }
}
