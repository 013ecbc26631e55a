//! A client of UniDesk's REST API and the user commands built on it.
//!
//! Usable as a library for scripts — [`api::Client`] for the API,
//! [`git`] to read what a checkout would run, [`transfer`] for resumable
//! uploads and downloads checked by SHA-256, [`follow`] to follow a task's
//! output or the timeline through dropped connections — and as the
//! command line that ships inside the `unidesk` binary and as the small
//! standalone `unidesk-cli`.
//!
//! It links none of the server's crates: no database, no Docker. The wire
//! types it reads are its own ([`types`]), lenient about fields it does
//! not know.

pub mod api;
pub mod cli;
pub mod config;
pub mod error;
pub mod follow;
pub mod git;
pub mod project_file;
pub mod transfer;
pub mod types;

pub use api::Client;
pub use error::{Error, Result};
