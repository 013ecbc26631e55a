//! Reconnect delays: exponential backoff with full jitter.
//!
//! The n-th retry sleeps a uniformly random time in
//! `[0, min(max, min_delay · 2ⁿ)]`, so agents that lost a restarted server
//! together do not come back together. Only a session that lived
//! [`SETTLED_AFTER`] past its `welcome` resets the count: a server (or
//! something in between) that welcomes and then drops the session at once
//! sees the agent back off as if the connection had failed, not a storm of
//! reconnects.

use std::time::Duration;

use rand::Rng;

/// How long a session must have lived after its `welcome` for the next
/// reconnect to start over from the shortest delay.
pub const SETTLED_AFTER: Duration = Duration::from_secs(30);

/// The state of the backoff between connection attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Backoff starting at `min` and never above `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The longest the next delay can be: `min(max, min · 2ⁿ)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.failures);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The next delay, drawn uniformly from `[0, ceiling]`, and one more
    /// failure counted.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.gen_range(0..=millis))
    }

    /// Starts over from `min`, after a good session.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// A session ended that was welcomed `lived` before (`None`: never
    /// welcomed). It starts the backoff over only when it lived at least
    /// [`SETTLED_AFTER`]; a shorter one counts as a failure like any other
    /// when [`Backoff::next_delay`] is drawn.
    pub fn session_ended(&mut self, lived: Option<Duration>) {
        if lived.is_some_and(|l| l >= SETTLED_AFTER) {
            self.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_ceiling_doubles_up_to_the_maximum() {
        let mut b = Backoff::new(ms(1000), ms(60_000));
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = Vec::new();
        for _ in 0..9 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay(&mut rng);
        }
        assert_eq!(
            ceilings,
            vec![1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000, 60_000]
        );
        for _ in 0..100 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.ceiling(), ms(60_000), "no overflow after many failures");
    }

    #[test]
    fn delays_are_spread_over_the_whole_range() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut delays = Vec::new();
        for _ in 0..2000 {
            let mut b = Backoff::new(ms(1000), ms(60_000));
            for _ in 0..3 {
                b.next_delay(&mut rng);
            }
            delays.push(b.next_delay(&mut rng));
        }
        assert!(delays.iter().all(|d| *d <= ms(8000)));
        let low = delays.iter().filter(|d| **d < ms(2000)).count();
        let high = delays.iter().filter(|d| **d > ms(6000)).count();
        // Full jitter: each quarter of [0, 8 s] gets about a quarter.
        assert!((350..650).contains(&low), "low {low}");
        assert!((350..650).contains(&high), "high {high}");
    }

    #[test]
    fn only_a_session_that_settled_starts_the_backoff_over() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut b = Backoff::new(ms(100), ms(10_000));
        // Welcomed, then dropped at once, again and again: the delay keeps
        // growing as if the connections had failed.
        for _ in 0..4 {
            b.session_ended(Some(ms(50)));
            b.next_delay(&mut rng);
        }
        assert_eq!(b.ceiling(), ms(1600));
        b.session_ended(None);
        assert_eq!(b.ceiling(), ms(1600));
        b.session_ended(Some(SETTLED_AFTER - ms(1)));
        assert_eq!(b.ceiling(), ms(1600));
        b.session_ended(Some(SETTLED_AFTER));
        assert_eq!(b.ceiling(), ms(100));
    }

    #[test]
    fn a_reset_starts_over() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Backoff::new(ms(100), ms(10_000));
        for _ in 0..5 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.ceiling(), ms(3200));
        b.reset();
        assert_eq!(b.ceiling(), ms(100));
        assert!(b.next_delay(&mut rng) <= ms(100));
    }
}
