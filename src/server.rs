//! Wires the core to its store, bus and adapters, and runs until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::adapters::http::HttpAdapter;
use crate::adapters::peers::Peers;
use crate::adapters::tcp::TcpAdapter;
use crate::bus::{self, Bus};
use crate::config::Config;
use crate::core::Hub;
use crate::fds;
use crate::store::{self, Store};

/// How long connections get to say goodbye on shutdown.
const DRAIN: Duration = Duration::from_secs(5);
/// How long the store writer gets to flush on shutdown.
const FLUSH: Duration = Duration::from_secs(10);

/// A daemon whose listeners are bound, ready to [`Server::run`].
pub struct Server {
    config: Config,
    hub: Hub,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    tcp: TcpListener,
    http: TcpListener,
}

impl Server {
    /// Opens the store and bus and binds both listeners.
    pub async fn bind(mut config: Config) -> anyhow::Result<Server> {
        config.max_conns = fds::fit_max_conns(config.max_conns);
        let store = store::open(&config.db, config.durability)
            .await
            .with_context(|| format!("could not open the database {}", config.db))?;
        let instance = config.instance_name();
        let bus = bus::open(
            &config.bus,
            bus::BusOptions {
                store: store.clone(),
                db_url: &config.db,
                durability: config.durability,
                instance: &instance,
                poll_interval: Duration::from_millis(config.poll_interval),
                cluster: &config.cluster,
            },
        )
        .await
        .context("could not start the bus")?;
        // The hub reads history through the bus: it may hold messages that
        // storage has not caught up with yet.
        let history = bus.history(store.clone());
        let hub = Hub::new(instance, config.limits(), history, bus.clone());
        let tcp = TcpListener::bind(config.tcp).await.with_context(|| {
            format!(
                "could not listen for TCP on {} (is another daemon running?)",
                config.tcp
            )
        })?;
        let http = TcpListener::bind(config.http).await.with_context(|| {
            format!(
                "could not listen for HTTP on {} (is another daemon running?)",
                config.http
            )
        })?;
        Ok(Server {
            config,
            hub,
            store,
            bus,
            tcp,
            http,
        })
    }

    /// The bound TCP address (the real port when 0 was asked).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes, then stops gracefully: no new
    /// connections, every session told, the store writer flushed. Stops the
    /// same way, and returns the error, if the bus finds that another
    /// instance took this one's name over while it was away.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (tcp_addr, http_addr) = (self.tcp_addr(), self.http_addr());
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let connections = Arc::new(Semaphore::new(self.config.max_conns as usize));
        let peers = Peers::new(self.config.peer_limits());

        self.bus.start(Arc::new(self.hub.clone()));
        let tcp = TcpAdapter {
            hub: self.hub.clone(),
            max_line: self.config.max_line as usize,
            connections: connections.clone(),
            peers: peers.clone(),
            shutdown: token.clone(),
            tracker: tracker.clone(),
        };
        let http = HttpAdapter {
            hub: self.hub.clone(),
            connections,
            peers,
            max_connections: self.config.max_conns as usize,
            shutdown: token.clone(),
            tracker: tracker.clone(),
            header_timeout: self.config.header_timeout(),
            max_body: self.config.max_body as usize,
            session_linger: Duration::from_secs(self.config.session_linger),
            sse_ping: Duration::from_secs(self.config.sse_ping),
        };
        tracker.spawn(
            self.hub
                .clone()
                .sweep_rooms(Duration::from_secs(self.config.room_idle), token.clone()),
        );
        tracker.spawn(tcp.serve(self.tcp));
        tracker.spawn(http.serve(self.http));
        tracing::info!(
            instance = self.hub.instance(),
            db = self.store.engine(),
            bus = self.bus.name(),
            "listening tcp={tcp_addr} http={http_addr}"
        );

        let started = std::time::Instant::now();
        // Stopped by a signal, or by the bus: an instance whose name another
        // took over while it was away must not serve on (see the README).
        let halted = tokio::select! {
            () = shutdown => None,
            why = self.hub.halted() => Some(why),
        };
        tracing::info!("shutting down");
        if let Some(statements) = self.bus.statements() {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                statements,
                per_second = format!("{:.1}", statements as f64 / secs.max(0.001)),
                "the {} bus's statements to the shared database over {secs:.1} s",
                self.bus.name()
            );
        }
        token.cancel();
        self.hub.shutdown();
        tracker.close();
        if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
            tracing::warn!("some connections did not close in time");
        }
        if tokio::time::timeout(FLUSH, self.bus.close()).await.is_err() {
            tracing::error!("the store writer did not flush in time; recent messages may be lost");
        }
        self.store.close().await;
        tracing::info!("stopped");
        match halted {
            None => Ok(()),
            Some(why) => Err(anyhow::anyhow!(why)),
        }
    }
}
