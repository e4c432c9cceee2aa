//! PROTOCOL.md "Limits": each limit is reached over real sockets and answered
//! as documented, and a client that behaves is never caught by one.
//!
//! The helpers here ([`flood`], [`Tally`], [`daemon`]) are meant for other
//! attack tests too: a flood is written by its own task so the client can read
//! while it sends, the way `(...; yes hi) | nc` does.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{Client, Daemon, WAIT, sqlite_url, temp_dir};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// A second client address: all of 127.0.0.0/8 reaches loopback on Linux, so
/// a test can be two clients (with `--exempt-loopback false`).
pub const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
/// The usual client address.
pub const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// A TCP connection to `addr` from the local address `from`.
pub async fn connect_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .expect("binds a loopback address");
    socket.connect(addr).await.expect("connects")
}

/// Everything the server sends until it closes (panics after [`WAIT`]).
pub async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut all))
        .await
        .expect("the server closes the connection")
        .expect("read");
    String::from_utf8_lossy(&all).into_owned()
}

/// One HTTP/1.1 request from `from` on a fresh connection (`Connection:
/// close`): the status and the body.
pub async fn http_from(
    from: IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = connect_from(from, addr).await;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let reply = read_until_closed(&mut stream).await;
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP status: {reply}"));
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// A daemon on its own SQLite file, with `extra` flags.
pub async fn daemon(extra: &[&str]) -> (Daemon, tempfile::TempDir) {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let mut args = vec!["--db", db.as_str()];
    args.extend_from_slice(extra);
    (Daemon::start(&args).await, dir)
}

/// Writes `line` `times` times, then `last`, from its own task (so the caller
/// can read meanwhile), and hands the writer back so the connection stays open.
pub fn flood(
    writer: OwnedWriteHalf,
    line: &str,
    times: usize,
    last: &str,
) -> JoinHandle<OwnedWriteHalf> {
    let lines = std::iter::repeat_n(line.to_owned(), times).chain([last.to_owned()]);
    flood_lines(writer, lines)
}

/// Writes every line of `lines` at once from its own task (see [`flood`]).
pub fn flood_lines(
    mut writer: OwnedWriteHalf,
    lines: impl IntoIterator<Item = String>,
) -> JoinHandle<OwnedWriteHalf> {
    let mut bytes = String::new();
    for line in lines {
        bytes.push_str(&line);
        bytes.push('\n');
    }
    tokio::spawn(async move {
        writer
            .write_all(bytes.as_bytes())
            .await
            .expect("the server keeps reading, however slowly");
        writer
    })
}

/// What a JSON-format client was sent, counted as it reads.
#[derive(Debug, Default)]
pub struct Tally {
    /// `message` events.
    pub messages: u64,
    /// `rate-limited` errors as they arrived.
    pub notices: u64,
    /// Lines those errors say were refused (one each, plus "N more refused").
    pub refused: u64,
    /// `reply` events by command.
    pub replies: std::collections::BTreeMap<String, u64>,
    /// Any other error codes.
    pub other_errors: Vec<String>,
    /// Every event by type.
    pub events: std::collections::BTreeMap<String, u64>,
}

impl Tally {
    /// Counts one event.
    pub fn add(&mut self, v: &Value) {
        let kind = v["type"].as_str().unwrap_or_default().to_owned();
        *self.events.entry(kind).or_default() += 1;
        match v["type"].as_str() {
            Some("message") => self.messages += 1,
            Some("reply") => {
                let command = v["command"].as_str().unwrap_or_default().to_owned();
                *self.replies.entry(command).or_default() += 1;
            }
            Some("error") if v["code"] == "rate-limited" => {
                self.notices += 1;
                self.refused += refusals_in(v["message"].as_str().unwrap_or_default());
            }
            Some("error") => self.other_errors.push(v.to_string()),
            _ => {}
        }
    }

    /// Reads and counts events until `done` holds (panics after [`WAIT`] of
    /// silence, or if the server closes the connection first).
    pub async fn read_until(
        &mut self,
        reader: &mut BufReader<OwnedReadHalf>,
        done: impl Fn(&Tally) -> bool,
    ) {
        let mut line = String::new();
        while !done(self) {
            line.clear();
            let n = tokio::time::timeout(WAIT, reader.read_line(&mut line))
                .await
                .unwrap_or_else(|_| panic!("silence while waiting; so far {self:?}"))
                .expect("read");
            assert!(n > 0, "the server closed the connection; so far {self:?}");
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            self.add(&v);
        }
    }
}

/// How many refused lines one `rate-limited` error stands for: 1, or N for an
/// "N more refused; ..." summary.
fn refusals_in(message: &str) -> u64 {
    match message.split_once(" more refused") {
        Some((n, _)) => n.parse().unwrap_or_else(|_| panic!("a count: {message}")),
        None => 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_client_is_paced_not_dropped_and_told_how_many_lines_were_refused() {
    let (d, _dir) = daemon(&[]).await;
    let client = Client::in_room(d.tcp, "paster", "a").await;
    let (mut reader, writer) = client.split();
    let started = tokio::time::Instant::now();
    const LINES: u64 = 10_000;
    let flooding = flood(writer, "hi", LINES as usize, "/help");
    let mut tally = Tally::default();
    // Every line is accounted for: echoed as a message, or counted as refused.
    tally
        .read_until(&mut reader, |t| {
            t.replies.contains_key("help") && t.messages + t.refused == LINES
        })
        .await;
    let elapsed = started.elapsed();
    let _writer = flooding.await.unwrap();
    assert!(tally.other_errors.is_empty(), "{tally:?}");
    assert!(
        tally.messages >= 20,
        "the burst of 20 got through: {tally:?}"
    );
    // At most one notice a second (plus the first, and the last summary).
    let bound = elapsed.as_secs() + 2;
    assert!(
        tally.notices <= bound,
        "{} notices in {elapsed:?}: {tally:?}",
        tally.notices
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_help_requests_are_all_answered() {
    let (d, _dir) = daemon(&[]).await;
    let client = Client::json(d.tcp, "curious").await;
    let (mut reader, writer) = client.split();
    let flooding = flood(writer, "/help", 2_999, "/help");
    let mut tally = Tally::default();
    tally
        .read_until(&mut reader, |t| t.replies.get("help") == Some(&3_000))
        .await;
    let _writer = flooding.await.unwrap();
    assert!(tally.other_errors.is_empty(), "{tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_client_does_not_slow_the_room() {
    let (d, _dir) = daemon(&["--rate", "0"]).await;
    let mut canary = Client::in_room(d.tcp, "canary", "general").await;
    // A client that sends much and reads slowly: it is paced by its own queue.
    let greedy = Client::in_room(d.tcp, "greedy", "general").await;
    let (mut greedy_reader, writer) = greedy.split();
    let flooding = flood(writer, "/help", 5_000, "/help");
    let mut speaker = Client::in_room(d.tcp, "speaker", "general").await;
    for i in 0..50 {
        let text = format!("canary {i}");
        speaker.send(&text).await;
        let seen = tokio::time::timeout(
            Duration::from_secs(2),
            canary.expect(|v| v["type"] == "message" && v["text"] == text),
        )
        .await;
        assert!(seen.is_ok(), "message {i} was late");
    }
    // greedy is still there, and gets every answer once it reads.
    let mut tally = Tally::default();
    tally
        .read_until(&mut greedy_reader, |t| {
            t.replies.get("help") == Some(&5_001) && t.messages >= 50
        })
        .await;
    let _writer = flooding.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nick_join_and_leave_are_rate_limited() {
    let (d, _dir) = daemon(&[]).await;
    let mut canary = Client::in_room(d.tcp, "canary", "general").await;
    // in_room spends two of the burst of five (/nick, /join).
    let renamer = Client::in_room(d.tcp, "renamer", "general").await;
    let (mut reader, writer) = renamer.split();
    let started = tokio::time::Instant::now();
    const LINES: u64 = 300;
    let lines = (0..LINES).map(|i| match i % 3 {
        0 => format!("/nick r{i}"),
        1 => format!("/join room{i}"),
        _ => format!("/leave room{}", i - 1),
    });
    let flooding = flood_lines(writer, lines.chain(["/help".to_owned()]));
    let mut tally = Tally::default();
    let count = |t: &Tally, kind: &str| t.events.get(kind).copied().unwrap_or(0);
    tally
        .read_until(&mut reader, |t| {
            t.replies.contains_key("help")
                && count(t, "nick")
                    + count(t, "join")
                    + count(t, "leave")
                    + t.refused
                    + t.other_errors.len() as u64
                    >= LINES
        })
        .await;
    let _writer = flooding.await.unwrap();
    // 3 left of the burst, then 2 a second.
    let allowed = 3 + 2 * started.elapsed().as_secs_f64().ceil() as u64 + 1;
    let done = count(&tally, "nick") + count(&tally, "join") + count(&tally, "leave");
    assert!(done <= allowed, "{done} went through: {tally:?}");
    assert!(tally.refused >= LINES - allowed, "{tally:?}");
    // The canary heard of no more than went through, and still chats.
    canary.send("still here").await;
    let mut renames = 0;
    loop {
        let v = canary.event().await;
        if v["type"] == "nick" {
            renames += 1;
        }
        if v["type"] == "message" && v["text"] == "still here" {
            break;
        }
    }
    assert!(renames <= allowed, "{renames} renames reached the room");
}

#[tokio::test]
async fn bidi_overrides_are_refused_in_texts() {
    let (d, _dir) = daemon(&[]).await;
    let mut alice = Client::in_room(d.tcp, "alice", "general").await;
    // U+202E turns "<mallory> hi" around in a terminal.
    for c in ['\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}'] {
        alice.send(&format!("look {c}ih")).await;
        let e = alice.expect_error("bad-arguments").await;
        assert!(
            e["message"].as_str().unwrap().contains("bidirectional"),
            "{e}"
        );
        alice.send(&format!("/me {c}waves")).await;
        alice.expect_error("bad-arguments").await;
        alice.send(&format!("/msg alice {c}psst")).await;
        alice.expect_error("bad-arguments").await;
    }
    alice.send("שלום").await;
    alice
        .expect(|v| v["type"] == "message" && v["text"] == "שלום")
        .await;
}

#[tokio::test]
async fn connections_per_address_are_limited() {
    let (d, _dir) = daemon(&["--max-conns-per-addr", "3", "--exempt-loopback", "false"]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = connect_from(HOME, d.tcp).await;
        let mut welcome = [0u8; 9];
        stream.read_exact(&mut welcome).await.unwrap();
        assert_eq!(&welcome, b"* welcome");
        held.push(stream);
    }
    // A fourth, TCP or HTTP, is refused as the per-instance limit refuses.
    let mut fourth = connect_from(HOME, d.tcp).await;
    let said = read_until_closed(&mut fourth).await;
    assert!(
        said.starts_with("! unavailable: too many connections from your address"),
        "{said}"
    );
    assert_eq!(said.lines().count(), 1, "{said}");
    let (status, body) = http_from(HOME, d.http, "GET", "/rooms", "").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"code\":\"unavailable\""), "{body}");
    // Another address is not affected.
    let other = connect_from(OTHER, d.tcp).await;
    let (read, mut write) = other.into_split();
    let mut lines = BufReader::new(read).lines();
    let welcome = lines.next_line().await.unwrap().unwrap();
    assert!(welcome.starts_with("* welcome"), "{welcome}");
    write.write_all(b"/help\n").await.unwrap();
    let help = lines.next_line().await.unwrap().unwrap();
    assert!(help.starts_with("* /"), "{help}");
    // A connection closed is a connection given back.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut again = connect_from(HOME, d.tcp).await;
        let mut first = [0u8; 9];
        again.read_exact(&mut first).await.unwrap();
        if &first == b"* welcome" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // the closed connection's task is still ending
    }
}

/// The per-address limit is there so one address cannot crowd others out. A
/// burst from an address already at its limit is refused by that limit and
/// must never count against the server's: another address still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_burst_from_one_address_does_not_fill_the_server_for_another() {
    let (d, _dir) = daemon(&[
        "--max-conns",
        "4",
        "--max-conns-per-addr",
        "1",
        "--exempt-loopback",
        "false",
    ])
    .await;
    let mut held = connect_from(OTHER, d.tcp).await;
    let mut first = [0u8; 9];
    held.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"* welcome");
    let mut refused = Vec::new();
    for round in 0..20u8 {
        let tcp = d.tcp;
        let burst: Vec<_> = (0..100)
            .map(|_| {
                tokio::spawn(async move {
                    let mut s = connect_from(OTHER, tcp).await;
                    read_until_closed(&mut s).await
                })
            })
            .collect();
        // A fresh address each round: never at its own limit.
        let newcomer = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 1, 10 + round));
        let (read, mut write) = connect_from(newcomer, d.tcp).await.into_split();
        let mut lines = BufReader::new(read).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a first line")
            .unwrap()
            .unwrap_or_default();
        for b in burst {
            let said = b.await.unwrap();
            assert!(said.starts_with("! unavailable"), "{said}");
        }
        if line.starts_with("* welcome") {
            // Leaves, and is gone once the server closes its side.
            write.write_all(b"/quit\n").await.unwrap();
            while let Ok(Some(_)) = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("the server closes")
            {}
        } else {
            refused.push(format!("round {round}: {line}"));
        }
    }
    assert!(
        refused.is_empty(),
        "another address was refused while one was held to its limit: {refused:#?}"
    );
}

#[tokio::test]
async fn loopback_is_exempt_by_default() {
    let (d, _dir) = daemon(&["--max-conns-per-addr", "2"]).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(Client::connect(d.tcp).await);
    }
    let (status, _) = http_from(HOME, d.http, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn new_http_sessions_are_rate_limited_per_address() {
    let (d, _dir) = daemon(&["--exempt-loopback", "false"]).await;
    let started = tokio::time::Instant::now();
    let mut created = 0;
    let mut limited = None;
    for _ in 0..40 {
        let (status, body) = http_from(HOME, d.http, "POST", "/connect", "{}").await;
        match status {
            201 => created += 1,
            429 => limited = Some(body),
            _ => panic!("{status} {body}"),
        }
    }
    let allowed = 20 + 5 * started.elapsed().as_secs_f64().ceil() as u32;
    assert!(created >= 20, "the burst of 20 is allowed: {created}");
    assert!(
        created <= allowed,
        "{created} sessions, at most {allowed} allowed"
    );
    let limited = limited.expect("some were refused");
    assert!(limited.contains("\"code\":\"rate-limited\""), "{limited}");
    // Another address is not affected, and guest nicks keep their format.
    let (status, body) = http_from(OTHER, d.http, "POST", "/connect", "{}").await;
    assert_eq!(status, 201, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let nick = v["nick"].as_str().unwrap();
    assert!(
        nick.len() == 10
            && nick.starts_with("guest-")
            && nick[6..].chars().all(|c| c.is_ascii_hexdigit()),
        "{nick}"
    );
}

#[tokio::test]
async fn an_http_connection_that_sends_nothing_is_closed() {
    let (d, _dir) = daemon(&["--header-timeout", "1"]).await;
    let started = tokio::time::Instant::now();
    let mut silent = connect_from(HOME, d.http).await;
    assert_eq!(read_until_closed(&mut silent).await, "");
    // The whole HTTP/2 preface, then nothing.
    let mut preface = connect_from(HOME, d.http).await;
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    read_until_closed(&mut preface).await;
    // The preface, a byte at a time.
    let trickle = connect_from(HOME, d.http).await;
    let (mut read, mut write) = trickle.into_split();
    tokio::spawn(async move {
        for b in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
            if write.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await; // the attack is slowness
        }
    });
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, read.read_to_end(&mut rest))
        .await
        .expect("the trickling connection is closed")
        .ok();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // A client that does send a request is served as usual.
    let (status, _) = http_from(HOME, d.http, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
}

/// A daemon started with a descriptor limit of `nofile` (soft and hard), as a
/// host with `ulimit -n` low would start it. Killed when dropped.
pub struct LimitedDaemon {
    _child: tokio::process::Child,
    /// TCP adapter address.
    pub tcp: SocketAddr,
    /// HTTP adapter address.
    pub http: SocketAddr,
    /// What it logged up to `listening`.
    pub log: String,
}

impl LimitedDaemon {
    /// Starts the binary with `args` under `nofile` descriptors.
    pub async fn start(nofile: u64, args: &[&str]) -> LimitedDaemon {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_baby-discord"));
        command
            .args(["--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, nofile, nofile));
        }
        let mut child = command.spawn().expect("the daemon starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = String::new();
        let (tcp, http) = loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("the daemon starts within 30 s")
                .unwrap()
                .unwrap_or_else(|| panic!("the daemon exited: {log}"));
            log.push_str(&line);
            log.push('\n');
            if let Some(at) = line.find("listening tcp=") {
                let mut words = line[at + "listening tcp=".len()..].split_whitespace();
                let tcp = words.next().unwrap().parse().unwrap();
                let http = words.next().unwrap().trim_start_matches("http=");
                let http = http.trim_end_matches(|c: char| !c.is_ascii_digit());
                break (tcp, http.parse().unwrap());
            }
        };
        // Keep draining stderr, or the daemon blocks on logging.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        LimitedDaemon {
            _child: child,
            tcp,
            http,
            log,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_is_lowered_to_fit_the_descriptor_limit() {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let d = LimitedDaemon::start(256, &["--db", &db]).await;
    // 256 - 128 kept back = 128 connections; the rest are told, not ignored.
    let mut welcomed = Vec::new();
    let mut refused = 0;
    for _ in 0..300 {
        let stream = TcpStream::connect(d.tcp).await.unwrap();
        let mut lines = BufReader::new(stream);
        let mut first = String::new();
        tokio::time::timeout(WAIT, lines.read_line(&mut first))
            .await
            .expect("every client gets an answer")
            .unwrap();
        if first.starts_with("* welcome") {
            welcomed.push(lines);
        } else {
            assert!(
                first.starts_with("! unavailable: the server is full"),
                "{first}"
            );
            refused += 1;
        }
    }
    assert_eq!((welcomed.len(), refused), (128, 172));
    // Health checks still answer, on a connection past the limit.
    let (status, body) = tokio::time::timeout(WAIT, http_from(HOME, d.http, "GET", "/healthz", ""))
        .await
        .expect("/healthz answers");
    assert_eq!(status, 200, "{body}");
    // The operator is told both limits and what was lowered.
    assert!(d.log.contains("file descriptor limit"), "{}", d.log);
    assert!(
        d.log
            .contains("--max-conns 100000 does not fit in 256 file descriptors"),
        "{}",
        d.log
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_joins_in_a_row_do_not_drop_a_paced_client() {
    let (d, _dir) = daemon(&["--rate", "0", "--command-rate", "0"]).await;
    let speaker = Client::in_room(d.tcp, "speaker", "big").await;
    let (mut speaker_reader, writer) = speaker.split();
    // Long texts: a replay is then ~2 MB, more than socket buffers take at once.
    let filler = "x".repeat(1_900);
    let _speaker = flood(writer, &filler, 1_499, "last");
    let mut said = Tally::default();
    said.read_until(&mut speaker_reader, |t| t.messages == 1_500)
        .await;
    // Three resuming joins in a row, each answered with up to 1,000 messages
    // (the core trims a replay to the room left in the outbox, with a gap):
    // pacing and replays together never drop a client for asking.
    let client = Client::json(d.tcp, "returning").await;
    let (mut reader, writer) = client.split();
    let lines = [
        "/join big 0",
        "/leave big",
        "/join big 0",
        "/leave big",
        "/join big 0",
        "/help",
    ];
    let _writer = flood_lines(writer, lines.map(str::to_owned));
    let mut tally = Tally::default();
    tally
        .read_until(&mut reader, |t| t.replies.contains_key("help"))
        .await;
    assert!(tally.other_errors.is_empty(), "{:?}", tally.other_errors);
    assert!(
        tally.messages >= 1_000,
        "the first replay is whole: {tally:?}"
    );
}
