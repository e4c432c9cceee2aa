//! PostgreSQL: the store for instances that share a database across hosts.
//!
//! Same trait, same table shape as SQLite; batches are one multi-row `INSERT`
//! per transaction.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder};

use super::sqlite::{StoredRow, messages, sql_seq};
use super::{Store, StoreError};
use crate::core::{Message, RoomName};

/// PostgreSQL allows 65,535 bound parameters; seven per row.
const ROWS_PER_INSERT: usize = 5_000;

/// Messages in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects and migrates.
    pub async fn open(options: PgConnectOptions) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(PostgresStore { pool })
    }

    /// The pool, for the poll bus that shares this database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn engine(&self) -> &'static str {
        "postgres"
    }

    async fn append(&self, batch: &[Arc<Message>]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for chunk in batch.chunks(ROWS_PER_INSERT) {
            let mut insert: QueryBuilder<Postgres> =
                QueryBuilder::new("INSERT INTO messages (room, seq, id, nick, text, kind, ts) ");
            insert.push_values(chunk, |mut row, m| {
                row.push_bind(m.room.as_str())
                    .push_bind(sql_seq(m.seq))
                    .push_bind(m.id.to_string())
                    .push_bind(m.nick.as_str())
                    .push_bind(m.text.as_str())
                    .push_bind(m.kind.as_str())
                    .push_bind(m.ts.0);
            });
            insert.push(" ON CONFLICT DO NOTHING");
            insert.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn last_seq(&self, room: &RoomName) -> Result<u64, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM messages WHERE room = $1")
            .bind(room.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(seq.map_or(0, |s| s.max(0) as u64))
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
