//! Storage of room messages, behind one trait with an implementation per engine.
//!
//! SQLite is the default (a file, nothing to install); PostgreSQL is for
//! instances that share a database across hosts. SQL lives in `migrations/`, one
//! folder per engine, applied on start.

pub(crate) mod keys;
mod postgres;
mod rows;
mod seqs;
mod sqlite;
mod writer;

use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;

use crate::core::{IdempotencyKey, Message, RoomName};

pub use keys::WINDOW as IDEMPOTENCY_WINDOW;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use writer::{Writer, WriterStats, WriterTask};

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
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error("could not apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The `--db` URL names no engine we have.
    #[error("unsupported database URL {0:?}: use sqlite://FILE or postgres://...")]
    UnsupportedUrl(String),
    /// A stored row does not read back as a message.
    #[error("corrupt row: {0}")]
    Corrupt(String),
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

/// Opens the store a `--db` URL names, creating and migrating it as needed.
pub async fn open(url: &str, durability: Durability) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
        return Ok(Arc::new(SqliteStore::open(options, durability).await?));
    }
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let options = sqlx::postgres::PgConnectOptions::from_str(url)?;
        return Ok(Arc::new(PostgresStore::open(options).await?));
    }
    Err(StoreError::UnsupportedUrl(url.to_owned()))
}
