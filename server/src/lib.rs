//! The UniDesk server: its roles and admin commands, used by the `unidesk`
//! binary and by the end-to-end tests.

pub mod cli;
pub mod dev;
pub mod janitor;
pub mod objects;
pub mod objects_server;
pub mod replay;
pub mod roles;
pub mod scheduler;
pub mod status;
