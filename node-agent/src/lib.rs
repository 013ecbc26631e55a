//! The UniDesk node agent as a library.
//!
//! The binary `unidesk-agent` is a thin shell around these modules: it parses
//! flags, then hands a [`connection::Config`] and an [`executor::Context`] to
//! [`connection::Agent`]. Keeping everything else here lets the tests drive
//! the executor against real Docker and git, and the connection against an
//! in-process WebSocket server, without a UniDesk server.
//!
//! The agent links `protocol` and nothing else of the project.

pub mod beneath;
pub mod connection;
pub mod dir_lock;
pub mod disk;
pub mod docker;
pub mod executor;
pub mod git;
pub mod git_auth;
pub mod host_ssh;
pub mod keyed_lock;
pub mod logs;
pub mod prepared;
pub mod resources;
pub mod supervisor;
pub mod transfer;
