//! The TCP adapter over real sockets, against the real binary.

mod common;

use std::time::Duration;

use common::{Client, Daemon, WAIT, sqlite_url, temp_dir};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

async fn daemon(extra: &[&str]) -> (Daemon, tempfile::TempDir) {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let mut args = vec!["--db", db.as_str()];
    args.extend_from_slice(extra);
    (Daemon::start(&args).await, dir)
}

fn is_message(v: &Value, text: &str) -> bool {
    v["type"] == "message" && v["text"] == text
}

#[tokio::test]
async fn two_clients_chat_and_see_the_same_seq() {
    let (d, _dir) = daemon(&[]).await;
    let mut alice = Client::in_room(d.tcp, "alice", "general").await;
    let mut bob = Client::in_room(d.tcp, "bob", "#General").await;
    alice
        .expect(|v| v["type"] == "join" && v["nick"] == "bob")
        .await;

    alice.send("hello bob").await;
    let a = alice.expect(|v| is_message(v, "hello bob")).await;
    let b = bob.expect(|v| is_message(v, "hello bob")).await;
    assert_eq!(a, b, "both see the same event");
    assert_eq!(a["seq"], 1);
    assert_eq!(a["room"], "general");
    assert_eq!(a["nick"], "alice");
    assert_eq!(a["kind"], "text");
    assert!(a["id"].as_str().unwrap().len() == 36);
    assert!(a["ts"].as_str().unwrap().ends_with('Z'));

    bob.send("/me waves").await;
    let w = alice.expect(|v| v["type"] == "message").await;
    assert_eq!(
        (w["seq"].as_u64(), w["kind"].as_str()),
        (Some(2), Some("action"))
    );

    bob.send("/msg ALICE psst").await;
    let to_alice = alice.expect(|v| v["type"] == "dm").await;
    let to_bob = bob.expect(|v| v["type"] == "dm").await;
    assert_eq!(
        (to_alice["from"].as_str(), to_alice["to"].as_str()),
        (Some("bob"), Some("alice"))
    );
    assert_eq!(to_alice["id"], to_bob["id"]);
}

/// Strips the `[08:01:02] ` clock so lines can be compared exactly.
fn unclocked(line: &str) -> &str {
    let b = line.as_bytes();
    let clocked = b.len() > 11 && b[0] == b'[' && b[9] == b']' && b[10] == b' ';
    if clocked { &line[11..] } else { line }
}

#[tokio::test]
async fn text_rendering_matches_the_protocol() {
    let (d, _dir) = daemon(&["--instance", "a1"]).await;
    let stream = tokio::net::TcpStream::connect(d.tcp).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let mut next = async || {
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    let welcome = next().await;
    let guest = welcome
        .strip_prefix("* welcome to baby-discord (instance a1). You are ")
        .and_then(|r| r.strip_suffix(". /help for commands"))
        .unwrap_or_else(|| panic!("{welcome}"))
        .to_owned();
    assert!(guest.starts_with("guest-") && guest.len() == 10, "{guest}");
    use tokio::io::AsyncWriteExt;
    write
        .write_all(b"/nick alice\r\n/join #general\nhello\n/me waves\n//etc\n/who\n/rooms\n/msg alice note\n/dance\n")
        .await
        .unwrap();
    assert_eq!(next().await, format!("* {guest} is now known as alice"));
    let join = next().await;
    assert!(
        join.starts_with('[') && join.as_bytes()[9] == b']',
        "{join}"
    );
    assert_eq!(unclocked(&join), "#general * alice joined");
    assert_eq!(unclocked(&next().await), "#general <alice> hello");
    assert_eq!(unclocked(&next().await), "#general * alice waves");
    assert_eq!(unclocked(&next().await), "#general <alice> /etc");
    assert_eq!(next().await, "* members of #general (1): alice");
    assert_eq!(next().await, "* rooms: #general (1)");
    assert_eq!(unclocked(&next().await), "@alice <alice> note");
    assert!(next().await.starts_with("! unknown-command: "));
    write.write_all(b"/help\n").await.unwrap();
    let help = next().await;
    assert!(help.starts_with("* /nick NAME"), "{help}");
    for _ in 0..12 {
        assert!(next().await.starts_with("* /"));
    }
}

#[tokio::test]
async fn every_command_works() {
    let (d, _dir) = daemon(&[]).await;
    let mut alice = Client::in_room(d.tcp, "alice", "general").await;
    let mut bob = Client::in_room(d.tcp, "bob", "general").await;
    bob.send("/join random").await;
    bob.expect(|v| v["type"] == "join" && v["room"] == "random")
        .await;

    bob.send("/rooms").await;
    let r = bob.expect(|v| v["type"] == "reply").await;
    assert_eq!(r["command"], "rooms");
    assert_eq!(
        r["data"]["rooms"],
        serde_json::json!([{"room": "general", "members": 2}, {"room": "random", "members": 1}])
    );

    bob.send("/who general").await;
    let w = bob.expect(|v| v["type"] == "reply").await;
    assert_eq!(w["data"]["members"], serde_json::json!(["alice", "bob"]));

    // random is current: a plain line goes there, not to general.
    bob.send("only random").await;
    bob.expect(|v| is_message(v, "only random") && v["room"] == "random")
        .await;
    bob.send("/switch general").await;
    let s = bob.expect(|v| v["type"] == "reply").await;
    assert_eq!(
        (s["command"].as_str(), s["data"]["room"].as_str()),
        (Some("switch"), Some("general"))
    );
    bob.send("//slash").await;
    let m = alice.expect(|v| v["type"] == "message").await;
    assert_eq!(
        (m["text"].as_str(), m["room"].as_str()),
        (Some("/slash"), Some("general"))
    );

    bob.send("/nick Bobby").await;
    let n = alice.expect(|v| v["type"] == "nick").await;
    assert_eq!(
        (n["old"].as_str(), n["new"].as_str()),
        (Some("bob"), Some("Bobby"))
    );

    bob.send("/leave").await;
    let l = alice.expect(|v| v["type"] == "leave").await;
    assert_eq!(
        (l["room"].as_str(), l["nick"].as_str()),
        (Some("general"), Some("Bobby"))
    );
    bob.expect(|v| v["type"] == "leave" && v["room"] == "general")
        .await;

    bob.send("/history 5").await;
    let h = bob.expect(|v| v["type"] == "message").await;
    assert_eq!(
        (h["text"].as_str(), h["room"].as_str()),
        (Some("only random"), Some("random"))
    );

    bob.send("/format text").await;
    assert_eq!(bob.line().await.unwrap(), "* format is now text");

    bob.send("/quit").await;
    assert_eq!(bob.read_to_end().await, "* bye\n");
    alice.send("/who").await;
    let w = alice.expect(|v| v["type"] == "reply").await;
    assert_eq!(w["data"]["members"], serde_json::json!(["alice"]));
    alice.send("/rooms").await;
    let r = alice.expect(|v| v["type"] == "reply").await;
    assert_eq!(
        r["data"]["rooms"],
        serde_json::json!([{"room": "general", "members": 1}])
    );
}

#[tokio::test]
async fn join_replays_the_last_ten_of_fifteen() {
    let (d, _dir) = daemon(&[]).await;
    let mut alice = Client::in_room(d.tcp, "alice", "general").await;
    for i in 1..=15 {
        alice.send(&format!("m{i}")).await;
    }
    alice.expect(|v| is_message(v, "m15")).await;

    let mut bob = Client::json(d.tcp, "bob").await;
    bob.send("/join general").await;
    let join = bob.event().await;
    assert_eq!(
        (join["type"].as_str(), join["nick"].as_str()),
        (Some("join"), Some("bob"))
    );
    for seq in 6..=15 {
        let m = bob.event().await;
        assert_eq!(m["type"], "message");
        assert_eq!(m["seq"], seq);
        assert_eq!(m["text"], format!("m{seq}"));
    }
    bob.send("/history 100").await;
    for seq in 1..=15 {
        assert_eq!(bob.event().await["seq"], seq);
    }
}

#[tokio::test]
async fn history_and_seq_survive_a_restart() {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let d = Daemon::start(&["--db", &db]).await;
    let mut alice = Client::in_room(d.tcp, "alice", "general").await;
    for i in 1..=3 {
        alice.send(&format!("before {i}")).await;
    }
    alice.expect(|v| is_message(v, "before 3")).await;
    assert_eq!(d.terminate().await, Some(0), "SIGTERM is a clean exit");
    // The client is told, then the connection closes.
    let rest = alice.read_to_end().await;
    assert!(rest.contains("\"code\":\"unavailable\""), "{rest}");

    let d = Daemon::start(&["--db", &db]).await;
    let mut bob = Client::json(d.tcp, "bob").await;
    bob.send("/join general").await;
    bob.expect(|v| v["type"] == "join").await;
    for i in 1..=3 {
        let m = bob.event().await;
        assert_eq!(
            (m["seq"].as_u64(), m["text"].as_str()),
            (Some(i), Some(format!("before {i}").as_str()))
        );
    }
    bob.send("after").await;
    let m = bob.expect(|v| is_message(v, "after")).await;
    assert_eq!(m["seq"], 4, "seq continues where storage left it");
}

#[tokio::test]
async fn sync_durability_persists_before_delivering() {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let d = Daemon::start(&["--db", &db, "--durability", "sync"]).await;
    let mut alice = Client::in_room(d.tcp, "alice", "general").await;
    alice.send("kept").await;
    alice.expect(|v| is_message(v, "kept")).await;
    drop(d); // SIGKILL: no flush
    let d = Daemon::start(&["--db", &db]).await;
    let mut bob = Client::json(d.tcp, "bob").await;
    bob.send("/join general").await;
    bob.expect(|v| v["type"] == "join").await;
    assert!(is_message(&bob.event().await, "kept"));
}

#[tokio::test]
async fn every_error_code_tcp_can_produce() {
    let (d, _dir) = daemon(&["--max-conns", "3"]).await;
    let mut alice = Client::json(d.tcp, "alice").await;
    let mut bob = Client::json(d.tcp, "bob").await;

    alice.send("/dance").await;
    alice.expect_error("unknown-command").await;
    alice.send("/join").await;
    alice.expect_error("bad-arguments").await;
    alice.send("/nick no spaces").await;
    alice.expect_error("bad-arguments").await;
    alice.send("/nick b@d").await;
    alice.expect_error("invalid-nick").await;
    alice.send("/nick BOB").await;
    alice.expect_error("nick-taken").await;
    alice.send("/join #no!").await;
    alice.expect_error("invalid-room").await;
    alice.send("hello?").await;
    alice.expect_error("not-in-room").await;
    alice.send("/leave general").await;
    alice.expect_error("not-in-room").await;
    alice.send("/switch general").await;
    alice.expect_error("not-in-room").await;
    alice.send("/msg nobody hi").await;
    alice.expect_error("no-such-nick").await;
    alice.send(&"x".repeat(2001)).await;
    alice.expect_error("too-long").await;
    alice.send(&"y".repeat(5000)).await;
    alice.expect_error("too-long").await;
    alice.send_raw(b"\xc3\x28 not utf-8\n").await;
    alice.expect_error("invalid-utf8").await;

    // The connection limit: the fourth connection is told and closed.
    let _third = Client::connect(d.tcp).await;
    let fourth = tokio::net::TcpStream::connect(d.tcp).await.unwrap();
    let mut fourth = tokio::io::BufReader::new(fourth);
    let mut line = String::new();
    tokio::time::timeout(WAIT, fourth.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert!(line.starts_with("! unavailable: "), "{line}");
    line.clear();
    let n = tokio::time::timeout(WAIT, fourth.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "closed after the refusal");

    // Nothing above closed alice's connection.
    alice.send("/join general").await;
    alice.expect(|v| v["type"] == "join").await;
    bob.send("/rooms").await;
    bob.expect(|v| v["type"] == "reply").await;
}

#[tokio::test]
async fn rate_limit_fires_after_the_burst() {
    let (d, _dir) = daemon(&["--rate", "1", "--burst", "5"]).await;
    let mut alice = Client::in_room(d.tcp, "alice", "general").await;
    for i in 0..10 {
        alice.send(&format!("flood {i}")).await;
    }
    let mut delivered = 0;
    let mut limited = 0;
    while delivered + limited < 10 {
        let e = alice.event().await;
        match e["type"].as_str() {
            Some("message") => delivered += 1,
            Some("error") => {
                assert_eq!(e["code"], "rate-limited");
                // Refusals within a second of the first are summed up in one
                // error: "3 more refused; slow down ...".
                let message = e["message"].as_str().unwrap();
                limited += match message.split_once(" more refused") {
                    Some((n, _)) => n.parse::<u32>().unwrap(),
                    None => 1,
                };
            }
            _ => {}
        }
    }
    assert!(
        (5..=6).contains(&delivered),
        "the burst passes: {delivered}"
    );
    assert!(limited >= 4, "the rest is refused: {limited}");
    // Direct messages count too (a token or two came back meanwhile).
    for _ in 0..5 {
        alice.send("/msg alice again").await;
    }
    let e = alice.expect(|v| v["type"] == "error").await;
    assert_eq!(e["code"], "rate-limited", "{e}");
}

#[tokio::test]
async fn garbage_and_huge_lines_do_not_disturb_others() {
    let (d, _dir) = daemon(&[]).await;
    let mut alice = Client::in_room(d.tcp, "alice", "general").await;
    let mut vandal = Client::in_room(d.tcp, "vandal", "general").await;
    alice
        .expect(|v| v["type"] == "join" && v["nick"] == "vandal")
        .await;

    let mut garbage: Vec<u8> = (0..=255u8)
        .cycle()
        .take(3000)
        .filter(|&b| b != b'\n')
        .collect();
    garbage.push(b'\n');
    vandal.send_raw(&garbage).await;
    vandal.send_raw(&[b'z'; 10_000]).await;
    vandal.send_raw(b"\n").await;
    vandal.send_raw(b"\x00\x01\x02\xff\n").await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        let e = vandal.expect(|v| v["type"] == "error").await;
        codes.push(e["code"].as_str().unwrap().to_owned());
    }
    assert_eq!(codes[1], "too-long", "the 10,000-byte line: {codes:?}");
    vandal.send("still here").await;
    vandal.expect(|v| is_message(v, "still here")).await;

    alice.send("unbothered").await;
    // alice sees no error and no garbage, only the two messages, in order.
    let first = alice.expect(|v| v["type"] != "join").await;
    assert!(is_message(&first, "still here"), "{first}");
    let second = alice.event().await;
    assert!(is_message(&second, "unbothered"), "{second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_and_the_room_goes_on() {
    let (d, _dir) = daemon(&["--rate", "0", "--queue", "64"]).await;
    let sleeper = Client::in_room(d.tcp, "sleeper", "general").await;
    let reader = Client::in_room(d.tcp, "reader", "general").await;
    let talker = Client::in_room(d.tcp, "talker", "general").await;

    // The reader checks it sees every message in order, and publishes its
    // progress so the talker never runs far ahead of it (the reader must not
    // become a slow consumer itself).
    let (mut reader_rx, _reader_tx) = reader.split();
    let (progress_tx, mut progress) = tokio::sync::watch::channel((0u64, None::<u64>));
    let reading = tokio::spawn(async move {
        let mut last_seq = 0;
        let mut dropped_at = None;
        let mut line = String::new();
        loop {
            line.clear();
            if reader_rx.read_line(&mut line).await.unwrap_or(0) == 0 {
                return (last_seq, dropped_at);
            }
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["type"] == "message" {
                let seq = v["seq"].as_u64().unwrap();
                assert_eq!(seq, last_seq + 1, "the reader sees every message in order");
                last_seq = seq;
                if v["text"] == "final" {
                    return (last_seq, dropped_at);
                }
            }
            if v["type"] == "leave" && v["nick"] == "sleeper" && dropped_at.is_none() {
                dropped_at = Some(last_seq);
            }
            let _ = progress_tx.send((last_seq, dropped_at));
        }
    });
    let (mut talker_rx, mut talker_tx) = talker.split();
    // The talker reads its own echoes, or it would be dropped too.
    tokio::spawn(async move {
        let mut sink = [0u8; 64 * 1024];
        while tokio::io::AsyncReadExt::read(&mut talker_rx, &mut sink)
            .await
            .unwrap_or(0)
            > 0
        {}
    });
    use tokio::io::AsyncWriteExt;
    let line = format!("{}\n", "x".repeat(1_900));
    let mut sent = 0u64;
    let dropped = loop {
        let (seen, dropped_at) = *progress.borrow();
        if let Some(at) = dropped_at {
            break at;
        }
        if sent - seen >= 32 {
            tokio::time::timeout(WAIT, progress.changed())
                .await
                .expect("the reader keeps receiving")
                .unwrap();
            continue;
        }
        talker_tx.write_all(line.as_bytes()).await.unwrap();
        sent += 1;
        assert!(sent < 100_000, "the sleeper was never dropped");
    };
    talker_tx.write_all(b"final\n").await.unwrap();
    let (last, dropped_at) = tokio::time::timeout(Duration::from_secs(30), reading)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dropped_at, Some(dropped));
    assert_eq!(
        last,
        sent + 1,
        "the reader got everything, before and after the drop"
    );

    // The sleeper finally reads: what fit in its socket, then the reason, then EOF.
    let mut sleeper = sleeper;
    let rest = sleeper.read_to_end().await;
    let last_line = rest.lines().last().unwrap_or_default();
    assert!(
        last_line.contains("\"code\":\"slow-consumer\""),
        "{last_line}"
    );
}

#[tokio::test]
async fn a_new_user_gets_plain_answers() {
    let (d, _dir) = daemon(&[]).await;
    let stream = tokio::net::TcpStream::connect(d.tcp).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let mut next = async || {
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
    };
    assert!(next().await.unwrap().starts_with("* welcome"));
    use tokio::io::AsyncWriteExt;
    // A blank line is ignored like an empty one: nothing is said, and the
    // next answer is the one to /who.
    write
        .write_all(b"/join general\n   \n\t \r\n/who nosuch\n/quit\n")
        .await
        .unwrap();
    let join = next().await.unwrap();
    assert!(
        unclocked(&join).starts_with("#general * ") && join.ends_with(" joined"),
        "{join}"
    );
    let who = next().await.unwrap();
    assert_eq!(who, "* members of #nosuch (0)", "no trailing space");
    assert_eq!(next().await.as_deref(), Some("* bye"));
    assert_eq!(next().await, None, "closed after bye");
}

/// A member that keeps up is written to straight from the fan-out; one whose
/// socket is full has its events queued to the writer. Switching between the
/// two, again and again, with two senders racing, must never let a later
/// event overtake an earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_never_overtake_a_queued_backlog() {
    use tokio::io::AsyncWriteExt;

    // Long lines, so a pause fills the sockets (the server's send buffer
    // grows to 4 MB on loopback) in few messages.
    let (d, _dir) = daemon(&["--rate", "0", "--max-line", "50000", "--max-text", "45000"]).await;
    // A small receive buffer, so the server's socket fills within a pause.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4 * 1024).unwrap();
    let (read, mut reader_tx) = socket.connect(d.tcp).await.unwrap().into_split();
    let mut reader_rx = tokio::io::BufReader::new(read);
    reader_tx
        .write_all(b"/format json\n/nick reader\n/join general\n")
        .await
        .unwrap();
    let mut line = String::new();
    while !line.contains(r#""type":"join""#) {
        line.clear();
        tokio::time::timeout(WAIT, reader_rx.read_line(&mut line))
            .await
            .expect("the reader joins")
            .unwrap();
    }
    // Every PAUSE messages the reader stops reading until the server has
    // sent PAUSE more (6 MB: more than the sockets hold, well within its
    // outbox of 1,024 events). Talker 1 reports how far the server got.
    const PAUSE: u64 = 150;
    const TOTAL: u64 = 5 * PAUSE;
    let (echoed_tx, mut echoed_rx) = tokio::sync::watch::channel(0u64);
    let (seen_tx, mut seen_rx) = tokio::sync::watch::channel(0u64);
    let mut talkers = Vec::new();
    for nick in ["talker1", "talker2"] {
        let (mut rx, tx) = Client::in_room(d.tcp, nick, "general").await.split();
        // Each talker reads its echoes, or it would be dropped.
        let echoed_tx = (nick == "talker1").then(|| echoed_tx.clone());
        tokio::spawn(async move {
            let mut line = String::new();
            while rx.read_line(&mut line).await.unwrap_or(0) > 0 {
                if let Some(echoed) = &echoed_tx {
                    let v: Value = serde_json::from_str(&line).unwrap();
                    if let Some(seq) = v["seq"].as_u64() {
                        let _ = echoed.send(seq);
                    }
                }
                line.clear();
            }
        });
        talkers.push(tx);
    }
    let reading = tokio::spawn(async move {
        let mut last_seq = 0;
        let mut line = String::new();
        loop {
            line.clear();
            let n = tokio::time::timeout(WAIT, reader_rx.read_line(&mut line))
                .await
                .expect("the reader keeps receiving")
                .unwrap();
            assert!(n > 0, "the reader was not dropped");
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["type"] != "message" {
                continue;
            }
            let seq = v["seq"].as_u64().unwrap();
            assert_eq!(seq, last_seq + 1, "every message, in order");
            last_seq = seq;
            let _ = seen_tx.send(seq);
            if seq == TOTAL {
                return last_seq;
            }
            // Now and then ask for an answer that always goes through the
            // writer, while messages keep coming.
            if seq.is_multiple_of(37) {
                reader_tx.write_all(b"/format json\n").await.unwrap();
            }
            if seq.is_multiple_of(PAUSE) {
                tokio::time::timeout(WAIT, echoed_rx.wait_for(|&n| n >= (seq + PAUSE).min(TOTAL)))
                    .await
                    .expect("the talkers go on")
                    .unwrap();
            }
        }
    });
    let line = format!("{}\n", "x".repeat(40_000));
    for n in 0..TOTAL {
        // Never more than PAUSE + 50 ahead of the reader.
        tokio::time::timeout(WAIT, seen_rx.wait_for(|&seen| n < seen + PAUSE + 50))
            .await
            .expect("the reader keeps up")
            .unwrap();
        talkers[(n % 2) as usize]
            .write_all(line.as_bytes())
            .await
            .unwrap();
    }
    let last = tokio::time::timeout(Duration::from_secs(60), reading)
        .await
        .expect("the reader sees the last message")
        .unwrap();
    assert_eq!(last, TOTAL);
}

/// A client that sends its last line without a newline and half-closes
/// gets that line's answer, then the close.
#[tokio::test]
async fn a_last_line_without_newline_then_half_close_is_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (d, _dir) = daemon(&[]).await;
    let mut c = Client::connect(d.tcp).await;
    c.send_raw(b"/nick halfy\n/nick second").await;
    let (mut reader, mut writer) = c.split();
    writer.shutdown().await.unwrap(); // FIN: half-closed, still reading
    let mut all = String::new();
    tokio::time::timeout(WAIT, reader.read_to_string(&mut all))
        .await
        .expect("the server closes within the wait")
        .unwrap();
    assert!(all.contains("is now known as halfy"), "{all}");
    assert!(
        all.contains("halfy is now known as second"),
        "the answer to the unterminated line: {all}"
    );
}

/// A client that resets its connection (SO_LINGER 0) is ended: the room
/// sees it leave.
#[tokio::test]
async fn a_reset_connection_ends_its_session() {
    let (d, _dir) = daemon(&[]).await;
    let mut watcher = Client::in_room(d.tcp, "watcher", "general").await;
    let c = Client::in_room(d.tcp, "resetter", "general").await;
    watcher
        .expect(|v| v["type"] == "join" && v["nick"] == "resetter")
        .await;
    let (r, w) = c.split();
    let stream = r.into_inner().reunite(w).unwrap();
    stream.set_zero_linger().unwrap();
    drop(stream); // RST
    watcher
        .expect(|v| v["type"] == "leave" && v["nick"] == "resetter")
        .await;
}
