//! Adapters turn bytes into commands and events into bytes. They own sockets,
//! framing, input limits and per-connection writers; they never decide chat
//! behaviour. A new transport is one new file here.

mod coalesce;
pub mod http;
pub mod lines;
mod on_wake;
pub mod peers;
pub mod tcp;
