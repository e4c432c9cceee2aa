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

/// Attempts at a step other instances may be taking on the same file at once.
const RACE_ATTEMPTS: u64 = 20;

/// Runs `step` until it succeeds, fails in a way `retry` does not accept, or
/// has been tried `RACE_ATTEMPTS` times (about 8 s in all).
async fn racing<T, E, F, Fut>(what: &str, retry: impl Fn(&E) -> bool, mut step: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match step().await {
            Ok(value) => return Ok(value),
            Err(err) if attempt < RACE_ATTEMPTS && retry(&err) => {
                tracing::debug!(cause = %err, attempt, "{what} raced another instance; trying again");
                tokio::time::sleep(Duration::from_millis((50 * attempt).min(500))).await;
                attempt += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

/// SQLITE_BUSY or SQLITE_LOCKED, in any of their extended forms: another
/// connection holds the lock this one needs. Other errors (a bad path, no
/// permission) are not worth waiting for.
fn is_lock_race(err: &sqlx::Error) -> bool {
    const SQLITE_BUSY: i64 = 5;
    const SQLITE_LOCKED: i64 = 6;
    let Some(db) = err.as_database_error() else {
        return false;
    };
    db.code()
        .and_then(|code| code.parse::<i64>().ok())
        .is_some_and(|code| matches!(code & 0xff, SQLITE_BUSY | SQLITE_LOCKED))
}

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
        // Instances started together on one new file race to create it, switch
        // it to WAL and migrate it, and SQLite has no advisory lock as
        // PostgreSQL has. Where waiting could deadlock (two connections both
        // wanting to upgrade their lock), SQLite reports "locked" at once
        // instead of calling the busy handler, so `busy_timeout` does not cover
        // these races. Each step either takes effect whole or not at all (each
        // migration runs in a transaction with its bookkeeping row), so trying
        // again finds the winner's work done.
        let pool = racing("opening the database", is_lock_race, || {
            SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options.clone())
        })
        .await?;
        racing(
            "migrating",
            |_| true,
            || sqlx::migrate!("migrations/sqlite").run(&pool),
        )
        .await?;
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
