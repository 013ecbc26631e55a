//! Getting an attempt ready to run: its workspace, the code and env
//! checkouts, a Dockerfile that stays inside the env repository, and the
//! image.

use std::path::{Component, Path, PathBuf};

use protocol::{RunTask, SecretValues};
use zeroize::Zeroizing;

use crate::beneath::{blocking, PathError, Root};
use crate::docker::{self, DockerError, ImageSource};
use crate::git::GitError;
use crate::git_auth::GitAuth;

use super::context::Context;
use super::report::Reporter;
use super::workspace::{fresh_workspace, Workspace};
use super::{
    STAGE_CODE, STAGE_CODE_READY, STAGE_ENV, STAGE_ENV_READY, STAGE_IMAGE, STAGE_IMAGE_READY,
};

/// Why an attempt failed before its command could run.
#[derive(Debug, thiserror::Error)]
pub(super) enum PrepareError {
    #[error("{role} {source}")]
    Git {
        role: &'static str,
        source: GitError,
    },
    #[error("dockerfile_path {0:?} must be a relative path inside the env repository")]
    BadDockerfilePath(String),
    #[error("Dockerfile {path} not found in env repository at {commit}")]
    DockerfileMissing { path: String, commit: String },
    #[error("Dockerfile {0} is a link to somewhere outside the env repository")]
    DockerfileEscapes(String),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("preparing the workspace failed: {0}")]
    Workspace(#[source] PathError),
}

/// Makes the attempt's directory, fetches code and env into it and finds
/// or builds the image; returns the directory and the image's tag.
pub(super) async fn prepare(
    spec: &RunTask,
    secrets: &SecretValues,
    ctx: &Context,
    out: &Reporter,
) -> Result<(Workspace, String), PrepareError> {
    let auth = |credential: &Option<String>| GitAuth {
        credential: credential
            .as_ref()
            .and_then(|name| secrets.0.get(name))
            .map(|v| Zeroizing::new(v.clone())),
        known_hosts: spec
            .known_hosts
            .as_ref()
            .and_then(|name| secrets.0.get(name))
            .map(|v| Zeroizing::new(v.clone())),
        node_known_hosts: ctx.git_known_hosts.clone(),
    };
    checked_dockerfile_path(&spec.dockerfile_path)?;
    let (workspace, env) = fresh_workspace(ctx, spec.task_id, spec.attempt).await?;
    let code = &workspace.code;

    let code_repo = Repository {
        role: "code",
        url: &spec.code_repo_url,
        commit: &spec.code_commit_id,
        stages: (STAGE_CODE, STAGE_CODE_READY),
        auth: auth(&spec.code_credential),
    };
    fetch(ctx, out, code_repo, code).await?;
    let env_repo = Repository {
        role: "env",
        url: &spec.env_repo_url,
        commit: &spec.env_commit_id,
        stages: (STAGE_ENV, STAGE_ENV_READY),
        auth: auth(&spec.env_credential),
    };
    fetch(ctx, out, env_repo, &env).await?;
    check_dockerfile(spec, &env).await?;

    let tag = ensure_image(spec, ctx, out, &env).await?;
    Ok((workspace, tag))
}

/// One repository an attempt checks out, and the stages that report it.
struct Repository<'a> {
    /// `code` or `env`, for the error.
    role: &'static str,
    url: &'a str,
    commit: &'a str,
    /// The stage reported while it is fetched, and once it is checked out.
    stages: (&'static str, &'static str),
    /// How git authenticates.
    auth: GitAuth,
}

/// Checks `repo` out into `into`, reporting both stages and noting a cache
/// change when the commit had to be fetched.
async fn fetch(
    ctx: &Context,
    out: &Reporter,
    repo: Repository<'_>,
    into: &Root,
) -> Result<(), PrepareError> {
    let (fetching, ready) = repo.stages;
    out.stage(fetching).await;
    let fetched = ctx
        .git
        .checkout(repo.url, repo.commit, into, &repo.auth)
        .await
        .map_err(|source| PrepareError::Git {
            role: repo.role,
            source,
        })?;
    if !fetched.from_cache {
        ctx.note_cache_change();
    }
    out.stage_done(ready, format!("commit {}: {fetched}", short(repo.commit)))
        .await;
    Ok(())
}

/// Finds or builds the attempt's image from the env checkout, reporting the
/// stage; returns the image's tag.
async fn ensure_image(
    spec: &RunTask,
    ctx: &Context,
    out: &Reporter,
    env: &Root,
) -> Result<String, PrepareError> {
    out.stage(STAGE_IMAGE).await;
    let tag = docker::image_tag(
        &spec.env_repo_url,
        &spec.env_commit_id,
        &spec.dockerfile_path,
    );
    let started = std::time::Instant::now();
    let source = ctx.images.ensure(&tag, env, &spec.dockerfile_path).await?;
    tracing::info!(image = %tag, ?source, "image ready");
    let detail = match source {
        ImageSource::Reused => format!("{tag} cached"),
        ImageSource::Built => {
            ctx.note_cache_change();
            format!("{tag} built in {:.1} s", started.elapsed().as_secs_f64())
        }
    };
    out.stage_done(STAGE_IMAGE_READY, detail).await;
    Ok(tag)
}

/// Checks that the Dockerfile is a regular file inside the env checkout,
/// opened as Docker will find it: through links that stay inside, never
/// one that leads out.
async fn check_dockerfile(spec: &RunTask, env: &Root) -> Result<(), PrepareError> {
    let env = env.try_clone().map_err(|source| {
        PrepareError::Workspace(PathError::Io {
            path: String::new(),
            source,
        })
    })?;
    let path = spec.dockerfile_path.clone();
    match blocking(move || env.open_file(&path).map(drop)).await {
        Ok(()) => Ok(()),
        Err(PathError::Escapes { .. }) => Err(PrepareError::DockerfileEscapes(
            spec.dockerfile_path.clone(),
        )),
        Err(PathError::Missing { .. } | PathError::NotAFile(_)) => {
            Err(PrepareError::DockerfileMissing {
                path: spec.dockerfile_path.clone(),
                commit: spec.env_commit_id.clone(),
            })
        }
        Err(e) => Err(PrepareError::Workspace(e)),
    }
}

/// The first 12 digits of a commit id.
fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// A preparation failure in words a person can act on; a full disk under
/// the work directory says so, whichever step hit it.
pub(super) fn explain(e: &PrepareError, work_dir: &Path) -> String {
    let text = e.to_string();
    let full = text.contains("No space left on device")
        || matches!(e, PrepareError::Workspace(p)
            if p.io().is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull));
    if full {
        format!(
            "the node's disk is full: no space left under its work directory {} ({text}); \
             free space there or give the agent another --work-dir",
            work_dir.display()
        )
    } else {
        text
    }
}

/// Refuses absolute paths and `..`, although the server checked already.
fn checked_dockerfile_path(path: &str) -> Result<PathBuf, PrepareError> {
    let p = Path::new(path);
    let plain = !path.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if plain {
        Ok(p.to_owned())
    } else {
        Err(PrepareError::BadDockerfilePath(path.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerfile_paths_must_stay_inside_the_repository() {
        assert!(checked_dockerfile_path("Dockerfile").is_ok());
        assert!(checked_dockerfile_path("ci/gpu.Dockerfile").is_ok());
        assert!(checked_dockerfile_path("../Dockerfile").is_err());
        assert!(checked_dockerfile_path("a/../../Dockerfile").is_err());
        assert!(checked_dockerfile_path("/etc/passwd").is_err());
        assert!(checked_dockerfile_path("").is_err());
    }
}
