//! Names of users, projects and nodes: 1-63 characters of lower-case
//! letters, digits, '.', '_' or '-', starting with a letter or digit.
//!
//! A [`Name`] is checked once, where it is parsed, and is valid wherever it
//! is held. It is written as a plain JSON string and checked again when
//! read, so stored events keep their shape and a bad name cannot slip in
//! through a document.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest name, in bytes (one DNS label).
pub const MAX_NAME_BYTES: usize = 63;

/// Why a string is not a name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be 1-63 characters of lower-case letters, digits, '.', '_' or '-', starting with a letter or digit")]
pub struct NameError;

/// A valid name of a user, project or node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// Checks `s` and keeps it as a name.
    ///
    /// # Errors
    /// [`NameError`] when `s` does not fit.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        s.to_owned().try_into()
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `s` fits the rules of a name.
fn fits(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_BYTES
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl TryFrom<String> for Name {
    type Error = NameError;

    fn try_from(s: String) -> Result<Self, NameError> {
        if fits(&s) {
            Ok(Name(s))
        } else {
            Err(NameError)
        }
    }
}

impl FromStr for Name {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        Name::parse(s)
    }
}

impl From<Name> for String {
    fn from(name: Name) -> String {
        name.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

/// Checks a name for a user, node or project; see [`Name`] for the rules.
///
/// # Errors
/// A reason when the name does not fit.
pub fn validate_name(s: &str) -> Result<(), String> {
    if fits(s) {
        Ok(())
    } else {
        Err(NameError.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lower_case_words() {
        assert!(validate_name("gpu-3").is_ok());
        assert!(validate_name("Alice").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn a_name_is_a_plain_string_in_json_and_is_checked_when_read() {
        let name = Name::parse("gpu-3").unwrap();
        assert_eq!(serde_json::to_value(&name).unwrap(), "gpu-3");
        assert_eq!(
            serde_json::from_value::<Name>("gpu-3".into()).unwrap(),
            name
        );
        assert!(serde_json::from_value::<Name>("Gpu 3".into()).is_err());
        assert_eq!("gpu-3".parse::<Name>().unwrap().to_string(), "gpu-3");
        assert_eq!(Name::parse("-x"), Err(NameError));
    }
}
