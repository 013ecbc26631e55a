//! The User aggregate: a person (or program) who calls the API, and their
//! tokens.
//!
//! A user's aggregate id is their name, so names are unique by construction.
//! Tokens are stored only as the SHA-256 of their secret; the secret is shown
//! once when issued.
//!
//! Split as the Task's is: [`UserCommand`] and the decisions in `command`,
//! [`UserEvent`] in `event`, [`User`] with its [`Token`]s and how events
//! change them in `state`, [`UserError`] in `error`.

mod command;
mod error;
mod event;
mod state;

pub use command::UserCommand;
pub use error::UserError;
pub use event::UserEvent;
pub use state::{Token, User};

#[cfg(test)]
mod tests;
