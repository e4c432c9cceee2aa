//! SQLite: the default store, one file, nothing to install.
//!
//! WAL mode lets history reads run while the writer commits. `synchronous` is
//! NORMAL in async durability (a commit survives a crash of the daemon, not of
//! the machine) and FULL in sync durability (it survives both).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::keys::{Clock, KeyTable};
use super::rows::{StoredRow, insert_batch, insert_once, messages, sql_seq};
use super::seqs;
use crate::core::ports::{Durability, Store, StoreError};
use crate::core::{IdempotencyKey, Message, RoomName};

/// SQLite's limit on bound parameters is 32,766; seven per row keeps a batch
/// of this size well inside it.
const ROWS_PER_INSERT: usize = 1_000;

/// Messages in an SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Deletes expired idempotency keys now and then.
    keys: Arc<KeyTable>,
}

/// Attempts at migrating a database other instances may be migrating too.
const MIGRATE_ATTEMPTS: u64 = 20;

impl SqliteStore {
    /// Opens (creating if missing) and migrates the database.
    pub async fn open(
        options: SqliteConnectOptions,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        let synchronous = match durability {
            Durability::Async => SqliteSynchronous::Normal,
            Durability::Sync => SqliteSynchronous::Full,
        };
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        // Instances started together on one new file race to migrate it, and
        // SQLite has no advisory lock as PostgreSQL has. Each migration runs
        // in a transaction with its bookkeeping row, so the loser's attempt
        // rolls back whole (SQLite reports a write that would wait on another
        // transaction's snapshot as "locked" at once, without waiting); trying
        // again finds the winner's work done.
        let mut attempt = 1;
        loop {
            match sqlx::migrate!("migrations/sqlite").run(&pool).await {
                Ok(()) => break,
                Err(err) if attempt < MIGRATE_ATTEMPTS => {
                    tracing::debug!(cause = %err, attempt, "migration raced another instance; trying again");
                    tokio::time::sleep(Duration::from_millis((50 * attempt).min(500))).await;
                    attempt += 1;
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(SqliteStore {
            pool,
            keys: Arc::new(KeyTable::new(Clock::Sqlite)),
        })
    }

    /// The pool, for the poll bus that shares this database.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn engine(&self) -> &'static str {
        "sqlite"
    }

    async fn append(&self, batch: &[Arc<Message>]) -> Result<(), StoreError> {
        insert_batch(&self.pool, batch, ROWS_PER_INSERT).await
    }

    async fn last_seq(&self, room: &RoomName) -> Result<u64, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM messages WHERE room = ?")
            .bind(room.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(seq.map_or(0, |s| s.max(0) as u64))
    }

    async fn append_once(
        &self,
        message: &Arc<Message>,
        key: &IdempotencyKey,
    ) -> Result<Option<Message>, StoreError> {
        insert_once(&self.pool, &self.keys, message, key).await
    }

    async fn seq_floor(&self, room: &RoomName) -> Result<u64, StoreError> {
        seqs::floor(&self.pool, room).await
    }

    async fn reserve_seqs(&self, room: &RoomName, upto: u64) -> Result<(), StoreError> {
        seqs::reserve(&self.pool, room, upto).await
    }

    async fn release_seqs(&self, used: &[(RoomName, u64)]) -> Result<(), StoreError> {
        seqs::release(&self.pool, used).await
    }

    async fn page(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let rows: Vec<StoredRow> = sqlx::query_as(
            "SELECT room, seq, id, nick, text, kind, ts FROM messages
             WHERE room = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
        )
        .bind(room.as_str())
        .bind(before.map_or(i64::MAX, sql_seq))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        messages(rows)
    }

    async fn since(
        &self,
        room: &RoomName,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let rows: Vec<StoredRow> = sqlx::query_as(
            "SELECT room, seq, id, nick, text, kind, ts FROM messages
             WHERE room = ? AND seq > ? ORDER BY seq ASC LIMIT ?",
        )
        .bind(room.as_str())
        .bind(sql_seq(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        messages(rows)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
