//! Retry backoff as a pure function of the number of failed tries, so it can be tested
//! without a clock. Exponential from `base`, capped at `max`; deterministic (no jitter) so
//! that schedules survive restarts and tests are exact.

use std::time::Duration;

/// A backoff policy.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// Upper bound on any delay.
    pub max: Duration,
}

impl Backoff {
    /// The policy for joins and deliveries: 1 s doubling up to 10 min.
    pub const DEFAULT: Backoff = Backoff { base: Duration::from_secs(1), max: Duration::from_secs(600) };

    /// How long to wait after `failures` consecutive failures (0 means no wait).
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(failures.saturating_sub(1).min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// Keep the earlier of `next` and `due` in `next` (workers track their next wake-up).
pub fn earliest(next: &mut Option<u64>, due: u64) {
    *next = Some(next.map_or(due, |d| d.min(due)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_keeps_the_sooner_wake_up() {
        let mut next = None;
        earliest(&mut next, 50);
        earliest(&mut next, 70);
        earliest(&mut next, 20);
        assert_eq!(next, Some(20));
    }

    #[test]
    fn doubles_and_caps() {
        let b = Backoff { base: Duration::from_secs(2), max: Duration::from_secs(60) };
        assert_eq!(b.delay(0), Duration::ZERO);
        assert_eq!(b.delay(1), Duration::from_secs(2));
        assert_eq!(b.delay(2), Duration::from_secs(4));
        assert_eq!(b.delay(5), Duration::from_secs(32));
        assert_eq!(b.delay(6), Duration::from_secs(60));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
    }
}
