//! The bus connects instances and is the ordering authority of every room.
//!
//! The core hands a [`Draft`] to [`Bus::publish`]; the bus gives it the room's
//! next `seq`, makes it durable as `--durability` says, and delivers the
//! sequenced message to every instance (this one included) through the
//! [`Deliver`] sink each instance attaches with [`Bus::start`], in `seq` order
//! per room.
//!
//! - `local`: one instance; an in-memory counter per room, seeded from the store.
//! - `poll` and `redis://` connect several instances (later files beside this one).

mod local;

use std::sync::Arc;

use async_trait::async_trait;

use crate::core::{Draft, Message};
use crate::store::{Durability, Store};

pub use local::LocalBus;

/// What travels from the bus to an instance.
#[derive(Debug, Clone)]
pub enum Envelope {
    /// A sequenced room message.
    Message(Arc<Message>),
}

/// Why the bus could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The message could not be made durable (sync durability) or sequenced.
    #[error("storage is not answering: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The bus is stopping.
    #[error("the bus is closed")]
    Closed,
}

/// Which bus `--bus` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusSpec {
    /// One instance.
    Local,
}

impl std::str::FromStr for BusSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(BusSpec::Local),
            "poll" => {
                Err("--bus poll is not built yet; this version supports only --bus local".into())
            }
            s if s.starts_with("redis://") || s.starts_with("valkey://") => Err(
                "--bus redis:// is not built yet; this version supports only --bus local".into(),
            ),
            other => Err(format!("unknown bus {other:?}: use local")),
        }
    }
}

/// Where a bus hands what it carries: the instance's core.
pub trait Deliver: Send + Sync + 'static {
    /// Takes one envelope. Must not block: it runs on the bus's own path.
    fn deliver(&self, envelope: Envelope);
}

/// Carries messages between instances and orders each room.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// `local`, `poll` or `redis`, for logs and `/healthz`.
    fn name(&self) -> &'static str;

    /// Starts delivering what the cluster sends this instance to `sink`, in
    /// `seq` order per room. Called once, before the first `publish`.
    fn start(&self, sink: Arc<dyn Deliver>);

    /// Sequences `draft` in its room and publishes it to every instance. Returns
    /// the sequenced message; every instance (this one too) also receives it
    /// through its sink.
    async fn publish(&self, draft: Draft) -> Result<Arc<Message>, BusError>;

    /// Answers when the bus works.
    async fn health(&self) -> Result<(), BusError>;

    /// Stops publishing and waits until everything published is durable.
    async fn close(&self);
}

/// Builds the bus `spec` names over `store`.
pub fn open(spec: &BusSpec, store: Arc<dyn Store>, durability: Durability) -> Arc<dyn Bus> {
    match spec {
        BusSpec::Local => Arc::new(LocalBus::new(store, durability)),
    }
}
