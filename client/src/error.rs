//! What can go wrong talking to a UniDesk server, and the exit status each
//! failure leaves a shell with.

use std::process::ExitCode;

/// One problem the server named: `{"detail": "...", "field": "..."}` of its
/// error body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Problem {
    /// What is wrong, in words a person can act on.
    #[serde(default)]
    pub detail: String,
    /// The input it concerns, when one.
    #[serde(default)]
    pub field: Option<String>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.detail),
            None => f.write_str(&self.detail),
        }
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line or a setting is wrong; nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// The server cannot be reached (no connection, a timeout, or it kept
    /// answering that it is unavailable).
    #[error("cannot reach {server}: {detail}")]
    Unreachable {
        /// The server's address.
        server: String,
        /// What happened, with its causes.
        detail: String,
    },
    /// The server refused the request: its status and every problem it
    /// named.
    #[error("{}", refusal(*status, problems))]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The problems of the error body; empty when it had none.
        problems: Vec<Problem>,
    },
    /// A local file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// Anything else: an answer that makes no sense, a check that failed.
    #[error("{0}")]
    Other(String),
}

fn refusal(status: u16, problems: &[Problem]) -> String {
    let what = match status {
        401 => "not signed in or the token is not valid (run `unidesk login`)",
        403 => "forbidden",
        404 => "not found",
        409 => "conflict",
        422 => "refused",
        429 => "too many requests",
        s if s >= 500 => "the server failed",
        _ => "the request was refused",
    };
    if problems.is_empty() {
        format!("{what} (HTTP {status})")
    } else {
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        format!("{what} (HTTP {status}): {}", list.join("; "))
    }
}

/// The exit status of a command that succeeded.
pub const EXIT_OK: u8 = 0;
/// The task failed, or the server refused the request.
pub const EXIT_FAILED: u8 = 1;
/// The command line was wrong.
pub const EXIT_USAGE: u8 = 2;
/// Not found, forbidden, or not signed in.
pub const EXIT_NOT_FOUND: u8 = 3;
/// The server cannot be reached.
pub const EXIT_UNREACHABLE: u8 = 4;

impl Error {
    /// The exit status this failure means: 2 usage, 3 not found or
    /// forbidden (401, 403, 404), 4 unreachable (also a server that kept
    /// answering 502, 503 or 504), 1 otherwise.
    pub fn exit_status(&self) -> u8 {
        match self {
            Error::Usage(_) => EXIT_USAGE,
            Error::Unreachable { .. }
            | Error::Refused {
                status: 502..=504, ..
            } => EXIT_UNREACHABLE,
            Error::Refused {
                status: 401 | 403 | 404,
                ..
            } => EXIT_NOT_FOUND,
            _ => EXIT_FAILED,
        }
    }

    /// [`Error::exit_status`] as an [`ExitCode`].
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.exit_status())
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A transport error in words with its causes, never the URL (a presigned
/// URL is a credential while it lives).
pub(crate) fn transport(e: reqwest::Error) -> String {
    use std::error::Error as _;
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_repeat_each_field_and_map_to_exit_statuses() {
        let e = Error::Refused {
            status: 422,
            problems: vec![
                Problem {
                    detail: "must be a full commit id".into(),
                    field: Some("code_commit_id".into()),
                },
                Problem {
                    detail: "is required".into(),
                    field: None,
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            "refused (HTTP 422): code_commit_id: must be a full commit id; is required"
        );
        assert_eq!(e.exit_status(), EXIT_FAILED);
        for status in [401, 403, 404] {
            let e = Error::Refused {
                status,
                problems: vec![],
            };
            assert_eq!(e.exit_status(), EXIT_NOT_FOUND);
        }
        let e = Error::Unreachable {
            server: "http://x".into(),
            detail: "refused".into(),
        };
        assert_eq!(e.exit_status(), EXIT_UNREACHABLE);
        assert_eq!(Error::Usage("x".into()).exit_status(), EXIT_USAGE);
    }
}
