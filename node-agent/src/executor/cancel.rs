//! Stopping a running attempt: a [`Canceller`] kept by whoever may cancel,
//! and the attempt's [`CancelSignal`], which carries the grace period.

use std::time::Duration;

use tokio::sync::watch;

/// Asks a running attempt to stop.
#[derive(Debug)]
pub struct Canceller(watch::Sender<Option<Duration>>);

/// The attempt's side of a [`Canceller`].
#[derive(Debug, Clone)]
pub struct CancelSignal(watch::Receiver<Option<Duration>>);

/// A connected [`Canceller`] and [`CancelSignal`].
pub fn cancel_pair() -> (Canceller, CancelSignal) {
    let (tx, rx) = watch::channel(None);
    (Canceller(tx), CancelSignal(rx))
}

impl Canceller {
    /// Stops the attempt, giving its container `grace` between SIGTERM and
    /// SIGKILL.
    pub fn cancel(&self, grace: Duration) {
        self.0.send_replace(Some(grace));
    }
}

impl CancelSignal {
    /// Whether the attempt has been cancelled already.
    pub(super) fn is_cancelled(&self) -> bool {
        self.0.borrow().is_some()
    }

    /// Resolves with the grace period once the attempt is cancelled; never
    /// resolves if the [`Canceller`] is dropped without cancelling.
    pub async fn cancelled(&mut self) -> Duration {
        let grace = match self.0.wait_for(Option::is_some).await {
            Ok(grace) => *grace,
            Err(_) => None,
        };
        match grace {
            Some(grace) => grace,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancel_carries_its_grace_period() {
        let (canceller, mut signal) = cancel_pair();
        canceller.cancel(Duration::from_secs(7));
        assert_eq!(signal.cancelled().await, Duration::from_secs(7));
    }
}
