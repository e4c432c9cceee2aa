//! A room: who is in it on this instance, and its recent messages.

use std::collections::{BTreeSet, HashMap};

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::oneshot;

use super::event::Event;
use super::history::History;
use super::sessions::SessionId;

/// One room as this instance sees it. A room is created on first join and kept
/// (with its ring) after its last member leaves, so a later join still replays.
#[derive(Debug, Default)]
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
    pub ahead: HashMap<SessionId, u64>,
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
