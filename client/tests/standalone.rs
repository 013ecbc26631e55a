//! The standalone `unidesk-cli` binary: the same commands without the
//! server, with the exit statuses a shell relies on.

use std::process::{Command, Output};

fn cli(args: &[&str], token: Option<&str>) -> Output {
    let config = tempfile::tempdir().expect("a temporary directory");
    let mut c = Command::new(env!("CARGO_BIN_EXE_unidesk-cli"));
    c.args(args)
        .env("UNIDESK_CONFIG_DIR", config.path())
        .env_remove("UNIDESK_SERVER")
        .env_remove("UNIDESK_TOKEN");
    if let Some(t) = token {
        c.env("UNIDESK_TOKEN", t);
    }
    c.output().expect("unidesk-cli runs")
}

#[test]
fn usage_errors_exit_with_2_and_say_what_is_missing() {
    assert_eq!(
        cli(&["submit", "--cpus", "lots"], None).status.code(),
        Some(2)
    );
    let out = cli(&["whoami"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unidesk login"));
}

#[test]
fn an_unreachable_server_exits_with_4() {
    // Nothing listens on port 9 (discard) of 127.0.0.1 here.
    let out = cli(
        &["tasks", "--server", "http://127.0.0.1:9"],
        Some("a-token"),
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[test]
fn completions_cover_every_command_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = cli(&["completions", shell], None);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for command in ["submit", "logs", "artifacts", "objects"] {
            assert!(script.contains(command), "{shell} lacks {command}");
        }
    }
}
