//! `idle`: hold N connections open and read the server's memory before and
//! after, for the cost of one quiet connection (TCP, then SSE).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};

use super::conn::{IrcClient, READY_TIMEOUT, TcpClient};
use super::load::sample;
use super::report::IdleResult;
use super::sse::SseClient;

/// What `idle` needs.
#[derive(Debug, Clone)]
pub struct IdlePlan {
    /// TCP addresses, used in turn.
    pub targets: Vec<SocketAddr>,
    /// HTTP addresses, used in turn.
    pub http_targets: Vec<SocketAddr>,
    /// TCP connections to hold.
    pub tcp: usize,
    /// Whether the TCP connections are IRC clients (a baseline server).
    pub irc: bool,
    /// SSE connections to hold.
    pub sse: usize,
    /// Connections opened at once.
    pub concurrency: usize,
    /// How long to keep them all open after the last reading.
    pub hold: Duration,
    /// Server processes to measure.
    pub server_pids: Vec<u32>,
}

/// Opens the TCP connections, then the SSE ones, measuring each batch.
pub async fn run(plan: &IdlePlan) -> anyhow::Result<Vec<IdleResult>> {
    let mut results = Vec::new();
    let mut held_tcp = Vec::new();
    let mut held_sse = Vec::new();
    if plan.tcp > 0 {
        anyhow::ensure!(!plan.targets.is_empty(), "no --target for TCP connections");
        let before = sample(&plan.server_pids)?;
        let started = Instant::now();
        held_tcp = futures::stream::iter(0..plan.tcp)
            .map(|i| {
                let addr = plan.targets[i % plan.targets.len()];
                ready(async move {
                    // Held for their sockets: dropping either half closes it.
                    anyhow::Ok(if plan.irc {
                        let c = IrcClient::connect(addr).await?;
                        (c.reader, c.writer)
                    } else {
                        let c = TcpClient::connect(addr).await?;
                        (c.reader, c.writer)
                    })
                })
            })
            .buffer_unordered(plan.concurrency.max(1))
            .try_collect::<Vec<_>>()
            .await?;
        let setup_s = started.elapsed().as_secs_f64();
        let after = sample(&plan.server_pids)?;
        results.push(result("tcp", plan.tcp, before, after, setup_s));
    }
    if plan.sse > 0 {
        anyhow::ensure!(!plan.http_targets.is_empty(), "no --http-target for SSE");
        let before = sample(&plan.server_pids)?;
        let started = Instant::now();
        held_sse = futures::stream::iter(0..plan.sse)
            .map(|i| {
                let addr = plan.http_targets[i % plan.http_targets.len()];
                ready(SseClient::connect(addr))
            })
            .buffer_unordered(plan.concurrency.max(1))
            .try_collect::<Vec<_>>()
            .await?;
        let setup_s = started.elapsed().as_secs_f64();
        let after = sample(&plan.server_pids)?;
        results.push(result("sse", plan.sse, before, after, setup_s));
    }
    tokio::time::sleep(plan.hold).await;
    drop((held_tcp, held_sse));
    Ok(results)
}

async fn ready<T>(
    connecting: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(READY_TIMEOUT, connecting)
        .await
        .context("a connection was not ready in time")?
}

fn result(
    transport: &str,
    connections: usize,
    before: Option<super::procfs::Sample>,
    after: Option<super::procfs::Sample>,
    setup_s: f64,
) -> IdleResult {
    let per = match (before, after) {
        (Some(b), Some(a)) if connections > 0 => {
            Some((a.rss_kib as f64 - b.rss_kib as f64) / connections as f64)
        }
        _ => None,
    };
    IdleResult {
        transport: transport.to_owned(),
        connections,
        rss_before_kib: before.map(|s| s.rss_kib),
        rss_after_kib: after.map(|s| s.rss_kib),
        kib_per_connection: per,
        setup_s,
    }
}
