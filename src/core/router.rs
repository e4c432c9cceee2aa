//! The router: hands one event to many sessions without ever waiting.
//!
//! Every push is a `try_send` into a bounded outbox. A full outbox means the
//! client is not reading; that session is ended with `slow-consumer` instead of
//! letting it hold up the room (IRC's SendQ exceeded).

use tokio::sync::mpsc::error::TrySendError;

use super::event::Event;
use super::sessions::{IdMap, Session, SessionId};

/// The outcome of pushing to sessions: who could not take the event.
#[derive(Debug, Default)]
pub(super) struct Undeliverable {
    /// Outbox full: to be ended as slow consumers.
    pub slow: Vec<SessionId>,
    /// Outbox closed: the adapter is gone, to be cleaned up.
    pub gone: Vec<SessionId>,
}

impl Undeliverable {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.slow.is_empty() && self.gone.is_empty()
    }
}

/// Pushes `event` to every session in `to`, recording those that cannot take it.
pub(super) fn fan_out<'a>(
    sessions: &IdMap<Session>,
    to: impl IntoIterator<Item = &'a SessionId>,
    event: &Event,
    failed: &mut Undeliverable,
) -> usize {
    let mut sent = 0;
    for id in to {
        let Some(session) = sessions.get(id) else {
            continue;
        };
        match session.deliver(event) {
            Ok(()) => sent += 1,
            Err(TrySendError::Full(_)) => failed.slow.push(*id),
            Err(TrySendError::Closed(_)) => failed.gone.push(*id),
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::ErrorCode;
    use crate::core::names::Nick;
    use crate::core::outbox;
    use crate::core::rate::TokenBucket;
    use crate::core::sessions::Replies;

    fn session(cap: usize) -> (Session, outbox::Receiver) {
        let (tx, rx) = outbox::channel(cap);
        let s = Session {
            nick: Nick::parse("n").unwrap(),
            rooms: Default::default(),
            current: None,
            outbox: tx,
            direct: None,
            end: None,
            bucket: TokenBucket::new(0, 1),
            commands: TokenBucket::new(0, 1),
            replies: Replies::Outbox,
        };
        (s, rx)
    }

    #[test]
    fn a_full_outbox_is_reported_and_does_not_stop_the_others() {
        let mut sessions = IdMap::default();
        let (fast, mut fast_rx) = session(8);
        let (slow, _slow_rx) = session(1);
        let (gone, gone_rx) = session(8);
        drop(gone_rx);
        sessions.insert(SessionId(1), slow);
        sessions.insert(SessionId(2), fast);
        sessions.insert(SessionId(3), gone);
        let ids = [SessionId(1), SessionId(2), SessionId(3), SessionId(9)];
        let e = Event::error(ErrorCode::Unavailable, "x");
        let mut failed = Undeliverable::default();
        assert_eq!(fan_out(&sessions, &ids, &e, &mut failed), 2);
        assert!(failed.slow.is_empty());
        assert_eq!(failed.gone, vec![SessionId(3)]);
        let mut failed = Undeliverable::default();
        assert_eq!(fan_out(&sessions, &ids, &e, &mut failed), 1);
        assert_eq!(failed.slow, vec![SessionId(1)]);
        assert!(!failed.is_empty());
        assert!(fast_rx.try_recv().is_ok());
        assert!(fast_rx.try_recv().is_ok());
    }
}
