//! The per-task workspace limit, where no storage quota holds it.
//!
//! While a container runs, the agent measures what its workspace holds on
//! disk (allocated blocks, so a sparse file counts for what it really
//! takes) every `--workspace-check-s` seconds, and the attempt fails once
//! it is past `--workspace-limit-mb`. When Docker could not give the
//! container's own writable layer a size limit (see
//! [`crate::docker::LayerQuota`]), what that layer holds counts too: a
//! task writing to `/tmp` instead of `/workspace` fills the same disk.
//!
//! The task's code runs while the agent walks, and it may create links or
//! swap a directory for a link at any moment. So the walk never follows a
//! symbolic link: every directory is opened beneath the workspace's own
//! handle with `O_NOFOLLOW` on its last component (and never outside the
//! workspace for the others), and every entry is measured with `lstat`
//! relative to its directory's handle. A race can make one pass miss or
//! count twice what was moved while it ran; it never makes the agent read
//! anything outside the workspace. Hard links are counted once.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use cap_fs_ext::DirExt;
use cap_std::fs::{Dir, MetadataExt};

/// The most entries one measurement visits. A workspace holding more
/// cannot be measured in reasonable time, and the attempt fails saying so.
pub const MAX_ENTRIES: u64 = 20_000_000;

const MIB: u64 = 1024 * 1024;

/// How large a task's workspace may grow, and how often it is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceLimit {
    /// The limit in MiB.
    pub limit_mb: u64,
    /// Time between the end of one measurement and the start of the next.
    pub interval: Duration,
}

impl Default for WorkspaceLimit {
    /// 100 GiB, measured every 30 s.
    fn default() -> Self {
        WorkspaceLimit {
            limit_mb: 100 * 1024,
            interval: Duration::from_secs(30),
        }
    }
}

/// Why a measurement gave no number.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The workspace holds more than [`MAX_ENTRIES`] entries.
    #[error("it holds more than {MAX_ENTRIES} files and directories")]
    TooMany,
    /// A directory is nested so deep that its path is longer than the
    /// system accepts.
    #[error("it nests directories deeper than the system can open by path")]
    TooDeep,
    /// The agent may not read a directory of the workspace.
    #[error("the agent may not read {0} in it")]
    Denied(String),
    /// The measurement was stopped because nobody waits for it any more.
    #[error("stopped")]
    Stopped,
    /// Anything else, such as the workspace's own directory being gone.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Bytes allocated on disk beneath `root`, `root` included, without
/// following any symbolic link. Entries that vanish or turn into links
/// while the walk runs are skipped. `stop` ends the walk early.
///
/// # Errors
/// [`MeasureError::TooMany`], [`MeasureError::TooDeep`] and
/// [`MeasureError::Denied`] when the workspace cannot be measured as it
/// is; [`MeasureError::Io`] when `root` cannot be opened;
/// [`MeasureError::Stopped`] when `stop` was set.
pub fn measure(root: &Path, stop: &AtomicBool) -> Result<u64, MeasureError> {
    let top = Dir::open_ambient_dir(root, cap_std::ambient_authority())?;
    let mut total = top.dir_metadata()?.blocks() * 512;
    let mut linked: HashSet<(u64, u64)> = HashSet::new();
    let mut entries = 0u64;
    let mut pending: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        if stop.load(Ordering::Relaxed) {
            return Err(MeasureError::Stopped);
        }
        let dir = if relative.as_os_str().is_empty() {
            top.try_clone()?
        } else {
            match top.open_dir_nofollow(&relative) {
                Ok(dir) => dir,
                Err(e) => match skip_or_fail(&e, &relative) {
                    None => continue,
                    Some(fail) => return Err(fail),
                },
            }
        };
        let listing = match dir.entries() {
            Ok(listing) => listing,
            Err(e) => match skip_or_fail(&e, &relative) {
                None => continue,
                Some(fail) => return Err(fail),
            },
        };
        for entry in listing {
            let Ok(entry) = entry else { continue };
            entries += 1;
            if entries > MAX_ENTRIES {
                return Err(MeasureError::TooMany);
            }
            // The entry itself, never what a link points to.
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_dir() && meta.nlink() > 1 && !linked.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total = total.saturating_add(meta.blocks().saturating_mul(512));
            if meta.is_dir() {
                pending.push(relative.join(entry.file_name()));
            }
        }
    }
    Ok(total)
}

/// `None` for a directory that vanished or stopped being one (the task
/// moved it, or put a link in its place): skipped. Otherwise the reason
/// the workspace cannot be measured.
fn skip_or_fail(e: &io::Error, relative: &Path) -> Option<MeasureError> {
    const EACCES: i32 = 13;
    const ENAMETOOLONG: i32 = 36;
    match e.raw_os_error() {
        Some(ENAMETOOLONG) => Some(MeasureError::TooDeep),
        Some(EACCES) => Some(MeasureError::Denied(format!(
            "/workspace/{}",
            relative.display()
        ))),
        // Gone (ENOENT), a link or a file now (ELOOP, ENOTDIR), or a path
        // cap-std refuses because it would leave the workspace (no OS
        // error), which only a link swapped in while the walk ran causes.
        _ => None,
    }
}

/// Why an attempt is stopped for its disk use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Breach {
    /// The workspace (and the writable layer, where it counts) holds more
    /// than the limit.
    Over {
        /// The limit in MiB.
        limit_mb: u64,
        /// Bytes in the workspace.
        workspace: u64,
        /// Bytes in the container's writable layer, when it counts.
        layer: Option<u64>,
    },
    /// The workspace cannot be measured as it is.
    Unmeasurable {
        /// The limit in MiB.
        limit_mb: u64,
        /// Why, for a person.
        reason: String,
    },
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Breach::Over {
                limit_mb,
                workspace,
                layer,
            } => {
                let used = workspace + layer.unwrap_or(0);
                write!(
                    f,
                    "the task's workspace grew past its limit of {limit_mb} MiB ({} MiB used",
                    used.div_ceil(MIB)
                )?;
                if let Some(layer) = layer {
                    write!(
                        f,
                        ": {} MiB in /workspace, {} MiB in the container's own files",
                        workspace.div_ceil(MIB),
                        layer.div_ceil(MIB)
                    )?;
                }
                write!(
                    f,
                    "); the container was stopped. The node's --workspace-limit-mb sets the limit"
                )
            }
            Breach::Unmeasurable { limit_mb, reason } => write!(
                f,
                "the task's workspace cannot be held to its limit of {limit_mb} MiB: {reason}; \
                 the container was stopped"
            ),
        }
    }
}

/// Sets its flag when dropped, so a walk nobody waits for stops.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Measures `workspace` (and, when `count_layer`, the writable layer of
/// container `id`) at once and then every `limit.interval`, and resolves
/// with the first [`Breach`]; never resolves while the task stays within
/// its limit. Dropping the future stops a measurement under way.
pub async fn watch(
    docker: Docker,
    id: String,
    workspace: PathBuf,
    count_layer: bool,
    limit: WorkspaceLimit,
) -> Breach {
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(Arc::clone(&stop));
    let limit_bytes = limit.limit_mb.saturating_mul(MIB);
    loop {
        let (root, flag) = (workspace.clone(), Arc::clone(&stop));
        let measured = tokio::task::spawn_blocking(move || measure(&root, &flag))
            .await
            .unwrap_or_else(|e| Err(MeasureError::Io(io::Error::other(e))));
        match measured {
            Ok(bytes) => {
                let layer = if count_layer {
                    crate::docker::writable_layer_bytes(&docker, &id).await
                } else {
                    None
                };
                tracing::debug!(bytes, layer, "workspace measured");
                if bytes.saturating_add(layer.unwrap_or(0)) > limit_bytes {
                    return Breach::Over {
                        limit_mb: limit.limit_mb,
                        workspace: bytes,
                        layer,
                    };
                }
            }
            Err(e @ (MeasureError::TooMany | MeasureError::TooDeep | MeasureError::Denied(_))) => {
                return Breach::Unmeasurable {
                    limit_mb: limit.limit_mb,
                    reason: e.to_string(),
                };
            }
            Err(MeasureError::Stopped) => return std::future::pending().await,
            // The workspace directory itself is gone or unreadable: the
            // attempt is ending, or something outside the task is wrong.
            Err(MeasureError::Io(e)) => {
                tracing::warn!(workspace = %workspace.display(), error = %e, "could not measure the workspace");
            }
        }
        tokio::time::sleep(limit.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(path: &Path, bytes: usize) {
        std::fs::write(path, vec![7u8; bytes]).unwrap();
    }

    #[test]
    fn files_count_by_their_blocks_and_links_are_not_followed() {
        let work = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        sized(&outside.path().join("big"), 4 * MIB as usize);
        let root = work.path().join("code");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        sized(&root.join("a/b/one"), MIB as usize);
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("big"), root.join("a/big")).unwrap();
        std::os::unix::fs::symlink("/", root.join("a/b/root")).unwrap();
        let stop = AtomicBool::new(false);
        let bytes = measure(&root, &stop).unwrap();
        assert!(bytes >= MIB, "{bytes}");
        assert!(bytes < 2 * MIB, "links were followed: {bytes}");
    }

    #[test]
    fn hard_links_count_once_and_sparse_files_by_what_they_take() {
        let work = tempfile::tempdir().unwrap();
        sized(&work.path().join("data"), 2 * MIB as usize);
        for i in 0..5 {
            std::fs::hard_link(work.path().join("data"), work.path().join(format!("l{i}")))
                .unwrap();
        }
        let sparse = std::fs::File::create(work.path().join("sparse")).unwrap();
        sparse.set_len(1 << 40).unwrap();
        let bytes = measure(work.path(), &AtomicBool::new(false)).unwrap();
        assert!((2 * MIB..3 * MIB).contains(&bytes), "{bytes}");
    }

    #[test]
    fn a_stopped_measurement_ends() {
        let work = tempfile::tempdir().unwrap();
        let stopped = measure(work.path(), &AtomicBool::new(true));
        assert!(matches!(stopped, Err(MeasureError::Stopped)), "{stopped:?}");
    }

    #[test]
    fn the_breach_names_the_limit_and_the_use() {
        let over = Breach::Over {
            limit_mb: 5,
            workspace: 20 * MIB,
            layer: None,
        };
        let text = over.to_string();
        assert!(
            text.starts_with("the task's workspace grew past its limit of 5 MiB (20 MiB used)"),
            "{text}"
        );
        let both = Breach::Over {
            limit_mb: 5,
            workspace: 3 * MIB,
            layer: Some(4 * MIB),
        };
        assert!(
            both.to_string()
                .contains("(7 MiB used: 3 MiB in /workspace, 4 MiB in the container's own files)"),
            "{both}"
        );
    }
}
