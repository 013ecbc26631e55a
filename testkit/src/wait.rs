//! Waiting in tests without guessing: [`eventually`] polls a check until it
//! holds and names what it waited for when it gives up, [`stays`] watches a
//! check for a bounded window to show that something does *not* happen, and
//! [`free_port`] finds a port for a process that must be told one.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How long [`eventually`] and [`stays`] sleep between two checks.
const POLL: Duration = Duration::from_millis(50);

/// Polls `check` until it returns `Some`, and returns what it returned.
///
/// Use it wherever a test waits for another process or task to get
/// somewhere; a `bool` check reads `(cond).then_some(())`.
///
/// # Panics
/// When `timeout` passes first: the message names `what` and the time
/// waited, so a failed run says what never happened.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match try_eventually(timeout, check).await {
        Some(value) => value,
        None => panic!("gave up after {timeout:?} waiting for {what}"),
    }
}

/// Like [`eventually`], for callers that report the failure themselves
/// (a benchmark's `Result`): `None` when `timeout` passed first.
pub async fn try_eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Checks for `window` that `check` keeps holding: the bounded observation
/// behind "nothing happens" (no command sent, no state changed).
///
/// # Panics
/// As soon as `check` fails, naming `what` and when in the window.
pub async fn stays<F, Fut>(what: &str, window: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        assert!(
            check().await,
            "{what} stopped holding {:?} into a {window:?} watch",
            start.elapsed()
        );
        if start.elapsed() >= window {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago, for a
/// child process that must be given a port rather than a listener.
///
/// # Panics
/// When no socket can be bound at all (the machine has no loopback).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("binding 127.0.0.1:0 to find a free port: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn eventually_returns_what_the_check_found_once_it_holds() {
        let calls = AtomicU32::new(0);
        let found = eventually("the third call", Duration::from_secs(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            (n == 3).then_some(n)
        })
        .await;
        assert_eq!(found, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for a check that never holds")]
    async fn eventually_names_what_it_waited_for_when_it_gives_up() {
        eventually(
            "a check that never holds",
            Duration::from_millis(200),
            || async { None::<()> },
        )
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "the counter stays below two stopped holding")]
    async fn stays_fails_as_soon_as_the_check_breaks() {
        let calls = AtomicU32::new(0);
        stays(
            "the counter stays below two",
            Duration::from_secs(5),
            || async { calls.fetch_add(1, Ordering::SeqCst) < 2 },
        )
        .await;
    }

    #[test]
    fn a_free_port_can_be_bound() {
        let port = free_port();
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the free port");
    }
}
