//! Subscriptions and order: which rooms this instance hears, and delivering
//! each in `seq` order with no hole.
//!
//! An instance `SSUBSCRIBE`s to a room's channel while its hub holds the room
//! (from the first local member or room-stream reader until the hub evicts
//! the room, `--room-idle` after the last one went: [`Rooms::forget`]) and to
//! its own and the cluster's channel always. Hearing a room exactly as long
//! as the hub holds it keeps the hub's ring current: a room the hub still
//! held but no longer heard would answer joins from a stale ring.
//!
//! Per room it keeps the last seq it delivered. A message is delivered when
//! it is the next one; a later one means messages went by unheard (a
//! reconnect, a lagging reader, a fresh subscription), and they are read from
//! the room's stream (`XRANGE`), or from the store if the stream was trimmed
//! past them, before it.
//!
//! A room whose subscription Redis did not confirm (a timeout, a shard that
//! was away, a refusal) is still held, with its cursor: what is published
//! here is delivered, and [`Rooms::retry`] subscribes it again until Redis
//! confirms, then reads what went by meanwhile. Without that, a member who
//! joined during a blip would be deaf to the rest of the cluster for as long
//! as they stayed.
//!
//! A subscription can also end without a word: a Redis Cluster that moves a
//! room's slot to another shard unsubscribes the room's channel, and the
//! client library drops that notice. So every heartbeat [`Rooms::audit`]
//! reads the held rooms' counters, one `MGET` per partition, which also
//! makes the command client learn of any slot that moved (Redis redirects
//! the read). A room whose slot now lives on another shard than the one it
//! was subscribed on, or in which a message numbered a heartbeat ago has
//! still not been heard, is subscribed again and read from its stream.
//!
//! Each room has a lock of its own, held across that room's reads: a room
//! whose catch-up waits on a slow store no longer holds up publishing in
//! the others. What the subscriber brings is still handed over one message
//! at a time, so that catch-up delays the other rooms' incoming messages
//! (and DMs) by as long; giving each room a queue of its own would end that.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::Server;
use fred::util::redis_keyslot;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::directory::HEARTBEAT;
use super::history::{self, Entry};
use super::keys::Keys;
use super::wire::seq_of_id;
use crate::core::ports::{BusError, Deliver, Envelope, Store};
use crate::core::{Message, RoomName};

/// How long a room subscription may take to be confirmed.
const SUBSCRIBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Most stream entries read per `XRANGE`.
const PAGE: u64 = 500;

/// Rooms heard and where each stands.
pub struct Rooms {
    keys: Keys,
    cmd: Client,
    sub: SubscriberClient,
    store: Arc<dyn Store>,
    heard: StdMutex<HashMap<RoomName, Arc<Mutex<Cursor>>>>,
    sink: StdMutex<Option<Arc<dyn Deliver>>>,
}

/// A heard room and its cursor.
type Held = (RoomName, Arc<Mutex<Cursor>>);

/// Where one heard room stands.
struct Cursor {
    /// The last seq delivered.
    delivered: u64,
    /// Redis confirmed the subscription and what went by before it was read.
    subscribed: bool,
    /// [`Rooms::forget`] took the room out; whoever still holds this cursor
    /// delivers nothing more through it.
    forgotten: bool,
    /// On a Cluster, the shard the subscription was made on.
    shard: Option<Server>,
    /// The room's counter as an audit read it, and when: every seq up to
    /// it should have been heard a heartbeat later.
    numbered: u64,
    numbered_at: Instant,
    /// The `numbered` the audit last subscribed the room again for: a hole
    /// neither the stream nor the store can fill is not tried for again.
    renewed_for: u64,
}

impl Cursor {
    /// Takes an audit's reading of the room's counter, made at `read`:
    /// whether a message numbered at the previous reading, at least a
    /// heartbeat earlier, is still not delivered. A reading less than a
    /// heartbeat after the last is not judged (audits can run close
    /// together when one was late), and the older one is kept.
    fn overdue(&mut self, counter: Option<u64>, read: Instant) -> bool {
        let Some(counter) = counter else {
            return false; // not read this time
        };
        if read.saturating_duration_since(self.numbered_at) < HEARTBEAT {
            return false;
        }
        let overdue = self.numbered > self.delivered && self.numbered > self.renewed_for;
        if overdue {
            self.renewed_for = self.numbered;
        }
        self.numbered = counter;
        self.numbered_at = read;
        overdue
    }
}

impl Rooms {
    /// Rooms heard through `sub`, filled through `cmd`.
    pub fn new(keys: Keys, cmd: Client, sub: SubscriberClient, store: Arc<dyn Store>) -> Self {
        Rooms {
            keys,
            cmd,
            sub,
            store,
            heard: StdMutex::default(),
            sink: StdMutex::default(),
        }
    }

    fn heard(&self) -> MutexGuard<'_, HashMap<RoomName, Arc<Mutex<Cursor>>>> {
        self.heard.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cursor(&self, room: &RoomName) -> Option<Arc<Mutex<Cursor>>> {
        self.heard().get(room).cloned()
    }

    /// Where delivered messages go.
    pub fn attach(&self, sink: Arc<dyn Deliver>) {
        *self.sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    /// Stops delivering (the bus is closing): nothing is delivered once this
    /// returns.
    pub fn detach(&self) {
        *self.sink.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Hears `room` from now on, counting from `delivered`; catches up from
    /// the stream with what was said since. On an error the room is held
    /// all the same, and [`Self::retry`] subscribes it later.
    pub async fn watch(&self, room: &RoomName, delivered: u64) -> Result<(), BusError> {
        loop {
            let cursor = self
                .heard()
                .entry(room.clone())
                .or_insert_with(|| {
                    Arc::new(Mutex::new(Cursor {
                        delivered,
                        subscribed: false,
                        forgotten: false,
                        shard: None,
                        numbered: 0,
                        numbered_at: Instant::now(),
                        renewed_for: 0,
                    }))
                })
                .clone();
            let mut cursor = cursor.lock().await;
            if cursor.forgotten {
                continue; // forgotten while this waited: a fresh entry now
            }
            cursor.delivered = cursor.delivered.max(delivered);
            if cursor.subscribed {
                return Ok(());
            }
            return self.subscribe(room, &mut cursor).await;
        }
    }

    /// Subscribes `room` and reads what it missed, marking it subscribed
    /// only when both are done.
    async fn subscribe(&self, room: &RoomName, cursor: &mut Cursor) -> Result<(), BusError> {
        let channel = self.keys.room_channel(room);
        // Where the subscriber sends it, read before: read after, a map that
        // learnt of a move meanwhile would name the new shard for a
        // subscription made (and ended) on the old one, and hide the move.
        // Read before, a stale record costs one subscription more.
        let shard = shard_of(&self.sub, &channel);
        // Bounded: a subscription whose confirmation never comes must not
        // hold the room (and every publish to it) for ever.
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.sub.ssubscribe(channel)).await
        {
            Ok(result) => result.map_err(|err| {
                BusError::Redis(format!(
                    "Redis refused the subscription to #{room} ({err}); trying again every heartbeat"
                ))
            })?,
            Err(_) => {
                return Err(BusError::Redis(format!(
                    "Redis did not confirm the subscription to #{room} within {SUBSCRIBE_TIMEOUT:?}; trying again every heartbeat"
                )));
            }
        }
        // What was said before the subscription took: since the hub's read
        // of the room (its ring, read stream-first, so the cursor is where
        // the room really stood), or since the last subscription lapsed.
        self.catch_up(room, cursor, None).await?;
        cursor.subscribed = true;
        cursor.shard = shard;
        Ok(())
    }

    /// Subscribes again every held room whose subscription Redis has not
    /// confirmed, and reads what each missed. Returns how many are still
    /// unconfirmed.
    pub async fn retry(&self) -> usize {
        let mut unconfirmed = 0;
        for (room, cursor) in self.snapshot() {
            let mut cursor = cursor.lock().await;
            if cursor.forgotten || cursor.subscribed {
                continue;
            }
            match self.subscribe(&room, &mut cursor).await {
                Ok(()) => tracing::info!(%room, "redis bus: room subscribed again"),
                Err(err) => {
                    tracing::debug!(cause = %err, %room, "redis bus: room still not subscribed");
                    unconfirmed += 1;
                }
            }
        }
        unconfirmed
    }

    /// Subscribes again every subscribed room that has stopped hearing its
    /// messages: its slot has moved to another shard (a resharding, whose
    /// notice fred drops), or a message numbered at an audit a heartbeat ago
    /// is still not delivered (any other silent loss). Costs one `MGET` per
    /// partition held.
    pub async fn audit(&self) {
        let held = self.snapshot();
        let read = Instant::now();
        let counters = self.counters(&held).await;
        let clustered = self.sub.is_clustered();
        // Read after the counters: a read redirected by a moved slot has
        // made the command client learn the cluster's new map.
        let map = clustered.then(|| self.cmd.cached_cluster_state()).flatten();
        let mut renew = Vec::new();
        for (room, cursor) in held {
            let mut guard = cursor.lock().await;
            if guard.forgotten || !guard.subscribed {
                continue; // `retry` has it
            }
            let channel = self.keys.room_channel(&room);
            // A subscription recorded with no shard (the subscriber had no
            // map yet) is left to the counters rather than renewed for ever.
            let now = map
                .as_ref()
                .and_then(|map| map.get_server(redis_keyslot(channel.as_bytes())));
            let moved = guard.shard.as_ref().is_some_and(|was| Some(was) != now);
            let overdue = guard.overdue(counters.get(&room).copied(), read);
            drop(guard);
            if moved || overdue {
                renew.push((room, cursor, moved));
            }
        }
        if renew.iter().any(|&(_, _, moved)| moved) {
            // Where the slots went, or the new subscriptions are redirected
            // too (fred fails what it would have to send twice). No room is
            // held meanwhile: their messages keep coming.
            match tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.sub.sync_cluster()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::debug!(cause = %err, "redis bus: could not read the cluster's map")
                }
                Err(_) => tracing::debug!("redis bus: the cluster's map took too long to read"),
            }
        }
        for (room, cursor, moved) in renew {
            let mut cursor = cursor.lock().await;
            if cursor.forgotten || !cursor.subscribed {
                continue; // forgotten, or lapsed, meanwhile
            }
            let why = if moved {
                "its slot moved to another shard"
            } else {
                "a message numbered a heartbeat ago has not arrived"
            };
            tracing::warn!(%room, delivered = cursor.delivered, "redis bus: {why}; subscribing the room again");
            cursor.subscribed = false;
            // On an error `retry` tries again at the next heartbeat.
            if let Err(err) = self.subscribe(&room, &mut cursor).await {
                tracing::warn!(cause = %err, %room, "redis bus: room not subscribed again yet");
            }
        }
    }

    /// The counters of the `held` rooms, one `MGET` per partition (its
    /// rooms' counters share a slot); a partition Redis did not answer for
    /// is left out.
    async fn counters(&self, held: &[Held]) -> HashMap<RoomName, u64> {
        let mut by_partition: HashMap<u32, Vec<&RoomName>> = HashMap::new();
        for (room, _) in held {
            by_partition
                .entry(Keys::partition(room))
                .or_default()
                .push(room);
        }
        let mut counters = HashMap::new();
        for rooms in by_partition.into_values() {
            let keys: Vec<String> = rooms.iter().map(|room| self.keys.seq(room)).collect();
            match self.cmd.mget::<Vec<Option<u64>>, _>(keys).await {
                Ok(values) => {
                    for (room, value) in rooms.into_iter().zip(values) {
                        counters.insert(room.clone(), value.unwrap_or(0));
                    }
                }
                Err(err) => {
                    tracing::debug!(cause = %err, "redis bus: could not read room counters to audit")
                }
            }
        }
        counters
    }

    /// After the subscriber reconnected: every room must be subscribed
    /// again, and what went by while it was away read.
    pub async fn lapse_all(&self) {
        for (_, cursor) in self.snapshot() {
            cursor.lock().await.subscribed = false;
        }
    }

    fn snapshot(&self) -> Vec<Held> {
        self.heard()
            .iter()
            .map(|(room, cursor)| (room.clone(), cursor.clone()))
            .collect()
    }

    /// Stops hearing `room`: the hub has evicted it.
    pub async fn forget(&self, room: &RoomName) {
        let Some(cursor) = self.cursor(room) else {
            return;
        };
        let mut guard = cursor.lock().await;
        if guard.forgotten {
            return;
        }
        guard.forgotten = true;
        if let Err(err) = self.sub.sunsubscribe(self.keys.room_channel(room)).await {
            tracing::warn!(cause = %err, %room, "could not unsubscribe from a room");
        }
        // Taken out only now, still under the room's lock: a `watch` waiting
        // for it then subscribes anew after this unsubscription, not before.
        let mut heard = self.heard();
        if heard.get(room).is_some_and(|c| Arc::ptr_eq(c, &cursor)) {
            heard.remove(room);
        }
    }

    /// The last seq delivered in `room` (0 if it is not heard here).
    pub async fn delivered(&self, room: &RoomName) -> u64 {
        match self.cursor(room) {
            Some(cursor) => cursor.lock().await.delivered,
            None => 0,
        }
    }

    /// Takes a message at `seq` heard on `room`'s channel (or published here).
    pub async fn offer(&self, message: Arc<Message>) {
        let Some(cursor) = self.cursor(&message.room) else {
            return; // not (or no longer) heard here
        };
        let mut cursor = cursor.lock().await;
        if cursor.forgotten || message.seq <= cursor.delivered {
            return; // heard twice: published here and echoed, or re-read
        }
        if message.seq > cursor.delivered + 1
            && let Err(err) = self
                .catch_up(&message.room, &mut cursor, Some(message.seq - 1))
                .await
        {
            tracing::warn!(cause = %err, room = %message.room, "could not fill a hole; delivering across it");
        }
        self.deliver(&mut cursor, message);
    }

    /// Reads what every heard room missed (after a reconnect or a lag).
    pub async fn catch_up_all(&self) {
        for (room, cursor) in self.snapshot() {
            let mut cursor = cursor.lock().await;
            if cursor.forgotten {
                continue;
            }
            if let Err(err) = self.catch_up(&room, &mut cursor, None).await {
                tracing::warn!(cause = %err, %room, "could not catch up a room");
            }
        }
    }

    /// Delivers `room`'s messages after its cursor, up to `upto` (or the end
    /// of the stream), reading the stream and, for what it no longer holds,
    /// the store.
    async fn catch_up(
        &self,
        room: &RoomName,
        cursor: &mut Cursor,
        upto: Option<u64>,
    ) -> Result<(), BusError> {
        let log = self.keys.log(room);
        loop {
            let after = cursor.delivered;
            if upto.is_some_and(|u| after >= u) {
                return Ok(());
            }
            let end = upto.map_or_else(|| "+".to_owned(), |u| u.to_string());
            let entries: Vec<Entry> = self
                .cmd
                .xrange(&log, format!("({after}"), end, Some(PAGE))
                .await
                .map_err(unreachable)?;
            // What the stream cannot give: whatever lies below its first
            // entry, or, when it holds none of a known hole (it expired, or
            // Redis lost its data), everything up to `upto`.
            let first = entries.first().and_then(|(id, _)| seq_of_id(id));
            if let Some(below) = first.or(upto.map(|u| u + 1))
                && below > after + 1
            {
                // The store has them (the persister stores before a trim or
                // an expiry reaches them, unless far behind).
                let missing = u32::try_from(below - after - 1).unwrap_or(u32::MAX);
                let stored = self
                    .store
                    .since(room, after, missing.min(PAGE as u32))
                    .await?;
                for m in stored.into_iter().filter(|m| m.seq < below) {
                    self.deliver(cursor, Arc::new(m));
                }
                // Again only if the cursor moved: a store with a hole of its
                // own (rows lost with Redis, or stored out of order) would
                // otherwise be asked the same question for ever, under the
                // room's lock every publish to it takes.
                if cursor.delivered > after && cursor.delivered + 1 < below {
                    continue;
                }
            }
            if entries.is_empty() {
                return Ok(());
            }
            let count = entries.len() as u64;
            for message in history::decode(room, entries) {
                self.deliver(cursor, Arc::new(message));
            }
            if count < PAGE {
                return Ok(());
            }
        }
    }

    /// Hands `message` to the sink and moves the room's cursor.
    fn deliver(&self, cursor: &mut Cursor, message: Arc<Message>) {
        if message.seq <= cursor.delivered {
            return;
        }
        cursor.delivered = message.seq;
        // Read per message, so that nothing is delivered after `detach`.
        if let Some(sink) = &*self.sink.lock().unwrap_or_else(|e| e.into_inner()) {
            sink.deliver(Envelope::Message(message));
        }
    }
}

/// The shard `client`'s map puts `channel` on; `None` off a Cluster.
fn shard_of(client: &impl ClusterInterface, channel: &str) -> Option<Server> {
    let slot = redis_keyslot(channel.as_bytes());
    client.cached_cluster_state()?.get_server(slot).cloned()
}

/// A Redis error as the bus reports it.
pub fn unreachable(err: fred::error::Error) -> BusError {
    BusError::Redis(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(delivered: u64, at: Instant) -> Cursor {
        Cursor {
            delivered,
            subscribed: true,
            forgotten: false,
            shard: None,
            numbered: 0,
            numbered_at: at,
            renewed_for: 0,
        }
    }

    #[test]
    fn a_room_is_overdue_only_for_a_message_numbered_a_heartbeat_ago() {
        let start = Instant::now();
        let beat = |n: u32| start + HEARTBEAT * n;
        let mut room = cursor(5, start);
        // In flight when read: not judged until a heartbeat later.
        assert!(!room.overdue(Some(6), beat(1)));
        // Heard meanwhile: fine.
        room.delivered = 6;
        assert!(!room.overdue(Some(8), beat(2)));
        // A reading soon after the last is not judged, and keeps the older.
        assert!(!room.overdue(Some(9), beat(2) + HEARTBEAT / 10));
        assert_eq!(room.numbered, 8);
        // Seq 8 was numbered a heartbeat ago and is still not heard.
        assert!(room.overdue(Some(9), beat(3)));
        // A room that could not be read is not judged.
        assert!(!room.overdue(None, beat(4)));
    }

    #[test]
    fn a_hole_nothing_can_fill_is_tried_once_per_counter() {
        let start = Instant::now();
        let beat = |n: u32| start + HEARTBEAT * n;
        let mut room = cursor(5, start);
        assert!(!room.overdue(Some(7), beat(1)));
        assert!(room.overdue(Some(7), beat(2)));
        // Subscribing again read nothing: the counter stands, no new try.
        assert!(!room.overdue(Some(7), beat(3)));
        assert!(!room.overdue(Some(8), beat(4)));
        // A later message that is not heard either is tried for.
        assert!(room.overdue(Some(8), beat(5)));
    }
}
