//! A task's container may run as any user (an image's `USER`, or an
//! entrypoint that drops root): it reads and writes its workspace
//! whoever it is, and reads what its image copied from the env
//! repository, whatever the agent's umask (`unidesk dev` runs with 077);
//! meanwhile no other user on the node can reach the workspaces or the
//! prepared trees, and no mode is ever set through a link.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use protocol::ReportedState;

use crate::links::{grant_downloads, input, serve, Outside};
use crate::support::{self, context, output, run_kept, spec, statuses};

/// The permission bits of `path` itself (a link is not followed).
fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Commits `name` in `repo` as an executable file holding `content`.
fn commit_executable(repo: &mut support::Repo, name: &str, content: &str) {
    let path = repo.path().join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    repo.commit_all();
}

#[tokio::test]
async fn a_task_of_another_user_reads_and_writes_its_workspace_and_nobody_else_reaches_it() {
    // What `unidesk dev` does: whatever is made without an explicit mode
    // is its owner's alone. The umask is the whole process's; the other
    // tests of this binary run their containers as root, whom modes do
    // not stop, so it changes nothing for them.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    support::base_image().await;
    let outside = Outside::new();
    std::fs::set_permissions(outside.secret(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut code = support::repo_with_links(
        &[("data/config.txt", "as committed\n"), ("README", "code\n")],
        &[
            ("leak", outside.secret().to_str().unwrap()),
            ("away", outside.path().to_str().unwrap()),
        ],
    );
    commit_executable(&mut code, "tool.sh", "#!/bin/sh\necho the tool ran\n");
    let mut env = support::repo(&[
        (
            "Dockerfile",
            &format!(
                "FROM {}\nCOPY app /app\nUSER 1000:1000\n",
                support::BASE_IMAGE
            ),
        ),
        ("app/data.txt", "from the image\n"),
    ]);
    commit_executable(&mut env, "app/run.sh", "#!/bin/sh\necho the image ran\n");
    let (ctx, work) = context().await;
    let payload = b"input bytes\n";
    grant_downloads(&ctx, serve(payload.to_vec()).await, payload);
    let script = "set -e; id -u; cat /app/data.txt; /app/run.sh; \
        cat data/config.txt; ./tool.sh; \
        echo changed > data/config.txt; cat data/config.txt; \
        mkdir -p results/deep && echo made > results/deep/r.txt; \
        cat inputs/in.txt; echo more >> inputs/in.txt; \
        rm README; echo done";
    let mut s = spec(&code, &env, script);
    s.inputs = vec![input("inputs/in.txt")];
    // The first checkout is written from the mirror; the next ones come
    // from the prepared tree (moved in from a spare, or copied).
    for attempt in 1..=3 {
        s.attempt = attempt;
        let reports = run_kept(&ctx, s.clone()).await;
        let end = *statuses(&reports).last().unwrap();
        let text = output(&reports);
        assert_eq!(
            end.state,
            ReportedState::Succeeded,
            "attempt {attempt}: {:?}\n{text}",
            end.message
        );
        assert_eq!(
            text,
            "1000\nfrom the image\nthe image ran\nas committed\nthe tool ran\nchanged\n\
             input bytes\ndone\n",
            "attempt {attempt}"
        );
        // What the task wrote is on the node, and only the agent reaches
        // it there.
        let tasks = work.path().join("tasks");
        let code_dir = tasks.join(format!("{}-{attempt}", s.task_id)).join("code");
        assert_eq!(
            std::fs::read_to_string(code_dir.join("results/deep/r.txt")).unwrap(),
            "made\n"
        );
        assert_eq!(
            std::fs::read_to_string(code_dir.join("inputs/in.txt")).unwrap(),
            "input bytes\nmore\n"
        );
        assert!(!code_dir.join("README").exists());
        assert_eq!(mode(&code_dir), 0o777, "attempt {attempt}");
        assert_eq!(mode(&tasks), 0o700, "attempt {attempt}");
        assert_eq!(mode(&work.path().join("git-trees")), 0o700);
        support::release(&ctx, &s).await;
        // The links were written as links and nothing was set through
        // them: the node's secret keeps its content and its mode.
        outside.is_untouched();
        assert_eq!(mode(&outside.secret()), 0o600);
        assert_eq!(mode(outside.path()), 0o700);
    }
    support::remove_env_image(&ctx, &env).await;
}
