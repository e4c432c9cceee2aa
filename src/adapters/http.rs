//! The HTTP adapter. Until its routes land, every request is answered `503`
//! with an `unavailable` error body, so clients get a clear answer rather than
//! a refused connection.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::{ErrorCode, Event, Hub};

/// What the HTTP adapter needs.
#[derive(Clone)]
pub struct HttpAdapter {
    /// The chat core.
    pub hub: Hub,
    /// Shared with the TCP adapter: one permit per open connection.
    pub connections: Arc<Semaphore>,
    /// Fires when the daemon stops.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// How long a request head may take to arrive (slow-loris guard).
    pub header_timeout: Duration,
}

impl HttpAdapter {
    /// Accepts connections until shutdown.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, _peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::error!(cause = %err, "failed to accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let this = self.clone();
            self.tracker.spawn(async move {
                let Ok(_permit) = this.connections.clone().try_acquire_owned() else {
                    return;
                };
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(this.header_timeout);
                let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(unavailable())
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = this.shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                    }
                }
            });
        }
    }
}

fn unavailable() -> Response<Full<Bytes>> {
    let body = Event::error(
        ErrorCode::Unavailable,
        "the HTTP adapter is not available in this version; use TCP (nc localhost 9001)",
    );
    Response::builder()
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .header("content-type", "application/json")
        .body(Full::new(body.json().clone()))
        .expect("static response is valid")
}
