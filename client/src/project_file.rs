//! `.unidesk.toml` at the top of a repository: the defaults of `unidesk
//! submit` for that repository, so the everyday command is `unidesk submit
//! -- python train.py`. Flags win over the environment (`UNIDESK_PROJECT`,
//! `UNIDESK_ENV`, `UNIDESK_DOCKERFILE`), which wins over this file.
//!
//! ```toml
//! project = "vision"              # a name or an id
//! env = "git@git.lab:vision/env.git@v3"   # DIR_OR_URL[@COMMIT]; else this repository
//! dockerfile = "cuda12/Dockerfile"
//! cpus = 8
//! memory = "32G"
//! gpus = 1
//! timeout = "24h"
//! retries = 2
//! [labels]
//! gpu = "a100"
//! [secret_env]
//! WANDB_API_KEY = "wandb"
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The file's name.
pub const FILE: &str = ".unidesk.toml";

/// What `.unidesk.toml` may hold; unknown keys are refused, so a typo
/// does not pass silently.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    /// The project, by name or id.
    pub project: Option<String>,
    /// The env repository: a directory or URL, with an optional `@COMMIT`.
    pub env: Option<String>,
    /// The Dockerfile's path in the env repository.
    pub dockerfile: Option<String>,
    /// The git remote whose URL nodes fetch the code from.
    pub remote: Option<String>,
    /// CPU cores.
    pub cpus: Option<f64>,
    /// Memory, such as `32G` or `512M` (a bare number is MiB).
    pub memory: Option<toml::Value>,
    /// Whole GPUs.
    pub gpus: Option<i64>,
    /// Time limit of one attempt, such as `24h` or `90m`.
    pub timeout: Option<toml::Value>,
    /// Retries after a lost node.
    pub retries: Option<i64>,
    /// Scheduling priority, -1000 to 1000.
    pub priority: Option<i64>,
    /// `none` to run without network.
    pub network: Option<String>,
    /// Node labels the task needs.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Environment variables of the task.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// Environment variables set from project secrets: variable = secret.
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
    /// Inputs: workspace path = object name.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Outputs: name = workspace path.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
}

impl ProjectFile {
    /// The file at the top of `root`; empty when there is none.
    ///
    /// # Errors
    /// [`Error::Usage`] naming the file and the bad key.
    pub fn load(root: &Path) -> Result<ProjectFile> {
        let path = root.join(FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| Error::Usage(format!("{}: {}", path.display(), e.message()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ProjectFile::default()),
            Err(e) => Err(Error::Io(format!("{}: {e}", path.display()))),
        }
    }
}

/// Memory as MiB from `32G`, `512M`, `1.5T`, `64GiB` or a bare number of
/// MiB.
///
/// # Errors
/// A reason for anything else.
pub fn parse_memory(s: &str) -> std::result::Result<i64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &lower[digits.len()..];
    let n: f64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("expected a size such as 32G or 512M, got {s:?}"))?;
    let mib = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" | "m" => n,
        "k" => n / 1024.0,
        "g" => n * 1024.0,
        "t" => n * 1024.0 * 1024.0,
        _ => return Err(format!("unknown unit in {s:?}: use K, M, G or T")),
    };
    if !(mib.is_finite() && mib >= 1.0) {
        return Err(format!("{s:?} is less than 1 MiB"));
    }
    Ok(mib.ceil() as i64)
}

/// Seconds from `24h`, `90m`, `30s`, `2d`, `1h30m` or a bare number of
/// seconds.
///
/// # Errors
/// A reason for anything else.
pub fn parse_duration(s: &str) -> std::result::Result<i64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<i64>() {
        return Ok(n);
    }
    let bad = || format!("expected a duration such as 24h, 90m or 30s, got {s:?}");
    let mut total: i64 = 0;
    let mut number = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: i64 = number.parse().map_err(|_| bad())?;
        number.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        total = total
            .checked_add(n.checked_mul(unit).ok_or_else(bad)?)
            .ok_or_else(bad)?;
    }
    if !number.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

/// A `toml::Value` of a size or duration as text (`32G`, or `32768`).
pub fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_as_people_write_them() {
        assert_eq!(parse_memory("32G"), Ok(32768));
        assert_eq!(parse_memory("512m"), Ok(512));
        assert_eq!(parse_memory("64GiB"), Ok(65536));
        assert_eq!(parse_memory("2048"), Ok(2048));
        assert!(parse_memory("lots").is_err());
        assert_eq!(parse_duration("24h"), Ok(86400));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("45"), Ok(45));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join(FILE), "projekt = \"x\"\n").expect("written");
        let e = ProjectFile::load(dir.path()).expect_err("a typo is refused");
        assert!(e.to_string().contains("projekt"), "{e}");
    }
}
