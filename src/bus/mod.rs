//! The bus connects instances and is the ordering authority of every room.
//!
//! The core hands a [`Draft`](crate::core::Draft) to [`Bus::publish`]; the
//! bus gives it the room's next `seq`, makes it durable as `--durability`
//! says, and delivers the sequenced message to every instance (this one
//! included) through the [`Deliver`] sink each instance attaches with
//! [`Bus::start`], in `seq` order per room. The directory's promises (leases,
//! reaping, re-asserted claims) are the port's: see [`Directory`].
//!
//! - `local`: one instance; an in-memory counter per room, seeded from the store.
//! - `poll`: instances share the database, which orders every room.
//! - `redis://`: instances connected through Redis or Valkey, which orders
//!   every room (the `redis` folder).
//!
//! Each bus implements the core's [`Bus`] port (and, when it connects
//! instances, [`Directory`]); the ports and the types they carry are defined
//! in `crate::core::ports` and re-exported here.

mod fence;
mod gate;
mod local;
mod poll;
mod redis;

use std::sync::Arc;

pub use crate::core::ports::{Bus, BusError, Claim, Deliver, Directory, Envelope, Presence};
use crate::core::ports::{Durability, Store};

pub use local::LocalBus;
pub use poll::{LEASE, PollBus};
pub use redis::{RedisBus, drain};

/// Which bus `--bus` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusSpec {
    /// One instance.
    Local,
    /// Instances sharing the database (`--db`), polling it.
    Poll,
    /// Instances connected through Redis or Valkey at this URL.
    Redis(String),
}

/// URL schemes of the Redis bus: plain, Valkey's name, TLS, and a cluster.
const REDIS_SCHEMES: [&str; 6] = [
    "redis://",
    "valkey://",
    "rediss://",
    "valkeys://",
    "redis-cluster://",
    "valkey-cluster://",
];

impl std::str::FromStr for BusSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(BusSpec::Local),
            "poll" => Ok(BusSpec::Poll),
            s if REDIS_SCHEMES.iter().any(|scheme| s.starts_with(scheme)) => {
                Ok(BusSpec::Redis(s.to_owned()))
            }
            other => Err(format!(
                "unknown bus {other:?}: use local, poll or redis://HOST:PORT[/DB]"
            )),
        }
    }
}

/// What opening a bus needs besides its spec.
pub struct BusOptions<'a> {
    /// The store (and, for `poll`, the `--db` URL it was opened with).
    pub store: Arc<dyn Store>,
    /// `--db`.
    pub db_url: &'a str,
    /// `--durability`.
    pub durability: Durability,
    /// This instance's name.
    pub instance: &'a str,
    /// `--poll-interval`.
    pub poll_interval: std::time::Duration,
    /// `--cluster`: the namespace of the Redis bus's keys and channels.
    pub cluster: &'a str,
}

/// Builds the bus `spec` names.
pub async fn open(spec: &BusSpec, options: BusOptions<'_>) -> Result<Arc<dyn Bus>, BusError> {
    Ok(match spec {
        BusSpec::Local => Arc::new(LocalBus::new(options.store, options.durability)),
        BusSpec::Poll => Arc::new(
            PollBus::open(
                options.db_url,
                options.instance,
                options.store,
                options.poll_interval,
                options.durability,
            )
            .await?,
        ),
        BusSpec::Redis(url) => {
            if options.durability == Durability::Sync {
                // Said rather than ignored: on this bus a message is
                // acknowledged once Redis holds it, and stored behind.
                return Err(BusError::Redis(
                    "--durability sync does not apply to the redis bus: a message is \
                     acknowledged once Redis has numbered it and holds it in its streams \
                     (durable across a Redis restart with appendonly yes), and stored in \
                     the database behind delivery; leave --durability at async"
                        .into(),
                ));
            }
            Arc::new(RedisBus::open(url, options.cluster, options.instance, options.store).await?)
        }
    })
}
