//! Seq reservations: how a bus that numbers rooms in memory (`local`) never
//! gives one seq to two messages, even across `kill -9`.
//!
//! Before it hands out a number above its mark, the bus raises the room's
//! mark in `room_seqs` durably (a block at a time). After a crash it starts
//! above the higher of the mark and the stored messages, so numbers handed out
//! but lost with the writer's last batch are skipped, never reused; readers
//! see them as a `gap`. A clean stop lowers each mark back to the last number
//! really used, so an ordinary restart leaves no hole.
//!
//! `room_seqs` is the same table the poll bus bumps per message, with the same
//! meaning: no seq at or below `last_seq` may be handed out again.

use sqlx::{Database, Encode, Executor, IntoArguments, Pool, Type};

use super::rows::sql_seq;
use crate::core::RoomName;
use crate::core::ports::StoreError;

/// The number a room must continue above: its mark or its highest stored
/// seq, whichever is higher (0 for a new room).
pub(crate) async fn floor<DB>(pool: &Pool<DB>, room: &RoomName) -> Result<u64, StoreError>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'c> &'c Pool<DB>: Executor<'c, Database = DB>,
    for<'a> DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'r> i64: sqlx::Decode<'r, DB> + Type<DB>,
    for<'r> Option<i64>: sqlx::Decode<'r, DB>,
    (Option<i64>,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let (seq,): (Option<i64>,) = sqlx::query_as(
        "SELECT MAX(seq) FROM (
             SELECT MAX(seq) AS seq FROM messages WHERE room = $1
             UNION ALL
             SELECT last_seq AS seq FROM room_seqs WHERE room = $1
         ) AS marks",
    )
    .bind(room.as_str())
    .fetch_one(pool)
    .await?;
    Ok(seq.map_or(0, |s| s.max(0) as u64))
}

/// Raises `room`'s mark to `upto` (never lowers it).
pub(crate) async fn reserve<DB>(
    pool: &Pool<DB>,
    room: &RoomName,
    upto: u64,
) -> Result<(), StoreError>
where
    DB: Database,
    for<'c> &'c Pool<DB>: Executor<'c, Database = DB>,
    for<'a> DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    sqlx::query(
        "INSERT INTO room_seqs (room, last_seq) VALUES ($1, $2)
         ON CONFLICT (room) DO UPDATE SET last_seq = excluded.last_seq
         WHERE room_seqs.last_seq < excluded.last_seq",
    )
    .bind(room.as_str())
    .bind(sql_seq(upto))
    .execute(pool)
    .await?;
    Ok(())
}

/// Lowers each room's mark to the last seq really used, in one transaction:
/// what was reserved but never handed out is free again.
pub(crate) async fn release<DB>(pool: &Pool<DB>, used: &[(RoomName, u64)]) -> Result<(), StoreError>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'a> DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    let mut tx = pool.begin().await?;
    for (room, last) in used {
        sqlx::query("UPDATE room_seqs SET last_seq = $2 WHERE room = $1 AND last_seq > $2")
            .bind(room.as_str())
            .bind(sql_seq(*last))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
