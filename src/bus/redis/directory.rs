//! The cluster's directory on Redis: nick leases, room memberships and live
//! instances, with the same promises as the poll bus's tables.
//!
//! ```text
//! {C:dir}:nick:KEY     "instance\tlife.owner\tnick", PX lease   who holds a nick
//! {C:dir}:room:ROOM    hash nick key -> "instance\tnick"    a room's members
//! {C:dir}:rooms        set of rooms with members
//! {C:dir}:held:INST    set of "room\tnick key"              what INST's members are in
//! {C:dir}:alive:INST   PX lease                             a live instance
//! {C:dir}:instances    set of registered instances
//! ```
//!
//! Every instance renews its lease and its nicks' leases each heartbeat.
//! Members of an instance whose lease ran out stop counting at once, and the
//! first instance to notice *reaps* them (one atomic script), announcing
//! their `leave` to the rooms' members everywhere. An instance that finds it
//! was reaped (it stalled, or lost Redis for longer than the lease) asserts
//! its nicks and memberships again; a nick someone else took meanwhile is
//! reported, not stolen back.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;

use super::RedisBus;
use super::keys::Keys;
use super::rooms::unreachable;
use super::script::{self, Lua};
use super::wire::PresenceWire;
use crate::core::ports::{BusError, Directory, Presence};
use crate::core::{DirectMessage, Nick, NickKey, RoomCount, RoomName, SessionId};

/// How long an instance (and each of its nicks) may go unrenewed before the
/// others count it gone.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often an instance renews its leases.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long no instance may have beaten, by Redis's clock, before the
/// directory counts it an outage everyone saw (see `script::calm!`). A live
/// instance renews at most a heartbeat before such a gap begins, so its lease
/// outlives any shorter one: `OUTAGE_GAP + HEARTBEAT` must stay well inside
/// `LEASE`.
pub const OUTAGE_GAP: Duration = Duration::from_secs(5);
const _: () = assert!(OUTAGE_GAP.as_secs() + 2 * HEARTBEAT.as_secs() < LEASE.as_secs());
/// Claims renewed per script call.
const RENEW_BATCH: usize = 500;

/// The directory's scripts and what this instance holds.
pub struct Registry {
    keys: Keys,
    instance: String,
    /// This instance's nicks, and the rooms each is in: what the heartbeat
    /// renews and what a reaped instance asserts again.
    held: StdMutex<HashMap<NickKey, Held>>,
    claim: Lua,
    renew: Lua,
    release: Lua,
    join: Lua,
    leave: Lua,
    members: Lua,
    rooms: Lua,
    heartbeat: Lua,
    reap: Lua,
    take_name: Lua,
    /// This life of the instance: a random token, so that no value it writes
    /// into its live-instance key is one a previous life wrote.
    life: u64,
    /// Heartbeats so far, written into the live-instance key.
    beats: AtomicU64,
    /// This instance was reaped (or Redis lost its registration) and has not
    /// yet put back every membership: kept until a beat does it whole, since
    /// only the first beat after a reap is told so.
    reassert: AtomicBool,
    /// Joins this instance could not record in Redis, or not announce:
    /// each heartbeat tries them again while their user is still in the room.
    unrecorded: Pending,
    /// Leaves Redis failed: each heartbeat tries them again unless the user
    /// is back in the room.
    unleft: Pending,
}

/// Membership changes Redis failed, for the heartbeats to make again. At
/// most one entry per room and spelling of a nick, and each is made (or
/// dropped) at the first beat Redis answers: what stays is bounded by the
/// joins, leaves and renames made while Redis was failing them.
#[derive(Default)]
struct Pending(StdMutex<Vec<(RoomName, Nick)>>);

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(RoomName, Nick)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, room: &RoomName, nick: &Nick) {
        let mut pending = self.lock();
        if !pending.iter().any(|(r, n)| r == room && n == nick) {
            pending.push((room.clone(), nick.clone()));
        }
    }

    /// Drops the entry of `room` and `nick` (in any spelling).
    fn clear(&self, room: &RoomName, nick: &Nick) {
        self.lock()
            .retain(|(r, n)| !(r == room && n.key() == nick.key()));
    }

    /// Makes each change again with `make`, oldest first. Stops at the first
    /// that fails (Redis is likely away again, and each try could take a
    /// command timeout of the heartbeat's time) and keeps the rest for the
    /// next beat, the failed one last: one change Redis keeps refusing must
    /// not hold up the others for good.
    async fn retry<F, Fut>(&self, what: &str, mut make: F)
    where
        F: FnMut(RoomName, Nick) -> Fut,
        Fut: std::future::Future<Output = Result<(), BusError>>,
    {
        let mut pending = std::mem::take(&mut *self.lock()).into_iter();
        while let Some((room, nick)) = pending.next() {
            if let Err(err) = make(room.clone(), nick.clone()).await {
                tracing::warn!(cause = %err, %room, %nick, "redis bus: could not record a {what} yet");
                for (room, nick) in pending {
                    self.add(&room, &nick);
                }
                self.add(&room, &nick);
                return;
            }
        }
    }
}

/// What recording a membership did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recorded {
    /// The instance is not alive, or no longer holds the nick.
    Refused,
    /// It was recorded already.
    Already,
    New,
}

#[derive(Debug, Clone)]
struct Held {
    nick: Nick,
    owner: SessionId,
    rooms: BTreeSet<RoomName>,
}

impl Registry {
    /// The directory of `instance` under `keys`.
    pub fn new(keys: Keys, instance: &str) -> Self {
        Registry {
            keys,
            instance: instance.to_owned(),
            held: StdMutex::default(),
            claim: Lua::new(script::CLAIM),
            renew: Lua::new(script::RENEW),
            release: Lua::new(script::RELEASE),
            join: Lua::new(script::JOIN),
            leave: Lua::new(script::LEAVE),
            members: Lua::new(script::MEMBERS),
            rooms: Lua::new(script::ROOMS),
            heartbeat: Lua::new(script::HEARTBEAT),
            reap: Lua::new(script::REAP),
            take_name: Lua::new(script::TAKE_NAME),
            life: rand::random(),
            beats: AtomicU64::new(0),
            reassert: AtomicBool::new(false),
            unrecorded: Pending::default(),
            unleft: Pending::default(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<NickKey, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn nick_key(&self, nick: &Nick) -> String {
        self.keys.dir(&format!("nick:{}", nick.key().as_str()))
    }

    fn room_key(&self, room: &RoomName) -> String {
        self.keys.dir(&format!("room:{room}"))
    }

    /// What recording or removing a membership in `room` writes: the room's
    /// member hash, the set of rooms with members, this instance's index.
    fn membership_keys(&self, room: &RoomName) -> Vec<String> {
        vec![
            self.room_key(room),
            self.keys.dir("rooms"),
            self.held_key(&self.instance),
        ]
    }

    /// The index of the memberships `instance`'s users hold.
    fn held_key(&self, instance: &str) -> String {
        self.keys.dir(&format!("held:{instance}"))
    }

    /// What heartbeat number `beat` of this life writes into the live-instance
    /// key: unique to the life, so a namesake's beats never match a value
    /// watched from a previous life.
    fn beat_value(&self, beat: u64) -> String {
        format!("{}{beat}", self.life_prefix())
    }

    /// What every beat value of this life starts with.
    fn life_prefix(&self) -> String {
        format!("{}:", self.life())
    }

    /// This life's token, as nick holders and DMs carry it.
    pub fn life(&self) -> String {
        format!("{:016x}", self.life)
    }

    /// The key whose lease says this instance is alive.
    fn alive_key(&self) -> String {
        self.keys.dir(&format!("alive:{}", self.instance))
    }

    fn alive_prefix(&self) -> String {
        self.keys.dir("alive:")
    }

    /// What a nick's value starts with while `owner` holds it. With the
    /// life in it: session ids start again at 1 in every life, so without
    /// it an instance woken after a namesake took its name over would give
    /// back (`RELEASE`) the nick of the namesake's session of the same id.
    fn holder(&self, owner: SessionId) -> String {
        format!("{}\t{}.{owner}\t", self.instance, self.life())
    }

    fn lease_ms() -> String {
        LEASE.as_millis().to_string()
    }

    fn gap_ms() -> String {
        OUTAGE_GAP.as_millis().to_string()
    }

    /// The keys of the outage rule: the last heartbeat's time, and the grace.
    fn outage_keys(&self) -> [String; 2] {
        [self.keys.dir("tick"), self.keys.dir("grace")]
    }

    /// One heartbeat: renew this instance's lease and its nicks', assert its
    /// claims again if it was reaped, and reap instances that died. Returns
    /// the memberships this call reaped (to announce), and this instance's
    /// claims another session took while it was away (session, nick).
    pub async fn beat(
        &self,
        cmd: &Client,
    ) -> Result<(Vec<(RoomName, Nick)>, Vec<(SessionId, Nick)>), BusError> {
        self.beat_and(cmd, |_| {}).await
    }

    /// Has the heartbeats record (and announce) `nick`'s join of `room`
    /// until it is done or the user has left: Redis failed it.
    pub fn record_later(&self, room: &RoomName, nick: &Nick) {
        self.unrecorded.add(room, nick);
    }

    /// Has the heartbeats remove `nick` from `room` (and announce it) until
    /// it is done or the user is back in the room: Redis failed the leave.
    pub fn leave_later(&self, room: &RoomName, nick: &Nick) {
        self.unleft.add(room, nick);
    }

    /// Has the heartbeats finish a rename Redis failed (moving a membership,
    /// or announcing it): `old` leaves and `new` joins each of `rooms`, each
    /// announced, so the others list the new nick where the old one was.
    fn rename_later(&self, rooms: &BTreeSet<RoomName>, old: &Nick, new: &Nick) {
        for room in rooms {
            self.leave_later(room, old);
            self.record_later(room, new);
        }
    }

    /// Whether `nick`, spelt so, is held here and in `room` (after a rename
    /// to another case, recording the old spelling would bring it back).
    fn holds(&self, room: &RoomName, nick: &Nick) -> bool {
        self.in_room(room, nick).as_ref() == Some(nick)
    }

    /// How the user held here under `nick`'s key spells it now, if they are
    /// in `room`.
    fn in_room(&self, room: &RoomName, nick: &Nick) -> Option<Nick> {
        let held = self.held();
        let h = held.get(&nick.key())?;
        h.rooms.contains(room).then(|| h.nick.clone())
    }

    /// `nick`'s join of `room` is recorded and announced: nothing is left
    /// for the heartbeats to do (and announce twice).
    fn recorded(&self, room: &RoomName, nick: &Nick) {
        self.unrecorded.clear(room, nick);
    }

    /// Records and announces the joins Redis failed, while their users are
    /// still in the room.
    async fn record_unrecorded(&self, cmd: &Client) {
        let record = |room: RoomName, nick: Nick| async move {
            if !self.holds(&room, &nick)
                || self.record(cmd, &room, &nick).await? == Recorded::Refused
            {
                return Ok(()); // left since, or the nick is lost (renamed)
            }
            // Announced whether this record or the failed join's wrote it:
            // an announcement that failed left no other trace.
            let change = Presence::Joined {
                room: room.clone(),
                nick,
            };
            self.announce_in_room(cmd, &room, &change).await
        };
        self.unrecorded.retry("join", record).await;
    }

    /// Removes and announces the leaves Redis failed, unless their user is
    /// back in the room (whose join recorded the membership anew).
    async fn leave_unleft(&self, cmd: &Client) {
        let leave = |room: RoomName, nick: Nick| async move {
            // Back under any spelling: the membership is theirs again.
            if self.in_room(&room, &nick).is_some() {
                return Ok(());
            }
            // Announced whether this LEAVE or the failed one removed it: an
            // announcement that failed, or a reply that was lost, left no
            // other trace. Not if the nick is someone else's in the room
            // now (given up, then taken): that would tell the room they left.
            if self.remove_member(cmd, &room, &nick).await? == Removal::Taken {
                return Ok(());
            }
            let change = Presence::Left {
                room: room.clone(),
                nick,
            };
            self.announce_in_room(cmd, &room, &change).await
        };
        self.unleft.retry("leave", leave).await;
    }

    /// [`Self::beat`], calling `renewed` with the claims found lost as soon
    /// as the renewal is done: before the re-assertion, whose `join`s others
    /// may answer at once.
    pub async fn beat_and(
        &self,
        cmd: &Client,
        renewed: impl FnOnce(&[(SessionId, Nick)]),
    ) -> Result<(Vec<(RoomName, Nick)>, Vec<(SessionId, Nick)>), BusError> {
        let beat = self.beats.fetch_add(1, Ordering::Relaxed) + 1;
        let fresh: i64 = self
            .heartbeat
            .call(
                cmd,
                [
                    [self.alive_key(), self.keys.dir("instances")],
                    self.outage_keys(),
                ]
                .concat(),
                vec![
                    self.instance.clone(),
                    Self::lease_ms(),
                    self.beat_value(beat),
                    Self::gap_ms(),
                    script::TICK_TTL_MS.to_owned(),
                    self.life_prefix(),
                ],
            )
            .await
            .map_err(unreachable)?;
        if fresh == -1 {
            return Err(BusError::Superseded(self.instance.clone()));
        }
        if fresh == 1 {
            // Set at once: only this beat is told, and a renewal below may
            // still fail.
            self.reassert.store(true, Ordering::Relaxed);
        }
        let held: Vec<Held> = self.held().values().cloned().collect();
        let mut lost = Vec::new();
        for chunk in held.chunks(RENEW_BATCH) {
            let keys = chunk.iter().map(|h| self.nick_key(&h.nick)).collect();
            let mut args = vec![Self::lease_ms()];
            for h in chunk {
                args.push(format!("{}{}", self.holder(h.owner), h.nick));
                args.push(self.holder(h.owner));
            }
            let gone: Vec<i64> = self
                .renew
                .call(cmd, keys, args)
                .await
                .map_err(unreachable)?;
            lost.extend(
                gone.into_iter()
                    .filter_map(|i| chunk.get(usize::try_from(i - 1).ok()?))
                    .map(|h| (h.owner, h.nick.clone())),
            );
        }
        renewed(&lost);
        if self.reassert.load(Ordering::Relaxed) {
            // Reaped while away (or just started, holding nothing): the
            // memberships are gone from Redis; put back those still held.
            // A failure below leaves the flag set, and the next beat tries
            // them all again (recording one twice changes nothing).
            for h in &held {
                if lost.iter().any(|(_, nick)| nick == &h.nick) {
                    continue;
                }
                for room in &h.rooms {
                    // Left since the snapshot: recording it would bring the
                    // membership back after its LEAVE.
                    if !self.holds(room, &h.nick) {
                        continue;
                    }
                    match self.record(cmd, room, &h.nick).await? {
                        Recorded::New => {}
                        // Taken since the renewal: the next beat says so.
                        Recorded::Refused => continue,
                        // Put back (and announced) by an earlier try.
                        Recorded::Already => continue,
                    }
                    let change = Presence::Joined {
                        room: room.clone(),
                        nick: h.nick.clone(),
                    };
                    self.announce_in_room(cmd, room, &change).await?;
                    self.recorded(room, &h.nick);
                }
            }
            self.reassert.store(false, Ordering::Relaxed);
        }
        for (_, nick) in &lost {
            tracing::warn!(%nick, "a nick this instance held was taken while it was away");
            self.held().remove(&nick.key());
        }
        self.record_unrecorded(cmd).await;
        self.leave_unleft(cmd).await;
        let reaped = self.reap(cmd, "").await?;
        Ok((reaped, lost))
    }

    /// Reaps dead instances, and `forget` (an instance name, or "") whatever
    /// its lease says; returns the memberships removed.
    async fn reap(&self, cmd: &Client, forget: &str) -> Result<Vec<(RoomName, Nick)>, BusError> {
        let reaped: Vec<String> = self
            .reap
            .call(
                cmd,
                [
                    [self.keys.dir("instances"), self.keys.dir("rooms")],
                    self.outage_keys(),
                ]
                .concat(),
                vec![
                    self.alive_prefix(),
                    self.keys.dir("room:"),
                    forget.to_owned(),
                    self.keys.dir("held:"),
                    Self::lease_ms(),
                    Self::gap_ms(),
                ],
            )
            .await
            .map_err(unreachable)?;
        Ok(reaped
            .chunks(2)
            .filter_map(|pair| {
                Some((
                    RoomName::parse(pair.first()?).ok()?,
                    Nick::parse(pair.get(1)?).ok()?,
                ))
            })
            .collect())
    }

    /// Before this instance serves: what a previous life under its name left
    /// (it was killed less than a lease ago) leaves now, announced.
    ///
    /// A live-instance key under this name may also be a running instance
    /// given the same name by mistake; forgetting it would give its users
    /// away. So the key is watched until its lease runs out: if its beat
    /// changes first, this instance refuses to start. A namesake stalled
    /// past its lease meanwhile is fenced by then (it sends nothing for its
    /// users), and its next heartbeat finds this life's token and stops it.
    pub async fn forget_previous_life(&self, cmd: &Client) -> Result<(), BusError> {
        let look = || cmd.get::<Option<String>, _>(self.alive_key());
        let mut watched = look().await.map_err(unreachable)?;
        if let Some(before) = watched.take() {
            tracing::info!(
                instance = %self.instance,
                "this instance's name has a lease: waiting until it runs out, to tell a previous life from a running namesake"
            );
            // The key expires a lease after its last beat, on Redis's clock;
            // the watch ends by then, give or take a look.
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                match look().await.map_err(unreachable)? {
                    None => break,
                    Some(now) if now != before => {
                        return Err(BusError::NameTaken(self.instance.clone()));
                    }
                    Some(_) => {}
                }
            }
        }
        // Taken only if it still holds what was watched: of two instances
        // starting under one name at once, one gets it.

        let taken: i64 = self
            .take_name
            .call(
                cmd,
                [
                    vec![self.alive_key()],
                    self.outage_keys().to_vec(),
                    vec![self.keys.dir("instances")],
                ]
                .concat(),
                vec![
                    watched.unwrap_or_default(),
                    self.beat_value(0),
                    Self::lease_ms(),
                    Self::gap_ms(),
                    self.instance.clone(),
                    script::TICK_TTL_MS.to_owned(),
                ],
            )
            .await
            .map_err(unreachable)?;
        if taken == 0 {
            return Err(BusError::NameTaken(self.instance.clone()));
        }
        for (room, nick) in self.reap(cmd, &self.instance).await? {
            self.announce_in_room(
                cmd,
                &room,
                &Presence::Left {
                    room: room.clone(),
                    nick,
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Takes `nick` for `owner` (or renews its hold): false if another
    /// session holds it, `Recovering` if it is free but the directory is in
    /// an outage's grace.
    async fn claim(&self, cmd: &Client, nick: &Nick, owner: SessionId) -> Result<bool, BusError> {
        let held: i64 = self
            .claim
            .call(
                cmd,
                [
                    vec![self.nick_key(nick)],
                    self.outage_keys().to_vec(),
                    vec![self.alive_key()],
                ]
                .concat(),
                vec![
                    format!("{}{nick}", self.holder(owner)),
                    self.holder(owner),
                    Self::lease_ms(),
                    Self::gap_ms(),
                    self.life_prefix(),
                ],
            )
            .await
            .map_err(unreachable)?;
        match held {
            -1 => Err(BusError::Recovering {
                lease_secs: LEASE.as_secs(),
            }),
            -2 => Err(BusError::Superseded(self.instance.clone())),
            held => Ok(held == 1),
        }
    }

    /// Records `nick`'s membership of `room`, if this instance is alive and
    /// still holds the nick; false if not (nothing was recorded).
    async fn record_join(
        &self,
        cmd: &Client,
        room: &RoomName,
        nick: &Nick,
    ) -> Result<bool, BusError> {
        Ok(self.record(cmd, room, nick).await? != Recorded::Refused)
    }

    /// [`Self::record_join`], saying whether the membership is new.
    async fn record(
        &self,
        cmd: &Client,
        room: &RoomName,
        nick: &Nick,
    ) -> Result<Recorded, BusError> {
        let mut keys = self.membership_keys(room);
        keys.push(self.nick_key(nick));
        keys.push(self.alive_key());
        let recorded: i64 = self
            .join
            .call(
                cmd,
                keys,
                vec![
                    nick.key().as_str().to_owned(),
                    format!("{}\t{nick}", self.instance),
                    room.to_string(),
                    format!("{}\t", self.instance),
                    self.life_prefix(),
                ],
            )
            .await
            .map_err(unreachable)?;
        Ok(match recorded {
            0 => Recorded::Refused,
            1 => Recorded::Already,
            _ => Recorded::New,
        })
    }

    /// Tells the members of `room` on other instances (those that hear it).
    pub async fn announce_in_room(
        &self,
        cmd: &Client,
        room: &RoomName,
        change: &Presence,
    ) -> Result<(), BusError> {
        let payload = PresenceWire::new(&self.instance, change).payload();
        let _: i64 = cmd
            .spublish(self.keys.room_channel(room), payload)
            .await
            .map_err(unreachable)?;
        Ok(())
    }

    /// Gives up everything this instance holds (it is stopping).
    pub async fn forget_all(&self, cmd: &Client) {
        // First the leaves Redis failed: the index of what this instance's
        // users are in (what reaping reads) is deleted below, and a member
        // left there would be listed again under the next life of the name.
        self.leave_unleft(cmd).await;
        let held: Vec<Held> = self.held().drain().map(|(_, h)| h).collect();
        for h in held {
            let _ = self.give_up(cmd, &h.nick, h.owner, &h.rooms).await;
        }
        let _: Result<i64, _> = cmd
            .srem(self.keys.dir("instances"), self.instance.as_str())
            .await;
        let _: Result<i64, _> = cmd
            .del(vec![self.alive_key(), self.held_key(&self.instance)])
            .await;
    }

    /// Leaves `rooms` as `nick` and frees the nick if `owner` holds it.
    async fn give_up(
        &self,
        cmd: &Client,
        nick: &Nick,
        owner: SessionId,
        rooms: &BTreeSet<RoomName>,
    ) -> Result<(), BusError> {
        for room in rooms {
            if self.remove_member(cmd, room, nick).await? == Removal::Removed {
                let change = Presence::Left {
                    room: room.clone(),
                    nick: nick.clone(),
                };
                self.announce_in_room(cmd, room, &change).await?;
            }
        }
        let _: i64 = self
            .release
            .call(cmd, vec![self.nick_key(nick)], vec![self.holder(owner)])
            .await
            .map_err(unreachable)?;
        Ok(())
    }

    async fn remove_member(
        &self,
        cmd: &Client,
        room: &RoomName,
        nick: &Nick,
    ) -> Result<Removal, BusError> {
        let removed: i64 = self
            .leave
            .call(
                cmd,
                [self.membership_keys(room), vec![self.alive_key()]].concat(),
                vec![
                    nick.key().as_str().to_owned(),
                    self.instance.clone(),
                    room.to_string(),
                    self.life_prefix(),
                ],
            )
            .await
            .map_err(unreachable)?;
        Ok(match removed {
            1 => Removal::Removed,
            2 => Removal::Taken,
            _ => Removal::Absent,
        })
    }
}

/// What a LEAVE found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// This instance's membership, now removed.
    Removed,
    /// Another instance's: the nick is someone else's now.
    Taken,
    /// None.
    Absent,
}

#[async_trait]
impl Directory for RedisBus {
    async fn claim_nick(&self, nick: &Nick, owner: SessionId) -> Result<bool, BusError> {
        let dir = &self.inner.registry;
        let held = dir.claim(&self.inner.cmd, nick, owner).await?;
        if held {
            let mut map = dir.held();
            let entry = map.entry(nick.key()).or_insert_with(|| Held {
                nick: nick.clone(),
                owner,
                rooms: BTreeSet::new(),
            });
            entry.nick = nick.clone();
            entry.owner = owner;
        }
        Ok(held)
    }

    async fn release_nick(&self, nick: &Nick, owner: SessionId) -> Result<(), BusError> {
        let dir = &self.inner.registry;
        let rooms = {
            let mut map = dir.held();
            match map.get(&nick.key()) {
                Some(h) if h.owner == owner => map.remove(&nick.key()).map(|h| h.rooms),
                _ => None,
            }
        }
        .unwrap_or_default();
        let gave_up = dir.give_up(&self.inner.cmd, nick, owner, &rooms).await;
        if gave_up.is_err() {
            // The nick's lease runs out by itself; the rooms would not.
            for room in &rooms {
                dir.leave_later(room, nick);
            }
        }
        gave_up
    }

    async fn renamed(&self, old: &Nick, new: &Nick, owner: SessionId) -> Result<(), BusError> {
        let dir = &self.inner.registry;
        let cmd = &self.inner.cmd;
        let rooms = {
            let mut map = dir.held();
            let rooms = map.remove(&old.key()).map(|h| h.rooms).unwrap_or_default();
            map.insert(
                new.key(),
                Held {
                    nick: new.clone(),
                    owner,
                    rooms: rooms.clone(),
                },
            );
            rooms
        };
        // Room by room. If Redis fails one, the heartbeats move them all
        // again and announce each as a leave and a join (else the others
        // would list the old nick there, and not the new one, for as long
        // as this instance lives; and nobody would be told of the rooms
        // already moved, since the rename below is not announced).
        for room in &rooms {
            let moved = async {
                dir.remove_member(cmd, room, old).await?;
                dir.record_join(cmd, room, new).await
            };
            if let Err(err) = moved.await {
                dir.rename_later(&rooms, old, new);
                return Err(err);
            }
        }
        // A change of case keeps the key, whose claim is now the new nick's.
        // Announced even if giving the old one back fails (its lease runs
        // out by itself; nothing else would tell the others).
        let released = if old.key() != new.key() {
            dir.release
                .call::<i64, _>(cmd, vec![dir.nick_key(old)], vec![dir.holder(owner)])
                .await
                .map(drop)
                .map_err(unreachable)
        } else {
            Ok(())
        };
        if !rooms.is_empty() {
            let change = Presence::Renamed {
                old: old.clone(),
                new: new.clone(),
                rooms: rooms.iter().cloned().collect(),
            };
            let payload = PresenceWire::new(&dir.instance, &change).payload();
            let announced: Result<i64, _> = cmd.spublish(dir.keys.all_channel(), payload).await;
            if let Err(err) = announced {
                // Refused (Redis away, or the channel's slot just moved to
                // another shard): the heartbeats announce it room by room,
                // as a leave and a join, rather than nobody hearing of it.
                dir.rename_later(&rooms, old, new);
                return Err(unreachable(err));
            }
        }
        released
    }

    async fn joined(&self, room: &RoomName, nick: &Nick, delivered: u64) -> Result<(), BusError> {
        let dir = &self.inner.registry;
        // Held first: whatever fails below, the membership is this
        // instance's to record, and a later heartbeat records it.
        if let Some(h) = dir.held().get_mut(&nick.key()) {
            h.rooms.insert(room.clone());
        }
        // A subscription Redis does not confirm is tried again every
        // heartbeat; the user is in the room all the same.
        if let Err(err) = self.inner.rooms.watch(room, delivered).await {
            tracing::warn!(cause = %err, %room, "redis bus: a member's room is not subscribed yet");
        }
        let recorded = async {
            if !dir.record_join(&self.inner.cmd, room, nick).await? {
                // The join reached Redis after this instance lost the nick
                // (it stalled past its lease): nothing to announce, and the
                // next heartbeat renames the user.
                return Ok(());
            }
            let change = Presence::Joined {
                room: room.clone(),
                nick: nick.clone(),
            };
            dir.announce_in_room(&self.inner.cmd, room, &change).await
        }
        .await;
        match recorded {
            // Not in Redis, or not announced: the heartbeats try again.
            Err(_) => dir.record_later(room, nick),
            // A failed earlier join of the room needs nothing more.
            Ok(()) => dir.recorded(room, nick),
        }
        recorded
    }

    async fn left(&self, room: &RoomName, nick: &Nick) -> Result<(), BusError> {
        let dir = &self.inner.registry;
        if let Some(h) = dir.held().get_mut(&nick.key()) {
            h.rooms.remove(room);
        }
        let done = async {
            if dir.remove_member(&self.inner.cmd, room, nick).await? == Removal::Removed {
                let change = Presence::Left {
                    room: room.clone(),
                    nick: nick.clone(),
                };
                dir.announce_in_room(&self.inner.cmd, room, &change).await?;
            }
            Ok(())
        }
        .await;
        if done.is_err() {
            // Else listed in the room by the others for this instance's life.
            dir.leave_later(room, nick);
        }
        done
    }

    async fn members(&self, room: &RoomName) -> Result<Vec<Nick>, BusError> {
        let dir = &self.inner.registry;
        let nicks: Vec<String> = dir
            .members
            .call(
                &self.inner.cmd,
                vec![dir.room_key(room)],
                vec![dir.alive_prefix()],
            )
            .await
            .map_err(unreachable)?;
        let mut nicks: Vec<Nick> = nicks.iter().filter_map(|n| Nick::parse(n).ok()).collect();
        nicks.sort_by_key(Nick::key);
        Ok(nicks)
    }

    async fn rooms(&self) -> Result<Vec<RoomCount>, BusError> {
        let dir = &self.inner.registry;
        let flat: Vec<Value> = dir
            .rooms
            .call(
                &self.inner.cmd,
                vec![dir.keys.dir("rooms")],
                vec![dir.keys.dir("room:"), dir.alive_prefix()],
            )
            .await
            .map_err(unreachable)?;
        let mut rooms: Vec<RoomCount> = flat
            .chunks(2)
            .filter_map(|pair| {
                Some(RoomCount {
                    room: RoomName::parse(&pair.first()?.as_string()?).ok()?,
                    members: usize::try_from(pair.get(1)?.as_i64()?).ok()?,
                })
            })
            .collect();
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        Ok(rooms)
    }

    async fn send_dm(&self, dm: &DirectMessage) -> Result<Option<Nick>, BusError> {
        self.inner.fence.check()?;
        let dir = &self.inner.registry;
        let holder: Option<String> = self
            .inner
            .cmd
            .get(dir.nick_key(&dm.to))
            .await
            .map_err(unreachable)?;
        let Some(holder) = holder else {
            return Ok(None);
        };
        let mut parts = holder.splitn(3, '\t');
        let (Some(instance), Some(owner), Some(nick)) = (parts.next(), parts.next(), parts.next())
        else {
            return Ok(None);
        };
        let Ok(to) = Nick::parse(nick) else {
            return Ok(None);
        };
        // The holder's life (see `Registry::holder`), so that only it shows the DM.
        let life = owner.split_once('.').map(|(life, _)| life);
        self.inner
            .post
            .send(&self.inner.cmd, instance, life, dm, &to)
            .await?;
        Ok(Some(to))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A client of the Redis tests use (`BABY_TEST_REDIS`, default
    /// 127.0.0.1:6379), or `None` with the reason printed; with
    /// `BABY_REQUIRE_SERVICES=1` a missing Redis fails the test instead.
    pub(in crate::bus::redis) async fn redis() -> Option<Client> {
        let addr = std::env::var("BABY_TEST_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into());
        let connected = async {
            let config = Config::from_url(&format!("redis://{addr}")).map_err(|e| e.to_string())?;
            let client = Builder::from_config(config)
                .build()
                .map_err(|e| e.to_string())?;
            let init = tokio::time::timeout(Duration::from_secs(2), client.init());
            init.await
                .map_err(|_| "timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(client)
        };
        match connected.await {
            Ok(client) => Some(client),
            Err(why) if std::env::var("BABY_REQUIRE_SERVICES").as_deref() == Ok("1") => {
                panic!("Redis is required (BABY_REQUIRE_SERVICES=1) but unavailable: {why}")
            }
            Err(why) => {
                eprintln!("SKIPPED: Redis unavailable at {addr} ({why})");
                None
            }
        }
    }

    /// Claims `nick` for session 1 of `dir`'s instance.
    async fn claim(cmd: &Client, dir: &Registry, nick: &Nick) -> bool {
        dir.claim(cmd, nick, SessionId(1)).await.unwrap()
    }

    /// Keys under a cluster name no other test (or run) uses.
    fn fresh_keys(test: &str) -> Keys {
        Keys::new(&format!("test-{test}-{:08x}", rand::random::<u32>())).unwrap()
    }

    /// Registry `instance`, started as the daemon starts it: its previous
    /// life forgotten, then a first beat (a new cluster: no outage grace).
    async fn started(cmd: &Client, keys: &Keys, instance: &str) -> Registry {
        let registry = Registry::new(keys.clone(), instance);
        registry.forget_previous_life(cmd).await.unwrap();
        registry.beat(cmd).await.unwrap();
        registry
    }

    /// The directory keys a test of `instances` leaves behind, besides its
    /// nicks' and rooms'.
    fn directory_keys(keys: &Keys, instances: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = ["rooms", "instances", "tick", "grace"]
            .map(|k| keys.dir(k))
            .to_vec();
        for instance in instances {
            all.extend(
                [format!("alive:{instance}"), format!("held:{instance}")].map(|k| keys.dir(&k)),
            );
        }
        all
    }

    /// An instance that stalled with a `/join` on its way: by the time the
    /// join reaches Redis, its lease was reaped and a newcomer on another
    /// instance took the nick. The late join must not record the old holder
    /// in the room (nor overwrite the newcomer's membership there).
    #[tokio::test]
    async fn a_join_that_arrives_after_the_nick_was_taken_records_nothing() {
        let Some(cmd) = redis().await else {
            return;
        };
        let keys = fresh_keys("late-join");
        let (a, c) = (
            started(&cmd, &keys, "a").await,
            started(&cmd, &keys, "c").await,
        );
        let side = RoomName::parse("side").unwrap();
        let taker = Nick::parse("U7").unwrap();
        let late = Nick::parse("u7").unwrap();
        assert!(claim(&cmd, &a, &taker).await, "the newcomer takes the nick");
        assert!(a.record_join(&cmd, &side, &taker).await.unwrap());

        let recorded = c.record_join(&cmd, &side, &late).await.unwrap();
        let member: Option<String> = cmd
            .hget(c.room_key(&side), late.key().as_str())
            .await
            .unwrap();
        // Its own nick still records, while the instance is alive.
        let carol = Nick::parse("carol").unwrap();
        assert!(claim(&cmd, &c, &carol).await);
        let carol_recorded = c.record_join(&cmd, &side, &carol).await.unwrap();
        let _: Result<i64, _> = cmd.del(vec![c.keys.dir("alive:c")]).await;
        let after_lease = c.record_join(&cmd, &side, &carol).await.unwrap();
        let mut leftovers = directory_keys(&keys, &["a", "c"]);
        leftovers.extend([a.nick_key(&taker), a.nick_key(&carol), a.room_key(&side)]);
        let _: Result<i64, _> = cmd.del(leftovers).await;

        assert!(!recorded, "a join under a nick another holds is refused");
        assert_eq!(
            member.as_deref(),
            Some("a\tU7"),
            "the newcomer's membership stands"
        );
        assert!(carol_recorded, "a held nick on a live instance records");
        assert!(!after_lease, "without a lease nothing records");
    }

    /// A namesake took this instance's name over while it was away (its
    /// lease now holds another life's beat). Until its next heartbeat stops
    /// it, the woken instance must take nothing under the name: no nick,
    /// no membership; and that heartbeat says it was superseded.
    #[tokio::test]
    async fn an_instance_whose_name_another_life_holds_takes_nothing() {
        let Some(cmd) = redis().await else {
            return;
        };
        let keys = fresh_keys("superseded");
        let woken = started(&cmd, &keys, "a").await;
        let namesake = Registry::new(keys.clone(), "a");
        let (carol, dave) = (Nick::parse("carol").unwrap(), Nick::parse("dave").unwrap());
        let side = RoomName::parse("side").unwrap();
        assert!(claim(&cmd, &woken, &carol).await);
        // The namesake's first beat, as its start would write it.
        let _: () = cmd
            .set(woken.alive_key(), namesake.beat_value(0), None, None, false)
            .await
            .unwrap();

        let claimed = woken.claim(&cmd, &dave, SessionId(2)).await;
        let recorded = woken.record_join(&cmd, &side, &carol).await;
        let beat = woken.beat(&cmd).await;
        let mut leftovers = directory_keys(&keys, &["a"]);
        leftovers.extend([
            woken.nick_key(&carol),
            woken.nick_key(&dave),
            woken.room_key(&side),
        ]);
        let _: Result<i64, _> = cmd.del(leftovers).await;

        assert!(
            matches!(claimed, Err(BusError::Superseded(_))),
            "a nick was taken: {claimed:?}"
        );
        assert!(
            matches!(recorded, Ok(false)),
            "a membership was recorded: {recorded:?}"
        );
        assert!(
            matches!(beat, Err(BusError::Superseded(_))),
            "the heartbeat renewed another life's name: {beat:?}"
        );
    }

    /// The same, for what the woken instance gives back: a user of its
    /// leaving must not free the nick or the membership a user of the
    /// namesake holds, even with the same nick and the same session id
    /// (ids start again at 1 in every life).
    #[tokio::test]
    async fn an_instance_whose_name_another_life_holds_gives_back_nothing_of_its_namesake() {
        let Some(cmd) = redis().await else {
            return;
        };
        let keys = fresh_keys("give-back");
        let woken = started(&cmd, &keys, "a").await;
        let namesake = Registry::new(keys.clone(), "a");
        let carol = Nick::parse("carol").unwrap();
        let side = RoomName::parse("side").unwrap();
        assert!(claim(&cmd, &woken, &carol).await);
        assert!(woken.record_join(&cmd, &side, &carol).await.unwrap());
        // The namesake took the name over (the woken instance's users were
        // reaped meanwhile), and one of its users is carol in #side.
        let _: i64 = cmd.del(woken.nick_key(&carol)).await.unwrap();
        let _: () = cmd
            .set(woken.alive_key(), namesake.beat_value(0), None, None, false)
            .await
            .unwrap();
        assert!(claim(&cmd, &namesake, &carol).await);
        assert!(namesake.record_join(&cmd, &side, &carol).await.unwrap());
        let held_by_namesake: Option<String> = cmd.get(woken.nick_key(&carol)).await.unwrap();

        let gave_up = woken
            .give_up(&cmd, &carol, SessionId(1), &BTreeSet::from([side.clone()]))
            .await;
        let holder: Option<String> = cmd.get(woken.nick_key(&carol)).await.unwrap();
        let members: Vec<String> = namesake
            .members
            .call(
                &cmd,
                vec![namesake.room_key(&side)],
                vec![namesake.alive_prefix()],
            )
            .await
            .unwrap();
        let mut leftovers = directory_keys(&keys, &["a"]);
        leftovers.extend([woken.nick_key(&carol), woken.room_key(&side)]);
        let _: Result<i64, _> = cmd.del(leftovers).await;

        assert!(gave_up.is_ok(), "{gave_up:?}");
        assert_eq!(
            holder, held_by_namesake,
            "the namesake's nick was given back"
        );
        assert_eq!(members, ["carol"], "the namesake's membership was removed");
    }

    /// A join Redis failed is recorded by a later heartbeat, but not under
    /// a spelling its user has renamed away from meanwhile (`Carol` to
    /// `carol`: the same nick key, so the record would overwrite the new
    /// spelling in the room's members).
    #[tokio::test]
    async fn a_failed_join_is_not_recorded_under_a_spelling_renamed_away_from() {
        let Some(cmd) = redis().await else {
            return;
        };
        let keys = fresh_keys("unrecorded");
        let a = started(&cmd, &keys, "a").await;
        let (before, now) = (Nick::parse("Carol").unwrap(), Nick::parse("carol").unwrap());
        let side = RoomName::parse("side").unwrap();
        assert!(claim(&cmd, &a, &now).await);
        a.held().insert(
            now.key(),
            Held {
                nick: now.clone(),
                owner: SessionId(1),
                rooms: BTreeSet::from([side.clone()]),
            },
        );
        assert!(a.record_join(&cmd, &side, &now).await.unwrap());
        a.record_later(&side, &before);
        a.beat(&cmd).await.unwrap();

        let member: Option<String> = cmd
            .hget(a.room_key(&side), now.key().as_str())
            .await
            .unwrap();
        let mut leftovers = directory_keys(&keys, &["a"]);
        leftovers.extend([a.nick_key(&now), a.room_key(&side)]);
        let _: Result<i64, _> = cmd.del(leftovers).await;
        assert_eq!(member.as_deref(), Some("a\tcarol"));
    }

    /// A leave Redis failed is made by a later heartbeat, unless its user is
    /// back in the room by then: else the others would list the user in a
    /// room they left for as long as this instance lives.
    #[tokio::test]
    async fn a_failed_leave_is_made_by_a_later_beat_unless_the_user_is_back() {
        let Some(cmd) = redis().await else {
            return;
        };
        let keys = fresh_keys("unleft");
        let a = started(&cmd, &keys, "a").await;
        let side = RoomName::parse("side").unwrap();
        let nicks = [Nick::parse("carol").unwrap(), Nick::parse("dave").unwrap()];
        for nick in &nicks {
            assert!(claim(&cmd, &a, nick).await);
            a.held().insert(
                nick.key(),
                Held {
                    nick: nick.clone(),
                    owner: SessionId(1),
                    rooms: BTreeSet::new(),
                },
            );
            assert!(a.record_join(&cmd, &side, nick).await.unwrap());
            // Left while Redis failed it.
            a.leave_later(&side, nick);
        }
        // dave is back before the next beat.
        if let Some(h) = a.held().get_mut(&nicks[1].key()) {
            h.rooms.insert(side.clone());
        }
        a.beat(&cmd).await.unwrap();

        let mut members: Vec<String> = cmd.hkeys(a.room_key(&side)).await.unwrap();
        members.sort();
        let mut leftovers = directory_keys(&keys, &["a"]);
        leftovers.extend(nicks.iter().map(|n| a.nick_key(n)));
        leftovers.push(a.room_key(&side));
        let _: Result<i64, _> = cmd.del(leftovers).await;
        assert_eq!(members, ["dave"]);
    }

    /// A leave Redis failed, made by a later beat after the nick was given
    /// up (a rename whose announcement was refused) and taken by a user of
    /// another instance who is in the room: nothing is removed, and no
    /// leave is announced, which would tell the room its new holder left.
    #[tokio::test]
    async fn a_retried_leave_of_a_nick_someone_else_took_is_not_announced() {
        let Some(cmd) = redis().await else {
            return;
        };
        let keys = fresh_keys("taken");
        let (a, b) = (
            started(&cmd, &keys, "a").await,
            started(&cmd, &keys, "b").await,
        );
        let side = RoomName::parse("side").unwrap();
        let bob = Nick::parse("bob").unwrap();
        assert!(claim(&cmd, &a, &bob).await);
        assert!(a.record_join(&cmd, &side, &bob).await.unwrap());
        // bob renamed on a: his membership moved, his nick given back, and
        // the announcement refused, so the leave is left to the beat.
        a.remove_member(&cmd, &side, &bob).await.unwrap();
        let _: i64 = a
            .release
            .call(&cmd, vec![a.nick_key(&bob)], vec![a.holder(SessionId(1))])
            .await
            .unwrap();
        a.leave_later(&side, &bob);
        // Meanwhile a user of b takes the nick and joins.
        assert!(claim(&cmd, &b, &bob).await);
        assert!(b.record_join(&cmd, &side, &bob).await.unwrap());

        let sub = Builder::from_config(cmd.client_config())
            .build_subscriber_client()
            .unwrap();
        sub.init().await.unwrap();
        let mut heard = sub.message_rx();
        let channel = keys.room_channel(&side);
        sub.ssubscribe(channel.clone()).await.unwrap();
        a.beat(&cmd).await.unwrap();
        // Whatever the beat announced comes before this.
        let _: i64 = cmd.spublish(channel.clone(), "end").await.unwrap();
        let mut announced = Vec::new();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), heard.recv())
                .await
                .expect("the end marker arrives")
                .unwrap();
            let text: String = message.value.convert().unwrap();
            if text == "end" {
                break;
            }
            announced.push(text);
        }
        let members: HashMap<String, String> = cmd.hgetall(a.room_key(&side)).await.unwrap();
        let mut leftovers = directory_keys(&keys, &["a", "b"]);
        leftovers.extend([a.nick_key(&bob), a.room_key(&side)]);
        let _: Result<i64, _> = cmd.del(leftovers).await;
        let _ = sub.quit().await;
        assert!(announced.is_empty(), "announced: {announced:?}");
        assert_eq!(members.len(), 1, "b's membership stays: {members:?}");
        assert!(
            members.values().all(|v| v.starts_with("b\t")),
            "{members:?}"
        );
    }

    /// Reaped while away, the instance puts its users' rooms back on its next
    /// beat. Only that beat is told it was reaped, so if putting them back
    /// fails halfway (here: one room's key is made unwritable), a later beat
    /// must still finish the job.
    #[tokio::test]
    async fn a_re_assertion_that_fails_halfway_is_finished_by_a_later_beat() {
        let Some(cmd) = redis().await else {
            return;
        };
        let keys = fresh_keys("reassert");
        let a = started(&cmd, &keys, "a").await;
        let nick = Nick::parse("u1").unwrap();
        let rooms: BTreeSet<RoomName> = ["aaa", "zzz"]
            .iter()
            .map(|r| RoomName::parse(r).unwrap())
            .collect();
        assert!(claim(&cmd, &a, &nick).await);
        a.held().insert(
            nick.key(),
            Held {
                nick: nick.clone(),
                owner: SessionId(1),
                rooms: rooms.clone(),
            },
        );
        // Reaped, as by another instance while this one was away.
        a.reap(&cmd, "a").await.unwrap();
        let last = rooms.last().unwrap();
        let _: () = cmd
            .set(a.room_key(last), "not a hash", None, None, false)
            .await
            .unwrap();
        assert!(
            a.beat(&cmd).await.is_err(),
            "the sabotaged room fails the beat"
        );
        let _: i64 = cmd.del(a.room_key(last)).await.unwrap();
        a.beat(&cmd).await.unwrap();

        let mut members = Vec::new();
        for room in &rooms {
            let member: Option<String> = cmd
                .hget(a.room_key(room), nick.key().as_str())
                .await
                .unwrap();
            members.push(member);
        }
        let mut leftovers = directory_keys(&keys, &["a"]);
        leftovers.push(a.nick_key(&nick));
        leftovers.extend(rooms.iter().map(|r| a.room_key(r)));
        let _: Result<i64, _> = cmd.del(leftovers).await;
        assert_eq!(
            members,
            vec![Some("a\tu1".to_owned()); 2],
            "both rooms put back"
        );
    }
}
