//! The background writer: chat never waits on disk.
//!
//! Delivered messages are queued here and written in batches, one transaction
//! per batch: whatever has queued up while the previous batch was committing
//! goes into the next one, so batches grow with load and a quiet room is
//! written at once. A failed batch is retried with backoff; the queue is
//! bounded, and a message that finds it full is counted and logged, not waited
//! for (live chat goes on while the database is down).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::core::Message;
use crate::core::ports::{Store, WriterStats};

/// Most messages in one transaction.
const MAX_BATCH: usize = 1_000;
/// Messages that may wait for the database.
const QUEUE: usize = 65_536;

enum Job {
    Save(Arc<Message>),
    Flush(oneshot::Sender<()>),
}

/// The handle that queues messages for the writer.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    stats: Arc<WriterStats>,
}

/// The writer's loop; run it with `tokio::spawn(task.run())`.
pub struct WriterTask {
    store: Arc<dyn Store>,
    jobs: mpsc::Receiver<Job>,
    stats: Arc<WriterStats>,
}

impl Writer {
    /// A writer for `store`, and the task that must be spawned to drive it.
    pub fn new(store: Arc<dyn Store>) -> (Writer, WriterTask) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(WriterStats::default());
        let writer = Writer {
            jobs: tx,
            stats: stats.clone(),
        };
        (
            writer,
            WriterTask {
                store,
                jobs: rx,
                stats,
            },
        )
    }

    /// Queues a message without waiting. Returns false (and counts it) if the
    /// queue is full because the database has been failing for a while.
    pub fn save(&self, message: Arc<Message>) -> bool {
        match self.jobs.try_send(Job::Save(message)) {
            Ok(()) => true,
            Err(_) => {
                let dropped = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    tracing::error!(
                        dropped,
                        "store writer queue is full: messages are delivered but not stored"
                    );
                }
                false
            }
        }
    }

    /// Waits until every message queued before this call is committed (or the
    /// writer gave up on it during shutdown).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The writer's counters.
    pub fn stats(&self) -> &Arc<WriterStats> {
        &self.stats
    }
}

impl WriterTask {
    /// Runs until every [`Writer`] handle is dropped.
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut flushes = Vec::new();
        while let Some(job) = self.jobs.recv().await {
            let mut next = Some(job);
            while let Some(job) = next.take() {
                match job {
                    Job::Save(m) => batch.push(m),
                    Job::Flush(done) => flushes.push(done),
                }
                if batch.len() < MAX_BATCH {
                    next = self.jobs.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.commit(&batch).await;
                batch.clear();
            }
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }

    /// Commits one batch, retrying with backoff until it succeeds.
    async fn commit(&self, batch: &[Arc<Message>]) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let started = Instant::now();
            match self.store.append(batch).await {
                Ok(()) => {
                    self.stats.committed(batch.len(), started.elapsed());
                    return;
                }
                Err(err) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(cause = %err, rows = batch.len(), retry_in = ?backoff, "store write failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
