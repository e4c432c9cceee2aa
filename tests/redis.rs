//! Three real daemons behaving as one chat through Redis (`--bus redis://`).
//!
//! On the machine's Redis (127.0.0.1:6379, or `BABY_TEST_REDIS`), each test
//! under its own `--cluster` name; the restart test starts a private
//! `redis-server` on a free port instead, since it kills it. Without Redis the
//! tests skip with a printed reason (fail under `BABY_REQUIRE_SERVICES=1`).

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http::Http;
use common::{Client, Daemon, PgDatabase, services_required, temp_dir};
use serde_json::Value;

/// A cluster name no other test uses.
fn cluster_name(test: &str) -> String {
    format!("t-{test}-{}-{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// The command line of instance `name` of `cluster` on bus `bus` and `db`.
fn instance_args<'a>(db: &'a str, bus: &'a str, cluster: &'a str, name: &'a str) -> [&'a str; 8] {
    [
        "--db",
        db,
        "--bus",
        bus,
        "--cluster",
        cluster,
        "--instance",
        name,
    ]
}

async fn start_cluster(bus: &str, db: &str, cluster: &str, extra: &[&str]) -> Vec<Daemon> {
    let mut daemons = Vec::new();
    for name in ["i1", "i2", "i3"] {
        let mut args = instance_args(db, bus, cluster, name).to_vec();
        args.extend_from_slice(extra);
        daemons.push(Daemon::start(&args).await);
    }
    daemons
}

/// The shared Redis and a fresh PostgreSQL database, or `None` (the test
/// skips, or fails under `BABY_REQUIRE_SERVICES`) when either is missing.
async fn redis_and_postgres() -> Option<(String, PgDatabase)> {
    let redis = common::shared_redis().await?;
    Some((redis, PgDatabase::create().await?))
}

/// Three instances of a fresh cluster on the shared Redis and one SQLite
/// file, alice on the first and carol on the third, both in #general, alice
/// having seen carol join.
struct AliceAndCarol {
    redis: String,
    db: String,
    cluster: String,
    daemons: Vec<Daemon>,
    alice: Client,
    carol: Client,
    _dir: tempfile::TempDir,
}

/// [`AliceAndCarol`] for cluster `test`, or `None` (the test skips, or
/// fails under `BABY_REQUIRE_SERVICES`) when Redis is missing.
async fn alice_and_carol(test: &str) -> Option<AliceAndCarol> {
    let redis = common::shared_redis().await?;
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let cluster = cluster_name(test);
    let daemons = start_cluster(&redis, &db, &cluster, &[]).await;
    let mut alice = Client::in_room(daemons[0].tcp, "alice", "general").await;
    let carol = Client::in_room(daemons[2].tcp, "carol", "general").await;
    alice
        .expect(|v| v["type"] == "join" && v["nick"] == "carol")
        .await;
    Some(AliceAndCarol {
        redis,
        db,
        cluster,
        daemons,
        alice,
        carol,
        _dir: dir,
    })
}

/// Reads `n` room messages, returning seq -> (id, text).
async fn messages(client: &mut Client, n: usize) -> BTreeMap<u64, (String, String)> {
    let mut seen = BTreeMap::new();
    while seen.len() < n {
        let v = client.expect(|v| v["type"] == "message").await;
        let seq = v["seq"].as_u64().unwrap();
        let entry = (
            v["id"].as_str().unwrap().to_owned(),
            v["text"].as_str().unwrap().to_owned(),
        );
        assert!(
            seen.insert(seq, entry).is_none(),
            "seq {seq} delivered twice"
        );
    }
    seen
}

async fn presence(client: &mut Client, kind: &str, n: usize) -> Vec<String> {
    let mut nicks = Vec::new();
    while nicks.len() < n {
        let v = client.expect(|v| v["type"] == kind).await;
        nicks.push(v["nick"].as_str().unwrap().to_owned());
    }
    nicks.sort();
    nicks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_behave_as_one_on_redis() {
    let Some(redis) = common::shared_redis().await else {
        return;
    };
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let cluster = cluster_name("chat");
    let mut daemons = start_cluster(&redis, &db, &cluster, &[]).await;

    let mut alice = Client::in_room(daemons[0].tcp, "alice", "general").await;
    let mut bob = Client::in_room(daemons[1].tcp, "bob", "general").await;
    let mut carol = Client::in_room(daemons[2].tcp, "carol", "general").await;
    assert_eq!(presence(&mut alice, "join", 2).await, ["bob", "carol"]);

    // A nick is unique across the cluster, whatever the case.
    let mut mallory = Client::json(daemons[1].tcp, "mallory").await;
    mallory.send("/nick ALICE").await;
    mallory.expect_error("nick-taken").await;

    // Everyone talks at once, from three instances: one order everywhere.
    for i in 0..10 {
        alice.send(&format!("a{i}")).await;
        bob.send(&format!("b{i}")).await;
        carol.send(&format!("c{i}")).await;
    }
    let a = messages(&mut alice, 30).await;
    let b = messages(&mut bob, 30).await;
    let c = messages(&mut carol, 30).await;
    assert_eq!(
        a.keys().copied().collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>(),
        "no gap"
    );
    assert_eq!(
        a, b,
        "every instance sees the same seq for the same message"
    );
    assert_eq!(a, c);

    carol.send("/who").await;
    let who = carol.expect(|v| v["type"] == "reply").await;
    assert_eq!(
        who["data"]["members"],
        serde_json::json!(["alice", "bob", "carol"])
    );
    bob.send("/rooms").await;
    let rooms = bob.expect(|v| v["type"] == "reply").await;
    assert_eq!(
        rooms["data"]["rooms"],
        serde_json::json!([{"room": "general", "members": 3}])
    );

    // Direct messages cross instances.
    alice.send("/msg Carol psst").await;
    let dm = carol.expect(|v| v["type"] == "dm").await;
    assert_eq!(
        (dm["from"].as_str(), dm["to"].as_str(), dm["text"].as_str()),
        (Some("alice"), Some("carol"), Some("psst"))
    );
    let echo = alice.expect(|v| v["type"] == "dm").await;
    assert_eq!(echo["id"], dm["id"]);
    alice.send("/msg nobody hi").await;
    alice.expect_error("no-such-nick").await;

    // A late joiner on any instance gets the same last ten.
    let mut dave = Client::json(daemons[2].tcp, "dave").await;
    dave.send("/join general").await;
    dave.expect(|v| v["type"] == "join").await;
    let replay = messages(&mut dave, 10).await;
    assert_eq!(
        replay.keys().copied().collect::<Vec<_>>(),
        (21..=30).collect::<Vec<_>>()
    );

    // Renames and leaves cross instances.
    carol.send("/nick Caroline").await;
    let nick = alice.expect(|v| v["type"] == "nick").await;
    assert_eq!(
        (nick["old"].as_str(), nick["new"].as_str()),
        (Some("carol"), Some("Caroline"))
    );
    dave.send("/leave").await;
    assert_eq!(presence(&mut bob, "leave", 1).await, ["dave"]);

    // A room stream on an instance with no member there still follows the room.
    let mut stream = Http::new(daemons[1].http)
        .sse("/messages/lobby", None)
        .await;
    alice.send("/join lobby").await;
    alice.send("anyone?").await;
    let f = stream.expect(|_, v| v["type"] == "message").await;
    assert_eq!(
        (f.id.as_deref(), f.json()["text"].as_str()),
        (Some("lobby:1"), Some("anyone?"))
    );
    alice.send("/switch general").await;
    alice
        .expect(|v| v["type"] == "reply" && v["command"] == "switch")
        .await;

    // Killing one instance: the others go on, its members leave, its nicks free up.
    drop(daemons.pop()); // SIGKILL i3: Caroline and dave vanish without a word
    alice.send("still here").await;
    let m = bob.expect(|v| v["type"] == "message").await;
    assert_eq!(
        (m["seq"].as_u64(), m["text"].as_str()),
        (Some(31), Some("still here"))
    );
    // Once its lease runs out, its members are gone from /who, and their
    // leaving was announced to the rooms' members elsewhere.
    who_becomes(&mut alice, &["alice", "bob"], Duration::from_secs(20)).await;
    let left = bob
        .expect(|v| v["type"] == "leave" && v["nick"] == "Caroline")
        .await;
    assert_eq!(left["room"], "general");
    let mut newcomer = Client::json(daemons[0].tcp, "newcomer").await;
    let started = Instant::now();
    loop {
        newcomer.send("/nick Caroline").await;
        let v = newcomer
            .expect(|v| v["type"] == "nick" || v["type"] == "error")
            .await;
        if v["type"] == "nick" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the nick lease never ran out"
        );
        tokio::time::sleep(Duration::from_millis(300)).await; // polling a lease, not synchronising
    }
    drop(daemons);
    common::forget_redis_cluster(&redis, &cluster);
}

/// The test's own `redis-server`, on a free port with AOF on, in a temp dir.
struct PrivateRedis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl PrivateRedis {
    /// A private server with `extra` settings (e.g. a cluster node's).
    fn start_with(extra: &[&str]) -> Option<PrivateRedis> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut redis = PrivateRedis {
            child: None,
            port,
            dir: temp_dir(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        redis.spawn().ok()?;
        Some(redis)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--daemonize", "no"])
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    async fn ready(&self) {
        let addr = format!("127.0.0.1:{}", self.port);
        let started = Instant::now();
        while common::ping(&addr).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server and starts it again on the same port (with its
    /// data if AOF is on, without if not).
    async fn restart(&mut self) {
        self.kill();
        self.spawn().expect("redis-server restarts");
        self.ready().await;
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server runs").id();
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn healthz(addr: SocketAddr) -> (u16, Value) {
    let reply = Http::new(addr).get("/healthz").await;
    (reply.status, reply.json())
}

/// Two users in #general, on `first`'s and `second`'s instances, the first
/// having seen the second join.
async fn two_in_general(first: (&Daemon, &str), second: (&Daemon, &str)) -> (Client, Client) {
    let mut one = Client::in_room(first.0.tcp, first.1, "general").await;
    let two = Client::in_room(second.0.tcp, second.1, "general").await;
    one.expect(|v| v["type"] == "join" && v["nick"] == second.1)
        .await;
    (one, two)
}

/// Asks `/who` until it lists exactly `members`, for up to `within`: what
/// it waits for (a lease running out, a heartbeat's retry) sends no event
/// of its own to wait for.
async fn who_becomes(client: &mut Client, members: &[&str], within: Duration) {
    let started = Instant::now();
    loop {
        client.send("/who").await;
        let who: Value = client.expect(|v| v["type"] == "reply").await;
        if who["data"]["members"] == serde_json::json!(members) {
            return;
        }
        assert!(
            started.elapsed() < within,
            "/who did not list {members:?} within {within:?}: {who}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await; // polling, not synchronising
    }
}

/// Waits until alice sees carol leave: her instance (frozen by the caller)
/// has been reaped, a lease and a heartbeat or two after it stopped.
async fn carol_left(alice: &mut Client) {
    let gone = expect_within(alice, Duration::from_secs(16), |v| v["type"] == "leave").await;
    assert_eq!(gone["nick"], "carol");
}

/// A private `redis-server` started with `extra` settings, and instances
/// i1 and i2 of one cluster on it; `None` (skipped, or failed under
/// `BABY_REQUIRE_SERVICES`) without redis-server.
async fn two_instances_on_a_private_redis(
    extra: &[&str],
) -> Option<(PrivateRedis, Daemon, Daemon, tempfile::TempDir)> {
    // No Redis here means no redis-server either.
    common::shared_redis().await?;
    let Some(redis) = PrivateRedis::start_with(extra) else {
        if services_required() {
            panic!("redis-server could not be started");
        }
        eprintln!("SKIPPED: redis-server could not be started");
        return None;
    };
    redis.ready().await;
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let url = redis.url();
    let mut daemons = Vec::new();
    for name in ["i1", "i2"] {
        daemons.push(Daemon::start(&instance_args(&db, &url, "private", name)).await);
    }
    let b = daemons.pop()?;
    let a = daemons.pop()?;
    Some((redis, a, b, dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_refuses_then_resumes_without_a_hole() {
    let Some((mut redis, a, b, _dir)) = two_instances_on_a_private_redis(&[]).await else {
        return;
    };
    let (mut alice, mut bob) = two_in_general((&a, "alice"), (&b, "bob")).await;
    for i in 1..=5 {
        alice.send(&format!("before {i}")).await;
    }
    messages(&mut bob, 5).await;

    redis.kill();
    // Refused quickly, and said so by /healthz.
    let asked = Instant::now();
    alice.send("while down").await;
    alice.expect_error("unavailable").await;
    assert!(
        asked.elapsed() < Duration::from_millis(1500),
        "{:?}",
        asked.elapsed()
    );
    let (status, body) = healthz(a.http).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["problems"].to_string().contains("bus"), "{body}");

    // Back (same data, thanks to AOF): chat resumes within 5 s.
    redis.spawn().expect("redis-server restarts");
    redis.ready().await;
    let after = |v: &Value| v["type"] == "message" && v["text"] == "after";
    send_until(&mut alice, "after", Duration::from_secs(5), after).await;
    // bob sees the next seq after the 5 before: nothing skipped, nothing twice.
    let m = tokio::time::timeout(
        Duration::from_secs(9),
        bob.expect(|v| v["type"] == "message"),
    )
    .await
    .unwrap_or_else(|_| panic!("bob heard nothing:\n{}\n---\n{}", a.logs(), b.logs()));
    assert_eq!(
        (m["seq"].as_u64(), m["text"].as_str()),
        (Some(6), Some("after"))
    );
    drop((a, b));
}

/// The lease, and how long after an outage every instance has renewed.
const LEASE: Duration = Duration::from_secs(10);

/// From the moment the shared state is back: `thief` (on the other instance)
/// asks for alice's nick again and again for longer than a lease, as a user
/// who saw her go quiet would. It must never get it: at first the cluster
/// says it is recovering, then that the nick is taken. Nobody may see alice
/// leave either: her instance never went away.
async fn try_to_take_alice(thief: &mut Client, alice: &mut Client) {
    let back = Instant::now();
    let mut answers = Vec::new();
    while back.elapsed() < LEASE + Duration::from_secs(3) {
        thief.send("/nick alice").await;
        let answer = loop {
            let v = thief.event().await;
            assert!(
                !(v["type"] == "leave" && v["nick"] == "alice"),
                "alice was announced as gone although her instance is up: {v}"
            );
            match v["type"].as_str() {
                Some("nick") => panic!(
                    "alice's nick was given away {:?} after the outage: {v}",
                    back.elapsed()
                ),
                Some("error") => break v["code"].as_str().unwrap_or_default().to_owned(),
                _ => {}
            }
        };
        answers.push(answer);
        tokio::time::sleep(Duration::from_millis(250)).await; // retrying, as a user would
    }
    assert_eq!(
        answers.last().map(String::as_str),
        Some("nick-taken"),
        "once recovered, the cluster says the nick is taken: {answers:?}"
    );
    // alice still is alice, and can still talk.
    alice.send("still here").await;
    let v = alice
        .expect(|v| v["type"] == "nick" || (v["type"] == "message" && v["text"] == "still here"))
        .await;
    assert_eq!(v["nick"], "alice", "{v}");
}

/// Redis restarted without its data: every lease is gone, and so is every
/// instance's registration. The instance that asks first must not be handed
/// a connected user's nick, nor reap the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_gives_no_live_user_s_nick_away() {
    let Some((mut redis, a, b, _dir)) =
        two_instances_on_a_private_redis(&["--appendonly", "no"]).await
    else {
        return;
    };
    let (mut alice, mut thief) = two_in_general((&a, "alice"), (&b, "thief")).await;

    redis.restart().await;
    try_to_take_alice(&mut thief, &mut alice).await;
    drop((a, b));
}

/// Redis frozen for longer than the lease: on its clock every lease ran out
/// meanwhile, though no instance stopped renewing by any fault of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_frozen_longer_than_the_lease_gives_no_live_user_s_nick_away() {
    let Some((redis, a, b, _dir)) = two_instances_on_a_private_redis(&[]).await else {
        return;
    };
    let (mut alice, mut thief) = two_in_general((&a, "alice"), (&b, "thief")).await;

    redis.signal("STOP");
    // The thief's first attempt waits in Redis's socket through the freeze.
    thief.send("/nick alice").await;
    tokio::time::sleep(LEASE + Duration::from_secs(3)).await; // the fault itself: a freeze this long
    redis.signal("CONT");
    try_to_take_alice(&mut thief, &mut alice).await;
    drop((a, b));
}

/// The highest seq the SQLite file at `url` has stored in `room`.
async fn stored_max_seq(url: &str, room: &str) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
    let max: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM messages WHERE room = ?")
        .bind(room)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    max.unwrap_or(0)
}

/// Redis restarts without its data while one instance's link is cut: that
/// instance's cursor is behind what the others delivered and the persisters
/// stored. Its next message must be numbered above the store's, not above its
/// own cursor: a seq is never given to two messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_lost_with_redis_s_data_starts_above_what_was_stored() {
    // No Redis here means no redis-server either.
    if common::shared_redis().await.is_none() {
        return;
    }
    let Some(mut redis) = PrivateRedis::start_with(&["--appendonly", "no"]) else {
        assert!(!services_required(), "redis-server could not be started");
        eprintln!("SKIPPED: redis-server could not be started");
        return;
    };
    redis.ready().await;
    let upstream: SocketAddr = redis.url().trim_start_matches("redis://").parse().unwrap();
    let link = common::proxy::Proxy::start(upstream).await;
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let url = redis.url();
    let through_link = link.url_for(&url);
    let a = Daemon::start(&instance_args(&db, &url, "seed", "i1")).await;
    let b = Daemon::start(&instance_args(&db, &through_link, "seed", "i2")).await;
    let (mut alice, mut bob) = two_in_general((&a, "alice"), (&b, "bob")).await;
    for i in 1..=2 {
        alice.send(&format!("m{i}")).await;
    }
    messages(&mut bob, 2).await;

    link.cut();
    bob.send("anyone there?").await;
    bob.expect_error("unavailable").await;
    for i in 3..=5 {
        alice.send(&format!("m{i}")).await;
    }
    let seen = messages(&mut alice, 5).await;
    assert_eq!(seen.keys().max(), Some(&5), "{seen:?}");
    let stored = Instant::now();
    while stored_max_seq(&db, "general").await < 5 {
        assert!(
            stored.elapsed() < Duration::from_secs(10),
            "m3..m5 never stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    redis.restart().await;
    link.resume();
    let back = Instant::now();
    let mut heard_by_bob = Vec::new();
    let mine = 'sent: loop {
        bob.send("from bob").await;
        let refused = loop {
            let v = bob
                .expect(|v| v["type"] == "error" || v["type"] == "message")
                .await;
            if v["type"] == "error" {
                break v;
            }
            heard_by_bob.push(v["seq"].as_u64().unwrap());
            if v["text"] == "from bob" {
                break 'sent v;
            }
        };
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "never sent: {refused}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // retrying, as a user would
    };
    // bob's instance missed m3..m5 live, and Redis lost them: they come from
    // the store, in order, before his own message.
    assert_eq!(heard_by_bob, vec![3, 4, 5, 6], "bob's view of the room");
    assert!(
        mine["seq"].as_u64() > Some(5),
        "seq {} was given to a stored message already: {mine}",
        mine["seq"]
    );
    let heard = expect_within(&mut alice, Duration::from_secs(10), |v| {
        v["type"] == "message" && v["text"] == "from bob"
    })
    .await;
    assert_eq!(heard["seq"], mine["seq"]);
    drop((a, b));
}

/// Sends `/msg carol TEXT` from `alice` until it is shown as sent (a Redis
/// coming back refuses for a moment, and a user would retry).
async fn dm_carol(alice: &mut Client, text: &str) {
    let sent = |v: &Value| v["type"] == "dm" && v["text"] == text;
    send_until(
        alice,
        &format!("/msg carol {text}"),
        Duration::from_secs(10),
        sent,
    )
    .await;
}

/// Sends `line` from `client` until it is answered by an event that is
/// `wanted` rather than an error (a cluster coming back refuses for a moment,
/// and a user would retry), for at most `within`; returns that event.
async fn send_until(
    client: &mut Client,
    line: &str,
    within: Duration,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let asked = Instant::now();
    loop {
        client.send(line).await;
        let v = client.expect(|v| v["type"] == "error" || wanted(v)).await;
        if v["type"] != "error" {
            return v;
        }
        assert!(
            asked.elapsed() < within,
            "{line:?} not answered within {within:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // retrying, as a user would
    }
}

/// A Redis restarted without its data numbers an instance's DMs from 1
/// again. None sent afterwards may be taken for one already delivered: each
/// making of an inbox is a generation of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dms_sent_after_redis_lost_its_data_all_arrive() {
    let Some((mut redis, a, b, _dir)) =
        two_instances_on_a_private_redis(&["--appendonly", "no"]).await
    else {
        return;
    };
    let (mut alice, mut carol) = two_in_general((&a, "alice"), (&b, "carol")).await;
    for i in 1..=3 {
        dm_carol(&mut alice, &format!("before {i}")).await;
        let dm = carol.expect(|v| v["type"] == "dm").await;
        assert_eq!(dm["text"], format!("before {i}"));
    }

    redis.restart().await;
    for i in 1..=5 {
        dm_carol(&mut alice, &format!("after {i}")).await;
    }
    for i in 1..=5 {
        let dm = expect_within(&mut carol, Duration::from_secs(10), |v| v["type"] == "dm").await;
        assert_eq!(dm["text"], format!("after {i}"), "lost, or out of order");
    }
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_instance_loses_no_acknowledged_message() {
    let Some((redis, pg)) = redis_and_postgres().await else {
        return;
    };
    let cluster = cluster_name("kill");
    let mut daemons = start_cluster(&redis, &pg.url, &cluster, &["--rate", "0"]).await;
    let mut alice = Client::in_room(daemons[0].tcp, "alice", "general").await;
    let mut carol = Client::in_room(daemons[2].tcp, "carol", "general").await;
    // Messages flow from both; i3 (carol's) is killed in the middle.
    let mut acknowledged = BTreeMap::new();
    for i in 0..200 {
        alice.send(&format!("a{i}")).await;
        carol.send(&format!("c{i}")).await;
    }
    // Every message alice has seen numbered was accepted by the cluster.
    acknowledged.extend(messages(&mut alice, 150).await);
    // While all are alive, storage follows within moments (well before any
    // entry could be claimed from a silent reader).
    let early: Vec<u64> = acknowledged.keys().copied().collect();
    wait_stored(&pg.url, &early, Duration::from_secs(5)).await;
    drop(daemons.pop()); // SIGKILL i3 while messages are still flowing
    for i in 200..300 {
        alice.send(&format!("a{i}")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(Some(line)) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        alice_line(&mut alice),
    )
    .await
    {
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["type"] == "message" {
            acknowledged.insert(
                v["seq"].as_u64().unwrap(),
                (
                    v["id"].as_str().unwrap().to_owned(),
                    v["text"].as_str().unwrap().to_owned(),
                ),
            );
        }
        if v["text"] == "a299" {
            break;
        }
    }
    assert!(acknowledged.len() >= 250, "{}", acknowledged.len());

    // Within the claim time, every acknowledged message is in PostgreSQL.
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    let started = Instant::now();
    let missing = loop {
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT seq, id FROM messages WHERE room = 'general'")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        let stored: BTreeMap<u64, String> =
            rows.into_iter().map(|(s, id)| (s as u64, id)).collect();
        let missing: Vec<u64> = acknowledged
            .iter()
            .filter(|(seq, (id, _))| stored.get(seq) != Some(id))
            .map(|(seq, _)| *seq)
            .collect();
        if missing.is_empty() || started.elapsed() > Duration::from_secs(30) {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(250)).await; // polling storage
    };
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    drop(conn);
    drop(daemons);
    pg.drop_now().await;
    common::forget_redis_cluster(&redis, &cluster);
}

async fn alice_line(client: &mut Client) -> Option<String> {
    client.line().await
}

/// Reads events until one matches, waiting up to `within` (longer than the
/// harness's per-line limit: a departure takes a whole lease).
async fn expect_within(
    client: &mut Client,
    within: Duration,
    matches: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::time::timeout(left.min(Duration::from_secs(9)), client.line()).await;
        match line {
            Ok(Some(line)) => {
                let v: Value = serde_json::from_str(&line).unwrap();
                if matches(&v) {
                    return v;
                }
            }
            Ok(None) => panic!("the server closed the connection"),
            Err(_) => assert!(
                Instant::now() < deadline,
                "nothing matching within {within:?}"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_instance_leaves_then_comes_back_with_its_users() {
    let Some(AliceAndCarol {
        redis,
        db: _,
        mut carol,
        cluster,
        daemons,
        mut alice,
        _dir,
    }) = alice_and_carol("stall").await
    else {
        return;
    };

    // Stalled past its lease: the others see carol leave, once.
    daemons[2].freeze();
    carol_left(&mut alice).await;
    // Awake again: it asserts carol's nick and room; the others see her come back.
    daemons[2].thaw();
    let back = expect_within(&mut alice, Duration::from_secs(8), |v| v["type"] == "join").await;
    assert_eq!(back["nick"], "carol");
    alice.send("/who").await;
    let who = alice.expect(|v| v["type"] == "reply").await;
    assert_eq!(
        who["data"]["members"],
        serde_json::json!(["alice", "carol"])
    );
    carol.send("I was away").await;
    let m = alice.expect(|v| v["type"] == "message").await;
    assert_eq!(m["text"], "I was away");
    // Nobody could take her nick while she held it again.
    let mut mallory = Client::json(daemons[1].tcp, "mallory").await;
    mallory.send("/nick carol").await;
    mallory.expect_error("nick-taken").await;
    drop(daemons);
    common::forget_redis_cluster(&redis, &cluster);
}

/// carol types while her instance is frozen past its lease, and mallory takes
/// her nick meanwhile. When the instance wakes it reads her lines at the same
/// moment as its heartbeat learns the nick is gone: they must not go out as
/// `carol` (mallory's by then), and she is told they were not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_typed_during_a_stall_are_not_sent_under_a_nick_taken_meanwhile() {
    let Some(AliceAndCarol {
        redis,
        cluster,
        daemons,
        mut alice,
        mut carol,
        ..
    }) = alice_and_carol("typed").await
    else {
        return;
    };
    daemons[2].freeze();
    carol.send("typed while frozen").await;
    carol_left(&mut alice).await;
    let mut mallory = Client::in_room(daemons[1].tcp, "mallory", "general").await;
    mallory.send("/nick carol").await;
    mallory
        .expect(|v| v["type"] == "nick" && v["new"] == "carol")
        .await;
    daemons[2].thaw();

    let renamed = expect_within(&mut carol, Duration::from_secs(10), |v| {
        v["type"] == "nick" && v["old"] == "carol"
    })
    .await;
    let guest = renamed["new"].as_str().unwrap().to_owned();
    carol.send("back").await;
    // alice reads everything from here on: nothing typed while frozen, under
    // any nick, before carol's (renamed) next line.
    loop {
        let v = expect_within(&mut alice, Duration::from_secs(10), |v| {
            v["type"] == "message"
        })
        .await;
        assert_ne!(v["text"], "typed while frozen", "sent after the stall: {v}");
        if v["text"] == "back" {
            assert_eq!(v["nick"], guest.as_str());
            break;
        }
    }
    // mallory leaves, and carol takes her nick back: it is hers again, and
    // so is what she sends under it.
    drop(mallory);
    let back = |v: &Value| v["type"] == "nick" && v["new"] == "carol";
    send_until(&mut carol, "/nick carol", Duration::from_secs(10), back).await;
    carol.send("mine again").await;
    let v = expect_within(&mut alice, Duration::from_secs(10), |v| {
        v["type"] == "message" && v["text"] == "mine again"
    })
    .await;
    assert_eq!(v["nick"], "carol");
    drop(daemons);
    common::forget_redis_cluster(&redis, &cluster);
}

/// What `redis-cli` answers for `args` against the Redis at `url`.
fn redis_cli(url: &str, args: &[&str]) -> String {
    let addr = url.trim_start_matches("redis://");
    let (host, port) = addr.split_once(':').unwrap_or((addr, "6379"));
    let out = Command::new("redis-cli")
        .args(["-h", host, "-p", port])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Rooms are made by any client's `/join`: a room's counter and stream in
/// Redis must expire once it has been idle, not stay for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_s_counter_and_stream_in_redis_expire_when_it_is_idle() {
    let Some(AliceAndCarol {
        redis,
        cluster,
        daemons,
        mut alice,
        mut carol,
        ..
    }) = alice_and_carol("ttl").await
    else {
        return;
    };
    alice.send("one").await;
    carol.expect(|v| v["type"] == "message").await;
    let pattern = format!("{{{cluster}:p*}}:*:general");
    let keys = redis_cli(&redis, &["--scan", "--pattern", &pattern]);
    let keys: Vec<&str> = keys.lines().collect();
    assert!(
        keys.iter().any(|k| k.ends_with(":seq:general"))
            && keys.iter().any(|k| k.ends_with(":log:general")),
        "{keys:?}"
    );
    for key in keys {
        let ttl: i64 = redis_cli(&redis, &["pttl", key]).parse().unwrap();
        assert!(ttl > 0, "{key} never expires ({ttl})");
    }
    drop(daemons);
    common::forget_redis_cluster(&redis, &cluster);
}

/// As on the poll bus: a second instance under a running instance's name
/// refuses to start (the name's live-instance key changes with each of the
/// running one's heartbeats) and gives nobody away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_under_a_running_instance_s_name_refuses_to_start_on_redis() {
    let Some(AliceAndCarol {
        redis,
        db,
        carol: _carol,
        cluster,
        daemons,
        mut alice,
        _dir,
    }) = alice_and_carol("twin").await
    else {
        return;
    };

    let log = Daemon::refused(&instance_args(&db, &redis, &cluster, "i3")).await;
    assert!(log.contains("in use by a running instance"), "{log}");
    let _dave = Client::in_room(daemons[1].tcp, "dave", "general").await;
    let next = alice
        .expect(|v| v["type"] == "leave" || v["type"] == "join")
        .await;
    assert_eq!(
        (next["type"].as_str(), next["nick"].as_str()),
        (Some("join"), Some("dave")),
        "carol was given away: {next}"
    );
    drop(daemons);
    common::forget_redis_cluster(&redis, &cluster);
}

/// An instance given a running instance's name while that one is frozen
/// past its lease takes the name over (the frozen one is as good as dead).
/// When the frozen one wakes, it must not serve on beside it: its users'
/// nicks were announced gone, and `carol` is a newcomer's by then. It stops,
/// saying why, and nothing its user typed goes out. Without the life check
/// in the heartbeat, it renewed the name as its own and served on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_whose_name_was_taken_over_stops_when_it_wakes() {
    let Some(AliceAndCarol {
        redis,
        db,
        mut carol,
        cluster,
        mut daemons,
        mut alice,
        _dir,
    }) = alice_and_carol("superseded").await
    else {
        return;
    };

    daemons[2].freeze();
    // Serves once the frozen one's lease has run out.
    let namesake = Daemon::start(&instance_args(&db, &redis, &cluster, "i3")).await;
    carol_left(&mut alice).await;
    // Free once the frozen one's claim on it has run out too.
    let mut newcomer = Client::json(daemons[1].tcp, "newcomer").await;
    let within = Duration::from_secs(12);
    send_until(&mut newcomer, "/nick carol", within, |v| {
        v["type"] == "nick"
    })
    .await;
    newcomer.send("/join general").await;
    newcomer
        .expect(|v| v["type"] == "join" && v["nick"] == "carol")
        .await;
    carol.send("typed by the first carol").await;
    daemons[2].thaw();

    let status = daemons[2]
        .exits_within(Duration::from_secs(10))
        .await
        .expect("the instance whose name was taken over stopped");
    assert!(!status.success(), "it stops as a failure: {status}");
    let log = daemons[2].logs();
    assert!(log.contains("took over instance name"), "{log}");
    newcomer.send("typed by the second carol").await;
    let next = alice.expect(|v| v["type"] == "message").await;
    assert_eq!(next["text"], "typed by the second carol", "{next}");
    // Stopped before the keys go: a running instance writes them again.
    drop((daemons, namesake));
    common::forget_redis_cluster(&redis, &cluster);
}

/// As on the poll bus: a DM sent to a user whose instance has just stalled
/// reaches them when the instance wakes, after the others reaped it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_for_a_stalled_instance_arrives_when_it_wakes_on_redis() {
    let Some(AliceAndCarol {
        redis,
        db: _,
        mut carol,
        cluster,
        daemons,
        mut alice,
        _dir,
    }) = alice_and_carol("dm-stall").await
    else {
        return;
    };

    daemons[2].freeze();
    alice.send("/msg carol are you there?").await;
    alice.expect(|v| v["type"] == "dm").await;
    carol_left(&mut alice).await;
    daemons[2].thaw();
    let dm = expect_within(&mut carol, Duration::from_secs(8), |v| v["type"] == "dm").await;
    assert_eq!(dm["text"], "are you there?");
    drop(daemons);
    common::forget_redis_cluster(&redis, &cluster);
}

/// A DM sent while its recipient's instance is cut off from Redis (its
/// subscriber reconnecting) reaches the recipient once the link is back,
/// once, and before a DM sent after it. Pub/sub alone dropped it, after its
/// sender had been shown it as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_sent_while_the_recipient_s_redis_link_is_cut_arrives_when_it_returns() {
    let Some(redis) = common::shared_redis().await else {
        return;
    };
    let upstream: SocketAddr = redis.trim_start_matches("redis://").parse().unwrap();
    let link = common::proxy::Proxy::start(upstream).await;
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let cluster = cluster_name("dm-cut");
    let through_link = link.url_for(&redis);
    let mut daemons = Vec::new();
    for (name, bus) in [("i1", &redis), ("i2", &through_link)] {
        daemons.push(Daemon::start(&instance_args(&db, bus, &cluster, name)).await);
    }
    let mut alice = Client::in_room(daemons[0].tcp, "alice", "general").await;
    let mut carol = Client::in_room(daemons[1].tcp, "carol", "general").await;
    alice
        .expect(|v| v["type"] == "join" && v["nick"] == "carol")
        .await;

    link.cut();
    // Refused on i2: its connections to Redis are down, the subscriber's
    // with them, before the DM is sent.
    carol.send("anyone there?").await;
    carol.expect_error("unavailable").await;
    alice.send("/msg carol sent while you were cut off").await;
    alice
        .expect(|v| v["type"] == "dm" && v["to"] == "carol")
        .await;
    link.resume();
    let dm = expect_within(&mut carol, Duration::from_secs(10), |v| v["type"] == "dm").await;
    assert_eq!(dm["text"], "sent while you were cut off");
    alice.send("/msg carol and after").await;
    let next = expect_within(&mut carol, Duration::from_secs(10), |v| v["type"] == "dm").await;
    assert_eq!(next["text"], "and after", "the first DM came twice");
    drop(daemons);
    common::forget_redis_cluster(&redis, &cluster);
}

/// As on the poll bus: of two instances started under one name at the same
/// moment, after a killed life under that name, one serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_starting_under_one_name_at_once_do_not_both_serve_on_redis() {
    let Some(redis) = common::shared_redis().await else {
        return;
    };
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let cluster = cluster_name("dup");
    let args = instance_args(&db, &redis, &cluster, "dup");
    let mut first = Daemon::start(&args).await;
    first.kill9().await;
    let (one, two) = tokio::join!(Daemon::try_start(&args), Daemon::try_start(&args));
    let (serving, refused): (Vec<_>, Vec<_>) = [one, two].into_iter().partition(Result::is_ok);
    let refused: Vec<String> = refused.into_iter().filter_map(Result::err).collect();
    let logs: Vec<String> = serving.iter().flatten().map(Daemon::logs).collect();
    assert_eq!(serving.len(), 1, "exactly one serves: {logs:#?}");
    let log = &refused[0];
    assert!(log.contains("in use by a running instance"), "{log}");
    drop((first, serving));
    common::forget_redis_cluster(&redis, &cluster);
}

/// Waits until every seq of `general` in `seqs` is in PostgreSQL.
async fn wait_stored(url: &str, seqs: &[u64], within: Duration) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let started = Instant::now();
    loop {
        let stored: Vec<(i64,)> = sqlx::query_as("SELECT seq FROM messages WHERE room = 'general'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let stored: std::collections::BTreeSet<u64> =
            stored.into_iter().map(|(s,)| s as u64).collect();
        let missing: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| !stored.contains(s))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < within,
            "not stored within {within:?}: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling storage
    }
}

/// `POST /message` with an `Idempotency-Key`, retried on another instance,
/// answers the first send's receipt and sends nothing (the receipt lives in
/// Redis, written by the same script that numbers the message).
#[tokio::test]
async fn an_idempotency_key_sends_once_across_instances_on_redis() {
    let Some(redis) = common::shared_redis().await else {
        return;
    };
    let dir = temp_dir();
    let db = format!("sqlite://{}", dir.path().join("chat.db").display());
    let cluster = cluster_name("keys");
    let daemons = start_cluster(&redis, &db, &cluster, &[]).await;
    let (h1, h2) = (Http::new(daemons[0].http), Http::new(daemons[1].http));
    let send_in = |http: Http, token: String, room: &'static str, key: &'static str| async move {
        let auth = format!("Bearer {token}");
        let headers = [
            ("content-type", "application/json"),
            ("authorization", auth.as_str()),
            ("idempotency-key", key),
        ];
        let body = serde_json::json!({ "room": room, "text": "exactly once" }).to_string();
        let reply = http
            .request(hyper::Method::POST, "/message", &headers, Some(body.into()))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()
    };
    let send = |http: Http, token: String, key: &'static str| send_in(http, token, "keys", key);
    let (carol, _) = h1.connect(Some("carol")).await;
    assert_eq!(h1.command(&carol, "/join keys").await.status, 200);
    let first = send(h1, carol.clone(), "k-1").await;
    assert_eq!(
        send(h1, carol.clone(), "k-1").await,
        first,
        "a repeat, same instance"
    );
    // Her instance "died"; she retries on another one under the same nick.
    assert_eq!(
        h1.post("/disconnect", Some(&carol), &serde_json::json!({}))
            .await
            .status,
        204
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let carol = loop {
        let reply = h2
            .post("/connect", None, &serde_json::json!({ "nick": "carol" }))
            .await;
        if reply.status == 201 {
            break reply.json()["session"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "carol's nick was never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(h2.command(&carol, "/join keys").await.status, 200);
    assert_eq!(
        send(h2, carol.clone(), "k-1").await,
        first,
        "a repeat, another instance"
    );
    let other = send(h2, carol.clone(), "k-2").await;
    assert_eq!(
        other["seq"],
        first["seq"].as_u64().unwrap() + 1,
        "a repeat uses no seq"
    );
    // The key is the nick's, not the room's: repeated in another room it
    // still answers the first send, and sends nothing there.
    assert_eq!(h2.command(&carol, "/join elsewhere").await.status, 200);
    assert_eq!(
        send_in(h2, carol.clone(), "elsewhere", "k-1").await,
        first,
        "a repeat, another room"
    );
    let fresh = send_in(h2, carol, "elsewhere", "k-3").await;
    assert_eq!(fresh["seq"], 1, "the repeat sent nothing in the other room");
    drop(daemons);
    common::forget_redis_cluster(&redis, &cluster);
}

/// A 3-shard Redis Cluster of the test's own servers.
struct RedisCluster {
    nodes: Vec<PrivateRedis>,
    /// The daemon's `--bus` URL for it.
    url: String,
}

impl RedisCluster {
    /// Starts three nodes and makes them a cluster; `None` (the test skips,
    /// or fails under `BABY_REQUIRE_SERVICES=1`) without `redis-server`.
    async fn start() -> Option<RedisCluster> {
        // No Redis here means no redis-server either (the skip is printed).
        common::shared_redis().await?;
        let node_args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--appendonly",
            "no",
        ];
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let Some(node) = PrivateRedis::start_with(&node_args) else {
                if services_required() {
                    panic!("redis-server could not be started");
                }
                eprintln!("SKIPPED: redis-server could not be started");
                return None;
            };
            node.ready().await;
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster {
            url: format!(
                "redis-cluster://{}?node={}&node={}",
                addrs[0], addrs[1], addrs[2]
            ),
            nodes,
        };
        cluster.until_ok().await;
        Some(cluster)
    }

    /// Waits until every node says the cluster is ok.
    async fn until_ok(&self) {
        let started = Instant::now();
        while !(0..self.nodes.len()).all(|node| {
            self.cli(node, &["cluster", "info"])
                .contains("cluster_state:ok")
        }) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the cluster never became ok"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What `redis-cli` prints for `args` on node `node`, trimmed.
    fn cli(&self, node: usize, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.nodes[node].port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The keys matching `pattern` on every node.
    fn scan(&self, pattern: &str) -> Vec<String> {
        (0..self.nodes.len())
            .flat_map(|node| {
                self.cli(node, &["--scan", "--pattern", pattern])
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The shard channels matching `pattern` that someone is subscribed to,
    /// on every node.
    fn shard_channels(&self, pattern: &str) -> Vec<String> {
        let mut channels: Vec<String> = (0..self.nodes.len())
            .flat_map(|node| {
                self.cli(node, &["pubsub", "shardchannels", pattern])
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        channels.sort();
        channels.dedup();
        channels
    }

    /// The node whose shard serves `slot`, from `CLUSTER NODES`.
    fn owner(&self, slot: u16) -> usize {
        let nodes = self.cli(0, &["cluster", "nodes"]);
        let line = nodes
            .lines()
            .find(|line| {
                line.split(' ').skip(8).any(|range| {
                    let (low, high) = range.split_once('-').unwrap_or((range, range));
                    match (low.parse::<u16>(), high.parse::<u16>()) {
                        (Ok(low), Ok(high)) => (low..=high).contains(&slot),
                        _ => false, // a slot being migrated: [slot->-id]
                    }
                })
            })
            .unwrap_or_else(|| panic!("no node serves slot {slot}: {nodes}"));
        let port = line
            .split(' ')
            .nth(1)
            .and_then(|addr| addr.split(['@', ':']).nth(1))
            .expect("CLUSTER NODES lists ip:port@cport");
        self.nodes
            .iter()
            .position(|node| node.port.to_string() == port)
            .expect("the serving node is one of ours")
    }

    /// Moves the slot of `name` (a key or a channel) to another shard, keys
    /// and all, as a resharding does (`redis-cli --cluster reshard` makes the
    /// same calls); returns the node that serves it now.
    fn move_slot_of(&self, name: &str) -> usize {
        let slot = self.cli(0, &["cluster", "keyslot", name]);
        let from = self.owner(slot.parse().expect("CLUSTER KEYSLOT answers a number"));
        let to = (from + 1) % self.nodes.len();
        let id = |node| self.cli(node, &["cluster", "myid"]);
        let (from_id, to_id) = (id(from), id(to));
        let ok = |node, args: &[&str]| {
            let answer = self.cli(node, args);
            assert_eq!(answer, "OK", "redis-cli {args:?} on node {node}");
        };
        ok(to, &["cluster", "setslot", &slot, "importing", &from_id]);
        ok(from, &["cluster", "setslot", &slot, "migrating", &to_id]);
        let keys = self.cli(from, &["cluster", "getkeysinslot", &slot, "1000"]);
        if !keys.is_empty() {
            let to_port = self.nodes[to].port.to_string();
            let mut migrate = vec!["migrate", "127.0.0.1", &to_port, "", "0", "5000", "keys"];
            migrate.extend(keys.lines());
            ok(from, &migrate);
        }
        for node in [to, from, (to + 1) % self.nodes.len()] {
            ok(node, &["cluster", "setslot", &slot, "node", &to_id]);
        }
        to
    }

    /// Waits until `node` counts `subscribers` of shard channel `channel`.
    async fn until_subscribed(
        &self,
        node: usize,
        channel: &str,
        subscribers: usize,
        within: Duration,
    ) {
        let started = Instant::now();
        loop {
            let answer = self.cli(node, &["pubsub", "shardnumsub", channel]);
            if answer.lines().nth(1) == Some(&subscribers.to_string()) {
                return;
            }
            assert!(
                started.elapsed() < within,
                "{channel} has not {subscribers} subscribers within {within:?}: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await; // polling, not synchronising
        }
    }
}

/// A 3-shard Redis Cluster started by the test: rooms hash onto partitions,
/// partitions onto slots, slots onto shards; two instances chat in rooms
/// that live on different shards, with the same code as on one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_chat_across_the_shards_of_a_redis_cluster() {
    let Some(redis) = RedisCluster::start().await else {
        return;
    };
    let url = redis.url.clone();
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let cluster = cluster_name("shards");
    let mut daemons = Vec::new();
    for name in ["i1", "i2"] {
        let mut args = instance_args(&db, &url, &cluster, name).to_vec();
        // Eight joins each: past the 2/s join limit, not under test here.
        args.extend_from_slice(&["--command-rate", "0"]);
        daemons.push(Daemon::start(&args).await);
    }
    // Eight rooms over 16 partitions over 3 shards: more than one shard.
    let rooms: Vec<String> = (0..8).map(|i| format!("shard-{i}")).collect();
    let mut alice = Client::json(daemons[0].tcp, "alice").await;
    let mut bob = Client::json(daemons[1].tcp, "bob").await;
    for room in &rooms {
        for (client, nick) in [(&mut alice, "alice"), (&mut bob, "bob")] {
            client.send(&format!("/join {room}")).await;
            client
                .expect(|v| v["type"] == "join" && v["nick"] == nick && v["room"] == room.as_str())
                .await;
        }
    }
    for room in &rooms {
        alice.send(&format!("/switch {room}")).await;
        alice.send(&format!("hello {room}")).await;
        let mine = alice
            .expect(|v| v["type"] == "message" && v["room"] == room.as_str())
            .await;
        let theirs = bob
            .expect(|v| v["type"] == "message" && v["room"] == room.as_str())
            .await;
        assert_eq!(theirs["seq"], mine["seq"], "#{room}");
        assert_eq!(theirs["id"], mine["id"], "#{room}");
        assert_eq!(theirs["text"], format!("hello {room}"));
    }
    // The rooms' keys really are spread: more than one shard holds some.
    let pattern = format!("{{{cluster}:p*");
    let holding = (0..redis.nodes.len())
        .filter(|&node| {
            !redis
                .cli(node, &["--scan", "--pattern", &pattern])
                .is_empty()
        })
        .count();
    assert!(holding >= 2, "all rooms landed on one shard ({holding})");
    drop(daemons);
}

/// Says `text` until the cluster takes it, returning its echo. A refusal
/// (`unavailable`: the first command each instance sends to a moved slot
/// is redirected, and fred sends nothing twice) sent nothing, so saying it
/// again is what a client does.
async fn say_until_sent(client: &mut Client, nick: &str, text: &str) -> Value {
    let started = Instant::now();
    loop {
        client.send(text).await;
        let answer = client
            .expect(|v| {
                (v["type"] == "message" && v["nick"] == nick && v["text"] == text)
                    || v["type"] == "error"
            })
            .await;
        if answer["type"] == "message" {
            return answer;
        }
        assert_eq!(answer["code"], "unavailable", "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never taken: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // a client's pause before retrying
    }
}

/// Resharding a Redis Cluster moves slots between shards, and a shard that
/// gives a slot away ends the subscriptions to its channels with a notice
/// the client library drops. Each instance must notice that its room's
/// slot moved and subscribe again, quiet rooms too: without that, the
/// members on each side stopped hearing the other's messages, joins and
/// leaves for good, and nothing said so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_slot_moves_to_another_shard_is_heard_again() {
    let Some(redis) = RedisCluster::start().await else {
        return;
    };
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let cluster = cluster_name("moved");
    let i1 = Daemon::start(&instance_args(&db, &redis.url, &cluster, "i1")).await;
    let i2 = Daemon::start(&instance_args(&db, &redis.url, &cluster, "i2")).await;
    let (mut alice, mut bob) = two_in_general((&i1, "alice"), (&i2, "bob")).await;
    alice.send("before the move").await;
    bob.expect(|v| v["type"] == "message" && v["text"] == "before the move")
        .await;

    // A quiet room, where no counter moves, follows its slot too: its
    // joins and leaves travel on its channel.
    alice.send("/join quiet").await;
    alice
        .expect(|v| v["type"] == "join" && v["nick"] == "alice" && v["room"] == "quiet")
        .await;
    bob.send("/join quiet").await;
    alice
        .expect(|v| v["type"] == "join" && v["nick"] == "bob" && v["room"] == "quiet")
        .await;
    let channels = redis.shard_channels(&format!("{{{cluster}:p*}}:room:quiet"));
    let [quiet] = channels.as_slice() else {
        panic!("one channel for #quiet: {channels:?}");
    };
    let now_on = redis.move_slot_of(quiet);
    redis.until_ok().await;
    redis
        .until_subscribed(now_on, quiet, 2, Duration::from_secs(10))
        .await;
    let _carol = Client::in_room(i2.tcp, "carol", "quiet").await;
    expect_within(&mut alice, Duration::from_secs(12), |v| {
        v["type"] == "join" && v["nick"] == "carol" && v["room"] == "quiet"
    })
    .await;
    alice.send("/switch general").await;
    bob.send("/switch general").await;

    let counters = redis.scan(&format!("{{{cluster}:p*}}:seq:general"));
    let [counter] = counters.as_slice() else {
        panic!("one counter for #general: {counters:?}");
    };
    redis.move_slot_of(counter);
    redis.until_ok().await;

    // Each side hears the other again, in order, with nothing lost: the
    // first message late (found by the next heartbeats' audit), the rest live.
    for (n, text) in ["after the move", "and again"].into_iter().enumerate() {
        say_until_sent(&mut bob, "bob", text).await;
        let heard = expect_within(&mut alice, Duration::from_secs(12), |v| {
            v["type"] == "message" && v["nick"] == "bob"
        })
        .await;
        assert_eq!(heard["text"], text);
        assert_eq!(heard["seq"], 2 + n as u64);
    }
    say_until_sent(&mut alice, "alice", "back to bob").await;
    let heard = expect_within(&mut bob, Duration::from_secs(12), |v| {
        v["type"] == "message" && v["nick"] == "alice"
    })
    .await;
    assert_eq!(heard["text"], "back to bob");
    assert_eq!(heard["seq"], 4);

    // The channel renames go out on has no stream to audit: on a Cluster
    // each instance subscribes to it again every heartbeat, so it follows
    // its slot to the new shard too.
    let everyone = format!("{{{cluster}:all}}");
    let now_on = redis.move_slot_of(&everyone);
    redis.until_ok().await;
    redis
        .until_subscribed(now_on, &everyone, 2, Duration::from_secs(10))
        .await;
    // The first rename meets the move (i2 has sent nothing to that slot
    // since): its announcement is redirected, so the heartbeats make it,
    // room by room, as a leave and a join. The second is heard as a rename.
    bob.send("/nick robert").await;
    bob.expect(|v| v["type"] == "nick" && v["new"] == "robert")
        .await;
    expect_within(&mut alice, Duration::from_secs(12), |v| {
        (v["type"] == "nick" && v["new"] == "robert")
            || (v["type"] == "join" && v["nick"] == "robert")
    })
    .await;
    bob.send("/nick bobby").await;
    bob.expect(|v| v["type"] == "nick" && v["new"] == "bobby")
        .await;
    let renamed = expect_within(&mut alice, Duration::from_secs(12), |v| {
        v["type"] == "nick" && v["new"] == "bobby"
    })
    .await;
    assert_eq!(renamed["old"], "robert");
}

/// On this bus storage lags delivery (the persister writes behind, and an
/// instance cut off from the database holds what it read for `CLAIM_IDLE`).
/// An instance new to a room must still start from where the room really
/// is, and a `/join ROOM SEQ` there must replay everything after the cursor:
/// both read the room's stream before storage. (Read from storage alone, the
/// join replayed nothing and the bus then skipped to the last ten: seqs
/// 6-20 were lost without a `gap`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_reads_the_room_stream_where_storage_lags() {
    let Some((redis, pg)) = redis_and_postgres().await else {
        return;
    };
    let cluster = cluster_name("lag");
    let link = common::proxy::Proxy::start(pg.address()).await;
    let through = link.url_for(&pg.url);
    let common_args = ["--bus", &redis, "--cluster", &cluster, "--rate", "0"];
    let a =
        Daemon::start(&[&["--db", &through, "--instance", "a"][..], &common_args].concat()).await;
    let mut alice = Client::in_room(a.tcp, "alice", "general").await;
    // a's persister now reads the messages and cannot store them.
    link.pause();
    for i in 1..=30 {
        alice.send(&format!("m{i}")).await;
    }
    let sent = messages(&mut alice, 30).await;
    assert_eq!(
        sent.keys().copied().collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );

    // b is new to the room; storage holds none of the 30 yet.
    let b =
        Daemon::start(&[&["--db", &pg.url, "--instance", "b"][..], &common_args].concat()).await;
    let mut bob = Client::json(b.tcp, "bob").await;
    bob.send("/join general 5").await;
    let mut replayed = Vec::new();
    while replayed.last() != Some(&30) {
        let event = bob
            .expect(|v| v["type"] == "message" || v["type"] == "gap")
            .await;
        assert_eq!(event["type"], "message", "nothing is missing: {event}");
        replayed.push(event["seq"].as_u64().unwrap());
    }
    assert_eq!(replayed, (6..=30).collect::<Vec<_>>());

    // A plain join on b replays the room's real last ten.
    let mut carol = Client::json(b.tcp, "carol").await;
    carol.send("/join general").await;
    carol
        .expect(|v| v["type"] == "join" && v["nick"] == "carol")
        .await;
    let ring: Vec<u64> = messages(&mut carol, 10).await.into_keys().collect();
    assert_eq!(ring, (21..=30).collect::<Vec<_>>());

    link.resume();
    drop((alice, bob, carol, a, b));
    pg.drop_now().await;
    common::forget_redis_cluster(&redis, &cluster);
}

/// The database is cut off from every instance while messages flow: on this
/// bus chat goes on (Redis orders and delivers), and once the database is
/// back the persisters store every message that was acknowledged meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_cut_stops_no_chat_and_loses_no_message() {
    let Some((redis, pg)) = redis_and_postgres().await else {
        return;
    };
    let cluster = cluster_name("dbcut");
    let link = common::proxy::Proxy::start(pg.address()).await;
    let through = link.url_for(&pg.url);
    let daemons = start_cluster(&redis, &through, &cluster, &["--rate", "0"]).await;
    let mut alice = Client::in_room(daemons[0].tcp, "alice", "general").await;
    let mut carol = Client::in_room(daemons[2].tcp, "carol", "general").await;
    alice
        .expect(|v| v["type"] == "join" && v["nick"] == "carol")
        .await;

    link.cut();
    for i in 0..100 {
        alice.send(&format!("a{i}")).await;
        carol.send(&format!("c{i}")).await;
    }
    // Both hear all 200, numbered once, while the database is away.
    let heard_by_alice = messages(&mut alice, 200).await;
    let heard_by_carol = messages(&mut carol, 200).await;
    assert_eq!(heard_by_alice, heard_by_carol);
    assert_eq!(
        heard_by_alice.keys().copied().collect::<Vec<_>>(),
        (1..=200).collect::<Vec<_>>()
    );

    link.resume();
    let seqs: Vec<u64> = heard_by_alice.keys().copied().collect();
    wait_stored(&pg.url, &seqs, Duration::from_secs(30)).await;
    drop((alice, carol, daemons));
    pg.drop_now().await;
    common::forget_redis_cluster(&redis, &cluster);
}

/// A room stream reader whose instance is killed (`SIGKILL`) while messages
/// flow reconnects to another instance with its `Last-Event-ID`, as
/// EventSource does, and misses nothing: every seq once, no `gap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_moved_off_a_killed_instance_misses_nothing() {
    let Some((redis, pg)) = redis_and_postgres().await else {
        return;
    };
    let cluster = cluster_name("moved");
    let mut daemons = start_cluster(&redis, &pg.url, &cluster, &["--rate", "0"]).await;
    let mut alice = Client::in_room(daemons[0].tcp, "alice", "general").await;
    let mut stream = Http::new(daemons[2].http)
        .sse("/messages/general", None)
        .await;
    let mut seen: Vec<u64> = Vec::new();
    let read = |frame: common::http::Frame, seen: &mut Vec<u64>| {
        assert_eq!(
            frame.event.as_deref(),
            Some("message"),
            "no gap: {}",
            frame.data
        );
        seen.push(frame.json()["seq"].as_u64().unwrap());
    };
    for i in 1..=150 {
        alice.send(&format!("m{i}")).await;
    }
    while seen.len() < 50 {
        let frame = stream.event_or_end().await.expect("i3 is alive");
        read(frame, &mut seen);
    }
    daemons[2].kill9().await;
    for i in 151..=300 {
        alice.send(&format!("m{i}")).await;
    }
    // What i3 had written before it died, then the end of the stream.
    while let Some(frame) = stream.event_or_end().await {
        read(frame, &mut seen);
    }
    let last = stream.last_id.clone().expect("frames had ids");
    let mut moved = Http::new(daemons[1].http)
        .sse("/messages/general", Some(&last))
        .await;
    while seen.last() != Some(&300) {
        let frame = moved.event_or_end().await.expect("i2 is alive");
        read(frame, &mut seen);
    }
    assert_eq!(
        seen,
        (1..=300).collect::<Vec<_>>(),
        "every seq once, in order"
    );
    let all: Vec<u64> = (1..=300).collect();
    wait_stored(&pg.url, &all, Duration::from_secs(30)).await;
    drop((alice, daemons));
    pg.drop_now().await;
    common::forget_redis_cluster(&redis, &cluster);
}

/// A join whose room subscription Redis does not confirm (a timeout, a
/// shard away, a refusal) leaves the member in the room, and the instance
/// must keep trying: until this was fixed, the member heard only their own
/// instance for as long as they stayed. Redis refuses the subscription here
/// through an ACL that lets instance i1 use every channel but the rooms';
/// granting them stands for the blip ending. (The refusal also fails her
/// join's announcement, which must be made again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_room_subscription_failed_hears_the_room_once_it_succeeds() {
    common::shared_redis().await;
    let Some(redis) = PrivateRedis::start_with(&[]) else {
        assert!(!services_required(), "redis-server could not be started");
        eprintln!("SKIPPED: redis-server could not be started");
        return;
    };
    redis.ready().await;
    let url = redis.url();
    let acl = [
        "ACL",
        "SETUSER",
        "deaf",
        "on",
        ">pw",
        "~*",
        "+@all",
        "resetchannels",
        "&{deaf:all}",
        "&{deaf:i:*}",
    ];
    assert_eq!(redis_cli(&url, &acl), "OK");
    let deaf_url = format!("redis://deaf:pw@127.0.0.1:{}", redis.port);
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let a = Daemon::start(&instance_args(&db, &deaf_url, "deaf", "i1")).await;
    let b = Daemon::start(&instance_args(&db, &url, "deaf", "i2")).await;

    let mut carol = Client::in_room(b.tcp, "carol", "quiet").await;
    // Answered once i1 has tried the subscription, and been refused.
    let mut alice = Client::in_room(a.tcp, "alice", "quiet").await;
    carol.send("one").await;
    carol
        .expect(|v| v["type"] == "message" && v["text"] == "one")
        .await;

    assert_eq!(
        redis_cli(&url, &["ACL", "SETUSER", "deaf", "allchannels"]),
        "OK"
    );
    carol.send("two").await;
    let heard = |text: &'static str| move |v: &Value| v["type"] == "message" && v["text"] == text;
    let one = expect_within(&mut alice, Duration::from_secs(10), heard("one")).await;
    let two = expect_within(&mut alice, Duration::from_secs(10), heard("two")).await;
    assert_eq!(
        (one["seq"].as_u64(), two["seq"].as_u64()),
        (Some(1), Some(2))
    );
    // Her join's announcement, refused with the subscription, is made
    // again too: carol sees her arrive.
    expect_within(&mut carol, Duration::from_secs(10), |v| {
        v["type"] == "join" && v["nick"] == "alice"
    })
    .await;
    drop((a, b));
}

/// A rename whose memberships Redis failed to move (here the room's member
/// hash is made unusable for a moment, standing for a blip) is finished by
/// the heartbeats. Until this was fixed, the others listed the old nick in
/// the room, and not the new one, for as long as the instance lived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_redis_failed_to_record_is_finished_by_the_heartbeats() {
    let Some(AliceAndCarol {
        redis,
        cluster,
        daemons,
        mut alice,
        mut carol,
        ..
    }) = alice_and_carol("rename-retry").await
    else {
        return;
    };
    let members = format!("{{{cluster}:dir}}:room:general");
    let aside = format!("{{{cluster}:dir}}:aside");
    assert_eq!(redis_cli(&redis, &["RENAME", &members, &aside]), "OK");
    assert_eq!(redis_cli(&redis, &["SET", &members, "unusable"]), "OK");
    alice.send("/nick alicia").await;
    // Answered once the instance has tried to move the membership.
    alice
        .expect(|v| v["type"] == "nick" && v["new"] == "alicia")
        .await;
    assert_eq!(redis_cli(&redis, &["DEL", &members]), "1");
    assert_eq!(redis_cli(&redis, &["RENAME", &aside, &members]), "OK");

    who_becomes(&mut carol, &["alicia", "carol"], Duration::from_secs(10)).await;
    drop(daemons);
    common::forget_redis_cluster(&redis, &cluster);
}
