//! The poll bus: instances that share one database behave as one chat, with
//! nothing but that database between them.
//!
//! - **Order**: a message gets its room's next `seq` in the transaction that
//!   stores it (`room_seqs` is bumped under a row lock), so `seq` is gap-free
//!   and totally ordered per room across instances.
//! - **Delivery**: every `--poll-interval` each instance asks `room_seqs` where
//!   the rooms it watches are, and reads the rows after the last `seq` it
//!   delivered. Its own messages are delivered at once (after any older rows it
//!   has not delivered yet), so senders do not wait for a poll.
//! - **Presence**: nick leases, room membership and a per-instance inbox (for
//!   direct messages and membership changes) are rows. Each instance
//!   heartbeats; one silent for longer than [`LEASE`] is reaped by the others,
//!   and its users leave; one that comes back after being reaped re-asserts
//!   its users' claims ([`lease`]).
//!
//! Written once for SQLite and PostgreSQL through sqlx's `Any` driver: the
//! statements use only `$N` parameters, integers and text, which both accept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyConnection, AnyPool, Transaction};
use tokio::sync::Mutex;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

mod lease;
mod silence;

use super::fence::Fence;
use super::gate::{self, Gate};
use crate::core::ports::{
    Bus, BusError, Deliver, Directory, Durability, Envelope, Presence, Store, StoreError,
};
use crate::core::{
    DirectMessage, Draft, Message, Nick, NickKey, RoomCount, RoomName, SessionId, Timestamp,
};
use crate::store::keys::{Clock, KeyTable};

/// How long an instance may stay silent before the others reap its claims
/// (its users leave every room, its nicks are free).
pub const LEASE: Duration = Duration::from_secs(10);
/// How long a direct message waits in the inbox of an instance that was
/// reaped: long enough for a stalled instance to wake and read it.
const DM_KEPT: Duration = Duration::from_secs(600);
/// How often an instance says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Rooms asked about per statement: well under both engines' parameter
/// limits (SQLite 32,766, PostgreSQL 65,535).
const ROOMS_PER_QUERY: usize = 500;
/// Most rows read per room per poll.
const CATCH_UP: u32 = 1_000;
/// Longest one poll (and heartbeat) may take before the database counts as
/// unreachable. Generous: a poll may catch up on thousands of rows.
const POLL_DEADLINE: Duration = Duration::from_secs(5);
/// The most a reap of silent instances may take: longer than a heartbeat's
/// deadline, since it runs beside the heartbeats, not in them.
const REAP_DEADLINE: Duration = Duration::from_secs(30);

/// The poll bus of one instance.
pub struct PollBus {
    instance: String,
    db: Db,
    store: Arc<dyn Store>,
    interval: Duration,
    /// Rooms watched and the last seq delivered in each. The lock also orders
    /// delivery between the poller and this instance's own publications.
    state: Arc<Mutex<Cursors>>,
    /// Shut while the database (the ordering authority) does not answer:
    /// publishes are then refused at once instead of waiting.
    gate: Arc<Gate>,
    /// Deletes expired idempotency keys now and then.
    keys: KeyTable,
    stop: CancellationToken,
    /// The poller and the heartbeat, once started.
    tasks: StdMutex<Vec<tokio::task::JoinHandle<()>>>,
    /// This instance's lease, until the heartbeat task takes it over.
    lease: StdMutex<Option<lease::Lease>>,
    /// Closed while this instance's lease has gone unconfirmed too long.
    fence: Arc<Fence>,
}

#[derive(Default)]
struct Cursors {
    delivered: HashMap<RoomName, u64>,
    sink: Option<Arc<dyn Deliver>>,
}

/// What travels through the inbox table, as JSON: to one instance (a direct
/// message) or to every other live instance (membership changes).
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum InboxRow {
    Dm {
        id: uuid::Uuid,
        from: String,
        to: String,
        text: String,
        ts: i64,
    },
    Joined {
        room: String,
        nick: String,
    },
    Left {
        room: String,
        nick: String,
    },
    Renamed {
        old: String,
        new: String,
        rooms: Vec<String>,
    },
    /// Users of a reaped instance left these rooms (posted by the reaper).
    Gone {
        members: Vec<Member>,
    },
    /// Users of an instance that was reaped while away are back in these rooms.
    Back {
        members: Vec<Member>,
    },
}

/// One membership, in an announcement of many.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Member {
    room: String,
    nick: String,
}

impl InboxRow {
    /// What the row says, as envelopes; names that do not parse are dropped.
    fn into_envelopes(self) -> Vec<Envelope> {
        let room = |r: &str| RoomName::parse(r).ok();
        let nick = |n: &str| Nick::parse(n).ok();
        let each = |members: Vec<Member>, change: fn(RoomName, Nick) -> Presence| {
            members
                .iter()
                .filter_map(|m| Some(Envelope::Presence(change(room(&m.room)?, nick(&m.nick)?))))
                .collect()
        };
        match self {
            InboxRow::Gone { members } => each(members, |room, nick| Presence::Left { room, nick }),
            InboxRow::Back { members } => {
                each(members, |room, nick| Presence::Joined { room, nick })
            }
            single => single.into_envelope().into_iter().collect(),
        }
    }

    fn into_envelope(self) -> Option<Envelope> {
        let room = |r: &str| RoomName::parse(r).ok();
        let nick = |n: &str| Nick::parse(n).ok();
        Some(match self {
            InboxRow::Dm {
                id,
                from,
                to,
                text,
                ts,
            } => Envelope::Dm(Arc::new(DirectMessage {
                id,
                from: nick(&from)?,
                to: nick(&to)?,
                text,
                ts: Timestamp(ts),
            })),
            InboxRow::Joined { room: r, nick: n } => Envelope::Presence(Presence::Joined {
                room: room(&r)?,
                nick: nick(&n)?,
            }),
            InboxRow::Left { room: r, nick: n } => Envelope::Presence(Presence::Left {
                room: room(&r)?,
                nick: nick(&n)?,
            }),
            InboxRow::Renamed { old, new, rooms } => Envelope::Presence(Presence::Renamed {
                old: nick(&old)?,
                new: nick(&new)?,
                rooms: rooms.iter().filter_map(|r| room(r)).collect(),
            }),
            InboxRow::Gone { .. } | InboxRow::Back { .. } => return None,
        })
    }

    fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain enum serialises")
    }
}

fn now_ms() -> i64 {
    Timestamp::now().0
}

impl PollBus {
    /// Connects to the shared database `url` as `instance` and registers it.
    pub async fn open(
        url: &str,
        instance: &str,
        store: Arc<dyn Store>,
        interval: Duration,
        durability: Durability,
    ) -> Result<Self, BusError> {
        sqlx::any::install_default_drivers();
        // SQLite's settings are per connection, and the Any driver sets none:
        // without these, every claim, heartbeat and message would fsync
        // (synchronous=FULL) and a busy file would fail at once.
        let synchronous = match durability {
            Durability::Async => "PRAGMA synchronous = NORMAL",
            Durability::Sync => "PRAGMA synchronous = FULL",
        };
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if conn.backend_name().eq_ignore_ascii_case("sqlite") {
                        sqlx::query("PRAGMA busy_timeout = 5000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query(synchronous).execute(&mut *conn).await?;
                    } else {
                        // An instance frozen inside a transaction (SIGSTOP,
                        // a long pause) would hold its row locks until it
                        // wakes, stalling every other instance's heartbeat
                        // behind them until they too look dead. The server
                        // ends such a transaction well inside the lease.
                        sqlx::query("SET idle_in_transaction_session_timeout = 3000")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(StoreError::from)?;
        let bus = PollBus {
            instance: instance.to_owned(),
            db: Db {
                pool,
                statements: Arc::default(),
                clock: Clock::of_url(url),
                directory: Arc::default(),
                inbox: Arc::default(),
                life: lease::new_life().into(),
            },
            store,
            interval,
            state: Arc::new(Mutex::new(Cursors::default())),
            gate: Arc::default(),
            keys: KeyTable::new(Clock::of_url(url)),
            stop: CancellationToken::new(),
            tasks: StdMutex::default(),
            lease: StdMutex::new(None),
            fence: Arc::new(Fence::new(LEASE, tokio::time::Instant::now())),
        };
        let registered = tokio::time::Instant::now();
        let lease = lease::Lease::register(&bus.db, instance).await?;
        bus.fence.confirmed(registered);
        *bus.lease.lock().expect("not poisoned") = Some(lease);
        Ok(bus)
    }

    async fn exec(&self, sql: &'static str, binds: &[&str]) -> Result<u64, BusError> {
        let mut q = sqlx::query(sql);
        for b in binds {
            q = q.bind(*b);
        }
        Ok(q.execute(self.db.run()).await.map_err(db)?.rows_affected())
    }

    async fn broadcast(&self, row: &InboxRow) -> Result<(), BusError> {
        broadcast(&self.db, &self.instance, row).await
    }
}

/// Puts `row` in the inbox of every registered instance but `instance`: one
/// statement, whatever the cluster's size. One that is late but not reaped
/// gets it too, and reads it when it is back; reaping empties its inbox.
async fn broadcast(database: &Db, instance: &str, row: &InboxRow) -> Result<(), BusError> {
    sqlx::query(
        "INSERT INTO inbox (instance, payload)
         SELECT instance, $1 FROM instances WHERE instance <> $2",
    )
    .bind(row.to_json())
    .bind(instance)
    .execute(database.run())
    .await
    .map_err(db)?;
    Ok(())
}

/// What recording a membership does to one already recorded.
enum Existing {
    /// Takes it over (a join: the nick's case, or its instance, may differ).
    Replace,
    /// Leaves it as it is (a re-assertion: it was recorded, and announced,
    /// by the join itself).
    Keep,
}

/// Records `nick`'s membership of `room` for `instance`, but only while
/// `instance` holds the nick: a join that reaches the database after the
/// instance's lease was reaped and the nick taken records nothing (see
/// [`lease`]). Returns whether a row was written.
async fn record_member<'e>(
    on: impl sqlx::Executor<'e, Database = Any>,
    instance: &str,
    room: &RoomName,
    nick: &Nick,
    existing: Existing,
) -> Result<bool, BusError> {
    let on_conflict = match existing {
        Existing::Replace => "DO UPDATE SET nick = excluded.nick, instance = excluded.instance",
        Existing::Keep => "DO NOTHING",
    };
    let sql = format!(
        "INSERT INTO presence (room, nick_key, nick, instance)
         SELECT $1, $2, $3, $4
         WHERE EXISTS (SELECT 1 FROM nicks WHERE nick_key = $2 AND instance = $4)
         ON CONFLICT (room, nick_key) {on_conflict}"
    );
    // Only a fixed clause is formatted in; every value is bound.
    let written = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(room.as_str().to_owned())
        .bind(nick.key().as_str().to_owned())
        .bind(nick.as_str().to_owned())
        .bind(instance.to_owned())
        .execute(on)
        .await
        .map_err(db)?
        .rows_affected();
    Ok(written > 0)
}

/// Moves `instance`'s memberships of the nick keyed `old_key` to `new` (its
/// key, and how it is written); returns their rooms.
async fn move_memberships<'e>(
    on: impl sqlx::Executor<'e, Database = Any>,
    instance: &str,
    old_key: &NickKey,
    new: &Nick,
) -> Result<Vec<String>, BusError> {
    let rooms: Vec<(String,)> = sqlx::query_as(
        "UPDATE presence SET nick_key = $1, nick = $2 WHERE nick_key = $3 AND instance = $4
         RETURNING room",
    )
    .bind(new.key().as_str().to_owned())
    .bind(new.as_str())
    .bind(old_key.as_str())
    .bind(instance)
    .fetch_all(on)
    .await
    .map_err(db)?;
    Ok(rooms.into_iter().map(|(room,)| room).collect())
}

/// Posts `row`, news that `nick_key` of `instance` joined `room` (or, with
/// no room, was renamed to it), like [`broadcast`], but only while that is
/// still true: the membership is recorded for `instance`, whose lease is
/// held. Recording a membership and announcing it are two statements; if
/// this instance stalls between them for longer than the lease, the others
/// reap the membership and announce its end, and the announcement arriving
/// after that must not bring it back under a nick that may be someone
/// else's by now.
async fn announce<'e>(
    on: impl sqlx::Executor<'e, Database = Any>,
    instance: &str,
    row: &InboxRow,
    nick_key: &NickKey,
    room: Option<&RoomName>,
) -> Result<(), BusError> {
    let held = match room {
        Some(_) => "p.nick_key = $3 AND p.room = $4",
        None => "p.nick_key = $3",
    };
    let sql = format!(
        "INSERT INTO inbox (instance, payload)
         SELECT instance, $1 FROM instances
         WHERE instance <> $2
           AND EXISTS (SELECT 1 FROM presence p JOIN instances me ON me.instance = p.instance
                       WHERE p.instance = $2 AND {held})"
    );
    // Only a fixed condition is formatted in; every value is bound.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(row.to_json())
        .bind(instance)
        .bind(nick_key.as_str().to_owned());
    if let Some(room) = room {
        q = q.bind(room.as_str().to_owned());
    }
    q.execute(on).await.map_err(db)?;
    Ok(())
}

/// Begins a transaction that holds `instance`'s row of `instances` until it
/// ends; `None` if the row is gone (the instance was reaped, and its next
/// heartbeat finds out and re-asserts its claims).
///
/// A reap deletes that row before anything else. So a membership or rename
/// written in this transaction either commits first, and a reap under way
/// waits for it, then removes it and posts its end after its announcement;
/// or it finds the reap committed, and writes nothing. Without the lock, on
/// PostgreSQL a join could read the row a reap had deleted but not yet
/// committed, and post its `join` after the reap's `leave`: the others saw
/// the user back under a nick that was free to take.
async fn while_registered(
    database: &Db,
    instance: &str,
) -> Result<Option<Transaction<'static, Any>>, BusError> {
    let mut tx = database.pool.begin().await.map_err(db)?;
    // The row is written as it is: a lock, not a renewal (the others watch
    // its value change, see `silence`). Only this life's row counts: one a
    // namesake took over while this instance was away is not its lease.
    let held =
        sqlx::query("UPDATE instances SET seen_at = seen_at WHERE instance = $1 AND life = $2")
            .bind(instance)
            .bind(&*database.life)
            .execute(counted(database, &mut tx))
            .await
            .map_err(db)?
            .rows_affected();
    Ok((held > 0).then_some(tx))
}

/// The transaction, for one more counted statement.
fn counted<'t>(database: &Db, tx: &'t mut Transaction<'static, Any>) -> &'t mut AnyConnection {
    database.statements.fetch_add(1, Ordering::Relaxed);
    &mut *tx
}

/// The shared database, counting the statements this instance sends it: the
/// poll bus's cost, which `--poll-interval` trades against latency.
#[derive(Clone)]
struct Db {
    pool: AnyPool,
    statements: Arc<AtomicU64>,
    /// The database's clock, for the times rows are kept until.
    clock: Clock,
    /// Held by each membership write of this instance (a join, a leave, a
    /// rename) and by a re-assertion of its claims for its whole length. A
    /// re-assertion brings the directory up to snapshots of the hub; a write
    /// that landed between a snapshot and the statements acting on it was
    /// undone by them (a leave re-recorded, a join withdrawn). Now it waits,
    /// and lands on top.
    directory: Arc<Mutex<()>>,
    /// Held by each take of this instance's inbox (see [`take_inbox`]), so
    /// that takes run one at a time and deliver in order.
    inbox: Arc<Mutex<()>>,
    /// This life of the instance (see `lease`): a random token in its row.
    /// Its inbox is taken, and its claims made, only while the name's row
    /// holds it.
    life: Arc<str>,
}

impl Db {
    /// The pool, for one more statement.
    fn run(&self) -> &AnyPool {
        self.statements.fetch_add(1, Ordering::Relaxed);
        &self.pool
    }
}

fn db(err: sqlx::Error) -> BusError {
    BusError::Store(err.into())
}

/// Renews this instance's lease every [`HEARTBEAT`] (and re-asserts its
/// claims, and starts a reap of the silent beside it), on its own: were it
/// to wait for the poll,
/// a poll that keeps failing (a room it cannot read, a catch-up too long for
/// the deadline) would hold renewals back until the others reaped this
/// instance, alive, and gave its users away. For the same reason it holds
/// its own handle on the hub rather than waiting for the poller's cursors.
async fn heartbeat(
    mut lease: lease::Lease,
    database: Db,
    sink: Arc<dyn Deliver>,
    fence: Arc<Fence>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Registering renewed the lease just now.
    tick.tick().await;
    // The reap of the silent, when one is under way.
    let mut reaping: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // Ended before the bus releases this instance's own rows.
                if let Some(reaping) = reaping {
                    reaping.abort();
                    let _ = reaping.await;
                }
                return;
            }
            _ = tick.tick() => {}
        }
        let busy = reaping.as_ref().is_some_and(|r| !r.is_finished());
        // The renewal and the look at the others share one deadline, so that
        // renewals stay at most a heartbeat plus that deadline apart; no
        // look after a renewal that failed.
        let beat = async {
            let sent = tokio::time::Instant::now();
            // Renewing also hands the hub every nick taken meanwhile.
            lease.renew(&database, Some(&sink)).await?;
            fence.confirmed(sent);
            if busy {
                return Ok(Vec::new()); // looked at again once the reap is done
            }
            lease.silent(&database).await
        };
        let silent = match tokio::time::timeout(POLL_DEADLINE, beat).await {
            Ok(Ok(silent)) if !silent.is_empty() => silent,
            Ok(Ok(_)) => continue,
            Ok(Err(BusError::Superseded(instance))) => {
                // Another life holds the name: renew nothing more, and stop.
                fence.supersede(&instance);
                sink.deliver(Envelope::Superseded { instance });
                return;
            }
            Ok(Err(err)) => {
                tracing::warn!(cause = %err, "poll bus: heartbeat failed");
                continue;
            }
            Err(_) => {
                tracing::warn!("poll bus: heartbeat timed out");
                continue;
            }
        };
        // Beside the heartbeat, not in it: a reap is a transaction of a
        // dozen round trips, which on a slow database did not fit the
        // heartbeat's deadline, was cut off every time, and left a dead
        // instance's users in the room for good. Renewals must not wait for
        // it either, or this instance's own lease would run out.
        let database = database.clone();
        reaping = Some(tokio::spawn(async move {
            let reap = lease::reap_silent(&database, &silent);
            match tokio::time::timeout(REAP_DEADLINE, reap).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::warn!(cause = %err, "poll bus: reaping failed"),
                Err(_) => tracing::warn!("poll bus: reaping timed out"),
            }
        }));
    }
}

/// Delivers rows of `room` after the cursor up to `upto` (inclusive), in order.
async fn catch_up(
    statements: &AtomicU64,
    store: &dyn Store,
    cursors: &mut Cursors,
    room: &RoomName,
    upto: u64,
) -> Result<(), BusError> {
    let Some(sink) = cursors.sink.clone() else {
        return Ok(());
    };
    loop {
        let after = cursors.delivered.get(room).copied().unwrap_or(0);
        if after >= upto {
            return Ok(());
        }
        statements.fetch_add(1, Ordering::Relaxed);
        let rows = match store.since(room, after, CATCH_UP).await {
            Ok(rows) => rows,
            // A row that cannot be read (damaged, or written by a newer
            // version) would hold the room here for good, and every message
            // after it would reach nobody. Read one row to tell whether it
            // is the next: if so, skip its seq (clients see a hole, as for
            // any seq that was never stored) and go on.
            Err(StoreError::Corrupt(why)) => {
                statements.fetch_add(1, Ordering::Relaxed);
                match store.since(room, after, 1).await {
                    Ok(rows) => rows,
                    Err(StoreError::Corrupt(_)) => {
                        tracing::error!(%room, seq = after + 1, cause = %why, "poll bus: a stored message cannot be read; skipping its seq");
                        cursors.delivered.insert(room.clone(), after + 1);
                        continue;
                    }
                    Err(err) => return Err(err.into()),
                }
            }
            Err(err) => return Err(err.into()),
        };
        if rows.is_empty() {
            return Ok(());
        }
        for m in rows {
            if m.seq > upto {
                return Ok(());
            }
            cursors.delivered.insert(room.clone(), m.seq);
            sink.deliver(Envelope::Message(Arc::new(m)));
        }
    }
}

/// One poll: new room rows, then this instance's inbox.
async fn poll_once(
    database: &Db,
    store: &dyn Store,
    state: &Mutex<Cursors>,
    instance: &str,
) -> Result<(), BusError> {
    let mut cursors = state.lock().await;
    let watched: Vec<RoomName> = cursors.delivered.keys().cloned().collect();
    let mut heads = Vec::new();
    for rooms in watched.chunks(ROOMS_PER_QUERY) {
        // Placeholders are spelled out: sqlx's QueryBuilder writes `?` for the
        // Any driver, which PostgreSQL rejects.
        let placeholders: Vec<String> = (1..=rooms.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT room, last_seq FROM room_seqs WHERE room IN ({})",
            placeholders.join(", ")
        );
        // Only `$N` placeholders are formatted in; room names are bound.
        let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql));
        for room in rooms {
            q = q.bind(room.as_str());
        }
        let rows: Vec<(String, i64)> = q.fetch_all(database.run()).await.map_err(db)?;
        heads.extend(rows);
    }
    for (room, last) in heads {
        let Ok(room) = RoomName::parse(&room) else {
            continue;
        };
        let last = last.max(0) as u64;
        if cursors.delivered.get(&room).is_some_and(|&d| d < last) {
            match catch_up(&database.statements, store, &mut cursors, &room, last).await {
                Err(err) if !err.is_unreachable() => {
                    // One room's unreadable rows must not hold up the others'
                    // messages, nor this instance's inbox: it is tried again
                    // at the next poll.
                    tracing::warn!(cause = %err, %room, "poll bus: cannot read this room's new messages");
                }
                result => result?,
            }
        }
    }
    let sink = cursors.sink.clone();
    drop(cursors);
    match sink {
        Some(sink) => take_inbox(database, instance, &sink).await,
        None => Ok(()),
    }
}

/// Delivers what waits in this instance's inbox, oldest first.
///
/// The statement that returns the rows deletes them, and once its
/// transaction commits they exist only in its answer. So the take is a task
/// of its own, which a caller's deadline (the poll's, the heartbeat's) does
/// not cancel: a caller that gives up only stops waiting, and the rows are
/// delivered when the answer comes. Cancelled with the caller, a take held
/// up past the poll's deadline (a slow database, a lock, a stall of this
/// process between sending it and reading the answer) lost every DM it had
/// deleted. The take's own deadline, far longer, cuts it off before its
/// commit (see [`take_inbox_now`]). Takes run one at a time, so they
/// deliver in order.
async fn take_inbox(
    database: &Db,
    instance: &str,
    sink: &Arc<dyn Deliver>,
) -> Result<(), BusError> {
    let (database, instance, sink) = (database.clone(), instance.to_owned(), sink.clone());
    let take = tokio::spawn(async move {
        let _one_at_a_time = database.inbox.clone().lock_owned().await;
        // Bounded all the same, far beyond any answer: a connection that
        // went silent (half-open) must not hold every later take, and the
        // gate, for good.
        let take = take_inbox_now(&database, &instance, sink.as_ref());
        tokio::time::timeout(REAP_DEADLINE, take)
            .await
            .unwrap_or(Err(BusError::Unreachable))
    });
    take.await.unwrap_or(Err(BusError::Closed))
}

async fn take_inbox_now(database: &Db, instance: &str, sink: &dyn Deliver) -> Result<(), BusError> {
    // Look first: in WAL mode a read never blocks the other instances'
    // writes, and the inbox is empty on most polls.
    let waiting: Option<(i64,)> =
        sqlx::query_as("SELECT id FROM inbox WHERE instance = $1 LIMIT 1")
            .bind(instance)
            .fetch_optional(database.run())
            .await
            .map_err(db)?;
    if waiting.is_none() {
        return Ok(());
    }
    // Take what is there in one statement: the rows deleted are exactly the
    // rows read. (Reading, then deleting up to the highest id read, would
    // lose a row whose lower id was committed in between, on PostgreSQL.)
    // Only while the name's row is this life's: an instance whose name a
    // namesake took over while it was away would otherwise take the
    // namesake's DMs, until it stops, and show them to its own users.
    // In a transaction committed once the rows are here: a take cut short
    // before (its deadline, a lost connection) is rolled back, and the next
    // one gets them. Deleted on their own, rows whose answer never came
    // back were gone.
    let mut tx = database.run().begin().await.map_err(db)?;
    let mut rows: Vec<(i64, String)> = sqlx::query_as(
        "DELETE FROM inbox WHERE instance = $1
           AND EXISTS (SELECT 1 FROM instances WHERE instance = $1 AND life = $2)
         RETURNING id, payload",
    )
    .bind(instance)
    .bind(&*database.life)
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    rows.sort_unstable_by_key(|&(id, _)| id);
    for (_, payload) in rows {
        let Ok(row) = serde_json::from_str::<InboxRow>(&payload) else {
            tracing::warn!("unreadable inbox row skipped");
            continue;
        };
        for envelope in row.into_envelopes() {
            sink.deliver(envelope);
        }
    }
    Ok(())
}

/// What numbering a draft came to.
enum Sequenced {
    /// Stored with the room's next seq.
    New(Arc<Message>),
    /// Its idempotency key was used by the same nick within the window:
    /// nothing was stored; this is the first message sent with it.
    Repeat(Message),
}

impl PollBus {
    /// Gives `draft` its room's next seq and stores it, in one transaction,
    /// with its idempotency key if it has one.
    async fn sequence(&self, draft: Draft) -> Result<Sequenced, BusError> {
        let room = draft.room.clone();
        let key = draft.key.clone();
        if key.is_some() {
            // Before the transaction: once COMMIT is sent, nothing may fail
            // or time the send out.
            self.keys.prune_now_and_then(self.db.run()).await;
        }
        // BEGIN and COMMIT are not counted.
        self.db.statements.fetch_add(1, Ordering::Relaxed);
        let mut tx = self.db.run().begin().await.map_err(db)?;
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO room_seqs (room, last_seq)
             VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE room = $1))
             ON CONFLICT (room) DO UPDATE SET last_seq = room_seqs.last_seq + 1
             RETURNING last_seq",
        )
        .bind(room.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let message = Arc::new(draft.sequence(seq.max(1) as u64));
        if let Some(key) = &key {
            self.db.statements.fetch_add(1, Ordering::Relaxed);
            if !self
                .keys
                .claim(&mut *tx, &message.nick, key, &message)
                .await?
            {
                // Rolling back also un-bumps the room's seq: nothing was used.
                tx.rollback().await.map_err(db)?;
                let first = self
                    .keys
                    .original(self.db.run(), &message.nick, key)
                    .await?;
                return first.map(Sequenced::Repeat).ok_or_else(|| {
                    BusError::Store(StoreError::Corrupt(format!(
                        "idempotency key {:?} names no message",
                        key.as_str()
                    )))
                });
            }
        }
        self.db.statements.fetch_add(1, Ordering::Relaxed);
        sqlx::query(
            "INSERT INTO messages (room, seq, id, nick, text, kind, ts)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(message.room.as_str())
        .bind(seq)
        .bind(message.id.to_string())
        .bind(message.nick.as_str())
        .bind(message.text.as_str())
        .bind(message.kind.as_str())
        .bind(message.ts.0)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(Sequenced::New(message))
    }

    /// Delivers this instance's own message at once, after anything older it
    /// has not delivered yet, so a sender does not wait for a poll.
    async fn deliver_own(&self, message: &Arc<Message>) {
        let room = &message.room;
        let mut cursors = self.state.lock().await;
        if !cursors.delivered.contains_key(room) {
            return;
        }
        let older = catch_up(
            &self.db.statements,
            self.store.as_ref(),
            &mut cursors,
            room,
            message.seq - 1,
        )
        .await;
        if let Err(err) = older {
            // Delivering this one now would skip the older ones: the poller
            // delivers them all in order instead.
            tracing::debug!(cause = %err, %room, "catch-up before own message failed");
            return;
        }
        if cursors
            .delivered
            .get(room)
            .is_some_and(|&d| d < message.seq)
        {
            cursors.delivered.insert(room.clone(), message.seq);
            if let Some(sink) = &cursors.sink {
                sink.deliver(Envelope::Message(message.clone()));
            }
        }
    }
}

#[async_trait]
impl Bus for PollBus {
    fn name(&self) -> &'static str {
        "poll"
    }

    fn start(&self, sink: Arc<dyn Deliver>) {
        self.state
            .try_lock()
            .expect("start is called before anything else")
            .sink = Some(sink.clone());
        let (database, store, state, gate, stop) = (
            self.db.clone(),
            self.store.clone(),
            self.state.clone(),
            self.gate.clone(),
            self.stop.clone(),
        );
        let (instance, interval) = (self.instance.clone(), self.interval);
        let lease = self
            .lease
            .lock()
            .expect("not poisoned")
            .take()
            .expect("start is called once, after open");
        let heartbeat = tokio::spawn(heartbeat(
            lease,
            database.clone(),
            sink,
            self.fence.clone(),
            stop.clone(),
        ));
        let poller = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let cycle = poll_once(&database, store.as_ref(), &state, &instance);
                // A database that stops answering (rather than refusing)
                // would otherwise hold the poller, and the cursors, forever.
                let result = tokio::time::timeout(POLL_DEADLINE, cycle)
                    .await
                    .unwrap_or_else(|_| Err(BusError::Unreachable));
                match result {
                    // The database answered: messages may be numbered again.
                    Ok(()) => gate.open(),
                    Err(err) if err.is_unreachable() => gate.shut(format!("poll: {err}")),
                    Err(err) => tracing::warn!(cause = %err, "poll bus: poll failed"),
                }
            }
        });
        self.tasks
            .lock()
            .expect("not poisoned")
            .extend([poller, heartbeat]);
    }

    fn admits(&self) -> Result<(), BusError> {
        self.fence.check()
    }

    async fn publish(&self, draft: Draft) -> Result<Arc<Message>, BusError> {
        self.fence.check()?;
        // While the database is known to be away, refuse at once: a sender's
        // next lines must not queue up behind a statement that cannot finish.
        self.gate.admit()?;
        let sequenced =
            gate::attempt(&self.gate, "numbering a message", self.sequence(draft)).await?;
        let message = match sequenced {
            Sequenced::New(message) => message,
            Sequenced::Repeat(first) => return Ok(Arc::new(first)),
        };
        // The message is committed: from here on nothing may fail the send.
        // If delivering at once takes too long, the poller delivers it.
        if tokio::time::timeout(gate::ATTEMPT, self.deliver_own(&message))
            .await
            .is_err()
        {
            tracing::debug!(room = %message.room, seq = message.seq, "own message left to the poller");
        }
        Ok(message)
    }

    async fn health(&self) -> Result<(), BusError> {
        self.gate.status()
    }

    async fn watch(&self, room: &RoomName, delivered: u64) {
        let mut cursors = self.state.lock().await;
        let cursor = cursors.delivered.entry(room.clone()).or_insert(delivered);
        *cursor = (*cursor).max(delivered);
    }

    async fn unwatch(&self, room: &RoomName) {
        self.state.lock().await.delivered.remove(room);
    }

    fn statements(&self) -> Option<u64> {
        Some(self.db.statements.load(Ordering::Relaxed))
    }

    async fn close(&self) {
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("not poisoned"));
        for task in tasks {
            let _ = task.await;
        }
        // Free this instance's nicks now rather than after the lease; its
        // users leave at once. Not if the name is another life's by now:
        // what is kept under it is that one's.
        if self.fence.is_superseded() {
            tracing::warn!("this instance's name is another's now: giving nothing back under it");
        } else if let Err(err) = lease::Lease::release(&self.db, &self.instance).await {
            tracing::warn!(cause = %err, "could not give this instance's claims back; its lease will");
        }
        self.state.lock().await.sink = None;
        self.db.pool.close().await;
    }

    fn directory(&self) -> Option<&dyn Directory> {
        Some(self)
    }
}

#[async_trait]
impl Directory for PollBus {
    async fn claim_nick(&self, nick: &Nick, owner: SessionId) -> Result<bool, BusError> {
        // Not for an instance whose name another life holds (a namesake took
        // it over while this one was away, and its next heartbeat stops it):
        // the nick would be recorded under the namesake's name, for good.
        let life: Option<String> =
            sqlx::query_scalar("SELECT life FROM instances WHERE instance = $1")
                .bind(self.instance.as_str())
                .fetch_optional(self.db.run())
                .await
                .map_err(db)?;
        if life.is_some_and(|life| *life != *self.db.life) {
            return Err(BusError::Superseded(self.instance.clone()));
        }
        // Never from a live instance, nor from one merely late: only a reaped
        // instance's claims are free, and a reaped instance finds out.
        let held = lease::claim_nicks(&self.db, &self.instance, &[(nick, owner)]).await?;
        Ok(held.contains(nick.key().as_str()))
    }

    async fn release_nick(&self, nick: &Nick, owner: SessionId) -> Result<(), BusError> {
        let (key, owner) = (nick.key(), owner.to_string());
        // Memberships first, while the claim still keeps anyone else from
        // taking the nick and joining under it.
        let rooms: Vec<(String,)> = sqlx::query_as(
            "DELETE FROM presence WHERE nick_key = $1 AND instance = $2
               AND EXISTS (SELECT 1 FROM nicks WHERE nick_key = $1 AND instance = $2 AND owner = $3)
             RETURNING room",
        )
        .bind(key.as_str())
        .bind(self.instance.as_str())
        .bind(owner.as_str())
        .fetch_all(self.db.run())
        .await
        .map_err(db)?;
        self.exec(
            "DELETE FROM nicks WHERE nick_key = $1 AND instance = $2 AND owner = $3",
            &[key.as_str(), &self.instance, &owner],
        )
        .await?;
        for (room,) in rooms {
            let row = InboxRow::Left {
                room,
                nick: nick.to_string(),
            };
            self.broadcast(&row).await?;
        }
        Ok(())
    }

    async fn renamed(&self, old: &Nick, new: &Nick, owner: SessionId) -> Result<(), BusError> {
        let _directory = self.db.directory.lock().await;
        let (old_key, new_key) = (old.key(), new.key());
        // Reaped: the memberships are gone, and the re-assertion claims the
        // new nick's rooms.
        let Some(mut tx) = while_registered(&self.db, &self.instance).await? else {
            return Ok(());
        };
        let on = counted(&self.db, &mut tx);
        let rooms = move_memberships(on, &self.instance, &old_key, new).await?;
        // A change of case keeps the key, whose claim is now the new nick's.
        if old_key != new_key {
            sqlx::query("DELETE FROM nicks WHERE nick_key = $1 AND instance = $2 AND owner = $3")
                .bind(old_key.as_str())
                .bind(self.instance.as_str())
                .bind(owner.to_string())
                .execute(counted(&self.db, &mut tx))
                .await
                .map_err(db)?;
        }
        if !rooms.is_empty() {
            let row = InboxRow::Renamed {
                old: old.to_string(),
                new: new.to_string(),
                rooms,
            };
            let on = counted(&self.db, &mut tx);
            announce(on, &self.instance, &row, &new_key, None).await?;
        }
        tx.commit().await.map_err(db)
    }

    async fn joined(&self, room: &RoomName, nick: &Nick, delivered: u64) -> Result<(), BusError> {
        Bus::watch(self, room, delivered).await;
        // Only under this instance's claim on the nick. A join still on its
        // way when this instance stalled (frozen, or its statements held up
        // on the network) may reach the database after the lease was reaped
        // and the nick given to someone else: it must not record a
        // membership for a nick this instance no longer holds.
        // Nor while a reap of this instance is under way (see
        // `while_registered`).
        let _directory = self.db.directory.lock().await;
        let Some(mut tx) = while_registered(&self.db, &self.instance).await? else {
            return Ok(());
        };
        let on = counted(&self.db, &mut tx);
        if !record_member(on, &self.instance, room, nick, Existing::Replace).await? {
            return Ok(());
        }
        let row = InboxRow::Joined {
            room: room.to_string(),
            nick: nick.to_string(),
        };
        let on = counted(&self.db, &mut tx);
        announce(on, &self.instance, &row, &nick.key(), Some(room)).await?;
        tx.commit().await.map_err(db)
    }

    async fn left(&self, room: &RoomName, nick: &Nick) -> Result<(), BusError> {
        let _directory = self.db.directory.lock().await;
        // Only under this life's row: a namesake that took the name over
        // may have a member of the same nick there.
        let removed = self
            .exec(
                "DELETE FROM presence WHERE room = $1 AND nick_key = $2 AND instance = $3
                   AND EXISTS (SELECT 1 FROM instances WHERE instance = $3 AND life = $4)",
                &[
                    room.as_str(),
                    nick.key().as_str(),
                    &self.instance,
                    &self.db.life,
                ],
            )
            .await?;
        if removed == 0 {
            return Ok(());
        }
        let row = InboxRow::Left {
            room: room.to_string(),
            nick: nick.to_string(),
        };
        self.broadcast(&row).await
    }

    // Members, rooms and DM recipients count while their instance is
    // registered: a late instance's users stay listed until it is reaped, at
    // the moment the others are told they left, so what `/who` says and the
    // `join`/`leave` events agree (and an outage hides nobody).
    async fn members(&self, room: &RoomName) -> Result<Vec<Nick>, BusError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT p.nick FROM presence p JOIN instances i ON i.instance = p.instance
             WHERE p.room = $1",
        )
        .bind(room.as_str())
        .fetch_all(self.db.run())
        .await
        .map_err(db)?;
        let mut nicks: Vec<Nick> = rows.iter().filter_map(|(n,)| Nick::parse(n).ok()).collect();
        nicks.sort_by_key(Nick::key);
        Ok(nicks)
    }

    async fn rooms(&self) -> Result<Vec<RoomCount>, BusError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT p.room, COUNT(*) FROM presence p JOIN instances i ON i.instance = p.instance
             GROUP BY p.room ORDER BY p.room",
        )
        .fetch_all(self.db.run())
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .filter_map(|(room, n)| {
                Some(RoomCount {
                    room: RoomName::parse(&room).ok()?,
                    members: n.max(0) as usize,
                })
            })
            .collect())
    }

    async fn send_dm(&self, dm: &DirectMessage) -> Result<Option<Nick>, BusError> {
        self.fence.check()?;
        let owner: Option<(String, String)> = sqlx::query_as(
            "SELECT n.instance, n.nick FROM nicks n JOIN instances i ON i.instance = n.instance
             WHERE n.nick_key = $1",
        )
        .bind(dm.to.key().as_str())
        .fetch_optional(self.db.run())
        .await
        .map_err(db)?;
        let Some((instance, nick)) = owner else {
            return Ok(None);
        };
        let Ok(to) = Nick::parse(&nick) else {
            return Ok(None);
        };
        let row = InboxRow::Dm {
            id: dm.id,
            from: dm.from.to_string(),
            to: to.to_string(),
            text: dm.text.clone(),
            ts: dm.ts.0,
        };
        // Kept through a reap of that instance for a while: it may be stalled,
        // and read its inbox when it wakes.
        let sql = format!(
            "INSERT INTO inbox (instance, payload, kept_until) VALUES ($1, $2, {} + $3)",
            self.db.clock.now_ms()
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(instance.as_str())
            .bind(row.to_json())
            .bind(DM_KEPT.as_millis() as i64)
            .execute(self.db.run())
            .await
            .map_err(db)?;
        Ok(Some(to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn through_the_table(row: InboxRow) -> Option<Envelope> {
        serde_json::from_str::<InboxRow>(&row.to_json())
            .ok()
            .and_then(InboxRow::into_envelope)
    }

    #[test]
    fn membership_changes_survive_the_inbox() {
        let envelope = through_the_table(InboxRow::Renamed {
            old: "carol".into(),
            new: "Caroline".into(),
            rooms: vec!["general".into(), "random".into()],
        });
        let Some(Envelope::Presence(change)) = envelope else {
            panic!("a presence envelope");
        };
        assert_eq!(
            change,
            Presence::Renamed {
                old: Nick::parse("carol").unwrap(),
                new: Nick::parse("Caroline").unwrap(),
                rooms: vec![
                    RoomName::parse("general").unwrap(),
                    RoomName::parse("random").unwrap()
                ],
            }
        );
    }

    #[tokio::test]
    async fn an_unwatched_room_is_no_longer_polled() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("bus.db").display());
        let store = crate::store::open(&url, Durability::Sync).await.unwrap();
        let bus = PollBus::open(&url, "t", store, Duration::from_secs(1), Durability::Sync)
            .await
            .unwrap();
        let (a, b) = (RoomName::parse("a").unwrap(), RoomName::parse("b").unwrap());
        Bus::watch(&bus, &a, 3).await;
        Bus::watch(&bus, &b, 0).await;
        Bus::unwatch(&bus, &a).await;
        let watched: Vec<RoomName> = bus.state.lock().await.delivered.keys().cloned().collect();
        assert_eq!(watched, vec![b]);
    }

    /// Two instances, `a` and `b`, sharing one SQLite database.
    async fn two_instances() -> (tempfile::TempDir, PollBus, PollBus) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("bus.db").display());
        let store = crate::store::open(&url, Durability::Sync).await.unwrap();
        let open = |name: &'static str| {
            PollBus::open(
                &url,
                name,
                store.clone(),
                Duration::from_secs(1),
                Durability::Sync,
            )
        };
        let (a, b) = (open("a").await.unwrap(), open("b").await.unwrap());
        (dir, a, b)
    }

    /// Takes what waits in `bus`'s inbox, as the JSON it was posted as.
    async fn take_inbox(bus: &PollBus) -> Vec<String> {
        let rows: Vec<(String,)> =
            sqlx::query_as("DELETE FROM inbox WHERE instance = $1 RETURNING payload")
                .bind(bus.instance.as_str())
                .fetch_all(&bus.db.pool)
                .await
                .unwrap();
        rows.into_iter().map(|(payload,)| payload).collect()
    }

    /// Session 1 of `a` is `nick` in #general; then `a`'s lease is reaped
    /// (as a stall past it would have it).
    async fn in_general_then_reaped(a: &PollBus, nick: &Nick) {
        let general = RoomName::parse("general").unwrap();
        assert!(a.claim_nick(nick, SessionId(1)).await.unwrap());
        a.joined(&general, nick, 0).await.unwrap();
        lease::Lease::release(&a.db, "a").await.unwrap();
    }

    /// Session 1 of `a` becomes `new` while `a`'s lease is reaped: `new` is
    /// claimed, but there is no membership to move yet.
    async fn renamed_while_reaped(a: &PollBus, old: &Nick, new: &Nick) {
        assert!(a.claim_nick(new, SessionId(1)).await.unwrap());
        a.renamed(old, new, SessionId(1)).await.unwrap();
    }

    /// `a` stalls past its lease: `b` reaps it (its users leave), a session
    /// of `b` takes `U7` (the key of `a`'s `u7`), and `a` registers again as
    /// its next heartbeat would.
    async fn reaped_and_back(a: &PollBus, b: &PollBus) {
        let life: String = sqlx::query_scalar("SELECT life FROM instances WHERE instance = 'a'")
            .fetch_one(&a.db.pool)
            .await
            .unwrap();
        lease::Lease::release(&a.db, "a").await.unwrap();
        let taken = Nick::parse("U7").unwrap();
        assert!(b.claim_nick(&taken, SessionId(2)).await.unwrap());
        sqlx::query("INSERT INTO instances (instance, seen_at, life) VALUES ('a', $1, $2)")
            .bind(now_ms())
            .bind(life)
            .execute(&a.db.pool)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_join_announced_after_the_lease_was_reaped_is_not_announced() {
        let (_dir, a, b) = two_instances().await;
        let (u7, side) = (Nick::parse("u7").unwrap(), RoomName::parse("side").unwrap());
        assert!(a.claim_nick(&u7, SessionId(1)).await.unwrap());
        a.joined(&side, &u7, 0).await.unwrap();
        assert_eq!(take_inbox(&b).await.len(), 1, "the join, announced");

        // The instance stalls between recording a join and announcing it.
        reaped_and_back(&a, &b).await;
        let gone = take_inbox(&b).await;
        assert!(
            gone.iter().all(|row| row.contains(r#""kind":"gone""#)),
            "{gone:?}"
        );
        let late = InboxRow::Joined {
            room: side.to_string(),
            nick: u7.to_string(),
        };
        announce(a.db.run(), "a", &late, &u7.key(), Some(&side))
            .await
            .unwrap();
        assert_eq!(take_inbox(&b).await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_join_that_reaches_the_database_after_the_lease_was_reaped_records_nothing() {
        let (_dir, a, b) = two_instances().await;
        let (u7, side) = (Nick::parse("u7").unwrap(), RoomName::parse("side").unwrap());
        assert!(a.claim_nick(&u7, SessionId(1)).await.unwrap());

        // The whole join was held up until after the lease was reaped.
        reaped_and_back(&a, &b).await;
        take_inbox(&b).await;
        a.joined(&side, &u7, 0).await.unwrap();
        assert_eq!(b.members(&side).await.unwrap(), Vec::<Nick>::new());
        assert_eq!(take_inbox(&b).await, Vec::<String>::new());
    }

    /// A hub whose sessions change while its claims are re-asserted: each
    /// call to `claims` answers the next snapshot, then the last one again.
    struct Snapshots(StdMutex<Vec<Vec<crate::core::ports::Claim>>>);

    impl Deliver for Snapshots {
        fn deliver(&self, _: Envelope) {}

        fn claims(&self) -> Vec<crate::core::ports::Claim> {
            let mut left = self.0.lock().unwrap();
            if left.len() > 1 {
                left.remove(0)
            } else {
                left[0].clone()
            }
        }
    }

    #[tokio::test]
    async fn a_join_made_while_the_claims_are_re_asserted_is_recorded() {
        let (_dir, a, b) = two_instances().await;
        let mut lease = a.lease.lock().unwrap().take().unwrap();
        let (u8, general, side) = (
            Nick::parse("u8").unwrap(),
            RoomName::parse("general").unwrap(),
            RoomName::parse("side").unwrap(),
        );
        in_general_then_reaped(&a, &u8).await;

        // u8 joins #side after the hub's first snapshot, and the join
        // reaches the database before the nick is claimed again: it finds
        // no claim and records nothing.
        a.joined(&side, &u8, 0).await.unwrap();
        let claim = |rooms: &[&RoomName]| crate::core::ports::Claim {
            session: SessionId(1),
            nick: u8.clone(),
            rooms: rooms.iter().map(|&r| (r.clone(), 0)).collect(),
        };
        let hub: Arc<dyn Deliver> = Arc::new(Snapshots(StdMutex::new(vec![
            vec![claim(&[&general])],
            vec![claim(&[&general, &side])],
        ])));
        take_inbox(&b).await;
        lease.renew_and_reap(&a.db, Some(&hub)).await.unwrap();

        assert_eq!(b.members(&side).await.unwrap(), vec![u8.clone()]);
        let told = take_inbox(&b).await.concat();
        assert!(told.contains(r#"{"room":"side","nick":"u8"}"#), "{told}");
    }

    #[tokio::test]
    async fn a_rename_made_while_the_claims_are_re_asserted_keeps_the_rooms() {
        let (_dir, a, b) = two_instances().await;
        let mut lease = a.lease.lock().unwrap().take().unwrap();
        let (u8, u9) = (Nick::parse("u8").unwrap(), Nick::parse("u9").unwrap());
        let general = RoomName::parse("general").unwrap();
        in_general_then_reaped(&a, &u8).await;

        // u8 becomes u9 after the hub's first snapshot, and the rename
        // reaches the database while the lease is still reaped: u9 is
        // claimed, but there is no membership to move yet.
        renamed_while_reaped(&a, &u8, &u9).await;
        take_inbox(&b).await;
        let hub = renamed_between(&u8, &u9, &general);
        lease.renew_and_reap(&a.db, Some(&hub)).await.unwrap();

        assert_eq!(b.members(&general).await.unwrap(), vec![u9.clone()]);
        let told = take_inbox(&b).await.concat();
        assert!(told.contains(r#"{"room":"general","nick":"u9"}"#), "{told}");
    }

    /// The hub's two snapshots for session 1: in `general` as `first`, then
    /// as `then`.
    fn renamed_between(first: &Nick, then: &Nick, room: &RoomName) -> Arc<dyn Deliver> {
        let claim = |nick: &Nick| crate::core::ports::Claim {
            session: SessionId(1),
            nick: nick.clone(),
            rooms: vec![(room.clone(), 0)],
        };
        Arc::new(Snapshots(StdMutex::new(vec![
            vec![claim(first)],
            vec![claim(then)],
        ])))
    }

    #[tokio::test]
    async fn a_change_of_case_made_while_the_claims_are_re_asserted_keeps_nick_and_rooms() {
        let (_dir, a, b) = two_instances().await;
        let mut lease = a.lease.lock().unwrap().take().unwrap();
        let (lower, upper) = (Nick::parse("u8").unwrap(), Nick::parse("U8").unwrap());
        let general = RoomName::parse("general").unwrap();
        in_general_then_reaped(&a, &lower).await;
        renamed_while_reaped(&a, &lower, &upper).await;
        take_inbox(&b).await;
        let hub = renamed_between(&lower, &upper, &general);
        lease.renew_and_reap(&a.db, Some(&hub)).await.unwrap();

        let told = take_inbox(&b).await.concat();
        assert_eq!(b.members(&general).await.unwrap(), vec![upper], "{told}");
        let taken = b.claim_nick(&lower, SessionId(2)).await.unwrap();
        assert!(!taken, "b took u8 from a's live U8");
        assert!(
            told.contains(r#""new":"U8""#),
            "the rename announced: {told}"
        );
    }

    #[tokio::test]
    async fn a_rename_away_from_a_nick_lost_meanwhile_keeps_the_rooms() {
        let (_dir, a, b) = two_instances().await;
        let mut lease = a.lease.lock().unwrap().take().unwrap();
        let (u8, u9) = (Nick::parse("u8").unwrap(), Nick::parse("u9").unwrap());
        let general = RoomName::parse("general").unwrap();
        in_general_then_reaped(&a, &u8).await;
        // While `a` is reaped, `b` takes u8 and `a`'s user becomes u9.
        assert!(
            b.claim_nick(&Nick::parse("U8").unwrap(), SessionId(2))
                .await
                .unwrap()
        );
        renamed_while_reaped(&a, &u8, &u9).await;
        take_inbox(&b).await;
        let hub = renamed_between(&u8, &u9, &general);
        lease.renew_and_reap(&a.db, Some(&hub)).await.unwrap();

        let told = take_inbox(&b).await.concat();
        assert_eq!(b.members(&general).await.unwrap(), vec![u9], "{told}");
    }

    /// A re-assertion cut short and tried again reports a lost nick twice.
    /// The user is renamed once: the others see one guest nick join, not a
    /// second one join and leave again (or, if giving it back failed, stay).
    #[tokio::test]
    async fn a_nick_reported_lost_twice_is_renamed_once() {
        use crate::core::{Command, Hub, Limits, Replies};
        let (_dir, a, b) = two_instances().await;
        let a = Arc::new(a);
        let hub = Hub::new("a".into(), Limits::default(), a.store.clone(), a.clone());
        let u7 = Nick::parse("u7").unwrap();
        let session = hub
            .connect(Some(u7.clone()), Replies::Outbox, None)
            .await
            .unwrap();
        let room = RoomName::parse("general").unwrap();
        let join = Command::Join { room, after: None };
        hub.handle(session.id, join).await;
        reaped_and_back(&a, &b).await; // and b has taken U7
        take_inbox(&b).await;

        let first = hub.claim_lost(session.id, u7.clone());
        let again = hub.claim_lost(session.id, u7);
        for rename in [first, again].into_iter().flatten() {
            rename.await.unwrap();
        }
        let told = take_inbox(&b).await.concat();
        assert_eq!(told.matches("guest-").count(), 1, "{told}");
    }

    /// A namesake took `a`'s name over while `a` was away (the name's row
    /// holds another life). Until its next heartbeat stops it, `a` takes no
    /// nick under the name (it would never give it back) and removes no
    /// membership there (it may be the namesake's).
    #[tokio::test]
    async fn an_instance_whose_name_another_life_holds_takes_and_removes_nothing() {
        let (_dir, a, b) = two_instances().await;
        let (u5, general) = (
            Nick::parse("u5").unwrap(),
            RoomName::parse("general").unwrap(),
        );
        assert!(a.claim_nick(&u5, SessionId(1)).await.unwrap());
        a.joined(&general, &u5, 0).await.unwrap();
        sqlx::query("UPDATE instances SET life = 'namesake' WHERE instance = 'a'")
            .execute(&a.db.pool)
            .await
            .unwrap();

        let claimed = a
            .claim_nick(&Nick::parse("u6").unwrap(), SessionId(2))
            .await;
        assert!(
            matches!(claimed, Err(BusError::Superseded(_))),
            "{claimed:?}"
        );
        a.left(&general, &u5).await.unwrap();
        assert_eq!(b.members(&general).await.unwrap(), vec![u5]);
    }

    #[tokio::test]
    async fn a_session_that_arrived_while_the_lease_was_reaped_is_recorded() {
        let (_dir, a, b) = two_instances().await;
        let mut lease = a.lease.lock().unwrap().take().unwrap();
        let (u5, general) = (
            Nick::parse("u5").unwrap(),
            RoomName::parse("general").unwrap(),
        );
        lease::Lease::release(&a.db, "a").await.unwrap();
        // It connects and joins while `a` is reaped: the join records nothing.
        assert!(a.claim_nick(&u5, SessionId(5)).await.unwrap());
        a.joined(&general, &u5, 0).await.unwrap();
        let claim = crate::core::ports::Claim {
            session: SessionId(5),
            nick: u5.clone(),
            rooms: vec![(general.clone(), 0)],
        };
        let hub: Arc<dyn Deliver> = Arc::new(Snapshots(StdMutex::new(vec![vec![], vec![claim]])));
        take_inbox(&b).await;
        lease.renew_and_reap(&a.db, Some(&hub)).await.unwrap();

        assert_eq!(b.members(&general).await.unwrap(), vec![u5]);
        let told = take_inbox(&b).await.concat();
        assert!(told.contains(r#"{"room":"general","nick":"u5"}"#), "{told}");
    }

    /// A hub whose session leaves #side just after the re-assertion's second
    /// snapshot (which still has it there): the leave is started then, and
    /// given half a second to land before the re-assertion goes on. A leave
    /// that has not landed by then waits in `leave`.
    struct LeavesAfterTheSnapshot {
        bus: Arc<PollBus>,
        snapshots: StdMutex<Vec<Vec<crate::core::ports::Claim>>>,
        leave: StdMutex<Option<tokio::task::JoinHandle<()>>>,
    }

    impl Deliver for LeavesAfterTheSnapshot {
        fn deliver(&self, _: Envelope) {}

        fn claims(&self) -> Vec<crate::core::ports::Claim> {
            let mut left = self.snapshots.lock().unwrap();
            let snapshot = left.remove(0);
            if left.is_empty() {
                let bus = self.bus.clone();
                let mut task = tokio::spawn(async move {
                    let (side, u8) = (RoomName::parse("side").unwrap(), Nick::parse("u8").unwrap());
                    bus.left(&side, &u8).await.unwrap();
                });
                // Without the directory lock, the leave lands now; with it,
                // it waits for the re-assertion, and this wait times out.
                let landed = tokio::task::block_in_place(|| {
                    let wait = tokio::time::timeout(Duration::from_millis(500), &mut task);
                    tokio::runtime::Handle::current().block_on(wait).is_ok()
                });
                if !landed {
                    *self.leave.lock().unwrap() = Some(task);
                }
            }
            snapshot
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leave_during_the_re_assertion_is_not_undone_by_it() {
        let (_dir, a, b) = two_instances().await;
        let mut lease = a.lease.lock().unwrap().take().unwrap();
        let a = Arc::new(a);
        let (u8, general, side) = (
            Nick::parse("u8").unwrap(),
            RoomName::parse("general").unwrap(),
            RoomName::parse("side").unwrap(),
        );
        in_general_then_reaped(&a, &u8).await;
        // u8 joined #side while `a` was reaped (recorded nothing), and
        // leaves it again just after the hub's second snapshot.
        let claim = |rooms: &[&RoomName]| crate::core::ports::Claim {
            session: SessionId(1),
            nick: u8.clone(),
            rooms: rooms.iter().map(|&r| (r.clone(), 0)).collect(),
        };
        let hub = Arc::new(LeavesAfterTheSnapshot {
            bus: a.clone(),
            snapshots: StdMutex::new(vec![
                vec![claim(&[&general])],
                vec![claim(&[&general, &side])],
            ]),
            leave: StdMutex::default(),
        });
        let sink: Arc<dyn Deliver> = hub.clone();
        lease.renew_and_reap(&a.db, Some(&sink)).await.unwrap();
        let waiting = hub.leave.lock().unwrap().take();
        if let Some(leave) = waiting {
            leave.await.unwrap();
        }

        assert_eq!(b.members(&side).await.unwrap(), Vec::<Nick>::new());
        assert_eq!(b.members(&general).await.unwrap(), vec![u8]);
    }

    #[test]
    fn a_reaped_instance_s_departures_arrive_one_per_membership() {
        let member = |room: &str, nick: &str| Member {
            room: room.into(),
            nick: nick.into(),
        };
        let row = InboxRow::Gone {
            members: vec![
                member("general", "carol"),
                member("no spaces allowed", "dave"),
                member("random", "carol"),
            ],
        };
        let row: InboxRow = serde_json::from_str(&row.to_json()).unwrap();
        let left = |room: &str| {
            Envelope::Presence(Presence::Left {
                room: RoomName::parse(room).unwrap(),
                nick: Nick::parse("carol").unwrap(),
            })
        };
        let envelopes = row.into_envelopes();
        assert_eq!(envelopes.len(), 2, "the unreadable membership is dropped");
        for (got, want) in envelopes.iter().zip([left("general"), left("random")]) {
            assert_eq!(format!("{got:?}"), format!("{want:?}"));
        }
    }

    #[test]
    fn a_row_with_invalid_names_is_dropped_not_delivered() {
        let row = InboxRow::Joined {
            room: "no spaces allowed".into(),
            nick: "bob".into(),
        };
        assert!(through_the_table(row).is_none());
        assert!(serde_json::from_str::<InboxRow>(r#"{"kind":"unknown"}"#).is_err());
    }
}
