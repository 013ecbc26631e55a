//! Files beneath a directory the agent owns, never through a link out of it.
//!
//! Everything the agent reads or writes for a task (the checkout, inputs and
//! their temporary files, outputs, the build context, the attempt's own
//! notes) lies in directories whose content the task controls: a repository
//! can commit symbolic links, and a task's code can make links and swap
//! directories for links while it runs. A path checked first and opened
//! afterwards can be redirected in between, so nothing here checks and then
//! opens. A [`Root`] holds its directory open, and every path below it is
//! resolved from that handle by the kernel: `openat2` with
//! `RESOLVE_BENEATH` where the kernel has it (Linux 5.6 and later),
//! otherwise a walk that opens one component at a time with `O_NOFOLLOW`
//! and resolves links itself (cap-std does both). A link that stays inside
//! is followed like any other path; one that leads out (absolute, or
//! climbing with `..` past the root) is an error, [`PathError::Escapes`].
//!
//! Names the agent derives itself get the same care: a temporary file is
//! created with `O_CREAT | O_EXCL` under a random name (an existing link
//! there makes the create fail instead of being followed), and renamed into
//! place within its directory's handle, which replaces a link at the final
//! name rather than writing through it.
//!
//! A workspace is *shared* ([`Root::shared`]): the task's container may
//! run as any user (an image's `USER`, or an entrypoint that drops root),
//! and that user reads and writes its workspace as the agent does. What
//! the agent makes there gets the modes of [`shared_mode`] whatever the
//! process's umask (`unidesk dev` runs with 077); what keeps everyone else
//! on the node out is the directory above it, `tasks/`, which is the
//! agent's alone ([`private`]).
//!
//! All of it is blocking: call it from `spawn_blocking`.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt, OpenOptionsSyncExt};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, Metadata, OpenOptions};
use rand::Rng;

/// The largest note [`Root::read_small`] reads.
const SMALL_FILE_LIMIT: u64 = 1024 * 1024;

/// Why a path beneath a root could not be used. The texts read well after
/// the name of what the path is for ("input data/x.bin: …").
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The path is empty, absolute, or holds `.` or `..` components.
    #[error("{0:?} is not a plain relative path")]
    NotPlain(String),
    /// Resolving the path met a link leading out of the root.
    #[error("{path} leads out of {root} through a link; nothing outside was touched")]
    Escapes {
        /// The path, as given.
        path: String,
        /// What the root is ("the workspace").
        root: &'static str,
    },
    /// Nothing exists at the path (or a link there points nowhere).
    #[error("{path} does not exist in {root}")]
    Missing {
        /// The path, as given.
        path: String,
        /// What the root is.
        root: &'static str,
    },
    /// The path names something other than a regular file.
    #[error("{0} is not a regular file")]
    NotAFile(String),
    /// A new file's place is taken by a directory.
    #[error("{0} is a directory")]
    IsADirectory(String),
    /// The file system refused for another reason.
    #[error("{path}: {source}")]
    Io {
        /// The path, as given.
        path: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

impl PathError {
    /// The system's error, when that is what it was (a full disk, say).
    pub fn io(&self) -> Option<&io::Error> {
        match self {
            PathError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A directory held open; every path below it is resolved from the handle
/// and never through a link out of it.
#[derive(Debug)]
pub struct Root {
    dir: Dir,
    /// Where the directory was when it was opened, for messages and for
    /// Docker's bind mounts (only ever of directories the agent made).
    path: PathBuf,
    /// What it is, for messages: "the workspace", "the env repository".
    what: &'static str,
    /// Whether what is made in it is for the task's container, whatever
    /// user that runs as ([`shared_mode`]).
    shared: bool,
}

/// The mode of a directory the agent makes in a workspace.
pub const SHARED_DIR: u32 = 0o777;

/// The mode the agent gives a file it writes into a workspace: readable
/// and writable by every user, and executable by every user when the
/// file (as committed, or as kept) is executable by its owner. The
/// private directory above the workspace ([`private`]) keeps everyone
/// but the task's container out.
pub fn shared_mode(executable: bool) -> u32 {
    if executable {
        0o777
    } else {
        0o666
    }
}

/// Sets exactly `mode` on the open file `fd`, whatever the process's
/// umask; nothing is resolved by name, so no link is ever followed.
///
/// # Errors
/// The system's refusal.
pub fn set_mode(fd: impl AsFd, mode: u32) -> io::Result<()> {
    rustix::fs::fchmod(fd, rustix::fs::Mode::from_raw_mode(mode)).map_err(io::Error::from)
}

/// As [`set_mode`], for the directory `dir`: its handle may be one that
/// only names it (`O_PATH`, which takes no mode), so the directory is
/// opened again through it (`.`, never a link) and changed there.
///
/// # Errors
/// The system's refusal.
pub fn set_dir_mode(dir: &Dir, mode: u32) -> io::Result<()> {
    use rustix::fs::{openat, OFlags};
    let opened = openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    set_mode(opened, mode)
}

/// Makes the directory `dir` its owner's alone (0700): what lies below,
/// shared with task containers, is then out of every other user's reach
/// on the node.
///
/// # Errors
/// The system's refusal.
pub fn private(dir: &Dir) -> io::Result<()> {
    set_dir_mode(dir, 0o700)
}

/// Creates directory `name` (one component) in `parent` with
/// [`SHARED_DIR`] and returns it, opened without following a link. It is
/// opened for reading rather than only named (`O_PATH`), so its mode is
/// set on that same handle: no second open.
///
/// # Errors
/// The system's refusal, "exists" when anything is there already, and
/// `InvalidInput` for a name of more than one component.
pub fn shared_dir(parent: &Dir, name: impl AsRef<Path>) -> io::Result<Dir> {
    use rustix::fs::{openat, OFlags};
    let name = name.as_ref();
    let mut components = name.components();
    if !matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(_)), None)
    ) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not one name", name.display()),
        ));
    }
    parent.create_dir(name)?;
    let opened = openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    set_mode(&opened, SHARED_DIR)?;
    Ok(Dir::from_std_file(std::fs::File::from(opened)))
}

/// Creates file `name` in `dir` for writing, with [`shared_mode`]'s mode
/// whatever the umask; a link or anything else already at `name` makes
/// it fail ("exists"), never followed.
///
/// # Errors
/// The system's refusal.
pub fn shared_file(
    dir: &Dir,
    name: impl AsRef<Path>,
    executable: bool,
) -> io::Result<cap_std::fs::File> {
    use cap_std::fs::OpenOptionsExt;
    let mode = shared_mode(executable);
    let mut options = OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .follow(FollowSymlinks::No)
        .mode(mode);
    let file = dir.open_with(name, &options)?;
    set_mode(&file, mode)?;
    Ok(file)
}

impl Root {
    /// Opens `path`, a directory the agent was configured with (its work
    /// directory), as a root called `what` in messages.
    ///
    /// # Errors
    /// The system's error when it is not a directory that can be opened.
    pub fn open(path: &Path, what: &'static str) -> io::Result<Root> {
        let dir = Dir::open_ambient_dir(path, ambient_authority())?;
        Ok(Root {
            dir,
            path: path.to_owned(),
            what,
            shared: false,
        })
    }

    /// This root, shared with the task's container: it and every
    /// directory and file made in it from now on get [`shared_mode`]'s
    /// modes (so do the roots below it).
    ///
    /// # Errors
    /// The system's refusal to change the directory's mode.
    pub fn shared(mut self) -> io::Result<Root> {
        set_dir_mode(&self.dir, SHARED_DIR)?;
        self.shared = true;
        Ok(self)
    }

    /// Where the directory was when it was opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the root is, for messages.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// The directory handle.
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// A second handle on the same directory, for another thread.
    ///
    /// # Errors
    /// The system's error when no file descriptor is left.
    pub fn try_clone(&self) -> io::Result<Root> {
        Ok(Root {
            dir: self.dir.try_clone()?,
            path: self.path.clone(),
            what: self.what,
            shared: self.shared,
        })
    }

    /// The directory `rel` below this root, created with its parents when
    /// missing, as a root called `what`.
    ///
    /// # Errors
    /// [`PathError::Escapes`] when a link on the way leads out,
    /// [`PathError::NotPlain`] for a path that is not plain, and the
    /// system's refusal otherwise.
    pub fn create_dir(&self, rel: &str, what: &'static str) -> Result<Root, PathError> {
        let path = plain(rel)?;
        ensure_dir(&self.dir, path, self.shared)
            .map(|dir| Root {
                dir,
                path: self.path.join(path),
                what,
                shared: self.shared,
            })
            .map_err(|e| self.error(rel, e))
    }

    /// The existing directory `rel` below this root, as a root called
    /// `what`.
    ///
    /// # Errors
    /// As [`Root::create_dir`], and [`PathError::Missing`].
    pub fn sub_dir(&self, rel: &str, what: &'static str) -> Result<Root, PathError> {
        let path = plain(rel)?;
        self.dir
            .open_dir(path)
            .map(|dir| Root {
                dir,
                path: self.path.join(path),
                what,
                shared: self.shared,
            })
            .map_err(|e| self.error(rel, e))
    }

    /// An empty directory `name` (one component) in this root: whatever
    /// was there, a link included, is removed first (a link is removed, not
    /// followed).
    ///
    /// # Errors
    /// [`PathError::NotPlain`] for a name that is not one plain component,
    /// and the system's refusal.
    pub fn fresh_dir(&self, name: &str, what: &'static str) -> Result<Root, PathError> {
        one_component(name)?;
        self.remove(name)?;
        self.dir
            .create_dir(name)
            .and_then(|()| self.dir.open_dir_nofollow(name))
            .and_then(|dir| {
                if self.shared {
                    set_dir_mode(&dir, SHARED_DIR)?;
                }
                Ok(dir)
            })
            .map(|dir| Root {
                dir,
                path: self.path.join(name),
                what,
                shared: self.shared,
            })
            .map_err(|e| self.error(name, e))
    }

    /// Removes `name` (one component) from this root, with everything in
    /// it; a link is removed, never followed. Nothing there is fine.
    ///
    /// # Errors
    /// [`PathError::NotPlain`] for a name that is not one plain component,
    /// and the system's refusal.
    pub fn remove(&self, name: &str) -> Result<(), PathError> {
        one_component(name)?;
        let removed = match self.dir.symlink_metadata(name) {
            Ok(meta) if meta.is_dir() => self.dir.remove_dir_all(name),
            Ok(_) => self.dir.remove_file_or_symlink(name),
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.error(name, e)),
        }
    }

    /// Opens the regular file `rel` for reading. The file is checked on the
    /// open handle, so what is read is what was checked; a FIFO or device
    /// is refused without blocking on it.
    ///
    /// # Errors
    /// [`PathError::Escapes`], [`PathError::Missing`],
    /// [`PathError::NotAFile`], [`PathError::NotPlain`], and the system's
    /// refusal.
    pub fn open_file(&self, rel: &str) -> Result<(std::fs::File, Metadata), PathError> {
        let path = plain(rel)?;
        let mut options = OpenOptions::new();
        options.read(true).nonblock(true);
        let file = self
            .dir
            .open_with(path, &options)
            .map_err(|e| self.error(rel, e))?;
        let meta = file.metadata().map_err(|e| self.error(rel, e))?;
        if !meta.is_file() {
            return Err(PathError::NotAFile(rel.to_owned()));
        }
        Ok((file.into_std(), meta))
    }

    /// Reads a small regular file (at most 1 MiB) written by the agent.
    ///
    /// # Errors
    /// As [`Root::open_file`], and a file too large.
    pub fn read_small(&self, rel: &str) -> Result<Vec<u8>, PathError> {
        use std::io::Read;
        let (file, meta) = self.open_file(rel)?;
        if meta.len() > SMALL_FILE_LIMIT {
            return Err(self.error(
                rel,
                io::Error::new(io::ErrorKind::InvalidData, "larger than 1 MiB"),
            ));
        }
        let mut data = Vec::new();
        file.take(SMALL_FILE_LIMIT)
            .read_to_end(&mut data)
            .map_err(|e| self.error(rel, e))?;
        Ok(data)
    }

    /// Starts a new file at `rel`: its parent directories are created
    /// (never through a link out of the root), and the data goes to a
    /// temporary file beside it until [`NewFile::persist`] renames it into
    /// place. Dropping the [`NewFile`] unpersisted removes the temporary
    /// file.
    ///
    /// # Errors
    /// [`PathError::Escapes`], [`PathError::IsADirectory`],
    /// [`PathError::NotPlain`], and the system's refusal.
    pub fn new_file(&self, rel: &str) -> Result<(NewFile, std::fs::File), PathError> {
        let path = plain(rel)?;
        let name = path
            .file_name()
            .map(OsString::from)
            .ok_or_else(|| PathError::NotPlain(rel.to_owned()))?;
        let parent = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(p) => ensure_dir(&self.dir, p, self.shared),
            None => self.dir.try_clone(),
        }
        .map_err(|e| self.error(rel, e))?;
        if parent
            .symlink_metadata(&name)
            .is_ok_and(|meta| meta.is_dir())
        {
            return Err(PathError::IsADirectory(rel.to_owned()));
        }
        let mut options = OpenOptions::new();
        options
            .write(true)
            .create_new(true)
            .follow(FollowSymlinks::No);
        let mut tries = 0;
        let (temp, file) = loop {
            let suffix: u64 = rand::thread_rng().gen();
            let mut temp = OsString::from(".");
            temp.push(&name);
            temp.push(format!(".{suffix:016x}.unidesk-partial"));
            match parent.open_with(&temp, &options) {
                Ok(file) => break (temp, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
                Err(e) => return Err(self.error(rel, e)),
            }
        };
        let new = NewFile {
            parent,
            temp,
            name,
            rel: rel.to_owned(),
            what: self.what,
            persisted: false,
        };
        if self.shared {
            // Dropping `new` on failure removes the temporary file.
            set_mode(&file, shared_mode(false)).map_err(|e| self.error(rel, e))?;
        }
        Ok((new, file.into_std()))
    }

    /// Writes `data` to `rel` whole: readers see the old content or the
    /// new, never a part.
    ///
    /// # Errors
    /// As [`Root::new_file`], and the system's refusal to write.
    pub fn write(&self, rel: &str, data: &[u8]) -> Result<(), PathError> {
        use std::io::Write;
        let (new, mut file) = self.new_file(rel)?;
        file.write_all(data)
            .and_then(|()| file.sync_all())
            .map_err(|e| self.error(rel, e))?;
        new.persist()
    }

    fn error(&self, rel: &str, e: io::Error) -> PathError {
        classify(rel, self.what, e)
    }
}

/// A file being written beside its final name; see [`Root::new_file`].
#[derive(Debug)]
pub struct NewFile {
    parent: Dir,
    temp: OsString,
    name: OsString,
    rel: String,
    what: &'static str,
    persisted: bool,
}

impl NewFile {
    /// Renames the temporary file to its final name, replacing a file or
    /// a link there (the link itself, never what it points to).
    ///
    /// # Errors
    /// [`PathError::IsADirectory`] when a directory took the place, and
    /// the system's refusal.
    pub fn persist(mut self) -> Result<(), PathError> {
        match self.parent.rename(&self.temp, &self.parent, &self.name) {
            Ok(()) => {
                self.persisted = true;
                Ok(())
            }
            Err(e)
                if self
                    .parent
                    .symlink_metadata(&self.name)
                    .is_ok_and(|m| m.is_dir()) =>
            {
                tracing::debug!(error = %e, "a directory took the new file's place");
                Err(PathError::IsADirectory(self.rel.clone()))
            }
            Err(e) => Err(classify(&self.rel, self.what, e)),
        }
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = self.parent.remove_file_or_symlink(&self.temp);
        }
    }
}

/// Runs `work` on the blocking pool, where everything here belongs.
///
/// # Errors
/// What `work` returned, or that the pool stopped it.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, PathError> + Send + 'static,
) -> Result<T, PathError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(PathError::Io {
            path: String::new(),
            source: io::Error::other(e),
        })
    })
}

/// `rel` as a path of plain components: not empty, not absolute, no `.`
/// or `..`. The server checks this already; the agent does not rely on it.
fn plain(rel: &str) -> Result<&Path, PathError> {
    let path = Path::new(rel);
    let is_plain = !rel.is_empty()
        && !rel.contains('\0')
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if is_plain {
        Ok(path)
    } else {
        Err(PathError::NotPlain(rel.to_owned()))
    }
}

/// The directory `path` below `dir`, created with its parents when
/// missing. Opening decides: a link on the way that leads out makes
/// creating fail with "exists", and opening says why.
fn ensure_dir(dir: &Dir, path: &Path, shared: bool) -> io::Result<Dir> {
    if shared {
        return ensure_shared_dir(dir, path);
    }
    let created = dir.create_dir_all(path);
    match dir.open_dir(path) {
        Ok(opened) => Ok(opened),
        Err(e) if is_escape(&e) => Err(e),
        Err(e) => Err(created.err().unwrap_or(e)),
    }
}

/// As [`ensure_dir`], one directory at a time from the top, giving each
/// directory it creates [`SHARED_DIR`] (one that was there keeps its
/// mode). Every prefix is resolved from `dir`, as the whole path is: a
/// link that stays inside `dir` is followed, one leading out never is.
fn ensure_shared_dir(dir: &Dir, path: &Path) -> io::Result<Dir> {
    let mut prefix = PathBuf::new();
    let mut at = None;
    for component in path.components() {
        prefix.push(component);
        let created = dir.create_dir(&prefix);
        let opened = match dir.open_dir(&prefix) {
            Ok(opened) => opened,
            Err(e) if is_escape(&e) => return Err(e),
            Err(e) => return Err(created.err().unwrap_or(e)),
        };
        if created.is_ok() {
            set_dir_mode(&opened, SHARED_DIR)?;
        }
        at = Some(opened);
    }
    match at {
        Some(at) => Ok(at),
        None => dir.try_clone(),
    }
}

fn one_component(name: &str) -> Result<(), PathError> {
    let path = plain(name)?;
    if path.components().count() == 1 {
        Ok(())
    } else {
        Err(PathError::NotPlain(name.to_owned()))
    }
}

/// The errno of "too many levels of symbolic links": what `O_NOFOLLOW`
/// answers when the last component is a link.
const ELOOP: i32 = 40;

/// Whether `e` says a link led out of the root (cap-std's words for it,
/// whether the kernel's `openat2` or its own walk found it).
pub fn is_escape(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied
        && e.to_string()
            .contains("a path led outside of the filesystem")
}

fn classify(rel: &str, root: &'static str, e: io::Error) -> PathError {
    let path = rel.to_owned();
    if is_escape(&e) || e.raw_os_error() == Some(ELOOP) {
        PathError::Escapes { path, root }
    } else if e.kind() == io::ErrorKind::NotFound {
        PathError::Missing { path, root }
    } else if e.kind() == io::ErrorKind::IsADirectory {
        PathError::IsADirectory(path)
    } else {
        PathError::Io { path, source: e }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A root under a temporary directory, and a directory beside it
    /// standing for the rest of the machine.
    fn setup() -> (tempfile::TempDir, Root, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host secret\n").unwrap();
        let inside = dir.path().join("root");
        std::fs::create_dir(&inside).unwrap();
        let root = Root::open(&inside, "the workspace").unwrap();
        (dir, root, outside)
    }

    fn outside_is_untouched(outside: &Path) {
        let mut names: Vec<_> = std::fs::read_dir(outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, vec![OsString::from("secret")]);
        assert_eq!(
            std::fs::read_to_string(outside.join("secret")).unwrap(),
            "host secret\n"
        );
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    fn new_file(root: &Root, rel: &str) -> Result<(), PathError> {
        let (new, _file) = root.new_file(rel)?;
        new.persist()
    }

    #[test]
    fn a_shared_root_opens_what_it_makes_to_every_user_and_nothing_through_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, root, outside) = setup();
        let inside = dir.path().join("root");
        let (outside_mode, secret_mode) = (mode(&outside), mode(&outside.join("secret")));
        std::fs::create_dir(inside.join("kept")).unwrap();
        std::fs::set_permissions(inside.join("kept"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        symlink("kept", inside.join("in")).unwrap();
        symlink(&outside, inside.join("out")).unwrap();
        let root = root.shared().unwrap();
        assert_eq!(mode(&inside), SHARED_DIR);

        // Every directory made on the way, and the file, whatever the
        // umask (the test process's leaves 0755 and 0644 otherwise).
        new_file(&root, "a/b/c.txt").unwrap();
        assert_eq!(mode(&inside.join("a")), 0o777);
        assert_eq!(mode(&inside.join("a/b")), 0o777);
        assert_eq!(mode(&inside.join("a/b/c.txt")), 0o666);
        let sub = root.create_dir("d/e", "a directory").unwrap();
        assert_eq!(mode(&inside.join("d")), 0o777);
        assert_eq!(mode(&inside.join("d/e")), 0o777);
        new_file(&sub, "f").unwrap();
        assert_eq!(mode(&inside.join("d/e/f")), 0o666, "roots below are shared");

        // A directory that was there keeps its mode; a link that stays
        // inside is followed, one leading out is refused and nothing
        // outside changes, its mode included.
        new_file(&root, "kept/x").unwrap();
        new_file(&root, "in/y").unwrap();
        assert_eq!(mode(&inside.join("kept")), 0o750);
        assert_eq!(mode(&inside.join("kept/x")), 0o666);
        assert_eq!(mode(&inside.join("kept/y")), 0o666);
        for rel in ["out/z", "out/new/z"] {
            let e = new_file(&root, rel).unwrap_err();
            assert!(matches!(e, PathError::Escapes { .. }), "{rel}: {e}");
        }
        assert!(matches!(
            root.create_dir("out/g", "a directory"),
            Err(PathError::Escapes { .. })
        ));
        outside_is_untouched(&outside);
        assert_eq!(mode(&outside), outside_mode);
        assert_eq!(mode(&outside.join("secret")), secret_mode);

        // A directory made its owner's alone.
        private(root.dir()).unwrap();
        assert_eq!(mode(&inside), 0o700);
    }

    #[test]
    fn a_new_file_is_never_written_through_a_link_to_a_directory_outside() {
        let (_d, root, outside) = setup();
        symlink(&outside, root.path().join("data")).unwrap();
        symlink("../outside", root.path().join("rel")).unwrap();
        for rel in ["data/x", "data/secret", "rel/x", "rel/deeper/x"] {
            let e = root.new_file(rel).unwrap_err();
            assert!(matches!(e, PathError::Escapes { .. }), "{rel}: {e}");
            assert!(e.to_string().contains("leads out of the workspace"), "{e}");
        }
        let e = root.create_dir("data/sub", "x").unwrap_err();
        assert!(matches!(e, PathError::Escapes { .. }), "{e}");
        outside_is_untouched(&outside);
    }

    #[test]
    fn a_link_at_a_new_files_name_is_replaced_not_written_through() {
        let (_d, root, outside) = setup();
        symlink(outside.join("secret"), root.path().join("model.bin")).unwrap();
        let (new, mut file) = root.new_file("model.bin").unwrap();
        std::io::Write::write_all(&mut file, b"weights").unwrap();
        new.persist().unwrap();
        let meta = std::fs::symlink_metadata(root.path().join("model.bin")).unwrap();
        assert!(meta.is_file(), "the link was replaced by the file");
        assert_eq!(
            std::fs::read(root.path().join("model.bin")).unwrap(),
            b"weights"
        );
        outside_is_untouched(&outside);
    }

    #[test]
    fn temporary_names_are_never_followed_and_are_cleaned_up() {
        let (_d, root, outside) = setup();
        // The name earlier versions derived, planted by a repository.
        symlink(
            outside.join("secret"),
            root.path().join(".in.bin.unidesk-partial"),
        )
        .unwrap();
        let (new, mut file) = root.new_file("in.bin").unwrap();
        std::io::Write::write_all(&mut file, b"data").unwrap();
        drop(new);
        let left: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![OsString::from(".in.bin.unidesk-partial")]);
        outside_is_untouched(&outside);
    }

    #[test]
    fn links_that_stay_inside_are_followed() {
        let (_d, root, outside) = setup();
        std::fs::create_dir(root.path().join("real")).unwrap();
        symlink("real", root.path().join("data")).unwrap();
        let (new, _file) = root.new_file("data/x").unwrap();
        new.persist().unwrap();
        assert!(root.path().join("real/x").is_file());
        std::fs::write(root.path().join("real/y"), "y").unwrap();
        symlink("../real/y", root.path().join("real/link-to-y")).unwrap();
        let (_f, meta) = root.open_file("data/link-to-y").unwrap();
        assert_eq!(meta.len(), 1);
        outside_is_untouched(&outside);
    }

    #[test]
    fn files_read_for_a_task_never_come_from_outside() {
        let (_d, root, outside) = setup();
        symlink(outside.join("secret"), root.path().join("abs")).unwrap();
        symlink("../outside/secret", root.path().join("rel")).unwrap();
        symlink(&outside, root.path().join("dir")).unwrap();
        std::fs::create_dir(root.path().join("a")).unwrap();
        symlink("../../outside", root.path().join("a/up")).unwrap();
        for rel in ["abs", "rel", "dir/secret", "a/up/secret"] {
            let e = root.open_file(rel).unwrap_err();
            assert!(matches!(e, PathError::Escapes { .. }), "{rel}: {e}");
        }
        for rel in ["../outside/secret", "/etc/hostname", "a/../abs", ""] {
            let e = root.open_file(rel).unwrap_err();
            assert!(matches!(e, PathError::NotPlain(_)), "{rel}: {e}");
        }
        let e = root.open_file("missing").unwrap_err();
        assert!(matches!(e, PathError::Missing { .. }), "{e}");
        symlink("nowhere", root.path().join("dangling")).unwrap();
        let e = root.open_file("dangling").unwrap_err();
        assert!(matches!(e, PathError::Missing { .. }), "{e}");
    }

    #[test]
    fn a_fifo_or_directory_is_refused_without_blocking() {
        let (_d, root, _outside) = setup();
        let made = std::process::Command::new("mkfifo")
            .arg(root.path().join("pipe"))
            .status()
            .unwrap();
        assert!(made.success());
        std::fs::create_dir(root.path().join("d")).unwrap();
        let e = root.open_file("pipe").unwrap_err();
        assert!(matches!(e, PathError::NotAFile(_)), "{e}");
        let e = root.open_file("d").unwrap_err();
        assert!(matches!(e, PathError::NotAFile(_)), "{e}");
        let e = root.new_file("d").unwrap_err();
        assert!(matches!(e, PathError::IsADirectory(_)), "{e}");
    }

    #[test]
    fn a_fresh_dir_replaces_a_link_without_touching_its_target() {
        let (_d, root, outside) = setup();
        symlink(&outside, root.path().join("attempt")).unwrap();
        let fresh = root.fresh_dir("attempt", "the attempt").unwrap();
        fresh.write("note.json", b"{}").unwrap();
        assert!(std::fs::symlink_metadata(root.path().join("attempt"))
            .unwrap()
            .is_dir());
        root.remove("attempt").unwrap();
        assert!(!root.path().join("attempt").exists());
        root.remove("attempt").unwrap();
        outside_is_untouched(&outside);
    }

    #[test]
    fn removing_a_tree_removes_links_in_it_not_their_targets() {
        let (_d, root, outside) = setup();
        let ws = root.fresh_dir("ws", "the workspace").unwrap();
        symlink(&outside, ws.path().join("to-outside")).unwrap();
        symlink(outside.join("secret"), ws.path().join("to-secret")).unwrap();
        std::fs::create_dir(ws.path().join("d")).unwrap();
        symlink(&outside, ws.path().join("d/again")).unwrap();
        root.remove("ws").unwrap();
        assert!(!root.path().join("ws").exists());
        outside_is_untouched(&outside);
    }
}
