//! The JSON shapes the API reads and writes, with their OpenAPI schemas.
//!
//! They are separate from the domain's types on purpose: the domain may
//! change its state's layout freely, the API's shapes change only by
//! addition. Each response shape is built from the domain state it shows,
//! and never carries a secret or a token fingerprint.

pub mod event;
pub mod health;
pub mod host_ssh;
pub mod node;
pub mod object;
pub mod project;
pub mod task;
pub mod timeline;
pub mod user;
