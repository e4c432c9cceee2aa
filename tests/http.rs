//! The HTTP adapter over real HTTP, against the real binary: every route and
//! status of PROTOCOL.md, HTTP and `nc` clients chatting, SSE resume.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::http::{Http, Sse};
use common::{Client, Daemon, WAIT, sqlite_url, temp_dir};
use hyper::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn daemon(extra: &[&str]) -> (Daemon, tempfile::TempDir, Http) {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let mut args = vec!["--db", db.as_str()];
    args.extend_from_slice(extra);
    let d = Daemon::start(&args).await;
    let http = Http::new(d.http);
    (d, dir, http)
}

fn is_message(v: &Value, text: &str) -> bool {
    v["type"] == "message" && v["text"] == text
}

/// Polls `check` until it holds, for conditions with no event to wait on.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a session's stream and reads its welcome.
async fn events(http: &Http, token: &str, last: Option<&str>) -> Sse {
    let mut sse = http.sse(&format!("/events?session={token}"), last).await;
    let first = sse.frame().await.expect("a first frame");
    assert_eq!(first.retry, Some(2000), "the stream starts with retry:");
    sse
}

/// A session that has joined `room`, with its stream open past the join.
async fn joined(http: &Http, nick: &str, room: &str) -> (String, Sse) {
    let (token, _) = http.connect(Some(nick)).await;
    let mut sse = events(http, &token, None).await;
    let welcome = sse.event().await;
    assert_eq!(welcome.event.as_deref(), Some("welcome"));
    let reply = http.command(&token, &format!("/join {room}")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    sse.expect(|_, v| v["type"] == "join" && v["nick"] == nick)
        .await;
    (token, sse)
}

#[tokio::test]
async fn page_health_rooms_metrics_and_unknown_routes() {
    let (_d, _dir, http) = daemon(&["--instance", "h1"]).await;
    let page = http.get("/").await;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text();
    assert!(html.contains("<title>baby-discord</title>"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external assets"
    );
    assert!(
        !html.contains("innerHTML"),
        "user text is never inserted as HTML"
    );

    let health = http.get("/healthz").await;
    assert_eq!(health.status, 200);
    let h = health.json();
    assert_eq!(
        (h["status"].as_str(), h["instance"].as_str()),
        (Some("ok"), Some("h1"))
    );
    assert_eq!(
        (h["store"].as_str(), h["bus"].as_str()),
        (Some("sqlite"), Some("local"))
    );

    let rooms = http.get("/rooms").await;
    assert_eq!(rooms.status, 200);
    assert_eq!(rooms.json(), json!({"rooms": []}));

    let metrics = http.get("/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    for name in [
        "baby_connections{adapter=\"tcp\"}",
        "baby_connections{adapter=\"http\"}",
        "baby_sessions ",
        "baby_rooms ",
        "baby_messages_in_total ",
        "baby_events_out_total ",
        "baby_slow_consumers_total ",
        "baby_store_write_batches_total ",
        "baby_store_write_seconds_total ",
        "baby_bus_up{bus=\"local\"}",
        "baby_http_requests_total{route=\"/healthz\",status=\"200\"} 1",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }

    let missing = http.get("/no/such/route").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["type"], "error");
    let wrong = http.request(Method::DELETE, "/rooms", &[], None).await;
    assert_eq!(wrong.status, 405);
}

#[tokio::test]
async fn connect_answers_201_409_and_400() {
    let (_d, _dir, http) = daemon(&["--instance", "h1"]).await;
    let ok = http.post("/connect", None, &json!({"nick": "alice"})).await;
    assert_eq!(ok.status, 201, "{}", ok.text());
    let v = ok.json();
    let token = v["session"].as_str().unwrap();
    assert_eq!(token.len(), 32, "128 bits as hex");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        (v["nick"].as_str(), v["instance"].as_str()),
        (Some("alice"), Some("h1"))
    );

    let taken = http.post("/connect", None, &json!({"nick": "ALICE"})).await;
    assert_eq!(taken.status, 409);
    assert_eq!(taken.json()["code"], "nick-taken");

    let invalid = http
        .post("/connect", None, &json!({"nick": "no spaces"}))
        .await;
    assert_eq!(invalid.status, 400);
    assert_eq!(invalid.json()["code"], "invalid-nick");

    let bad_json = http
        .request(
            Method::POST,
            "/connect",
            &[("content-type", "application/json")],
            Some(Bytes::from_static(b"{nick:")),
        )
        .await;
    assert_eq!(bad_json.status, 400);
    let e = bad_json.json();
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad-arguments"))
    );

    // No body at all: a guest.
    let guest = http.request(Method::POST, "/connect", &[], None).await;
    assert_eq!(guest.status, 201);
    assert!(guest.json()["nick"].as_str().unwrap().starts_with("guest-"));

    // The welcome on the stream carries the session.
    let mut sse = events(&http, token, None).await;
    let welcome = sse.event().await;
    assert_eq!(welcome.event.as_deref(), Some("welcome"));
    let w = welcome.json();
    assert_eq!(
        (w["nick"].as_str(), w["session"].as_str()),
        (Some("alice"), Some(token))
    );
}

#[tokio::test]
async fn unknown_sessions_get_401_everywhere() {
    let (_d, _dir, http) = daemon(&[]).await;
    let bogus = "0123456789abcdef0123456789abcdef";
    for (path, body) in [
        ("/command", json!({"line": "/rooms"})),
        ("/message", json!({"room": "general", "text": "hi"})),
        ("/disconnect", json!({})),
    ] {
        let r = http.post(path, Some(bogus), &body).await;
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.json()["type"], "error");
        let r = http.post(path, None, &body).await;
        assert_eq!(r.status, 401, "{path} without a token");
    }
    let stream = http
        .request(Method::GET, &format!("/events?session={bogus}"), &[], None)
        .await;
    assert_eq!(stream.status, 401);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_unread() {
    let (_d, _dir, http) = daemon(&[]).await;
    let (token, _) = http.connect(Some("alice")).await;
    let auth = format!("Bearer {token}");
    let line = "x".repeat(70 * 1024);
    let big = Bytes::from(json!({"line": line}).to_string());
    let r = http
        .request(
            Method::POST,
            "/command",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(big),
        )
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["type"], "error");

    // A declared length over the limit is refused before any body is sent.
    let mut raw = tokio::net::TcpStream::connect(http.addr).await.unwrap();
    raw.write_all(
        format!(
            "POST /command HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ncontent-length: 10000000\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(WAIT, raw.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    // The session still works.
    let ok = http.command(&token, "/rooms").await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn http_and_nc_clients_chat_both_ways() {
    let (d, _dir, http) = daemon(&[]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    let (alice, mut sse) = joined(&http, "alice", "general").await;
    bob.expect(|v| v["type"] == "join" && v["nick"] == "alice")
        .await;

    // HTTP -> nc
    let sent = http
        .post(
            "/message",
            Some(&alice),
            &json!({"room": "general", "text": "hi from the browser"}),
        )
        .await;
    assert_eq!(sent.status, 200, "{}", sent.text());
    let s = sent.json();
    assert_eq!(
        (s["room"].as_str(), s["seq"].as_u64()),
        (Some("general"), Some(1))
    );
    assert_eq!(s["id"].as_str().unwrap().len(), 36);
    let at_bob = bob.expect(|v| is_message(v, "hi from the browser")).await;
    assert_eq!(
        (at_bob["nick"].as_str(), at_bob["seq"].as_u64()),
        (Some("alice"), Some(1))
    );
    let own = sse
        .expect(|_, v| is_message(v, "hi from the browser"))
        .await;
    assert_eq!(own.id.as_deref(), Some("general:1"));
    assert_eq!(own.event.as_deref(), Some("message"));

    // nc -> HTTP
    bob.send("hi from nc").await;
    let f = sse.expect(|_, v| is_message(v, "hi from nc")).await;
    assert_eq!(f.id.as_deref(), Some("general:2"));
    assert_eq!(f.json()["nick"], "bob");

    // /me and a line without a slash through /command
    let me = http.command(&alice, "/me waves").await;
    assert_eq!(me.status, 200);
    let w = bob
        .expect(|v| v["type"] == "message" && v["seq"] == 3)
        .await;
    assert_eq!(
        (w["kind"].as_str(), w["text"].as_str()),
        (Some("action"), Some("waves"))
    );
    let plain = http.command(&alice, "plain line").await;
    assert_eq!(plain.status, 200);
    bob.expect(|v| is_message(v, "plain line")).await;

    // DMs both ways
    let dm = http.command(&alice, "/msg bob psst").await;
    assert_eq!(dm.status, 200);
    let echo = &dm.json()["events"][0];
    assert_eq!(
        (echo["type"].as_str(), echo["to"].as_str()),
        (Some("dm"), Some("bob"))
    );
    let at_bob = bob.expect(|v| v["type"] == "dm").await;
    assert_eq!(at_bob["from"], "alice");
    bob.send("/msg alice back at you").await;
    let f = sse
        .expect(|_, v| v["type"] == "dm" && v["from"] == "bob")
        .await;
    assert_eq!(f.json()["text"], "back at you");

    // Replies come back in the response; /who sees both adapters.
    let who = http.command(&alice, "/who").await;
    let reply = &who.json()["events"][0];
    assert_eq!(reply["command"], "who");
    assert_eq!(reply["data"]["members"], json!(["alice", "bob"]));
    let rooms = http.get("/rooms").await.json();
    assert_eq!(rooms, json!({"rooms": [{"room": "general", "members": 2}]}));

    // Leaving is seen by nc; disconnecting ends the session.
    let bye = http
        .request(
            Method::POST,
            "/disconnect",
            &[("authorization", &format!("Bearer {alice}"))],
            None,
        )
        .await;
    assert_eq!(bye.status, 204);
    bob.expect(|v| v["type"] == "leave" && v["nick"] == "alice")
        .await;
    assert_eq!(http.command(&alice, "/rooms").await.status, 401);
    assert!(
        sse.frame().await.is_none(),
        "the stream ends with the session"
    );
}

#[tokio::test]
async fn refused_commands_carry_their_status() {
    let (d, _dir, http) = daemon(&["--rate", "1", "--burst", "2"]).await;
    let _bob = Client::in_room(d.tcp, "bob", "general").await;
    let (alice, _) = http.connect(Some("alice")).await;

    let r = http.command(&alice, "/nick Bob").await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["code"], "nick-taken");
    let r = http.command(&alice, "/frobnicate").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "unknown-command");
    let r = http.command(&alice, "/leave general").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "not-in-room");
    let r = http
        .post("/message", Some(&alice), &json!({"text": "nowhere"}))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "not-in-room");
    let r = http
        .post(
            "/message",
            Some(&alice),
            &json!({"room": "Bad Room", "text": "x"}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "invalid-room");
    let r = http
        .post("/command", Some(&alice), &json!({"no_line": 1}))
        .await;
    assert_eq!(r.status, 400);

    assert_eq!(http.command(&alice, "/join general").await.status, 200);
    let r = http
        .post("/message", Some(&alice), &json!({"text": "x".repeat(2001)}))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "too-long");
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for i in 0..3 {
            let r = http
                .post("/message", Some(&alice), &json!({"text": format!("m{i}")}))
                .await;
            v.push(r.status);
        }
        v
    };
    assert_eq!(statuses, [200, 200, 429], "burst of 2, then rate-limited");
}

#[tokio::test]
async fn resume_with_last_event_id_gets_exactly_the_missed_messages() {
    let (d, _dir, http) = daemon(&[]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    let (alice, mut sse) = joined(&http, "alice", "general").await;
    for i in 1..=3 {
        bob.send(&format!("m{i}")).await;
    }
    sse.expect(|_, v| is_message(v, "m3")).await;
    let last = sse.last_id.clone().unwrap();
    assert_eq!(last, "general:3");
    drop(sse); // the connection drops, as on a train going into a tunnel

    for i in 4..=6 {
        bob.send(&format!("m{i}")).await;
    }
    bob.expect(|v| is_message(v, "m6")).await;
    let mut sse = events(&http, &alice, Some(&last)).await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let f = sse.event().await;
        if f.event.as_deref() == Some("message") {
            seen.push((
                f.id.clone().unwrap(),
                f.json()["text"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert_eq!(
        seen,
        [
            ("general:4", "m4"),
            ("general:5", "m5"),
            ("general:6", "m6")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    bob.send("m7").await;
    let next = sse.expect(|_, v| v["type"] == "message").await;
    assert_eq!(next.json()["text"], "m7", "no duplicate, no gap");
}

#[tokio::test]
async fn events_queued_while_the_stream_is_down_arrive_when_it_returns() {
    let (d, _dir, http) = daemon(&[]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    // No stream yet: everything queues in the session.
    let (alice, _) = http.connect(Some("alice")).await;
    assert_eq!(http.command(&alice, "/join general").await.status, 200);
    bob.expect(|v| v["type"] == "join" && v["nick"] == "alice")
        .await;
    bob.send("while you were away").await;
    bob.send("/msg alice psst").await;
    bob.expect(|v| v["type"] == "dm").await;

    let mut sse = events(&http, &alice, None).await;
    let kinds: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(sse.event().await.event.unwrap());
        }
        v
    };
    assert_eq!(kinds, ["welcome", "join", "message", "dm"]);
}

#[tokio::test]
async fn a_new_stream_takes_over_from_an_old_one() {
    let (d, _dir, http) = daemon(&[]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    let (alice, mut first) = joined(&http, "alice", "general").await;
    bob.send("one").await;
    first.expect(|_, v| is_message(v, "one")).await;
    let last = first.last_id.clone();
    // Reconnect without closing the first (the server may not know it is dead).
    let mut second = events(&http, &alice, last.as_deref()).await;
    assert!(first.frame().await.is_none(), "the old stream ends");
    bob.send("two").await;
    let f = second.expect(|_, v| v["type"] == "message").await;
    assert_eq!(f.json()["text"], "two");
}

#[tokio::test]
async fn room_stream_starts_with_the_last_ten_and_resumes() {
    let (d, dir, http) = daemon(&["--rate", "0"]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    for i in 1..=12 {
        bob.send(&format!("m{i}")).await;
    }
    bob.expect(|v| is_message(v, "m12")).await;

    let mut room = http.sse("/messages/general", None).await;
    let mut seqs = Vec::new();
    for _ in 0..10 {
        let f = room.event().await;
        assert_eq!(f.event.as_deref(), Some("message"));
        seqs.push(f.json()["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, (3..=12).collect::<Vec<_>>());
    bob.send("live").await;
    let live = room.event().await;
    assert_eq!(live.id.as_deref(), Some("general:13"));
    let mut carol = Client::in_room(d.tcp, "carol", "general").await;
    let join = room.event().await;
    assert_eq!(
        (join.event.as_deref(), join.json()["nick"].as_str()),
        (Some("join"), Some("carol"))
    );
    assert_eq!(
        http.get("/rooms").await.json()["rooms"][0]["members"],
        2,
        "a room stream is not a member"
    );

    // Resume from seq 5: 6..=13, then live, no duplicate.
    let mut resumed = http.sse("/messages/%23general", Some("general:5")).await;
    let mut seqs = Vec::new();
    while seqs.len() < 8 {
        let f = resumed.event().await;
        if f.event.as_deref() == Some("message") {
            seqs.push(f.json()["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(seqs, (6..=13).collect::<Vec<_>>());
    carol.send("after resume").await;
    let f = resumed.expect(|_, v| v["type"] == "message").await;
    assert_eq!(f.json()["seq"], 14);

    // Storage loses seqs 2..=4: a resume from 1 says so in-band first.
    let url = sqlite_url(&dir);
    let mut db = {
        use sqlx::Connection;
        sqlx::SqliteConnection::connect(&url).await.unwrap()
    };
    eventually("the writer stores all 14", async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
            .fetch_one(&mut db)
            .await
            .unwrap();
        n == 14
    })
    .await;
    sqlx::query("DELETE FROM messages WHERE seq BETWEEN 2 AND 4")
        .execute(&mut db)
        .await
        .unwrap();
    let mut gapped = http.sse("/messages/general", Some("general:1")).await;
    let gap = gapped.event().await;
    assert_eq!(gap.event.as_deref(), Some("gap"));
    let g = gap.json();
    assert_eq!(
        (
            g["room"].as_str(),
            g["from_seq"].as_u64(),
            g["to_seq"].as_u64()
        ),
        (Some("general"), Some(2), Some(4))
    );
    let next = gapped.event().await;
    assert_eq!(next.id.as_deref(), Some("general:5"));
}

#[tokio::test]
async fn history_pages_newest_first() {
    let (d, _dir, http) = daemon(&["--rate", "0"]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    for i in 1..=12 {
        bob.send(&format!("m{i}")).await;
    }
    bob.expect(|v| is_message(v, "m12")).await;
    let seqs = |r: &common::http::Reply| -> Vec<u64> {
        r.json()["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    };
    let newest = http.get("/rooms/general/history?limit=5").await;
    assert_eq!(newest.status, 200);
    assert_eq!(seqs(&newest), [8, 9, 10, 11, 12]);
    assert_eq!(newest.json()["messages"][0]["type"], "message");
    let older = http.get("/rooms/general/history?before=8&limit=5").await;
    assert_eq!(seqs(&older), [3, 4, 5, 6, 7]);
    let all = http.get("/rooms/general/history").await;
    assert_eq!(seqs(&all), (1..=12).collect::<Vec<_>>());
    assert_eq!(
        http.get("/rooms/general/history?limit=abc").await.status,
        400
    );
    assert_eq!(http.get("/rooms/general/history?limit=0").await.status, 400);
    let capped = http.get("/rooms/general/history?limit=1000").await;
    assert_eq!(capped.status, 200, "limit is capped at 100");
    assert_eq!(http.get("/rooms/Bad%20Room/history").await.status, 400);
    assert_eq!(
        seqs(&http.get("/rooms/empty/history").await),
        Vec::<u64>::new()
    );
}

#[tokio::test]
async fn h2c_works_for_commands_and_streams() {
    let (d, _dir, _) = daemon(&[]).await;
    let h2 = Http::h2(d.http);
    let health = h2.get("/healthz").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.version, hyper::Version::HTTP_2);
    let (alice, _) = h2.connect(Some("alice")).await;
    let mut sse = h2.sse(&format!("/events?session={alice}"), None).await;
    assert_eq!(sse.event().await.event.as_deref(), Some("welcome"));
    assert_eq!(h2.command(&alice, "/join general").await.status, 200);
    let sent = h2
        .post("/message", Some(&alice), &json!({"text": "over h2"}))
        .await;
    assert_eq!(sent.status, 200);
    sse.expect(|_, v| is_message(v, "over h2")).await;
}

/// The server tells HTTP/1 from h2c by peeking at a connection's first
/// bytes; a request that arrives in pieces, first a byte that could begin the
/// HTTP/2 preface, must still be read as HTTP/1.
#[tokio::test]
async fn an_http1_request_split_after_its_first_byte_is_answered() {
    let (_d, _dir, http) = daemon(&[]).await;
    let mut raw = tokio::net::TcpStream::connect(http.addr).await.unwrap();
    raw.set_nodelay(true).unwrap();
    raw.write_all(b"P").await.unwrap();
    raw.write_all(b"OST /connect HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, raw.read_to_end(&mut reply))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
}

/// A connection whose first request opens a stream is answered without
/// hyper (its buffers would be most of an idle stream's memory): the same
/// statuses and frames, chunked, and the connection closes when it ends.
#[tokio::test]
async fn a_stream_opened_first_on_a_connection_is_chunked_and_closes_after() {
    let (_d, _dir, http) = daemon(&[]).await;
    let mut raw = tokio::net::TcpStream::connect(http.addr).await.unwrap();
    raw.write_all(b"GET /events?session=nosuchtoken HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, raw.read_to_end(&mut reply))
        .await
        .expect("an answer, then the end of the connection")
        .unwrap();
    let text = String::from_utf8_lossy(&reply).to_lowercase();
    assert!(text.starts_with("http/1.1 401 unauthorized\r\n"), "{text}");
    assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
    assert!(text.ends_with("\r\n0\r\n\r\n"), "{text}");

    let mut raw = tokio::net::TcpStream::connect(http.addr).await.unwrap();
    raw.write_all(b"GET /messages/general HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("retry: 2000") {
        let n = tokio::time::timeout(WAIT, raw.read(&mut buf))
            .await
            .expect("the stream's first frame in time")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 200 ok\r\n"), "{text}");
    assert!(
        text.contains("content-type: text/event-stream\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\n\r\nd\r\nretry: 2000\n\n\r\n"), "{text}");
}

#[tokio::test]
async fn a_session_without_a_stream_expires_and_frees_its_nick() {
    let (_d, _dir, http) = daemon(&["--session-linger", "1"]).await;
    let (alice, _) = http.connect(Some("alice")).await;
    assert_eq!(
        http.post("/connect", None, &json!({"nick": "alice"}))
            .await
            .status,
        409
    );
    eventually("alice's nick is free again", async || {
        http.post("/connect", None, &json!({"nick": "alice"}))
            .await
            .status
            == 201
    })
    .await;
    assert_eq!(http.command(&alice, "/rooms").await.status, 401);
}

#[tokio::test]
async fn a_session_that_never_reads_is_a_slow_consumer() {
    let (d, _dir, http) = daemon(&["--queue", "8", "--rate", "0"]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    let (alice, _) = http.connect(Some("alice")).await;
    assert_eq!(http.command(&alice, "/join general").await.status, 200);
    // bob reads as he goes; alice never opens her stream.
    for i in 0..20 {
        let text = format!("flood {i}");
        bob.send(&text).await;
        let seen = bob
            .expect(|v| is_message(v, &text) || (v["type"] == "leave" && v["nick"] == "alice"))
            .await;
        if seen["type"] == "leave" {
            break;
        }
        assert!(i < 19, "alice was never dropped");
    }
    assert_eq!(http.command(&alice, "/rooms").await.status, 401);
    let metrics = http.get("/metrics").await.text();
    assert!(metrics.contains("baby_slow_consumers_total 1"), "{metrics}");
}

#[tokio::test]
async fn a_request_head_must_arrive_within_ten_seconds() {
    let (_d, _dir, http) = daemon(&[]).await;
    let mut raw = tokio::net::TcpStream::connect(http.addr).await.unwrap();
    raw.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), raw.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the server closes a slow head");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(9), "closed after {waited:?}");
    let text = String::from_utf8_lossy(&rest);
    assert!(!text.contains("200 OK"), "{text}");
}

#[tokio::test]
async fn sigterm_ends_open_streams_and_exits_zero() {
    let (d, _dir, http) = daemon(&[]).await;
    let (alice, mut sse) = joined(&http, "alice", "general").await;
    let mut room = http.sse("/messages/general", None).await;
    let _ = alice;
    let code = d.terminate().await;
    assert_eq!(code, Some(0), "a clean exit despite open streams");
    let last = sse.expect(|_, v| v["type"] == "error").await;
    assert_eq!(last.json()["code"], "unavailable");
    let last = room.expect(|_, v| v["type"] == "error").await;
    assert_eq!(last.json()["code"], "unavailable");
}

/// Reads `stream` until what it sent contains `needle` (within 10 s).
async fn read_until(stream: &mut tokio::net::TcpStream, got: &mut Vec<u8>, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(got).contains(needle) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in: {}", String::from_utf8_lossy(got)))
            .unwrap();
        assert!(
            n > 0,
            "closed before {needle:?}: {}",
            String::from_utf8_lossy(got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// Session streams are served two ways: HTTP/1.1 by the adapter's own
/// stream writer, anything else (here HTTP/1.0) by hyper. On SIGTERM both
/// say the server is shutting down and end on their own, well before the
/// drain's deadline: the stream learns of it from its session's end.
#[tokio::test]
async fn sigterm_ends_session_streams_served_by_hyper_and_by_hand() {
    let (d, _dir, http) = daemon(&[]).await;
    let mut streams = Vec::new();
    for (nick, version) in [("alice", "HTTP/1.0"), ("bob", "HTTP/1.1")] {
        let (token, _) = http.connect(Some(nick)).await;
        let mut raw = tokio::net::TcpStream::connect(http.addr).await.unwrap();
        let request = format!("GET /events?session={token} {version}\r\nhost: x\r\n\r\n");
        raw.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        read_until(&mut raw, &mut got, "welcome").await;
        streams.push((raw, got));
    }
    let started = tokio::time::Instant::now();
    assert_eq!(d.terminate().await, Some(0));
    let took = started.elapsed();
    for (mut raw, mut got) in streams {
        read_until(&mut raw, &mut got, "the server is shutting down").await;
    }
    assert!(
        took < Duration::from_secs(4),
        "the daemon took {took:?} to stop"
    );
}

#[tokio::test]
async fn a_stream_that_stops_reading_is_cut_off() {
    let (d, _dir, http) = daemon(&["--queue", "8", "--rate", "0"]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    let (alice, _) = http.connect(Some("alice")).await;
    assert_eq!(http.command(&alice, "/join general").await.status, 200);
    // alice's stream is open but never read: her socket fills, then her queue.
    let mut stuck = tokio::net::TcpStream::connect(http.addr).await.unwrap();
    let request = format!("GET /events?session={alice} HTTP/1.1\r\nhost: x\r\n\r\n");
    stuck.write_all(request.as_bytes()).await.unwrap();
    let line = "x".repeat(1_900);
    let mut dropped = false;
    for _ in 0..20_000 {
        bob.send(&line).await;
        let seen = bob
            .expect(|v| v["type"] == "message" || (v["type"] == "leave" && v["nick"] == "alice"))
            .await;
        if seen["type"] == "leave" {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "alice was never dropped");
    // Her connection is closed without her reading a byte.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = http.get("/metrics").await.text();
        if metrics.contains("baby_sse_streams 0") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck stream is still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling a gauge, not synchronising
    }
    drop(stuck);
}

#[tokio::test]
async fn a_room_stream_that_stops_reading_is_cut_off() {
    let (d, _dir, http) = daemon(&["--queue", "8", "--rate", "0"]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    // A read-only stream of the room, opened and never read.
    let mut stuck = tokio::net::TcpStream::connect(http.addr).await.unwrap();
    stuck
        .write_all(b"GET /messages/general HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let line = "x".repeat(1_900);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut sent = 0;
    loop {
        // Flood (reading as he goes: his queue is small too) until the
        // stream is dropped and its connection cut.
        for _ in 0..200 {
            bob.send(&line).await;
            sent += 1;
            bob.expect(|v| v["type"] == "message" && v["seq"] == sent)
                .await;
        }
        let metrics = http.get("/metrics").await.text();
        if metrics.contains("baby_sse_streams 0") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck room stream is still open after {sent} messages"
        );
    }
    drop(stuck);
}

#[tokio::test]
async fn a_beacon_disconnect_frees_a_closed_tab_but_not_a_reloaded_one() {
    let (d, _dir, http) = daemon(&[]).await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    // sendBeacon cannot set headers: the token comes in the query string.
    let beacon = async |token: &str, grace: &str| {
        http.request(
            Method::POST,
            &format!("/disconnect?session={token}{grace}"),
            &[],
            None,
        )
        .await
        .status
    };

    // Without `grace` it ends the session at once, as with a header.
    let (dave, _sse) = joined(&http, "dave", "general").await;
    assert_eq!(beacon(&dave, "").await, 204);
    bob.expect(|v| v["type"] == "leave" && v["nick"] == "dave")
        .await;
    assert_eq!(http.command(&dave, "/rooms").await.status, 401);
    let (alice, sse) = joined(&http, "alice", "general").await;
    for bad in ["&grace=0", "&grace=11", "&grace=soon"] {
        assert_eq!(beacon(&alice, bad).await, 400, "{bad}");
    }

    // A reload: the old page's beacon, then the new page's stream.
    drop(sse);
    assert_eq!(beacon(&alice, "&grace=1").await, 204);
    let _reloaded = events(&http, &alice, None).await;
    // A closed tab: the beacon, and nothing after it.
    let (carol, sse) = joined(&http, "carol", "general").await;
    drop(sse);
    assert_eq!(beacon(&carol, "&grace=1").await, 204);
    bob.expect(|v| v["type"] == "leave" && v["nick"] == "carol")
        .await;
    // Carol's grace ran out after alice's did, and alice is still there.
    assert_eq!(http.command(&alice, "/who").await.status, 200);
    assert_eq!(
        http.post("/message", Some(&alice), &json!({"text": "still here"}))
            .await
            .status,
        200
    );
    let next = bob
        .expect(|v| v["type"] == "message" || v["type"] == "leave")
        .await;
    assert!(is_message(&next, "still here"), "{next}");
}

#[tokio::test]
async fn a_disconnected_session_is_gone_when_the_answer_comes() {
    let (_d, _dir, http) = daemon(&[]).await;
    for i in 0..50 {
        let (token, _) = http.connect(Some(&format!("u{i}"))).await;
        let bye = http
            .request(
                Method::POST,
                "/disconnect",
                &[("authorization", &format!("Bearer {token}"))],
                None,
            )
            .await;
        assert_eq!(bye.status, 204);
        assert_eq!(
            http.command(&token, "/rooms").await.status,
            401,
            "session {i} still answers after its 204"
        );
    }
}

/// Reads `sse` until `n` pings have come, answering each event with the
/// next message from `http`'s `token` (so events and pings interleave).
async fn pings_between_events(sse: &mut Sse, http: &Http, token: &str, n: usize) {
    let mut pings = 0;
    let mut sent = 0;
    while pings < n {
        let frame = sse.frame().await.expect("the stream stays open");
        if frame.comments.iter().any(|c| c == "ping") {
            pings += 1;
            sent += 1;
            let reply = http.command(token, &format!("between pings {sent}")).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    }
}

/// The ping timer is set again after each ping, and an event between two
/// pings changes nothing: with `--sse-ping 1` a session stream and a room
/// stream each get ping after ping.
#[tokio::test]
async fn pings_keep_coming_between_events_on_both_kinds_of_stream() {
    let (_d, _dir, http) = daemon(&["--sse-ping", "1"]).await;
    let (token, mut session) = joined(&http, "pinged", "general").await;
    let mut room = http.sse("/messages/general", None).await;
    pings_between_events(&mut session, &http, &token, 3).await;
    pings_between_events(&mut room, &http, &token, 3).await;
}
