//! Getting an attempt ready to run: its workspace, the code checkout, and
//! the image (found by its tag, or built from an env checkout whose
//! Dockerfile stays inside the env repository). The code and the image are
//! two independent halves: the run pipeline does them side by side.

use std::path::{Component, Path, PathBuf};

use protocol::{RunTask, SecretValues};
use zeroize::Zeroizing;

use crate::beneath::{blocking, PathError, Root};
use crate::docker::{self, DockerError, ImageSource};
use crate::git::GitError;
use crate::git_auth::GitAuth;

use super::context::Context;
use super::report::{Ending, Reporter};
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

/// How git authenticates for a repository whose credential secret is
/// `credential`, with the task's and the node's known hosts.
fn auth(
    spec: &RunTask,
    secrets: &SecretValues,
    ctx: &Context,
    credential: &Option<String>,
) -> GitAuth {
    GitAuth {
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
    }
}

/// Makes the attempt's directory, empty, with `code/` and `env/` in it,
/// once the spec's Dockerfile path is known to stay inside the env
/// repository; returns the workspace and the env checkout's directory.
pub(super) async fn make_workspace(
    spec: &RunTask,
    ctx: &Context,
) -> Result<(Workspace, Root), PrepareError> {
    checked_dockerfile_path(&spec.dockerfile_path)?;
    fresh_workspace(ctx, spec.task_id, spec.attempt).await
}

/// Checks the code out into `code`, reporting [`STAGE_CODE`] and
/// [`STAGE_CODE_READY`].
pub(super) async fn fetch_code(
    spec: &RunTask,
    secrets: &SecretValues,
    ctx: &Context,
    out: &Reporter,
    code: &Root,
) -> Result<(), PrepareError> {
    let code_repo = Repository {
        role: "code",
        url: &spec.code_repo_url,
        commit: &spec.code_commit_id,
        stages: (STAGE_CODE, STAGE_CODE_READY),
        auth: auth(spec, secrets, ctx, &spec.code_credential),
    };
    fetch(ctx, out, code_repo, code).await
}

/// Finds the attempt's image, or checks the env repository out into `env`
/// and builds it there; returns the image's tag.
///
/// The tag is a function of the env URL, commit and Dockerfile path
/// ([`docker::image_tag`]), so an image with that tag on the node is the
/// one the checkout would build: then the env repository is not checked
/// out (nor reached at all), and [`STAGE_ENV_READY`] and
/// [`STAGE_IMAGE_READY`] say so. Otherwise the stages are reported as the
/// env is fetched and the image built.
pub(super) async fn env_image(
    spec: &RunTask,
    secrets: &SecretValues,
    ctx: &Context,
    out: &Reporter,
    env: &Root,
) -> Result<String, PrepareError> {
    let tag = docker::image_tag(
        &spec.env_repo_url,
        &spec.env_commit_id,
        &spec.dockerfile_path,
    );
    if docker::image_exists(&ctx.docker, &tag).await? {
        tracing::info!(image = %tag, "image cached; env not checked out");
        out.stage_done(
            STAGE_ENV_READY,
            format!(
                "commit {}: image cached; env not checked out",
                short(&spec.env_commit_id)
            ),
        )
        .await;
        out.stage_done(STAGE_IMAGE_READY, format!("{tag} cached"))
            .await;
        return Ok(tag);
    }
    let env_repo = Repository {
        role: "env",
        url: &spec.env_repo_url,
        commit: &spec.env_commit_id,
        stages: (STAGE_ENV, STAGE_ENV_READY),
        auth: auth(spec, secrets, ctx, &spec.env_credential),
    };
    fetch(ctx, out, env_repo, env).await?;
    check_dockerfile(spec, env).await?;
    ensure_image(spec, ctx, out, env, &tag).await?;
    Ok(tag)
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

/// Finds or builds image `tag` from the env checkout, reporting the
/// stage.
async fn ensure_image(
    spec: &RunTask,
    ctx: &Context,
    out: &Reporter,
    env: &Root,
    tag: &str,
) -> Result<(), PrepareError> {
    out.stage(STAGE_IMAGE).await;
    let started = std::time::Instant::now();
    let source = ctx.images.ensure(tag, env, &spec.dockerfile_path).await?;
    tracing::info!(image = %tag, ?source, "image ready");
    let detail = match source {
        ImageSource::Reused => format!("{tag} cached"),
        ImageSource::Built => {
            ctx.note_cache_change();
            format!("{tag} built in {:.1} s", started.elapsed().as_secs_f64())
        }
    };
    out.stage_done(STAGE_IMAGE_READY, detail).await;
    Ok(())
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

/// The ending of an attempt whose preparation failed with `e`: the node's
/// fault when Docker did not answer (see [`Ending::docker`]).
pub(super) fn prepare_failed(e: &PrepareError, work_dir: &Path) -> Ending {
    Ending {
        node_fault: matches!(e, PrepareError::Docker(d) if d.is_unanswered()),
        ..Ending::failed(explain(e, work_dir))
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
