//! The store port: what the core needs from the database that keeps room
//! messages, whatever its engine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::core::{IdempotencyKey, Message, RoomName};

/// How long an idempotency key counts: a retry with the same key within this
/// window returns the first message instead of storing a second one.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(10 * 60);

/// When a message counts as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Deliver first, persist in batches moments later (a crash can lose the
    /// last batch).
    Async,
    /// Persist, then deliver (nothing delivered is ever lost; slower).
    Sync,
}

/// What went wrong talking to the database.
///
/// Engine-neutral: each store turns its driver's errors into these, keeping
/// the driver's error as the source. What
/// matters to the core is the split between [`StoreError::NotAnswering`] (the
/// database cannot be reached right now, so the next attempts should not wait
/// for it) and [`StoreError::Refused`] (one statement failed).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or stopped answering: the
    /// connection failed (I/O, TLS, protocol) or no connection was free in
    /// time.
    #[error("database error: {0}")]
    NotAnswering(#[source] BoxError),
    /// The database refused or failed one statement.
    #[error("database error: {0}")]
    Refused(#[source] BoxError),
    /// The database server could not be reached at start.
    #[error("could not reach the database at {target}: {cause}; is it running, and is --db right?")]
    Unreachable {
        /// `host:port`.
        target: String,
        /// What the connection attempt said (e.g. connection refused).
        cause: String,
    },
    /// Migrations could not be applied.
    #[error("could not apply migrations: {0}")]
    Migrate(#[source] BoxError),
    /// The `--db` URL names no engine we have.
    #[error("unsupported database URL {0:?}: use sqlite://FILE or postgres://...")]
    UnsupportedUrl(String),
    /// A stored row does not read back as a message.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// A driver's error, kept as the cause of a [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Counters the writer keeps, for `/metrics` and the benchmarks.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Batches committed.
    pub batches: AtomicU64,
    /// Messages committed.
    pub messages: AtomicU64,
    /// Messages dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Failed batch attempts (each retried).
    pub failures: AtomicU64,
    /// Sum of commit times in microseconds (with `batches`, the mean).
    pub commit_micros: AtomicU64,
}

impl WriterStats {
    /// Counts a batch of `rows` messages committed in `took`.
    pub fn committed(&self, rows: usize, took: std::time::Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.commit_micros.fetch_add(micros, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.messages.fetch_add(rows as u64, Ordering::Relaxed);
    }
}

/// Persists room messages and answers history questions.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`, for logs and `/healthz`.
    fn engine(&self) -> &'static str;

    /// Stores a batch in one transaction. Storing a message twice is harmless
    /// (same room and seq), so a failed batch can simply be retried.
    async fn append(&self, batch: &[Arc<Message>]) -> Result<(), StoreError>;

    /// The highest `seq` stored for `room`, 0 if none.
    async fn last_seq(&self, room: &RoomName) -> Result<u64, StoreError>;

    /// Stores one message with the sender's idempotency `key`, in one
    /// transaction, unless the same nick used `key` within
    /// [`IDEMPOTENCY_WINDOW`]: then nothing is stored and the first message
    /// is returned.
    async fn append_once(
        &self,
        message: &Arc<Message>,
        key: &IdempotencyKey,
    ) -> Result<Option<Message>, StoreError>;

    /// The seq `room` must continue above after a restart: the higher of its
    /// reservation mark and its highest stored seq (0 for a new room).
    async fn seq_floor(&self, room: &RoomName) -> Result<u64, StoreError>;

    /// Durably raises `room`'s reservation mark to `upto`: a bus that numbers
    /// in memory calls this before handing out any seq above the old mark.
    async fn reserve_seqs(&self, room: &RoomName, upto: u64) -> Result<(), StoreError>;

    /// Lowers reservation marks to the seqs really used (a clean stop, after
    /// everything handed out is stored), so a restart leaves no hole.
    async fn release_seqs(&self, used: &[(RoomName, u64)]) -> Result<(), StoreError>;

    /// Up to `limit` messages with `seq < before` (newest when `None`), newest first.
    async fn page(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError>;

    /// Up to `limit` messages with `seq > after`, oldest first (resume, catch-up).
    async fn since(
        &self,
        room: &RoomName,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError>;

    /// Answers when the database does.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Closes the connections (after the writer has flushed).
    async fn close(&self);
}
