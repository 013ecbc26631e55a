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
//! workspace reaches the next task. Their files have a workspace's modes
//! (readable and writable by every user, see [`shared_mode`]), so that a
//! copy or a move is ready for a container of any user; the directory
//! holding them is the agent's alone (0700), so no other user on the node
//! reaches them. A tree is written under a temporary name (`.new-…`),
//! during the first checkout of its commit and from the same blobs, and
//! renamed to `<key>.<bytes>` only once it is whole, so a tree under its
//! final name is complete, across agent restarts too.
//!
//! The trees together hold at most a budget of bytes (file contents and
//! link targets) and at most [`MAX_TREES`] trees; the least recently used
//! leave first, and a commit larger than the whole budget is not kept. A
//! tree that leaves while a checkout still copies from it is removed when
//! that copy is done.
//!
//! A tree checked out lately may also have a spare: one more copy of it,
//! made in the background after a checkout, that the next checkout of the
//! same commit moves into its workspace entry by entry (a rename each, the
//! files themselves never touched) instead of copying, then replaced in
//! the background again. A spare is as private as its tree (nothing but
//! the agent ever sees it before it is moved), is registered only once it
//! is whole, and uses only room the budget has left: it never makes a tree
//! leave, and spares leave before any tree does. Spares are not kept
//! across restarts.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, PermissionsExt};
use git2::Oid;

use crate::beneath::{private, shared_dir, shared_file};

/// The most trees kept at once, whatever their size.
pub const MAX_TREES: usize = 256;

/// How a spare tree's directory is named, followed by a random id.
const SPARE_PREFIX: &str = ".spare-";

/// The longest a checkout waits for a spare being made before it copies
/// the tree itself.
const SPARE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

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
    /// The keys of trees checked out since their spare was last made.
    wanted: Vec<String>,
}

/// One whole tree on disk.
#[derive(Debug)]
pub(crate) struct Tree {
    key: String,
    path: PathBuf,
    bytes: u64,
    /// Left the budget: removed from disk when the last copy from it ends.
    retired: AtomicBool,
    /// Its spare copy. Changed with the trees' state locked first, as the
    /// budget counts it.
    spare: Mutex<SpareSlot>,
    /// Signalled when a spare being made is done (or given up).
    spare_made: Condvar,
}

/// A tree's spare: whole and ready, or being made.
#[derive(Debug, Default)]
struct SpareSlot {
    ready: Option<Spare>,
    making: bool,
}

impl Tree {
    fn new(key: String, path: PathBuf, bytes: u64) -> Self {
        Tree {
            key,
            path,
            bytes,
            retired: AtomicBool::new(false),
            spare: Mutex::default(),
            spare_made: Condvar::new(),
        }
    }

    fn spare(&self) -> MutexGuard<'_, SpareSlot> {
        self.spare.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits, at most `limit`, while a spare of this tree is being made.
    fn await_spare(&self, limit: std::time::Duration) {
        let slot = self.spare();
        let waited = self
            .spare_made
            .wait_timeout_while(slot, limit, |slot| slot.making);
        drop(waited.unwrap_or_else(|e| e.into_inner()));
    }
}

/// A whole spare copy of a tree, removed from disk when dropped (once
/// moved into a workspace, only its empty directory is left).
#[derive(Debug)]
struct Spare {
    path: PathBuf,
}

impl Drop for Spare {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(spare = %self.path.display(), error = %e, "removing a spare tree failed");
            }
        }
    }
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
        // Made before trees' files were shared: closed now.
        if let Err(e) = private_dir(&trees.dir) {
            tracing::warn!(error = %e, dir = %trees.dir.display(), "the prepared trees' directory could not be made private");
        }
        let mut left = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if name.starts_with(".new-") || name.starts_with(SPARE_PREFIX) {
                let _ = std::fs::remove_dir_all(&path);
            } else if let Some((key, bytes)) = parse_name(name) {
                left.push(Tree::new(key.to_owned(), path, bytes));
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

    /// The bytes the trees and their spares hold now (or are being
    /// written), and how many trees there are.
    pub fn usage(&self) -> (u64, usize) {
        let state = self.lock();
        (state.bytes, state.trees.len())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
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
        private_dir(&self.dir)?;
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
        drop(self.admit(Arc::new(Tree::new(key.to_owned(), path, bytes))));
    }

    /// Moves the spare of `tree`, when it has one ready, into `dest`, an
    /// empty directory on the same file system, entry by entry, never
    /// replacing anything there; a spare being made is waited for (the
    /// rest of its copy is never longer than a whole copy). Returns
    /// `false`, with `dest` untouched, when there is no spare or it cannot
    /// be moved there (another file system): then the caller copies the
    /// tree. Either way the tree is wanted for a new spare
    /// ([`PreparedTrees::make_wanted`]).
    ///
    /// # Errors
    /// The system's error, naming the entry, when a move fails after
    /// others were made.
    pub(crate) fn move_spare_into(&self, tree: &Tree, dest: &Dir) -> io::Result<bool> {
        self.want(&tree.key);
        tree.await_spare(SPARE_WAIT);
        let spare = {
            let mut state = self.lock();
            let Some(spare) = tree.spare().ready.take() else {
                return Ok(false);
            };
            state.bytes -= tree.bytes;
            spare
        };
        let from = Dir::open_ambient_dir(&spare.path, ambient_authority())?;
        let names = from
            .entries()?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<io::Result<Vec<_>>>()?;
        use rustix::io::Errno;
        for (i, name) in names.iter().enumerate() {
            let moved = rustix::fs::renameat_with(
                &from,
                name.as_os_str(),
                dest,
                name.as_os_str(),
                rustix::fs::RenameFlags::NOREPLACE,
            );
            match moved {
                Ok(()) => {}
                Err(e @ (Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP))
                    if i == 0 =>
                {
                    // Another file system, or one that cannot refuse to
                    // replace: nothing moved, the tree is copied.
                    tracing::debug!(error = %e, "a spare tree cannot be moved into a workspace");
                    return Ok(false);
                }
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("moving {}: {e}", name.to_string_lossy()),
                    ))
                }
            }
        }
        Ok(true)
    }

    /// Notes that the tree `key` was checked out: its next spare is
    /// wanted.
    pub(crate) fn want(&self, key: &str) {
        let mut state = self.lock();
        if self.budget > 0 && !state.wanted.iter().any(|k| k == key) {
            state.wanted.push(key.to_owned());
        }
    }

    /// Whether any tree (or `key`, when given) is wanted for a spare.
    pub(crate) fn wants(&self, key: Option<&str>) -> bool {
        let state = self.lock();
        match key {
            None => !state.wanted.is_empty(),
            Some(key) => state.wanted.iter().any(|k| k == key),
        }
    }

    /// Makes a spare of every tree checked out since its last one (on the
    /// calling thread: each is a whole copy), or only of `key` when given
    /// and still wanted.
    pub(crate) fn make_wanted(&self, key: Option<&str>) {
        let wanted = {
            let mut state = self.lock();
            let keys = match key {
                None => std::mem::take(&mut state.wanted),
                Some(key) => match state.wanted.iter().position(|k| k == key) {
                    Some(at) => vec![state.wanted.remove(at)],
                    None => Vec::new(),
                },
            };
            keys.iter()
                .filter_map(|k| state.trees.iter().find(|t| &t.key == k).cloned())
                .collect::<Vec<_>>()
        };
        for tree in wanted {
            self.make_spare(&tree);
        }
    }

    /// Makes a spare of `tree` (on the calling thread; it copies the whole
    /// tree) unless it has one, one is being made, the tree left, or the
    /// budget has no room for it.
    pub(crate) fn make_spare(&self, tree: &Tree) {
        {
            let mut state = self.lock();
            let mut slot = tree.spare();
            let busy = tree.retired.load(Ordering::Acquire) || slot.ready.is_some() || slot.making;
            if busy || state.bytes + tree.bytes > self.budget {
                return;
            }
            slot.making = true;
            state.bytes += tree.bytes;
        }
        let made = self.write_spare(tree);
        let mut state = self.lock();
        let mut slot = tree.spare();
        slot.making = false;
        let unused = match made {
            Ok(spare) if !tree.retired.load(Ordering::Acquire) => {
                slot.ready = Some(spare);
                None
            }
            Ok(spare) => Some(spare),
            Err(e) => {
                tracing::debug!(tree = %tree.key, error = %e, "no spare tree");
                None
            }
        };
        if slot.ready.is_none() {
            state.bytes -= tree.bytes;
        }
        drop(slot);
        drop(state);
        tree.spare_made.notify_all();
        drop(unused);
    }

    /// Writes a copy of `tree` under a spare's name.
    fn write_spare(&self, tree: &Tree) -> io::Result<Spare> {
        let spare = Spare {
            path: self
                .dir
                .join(format!("{SPARE_PREFIX}{}", uuid::Uuid::new_v4().simple())),
        };
        std::fs::create_dir(&spare.path)?;
        let to = Dir::open_ambient_dir(&spare.path, ambient_authority())?;
        tree.copy_into(&to)?;
        Ok(spare)
    }

    /// How many trees have a spare ready.
    pub fn spares(&self) -> usize {
        let state = self.lock();
        state
            .trees
            .iter()
            .filter(|t| t.spare().ready.is_some())
            .count()
    }

    /// Adds `tree` as the most recently used, and returns the trees that
    /// left to make room (or `tree` itself, when it cannot fit) and the
    /// spares that did, to be dropped outside the lock.
    fn admit(&self, tree: Arc<Tree>) -> (Vec<Arc<Tree>>, Vec<Spare>) {
        let mut state = self.lock();
        let mut gone = (Vec::new(), Vec::new());
        if self.budget == 0
            || tree.bytes > self.budget
            || state.trees.iter().any(|t| t.key == tree.key)
        {
            tree.retired.store(true, Ordering::Release);
            gone.0.push(tree);
            return gone;
        }
        // Spares make room first, the least recently used tree's first.
        while state.bytes + tree.bytes > self.budget {
            let Some((bytes, spare)) = state
                .trees
                .iter()
                .find_map(|t| t.spare().ready.take().map(|s| (t.bytes, s)))
            else {
                break;
            };
            state.bytes -= bytes;
            gone.1.push(spare);
        }
        while !state.trees.is_empty()
            && (state.bytes + tree.bytes > self.budget || state.trees.len() >= MAX_TREES)
        {
            let old = state.trees.remove(0);
            state.bytes -= old.bytes;
            if let Some(spare) = old.spare().ready.take() {
                state.bytes -= old.bytes;
                gone.1.push(spare);
            }
            old.retired.store(true, Ordering::Release);
            gone.0.push(old);
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

/// Makes `dir` (with its parents) when missing, and its owner's alone.
fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    private(&Dir::open_ambient_dir(dir, ambient_authority())?)
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
            let sub_to = shared_dir(to, &name).map_err(|e| named(e, &name))?;
            let sub_from = from.open_dir_nofollow(&name).map_err(|e| named(e, &name))?;
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
    let mut read = cap_std::fs::OpenOptions::new();
    read.read(true).follow(FollowSymlinks::No);
    let source = from.open_with(name, &read)?;
    // A tree written before modes were shared (0644 and 0755) is copied as
    // one written since.
    let executable = source.metadata()?.permissions().mode() & 0o100 != 0;
    let target = shared_file(to, name, executable)?;
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

    /// The files under `dir`, with their contents, in order.
    fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(at) = stack.pop() {
            for entry in std::fs::read_dir(&at).unwrap() {
                let path = entry.unwrap().path();
                let kind = std::fs::symlink_metadata(&path).unwrap().file_type();
                let shown = path.strip_prefix(dir).unwrap().display().to_string();
                if kind.is_dir() {
                    stack.push(path);
                } else if kind.is_symlink() {
                    let target = std::fs::read_link(&path).unwrap();
                    found.push((shown, target.into_os_string().into_encoded_bytes()));
                } else {
                    found.push((shown, std::fs::read(&path).unwrap()));
                }
            }
        }
        found.sort();
        found
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_spare_is_moved_in_whole_and_the_tree_stays_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let trees = PreparedTrees::open(dir.path().join("trees"), 1000);
        let draft = trees.draft().unwrap().unwrap();
        draft.dir().write("f", b"committed").unwrap();
        draft.dir().create_dir_all("sub/deeper").unwrap();
        draft.dir().write("sub/deeper/g", b"deep").unwrap();
        draft
            .dir()
            .symlink_contents("/etc/passwd", "outside")
            .unwrap();
        trees.keep(draft, &key(1), 13);
        let tree = trees.get(&key(1)).unwrap();
        let pristine = files_under(&tree.path);

        let work = tempfile::tempdir().unwrap();
        let dest_of = |name: &str| {
            std::fs::create_dir(work.path().join(name)).unwrap();
            Dir::open_ambient_dir(work.path().join(name), ambient_authority()).unwrap()
        };
        assert!(!trees.move_spare_into(&tree, &dest_of("none")).unwrap());
        assert!(names_in(&work.path().join("none")).is_empty());

        trees.make_spare(&tree);
        assert_eq!((trees.spares(), trees.usage()), (1, (26, 1)));
        assert!(trees.move_spare_into(&tree, &dest_of("a")).unwrap());
        assert_eq!(files_under(&work.path().join("a")), pristine);
        assert_eq!(
            std::fs::read_link(work.path().join("a/outside")).unwrap(),
            Path::new("/etc/passwd"),
            "a link is moved as a link"
        );
        assert_eq!((trees.spares(), trees.usage()), (0, (13, 1)));
        assert_eq!(
            names_in(&dir.path().join("trees")),
            [format!("{}.13", key(1))],
            "the spare's directory went with it"
        );

        // What the task does to its copy reaches neither the tree nor the
        // next spare.
        std::fs::write(work.path().join("a/f"), "changed").unwrap();
        std::fs::write(work.path().join("a/sub/deeper/g"), "changed").unwrap();
        std::fs::remove_file(work.path().join("a/outside")).unwrap();
        trees.make_spare(&tree);
        assert_eq!(files_under(&tree.path), pristine);
        assert!(trees.move_spare_into(&tree, &dest_of("b")).unwrap());
        assert_eq!(files_under(&work.path().join("b")), pristine);

        // A spare never replaces what its destination holds.
        trees.make_spare(&tree);
        let taken = dest_of("taken");
        taken.write("f", b"mine").unwrap();
        let e = trees.move_spare_into(&tree, &taken).unwrap_err();
        assert!(e.to_string().contains("moving f"), "{e}");
        assert_eq!(std::fs::read(work.path().join("taken/f")).unwrap(), b"mine");
        assert_eq!(trees.usage(), (13, 1));
    }

    #[test]
    fn a_checkout_waits_for_a_spare_being_made_rather_than_copying_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let trees = Arc::new(PreparedTrees::open(dir.path().join("trees"), 1 << 30));
        let draft = trees.draft().unwrap().unwrap();
        for i in 0..2000 {
            draft.dir().write(format!("f{i}"), b"x").unwrap();
        }
        trees.keep(draft, &key(1), 2000);
        let tree = trees.get(&key(1)).unwrap();
        let making = std::thread::spawn({
            let (trees, tree) = (trees.clone(), tree.clone());
            move || trees.make_spare(&tree)
        });
        while !tree.spare().making {
            assert!(
                !making.is_finished(),
                "the spare was made before it was seen"
            );
            std::thread::yield_now();
        }
        let work = tempfile::tempdir().unwrap();
        let dest = Dir::open_ambient_dir(work.path(), ambient_authority()).unwrap();
        assert!(trees.move_spare_into(&tree, &dest).unwrap());
        making.join().unwrap();
        assert_eq!(names_in(work.path()).len(), 2000);
        assert_eq!(trees.usage(), (2000, 1));
        assert_eq!(names_in(&dir.path().join("trees")).len(), 1);
    }

    #[test]
    fn spares_use_only_room_the_trees_leave_and_leave_first() {
        let dir = tempfile::tempdir().unwrap();
        let trees = PreparedTrees::open(dir.path().join("trees"), 100);
        tree_of(&trees, &key(1), 60);
        let first = trees.get(&key(1)).unwrap();
        trees.make_spare(&first);
        assert_eq!(trees.spares(), 0, "no room for a second copy");
        assert_eq!(trees.usage(), (60, 1));

        let trees = PreparedTrees::open(dir.path().join("trees"), 130);
        let first = trees.get(&key(1)).unwrap();
        trees.make_spare(&first);
        trees.make_spare(&first);
        assert_eq!((trees.spares(), trees.usage()), (1, (120, 1)));

        // A new tree needs the room: the spare goes, both trees stay.
        tree_of(&trees, &key(2), 60);
        assert_eq!((trees.spares(), trees.usage()), (0, (120, 2)));
        assert!(trees.get(&key(1)).is_some());
        assert_eq!(names_in(&dir.path().join("trees")).len(), 2);

        // A tree that leaves takes its spare with it.
        let trees = PreparedTrees::open(dir.path().join("trees"), 200);
        let second = trees.get(&key(2)).unwrap();
        trees.make_spare(&second);
        assert_eq!(trees.usage(), (180, 2));
        tree_of(&trees, &key(3), 150);
        assert_eq!((trees.spares(), trees.usage()), (0, (150, 1)));
        drop(second);
        assert_eq!(
            names_in(&dir.path().join("trees")),
            [format!("{}.150", key(3))]
        );
    }

    #[test]
    fn a_restart_takes_up_whole_trees_and_removes_half_written_ones() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("trees");
        {
            let trees = PreparedTrees::open(at.clone(), 100);
            tree_of(&trees, &key(1), 30);
            tree_of(&trees, &key(2), 30);
            // A crash in the middle of writing a third, with a spare made.
            let draft = trees.draft().unwrap().unwrap();
            draft.dir().write("f", b"half").unwrap();
            std::mem::forget(draft);
            let tree = trees.get(&key(1)).unwrap();
            trees.make_spare(&tree);
            assert_eq!(trees.spares(), 1);
            std::mem::forget(tree);
            std::mem::forget(trees);
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
