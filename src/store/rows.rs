//! What both SQL stores share: the row a message is stored as, and the
//! batched insert (one multi-row `INSERT` per chunk, one transaction per
//! batch), written once over sqlx's typed drivers.

use std::sync::Arc;

use sqlx::{Database, Encode, Executor, IntoArguments, Pool, QueryBuilder, Type};

use super::keys;
use crate::core::ports::StoreError;
use crate::core::{IdempotencyKey, Message, RoomName};

/// A message as stored.
#[derive(sqlx::FromRow)]
pub(crate) struct StoredRow {
    room: String,
    seq: i64,
    id: String,
    nick: String,
    text: String,
    kind: String,
    ts: i64,
}

impl TryFrom<StoredRow> for Message {
    type Error = StoreError;

    fn try_from(row: StoredRow) -> Result<Self, StoreError> {
        let corrupt =
            |what: &str| StoreError::Corrupt(format!("{what} in {}:{}", row.room, row.seq));
        Ok(Message {
            room: RoomName::parse(&row.room).map_err(|_| corrupt("room"))?,
            seq: u64::try_from(row.seq).map_err(|_| corrupt("seq"))?,
            id: row.id.parse().map_err(|_| corrupt("id"))?,
            nick: crate::core::Nick::parse(&row.nick).map_err(|_| corrupt("nick"))?,
            kind: crate::core::MessageKind::from_stored(&row.kind),
            ts: crate::core::Timestamp(row.ts),
            text: row.text,
        })
    }
}

/// Converts rows, stopping at the first corrupt one.
pub(crate) fn messages(rows: Vec<StoredRow>) -> Result<Vec<Message>, StoreError> {
    rows.into_iter().map(Message::try_from).collect()
}

/// Seq numbers are u64 in the protocol and i64 in SQL; real values never reach 2^63.
pub(crate) fn sql_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Inserts `batch` in one transaction, `rows_per_insert` rows per statement
/// (the engine's parameter limit decides it). A row already stored (same room
/// and seq) is skipped, so a retried batch is harmless.
pub(crate) async fn insert_batch<DB>(
    pool: &Pool<DB>,
    batch: &[Arc<Message>],
    rows_per_insert: usize,
) -> Result<(), StoreError>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> String: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let mut tx = pool.begin().await?;
    for chunk in batch.chunks(rows_per_insert) {
        insert_rows(&mut *tx, chunk).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// One multi-row `INSERT` of `rows`; a row already stored is skipped.
pub(crate) async fn insert_rows<'c, DB, E>(
    executor: E,
    rows: &[Arc<Message>],
) -> Result<(), StoreError>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> String: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let mut insert: QueryBuilder<DB> =
        QueryBuilder::new("INSERT INTO messages (room, seq, id, nick, text, kind, ts) ");
    insert.push_values(rows, |mut row, m| {
        row.push_bind(m.room.as_str())
            .push_bind(sql_seq(m.seq))
            .push_bind(m.id.to_string())
            .push_bind(m.nick.as_str())
            .push_bind(m.text.as_str())
            .push_bind(m.kind.as_str())
            .push_bind(m.ts.0);
    });
    insert.push(" ON CONFLICT DO NOTHING");
    insert.build().execute(executor).await?;
    Ok(())
}

/// Stores `message` with its idempotency `key` in one transaction, unless
/// the sender used `key` within the window: then stores nothing and returns
/// the message it was first used with.
pub(crate) async fn insert_once<DB>(
    pool: &Pool<DB>,
    keys: &keys::KeyTable,
    message: &Arc<Message>,
    key: &IdempotencyKey,
) -> Result<Option<Message>, StoreError>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'c> &'c Pool<DB>: Executor<'c, Database = DB>,
    for<'a> DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> String: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
    for<'r> StoredRow: sqlx::FromRow<'r, DB::Row>,
    for<'r> String: sqlx::Decode<'r, DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    // Before the transaction, not after its commit: a caller that times the
    // whole call out must never see a committed message reported as failed.
    keys.prune_now_and_then(pool).await;
    let mut tx = pool.begin().await?;
    if !keys.claim(&mut *tx, &message.nick, key, message).await? {
        tx.rollback().await?;
        let first = keys.original(pool, &message.nick, key).await?;
        return first.map(Some).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "idempotency key {:?} names no message",
                key.as_str()
            ))
        });
    }
    insert_rows(&mut *tx, std::slice::from_ref(message)).await?;
    tx.commit().await?;
    Ok(None)
}
