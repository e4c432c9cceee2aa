//! Reading a room without being in it: following its events (the HTTP room
//! stream) and reading its past from storage merged with the ring (history
//! pages, `Last-Event-ID` resume).
//!
//! Storage may lag the batching writer by a moment while the ring never does,
//! so every read here takes what storage has and completes it from the ring.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Hub;
use super::event::{ErrorCode, Event, Message};
use super::history::RING;
use super::names::{Refusal, RoomName};
use super::rooms::{Room, Watcher};

/// How long a read waits for storage to catch up with the ring before it
/// reports the difference as a gap (storage that is down, not just behind).
const SETTLE: Duration = Duration::from_secs(1);

/// How long reading a room's recent messages (its position) may take before
/// a join or a room stream is refused as `unavailable`.
const POSITION_READ: Duration = Duration::from_secs(1);

/// A read-only subscription to one room.
#[derive(Debug)]
pub struct RoomWatch {
    /// The room's last messages when the watch began, oldest first; the
    /// events below follow them with no gap and no duplicate.
    pub recent: Vec<Arc<Message>>,
    /// The room's `message`, `join` and `leave` events from then on, bounded by
    /// `--queue`. It closes if the watcher falls that far behind.
    pub events: mpsc::Receiver<Event>,
    /// Completes (with `Ok`) if the hub dropped this watcher for falling
    /// behind, which a stream stuck on a full socket cannot see by itself.
    pub slow: oneshot::Receiver<()>,
}

impl Hub {
    /// Follows `room` without joining it: no member sees the watcher.
    pub async fn watch(&self, room: RoomName) -> Result<RoomWatch, Refusal> {
        let stored = if self.lock().rooms.contains_key(&room) {
            Vec::new()
        } else {
            self.stored_ring(&room).await?
        };
        let (slow_tx, slow) = oneshot::channel();
        let (tx, events) = mpsc::channel(self.shared.limits.queue.max(1));
        let (watch, delivered) = {
            let mut state = self.lock();
            if state.closed {
                return Err(shutting_down());
            }
            let entry = state
                .rooms
                .entry(room.clone())
                .or_insert_with(|| Room::new(stored));
            entry.touch();
            // Readers of a quiet room that have gone away are forgotten here,
            // not only at its next event.
            entry.watchers.retain(|w| !w.events.is_closed());
            entry.watchers.push(Watcher {
                events: tx,
                slow: Some(slow_tx),
            });
            let recent: Vec<Arc<Message>> = entry.history.iter().cloned().collect();
            (
                RoomWatch {
                    recent,
                    events,
                    slow,
                },
                entry.history.last_seq(),
            )
        };
        // With no member here, the bus must still bring this room's messages.
        self.shared.bus.watch(&room, delivered).await;
        Ok(watch)
    }

    /// Up to `limit` messages of `room` with `seq < before` (the newest when
    /// `None`), oldest first: one page of history, newest page first.
    pub async fn history_page(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Arc<Message>>, Refusal> {
        let limit = limit.max(1) as usize;
        let mut settled = false;
        loop {
            let ring = self.ring(room);
            let stored = self
                .shared
                .store
                .page(room, before, limit as u32)
                .await
                .map_err(|err| storage_down(room, err))?;
            let newest_stored = stored.first().map_or(0, |m| m.seq);
            let newer: Vec<Arc<Message>> = ring
                .into_iter()
                .filter(|m| m.seq > newest_stored && before.is_none_or(|b| m.seq < b))
                .collect();
            // A hole shows unless the ring alone fills the page.
            let hole = newer.first().is_some_and(|m| m.seq > newest_stored + 1);
            if hole && newer.len() < limit && !settled {
                // The messages in between are still in the writer's queue.
                settled = true;
                self.settle().await;
                continue;
            }
            let mut messages: Vec<Arc<Message>> = stored.into_iter().rev().map(Arc::new).collect();
            messages.extend(newer);
            let skip = messages.len().saturating_sub(limit);
            return Ok(messages.into_iter().skip(skip).collect());
        }
    }

    /// Up to `limit` messages of `room` with `seq > after`, oldest first, for a
    /// client resuming after `after`. Messages storage no longer holds are
    /// simply absent: the caller sees the jump in `seq` and reports a gap.
    pub async fn replay(
        &self,
        room: &RoomName,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Arc<Message>>, Refusal> {
        let limit = limit.max(1);
        let mut settled = false;
        loop {
            let ring = self.ring(room);
            let stored = self
                .shared
                .store
                .since(room, after, limit)
                .await
                .map_err(|err| storage_down(room, err))?;
            let mut messages: Vec<Arc<Message>> = stored.into_iter().map(Arc::new).collect();
            if messages.len() >= limit as usize {
                return Ok(messages);
            }
            // Storage is exhausted: the rest, if any, is in the ring.
            let last = messages.last().map_or(after, |m| m.seq);
            let newer: Vec<Arc<Message>> = ring.into_iter().filter(|m| m.seq > last).collect();
            let hole = newer.first().is_some_and(|m| m.seq > last + 1);
            if hole && !settled {
                // The writer has not committed the messages in between yet.
                settled = true;
                self.settle().await;
                continue;
            }
            let room_left = limit as usize - messages.len();
            messages.extend(newer.into_iter().take(room_left));
            return Ok(messages);
        }
    }

    /// Waits (briefly) until storage holds what this instance has published,
    /// for a read that found a hole between storage and the ring.
    async fn settle(&self) {
        if tokio::time::timeout(SETTLE, self.shared.bus.settled())
            .await
            .is_err()
        {
            tracing::warn!("storage is slow to catch up; a history read may show a gap");
        }
    }

    /// A copy of the room's ring, oldest first (empty if the room is unknown).
    pub(super) fn ring(&self, room: &RoomName) -> Vec<Arc<Message>> {
        self.lock()
            .rooms
            .get(room)
            .map(|r| r.history.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The last [`RING`] stored messages, oldest first, to seed a new room's
    /// ring, within [`POSITION_READ`].
    ///
    /// This read also tells the instance where the room stands: the bus
    /// delivers the room from the ring's last seq on. A room whose position
    /// could not be read is therefore not created at all (the join or stream
    /// is refused, and can be retried) rather than started from seq 0, which
    /// would deliver its whole history as live messages once the database
    /// answered again.
    /// The highest seq `room` is known to have reached: this instance's ring
    /// or storage, whichever is ahead (0 when storage does not answer within
    /// [`POSITION_READ`]). A client cursor at or below it is real, even when
    /// this instance has not delivered that far yet; one above it is not.
    pub async fn known_top(&self, room: &RoomName) -> u64 {
        let ring = self.ring(room).last().map_or(0, |m| m.seq);
        let stored = tokio::time::timeout(POSITION_READ, self.shared.store.last_seq(room)).await;
        ring.max(stored.ok().and_then(Result::ok).unwrap_or(0))
    }

    pub(super) async fn stored_ring(&self, room: &RoomName) -> Result<Vec<Message>, Refusal> {
        let read = self.shared.store.page(room, None, RING as u32);
        match tokio::time::timeout(POSITION_READ, read).await {
            Ok(Ok(mut page)) => {
                page.reverse();
                Ok(page)
            }
            Ok(Err(err)) => Err(position_unknown(room, &err)),
            Err(_) => Err(position_unknown(room, &"no answer in time")),
        }
    }
}

fn shutting_down() -> Refusal {
    Refusal::new(ErrorCode::Unavailable, "the server is shutting down")
}

fn position_unknown(room: &RoomName, cause: &dyn std::fmt::Display) -> Refusal {
    tracing::warn!(%cause, %room, "could not read where the room stands; refusing rather than starting it from 0");
    Refusal::new(
        ErrorCode::Unavailable,
        format!("#{room} cannot be opened right now: storage is not answering; try again shortly"),
    )
}

fn storage_down(room: &RoomName, err: super::ports::StoreError) -> Refusal {
    tracing::warn!(cause = %err, %room, "history read failed");
    Refusal::new(
        ErrorCode::Unavailable,
        "history is unavailable: storage is not answering; try again",
    )
}
