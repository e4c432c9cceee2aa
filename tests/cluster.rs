//! Three real daemons behaving as one chat through a shared database
//! (`--bus poll`): on one SQLite file always, on PostgreSQL when reachable.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::http::Http;
use common::{Client, Daemon, PgDatabase, temp_dir};
use serde_json::Value;

async fn cluster(db: &str) -> Vec<Daemon> {
    let mut daemons = Vec::new();
    // One after the other, so the first one creates and migrates the database.
    for name in ["i1", "i2", "i3"] {
        let args = [
            "--db",
            db,
            "--bus",
            "poll",
            "--poll-interval",
            "20",
            "--instance",
            name,
        ];
        daemons.push(Daemon::start(&args).await);
    }
    daemons
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

/// Reads `n` events of `kind` (`join`, `leave`), returning their nicks sorted:
/// they come from several instances, in no set order.
async fn presence(client: &mut Client, kind: &str, n: usize) -> Vec<String> {
    let mut nicks = Vec::new();
    while nicks.len() < n {
        let v = client.expect(|v| v["type"] == kind).await;
        nicks.push(v["nick"].as_str().unwrap().to_owned());
    }
    nicks.sort();
    nicks
}

async fn three_instances_behave_as_one(db: &str) {
    let mut daemons = cluster(db).await;
    let mut alice = Client::in_room(daemons[0].tcp, "alice", "general").await;
    let mut bob = Client::in_room(daemons[1].tcp, "bob", "general").await;
    let mut carol = Client::in_room(daemons[2].tcp, "carol", "general").await;
    // Joins on other instances reach the room's members here.
    assert_eq!(presence(&mut alice, "join", 2).await, ["bob", "carol"]);

    // A nick is unique across the cluster, whatever the case.
    let mut mallory = Client::json(daemons[1].tcp, "mallory").await;
    mallory.send("/nick ALICE").await;
    mallory.expect_error("nick-taken").await;

    // Everyone talks at once, from three instances.
    for i in 0..5 {
        alice.send(&format!("a{i}")).await;
        bob.send(&format!("b{i}")).await;
        carol.send(&format!("c{i}")).await;
    }
    let a = messages(&mut alice, 15).await;
    let b = messages(&mut bob, 15).await;
    let c = messages(&mut carol, 15).await;
    assert_eq!(
        a.keys().copied().collect::<Vec<_>>(),
        (1..=15).collect::<Vec<_>>(),
        "no gap"
    );
    assert_eq!(
        a, b,
        "every instance sees the same seq for the same message"
    );
    assert_eq!(a, c);

    // /who and /rooms see every instance.
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
        (6..=15).collect::<Vec<_>>()
    );

    // Renames and leaves cross instances too.
    carol.send("/nick Caroline").await;
    let nick = alice.expect(|v| v["type"] == "nick").await;
    assert_eq!(
        (nick["old"].as_str(), nick["new"].as_str()),
        (Some("carol"), Some("Caroline"))
    );
    carol.send("/nick carol").await;
    alice
        .expect(|v| v["type"] == "nick" && v["new"] == "carol")
        .await;
    dave.send("/leave").await;
    assert_eq!(presence(&mut bob, "leave", 1).await, ["dave"]);

    // A read-only room stream follows a room that has no member on its
    // instance: the bus still brings the room's messages there.
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

    // Killing one instance does not disturb the others...
    drop(daemons.pop()); // SIGKILL i3: carol and dave vanish without a word
    alice.send("still here").await;
    let m = bob.expect(|v| v["type"] == "message").await;
    assert_eq!(
        (m["seq"].as_u64(), m["text"].as_str()),
        (Some(16), Some("still here"))
    );

    // ...and its nicks free up once its lease runs out.
    let started = Instant::now();
    let mut newcomer = Client::json(daemons[0].tcp, "newcomer").await;
    loop {
        newcomer.send("/nick carol").await;
        let v = newcomer
            .expect(|v| v["type"] == "nick" || v["type"] == "error")
            .await;
        if v["type"] == "nick" {
            break;
        }
        assert_eq!(v["code"], "nick-taken");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "carol's lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(500)).await; // polling a lease, not synchronising
    }
    let freed_after = started.elapsed();
    assert!(
        freed_after <= baby_discord::bus::LEASE + Duration::from_secs(5),
        "{freed_after:?}"
    );
    alice.send("/who").await;
    let who: Value = alice.expect(|v| v["type"] == "reply").await;
    assert_eq!(
        who["data"]["members"],
        serde_json::json!(["alice", "bob"]),
        "the dead instance's members are gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_sqlite_file() {
    let dir = temp_dir();
    let db = common::sqlite_url(&dir);
    three_instances_behave_as_one(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_postgres() {
    let Some(pg) = PgDatabase::create().await else {
        return;
    };
    three_instances_behave_as_one(&pg.url).await;
    pg.drop_now().await;
}

#[tokio::test]
async fn instances_started_together_share_a_new_sqlite_file() {
    let dir = temp_dir();
    let db = format!("sqlite://{}", dir.path().join("new.db").display());
    let start = |name: &'static str| {
        let db = db.clone();
        async move {
            let args = ["--db", db.as_str(), "--bus", "poll", "--instance", name];
            Daemon::start(&args).await
        }
    };
    // All three migrate the same new file at once; each must come up.
    let (a, b, c) = tokio::join!(start("i1"), start("i2"), start("i3"));
    let mut alice = Client::in_room(a.tcp, "alice", "general").await;
    let _bob = Client::in_room(c.tcp, "bob", "general").await;
    alice
        .expect(|v| v["type"] == "join" && v["nick"] == "bob")
        .await;
    alice.send("/who").await;
    let who = alice
        .expect(|v| v["type"] == "reply" && v["command"] == "who")
        .await;
    assert_eq!(who["data"]["members"], serde_json::json!(["alice", "bob"]));
    drop(b);
}

#[tokio::test]
async fn guests_arriving_together_on_one_instance_all_get_a_nick() {
    let dir = temp_dir();
    let db = format!("sqlite://{}", dir.path().join("guests.db").display());
    let d = Daemon::start(&["--db", db.as_str(), "--bus", "poll"]).await;
    // Each asserts its welcome; a refused one would read an error instead.
    // Three hundred draws from 65,536 guest nicks collide about half the
    // time (more arrivals make the test slow on a loaded machine).
    let clients = futures::future::join_all((0..300).map(|_| Client::connect(d.tcp))).await;
    assert_eq!(clients.len(), 300);
}

#[tokio::test]
async fn a_join_replays_the_last_ten_before_any_live_message() {
    let dir = temp_dir();
    let db = format!("sqlite://{}", dir.path().join("order.db").display());
    let d = Daemon::start(&["--db", db.as_str(), "--bus", "poll", "--rate", "0"]).await;
    let mut alice = Client::in_room(d.tcp, "alice", "r").await;
    let flood: String = (1..=300).map(|i| format!("m{i}\n")).collect();
    alice.send_raw(flood.as_bytes()).await;
    alice
        .expect(|v| v["type"] == "message" && v["seq"] == 20)
        .await;
    // Join while the room is busy: join, the last ten, then live, in seq order.
    let mut bob = Client::json(d.tcp, "bob").await;
    bob.send("/join r").await;
    bob.expect(|v| v["type"] == "join" && v["nick"] == "bob")
        .await;
    let mut seqs = Vec::new();
    while seqs.last() != Some(&300) {
        let m = bob.expect(|v| v["type"] == "message").await;
        seqs.push(m["seq"].as_u64().unwrap());
    }
    assert!(seqs.len() >= 10, "{seqs:?}");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap-free and in order: {seqs:?}"
    );
}

#[tokio::test]
async fn a_nick_given_up_and_taken_at_once_is_held_once() {
    let dir = temp_dir();
    let db = format!("sqlite://{}", dir.path().join("nicks.db").display());
    let daemons = cluster(&db).await;
    let outcome = |v: &Value| v["type"] == "nick" || v["type"] == "error";
    for n in 0..40 {
        let mut a = Client::json(daemons[0].tcp, &format!("bob{n}")).await;
        let mut b = Client::json(daemons[0].tcp, &format!("x{n}")).await;
        // a gives bobN up while b, on the same instance, takes it.
        a.send(&format!("/nick other{n}")).await;
        b.send(&format!("/nick bob{n}")).await;
        a.expect(outcome).await;
        if b.expect(outcome).await["type"] != "nick" {
            continue; // b asked while a still held it: refused, fine
        }
        // b holds bobN now: no other instance may take it too.
        let mut c = Client::json(daemons[1].tcp, &format!("c{n}")).await;
        c.send(&format!("/nick bob{n}")).await;
        c.expect_error("nick-taken").await;
    }
}
