//! The hub's side of the cluster directory's leases: what it reports when
//! its bus re-asserts this instance's claims, and how it renames a user whose
//! nick another session took while this instance was away.
//!
//! A nick lost that way is never fought over: the other session got it
//! fairly (this instance's lease had been reaped). The local user gets a
//! fresh guest nick instead, claimed cluster-wide first, and sees a `nick`
//! event from their old nick to the new one; that event is the notice (no
//! `error`: nothing the user did was refused). The rooms follow the user:
//! the other instances see the guest nick `join` them.

use std::time::Duration;

use super::ports::{BusError, Claim};
use super::{GUEST_DRAWS, Hub, Nick, SessionId, State, guest_nick};

/// How long to wait before trying a rename again while the directory is
/// unreachable.
const RETRY: Duration = Duration::from_secs(1);

impl Hub {
    /// Every local session's nick and rooms (with the last seq delivered in
    /// each room), for a bus that must re-assert them.
    pub(super) fn local_claims(&self) -> Vec<Claim> {
        let state = self.lock();
        state
            .sessions
            .keys()
            .filter_map(|&id| claim_of(&state, id))
            .collect()
    }

    /// `session` no longer holds `nick` in the cluster: rename it, in the
    /// background (this runs on the bus's delivery path, which must not wait).
    /// Returns the rename's task, if this call started one.
    pub(crate) fn claim_lost(
        &self,
        session: SessionId,
        nick: Nick,
    ) -> Option<tokio::task::JoinHandle<()>> {
        {
            let mut state = self.lock();
            if state.sessions.get(&session).is_none_or(|s| s.nick != nick) {
                return None; // ended or renamed since the bus looked
            }
            // Nothing more goes out under it, from now until the rename.
            if state.lost.insert(session, nick.clone()).as_ref() == Some(&nick) {
                // Already being renamed: a re-assertion cut short and tried
                // again reports the same loss. A second rename would claim
                // a second guest nick, record the rooms under it, and then
                // have to give both back.
                return None;
            }
        }
        tracing::warn!(%session, %nick, "nick taken by another session while this instance was away; renaming");
        let hub = self.clone();
        Some(tokio::spawn(
            async move { hub.rename_away(session, nick).await },
        ))
    }

    /// Another instance took this instance's name over while it was away:
    /// this one must stop serving (see [`Hub::halted`]).
    pub(super) fn superseded(&self, instance: String) {
        let why = BusError::Superseded(instance).to_string();
        tracing::error!("{why}");
        self.shared.halt.send_replace(Some(why));
    }

    /// Completes, with why, once the bus has said that this instance must
    /// stop serving: another instance took its name over while it was away,
    /// and holds what it held. Never completes otherwise.
    pub async fn halted(&self) -> String {
        let mut halt = self.shared.halt.subscribe();
        match halt.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            // The hub keeps the sender for its whole life.
            Err(_) => std::future::pending().await,
        }
    }

    fn still_called(&self, session: SessionId, nick: &Nick) -> bool {
        self.lock()
            .sessions
            .get(&session)
            .is_some_and(|s| s.nick == *nick)
    }

    /// Claims a fresh guest nick for `session`, records its rooms under it,
    /// then renames it locally. Retries while the directory is unreachable,
    /// for as long as the session still goes by `lost`.
    async fn rename_away(&self, session: SessionId, lost: Nick) {
        let Some(directory) = self.shared.bus.directory() else {
            return;
        };
        loop {
            if !self.still_called(session, &lost) {
                return;
            }
            let mut guest = None;
            for _ in 0..GUEST_DRAWS {
                let Some(candidate) = guest_nick(&self.lock().nicks) else {
                    break; // every guest nick is in use here: try again later
                };
                match directory.claim_nick(&candidate, session).await {
                    Ok(true) => {
                        guest = Some(candidate);
                        break;
                    }
                    Ok(false) => continue,
                    Err(err) => {
                        tracing::warn!(cause = %err, %lost, "cannot rename yet: directory unreachable");
                        break;
                    }
                }
            }
            let Some(guest) = guest else {
                tokio::time::sleep(RETRY).await;
                continue;
            };
            // The cluster knows the user by the new nick before the user does,
            // so a `/who` after the `nick` event already lists it.
            let rooms = claim_of(&self.lock(), session).map_or_else(Vec::new, |c| c.rooms);
            for (room, delivered) in &rooms {
                if let Err(err) = directory.joined(room, &guest, *delivered).await {
                    tracing::warn!(cause = %err, %room, "could not record the renamed user's room");
                }
            }
            if self
                .apply_rename(session, guest.clone(), Some(&lost))
                .renames()
            {
                return;
            }
            // The session ended or renamed itself meanwhile (or, rarely, a
            // local user took the guest nick first): give the guest nick
            // (and the rooms recorded under it) back, and look again. Not if
            // the session renamed itself to that very nick: it is its own.
            if self.still_called(session, &guest) {
                return;
            }
            if let Err(err) = directory.release_nick(&guest, session).await {
                tracing::warn!(cause = %err, %guest, "could not give back an unused guest nick; its lease will");
            }
        }
    }
}

/// What session `id` holds: its nick, and its rooms with the last seq this
/// instance delivered in each.
fn claim_of(state: &State, id: SessionId) -> Option<Claim> {
    let session = state.sessions.get(&id)?;
    let rooms = session
        .rooms
        .iter()
        .map(|room| {
            let seq = state.rooms.get(room).map_or(0, |r| r.history.last_seq());
            (room.clone(), seq)
        })
        .collect();
    Some(Claim {
        session: id,
        nick: session.nick.clone(),
        rooms,
    })
}
