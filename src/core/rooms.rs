//! A room: who is in it on this instance, and its recent messages; and the
//! eviction of rooms nobody uses.
//!
//! A room is created by its first join or reader. It is kept while it has a
//! member or a reader and for `--room-idle` after its last use, then evicted:
//! anyone may open a reader on any valid room name without a session, so rooms
//! kept forever would be memory anyone can grow. Nothing is lost by evicting:
//! the ring is re-read from storage when the room is next used, and the bus
//! forgets its cursor for the room ([`Bus::unwatch`](crate::core::ports::Bus::unwatch)).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::Hub;
use super::event::{Event, Message};
use super::history::History;
use super::names::RoomName;
use super::sessions::{IdMap, SessionId};

/// How long eviction waits for storage to hold every published message, so a
/// re-read ring is complete. A sweep that cannot wait that long evicts nothing.
const SETTLE: Duration = Duration::from_secs(1);

/// One room as this instance sees it.
#[derive(Debug)]
pub(super) struct Room {
    /// Local members. A `BTreeSet` keeps fan-out order stable (easier to debug).
    pub members: BTreeSet<SessionId>,
    /// The last messages, replayed on join.
    pub history: History,
    /// Read-only followers of the room (the HTTP room stream): they get its
    /// `message`, `join` and `leave` events but are not members.
    pub watchers: Vec<Watcher>,
    /// Members that re-joined with a cursor (`/join ROOM SEQ`) ahead of what
    /// this instance has delivered, because it lags the instance they came
    /// from: each already has every message up to its seq, so live copies up
    /// to it are not sent again. Almost always empty; an entry goes once its
    /// seq has been passed.
    pub ahead: IdMap<u64>,
    /// When the room was last seen in use: created, joined, left, sent to, or
    /// found with a member or reader by a sweep.
    last_used: Instant,
}

/// A read-only follower of a room.
#[derive(Debug)]
pub(super) struct Watcher {
    /// Its bounded queue of room events.
    pub events: mpsc::Sender<Event>,
    /// Fired if it is dropped for falling a whole queue behind: its reader
    /// may have stopped reading, so its stream may never notice by itself.
    pub slow: Option<oneshot::Sender<()>>,
}

impl Room {
    /// The members a live message `seq` goes to: all of them, except those
    /// that already have it (see [`Room::ahead`]), who are forgotten once
    /// they are past it.
    pub fn recipients(&mut self, seq: u64) -> Vec<SessionId> {
        let ahead = &self.ahead;
        let to = self
            .members
            .iter()
            .filter(|m| ahead.get(m).is_none_or(|&have| have < seq))
            .copied()
            .collect();
        self.ahead.retain(|_, have| *have > seq);
        to
    }

    /// A room with no member yet, its ring seeded with `stored` (oldest first).
    pub fn new(stored: Vec<Message>) -> Self {
        Room {
            members: BTreeSet::new(),
            history: History::from_stored(stored.into_iter().map(Arc::new)),
            watchers: Vec::new(),
            ahead: IdMap::default(),
            last_used: Instant::now(),
        }
    }

    /// Marks the room as in use now.
    pub fn touch(&mut self) {
        self.last_used = Instant::now();
    }

    /// Whether the room may be evicted at `now`: no member, no reader (readers
    /// that went away are forgotten here), and unused for `idle`. A room in
    /// use counts as used now, so its idle time starts when that use ends.
    fn idle(&mut self, now: Instant, idle: Duration) -> bool {
        self.watchers.retain(|w| !w.events.is_closed());
        if !self.members.is_empty() || !self.watchers.is_empty() {
            self.last_used = self.last_used.max(now);
            return false;
        }
        now.saturating_duration_since(self.last_used) >= idle
    }

    /// Hands a room event to every watcher without waiting. A watcher that
    /// cannot take it is dropped: its stream then ends as a slow consumer.
    /// Returns how many took it.
    pub fn notify_watchers(&mut self, event: &Event) -> usize {
        if self.watchers.is_empty() {
            return 0;
        }
        self.watchers
            .retain_mut(|watcher| match watcher.events.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    if let Some(slow) = watcher.slow.take() {
                        let _ = slow.send(());
                    }
                    false
                }
                Err(TrySendError::Closed(_)) => false,
            });
        self.watchers.len()
    }
}

impl Hub {
    /// Rooms held in memory on this instance, with or without members.
    pub fn rooms_held(&self) -> usize {
        self.lock().rooms.len()
    }

    /// Evicts every room with no member and no reader that has not been used
    /// for `idle`; returns how many went.
    ///
    /// The bus forgets a room before the hub does, and a room that came back
    /// into use meanwhile is watched again from the hub's last seq, so no
    /// interleaving with a join or a new reader loses its messages.
    pub async fn evict_idle_rooms(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let candidates: Vec<RoomName> = self
            .lock()
            .rooms
            .iter_mut()
            .filter_map(|(name, room)| room.idle(now, idle).then(|| name.clone()))
            .collect();
        if candidates.is_empty() {
            return 0;
        }
        // A ring re-read from storage must not miss messages still queued in
        // the batching writer.
        if tokio::time::timeout(SETTLE, self.shared.bus.settled())
            .await
            .is_err()
        {
            tracing::debug!("storage is behind; idle rooms are kept for now");
            return 0;
        }
        for room in &candidates {
            self.shared.bus.unwatch(room).await;
        }
        let mut revived = Vec::new();
        let mut evicted = 0;
        {
            let mut state = self.lock();
            let rooms = &mut state.rooms;
            for name in candidates {
                let Some(room) = rooms.get_mut(&name) else {
                    continue;
                };
                if room.idle(now, idle) {
                    rooms.remove(&name);
                    evicted += 1;
                } else {
                    revived.push((name, room.history.last_seq()));
                }
            }
            // Give back the table's memory after a wave of rooms has gone.
            let keep = rooms.len() * 2;
            rooms.shrink_to(keep);
        }
        for (room, delivered) in revived {
            self.shared.bus.watch(&room, delivered).await;
        }
        evicted
    }

    /// Evicts idle rooms every `idle / 2` (at least every 100 ms) until
    /// `stop` fires.
    pub async fn sweep_rooms(self, idle: Duration, stop: CancellationToken) {
        let mut every = tokio::time::interval((idle / 2).max(Duration::from_millis(100)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let evicted = self.evict_idle_rooms(idle).await;
            if evicted > 0 {
                tracing::debug!(evicted, held = self.rooms_held(), "idle rooms evicted");
            }
        }
    }
}
