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
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fred::prelude::*;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::keys::{Keys, PARTITIONS};
use super::wire::Body;
use crate::core::{Message, RoomName};
use crate::store::{Store, WriterStats};

/// The consumer group every instance's persister belongs to.
pub const GROUP: &str = "persisters";
/// Entries read per partition per round.
const BATCH: u64 = 1_000;
/// How long an entry may stay pending on one reader before another takes it.
pub const CLAIM_IDLE: Duration = Duration::from_secs(10);
/// How often pending entries are looked for.
const CLAIM_EVERY: Duration = Duration::from_secs(3);
/// The pause after a round that found nothing.
const IDLE: Duration = Duration::from_millis(50);

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

impl Persister {
    /// Runs until `stop`, then does a last round. `flushes` ask for a round
    /// to finish (a read that wants the store to catch up).
    pub async fn run(self, stop: CancellationToken, mut flushes: mpsc::Receiver<FlushRequest>) {
        self.ensure_groups().await;
        let mut last_claim = Instant::now();
        loop {
            let mut waiting = Vec::new();
            while let Ok(done) = flushes.try_recv() {
                waiting.push(done);
            }
            let claim = last_claim.elapsed() >= CLAIM_EVERY;
            if claim {
                last_claim = Instant::now();
            }
            let stored = self.round(claim, &stop).await;
            for done in waiting {
                let _ = done.send(());
            }
            if stop.is_cancelled() {
                // One more round for what this instance published last.
                self.round(false, &CancellationToken::new()).await;
                return;
            }
            if stored == 0 {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(IDLE) => {}
                    Some(done) = flushes.recv() => {
                        // Read now, and answer once done.
                        self.round(false, &stop).await;
                        let _ = done.send(());
                    }
                }
            }
        }
    }

    /// Creates the group on every partition stream (harmless if it exists).
    async fn ensure_groups(&self) {
        for p in 0..PARTITIONS {
            let created: Result<(), _> = self
                .cmd
                .xgroup_create(self.keys.persist(p), GROUP, "0", true)
                .await;
            if let Err(err) = created {
                if !err.details().contains("BUSYGROUP") {
                    tracing::debug!(cause = %err, "could not create a persister group yet");
                }
            }
        }
    }

    /// Reads every partition once (and claims abandoned entries if `claim`),
    /// storing what it finds. Returns how many messages it stored.
    async fn round(&self, claim: bool, stop: &CancellationToken) -> usize {
        let mut stored = 0;
        for p in 0..PARTITIONS {
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
                    continue;
                }
            };
            if claim {
                entries.extend(self.claim(&key).await);
            }
            if entries.is_empty() {
                continue;
            }
            stored += self.store_and_ack(&key, entries, stop).await;
        }
        stored
    }

    async fn read(&self, key: &str) -> Result<Vec<Entry>, fred::error::Error> {
        let response: HashMap<String, Vec<Entry>> = self
            .cmd
            .xreadgroup_map(
                GROUP,
                self.instance.as_str(),
                Some(BATCH),
                None,
                false,
                key,
                ">",
            )
            .await?;
        Ok(response.into_values().flatten().collect())
    }

    async fn claim(&self, key: &str) -> Vec<Entry> {
        let claimed = self
            .cmd
            .xautoclaim_values::<String, String, String, _, _, _, _>(
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
            Ok((_, entries)) => {
                if !entries.is_empty() {
                    tracing::info!(
                        entries = entries.len(),
                        "persister: claimed messages a silent instance left unstored"
                    );
                }
                entries
            }
            Err(err) => {
                tracing::debug!(cause = %err, "persister: claim failed");
                Vec::new()
            }
        }
    }

    /// Stores `entries` (retrying until it works or the bus stops), then
    /// acknowledges and deletes them.
    async fn store_and_ack(
        &self,
        key: &str,
        entries: Vec<Entry>,
        stop: &CancellationToken,
    ) -> usize {
        let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        let batch: Vec<Arc<Message>> = entries
            .into_iter()
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
                    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    self.stats
                        .commit_micros
                        .fetch_add(micros, Ordering::Relaxed);
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .messages
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    break;
                }
                Err(err) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(cause = %err, rows = batch.len(), retry_in = ?backoff, "persister: store write failed; the messages wait in Redis");
                    if stop.is_cancelled() {
                        // Not acknowledged: another instance will store them.
                        return 0;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Acknowledged only once committed; if this fails the entries stay
        // pending and are stored again (harmlessly) by whoever claims them.
        let acked: Result<i64, _> = self.cmd.xack(key, GROUP, ids.clone()).await;
        let deleted: Result<i64, _> = self.cmd.xdel(key, ids).await;
        if let Err(err) = acked.and(deleted) {
            tracing::warn!(cause = %err, "persister: could not acknowledge stored messages");
        }
        batch.len()
    }
}
