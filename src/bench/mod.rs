//! `baby-discord bench`: a load generator that speaks the real protocols (TCP
//! text and JSON lines, SSE for receivers) and reports deliveries/s, latency
//! percentiles, losses, duplicates and, given the server's PID, its memory and
//! CPU per delivery.
//!
//! - [`payload`]: the stamped message text; [`account`]: what a receiver saw.
//! - [`conn`] and [`sse`]: one connection, ready to measure.
//! - [`load`]: the fan-out engine (`fanout`, `rooms`, `cluster`); [`saturate`]
//!   and [`idle`]: the other workloads; [`procfs`]: the server's cost.
//! - [`report`]: results, tables, JSON; [`summary`]: medians, markdown, chart.
//!
//! The server's limits apply to the load generator as to anyone
//! (PROTOCOL.md, "Limits"): by default a session may send 10 messages/s
//! (bursts of 20), so a workload uses enough senders to stay at 5/s each
//! unless `--senders` says otherwise; a higher rate per sender needs a server
//! started with `--rate 0`.

pub mod account;
pub mod conn;
pub mod idle;
pub mod load;
pub mod payload;
pub mod procfs;
pub mod report;
pub mod saturate;
pub mod sse;
pub mod summary;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use conn::Rendering;
use load::{Plan, RoomPlan, Transport};
use report::{Outcome, Report};

/// A sender's default pace, messages/s: half the server's default limit.
pub const SENDER_PACE: f64 = 5.0;
/// The server's default per-session rate (PROTOCOL.md, "Limits").
pub const SERVER_DEFAULT_RATE: f64 = 10.0;

/// `baby-discord bench ...`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which workload.
    #[command(subcommand)]
    pub workload: Workload,
}

/// The workloads.
#[derive(Debug, Subcommand)]
pub enum Workload {
    /// M members in one room, S senders at an aggregate rate R for D seconds.
    Fanout(FanoutArgs),
    /// Many small rooms (e.g. 10,000 clients in 1,000 rooms) at a steady rate.
    Rooms(RoomsArgs),
    /// N connections held open, for memory per connection (needs --server-pid).
    Idle(IdleArgs),
    /// Raise the rate until p99 passes a bound or deliveries fall behind.
    Saturate(SaturateArgs),
    /// Fan-out with members spread over several instances (--target given several times).
    Cluster(FanoutArgs),
    /// Persistence on the Redis bus alone: a backlog in the partition
    /// streams, drained into the database by real persisters.
    Persist(PersistArgs),
    /// Medians of JSON results as markdown tables, and an SVG chart.
    Report(ReportArgs),
}

/// Where to connect and what to report, for every workload.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// TCP address of an instance; give it several times for a cluster.
    #[arg(long = "target", default_value = "127.0.0.1:9001")]
    pub targets: Vec<SocketAddr>,
    /// HTTP address of an instance, for SSE receivers; same order as --target.
    #[arg(long = "http-target", default_value = "127.0.0.1:3001")]
    pub http_targets: Vec<SocketAddr>,
    /// PID of a server process, to report its RSS and CPU time (several for a cluster).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A label stored in the JSON, to group runs in `bench report`.
    #[arg(long)]
    pub label: Option<String>,
    /// The poll interval the servers were started with, stored in the JSON for the chart.
    #[arg(long)]
    pub poll_interval_ms: Option<u64>,
    /// Connections opened at once while setting up.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
}

/// How messages flow, for the load workloads.
#[derive(Debug, Clone, Args)]
pub struct Traffic {
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Bytes per message text (at least the stamp, about 40 bytes).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// How receivers connect: tcp, sse (HTTP sessions; senders stay on TCP),
    /// sse-peer (another SSE hub, for a baseline: see bench/node-sse), or irc
    /// (an IRC server, for a baseline: see bench/ngircd; senders too).
    #[arg(long, value_enum, default_value = "tcp")]
    pub receivers: Transport,
    /// How TCP connections render events.
    #[arg(long, value_enum, default_value = "json")]
    pub format: Rendering,
    /// Seconds to wait for the last deliveries once sending stops.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// Room name prefix (a random suffix keeps runs apart).
    #[arg(long, default_value = "bench")]
    pub room: String,
}

/// `fanout` and `cluster`.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub traffic: Traffic,
    /// Members of the room (receivers).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Sending members (default: enough to send at 5 messages/s each).
    #[arg(long)]
    pub senders: Option<usize>,
    /// Aggregate messages per second.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
}

/// `rooms`.
#[derive(Debug, Clone, Args)]
pub struct RoomsArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub traffic: Traffic,
    /// Clients in all, spread evenly over the rooms.
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,
    /// Rooms.
    #[arg(long, default_value_t = 1_000)]
    pub rooms: usize,
    /// Senders in each room.
    #[arg(long, default_value_t = 1)]
    pub senders_per_room: usize,
    /// Aggregate messages per second over all rooms.
    #[arg(long, default_value_t = 1_000.0)]
    pub rate: f64,
}

/// `idle`.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// TCP connections to hold open.
    #[arg(long = "tcp", default_value_t = 1_000)]
    pub tcp: usize,
    /// The TCP connections are IRC clients, registered and in no channel
    /// (a baseline server: see bench/ngircd).
    #[arg(long)]
    pub irc: bool,
    /// SSE connections to hold open (after the TCP ones).
    #[arg(long = "sse", default_value_t = 0)]
    pub sse: usize,
    /// Seconds to keep them open after measuring.
    #[arg(long, default_value_t = 1.0)]
    pub hold: f64,
}

/// `saturate`.
#[derive(Debug, Clone, Args)]
pub struct SaturateArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub traffic: Traffic,
    /// Members of the room.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Senders (each may go over the server's default rate: run the server with --rate 0).
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// First rate, messages/s.
    #[arg(long, default_value_t = 50.0)]
    pub start: f64,
    /// Each next rate is the previous times this.
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    /// Highest rate to try.
    #[arg(long, default_value_t = 100_000.0)]
    pub max_rate: f64,
    /// p99 latency bound, ms: the highest rate within it is reported.
    #[arg(long, default_value_t = 5.0)]
    pub p99_ms: f64,
    /// Stop raising the rate once p99 passes this, ms.
    #[arg(long, default_value_t = 500.0)]
    pub give_up_p99_ms: f64,
}

/// `persist`.
#[derive(Debug, Clone, Args)]
pub struct PersistArgs {
    /// The Redis to fill (a fresh random `--cluster` name keeps the run apart).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// The database to store into (an empty one: the run adds its rows).
    #[arg(long)]
    pub db: String,
    /// Messages in the backlog.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Rooms they are spread over.
    #[arg(long, default_value_t = 100)]
    pub rooms: u32,
    /// Persisters draining at once (instances of one cluster).
    #[arg(long, default_value_t = 1)]
    pub persisters: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A label stored in the JSON.
    #[arg(long)]
    pub label: Option<String>,
}

/// `report`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// JSON result files (one report per line, as `--json` prints them).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Where to draw the chart (SVG).
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

/// Runs a `bench` subcommand.
pub async fn main(args: BenchArgs) -> anyhow::Result<()> {
    let (common, outcome, workload) = match args.workload {
        Workload::Report(r) => return summary::main(&r),
        Workload::Persist(p) => return persist(p).await,
        Workload::Fanout(f) => {
            let plan = fanout_plan(&f)?;
            (
                f.common,
                Outcome::Load(Box::new(load::run(&plan).await?)),
                "fanout",
            )
        }
        Workload::Cluster(f) => {
            anyhow::ensure!(
                f.common.targets.len() >= 2,
                "cluster needs --target given once per instance (at least two)"
            );
            let plan = fanout_plan(&f)?;
            (
                f.common,
                Outcome::Load(Box::new(load::run(&plan).await?)),
                "cluster",
            )
        }
        Workload::Rooms(r) => {
            let plan = rooms_plan(&r)?;
            (
                r.common,
                Outcome::Load(Box::new(load::run(&plan).await?)),
                "rooms",
            )
        }
        Workload::Idle(i) => {
            raise_fd_limit(i.tcp + i.sse)?;
            let plan = idle::IdlePlan {
                targets: i.common.targets.clone(),
                http_targets: i.common.http_targets.clone(),
                tcp: i.tcp,
                irc: i.irc,
                sse: i.sse,
                concurrency: i.common.concurrency,
                hold: Duration::from_secs_f64(i.hold),
                server_pids: i.common.server_pids.clone(),
            };
            (
                i.common,
                Outcome::Idle {
                    results: idle::run(&plan).await?,
                },
                "idle",
            )
        }
        Workload::Saturate(s) => {
            let f = FanoutArgs {
                common: s.common.clone(),
                traffic: s.traffic.clone(),
                members: s.members,
                senders: Some(s.senders),
                rate: s.start,
            };
            let plan = fanout_plan(&f)?;
            let search = saturate::Search {
                start: s.start,
                factor: s.factor,
                max_rate: s.max_rate,
                p99_bound_ms: s.p99_ms,
                give_up_p99_ms: s.give_up_p99_ms,
            };
            let result = saturate::run(&plan, &search).await?;
            (s.common, Outcome::Saturate(result), "saturate")
        }
    };
    let report = Report {
        workload: workload.to_owned(),
        label: common.label.clone(),
        poll_interval_ms: common.poll_interval_ms,
        command: command_line(),
        outcome,
    };
    if common.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// `bench persist`: one drain, reported like the other workloads.
async fn persist(p: PersistArgs) -> anyhow::Result<()> {
    let store = crate::store::open(&p.db, crate::store::Durability::Async).await?;
    let cluster = format!("bench-persist-{:08x}", rand::random::<u32>());
    let result = crate::bus::drain::run(
        &p.redis,
        &cluster,
        store.clone(),
        p.messages,
        p.rooms,
        p.persisters,
    )
    .await?;
    store.close().await;
    let report = Report {
        workload: "persist".to_owned(),
        label: p.label,
        poll_interval_ms: None,
        command: command_line(),
        outcome: Outcome::Persist(result),
    };
    if p.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// The plan of `fanout`, `cluster` and each `saturate` step.
pub fn fanout_plan(f: &FanoutArgs) -> anyhow::Result<Plan> {
    anyhow::ensure!(f.members > 0, "--members must be at least 1");
    let senders = f
        .senders
        .unwrap_or_else(|| (f.rate / SENDER_PACE).ceil() as usize)
        .clamp(1, f.members);
    warn_if_over_limit(f.rate / senders as f64);
    let rooms = vec![RoomPlan {
        name: room_name(&f.traffic.room, None),
        members: f.members,
        senders,
    }];
    plan(
        &f.common,
        &f.traffic,
        rooms,
        f.rate,
        1 + f.members + senders,
    )
}

fn rooms_plan(r: &RoomsArgs) -> anyhow::Result<Plan> {
    anyhow::ensure!(
        r.rooms > 0 && r.clients >= r.rooms,
        "--clients must be at least --rooms, and --rooms at least 1"
    );
    let senders = r.senders_per_room.max(1);
    warn_if_over_limit(r.rate / (senders * r.rooms) as f64);
    let suffix: u32 = rand::random();
    let rooms = (0..r.rooms)
        .map(|i| RoomPlan {
            name: room_name(&r.traffic.room, Some((suffix, i))),
            members: r.clients / r.rooms + usize::from(i < r.clients % r.rooms),
            senders,
        })
        .collect();
    let conns = r.clients + r.rooms * senders;
    plan(&r.common, &r.traffic, rooms, r.rate, conns)
}

fn plan(
    common: &Common,
    traffic: &Traffic,
    rooms: Vec<RoomPlan>,
    rate: f64,
    connections: usize,
) -> anyhow::Result<Plan> {
    raise_fd_limit(connections)?;
    anyhow::ensure!(traffic.duration > 0.0, "--duration must be above 0");
    Ok(Plan {
        rooms,
        rate,
        duration: Duration::from_secs_f64(traffic.duration),
        size: traffic.size,
        transport: traffic.receivers,
        rendering: traffic.format,
        targets: common.targets.clone(),
        http_targets: common.http_targets.clone(),
        concurrency: common.concurrency,
        drain: Duration::from_secs_f64(traffic.drain),
        server_pids: common.server_pids.clone(),
    })
}

fn room_name(prefix: &str, index: Option<(u32, usize)>) -> String {
    match index {
        Some((suffix, i)) => format!("{prefix}-{suffix:08x}-{i}"),
        None => format!("{prefix}-{:08x}", rand::random::<u32>()),
    }
}

fn warn_if_over_limit(per_sender: f64) {
    if per_sender > SERVER_DEFAULT_RATE {
        eprintln!(
            "note: each sender sends {per_sender:.1} messages/s, over the server's default \
             limit of {SERVER_DEFAULT_RATE}/s: start the server with --rate 0 (or a higher \
             --rate), or use more --senders"
        );
    }
}

/// Makes room for `wanted` descriptors, raising the soft limit to the hard one.
fn raise_fd_limit(wanted: usize) -> anyhow::Result<()> {
    let limit = rlimit::increase_nofile_limit(u64::MAX)?;
    anyhow::ensure!(
        limit as usize >= wanted + 64,
        "this workload needs about {wanted} file descriptors but the limit is {limit}: \
         raise it (ulimit -n) and try again"
    );
    Ok(())
}

/// The command line as typed, with the program called by its name.
fn command_line() -> String {
    let mut words = vec!["baby-discord".to_owned()];
    words.extend(std::env::args().skip(1));
    words.join(" ")
}
