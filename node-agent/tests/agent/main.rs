//! Tests of the node agent with real Docker, real git repositories and an
//! in-test WebSocket server. Docker must be running; every image a task uses
//! is built from the `unidesk-test-base:1` busybox image, which the tests
//! build themselves (nothing is pulled).

#![expect(
    clippy::unwrap_used,
    reason = "test helpers fail the test loudly on anything unexpected"
)]

mod connection;
mod containment;
mod depth;
mod executor;
mod links;
mod restart;
mod support;
mod users;
