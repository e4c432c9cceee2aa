//! The load generator's own accounting, against a tiny in-test fan-out server
//! that speaks just enough of the TCP protocol and misbehaves on purpose: it
//! delays every message by a known amount, drops one delivery and duplicates
//! another. The report must say exactly that.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baby_discord::bench::conn::Rendering;
use baby_discord::bench::load::{self, Plan, RoomPlan, Transport};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How the fake server misbehaves.
#[derive(Clone, Copy)]
struct Faults {
    /// Added to every message before it is forwarded.
    delay: Duration,
    /// The n-th room message (1-based) is not delivered to the first member.
    drop_nth: Option<u64>,
    /// The n-th room message is delivered twice to the first member.
    duplicate_nth: Option<u64>,
}

type Members = Arc<Mutex<Vec<mpsc::UnboundedSender<Vec<u8>>>>>;

/// Starts the fake server; it lives as long as the test's runtime.
async fn fake_server(faults: Faults) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let members: Members = Arc::default();
    let (said_tx, mut said) = mpsc::unbounded_channel::<(Instant, String)>();
    let to = members.clone();
    // One broadcaster keeps the room's order, like the real hub.
    tokio::spawn(async move {
        let mut nth = 0u64;
        while let Some((at, text)) = said.recv().await {
            tokio::time::sleep_until(at + faults.delay).await;
            let is_measured = !text.contains(" end ") && !text.ends_with(" warm");
            if is_measured {
                nth += 1;
            }
            let line = format!("{{\"type\":\"message\",\"room\":\"r\",\"text\":\"{text}\"}}\n");
            for (k, member) in to.lock().unwrap().iter().enumerate() {
                let first = k == 0 && is_measured;
                if first && faults.drop_nth == Some(nth) {
                    continue;
                }
                let _ = member.send(line.clone().into_bytes());
                if first && faults.duplicate_nth == Some(nth) {
                    let _ = member.send(line.clone().into_bytes());
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut next = 0u32;
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            next += 1;
            let nick = format!("guest-{next:04x}");
            let (read, write) = stream.into_split();
            let out_tx = writer(write);
            let welcome = format!(
                "* welcome to baby-discord (instance t). You are {nick}. /help for commands\n"
            );
            let _ = out_tx.send(welcome.into_bytes());
            let members = members.clone();
            let said_tx = said_tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with("/format") {
                        continue;
                    }
                    if let Some(room) = line.strip_prefix("/join ") {
                        let join = format!(
                            "{{\"type\":\"join\",\"room\":\"{room}\",\"nick\":\"{nick}\"}}\n"
                        );
                        let _ = out_tx.send(join.into_bytes());
                        members.lock().unwrap().push(out_tx.clone());
                        continue;
                    }
                    let _ = said_tx.send((Instant::now(), line));
                }
            });
        }
    });
    addr
}

/// A task that writes what it is sent to `write`, in order.
fn writer(mut write: tokio::net::tcp::OwnedWriteHalf) -> mpsc::UnboundedSender<Vec<u8>> {
    let (out_tx, mut out) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        while let Some(bytes) = out.recv().await {
            if write.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    out_tx
}

fn plan(addr: SocketAddr) -> Plan {
    Plan {
        rooms: vec![RoomPlan {
            name: "r".into(),
            members: 3,
            senders: 1,
        }],
        rate: 40.0,
        duration: Duration::from_millis(500),
        size: 64,
        transport: Transport::Tcp,
        rendering: Rendering::Json,
        targets: vec![addr],
        http_targets: vec![],
        concurrency: 8,
        drain: Duration::from_secs(10),
        server_pids: vec![],
    }
}

#[tokio::test]
async fn one_drop_and_one_duplicate_are_counted_exactly() {
    let addr = fake_server(Faults {
        delay: Duration::ZERO,
        drop_nth: Some(3),
        duplicate_nth: Some(5),
    })
    .await;
    let r = tokio::time::timeout(Duration::from_secs(30), load::run(&plan(addr)))
        .await
        .expect("the run ends")
        .expect("the run works");
    assert_eq!(r.sent, 20, "40 msg/s for 0.5 s: {r:?}");
    assert_eq!(
        r.expected, 60,
        "three members each expect every message: {r:?}"
    );
    assert_eq!(r.lost, 1, "{r:?}");
    assert_eq!(r.duplicates, 1, "{r:?}");
    assert_eq!(r.delivered, 59, "{r:?}");
    assert_eq!(r.incomplete_receivers, 0, "end markers arrived: {r:?}");
    assert_eq!(r.latency.samples, 59, "{r:?}");
}

#[tokio::test]
async fn latency_includes_the_servers_delay() {
    let delay = Duration::from_millis(30);
    let addr = fake_server(Faults {
        delay,
        drop_nth: None,
        duplicate_nth: None,
    })
    .await;
    let r = tokio::time::timeout(Duration::from_secs(30), load::run(&plan(addr)))
        .await
        .expect("the run ends")
        .expect("the run works");
    assert_eq!((r.lost, r.duplicates), (0, 0), "{r:?}");
    assert_eq!(r.delivered, r.expected, "{r:?}");
    assert!(r.latency.p50_ms >= 30.0, "a 30 ms delay shows: {r:?}");
    assert!(r.latency.p50_ms < 500.0, "and not much more: {r:?}");
    assert!(r.latency.max_ms >= r.latency.p99_ms && r.latency.p99_ms >= r.latency.p50_ms);
}

/// A fake IRC server: NICK/USER get the welcome numeric, JOIN the end of the
/// names list, and a PRIVMSG goes to every other member of the channel (IRC
/// does not echo a member's own messages).
async fn fake_irc_server() -> SocketAddr {
    type Channel = Arc<Mutex<Vec<(u32, mpsc::UnboundedSender<Vec<u8>>)>>>;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let channel: Channel = Arc::default();
    tokio::spawn(async move {
        for id in 0u32.. {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, write) = stream.into_split();
            let out_tx = writer(write);
            let channel = channel.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(read).lines();
                let mut nick = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    let line = line.trim_end();
                    let reply = if let Some(n) = line.strip_prefix("NICK ") {
                        nick = n.to_owned();
                        continue;
                    } else if line.starts_with("USER ") {
                        format!(":fake 001 {nick} :welcome\r\n")
                    } else if let Some(room) = line.strip_prefix("JOIN ") {
                        channel.lock().unwrap().push((id, out_tx.clone()));
                        format!(":fake 366 {nick} {room} :End of NAMES list\r\n")
                    } else if let Some(rest) = line.strip_prefix("PRIVMSG ") {
                        let relayed = format!(":{nick}!u@h PRIVMSG {rest}\r\n");
                        for (member, tx) in channel.lock().unwrap().iter() {
                            if *member != id {
                                let _ = tx.send(relayed.clone().into_bytes());
                            }
                        }
                        continue;
                    } else {
                        continue;
                    };
                    let _ = out_tx.send(reply.into_bytes());
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn irc_members_do_not_expect_their_own_messages() {
    let addr = fake_irc_server().await;
    let mut plan = plan(addr);
    plan.transport = Transport::Irc;
    plan.rooms[0].senders = 2;
    let r = tokio::time::timeout(Duration::from_secs(30), load::run(&plan))
        .await
        .expect("the run ends")
        .expect("the run works");
    assert_eq!(r.sent, 20, "40 msg/s for 0.5 s: {r:?}");
    assert_eq!(r.expected, 40, "each message reaches the two others: {r:?}");
    assert_eq!((r.lost, r.duplicates), (0, 0), "{r:?}");
    assert_eq!(r.delivered, 40, "{r:?}");
    assert_eq!(r.incomplete_receivers, 0, "end markers arrived: {r:?}");
    let per_read = r.deliveries_per_read.expect("TCP reads are counted");
    assert!(per_read >= 1.0, "at least one delivery per read: {r:?}");
}
