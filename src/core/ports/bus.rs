//! The bus port: what the core needs from whatever connects instances and
//! orders each room.
//!
//! The core hands a [`Draft`] to [`Bus::publish`]; the bus gives it the room's
//! next `seq`, makes it durable as `--durability` says, and delivers the
//! sequenced message to every instance (this one included) through the
//! [`Deliver`] sink each instance attaches with [`Bus::start`], in `seq` order
//! per room. A bus that connects instances also offers a [`Directory`]: the
//! cluster's view of nicks and room membership.

use std::sync::Arc;

use async_trait::async_trait;

use super::store::{Store, StoreError, WriterStats};
use crate::core::{DirectMessage, Draft, Message, Nick, RoomCount, RoomName, SessionId};

/// What travels from the bus to an instance.
#[derive(Debug, Clone)]
pub enum Envelope {
    /// A sequenced room message.
    Message(Arc<Message>),
    /// A direct message for a local user, from another instance.
    Dm(Arc<DirectMessage>),
    /// A membership change on another instance, for the local members it
    /// concerns.
    Presence(Presence),
    /// This instance's lease was reaped while it was away, and another
    /// session has taken `nick` since: local session `session` no longer
    /// holds it and must be renamed. Sent only for claims [`Deliver::claims`]
    /// reported.
    ClaimLost { session: SessionId, nick: Nick },
    /// Another instance started under this instance's name while this one
    /// was away (stalled or cut off past its lease), and took the name over:
    /// what this one held is that one's now. This instance must stop serving
    /// at once; the bus has stopped renewing and gives nothing back.
    Superseded { instance: String },
}

/// One local session's share of the cluster directory, as the hub knows it:
/// what an instance re-asserts when it finds its lease reaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The session that holds the nick on this instance.
    pub session: SessionId,
    /// Its nick.
    pub nick: Nick,
    /// The rooms it is in, and the last seq this instance delivered in each.
    pub rooms: Vec<(RoomName, u64)>,
}

/// A membership change made on another instance (or, for a reaped instance,
/// announced on its behalf by the one that reaped it). Room messages carry a
/// `seq` and arrive in order; these do not, and may overtake or trail the
/// messages around them by up to one delivery round (a poll interval).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// `nick` joined `room`.
    Joined { room: RoomName, nick: Nick },
    /// `nick` left `room` (or disconnected).
    Left { room: RoomName, nick: Nick },
    /// `old` is now called `new`; it is in `rooms`.
    Renamed {
        old: Nick,
        new: Nick,
        rooms: Vec<RoomName>,
    },
}

/// Why the bus could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The message could not be made durable (sync durability) or sequenced.
    #[error("storage is not answering: {0}")]
    Store(#[from] StoreError),
    /// The bus is stopping.
    #[error("the bus is closed")]
    Closed,
    /// The bus's last attempt to reach the other instances failed.
    #[error("the bus cannot reach the other instances")]
    Unreachable,
    /// Redis refused, failed or did not answer; says why.
    #[error("redis: {0}")]
    Redis(String),
    /// Another instance that is running goes by this instance's name.
    #[error(
        "instance name {0:?} is in use by a running instance (its lease is being renewed); start this one with another --instance"
    )]
    NameTaken(String),
    /// Another instance took this instance's name over while this one was
    /// away: an instance was started under a name that was in use.
    #[error(
        "another instance took over instance name {0:?} while this one was stalled or cut off past its lease; its users' nicks may be held there now, so this one stops (give each instance its own --instance)"
    )]
    Superseded(String),
    /// The cluster's shared state is back from an outage every instance saw:
    /// free nicks are not handed out until every instance has had a lease to
    /// renew its users' (or Redis has lost them, and they are being put back).
    #[error(
        "the cluster's shared state is recovering from an outage; nicks are handed out again once every instance has renewed its users' (within {lease_secs} s)"
    )]
    Recovering {
        /// The longest the recovery lasts, in seconds.
        lease_secs: u64,
    },
    /// This instance has not had its lease confirmed for most of a lease (it
    /// stalled, or lost its link): the cluster may have reaped it and given
    /// a nick of its users away, so it speaks for nobody until a renewal
    /// says which nicks are still theirs.
    #[error(
        "this instance's lease was last confirmed {silent_secs} s ago; nothing is sent for its users until it is renewed"
    )]
    Fenced {
        /// Since the last confirmed renewal, in seconds.
        silent_secs: u64,
    },
    /// The ordering authority is not answering: messages are refused (at
    /// once, not after a wait) until it does.
    #[error(
        "the ordering authority has not answered for {for_secs} s ({cause}); messages are refused until it does"
    )]
    Down {
        /// Since when, in seconds.
        for_secs: u64,
        /// The failure that shut the gate.
        cause: String,
    },
}

impl BusError {
    /// Whether this failure says the authority cannot be reached (as opposed
    /// to refusing one statement), so that the next attempts should not wait
    /// for it.
    pub fn is_unreachable(&self) -> bool {
        match self {
            BusError::Unreachable | BusError::Down { .. } | BusError::Redis(_) => true,
            BusError::Store(StoreError::NotAnswering(_)) => true,
            BusError::Store(_)
            | BusError::Closed
            | BusError::NameTaken(_)
            | BusError::Superseded(_)
            | BusError::Recovering { .. }
            | BusError::Fenced { .. } => false,
        }
    }
}

/// Where a bus hands what it carries: the instance's core.
pub trait Deliver: Send + Sync + 'static {
    /// Takes one envelope. Must not block: it runs on the bus's own path.
    fn deliver(&self, envelope: Envelope);

    /// Every local session's nick and rooms, right now. A bus asks when it
    /// has to re-assert this instance's claims (its lease was reaped). Must
    /// not block.
    fn claims(&self) -> Vec<Claim>;
}

/// Carries messages between instances and orders each room.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// `local`, `poll` or `redis`, for logs and `/healthz`.
    fn name(&self) -> &'static str;

    /// Starts delivering what the cluster sends this instance to `sink`, in
    /// `seq` order per room. Called once, before the first `publish`.
    fn start(&self, sink: Arc<dyn Deliver>);

    /// Sequences `draft` in its room and publishes it to every instance. Returns
    /// the sequenced message; every instance (this one too) also receives it
    /// through its sink.
    async fn publish(&self, draft: Draft) -> Result<Arc<Message>, BusError>;

    /// Delivers `room`'s messages to this instance from now on, counting from
    /// `delivered` (the last seq it already has), even with no member here:
    /// a read-only room stream. A bus that delivers every room everywhere
    /// (`local`) has nothing to do.
    async fn watch(&self, _room: &RoomName, _delivered: u64) {}

    /// Stops delivering `room` to this instance and forgets what the bus kept
    /// for it: the hub has evicted the room (no member, no reader, idle). The
    /// inverse of [`Bus::watch`]; a later join or reader watches it again.
    async fn unwatch(&self, _room: &RoomName) {}

    /// The store the hub reads history through (a new room's ring, resumes,
    /// `/history`). A bus that delivers messages before they are stored
    /// (`redis`) puts what it holds in front of `store`, so that no read
    /// misses what storage has not caught up with yet.
    fn history(&self, store: Arc<dyn Store>) -> Arc<dyn Store> {
        store
    }

    /// Waits until every message published so far can be read from the
    /// store. Only a bus that stores behind delivery (`local` with async
    /// durability) has anything to wait for.
    async fn settled(&self) {}

    /// Whether this instance may speak for its users now: `Err` while its
    /// lease is unconfirmed (a bus with a fence, see `bus::fence`). The hub
    /// asks *before* it checks that the speaker's nick was not lost, under
    /// the same lock: the fence opens only once the hub has learned of every
    /// lost nick, so a line that passes both was typed by the nick's holder,
    /// even if its publish then waits past the moment the fence opened.
    /// (The publish judges the fence again before numbering.)
    fn admits(&self) -> Result<(), BusError> {
        Ok(())
    }

    /// Answers when the bus works.
    async fn health(&self) -> Result<(), BusError>;

    /// SQL statements this instance has sent the shared database, for a bus
    /// that works through one (`poll`): what delivery costs the database.
    fn statements(&self) -> Option<u64> {
        None
    }

    /// Stops publishing and waits until everything published is durable.
    async fn close(&self);

    /// The cluster's directory of nicks and rooms; `None` when this instance
    /// is the whole cluster.
    fn directory(&self) -> Option<&dyn Directory> {
        None
    }

    /// The batching store writer's counters, when this bus has one (`/metrics`).
    fn writer_stats(&self) -> Option<Arc<WriterStats>> {
        None
    }
}

/// Who is where across the cluster. Each call is one short database or
/// network round trip; the hub never makes one while holding its lock.
///
/// Claims live under this instance's lease: a claim that another instance
/// reaped is re-asserted by the bus itself from [`Deliver::claims`], so the
/// hub only says what changes.
///
/// The directory's promises hold through stalls, crashes and outages the
/// same way on every bus:
///
/// - An instance's claims (its sessions' nicks and rooms) live under a lease
///   it renews. When another instance finds the lease expired it *reaps*
///   the claims in one atomic step, so exactly one instance announces each
///   departure: every live instance, the reaper included, receives
///   [`Presence::Left`] for every room of every reaped user.
/// - An instance that finds its own lease reaped (it was stalled, or cut off
///   from the shared state) re-asserts what [`Deliver::claims`] reports:
///   each nick is claimed again for the same session, each room joined again
///   (the others see `join`). A nick another session took meanwhile comes
///   back as [`Envelope::ClaimLost`], and the hub renames its user.
#[async_trait]
pub trait Directory: Send + Sync {
    /// Takes `nick` for session `owner` of this instance; false if another
    /// session holds it: of this instance, or of another one whose claims
    /// have not been reaped (an instance that is merely late keeps its nicks).
    async fn claim_nick(&self, nick: &Nick, owner: SessionId) -> Result<bool, BusError>;
    /// Gives `nick` up if `owner` holds it (and its room memberships: their
    /// members elsewhere see it leave). A claim that has passed to another
    /// session is left alone.
    async fn release_nick(&self, nick: &Nick, owner: SessionId) -> Result<(), BusError>;
    /// Moves memberships from `old` to `new` (already claimed by `owner`) and
    /// frees `old`; the other instances tell the members of its rooms.
    async fn renamed(&self, old: &Nick, new: &Nick, owner: SessionId) -> Result<(), BusError>;
    /// Records a membership, tells the room's members on the other instances,
    /// and watches the room from `delivered` (the last seq this instance has
    /// delivered in it) on.
    async fn joined(&self, room: &RoomName, nick: &Nick, delivered: u64) -> Result<(), BusError>;
    /// Removes a membership and tells the room's members elsewhere.
    async fn left(&self, room: &RoomName, nick: &Nick) -> Result<(), BusError>;
    /// A room's members on every live instance, by nick.
    async fn members(&self, room: &RoomName) -> Result<Vec<Nick>, BusError>;
    /// Rooms with members on live instances, by name.
    async fn rooms(&self) -> Result<Vec<RoomCount>, BusError>;
    /// Sends a DM to the instance that holds `dm.to`; returns the recipient's
    /// nick as registered, or `None` if nobody live holds it.
    async fn send_dm(&self, dm: &DirectMessage) -> Result<Option<Nick>, BusError>;
}
