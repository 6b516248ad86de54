//! Backoff for restarts and image pulls, as the kubelet's: 10 s doubling to 5 min; a
//! container that ran for 10 min starts over.

use std::time::Duration;

pub const INITIAL: Duration = Duration::from_secs(10);
pub const MAX: Duration = Duration::from_secs(300);
pub const RESET_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The delay before the next attempt, after a failure of something that ran for `ran`.
    pub fn next(&mut self, ran: Duration) -> Duration {
        if ran >= RESET_AFTER {
            self.failures = 0;
        }
        let d = INITIAL.saturating_mul(1 << self.failures.min(10)).min(MAX);
        self.failures += 1;
        d
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_resets() {
        let mut b = Backoff::default();
        let quick = Duration::from_secs(1);
        let seq: Vec<u64> = (0..7).map(|_| b.next(quick).as_secs()).collect();
        assert_eq!(seq, vec![10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(b.next(Duration::from_secs(601)).as_secs(), 10);
    }
}
