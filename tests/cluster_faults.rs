//! The cluster directory under faults, with real daemons on a shared database
//! (`--bus poll`): an instance frozen with SIGSTOP, an instance whose link to
//! PostgreSQL stalls, an instance killed with SIGKILL. Each time the cluster's
//! view of nicks and rooms must end up true: dead users leave (and only once),
//! live users keep their nick and rooms or, if another session fairly took
//! their nick meanwhile, are renamed with a `nick` event; never do two
//! sessions hold one nick.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baby_discord::bus::LEASE;
use common::http::Http;
use common::proxy::Proxy;
use common::{Client, Daemon, PgDatabase, temp_dir};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Both rooms every user is in.
const ROOMS: [&str; 2] = ["general", "side"];
/// From a crash (or the start of a stall) until the others announce its
/// users' departures: the lease, up to two heartbeats (the look that first
/// finds its last renewal, and the one that finds it a lease old), one poll.
const DEPARTURE: Duration = Duration::from_secs(LEASE.as_secs() + 5);

/// A TCP user in JSON mode whose reads may wait longer than the harness's
/// per-line limit: a departure takes a whole lease to be announced.
struct Peer {
    nick: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Peer {
    /// Connects as `nick` and joins every room in [`ROOMS`].
    async fn join(addr: SocketAddr, nick: &str) -> Peer {
        Self::join_rooms(addr, nick, &ROOMS).await
    }

    async fn join_rooms(addr: SocketAddr, nick: &str, rooms: &[&str]) -> Peer {
        let (reader, writer) = Client::json(addr, nick).await.split();
        let mut peer = Peer {
            nick: nick.to_owned(),
            reader,
            writer,
        };
        for room in rooms {
            peer.send(&format!("/join {room}")).await;
            peer.expect("its own join", |v| {
                v["type"] == "join" && v["nick"] == nick && v["room"] == *room
            })
            .await;
        }
        peer
    }

    async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
    }

    /// Everything it is sent until its connection closes (within 10 s).
    async fn read_until_closed(&mut self) -> String {
        let mut all = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_string(&mut self.reader, &mut all),
        )
        .await
        .expect("the connection closes")
        .expect("read");
        all
    }

    /// The next event matching `matches`, skipping others; panics with `what`
    /// if none arrives within [`DEPARTURE`] plus a margin.
    async fn expect(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + DEPARTURE + Duration::from_secs(5);
        self.expect_by(deadline, what, matches).await
    }

    async fn expect_by(
        &mut self,
        deadline: Instant,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> Value {
        loop {
            let mut line = String::new();
            let left = deadline.saturating_duration_since(Instant::now());
            let read = tokio::time::timeout(left, self.reader.read_line(&mut line)).await;
            let n = read
                .unwrap_or_else(|_| panic!("{}: no {what} in time", self.nick))
                .expect("read");
            assert!(n > 0, "{}: connection closed waiting for {what}", self.nick);
            let v: Value = serde_json::from_str(line.trim_end()).expect("a JSON event");
            if matches(&v) {
                return v;
            }
        }
    }

    /// The members of `room` according to this peer's instance.
    async fn who(&mut self, room: &str) -> Vec<String> {
        self.send(&format!("/who {room}")).await;
        let reply = self
            .expect("a /who reply", |v| {
                v["type"] == "reply" && v["command"] == "who" && v["data"]["room"] == room
            })
            .await;
        nicks(&reply["data"]["members"])
    }

    /// Reads `join`/`leave` events until it has seen every (room, nick) in
    /// `wanted`, by `deadline`; returns all it saw of that kind, in order.
    async fn presence(
        &mut self,
        kind: &str,
        wanted: &BTreeSet<(String, String)>,
        deadline: Instant,
    ) -> Vec<(String, String)> {
        let mut seen = Vec::new();
        while !wanted.iter().all(|w| seen.contains(w)) {
            let what = format!("{kind} of {wanted:?} (saw {seen:?})");
            let v = self.expect_by(deadline, &what, |v| v["type"] == kind).await;
            seen.push((text(&v["room"]), text(&v["nick"])));
        }
        seen
    }
}

fn text(v: &Value) -> String {
    v.as_str().expect("a string").to_owned()
}

fn nicks(v: &Value) -> Vec<String> {
    v.as_array().expect("a list").iter().map(text).collect()
}

/// Every (room, nick) pair for `nicks` in every room of [`ROOMS`].
fn everywhere(nicks: &[&str]) -> BTreeSet<(String, String)> {
    ROOMS
        .iter()
        .flat_map(|room| nicks.iter().map(|n| (room.to_string(), n.to_string())))
        .collect()
}

fn sorted(mut nicks: Vec<String>) -> Vec<String> {
    nicks.sort_by_key(|n| n.to_lowercase());
    nicks
}

/// Instance `name`'s command line: the poll bus on `db`, every `interval` ms.
fn poll_args<'a>(db: &'a str, name: &'a str, interval: &'a str) -> [&'a str; 8] {
    [
        "--db",
        db,
        "--bus",
        "poll",
        "--poll-interval",
        interval,
        "--instance",
        name,
    ]
}

async fn start(db: &str, name: &str) -> Daemon {
    Daemon::start(&poll_args(db, name, "20")).await
}

/// Three instances, each on its own `--db` URL (the same database, perhaps
/// through a proxy), and nine users: `u0`..`u2` on the first, `u3`..`u5` on
/// the second, `u6`..`u8` on the third, all in both rooms.
async fn cluster(dbs: [&str; 3]) -> (Vec<Daemon>, Vec<Peer>) {
    let mut daemons = Vec::new();
    // One after the other, so the first one creates and migrates the database.
    for (db, name) in dbs.iter().zip(["i1", "i2", "i3"]) {
        daemons.push(start(db, name).await);
    }
    let mut peers = Vec::new();
    for u in 0..9 {
        peers.push(Peer::join(daemons[u / 3].tcp, &format!("u{u}")).await);
    }
    // Every instance sees all nine in both rooms before the fault (a join
    // is answered before the directory has recorded it).
    let all: Vec<String> = (0..9).map(|u| format!("u{u}")).collect();
    for i in [0, 3, 6] {
        for room in ROOMS {
            converge(&mut peers[i], room, &all).await;
        }
    }
    (daemons, peers)
}

/// Asks `/who room` until it answers `expected` (sorted as the server sorts).
async fn converge(peer: &mut Peer, room: &str, expected: &[String]) {
    let expected = sorted(expected.to_vec());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let members = peer.who(room).await;
        if members == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}'s instance never showed {expected:?} in #{room}: {members:?}",
            peer.nick
        );
        // Polling a condition that settles within a poll interval, not
        // synchronising with an event.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How the third instance is taken away and given back.
enum Stall<'a> {
    /// SIGSTOP, then SIGCONT.
    Freeze(&'a Daemon),
    /// Its database link stops carrying bytes, then carries them again.
    Link(&'a Proxy),
}

impl Stall<'_> {
    fn begin(&self) {
        match self {
            Stall::Freeze(daemon) => daemon.freeze(),
            Stall::Link(proxy) => proxy.pause(),
        }
    }

    fn end(&self) {
        match self {
            Stall::Freeze(daemon) => daemon.thaw(),
            Stall::Link(proxy) => proxy.resume(),
        }
    }
}

/// The third instance stalls past its lease; meanwhile newcomers take two of
/// its users' nicks. After it returns: `u8` keeps its nick and rooms, `u6`
/// and `u7` are renamed to fresh guest nicks with a `nick` event (their rooms
/// follow them), nobody holds a nick twice, every instance agrees on `/who`,
/// and DMs reach each of them.
async fn a_stalled_instance_comes_back(daemons: &[Daemon], peers: &mut [Peer], stall: Stall<'_>) {
    let stalled = ["u6", "u7", "u8"];
    let started = Instant::now();
    stall.begin();
    // Typed during the stall: read by the instance only when it wakes (or,
    // cut off, it cannot number it). By then the nick is someone else's.
    peers[7].send(TYPED_WHILE_AWAY).await;

    // The others announce the stalled users' departures, once each.
    let gone = everywhere(&stalled);
    for watcher in [0, 3] {
        let deadline = started + DEPARTURE + Duration::from_secs(2);
        let seen = peers[watcher].presence("leave", &gone, deadline).await;
        assert_eq!(seen.len(), gone.len(), "each leave once: {seen:?}");
    }
    let announced = started.elapsed();
    eprintln!("departures announced {announced:?} after the fault");
    assert!(announced <= DEPARTURE, "leaves after {announced:?}");
    let live: Vec<String> = (0..6).map(|u| format!("u{u}")).collect();
    assert_eq!(peers[0].who("general").await, live);

    // Newcomers take two of the stalled users' nicks, fairly: their lease is
    // gone.
    let mut taker6 = Peer::join_rooms(daemons[0].tcp, "u6", &["general"]).await;
    let mut taker7 = Peer::join_rooms(daemons[1].tcp, "U7", &["general"]).await;
    stall.end();

    // The stalled instance finds its lease reaped: u6 and u7 are renamed...
    let mut guests = BTreeMap::new();
    for (u, lost) in [(6, "u6"), (7, "u7")] {
        let v = peers[u]
            .expect("a rename away from a nick taken meanwhile", |v| {
                v["type"] == "nick" && v["old"] == lost
            })
            .await;
        let guest = text(&v["new"]);
        assert!(guest.starts_with("guest-"), "{v}");
        peers[u].nick = guest.clone();
        guests.insert(lost, guest);
    }
    // ...and the others see u8 and the renamed users come back to both rooms.
    let mut back = vec!["u8"];
    back.extend(guests.values().map(String::as_str));
    for watcher in [0, 3] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let seen = peers[watcher]
            .presence("join", &everywhere(&back), deadline)
            .await;
        let stolen = seen
            .iter()
            .any(|(room, nick)| room == "side" && guests.contains_key(nick.as_str()));
        assert!(!stolen, "a taken nick was re-asserted: {seen:?}");
    }

    // Every instance agrees; every nick is held once.
    let mut general: Vec<String> = (0..9).map(|u| format!("u{u}")).collect();
    general[7] = "U7".to_owned();
    general.extend(guests.values().cloned());
    let mut side: Vec<String> = ["u0", "u1", "u2", "u3", "u4", "u5", "u8"]
        .map(String::from)
        .to_vec();
    side.extend(guests.values().cloned());
    for i in [0, 3, 8] {
        assert_eq!(peers[i].who("general").await, sorted(general.clone()));
        assert_eq!(peers[i].who("side").await, sorted(side.clone()));
    }

    // Direct messages reach each holder, whatever its instance.
    let guest6 = guests["u6"].clone();
    for (to, text) in [
        ("u8", "to u8"),
        (guest6.as_str(), "to renamed"),
        ("u6", "to taker"),
    ] {
        peers[0].send(&format!("/msg {to} {text}")).await;
    }
    let dm = |text: &'static str| move |v: &Value| v["type"] == "dm" && v["text"] == text;
    peers[8].expect("a DM", dm("to u8")).await;
    peers[6].expect("a DM", dm("to renamed")).await;
    taker6.expect("a DM", dm("to taker")).await;
    taker7.send("/msg u8 hi from U7").await;
    peers[8].expect("a DM", dm("hi from U7")).await;

    // What u7 typed while away went out under no nick: it was refused, and
    // said so, rather than sent as `u7` (which is U7's now). The renamed
    // user's next line is echoed after anything sent before it.
    peers[7].send("back").await;
    let nick = peers[7].nick.clone();
    peers[7]
        .expect("its own line", |v| {
            v["type"] == "message" && v["text"] == "back" && v["nick"] == nick.as_str()
        })
        .await;
    for room in ROOMS {
        let page = Http::new(daemons[0].http)
            .get(&format!("/rooms/{room}/history?limit=100"))
            .await
            .json();
        let sent: Vec<&Value> = page["messages"]
            .as_array()
            .expect("a page of messages")
            .iter()
            .filter(|m| m["text"] == TYPED_WHILE_AWAY)
            .collect();
        assert!(sent.is_empty(), "sent after the stall under {sent:?}");
    }
}

/// A line the stalled instance's user types while it is away.
const TYPED_WHILE_AWAY: &str = "typed while away";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_keeps_its_users_or_renames_them_on_postgres() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let url = pg.url.as_str();
    let (daemons, mut peers) = cluster([url, url, url]).await;
    a_stalled_instance_comes_back(&daemons, &mut peers, Stall::Freeze(&daemons[2])).await;
    drop(daemons);
    pg.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_keeps_its_users_or_renames_them_on_sqlite() {
    let dir = temp_dir();
    let url = common::sqlite_url(&dir);
    let url = url.as_str();
    let (daemons, mut peers) = cluster([url, url, url]).await;
    a_stalled_instance_comes_back(&daemons, &mut peers, Stall::Freeze(&daemons[2])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_from_postgres_keeps_its_users_or_renames_them() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let upstream = pg.address();
    let proxy = Proxy::start(upstream).await;
    let through = proxy.url_for(&pg.url);
    let (daemons, mut peers) = cluster([&pg.url, &pg.url, &through]).await;
    a_stalled_instance_comes_back(&daemons, &mut peers, Stall::Link(&proxy)).await;
    drop(daemons);
    pg.drop_now().await;
}

/// The third instance is cut off from PostgreSQL past its lease, and `u7`
/// joins `#side` meanwhile: the join is answered at once while its
/// statements wait on the link. A newcomer takes the nick (as `U7`) before
/// the link comes back. The held-up join reaches the database after the
/// reap: it must not come back as `u7` joining `#side` (a nick that is
/// someone else's by now), nor leave `u7` listed there. The others see `u7`
/// renamed to a guest nick that joins both rooms, as after any stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_held_up_past_the_lease_does_not_come_back_under_a_taken_nick() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let proxy = Proxy::start(pg.address()).await;
    let through = proxy.url_for(&pg.url);
    let (daemons, mut peers) = cluster([&pg.url, &pg.url, &through]).await;
    peers[7].send("/leave side").await;
    peers[7]
        .expect("its own leave", |v| {
            v["type"] == "leave" && v["nick"] == "u7"
        })
        .await;
    let side: Vec<String> = ["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u8"]
        .map(String::from)
        .to_vec();
    // Asked through u7's own connection, which takes one command at a time:
    // the answer also says the leave is done, so none of its statements is
    // on the link when it stops.
    converge(&mut peers[7], "side", &side).await;

    let started = Instant::now();
    proxy.pause();
    peers[7].send("/join side").await;
    peers[7]
        .expect("its own join", |v| {
            v["type"] == "join" && v["nick"] == "u7" && v["room"] == "side"
        })
        .await;
    let mut gone = everywhere(&["u6", "u8"]);
    gone.insert(("general".to_owned(), "u7".to_owned()));
    for watcher in [0, 3] {
        let deadline = started + DEPARTURE + Duration::from_secs(2);
        peers[watcher].presence("leave", &gone, deadline).await;
    }
    let _taker = Peer::join_rooms(daemons[1].tcp, "U7", &["general"]).await;
    proxy.resume();

    let renamed = peers[7]
        .expect("a rename away from a nick taken meanwhile", |v| {
            v["type"] == "nick" && v["old"] == "u7"
        })
        .await;
    let guest = text(&renamed["new"]);
    assert!(guest.starts_with("guest-"), "{renamed}");
    peers[7].nick = guest.clone();
    let back = everywhere(&["u6", "u8", guest.as_str()]);
    for watcher in [0, 3] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let seen = peers[watcher].presence("join", &back, deadline).await;
        let stolen = seen.iter().any(|(_, nick)| nick == "u7");
        assert!(!stolen, "the held-up join came back under u7: {seen:?}");
    }
    let mut side = side;
    side.push(guest);
    for i in [0, 3, 7] {
        converge(&mut peers[i], "side", &side).await;
    }
    drop(daemons);
    pg.drop_now().await;
}

/// SIGKILL the third instance: the survivors' users and room streams see
/// each of its users leave each room within the lease, once; `/who` drops
/// them; restarting it under the same name announces nobody who is not there.
async fn a_killed_instance_users_leave(db: &str) {
    let (mut daemons, mut peers) = cluster([db, db, db]).await;
    let mut stream = Http::new(daemons[0].http).sse("/messages/side", None).await;
    let started = Instant::now();
    daemons[2].kill9().await;

    let gone = everywhere(&["u6", "u7", "u8"]);
    for watcher in [0, 3] {
        let deadline = started + DEPARTURE + Duration::from_secs(2);
        let seen = peers[watcher].presence("leave", &gone, deadline).await;
        assert_eq!(seen.len(), gone.len(), "each leave once: {seen:?}");
    }
    let announced = started.elapsed();
    eprintln!("departures announced {announced:?} after the fault");
    assert!(announced <= DEPARTURE, "leaves after {announced:?}");
    // The room stream got them with the members (so they are queued by now).
    let mut streamed = Vec::new();
    while streamed.len() < 3 {
        let f = stream.expect(|_, v| v["type"] == "leave").await;
        streamed.push(text(&f.json()["nick"]));
    }
    assert_eq!(sorted(streamed), ["u6", "u7", "u8"]);
    let live: Vec<String> = (0..6).map(|u| format!("u{u}")).collect();
    for i in [0, 3] {
        assert_eq!(peers[i].who("general").await, live);
        assert_eq!(peers[i].who("side").await, live);
    }

    // Back under the same name: the first presence event the others see is
    // the one real arrival.
    daemons[2] = start(db, "i3").await;
    let _marker = Peer::join_rooms(daemons[2].tcp, "marker", &["general"]).await;
    for watcher in [0, 3] {
        let first = peers[watcher]
            .expect("the marker's join", |v| {
                v["type"] == "join" || v["type"] == "leave"
            })
            .await;
        assert_eq!(
            (text(&first["type"]), text(&first["nick"])),
            ("join".to_owned(), "marker".to_owned()),
            "a stray presence event after the restart: {first}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_users_leave_on_postgres() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    a_killed_instance_users_leave(&pg.url).await;
    pg.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_users_leave_on_sqlite() {
    let dir = temp_dir();
    a_killed_instance_users_leave(&common::sqlite_url(&dir)).await;
}

/// How long a departure may take over the slow link below: the lease, a
/// look at the others and a reap of a dozen round trips, and the poll that
/// delivers it, each a few round trips of half a second.
const SLOW_DEPARTURE: Duration = Duration::from_secs(40);

/// Every instance's link to PostgreSQL slowed to round trips of about
/// 500 ms (each chunk held 250 ms each way). A reap is a transaction of a
/// dozen round trips: inside the heartbeat it did not fit the heartbeat's
/// 5 s deadline, was cut off every time, and a killed instance's users
/// never left (their nicks stayed taken, DMs to them were lost). It runs
/// beside the heartbeat now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_users_leave_over_a_slow_database() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let link = Proxy::start(pg.address()).await;
    let slow = link.url_for(&pg.url);
    let (mut daemons, mut peers) = cluster([&slow, &slow, &slow]).await;
    link.set_delay(Duration::from_millis(250));
    let started = Instant::now();
    daemons[2].kill9().await;
    let gone = everywhere(&["u6", "u7", "u8"]);
    let seen = peers[0]
        .presence("leave", &gone, started + SLOW_DEPARTURE)
        .await;
    assert_eq!(seen.len(), gone.len(), "each leave once: {seen:?}");
    eprintln!(
        "departures announced {:?} after the kill, over the slow link",
        started.elapsed()
    );
    drop(daemons);
    pg.drop_now().await;
}

/// Every instance loses PostgreSQL for longer than the lease; the first gets
/// it back a few seconds before the others. Nobody was away much longer than
/// anyone else, so nobody leaves and every nick and room is kept: the first
/// instance back does not reap the others, which are as alive as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_everyone_sees_gives_nothing_away() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let first = Proxy::start(pg.address()).await;
    let others = Proxy::start(pg.address()).await;
    let (early, late) = (first.url_for(&pg.url), others.url_for(&pg.url));
    let (daemons, mut peers) = cluster([&early, &late, &late]).await;

    // The outage's shape is the fault itself, not a synchronisation: all
    // down past the lease, then the first instance back 3 s before the rest.
    first.pause();
    others.pause();
    tokio::time::sleep(LEASE + Duration::from_secs(3)).await;
    first.resume();
    tokio::time::sleep(Duration::from_secs(3)).await;
    others.resume();

    let _marker = Peer::join_rooms(daemons[0].tcp, "marker", &["general"]).await;
    for watcher in [0, 3] {
        // A join from before the outage may still be on its way; a leave
        // would be a live user given away.
        let leave = peers[watcher]
            .expect("the marker's join", |v| {
                v["type"] == "leave" || (v["type"] == "join" && v["nick"] == "marker")
            })
            .await;
        assert_eq!(leave["type"], "join", "a user left in the outage: {leave}");
    }
    let mut all: Vec<String> = (0..9).map(|u| format!("u{u}")).collect();
    all.push("marker".to_owned());
    for i in [0, 3, 6] {
        assert_eq!(peers[i].who("general").await, sorted(all.clone()));
    }
    drop(daemons);
    pg.drop_now().await;
}

/// Two instances on `db`: `skewed` runs with `env` (a clock of its own, see
/// `common::skewed_clock`), `plain` with the machine's clock; `u0` is on
/// the first and `u1` on the second, both in every room.
async fn skewed_pair(db: &str, env: &[(&str, String)]) -> ([Daemon; 2], [Peer; 2]) {
    let skewed = Daemon::start_env(&poll_args(db, "skewed", "20"), env).await;
    let plain = start(db, "plain").await;
    let mut peers = [
        Peer::join(skewed.tcp, "u0").await,
        Peer::join(plain.tcp, "u1").await,
    ];
    let both = ["u0".to_owned(), "u1".to_owned()];
    for peer in &mut peers {
        for room in ROOMS {
            converge(peer, room, &both).await;
        }
    }
    ([skewed, plain], peers)
}

/// A marker joins #general on `daemon`, and each of `peers` must see that
/// join before any `leave`: nobody left before it. Returns the marker, who
/// leaves when dropped.
async fn marker_comes_first(daemon: &Daemon, peers: &mut [&mut Peer]) -> Peer {
    let marker = Peer::join_rooms(daemon.tcp, "marker", &["general"]).await;
    for peer in peers.iter_mut() {
        let first = peer
            .expect("the marker's join", |v| {
                v["type"] == "leave" || (v["type"] == "join" && v["nick"] == "marker")
            })
            .await;
        assert_eq!(first["type"], "join", "a live user left: {first}");
    }
    marker
}

/// Waits out `lease_and_more` (the fault's shape, not a synchronisation),
/// then checks that nobody left meanwhile ([`marker_comes_first`]) and
/// that every peer's instance lists everyone in #general. Returns the marker.
async fn nobody_leaves(daemon: &Daemon, peers: &mut [Peer], lease_and_more: Duration) -> Peer {
    tokio::time::sleep(lease_and_more).await;
    let marker = marker_comes_first(daemon, &mut peers.iter_mut().collect::<Vec<_>>()).await;
    let everyone = ["marker", "u0", "u1"].map(String::from).to_vec();
    for peer in peers.iter_mut() {
        assert_eq!(peer.who("general").await, everyone);
    }
    marker
}

/// An instance whose clock runs a minute ahead must not take the other
/// instance for dead: leases are judged by watching renewals with each
/// instance's own monotonic clock, not by comparing wall clocks (which gave
/// `u1`'s nick away a lease after the start, and made it leave every room).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_running_ahead_gives_no_live_user_away() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let Some(env) = common::skewed_clock("+60s") else {
        return;
    };
    let (daemons, mut peers) = skewed_pair(&pg.url, &env).await;
    // Long enough for the skewed instance to have reaped.
    let _marker = nobody_leaves(&daemons[1], &mut peers, LEASE + Duration::from_secs(4)).await;
    drop(daemons);
    pg.drop_now().await;
}

/// An instance whose clock runs a minute behind must still reap a killed
/// one within a lease: comparing wall clocks kept the dead instance's users
/// for a lease plus the minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_running_behind_still_reaps_the_dead() {
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let Some(env) = common::skewed_clock("-60s") else {
        return;
    };
    let ([_skewed, mut plain], mut peers) = skewed_pair(&db, &env).await;
    let started = Instant::now();
    plain.kill9().await;
    let gone = ROOMS.map(|room| (room.to_owned(), "u1".to_owned())).into();
    let seen = peers[0]
        .presence("leave", &gone, started + DEPARTURE + Duration::from_secs(2))
        .await;
    assert_eq!(seen.len(), gone.len(), "each leave once: {seen:?}");
    eprintln!(
        "departures announced {:?} after the kill",
        started.elapsed()
    );
    assert_eq!(peers[0].who("general").await, ["u0"]);
}

/// An instance's wall clock is stepped an hour ahead, then two hours back
/// (someone fixing a bad step) while it runs. Its renewals must still count
/// (a renewal writes one more than the last value when its clock says less),
/// so nobody takes its users for gone; killed afterwards, it is still
/// reaped within the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepped_back_mid_run_keeps_its_users_until_it_dies() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let dir = temp_dir();
    let offset = dir.path().join("faketime.rc");
    std::fs::write(&offset, "+0s\n").unwrap();
    let Some(env) = common::stepped_clock(&offset) else {
        return;
    };
    let ([mut stepped, plain], mut peers) = skewed_pair(&pg.url, &env).await;
    // The steps are the fault: an hour ahead for a heartbeat or so, then back.
    std::fs::write(&offset, "+3600s\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    std::fs::write(&offset, "-3600s\n").unwrap();
    let _marker = nobody_leaves(&plain, &mut peers, LEASE + Duration::from_secs(4)).await;

    let started = Instant::now();
    stepped.kill9().await;
    let gone = ROOMS.map(|room| (room.to_owned(), "u0".to_owned())).into();
    let seen = peers[1]
        .presence("leave", &gone, started + DEPARTURE + Duration::from_secs(2))
        .await;
    assert_eq!(seen.len(), gone.len(), "each leave once: {seen:?}");
    drop((stepped, plain));
    pg.drop_now().await;
}

/// A second instance started under a running instance's name refuses to
/// start (it sees the name's lease being renewed) instead of reaping the
/// running one's users as a previous life. A restart under the name of an
/// instance that was killed a moment ago still starts, and its users leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_under_a_running_instance_s_name_refuses_to_start() {
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let mut twin = start(&db, "twin").await;
    let other = start(&db, "other").await;
    let mut u0 = Peer::join(twin.tcp, "u0").await;
    let mut u1 = Peer::join(other.tcp, "u1").await;
    converge(&mut u1, "general", &["u0".to_owned(), "u1".to_owned()]).await;

    let log = Daemon::refused(&poll_args(&db, "twin", "20")).await;
    assert!(log.contains("in use by a running instance"), "{log}");
    let _marker = marker_comes_first(&other, &mut [&mut u0, &mut u1]).await;

    twin.kill9().await;
    let _again = start(&db, "twin").await;
    let gone = ROOMS.map(|room| (room.to_owned(), "u0".to_owned())).into();
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = u1.presence("leave", &gone, deadline).await;
    assert_eq!(seen.len(), gone.len(), "each leave once: {seen:?}");
}

/// Two instances on the database `db`, started one after the other, each
/// with one user in #general; the second's user sees both there.
struct Pair {
    first: Daemon,
    second: Daemon,
    on_first: Peer,
    on_second: Peer,
}

/// [`Pair`]: `instances[i]` is an instance's name and its user's nick.
async fn pair(db: &str, instances: [(&str, &str); 2]) -> Pair {
    let [(first, nick_first), (second, nick_second)] = instances;
    let first = start(db, first).await;
    let second = start(db, second).await;
    let on_first = Peer::join_rooms(first.tcp, nick_first, &["general"]).await;
    let mut on_second = Peer::join_rooms(second.tcp, nick_second, &["general"]).await;
    let both = [nick_first.to_owned(), nick_second.to_owned()];
    converge(&mut on_second, "general", &both).await;
    Pair {
        first,
        second,
        on_first,
        on_second,
    }
}

/// A DM taken from the inbox by a statement that outlives the take's 30 s
/// deadline (a database that answers late; here a trigger that sleeps
/// past it, once) must still be there for the next take. Deleted in a
/// statement of its own, it was gone when the late statement finished,
/// and the DM was lost without a word to anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_whose_inbox_statement_outlived_the_take_stays_in_the_inbox() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let db = pg.url.clone();
    let Pair {
        first,
        second,
        on_first: mut u0,
        on_second: mut u1,
    } = pair(&db, [("one", "u0"), ("two", "u1")]).await;
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&db).await.unwrap();
        for statement in [
            "CREATE SEQUENCE inbox_stalls",
            // Only for this DM's row: a take of anything else still in an
            // inbox (a join) would take the stall and prove nothing.
            "CREATE FUNCTION stall_once() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF OLD.instance = 'one' AND OLD.payload LIKE '%through a slow take%' THEN
                 IF nextval('inbox_stalls') = 1 THEN PERFORM pg_sleep(32); END IF;
               END IF;
               RETURN NULL;
             END $$",
            "CREATE TRIGGER stall_once AFTER DELETE ON inbox
             FOR EACH ROW EXECUTE FUNCTION stall_once()",
        ] {
            sqlx::query(statement).execute(&mut conn).await.unwrap();
        }
    }
    u1.send("/msg u0 through a slow take").await;
    u1.expect("the DM's echo", |v| v["type"] == "dm").await;
    let deadline = Instant::now() + Duration::from_secs(50);
    let dm = u0
        .expect_by(deadline, "the DM", |v| v["type"] == "dm")
        .await;
    assert_eq!(dm["text"], "through a slow take");
    drop((first, second));
    pg.drop_now().await;
}

/// An instance given a running instance's name while that one is frozen
/// takes the name over only once the frozen one's lease has run out (as any
/// reaper would); the frozen one, woken, finds another life in the name's
/// row and stops, saying why, rather than serve on beside it with users the
/// cluster saw leave (`u0` is a newcomer's nick by then). Nothing its user
/// typed goes out. Without the life in the row, its renewal took the
/// namesake's row for its own and it served on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_whose_name_was_taken_over_stops_when_it_wakes() {
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let Pair {
        first: mut twin,
        second: other,
        on_first: mut u0,
        on_second: mut u1,
    } = pair(&db, [("twin", "u0"), ("other", "u1")]).await;
    twin.freeze();
    let _namesake = start(&db, "twin").await;
    let gone = [("general".to_owned(), "u0".to_owned())].into();
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = u1.presence("leave", &gone, deadline).await;
    assert_eq!(seen.len(), 1, "u0 left once: {seen:?}");
    let mut newcomer = Peer::join_rooms(other.tcp, "u0", &["general"]).await;
    u0.send("typed by the first u0").await;
    twin.thaw();

    let status = twin
        .exits_within(Duration::from_secs(10))
        .await
        .expect("the instance whose name was taken over stopped");
    assert!(!status.success(), "it stops as a failure: {status}");
    let log = twin.logs();
    assert!(log.contains("took over instance name"), "{log}");
    newcomer.send("typed by the second u0").await;
    let next = u1.expect("a message", |v| v["type"] == "message").await;
    assert_eq!(next["text"], "typed by the second u0", "{next}");
}

/// As above, with the newcomer `u0` on the namesake itself. The woken
/// instance shares the namesake's name, and its polls took the namesake's
/// inbox until it stopped: a DM meant for the newcomer went to the old
/// `u0`'s connection instead (lost to one user, shown to another). Here the
/// namesake is frozen a moment too, so that the DM waits in the inbox when
/// the old instance wakes. Its takes now need the name's row to be its own
/// life's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_instance_whose_name_was_taken_over_takes_none_of_its_dms() {
    // On PostgreSQL: a process frozen inside an SQLite write would lock
    // every instance out of the shared file, the DM's sender's too.
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let db = pg.url.clone();
    let Pair {
        first: mut twin,
        second: _other,
        on_first: mut u0,
        on_second: mut u1,
    } = pair(&db, [("twin", "u0"), ("other", "u1")]).await;
    twin.freeze();
    let namesake = start(&db, "twin").await;
    let mut newcomer = Peer::join_rooms(namesake.tcp, "u0", &["general"]).await;
    namesake.freeze();
    u1.send("/msg u0 for the newcomer").await;
    u1.expect("the DM's echo", |v| v["type"] == "dm").await;
    twin.thaw();
    twin.exits_within(Duration::from_secs(10))
        .await
        .expect("the instance whose name was taken over stopped");
    namesake.thaw();

    let dm = newcomer.expect("the DM", |v| v["type"] == "dm").await;
    assert_eq!(dm["text"], "for the newcomer");
    let stale = u0.read_until_closed().await;
    assert!(!stale.contains("for the newcomer"), "{stale}");
    drop((twin, namesake, _other));
    pg.drop_now().await;
}

/// `ann` on instance `awake` and `bo` on instance `stalled`, both in
/// #general; `stalled` frozen, ann's DM "are you there?" to bo shown as
/// sent, and bo's leave seen once the others reaped `stalled`.
struct DmToAStalledUser {
    awake: Daemon,
    stalled: Daemon,
    ann: Peer,
    bo: Peer,
}

async fn dm_to_a_stalled_user(db: &str) -> DmToAStalledUser {
    let Pair {
        first: stalled,
        second: awake,
        on_first: bo,
        on_second: mut ann,
    } = pair(db, [("stalled", "bo"), ("awake", "ann")]).await;

    stalled.freeze();
    ann.send("/msg bo are you there?").await;
    ann.expect("the DM's echo", |v| v["type"] == "dm").await;
    // The others reap the stalled instance: bo leaves.
    ann.expect("bo's leave", |v| v["type"] == "leave" && v["nick"] == "bo")
        .await;
    DmToAStalledUser {
        awake,
        stalled,
        ann,
        bo,
    }
}

/// A DM sent to a user whose instance has just stalled is queued for that
/// instance; the others reap it a lease later. When it wakes, the user still
/// gets the DM: the reap keeps a reaped instance's DMs for a while (it may
/// be stalled, not dead), where it used to delete them, and the sender,
/// who had been shown the DM as sent, never learnt it was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_queued_for_a_stalled_instance_arrives_when_it_wakes() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let DmToAStalledUser {
        awake,
        stalled,
        ann: _ann,
        mut bo,
    } = dm_to_a_stalled_user(&pg.url).await;
    stalled.thaw();
    let dm = bo.expect("the DM", |v| v["type"] == "dm").await;
    assert_eq!(dm["text"], "are you there?");
    assert_eq!(dm["from"], "ann");
    drop((awake, stalled));
    pg.drop_now().await;
}

/// Stores seq 1 of `room` in the SQLite database `db` as a row no instance
/// can read (no message id, no valid nick), and announces it as the room's
/// newest seq.
async fn unreadable_first_message(db: &str, room: &str) {
    use sqlx::Connection;

    let mut conn = sqlx::SqliteConnection::connect(db).await.unwrap();
    sqlx::query(
        "INSERT INTO messages (room, seq, id, nick, text, kind, ts)
         VALUES ($1, 1, 'not-a-uuid', 'not a nick', 'x', 'text', 0)",
    )
    .bind(room)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO room_seqs (room, last_seq) VALUES ($1, 1)
         ON CONFLICT (room) DO UPDATE SET last_seq = 1",
    )
    .bind(room)
    .execute(&mut conn)
    .await
    .unwrap();
}

/// An instance that cannot read one room (a corrupt row in a room only it
/// watches) is still alive, and must keep its lease: its heartbeat runs on
/// its own, not after a successful poll. When it ran after the poll, the
/// others reaped the instance a lease later and gave its users away. Nor
/// does that room hold up the rest of its polls: before, it also stopped
/// every other room's messages and its inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_polls_fail_keeps_its_users() {
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let failing = start(&db, "failing").await;
    let other = start(&db, "other").await;
    let mut u0 = Peer::join_rooms(failing.tcp, "u0", &["general", "side"]).await;
    let mut u1 = Peer::join_rooms(other.tcp, "u1", &["general"]).await;
    converge(&mut u1, "general", &["u0".to_owned(), "u1".to_owned()]).await;

    // A row no instance can read, in the room only `failing` watches.
    unreadable_first_message(&db, "side").await;

    // The fault's shape: a lease and two heartbeats of failing polls.
    tokio::time::sleep(LEASE + Duration::from_secs(4)).await;
    // Nobody left; and the room that cannot be read holds up no other news.
    let _marker = marker_comes_first(&other, &mut [&mut u1, &mut u0]).await;
    drop((failing, other));
}

/// With a poll interval longer than half a lease, a dead instance is still
/// reaped: the heartbeat that watches the others runs every 2 s whatever
/// the poll interval. (When it ran from the poller, looks more than half a
/// lease apart were each taken for a gap in looking, and nobody was ever
/// reaped.) The departure reaches the others at their next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_interval_still_reaps_the_dead() {
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let mut dying = Daemon::start(&poll_args(&db, "dying", "6000")).await;
    let survivor = Daemon::start(&poll_args(&db, "survivor", "6000")).await;
    let _u0 = Peer::join_rooms(dying.tcp, "u0", &["general"]).await;
    let mut u1 = Peer::join_rooms(survivor.tcp, "u1", &["general"]).await;
    u1.expect("u0's join", |v| v["type"] == "join" && v["nick"] == "u0")
        .await;
    let started = Instant::now();
    dying.kill9().await;
    let gone = [("general".to_owned(), "u0".to_owned())].into();
    let deadline = started + DEPARTURE + Duration::from_secs(8);
    let seen = u1.presence("leave", &gone, deadline).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
}

/// Two instances started under one name at the same moment: one serves and
/// the other refuses. The name is taken in the transaction that clears a
/// previous life's leftovers, only if its row still holds what was watched;
/// before, both watched, both found nothing running, and both served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_starting_under_one_name_at_once_do_not_both_serve() {
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    // Two rounds: no row under the name yet, then a killed life's row.
    let mut killed = None;
    for round in ["no previous life", "a killed previous life"] {
        let args = poll_args(&db, "dup", "20");
        let (one, two) = tokio::join!(Daemon::try_start(&args), Daemon::try_start(&args));
        let (serving, refused): (Vec<_>, Vec<_>) = [one, two].into_iter().partition(Result::is_ok);
        let refused: Vec<String> = refused.into_iter().filter_map(Result::err).collect();
        assert_eq!(serving.len(), 1, "{round}: exactly one serves: {refused:?}");
        let log = &refused[0];
        assert!(
            log.contains("in use by a running instance"),
            "{round}: {log}"
        );
        let mut daemon = serving.into_iter().next().unwrap().unwrap();
        daemon.kill9().await;
        killed = Some(daemon);
    }
    drop(killed);
}

/// One unreadable row in a room both instances watch: its seq is skipped
/// (a hole, as for any seq never stored), and the messages after it still
/// reach the room. Before, the room stopped there for good, and every later
/// message was stored and reached nobody, its sender included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_after_an_unreadable_row_still_arrives() {
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    let a = start(&db, "a").await;
    let b = start(&db, "b").await;
    let mut u0 = Peer::join_rooms(a.tcp, "u0", &["side"]).await;
    let mut u1 = Peer::join_rooms(b.tcp, "u1", &["side"]).await;
    converge(&mut u1, "side", &["u0".to_owned(), "u1".to_owned()]).await;

    unreadable_first_message(&db, "side").await;

    u1.send("after the bad row").await;
    for peer in [&mut u1, &mut u0] {
        let seen = peer
            .expect("the message after the bad row", |v| {
                v["type"] == "message" || v["type"] == "error"
            })
            .await;
        assert_eq!(
            (seen["text"].as_str(), seen["seq"].as_u64()),
            (Some("after the bad row"), Some(2)),
            "{seen}"
        );
    }
    drop((a, b));
}

/// A DM kept for a stalled instance whose user's nick was taken while it
/// was away: on waking the user is renamed to a guest nick, and must still
/// get the DM sent to them as `bo` (and the new `bo` must not). The kept
/// DMs are delivered before the re-assertion renames anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_dm_reaches_a_user_renamed_on_waking() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let DmToAStalledUser {
        awake,
        stalled,
        mut ann,
        mut bo,
    } = dm_to_a_stalled_user(&pg.url).await;
    let mut new_bo = Peer::join_rooms(awake.tcp, "bo", &["general"]).await;
    stalled.thaw();
    let dm = bo.expect("the DM", |v| v["type"] == "dm").await;
    assert_eq!(dm["text"], "are you there?");
    bo.expect("the rename to a guest nick", |v| v["type"] == "nick")
        .await;
    // The new bo is not told anything meant for the old one: the next
    // thing it sees after a DM of its own is that DM.
    ann.send("/msg bo hello, new bo").await;
    let first = new_bo.expect("a DM", |v| v["type"] == "dm").await;
    assert_eq!(first["text"], "hello, new bo");
    drop((awake, stalled));
    pg.drop_now().await;
}

/// A DM is taken from an instance's inbox by a statement that deletes the
/// rows it returns. When the poll stopped waiting for it (its 5 s deadline)
/// after the database had run it, the DM was gone from the inbox and
/// delivered to nobody, after its sender had been shown it as sent. Here a
/// row lock held by the test keeps the take waiting past the deadline (as a
/// slow database, or a stall between sending the statement and reading its
/// answer, would); the DM must still arrive once the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_whose_take_outlived_the_poll_s_deadline_still_arrives() {
    use sqlx::Connection;
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let proxy = Proxy::start(pg.address()).await;
    let awake = start(&pg.url, "awake").await;
    let held = start(&proxy.url_for(&pg.url), "held").await;
    let mut ann = Peer::join_rooms(awake.tcp, "ann", &["general"]).await;
    let mut bo = Peer::join_rooms(held.tcp, "bo", &["general"]).await;
    converge(&mut ann, "general", &["ann".to_owned(), "bo".to_owned()]).await;

    // bo's instance cannot take the DM before the test locks its row: its
    // database link is paused for that moment (well inside its lease).
    proxy.pause();
    ann.send("/msg bo are you there?").await;
    ann.expect("the DM's echo", |v| v["type"] == "dm").await;
    let mut locker = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    let locked: Vec<(i64,)> =
        sqlx::query_as("SELECT id FROM inbox WHERE instance = 'held' FOR UPDATE")
            .fetch_all(&mut locker)
            .await
            .unwrap();
    assert!(!locked.is_empty(), "the DM waits in the inbox");
    proxy.resume();
    // The next poll finds the row, and its take waits on the lock until the
    // poll's deadline shuts the gate.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !held.logs().contains("ordering authority unreachable") {
        assert!(Instant::now() < deadline, "the poll never gave up waiting");
        // Polling a log the daemon writes, not synchronising with an event.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    let dm = bo.expect("the DM", |v| v["type"] == "dm").await;
    assert_eq!(dm["text"], "are you there?");
    drop((awake, held));
    pg.drop_now().await;
}

/// What waits in `instance`'s inbox, oldest first: each row's `kind`.
async fn inbox_kinds(db: &mut sqlx::PgConnection, instance: &str) -> Vec<String> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT payload FROM inbox WHERE instance = $1 ORDER BY id")
            .bind(instance)
            .fetch_all(db)
            .await
            .expect("the inbox reads");
    rows.iter()
        .map(|(payload,)| {
            let row: Value = serde_json::from_str(payload).expect("a JSON row");
            text(&row["kind"])
        })
        .collect()
}

/// A join that reaches PostgreSQL while another instance is reaping its
/// instance (the reap has deleted the instance's row and posted its users'
/// departures, and not committed yet) must not be announced after the
/// departure, nor leave a membership the reap missed. Before the join took
/// its instance's row first, it read the row the reap had not yet deleted
/// for others to see, and posted its `join` after the `leave`: the others
/// saw the user come back under a nick that is free to take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_racing_the_reap_of_its_instance_is_not_announced_after_the_leave() {
    use baby_discord::bus::{Directory, PollBus};
    use baby_discord::core::{Nick, RoomName, SessionId};
    use baby_discord::store::{self, Durability};
    use sqlx::Connection;

    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    let store = store::open(&pg.url, Durability::Sync).await.unwrap();
    let open = |name: &'static str| {
        PollBus::open(
            &pg.url,
            name,
            store.clone(),
            Duration::from_secs(1),
            Durability::Sync,
        )
    };
    let (a, _b) = (open("a").await.unwrap(), open("b").await.unwrap());
    let (u7, side) = (Nick::parse("u7").unwrap(), RoomName::parse("side").unwrap());
    assert!(a.claim_nick(&u7, SessionId(1)).await.unwrap());

    // `b` reaps `a` (the statements of the poll bus's reap, in its order)
    // and is about to commit.
    let mut reaper = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    let mut observer = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    let gone = r#"{"kind":"gone","members":[]}"#;
    let mut reap = reaper.begin().await.unwrap();
    for sql in [
        "DELETE FROM instances WHERE instance = 'a'",
        "DELETE FROM presence WHERE instance = 'a'",
        "DELETE FROM nicks WHERE instance = 'a'",
        "DELETE FROM inbox WHERE instance = 'a'",
    ] {
        sqlx::query(sql).execute(&mut *reap).await.unwrap();
    }
    sqlx::query("INSERT INTO inbox (instance, payload) SELECT instance, $1 FROM instances")
        .bind(gone)
        .execute(&mut *reap)
        .await
        .unwrap();

    // `a`'s join, held up until now, arrives.
    let join = tokio::spawn(async move { a.joined(&side, &u7, 0).await });
    // It either finishes, or waits for the reap's lock: polling a state,
    // not synchronising with an event.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut observer)
        .await
        .unwrap();
        if join.is_finished() || waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the join neither ended nor waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reap.commit().await.unwrap();
    join.await.unwrap().unwrap();

    let kinds = inbox_kinds(&mut observer, "b").await;
    assert_eq!(kinds, ["gone"], "b's inbox, oldest first");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM presence WHERE instance = 'a'")
        .fetch_one(&mut observer)
        .await
        .unwrap();
    assert_eq!(left, 0, "a membership the reap did not remove");
    drop((reaper, observer));
    pg.drop_now().await;
}
