//! `bench persist`: persistence alone, measured.
//!
//! Fills the partition streams of a fresh `--cluster` name with a backlog of
//! messages, as the publish script would have left them while the database
//! was away, then starts `persisters` real [`Persister`]s (one per simulated
//! instance, one consumer group) and times them until every message is in
//! the store. What it measures is the rate at which the streams drain into
//! the database, and the Redis commands each stored message costs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fred::prelude::*;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::keys::Keys;
use super::persist::Persister;
use super::rooms::unreachable;
use super::wire::Body;
use crate::core::ports::{BusError, Store, WriterStats};
use crate::core::{Draft, MessageKind, Nick, RoomName, Timestamp};

/// What a drain run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainResult {
    /// Messages in the backlog (all stored by the end).
    pub messages: u64,
    /// Rooms they were spread over.
    pub rooms: u32,
    /// Persisters draining at once.
    pub persisters: u32,
    /// Seconds from the persisters' start to the last message stored.
    pub seconds: f64,
    /// `messages / seconds`.
    pub messages_per_s: f64,
    /// Store transactions committed.
    pub batches: u64,
    /// Mean commit time, ms.
    pub mean_commit_ms: f64,
    /// Redis commands processed during the drain, per message stored
    /// (every client of the server counts: run it on a quiet Redis).
    pub redis_commands_per_message: f64,
}

/// Fills a backlog of `messages` over `rooms` under `cluster` and times
/// `persisters` persisters storing it into `store`. The cluster's keys are
/// deleted afterwards.
pub async fn run(
    url: &str,
    cluster: &str,
    store: Arc<dyn Store>,
    messages: u64,
    rooms: u32,
    persisters: u32,
) -> Result<DrainResult, BusError> {
    let keys = Keys::new(cluster).map_err(BusError::Redis)?;
    let config = Config::from_url(url)
        .map_err(|e| BusError::Redis(format!("bad Redis URL {url:?}: {e}")))?;
    let cmd = Builder::from_config(config).build().map_err(unreachable)?;
    cmd.init().await.map_err(unreachable)?;

    fill(&cmd, &keys, messages, rooms).await?;
    let commands_before = commands_processed(&cmd).await?;
    let stop = CancellationToken::new();
    let stats = Arc::new(WriterStats::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..persisters {
        let persister = Persister {
            cmd: cmd.clone(),
            keys: keys.clone(),
            instance: format!("drain-{i}"),
            store: store.clone(),
            stats: stats.clone(),
        };
        let (_flushes, flush_rx) = tokio::sync::mpsc::channel(1);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            persister.run(stop, flush_rx, Arc::default()).await;
        }));
    }
    let deadline = started + Duration::from_secs(600);
    while stats.messages.load(Ordering::Relaxed) < messages && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await; // polling a counter
    }
    let seconds = started.elapsed().as_secs_f64();
    let commands = commands_processed(&cmd).await? - commands_before;
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    forget(&cmd, &keys).await;
    let stored = stats.messages.load(Ordering::Relaxed);
    if stored < messages {
        return Err(BusError::Redis(format!(
            "only {stored} of {messages} messages were stored within 600 s"
        )));
    }
    let batches = stats.batches.load(Ordering::Relaxed);
    Ok(DrainResult {
        messages,
        rooms,
        persisters,
        seconds,
        messages_per_s: messages as f64 / seconds,
        batches,
        mean_commit_ms: stats.commit_micros.load(Ordering::Relaxed) as f64
            / batches.max(1) as f64
            / 1e3,
        redis_commands_per_message: commands as f64 / messages.max(1) as f64,
    })
}

/// Appends the backlog to the partition streams, as the publish script does.
async fn fill(cmd: &Client, keys: &Keys, messages: u64, rooms: u32) -> Result<(), BusError> {
    let names: Vec<RoomName> = (0..rooms.max(1))
        .map(|r| RoomName::parse(&format!("drain{r}")).expect("a valid room name"))
        .collect();
    let nick = Nick::parse("drainer").expect("a valid nick");
    let appends = futures::stream::iter(0..messages).map(|i| {
        let room = &names[(i % names.len() as u64) as usize];
        let seq = i / names.len() as u64 + 1;
        let body = Body::encode(&Draft {
            room: room.clone(),
            id: uuid::Uuid::now_v7(),
            nick: nick.clone(),
            text: format!("backlog message {i} {}", "x".repeat(24)),
            kind: MessageKind::Text,
            ts: Timestamp::now(),
            key: None,
        });
        let key = keys.persist(Keys::partition(room));
        let fields = vec![("r", room.to_string()), ("s", seq.to_string()), ("m", body)];
        async move {
            cmd.xadd::<String, _, _, _, _>(key, false, None, "*", fields)
                .await
        }
    });
    let mut appends = appends.buffer_unordered(512);
    while let Some(result) = appends.next().await {
        result.map_err(unreachable)?;
    }
    Ok(())
}

/// `total_commands_processed` from `INFO stats`.
async fn commands_processed(cmd: &Client) -> Result<u64, BusError> {
    let info: String = cmd
        .info(Some(fred::types::InfoKind::Stats))
        .await
        .map_err(unreachable)?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// Deletes the run's partition streams.
async fn forget(cmd: &Client, keys: &Keys) {
    for p in 0..super::keys::PARTITIONS {
        let _: Result<i64, _> = cmd.del(keys.persist(p)).await;
    }
}
