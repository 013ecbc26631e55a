//! The git cache: one bare mirror per repository URL, and checkouts of one
//! commit into a task's workspace.
//!
//! A mirror lives in `<root>/<sha256(url)>`, or, for a fetch with a
//! credential, `<root>/<sha256(url)>-<credential identity>`
//! ([`crate::git_auth`]): a task only ever reads what its own credential
//! (or anonymous access) fetched. A commit already in the mirror
//! is used without touching the network; otherwise only that commit is
//! fetched (`+<sha>:refs/cache/<sha>`), falling back to all branches and tags
//! when the server refuses to serve an object by id. Every commit handed out
//! gets a `refs/cache/<sha>` ref, which keeps it alive and lists it in the
//! node's cache.
//!
//! A commit already pinned in the mirror is checked out without taking any
//! lock, so tasks sharing a repository never wait for each other then.
//! Fetches into one mirror take turns (a per-mirror lock held by the
//! blocking fetch itself); checkouts only read the mirror and run in
//! parallel. libgit2 is blocking, so all of it runs on Tokio's blocking pool.
//!
//! A repository's content is untrusted: its tree may hold links to anywhere
//! on the node, names such as `..` or `.git`, or one name twice. The files
//! are therefore written by [`export_commit`] through directory handles,
//! never by a checkout that resolves paths, and links are written as links
//! and never followed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cap_std::fs::Dir;
use git2::{AutotagOption, FetchOptions, Oid, Repository};
use sha2::{Digest, Sha256};

use crate::beneath::{shared_dir, shared_file, Root};
use crate::git_auth::{callbacks, AuthFailure, GitAuth};
use crate::keyed_lock::KeyedLocks;
use crate::prepared::PreparedTrees;

/// Why a commit could not be checked out. The messages read well after a
/// word naming the repository's role ("code …", "env …").
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The id is not a full hexadecimal commit id.
    #[error("commit id {0:?} is not a full 40-character hexadecimal commit id")]
    BadCommitId(String),
    /// Fetching failed (network, authentication, no such repository).
    #[error("repository {url} could not be fetched: {message}")]
    Fetch {
        /// The repository, with any credentials removed.
        url: String,
        /// libgit2's explanation.
        message: String,
    },
    /// The repository was fetched but does not hold the commit.
    #[error("commit {commit} not found in {url}")]
    CommitNotFound {
        /// The commit asked for.
        commit: String,
        /// The repository, with any credentials removed.
        url: String,
    },
    /// The commit's tree holds something no checkout may write: a name
    /// such as `..`, `.git` or one with a slash, the same name twice, or a
    /// depth past any real project's.
    #[error("the commit cannot be checked out: {0}")]
    BadTree(String),
    /// The local mirror or the checkout could not be written.
    #[error("checkout failed: {0}")]
    Local(String),
}

/// Where a checked-out commit came from, for the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fetched {
    /// The commit was in the cache: nothing was fetched.
    pub from_cache: bool,
    /// Objects received from the repository.
    pub objects: usize,
    /// Bytes received from the repository.
    pub bytes: usize,
    /// The repository refused a fetch by commit id, so all branches and
    /// tags were fetched instead.
    pub fell_back: bool,
}

impl std::fmt::Display for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.from_cache {
            return f.write_str("from cache");
        }
        write!(
            f,
            "fetched {} object{}, {}",
            self.objects,
            if self.objects == 1 { "" } else { "s" },
            human_bytes(self.bytes as u64)
        )?;
        if self.fell_back {
            f.write_str(" (all branches and tags: the commit is no branch or tag tip and the server does not serve commits by id)")?;
        }
        Ok(())
    }
}

/// `1.5 MiB`, `320 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The bytes the prepared trees of a node hold together unless told
/// otherwise: 2 GiB.
pub const DEFAULT_PREPARED_BYTES: u64 = 2 << 30;

/// How long after a checkout its tree's next spare is made at the latest,
/// when no container start ([`GitCache::make_spares`]) came first.
const SPARE_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// The cache of bare mirrors under one directory, and the prepared trees
/// of the commits checked out of them lately ([`crate::prepared`]).
#[derive(Debug)]
pub struct GitCache {
    root: PathBuf,
    locks: KeyedLocks,
    trees: Arc<PreparedTrees>,
}

impl GitCache {
    /// A cache keeping its mirrors under `root` (created on first use) and
    /// up to [`DEFAULT_PREPARED_BYTES`] of prepared trees beside it, in
    /// `<root>-trees`.
    pub fn new(root: PathBuf) -> Self {
        Self::with_prepared_bytes(root, DEFAULT_PREPARED_BYTES)
    }

    /// As [`GitCache::new`], the prepared trees holding at most `budget`
    /// bytes together (0: no tree is kept, every checkout reads the
    /// mirror).
    pub fn with_prepared_bytes(root: PathBuf, budget: u64) -> Self {
        let mut name = root.file_name().unwrap_or_default().to_owned();
        name.push("-trees");
        let trees = PreparedTrees::open(root.with_file_name(name), budget);
        GitCache {
            root,
            locks: KeyedLocks::default(),
            trees: Arc::new(trees),
        }
    }

    /// The prepared trees: their budget and what they hold.
    pub fn prepared(&self) -> &PreparedTrees {
        &self.trees
    }

    /// Where the mirror of `url` fetched with `auth` lives.
    pub fn mirror_path(&self, url: &str, auth: &GitAuth) -> PathBuf {
        let name = hex::encode(Sha256::digest(url.as_bytes()));
        match auth.identity() {
            id if id.is_empty() => self.root.join(name),
            id => self.root.join(format!("{name}-{id}")),
        }
    }

    /// Makes sure `commit` of `url` is in the cache, then writes its files
    /// into `dest`, an empty directory (no `.git` is written there); see
    /// [`export_commit`]. Says whether the commit came from the cache or how
    /// much was fetched.
    ///
    /// # Errors
    /// [`GitError::BadCommitId`] for an id that is not 40 hex digits,
    /// [`GitError::Fetch`] when the repository cannot be reached,
    /// [`GitError::CommitNotFound`] when it does not hold the commit,
    /// [`GitError::BadTree`] for a tree no checkout may write, and
    /// [`GitError::Local`] when the mirror or `dest` cannot be written.
    #[tracing::instrument(skip_all, fields(url = %redact_url(url), commit))]
    pub async fn checkout(
        &self,
        url: &str,
        commit: &str,
        dest: &Root,
        auth: &GitAuth,
    ) -> Result<Fetched, GitError> {
        let oid = parse_commit_id(commit)?;
        let mirror = self.mirror_path(url, auth);
        let key = PreparedTrees::key(&mirror, oid);
        let dest = dest
            .dir()
            .try_clone()
            .map_err(|e| local("opening the checkout directory", e))?;
        // A commit this mirror gave before, its tree kept: its spare moved
        // in, or the tree copied, and neither the mirror nor the network
        // is read.
        let (trees, k, d) = (self.trees.clone(), key.clone(), dest.try_clone());
        let copied = run_blocking(move || {
            let d = d.map_err(|e| local("opening the checkout directory", e))?;
            let Some(tree) = trees.get(&k) else {
                return Ok(false);
            };
            let moved = trees
                .move_spare_into(&tree, &d)
                .map_err(|e| local("moving the checkout's spare tree in", e))?;
            if !moved {
                tree.copy_into(&d)
                    .map_err(|e| local("writing the checkout from its prepared tree", e))?;
            }
            tracing::debug!(spare = moved, "commit written from its prepared tree");
            Ok(true)
        })
        .await?;
        if copied {
            self.replenish(key);
            return Ok(Fetched {
                from_cache: true,
                ..Fetched::default()
            });
        }
        let m = mirror.clone();
        let pinned = run_blocking(move || Ok(is_pinned(&m, oid))).await?;
        let fetched = if pinned {
            tracing::debug!("commit already cached");
            Fetched {
                from_cache: true,
                ..Fetched::default()
            }
        } else {
            let guard = self.locks.lock(&mirror.to_string_lossy()).await;
            let (m, u, a) = (mirror.clone(), url.to_owned(), auth.clone());
            run_blocking(move || {
                let _held_until_the_fetch_ends = guard;
                ensure_commit(&m, &u, oid, &a)
            })
            .await?
        };
        let (trees, k) = (self.trees.clone(), key.clone());
        run_blocking(move || export_and_keep(&trees, &k, &mirror, oid, &dest)).await?;
        // A commit checked out for the first time is often checked out
        // again soon (a sweep, a retry), and its tree was just written:
        // its spare is copied now, while the first start takes its time.
        self.trees.want(&key);
        self.make_spares();
        Ok(fetched)
    }

    /// Makes, in the background, a spare of each prepared tree checked out
    /// since its last one, for the next checkout of its commit. The agent
    /// calls this once an attempt's container has started and the start
    /// is reported; the copies run at the lowest CPU priority, so they
    /// take what the machine leaves.
    pub fn make_spares(&self) {
        spare_maker(self.trees.clone(), None);
    }

    /// Makes a spare of the prepared tree `key` in the background
    /// [`SPARE_DELAY`] after its checkout, unless
    /// [`GitCache::make_spares`] made it first.
    fn replenish(&self, key: String) {
        let trees = self.trees.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SPARE_DELAY).await;
            spare_maker(trees, Some(key));
        });
    }

    /// The commits this cache holds (its `refs/cache/*` refs), at most
    /// `limit` of them.
    pub async fn commits(&self, limit: usize) -> Vec<String> {
        let root = self.root.clone();
        run_blocking(move || Ok(list_cached_commits(&root, limit)))
            .await
            .unwrap_or_default()
    }
}

/// Starts a thread of the lowest CPU priority making the spares `trees`
/// want (only `key`'s when given).
fn spare_maker(trees: Arc<PreparedTrees>, key: Option<String>) {
    // Every container start asks: no thread when nothing is wanted.
    if !trees.wants(key.as_deref()) {
        return;
    }
    let started = std::thread::Builder::new()
        .name("spare-trees".into())
        .spawn(move || {
            // On Linux a thread id names that thread alone.
            let tid = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(tid), 19) {
                tracing::debug!(error = %e, "spare trees are made at the usual priority");
            }
            trees.make_wanted(key.as_deref());
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "no thread to make spare trees");
    }
}

/// Parses a full commit id; libgit2 alone would accept a prefix and pad it.
fn parse_commit_id(commit: &str) -> Result<Oid, GitError> {
    let full = commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit());
    if !full {
        return Err(GitError::BadCommitId(commit.to_owned()));
    }
    Oid::from_str(commit).map_err(|_| GitError::BadCommitId(commit.to_owned()))
}

async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, GitError> + Send + 'static,
) -> Result<T, GitError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| GitError::Local(format!("git worker stopped: {e}")))?
}

/// Opens the mirror, creating it (or recreating a broken one) as needed.
fn open_mirror(path: &Path) -> Result<Repository, GitError> {
    if path.exists() {
        match Repository::open_bare(path) {
            Ok(repo) => return Ok(repo),
            Err(e) => {
                tracing::warn!(mirror = %path.display(), error = %e, "recreating a broken git mirror");
                std::fs::remove_dir_all(path).map_err(|e| local("removing a broken mirror", e))?;
            }
        }
    }
    Repository::init_bare(path).map_err(|e| local("creating a mirror", e))
}

fn has_commit(repo: &Repository, oid: Oid) -> bool {
    repo.find_commit(oid).is_ok()
}

/// Whether the mirror holds `oid` under its `refs/cache/<oid>` pin, read
/// without a lock: refs and objects are written atomically.
fn is_pinned(mirror: &Path, oid: Oid) -> bool {
    let Ok(repo) = Repository::open_bare(mirror) else {
        return false;
    };
    repo.find_reference(&format!("refs/cache/{oid}"))
        .ok()
        .and_then(|r| r.target())
        == Some(oid)
        && has_commit(&repo, oid)
}

/// Fetches `oid` into the mirror unless it is there already, and pins it.
fn ensure_commit(mirror: &Path, url: &str, oid: Oid, auth: &GitAuth) -> Result<Fetched, GitError> {
    let repo = open_mirror(mirror)?;
    let mut fetched = Fetched::default();
    if has_commit(&repo, oid) {
        tracing::debug!("commit already cached");
        fetched.from_cache = true;
    } else {
        fetched = fetch_commit(&repo, url, oid, auth)?;
        if !has_commit(&repo, oid) {
            return Err(GitError::CommitNotFound {
                commit: oid.to_string(),
                url: redact_url(url),
            });
        }
    }
    repo.reference(&format!("refs/cache/{oid}"), oid, true, "unidesk: cached")
        .map_err(|e| local("pinning the commit", e))?;
    Ok(fetched)
}

/// Fetches `oid` and as little else as the server allows: the one branch
/// or tag whose tip it is, else the commit by id (servers that allow it),
/// else all branches and tags. Counts what was received.
fn fetch_commit(
    repo: &Repository,
    url: &str,
    oid: Oid,
    auth: &GitAuth,
) -> Result<Fetched, GitError> {
    let failure = AuthFailure::default();
    let fail = |e: &git2::Error| match failure.take() {
        Some(why) => GitError::Fetch {
            url: redact_url(url),
            message: why,
        },
        None => fetch_error(url, e),
    };
    let mut remote = repo.remote_anonymous(url).map_err(|e| fail(&e))?;
    let mut fetched = Fetched::default();
    let mut count = |remote: &git2::Remote<'_>| {
        let stats = remote.stats();
        fetched.objects += stats.received_objects();
        fetched.bytes += stats.received_bytes();
    };
    let pin = format!("+{oid}:refs/cache/{oid}");
    let mut tries = Vec::new();
    match tip_named(&mut remote, oid, callbacks(url, auth, &failure)) {
        Ok(Some(name)) => tries.push(format!("+{name}:refs/cache/{oid}")),
        Ok(None) => {}
        // Refused credentials or an unknown host key: no fetch goes on.
        Err(e) if failure.0.borrow().is_some() => return Err(fail(&e)),
        Err(e) => tracing::debug!(error = %e, "listing the remote's refs failed"),
    }
    tries.push(pin);
    for refspec in &tries {
        let mut options = fetch_options(callbacks(url, auth, &failure));
        match remote.fetch(&[refspec.as_str()], Some(&mut options), None) {
            Ok(()) => {
                count(&remote);
                if has_commit(repo, oid) {
                    return Ok(fetched);
                }
            }
            Err(e) => tracing::debug!(refspec, error = %e, "narrow fetch refused"),
        }
    }
    tracing::debug!("fetching all branches and tags");
    let mut options = fetch_options(callbacks(url, auth, &failure));
    remote
        .fetch(
            &["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
            Some(&mut options),
            None,
        )
        .map_err(|e| fail(&e))?;
    count(&remote);
    fetched.fell_back = true;
    Ok(fetched)
}

/// The branch or tag the server advertises with `oid` at its tip, if any.
/// Most tasks name the commit a branch points at, and fetching that one
/// ref works with every server, unlike a fetch by commit id, which needs
/// the server's permission.
fn tip_named(
    remote: &mut git2::Remote<'_>,
    oid: Oid,
    callbacks: git2::RemoteCallbacks<'_>,
) -> Result<Option<String>, git2::Error> {
    let connection = remote.connect_auth(git2::Direction::Fetch, Some(callbacks), None)?;
    let found = connection.list().ok().and_then(|heads| {
        heads
            .iter()
            .filter(|h| h.oid() == oid)
            .map(|h| h.name().trim_end_matches("^{}").to_owned())
            .find(|n| n.starts_with("refs/heads/") || n.starts_with("refs/tags/"))
    });
    Ok(found)
}

fn fetch_options(mut callbacks: git2::RemoteCallbacks<'_>) -> FetchOptions<'_> {
    // libgit2 counts received bytes only while a progress callback is set.
    callbacks.transfer_progress(|_| true);
    let mut options = FetchOptions::new();
    options.remote_callbacks(callbacks);
    options.download_tags(AutotagOption::None);
    options
}

/// How deep a tree may nest: far past any real project, and it bounds the
/// directory handles a checkout holds open at once.
const MAX_TREE_DEPTH: usize = 256;

/// Writes the files of `oid` into `dest`, an empty directory, without a
/// `.git`.
///
/// The tree is written by the agent itself rather than by libgit2's
/// checkout, so that every file, directory and link is created relative to
/// a handle on its directory: a directory is created and then opened with
/// `O_NOFOLLOW`, a file with `O_CREAT | O_EXCL`, a link with `symlinkat`.
/// A tree that names an entry twice (a link `a` and a directory `a/`, the
/// classic way to write through a link) fails at the second entry instead
/// of following the first, as do names no checkout may hold. Links are
/// written as links, with their target as committed; nothing here ever
/// follows one. Content is written as committed: no filters or line-ending
/// conversions. Modes are [`shared_mode`]'s (directories
/// [`SHARED_DIR`](crate::beneath::SHARED_DIR)), set on each handle
/// whatever the umask: the task's container may run as any user.
///
/// When `spare` is given, every entry is written there too, from the same
/// blob, while the tree's bytes fit `spare`'s room: that copy becomes the
/// commit's prepared tree. A failure to write the spare copy only ends it;
/// the checkout goes on.
fn export_commit(
    mirror: &Path,
    oid: Oid,
    dest: &Dir,
    spare: Option<&Dir>,
    room: &mut Room,
) -> Result<(), GitError> {
    let repo = Repository::open_bare(mirror).map_err(|e| local("opening the mirror", e))?;
    let commit = repo
        .find_commit(oid)
        .map_err(|e| local("reading the commit", e))?;
    let tree = commit.tree().map_err(|e| local("reading the tree", e))?;
    export_tree(&repo, &tree, (dest, spare), room, "", 0)
}

/// Writes the checkout of `oid` into `dest`, keeping a prepared tree of it
/// when the trees' budget allows one.
fn export_and_keep(
    trees: &PreparedTrees,
    key: &str,
    mirror: &Path,
    oid: Oid,
    dest: &Dir,
) -> Result<(), GitError> {
    let draft = trees.draft().unwrap_or_else(|e| {
        tracing::debug!(error = %e, "no prepared tree: its directory cannot be made");
        None
    });
    let mut room = Room {
        left: trees.budget(),
        written: 0,
        over: draft.is_none(),
    };
    export_commit(
        mirror,
        oid,
        dest,
        draft.as_ref().map(|d| d.dir()),
        &mut room,
    )?;
    if let (Some(draft), false) = (draft, room.over) {
        trees.keep(draft, key, room.written);
    }
    Ok(())
}

/// The bytes a prepared tree may still take while it is written.
#[derive(Debug)]
struct Room {
    left: u64,
    written: u64,
    /// The spare copy was given up: too large, or it could not be written.
    over: bool,
}

impl Room {
    /// Whether `n` more bytes go into the spare copy.
    fn take(&mut self, n: u64) -> bool {
        if self.over || n > self.left {
            self.over = true;
            return false;
        }
        self.left -= n;
        self.written += n;
        true
    }

    /// Gives the spare copy up after `e`.
    fn failed(&mut self, shown: &str, e: std::io::Error) {
        tracing::debug!(entry = shown, error = %e, "the prepared tree could not be written");
        self.over = true;
    }
}

/// Where an export writes: the checkout, and the spare copy if any.
type Sinks<'a> = (&'a Dir, Option<&'a Dir>);

fn export_tree(
    repo: &Repository,
    tree: &git2::Tree<'_>,
    (dir, spare): Sinks<'_>,
    room: &mut Room,
    at: &str,
    depth: usize,
) -> Result<(), GitError> {
    if depth > MAX_TREE_DEPTH {
        return Err(GitError::BadTree(format!(
            "{at} is nested more than {MAX_TREE_DEPTH} directories deep"
        )));
    }
    for entry in tree.iter() {
        let raw = entry.name_bytes();
        let shown = format!("{at}{}", String::from_utf8_lossy(raw));
        let name = entry_name(raw)
            .ok_or_else(|| GitError::BadTree(format!("its tree holds an entry named {shown:?}")))?;
        let written = match entry.filemode() {
            0o040000 => {
                let sub = repo
                    .find_tree(entry.id())
                    .map_err(|e| local(&format!("reading {shown}"), e))?;
                let sub_spare = match spare {
                    Some(s) if !room.over => match shared_dir(s, name) {
                        Ok(d) => Some(d),
                        Err(e) => {
                            room.failed(&shown, e);
                            None
                        }
                    },
                    _ => None,
                };
                shared_dir(dir, name)
                    .map_err(|e| write_error(&shown, e))
                    .and_then(|d| {
                        let sinks = (&d, sub_spare.as_ref());
                        export_tree(repo, &sub, sinks, room, &format!("{shown}/"), depth + 1)
                    })
            }
            mode @ (0o100644 | 0o100755 | 0o100664) => {
                let blob = repo
                    .find_blob(entry.id())
                    .map_err(|e| local(&format!("reading {shown}"), e))?;
                let executable = mode == 0o100755;
                let content = blob.content();
                if let Some(s) = spare {
                    if room.take(content.len() as u64) {
                        if let Err(e) = write_file(s, name, content, executable) {
                            room.failed(&shown, e);
                        }
                    }
                }
                write_file(dir, name, content, executable).map_err(|e| write_error(&shown, e))
            }
            0o120000 => {
                let blob = repo
                    .find_blob(entry.id())
                    .map_err(|e| local(&format!("reading {shown}"), e))?;
                let target = link_target(blob.content()).ok_or_else(|| {
                    GitError::BadTree(format!("{shown} is a link with an unusable target"))
                })?;
                if let Some(s) = spare {
                    if room.take(blob.content().len() as u64) {
                        if let Err(e) = s.symlink_contents(target, name) {
                            room.failed(&shown, e);
                        }
                    }
                }
                dir.symlink_contents(target, name)
                    .map_err(|e| write_error(&shown, e))
            }
            // A submodule: like git, an empty directory.
            0o160000 => {
                if let Some(Err(e)) = spare.filter(|_| !room.over).map(|s| shared_dir(s, name)) {
                    room.failed(&shown, e);
                }
                shared_dir(dir, name)
                    .map(drop)
                    .map_err(|e| write_error(&shown, e))
            }
            mode => Err(GitError::BadTree(format!(
                "{shown} has the unknown file mode {mode:o}"
            ))),
        };
        written?;
    }
    Ok(())
}

/// A tree entry's name as a file name, if a checkout may write it: not
/// empty, `.` or `..`, no slash or NUL, and not `.git` in any case.
fn entry_name(raw: &[u8]) -> Option<&std::ffi::OsStr> {
    use std::os::unix::ffi::OsStrExt;
    let bad = raw.is_empty()
        || raw == b"."
        || raw == b".."
        || raw.contains(&b'/')
        || raw.contains(&0)
        || raw.eq_ignore_ascii_case(b".git");
    (!bad).then(|| std::ffi::OsStr::from_bytes(raw))
}

/// A link's committed target, if it is one a link can hold.
fn link_target(raw: &[u8]) -> Option<&Path> {
    use std::os::unix::ffi::OsStrExt;
    let usable = !raw.is_empty() && !raw.contains(&0) && raw.len() < 4096;
    usable.then(|| Path::new(std::ffi::OsStr::from_bytes(raw)))
}

fn write_file(
    dir: &Dir,
    name: &std::ffi::OsStr,
    content: &[u8],
    executable: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    shared_file(dir, name, executable)?.write_all(content)
}

fn write_error(shown: &str, e: std::io::Error) -> GitError {
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        GitError::BadTree(format!(
            "its tree holds {shown} twice (as a link or file and again, which would write through it)"
        ))
    } else {
        local(&format!("writing {shown}"), e)
    }
}

/// Every `refs/cache/<sha>` of every mirror under `root`, up to `limit`.
fn list_cached_commits(root: &Path, limit: usize) -> Vec<String> {
    let Ok(dirs) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut commits = Vec::new();
    for dir in dirs.flatten() {
        let Ok(repo) = Repository::open_bare(dir.path()) else {
            continue;
        };
        let Ok(refs) = repo.references_glob("refs/cache/*") else {
            continue;
        };
        for name in refs
            .flatten()
            .filter_map(|r| r.name().ok().map(str::to_owned))
        {
            if commits.len() >= limit {
                return commits;
            }
            if let Some(sha) = name.strip_prefix("refs/cache/") {
                commits.push(sha.to_owned());
            }
        }
    }
    commits
}

fn local(action: &str, e: impl std::fmt::Display) -> GitError {
    GitError::Local(format!("{action}: {e}"))
}

fn fetch_error(url: &str, e: &git2::Error) -> GitError {
    let redacted = redact_url(url);
    GitError::Fetch {
        message: e.message().replace(url, &redacted),
        url: redacted,
    }
}

/// Removes credentials (`user:secret@`) from a URL so it can be logged and
/// shown to people.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_commit_ids_are_accepted() {
        assert!(parse_commit_id("0123456789abcdef0123456789abcdef01234567").is_ok());
        assert!(parse_commit_id("0123456").is_err());
        assert!(parse_commit_id("z123456789abcdef0123456789abcdef01234567").is_err());
    }

    #[test]
    fn credentials_are_removed_from_urls() {
        assert_eq!(
            redact_url("https://user:tok@example.com/a/b.git"),
            "https://***@example.com/a/b.git"
        );
        assert_eq!(
            redact_url("https://example.com/a@b.git"),
            "https://example.com/a@b.git"
        );
        assert_eq!(redact_url("file:///tmp/x"), "file:///tmp/x");
    }
}
