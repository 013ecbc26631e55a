//! Prepared trees: a pristine copy of the files of each commit the node
//! checked out lately, so that the next checkout of that commit copies
//! files instead of reading every blob out of the mirror's packs again.
//!
//! Reading a tree out of a packed mirror resolves each blob's delta chain
//! one blob at a time; for a project of a few hundred files that is most of
//! a warm start. Copying files already written is a fraction of it
//! (`copy_file_range`, no decompression).
//!
//! The trees live in a directory of their own, never mounted into a
//! container: a task only ever gets a copy, so nothing it does to its
//! workspace reaches the next task. A tree is written under a temporary
//! name (`.new-…`), during the first checkout of its commit and from the
//! same blobs, and renamed to `<key>.<bytes>` only once it is whole, so a
//! tree under its final name is complete, across agent restarts too.
//!
//! The trees together hold at most a budget of bytes (file contents and
//! link targets) and at most [`MAX_TREES`] trees; the least recently used
//! leave first, and a commit larger than the whole budget is not kept. A
//! tree that leaves while a checkout still copies from it is removed when
//! that copy is done.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, PermissionsExt};
use git2::Oid;

/// The most trees kept at once, whatever their size.
pub const MAX_TREES: usize = 256;

/// How deep a copied tree may nest (the checkouts that wrote it were held
/// to the same bound).
const MAX_DEPTH: usize = 300;

/// The prepared trees of one node.
#[derive(Debug)]
pub struct PreparedTrees {
    dir: PathBuf,
    budget: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Least recently used first.
    trees: Vec<Arc<Tree>>,
    bytes: u64,
}

/// One whole tree on disk.
#[derive(Debug)]
pub(crate) struct Tree {
    key: String,
    path: PathBuf,
    bytes: u64,
    /// Left the budget: removed from disk when the last copy from it ends.
    retired: AtomicBool,
}

impl Drop for Tree {
    fn drop(&mut self) {
        if self.retired.load(Ordering::Acquire) {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                tracing::warn!(tree = %self.path.display(), error = %e, "removing a prepared tree failed");
            }
        }
    }
}

/// A tree being written; removed unless [`PreparedTrees::keep`] takes it.
#[derive(Debug)]
pub(crate) struct Draft {
    path: PathBuf,
    dir: Dir,
    kept: bool,
}

impl Draft {
    /// The directory to write the tree into.
    pub(crate) fn dir(&self) -> &Dir {
        &self.dir
    }
}

impl Drop for Draft {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

impl PreparedTrees {
    /// The trees kept under `dir` within `budget` bytes (0: none are kept).
    /// Whole trees a previous run left there are taken up while they fit;
    /// the rest, and any tree left half-written, are removed.
    pub fn open(dir: PathBuf, budget: u64) -> Self {
        let trees = PreparedTrees {
            dir,
            budget,
            state: Mutex::default(),
        };
        let Ok(entries) = std::fs::read_dir(&trees.dir) else {
            return trees;
        };
        let mut left = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if name.starts_with(".new-") {
                let _ = std::fs::remove_dir_all(&path);
            } else if let Some((key, bytes)) = parse_name(name) {
                left.push(Tree {
                    key: key.to_owned(),
                    path,
                    bytes,
                    retired: AtomicBool::new(false),
                });
            }
        }
        for tree in left {
            let tree = Arc::new(tree);
            // Over the budget: retired at once, so removed on the way out.
            drop(trees.admit(tree));
        }
        trees
    }

    /// The bytes the trees may hold together.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The bytes the trees hold now, and how many there are.
    pub fn usage(&self) -> (u64, usize) {
        let state = self.lock();
        (state.bytes, state.trees.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The name of the tree of `oid` checked out of `mirror`.
    pub(crate) fn key(mirror: &Path, oid: Oid) -> String {
        let mirror = mirror
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{mirror}-{oid}")
    }

    /// The tree named `key`, if it is kept; it is now the most recently
    /// used.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<Tree>> {
        let mut state = self.lock();
        let at = state.trees.iter().position(|t| t.key == key)?;
        let tree = state.trees.remove(at);
        state.trees.push(tree.clone());
        Some(tree)
    }

    /// A new tree to write, or `None` when no tree is kept at all.
    ///
    /// # Errors
    /// The system's error when the directory cannot be made.
    pub(crate) fn draft(&self) -> io::Result<Option<Draft>> {
        if self.budget == 0 {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.dir)?;
        let path = self
            .dir
            .join(format!(".new-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&path)?;
        let dir = match Dir::open_ambient_dir(&path, ambient_authority()) {
            Ok(dir) => dir,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&path);
                return Err(e);
            }
        };
        Ok(Some(Draft {
            path,
            dir,
            kept: false,
        }))
    }

    /// Keeps `draft`, a whole tree of `bytes` bytes, as the tree `key`,
    /// making room by letting the least recently used go. A tree larger
    /// than the whole budget, or one already kept under that key, is
    /// dropped instead.
    pub(crate) fn keep(&self, mut draft: Draft, key: &str, bytes: u64) {
        if bytes > self.budget || self.lock().trees.iter().any(|t| t.key == key) {
            return;
        }
        let path = self.dir.join(format!("{key}.{bytes}"));
        if let Err(e) = std::fs::rename(&draft.path, &path) {
            tracing::debug!(tree = %path.display(), error = %e, "a prepared tree was not kept");
            return;
        }
        draft.kept = true;
        let tree = Arc::new(Tree {
            key: key.to_owned(),
            path,
            bytes,
            retired: AtomicBool::new(false),
        });
        drop(self.admit(tree));
    }

    /// Adds `tree` as the most recently used, and returns the trees that
    /// left to make room (or `tree` itself, when it cannot fit), to be
    /// dropped outside the lock.
    fn admit(&self, tree: Arc<Tree>) -> Vec<Arc<Tree>> {
        let mut state = self.lock();
        let mut gone = Vec::new();
        if self.budget == 0
            || tree.bytes > self.budget
            || state.trees.iter().any(|t| t.key == tree.key)
        {
            tree.retired.store(true, Ordering::Release);
            gone.push(tree);
            return gone;
        }
        while !state.trees.is_empty()
            && (state.bytes + tree.bytes > self.budget || state.trees.len() >= MAX_TREES)
        {
            let old = state.trees.remove(0);
            state.bytes -= old.bytes;
            old.retired.store(true, Ordering::Release);
            gone.push(old);
        }
        state.bytes += tree.bytes;
        state.trees.push(tree);
        gone
    }
}

impl Tree {
    /// Copies the tree's files, directories and links into `dest`, an
    /// empty directory. Nothing is followed: links are copied as links,
    /// files created with `O_EXCL` beneath `dest`'s handle.
    ///
    /// # Errors
    /// The system's error, naming the entry, when reading or writing fails.
    pub(crate) fn copy_into(&self, dest: &Dir) -> io::Result<()> {
        let from = Dir::open_ambient_dir(&self.path, ambient_authority())?;
        copy_dir(&from, dest, "", 0)
    }
}

/// `<key>.<bytes>` as (key, bytes).
fn parse_name(name: &str) -> Option<(&str, u64)> {
    let (key, bytes) = name.rsplit_once('.')?;
    let (_, oid) = key.rsplit_once('-')?;
    let plausible = oid.len() == 40 && oid.bytes().all(|b| b.is_ascii_hexdigit());
    plausible.then_some(())?;
    Some((key, bytes.parse().ok()?))
}

fn copy_dir(from: &Dir, to: &Dir, at: &str, depth: usize) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other(format!("{at} is nested too deep to copy")));
    }
    let named = |e: io::Error, name: &std::ffi::OsStr| {
        io::Error::new(
            e.kind(),
            format!("copying {at}{}: {e}", name.to_string_lossy()),
        )
    };
    for entry in from.entries()? {
        let entry = entry?;
        let name = entry.file_name();
        let kind = entry.file_type().map_err(|e| named(e, &name))?;
        if kind.is_dir() {
            to.create_dir(&name).map_err(|e| named(e, &name))?;
            let sub_from = from.open_dir_nofollow(&name).map_err(|e| named(e, &name))?;
            let sub_to = to.open_dir_nofollow(&name).map_err(|e| named(e, &name))?;
            let at = format!("{at}{}/", name.to_string_lossy());
            copy_dir(&sub_from, &sub_to, &at, depth + 1)?;
        } else if kind.is_symlink() {
            let target = from
                .read_link_contents(&name)
                .map_err(|e| named(e, &name))?;
            to.symlink_contents(target, &name)
                .map_err(|e| named(e, &name))?;
        } else if kind.is_file() {
            copy_file(from, to, &name).map_err(|e| named(e, &name))?;
        }
        // Nothing else is ever written into a tree.
    }
    Ok(())
}

fn copy_file(from: &Dir, to: &Dir, name: &std::ffi::OsStr) -> io::Result<()> {
    use cap_std::fs::OpenOptionsExt;
    let mut read = cap_std::fs::OpenOptions::new();
    read.read(true).follow(FollowSymlinks::No);
    let source = from.open_with(name, &read)?;
    let mode = source.metadata()?.permissions().mode() & 0o777;
    let mut write = cap_std::fs::OpenOptions::new();
    write
        .write(true)
        .create_new(true)
        .follow(FollowSymlinks::No)
        .mode(mode);
    let target = to.open_with(name, &write)?;
    io::copy(&mut source.into_std(), &mut target.into_std())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_tree_names_are_taken_up() {
        let oid = "0123456789abcdef0123456789abcdef01234567";
        let name = format!("ab12-{oid}.9000");
        assert_eq!(parse_name(&name), Some((&name[..name.len() - 5], 9000)));
        assert_eq!(parse_name(&format!("ab12-{oid}")), None);
        assert_eq!(parse_name("ab12-0123.5"), None);
        assert_eq!(parse_name(&format!("ab12-{oid}.x")), None);
    }

    fn tree_of(trees: &PreparedTrees, key: &str, bytes: usize) {
        let draft = trees.draft().unwrap().unwrap();
        draft.dir().write("f", vec![b'x'; bytes]).unwrap();
        trees.keep(draft, key, bytes as u64);
    }

    fn key(n: u8) -> String {
        format!("m-{}", format!("{n:02x}").repeat(20))
    }

    #[test]
    fn the_least_recently_used_leave_first_and_their_files_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let trees = PreparedTrees::open(dir.path().join("trees"), 100);
        tree_of(&trees, &key(1), 40);
        tree_of(&trees, &key(2), 40);
        assert!(trees.get(&key(1)).is_some(), "used again: now the newest");
        tree_of(&trees, &key(3), 40);
        assert!(trees.get(&key(2)).is_none(), "the least recently used left");
        assert!(trees.get(&key(1)).is_some() && trees.get(&key(3)).is_some());
        assert_eq!(trees.usage(), (80, 2));
        let on_disk: Vec<_> = std::fs::read_dir(dir.path().join("trees"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(on_disk.len(), 2, "{on_disk:?}");
        assert!(
            !on_disk.iter().any(|n| n.starts_with(&key(2))),
            "{on_disk:?}"
        );

        // Larger than the whole budget: not kept, nothing left behind.
        tree_of(&trees, &key(4), 101);
        assert!(trees.get(&key(4)).is_none());
        assert_eq!(trees.usage(), (80, 2));
        assert_eq!(
            std::fs::read_dir(dir.path().join("trees")).unwrap().count(),
            2
        );
    }

    #[test]
    fn a_tree_that_leaves_while_copied_from_goes_when_the_copy_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let trees = PreparedTrees::open(dir.path().join("trees"), 50);
        tree_of(&trees, &key(1), 40);
        let held = trees.get(&key(1)).unwrap();
        tree_of(&trees, &key(2), 40);
        assert!(trees.get(&key(1)).is_none());
        assert!(held.path.exists(), "still being copied from");
        let dest = tempfile::tempdir().unwrap();
        let to = Dir::open_ambient_dir(dest.path(), ambient_authority()).unwrap();
        held.copy_into(&to).unwrap();
        assert_eq!(std::fs::read(dest.path().join("f")).unwrap().len(), 40);
        let path = held.path.clone();
        drop(held);
        assert!(!path.exists(), "removed with the last copy");
    }

    #[test]
    fn a_restart_takes_up_whole_trees_and_removes_half_written_ones() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("trees");
        {
            let trees = PreparedTrees::open(at.clone(), 100);
            tree_of(&trees, &key(1), 30);
            tree_of(&trees, &key(2), 30);
            // A crash in the middle of writing a third.
            let draft = trees.draft().unwrap().unwrap();
            draft.dir().write("f", b"half").unwrap();
            std::mem::forget(draft);
        }
        let again = PreparedTrees::open(at.clone(), 100);
        assert_eq!(again.usage(), (60, 2));
        assert!(again.get(&key(1)).is_some() && again.get(&key(2)).is_some());
        assert_eq!(
            std::fs::read_dir(&at).unwrap().count(),
            2,
            "the half tree is gone"
        );

        // A smaller budget now: what no longer fits is removed.
        drop(again);
        let small = PreparedTrees::open(at.clone(), 40);
        assert_eq!(small.usage().1, 1);
        assert_eq!(std::fs::read_dir(&at).unwrap().count(), 1);
        drop(small);
        let none = PreparedTrees::open(at.clone(), 0);
        assert_eq!(none.usage(), (0, 0));
        assert!(none.draft().unwrap().is_none());
        assert_eq!(std::fs::read_dir(&at).unwrap().count(), 0);
    }
}
