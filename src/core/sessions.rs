//! The connection manager's view of one user: nick, rooms, outbox, rate.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::event::Event;
use super::names::{Nick, RoomName};
use super::outbox::{self, TrySendError};
use super::rate::TokenBucket;

/// Identifies a session inside one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// A map keyed by session id, hashed by [`IdHasher`].
pub type IdMap<V> = HashMap<SessionId, V, BuildHasherDefault<IdHasher>>;

/// Hashes session ids with one multiply instead of SipHash. The server hands
/// ids out in sequence and no client chooses one, so there are no collisions
/// to attack; the fan-out looks one up per recipient.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // The multiplier of FxHash: spreads sequential ids over the high
        // bits, which the table uses too.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

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

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EndReason::Quit => "quit",
            EndReason::SlowConsumer => "slow consumer",
            EndReason::Shutdown => "shutdown",
            EndReason::Expired => "expired",
        })
    }
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
    pub events: outbox::Receiver,
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
pub struct Backlog(outbox::WeakSender);

impl Backlog {
    pub fn of(outbox: &outbox::Sender) -> Self {
        Backlog(outbox.downgrade())
    }

    /// Events waiting to be read, or `None` once the core has ended the session.
    pub fn queued(&self) -> Option<usize> {
        let outbox = self.0.upgrade()?;
        Some(outbox.max_capacity() - outbox.capacity())
    }
}

/// A quicker way into a connection than its outbox, offered by an adapter
/// with [`Hub::attach`](super::Hub::attach).
///
/// The TCP adapter writes an event straight into the socket when nothing of
/// the connection's is waiting, so a client that keeps up costs no task
/// wake-up, and queues it to the outbox otherwise. It is called with the
/// hub's lock held and must not wait.
pub trait Direct: Send + Sync + fmt::Debug {
    /// Delivers `event` after everything delivered to this session before it:
    /// written now, or queued to `outbox` (whose refusal is returned, so a
    /// full outbox still ends the session as a slow consumer).
    fn deliver(&self, event: &Event, outbox: &outbox::Sender) -> Result<(), TrySendError<Event>>;
}

/// The core's record of a session.
#[derive(Debug)]
pub(super) struct Session {
    pub nick: Nick,
    pub rooms: BTreeSet<RoomName>,
    pub current: Option<RoomName>,
    pub outbox: outbox::Sender,
    /// The adapter's quicker way in, if it offers one.
    pub direct: Option<Arc<dyn Direct>>,
    pub end: Option<oneshot::Sender<EndReason>>,
    /// Messages and DMs.
    pub bucket: TokenBucket,
    /// Commands that reach others (`/nick`, `/join`, `/leave`).
    pub commands: TokenBucket,
    pub replies: Replies,
}

impl Session {
    /// Hands `event` to the session, in order with everything before it.
    pub fn deliver(&self, event: &Event) -> Result<(), TrySendError<Event>> {
        match &self.direct {
            Some(direct) => direct.deliver(event, &self.outbox),
            None => self.outbox.try_send(event.clone()),
        }
    }
}
