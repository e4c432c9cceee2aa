//! A randomised soak of a three-instance cluster under every fault we can make
//! on one machine, checked against the cluster's promises.
//!
//! Senders chat in three rooms while three kinds of readers watch every room:
//! room streams (`/messages/{room}`, resuming with `Last-Event-ID`), session
//! streams (`/events`, resuming the session's rooms, or a new session that
//! re-joins with `/join ROOM SEQ`), and TCP clients (re-joining with
//! `/join ROOM SEQ` wherever they reconnect). Meanwhile a seeded schedule
//! drops readers' streams, freezes instances (SIGSTOP, up to past the lease),
//! kills and restarts them (SIGKILL), and pauses or cuts an instance's link to
//! the database through a proxy.
//!
//! At the end, with every fault lifted:
//! - every reader's view of every room is the room's gap-free `seq` list, or
//!   each hole in it was announced by a `gap` event; nobody got a message
//!   twice; every reader saw the same message at the same `seq`;
//! - every message a sender saw acknowledged is in storage with that `seq`;
//! - no two live sessions hold one nick.
//!
//! Bounded: `BABY_SOAK_SECS` of faults (default 30), then at most a minute
//! to converge. `BABY_SOAK_SEED` replays a schedule; the seed is printed.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use common::proxy::Proxy;
use common::{Daemon, PgDatabase};

const ROOMS: [&str; 3] = ["soak-a", "soak-b", "soak-c"];
/// A reader that hears nothing for this long takes its stream for dead and
/// goes elsewhere, as a client with a liveness check would.
const SILENCE: Duration = Duration::from_secs(4);
/// One HTTP request or TCP connect; a frozen instance never answers.
const ATTEMPT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------- cluster

/// One instance: how to start it, and the proxy between it and the database.
struct Node {
    args: Vec<String>,
    proxy: Proxy,
    daemon: Option<Daemon>,
}

/// Where clients can reach each instance right now (`None` while it is down).
type Addrs = Arc<Mutex<Vec<Option<(SocketAddr, SocketAddr)>>>>;

fn pick_addr(addrs: &Addrs, rng: &Rng64) -> Option<(SocketAddr, SocketAddr)> {
    let live: Vec<_> = addrs.lock().unwrap().iter().flatten().copied().collect();
    (!live.is_empty()).then(|| live[rng.below(live.len())])
}

/// A seeded generator shared by the tasks (the fault schedule is what the
/// seed replays; tasks interleave as the scheduler decides).
#[derive(Clone)]
struct Rng64(Arc<Mutex<StdRng>>);

impl Rng64 {
    fn below(&self, n: usize) -> usize {
        self.0.lock().unwrap().random_range(0..n)
    }
    fn millis(&self, from: u64, to: u64) -> Duration {
        Duration::from_millis(self.0.lock().unwrap().random_range(from..to))
    }
}

// ---------------------------------------------------------------- views

/// What one reader has seen of one room.
#[derive(Default, Debug)]
struct View {
    /// `seq` to message id.
    seqs: BTreeMap<u64, String>,
    /// Announced holes, inclusive.
    gaps: Vec<(u64, u64)>,
    /// Messages received again after they were already seen.
    duplicates: u64,
    /// The first few of those, for the failure message.
    duplicated: Vec<u64>,
}

impl View {
    fn cursor(&self) -> u64 {
        let last_seq = self.seqs.keys().next_back().copied().unwrap_or(0);
        let last_gap = self.gaps.iter().map(|g| g.1).max().unwrap_or(0);
        last_seq.max(last_gap)
    }

    fn take(&mut self, event: &Value) {
        match event["type"].as_str() {
            Some("message") => {
                let seq = event["seq"].as_u64().expect("a message has a seq");
                let id = event["id"].as_str().unwrap_or_default().to_owned();
                if self.seqs.insert(seq, id).is_some() {
                    self.duplicates += 1;
                    if self.duplicated.len() < 10 {
                        self.duplicated.push(seq);
                    }
                }
            }
            Some("gap") => {
                let from = event["from_seq"].as_u64().unwrap_or(0);
                let to = event["to_seq"].as_u64().unwrap_or(0);
                self.gaps.push((from, to));
            }
            _ => {}
        }
    }
}

/// Every reader's views, by reader name and room.
type Views = Arc<Mutex<BTreeMap<String, HashMap<String, View>>>>;

fn record(views: &Views, reader: &str, event: &Value) {
    let Some(room) = event["room"].as_str() else {
        return;
    };
    if !ROOMS.contains(&room) {
        return;
    }
    let mut views = views.lock().unwrap();
    let view = views
        .entry(reader.to_owned())
        .or_default()
        .entry(room.to_owned())
        .or_default();
    view.take(event);
}

fn cursor(views: &Views, reader: &str, room: &str) -> u64 {
    views
        .lock()
        .unwrap()
        .get(reader)
        .and_then(|v| v.get(room))
        .map_or(0, View::cursor)
}

/// The nick each live client holds now, by client name.
type Nicks = Arc<Mutex<BTreeMap<String, String>>>;

// ---------------------------------------------------------------- HTTP

/// A tolerant HTTP/1.1 exchange: `None` when the instance does not answer.
async fn request(
    http: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: Option<Value>,
) -> Option<(u16, Incoming, tokio::task::JoinHandle<()>)> {
    let fut = async {
        let stream = TcpStream::connect(http).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        let connection = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", http.to_string());
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let response = sender.send_request(req.body(Full::new(body)).ok()?).await;
        let (parts, body) = response.ok()?.into_parts();
        Some((parts.status.as_u16(), body, connection))
    };
    timeout(ATTEMPT, fut).await.ok().flatten()
}

async fn post(
    http: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> Option<(u16, Value)> {
    let mut headers = vec![("content-type", "application/json".to_owned())];
    if let Some(token) = token {
        headers.push(("authorization", format!("Bearer {token}")));
    }
    let (status, body, _conn) = request(http, Method::POST, path, &headers, Some(body)).await?;
    let bytes = timeout(ATTEMPT, body.collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Some((status, value))
}

/// Reads SSE frames, handing each event's JSON to `take`, until the stream
/// ends, stays silent for [`SILENCE`], is kicked, or the run stops.
async fn read_sse(
    mut body: Incoming,
    kick: &Notify,
    stop: &CancellationToken,
    last_id: &mut Option<String>,
    mut take: impl FnMut(&Value),
) {
    let mut buf = String::new();
    loop {
        let next = tokio::select! {
            next = timeout(SILENCE, body.frame()) => next,
            _ = kick.notified() => return,
            _ = stop.cancelled() => return,
        };
        let Ok(Some(Ok(frame))) = next else {
            return;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.push_str(&String::from_utf8_lossy(&data));
        while let Some(at) = buf.find("\n\n") {
            let raw: String = buf.drain(..at + 2).collect();
            for line in raw.lines() {
                // EventSource's memory: the last id seen, sent on reconnect.
                if let Some(id) = line.strip_prefix("id:") {
                    *last_id = Some(id.trim_start().to_owned());
                }
                if let Some(data) = line.strip_prefix("data:")
                    && let Ok(event) = serde_json::from_str::<Value>(data.trim_start())
                {
                    take(&event);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- readers

/// Reads `/messages/{room}`, resuming with `Last-Event-ID` on any instance.
async fn room_reader(name: String, room: &'static str, ctx: Ctx, kick: Arc<Notify>) {
    while !ctx.stop.is_cancelled() {
        let Some((_, http)) = pick_addr(&ctx.addrs, &ctx.rng) else {
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        let last = format!("{room}:{}", cursor(&ctx.views, &name, room));
        let headers = [
            ("accept", "text/event-stream".to_owned()),
            ("last-event-id", last),
        ];
        match request(
            http,
            Method::GET,
            &format!("/messages/{room}"),
            &headers,
            None,
        )
        .await
        {
            Some((200, body, _conn)) => {
                let mut last_id = None;
                read_sse(body, &kick, &ctx.stop, &mut last_id, |e| {
                    record(&ctx.views, &name, e)
                })
                .await;
            }
            _ => sleep(Duration::from_millis(200)).await,
        }
    }
}

/// An HTTP session in every room, reading `/events`. Resumes its own session
/// while its instance keeps it; otherwise opens a new session anywhere and
/// re-joins every room with `/join ROOM SEQ`.
async fn session_reader(name: String, ctx: Ctx, kick: Arc<Notify>) {
    let mut session: Option<(SocketAddr, String)> = None;
    // The last SSE id this session's streams carried, as EventSource keeps it.
    let mut last_id: Option<String> = None;
    let mut lives = 0;
    while !ctx.stop.is_cancelled() {
        let (http, token) = match session.clone() {
            Some(s) => s,
            None => {
                let Some((_, http)) = pick_addr(&ctx.addrs, &ctx.rng) else {
                    sleep(Duration::from_millis(200)).await;
                    continue;
                };
                lives += 1;
                let nick = format!("{name}-{lives}");
                let Some((201, v)) = post(http, "/connect", None, json!({ "nick": nick })).await
                else {
                    sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let token = v["session"].as_str().unwrap_or_default().to_owned();
                ctx.nicks.lock().unwrap().insert(
                    name.clone(),
                    v["nick"].as_str().unwrap_or_default().to_owned(),
                );
                let mut joined = true;
                for room in ROOMS {
                    let line = format!("/join {room} {}", cursor(&ctx.views, &name, room));
                    match post(http, "/command", Some(&token), json!({ "line": line })).await {
                        Some((200, v)) => {
                            for event in v["events"].as_array().into_iter().flatten() {
                                record(&ctx.views, &name, event);
                            }
                        }
                        _ => joined = false,
                    }
                }
                if !joined {
                    ctx.nicks.lock().unwrap().remove(&name);
                    continue; // a half-joined session is abandoned
                }
                session = Some((http, token.clone()));
                last_id = None;
                (http, token)
            }
        };
        let mut headers = vec![("accept", "text/event-stream".to_owned())];
        if let Some(last) = &last_id {
            headers.push(("last-event-id", last.clone()));
        }
        let path = format!("/events?session={token}");
        match request(http, Method::GET, &path, &headers, None).await {
            Some((200, body, _conn)) => {
                let nicks = ctx.nicks.clone();
                let me = name.clone();
                read_sse(body, &kick, &ctx.stop, &mut last_id, |e| {
                    record(&ctx.views, &name, e);
                    follow_rename(&nicks, &me, e, None);
                })
                .await;
            }
            // The session is gone (401) or its instance does not answer:
            // start over somewhere.
            _ => {
                ctx.nicks.lock().unwrap().remove(&name);
                session = None;
            }
        }
    }
}

/// A TCP client in every room that re-joins with `/join ROOM SEQ` wherever it
/// reconnects.
async fn tcp_reader(name: String, ctx: Ctx, kick: Arc<Notify>) {
    let mut lives = 0;
    while !ctx.stop.is_cancelled() {
        let Some((tcp, _)) = pick_addr(&ctx.addrs, &ctx.rng) else {
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(Ok(stream)) = timeout(ATTEMPT, TcpStream::connect(tcp)).await else {
            continue;
        };
        lives += 1;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut hello = format!("/format json\n/nick {name}-{lives}\n");
        for room in ROOMS {
            hello.push_str(&format!(
                "/join {room} {}\n",
                cursor(&ctx.views, &name, room)
            ));
        }
        if write.write_all(hello.as_bytes()).await.is_err() {
            continue;
        }
        let asked = format!("{name}-{lives}");
        loop {
            let line = tokio::select! {
                line = timeout(SILENCE, lines.next_line()) => line,
                _ = kick.notified() => break,
                _ = ctx.stop.cancelled() => break,
            };
            let Ok(Ok(Some(line))) = line else { break };
            if let Ok(event) = serde_json::from_str::<Value>(&line) {
                record(&ctx.views, &name, &event);
                follow_rename(&ctx.nicks, &name, &event, Some(&asked));
            }
        }
        ctx.nicks.lock().unwrap().remove(&name);
    }
}

/// Keeps a client's nick up to date: it holds `asked` once the server
/// confirms it (a `/nick` can be refused, e.g. while the directory is
/// unreachable), and follows the server's renames.
fn follow_rename(nicks: &Nicks, client: &str, event: &Value, asked: Option<&str>) {
    if event["type"] != "nick" {
        return;
    }
    let mut nicks = nicks.lock().unwrap();
    let new = event["new"].as_str().unwrap_or_default();
    if asked.is_some_and(|a| a.eq_ignore_ascii_case(new)) {
        nicks.insert(client.to_owned(), new.to_owned());
        return;
    }
    if let Some(mine) = nicks.get_mut(client)
        && event["old"]
            .as_str()
            .is_some_and(|o| o.eq_ignore_ascii_case(mine))
    {
        *mine = event["new"].as_str().unwrap_or_default().to_owned();
    }
}

// ---------------------------------------------------------------- senders

/// A message a sender saw come back with its seq.
#[derive(Debug, Clone)]
struct Acked {
    room: String,
    seq: u64,
    id: String,
}

/// Chats in one room over TCP, five lines a second; moves to another
/// instance when its connection dies.
async fn sender(name: String, room: &'static str, ctx: Ctx, acked: Arc<Mutex<Vec<Acked>>>) {
    let mut n = 0u64;
    let mut lives = 0;
    while !ctx.stop.is_cancelled() {
        let Some((tcp, _)) = pick_addr(&ctx.addrs, &ctx.rng) else {
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(Ok(stream)) = timeout(ATTEMPT, TcpStream::connect(tcp)).await else {
            continue;
        };
        lives += 1;
        let nick = format!("{name}-{lives}");
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let hello = format!("/format json\n/nick {nick}\n/join {room}\n");
        if write.write_all(hello.as_bytes()).await.is_err() {
            continue;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                _ = ctx.stop.cancelled() => break,
                _ = tick.tick() => {
                    if heard.elapsed() > SILENCE {
                        break; // its instance is frozen or gone
                    }
                    n += 1;
                    let line = format!("{name}:{n}\n");
                    if write.write_all(line.as_bytes()).await.is_err() {
                        break;
                    }
                }
                line = lines.next_line() => {
                    let Ok(Some(line)) = line else { break };
                    heard = Instant::now();
                    let Ok(event) = serde_json::from_str::<Value>(&line) else { continue };
                    follow_rename(&ctx.nicks, &name, &event, Some(&nick));
                    let mine = event["text"].as_str().is_some_and(|t| t.starts_with(&format!("{name}:")));
                    if event["type"] == "message" && mine {
                        acked.lock().unwrap().push(Acked {
                            room: room.to_owned(),
                            seq: event["seq"].as_u64().unwrap_or(0),
                            id: event["id"].as_str().unwrap_or_default().to_owned(),
                        });
                    }
                }
            }
        }
        ctx.nicks.lock().unwrap().remove(&name);
    }
}

/// Every second or two, asks some instance for a nick a live client holds.
/// It must be refused while the holder lives; if it is granted (the holder's
/// instance stalled past the lease), the holder must end up renamed.
async fn thief(ctx: Ctx, won: Arc<Mutex<Vec<(SocketAddr, String, String)>>>) {
    loop {
        sleep(ctx.rng.millis(700, 2_000)).await;
        let victims: Vec<String> = ctx.nicks.lock().unwrap().values().cloned().collect();
        if victims.is_empty() {
            continue;
        }
        let nick = victims[ctx.rng.below(victims.len())].clone();
        let Some((_, http)) = pick_addr(&ctx.addrs, &ctx.rng) else {
            continue;
        };
        if let Some((201, v)) = post(http, "/connect", None, json!({ "nick": nick })).await {
            let token = v["session"].as_str().unwrap_or_default().to_owned();
            eprintln!("soak: a newcomer was given {nick}");
            won.lock().unwrap().push((http, token, nick));
        }
    }
}

// ---------------------------------------------------------------- faults

#[derive(Clone)]
struct Ctx {
    addrs: Addrs,
    views: Views,
    nicks: Nicks,
    rng: Rng64,
    stop: CancellationToken,
}

async fn start_node(node: &mut Node, slot: usize, addrs: &Addrs) {
    let args: Vec<&str> = node.args.iter().map(String::as_str).collect();
    let daemon = Daemon::start(&args).await;
    addrs.lock().unwrap()[slot] = Some((daemon.tcp, daemon.http));
    node.daemon = Some(daemon);
}

/// Runs one fault and lifts it; returns what it did, for the log.
async fn fault(nodes: &mut [Node], addrs: &Addrs, rng: &Rng64, kicks: &[Arc<Notify>]) -> String {
    let i = rng.below(nodes.len());
    match rng.below(5) {
        0 => {
            let k = rng.below(kicks.len());
            kicks[k].notify_one();
            format!("dropped reader {k}'s stream")
        }
        1 => {
            let pause = rng.millis(1_000, 13_000);
            let daemon = nodes[i].daemon.as_ref().expect("running");
            daemon.freeze();
            sleep(pause).await; // the fault's length, not a synchronisation
            daemon.thaw();
            format!("froze instance {i} for {pause:?}")
        }
        2 => {
            let down = rng.millis(0, 2_000);
            addrs.lock().unwrap()[i] = None;
            nodes[i].daemon.as_mut().expect("running").kill9().await;
            sleep(down).await;
            start_node(&mut nodes[i], i, addrs).await;
            format!("killed instance {i}, restarted after {down:?}")
        }
        3 => {
            let pause = rng.millis(1_000, 6_000);
            nodes[i].proxy.pause();
            sleep(pause).await;
            nodes[i].proxy.resume();
            format!("paused instance {i}'s database link for {pause:?}")
        }
        _ => {
            let cut = rng.millis(500, 4_000);
            nodes[i].proxy.cut();
            sleep(cut).await;
            nodes[i].proxy.resume();
            format!("cut instance {i}'s database link for {cut:?}")
        }
    }
}

// ---------------------------------------------------------------- the test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_under_random_faults_loses_nothing_silently() {
    soak("poll").await;
}

/// The same on the redis bus: Redis orders and carries the messages, and the
/// faults on the database link test persistence (it must catch up with
/// nothing lost) rather than ordering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_under_random_faults_loses_nothing_silently() {
    let Some(redis) = common::shared_redis().await else {
        return;
    };
    soak(&redis).await;
}

async fn soak(bus: &str) {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let seed = std::env::var("BABY_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let secs: u64 = std::env::var("BABY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    eprintln!(
        "soak: seed {seed} (BABY_SOAK_SEED={seed} replays the fault schedule), {secs} s of faults"
    );
    let rng = Rng64(Arc::new(Mutex::new(StdRng::seed_from_u64(seed))));
    let cluster = format!("soak{seed:x}");
    eprintln!("soak: --bus {bus} --cluster {cluster}");

    let upstream = pg.address();
    let addrs: Addrs = Arc::new(Mutex::new(vec![None; 3]));
    let mut nodes = Vec::new();
    for i in 0..3 {
        let proxy = Proxy::start(upstream).await;
        let db = proxy.url_for(&pg.url);
        let args = [
            "--db",
            &db,
            "--bus",
            bus,
            "--instance",
            &format!("soak-{i}"),
            "--cluster",
            &cluster,
        ];
        nodes.push(Node {
            args: args.iter().map(|s| s.to_string()).collect(),
            proxy,
            daemon: None,
        });
    }
    for (i, node) in nodes.iter_mut().enumerate() {
        start_node(node, i, &addrs).await;
    }

    let ctx = Ctx {
        addrs: addrs.clone(),
        views: Views::default(),
        nicks: Nicks::default(),
        rng: rng.clone(),
        stop: CancellationToken::new(),
    };
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut kicks = Vec::new();
    for (r, room) in ROOMS.iter().enumerate() {
        let kick = Arc::new(Notify::new());
        kicks.push(kick.clone());
        tasks.spawn(room_reader(format!("room{r}"), room, ctx.clone(), kick));
    }
    for k in 0..2 {
        let kick = Arc::new(Notify::new());
        kicks.push(kick.clone());
        tasks.spawn(session_reader(format!("sess{k}"), ctx.clone(), kick));
        let kick = Arc::new(Notify::new());
        kicks.push(kick.clone());
        tasks.spawn(tcp_reader(format!("tcp{k}"), ctx.clone(), kick));
    }
    // Sessions and TCP readers are in before anyone speaks (room readers
    // resume from seq 0, so they miss nothing either way).
    wait_until(Duration::from_secs(20), || {
        ctx.nicks.lock().unwrap().len() >= 4
    })
    .await;
    let mut senders = tokio::task::JoinSet::new();
    for (r, room) in ROOMS.iter().enumerate() {
        for s in 0..2 {
            senders.spawn(sender(
                format!("snd{r}{s}"),
                room,
                ctx.clone(),
                acked.clone(),
            ));
        }
    }

    let thieves = Arc::new(Mutex::new(Vec::new()));
    senders.spawn(thief(ctx.clone(), thieves.clone()));

    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        sleep(rng.millis(500, 2_500)).await;
        let did = fault(&mut nodes, &addrs, &rng, &kicks).await;
        eprintln!("soak: {did}");
    }
    // Lift everything, then let the chat settle.
    for node in &nodes {
        node.proxy.resume();
        if let Some(d) = &node.daemon {
            d.thaw();
        }
    }
    senders.shutdown().await;

    // The truth is what storage holds once the thawed instances have
    // finished what they had in flight: wait until every reader has caught
    // up with it, reading it again each time.
    let settle = Instant::now() + Duration::from_secs(60);
    let (stored, top, caught_up) = loop {
        let stored = stored_messages(&pg.url).await;
        let top: HashMap<&str, u64> = ROOMS
            .iter()
            .map(|r| {
                (
                    *r,
                    stored
                        .get(*r)
                        .and_then(|m| m.keys().next_back().copied())
                        .unwrap_or(0),
                )
            })
            .collect();
        let caught_up = {
            let views = ctx.views.lock().unwrap();
            views.len() == 7
                && views.iter().all(|(reader, rooms)| {
                    rooms_of(reader)
                        .iter()
                        .all(|r| rooms.get(*r).map_or(0, View::cursor) >= top[r])
                })
        };
        // On the redis bus storage is written behind delivery: wait for it
        // to hold every acknowledged message too.
        let persisted = acked
            .lock()
            .unwrap()
            .iter()
            .all(|a| stored.get(&a.room).and_then(|m| m.get(&a.seq)) == Some(&a.id));
        if (caught_up && persisted) || Instant::now() > settle {
            break (stored, top, caught_up);
        }
        sleep(Duration::from_millis(500)).await;
    };
    // A thief's session counts while its instance still has it.
    let won = thieves.lock().unwrap().clone();
    for (k, (http, token, nick)) in won.into_iter().enumerate() {
        if let Some((200, _)) =
            post(http, "/command", Some(&token), json!({ "line": "/help" })).await
        {
            ctx.nicks.lock().unwrap().insert(format!("thief{k}"), nick);
        }
    }
    let nicks_settled = wait_until(Duration::from_secs(20), || distinct_nicks(&ctx.nicks)).await;
    ctx.stop.cancel();
    tasks.shutdown().await;

    // Every reader's view: gap-free or announced, no duplicates, same ids.
    let views = std::mem::take(&mut *ctx.views.lock().unwrap());
    let mut failures = Vec::new();
    if !caught_up {
        let cursors: Vec<_> = views
            .iter()
            .map(|(n, v)| {
                (
                    n,
                    rooms_of(n)
                        .iter()
                        .map(|r| v.get(*r).map_or(0, View::cursor))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        failures.push(format!(
            "readers did not catch up with storage {top:?}: {cursors:?}"
        ));
    }
    for (reader, rooms) in views.iter() {
        for room in ROOMS {
            let Some(view) = rooms.get(room) else {
                continue;
            };
            let mut silent = Vec::new();
            for seq in 1..=top[room].min(view.cursor()) {
                let announced = view.gaps.iter().any(|&(a, b)| a <= seq && seq <= b);
                if !view.seqs.contains_key(&seq) && !announced {
                    silent.push(seq);
                }
            }
            if !silent.is_empty() {
                failures.push(format!(
                    "{reader} #{room}: {} seqs missing without a gap event: {:?}",
                    silent.len(),
                    &silent[..silent.len().min(20)]
                ));
            }
            if view.duplicates > 0 {
                failures.push(format!(
                    "{reader} #{room}: {} duplicates, e.g. seqs {:?}",
                    view.duplicates, view.duplicated
                ));
            }
            for (seq, id) in &view.seqs {
                if let Some(stored_id) = stored.get(room).and_then(|m| m.get(seq))
                    && stored_id != id
                {
                    failures.push(format!(
                        "{reader} #{room}:{seq} is {id}, storage has {stored_id}"
                    ));
                }
            }
        }
    }
    // Every acknowledged message is stored with the seq it was acknowledged with.
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let lost: Vec<_> = acked
        .iter()
        .filter(|a| stored.get(&a.room).and_then(|m| m.get(&a.seq)) != Some(&a.id))
        .collect();
    if !lost.is_empty() {
        failures.push(format!(
            "{} acknowledged messages not in storage: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        ));
    }
    if !nicks_settled {
        failures.push(format!(
            "two live clients hold one nick: {:?}",
            ctx.nicks.lock().unwrap()
        ));
    }
    eprintln!(
        "soak: {} acknowledged, {} readers checked, stored {:?}",
        acked.len(),
        views.len(),
        top
    );
    for node in &mut nodes {
        node.daemon.take();
    }
    pg.drop_now().await;
    if bus.starts_with("redis") {
        common::forget_redis_cluster(bus, &cluster);
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}

/// The rooms a reader follows: a room stream one, the others all.
fn rooms_of(reader: &str) -> &'static [&'static str] {
    match reader
        .strip_prefix("room")
        .and_then(|i| i.parse::<usize>().ok())
    {
        Some(i) => &ROOMS[i..=i],
        None => &ROOMS,
    }
}

/// Polls `done` until it holds or `limit` passes; true if it held.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        sleep(Duration::from_millis(100)).await;
    }
    done()
}

fn distinct_nicks(nicks: &Nicks) -> bool {
    let nicks = nicks.lock().unwrap();
    let keys: HashSet<String> = nicks.values().map(|n| n.to_lowercase()).collect();
    keys.len() == nicks.len()
}

/// Every stored message of the soak's rooms: room → seq → id.
async fn stored_messages(url: &str) -> HashMap<String, BTreeMap<u64, String>> {
    use sqlx::{Connection, Row};
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .expect("the database");
    let rows = sqlx::query("SELECT room, seq, id FROM messages")
        .fetch_all(&mut conn)
        .await
        .expect("messages");
    let mut out: HashMap<String, BTreeMap<u64, String>> = HashMap::new();
    for row in rows {
        let room: String = row.get("room");
        let seq: i64 = row.get("seq");
        let id: String = row.get("id");
        out.entry(room).or_default().insert(seq as u64, id);
    }
    out
}
