//! The fence a woken instance stays behind until the cluster has confirmed
//! its lease again.
//!
//! An instance that stalled past its lease (frozen, or its link to the bus
//! cut) has been reaped by the others, and a newcomer may have taken one of
//! its users' nicks. When it wakes, it reads what its users typed meanwhile
//! at the same moment as its heartbeat finds out what it lost, and the lines
//! would win that race: they went out under a nick that was someone else's by
//! then. So an instance publishes nothing, and sends no DM, once its last
//! confirmed renewal is older than the lease less a margin; the first
//! renewal that succeeds (and has handed every lost nick back to the hub)
//! opens the fence again.
//!
//! The margin covers what may still be on its way when the fence is judged:
//! a publish allowed just before the limit reaches the authority within its
//! own deadline (under a second), still inside the lease the others watch.
//! A renewal counts from when it was *sent*: the lease it renewed cannot have
//! started earlier.
//!
//! A fence also closes for good when the renewal finds that another
//! instance took this one's name over while it was away
//! ([`Fence::supersede`]): nothing is sent for its users again, and the bus
//! gives nothing back under the name when it closes, for it is the other's.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::core::ports::BusError;

/// Taken off the lease: longer than any publish may take to reach the
/// authority.
const MARGIN: Duration = Duration::from_secs(2);

/// When this instance's lease was last confirmed, and how stale it may get.
#[derive(Debug)]
pub struct Fence {
    limit: Duration,
    confirmed: Mutex<Instant>,
    /// The name another instance took over from this one, once it has.
    superseded: OnceLock<String>,
}

impl Fence {
    /// A fence for a lease of `lease`, last confirmed by a renewal sent at
    /// `sent`.
    pub fn new(lease: Duration, sent: Instant) -> Fence {
        Fence {
            limit: lease.saturating_sub(MARGIN),
            confirmed: Mutex::new(sent),
            superseded: OnceLock::new(),
        }
    }

    /// Another instance took this one's name (`instance`) over: closed for
    /// good.
    pub fn supersede(&self, instance: &str) {
        let _ = self.superseded.set(instance.to_owned());
    }

    /// Whether another instance took this one's name over: what is kept
    /// under the name is that one's, and must not be given back.
    pub fn is_superseded(&self) -> bool {
        self.superseded.get().is_some()
    }

    /// A renewal sent at `sent` succeeded, and what it found lost has been
    /// handed over.
    pub fn confirmed(&self, sent: Instant) {
        let mut confirmed = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        *confirmed = (*confirmed).max(sent);
    }

    /// Whether this instance may speak for its users now.
    pub fn check(&self) -> Result<(), BusError> {
        if let Some(instance) = self.superseded.get() {
            return Err(BusError::Superseded(instance.clone()));
        }
        let silent = self
            .confirmed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        if silent > self.limit {
            return Err(BusError::Fenced {
                silent_secs: silent.as_secs(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn closes_past_the_lease_less_the_margin_and_opens_on_a_renewal() {
        let lease = Duration::from_secs(10);
        let fence = Fence::new(lease, Instant::now());
        tokio::time::advance(lease - MARGIN).await;
        assert!(fence.check().is_ok(), "still inside the limit");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(fence.check(), Err(BusError::Fenced { .. })));
        // An old renewal answered late opens nothing.
        fence.confirmed(Instant::now() - lease);
        assert!(fence.check().is_err());
        fence.confirmed(Instant::now());
        assert!(fence.check().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_superseded_fence_stays_closed_whatever_is_confirmed() {
        let fence = Fence::new(Duration::from_secs(10), Instant::now());
        fence.supersede("i3");
        fence.confirmed(Instant::now());
        assert!(matches!(fence.check(), Err(BusError::Superseded(name)) if name == "i3"));
        assert!(fence.is_superseded());
    }
}
