//! The connection manager's view of one user: nick, rooms, outbox, rate.

use std::collections::BTreeSet;
use std::fmt;

use tokio::sync::{mpsc, oneshot};

use super::event::Event;
use super::names::{Nick, RoomName};
use super::rate::TokenBucket;

/// Identifies a session inside one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// Why the core ended a session; the adapter tells the client and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The user said `/quit` or disconnected.
    Quit,
    /// The outbox was full: the client does not read fast enough.
    SlowConsumer,
    /// The daemon is stopping.
    Shutdown,
    /// An HTTP session whose stream stayed away too long.
    Expired,
}

/// Where the events a command produces for its own caller go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replies {
    /// Into the session's outbox, in order with everything else (TCP).
    Outbox,
    /// Back to the caller of [`Hub::handle`](super::Hub::handle) (HTTP, whose
    /// `POST /command` answers with them). Room events still go to the outbox.
    Caller,
}

/// What an adapter holds for one session: its events and its end.
#[derive(Debug)]
pub struct SessionHandle {
    /// The session's id, for [`Hub::handle`](super::Hub::handle).
    pub id: SessionId,
    /// The nick the session starts with.
    pub nick: Nick,
    /// Every event for this session, bounded by `--queue`.
    pub events: mpsc::Receiver<Event>,
    /// Fires once if the core ends the session (slow consumer, quit, shutdown).
    pub ended: oneshot::Receiver<EndReason>,
    /// How full `events` is, for an adapter that paces its reading by it.
    pub backlog: Backlog,
}

/// A view of how many events wait in a session's outbox.
///
/// An adapter stops reading a client's commands while their answers are piling
/// up (TCP back-pressure), so a client that reads is never dropped for sending
/// fast. It holds only a weak reference: the core still decides when the
/// session ends.
#[derive(Debug, Clone)]
pub struct Backlog(mpsc::WeakSender<Event>);

impl Backlog {
    pub(super) fn of(outbox: &mpsc::Sender<Event>) -> Self {
        Backlog(outbox.downgrade())
    }

    /// Events waiting to be read, or `None` once the core has ended the session.
    pub fn queued(&self) -> Option<usize> {
        let outbox = self.0.upgrade()?;
        Some(outbox.max_capacity() - outbox.capacity())
    }
}

/// The core's record of a session.
#[derive(Debug)]
pub(super) struct Session {
    pub nick: Nick,
    pub rooms: BTreeSet<RoomName>,
    pub current: Option<RoomName>,
    pub outbox: mpsc::Sender<Event>,
    pub end: Option<oneshot::Sender<EndReason>>,
    /// Messages and DMs.
    pub bucket: TokenBucket,
    /// Commands that reach others (`/nick`, `/join`, `/leave`).
    pub commands: TokenBucket,
    pub replies: Replies,
}
