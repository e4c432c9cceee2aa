//! Reading history on this bus: the room's stream first, then storage.
//!
//! Here a message is delivered before it is stored: the persister writes it
//! moments later, or much later when the database was away or the instance
//! that read it died (its entries wait [`CLAIM_IDLE`] to be claimed). Had the
//! hub read history from storage alone, a new room's ring would start below
//! the room's real position, and a resume (`/join ROOM SEQ`, an SSE
//! `Last-Event-ID`) would not see the newest messages at all. So the hub reads
//! through [`StreamFirst`]: each room's capped stream holds its newest
//! messages whatever the persister's lag, and storage holds everything older
//! than the stream reaches back.
//!
//! ```text
//!   storage   1 ............................ S            (S lags)
//!   stream                 T-10,000 .................... T
//!   a read    storage below the stream's first entry, then the stream
//! ```
//!
//! A Redis that cannot be read fails the read (`unavailable`, try again)
//! rather than answering from storage alone: a stale answer is exactly the
//! silent hole this module exists to prevent.
//!
//! [`CLAIM_IDLE`]: super::persist::CLAIM_IDLE

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use fred::prelude::*;

use super::keys::Keys;
use super::wire::{Body, seq_of_id};
use crate::core::ports::{Store, StoreError};
use crate::core::{IdempotencyKey, Message, RoomName};

/// A stream entry as fred returns it: id, then fields.
pub type Entry = (String, HashMap<String, String>);

/// The messages of `entries` (stream entries of `room`), skipping any that
/// do not decode (logged).
pub fn decode(room: &RoomName, entries: Vec<Entry>) -> Vec<Message> {
    entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let message = seq_of_id(&id).and_then(|seq| {
                Body::decode(
                    room.clone(),
                    seq,
                    fields.get("m").map_or("", String::as_str),
                )
            });
            if message.is_none() {
                tracing::warn!(%room, id, "unreadable stream entry skipped");
            }
            message
        })
        .collect()
}

/// The store the hub reads through on the Redis bus: room streams in front
/// of the database. Writes go to the database unchanged.
pub struct StreamFirst {
    store: Arc<dyn Store>,
    cmd: Client,
    keys: Keys,
}

impl StreamFirst {
    /// Reads `store` behind the room streams of `keys`, through `cmd`.
    pub fn new(store: Arc<dyn Store>, cmd: Client, keys: Keys) -> Self {
        StreamFirst { store, cmd, keys }
    }

    /// Up to `limit` stream entries of `room` after `after`, oldest first.
    async fn after(
        &self,
        room: &RoomName,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let entries: Vec<Entry> = self
            .cmd
            .xrange(
                self.keys.log(room),
                format!("({after}"),
                "+",
                Some(u64::from(limit)),
            )
            .await
            .map_err(redis_down)?;
        Ok(decode(room, entries))
    }

    /// Up to `limit` stream entries of `room` below `before` (from the top
    /// when `None`), newest first.
    async fn before(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let end = before.map_or_else(|| "+".to_owned(), |b| format!("({b}"));
        let entries: Vec<Entry> = self
            .cmd
            .xrevrange(self.keys.log(room), end, "-", Some(u64::from(limit)))
            .await
            .map_err(redis_down)?;
        Ok(decode(room, entries))
    }
}

#[async_trait]
impl Store for StreamFirst {
    fn engine(&self) -> &'static str {
        self.store.engine()
    }

    async fn append(&self, batch: &[Arc<Message>]) -> Result<(), StoreError> {
        self.store.append(batch).await
    }

    /// The higher of the stream's newest entry and storage's newest row
    /// (storage is ahead only when Redis lost its data).
    async fn last_seq(&self, room: &RoomName) -> Result<u64, StoreError> {
        let streamed = self
            .before(room, None, 1)
            .await?
            .first()
            .map_or(0, |m| m.seq);
        Ok(streamed.max(self.store.last_seq(room).await?))
    }

    async fn append_once(
        &self,
        message: &Arc<Message>,
        key: &IdempotencyKey,
    ) -> Result<Option<Message>, StoreError> {
        self.store.append_once(message, key).await
    }

    async fn seq_floor(&self, room: &RoomName) -> Result<u64, StoreError> {
        self.store.seq_floor(room).await
    }

    async fn reserve_seqs(&self, room: &RoomName, upto: u64) -> Result<(), StoreError> {
        self.store.reserve_seqs(room, upto).await
    }

    async fn release_seqs(&self, used: &[(RoomName, u64)]) -> Result<(), StoreError> {
        self.store.release_seqs(used).await
    }

    /// The stream's newest entries below `before`; when the stream runs out
    /// first, storage's rows below the stream's oldest entry.
    async fn page(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let mut page = self.before(room, before, limit).await?;
        let oldest = page.last().map(|m| m.seq).or(before);
        let wanted = limit as usize - page.len().min(limit as usize);
        if wanted > 0 && oldest != Some(1) {
            page.extend(self.store.page(room, oldest, wanted as u32).await?);
        }
        Ok(page)
    }

    /// The stream's entries after `after` when it reaches back that far;
    /// otherwise storage's rows first, then the stream's newer entries.
    async fn since(
        &self,
        room: &RoomName,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let streamed = self.after(room, after, limit).await?;
        if streamed.first().is_some_and(|m| m.seq == after + 1) {
            return Ok(streamed);
        }
        // Trimmed from the stream (or Redis lost it): storage has the older part.
        let mut messages = self.store.since(room, after, limit).await?;
        let last = messages.last().map_or(after, |m| m.seq);
        messages.extend(streamed.into_iter().filter(|m| m.seq > last));
        messages.truncate(limit as usize);
        Ok(messages)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    async fn close(&self) {
        self.store.close().await
    }
}

/// A failed stream read, as the hub's reads report it.
fn redis_down(err: fred::error::Error) -> StoreError {
    StoreError::NotAnswering(
        format!("Redis holds the newest messages and did not answer: {err}").into(),
    )
}
