//! What a submission runs, read from local git checkouts: the remote's URL
//! and the commit, and whether that commit can be fetched from the remote.
//!
//! This shells out to the user's own `git` rather than linking libgit2:
//! `git ls-remote` then talks to the remote exactly as the user's `git
//! push` does, with their SSH agent, credential helpers, `insteadOf` rules
//! and proxies, which a linked library would each have to imitate.
//!
//! Whether a commit is on the remote is decided without downloading
//! anything: `git ls-remote URL` lists the tips of the remote's branches
//! and tags as they are now. The commit is there when it is one of those
//! tips, or when it is an ancestor of a tip this checkout already has
//! (`git rev-list COMMIT --not TIPS…` prints nothing). A tip the checkout
//! does not have cannot be walked without fetching it; then the answer is
//! "not found", with the advice to push, or to fetch if it was pushed from
//! elsewhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// A checkout as a submission sees it.
#[derive(Debug, Clone)]
pub struct Checkout {
    /// The top directory of the work tree (or the bare repository).
    pub root: PathBuf,
    /// The remote's name (`origin`), when the URL came from one.
    pub remote: Option<String>,
    /// The URL nodes fetch from.
    pub url: String,
    /// The full commit id.
    pub commit: String,
    /// Tracked files changed but not committed, as `git status --short`
    /// lists them.
    pub uncommitted: Vec<String>,
}

/// Runs `git args…` in `dir`; its standard output, trimmed.
fn git(dir: &Path, args: &[&str]) -> Result<String> {
    git_input(dir, args, None)
}

fn git_input(dir: &Path, args: &[&str], input: Option<&str>) -> Result<String> {
    let mut command = Command::new("git");
    command
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = command.spawn().map_err(|e| {
        Error::Usage(format!(
            "cannot run git ({e}): install git, it reads the checkout"
        ))
    })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Io(format!("running git: {e}")))?;
    if !out.status.success() {
        return Err(Error::Usage(format!(
            "git {} in {}: {}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether `s` is a full commit id.
pub fn is_full_commit(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A remote's URL as nodes can use it: a local path becomes an absolute
/// `file://` URL (relative paths are relative to `root`).
pub fn remote_url(root: &Path, url: &str) -> String {
    let scp_like = !url.contains("://")
        && url
            .split_once(':')
            .is_some_and(|(host, _)| !host.contains('/') && !host.is_empty());
    if url.contains("://") || scp_like {
        return url.to_string();
    }
    let path = root.join(url);
    let path = path.canonicalize().unwrap_or(path);
    format!("file://{}", path.display())
}

/// Reads the checkout that `dir` is in; with `rev`, that commit instead of
/// `HEAD`; with `remote`, that remote instead of the current branch's
/// upstream (or `origin`, or the only remote).
///
/// # Errors
/// [`Error::Usage`] saying what to do: not a git checkout, no commit yet,
/// no remote.
pub fn checkout(dir: &Path, rev: Option<&str>, remote: Option<&str>) -> Result<Checkout> {
    let bare = git(dir, &["rev-parse", "--is-bare-repository"])
        .map_err(|_| Error::Usage(format!("{} is not in a git checkout", dir.display())))?
        == "true";
    let root = if bare {
        PathBuf::from(git(dir, &["rev-parse", "--absolute-git-dir"])?)
    } else {
        PathBuf::from(git(dir, &["rev-parse", "--show-toplevel"])?)
    };
    let wanted = format!("{}^{{commit}}", rev.unwrap_or("HEAD"));
    let commit = git(&root, &["rev-parse", "--verify", "--quiet", &wanted]).map_err(|_| {
        Error::Usage(match rev {
            None => format!(
                "{} has no commit yet: commit your work first",
                root.display()
            ),
            Some(rev) => format!("{rev} is no commit of {}", root.display()),
        })
    })?;
    if bare {
        return Ok(Checkout {
            url: remote_url(&root, &root.display().to_string()),
            root,
            remote: None,
            commit,
            uncommitted: Vec::new(),
        });
    }
    let remote = match remote {
        Some(r) => r.to_string(),
        None => default_remote(&root)?,
    };
    let url = git(&root, &["remote", "get-url", &remote]).map_err(|_| {
        Error::Usage(format!(
            "{} has no remote {remote:?}: see `git remote -v`",
            root.display()
        ))
    })?;
    let uncommitted = if rev.is_none() {
        git(&root, &["status", "--porcelain", "--untracked-files=no"])?
            .lines()
            .map(str::to_string)
            .collect()
    } else {
        Vec::new()
    };
    Ok(Checkout {
        url: remote_url(&root, &url),
        root,
        remote: Some(remote),
        commit,
        uncommitted,
    })
}

/// The remote of the current branch's upstream, else `origin`, else the
/// only remote.
fn default_remote(root: &Path) -> Result<String> {
    if let Ok(branch) = git(root, &["symbolic-ref", "--short", "-q", "HEAD"]) {
        if let Ok(remote) = git(root, &["config", &format!("branch.{branch}.remote")]) {
            if !remote.is_empty() && remote != "." {
                return Ok(remote);
            }
        }
    }
    let remotes: Vec<String> = git(root, &["remote"])?
        .lines()
        .map(str::to_string)
        .collect();
    if remotes.iter().any(|r| r == "origin") {
        return Ok("origin".into());
    }
    match remotes.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(Error::Usage(format!(
            "{} has no remote, so no node could fetch it: push it somewhere, e.g. \
             `git remote add origin URL && git push -u origin HEAD`",
            root.display()
        ))),
        _ => Err(Error::Usage(format!(
            "{} has several remotes and none is origin or the branch's upstream: \
             name one with --remote",
            root.display()
        ))),
    }
}

/// The remote's refs: (commit, ref name), tags peeled to their commits.
///
/// # Errors
/// [`Error::Usage`] with git's words when the remote cannot be read.
pub fn ls_remote(dir: &Path, url: &str, patterns: &[&str]) -> Result<Vec<(String, String)>> {
    let mut args = vec!["ls-remote", "--", url];
    args.extend_from_slice(patterns);
    let out =
        git(dir, &args).map_err(|e| Error::Usage(format!("cannot read the remote {url}: {e}")))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(sha, name)| (sha.to_string(), name.to_string()))
        .collect())
}

/// Checks that `checkout.commit` can be fetched from `checkout.url`.
///
/// # Errors
/// [`Error::Usage`] saying to push (or fetch) when it is not on the
/// remote, or when the remote cannot be read.
pub fn require_pushed(checkout: &Checkout) -> Result<()> {
    let refs = ls_remote(&checkout.root, &checkout.url, &[])?;
    let commit = &checkout.commit;
    if refs.iter().any(|(sha, _)| sha == commit) {
        return Ok(());
    }
    let mut tips: Vec<&str> = refs.iter().map(|(sha, _)| sha.as_str()).collect();
    tips.sort_unstable();
    tips.dedup();
    // Which tips this checkout has, in one call.
    let known = git_input(
        &checkout.root,
        &["cat-file", "--batch-check=%(objectname) %(objecttype)"],
        Some(&(tips.join("\n") + "\n")),
    )?;
    let local: Vec<&str> = known
        .lines()
        .filter_map(|l| l.strip_suffix(" commit"))
        .collect();
    if !local.is_empty() {
        let mut args = vec!["rev-list", "-n", "1", commit.as_str(), "--not"];
        args.extend(local.iter().copied());
        if git(&checkout.root, &args)?.is_empty() {
            return Ok(());
        }
    }
    let short = &commit[..12.min(commit.len())];
    let push = match &checkout.remote {
        Some(remote) => format!(
            "push it first (`git push {remote} HEAD`, or to a branch of your choice), \
             or if it was pushed from elsewhere, `git fetch {remote}` and try again"
        ),
        None => "push it there first".into(),
    };
    Err(Error::Usage(format!(
        "commit {short} of {} is not on the remote {}: no branch or tag there contains it, \
         so no node could fetch it; {push}",
        checkout.root.display(),
        checkout.url
    )))
}

/// The commit an env given as a URL means: `rev` (a full id as it is, a
/// branch or tag name looked up on the remote), or the remote's `HEAD`.
///
/// # Errors
/// [`Error::Usage`] when the remote has no such branch or tag.
pub fn remote_commit(url: &str, rev: Option<&str>) -> Result<String> {
    if let Some(rev) = rev.filter(|r| is_full_commit(r)) {
        return Ok(rev.to_ascii_lowercase());
    }
    let here = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let wanted = rev.unwrap_or("HEAD");
    let refs = ls_remote(&here, url, &[wanted])?;
    let names = [
        format!("refs/tags/{wanted}^{{}}"),
        format!("refs/tags/{wanted}"),
        format!("refs/heads/{wanted}"),
        wanted.to_string(),
    ];
    names
        .iter()
        .find_map(|n| refs.iter().find(|(_, name)| name == n))
        .map(|(sha, _)| sha.clone())
        .ok_or_else(|| {
            Error::Usage(format!(
                "the remote {url} has no branch or tag {wanted:?}; name a full commit id with URL@COMMIT"
            ))
        })
}

/// Splits `DIR_OR_URL[@REV]`: the `@REV` suffix is taken when what
/// follows the last `@` holds no `/` or `:` (so `git@host:org/env.git`
/// stays whole).
pub fn split_rev(spec: &str) -> (&str, Option<&str>) {
    match spec.rsplit_once('@') {
        Some((base, rev)) if !base.is_empty() && !rev.is_empty() && !rev.contains(['/', ':']) => {
            (base, Some(rev))
        }
        _ => (spec, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_specs_split_at_a_revision_but_not_inside_an_ssh_url() {
        assert_eq!(split_rev("../envs@main"), ("../envs", Some("main")));
        assert_eq!(
            split_rev("git@host:org/env.git"),
            ("git@host:org/env.git", None)
        );
        assert_eq!(
            split_rev("git@host:org/env.git@v2"),
            ("git@host:org/env.git", Some("v2"))
        );
        assert_eq!(split_rev("https://h/e.git"), ("https://h/e.git", None));
    }

    #[test]
    fn local_remotes_become_file_urls_and_others_stay() {
        let root = Path::new("/nowhere/repo");
        assert_eq!(remote_url(root, "/srv/x.git"), "file:///srv/x.git");
        assert_eq!(
            remote_url(root, "../x.git"),
            "file:///nowhere/repo/../x.git"
        );
        assert_eq!(remote_url(root, "git@h:o/x.git"), "git@h:o/x.git");
        assert_eq!(remote_url(root, "https://h/x.git"), "https://h/x.git");
    }
}
