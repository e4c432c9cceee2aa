//! The one event model every client sees, and its renderings.
//!
//! The core produces an [`Event`]; adapters only render it. JSON is the canonical
//! form (SSE `data:` and TCP `/format json` use it verbatim), text is the human form
//! for `nc`, and the SSE frame wraps the JSON for browsers. Each rendering is computed at most once per event and shared as
//! [`Bytes`], so fanning a message out to N members costs N queue pushes, not N
//! serialisations.

use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};
use uuid::Uuid;

use super::names::{IdempotencyKey, Nick, RoomName};

/// Milliseconds since the Unix epoch, UTC: the `ts` of every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Timestamp(Utc::now().timestamp_millis())
    }

    fn datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.0).unwrap_or_default()
    }

    /// `08:01:02`, as the text rendering shows it.
    pub fn clock(self) -> String {
        self.datetime().format("%H:%M:%S").to_string()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.datetime().to_rfc3339_opts(SecondsFormat::Millis, true))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Every `error.code` of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    UnknownCommand,
    BadArguments,
    InvalidNick,
    NickTaken,
    InvalidRoom,
    NotInRoom,
    NoSuchNick,
    TooLong,
    InvalidUtf8,
    RateLimited,
    SlowConsumer,
    Unavailable,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UnknownCommand => "unknown-command",
            ErrorCode::BadArguments => "bad-arguments",
            ErrorCode::InvalidNick => "invalid-nick",
            ErrorCode::NickTaken => "nick-taken",
            ErrorCode::InvalidRoom => "invalid-room",
            ErrorCode::NotInRoom => "not-in-room",
            ErrorCode::NoSuchNick => "no-such-nick",
            ErrorCode::TooLong => "too-long",
            ErrorCode::InvalidUtf8 => "invalid-utf8",
            ErrorCode::RateLimited => "rate-limited",
            ErrorCode::SlowConsumer => "slow-consumer",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// Whether a room message was said (`text`) or acted (`/me`, `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    Text,
    Action,
}

impl MessageKind {
    /// The kind as stored and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Text => "text",
            MessageKind::Action => "action",
        }
    }

    /// The inverse of [`MessageKind::as_str`]; anything unknown reads as text.
    pub fn from_stored(s: &str) -> Self {
        if s == "action" {
            MessageKind::Action
        } else {
            MessageKind::Text
        }
    }
}

/// A room message once its room's ordering authority has given it a `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// The room it was said in.
    pub room: RoomName,
    /// Position in the room: 1, 2, 3... with no gap, across the cluster.
    pub seq: u64,
    /// Globally unique id (UUIDv7), for de-duplication across rooms and stores.
    pub id: Uuid,
    /// Who said it.
    pub nick: Nick,
    /// What was said.
    pub text: String,
    /// Said or acted.
    pub kind: MessageKind,
    /// When the sender's instance accepted it (also the event's `ts`).
    #[serde(skip)]
    pub ts: Timestamp,
}

/// A room message before it has a `seq`: what the core hands to the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    /// The room to say it in.
    pub room: RoomName,
    /// Globally unique id, fixed before sequencing so retries cannot duplicate.
    pub id: Uuid,
    /// Who says it.
    pub nick: Nick,
    /// What is said.
    pub text: String,
    /// Said or acted.
    pub kind: MessageKind,
    /// When it was accepted.
    pub ts: Timestamp,
    /// The client's name for this send, if it gave one: the bus stores it with
    /// the message and answers a repeat with the first message instead.
    pub key: Option<IdempotencyKey>,
}

impl Draft {
    /// Gives the draft its place in the room.
    pub fn sequence(self, seq: u64) -> Message {
        Message {
            room: self.room,
            seq,
            id: self.id,
            nick: self.nick,
            text: self.text,
            kind: self.kind,
            ts: self.ts,
        }
    }
}

/// A direct message between two users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectMessage {
    /// Globally unique id (UUIDv7).
    pub id: Uuid,
    /// Sender.
    pub from: Nick,
    /// Recipient.
    pub to: Nick,
    /// What was said.
    pub text: String,
    /// When it was sent.
    #[serde(skip)]
    pub ts: Timestamp,
}

/// One room and how many members it has, cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomCount {
    /// The room.
    pub room: RoomName,
    /// Its member count.
    pub members: usize,
}

/// One line of `/help`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HelpLine {
    /// How to type it.
    pub usage: &'static str,
    /// What it does.
    pub help: &'static str,
}

/// A TCP connection's rendering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Text,
    Json,
}

/// The `data` of a `reply` event, tagged by the command that asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "command", content = "data", rename_all = "lowercase")]
pub enum Reply {
    /// `/switch`: the new current room.
    Switch { room: RoomName },
    /// `/rooms`: rooms with members.
    Rooms { rooms: Vec<RoomCount> },
    /// `/who`: members of a room.
    Who { room: RoomName, members: Vec<Nick> },
    /// `/format`: the rendering now in force.
    Format { format: Format },
    /// `/help`: every command.
    Help { commands: Vec<HelpLine> },
}

/// What happened, without the `ts` every event carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum EventBody {
    /// First event of every session.
    Welcome {
        nick: Nick,
        instance: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<String>,
    },
    /// A room message.
    Message(Arc<Message>),
    /// A direct message; `peer` is the other party from the receiver's side.
    Dm {
        #[serde(flatten)]
        dm: Arc<DirectMessage>,
        #[serde(skip)]
        peer: Nick,
    },
    /// Someone joined a room.
    Join { room: RoomName, nick: Nick },
    /// Someone left a room.
    Leave { room: RoomName, nick: Nick },
    /// Someone changed nick.
    Nick { old: Nick, new: Nick },
    /// The answer to a command.
    Reply(Reply),
    /// Messages that can no longer be replayed (inclusive range).
    Gap {
        room: RoomName,
        from_seq: u64,
        to_seq: u64,
    },
    /// Something was refused or went wrong.
    Error { code: ErrorCode, message: String },
}

#[derive(Debug)]
struct Inner {
    body: EventBody,
    ts: Timestamp,
    json: OnceLock<Bytes>,
    text: OnceLock<Bytes>,
    sse: OnceLock<Bytes>,
}

/// An event, cheap to clone: fan-out shares one allocation and its renderings.
#[derive(Debug, Clone)]
pub struct Event(Arc<Inner>);

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(flatten)]
    body: &'a EventBody,
    ts: Timestamp,
}

impl Event {
    /// An event stamped now.
    pub fn new(body: EventBody) -> Self {
        Self::at(body, Timestamp::now())
    }

    /// An event with a given time (a message keeps the time it was accepted).
    pub fn at(body: EventBody, ts: Timestamp) -> Self {
        Event(Arc::new(Inner {
            body,
            ts,
            json: OnceLock::new(),
            text: OnceLock::new(),
            sse: OnceLock::new(),
        }))
    }

    /// A room message event.
    pub fn message(message: Arc<Message>) -> Self {
        let ts = message.ts;
        Self::at(EventBody::Message(message), ts)
    }

    /// An `error` event.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(EventBody::Error {
            code,
            message: message.into(),
        })
    }

    /// The same DM as seen by its other party: only `peer`, which the JSON
    /// and SSE renderings do not show, differs, so the copy shares those
    /// renderings (rendered here, once) instead of making its own. Any other
    /// event is returned as is.
    pub fn for_peer(&self, peer: Nick) -> Event {
        let EventBody::Dm { dm, .. } = &self.0.body else {
            return self.clone();
        };
        self.sse();
        Event(Arc::new(Inner {
            body: EventBody::Dm {
                dm: dm.clone(),
                peer,
            },
            ts: self.0.ts,
            json: self.0.json.clone(),
            text: OnceLock::new(),
            sse: self.0.sse.clone(),
        }))
    }

    /// What happened.
    pub fn body(&self) -> &EventBody {
        &self.0.body
    }

    /// When.
    pub fn ts(&self) -> Timestamp {
        self.0.ts
    }

    /// The event's `type`, also its SSE `event:` name.
    pub fn kind(&self) -> &'static str {
        match self.0.body {
            EventBody::Welcome { .. } => "welcome",
            EventBody::Message(_) => "message",
            EventBody::Dm { .. } => "dm",
            EventBody::Join { .. } => "join",
            EventBody::Leave { .. } => "leave",
            EventBody::Nick { .. } => "nick",
            EventBody::Reply(_) => "reply",
            EventBody::Gap { .. } => "gap",
            EventBody::Error { .. } => "error",
        }
    }

    /// The canonical JSON form, one line, no trailing newline.
    pub fn json(&self) -> &Bytes {
        self.0.json.get_or_init(|| {
            let wire = Wire {
                body: &self.0.body,
                ts: self.0.ts,
            };
            // Serialising plain structs of strings and numbers cannot fail.
            Bytes::from(serde_json::to_vec(&wire).expect("event serialises"))
        })
    }

    /// The JSON value, for embedding in a larger document (HTTP replies).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(Wire {
            body: &self.0.body,
            ts: self.0.ts,
        })
        .expect("event serialises")
    }

    /// The human rendering for `nc`: one or more lines, each ending in `\n`.
    pub fn text(&self) -> &Bytes {
        self.0
            .text
            .get_or_init(|| Bytes::from(render_text(&self.0.body, self.0.ts)))
    }
}

impl Event {
    /// The SSE `id:` of a room message, `ROOM:SEQ`; other events have none.
    pub fn sse_id(&self) -> Option<String> {
        match &self.0.body {
            EventBody::Message(m) => Some(format!("{}:{}", m.room, m.seq)),
            _ => None,
        }
    }

    /// The Server-Sent Events frame: `id: ROOM:SEQ` (room messages only),
    /// `event:` the type, `data:` the JSON on one line, then a blank line.
    pub fn sse(&self) -> &Bytes {
        self.0.sse.get_or_init(|| {
            let json = self.json();
            let mut frame = Vec::with_capacity(json.len() + 64);
            if let Some(id) = self.sse_id() {
                frame.extend_from_slice(b"id: ");
                frame.extend_from_slice(id.as_bytes());
                frame.push(b'\n');
            }
            frame.extend_from_slice(b"event: ");
            frame.extend_from_slice(self.kind().as_bytes());
            frame.extend_from_slice(b"\ndata: ");
            // JSON escapes every control character, so this is one line.
            frame.extend_from_slice(json);
            frame.extend_from_slice(b"\n\n");
            Bytes::from(frame)
        })
    }
}

fn render_text(body: &EventBody, ts: Timestamp) -> String {
    let clock = ts.clock();
    let mut out = match body {
        EventBody::Welcome { nick, instance, .. } => format!(
            "* welcome to baby-discord (instance {instance}). You are {nick}. /help for commands"
        ),
        EventBody::Message(m) => match m.kind {
            MessageKind::Text => format!("[{clock}] #{} <{}> {}", m.room, m.nick, m.text),
            MessageKind::Action => format!("[{clock}] #{} * {} {}", m.room, m.nick, m.text),
        },
        EventBody::Dm { dm, peer } => format!("[{clock}] @{peer} <{}> {}", dm.from, dm.text),
        EventBody::Join { room, nick } => format!("[{clock}] #{room} * {nick} joined"),
        EventBody::Leave { room, nick } => format!("[{clock}] #{room} * {nick} left"),
        EventBody::Nick { old, new } => format!("* {old} is now known as {new}"),
        EventBody::Reply(reply) => render_reply(reply),
        EventBody::Gap {
            room,
            from_seq,
            to_seq,
        } => format!("! gap: #{room} messages {from_seq}..{to_seq} are no longer available"),
        EventBody::Error { code, message } => format!("! {}: {message}", code.as_str()),
    };
    out.push('\n');
    out
}

fn render_reply(reply: &Reply) -> String {
    match reply {
        Reply::Switch { room } => format!("* current room is now #{room}"),
        Reply::Rooms { rooms } if rooms.is_empty() => "* rooms: (none)".to_owned(),
        Reply::Rooms { rooms } => {
            let list: Vec<String> = rooms
                .iter()
                .map(|r| format!("#{} ({})", r.room, r.members))
                .collect();
            format!("* rooms: {}", list.join(", "))
        }
        Reply::Who { room, members } => {
            let names: Vec<&str> = members.iter().map(Nick::as_str).collect();
            format!(
                "* members of #{room} ({}): {}",
                members.len(),
                names.join(", ")
            )
        }
        Reply::Format { format } => match format {
            Format::Text => "* format is now text".to_owned(),
            Format::Json => "* format is now json".to_owned(),
        },
        Reply::Help { commands } => {
            let lines: Vec<String> = commands
                .iter()
                .map(|c| format!("* {:<22} {}", c.usage, c.help))
                .collect();
            lines.join("\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nick(s: &str) -> Nick {
        Nick::parse(s).unwrap()
    }

    fn room(s: &str) -> RoomName {
        RoomName::parse(s).unwrap()
    }

    fn at_8_01_02() -> Timestamp {
        // 2026-01-01T08:01:02.345Z
        Timestamp(1_767_254_462_345)
    }

    #[test]
    fn message_renders_as_protocol_shows() {
        let m = Arc::new(Message {
            room: room("general"),
            seq: 42,
            id: Uuid::nil(),
            nick: nick("alice"),
            text: "hello".into(),
            kind: MessageKind::Text,
            ts: at_8_01_02(),
        });
        let e = Event::message(m);
        assert_eq!(&e.text()[..], b"[08:01:02] #general <alice> hello\n");
        let v: serde_json::Value = serde_json::from_slice(e.json()).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["room"], "general");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["nick"], "alice");
        assert_eq!(v["kind"], "text");
        assert_eq!(v["id"], "00000000-0000-0000-0000-000000000000");
        assert_eq!(v["ts"], "2026-01-01T08:01:02.345Z");
        assert_eq!(e.kind(), "message");
    }

    #[test]
    fn dm_text_names_the_other_party() {
        let dm = Arc::new(DirectMessage {
            id: Uuid::nil(),
            from: nick("alice"),
            to: nick("bob"),
            text: "psst".into(),
            ts: at_8_01_02(),
        });
        let to_bob = Event::at(
            EventBody::Dm {
                dm: dm.clone(),
                peer: nick("alice"),
            },
            at_8_01_02(),
        );
        let to_alice = Event::at(
            EventBody::Dm {
                dm,
                peer: nick("bob"),
            },
            at_8_01_02(),
        );
        assert_eq!(&to_bob.text()[..], b"[08:01:02] @alice <alice> psst\n");
        assert_eq!(&to_alice.text()[..], b"[08:01:02] @bob <alice> psst\n");
        let v: serde_json::Value = serde_json::from_slice(to_bob.json()).unwrap();
        assert_eq!(v["from"], "alice");
        assert_eq!(v["to"], "bob");
        assert!(v.get("peer").is_none());
    }

    #[test]
    fn reply_carries_command_and_data() {
        let e = Event::new(EventBody::Reply(Reply::Who {
            room: room("general"),
            members: vec![nick("alice"), nick("bob")],
        }));
        assert_eq!(&e.text()[..], b"* members of #general (2): alice, bob\n");
        let v: serde_json::Value = serde_json::from_slice(e.json()).unwrap();
        assert_eq!(v["type"], "reply");
        assert_eq!(v["command"], "who");
        assert_eq!(v["data"]["members"][1], "bob");
        let rooms = Event::new(EventBody::Reply(Reply::Rooms {
            rooms: vec![
                RoomCount {
                    room: room("general"),
                    members: 2,
                },
                RoomCount {
                    room: room("random"),
                    members: 1,
                },
            ],
        }));
        assert_eq!(&rooms.text()[..], b"* rooms: #general (2), #random (1)\n");
    }

    #[test]
    fn error_and_gap_render_with_bang() {
        let e = Event::error(ErrorCode::NickTaken, "alice is taken");
        assert_eq!(&e.text()[..], b"! nick-taken: alice is taken\n");
        let v: serde_json::Value = serde_json::from_slice(e.json()).unwrap();
        assert_eq!(v["code"], "nick-taken");
        let g = Event::new(EventBody::Gap {
            room: room("general"),
            from_seq: 3,
            to_seq: 9,
        });
        assert_eq!(
            &g.text()[..],
            b"! gap: #general messages 3..9 are no longer available\n"
        );
    }

    #[test]
    fn sse_frame_has_room_seq_id_for_messages_only() {
        let m = Arc::new(Message {
            room: room("general"),
            seq: 42,
            id: Uuid::nil(),
            nick: nick("alice"),
            text: "two\nlines? no: one".into(),
            kind: MessageKind::Text,
            ts: at_8_01_02(),
        });
        let e = Event::message(m);
        let frame = std::str::from_utf8(e.sse()).unwrap();
        let lines: Vec<&str> = frame.split('\n').collect();
        assert_eq!(lines[0], "id: general:42");
        assert_eq!(lines[1], "event: message");
        let data = lines[2].strip_prefix("data: ").unwrap();
        assert_eq!(data.as_bytes(), &e.json()[..]);
        assert_eq!(&lines[3..], ["", ""], "one data line, then a blank line");

        let join = Event::new(EventBody::Join {
            room: room("general"),
            nick: nick("bob"),
        });
        let frame = std::str::from_utf8(join.sse()).unwrap();
        assert!(frame.starts_with("event: join\ndata: {"), "{frame}");
        assert!(frame.ends_with("}\n\n"));
        assert_eq!(join.sse_id(), None);
    }

    #[test]
    fn welcome_omits_session_on_tcp() {
        let e = Event::new(EventBody::Welcome {
            nick: nick("guest-7f3a"),
            instance: "a1".into(),
            session: None,
        });
        assert_eq!(
            &e.text()[..],
            b"* welcome to baby-discord (instance a1). You are guest-7f3a. /help for commands\n"
        );
        let v: serde_json::Value = serde_json::from_slice(e.json()).unwrap();
        assert!(v.get("session").is_none());
    }

    #[test]
    fn both_sides_of_a_dm_share_one_rendering() {
        let dm = Arc::new(DirectMessage {
            id: Uuid::now_v7(),
            from: Nick::parse("alice").unwrap(),
            to: Nick::parse("bob").unwrap(),
            text: "psst".to_owned(),
            ts: Timestamp(0),
        });
        let to_bob = Event::at(
            EventBody::Dm {
                dm,
                peer: Nick::parse("alice").unwrap(),
            },
            Timestamp(0),
        );
        let to_alice = to_bob.for_peer(Nick::parse("bob").unwrap());
        assert_eq!(to_alice.sse().as_ptr(), to_bob.sse().as_ptr());
        assert_eq!(to_alice.json().as_ptr(), to_bob.json().as_ptr());
        assert!(to_bob.text().starts_with(b"[00:00:00] @alice <alice> psst"));
        assert!(to_alice.text().starts_with(b"[00:00:00] @bob <alice> psst"));
    }
}
