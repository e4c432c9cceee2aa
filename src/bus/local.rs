//! The bus of a single instance: an in-memory `seq` counter per room.
//!
//! Numbers are handed out from blocks reserved durably in the store (see
//! `store::seqs`): before the first number above its mark, the bus raises the
//! mark by [`SEQ_BLOCK`]. With async durability the last batch of messages
//! can die with the process; their numbers are then skipped after a restart,
//! never given to other messages, and read as a `gap`. A keyed send
//! (`Idempotency-Key`) is stored before it is delivered, with its key, even
//! in async durability: a retry must find it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::gate::{self, Gate};
use crate::core::ports::{Bus, BusError, Deliver, Durability, Envelope, Store, WriterStats};
use crate::core::{Draft, Message, RoomName};
use crate::store::Writer;

/// Seqs reserved per write of a room's mark: one small write per this many
/// messages, and at most this many numbers skipped after a crash.
const SEQ_BLOCK: u64 = 1_000;

/// A room's numbering.
#[derive(Debug, Clone, Copy)]
struct RoomSeq {
    /// The last seq handed out (or burnt by a failed store).
    last: u64,
    /// The durable mark: numbers up to here may be handed out.
    reserved: u64,
}

/// How a sequenced message becomes durable.
enum Persist {
    /// Queued to the batching writer; delivered at once.
    Async(Writer),
    /// Written before it is delivered.
    Sync,
}

/// The single-instance bus.
pub struct LocalBus {
    store: Arc<dyn Store>,
    /// Last seq per room. The lock also orders publication: a message is
    /// delivered before the next one of any room is numbered.
    state: Mutex<State>,
    writer_task: StdMutex<Option<tokio::task::JoinHandle<()>>>,
    /// The writer's counters (async durability only).
    writer_stats: Option<Arc<WriterStats>>,
    /// Shut while the store does not answer the numbering's writes.
    gate: Gate,
}

struct State {
    seqs: HashMap<RoomName, RoomSeq>,
    /// `None` once closed.
    persist: Option<Persist>,
    /// `None` until started.
    sink: Option<Arc<dyn Deliver>>,
}

impl LocalBus {
    /// A bus over `store`; in async durability it starts the batching writer.
    pub fn new(store: Arc<dyn Store>, durability: Durability) -> Self {
        let (persist, writer_task) = match durability {
            Durability::Async => {
                let (writer, task) = Writer::new(store.clone());
                (Persist::Async(writer), Some(tokio::spawn(task.run())))
            }
            Durability::Sync => (Persist::Sync, None),
        };
        let writer_stats = match &persist {
            Persist::Async(writer) => Some(writer.stats().clone()),
            Persist::Sync => None,
        };
        LocalBus {
            store,
            state: Mutex::new(State {
                seqs: HashMap::new(),
                persist: Some(persist),
                sink: None,
            }),
            writer_task: StdMutex::new(writer_task),
            writer_stats,
            gate: Gate::default(),
        }
    }

    /// The batching writer, if this bus has one (for its counters).
    pub async fn writer(&self) -> Option<Writer> {
        match &self.state.lock().await.persist {
            Some(Persist::Async(w)) => Some(w.clone()),
            _ => None,
        }
    }
}

impl LocalBus {
    /// The room's next seq, reserving a new block durably first when the
    /// current one is used up. The number counts as handed out from here on:
    /// if storing the message fails, it is burnt (a gap), never reused,
    /// because a store that timed out may still have committed it.
    async fn next_seq(&self, state: &mut State, room: &RoomName) -> Result<u64, BusError> {
        let mut seqs = match state.seqs.get(room) {
            Some(&seqs) => seqs,
            None => {
                self.gate.admit()?;
                let floor = gate::attempt(&self.gate, "reading the room's seq mark", async {
                    Ok(self.store.seq_floor(room).await?)
                })
                .await?;
                RoomSeq {
                    last: floor,
                    reserved: floor,
                }
            }
        };
        let seq = seqs.last + 1;
        if seq > seqs.reserved {
            self.gate.admit()?;
            let upto = seqs.last + SEQ_BLOCK;
            gate::attempt(&self.gate, "reserving seqs", async {
                Ok(self.store.reserve_seqs(room, upto).await?)
            })
            .await?;
            seqs.reserved = upto;
        }
        seqs.last = seq;
        state.seqs.insert(room.clone(), seqs);
        Ok(seq)
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn name(&self) -> &'static str {
        "local"
    }

    fn writer_stats(&self) -> Option<Arc<WriterStats>> {
        self.writer_stats.clone()
    }

    fn start(&self, sink: Arc<dyn Deliver>) {
        // Called once at start-up, before anything can publish.
        self.state
            .try_lock()
            .expect("start is called before publishing")
            .sink = Some(sink);
    }

    async fn publish(&self, draft: Draft) -> Result<Arc<Message>, BusError> {
        let mut state = self.state.lock().await;
        let writer = match &state.persist {
            None => return Err(BusError::Closed),
            Some(Persist::Async(writer)) => Some(writer.clone()),
            Some(Persist::Sync) => None,
        };
        let key = draft.key.clone();
        let stored_first = key.is_some() || writer.is_none();
        if stored_first {
            // Refuse before numbering: a refusal here uses no seq.
            self.gate.admit()?;
        }
        let room = draft.room.clone();
        let seq = self.next_seq(&mut state, &room).await?;
        let message = Arc::new(draft.sequence(seq));
        match (writer, &key) {
            (Some(writer), None) => {
                writer.save(message.clone());
            }
            (writer, Some(key)) => {
                let stored = gate::attempt(&self.gate, "storing a keyed message", async {
                    // What the writer still holds goes first, so storage
                    // never shows a hole below this message that a resuming
                    // reader would take for a gap.
                    if let Some(writer) = &writer {
                        writer.flush().await;
                    }
                    Ok(self.store.append_once(&message, key).await?)
                })
                .await?;
                if let Some(first) = stored {
                    // A repeat: nothing is sent, and `seq` was never used
                    // (its transaction rolled back), so it is not burnt.
                    if let Some(seqs) = state.seqs.get_mut(&room) {
                        seqs.last = seq - 1;
                    }
                    return Ok(Arc::new(first));
                }
            }
            (None, None) => {
                gate::attempt(&self.gate, "storing a message", async {
                    Ok(self.store.append(std::slice::from_ref(&message)).await?)
                })
                .await?;
            }
        }
        // Delivered in place: the sender's own copy is in its outbox before
        // `publish` returns, so a connection sees its events in order.
        if let Some(sink) = &state.sink {
            sink.deliver(Envelope::Message(message.clone()));
        }
        Ok(message)
    }

    async fn settled(&self) {
        if let Some(writer) = self.writer().await {
            writer.flush().await;
        }
    }

    async fn health(&self) -> Result<(), BusError> {
        self.gate.status()
    }

    async fn close(&self) {
        let (persist, sink, used) = {
            let mut state = self.state.lock().await;
            let used: Vec<(RoomName, u64)> = state
                .seqs
                .iter()
                .filter(|(_, s)| s.reserved > s.last)
                .map(|(room, s)| (room.clone(), s.last))
                .collect();
            (state.persist.take(), state.sink.take(), used)
        };
        drop(sink);
        if let Some(Persist::Async(writer)) = persist {
            writer.flush().await;
            drop(writer);
            let task = self.writer_task.lock().expect("not poisoned").take();
            if let Some(task) = task {
                let _ = task.await;
            }
        }
        // Everything handed out is stored now (or this line is never reached:
        // the caller's flush timeout fires first and the marks stay high,
        // which is the safe side). Give back what was reserved but unused.
        if let Err(err) = self.store.release_seqs(&used).await {
            tracing::warn!(cause = %err, "could not release seq reservations; the next start skips them");
        }
    }
}
