//! A real OpenSSH `sshd` started by a test on a free port of 127.0.0.1.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testkit::{eventually, free_port};

/// Runs `program` with `args`; its standard output, trimmed.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program}: {e} (install openssh-server and openssh-client: ops/test.sh does)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A real `sshd` on 127.0.0.1 that lets the current user in with one key;
/// stopped when dropped.
pub struct Sshd {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The user it lets in.
    pub user: String,
    /// The client's private key.
    pub client_key: PathBuf,
    /// Its host key's public half, as `ssh-ed25519 AAAA…`.
    pub host_key: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sshd {
    /// An `sshd` keeping its keys and configuration in `dir`; its one
    /// client key logs in with `key_options` before it in
    /// `authorized_keys` (such as `restrict,command="…"`), or none.
    pub async fn start(dir: &Path, key_options: &str) -> Sshd {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.exists(),
            "/usr/sbin/sshd is missing: install openssh-server (ops/test.sh does)"
        );
        let key = |name: &str| {
            let path = dir.join(name);
            run(
                "ssh-keygen",
                &[
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-f",
                    path.to_str().unwrap(),
                ],
            );
            path
        };
        let host_key = key("host_key");
        let client_key = key("client_key");
        let public = std::fs::read_to_string(dir.join("client_key.pub")).unwrap();
        let line = if key_options.is_empty() {
            public
        } else {
            format!("{key_options} {public}")
        };
        std::fs::write(dir.join("authorized_keys"), line).unwrap();
        // sshd insists on its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let user = run("id", &["-un"]);
        let port = free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\n\
                 ListenAddress 127.0.0.1\n\
                 HostKey {host_key}\n\
                 AuthorizedKeysFile {keys}\n\
                 PidFile {pid}\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\n\
                 AllowUsers {user}\n",
                host_key = host_key.display(),
                keys = dir.join("authorized_keys").display(),
                pid = dir.join("sshd.pid").display(),
            ),
        )
        .unwrap();
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let host_key_line = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
        let sshd = Sshd {
            child,
            port,
            user,
            client_key,
            host_key: host_key_line
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" "),
        };
        eventually(
            "sshd to listen on its port",
            Duration::from_secs(20),
            || async { TcpStream::connect(("127.0.0.1", port)).ok().map(drop) },
        )
        .await;
        sshd
    }

    /// `user@127.0.0.1:port`.
    pub fn target(&self) -> String {
        format!("{}@127.0.0.1:{}", self.user, self.port)
    }
}
