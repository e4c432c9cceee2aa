//! At most one `rate-limited` error a second per connection.
//!
//! A client that pastes 10,000 lines would otherwise get 9,980 identical
//! errors back, and reading them would cost it (and the server) far more than
//! the lines themselves. The first refusal of a quiet spell is shown at once;
//! the ones that follow within the next second are counted and reported as one
//! error when the second is over ("312 more refused ..."), so the client still
//! learns exactly how many lines were lost.

use std::time::Duration;

use tokio::time::Instant;

use crate::core::{ErrorCode, Event, EventBody};

/// The shortest time between two `rate-limited` errors on one connection.
pub const NOTICE_INTERVAL: Duration = Duration::from_secs(1);

/// One connection's record of the rate-limited errors it has shown and held back.
#[derive(Debug, Default)]
pub struct RateNotices {
    /// When the last `rate-limited` error went out.
    shown: Option<Instant>,
    /// Refusals held back since then.
    held: u64,
    /// The last held-back refusal's explanation, repeated in the summary.
    reason: String,
}

impl RateNotices {
    /// Passes `event` through, unless it is a `rate-limited` error that comes
    /// too soon after the last one: that one is counted instead.
    pub fn filter(&mut self, event: Event, now: Instant) -> Option<Event> {
        let EventBody::Error {
            code: ErrorCode::RateLimited,
            message,
        } = event.body()
        else {
            return Some(event);
        };
        match self.shown {
            Some(shown) if now < shown + NOTICE_INTERVAL => {
                self.held += 1;
                self.reason.clone_from(message);
                None
            }
            _ => {
                self.shown = Some(now);
                Some(event)
            }
        }
    }

    /// When the summary of held-back refusals is due, if any are held.
    pub fn due(&self) -> Option<Instant> {
        match (self.held, self.shown) {
            (0, _) | (_, None) => None,
            (_, Some(shown)) => Some(shown + NOTICE_INTERVAL),
        }
    }

    /// The one error that reports every refusal held back so far.
    pub fn summary(&mut self, now: Instant) -> Option<Event> {
        if self.held == 0 {
            return None;
        }
        let held = std::mem::take(&mut self.held);
        self.shown = Some(now);
        Some(Event::error(
            ErrorCode::RateLimited,
            format!("{held} more refused; {}", self.reason),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited() -> Event {
        Event::error(ErrorCode::RateLimited, "slow down")
    }

    fn message_of(event: &Event) -> String {
        match event.body() {
            EventBody::Error { message, .. } => message.clone(),
            _ => panic!("not an error"),
        }
    }

    #[test]
    fn the_first_refusal_shows_then_the_rest_are_counted_once_a_second() {
        let start = Instant::now();
        let mut notices = RateNotices::default();
        assert!(notices.filter(limited(), start).is_some());
        assert_eq!(notices.due(), None);
        for _ in 0..500 {
            assert!(notices.filter(limited(), start).is_none());
        }
        assert_eq!(notices.due(), Some(start + NOTICE_INTERVAL));
        let later = start + NOTICE_INTERVAL;
        let summary = notices.summary(later).expect("a summary");
        assert_eq!(message_of(&summary), "500 more refused; slow down");
        assert_eq!(notices.due(), None);
        // Still within a second of the summary: held again.
        assert!(notices.filter(limited(), later).is_none());
        assert_eq!(notices.due(), Some(later + NOTICE_INTERVAL));
    }

    #[test]
    fn other_events_pass_and_a_quiet_second_shows_the_next_refusal_at_once() {
        let start = Instant::now();
        let mut notices = RateNotices::default();
        let other = Event::error(ErrorCode::TooLong, "x");
        assert!(notices.filter(other.clone(), start).is_some());
        assert!(notices.filter(limited(), start).is_some());
        assert!(notices.filter(other, start).is_some());
        assert!(notices.filter(limited(), start + NOTICE_INTERVAL).is_some());
        assert!(notices.summary(start + NOTICE_INTERVAL).is_none());
    }
}
