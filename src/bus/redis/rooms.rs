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

use std::collections::HashMap;
use std::sync::Arc;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use tokio::sync::Mutex;

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
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Subscribed rooms and the last seq delivered in each.
    delivered: HashMap<RoomName, u64>,
    sink: Option<Arc<dyn Deliver>>,
}

impl Rooms {
    /// Rooms heard through `sub`, filled through `cmd`.
    pub fn new(keys: Keys, cmd: Client, sub: SubscriberClient, store: Arc<dyn Store>) -> Self {
        Rooms {
            keys,
            cmd,
            sub,
            store,
            state: Mutex::new(State::default()),
        }
    }

    /// Where delivered messages go.
    pub async fn attach(&self, sink: Arc<dyn Deliver>) {
        self.state.lock().await.sink = Some(sink);
    }

    /// Stops delivering (the bus is closing).
    pub async fn detach(&self) {
        self.state.lock().await.sink = None;
    }

    /// Hears `room` from now on, counting from `delivered`; catches up from
    /// the stream with what was said since.
    pub async fn watch(&self, room: &RoomName, delivered: u64) -> Result<(), BusError> {
        let mut state = self.state.lock().await;
        if let Some(cursor) = state.delivered.get_mut(room) {
            *cursor = (*cursor).max(delivered);
            return Ok(());
        }
        // Bounded: a subscription whose confirmation never comes must not
        // hold the rooms' lock (and with it every publish) forever. The room
        // is then not recorded as heard, so the next join or reader tries
        // again.
        match tokio::time::timeout(
            SUBSCRIBE_TIMEOUT,
            self.sub.ssubscribe(self.keys.room_channel(room)),
        )
        .await
        {
            Ok(result) => result.map_err(unreachable)?,
            Err(_) => {
                return Err(BusError::Redis(format!(
                    "Redis did not confirm the subscription to #{room} within {SUBSCRIBE_TIMEOUT:?}"
                )));
            }
        }
        state.delivered.insert(room.clone(), delivered);
        // What was said between the hub's read of the room (its ring, read
        // stream-first, so `delivered` is where the room really stood) and
        // the subscription.
        self.catch_up(&mut state, room, None).await
    }

    /// Stops hearing `room`: the hub has evicted it.
    pub async fn forget(&self, room: &RoomName) {
        let mut state = self.state.lock().await;
        if state.delivered.remove(room).is_none() {
            return;
        }
        if let Err(err) = self.sub.sunsubscribe(self.keys.room_channel(room)).await {
            tracing::warn!(cause = %err, %room, "could not unsubscribe from a room");
        }
    }

    /// The last seq delivered in `room` (0 if it is not heard here).
    pub async fn delivered(&self, room: &RoomName) -> u64 {
        self.state
            .lock()
            .await
            .delivered
            .get(room)
            .copied()
            .unwrap_or(0)
    }

    /// Takes a message at `seq` heard on `room`'s channel (or published here).
    pub async fn offer(&self, message: Arc<Message>) {
        let mut state = self.state.lock().await;
        let room = message.room.clone();
        let Some(&delivered) = state.delivered.get(&room) else {
            return; // not (or no longer) heard here
        };
        if message.seq <= delivered {
            return; // heard twice: published here and echoed, or re-read
        }
        if message.seq > delivered + 1
            && let Err(err) = self
                .catch_up(&mut state, &room, Some(message.seq - 1))
                .await
        {
            tracing::warn!(cause = %err, %room, "could not fill a hole; delivering across it");
        }
        deliver(&mut state, message);
    }

    /// Reads what every heard room missed (after a reconnect or a lag).
    pub async fn catch_up_all(&self) {
        let mut state = self.state.lock().await;
        let rooms: Vec<RoomName> = state.delivered.keys().cloned().collect();
        for room in rooms {
            if let Err(err) = self.catch_up(&mut state, &room, None).await {
                tracing::warn!(cause = %err, %room, "could not catch up a room");
            }
        }
    }

    /// Delivers `room`'s messages after its cursor, up to `upto` (or the end
    /// of the stream), reading the stream and, for what it no longer holds,
    /// the store.
    async fn catch_up(
        &self,
        state: &mut State,
        room: &RoomName,
        upto: Option<u64>,
    ) -> Result<(), BusError> {
        let log = self.keys.log(room);
        loop {
            let after = state.delivered.get(room).copied().unwrap_or(0);
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
                    deliver(state, Arc::new(m));
                }
                // Again only if the cursor moved: a store with a hole of its
                // own (rows lost with Redis, or stored out of order) would
                // otherwise be asked the same question for ever, under the
                // lock every publish takes.
                let now = state.delivered.get(room).copied().unwrap_or(0);
                if now > after && now + 1 < below {
                    continue;
                }
            }
            if entries.is_empty() {
                return Ok(());
            }
            let count = entries.len() as u64;
            for message in history::decode(room, entries) {
                deliver(state, Arc::new(message));
            }
            if count < PAGE {
                return Ok(());
            }
        }
    }
}

/// Hands `message` to the sink and moves the room's cursor.
fn deliver(state: &mut State, message: Arc<Message>) {
    let Some(cursor) = state.delivered.get_mut(&message.room) else {
        return;
    };
    if message.seq <= *cursor {
        return;
    }
    *cursor = message.seq;
    if let Some(sink) = &state.sink {
        sink.deliver(Envelope::Message(message));
    }
}

/// A Redis error as the bus reports it.
pub fn unreachable(err: fred::error::Error) -> BusError {
    BusError::Redis(err.to_string())
}
