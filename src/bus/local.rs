//! The bus of a single instance: an in-memory `seq` counter per room, seeded
//! from the store the first time a room is used, so numbering continues across
//! restarts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::{Bus, BusError, Deliver, Envelope};
use crate::core::{Draft, Message, RoomName};
use crate::store::{Durability, Store, Writer, WriterStats};

/// How a sequenced message becomes durable.
enum Persist {
    /// Queued to the batching writer; delivered at once.
    Async(Writer),
    /// Written before it is delivered.
    Sync(Arc<dyn Store>),
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
}

struct State {
    last_seq: HashMap<RoomName, u64>,
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
            Durability::Sync => (Persist::Sync(store.clone()), None),
        };
        let writer_stats = match &persist {
            Persist::Async(writer) => Some(writer.stats().clone()),
            Persist::Sync(_) => None,
        };
        LocalBus {
            store,
            state: Mutex::new(State {
                last_seq: HashMap::new(),
                persist: Some(persist),
                sink: None,
            }),
            writer_task: StdMutex::new(writer_task),
            writer_stats,
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
        let last = match state.last_seq.get(&draft.room) {
            Some(&seq) => seq,
            None => self.store.last_seq(&draft.room).await?,
        };
        let message = Arc::new(draft.sequence(last + 1));
        match &state.persist {
            Some(Persist::Async(writer)) => {
                writer.save(message.clone());
            }
            Some(Persist::Sync(store)) => store.append(std::slice::from_ref(&message)).await?,
            None => return Err(BusError::Closed),
        }
        state.last_seq.insert(message.room.clone(), message.seq);
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
        Ok(())
    }

    async fn close(&self) {
        let (persist, sink) = {
            let mut state = self.state.lock().await;
            (state.persist.take(), state.sink.take())
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
    }
}
