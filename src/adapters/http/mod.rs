//! The HTTP adapter: JSON commands in, Server-Sent Events out, and the
//! browser page.
//!
//! One hyper-util server speaks HTTP/1.1 and HTTP/2 cleartext on the same port.
//! A request is a command (`POST /command`, `/message`...), answered with the
//! events it produced for its caller; everything else a session is told arrives
//! on its SSE stream (`GET /events`). Chat decisions stay in the core, which
//! this adapter calls exactly as the TCP adapter does.
//!
//! - `routes.rs`: the routes, statuses and JSON shapes of PROTOCOL.md.
//! - `sessions.rs`: tokens, and each session's feed, which outlives a stream.
//! - `resend.rs`: what a session sent lately, and how a reconnect resumes.
//! - `sse.rs`: the session and room streams, resume and gaps.
//! - `metrics.rs`: `/metrics`.
//! - `page.html`: the browser client, embedded in the binary.

mod metrics;
mod resend;
mod routes;
mod sessions;
mod sse;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::Hub;
use metrics::{Metrics, Sources};
use routes::Routes;
use sessions::Sessions;

pub use sessions::new_token;

/// How long open connections get to finish once the daemon stops.
const DRAIN: Duration = Duration::from_secs(2);

/// What the HTTP adapter needs.
#[derive(Clone)]
pub struct HttpAdapter {
    /// The chat core.
    pub hub: Hub,
    /// Shared with the TCP adapter: one permit per open connection.
    pub connections: Arc<Semaphore>,
    /// The semaphore's size, for `/metrics`.
    pub max_connections: usize,
    /// Fires when the daemon stops.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// How long a request head may take to arrive (slow-loris guard).
    pub header_timeout: Duration,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// How long a session outlives its dropped stream.
    pub session_linger: Duration,
    /// Time between `: ping` comments on SSE streams.
    pub sse_ping: Duration,
}

impl HttpAdapter {
    /// Accepts connections until shutdown.
    pub async fn serve(self, listener: TcpListener) {
        let http_connections = Arc::new(AtomicI64::new(0));
        let streams = Arc::new(AtomicI64::new(0));
        let sessions = Sessions::new(self.session_linger, self.max_connections);
        let metrics = Metrics::new(Sources {
            hub: self.hub.clone(),
            sessions: sessions.clone(),
            connections: self.connections.clone(),
            max_connections: self.max_connections,
            http_connections: http_connections.clone(),
            streams: streams.clone(),
        });
        let routes = Arc::new(Routes {
            hub: self.hub.clone(),
            sessions,
            metrics,
            max_body: self.max_body,
            body_timeout: self.header_timeout,
            sse_ping: self.sse_ping,
            shutdown: self.shutdown.clone(),
            tracker: self.tracker.clone(),
            streams,
        });
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, _peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::error!(cause = %err, "failed to accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let routes = routes.clone();
            let open = http_connections.clone();
            self.tracker.spawn(async move {
                let permit = this.connections.clone().try_acquire_owned().ok();
                let full = permit.is_none();
                open.fetch_add(1, Ordering::Relaxed);
                // Cancelled to cut this connection (a stream's reader is stuck).
                let cut = CancellationToken::new();
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(this.header_timeout);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(100);
                let service = {
                    let cut = cut.clone();
                    hyper::service::service_fn(move |req: Request<Incoming>| {
                        let routes = routes.clone();
                        let cut = cut.clone();
                        async move {
                            let response = if full {
                                routes::overloaded()
                            } else {
                                routes.handle(req, cut).await
                            };
                            Ok::<_, Infallible>(response)
                        }
                    })
                };
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = cut.cancelled() => {}
                    _ = this.shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(DRAIN, conn).await;
                    }
                }
                open.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    }
}
