//! The Redis (or Valkey) bus: instances connected through one Redis, at
//! pub/sub latency, with Redis as the ordering authority of every room.
//!
//! One message, end to end (see the README for the picture):
//!
//! 1. [`Bus::publish`] runs one script ([`script::PUBLISH`]): `INCR` the
//!    room's seq, `XADD` the message to the room's capped stream (id
//!    `SEQ-0`) and to its partition's persistence stream, `SPUBLISH` it on the
//!    room's sharded channel. Atomic, so the channel carries each room in seq
//!    order.
//! 2. Every instance that hears the room (it has members or readers there)
//!    gets it from its subscriber connection and hands it to its hub in seq
//!    order ([`rooms`]); the publishing instance delivers its own copy at once.
//! 3. Some instance's persister ([`persist`]) reads it from the partition
//!    stream, stores it, and acknowledges it.
//!
//! Two connections per instance: commands, and a subscriber. Both reconnect
//! with exponential backoff; after a reconnect the subscriber subscribes
//! again and every heard room catches up from its stream. While Redis cannot
//! be reached, messages are refused within a second (no instance may number
//! a message on its own) and `/healthz` says why.

mod directory;
pub mod drain;
mod history;
mod inbox;
mod keys;
mod persist;
mod rooms;
mod script;
mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::ReconnectPolicy;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::fence::Fence;
use crate::core::ports::{
    Bus, BusError, Deliver, Directory, Envelope, IDEMPOTENCY_WINDOW, Presence, Store, WriterStats,
};
use crate::core::{Draft, Message, RoomName};
use directory::{HEARTBEAT, LEASE, Registry};
use history::StreamFirst;
use inbox::{Inbox, Post};
use keys::Keys;
use persist::{FlushRequest, Persister, Pokes};
use rooms::{Rooms, unreachable};
use script::Lua;
use wire::{Body, Incoming};

/// How long a publish may take before the message is refused.
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(900);
/// Entries a room's stream keeps (approximately): what a reconnecting
/// instance or a resuming client can catch up from Redis alone.
const LOG_CAP: u64 = 10_000;
/// How long a room's counter and stream outlive its last message.
const ROOM_IDLE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Entries a partition's persistence stream may hold while the store is
/// down: past this, Redis trims the oldest unstored messages, and they are
/// lost without being counted (a known gap: the trim reports nothing).
const PERSIST_CAP: u64 = 1_000_000;
/// Pub/sub messages the subscriber buffers before its reader counts as lagging.
const SUBSCRIBER_BUFFER: usize = 65_536;

/// The Redis bus of one instance.
pub struct RedisBus {
    inner: Arc<Inner>,
    tasks: StdMutex<Vec<JoinHandle<()>>>,
    persister: StdMutex<Option<JoinHandle<()>>>,
}

struct Inner {
    instance: String,
    keys: Keys,
    cmd: Client,
    sub: SubscriberClient,
    rooms: Rooms,
    /// Where a room's numbering starts again if Redis lost its counter.
    store: Arc<dyn Store>,
    registry: Registry,
    /// This instance's DMs, numbered so that none is lost with pub/sub.
    inbox: Inbox,
    /// Sends DMs to other instances' inboxes.
    post: Post,
    publish: Lua,
    /// Closed while this instance's lease has gone unconfirmed too long.
    fence: Fence,
    /// False while the last heartbeat or reconnect says Redis is away.
    healthy: AtomicBool,
    /// Set when the instance and cluster channels must be subscribed again.
    own_channels_lapsed: AtomicBool,
    stop: CancellationToken,
    persist_stop: CancellationToken,
    flushes: mpsc::Sender<FlushRequest>,
    /// Tells this instance's persister which partitions it published to.
    pokes: Arc<Pokes>,
    stats: Arc<WriterStats>,
    sink: StdMutex<Option<Arc<dyn Deliver>>>,
}

impl RedisBus {
    /// Connects to `url` (`redis://`, `valkey://`, `rediss://`,
    /// `redis-cluster://`) as `instance` of cluster `cluster`.
    pub async fn open(
        url: &str,
        cluster: &str,
        instance: &str,
        store: Arc<dyn Store>,
    ) -> Result<RedisBus, BusError> {
        let keys = Keys::new(cluster).map_err(BusError::Redis)?;
        let config = Config::from_url(url)
            .map_err(|e| BusError::Redis(format!("bad --bus URL {url:?}: {e}")))?;
        let builder = || {
            let mut builder = Builder::from_config(config.clone());
            builder
                .with_connection_config(|c| {
                    c.connection_timeout = Duration::from_secs(2);
                    c.internal_command_timeout = Duration::from_secs(2);
                    // A command cut off mid-flight fails rather than being
                    // sent again later: a refused message must stay unsent.
                    c.max_command_attempts = 1;
                })
                .with_performance_config(|p| {
                    p.broadcast_channel_capacity = SUBSCRIBER_BUFFER;
                    // Also the publish deadline: a message Redis has not
                    // numbered by then is refused, and never sent later.
                    p.default_command_timeout = PUBLISH_TIMEOUT;
                })
                .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
            builder
        };
        let cmd = builder().build().map_err(unreachable)?;
        let sub = builder().build_subscriber_client().map_err(unreachable)?;
        cmd.init().await.map_err(|e| {
            BusError::Redis(format!("cannot reach Redis at {url}: {e} (is it running?)"))
        })?;
        sub.init().await.map_err(unreachable)?;
        sub.ssubscribe(keys.instance_channel(instance))
            .await
            .map_err(unreachable)?;
        sub.ssubscribe(keys.all_channel())
            .await
            .map_err(unreachable)?;

        // Registered before serving, so this instance's first claims count.
        let registry = Registry::new(keys.clone(), instance);
        registry.forget_previous_life(&cmd).await?;
        let registered = tokio::time::Instant::now();
        registry.beat(&cmd).await?;
        // Opened once no nick leads here any more: what the inbox holds now
        // was for the sessions of a previous life.
        let inbox = Inbox::open(&cmd, &keys, instance, &registry.life()).await?;

        let (flushes, flush_rx) = mpsc::channel(64);
        let stats = Arc::new(WriterStats::default());
        let inner = Arc::new(Inner {
            instance: instance.to_owned(),
            rooms: Rooms::new(keys.clone(), cmd.clone(), sub.clone(), store.clone()),
            store: store.clone(),
            registry,
            inbox,
            post: Post::new(keys.clone()),
            keys: keys.clone(),
            cmd: cmd.clone(),
            sub,
            publish: Lua::new(script::PUBLISH),
            fence: Fence::new(LEASE, registered),
            healthy: AtomicBool::new(true),
            own_channels_lapsed: AtomicBool::new(false),
            stop: CancellationToken::new(),
            persist_stop: CancellationToken::new(),
            flushes,
            pokes: Arc::default(),
            stats: stats.clone(),
            sink: StdMutex::new(None),
        });
        let persister = Persister {
            cmd,
            keys,
            instance: instance.to_owned(),
            store,
            stats,
        };
        let persister =
            tokio::spawn(persister.run(inner.persist_stop.clone(), flush_rx, inner.pokes.clone()));
        Ok(RedisBus {
            inner,
            tasks: StdMutex::default(),
            persister: StdMutex::new(Some(persister)),
        })
    }
}

impl Inner {
    /// Runs the publish script once.
    async fn call_publish(&self, keys: Vec<String>, args: Vec<String>) -> Result<String, BusError> {
        // The client times commands out at PUBLISH_TIMEOUT and never sends
        // one twice; this timeout only backs that up.
        let call = self.publish.call(&self.cmd, keys, args);
        match tokio::time::timeout(PUBLISH_TIMEOUT, call).await {
            Ok(Ok(receipt)) => Ok(receipt),
            Ok(Err(err)) => Err(unreachable(err)),
            Err(_) => Err(BusError::Redis("Redis did not answer within 900 ms".into())),
        }
    }

    /// A send with an `Idempotency-Key` that this nick first used in another
    /// room: that send's message (nothing is sent again), or `None` when the
    /// key is new, was used in this room (the publish script answers that
    /// case atomically), or its first send never got a seq (then the key
    /// moves to this room).
    ///
    /// The key's room is recorded in the nick's slot before the publish
    /// script runs in the room's; the two cannot be one script on a Redis
    /// Cluster. Two sends racing with one key in two rooms can therefore
    /// both be sent; one client retrying one send cannot race itself.
    async fn first_send_elsewhere(
        &self,
        draft: &Draft,
        key: &str,
    ) -> Result<Option<Arc<Message>>, BusError> {
        let nick = draft.nick.key();
        let marker = self.keys.key_room(nick.as_str(), key);
        let window = Some(Expiration::EX(IDEMPOTENCY_WINDOW.as_secs() as i64));
        let room = draft.room.as_str();
        // SET NX GET: records this room unless the key has one, and answers
        // the room it had (nothing for a first use), in one round trip.
        let first_room: Option<String> = self
            .cmd
            .set(&marker, room, window.clone(), Some(SetOptions::NX), true)
            .await
            .map_err(unreachable)?;
        let Some(first_room) = first_room.and_then(|r| RoomName::parse(&r).ok()) else {
            return Ok(None); // first use of the key
        };
        if first_room == draft.room {
            return Ok(None);
        }
        let receipt: Option<String> = self
            .cmd
            .get(self.keys.receipt(&first_room, nick.as_str(), key))
            .await
            .map_err(unreachable)?;
        if let Some(receipt) = receipt {
            let (seq, id) = parse_receipt(&receipt)?;
            if let Some(id) = id {
                return Ok(Some(Arc::new(Message {
                    room: first_room,
                    id,
                    ..draft.clone().sequence(seq)
                })));
            }
        }
        // The first send was never numbered: the key is free for this room.
        let _: Option<String> = self
            .cmd
            .set(&marker, room, window, None, false)
            .await
            .map_err(unreachable)?;
        Ok(None)
    }

    fn sink(&self) -> Option<Arc<dyn Deliver>> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the subscriber's messages until the bus stops. A reader that
    /// falls behind the buffer loses pub/sub messages, not room messages:
    /// it catches every heard room up from its stream.
    async fn read(self: Arc<Self>) {
        let mut rx = self.sub.message_rx();
        loop {
            let message = tokio::select! {
                _ = self.stop.cancelled() => return,
                m = rx.recv() => m,
            };
            match message {
                Ok(message) => {
                    self.take(&message.channel, message.value.as_str().as_deref())
                        .await
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "redis bus: the reader fell behind; catching up from the streams"
                    );
                    self.rooms.catch_up_all().await;
                    if let Some(sink) = self.sink() {
                        self.inbox.catch_up(&self.cmd, sink.as_ref()).await;
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    async fn take(&self, channel: &str, payload: Option<&str>) {
        let Some(payload) = payload else { return };
        match wire::parse(payload, &self.instance) {
            Incoming::Message { seq, body } => {
                let Some(room) = self.keys.room_of_channel(channel) else {
                    return;
                };
                match Body::decode(room, seq, &body) {
                    Some(message) => self.rooms.offer(Arc::new(message)).await,
                    None => tracing::warn!(channel, "unreadable message skipped"),
                }
            }
            Incoming::Dm { at, dm } => {
                // Without a sink nothing is delivered yet; the next
                // heartbeat reads the inbox.
                if let Some(sink) = self.sink() {
                    self.inbox.offer(&self.cmd, at, dm, sink.as_ref()).await;
                }
            }
            Incoming::Envelope(envelope) => {
                if let Some(sink) = self.sink() {
                    sink.deliver(envelope);
                }
            }
            Incoming::Ignore => {}
        }
    }

    /// After each reconnect of the subscriber: subscribe again, then fill
    /// what went by meanwhile from the streams.
    async fn resubscribe(self: Arc<Self>) {
        let mut reconnects = self.sub.reconnect_rx();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                r = reconnects.recv() => if let Err(RecvError::Closed) = r { return },
            }
            tracing::info!("redis bus: subscriber reconnected; subscribing again");
            let again = async {
                // This instance's own channels first: what comes on them
                // (renames, presence) has no stream to catch up from, while
                // a room's does, and marking the rooms lapsed may wait on
                // one that is catching up.
                self.own_channels_lapsed.store(true, Ordering::Relaxed);
                self.subscribe_own_channels().await;
                self.rooms.lapse_all().await;
                self.subscribe_rooms().await;
                if let Some(sink) = self.sink() {
                    self.inbox.catch_up(&self.cmd, sink.as_ref()).await;
                }
            };
            // Stopping does not wait for a pass over rooms Redis is not
            // confirming, 2 s each.
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = again => {}
            }
        }
    }

    /// Waits for the next tick of `every`: `false` once the bus stops.
    async fn next_tick(&self, every: &mut tokio::time::Interval) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = every.tick() => true,
        }
    }

    /// Subscribes again, every heartbeat, whatever Redis has not confirmed
    /// (after a reconnect, or a room's first subscription during a blip) or
    /// has stopped delivering (a Cluster moved its slot to another shard).
    /// Its own task: a subscription that times out must not hold up the
    /// heartbeat, whose lease it would put at risk.
    async fn keep_subscribed(self: Arc<Self>) {
        let mut every = heartbeats();
        while self.next_tick(&mut every).await {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = async {
                    // Own channels first: they have no stream to catch up from.
                    self.subscribe_own_channels().await;
                    self.subscribe_rooms().await;
                    self.rooms.audit().await;
                    // A resharding ends this instance's own subscriptions
                    // too, and they have no counter to audit them by: on a
                    // Cluster they are renewed every heartbeat, two
                    // idempotent commands, after the audit may have taught
                    // the subscriber the new map. (One sent where the slot
                    // no longer lives is refused, and teaches it for the
                    // next.)
                    if self.sub.is_clustered() {
                        self.own_channels_lapsed.store(true, Ordering::Relaxed);
                        self.subscribe_own_channels().await;
                    }
                } => {}
            }
        }
    }

    /// Subscribes this instance's own channels again if they lapsed. One
    /// channel at a time, here and for rooms: channels may live on
    /// different shards. (fred's `resubscribe_all` also sends an empty
    /// SUBSCRIBE, which Redis refuses, when only shard channels are tracked.)
    async fn subscribe_own_channels(&self) {
        if self.own_channels_lapsed.swap(false, Ordering::Relaxed) {
            for channel in [
                self.keys.instance_channel(&self.instance),
                self.keys.all_channel(),
            ] {
                if let Err(err) = self.sub.ssubscribe(channel.clone()).await {
                    tracing::warn!(cause = %err, %channel, "redis bus: could not subscribe again; trying again at the next heartbeat");
                    self.own_channels_lapsed.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// Subscribes every room that is not (reading what it missed).
    async fn subscribe_rooms(&self) {
        let unconfirmed = self.rooms.retry().await;
        if unconfirmed > 0 {
            tracing::warn!(
                rooms = unconfirmed,
                "redis bus: rooms not subscribed yet; their members hear only this instance until they are"
            );
        }
    }

    /// Heartbeats and reaping.
    async fn keep_alive(self: Arc<Self>) {
        let mut every = heartbeats();
        while self.next_tick(&mut every).await {
            let sent = tokio::time::Instant::now();
            // With no nick lost, nothing stands between the renewal and the
            // users speaking again; with one, the hub must learn it first.
            let beat = self
                .registry
                .beat_and(&self.cmd, |lost| {
                    if lost.is_empty() {
                        self.fence.confirmed(sent);
                    }
                })
                .await;
            let ok = beat.is_ok();
            // The inbox first: a DM sent before a reap to a nick that was
            // taken meanwhile reaches its user before the rename below.
            if let (true, Some(sink)) = (ok, self.sink())
                && let Err(err) = self.inbox.beat(&self.cmd, sink.as_ref()).await
            {
                tracing::warn!(cause = %err, "redis bus: could not look at the DM inbox");
            }
            match beat {
                Ok((reaped, lost)) => {
                    // Taken by another session while this instance was away:
                    // the hub renames its user rather than hold it twice.
                    if let Some(sink) = self.sink() {
                        for (session, nick) in lost {
                            sink.deliver(Envelope::ClaimLost { session, nick });
                        }
                    }
                    // Only now: the hub has stopped the lost nicks' users.
                    self.fence.confirmed(sent);
                    for (room, nick) in reaped {
                        tracing::info!(%room, %nick, "a silent instance's member left");
                        let change = Presence::Left {
                            room: room.clone(),
                            nick,
                        };
                        // Its members here hear it directly; elsewhere, on the room.
                        if let Some(sink) = self.sink() {
                            sink.deliver(Envelope::Presence(change.clone()));
                        }
                        if let Err(err) = self
                            .registry
                            .announce_in_room(&self.cmd, &room, &change)
                            .await
                        {
                            tracing::warn!(cause = %err, "could not announce a reaped member");
                        }
                    }
                }
                Err(BusError::Superseded(instance)) => {
                    // Another life holds the name: renew nothing more, and stop.
                    self.fence.supersede(&instance);
                    if let Some(sink) = self.sink() {
                        sink.deliver(Envelope::Superseded { instance });
                    }
                    return;
                }
                Err(ref err) if self.healthy.load(Ordering::Relaxed) => {
                    tracing::error!(cause = %err, "redis bus: Redis unreachable");
                }
                Err(_) => {}
            }
            if ok && !self.healthy.load(Ordering::Relaxed) {
                tracing::info!("redis bus: Redis reachable again");
            }
            self.healthy.store(ok, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn start(&self, sink: Arc<dyn Deliver>) {
        *self.inner.sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink.clone());
        self.inner.rooms.attach(sink);
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.push(tokio::spawn(self.inner.clone().read()));
        tasks.push(tokio::spawn(self.inner.clone().resubscribe()));
        tasks.push(tokio::spawn(self.inner.clone().keep_subscribed()));
        tasks.push(tokio::spawn(self.inner.clone().keep_alive()));
    }

    fn admits(&self) -> Result<(), BusError> {
        self.inner.fence.check()
    }

    async fn publish(&self, draft: Draft) -> Result<Arc<Message>, BusError> {
        let inner = &self.inner;
        if inner.stop.is_cancelled() {
            return Err(BusError::Closed);
        }
        let room = draft.room.clone();
        let partition = Keys::partition(&room);
        let mut keys = vec![
            inner.keys.seq(&room),
            inner.keys.log(&room),
            inner.keys.persist(partition),
            inner.keys.room_channel(&room),
        ];
        let cursor = inner.rooms.delivered(&room).await;
        let mut args = vec![
            room.to_string(),
            Body::encode(&draft),
            cursor.to_string(),
            LOG_CAP.to_string(),
            PERSIST_CAP.to_string(),
            "0".to_owned(),
            ROOM_IDLE_TTL.as_millis().to_string(),
        ];
        if let Some(key) = &draft.key {
            if let Some(first) = inner.first_send_elsewhere(&draft, key.as_str()).await? {
                return Ok(first);
            }
            keys.push(
                inner
                    .keys
                    .receipt(&room, draft.nick.key().as_str(), key.as_str()),
            );
            args.push(draft.id.to_string());
            args.push(IDEMPOTENCY_WINDOW.as_secs().to_string());
        }
        // Judged just before each call, after any wait above: what passes
        // reaches Redis within the call's own deadline, inside the margin.
        inner.fence.check()?;
        let mut receipt = inner.call_publish(keys.clone(), args.clone()).await?;
        if receipt == UNSEEDED {
            // A new room, or a counter Redis lost: start above the store too.
            // Redis, not the database, is the authority here, so a store that
            // does not answer at once does not stop the room: it is numbered
            // from this instance's cursor, as before there was a store to ask.
            let stored = tokio::time::timeout(SEED_WAIT, inner.store.last_seq(&room)).await;
            let floor = match stored {
                Ok(Ok(stored)) => cursor.max(stored),
                Ok(Err(err)) => {
                    tracing::warn!(%room, cause = %err, "numbering a room Redis holds no counter for from this instance's cursor alone");
                    cursor
                }
                Err(_) => {
                    tracing::warn!(%room, "numbering a room Redis holds no counter for from this instance's cursor alone: the store did not answer within {SEED_WAIT:?}");
                    cursor
                }
            };
            args[FLOOR_ARG] = floor.to_string();
            args[SEEDED_ARG] = "1".to_owned();
            inner.fence.check()?;
            receipt = inner.call_publish(keys, args).await?;
        }
        let (seq, first_id) = parse_receipt(&receipt)?;
        if let Some(id) = first_id {
            // A retry: the first send's receipt, and nothing is sent again.
            return Ok(Arc::new(Message {
                id,
                ..draft.sequence(seq)
            }));
        }
        let message = Arc::new(draft.sequence(seq));
        inner.pokes.published(partition);
        // Delivered here at once (after anything older not heard yet); the
        // copy that comes back on the channel is then a duplicate.
        inner.rooms.offer(message.clone()).await;
        Ok(message)
    }

    async fn watch(&self, room: &crate::core::RoomName, delivered: u64) {
        if let Err(err) = self.inner.rooms.watch(room, delivered).await {
            tracing::warn!(cause = %err, %room, "could not subscribe to a room");
        }
    }

    async fn unwatch(&self, room: &crate::core::RoomName) {
        self.inner.rooms.forget(room).await;
    }

    fn history(&self, store: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(StreamFirst::new(
            store,
            self.inner.cmd.clone(),
            self.inner.keys.clone(),
        ))
    }

    async fn settled(&self) {
        let (done, stored) = oneshot::channel();
        if self.inner.flushes.send(done).await.is_ok() {
            let _ = stored.await;
        }
    }

    async fn health(&self) -> Result<(), BusError> {
        let inner = &self.inner;
        if !inner.cmd.is_connected() {
            return Err(BusError::Redis(
                "the command connection to Redis is down; reconnecting".into(),
            ));
        }
        if !inner.sub.is_connected() {
            return Err(BusError::Redis(
                "the subscriber connection to Redis is down; reconnecting".into(),
            ));
        }
        let ping =
            tokio::time::timeout(Duration::from_millis(500), inner.cmd.ping::<()>(None)).await;
        match ping {
            Ok(Ok(())) if inner.healthy.load(Ordering::Relaxed) => Ok(()),
            Ok(Ok(())) => Err(BusError::Redis(
                "Redis is back; the directory is catching up".into(),
            )),
            Ok(Err(err)) => Err(unreachable(err)),
            Err(_) => Err(BusError::Redis(
                "Redis did not answer PING within 500 ms".into(),
            )),
        }
    }

    async fn close(&self) {
        let inner = &self.inner;
        inner.stop.cancel();
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
        // Free this instance's nicks and memberships now, not after the
        // lease; not if the name is another life's by now: they are its.
        if inner.fence.is_superseded() {
            tracing::warn!("this instance's name is another's now: giving nothing back under it");
        } else {
            inner.registry.forget_all(&inner.cmd).await;
        }
        inner.rooms.detach();
        inner.persist_stop.cancel();
        let persister = self
            .persister
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(persister) = persister {
            let _ = persister.await;
        }
        let _ = inner.sub.quit().await;
        let _ = inner.cmd.quit().await;
    }

    fn directory(&self) -> Option<&dyn Directory> {
        Some(self)
    }

    fn writer_stats(&self) -> Option<Arc<WriterStats>> {
        Some(self.inner.stats.clone())
    }
}

/// A tick every heartbeat; a late one is not made up for.
fn heartbeats() -> tokio::time::Interval {
    let mut every = tokio::time::interval(HEARTBEAT);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every
}

/// Reads the publish script's answer: `"SEQ "` for a new message, `"SEQ ID"`
/// for a retry under an `Idempotency-Key` already used (the first send's).
/// How long a publish waits for the store's last seq of a room whose counter
/// Redis lacks; well inside the second in which a send is answered.
const SEED_WAIT: Duration = Duration::from_millis(300);
/// The publish script's answer for a room whose counter is missing.
const UNSEEDED: &str = "unseeded";
/// The publish script's floor argument, and whether it includes the store.
const FLOOR_ARG: usize = 2;
const SEEDED_ARG: usize = 5;

fn parse_receipt(receipt: &str) -> Result<(u64, Option<uuid::Uuid>), BusError> {
    let bad = || {
        BusError::Redis(format!(
            "unexpected answer from the publish script: {receipt:?}"
        ))
    };
    let (seq, id) = receipt.split_once(' ').ok_or_else(bad)?;
    let seq = seq.parse().map_err(|_| bad())?;
    let id = match id {
        "" => None,
        id => Some(id.parse().map_err(|_| bad())?),
    };
    Ok((seq, id))
}
