//! The git cache: one bare mirror per repository URL, and checkouts of one
//! commit into a task's workspace.
//!
//! A mirror lives in `<root>/<sha256(url)>`. A commit already in the mirror
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

use std::path::{Path, PathBuf};

use git2::build::CheckoutBuilder;
use git2::{AutotagOption, FetchOptions, Oid, Repository};
use sha2::{Digest, Sha256};

use crate::keyed_lock::KeyedLocks;

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

/// The cache of bare mirrors under one directory.
#[derive(Debug)]
pub struct GitCache {
    root: PathBuf,
    locks: KeyedLocks,
}

impl GitCache {
    /// A cache keeping its mirrors under `root` (created on first use).
    pub fn new(root: PathBuf) -> Self {
        GitCache {
            root,
            locks: KeyedLocks::default(),
        }
    }

    /// Where the mirror of `url` lives.
    pub fn mirror_path(&self, url: &str) -> PathBuf {
        self.root.join(hex::encode(Sha256::digest(url.as_bytes())))
    }

    /// Makes sure `commit` of `url` is in the cache, then writes its files
    /// into `dest` (created if missing; no `.git` is written there). Says
    /// whether the commit came from the cache or how much was fetched.
    ///
    /// # Errors
    /// [`GitError::BadCommitId`] for an id that is not 40 hex digits,
    /// [`GitError::Fetch`] when the repository cannot be reached,
    /// [`GitError::CommitNotFound`] when it does not hold the commit, and
    /// [`GitError::Local`] when the mirror or `dest` cannot be written.
    #[tracing::instrument(skip_all, fields(url = %redact_url(url), commit))]
    pub async fn checkout(
        &self,
        url: &str,
        commit: &str,
        dest: &Path,
    ) -> Result<Fetched, GitError> {
        let oid = parse_commit_id(commit)?;
        let mirror = self.mirror_path(url);
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
            let (m, u) = (mirror.clone(), url.to_owned());
            run_blocking(move || {
                let _held_until_the_fetch_ends = guard;
                ensure_commit(&m, &u, oid)
            })
            .await?
        };
        let dest = dest.to_owned();
        run_blocking(move || export_commit(&mirror, oid, &dest)).await?;
        Ok(fetched)
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
fn ensure_commit(mirror: &Path, url: &str, oid: Oid) -> Result<Fetched, GitError> {
    let repo = open_mirror(mirror)?;
    let mut fetched = Fetched::default();
    if has_commit(&repo, oid) {
        tracing::debug!("commit already cached");
        fetched.from_cache = true;
    } else {
        fetched = fetch_commit(&repo, url, oid)?;
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
fn fetch_commit(repo: &Repository, url: &str, oid: Oid) -> Result<Fetched, GitError> {
    let mut remote = repo
        .remote_anonymous(url)
        .map_err(|e| fetch_error(url, &e))?;
    let mut fetched = Fetched::default();
    let mut count = |remote: &git2::Remote<'_>| {
        let stats = remote.stats();
        fetched.objects += stats.received_objects();
        fetched.bytes += stats.received_bytes();
    };
    let pin = format!("+{oid}:refs/cache/{oid}");
    let mut tries = Vec::new();
    if let Some(name) = tip_named(&mut remote, oid) {
        tries.push(format!("+{name}:refs/cache/{oid}"));
    }
    tries.push(pin);
    for refspec in &tries {
        match remote.fetch(&[refspec.as_str()], Some(&mut fetch_options()), None) {
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
    remote
        .fetch(
            &["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
            Some(&mut fetch_options()),
            None,
        )
        .map_err(|e| fetch_error(url, &e))?;
    count(&remote);
    fetched.fell_back = true;
    Ok(fetched)
}

/// The branch or tag the server advertises with `oid` at its tip, if any.
/// Most tasks name the commit a branch points at, and fetching that one
/// ref works with every server, unlike a fetch by commit id, which needs
/// the server's permission.
fn tip_named(remote: &mut git2::Remote<'_>, oid: Oid) -> Option<String> {
    if let Err(e) = remote.connect(git2::Direction::Fetch) {
        tracing::debug!(error = %e, "listing the remote's refs failed");
        return None;
    }
    let found = remote.list().ok().and_then(|heads| {
        heads
            .iter()
            .filter(|h| h.oid() == oid)
            .map(|h| h.name().trim_end_matches("^{}").to_owned())
            .find(|n| n.starts_with("refs/heads/") || n.starts_with("refs/tags/"))
    });
    let _ = remote.disconnect();
    found
}

fn fetch_options() -> FetchOptions<'static> {
    let mut callbacks = git2::RemoteCallbacks::new();
    // libgit2 counts received bytes only while a progress callback is set.
    callbacks.transfer_progress(|_| true);
    let mut options = FetchOptions::new();
    options.remote_callbacks(callbacks);
    options.download_tags(AutotagOption::None);
    options
}

/// Writes the files of `oid` into `dest`, without a `.git`.
fn export_commit(mirror: &Path, oid: Oid, dest: &Path) -> Result<(), GitError> {
    let repo = Repository::open_bare(mirror).map_err(|e| local("opening the mirror", e))?;
    let commit = repo
        .find_commit(oid)
        .map_err(|e| local("reading the commit", e))?;
    let tree = commit.tree().map_err(|e| local("reading the tree", e))?;
    std::fs::create_dir_all(dest).map_err(|e| local("creating the workspace", e))?;
    let mut checkout = CheckoutBuilder::new();
    checkout.target_dir(dest).force().update_index(false);
    repo.checkout_tree(tree.as_object(), Some(&mut checkout))
        .map_err(|e| local("writing the files", e))
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
