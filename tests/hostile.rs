//! Hostile clients against one daemon while a canary pair chats: every
//! attack at once, each bounded, then the canary must have lost nothing and
//! the daemon's memory must have stayed under a stated bound.
//!
//! The attacks: 10 MB of garbage, 1 MB lines, a 50 MB HTTP body, 60,000-deep
//! JSON, 10,000 headers, control and bidi characters, a 10,000-line burst from
//! a client that does not read, 3,000 room streams for made-up rooms, `/nick`
//! and `/join` storms, silent connections, and a `POST /connect` flood. The
//! daemon runs with `--exempt-loopback false`, so the per-address limits
//! apply to everything here, as they would to a real remote attacker.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Daemon, sqlite_url, temp_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// What the daemon may hold at its peak while all of this goes on.
const RSS_BOUND_KIB: u64 = 128 * 1024;
/// How many messages the canary sends (at 5/s, under the rate limit).
const CANARY_MESSAGES: u64 = 60;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Writes `bytes` to a fresh connection to `addr` as fast as the server takes
/// them, reading nothing, for at most `limit`; the server may close on us.
async fn blast(addr: std::net::SocketAddr, bytes: Vec<u8>, limit: Duration) {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return;
    };
    let _ = tokio::time::timeout(limit, async {
        for chunk in bytes.chunks(64 * 1024) {
            if stream.write_all(chunk).await.is_err() {
                return;
            }
        }
    })
    .await;
}

/// Sends a raw HTTP request and returns the status line's code (0 if none).
async fn raw_http(addr: std::net::SocketAddr, request: Vec<u8>) -> u16 {
    raw_http_from(addr, None, request).await
}

/// [`raw_http`] from local address `from` (another loopback address is
/// another client to the server's per-address limits).
async fn raw_http_from(
    addr: std::net::SocketAddr,
    from: Option<std::net::IpAddr>,
    request: Vec<u8>,
) -> u16 {
    let fut = async {
        let socket = tokio::net::TcpSocket::new_v4().ok()?;
        if let Some(ip) = from {
            socket.bind((ip, 0).into()).ok()?;
        }
        let mut stream = socket.connect(addr).await.ok()?;
        // The server may answer (and close) before the whole request is sent.
        let _ = stream.write_all(&request).await;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await.ok()?;
        let text = String::from_utf8_lossy(&head[..n]).into_owned();
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_neither_starve_the_canary_nor_grow_memory() {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let daemon = Daemon::start(&["--db", &db, "--exempt-loopback", "false"]).await;
    let (tcp, http, pid) = (daemon.tcp, daemon.http, daemon.pid());
    let baseline = rss_kib(pid);

    // The canary pair, in before the attackers take the address's slots.
    let mut alice = Client::in_room(tcp, "alice", "canary").await;
    let mut bob = Client::in_room(tcp, "bob", "canary").await;
    alice
        .expect(|v| v["type"] == "join" && v["nick"] == "bob")
        .await;

    let mut attacks = JoinSet::new();
    // Garbage, and lines far over the limit.
    attacks.spawn(async move {
        let garbage: Vec<u8> = (0..10 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        blast(tcp, garbage, Duration::from_secs(20)).await;
    });
    for _ in 0..3 {
        attacks.spawn(blast(tcp, vec![b'x'; 1024 * 1024], Duration::from_secs(20)));
    }
    // A burst of 10,000 lines from a client that never reads its answers,
    // and control and bidi characters in texts.
    attacks.spawn(async move {
        let mut lines = String::from("/join canary\n");
        for i in 0..10_000 {
            lines.push_str(&format!("flood {i}\n"));
        }
        blast(tcp, lines.into_bytes(), Duration::from_secs(20)).await;
    });
    attacks.spawn(async move {
        let nasty = "/join canary\nhi\u{7}there\n\u{202e}gnirts\nok\u{2066}x\n\u{1b}[2J\n";
        blast(tcp, nasty.as_bytes().to_vec(), Duration::from_secs(5)).await;
    });
    // /nick and /join storms.
    for k in 0..10 {
        attacks.spawn(async move {
            let mut lines = String::new();
            for i in 0..500 {
                lines.push_str(&format!("/nick storm{k}x{i}\n/join storm{i}\n"));
            }
            blast(tcp, lines.into_bytes(), Duration::from_secs(20)).await;
        });
    }
    // HTTP: a 50 MB body, 60,000-deep JSON, 10,000 headers. From an address
    // of their own: on the attackers' address the other attacks fill the
    // per-address quotas, and a full quota answers 503 whatever the body;
    // these answers must say what the server made of the requests.
    let statuses = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = statuses.clone();
    attacks.spawn(async move {
        let own: Option<std::net::IpAddr> = Some([127, 0, 0, 2].into());
        let raw_http = |addr, request| raw_http_from(addr, own, request);
        let mut head = format!(
            "POST /connect HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            50 * 1024 * 1024
        )
        .into_bytes();
        head.extend(vec![b' '; 1024 * 1024]);
        let big = raw_http(http, head).await;
        let deep = raw_http(http, post("/connect", &vec![b'['; 60_000])).await;
        let mut many = String::from("GET /rooms HTTP/1.1\r\nhost: x\r\n");
        for i in 0..10_000 {
            many.push_str(&format!("x-h{i}: v\r\n"));
        }
        many.push_str("\r\n");
        let headers = raw_http(http, many.into_bytes()).await;
        seen.lock().unwrap().extend([
            ("50 MB body", big),
            ("deep JSON", deep),
            ("10,000 headers", headers),
        ]);
    });
    // Room streams for made-up rooms, opened and dropped.
    attacks.spawn(async move {
        for i in 0..3_000 {
            let req = format!("GET /messages/junk{i} HTTP/1.1\r\nhost: x\r\n\r\n");
            let _ = raw_http(http, req.into_bytes()).await;
        }
    });
    // Silent connections, and a POST /connect flood.
    attacks.spawn(async move {
        let mut idle = Vec::new();
        for _ in 0..300 {
            if let Ok(s) = TcpStream::connect(http).await {
                idle.push(s);
            }
        }
        tokio::time::sleep(Duration::from_secs(12)).await; // past --header-timeout: the attack's length
        drop(idle);
    });
    let connects = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let refused = connects.clone();
    attacks.spawn(async move {
        for _ in 0..2_000 {
            let status = raw_http(http, post("/connect", b"{}")).await;
            if status == 429 || status == 503 {
                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });

    // Meanwhile the canary talks, 5 lines a second, and watches memory.
    let started = Instant::now();
    let mut peak = baseline;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    for n in 1..=CANARY_MESSAGES {
        tick.tick().await;
        alice.send(&format!("canary {n}")).await;
        peak = peak.max(rss_kib(pid));
    }
    let mut got = Vec::new();
    while (got.len() as u64) < CANARY_MESSAGES {
        let v = bob
            .expect(|v| {
                v["type"] == "message"
                    && v["text"].as_str().is_some_and(|t| t.starts_with("canary "))
            })
            .await;
        got.push(v["text"].as_str().unwrap().to_owned());
        peak = peak.max(rss_kib(pid));
    }
    let canary_time = started.elapsed();
    while attacks.join_next().await.is_some() {
        peak = peak.max(rss_kib(pid));
    }
    let expected: Vec<String> = (1..=CANARY_MESSAGES)
        .map(|n| format!("canary {n}"))
        .collect();
    assert_eq!(got, expected, "the canary lost or reordered messages");

    // Still serving: a newcomer chats, /healthz answers.
    let mut late = Client::in_room(tcp, "late", "canary").await;
    late.send("still here").await;
    bob.expect(|v| v["text"] == "still here").await;
    let health = raw_http(
        http,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(health, 200);
    let statuses = statuses.lock().unwrap().clone();
    for (what, status) in &statuses {
        assert!(
            *status == 0 || (400..500).contains(status),
            "{what}: a client error or a closed connection, not {status}"
        );
    }
    eprintln!(
        "hostile: canary {CANARY_MESSAGES}/{CANARY_MESSAGES} in {canary_time:?}; RSS {baseline} KiB before, peak {peak} KiB (bound {RSS_BOUND_KIB}); \
         {} of 2,000 /connect refused; HTTP attacks answered {statuses:?}",
        connects.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(
        peak < RSS_BOUND_KIB,
        "peak RSS {peak} KiB over the bound {RSS_BOUND_KIB} KiB"
    );
    assert!(
        connects.load(std::sync::atomic::Ordering::Relaxed) > 1_500,
        "the /connect flood was not limited"
    );
}
