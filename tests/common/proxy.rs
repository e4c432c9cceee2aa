//! A fault-injecting TCP proxy for tests: the daemon connects to a service
//! (PostgreSQL, Redis) through it, and the test pauses, cuts or slows the
//! link, so no test ever stops the machine's shared services.
//!
//! - [`Proxy::pause`]: bytes stop flowing both ways; connections stay open
//!   and new ones are accepted but carry nothing (a stalled server or a
//!   partitioned network: the client sees silence, not an error).
//! - [`Proxy::cut`]: every open connection is closed and new ones are closed
//!   at once (a crashed or restarting server: the client sees errors).
//! - [`Proxy::resume`]: back to normal after either.
//! - [`Proxy::set_delay`]: each chunk waits this long before it is forwarded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the link does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Paused,
    Cut,
}

/// A running proxy. Stops (and closes every connection) when dropped.
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    delay_ms: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to
    /// `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, _) = watch::channel(Mode::Open);
        let delay_ms = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            mode.clone(),
            delay_ms.clone(),
            accepted.clone(),
        ));
        Proxy {
            addr,
            mode,
            delay_ms,
            accepted,
            task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` with its `host:port` replaced by this proxy's address, e.g. a
    /// PostgreSQL or Redis URL the daemon should use instead of the real one.
    pub fn url_for(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let user = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
        format!("{scheme}://{}{}{path}", user.unwrap_or_default(), self.addr)
    }

    /// Stops forwarding in both directions; connections stay open.
    pub fn pause(&self) {
        self.mode.send_replace(Mode::Paused);
    }

    /// Closes every connection and refuses new ones until [`Proxy::resume`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Forwards again.
    pub fn resume(&self) {
        self.mode.send_replace(Mode::Open);
    }

    /// Delays every forwarded chunk by `delay` (zero turns it off).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Connections accepted so far (including ones closed by a cut).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Cut);
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    delay_ms: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
) {
    while let Ok((client, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::Relaxed);
        if *mode.borrow() == Mode::Cut {
            drop(client); // refused: the "server" is gone
            continue;
        }
        let rx = mode.subscribe();
        let delay = delay_ms.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // Either direction ending (or a cut) ends the connection: the
            // other pump is dropped with this task and closes its halves.
            tokio::select! {
                _ = pump(client_read, server_write, rx.clone(), delay.clone()) => {}
                _ = pump(server_read, client_write, rx, delay) => {}
            }
        });
    }
}

/// Copies `from` to `to` while the link is open; returns when either side
/// closes or the link is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    delay_ms: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = wait_for(&mut mode, Mode::Cut) => return,
        };
        // Hold the chunk while paused; drop everything on a cut.
        loop {
            match *mode.borrow_and_update() {
                Mode::Open => break,
                Mode::Cut => return,
                Mode::Paused => {}
            }
            if mode.changed().await.is_err() {
                return;
            }
        }
        let delay = delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Completes when the mode becomes `wanted` (or the proxy is gone).
async fn wait_for(mode: &mut watch::Receiver<Mode>, wanted: Mode) {
    let _ = mode.wait_for(|m| *m == wanted).await;
}
