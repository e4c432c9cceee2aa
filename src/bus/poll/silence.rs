//! Which instances have gone silent, judged without comparing clocks.
//!
//! Every heartbeat an instance writes a new value into its row of
//! `instances` (its wall-clock time in milliseconds, so an operator can read
//! it, and never less than one more than before). The others do not compare
//! that time with their own: a clock running ahead would then reap instances
//! that are alive and give their users' nicks away, and one running behind
//! would keep a dead instance's users for as long as it is behind. Instead
//! each instance watches the values change, with its own monotonic clock: if
//! two looks more than a lease apart find the same value, the instance did
//! not renew in between, whatever anyone's clock says. (Kubernetes' leader
//! election judges its lease records the same way.)
//!
//! What two looks prove is bounded by when they were made: the first look's
//! answer came back at some moment, the second was asked at a later one, and
//! the row did not change between them. So a value counts from when the look
//! that first found it was *answered*, and is judged when a later look is
//! *asked*: a slow database can only make a verdict later, never earlier.
//!
//! The looks must also have been made all along. After a gap of more than
//! half a lease between two looks (this instance was stalled, or could not reach
//! the database), what it saw before the gap proves nothing about the gap:
//! it is forgotten, and every instance is given a whole lease from the next
//! look. After an outage that every instance saw, the first one back
//! therefore does not reap the others, which are as alive as it is.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// An instance found silent for longer than the lease, with the value its
/// row held throughout: reap it only if the row still holds that value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Silent {
    pub instance: String,
    pub seen_at: i64,
}

/// One instance's view of the others' renewals.
#[derive(Debug)]
pub(super) struct Watch {
    lease: Duration,
    /// Per instance: the value last found in its row, and when the look
    /// that first found it was answered.
    seen: HashMap<String, (i64, Instant)>,
    /// When the last look was answered.
    last: Option<Instant>,
}

impl Watch {
    pub(super) fn new(lease: Duration) -> Watch {
        Watch {
            lease,
            seen: HashMap::new(),
            last: None,
        }
    }

    /// Records a look at every row of `instances` (`rows`: name and value),
    /// asked at `asked` and answered at `answered`, and returns the instances
    /// other than `own` whose value has not changed for longer than the
    /// lease, in name order: reapers then lock rows in one order, and two
    /// reaping at once cannot deadlock.
    pub(super) fn look(
        &mut self,
        own: &str,
        rows: Vec<(String, i64)>,
        asked: Instant,
        answered: Instant,
    ) -> Vec<Silent> {
        // A gap this long means this instance was away (stalled, or cut off)
        // long enough that others may have been too.
        let away = self.lease / 2;
        if self
            .last
            .is_none_or(|last| asked.saturating_duration_since(last) > away)
        {
            self.seen.clear();
        }
        self.last = Some(answered);
        let mut previous = std::mem::take(&mut self.seen);
        let mut silent = Vec::new();
        for (instance, seen_at) in rows {
            if instance == own {
                continue;
            }
            let since = match previous.remove(&instance) {
                Some((value, since)) if value == seen_at => since,
                _ => answered,
            };
            if asked.saturating_duration_since(since) > self.lease {
                silent.push(Silent {
                    instance: instance.clone(),
                    seen_at,
                });
            }
            self.seen.insert(instance, (seen_at, since));
        }
        // Rows that are gone (reaped, or stopped gracefully) are forgotten
        // with `previous`, so the map holds only what the table holds.
        silent.sort_unstable_by(|a, b| a.instance.cmp(&b.instance));
        silent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    fn rows(list: &[(&str, i64)]) -> Vec<(String, i64)> {
        list.iter().map(|&(i, v)| (i.to_owned(), v)).collect()
    }

    fn secs(start: Instant, s: f64) -> Instant {
        start + Duration::from_secs_f64(s)
    }

    /// Looks every 2 s from `from` to `to` (inclusive) while `b` holds
    /// `value`; returns when `b` was first found silent.
    fn watch_until_silent(
        watch: &mut Watch,
        start: Instant,
        from: u64,
        to: u64,
        value: i64,
    ) -> Option<u64> {
        (from..=to).step_by(2).find(|&s| {
            let at = secs(start, s as f64);
            !watch.look("a", rows(&[("b", value)]), at, at).is_empty()
        })
    }

    #[test]
    fn an_instance_is_silent_once_its_value_stood_still_for_a_lease() {
        let start = Instant::now();
        let mut watch = Watch::new(LEASE);
        // b renews at 0, 2 and 4, then stops.
        for (s, value) in [(0, 100), (2, 102), (4, 104)] {
            let at = secs(start, s as f64);
            assert!(watch.look("a", rows(&[("b", value)]), at, at).is_empty());
        }
        assert_eq!(watch_until_silent(&mut watch, start, 6, 30, 104), Some(16));
    }

    #[test]
    fn the_value_itself_is_never_compared_with_this_instance_s_clock() {
        let start = Instant::now();
        // A row written by a clock a day behind, and one a day ahead: both
        // are alive while they change and silent a lease after they stop.
        for far in [-86_400_000, 86_400_000] {
            let mut watch = Watch::new(LEASE);
            for s in (0..=20).step_by(2) {
                let at = secs(start, s as f64);
                let value = far + s as i64 * 1000;
                assert!(watch.look("a", rows(&[("b", value)]), at, at).is_empty());
            }
            let value = far + 20_000;
            assert_eq!(
                watch_until_silent(&mut watch, start, 22, 40, value),
                Some(32)
            );
        }
    }

    #[test]
    fn a_value_counts_from_when_its_look_was_answered() {
        let start = Instant::now();
        let mut watch = Watch::new(LEASE);
        // The first look took 3 s to answer: the row may have been renewed
        // just before the answer, so 13 s after asking is not yet a lease.
        assert!(
            watch
                .look("a", rows(&[("b", 7)]), start, secs(start, 3.0))
                .is_empty()
        );
        for s in [5.0, 7.0, 9.0, 11.0, 13.0] {
            let at = secs(start, s);
            assert!(watch.look("a", rows(&[("b", 7)]), at, at).is_empty());
        }
        let at = secs(start, 13.5);
        assert_eq!(
            watch.look("a", rows(&[("b", 7)]), at, at),
            vec![Silent {
                instance: "b".into(),
                seen_at: 7
            }]
        );
    }

    #[test]
    fn after_a_gap_in_looking_everyone_gets_a_whole_lease_again() {
        let start = Instant::now();
        let mut watch = Watch::new(LEASE);
        assert!(watch.look("a", rows(&[("b", 1)]), start, start).is_empty());
        // This instance was away for 20 s: b's unchanged value proves
        // nothing about that time (the database may have been away too).
        let back = secs(start, 20.0);
        assert!(watch.look("a", rows(&[("b", 1)]), back, back).is_empty());
        assert_eq!(watch_until_silent(&mut watch, back, 2, 20, 1), Some(12));
    }

    #[test]
    fn its_own_row_is_never_silent_and_gone_rows_are_forgotten() {
        let start = Instant::now();
        let mut watch = Watch::new(LEASE);
        for s in (0..=30).step_by(2) {
            let at = secs(start, s as f64);
            let list = if s < 10 {
                rows(&[("a", 5), ("c", 9)])
            } else {
                rows(&[("a", 5)])
            };
            assert!(watch.look("a", list, at, at).is_empty());
        }
        assert!(watch.seen.is_empty(), "{:?}", watch.seen);
        // c comes back (registered again) and is watched from scratch.
        let at = secs(start, 32.0);
        assert!(watch.look("a", rows(&[("c", 9)]), at, at).is_empty());
    }
}
