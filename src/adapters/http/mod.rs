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
mod stream;

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
use tracing::Instrument;

use super::peers::Peers;
use crate::adapters::on_wake::OnWake;
use crate::core::Hub;
use metrics::{Metrics, Sources};
use routes::Routes;
use sessions::Sessions;

pub use sessions::new_token;

#[cfg(feature = "fuzzing")]
pub(crate) use routes::check_bodies;
#[cfg(feature = "fuzzing")]
pub(crate) use sse::parse_room_id;

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
    // Boxed: the timer is freed once the first request is in, instead of
    // sizing the connection's task for its whole life.
    if Box::pin(tokio::time::timeout(timeout, first_request.notified()))
        .await
        .is_ok()
    {
        std::future::pending::<()>().await;
    }
}

/// The HTTP/2 cleartext preface, which every h2c connection starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// An HTTP/1.1 request that opens an event stream: `stream.rs`.
    Stream,
    /// Not the HTTP/2 preface: HTTP/1.
    Http1,
    /// The preface, a prefix of it, or nothing yet: hyper-util decides.
    Either,
}

/// Looks at a connection's first bytes without consuming them.
///
/// hyper-util's protocol detection reads them itself and hands them back to
/// hyper first: hyper's first read then returns only those few bytes, and its
/// read buffer, topped up before the next read, doubles from 8 to 16 KiB for
/// the connection's whole life (an SSE stream's included). Bytes that are not
/// a prefix of the HTTP/2 preface are HTTP/1 to hyper-util as well; those go
/// straight to hyper's HTTP/1 server, which then reads the request whole.
///
/// A first request that opens an event stream, whole in the first bytes,
/// goes to `stream.rs`, which keeps neither of hyper's buffers.
async fn sniff(stream: &tokio::net::TcpStream) -> Protocol {
    let mut first = [0u8; 512];
    match stream.peek(&mut first).await {
        Ok(n) if n > 0 && stream::is_stream_request(&first[..n]) => Protocol::Stream,
        Ok(n) if n > 0 && !H2_PREFACE.starts_with(&first[..n.min(H2_PREFACE.len())]) => {
            Protocol::Http1
        }
        _ => Protocol::Either,
    }
}

/// Which of [`Ends`] came first.
enum End {
    Cut,
    Silent,
    Shutdown,
}

/// What ends a connection besides its client.
struct Ends<'a, F> {
    cut: &'a CancellationToken,
    silent: std::pin::Pin<&'a mut F>,
    shutdown: &'a CancellationToken,
    peer: std::net::SocketAddr,
}

impl<F: std::future::Future<Output = ()>> Ends<'_, F> {
    /// Serves `conn` until it ends, is cut, sends no request in time, or the
    /// daemon stops (then it gets [`DRAIN`] to finish).
    ///
    /// `conn` comes pinned by the caller: pinned here, it would be kept
    /// twice in the task (as the argument, and as the pinned local).
    async fn drive<C: std::future::Future>(
        mut self,
        mut conn: std::pin::Pin<&mut C>,
        shut_down: impl FnOnce(std::pin::Pin<&mut C>),
    ) {
        // Polled only when one of them fires, not on every wake-up of the
        // connection (an event stream's are several per event; see `OnWake`).
        let end = OnWake::new(async {
            tokio::select! {
                _ = self.cut.cancelled() => End::Cut,
                () = self.silent.as_mut() => End::Silent,
                _ = self.shutdown.cancelled() => End::Shutdown,
            }
        });
        tokio::select! {
            _ = conn.as_mut() => {}
            end = end => match end {
                End::Cut => {}
                End::Silent => {
                    tracing::debug!(peer = %self.peer, "closed an HTTP connection that sent no request in time");
                }
                End::Shutdown => {
                    shut_down(conn.as_mut());
                    // Boxed: only shutdown needs this timer.
                    let _ = Box::pin(tokio::time::timeout(DRAIN, conn)).await;
                }
            },
        }
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
            self.tracker.spawn(
                async move {
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
                    let refusal = Arc::new(refusal);
                    let first_request = Arc::new(Notify::new());
                    let streaming = stream::Stream {
                        routes: routes.clone(),
                        cut: cut.clone(),
                        peer,
                        refusal: (*refusal).clone(),
                        first_request: first_request.clone(),
                    };
                    let service = {
                        let cut = cut.clone();
                        let first_request = first_request.clone();
                        hyper::service::service_fn(move |req: Request<Incoming>| {
                            first_request.notify_one();
                            let routes = routes.clone();
                            let cut = cut.clone();
                            let refusal = refusal.clone();
                            // Boxed: hyper keeps a slot the size of this future
                            // for the whole connection, and an open stream's
                            // connection would hold every route's state for nothing.
                            Box::pin(async move {
                                // Health checks are answered even when full: a
                                // full instance is still a live one.
                                let health = req.uri().path() == "/healthz";
                                let response = match &*refusal {
                                    Some(why) if !health => routes::overloaded(why),
                                    _ => routes.handle(req, cut, peer.ip()).await,
                                };
                                Ok::<_, Infallible>(response)
                            })
                        })
                    };
                    let silent = silent(this.header_timeout, &first_request);
                    tokio::pin!(silent);
                    let sniffed = tokio::select! {
                        // Boxed: its peek buffer is needed only until then.
                        sniffed = Box::pin(sniff(&stream)) => Some(sniffed),
                        () = &mut silent => None,
                        _ = this.shutdown.cancelled() => None,
                    };
                    let ends = Ends {
                        cut: &cut,
                        silent,
                        shutdown: &this.shutdown,
                        peer,
                    };
                    match sniffed {
                        Some(Protocol::Stream) => {
                            // The stream itself ends when the daemon stops.
                            let conn = std::pin::pin!(streaming.serve(stream));
                            ends.drive(conn, |_| {}).await;
                        }
                        Some(Protocol::Http1) => {
                            let mut builder = hyper::server::conn::http1::Builder::new();
                            builder
                                .timer(TokioTimer::new())
                                .header_read_timeout(this.header_timeout);
                            // Boxed, as h2c below: an event stream's task is
                            // then no larger than its own state.
                            let mut conn =
                                Box::pin(builder.serve_connection(TokioIo::new(stream), service));
                            Box::pin(ends.drive(conn.as_mut(), |conn| conn.graceful_shutdown()))
                                .await;
                        }
                        Some(Protocol::Either) => {
                            let mut builder = auto::Builder::new(TokioExecutor::new());
                            builder
                                .http1()
                                .timer(TokioTimer::new())
                                .header_read_timeout(this.header_timeout);
                            builder
                                .http2()
                                .timer(TokioTimer::new())
                                .max_concurrent_streams(100);
                            // Boxed: h2c is rare, and its larger state would
                            // otherwise size every HTTP/1 connection's task.
                            let mut conn =
                                Box::pin(builder.serve_connection(TokioIo::new(stream), service));
                            Box::pin(ends.drive(conn.as_mut(), |conn| conn.graceful_shutdown()))
                                .await;
                        }
                        None => {}
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                    drop(address_permit);
                }
                // Debug level, as the TCP adapter's: an enabled span is kept
                // for the connection's life (an event stream's is hours).
                .instrument(tracing::debug_span!("http", %peer)),
            );
        }
    }
}
