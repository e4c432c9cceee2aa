//! A token bucket: `rate` tokens a second, at most `burst` saved up.

use tokio::time::Instant;

/// Limits how fast one session (or client address) may do something.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket. A `rate` of 0 disables the limit.
    pub fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            updated: Instant::now(),
        }
    }

    /// Whether the bucket has filled up again: forgetting it and starting a
    /// fresh one would change nothing.
    pub fn is_full(&self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let earned = self.updated.elapsed().as_secs_f64() * self.rate;
        self.tokens + earned >= self.burst
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let earned = now.duration_since(self.updated).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn bursts_then_refills_at_rate() {
        let mut b = TokenBucket::new(10, 20);
        for _ in 0..20 {
            assert!(b.try_take());
        }
        assert!(!b.try_take());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.try_take());
        assert!(!b.try_take());
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..20 {
            assert!(b.try_take());
        }
        assert!(!b.try_take());
    }

    #[tokio::test(start_paused = true)]
    async fn is_full_once_refilled() {
        let mut b = TokenBucket::new(5, 20);
        assert!(b.is_full());
        assert!(b.try_take());
        assert!(!b.is_full());
        tokio::time::advance(Duration::from_millis(199)).await;
        assert!(!b.is_full());
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(b.is_full());
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let mut b = TokenBucket::new(0, 20);
        assert!((0..10_000).all(|_| b.try_take()));
    }
}
