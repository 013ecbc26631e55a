//! Where the client keeps the server's address and the user's token:
//! `$XDG_CONFIG_HOME/unidesk/config.toml` (or `~/.config/unidesk/…`), mode
//! 0600 in a 0700 directory, replaced atomically. `UNIDESK_SERVER`,
//! `UNIDESK_TOKEN` and `UNIDESK_CA_FILE` override what it holds; a flag
//! overrides both.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What `config.toml` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The server's address, such as `https://unidesk.example.org`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// A user token (`POST /api/v1/users/{name}/tokens` issues them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A PEM file of the private CA the server's certificate is signed
    /// by, trusted besides the public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// The directory of the client's configuration: `$UNIDESK_CONFIG_DIR`,
/// else `$XDG_CONFIG_HOME/unidesk`, else `~/.config/unidesk`.
///
/// # Errors
/// [`Error::Usage`] when none of these can be found.
pub fn dir() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("UNIDESK_CONFIG_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(xdg) = var("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(xdg).join("unidesk"));
    }
    match var("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".config").join("unidesk")),
        None => Err(Error::Usage(
            "no configuration directory: set HOME, XDG_CONFIG_HOME or UNIDESK_CONFIG_DIR".into(),
        )),
    }
}

/// The configuration file's path.
///
/// # Errors
/// As [`dir`].
pub fn path() -> Result<PathBuf> {
    Ok(dir()?.join("config.toml"))
}

impl Config {
    /// The configuration at `path`; empty when the file does not exist.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be read, [`Error::Usage`] when it is
    /// not valid.
    pub fn load(path: &Path) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(Error::Io(format!("reading {}: {e}", path.display()))),
        };
        toml::from_str(&text).map_err(|e| {
            Error::Usage(format!(
                "{} is not a valid configuration: {}",
                path.display(),
                e.message()
            ))
        })
    }

    /// Writes the configuration to `path` atomically (a temporary file in
    /// the same directory, synced, then renamed over it), readable by its
    /// owner only; the directory is made with mode 0700 when missing.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io =
            |what: &str, e: std::io::Error| Error::Io(format!("{what} {}: {e}", path.display()));
        let text = toml::to_string(self).map_err(|e| Error::Other(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        create_private_dir(dir).map_err(|e| io("creating the directory of", e))?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("config"),
            std::process::id()
        ));
        let result = (|| {
            let mut file = private_file(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("writing", e));
        }
        Ok(())
    }
}

/// Creates `dir` and its parents, the last with mode 0700.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// A new file at `path` (replaced if there) that only its owner can read.
pub(crate) fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options.open(path)?;
    #[cfg(unix)]
    {
        // An existing file keeps its mode through `open`: narrow it.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Where the server is and how to sign in, after flags, the environment
/// and the configuration file were weighed (in that order).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The server's address, without a trailing `/`.
    pub server: String,
    /// The token, when there is one.
    pub token: Option<String>,
    /// The private CA's PEM file, when one.
    pub ca_file: Option<PathBuf>,
}

impl Settings {
    /// Weighs `flags` (a server, a CA file), the environment and the
    /// configuration file at `path`.
    ///
    /// # Errors
    /// [`Error::Usage`] when no server is known anywhere or the file is
    /// not valid.
    pub fn resolve(path: &Path, server: Option<&str>, ca_file: Option<&Path>) -> Result<Settings> {
        let config = Config::load(path)?;
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let server = server
            .map(str::to_string)
            .or_else(|| env("UNIDESK_SERVER"))
            .or(config.server)
            .ok_or_else(|| {
                Error::Usage(
                    "no server: run `unidesk login --server URL`, or set UNIDESK_SERVER".into(),
                )
            })?;
        let token = env("UNIDESK_TOKEN").or(config.token);
        let ca_file = ca_file
            .map(Path::to_path_buf)
            .or_else(|| env("UNIDESK_CA_FILE").map(PathBuf::from))
            .or(config.ca_file);
        Ok(Settings {
            server: normalise_server(&server)?,
            token: token.map(|t| t.trim().to_string()),
            ca_file,
        })
    }
}

/// A server address as given (`https://host`, `host:8080`): with a
/// scheme, without a trailing `/` or the API's path.
///
/// # Errors
/// [`Error::Usage`] for an address that is not `http(s)://host[:port]`.
pub fn normalise_server(server: &str) -> Result<String> {
    let mut s = server.trim().trim_end_matches('/').to_string();
    if !s.contains("://") {
        s = format!("https://{s}");
    }
    if let Some(stripped) = s.strip_suffix("/api/v1") {
        s = stripped.to_string();
    }
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| {
            Error::Usage(format!(
                "the server address must start with https:// or http://, got {server:?}"
            ))
        })?;
    if rest.is_empty() || rest.contains(['@', '?', '#', ' ']) {
        return Err(Error::Usage(format!(
            "the server address must be http(s)://host[:port][/path], got {server:?}"
        )));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_written_for_its_owner_only_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unidesk").join("config.toml");
        let config = Config {
            server: Some("https://u.example".into()),
            token: Some("secret".into()),
            ca_file: None,
        };
        config.save(&path).unwrap();
        config.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), config);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let mode = std::fs::metadata(path.parent().unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o700);
        }
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "no temporary file is left"
        );
    }

    #[test]
    fn server_addresses_are_normalised_and_bad_ones_refused() {
        assert_eq!(normalise_server("u.example/").unwrap(), "https://u.example");
        assert_eq!(
            normalise_server("http://127.0.0.1:8080/api/v1").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(normalise_server("ftp://x").is_err());
        assert!(normalise_server("https://user:pw@x").is_err());
    }
}
