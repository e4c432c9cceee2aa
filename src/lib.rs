//! baby-discord: a chat daemon you can read.
//!
//! - [`core`]: the chat logic (sessions, rooms, commands, history, routing), no I/O.
//! - [`adapters`]: TCP lines and HTTP/SSE, turning bytes into commands and events into bytes.
//! - [`store`]: message storage (SQLite, PostgreSQL).
//! - [`bus`]: the ordering authority and the link between instances.
//! - [`server`]: wires them together; [`config`]: the command line; [`fds`]: the
//!   file-descriptor budget.
//! - [`bench`]: the load generator (`baby-discord bench`).

pub mod adapters;
pub mod bench;
pub mod bus;
pub mod config;
pub mod core;
pub mod fds;
pub mod server;
pub mod store;
