//! A repository, or a task, that puts links where the agent works cannot
//! make it write or read outside: real repositories with links (and links
//! to directories) at every path the agent touches, including the names it
//! derives itself, real Docker, and real HTTP downloads.
//!
//! Every test keeps a directory standing for the rest of the node, with a
//! secret in it, and checks at the end that nothing there changed.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use git2::{ObjectType, Oid, Repository};
use node_agent::beneath::Root;
use node_agent::executor::{Context, Report};
use node_agent::git::{GitCache, GitError};
use node_agent::git_auth::GitAuth;
use protocol::{AgentMessage, ReportedState, RunTask, TaskInput, TaskOutput, TransferGrant};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, context, env_repo, output, spec, statuses};

const SECRET: &str = "the node's secret\n";

/// A directory outside every work directory, with a secret file in it.
pub(crate) struct Outside {
    dir: tempfile::TempDir,
    /// Every file in it, with its content.
    files: std::collections::BTreeMap<String, String>,
}

impl Outside {
    pub(crate) fn new() -> Outside {
        let dir = tempfile::tempdir().unwrap();
        let mut outside = Outside {
            dir,
            files: Default::default(),
        };
        outside.add("secret", SECRET);
        outside
    }

    /// Puts one more file there.
    fn add(&mut self, name: &str, content: &str) {
        std::fs::write(self.dir.path().join(name), content).unwrap();
        self.files.insert(name.into(), content.into());
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn secret(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    /// Nothing was added, removed or changed.
    pub(crate) fn is_untouched(&self) {
        let names: BTreeSet<_> = std::fs::read_dir(self.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, self.files.keys().cloned().collect());
        for (name, content) in &self.files {
            let now = std::fs::read_to_string(self.path().join(name)).unwrap();
            assert_eq!(&now, content, "{name} changed");
        }
    }
}

/// Runs an attempt to its end and releases what it left; returns every
/// report.
async fn run(ctx: &Arc<Context>, spec: RunTask) -> Vec<Report> {
    let reports = support::run_kept(ctx, spec.clone()).await;
    support::release(ctx, &spec).await;
    reports
}

/// The final state and reason of an attempt's reports.
fn ending(reports: &[Report]) -> (ReportedState, String) {
    let last = *statuses(reports).last().unwrap();
    (last.state, last.message.clone().unwrap_or_default())
}

/// Serves `body` to every GET over plain HTTP, as an object store does
/// behind a presigned URL; returns the URL.
pub(crate) async fn serve(body: Vec<u8>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/object", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
            });
        }
    });
    url
}

/// Plays the server's part in transfers: every download is granted `url`
/// holding `body`; uploads are refused and counted.
pub(crate) fn grant_downloads(ctx: &Arc<Context>, url: String, body: &[u8]) -> Arc<AtomicUsize> {
    let broker = Arc::clone(ctx.files().broker());
    let (size, sha) = (body.len() as u64, hex::encode(Sha256::digest(body)));
    let uploads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&uploads);
    tokio::spawn(async move {
        loop {
            broker.wanted().await;
            while let Some(AgentMessage::TransferRequest(r)) = broker.next_message() {
                let grant = match r.op {
                    protocol::TransferOp::Download { .. } => TransferGrant {
                        id: r.id,
                        url: Some(url.clone()),
                        size: Some(size),
                        sha256: Some(sha.clone()),
                        ..TransferGrant::default()
                    },
                    _ => {
                        counted.fetch_add(1, Ordering::SeqCst);
                        TransferGrant {
                            id: r.id,
                            error: Some("uploads are not served in this test".into()),
                            ..TransferGrant::default()
                        }
                    }
                };
                broker.answer(grant);
            }
        }
    });
    uploads
}

pub(crate) fn input(name: &str) -> TaskInput {
    TaskInput {
        name: name.into(),
        object: "datasets/payload".into(),
    }
}

#[tokio::test]
async fn inputs_never_land_outside_through_links_the_repository_holds() {
    support::base_image().await;
    let outside = Outside::new();
    let code = support::repo_with_links(
        &[("real/keep", "kept\n"), ("README", "code\n")],
        &[
            // a directory link out, by absolute and by relative path
            ("data", outside.path().to_str().unwrap()),
            ("up", "../../../../../../../../../.."),
            // a file link out at an input's own name
            ("x.bin", outside.secret().to_str().unwrap()),
            // a link at the temporary name earlier agents derived
            (".y.bin.unidesk-partial", outside.secret().to_str().unwrap()),
            // a directory link that stays inside
            ("in", "real"),
        ],
    );
    let env = env_repo("");
    let (ctx, _work) = context().await;
    let payload = b"payload from the store\n".to_vec();
    let url = serve(payload.clone()).await;
    grant_downloads(&ctx, url, &payload);

    for (name, says) in [
        (
            "data/payload",
            "input data/payload: data/payload leads out of the workspace",
        ),
        (
            "data/secret",
            "input data/secret: data/secret leads out of the workspace",
        ),
        (
            "up/tmp/payload",
            "input up/tmp/payload: up/tmp/payload leads out of the workspace",
        ),
    ] {
        let mut s = spec(&code, &env, "echo the command ran");
        s.inputs = vec![input(name)];
        let reports = run(&ctx, s).await;
        let (state, reason) = ending(&reports);
        assert_eq!(state, ReportedState::Failed, "{name}: {reason}");
        assert!(reason.contains(says), "{name}: {reason}");
        assert!(!output(&reports).contains("the command ran"));
        outside.is_untouched();
    }

    // A link at the input's name, or at a temporary name, is replaced
    // (never written through), and a link inside the workspace is
    // followed: the command sees the downloaded bytes at each place.
    let mut s = spec(
        &code,
        &env,
        "cat x.bin y.bin in/z.bin; [ -L x.bin ] || echo x.bin-is-a-file; cat real/z.bin",
    );
    s.inputs = vec![input("x.bin"), input("y.bin"), input("in/z.bin")];
    let reports = run(&ctx, s).await;
    let (state, reason) = ending(&reports);
    assert_eq!(state, ReportedState::Succeeded, "{reason}");
    let text = output(&reports);
    assert_eq!(text.matches("payload from the store").count(), 4, "{text}");
    assert!(text.contains("x.bin-is-a-file"), "{text}");
    assert!(!text.contains("secret"), "{text}");
    outside.is_untouched();
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn outputs_are_never_read_from_outside_whatever_the_task_or_repository_links() {
    support::base_image().await;
    let outside = Outside::new();
    let code = support::repo_with_links(
        &[("README", "code\n")],
        &[("committed", outside.path().to_str().unwrap())],
    );
    let env = env_repo("");
    let (ctx, _work) = context().await;
    let uploads = grant_downloads(&ctx, serve(Vec::new()).await, b"");
    // The task makes links of its own at run time, absolute and relative,
    // to files and directories, and a FIFO that would block a reader.
    let script = format!(
        "mkdir -p out && ln -s {secret} out/abs && ln -s ../../../../../../../..{secret} out/rel \
         && ln -s {dir} out/dir && mkfifo out/pipe && echo made",
        secret = outside.secret().display(),
        dir = outside.path().display(),
    );
    let mut s = spec(&code, &env, &script);
    let names = [
        ("abs", "out/abs"),
        ("rel", "out/rel"),
        ("in-dir", "out/dir/secret"),
        ("committed", "committed/secret"),
        ("pipe", "out/pipe"),
    ];
    s.outputs = names
        .iter()
        .map(|(name, path)| TaskOutput {
            name: (*name).into(),
            path: (*path).into(),
        })
        .collect();
    let started = std::time::Instant::now();
    let reports = run(&ctx, s).await;
    let (state, reason) = ending(&reports);
    assert_eq!(state, ReportedState::Failed, "{reason}");
    assert!(output(&reports).contains("made"));
    for (name, path) in &names[..4] {
        let says = format!("output {name}: {path} leads out of the workspace");
        assert!(reason.contains(&says), "{says}: {reason}");
    }
    assert!(
        reason.contains("output pipe: out/pipe is not a regular file"),
        "{reason}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(120),
        "a FIFO output must not hang the agent"
    );
    assert_eq!(uploads.load(Ordering::SeqCst), 0, "no upload was started");
    outside.is_untouched();
    support::remove_env_image(&ctx, &env).await;
}

#[tokio::test]
async fn the_dockerfile_and_the_build_context_never_reach_outside_the_env_repository() {
    support::base_image().await;
    let mut outside = Outside::new();
    outside.add("Dockerfile", &format!("FROM {}\n", support::BASE_IMAGE));
    let base = format!("FROM {}\n", support::BASE_IMAGE);
    let env = support::repo_with_links(
        &[
            ("Dockerfile", &format!("{base}COPY . /ctx\n")),
            ("real/Dockerfile", &base),
        ],
        &[
            ("leak", outside.secret().to_str().unwrap()),
            ("leak-dir", outside.path().to_str().unwrap()),
            ("docker", outside.path().to_str().unwrap()),
            (
                "outside.Dockerfile",
                outside.path().join("Dockerfile").to_str().unwrap(),
            ),
            ("inside", "real"),
        ],
    );
    let code = support::repo(&[("README", "code\n")]);
    let (ctx, _work) = context().await;

    for path in ["docker/Dockerfile", "outside.Dockerfile"] {
        let mut s = spec(&code, &env, "echo never");
        s.dockerfile_path = path.into();
        let (state, reason) = ending(&run(&ctx, s).await);
        assert_eq!(state, ReportedState::Failed);
        assert!(
            reason.contains(&format!(
                "Dockerfile {path} is a link to somewhere outside the env repository"
            )),
            "{reason}"
        );
    }
    outside.is_untouched();

    // Through a link that stays inside, the Dockerfile is found.
    let mut s = spec(&code, &env, "echo built-through-an-inner-link");
    s.dockerfile_path = "inside/Dockerfile".into();
    let reports = run(&ctx, s.clone()).await;
    assert_eq!(ending(&reports).0, ReportedState::Succeeded, "{reports:?}");
    support::remove_image(ctx.docker(), &support::tag_of(&s)).await;

    // The context holds the links as links: what the image copied is the
    // link, which points nowhere inside the container, never the secret.
    let s = spec(
        &code,
        &env,
        "cat /ctx/leak /ctx/leak-dir/secret 2>&1; ls -l /ctx/leak; echo listed",
    );
    let reports = run(&ctx, s).await;
    let text = output(&reports);
    assert!(text.contains("listed"), "{text}");
    assert!(!text.contains("node's secret"), "the secret leaked: {text}");
    assert!(text.contains("/ctx/leak ->"), "{text}");
    outside.is_untouched();
    support::remove_env_image(&ctx, &env).await;
}

/// A tree entry: its mode, raw name and object.
type Entry<'a> = (u32, &'a [u8], Oid);

/// A bare repository in `keep` holding one commit whose tree is written
/// byte by byte, so it can hold what git itself would never write: the
/// same name twice, `..`, `.git`, a name with a slash. `blobs` and `trees`
/// are the raw objects the entries name.
fn crafted(
    keep: &tempfile::TempDir,
    blobs: &[&[u8]],
    trees: &[&[u8]],
    entries: &[Entry<'_>],
) -> (String, String) {
    let repo = Repository::init_bare(keep.path()).unwrap();
    let odb = repo.odb().unwrap();
    for data in blobs {
        odb.write(ObjectType::Blob, data).unwrap();
    }
    for raw in trees {
        odb.write(ObjectType::Tree, raw).unwrap();
    }
    let tree = odb.write(ObjectType::Tree, &raw_tree(entries)).unwrap();
    let commit = format!(
        "tree {tree}\nauthor t <t@example.org> 0 +0000\ncommitter t <t@example.org> 0 +0000\n\ncrafted\n"
    );
    let commit = odb.write(ObjectType::Commit, commit.as_bytes()).unwrap();
    repo.reference("refs/heads/main", commit, true, "crafted")
        .unwrap();
    (
        format!("file://{}", keep.path().display()),
        commit.to_string(),
    )
}

/// A tree object's bytes, entries in the order given.
fn raw_tree(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut raw = Vec::new();
    for (mode, name, oid) in entries {
        raw.extend_from_slice(format!("{mode:o} ").as_bytes());
        raw.extend_from_slice(name);
        raw.push(0);
        raw.extend_from_slice(oid.as_bytes());
    }
    raw
}

#[tokio::test]
async fn a_crafted_tree_cannot_make_a_checkout_write_through_a_link() {
    let outside = Outside::new();
    let pwned_data = b"pwned\n".as_slice();
    let link_data = outside.path().to_str().unwrap().as_bytes().to_vec();
    let pwned = Oid::hash_object(ObjectType::Blob, pwned_data).unwrap();
    let to_outside = Oid::hash_object(ObjectType::Blob, &link_data).unwrap();
    // A directory holding a file named like the secret.
    let inner_raw = raw_tree(&[(0o100644, b"secret", pwned)]);
    let inner = Oid::hash_object(ObjectType::Tree, &inner_raw).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = GitCache::new(cache_dir.path().join("git"));
    let work = tempfile::tempdir().unwrap();
    let root = Root::open(work.path(), "the checkouts").unwrap();

    let cases: Vec<(&str, Vec<Entry<'_>>, &str)> = vec![
        (
            "link then directory",
            vec![(0o120000, b"a", to_outside), (0o040000, b"a", inner)],
            "its tree holds a twice",
        ),
        (
            "directory then link",
            vec![(0o040000, b"a", inner), (0o120000, b"a", to_outside)],
            "its tree holds a twice",
        ),
        (
            "link then file",
            vec![(0o120000, b"f", to_outside), (0o100644, b"f", pwned)],
            "its tree holds f twice",
        ),
        (
            "dot-dot",
            vec![(0o040000, b"..", inner)],
            "its tree holds an entry named \"..\"",
        ),
        (
            "dot-git",
            vec![(0o040000, b".GiT", inner)],
            "its tree holds an entry named \".GiT\"",
        ),
        (
            "a slash",
            vec![(0o100644, b"x/secret", pwned)],
            "its tree holds an entry named \"x/secret\"",
        ),
    ];
    for (i, (what, entries, says)) in cases.into_iter().enumerate() {
        let keep = tempfile::tempdir().unwrap();
        let (url, commit) = crafted(&keep, &[pwned_data, &link_data], &[&inner_raw], &entries);
        let dest = root.create_dir(&format!("c{i}"), "a checkout").unwrap();
        let e = cache
            .checkout(&url, &commit, &dest, &GitAuth::default())
            .await
            .unwrap_err();
        assert!(matches!(e, GitError::BadTree(_)), "{what}: {e}");
        assert!(e.to_string().contains(says), "{what}: {e}");
        outside.is_untouched();
    }
}

/// A repository holding an executable `tool.sh`, `notes/a.txt` and links
/// `abs` (to the secret outside), `dir` (to the outside directory) and
/// `rel` (to `notes/a.txt`), and `files` and `links` besides.
fn tool_and_links(
    outside: &Outside,
    files: &[(&str, &str)],
    links: &[(&str, &str)],
) -> support::Repo {
    let secret = outside.secret();
    let mut all_files = vec![("tool.sh", "#!/bin/sh\n"), ("notes/a.txt", "a\n")];
    all_files.extend_from_slice(files);
    let mut all_links = vec![
        ("abs", secret.to_str().unwrap()),
        ("dir", outside.path().to_str().unwrap()),
        ("rel", "notes/a.txt"),
    ];
    all_links.extend_from_slice(links);
    let mut repo = support::repo_with_links(&all_files, &all_links);
    std::fs::set_permissions(
        repo.path().join("tool.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    repo.commit_all();
    repo
}

#[tokio::test]
async fn committed_links_are_checked_out_as_links_and_never_followed() {
    let outside = Outside::new();
    let repo = tool_and_links(&outside, &[], &[]);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = GitCache::new(cache_dir.path().join("git"));
    let work = tempfile::tempdir().unwrap();
    let root = Root::open(work.path(), "the checkouts").unwrap();
    let dest = root.create_dir("code", "a checkout").unwrap();
    cache
        .checkout(&repo.url, &repo.commit, &dest, &GitAuth::default())
        .await
        .unwrap();
    let code = work.path().join("code");
    assert_eq!(
        std::fs::read_link(code.join("abs")).unwrap(),
        outside.secret()
    );
    assert_eq!(
        std::fs::read_link(code.join("dir")).unwrap(),
        outside.path()
    );
    assert_eq!(
        std::fs::read_link(code.join("rel")).unwrap(),
        Path::new("notes/a.txt")
    );
    let mode = std::fs::metadata(code.join("tool.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "the executable bit is kept: {mode:o}");
    assert!(!code.join(".git").exists());
    outside.is_untouched();
}

/// Every entry under `dir`, never following a link: its kind, mode and
/// content or target.
fn listing(dir: &Path) -> std::collections::BTreeMap<String, String> {
    fn walk(dir: &Path, at: &str, out: &mut std::collections::BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = format!("{at}{}", entry.file_name().to_string_lossy());
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            let what = if meta.file_type().is_symlink() {
                format!(
                    "link -> {}",
                    std::fs::read_link(entry.path()).unwrap().display()
                )
            } else if meta.is_dir() {
                walk(&entry.path(), &format!("{name}/"), out);
                format!("dir {mode:o}")
            } else {
                let content = std::fs::read(entry.path()).unwrap();
                format!("file {mode:o} {}", hex::encode(Sha256::digest(content)))
            };
            out.insert(name, what);
        }
    }
    let mut out = Default::default();
    walk(dir, "", &mut out);
    out
}

#[tokio::test]
async fn a_prepared_tree_gives_the_commit_as_committed_whatever_a_task_did_to_its_copy() {
    let outside = Outside::new();
    let repo = tool_and_links(
        &outside,
        &[("deep/er/still/b.txt", "b\n")],
        &[("notes/up", "../../../..")],
    );
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = GitCache::new(cache_dir.path().join("git"));
    let work = tempfile::tempdir().unwrap();
    let root = Root::open(work.path(), "the checkouts").unwrap();
    let checkout = |name: &str| {
        let dest = root.create_dir(name, "a checkout").unwrap();
        let cache = &cache;
        let repo = &repo;
        async move {
            cache
                .checkout(&repo.url, &repo.commit, &dest, &GitAuth::default())
                .await
                .unwrap()
        }
    };

    // The first checkout reads the mirror and keeps the tree beside it.
    assert!(!checkout("first").await.from_cache);
    let (bytes, trees) = cache.prepared().usage();
    assert_eq!(trees, 1);
    assert!(bytes > 0);
    let committed = listing(&work.path().join("first"));

    // A task changes everything it can in its copy, through its links too
    // (they point outside only on the node, so the agent's own copy is
    // what would show a leak).
    let first = work.path().join("first");
    std::fs::write(first.join("tool.sh"), "rm -rf /\n").unwrap();
    std::fs::set_permissions(
        first.join("notes/a.txt"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    std::fs::remove_file(first.join("rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", first.join("rel")).unwrap();
    std::fs::remove_dir_all(first.join("deep")).unwrap();
    std::fs::write(first.join("new.txt"), "new\n").unwrap();

    // The mirror goes: the next checkout of the commit is the kept tree,
    // exactly as committed.
    for mirror in std::fs::read_dir(cache_dir.path().join("git")).unwrap() {
        std::fs::remove_dir_all(mirror.unwrap().path()).unwrap();
    }
    for name in ["second", "third"] {
        assert!(checkout(name).await.from_cache);
        assert_eq!(listing(&work.path().join(name)), committed, "{name}");
    }
    assert_eq!(
        std::fs::read_link(work.path().join("second/abs")).unwrap(),
        outside.secret()
    );
    outside.is_untouched();

    // Soon after a checkout a spare copy of the tree is ready: the next
    // checkout moves it in, as committed; the task vandalises that copy
    // too, and the one after is again as committed.
    for name in ["spared", "spared again"] {
        let waited = std::time::Instant::now();
        while cache.prepared().spares() == 0 {
            assert!(
                waited.elapsed() < std::time::Duration::from_secs(30),
                "no spare tree was made"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(checkout(name).await.from_cache);
        assert_eq!(cache.prepared().spares(), 0, "the spare was taken");
        let spared = work.path().join(name);
        assert_eq!(listing(&spared), committed, "{name}");
        std::fs::write(spared.join("tool.sh"), "rm -rf /\n").unwrap();
        std::fs::remove_dir_all(spared.join("deep")).unwrap();
        std::fs::remove_file(spared.join("abs")).unwrap();
    }
    outside.is_untouched();

    // A new agent on the same work directory finds the tree again.
    // (The first cache may have counted a spare in its bytes already.)
    let again = GitCache::new(cache_dir.path().join("git"));
    let (kept, trees) = again.prepared().usage();
    assert_eq!(trees, 1);
    assert!(kept > 0 && kept <= bytes, "{kept} of {bytes}");
    let dest = root.create_dir("fourth", "a checkout").unwrap();
    let fourth = again
        .checkout(&repo.url, &repo.commit, &dest, &GitAuth::default())
        .await
        .unwrap();
    assert!(fourth.from_cache);
    assert_eq!(listing(&work.path().join("fourth")), committed);
}

#[tokio::test]
async fn a_tree_no_checkout_may_write_or_one_past_the_budget_is_not_kept() {
    let outside = Outside::new();
    let pwned_data = b"pwned\n".as_slice();
    let link_data = outside.path().to_str().unwrap().as_bytes().to_vec();
    let pwned = Oid::hash_object(ObjectType::Blob, pwned_data).unwrap();
    let to_outside = Oid::hash_object(ObjectType::Blob, &link_data).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = GitCache::new(cache_dir.path().join("git"));
    let work = tempfile::tempdir().unwrap();
    let root = Root::open(work.path(), "the checkouts").unwrap();
    let trees_dir = cache_dir.path().join("git-trees");
    let keep = tempfile::tempdir().unwrap();
    // A link, then a file of the same name: refused part way through.
    let (url, commit) = crafted(
        &keep,
        &[pwned_data, &link_data],
        &[],
        &[
            (0o100644, b"a", pwned),
            (0o120000, b"f", to_outside),
            (0o100644, b"f", pwned),
        ],
    );
    for i in 0..2 {
        let dest = root.create_dir(&format!("bad{i}"), "a checkout").unwrap();
        let e = cache
            .checkout(&url, &commit, &dest, &GitAuth::default())
            .await
            .unwrap_err();
        assert!(matches!(e, GitError::BadTree(_)), "{e}");
        assert_eq!(cache.prepared().usage(), (0, 0));
        let left: Vec<_> = std::fs::read_dir(&trees_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "nothing half-written is left: {left:?}");
    }
    outside.is_untouched();

    // A commit larger than the budget is checked out, and not kept.
    let repo = support::repo_with_links(&[("big.bin", &"x".repeat(4096))], &[]);
    let small = GitCache::with_prepared_bytes(cache_dir.path().join("git"), 1000);
    for name in ["big0", "big1"] {
        let dest = root.create_dir(name, "a checkout").unwrap();
        small
            .checkout(&repo.url, &repo.commit, &dest, &GitAuth::default())
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(work.path().join(name).join("big.bin"))
                .unwrap()
                .len(),
            4096
        );
        assert_eq!(small.prepared().usage(), (0, 0));
    }
    assert_eq!(std::fs::read_dir(&trees_dir).unwrap().count(), 0);
}
