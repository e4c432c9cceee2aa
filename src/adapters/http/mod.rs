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
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::peers::Peers;
use crate::core::Hub;
use metrics::{Metrics, Sources};
use routes::Routes;
use sessions::Sessions;

pub use sessions::new_token;

/// How long open connections get to finish once the daemon stops.
const DRAIN: Duration = Duration::from_secs(2);

/// Completes if no request has started within `timeout` of the connection
/// opening; otherwise never.
///
/// hyper's HTTP/1 `header_read_timeout` starts only once hyper-util's
/// protocol detection has decided the connection is HTTP/1, detection itself
/// has no timeout, and HTTP/2 has no header timeout at all: a client that sends
/// nothing, or trickles the HTTP/2 preface, would hold its descriptor and
/// connection permit forever. This covers the whole way to a first request,
/// whatever the protocol.
async fn silent(timeout: Duration, first_request: &Notify) {
    if tokio::time::timeout(timeout, first_request.notified())
        .await
        .is_ok()
    {
        std::future::pending::<()>().await;
    }
}

/// What the HTTP adapter needs.
#[derive(Clone)]
pub struct HttpAdapter {
    /// The chat core.
    pub hub: Hub,
    /// Shared with the TCP adapter: one permit per open connection.
    pub connections: Arc<Semaphore>,
    /// Shared with the TCP adapter: limits per client address.
    pub peers: Arc<Peers>,
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
            peers: self.peers.clone(),
        });
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
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
                // Over a limit, every request on the connection is answered 503.
                let address_permit = this.peers.admit(peer.ip());
                let permit = address_permit
                    .as_ref()
                    .and_then(|_| this.connections.clone().try_acquire_owned().ok());
                let refusal = match (&address_permit, &permit) {
                    (None, _) => Some(format!(
                        "too many connections from your address (at most {}); close some first",
                        this.peers.limits().max_conns
                    )),
                    (Some(_), None) => Some("the server is full; try again later".to_owned()),
                    _ => None,
                };
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
                let refusal = Arc::new(refusal);
                let first_request = Arc::new(Notify::new());
                let service = {
                    let cut = cut.clone();
                    let first_request = first_request.clone();
                    hyper::service::service_fn(move |req: Request<Incoming>| {
                        first_request.notify_one();
                        let routes = routes.clone();
                        let cut = cut.clone();
                        let refusal = refusal.clone();
                        async move {
                            // Health checks are answered even when full: a
                            // full instance is still a live one.
                            let health = req.uri().path() == "/healthz";
                            let response = match &*refusal {
                                Some(why) if !health => routes::overloaded(why),
                                _ => routes.handle(req, cut, peer.ip()).await,
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
                    () = silent(this.header_timeout, &first_request) => {
                        tracing::debug!(%peer, "closed an HTTP connection that sent no request in time");
                    }
                    _ = this.shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(DRAIN, conn).await;
                    }
                }
                open.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
                drop(address_permit);
            });
        }
    }
}
