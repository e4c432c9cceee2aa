//! What a workload reports: the result types (JSON with `--json`) and their
//! human tables.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::account::ErrorCounts;
use super::procfs::Sample;

/// Latency percentiles of one run, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Measured deliveries.
    pub samples: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Worst.
    pub max_ms: f64,
}

impl Latency {
    /// Percentiles of `nanos` through an HDR histogram (3 significant digits).
    pub fn of(nanos: &[u64]) -> Latency {
        // Bounds are constants that hdrhistogram accepts, so this cannot fail.
        let mut h = Histogram::<u64>::new_with_bounds(1_000, 3_600_000_000_000, 3)
            .expect("valid histogram bounds");
        for &n in nanos {
            h.saturating_record(n.max(1_000));
        }
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |v: u64| v as f64 / 1e6;
        Latency {
            samples: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// What the server spent during a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerUsage {
    /// Resident memory before the measured part, KiB.
    pub rss_before_kib: u64,
    /// Resident memory after it, KiB.
    pub rss_after_kib: u64,
    /// CPU time (user + system) spent meanwhile, ms.
    pub cpu_ms: u64,
    /// CPU time per delivery, microseconds.
    pub cpu_us_per_delivery: f64,
    /// Of it, user-space time (the server's own code); the rest is the
    /// kernel's, mostly the `send` calls.
    #[serde(default)]
    pub user_us_per_delivery: f64,
}

impl ServerUsage {
    /// The difference between two readings, spread over `deliveries`.
    pub fn between(before: Sample, after: Sample, deliveries: u64) -> ServerUsage {
        let cpu_ms = after.cpu_ms.saturating_sub(before.cpu_ms);
        let user_ms = after.user_ms.saturating_sub(before.user_ms);
        let per_delivery = |ms: u64| {
            if deliveries == 0 {
                0.0
            } else {
                ms as f64 * 1000.0 / deliveries as f64
            }
        };
        ServerUsage {
            rss_before_kib: before.rss_kib,
            rss_after_kib: after.rss_kib,
            cpu_ms,
            cpu_us_per_delivery: per_delivery(cpu_ms),
            user_us_per_delivery: per_delivery(user_ms),
        }
    }
}

/// The outcome of one load run (`fanout`, `rooms`, `cluster`, a `saturate` step).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadResult {
    /// Connections opened.
    pub connections: usize,
    /// Rooms used.
    pub rooms: usize,
    /// Sending connections.
    pub senders: usize,
    /// Offered aggregate rate, messages/s.
    pub rate: f64,
    /// Sending time, s.
    pub duration_s: f64,
    /// Messages sent.
    pub sent: u64,
    /// Deliveries that should have happened (each message times its room's receivers).
    pub expected: u64,
    /// Distinct deliveries that happened.
    pub delivered: u64,
    /// Expected deliveries that never came.
    pub lost: u64,
    /// Deliveries of a message a receiver already had.
    pub duplicates: u64,
    /// Error events the connections received.
    pub errors: ErrorCounts,
    /// Receivers that did not see every sender's end marker before the drain deadline.
    pub incomplete_receivers: u64,
    /// Distinct deliveries per second, over the sending window (or until the last arrival).
    pub deliveries_per_s: f64,
    /// Send-to-receive latency of every measured delivery.
    pub latency: Latency,
    /// With several targets: deliveries on the sender's own instance.
    pub latency_same_instance: Option<Latency>,
    /// With several targets: deliveries through the bus to another instance.
    pub latency_cross_instance: Option<Latency>,
    /// How far senders fell behind their schedule at worst, ms.
    pub send_lag_max_ms: f64,
    /// Time from the end of sending to the last arrival, ms.
    pub drain_ms: f64,
    /// The server's cost, with `--server-pid`.
    pub server: Option<ServerUsage>,
    /// The load generator's own CPU time meanwhile, ms: near the window's
    /// length, the generator was saturated and latency is partly its own.
    pub generator_cpu_ms: u64,
    /// Length of the measured window (first send to last arrival), ms.
    pub window_ms: f64,
    /// Receivers' socket reads that completed at least one measured message (TCP).
    #[serde(default)]
    pub reads: Option<u64>,
    /// Deliveries per such read: how many messages shared a server write
    /// (roughly: the kernel may join writes the reader had not read yet).
    #[serde(default)]
    pub deliveries_per_read: Option<f64>,
}

/// Memory per held-open connection (`idle`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IdleResult {
    /// Which kind of connection.
    pub transport: String,
    /// Connections held open.
    pub connections: usize,
    /// Server RSS before opening them, KiB.
    pub rss_before_kib: Option<u64>,
    /// Server RSS with all of them open, KiB.
    pub rss_after_kib: Option<u64>,
    /// The difference per connection, KiB.
    pub kib_per_connection: Option<f64>,
    /// Time to open them all, s.
    pub setup_s: f64,
}

/// One `saturate` search.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SaturateResult {
    /// The p99 bound a rate must meet, ms.
    pub p99_bound_ms: f64,
    /// The highest rate that met every condition, messages/s (0: none did).
    pub highest_sustained_rate: f64,
    /// Deliveries/s at that rate.
    pub highest_sustained_deliveries_per_s: f64,
    /// The highest rate that kept up (no loss, deliveries on time), whatever its latency.
    pub highest_rate_keeping_up: f64,
    /// Deliveries/s at that rate.
    pub highest_keeping_up_deliveries_per_s: f64,
    /// Why the search stopped.
    pub stopped_because: String,
    /// Every step, in order.
    pub steps: Vec<LoadResult>,
}

/// What one workload produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// `fanout`, `rooms`, `cluster`.
    Load(Box<LoadResult>),
    /// `idle`: one result per kind of connection.
    Idle {
        /// TCP, then SSE.
        results: Vec<IdleResult>,
    },
    /// `saturate`.
    Saturate(SaturateResult),
    /// `persist`: the Redis bus's persistence streams drained into the store.
    Persist(crate::bus::drain::DrainResult),
}

/// One benchmark report (one line of `--json` output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The workload's name.
    pub workload: String,
    /// A free label for grouping runs (`--label`).
    pub label: Option<String>,
    /// The poll interval the servers ran with, if given (`--poll-interval-ms`).
    pub poll_interval_ms: Option<u64>,
    /// The command line that produced it.
    pub command: String,
    /// The numbers.
    pub outcome: Outcome,
}

impl Report {
    /// The human table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "workload    {}", self.workload);
        if let Some(label) = &self.label {
            let _ = writeln!(out, "label       {label}");
        }
        match &self.outcome {
            Outcome::Load(r) => load_table(&mut out, r),
            Outcome::Persist(p) => {
                let _ = writeln!(
                    out,
                    "stored      {} messages over {} rooms by {} persister(s) in {:.2} s",
                    p.messages, p.rooms, p.persisters, p.seconds
                );
                let _ = writeln!(out, "rate        {:.0} messages/s", p.messages_per_s);
                let _ = writeln!(
                    out,
                    "commits     {} (mean {:.2} ms)",
                    p.batches, p.mean_commit_ms
                );
                let _ = writeln!(
                    out,
                    "redis       {:.3} commands per message stored",
                    p.redis_commands_per_message
                );
            }
            Outcome::Idle { results: rs } => {
                let _ = writeln!(
                    out,
                    "{:<6} {:>11} {:>14} {:>14} {:>12} {:>9}",
                    "kind", "connections", "rss before", "rss after", "KiB/conn", "setup s"
                );
                for r in rs {
                    let kib = |v: Option<u64>| v.map_or("-".into(), |v| format!("{v} KiB"));
                    let _ = writeln!(
                        out,
                        "{:<6} {:>11} {:>14} {:>14} {:>12} {:>9.1}",
                        r.transport,
                        r.connections,
                        kib(r.rss_before_kib),
                        kib(r.rss_after_kib),
                        r.kib_per_connection
                            .map_or("-".into(), |v| format!("{v:.2}")),
                        r.setup_s
                    );
                }
            }
            Outcome::Saturate(s) => {
                let _ = writeln!(
                    out,
                    "{:>9} {:>13} {:>9} {:>9} {:>9} {:>6} {:>8}",
                    "rate/s", "deliveries/s", "p50 ms", "p99 ms", "max ms", "lost", "lag ms"
                );
                for r in &s.steps {
                    let _ = writeln!(
                        out,
                        "{:>9.0} {:>13.0} {:>9.2} {:>9.2} {:>9.2} {:>6} {:>8.1}",
                        r.rate,
                        r.deliveries_per_s,
                        r.latency.p50_ms,
                        r.latency.p99_ms,
                        r.latency.max_ms,
                        r.lost,
                        r.send_lag_max_ms
                    );
                }
                let _ = writeln!(
                    out,
                    "highest sustained rate: {:.0} msg/s ({:.0} deliveries/s) with p99 < {} ms",
                    s.highest_sustained_rate, s.highest_sustained_deliveries_per_s, s.p99_bound_ms,
                );
                let _ = writeln!(
                    out,
                    "highest rate keeping up: {:.0} msg/s ({:.0} deliveries/s); stopped {}",
                    s.highest_rate_keeping_up,
                    s.highest_keeping_up_deliveries_per_s,
                    s.stopped_because
                );
            }
        }
        out
    }
}

fn load_table(out: &mut String, r: &LoadResult) {
    let _ = writeln!(
        out,
        "setup       {} connections, {} rooms, {} senders, {:.0} msg/s for {:.1} s",
        r.connections, r.rooms, r.senders, r.rate, r.duration_s
    );
    let _ = writeln!(
        out,
        "messages    {} sent, {} deliveries expected, {} delivered",
        r.sent, r.expected, r.delivered
    );
    let _ = writeln!(out, "throughput  {:.0} deliveries/s", r.deliveries_per_s);
    let lat = |name: &str, l: &Latency, out: &mut String| {
        let _ = writeln!(
            out,
            "{name:<11} p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} samples)",
            l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.samples
        );
    };
    lat("latency", &r.latency, out);
    if let Some(l) = &r.latency_same_instance {
        lat("  same", l, out);
    }
    if let Some(l) = &r.latency_cross_instance {
        lat("  cross", l, out);
    }
    let _ = writeln!(
        out,
        "losses      {} lost, {} duplicated, {} receivers incomplete",
        r.lost, r.duplicates, r.incomplete_receivers
    );
    let _ = writeln!(
        out,
        "errors      {} rate-limited, {} slow-consumer, {} other",
        r.errors.rate_limited, r.errors.slow_consumer, r.errors.other
    );
    let _ = writeln!(
        out,
        "senders     worst lag behind schedule {:.1} ms; drain after sending {:.1} ms",
        r.send_lag_max_ms, r.drain_ms
    );
    if let Some(per_read) = r.deliveries_per_read {
        let _ = writeln!(
            out,
            "reads       {} by receivers, {per_read:.2} deliveries per read",
            r.reads.unwrap_or(0)
        );
    }
    let _ = writeln!(
        out,
        "generator   CPU {} ms over a {:.0} ms window",
        r.generator_cpu_ms, r.window_ms
    );
    if let Some(s) = &r.server {
        let _ = writeln!(
            out,
            "server      RSS {} -> {} KiB, CPU {} ms, {:.2} µs CPU per delivery ({:.2} user + {:.2} system)",
            s.rss_before_kib,
            s.rss_after_kib,
            s.cpu_ms,
            s.cpu_us_per_delivery,
            s.user_us_per_delivery,
            s.cpu_us_per_delivery - s.user_us_per_delivery
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let nanos: Vec<u64> = (1..=1000).map(|i| i * 1_000_000).collect();
        let l = Latency::of(&nanos);
        assert_eq!(l.samples, 1000);
        assert!((l.p50_ms - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_ms - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max_ms - 1000.0).abs() < 1.0, "{l:?}");
        assert_eq!(Latency::of(&[]), Latency::default());
    }

    #[test]
    fn a_report_survives_json() {
        let report = Report {
            workload: "fanout".into(),
            label: Some("x".into()),
            poll_interval_ms: None,
            command: "baby-discord bench fanout".into(),
            outcome: Outcome::Load(Box::default()),
        };
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report);
        assert!(report.table().contains("deliveries/s"));
        let idle = Report {
            outcome: Outcome::Idle {
                results: vec![IdleResult::default()],
            },
            ..report
        };
        let json = serde_json::to_string(&idle).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), idle);
    }
}
