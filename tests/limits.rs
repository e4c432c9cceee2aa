//! PROTOCOL.md "Limits": each limit is reached over real sockets and answered
//! as documented, and a client that behaves is never caught by one.
//!
//! The helpers here ([`flood`], [`Tally`], [`daemon`]) are meant for other
//! attack tests too: a flood is written by its own task so the client can read
//! while it sends, the way `(...; yes hi) | nc` does.

mod common;

use std::time::Duration;

use common::{Client, Daemon, WAIT, sqlite_url, temp_dir};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;

/// A daemon on its own SQLite file, with `extra` flags.
pub async fn daemon(extra: &[&str]) -> (Daemon, tempfile::TempDir) {
    let dir = temp_dir();
    let db = sqlite_url(&dir);
    let mut args = vec!["--db", db.as_str()];
    args.extend_from_slice(extra);
    (Daemon::start(&args).await, dir)
}

/// Writes `line` `times` times, then `last`, from its own task (so the caller
/// can read meanwhile), and hands the writer back so the connection stays open.
pub fn flood(
    writer: OwnedWriteHalf,
    line: &str,
    times: usize,
    last: &str,
) -> JoinHandle<OwnedWriteHalf> {
    let lines = std::iter::repeat_n(line.to_owned(), times).chain([last.to_owned()]);
    flood_lines(writer, lines)
}

/// Writes every line of `lines` at once from its own task (see [`flood`]).
pub fn flood_lines(
    mut writer: OwnedWriteHalf,
    lines: impl IntoIterator<Item = String>,
) -> JoinHandle<OwnedWriteHalf> {
    let mut bytes = String::new();
    for line in lines {
        bytes.push_str(&line);
        bytes.push('\n');
    }
    tokio::spawn(async move {
        writer
            .write_all(bytes.as_bytes())
            .await
            .expect("the server keeps reading, however slowly");
        writer
    })
}

/// What a JSON-format client was sent, counted as it reads.
#[derive(Debug, Default)]
pub struct Tally {
    /// `message` events.
    pub messages: u64,
    /// `rate-limited` errors as they arrived.
    pub notices: u64,
    /// Lines those errors say were refused (one each, plus "N more refused").
    pub refused: u64,
    /// `reply` events by command.
    pub replies: std::collections::BTreeMap<String, u64>,
    /// Any other error codes.
    pub other_errors: Vec<String>,
    /// Every event by type.
    pub events: std::collections::BTreeMap<String, u64>,
}

impl Tally {
    /// Counts one event.
    pub fn add(&mut self, v: &Value) {
        let kind = v["type"].as_str().unwrap_or_default().to_owned();
        *self.events.entry(kind).or_default() += 1;
        match v["type"].as_str() {
            Some("message") => self.messages += 1,
            Some("reply") => {
                let command = v["command"].as_str().unwrap_or_default().to_owned();
                *self.replies.entry(command).or_default() += 1;
            }
            Some("error") if v["code"] == "rate-limited" => {
                self.notices += 1;
                self.refused += refusals_in(v["message"].as_str().unwrap_or_default());
            }
            Some("error") => self.other_errors.push(v.to_string()),
            _ => {}
        }
    }

    /// Reads and counts events until `done` holds (panics after [`WAIT`] of
    /// silence, or if the server closes the connection first).
    pub async fn read_until(
        &mut self,
        reader: &mut BufReader<OwnedReadHalf>,
        done: impl Fn(&Tally) -> bool,
    ) {
        let mut line = String::new();
        while !done(self) {
            line.clear();
            let n = tokio::time::timeout(WAIT, reader.read_line(&mut line))
                .await
                .unwrap_or_else(|_| panic!("silence while waiting; so far {self:?}"))
                .expect("read");
            assert!(n > 0, "the server closed the connection; so far {self:?}");
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            self.add(&v);
        }
    }
}

/// How many refused lines one `rate-limited` error stands for: 1, or N for an
/// "N more refused; ..." summary.
fn refusals_in(message: &str) -> u64 {
    match message.split_once(" more refused") {
        Some((n, _)) => n.parse().unwrap_or_else(|_| panic!("a count: {message}")),
        None => 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_client_is_paced_not_dropped_and_told_how_many_lines_were_refused() {
    let (d, _dir) = daemon(&[]).await;
    let client = Client::in_room(d.tcp, "paster", "a").await;
    let (mut reader, writer) = client.split();
    let started = tokio::time::Instant::now();
    const LINES: u64 = 10_000;
    let flooding = flood(writer, "hi", LINES as usize, "/help");
    let mut tally = Tally::default();
    // Every line is accounted for: echoed as a message, or counted as refused.
    tally
        .read_until(&mut reader, |t| {
            t.replies.contains_key("help") && t.messages + t.refused == LINES
        })
        .await;
    let elapsed = started.elapsed();
    let _writer = flooding.await.unwrap();
    assert!(tally.other_errors.is_empty(), "{tally:?}");
    assert!(
        tally.messages >= 20,
        "the burst of 20 got through: {tally:?}"
    );
    // At most one notice a second (plus the first, and the last summary).
    let bound = elapsed.as_secs() + 2;
    assert!(
        tally.notices <= bound,
        "{} notices in {elapsed:?}: {tally:?}",
        tally.notices
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_help_requests_are_all_answered() {
    let (d, _dir) = daemon(&[]).await;
    let client = Client::json(d.tcp, "curious").await;
    let (mut reader, writer) = client.split();
    let flooding = flood(writer, "/help", 2_999, "/help");
    let mut tally = Tally::default();
    tally
        .read_until(&mut reader, |t| t.replies.get("help") == Some(&3_000))
        .await;
    let _writer = flooding.await.unwrap();
    assert!(tally.other_errors.is_empty(), "{tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_client_does_not_slow_the_room() {
    let (d, _dir) = daemon(&["--rate", "0"]).await;
    let mut canary = Client::in_room(d.tcp, "canary", "general").await;
    // A client that sends much and reads slowly: it is paced by its own queue.
    let greedy = Client::in_room(d.tcp, "greedy", "general").await;
    let (mut greedy_reader, writer) = greedy.split();
    let flooding = flood(writer, "/help", 5_000, "/help");
    let mut speaker = Client::in_room(d.tcp, "speaker", "general").await;
    for i in 0..50 {
        let text = format!("canary {i}");
        speaker.send(&text).await;
        let seen = tokio::time::timeout(
            Duration::from_secs(2),
            canary.expect(|v| v["type"] == "message" && v["text"] == text),
        )
        .await;
        assert!(seen.is_ok(), "message {i} was late");
    }
    // greedy is still there, and gets every answer once it reads.
    let mut tally = Tally::default();
    tally
        .read_until(&mut greedy_reader, |t| {
            t.replies.get("help") == Some(&5_001) && t.messages >= 50
        })
        .await;
    let _writer = flooding.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nick_join_and_leave_are_rate_limited() {
    let (d, _dir) = daemon(&[]).await;
    let mut canary = Client::in_room(d.tcp, "canary", "general").await;
    // in_room spends two of the burst of five (/nick, /join).
    let renamer = Client::in_room(d.tcp, "renamer", "general").await;
    let (mut reader, writer) = renamer.split();
    let started = tokio::time::Instant::now();
    const LINES: u64 = 300;
    let lines = (0..LINES).map(|i| match i % 3 {
        0 => format!("/nick r{i}"),
        1 => format!("/join room{i}"),
        _ => format!("/leave room{}", i - 1),
    });
    let flooding = flood_lines(writer, lines.chain(["/help".to_owned()]));
    let mut tally = Tally::default();
    let count = |t: &Tally, kind: &str| t.events.get(kind).copied().unwrap_or(0);
    tally
        .read_until(&mut reader, |t| {
            t.replies.contains_key("help")
                && count(t, "nick")
                    + count(t, "join")
                    + count(t, "leave")
                    + t.refused
                    + t.other_errors.len() as u64
                    >= LINES
        })
        .await;
    let _writer = flooding.await.unwrap();
    // 3 left of the burst, then 2 a second.
    let allowed = 3 + 2 * started.elapsed().as_secs_f64().ceil() as u64 + 1;
    let done = count(&tally, "nick") + count(&tally, "join") + count(&tally, "leave");
    assert!(done <= allowed, "{done} went through: {tally:?}");
    assert!(tally.refused >= LINES - allowed, "{tally:?}");
    // The canary heard of no more than went through, and still chats.
    canary.send("still here").await;
    let mut renames = 0;
    loop {
        let v = canary.event().await;
        if v["type"] == "nick" {
            renames += 1;
        }
        if v["type"] == "message" && v["text"] == "still here" {
            break;
        }
    }
    assert!(renames <= allowed, "{renames} renames reached the room");
}

#[tokio::test]
async fn bidi_overrides_are_refused_in_texts() {
    let (d, _dir) = daemon(&[]).await;
    let mut alice = Client::in_room(d.tcp, "alice", "general").await;
    // U+202E turns "<mallory> hi" around in a terminal.
    for c in ['\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}'] {
        alice.send(&format!("look {c}ih")).await;
        let e = alice.expect_error("bad-arguments").await;
        assert!(
            e["message"].as_str().unwrap().contains("bidirectional"),
            "{e}"
        );
        alice.send(&format!("/me {c}waves")).await;
        alice.expect_error("bad-arguments").await;
        alice.send(&format!("/msg alice {c}psst")).await;
        alice.expect_error("bad-arguments").await;
    }
    alice.send("שלום").await;
    alice
        .expect(|v| v["type"] == "message" && v["text"] == "שלום")
        .await;
}
