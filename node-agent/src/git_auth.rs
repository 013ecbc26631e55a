//! How git authenticates to a task's private repositories, and checks the
//! SSH hosts it talks to.
//!
//! A task names a project secret per repository ([`GitAuth::credential`]):
//! for `ssh://…` and `user@host:path` URLs an SSH private key (OpenSSH or
//! PEM), for `https://…` a token, or `user:token`. The value lives in this
//! process's memory only, for the fetch.
//!
//! An SSH host must show a key listed for it in the task's `known_hosts`
//! secret or the node's `--git-known-hosts` file (plain or hashed host
//! names, `[host]:port` for other ports): an unknown key, or a changed
//! one, fails the fetch saying which. HTTPS hosts are checked by TLS as
//! usual.
//!
//! Mirrors are kept apart by credential ([`GitAuth::identity`]): a task
//! reads from the cache only what its own credential fetched (or what
//! anonymous access fetched, for a task with none), so a commit fetched
//! with one project's key never reaches a task without it.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use base64::Engine;
use git2::cert::{Cert, SshHostKeyType};
use git2::{CertificateCheckStatus, Cred, CredentialType, RemoteCallbacks};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The credentials of one fetch.
#[derive(Clone, Default)]
pub struct GitAuth {
    /// The secret's value: a private key or a token.
    pub credential: Option<Zeroizing<String>>,
    /// `known_hosts` lines from the task's secret.
    pub known_hosts: Option<Zeroizing<String>>,
    /// The node's own `known_hosts` file.
    pub node_known_hosts: Option<PathBuf>,
}

impl std::fmt::Debug for GitAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitAuth")
            .field("credential", &self.credential.as_ref().map(|_| "***"))
            .field("known_hosts", &self.known_hosts.as_ref().map(|_| "…"))
            .field("node_known_hosts", &self.node_known_hosts)
            .finish()
    }
}

impl GitAuth {
    /// What keeps mirrors fetched with this credential apart from others:
    /// empty without one, else a hash of it (never the value).
    pub fn identity(&self) -> String {
        match &self.credential {
            None => String::new(),
            Some(c) => {
                let mut h = Sha256::new();
                h.update(b"unidesk-git-credential\0");
                h.update(c.as_bytes());
                hex::encode(&h.finalize()[..16])
            }
        }
    }
}

/// Whether `url` is reached over SSH: `ssh://…`, `git+ssh://…` or the
/// scp-like `user@host:path`.
pub fn is_ssh(url: &str) -> bool {
    if let Some((scheme, _)) = url.split_once("://") {
        return scheme == "ssh" || scheme == "git+ssh" || scheme == "ssh+git";
    }
    url.split_once(':')
        .is_some_and(|(host, _)| !host.is_empty() && !host.contains('/'))
}

/// The host and port of an SSH `url`.
fn ssh_host(url: &str) -> Option<(String, Option<u16>)> {
    let authority = match url.split_once("://") {
        Some((_, rest)) => rest.split('/').next()?,
        None => url.split_once(':')?.0,
    };
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match host_port.rsplit_once(':') {
        Some((host, port)) if !host.starts_with('[') || host.ends_with(']') => {
            Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()))
        }
        _ => Some((host_port.trim_matches(['[', ']']).to_owned(), None)),
    }
}

/// What went wrong while authenticating, kept by the callbacks so the
/// fetch's error can say it in words.
#[derive(Debug, Default)]
pub struct AuthFailure(pub(crate) RefCell<Option<String>>);

impl AuthFailure {
    fn set(&self, why: String) {
        self.0.borrow_mut().get_or_insert(why);
    }

    /// Why authenticating failed, if it did.
    pub fn take(&self) -> Option<String> {
        self.0.borrow_mut().take()
    }
}

/// The callbacks of a fetch of `url` with `auth`: credentials when the
/// server asks, and the SSH host key check.
pub fn callbacks<'a>(
    url: &'a str,
    auth: &'a GitAuth,
    failure: &'a AuthFailure,
) -> RemoteCallbacks<'a> {
    let mut callbacks = RemoteCallbacks::new();
    let mut asked = 0u32;
    callbacks.credentials(move |_url, user_from_url, allowed| {
        asked += 1;
        let Some(secret) = &auth.credential else {
            let why = "the repository asks for credentials; name a project secret in the task's git_credentials".to_owned();
            failure.set(why.clone());
            return Err(git2::Error::from_str(&why));
        };
        if asked > 3 {
            let why = "authentication refused: the server did not accept the task's credential".to_owned();
            failure.set(why.clone());
            return Err(git2::Error::from_str(&why));
        }
        let user = user_from_url.unwrap_or("git");
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(user);
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            if !secret.contains("PRIVATE KEY") {
                let why = "the task's credential for this SSH repository is not a private key".to_owned();
                failure.set(why.clone());
                return Err(git2::Error::from_str(&why));
            }
            return Cred::ssh_key_from_memory(user, None, secret, None);
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            let secret = secret.trim();
            let (name, token) = match secret.split_once(':') {
                Some((name, token)) if !name.is_empty() && !name.contains(char::is_whitespace) => {
                    (name, token)
                }
                _ => (user_from_url.unwrap_or("x-access-token"), secret),
            };
            return Cred::userpass_plaintext(name, token);
        }
        let why = format!("the server asks for a kind of credential the task does not have ({allowed:?})");
        failure.set(why.clone());
        Err(git2::Error::from_str(&why))
    });
    callbacks.certificate_check(move |cert, _host| {
        if !is_ssh(url) {
            return Ok(CertificateCheckStatus::CertificatePassthrough);
        }
        match check_host_key(url, cert, auth) {
            Ok(()) => Ok(CertificateCheckStatus::CertificateOk),
            Err(why) => {
                failure.set(why.clone());
                Err(git2::Error::from_str(&why))
            }
        }
    });
    callbacks
}

/// Checks the SSH host key `cert` of `url`'s host against the known hosts.
fn check_host_key(url: &str, cert: &Cert<'_>, auth: &GitAuth) -> Result<(), String> {
    let (host, port) = ssh_host(url).ok_or_else(|| format!("no host in {url}"))?;
    let shown = cert
        .as_hostkey()
        .and_then(|k| k.hostkey().map(|key| (key.to_vec(), k.hostkey_type())))
        .ok_or_else(|| format!("{host} showed no SSH host key"))?;
    let names = match port {
        Some(p) if p != 22 => vec![format!("[{host}]:{p}")],
        _ => vec![host.clone()],
    };
    let mut text = String::new();
    if let Some(lines) = &auth.known_hosts {
        text.push_str(lines);
        text.push('\n');
    }
    if let Some(file) = &auth.node_known_hosts {
        text.push_str(&read_known_hosts(file));
    }
    let listed: Vec<Vec<u8>> = text
        .lines()
        .filter_map(|line| known_key(line, &names))
        .collect();
    let kind = shown.1.map(key_type_name).unwrap_or("unknown");
    if listed.is_empty() {
        return Err(format!(
            "the SSH host key of {} ({kind}) is unknown: add it to the project secret named in git_credentials.known_hosts (ssh-keyscan prints it) or to the node's --git-known-hosts",
            names[0]
        ));
    }
    if listed.contains(&shown.0) {
        Ok(())
    } else {
        Err(format!(
            "the SSH host key of {} ({kind}) is not the one known for it: it changed, or someone is in between; check it before trusting it",
            names[0]
        ))
    }
}

fn read_known_hosts(file: &Path) -> String {
    match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot read the node's known hosts");
            String::new()
        }
    }
}

fn key_type_name(t: SshHostKeyType) -> &'static str {
    match t {
        SshHostKeyType::Rsa => "ssh-rsa",
        SshHostKeyType::Dss => "ssh-dss",
        SshHostKeyType::Ecdsa256 => "ecdsa-sha2-nistp256",
        SshHostKeyType::Ecdsa384 => "ecdsa-sha2-nistp384",
        SshHostKeyType::Ecdsa521 => "ecdsa-sha2-nistp521",
        SshHostKeyType::Ed255219 => "ssh-ed25519",
        _ => "unknown",
    }
}

/// The key of a `known_hosts` line that lists one of `names`. Markers
/// (`@revoked`, `@cert-authority`) and comments are skipped.
fn known_key(line: &str, names: &[String]) -> Option<Vec<u8>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let hosts = fields.next()?;
    let _kind = fields.next()?;
    let key = fields.next()?;
    let listed = hosts.split(',').any(|h| {
        if let Some(hashed) = h.strip_prefix("|1|") {
            names.iter().any(|n| hashed_matches(hashed, n))
        } else {
            names.iter().any(|n| n == h)
        }
    });
    if !listed {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(key).ok()
}

/// Whether a hashed host (`salt|hash`, both base64, HMAC-SHA1) is `name`.
fn hashed_matches(hashed: &str, name: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (b64.decode(salt), b64.decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_urls_are_told_from_others_with_their_host_and_port() {
        assert!(is_ssh("git@github.com:org/repo.git"));
        assert!(is_ssh("ssh://git@host:2222/srv/repo.git"));
        assert!(!is_ssh("https://host/repo.git"));
        assert!(!is_ssh("file:///tmp/repo"));
        assert!(!is_ssh("/tmp/repo"));
        assert_eq!(
            ssh_host("ssh://git@host:2222/srv/repo.git"),
            Some(("host".into(), Some(2222)))
        );
        assert_eq!(
            ssh_host("git@github.com:org/repo.git"),
            Some(("github.com".into(), None))
        );
        assert_eq!(
            ssh_host("ssh://[::1]:2022/r.git"),
            Some(("::1".into(), Some(2022)))
        );
    }

    #[test]
    fn known_hosts_lines_match_plain_bracketed_and_hashed_names() {
        let key = base64::engine::general_purpose::STANDARD.encode(b"the key");
        let plain = format!("host.example,10.0.0.1 ssh-ed25519 {key}");
        assert_eq!(
            known_key(&plain, &["host.example".into()]),
            Some(b"the key".to_vec())
        );
        assert_eq!(known_key(&plain, &["other".into()]), None);
        let port = format!("[host.example]:2222 ssh-ed25519 {key} comment");
        assert!(known_key(&port, &["[host.example]:2222".into()]).is_some());
        assert!(known_key(&port, &["host.example".into()]).is_none());
        // ssh-keygen -H of "host.example" with this salt.
        let salt = b"0123456789abcdefghij";
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(salt).unwrap();
        mac.update(b"host.example");
        let b64 = base64::engine::general_purpose::STANDARD;
        let hashed = format!(
            "|1|{}|{} ssh-ed25519 {key}",
            b64.encode(salt),
            b64.encode(mac.finalize().into_bytes())
        );
        assert!(known_key(&hashed, &["host.example".into()]).is_some());
        assert!(known_key(&hashed, &["host.other".into()]).is_none());
        for skipped in [
            "# comment",
            "@revoked host.example ssh-ed25519 AAAA",
            "",
            "garbage",
        ] {
            assert!(known_key(skipped, &["host.example".into()]).is_none());
        }
    }

    #[test]
    fn an_identity_is_a_hash_never_the_value() {
        let auth = GitAuth {
            credential: Some(Zeroizing::new("ghp_token-value".into())),
            ..GitAuth::default()
        };
        assert_eq!(GitAuth::default().identity(), "");
        assert_eq!(auth.identity().len(), 32);
        assert!(!auth.identity().contains("token"));
        assert!(!format!("{auth:?}").contains("ghp_"));
    }
}
