//! Persistence without loss: every message reaches the store, whichever
//! instance published it and whichever dies.
//!
//! The publish script appends each message to its partition's stream (one
//! per [`PARTITIONS`], not one per room, so the work does not grow with the
//! number of rooms). All instances read those streams as one consumer group:
//! each entry goes to one instance, which inserts it (idempotently: `(room,
//! seq)` is the key), then acknowledges and deletes it. An entry whose reader
//! died stays pending; after [`CLAIM_IDLE`] a live instance claims it
//! (`XAUTOCLAIM`) and stores it. A partition stream therefore holds only
//! what is not stored yet: it is the backlog, bounded by Redis's memory (and
//! a cap, see the README), not a history.
//!
//! [`PARTITIONS`]: super::keys::PARTITIONS

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::*;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::keys::{Keys, PARTITIONS};
use super::script::{self, Lua};
use super::wire::Body;
use crate::core::ports::{Store, WriterStats};
use crate::core::{Message, RoomName};

/// The consumer group every instance's persister belongs to.
pub const GROUP: &str = "persisters";
/// Entries read per partition per round.
const BATCH: u64 = 1_000;
/// How long an entry may stay pending on one reader before another takes it.
pub const CLAIM_IDLE: Duration = Duration::from_secs(10);
/// How often pending entries are looked for.
const CLAIM_EVERY: Duration = Duration::from_secs(3);
/// How often idle consumers are forgotten ([`script::SWEEP_CONSUMERS`]), and
/// how long one must have been idle: far longer than a live reader's pause.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const SWEEP_IDLE: Duration = Duration::from_secs(600);
/// How often a persister reads every partition. Between full rounds it
/// reads only the partitions this instance published to ([`Pokes`]), at
/// once, and a partition again at once while it fills whole batches (a
/// backlog). So the period only delays what other instances published and
/// did not store themselves (they died, or their database link is cut), and
/// an idle cluster of N instances costs Redis `N * PARTITIONS` reads per
/// period.
const FULL_ROUND_EVERY: Duration = Duration::from_secs(1);
/// Every partition, as a [`Pokes`] mask.
const ALL: u32 = if PARTITIONS >= 32 {
    u32::MAX
} else {
    (1 << PARTITIONS) - 1
};
const _: () = assert!(PARTITIONS <= 32, "a partition mask is a u32");

/// The partitions this instance has published to since its persister last
/// read them, as a bit mask, and the persister's wake-up.
#[derive(Debug, Default)]
pub struct Pokes {
    dirty: AtomicU32,
    wake: Notify,
}

impl Pokes {
    /// This instance published a message to `partition`'s stream.
    pub fn published(&self, partition: u32) {
        self.mark(1 << partition);
    }

    fn mark(&self, mask: u32) {
        self.dirty.fetch_or(mask, Ordering::AcqRel);
        self.wake.notify_one();
    }

    fn take(&self) -> u32 {
        self.dirty.swap(0, Ordering::AcqRel)
    }
}

type Entry = (String, HashMap<String, String>);

/// Asks the persister to finish a round and say so.
pub type FlushRequest = oneshot::Sender<()>;

/// One instance's member of the persisters' group.
pub struct Persister {
    pub cmd: Client,
    pub keys: Keys,
    pub instance: String,
    pub store: Arc<dyn Store>,
    pub stats: Arc<WriterStats>,
}

/// What one round read from one partition stream.
struct Taken {
    partition: u32,
    key: String,
    entries: Vec<Entry>,
}

impl Persister {
    /// Runs until `stop`, then does a last round. `flushes` ask for a full
    /// round to finish (a read that wants the store to catch up); `pokes`
    /// name the partitions this instance published to.
    pub async fn run(
        self,
        stop: CancellationToken,
        mut flushes: mpsc::Receiver<FlushRequest>,
        pokes: Arc<Pokes>,
    ) {
        self.ensure_groups().await;
        let sweep = Lua::new(script::SWEEP_CONSUMERS);
        let mut last_sweep = Instant::now();
        let mut last_claim = Instant::now();
        let mut next_full = Instant::now();
        let mut waiting: Vec<FlushRequest> = Vec::new();
        loop {
            while let Ok(done) = flushes.try_recv() {
                waiting.push(done);
            }
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = Instant::now();
                self.sweep(&sweep, SWEEP_IDLE).await;
            }
            let claim = last_claim.elapsed() >= CLAIM_EVERY;
            if claim {
                last_claim = Instant::now();
            }
            let full = claim || !waiting.is_empty() || Instant::now() >= next_full;
            let mask = pokes.take() | if full { ALL } else { 0 };
            let again = self.round(mask, claim, &stop).await;
            // A partition that filled a whole batch may hold more: read it
            // again at once.
            if again != 0 {
                pokes.mark(again);
            }
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
            if stop.is_cancelled() {
                // One more round for what this instance published last.
                self.round(ALL, false, &CancellationToken::new()).await;
                return;
            }
            if full {
                next_full = Instant::now() + FULL_ROUND_EVERY;
            }
            // Claims must still run every CLAIM_EVERY while idle.
            let until = next_full.min(last_claim + CLAIM_EVERY);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = pokes.wake.notified() => {}
                Some(done) = flushes.recv() => waiting.push(done),
            }
        }
    }

    /// Forgets every partition's consumers idle for `idle` that hold nothing.
    async fn sweep(&self, sweep: &Lua, idle: Duration) -> u64 {
        let mut gone = 0;
        for p in 0..PARTITIONS {
            let swept: Result<u64, _> = sweep
                .call(
                    &self.cmd,
                    vec![self.keys.persist(p)],
                    vec![GROUP.to_owned(), idle.as_millis().to_string()],
                )
                .await;
            match swept {
                Ok(n) => gone += n,
                Err(err) => tracing::debug!(cause = %err, "persister: could not sweep consumers"),
            }
        }
        if gone > 0 {
            tracing::info!(
                consumers = gone,
                "persister: forgot idle readers that held nothing"
            );
        }
        gone
    }

    /// Creates the group on every partition stream (harmless if it exists).
    async fn ensure_groups(&self) {
        for p in 0..PARTITIONS {
            let created: Result<(), _> = self
                .cmd
                .xgroup_create(self.keys.persist(p), GROUP, "0", true)
                .await;
            if let Err(err) = created
                && !err.details().contains("BUSYGROUP")
            {
                tracing::debug!(cause = %err, "could not create a persister group yet");
            }
        }
    }

    /// Reads the partitions in `mask` once (and claims abandoned entries if
    /// `claim`), and stores all it found in one transaction. Returns the
    /// partitions that filled a whole batch (they may hold more).
    ///
    /// The partitions are read concurrently: fred pipelines the commands on
    /// one connection, so a round costs one round trip to Redis, not one per
    /// partition. One commit per round, not per partition: a commit waits
    /// for the database's log flush, which costs the same for 10 rows as for
    /// 10,000, and it is what bounds the rate when a backlog drains.
    async fn round(&self, mask: u32, claim: bool, stop: &CancellationToken) -> u32 {
        let wanted = (0..PARTITIONS).filter(|p| mask & (1 << p) != 0);
        let mut taken: Vec<Taken> =
            futures::future::join_all(wanted.map(|p| self.take(p, claim))).await;
        let again = taken
            .iter()
            .filter(|t| t.entries.len() as u64 >= BATCH)
            .fold(0, |mask, t| mask | (1 << t.partition));
        taken.retain(|t| !t.entries.is_empty());
        if !taken.is_empty() {
            self.store_and_ack(taken, stop).await;
        }
        again
    }

    /// What partition `p` has for this instance: new entries, and with
    /// `claim` entries a silent reader left pending.
    async fn take(&self, p: u32, claim: bool) -> Taken {
        let key = self.keys.persist(p);
        let mut entries = match self.read(&key).await {
            Ok(entries) => entries,
            Err(err) => {
                if err.details().contains("NOGROUP") {
                    // Redis lost its data (restarted without persistence).
                    self.ensure_groups().await;
                } else {
                    tracing::debug!(cause = %err, "persister: read failed");
                }
                // Claims still run: they are what rescues a dead reader's
                // entries, whatever this read found.
                Vec::new()
            }
        };
        if claim {
            entries.extend(self.claim(&key).await);
        }
        Taken {
            partition: p,
            key,
            entries,
        }
    }

    async fn read(&self, key: &str) -> Result<Vec<Entry>, fred::error::Error> {
        let reply: Value = self
            .cmd
            .xreadgroup(
                GROUP,
                self.instance.as_str(),
                Some(BATCH),
                None,
                false,
                key,
                ">",
            )
            .await?;
        Ok(read_entries(reply))
    }

    async fn claim(&self, key: &str) -> Vec<Entry> {
        // Read as a plain value: fred's typed XAUTOCLAIM conversion fails on
        // Redis 7's reply (it adds a third element, the deleted ids).
        let claimed: Result<Value, _> = self
            .cmd
            .xautoclaim(
                key,
                GROUP,
                self.instance.as_str(),
                CLAIM_IDLE.as_millis() as u64,
                "0-0",
                Some(BATCH),
                false,
            )
            .await;
        match claimed {
            Ok(reply) => {
                let entries = claimed_entries(reply);
                if !entries.is_empty() {
                    tracing::info!(
                        entries = entries.len(),
                        "persister: claimed messages a silent instance left unstored"
                    );
                }
                entries
            }
            Err(err) => {
                tracing::warn!(cause = %err, "persister: claim failed");
                Vec::new()
            }
        }
    }

    /// Stores what a round took (retrying until it works or the bus stops),
    /// then acknowledges and deletes it, partition by partition.
    async fn store_and_ack(&self, taken: Vec<Taken>, stop: &CancellationToken) {
        let batch: Vec<Arc<Message>> = taken
            .iter()
            .flat_map(|t| t.entries.iter())
            .filter_map(|(_, fields)| {
                let room = RoomName::parse(fields.get("r")?).ok()?;
                let seq = fields.get("s")?.parse().ok()?;
                Body::decode(room, seq, fields.get("m")?).map(Arc::new)
            })
            .collect();
        let mut backoff = Duration::from_millis(50);
        loop {
            let started = Instant::now();
            match self.store.append(&batch).await {
                Ok(()) => {
                    self.stats.committed(batch.len(), started.elapsed());
                    break;
                }
                Err(err) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(cause = %err, rows = batch.len(), retry_in = ?backoff, "persister: store write failed; the messages wait in Redis");
                    if stop.is_cancelled() {
                        // Not acknowledged: another instance will store them.
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Acknowledged only once committed; if this fails the entries stay
        // pending and are stored again (harmlessly) by whoever claims them.
        let acks = taken.into_iter().map(|t| async move {
            let ids: Vec<String> = t.entries.into_iter().map(|(id, _)| id).collect();
            let acked: Result<i64, _> = self.cmd.xack(&t.key, GROUP, ids.clone()).await;
            let deleted: Result<i64, _> = self.cmd.xdel(&t.key, ids).await;
            if let Err(err) = acked.and(deleted) {
                tracing::warn!(cause = %err, "persister: could not acknowledge stored messages");
            }
        });
        futures::future::join_all(acks).await;
    }
}

/// The entries of an `XREADGROUP` reply on one stream: nil when nothing is
/// new, else `[[key, [entry, ...]]]` (a map of key to entries in RESP3).
/// Parsed by hand: fred 10's typed conversions refuse both shapes.
fn read_entries(reply: Value) -> Vec<Entry> {
    match reply {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|stream| match stream {
                Value::Array(mut pair) if pair.len() == 2 => {
                    entries(pair.pop().expect("two elements"))
                }
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.inner().into_values().flat_map(entries).collect(),
        _ => Vec::new(),
    }
}

/// The entries of an `XAUTOCLAIM` reply: `[cursor, [entry, ...], deleted]`
/// (Redis 7 adds `deleted`).
fn claimed_entries(reply: Value) -> Vec<Entry> {
    let Value::Array(mut parts) = reply else {
        return Vec::new();
    };
    if parts.len() < 2 {
        return Vec::new();
    }
    entries(parts.swap_remove(1))
}

/// Stream entries `[[id, [field, value, ...]], ...]`; an entry deleted
/// meanwhile comes as `[id, nil]` and is skipped.
fn entries(list: Value) -> Vec<Entry> {
    let Value::Array(list) = list else {
        return Vec::new();
    };
    list.into_iter()
        .filter_map(|entry| {
            let Value::Array(mut pair) = entry else {
                return None;
            };
            if pair.len() != 2 {
                return None;
            }
            let Value::Array(flat) = pair.pop()? else {
                return None;
            };
            let id = pair.pop()?.as_string()?;
            let fields = flat
                .chunks(2)
                .filter_map(|kv| Some((kv.first()?.as_string()?, kv.get(1)?.as_string()?)))
                .collect();
            Some((id, fields))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::redis::directory::tests::redis;

    /// Each restart under a new name leaves a consumer behind in every
    /// partition's group; the sweep forgets those that hold nothing, and
    /// keeps one that still owns an unstored entry.
    #[tokio::test]
    async fn the_sweep_forgets_idle_consumers_that_hold_nothing() {
        let Some(cmd) = redis().await else {
            return;
        };
        let key = format!("test-sweep-{:08x}", rand::random::<u32>());
        let _: () = cmd.xgroup_create(&key, GROUP, "$", true).await.unwrap();
        // A consumer exists once it has read an entry.
        let read = |name: &'static str| {
            let (cmd, key) = (cmd.clone(), key.clone());
            async move {
                let id: String = cmd
                    .xadd(&key, false, None, "*", vec![("s", "1")])
                    .await
                    .unwrap();
                let _: Value = cmd
                    .xreadgroup(GROUP, name, Some(10), None, false, &key, ">")
                    .await
                    .unwrap();
                id
            }
        };
        for old in ["old-1", "old-2", "old-3"] {
            let id = read(old).await;
            let _: i64 = cmd.xack(&key, GROUP, id).await.unwrap(); // stored
        }
        read("owner").await; // owns its entry, not stored yet

        let sweep = Lua::new(script::SWEEP_CONSUMERS);
        let gone: u64 = sweep
            .call(
                &cmd,
                vec![key.clone()],
                vec![GROUP.to_owned(), "0".to_owned()],
            )
            .await
            .unwrap();
        let left: Value = cmd.xinfo_consumers(&key, GROUP).await.unwrap();
        let _: i64 = cmd.del(&key).await.unwrap();
        assert_eq!(gone, 3);
        let left = format!("{left:?}");
        assert!(left.contains("owner") && !left.contains("old-"), "{left}");
    }

    fn entries_of_one(id: &str, field: &str, value: &str) -> Vec<Entry> {
        vec![(id.into(), HashMap::from([(field.into(), value.into())]))]
    }

    #[test]
    fn read_and_claim_replies_read_as_entries() {
        let s = |s: &str| Value::from(s);
        let reply = Value::Array(vec![
            s("0-0"),
            Value::Array(vec![Value::Array(vec![
                s("1-0"),
                Value::Array(vec![s("r"), s("general"), s("s"), s("7")]),
            ])]),
            Value::Array(vec![s("0-1")]),
        ]);
        let entries = claimed_entries(reply);
        assert_eq!(entries.len(), 1);
        let read = Value::Array(vec![Value::Array(vec![
            s("key"),
            Value::Array(vec![Value::Array(vec![
                s("1-0"),
                Value::Array(vec![s("s"), s("7")]),
            ])]),
        ])]);
        assert_eq!(read_entries(read), entries_of_one("1-0", "s", "7"));
        assert!(read_entries(Value::Null).is_empty());
        assert_eq!(entries[0].0, "1-0");
        assert_eq!(entries[0].1["s"], "7");
    }
}
