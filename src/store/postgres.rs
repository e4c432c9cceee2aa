//! PostgreSQL: the store for instances that share a database across hosts.
//!
//! Same trait, same table shape as SQLite; batches are one multi-row `INSERT`
//! per transaction.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use super::keys::Pruner;
use super::rows::{StoredRow, insert_batch, insert_once, messages, sql_seq};
use super::seqs;
use crate::core::ports::{Store, StoreError};
use crate::core::{IdempotencyKey, Message, RoomName};

/// How long the daemon waits for PostgreSQL at start before giving up.
const FIRST_CONNECT: Duration = Duration::from_secs(5);

/// PostgreSQL allows 65,535 bound parameters; seven per row.
const ROWS_PER_INSERT: usize = 5_000;

/// Messages in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Deletes expired idempotency keys now and then.
    pruner: Arc<Pruner>,
}

impl PostgresStore {
    /// Connects and migrates.
    pub async fn open(options: PgConnectOptions) -> Result<Self, StoreError> {
        probe(&options).await?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(PostgresStore {
            pool,
            pruner: Arc::default(),
        })
    }

    /// The pool, for the poll bus that shares this database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// One direct connection before the pool is built. A pool retries a refused
/// connection until its 30 s acquire timeout and then says only "pool timed
/// out"; a daemon that cannot start should say why, at once.
async fn probe(options: &PgConnectOptions) -> Result<(), StoreError> {
    let target = format!("{}:{}", options.get_host(), options.get_port());
    match tokio::time::timeout(FIRST_CONNECT, PgConnection::connect_with(options)).await {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
            Ok(())
        }
        Ok(Err(err)) => Err(StoreError::Unreachable {
            target,
            cause: err.to_string(),
        }),
        Err(_) => Err(StoreError::Unreachable {
            target,
            cause: format!("no answer within {} s", FIRST_CONNECT.as_secs()),
        }),
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn engine(&self) -> &'static str {
        "postgres"
    }

    async fn append(&self, batch: &[Arc<Message>]) -> Result<(), StoreError> {
        insert_batch(&self.pool, batch, ROWS_PER_INSERT).await
    }

    async fn last_seq(&self, room: &RoomName) -> Result<u64, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM messages WHERE room = $1")
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
        insert_once(&self.pool, &self.pruner, message, key).await
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
             WHERE room = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
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
             WHERE room = $1 AND seq > $2 ORDER BY seq ASC LIMIT $3",
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
