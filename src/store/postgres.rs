//! PostgreSQL: the store for instances that share a database across hosts.
//!
//! Same trait, same table shape as SQLite; batches are one multi-row `INSERT`
//! per transaction.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use super::keys::{Clock, KeyTable};
use super::rows::{StoredRow, insert_once, messages, sql_seq};
use super::seqs;
use crate::core::ports::{Store, StoreError};
use crate::core::{IdempotencyKey, Message, RoomName};

/// How long the daemon waits for PostgreSQL at start before giving up.
const FIRST_CONNECT: Duration = Duration::from_secs(5);

/// The batch insert: one statement with seven array parameters whatever the
/// batch's size. PostgreSQL parses and plans one short statement instead of
/// binding seven parameters per row (and the 65,535-parameter limit no
/// longer splits a batch); a row already stored is skipped, so a retried
/// batch is harmless.
const INSERT_UNNEST: &str = "INSERT INTO messages (room, seq, id, nick, text, kind, ts) \
     SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[]) \
     ON CONFLICT DO NOTHING";

/// Messages in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Deletes expired idempotency keys now and then.
    keys: Arc<KeyTable>,
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
            keys: Arc::new(KeyTable::new(Clock::Postgres)),
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
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len();
        let (mut rooms, mut seqs, mut ids, mut nicks, mut texts, mut kinds, mut ts) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for m in batch {
            rooms.push(m.room.as_str());
            seqs.push(sql_seq(m.seq));
            ids.push(m.id.to_string());
            nicks.push(m.nick.as_str());
            texts.push(m.text.as_str());
            kinds.push(m.kind.as_str());
            ts.push(m.ts.0);
        }
        sqlx::query(INSERT_UNNEST)
            .bind(rooms)
            .bind(seqs)
            .bind(ids)
            .bind(nicks)
            .bind(texts)
            .bind(kinds)
            .bind(ts)
            .execute(&self.pool)
            .await?;
        Ok(())
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
