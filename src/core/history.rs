//! The per-room ring buffer of recent messages.
//!
//! Joining a room replays its last messages from memory rather than from storage:
//! a join is then a memory read, however busy the database is.

use std::collections::VecDeque;
use std::sync::Arc;

use super::event::Message;

/// How many messages a room keeps in memory and replays on join.
pub const RING: usize = 10;

/// The last [`RING`] messages of a room, oldest first, in `seq` order.
#[derive(Debug, Default)]
pub struct History {
    ring: VecDeque<Arc<Message>>,
}

impl History {
    /// A ring seeded with messages read from storage (oldest first).
    pub fn from_stored(messages: impl IntoIterator<Item = Arc<Message>>) -> Self {
        let mut history = History::default();
        for m in messages {
            history.push(m);
        }
        history
    }

    /// Appends a message, dropping the oldest beyond [`RING`].
    pub fn push(&mut self, message: Arc<Message>) {
        if self.ring.len() == RING {
            self.ring.pop_front();
        }
        self.ring.push_back(message);
    }

    /// The messages held, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Message>> {
        self.ring.iter()
    }

    /// The newest `seq` held, 0 when empty.
    pub fn last_seq(&self) -> u64 {
        self.ring.back().map_or(0, |m| m.seq)
    }

    /// How many messages are held.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether no message is held.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::event::{MessageKind, Timestamp};
    use crate::core::names::{Nick, RoomName};

    /// A message of room `r` with `seq`, for unit tests.
    pub(crate) fn msg(seq: u64) -> Arc<Message> {
        Arc::new(Message {
            room: RoomName::parse("r").unwrap(),
            seq,
            id: uuid::Uuid::now_v7(),
            nick: Nick::parse("n").unwrap(),
            text: format!("m{seq}"),
            kind: MessageKind::Text,
            ts: Timestamp(0),
        })
    }

    #[test]
    fn keeps_the_last_ten_in_order() {
        let mut h = History::default();
        assert!(h.is_empty());
        assert_eq!(h.last_seq(), 0);
        for seq in 1..=15 {
            h.push(msg(seq));
        }
        let seqs: Vec<u64> = h.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (6..=15).collect::<Vec<_>>());
        assert_eq!(h.len(), RING);
        assert_eq!(h.last_seq(), 15);
    }

    #[test]
    fn seeds_from_storage() {
        let h = History::from_stored((1..=3).map(msg));
        assert_eq!(h.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    }
}
