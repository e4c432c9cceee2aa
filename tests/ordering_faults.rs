//! The ordering authority under faults: real daemons on real PostgreSQL and
//! SQLite, the database link paused or cut through a proxy, and `kill -9`.
//!
//! What must hold (PROTOCOL.md, "seq" and `POST /message`): a message is
//! refused with `unavailable` within 1 s while the authority is away and is
//! never sent later; a room whose position is unknown is never delivered from
//! seq 0; a seq is never given to two messages, even across `kill -9`; a
//! retried send with the same `Idempotency-Key` sends nothing new.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::Http;
use common::proxy::Proxy;
use common::{Client, Daemon, PgDatabase, WAIT, sqlite_url, temp_dir};
use hyper::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// The PostgreSQL server a test database lives on, for the proxy's upstream.
fn pg_upstream() -> SocketAddr {
    let admin = std::env::var("BABY_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let rest = admin.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    use std::net::ToSocketAddrs;
    host.to_socket_addrs().unwrap().next().unwrap()
}

/// A poll-bus daemon on `db`, fast polling.
async fn poll_daemon(db: &str, name: &str, extra: &[&str]) -> Daemon {
    poll_daemon_env(db, name, extra, &[]).await
}

/// [`poll_daemon`], with `env` added to its environment.
async fn poll_daemon_env(db: &str, name: &str, extra: &[&str], env: &[(&str, String)]) -> Daemon {
    let mut args = vec![
        "--db",
        db,
        "--bus",
        "poll",
        "--poll-interval",
        "20",
        "--instance",
        name,
    ];
    args.extend_from_slice(extra);
    Daemon::start_env(&args, env).await
}

/// Waits until `/healthz` says 200.
async fn healthy(http: &Http) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if http.get("/healthz").await.status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "the daemon never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `POST /message` with an optional `Idempotency-Key`.
async fn post_message(
    http: &Http,
    token: &str,
    room: &str,
    text: &str,
    key: Option<&str>,
) -> common::http::Reply {
    let auth = format!("Bearer {token}");
    let mut headers = vec![
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    if let Some(key) = key {
        headers.push(("idempotency-key", key));
    }
    let body = json!({ "room": room, "text": text }).to_string();
    http.request(Method::POST, "/message", &headers, Some(body.into()))
        .await
}

/// An HTTP session called `nick`, in `room`.
async fn http_member(http: &Http, nick: &str, room: &str) -> String {
    let (token, _) = http.connect(Some(nick)).await;
    let joined = http.command(&token, &format!("/join {room}")).await;
    assert_eq!(joined.status, 200, "{}", joined.text());
    token
}

/// Every JSON event a TCP client receives, collected in the background.
fn collect(reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>) -> Arc<Mutex<Vec<Value>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    tokio::spawn(async move {
        let mut lines = reader.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                sink.lock().unwrap().push(v);
            }
        }
    });
    events
}

fn count(events: &Mutex<Vec<Value>>, matches: impl Fn(&Value) -> bool) -> usize {
    events.lock().unwrap().iter().filter(|v| matches(v)).count()
}

/// Defect 9.5: while the database does not answer, a send is refused with
/// `unavailable` at once (never after the pool's 30 s), lines sent meanwhile
/// are never sent later, and the sender gets no `rate-limited` burst when the
/// database returns.
#[tokio::test]
async fn sends_fail_fast_while_the_database_is_paused_and_nothing_is_sent_later() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let proxy = Proxy::start(pg_upstream()).await;
    let d = poll_daemon(&proxy.url_for(&db.url), "p1", &[]).await;
    let http = Http::new(d.http);
    let token = http_member(&http, "poster", "outage").await;
    let mut tcp = Client::in_room(d.tcp, "typist", "outage").await;
    // The join event comes before the join has been recorded cluster-wide;
    // a reply to the next command shows the join is wholly done (a TCP
    // connection runs one command at a time), before the link is paused.
    tcp.send("/who").await;
    tcp.expect(|v| v["type"] == "reply" && v["command"] == "who")
        .await;
    let (reader, mut writer) = tcp.split();
    let events = collect(reader);
    let ok = post_message(&http, &token, "outage", "before", None).await;
    assert_eq!(ok.status, 200, "{}", ok.text());

    proxy.pause();
    // One HTTP send after another: each must be refused quickly.
    let mut slowest = Duration::ZERO;
    for i in 0..4 {
        let started = Instant::now();
        let reply = post_message(&http, &token, "outage", &format!("http-{i}"), None).await;
        let took = started.elapsed();
        slowest = slowest.max(took);
        println!("POST /message while paused: {} in {took:?}", reply.status);
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.json()["code"], "unavailable");
    }
    assert!(
        slowest < Duration::from_secs(3),
        "a send waited {slowest:?} for a paused database"
    );
    // A TCP user typing at 3 lines a second through the outage.
    for i in 0..12 {
        writer
            .write_all(format!("paused-{i}\n").as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(333)).await;
    }
    // Commands that need no ordering keep working.
    writer.write_all(b"/help\n").await.unwrap();
    let deadline = Instant::now() + WAIT;
    while count(&events, |v| v["type"] == "reply" && v["command"] == "help") == 0 {
        assert!(
            Instant::now() < deadline,
            "/help got no answer during the outage; events: {:?}\nlogs:\n{}",
            events.lock().unwrap(),
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = http.get("/healthz").await;
    println!("/healthz while paused: {} {}", health.status, health.text());
    assert_eq!(health.status, 503);
    assert!(health.text().contains("bus"), "{}", health.text());

    proxy.resume();
    healthy(&http).await;
    for i in 0..6 {
        writer
            .write_all(format!("after-{i}\n").as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(333)).await;
    }
    let deadline = Instant::now() + WAIT;
    while count(&events, |v| {
        v["type"] == "message" && v["text"] == "after-5"
    }) == 0
    {
        assert!(
            Instant::now() < deadline,
            "messages after the outage were not delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give anything queued behind the outage a moment to surface.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = count(&events, |v| {
        v["type"] == "error" && v["code"] == "unavailable"
    });
    let limited = count(&events, |v| {
        v["type"] == "error" && v["code"] == "rate-limited"
    });
    let late = count(&events, |v| {
        v["type"] == "message"
            && v["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("paused-") || t.starts_with("http-"))
    });
    let after = count(&events, |v| {
        v["type"] == "message" && v["text"].as_str().is_some_and(|t| t.starts_with("after-"))
    });
    println!(
        "tcp: {refused} unavailable, {limited} rate-limited, {late} sent late, {after}/6 after"
    );
    assert!(
        refused >= 10,
        "lines typed during the outage were not refused ({refused})"
    );
    assert_eq!(limited, 0, "a burst of rate-limited after the outage");
    assert_eq!(
        late, 0,
        "messages refused or typed during the outage were sent later"
    );
    assert_eq!(after, 6);
    drop(d);
    db.drop_now().await;
}

/// Defect 9.4: a join while the database is unreachable must not leave the
/// room at "seq 0": when the database returns, the member (and the room)
/// would receive the room's whole history as live messages.
#[tokio::test]
async fn a_join_during_an_outage_never_floods_history() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    const STORED: usize = 150;
    let direct = poll_daemon(&db.url, "direct", &["--rate", "0"]).await;
    let mut writer = Client::in_room(direct.tcp, "writer", "archive").await;
    for i in 1..=STORED {
        writer.send(&format!("old-{i}")).await;
    }
    writer
        .expect(|v| v["type"] == "message" && v["seq"] == STORED as u64)
        .await;

    let proxy = Proxy::start(pg_upstream()).await;
    let behind = poll_daemon(&proxy.url_for(&db.url), "behind", &[]).await;
    let reader = Client::json(behind.tcp, "reader").await;
    let (lines, mut out) = reader.split();
    let events = collect(lines);

    proxy.cut();
    let started = Instant::now();
    out.write_all(b"/join archive\n").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let answered = count(&events, |v| {
            (v["type"] == "join" && v["nick"] == "reader") || v["type"] == "error"
        });
        if answered > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the join was never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("join during the outage answered in {:?}", started.elapsed());
    // A read-only room stream opened meanwhile would be flooded the same way.
    let stream = Http::new(behind.http)
        .request(Method::GET, "/messages/archive", &[], None)
        .await;
    assert_eq!(stream.status, 503, "{}", stream.text());
    proxy.resume();
    healthy(&Http::new(behind.http)).await;
    // Refused or not, the user joins again once the database is back.
    out.write_all(b"/join archive\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer.send("fresh").await;
    let deadline = Instant::now() + WAIT;
    while count(&events, |v| v["type"] == "message" && v["text"] == "fresh") == 0 {
        assert!(Instant::now() < deadline, "the live message never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = count(&events, |v| v["type"] == "message");
    println!(
        "messages received by the member: {received} (room holds {})",
        STORED + 1
    );
    // At most the join replay (10) and the live message.
    assert!(
        received <= 11,
        "the room's history was delivered as live messages: {received}"
    );
    drop((direct, behind));
    db.drop_now().await;
}

/// Defect 9.6: on the local bus in async durability, messages acknowledged
/// but lost with the writer's last batch at `kill -9` must not have their
/// seqs given to new messages after the restart; a client resuming across the
/// hole is told with a `gap`.
#[tokio::test]
async fn seqs_are_never_reused_after_kill9_on_the_local_bus() {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let args = [
        "--db",
        db.as_str(),
        "--bus",
        "local",
        "--durability",
        "async",
    ];
    let mut d = Daemon::start(&args).await;
    let mut alice = Client::in_room(d.tcp, "alice", "crash").await;
    for i in 1..=5 {
        alice.send(&format!("stored-{i}")).await;
        alice
            .expect(|v| v["type"] == "message" && v["seq"] == i)
            .await;
    }
    let http = Http::new(d.http);
    // Wait until those five are in storage.
    let deadline = Instant::now() + WAIT;
    loop {
        let page = http.get("/rooms/crash/history?limit=10").await.json();
        if page["messages"].as_array().is_some_and(|m| m.len() == 5) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first messages were never stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Hold the database's write lock: the writer's next batch cannot commit,
    // as when the process dies before its batch is written.
    use sqlx::Connection;
    let mut blocker = sqlx::SqliteConnection::connect(&db).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut blocker)
        .await
        .unwrap();
    let mut acknowledged = Vec::new();
    for i in 6..=10 {
        alice.send(&format!("lost-{i}")).await;
        let v = alice
            .expect(|v| v["type"] == "message" && v["text"] == format!("lost-{i}"))
            .await;
        acknowledged.push(v["seq"].as_u64().unwrap());
    }
    d.kill9().await;
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    blocker.close().await.unwrap();

    let d = Daemon::start(&args).await;
    let mut bob = Client::in_room(d.tcp, "bob", "crash").await;
    bob.send("after the crash").await;
    let v = bob
        .expect(|v| v["type"] == "message" && v["text"] == "after the crash")
        .await;
    let seq = v["seq"].as_u64().unwrap();
    println!("acknowledged before kill -9: {acknowledged:?}; first seq after restart: {seq}");
    assert!(
        acknowledged.iter().all(|&a| seq > a),
        "seq {seq} was given again after the crash (acknowledged: {acknowledged:?})"
    );
    // A client that had seen seq 5 resumes across the hole.
    let mut stream = Http::new(d.http)
        .sse("/messages/crash", Some("crash:5"))
        .await;
    let gap = stream
        .expect(|f, _| f.event.as_deref() != Some("join"))
        .await;
    assert_eq!(gap.event.as_deref(), Some("gap"), "{}", gap.data);
    let g = gap.json();
    assert_eq!(g["from_seq"], 6);
    assert_eq!(g["to_seq"], seq - 1);
    let next = stream
        .expect(|f, _| f.event.as_deref() == Some("message"))
        .await;
    assert_eq!(next.json()["seq"], seq);
    let _ = d.terminate().await;
}

/// Defect 9.8: a retried `POST /message` with the same `Idempotency-Key`, on
/// another instance, answers the first send's receipt and sends nothing.
#[tokio::test]
async fn an_idempotency_key_sends_once_across_instances() {
    let dir = temp_dir();
    keyed_sends_across_instances(&sqlite_url(&dir)).await;
    if let Some(db) = PgDatabase::create().await {
        keyed_sends_across_instances(&db.url).await;
        db.drop_now().await;
    }
}

/// A retry through an instance whose clock runs 15 minutes ahead (more
/// than the 10-minute window) still finds the key a moment old: a key's age
/// is read on the database's clock. On the instances' own clocks, that
/// instance took the key for expired, and the retry was sent a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_sends_once_across_instances_whose_clocks_disagree() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let Some(ahead) = common::skewed_clock("+900s") else {
        return;
    };
    let one = poll_daemon(&db.url, "k1", &[]).await;
    let two = poll_daemon_env(&db.url, "k2", &[], &ahead).await;
    let (h1, h2) = (Http::new(one.http), Http::new(two.http));
    let key = "6c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f";
    let token = http_member(&h1, "erin", "clocks").await;
    let first = post_message(&h1, &token, "clocks", "once", Some(key)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let dave = http_member(&h2, "dave", "clocks").await;
    let gone = h1.post("/disconnect", Some(&token), &json!({})).await;
    assert_eq!(gone.status, 204);
    let deadline = Instant::now() + WAIT;
    let token = loop {
        let reply = h2.post("/connect", None, &json!({ "nick": "erin" })).await;
        if reply.status == 201 {
            break reply.json()["session"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "erin's nick was never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let joined = h2.command(&token, "/join clocks").await;
    assert_eq!(joined.status, 200, "{}", joined.text());
    let retry = post_message(&h2, &token, "clocks", "once", Some(key)).await;
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(retry.json(), first.json(), "a repeat on the other instance");
    // And the other way round: a key first used on the instance ahead.
    let other = "7d2e3f4a-5b6c-4d7e-8f9a-0b1c2d3e4f5a";
    let first = post_message(&h2, &dave, "clocks", "mine", Some(other)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let again = post_message(&h2, &dave, "clocks", "mine", Some(other)).await;
    assert_eq!(again.json(), first.json(), "a repeat on the instance ahead");
    drop((one, two));
    db.drop_now().await;
}

async fn keyed_sends_across_instances(db: &str) {
    let one = poll_daemon(db, "k1", &[]).await;
    let two = poll_daemon(db, "k2", &[]).await;
    let (h1, h2) = (Http::new(one.http), Http::new(two.http));
    let key = "0b9f6a1e-7d2c-4c47-9a53-5f0f2a1d9e11";

    let token = http_member(&h1, "carol", "keys").await;
    let first = post_message(&h1, &token, "keys", "exactly once", Some(key)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let again = post_message(&h1, &token, "keys", "exactly once", Some(key)).await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json(), first.json(), "a repeat on the same instance");
    // Her instance "died"; she retries on the other one.
    let gone = h1.post("/disconnect", Some(&token), &json!({})).await;
    assert_eq!(gone.status, 204);
    // The nick is freed cluster-wide a moment after the disconnect.
    let deadline = Instant::now() + WAIT;
    let token = loop {
        let reply = h2.post("/connect", None, &json!({ "nick": "carol" })).await;
        if reply.status == 201 {
            break reply.json()["session"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "carol's nick was never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let joined = h2.command(&token, "/join keys").await;
    assert_eq!(joined.status, 200, "{}", joined.text());
    let retry = post_message(&h2, &token, "keys", "exactly once", Some(key)).await;
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(retry.json(), first.json(), "a repeat on another instance");
    // Another nick's key space is its own; a new key is a new message.
    let dave = http_member(&h2, "dave", "keys").await;
    let other = post_message(&h2, &dave, "keys", "mine", Some(key)).await;
    assert_eq!(other.status, 200);
    assert_ne!(other.json()["seq"], first.json()["seq"]);

    let page = h2.get("/rooms/keys/history?limit=100").await.json();
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["exactly once", "mine"], "stored: {texts:?}");

    for bad in ["", &"k".repeat(65), "has space"] {
        let reply = post_message(&h2, &token, "keys", "x", Some(bad)).await;
        assert_eq!(reply.status, 400, "key {bad:?}: {}", reply.text());
        assert_eq!(reply.json()["code"], "bad-arguments");
    }
    drop((one, two));
}

/// The same on the local bus in async durability: a keyed send is stored
/// with its key before it is delivered, so a retry finds it.
#[tokio::test]
async fn an_idempotency_key_sends_once_on_the_local_bus() {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let d = Daemon::start(&["--db", db.as_str(), "--bus", "local"]).await;
    let http = Http::new(d.http);
    let token = http_member(&http, "erin", "solo").await;
    let first = post_message(&http, &token, "solo", "once", Some("retry-me")).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let next = post_message(&http, &token, "solo", "twice?", Some("retry-me")).await;
    assert_eq!(next.json(), first.json());
    let plain = post_message(&http, &token, "solo", "unkeyed", None).await;
    assert_eq!(
        plain.json()["seq"],
        first.json()["seq"].as_u64().unwrap() + 1,
        "a repeat uses no seq"
    );
    let page = http.get("/rooms/solo/history?limit=100").await.json();
    assert_eq!(page["messages"].as_array().unwrap().len(), 2, "{page}");
    let _ = d.terminate().await;
}

/// The reservation behind the local bus's numbering costs nothing visible on
/// an ordinary restart: a clean stop gives the unused block back, so the
/// next message follows the last one without a hole (SQLite and PostgreSQL).
#[tokio::test]
async fn a_clean_restart_of_the_local_bus_leaves_no_hole() {
    let dir = temp_dir();
    let pg = PgDatabase::create().await;
    let mut urls = vec![sqlite_url(&dir)];
    urls.extend(pg.as_ref().map(|db| db.url.clone()));
    for db in &urls {
        let args = ["--db", db.as_str(), "--bus", "local"];
        let d = Daemon::start(&args).await;
        let mut alice = Client::in_room(d.tcp, "alice", "calm").await;
        for i in 1..=3 {
            alice.send(&format!("m{i}")).await;
            alice
                .expect(|v| v["type"] == "message" && v["seq"] == i)
                .await;
        }
        assert_eq!(d.terminate().await, Some(0));
        let d = Daemon::start(&args).await;
        let mut alice = Client::in_room(d.tcp, "alice", "calm").await;
        alice.send("m4").await;
        let v = alice
            .expect(|v| v["type"] == "message" && v["text"] == "m4")
            .await;
        assert_eq!(v["seq"], 4, "{db}: a clean restart skipped seqs");
        let _ = d.terminate().await;
    }
    if let Some(db) = pg {
        db.drop_now().await;
    }
}
