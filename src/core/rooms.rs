//! A room: who is in it on this instance, and its recent messages.

use std::collections::BTreeSet;

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
}
