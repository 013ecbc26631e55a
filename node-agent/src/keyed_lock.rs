//! One asynchronous lock per key (a git mirror, an image tag).
//!
//! Work on different keys runs in parallel; work on the same key takes turns,
//! so two tasks fetching into one mirror, or building one tag, never race.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedMutexGuard;

/// A set of named locks, created on first use.
///
/// The map is behind a `std::sync::Mutex`, not a Tokio one: it is held only
/// to look up or insert an entry, never across an `.await`.
#[derive(Debug, Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// Waits for the lock of `key` and returns its guard, which can be moved
    /// into a blocking task so the lock lives as long as the work does.
    pub async fn lock(&self, key: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(locks.entry(key.to_owned()).or_default())
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_same_key_takes_turns_and_other_keys_do_not_wait() {
        let locks = KeyedLocks::default();
        let held = locks.lock("a").await;
        let other = tokio::time::timeout(Duration::from_millis(100), locks.lock("b")).await;
        assert!(other.is_ok(), "another key must not wait");
        let same = tokio::time::timeout(Duration::from_millis(100), locks.lock("a")).await;
        assert!(same.is_err(), "the same key must wait");
        drop(held);
        let same = tokio::time::timeout(Duration::from_millis(100), locks.lock("a")).await;
        assert!(same.is_ok());
    }
}
