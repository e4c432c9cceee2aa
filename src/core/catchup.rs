//! Catching up on a room: `/join ROOM SEQ` replays every message after `SEQ`.
//!
//! A client that carries its own cursor (its session died with its instance, or
//! it is a script) re-joins anywhere with the last seq it saw. The replay is
//! read from storage before the join takes the hub's lock, then completed from
//! the room's ring under the lock, so it goes out before any live message of
//! the room, with no gap and no duplicate between the two:
//!
//! ```text
//!   storage read (outside the lock)    ring (under the lock)      live (outbox)
//!   after+1 ........... r              r+1 ....... last           last+1 ...
//! ```
//!
//! At most [`MAX_CATCH_UP`] messages are replayed: the newest ones, after one
//! `gap` for the older part. Seqs storage does not hold (lost, or never
//! stored) are announced as a `gap` where they fall. A cursor above the room's
//! current seq replays nothing.

use std::sync::Arc;
use std::time::Duration;

use super::Hub;
use super::event::ErrorCode;
use super::event::{Event, EventBody, Message};
use super::names::{Refusal, RoomName};

/// Most messages one `/join ROOM SEQ` replays.
pub const MAX_CATCH_UP: usize = 1_000;
/// How long a catch-up may wait for storage before it is refused: a
/// database that does not answer must not hold a join (or a stream's
/// resume) for the pool's whole timeout. Longer than the one-second wait
/// for the batching writer that a read may include.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// What a resuming join sends after its `join` event, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Item {
    /// A message the client missed.
    Message(Arc<Message>),
    /// Messages `from..=to` that are not replayed.
    Gap { from: u64, to: u64 },
}

impl Item {
    /// The event for this item in `room`.
    pub fn into_event(self, room: &RoomName) -> Event {
        match self {
            Item::Message(m) => Event::message(m),
            Item::Gap { from, to } => Event::new(EventBody::Gap {
                room: room.clone(),
                from_seq: from,
                to_seq: to,
            }),
        }
    }
}

/// A catch-up read from storage, made before the join's lock.
#[derive(Debug, Clone)]
pub(super) struct CatchUp {
    /// The client's cursor: it has every message up to this seq.
    pub after: u64,
    /// Messages after `after` that storage (and the ring) held at read time,
    /// oldest first; the newest [`MAX_CATCH_UP`] when there were more.
    pub read: Vec<Arc<Message>>,
}

/// The replay, and whether messages arrived between the read and the lock
/// that neither the read nor the ring holds (read again, or announce them).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Plan {
    /// What to send, oldest first.
    pub items: Vec<Item>,
    /// The read ended before the ring begins: more than a ring's worth of
    /// messages arrived in between. `items` announces them as a gap.
    pub torn: bool,
}

impl CatchUp {
    /// The newest seq read (the cursor when nothing was).
    pub fn read_end(&self) -> u64 {
        self.read.last().map_or(self.after, |m| m.seq)
    }

    /// Only what this instance has delivered in the room (up to
    /// `delivered`, its ring's last seq): storage can be ahead of delivery
    /// (another instance's message, stored but not yet polled here), and
    /// what is newer reaches the client live. Replaying it too would send it
    /// twice.
    pub fn delivered_up_to(mut self, delivered: u64) -> CatchUp {
        self.read.retain(|m| m.seq <= delivered);
        self
    }

    /// Appends a later read, made after [`CatchUp::read_end`].
    pub fn extend(&mut self, later: CatchUp) {
        let end = self.read_end();
        self.read
            .extend(later.read.into_iter().filter(|m| m.seq > end));
    }

    /// The replay after `self.after`: the read, then the ring's newer
    /// messages, at most `cap` of them (the newest), gaps where seqs are
    /// missing. `ring` is the room's ring, oldest first.
    pub fn plan<'a>(&self, ring: impl Iterator<Item = &'a Arc<Message>>, cap: usize) -> Plan {
        let read_end = self.read_end();
        let mut messages: Vec<Arc<Message>> = self.read.clone();
        let mut torn = false;
        for m in ring.filter(|m| m.seq > read_end) {
            let last = messages.last().map_or(read_end, |m| m.seq);
            if m.seq > last + 1 && last == read_end {
                torn = true;
            }
            messages.push(m.clone());
        }
        let skip = messages.len().saturating_sub(cap);
        let mut items = Vec::with_capacity(messages.len() - skip + 2);
        let mut last = self.after;
        for m in messages.into_iter().skip(skip) {
            // The older part (over the cap), or seqs nobody can replay.
            if m.seq > last + 1 {
                items.push(Item::Gap {
                    from: last + 1,
                    to: m.seq - 1,
                });
            }
            last = m.seq;
            items.push(Item::Message(m));
        }
        Plan { items, torn }
    }
}

impl Hub {
    /// Reads what a client resuming `room` after `after` missed, through the
    /// store; nothing when the ring alone covers it.
    pub(super) async fn catch_up(&self, room: &RoomName, after: u64) -> Result<CatchUp, Refusal> {
        let ring = self.ring(room);
        if ring
            .first()
            .is_some_and(|m| m.seq <= after.saturating_add(1))
        {
            return Ok(CatchUp {
                after,
                read: Vec::new(),
            });
        }
        let read = async {
            let read = self.replay(room, after, MAX_CATCH_UP as u32 + 1).await?;
            if read.len() > MAX_CATCH_UP {
                // More than a replay's worth: only the newest are sent.
                return self.history_page(room, None, MAX_CATCH_UP as u32).await;
            }
            Ok(read)
        };
        let read = within_time(room, read).await?;
        Ok(CatchUp { after, read })
    }
}

impl Hub {
    /// The messages of `room` in `after+1..=up_to`, oldest first, for an HTTP
    /// session catching a stream up from storage: at most [`MAX_CATCH_UP`]
    /// (the newest, after one `gap` for the older part), with a `gap` wherever
    /// storage no longer has some.
    pub async fn missed(
        &self,
        room: &RoomName,
        after: u64,
        up_to: u64,
    ) -> Result<Vec<Event>, Refusal> {
        if up_to <= after {
            return Ok(Vec::new());
        }
        let span = up_to - after;
        let read = within_time(room, async {
            if span <= MAX_CATCH_UP as u64 {
                self.replay(room, after, span as u32).await
            } else {
                self.history_page(room, Some(up_to + 1), MAX_CATCH_UP as u32)
                    .await
            }
        })
        .await?;
        let read: Vec<Arc<Message>> = read.into_iter().filter(|m| m.seq <= up_to).collect();
        let catch_up = CatchUp { after, read };
        let end = catch_up.read_end();
        let mut items = catch_up.plan(std::iter::empty(), MAX_CATCH_UP).items;
        if end < up_to {
            // Sent once, but storage has none of them now.
            items.push(Item::Gap {
                from: end + 1,
                to: up_to,
            });
        }
        Ok(items.into_iter().map(|i| i.into_event(room)).collect())
    }
}

/// A storage read, refused as `unavailable` if it takes over [`READ_TIMEOUT`].
async fn within_time<T>(
    room: &RoomName,
    read: impl Future<Output = Result<T, Refusal>>,
) -> Result<T, Refusal> {
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(read) => read,
        Err(_) => {
            tracing::warn!(%room, "catch-up read timed out");
            Err(Refusal::new(
                ErrorCode::Unavailable,
                "history is unavailable: storage is not answering; try again",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::history::tests::msg;

    fn msgs(seqs: impl IntoIterator<Item = u64>) -> Vec<Arc<Message>> {
        seqs.into_iter().map(msg).collect()
    }

    fn shape(plan: &Plan) -> Vec<String> {
        plan.items
            .iter()
            .map(|i| match i {
                Item::Message(m) => m.seq.to_string(),
                Item::Gap { from, to } => format!("gap {from}-{to}"),
            })
            .collect()
    }

    #[test]
    fn read_then_ring_without_duplicates() {
        let c = CatchUp {
            after: 3,
            read: msgs(4..=8),
        };
        let ring = msgs(1..=10);
        let plan = c.plan(ring.iter(), 1000);
        assert_eq!(shape(&plan), ["4", "5", "6", "7", "8", "9", "10"]);
        assert!(!plan.torn);
    }

    #[test]
    fn what_storage_holds_beyond_delivery_is_left_to_the_live_path() {
        let c = CatchUp {
            after: 3,
            read: msgs(4..=12),
        }
        .delivered_up_to(10);
        let ring = msgs(1..=10);
        let plan = c.plan(ring.iter(), 1000);
        assert_eq!(shape(&plan), ["4", "5", "6", "7", "8", "9", "10"]);
    }

    #[test]
    fn over_the_cap_the_older_part_is_one_gap() {
        let c = CatchUp {
            after: 0,
            read: msgs(1..=20),
        };
        let plan = c.plan(std::iter::empty(), 5);
        assert_eq!(shape(&plan), ["gap 1-15", "16", "17", "18", "19", "20"]);
    }

    #[test]
    fn missing_seqs_are_announced_where_they_fall() {
        let c = CatchUp {
            after: 1,
            read: msgs([2, 5, 6]),
        };
        let plan = c.plan(std::iter::empty(), 1000);
        assert_eq!(shape(&plan), ["2", "gap 3-4", "5", "6"]);
    }

    #[test]
    fn a_cursor_above_the_room_replays_nothing() {
        let c = CatchUp {
            after: 999,
            read: Vec::new(),
        };
        let ring = msgs(1..=10);
        assert!(c.plan(ring.iter(), 1000).items.is_empty());
    }

    #[test]
    fn messages_between_the_read_and_the_ring_tear_the_replay() {
        let c = CatchUp {
            after: 0,
            read: msgs(1..=5),
        };
        let ring = msgs(11..=20);
        let plan = c.plan(ring.iter(), 1000);
        assert!(plan.torn);
        assert_eq!(shape(&plan)[5], "gap 6-10");
    }
}
