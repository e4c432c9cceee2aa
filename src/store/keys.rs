//! Idempotency keys of `POST /message`, kept in the database beside the
//! messages they name, so that a retry on any instance finds them.
//!
//! A keyed message is stored in one transaction with its key row: either both
//! are there or neither is. Claiming the key is an `INSERT` that a live row
//! with the same `(nick, key)` turns into a no-op; the caller then rolls back
//! (its seq is never used) and answers with the first message. Rows older
//! than [`WINDOW`] no longer count: a claim overwrites them, and
//! [`KeyTable`] deletes them now and then so the table holds about one
//! window of keys.
//!
//! A key's age is read on the database's clock, never an instance's: two
//! instances whose clocks disagree would otherwise disagree on which keys
//! are live, and one running ahead by more than the window would take every
//! key for expired and send each retry again. (SQLite runs inside each
//! instance, so its clock is the host's; instances that share an SQLite file
//! share a host, and so that clock.)
//!
//! The statements are written once with `$N` parameters, which SQLite,
//! PostgreSQL and sqlx's `Any` driver (the poll bus) all accept; only the
//! clock's expression differs.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::{Database, Decode, Encode, Executor, FromRow, IntoArguments, Type};

use super::rows::{StoredRow, sql_seq};
use crate::core::ports::StoreError;
use crate::core::{IdempotencyKey, Message, Nick, Timestamp};

/// How long a key answers for the message it was first used with: the window
/// the store port promises.
pub const WINDOW: Duration = crate::core::ports::IDEMPOTENCY_WINDOW;
/// How often one process deletes expired keys (each delete is one indexed
/// range scan; between two, expired rows are merely ignored).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

fn window_ms() -> i64 {
    WINDOW.as_millis() as i64
}

/// Which database's clock keys are dated by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    Sqlite,
    Postgres,
}

impl Clock {
    /// The clock of the database a `--db` URL names.
    pub fn of_url(url: &str) -> Clock {
        if url.starts_with("sqlite:") {
            Clock::Sqlite
        } else {
            Clock::Postgres
        }
    }

    /// The database's time now, in milliseconds since the Unix epoch, as SQL.
    pub(crate) fn now_ms(self) -> &'static str {
        match self {
            Clock::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Clock::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }
}

/// One database's table of idempotency keys.
#[derive(Debug)]
pub(crate) struct KeyTable {
    clock: Clock,
    /// When this process last deleted expired keys, on its own clock (it
    /// only paces the deletes).
    pruned_ms: AtomicI64,
}

impl KeyTable {
    pub(crate) fn new(clock: Clock) -> KeyTable {
        KeyTable {
            clock,
            pruned_ms: AtomicI64::new(0),
        }
    }

    /// Records that `nick` used `key` for `room:seq`, unless a live row
    /// already says it did. Returns false when the key is taken: the caller
    /// must roll its transaction back and answer with [`KeyTable::original`].
    pub(crate) async fn claim<'c, DB, E>(
        &self,
        executor: E,
        nick: &Nick,
        key: &IdempotencyKey,
        message: &Message,
    ) -> Result<bool, StoreError>
    where
        DB: Database,
        E: Executor<'c, Database = DB>,
        for<'a> DB::Arguments: IntoArguments<DB>,
        for<'a> &'a str: Encode<'a, DB> + Type<DB>,
        for<'a> i64: Encode<'a, DB> + Type<DB>,
        (i64,): for<'r> FromRow<'r, DB::Row>,
    {
        let now = self.clock.now_ms();
        let sql = format!(
            "INSERT INTO message_keys (nick_key, idem_key, room, seq, created_at)
             VALUES ($1, $2, $3, $4, {now})
             ON CONFLICT (nick_key, idem_key) DO UPDATE
             SET room = excluded.room, seq = excluded.seq, created_at = excluded.created_at
             WHERE message_keys.created_at < {now} - $5
             RETURNING created_at"
        );
        // Only the clock's fixed expression is formatted in; values are bound.
        let claimed: Option<(i64,)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(nick.key().as_str())
            .bind(key.as_str())
            .bind(message.room.as_str())
            .bind(sql_seq(message.seq))
            .bind(window_ms())
            .fetch_optional(executor)
            .await?;
        Ok(claimed.is_some())
    }

    /// The message `nick` first sent with `key`, if that was within the window.
    pub(crate) async fn original<'c, DB, E>(
        &self,
        executor: E,
        nick: &Nick,
        key: &IdempotencyKey,
    ) -> Result<Option<Message>, StoreError>
    where
        DB: Database,
        E: Executor<'c, Database = DB>,
        for<'a> DB::Arguments: IntoArguments<DB>,
        for<'a> &'a str: Encode<'a, DB> + Type<DB>,
        for<'a> i64: Encode<'a, DB> + Type<DB>,
        for<'r> StoredRow: FromRow<'r, DB::Row>,
        for<'r> String: Decode<'r, DB>,
    {
        let sql = format!(
            "SELECT m.room, m.seq, m.id, m.nick, m.text, m.kind, m.ts
             FROM message_keys k JOIN messages m ON m.room = k.room AND m.seq = k.seq
             WHERE k.nick_key = $1 AND k.idem_key = $2 AND k.created_at >= {} - $3",
            self.clock.now_ms()
        );
        let row: Option<StoredRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(nick.key().as_str())
            .bind(key.as_str())
            .bind(window_ms())
            .fetch_optional(executor)
            .await?;
        row.map(Message::try_from).transpose()
    }

    /// Deletes expired keys at most once per [`PRUNE_EVERY`] per process, so
    /// the table stays about one window's worth of sends whatever the uptime.
    /// A failed prune is only logged: the next keyed send tries again.
    pub(crate) async fn prune_now_and_then<'c, DB, E>(&self, executor: E)
    where
        DB: Database,
        E: Executor<'c, Database = DB>,
        for<'a> DB::Arguments: IntoArguments<DB>,
        for<'a> i64: Encode<'a, DB> + Type<DB>,
    {
        let now = Timestamp::now().0;
        let last = self.pruned_ms.load(Ordering::Relaxed);
        let due = now - last >= PRUNE_EVERY.as_millis() as i64;
        if !due
            || self
                .pruned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let sql = format!(
            "DELETE FROM message_keys WHERE created_at < {} - $1",
            self.clock.now_ms()
        );
        let result = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(window_ms())
            .execute(executor)
            .await;
        if let Err(err) = result {
            tracing::warn!(cause = %err, "could not prune idempotency keys");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::sync::Arc;

    use crate::core::{MessageKind, RoomName};
    use crate::store::{Durability, SqliteStore, Store};

    use super::*;

    fn message(seq: u64, text: &str) -> Arc<Message> {
        Arc::new(Message {
            room: RoomName::parse("keys").unwrap(),
            seq,
            id: uuid::Uuid::now_v7(),
            nick: Nick::parse("Carol").unwrap(),
            text: text.into(),
            kind: MessageKind::Text,
            ts: Timestamp::now(),
        })
    }

    #[tokio::test]
    async fn a_key_answers_once_per_window_and_expired_keys_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("k.db").display());
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url).unwrap();
        let store = SqliteStore::open(options, Durability::Sync).await.unwrap();
        // A key from long ago, by someone else: it must be pruned.
        sqlx::query(
            "INSERT INTO message_keys (nick_key, idem_key, room, seq, created_at)
             VALUES ('old', 'k', 'keys', 99, 0)",
        )
        .execute(store.pool())
        .await
        .unwrap();
        let key = IdempotencyKey::parse("k").unwrap();
        let first = message(1, "once");
        assert!(store.append_once(&first, &key).await.unwrap().is_none());
        // The same nick in another case is the same sender.
        let mut retry = (*message(2, "again")).clone();
        retry.nick = Nick::parse("carol").unwrap();
        let repeat = store.append_once(&Arc::new(retry), &key).await.unwrap();
        assert_eq!(repeat.map(|m| (m.seq, m.id)), Some((1, first.id)));
        assert_eq!(
            store.last_seq(&first.room).await.unwrap(),
            1,
            "nothing stored twice"
        );
        let left: Vec<(String,)> = sqlx::query_as("SELECT nick_key FROM message_keys")
            .fetch_all(store.pool())
            .await
            .unwrap();
        assert_eq!(left, vec![("carol".to_owned(),)]);
    }
}
