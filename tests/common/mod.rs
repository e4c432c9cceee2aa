//! Test harness: starts the real `baby-discord` binary on port 0 and talks to
//! it over real sockets.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod http;
pub mod proxy;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};

/// How long any single expected event may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running daemon. Killed when dropped.
pub struct Daemon {
    child: Child,
    /// TCP adapter address.
    pub tcp: SocketAddr,
    /// HTTP adapter address.
    pub http: SocketAddr,
    /// Everything the daemon logged, for failure messages.
    pub log: Arc<Mutex<Vec<String>>>,
}

/// A fresh directory for a test's database.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

/// An SQLite URL for a file in `dir`.
pub fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("chat.db").display())
}

impl Daemon {
    /// Starts a daemon on free ports with `args` (which should include `--db`).
    /// Its log filter is `BABY_TEST_LOG` (default `info`), e.g.
    /// `BABY_TEST_LOG=info,fred=trace` to see a daemon's Redis traffic.
    /// A `--tcp` or `--http` in `args` replaces the free port (a restart on
    /// the same address).
    pub async fn start(args: &[&str]) -> Daemon {
        Daemon::start_env(args, &[]).await
    }

    /// [`Daemon::start`], with `env` added to the daemon's environment.
    pub async fn start_env(args: &[&str], env: &[(&str, String)]) -> Daemon {
        let mut argv = Vec::new();
        for flag in ["--tcp", "--http"] {
            if !args.contains(&flag) {
                argv.extend([flag, "127.0.0.1:0"]);
            }
        }
        argv.extend_from_slice(args);
        Daemon::start_argv_env(&argv, env).await
    }

    /// Starts a daemon with exactly the command line `argv` (after the program
    /// name), which must pick free ports itself.
    pub async fn start_argv(argv: &[&str]) -> Daemon {
        Daemon::start_argv_env(argv, &[]).await
    }

    async fn start_argv_env(argv: &[&str], env: &[(&str, String)]) -> Daemon {
        Daemon::try_start_argv_env(argv, env)
            .await
            .unwrap_or_else(|log| panic!("daemon did not start: {log}"))
    }

    /// [`Daemon::start`], or what the daemon logged if it exited (or did not
    /// serve within 30 s) instead.
    pub async fn try_start(args: &[&str]) -> Result<Daemon, String> {
        let mut argv = vec!["--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0"];
        argv.extend_from_slice(args);
        Daemon::try_start_argv_env(&argv, &[]).await
    }

    async fn try_start_argv_env(argv: &[&str], env: &[(&str, String)]) -> Result<Daemon, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_baby-discord"))
            .args(argv)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("BABY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the daemon binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addrs_tx, addrs_rx) = tokio::sync::oneshot::channel();
        let sink = log.clone();
        // Keep draining stderr for the daemon's whole life, or it blocks on logging.
        tokio::spawn(async move {
            let mut addrs_tx = Some(addrs_tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addrs) = parse_listening(&line)
                    && let Some(tx) = addrs_tx.take()
                {
                    let _ = tx.send(addrs);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (tcp, http) = match tokio::time::timeout(Duration::from_secs(30), addrs_rx).await {
            Ok(Ok(addrs)) => addrs,
            _ => return Err(log.lock().unwrap().join("\n")),
        };
        Ok(Daemon {
            child,
            tcp,
            http,
            log,
        })
    }

    /// Starts a daemon with `args` as [`Daemon::start`] would, expecting it
    /// to refuse: it must exit unsuccessfully within 20 s without serving.
    /// Returns what it logged.
    pub async fn refused(args: &[&str]) -> String {
        let mut argv = vec!["--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0"];
        argv.extend_from_slice(args);
        let out = Command::new(env!("CARGO_BIN_EXE_baby-discord"))
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(20), out)
            .await
            .expect("the daemon gives up within 20 s")
            .expect("the daemon binary runs");
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "the daemon started: {log}");
        assert!(parse_listening(&log).is_none(), "the daemon served: {log}");
        log
    }

    /// Sends SIGTERM and returns the exit code.
    pub async fn terminate(mut self) -> Option<i32> {
        let pid = self.child.id().expect("the daemon is running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the daemon stops within 20 s of SIGTERM")
            .expect("wait works");
        status.code()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the daemon is running")
    }

    /// Kills the daemon with SIGKILL (no graceful stop: a crash) and waits
    /// until it is gone.
    pub async fn kill9(&mut self) {
        signal(self.pid(), "KILL");
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the daemon dies within 10 s of SIGKILL")
            .expect("wait works");
    }

    /// Freezes the daemon with SIGSTOP: a stalled process (a long GC pause, a
    /// swapped-out VM), alive but silent. Returns once every thread has
    /// stopped: kill(1) returns when the signal is sent, and a thread running
    /// on another core can still do a little work before it takes it.
    pub fn freeze(&self) {
        let pid = self.pid();
        signal(pid, "STOP");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon did not stop within 5 s of SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets a frozen daemon run again (SIGCONT).
    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    /// Waits up to `limit` for the daemon to exit on its own; its exit
    /// status, or `None` if it is still running.
    pub async fn exits_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => Some(status.expect("wait works")),
            Err(_) => None,
        }
    }

    /// The log so far, one string.
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// Lines of a daemon's log shown when a test fails.
const LOG_TAIL: usize = 300;

impl Drop for Daemon {
    /// A failing test drops its daemons while it unwinds: each prints the end
    /// of its log then, so a failure seen once (in CI, say) can be read
    /// afterwards. The test harness shows it with the failure only.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let from = log.len().saturating_sub(LOG_TAIL);
        eprintln!(
            "--- the last {} lines the daemon on tcp {} logged ---",
            log.len() - from,
            self.tcp
        );
        for line in &log[from..] {
            eprintln!("{line}");
        }
    }
}

/// Whether every thread of `pid` is in the stopped state (`T` in
/// /proc/PID/task/TID/stat).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                == Some("T")
        })
    })
}

/// Sends `SIGNAME` to `pid` with kill(1), which every test machine has.
fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid} failed");
}

fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let at = line.find("listening tcp=")?;
    let rest = &line[at + "listening tcp=".len()..];
    let mut words = rest.split_whitespace();
    let tcp = words.next()?.parse().ok()?;
    let http = words.next()?.strip_prefix("http=")?;
    let http = http
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()?;
    Some((tcp, http))
}

/// A netcat-like client.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    /// Connects and reads the welcome line.
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connects");
        let (read, writer) = stream.into_split();
        let mut client = Client {
            reader: BufReader::new(read),
            writer,
        };
        let welcome = client.line().await.expect("a welcome line");
        assert!(
            welcome.starts_with("* welcome to baby-discord"),
            "{welcome}"
        );
        client
    }

    /// Connects, switches to JSON and takes `nick`.
    pub async fn json(addr: SocketAddr, nick: &str) -> Client {
        let mut c = Client::connect(addr).await;
        c.send("/format json").await;
        c.expect(|v| v["type"] == "reply" && v["command"] == "format")
            .await;
        c.send(&format!("/nick {nick}")).await;
        c.expect(|v| v["type"] == "nick" && v["new"] == nick).await;
        c
    }

    /// Connects in JSON mode, takes `nick` and joins `room`.
    pub async fn in_room(addr: SocketAddr, nick: &str, room: &str) -> Client {
        let mut c = Client::json(addr, nick).await;
        c.send(&format!("/join {room}")).await;
        c.expect(|v| v["type"] == "join" && v["nick"] == nick).await;
        c
    }

    /// Sends one line.
    pub async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes()).await;
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write");
    }

    /// The next line, `None` at end of stream. Panics after [`WAIT`].
    pub async fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT, self.reader.read_line(&mut line))
            .await
            .expect("a line within the wait")
            .expect("read");
        (n > 0).then(|| line.trim_end_matches(['\r', '\n']).to_owned())
    }

    /// The next line as JSON.
    pub async fn event(&mut self) -> Value {
        let line = self.line().await.expect("an event, not end of stream");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Reads events until one matches, returning it.
    pub async fn expect(&mut self, matches: impl Fn(&Value) -> bool) -> Value {
        loop {
            let event = self.event().await;
            if matches(&event) {
                return event;
            }
        }
    }

    /// Reads events until an `error`, which must have `code`.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let e = self.expect(|v| v["type"] == "error").await;
        assert_eq!(e["code"], code, "{e}");
        e
    }

    /// Reads everything until the server closes, with a deadline.
    pub async fn read_to_end(&mut self) -> String {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), self.reader.read_to_end(&mut rest))
            .await
            .expect("the server closes within 30 s")
            .expect("read");
        String::from_utf8_lossy(&rest).into_owned()
    }

    /// Splits into halves, for tests that read and write concurrently.
    pub fn split(self) -> (BufReader<OwnedReadHalf>, OwnedWriteHalf) {
        (self.reader, self.writer)
    }
}

/// Whether tests must fail, not skip, when a service is missing.
pub fn services_required() -> bool {
    std::env::var("BABY_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Skips (prints why and returns `None`) or fails, as `BABY_REQUIRE_SERVICES` says.
pub fn missing_service(what: &str, why: impl std::fmt::Display) -> Option<PgDatabase> {
    if services_required() {
        panic!("{what} is required (BABY_REQUIRE_SERVICES=1) but unavailable: {why}");
    }
    eprintln!("SKIPPED: {what} unavailable ({why}); set BABY_TEST_PG to run this test");
    None
}

/// The environment that runs a daemon with its wall clock moved by `offset`
/// (libfaketime's syntax: `+60s`, `-60s`), its monotonic clock left alone:
/// one machine's clock running ahead of or behind the others'. Skips (prints
/// why and returns `None`) or fails, as `BABY_REQUIRE_SERVICES` says, when
/// libfaketime is not installed (`apt-get install faketime`; or point
/// `BABY_TEST_FAKETIME` at `libfaketime.so.1`).
pub fn skewed_clock(offset: &str) -> Option<Vec<(&'static str, String)>> {
    Some(vec![
        ("LD_PRELOAD", faketime()?),
        ("FAKETIME", offset.to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ])
}

/// Like [`skewed_clock`], with the offset read from `file` whenever the
/// daemon reads the clock: rewriting the file steps its clock while it runs.
pub fn stepped_clock(file: &std::path::Path) -> Option<Vec<(&'static str, String)>> {
    Some(vec![
        ("LD_PRELOAD", faketime()?),
        ("FAKETIME_TIMESTAMP_FILE", file.display().to_string()),
        ("FAKETIME_NO_CACHE", "1".to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ])
}

/// Where libfaketime is, or `None` after skipping (or failing) as
/// [`skewed_clock`] says.
fn faketime() -> Option<String> {
    let found = std::env::var("BABY_TEST_FAKETIME").ok().or_else(|| {
        let arch_dirs = std::fs::read_dir("/usr/lib")
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path());
        ["/usr/lib".into(), "/usr/local/lib".into()]
            .into_iter()
            .chain(arch_dirs)
            .map(|dir: std::path::PathBuf| dir.join("faketime/libfaketime.so.1"))
            .find(|lib| lib.exists())
            .map(|lib| lib.display().to_string())
    });
    if found.is_none() {
        let why = "no libfaketime.so.1 under /usr/lib or /usr/local/lib";
        if services_required() {
            panic!("libfaketime is required (BABY_REQUIRE_SERVICES=1) but unavailable: {why}");
        }
        eprintln!("SKIPPED: libfaketime unavailable ({why}); apt-get install faketime");
    }
    found
}

/// A fresh PostgreSQL database for one test, dropped by [`PgDatabase::drop_now`].
pub struct PgDatabase {
    /// URL of the new database.
    pub url: String,
    admin: String,
    name: String,
}

impl PgDatabase {
    /// Creates a database on the server of `BABY_TEST_PG` (default: the local
    /// server), or skips/fails when there is none.
    pub async fn create() -> Option<PgDatabase> {
        use sqlx::Connection;
        let admin = std::env::var("BABY_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let mut conn =
            match tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&admin))
                .await
            {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return missing_service("PostgreSQL", e),
                Err(_) => return missing_service("PostgreSQL", "connect timed out"),
            };
        let name = format!("baby_test_{:016x}", rand_u64());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE");
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        Some(PgDatabase {
            url: format!("{base}/{name}"),
            admin,
            name,
        })
    }

    /// The server's `host:port`, for a fault-injecting proxy in front of it.
    pub fn address(&self) -> SocketAddr {
        let rest = self.url.split_once("://").expect("a URL").1;
        let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host_port = if host_port.contains(':') {
            host_port.to_owned()
        } else {
            format!("{host_port}:5432")
        };
        use std::net::ToSocketAddrs;
        host_port
            .to_socket_addrs()
            .expect("a resolvable address")
            .next()
            .expect("an address")
    }

    /// Drops the database (call at the end of the test).
    pub async fn drop_now(mut self) {
        drop_database(&self.admin, &self.name).await;
        self.name.clear();
    }
}

/// A test that fails before [`PgDatabase::drop_now`] still drops its
/// database, on a thread of its own (this may run inside the test's runtime,
/// which cannot be blocked on).
impl Drop for PgDatabase {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let (admin, name) = (self.admin.clone(), std::mem::take(&mut self.name));
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(drop_database(&admin, &name));
        });
        let _ = dropped.join();
    }
}

async fn drop_database(admin: &str, name: &str) {
    use sqlx::Connection;
    let connect = sqlx::PgConnection::connect(admin);
    if let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(5), connect).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// The shared Redis (`BABY_TEST_REDIS`, default 127.0.0.1:6379) as a
/// `redis://` URL, if it answers `PING`; otherwise skips or fails as
/// `BABY_REQUIRE_SERVICES` says.
pub async fn shared_redis() -> Option<String> {
    let addr = std::env::var("BABY_TEST_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into());
    match ping(&addr).await {
        Ok(()) => Some(format!("redis://{addr}")),
        Err(why) => {
            if services_required() {
                panic!("Redis is required (BABY_REQUIRE_SERVICES=1) but unavailable: {why}");
            }
            eprintln!(
                "SKIPPED: Redis unavailable at {addr} ({why}); set BABY_TEST_REDIS to run this test"
            );
            None
        }
    }
}

/// Sends `PING` to a Redis at `addr`.
pub async fn ping(addr: &str) -> Result<(), String> {
    let connect = tokio::net::TcpStream::connect(addr);
    let mut stream = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"PING\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut reply = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut reply))
        .await
        .map_err(|_| "no answer to PING".to_owned())?
        .map_err(|e| e.to_string())?;
    if &reply == b"+PONG\r\n" {
        Ok(())
    } else {
        Err("not a Redis".into())
    }
}

/// Deletes a test cluster's keys (they would expire or sit harmlessly, but
/// a shared Redis should be left as found).
pub fn forget_redis_cluster(url: &str, cluster: &str) {
    let addr = url.trim_start_matches("redis://");
    let (host, port) = addr.split_once(':').unwrap_or((addr, "6379"));
    let keys = std::process::Command::new("redis-cli")
        .args([
            "-h",
            host,
            "-p",
            port,
            "--scan",
            "--pattern",
            &format!("{{{cluster}:*"),
        ])
        .output();
    if let Ok(keys) = keys {
        for key in String::from_utf8_lossy(&keys.stdout).lines() {
            let _ = std::process::Command::new("redis-cli")
                .args(["-h", host, "-p", port, "del", key])
                .stdout(Stdio::null())
                .status();
        }
    }
}
