//! `GET /metrics`: Prometheus (OpenMetrics) text, from the `prometheus-client`
//! crate, the Prometheus project's own Rust client.
//!
//! Most numbers already exist as atomics in the core ([`HubStats`]), the store
//! writer and the connection semaphore, so they are read at scrape time by a
//! [`Collector`] rather than copied into metric objects on every message.
//! Only HTTP requests are counted here, by route and status.
//!
//! [`HubStats`]: crate::core::HubStats

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

use super::sessions::Sessions;
use crate::core::Hub;

/// The `Content-Type` of the answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type RequestLabels = [(&'static str, String); 2];

/// The registry and the HTTP adapter's own counters.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// 1 when the last health check of the bus passed, 0 when it failed.
    pub bus_up: Arc<AtomicU8>,
    /// 1 when the last health check of storage passed.
    pub store_up: Arc<AtomicU8>,
}

/// What the collector reads at scrape time.
pub struct Sources {
    /// The chat core.
    pub hub: Hub,
    /// HTTP sessions.
    pub sessions: Arc<Sessions>,
    /// The connection semaphore shared by both adapters.
    pub connections: Arc<Semaphore>,
    /// Its size.
    pub max_connections: usize,
    /// Open HTTP connections.
    pub http_connections: Arc<AtomicI64>,
    /// Open SSE streams.
    pub streams: Arc<AtomicI64>,
}

impl Metrics {
    /// A registry over `sources`.
    pub fn new(sources: Sources) -> Metrics {
        let mut registry = Registry::with_prefix("baby");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        let bus_up = Arc::new(AtomicU8::new(1));
        let store_up = Arc::new(AtomicU8::new(1));
        registry.register_collector(Box::new(Snapshot {
            sources,
            bus_up: bus_up.clone(),
            store_up: store_up.clone(),
        }));
        Metrics {
            registry,
            requests,
            bus_up,
            store_up,
        }
    }

    /// Counts one answered request. `route` is the route's pattern, never the
    /// raw path, so the number of series stays bounded.
    pub fn request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&[("route", route.to_owned()), ("status", status.to_string())])
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("metrics encode into a String");
        out
    }
}

struct Snapshot {
    sources: Sources,
    bus_up: Arc<AtomicU8>,
    store_up: Arc<AtomicU8>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let s = &self.sources;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

        let total = s
            .max_connections
            .saturating_sub(s.connections.available_permits()) as i64;
        let http = s.http_connections.load(Ordering::Relaxed).max(0);
        let g = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "connections",
            "Open connections, by adapter",
            None,
            g.metric_type(),
        )?;
        for (adapter, value) in [("tcp", (total - http).max(0)), ("http", http)] {
            ConstGauge::new(value).encode(family.encode_family(&[("adapter", adapter)])?)?;
        }

        let (sessions, rooms) = s.hub.counts();
        gauge(
            &mut encoder,
            "sessions",
            "Chat sessions on this instance (TCP and HTTP)",
            sessions as i64,
        )?;
        gauge(
            &mut encoder,
            "http_sessions",
            "HTTP sessions, with or without an open stream",
            s.sessions.len() as i64,
        )?;
        gauge(
            &mut encoder,
            "sse_streams",
            "Open Server-Sent Events streams",
            s.streams.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut encoder,
            "rooms",
            "Rooms with members on this instance",
            rooms as i64,
        )?;
        gauge(
            &mut encoder,
            "rooms_held",
            "Rooms held in memory, with or without members (idle ones are evicted)",
            s.hub.rooms_held() as i64,
        )?;
        // Where /proc exists: what the process costs, on the same page as
        // what it holds.
        if let Ok(sample) = crate::bench::procfs::Sample::read(std::process::id()) {
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory of this process",
                (sample.rss_kib * 1024) as i64,
            )?;
        }

        let stats = s.hub.stats();
        counter(
            &mut encoder,
            "messages_in",
            "Room messages accepted from local sessions",
            load(&stats.messages_in),
        )?;
        counter(
            &mut encoder,
            "events_out",
            "Room messages queued to local readers (one per recipient)",
            load(&stats.events_out),
        )?;
        counter(
            &mut encoder,
            "slow_consumers",
            "Sessions dropped because they did not read",
            load(&stats.slow_consumers),
        )?;

        if let Some(w) = s.hub.bus().writer_stats() {
            counter(
                &mut encoder,
                "store_write_batches",
                "Batches the store writer committed",
                load(&w.batches),
            )?;
            counter(
                &mut encoder,
                "store_written_messages",
                "Messages the store writer committed",
                load(&w.messages),
            )?;
            // Summed commit time: rate(seconds) / rate(batches) is the mean latency.
            let c = ConstCounter::new(load(&w.commit_micros) as f64 / 1e6);
            c.encode(encoder.encode_descriptor(
                "store_write_seconds",
                "Time spent committing batches (divide by batches for the mean)",
                None,
                c.metric_type(),
            )?)?;
            counter(
                &mut encoder,
                "store_write_failures",
                "Failed batch commits (each retried)",
                load(&w.failures),
            )?;
            counter(
                &mut encoder,
                "store_dropped_messages",
                "Messages not stored because the writer's queue was full",
                load(&w.dropped),
            )?;
        }

        gauge(
            &mut encoder,
            "store_up",
            "1 if storage answered the last health check",
            i64::from(self.store_up.load(Ordering::Relaxed)),
        )?;
        let g = ConstGauge::new(0i64);
        let mut bus = encoder.encode_descriptor(
            "bus_up",
            "1 if the bus answered the last health check, by bus kind",
            None,
            g.metric_type(),
        )?;
        ConstGauge::new(i64::from(self.bus_up.load(Ordering::Relaxed)))
            .encode(bus.encode_family(&[("bus", s.hub.bus().name())])?)?;
        Ok(())
    }
}
