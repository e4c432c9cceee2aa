//! Rooms nobody uses are evicted from memory, and come back whole when used
//! again: anyone can open a room stream on any name without a session, so a
//! room kept forever is memory anyone can grow.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::http::Http;
use common::{Client, Daemon, WAIT, sqlite_url, temp_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A value from `/metrics`, by its full name.
async fn metric(http: SocketAddr, name: &str) -> u64 {
    let text = Http::new(http).get("/metrics").await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Waits until `name` reads `want`, or panics after `limit`.
async fn metric_reaches(http: SocketAddr, name: &str, want: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let now = metric(http, name).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {now}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling a metric
    }
}

/// Opens `GET /messages/{room}` for each name, reads the head of each, and
/// closes them: the attack of a client that creates rooms without a session.
async fn touch_rooms(http: SocketAddr, names: impl Iterator<Item = String> + Send + 'static) {
    let names = std::sync::Arc::new(std::sync::Mutex::new(names));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let names = names.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let Some(name) = names.lock().unwrap().next() else {
                    return;
                };
                let mut s = TcpStream::connect(http).await.unwrap();
                let req = format!("GET /messages/{name} HTTP/1.1\r\nHost: t\r\n\r\n");
                s.write_all(req.as_bytes()).await.unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                // The stream's first frame (`retry:`) follows the head.
                while !head.windows(6).any(|w| w == b"retry:") {
                    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
                        .await
                        .unwrap()
                        .unwrap();
                    assert!(n > 0, "stream for {name} closed early");
                    head.extend_from_slice(&buf[..n]);
                }
                assert!(head.starts_with(b"HTTP/1.1 200"), "{name}");
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_rooms_are_evicted_and_memory_stays_flat() {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    // Pings every second: a reader that left is noticed at the latest then.
    let d = Daemon::start(&["--db", &db, "--room-idle", "1", "--sse-ping", "1"]).await;
    let held = "baby_rooms_held";
    let rss = "baby_process_resident_memory_bytes";
    const ROOMS: usize = 4_000;

    // A warm-up round, so allocator arenas and caches are in place.
    touch_rooms(d.http, (0..ROOMS).map(|i| format!("warm-{i}"))).await;
    metric_reaches(d.http, held, 0, Duration::from_secs(20)).await;
    let before = metric(d.http, rss).await;

    // Twice as many new names: without eviction this keeps ~1.8 KB a room.
    touch_rooms(d.http, (0..2 * ROOMS).map(|i| format!("room-{i}"))).await;
    metric_reaches(d.http, held, 0, Duration::from_secs(20)).await;
    let after = metric(d.http, rss).await;
    let grown = after.saturating_sub(before);
    assert!(
        grown < 6 << 20,
        "RSS grew {grown} bytes over {} evicted rooms ({before} -> {after})",
        2 * ROOMS
    );
}

#[tokio::test]
async fn an_evicted_room_comes_back_with_its_history() {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let d = Daemon::start(&["--db", &db, "--room-idle", "1"]).await;
    let mut alice = Client::in_room(d.tcp, "alice", "kept").await;
    for i in 1..=12 {
        alice.send(&format!("m{i}")).await;
    }
    alice
        .expect(|v| v["type"] == "message" && v["text"] == "m12")
        .await;
    assert_eq!(metric(d.http, "baby_rooms_held").await, 1);
    alice.send("/leave").await;
    alice.expect(|v| v["type"] == "leave").await;
    metric_reaches(d.http, "baby_rooms_held", 0, Duration::from_secs(10)).await;

    // The ring is read back from storage: the last ten, then the seq goes on.
    let mut bob = Client::in_room(d.tcp, "bob", "kept").await;
    let mut replay = Vec::new();
    while replay.len() < 10 {
        let v = bob.expect(|v| v["type"] == "message").await;
        replay.push(v["text"].as_str().unwrap().to_owned());
    }
    let want: Vec<String> = (3..=12).map(|i| format!("m{i}")).collect();
    assert_eq!(replay, want);
    bob.send("again").await;
    let v = bob.expect(|v| v["type"] == "message").await;
    assert_eq!(
        (v["text"].as_str(), v["seq"].as_u64()),
        (Some("again"), Some(13))
    );
}

#[tokio::test]
async fn a_poll_bus_instance_hears_an_evicted_room_again() {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let common = [
        "--db",
        db.as_str(),
        "--bus",
        "poll",
        "--poll-interval",
        "20",
    ];
    let a = Daemon::start(&[&common[..], &["--instance", "a"]].concat()).await;
    let b_args = ["--instance", "b", "--room-idle", "1", "--sse-ping", "1"];
    let b = Daemon::start(&[&common[..], &b_args[..]].concat()).await;
    let http = Http::new(b.http);
    // A reader on b watches the room through b's bus, then goes away.
    drop(http.sse("/messages/echo", None).await);
    metric_reaches(b.http, "baby_rooms_held", 0, Duration::from_secs(10)).await;

    // A new reader on b must hear what is said on a.
    let mut reader = http.sse("/messages/echo", None).await;
    let mut alice = Client::in_room(a.tcp, "alice", "echo").await;
    alice.send("still here").await;
    reader
        .expect(|f, v| f.event.as_deref() == Some("message") && v["text"] == "still here")
        .await;
}
