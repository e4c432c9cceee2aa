//! Properties that must hold for any input, checked with generated inputs
//! (`proptest`): the parser never panics, an event's JSON reads back as what
//! was rendered, and a room's ring holds exactly its last messages.

use std::sync::Arc;

use baby_discord::core::{
    Command, Event, EventBody, History, Message, MessageKind, Nick, RING, RoomName, Text,
    Timestamp, parse,
};
use proptest::prelude::*;
use serde_json::Value;

/// Any text the protocol accepts: no control characters but tab, no bidi
/// controls, not blank.
fn text() -> impl Strategy<Value = Text> {
    const C: &str = r"[^\p{Cc}\x{202A}-\x{202E}\x{2066}-\x{2069}]";
    let pattern = format!(r"{C}{{0,40}}[^\s\p{{Cc}}]{C}{{0,40}}|\t{C}");
    proptest::string::string_regex(&pattern)
        .expect("a valid pattern")
        .prop_filter_map("a valid text", |s| Text::parse(&s, 2000).ok())
}

fn nick() -> impl Strategy<Value = Nick> {
    "[A-Za-z0-9_-]{1,32}".prop_map(|s| Nick::parse(&s).unwrap())
}

fn room() -> impl Strategy<Value = RoomName> {
    "[a-z0-9][a-z0-9_-]{0,63}".prop_map(|s| RoomName::parse(&s).unwrap())
}

fn message(seq: u64) -> Arc<Message> {
    Arc::new(Message {
        room: RoomName::parse("ring").unwrap(),
        seq,
        id: uuid::Uuid::now_v7(),
        nick: Nick::parse("alice").unwrap(),
        text: format!("m{seq}"),
        kind: MessageKind::Text,
        ts: Timestamp(0),
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever a line holds, parsing answers (a command, nothing, or a
    /// refusal); a message it accepts is within the limit and not blank.
    #[test]
    fn parse_never_panics(line in any::<String>(), max in 1usize..3000) {
        if let Ok(Some(Command::Say(t) | Command::Me(t) | Command::Msg { text: t, .. })) =
            parse(&line, max)
        {
            prop_assert!(t.as_str().chars().count() <= max);
            prop_assert!(!t.as_str().trim().is_empty());
        }
    }

    /// Lines that look like commands, to reach past the first `/`.
    #[test]
    fn parse_never_panics_on_commandish_lines(
        name in "(nick|join|leave|switch|rooms|who|msg|me|history|format|help|quit|[a-z]{1,8})",
        args in "[ a-zA-Z0-9#_\\-\\t\u{a0}]{0,80}",
    ) {
        let _ = parse(&format!("/{name} {args}"), 2000);
        let _ = parse(&format!("/{name}{args}"), 2000);
    }

    /// A message event's JSON reads back with every field as rendered, and
    /// its SSE frame carries that JSON on exactly one `data:` line.
    #[test]
    fn a_rendered_message_round_trips_through_json(
        room in room(),
        seq in 1u64..u64::MAX / 2,
        nick in nick(),
        said in text(),
        action in any::<bool>(),
        ms in 0i64..4_102_444_800_000,
    ) {
        let text = said.into_string();
        let kind = if action { MessageKind::Action } else { MessageKind::Text };
        let event = Event::message(Arc::new(Message {
            room: room.clone(),
            seq,
            id: uuid::Uuid::now_v7(),
            nick: nick.clone(),
            text: text.clone(),
            kind,
            ts: Timestamp(ms),
        }));
        let v: Value = serde_json::from_slice(event.json()).unwrap();
        prop_assert_eq!(&v, &event.to_value());
        prop_assert_eq!(v["type"].as_str(), Some("message"));
        prop_assert_eq!(v["room"].as_str(), Some(room.as_str()));
        prop_assert_eq!(v["seq"].as_u64(), Some(seq));
        prop_assert_eq!(v["nick"].as_str(), Some(nick.as_str()));
        prop_assert_eq!(v["text"].as_str(), Some(text.as_str()));
        prop_assert_eq!(v["kind"].as_str(), Some(kind.as_str()));
        let ts = Timestamp(ms).to_string();
        prop_assert_eq!(v["ts"].as_str(), Some(ts.as_str()));

        let frame = std::str::from_utf8(event.sse()).unwrap();
        let data: Vec<&str> = frame.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        prop_assert_eq!(data.len(), 1, "{}", frame);
        prop_assert_eq!(serde_json::from_str::<Value>(data[0]).unwrap(), v);
        prop_assert!(frame.ends_with("\n\n"));
        let id = format!("id: {room}:{seq}\n");
        prop_assert!(frame.starts_with(&id), "{}", frame);
    }

    /// The same for an error, whose message is free text.
    #[test]
    fn a_rendered_error_round_trips_through_json(said in any::<String>()) {
        let event = Event::error(baby_discord::core::ErrorCode::BadArguments, said.clone());
        let v: Value = serde_json::from_slice(event.json()).unwrap();
        prop_assert_eq!(v["message"].as_str(), Some(said.as_str()));
        let is_error = matches!(event.body(), EventBody::Error { .. });
        prop_assert!(is_error);
        // One event, one line: a newline in the text never splits it.
        prop_assert!(!event.json().contains(&b'\n'));
    }

    /// After any number of messages, in any batches, the ring holds the last
    /// min(n, 10), oldest first.
    #[test]
    fn the_ring_holds_the_last_ten_in_order(stored in 0u64..30, live in 0u64..30) {
        let mut ring = History::from_stored((1..=stored).map(message));
        for seq in stored + 1..=stored + live {
            ring.push(message(seq));
        }
        let n = stored + live;
        let kept: Vec<u64> = ring.iter().map(|m| m.seq).collect();
        let first = n.saturating_sub(RING as u64) + 1;
        let want: Vec<u64> = (first..=n).collect();
        prop_assert_eq!(kept.len() as u64, n.min(RING as u64));
        prop_assert_eq!(kept, want);
        prop_assert_eq!(ring.last_seq(), n);
    }
}
