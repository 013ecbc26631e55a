//! One process per directory: a lock file held for as long as the process
//! uses the directory, naming the process that holds it.
//!
//! Two agents on one work directory would both adopt the same containers,
//! write one journal, and each remove what the other is preparing; two
//! `unidesk dev` on one directory would share a database. The lock is the
//! system's (`flock`), so a process that dies, even by `kill -9`, releases
//! it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Why a directory could not be held.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// Another process holds it.
    #[error("{} is held by another process{}", path.display(), by_process(*holder))]
    Held {
        /// The lock file.
        path: PathBuf,
        /// The process that holds it, as it wrote it, when it did.
        holder: Option<u32>,
    },
    /// The lock file could not be opened, locked or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
}

impl HoldError {
    /// Whether the file system cannot lock files at all (some network
    /// and shared-folder file systems): the caller may go on unguarded.
    pub fn cannot_lock(&self) -> bool {
        let HoldError::Io { source, .. } = self else {
            return false;
        };
        source.kind() == std::io::ErrorKind::Unsupported
            || matches!(
                rustix::io::Errno::from_io_error(source),
                Some(
                    rustix::io::Errno::NOLCK
                        | rustix::io::Errno::NOSYS
                        | rustix::io::Errno::OPNOTSUPP
                )
            )
    }
}

/// ` (process N)` for a holder that is known, else nothing: the end of a
/// message saying who holds a directory.
pub fn by_process(holder: Option<u32>) -> String {
    holder
        .map(|p| format!(" (process {p})"))
        .unwrap_or_default()
}

/// Holds `dir` for this process through the lock file `<dir>/<name>`
/// until the returned file is dropped; the file names this process.
///
/// # Errors
/// [`HoldError::Held`] when another process holds it, [`HoldError::Io`]
/// when the file cannot be opened, locked or written.
pub fn hold(dir: &Path, name: &str) -> Result<File, HoldError> {
    let path = dir.join(name);
    let io = |source| HoldError::Io {
        path: path.clone(),
        source,
    };
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            // Only the first line, and only a number, is believed.
            let _ = (&mut file).take(64).read_to_string(&mut holder);
            return Err(HoldError::Held {
                holder: holder.trim().parse().ok(),
                path,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(io)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_process_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = hold(dir.path(), "x.lock").unwrap();
        match hold(dir.path(), "x.lock") {
            Err(HoldError::Held { holder, path }) => {
                assert_eq!(holder, Some(std::process::id()));
                assert_eq!(path, dir.path().join("x.lock"));
            }
            other => panic!("{other:?}"),
        }
        drop(first);
        hold(dir.path(), "x.lock").unwrap();
    }

    #[test]
    fn a_lock_file_of_garbage_names_no_process() {
        let dir = tempfile::tempdir().unwrap();
        let _first = hold(dir.path(), "x.lock").unwrap();
        std::fs::write(dir.path().join("x.lock"), "9".repeat(100_000)).unwrap();
        let Err(HoldError::Held { holder, .. }) = hold(dir.path(), "x.lock") else {
            panic!("held twice");
        };
        assert_eq!(holder, None);
    }
}
