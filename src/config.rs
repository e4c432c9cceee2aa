//! The command line: every flag is also an environment variable (PROTOCOL.md,
//! "Command line" and "Limits").

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::adapters::peers::PeerLimits;
use crate::bus::BusSpec;
use crate::core::Limits;
use crate::store::Durability;

/// A chat daemon you can reach with `nc localhost 9001` and a browser.
#[derive(Debug, Parser)]
#[command(
    name = "baby-discord",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to run; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Sub>,
    /// The daemon's settings when no subcommand is given.
    #[command(flatten)]
    pub serve: Config,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Run the chat daemon (the default).
    Serve(Config),
    /// Load-test a running daemon (see docs/benchmarks.md).
    Bench(crate::bench::BenchArgs),
}

/// What the binary was asked to do, with its settings.
#[derive(Debug)]
pub enum Action {
    /// Run the daemon.
    Serve(Config),
    /// Run the load generator.
    Bench(crate::bench::BenchArgs),
}

impl Cli {
    /// The command line's meaning. `serve` with flags and flags alone mean the
    /// same: only one of the two carries settings, so take that one.
    pub fn into_action(self) -> Action {
        match self.command {
            Some(Sub::Serve(config)) => Action::Serve(config),
            Some(Sub::Bench(args)) => Action::Bench(args),
            None => Action::Serve(self.serve),
        }
    }
}

/// `--bus` help, in one place: says what is built today.
const BUS_HELP: &str = "How instances are connected: local (one instance), poll (through the \
database), or redis://HOST:PORT[/DB] (also valkey://, rediss://, \
redis-cluster://HOST:PORT?node=HOST:PORT)";

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// For people.
    Human,
    /// One JSON object per line, for machines.
    Json,
}

/// The daemon's settings.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address of the line-based TCP adapter (port 0 picks a free port).
    #[arg(long, env = "BABY_TCP", default_value = "127.0.0.1:9001")]
    pub tcp: SocketAddr,

    /// Address of the HTTP adapter (port 0 picks a free port).
    #[arg(long, env = "BABY_HTTP", default_value = "127.0.0.1:3001")]
    pub http: SocketAddr,

    /// Database URL: sqlite://FILE (created if missing) or postgres://...
    #[arg(long, env = "BABY_DB", default_value = "sqlite://baby-discord.db")]
    pub db: String,

    #[arg(long, env = "BABY_BUS", default_value = "local", value_parser = parse_bus, help = BUS_HELP)]
    pub bus: BusSpec,

    /// This instance's name (default: a random id of 8 hex digits).
    #[arg(long, env = "BABY_INSTANCE")]
    pub instance: Option<String>,

    /// Namespace of the bus's keys and channels, so clusters can share one Redis.
    #[arg(long, env = "BABY_CLUSTER", default_value = "baby-discord")]
    pub cluster: String,

    /// async: deliver, then store in batches; sync: store, then deliver.
    #[arg(long, env = "BABY_DURABILITY", value_enum, default_value = "async")]
    pub durability: Durability,

    /// Longest TCP line, in bytes.
    #[arg(long, env = "BABY_MAX_LINE", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(16..))]
    pub max_line: u32,

    /// Longest message text, in characters.
    #[arg(long, env = "BABY_MAX_TEXT", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_text: u32,

    /// Largest HTTP request body, in bytes.
    #[arg(long, env = "BABY_MAX_BODY", default_value_t = 65536)]
    pub max_body: u32,

    /// Messages per second per session (0 turns rate limiting off).
    #[arg(long, env = "BABY_RATE", default_value_t = 10)]
    pub rate: u32,

    /// Messages a session may send in a burst.
    #[arg(long, env = "BABY_BURST", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub burst: u32,

    /// `/nick`, `/join` and `/leave` per second per session (0 turns this limit off).
    #[arg(long, env = "BABY_COMMAND_RATE", default_value_t = 2)]
    pub command_rate: u32,

    /// `/nick`, `/join` and `/leave` a session may send in a burst.
    #[arg(long, env = "BABY_COMMAND_BURST", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub command_burst: u32,

    /// Events queued per connection before it is dropped as a slow consumer.
    #[arg(long, env = "BABY_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue: u32,

    /// Connections per instance, TCP and HTTP together.
    #[arg(long, env = "BABY_MAX_CONNS", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_conns: u32,

    /// Connections per client address (IPv6: per /64), TCP and HTTP together.
    #[arg(long, env = "BABY_MAX_CONNS_PER_ADDR", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_conns_per_addr: u32,

    /// New HTTP sessions (`POST /connect`) per second per client address (0 turns this limit off).
    #[arg(long, env = "BABY_CONNECT_RATE", default_value_t = 5)]
    pub connect_rate: u32,

    /// New HTTP sessions a client address may open in a burst.
    #[arg(long, env = "BABY_CONNECT_BURST", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub connect_burst: u32,

    /// Whether loopback clients escape the per-address limits (benchmarks, a local reverse proxy).
    #[arg(long, env = "BABY_EXEMPT_LOOPBACK", default_value_t = true, action = clap::ArgAction::Set)]
    pub exempt_loopback: bool,

    /// Seconds an HTTP connection may take to send a request head (also when it sends nothing).
    #[arg(long, env = "BABY_HEADER_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout: u64,

    /// How often the poll bus reads the database for other instances' messages (ms).
    #[arg(long, env = "BABY_POLL_INTERVAL", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub poll_interval: u64,

    /// Seconds an HTTP session outlives its dropped event stream (its events queue meanwhile).
    #[arg(long, env = "BABY_SESSION_LINGER", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub session_linger: u64,

    /// Seconds between `: ping` comments on idle SSE streams.
    #[arg(long, env = "BABY_SSE_PING", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub sse_ping: u64,

    /// Seconds a room with no member and no reader is kept before it is
    /// evicted from memory (its messages stay in storage).
    #[arg(long, env = "BABY_ROOM_IDLE", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub room_idle: u64,

    /// Log format (filter with RUST_LOG, e.g. RUST_LOG=baby_discord=debug).
    #[arg(long, env = "BABY_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,
}

fn parse_bus(s: &str) -> Result<BusSpec, String> {
    s.parse()
}

impl Config {
    /// The limits the core enforces.
    pub fn limits(&self) -> Limits {
        Limits {
            max_text: self.max_text as usize,
            rate: self.rate,
            burst: self.burst,
            command_rate: self.command_rate,
            command_burst: self.command_burst,
            queue: self.queue as usize,
        }
    }

    /// The instance name, or a fresh random one: 32 bits, so that two
    /// instances of one cluster practically never draw the same (the second
    /// would refuse to start; see `BusError::NameTaken`).
    pub fn instance_name(&self) -> String {
        self.instance
            .clone()
            .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()))
    }

    /// How long an HTTP request head may take to arrive.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout)
    }

    /// The limits per client address.
    pub fn peer_limits(&self) -> PeerLimits {
        PeerLimits {
            max_conns: self.max_conns_per_addr as usize,
            connect_rate: self.connect_rate,
            connect_burst: self.connect_burst,
            exempt_loopback: self.exempt_loopback,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn config(argv: &[&str]) -> Config {
        match Cli::try_parse_from(argv).unwrap().into_action() {
            Action::Serve(config) => config,
            Action::Bench(_) => panic!("{argv:?} is not serve"),
        }
    }

    #[test]
    fn defaults_match_the_protocol() {
        let config = config(&["baby-discord"]);
        assert_eq!(config.tcp.to_string(), "127.0.0.1:9001");
        assert_eq!(config.http.to_string(), "127.0.0.1:3001");
        assert_eq!(config.db, "sqlite://baby-discord.db");
        assert_eq!(config.bus, BusSpec::Local);
        assert_eq!(config.cluster, "baby-discord");
        assert_eq!(config.durability, Durability::Async);
        assert_eq!(
            (config.max_line, config.max_text, config.max_body),
            (4096, 2000, 65536)
        );
        assert_eq!((config.rate, config.burst, config.queue), (10, 20, 1024));
        assert_eq!((config.command_rate, config.command_burst), (2, 5));
        assert_eq!(config.max_conns_per_addr, 256);
        assert_eq!((config.connect_rate, config.connect_burst), (5, 20));
        assert!(config.exempt_loopback);
        assert_eq!(config.header_timeout(), Duration::from_secs(10));
        assert_eq!(config.max_conns, 100_000);
    }

    #[test]
    fn serve_subcommand_takes_the_same_flags() {
        let config = config(&[
            "baby-discord",
            "serve",
            "--tcp",
            "127.0.0.1:0",
            "--rate",
            "0",
        ]);
        assert_eq!(config.tcp.port(), 0);
        assert_eq!(config.rate, 0);
    }

    #[test]
    fn help_names_every_bus() {
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("redis://HOST:PORT[/DB]"), "{help}");
    }

    #[test]
    fn the_loopback_exemption_can_be_turned_off() {
        let config = config(&["baby-discord", "--exempt-loopback", "false"]);
        assert!(!config.peer_limits().exempt_loopback);
    }

    #[test]
    fn redis_and_valkey_urls_name_the_redis_bus() {
        for url in [
            "redis://127.0.0.1:6379/2",
            "valkey://valkey:6379",
            "rediss://h:6380",
        ] {
            let config = config(&["baby-discord", "--bus", url]);
            assert_eq!(config.bus, BusSpec::Redis(url.to_owned()));
        }
    }

    #[test]
    fn unknown_bus_is_refused_clearly() {
        let err = Cli::try_parse_from(["baby-discord", "--bus", "carrier-pigeon"]).unwrap_err();
        assert!(err.to_string().contains("unknown bus"), "{err}");
    }
}
