//! The background writer: chat never waits on disk.
//!
//! Delivered messages are queued here and written in batches, one transaction
//! per batch. A message that finds the writer idle for [`COMMIT_EVERY`] is
//! written at once; under load, commits start at most that often, and
//! whatever queued up meanwhile (or while the previous batch was committing)
//! goes into the next one. Batches grow with load, and a quiet room is written
//! at once. A failed batch is retried with backoff; the queue is bounded, and
//! a message that finds it full is counted and logged, not waited for (live
//! chat goes on while the database is down).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::core::Message;
use crate::core::ports::{Store, WriterStats};

/// Most messages in one transaction.
const MAX_BATCH: usize = 1_000;
/// Under load, the least time between the starts of two commits. A commit
/// of one message costs about as much as one of ten (the transaction, not
/// the row, is the price), so a busy writer gathers for this long; a crash
/// loses at most this much more of the last batch.
pub const COMMIT_EVERY: Duration = Duration::from_millis(5);
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
        // When the last commit started: the next starts COMMIT_EVERY later at
        // the soonest, unless a flush is waiting or the batch is full.
        let mut last_commit: Option<Instant> = None;
        while let Some(job) = self.jobs.recv().await {
            let due = last_commit.map(|at| at + COMMIT_EVERY);
            let mut next = Some(job);
            while let Some(job) = next.take() {
                match job {
                    Job::Save(m) => batch.push(m),
                    Job::Flush(done) => flushes.push(done),
                }
                if batch.len() >= MAX_BATCH {
                    break;
                }
                next = match self.jobs.try_recv() {
                    Ok(job) => Some(job),
                    // Nothing more queued: under load, gather until due
                    // (closed, or due: commit what there is).
                    Err(_) => match due {
                        Some(due) if flushes.is_empty() && Instant::now() < due => {
                            tokio::time::timeout_at(due, self.jobs.recv())
                                .await
                                .ok()
                                .flatten()
                        }
                        _ => None,
                    },
                };
            }
            if !batch.is_empty() {
                last_commit = Some(Instant::now());
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::core::ports::StoreError;
    use crate::core::{Message, RoomName, test_message as message};

    /// Counts what the writer commits; answers nothing else.
    #[derive(Default)]
    struct Batches(Mutex<Vec<usize>>);

    #[async_trait]
    impl Store for Batches {
        fn engine(&self) -> &'static str {
            "test"
        }
        async fn append(&self, batch: &[Arc<Message>]) -> Result<(), StoreError> {
            self.0.lock().unwrap().push(batch.len());
            Ok(())
        }
        async fn last_seq(&self, _: &RoomName) -> Result<u64, StoreError> {
            unreachable!()
        }
        async fn append_once(
            &self,
            _: &Arc<Message>,
            _: &crate::core::IdempotencyKey,
        ) -> Result<Option<Message>, StoreError> {
            unreachable!()
        }
        async fn seq_floor(&self, _: &RoomName) -> Result<u64, StoreError> {
            unreachable!()
        }
        async fn reserve_seqs(&self, _: &RoomName, _: u64) -> Result<(), StoreError> {
            unreachable!()
        }
        async fn release_seqs(&self, _: &[(RoomName, u64)]) -> Result<(), StoreError> {
            unreachable!()
        }
        async fn page(
            &self,
            _: &RoomName,
            _: Option<u64>,
            _: u32,
        ) -> Result<Vec<Message>, StoreError> {
            unreachable!()
        }
        async fn since(&self, _: &RoomName, _: u64, _: u32) -> Result<Vec<Message>, StoreError> {
            unreachable!()
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        async fn close(&self) {}
    }

    fn started() -> (Writer, Arc<Batches>) {
        let store = Arc::new(Batches::default());
        let (writer, task) = Writer::new(store.clone());
        tokio::spawn(task.run());
        (writer, store)
    }

    fn committed(store: &Batches) -> Vec<usize> {
        store.0.lock().unwrap().clone()
    }

    /// Saves a first message and lets the writer commit it, alone: the
    /// interval starts.
    async fn first_commit(writer: &Writer, store: &Batches) {
        writer.save(message(1));
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(committed(store), [1]);
    }

    /// Paused time: the clock moves only when the test says, or when every
    /// task waits for a timer.
    #[tokio::test(start_paused = true)]
    async fn a_message_to_an_idle_writer_is_committed_at_once() {
        let (writer, store) = started();
        first_commit(&writer, &store).await;
        // Quiet for longer than the interval: the next goes at once too.
        tokio::time::advance(COMMIT_EVERY * 2).await;
        writer.save(message(2));
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(committed(&store), [1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn under_load_the_messages_of_one_interval_share_a_commit() {
        let (writer, store) = started();
        first_commit(&writer, &store).await;
        // Ten more, one every COMMIT_EVERY / 10: they wait for the interval.
        for seq in 2..=11 {
            tokio::time::advance(COMMIT_EVERY / 10).await;
            writer.save(message(seq));
        }
        tokio::time::advance(COMMIT_EVERY).await;
        writer.flush().await;
        let batches = committed(&store);
        assert_eq!(batches.iter().sum::<usize>(), 11, "{batches:?}");
        assert!(batches.len() <= 3, "one commit per interval: {batches:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_does_not_wait_for_the_interval() {
        let (writer, store) = started();
        first_commit(&writer, &store).await;
        writer.save(message(2));
        let start = Instant::now();
        writer.flush().await;
        assert_eq!(start.elapsed(), Duration::ZERO, "the flush waited");
        assert_eq!(committed(&store), [1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_that_arrives_during_the_wait_ends_it() {
        let (writer, store) = started();
        first_commit(&writer, &store).await;
        writer.save(message(2));
        // The writer takes message 2 and waits for the interval.
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(committed(&store), [1], "message 2 waits for the interval");
        let start = Instant::now();
        writer.flush().await;
        assert!(
            start.elapsed() < COMMIT_EVERY,
            "waited {:?}",
            start.elapsed()
        );
        assert_eq!(committed(&store), [1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_during_the_wait_commits_the_batch_at_once() {
        let store = Arc::new(Batches::default());
        let (writer, task) = Writer::new(store.clone());
        let task = tokio::spawn(task.run());
        first_commit(&writer, &store).await;
        writer.save(message(2));
        writer.save(message(3));
        tokio::task::yield_now().await;
        let start = Instant::now();
        drop(writer);
        task.await.unwrap();
        assert!(
            start.elapsed() < COMMIT_EVERY,
            "waited {:?}",
            start.elapsed()
        );
        assert_eq!(committed(&store).iter().sum::<usize>(), 3);
    }
}
