//! The ports: what the core needs from the world outside it, defined here
//! so that the core depends on nothing but itself.
//!
//! Each bus and each store implements these traits and imports them from
//! here; the core never names an implementation or a driver. Errors crossing a port are engine-neutral: an implementation
//! sorts its driver's failures into the kinds the core acts on.

mod bus;
mod store;

pub use bus::{Bus, BusError, Claim, Deliver, Directory, Envelope, Presence};
pub use store::{BoxError, Durability, IDEMPOTENCY_WINDOW, Store, StoreError, WriterStats};
