//! What travels through Redis, as text.
//!
//! A message body is JSON without room and seq: the room is in the key or
//! channel, and the seq is given by the publish script (the stream id, or a
//! prefix on the channel). Channel payloads start with one letter:
//!
//! ```text
//! m<seq> <body>            a room message           (room channel)
//! p<presence json>         a join, leave or rename  (room or cluster channel)
//! d<n> <gen> <dm json>     a direct message, number n of generation gen of
//!                          the instance's inbox       (instance channel)
//! ```

use serde::{Deserialize, Serialize};

use crate::core::ports::{Envelope, Presence};
use crate::core::{DirectMessage, Draft, Message, MessageKind, Nick, RoomName, Timestamp};

/// A message without its room and seq.
#[derive(Debug, Serialize, Deserialize)]
pub struct Body {
    id: uuid::Uuid,
    nick: String,
    text: String,
    kind: String,
    ts: i64,
}

impl Body {
    /// The body of `draft`, as JSON.
    pub fn encode(draft: &Draft) -> String {
        serde_json::to_string(&Body {
            id: draft.id,
            nick: draft.nick.to_string(),
            text: draft.text.clone(),
            kind: draft.kind.as_str().to_owned(),
            ts: draft.ts.0,
        })
        .expect("plain struct serialises")
    }

    /// The message `json` is the body of, in `room` at `seq`.
    pub fn decode(room: RoomName, seq: u64, json: &str) -> Option<Message> {
        let body: Body = serde_json::from_str(json).ok()?;
        Some(Message {
            room,
            seq,
            id: body.id,
            nick: Nick::parse(&body.nick).ok()?,
            text: body.text,
            kind: MessageKind::from_stored(&body.kind),
            ts: Timestamp(body.ts),
        })
    }
}

/// The seq of a stream entry id `SEQ-0`.
pub fn seq_of_id(id: &str) -> Option<u64> {
    id.split_once('-')?.0.parse().ok()
}

/// A membership change, with the instance that made it (which has already
/// told its own sessions).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PresenceWire {
    Joined {
        from: String,
        room: String,
        nick: String,
    },
    Left {
        from: String,
        room: String,
        nick: String,
    },
    Renamed {
        from: String,
        old: String,
        new: String,
        rooms: Vec<String>,
    },
}

impl PresenceWire {
    /// The wire form of `change`, made on `from`.
    pub fn new(from: &str, change: &Presence) -> Self {
        let from = from.to_owned();
        match change {
            Presence::Joined { room, nick } => PresenceWire::Joined {
                from,
                room: room.to_string(),
                nick: nick.to_string(),
            },
            Presence::Left { room, nick } => PresenceWire::Left {
                from,
                room: room.to_string(),
                nick: nick.to_string(),
            },
            Presence::Renamed { old, new, rooms } => PresenceWire::Renamed {
                from,
                old: old.to_string(),
                new: new.to_string(),
                rooms: rooms.iter().map(ToString::to_string).collect(),
            },
        }
    }

    /// The channel payload.
    pub fn payload(&self) -> String {
        format!(
            "p{}",
            serde_json::to_string(self).expect("plain enum serialises")
        )
    }

    fn from(&self) -> &str {
        match self {
            PresenceWire::Joined { from, .. }
            | PresenceWire::Left { from, .. }
            | PresenceWire::Renamed { from, .. } => from,
        }
    }

    fn into_presence(self) -> Option<Presence> {
        let room = |r: &str| RoomName::parse(r).ok();
        let nick = |n: &str| Nick::parse(n).ok();
        Some(match self {
            PresenceWire::Joined {
                room: r, nick: n, ..
            } => Presence::Joined {
                room: room(&r)?,
                nick: nick(&n)?,
            },
            PresenceWire::Left {
                room: r, nick: n, ..
            } => Presence::Left {
                room: room(&r)?,
                nick: nick(&n)?,
            },
            PresenceWire::Renamed {
                old, new, rooms, ..
            } => Presence::Renamed {
                old: nick(&old)?,
                new: nick(&new)?,
                rooms: rooms.iter().filter_map(|r| room(r)).collect(),
            },
        })
    }
}

/// A direct message on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub struct DmWire {
    id: uuid::Uuid,
    from: String,
    to: String,
    text: String,
    ts: i64,
    /// The life of the instance whose session held `to` when it was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    life: Option<String>,
}

/// A direct message, and the life of the instance it was sent to: an
/// instance's inbox and channel are its name's, which a namesake may have
/// taken over while it was frozen, and the woken instance must not show the
/// namesake's users' DMs to its own stale sessions.
#[derive(Debug)]
pub struct Addressed {
    pub dm: DirectMessage,
    /// `None` from a sender that did not say (any life takes it).
    pub life: Option<String>,
}

impl Addressed {
    /// Whether the life whose hex token is `life` should deliver it.
    pub fn is_for(&self, life: &str) -> bool {
        self.life.as_deref().is_none_or(|to| to == life)
    }
}

impl DmWire {
    /// `dm` as its recipient's inbox keeps it, addressed to `to` as registered
    /// by life `life` of its instance. (On the channel it follows `dN `, N
    /// its number in the inbox.)
    pub fn encode(dm: &DirectMessage, to: &Nick, life: Option<&str>) -> String {
        let wire = DmWire {
            id: dm.id,
            from: dm.from.to_string(),
            to: to.to_string(),
            text: dm.text.clone(),
            ts: dm.ts.0,
            life: life.map(str::to_owned),
        };
        serde_json::to_string(&wire).expect("plain struct serialises")
    }

    /// The direct message in `json`, if it is one.
    pub fn decode(json: &str) -> Option<Addressed> {
        let w = serde_json::from_str::<DmWire>(json).ok()?;
        let dm = DirectMessage {
            id: w.id,
            from: Nick::parse(&w.from).ok()?,
            to: Nick::parse(&w.to).ok()?,
            text: w.text,
            ts: Timestamp(w.ts),
        };
        Some(Addressed { dm, life: w.life })
    }
}

/// A place in an instance's inbox: number `n` of generation `generation` (each
/// time Redis makes the inbox anew, after losing it or letting it expire,
/// numbering starts again under a new generation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxAt {
    pub generation: String,
    pub n: u64,
}

/// One payload read from a channel.
#[derive(Debug)]
pub enum Incoming {
    /// A room message at `seq` (the room comes from the channel).
    Message { seq: u64, body: String },
    /// A direct message, and where it is in this instance's inbox.
    Dm { at: InboxAt, dm: Addressed },
    /// Something for the sink as it is.
    Envelope(Envelope),
    /// Presence this instance sent itself, or a payload it cannot read.
    Ignore,
}

/// Reads a channel payload; `me` is this instance's name.
pub fn parse(payload: &str, me: &str) -> Incoming {
    let Some(tag) = payload.chars().next() else {
        return Incoming::Ignore;
    };
    let rest = &payload[1..];
    match tag {
        'm' => match rest.split_once(' ') {
            Some((seq, body)) => match seq.parse() {
                Ok(seq) => Incoming::Message {
                    seq,
                    body: body.to_owned(),
                },
                Err(_) => Incoming::Ignore,
            },
            None => Incoming::Ignore,
        },
        'p' => match serde_json::from_str::<PresenceWire>(rest) {
            Ok(wire) if wire.from() != me => wire.into_presence().map_or(Incoming::Ignore, |p| {
                Incoming::Envelope(Envelope::Presence(p))
            }),
            _ => Incoming::Ignore,
        },
        'd' => {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(n), Some(generation), Some(json)) => {
                    match (n.parse(), DmWire::decode(json)) {
                        (Ok(n), Some(dm)) => Incoming::Dm {
                            at: InboxAt {
                                generation: generation.to_owned(),
                                n,
                            },
                            dm,
                        },
                        _ => Incoming::Ignore,
                    }
                }
                _ => Incoming::Ignore,
            }
        }
        _ => Incoming::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_the_wire() {
        let room = RoomName::parse("general").unwrap();
        let draft = Draft {
            key: None,
            room: room.clone(),
            id: uuid::Uuid::now_v7(),
            nick: Nick::parse("alice").unwrap(),
            text: "hi there".into(),
            kind: MessageKind::Action,
            ts: Timestamp(42),
        };
        let body = Body::encode(&draft);
        let Incoming::Message { seq, body } = parse(&format!("m7 {body}"), "me") else {
            panic!("a message");
        };
        let message = Body::decode(room, seq, &body).unwrap();
        assert_eq!(message, draft.sequence(7));
    }

    #[test]
    fn own_presence_is_ignored_and_others_arrive() {
        let change = Presence::Joined {
            room: RoomName::parse("r").unwrap(),
            nick: Nick::parse("bob").unwrap(),
        };
        let payload = PresenceWire::new("i1", &change).payload();
        assert!(matches!(parse(&payload, "i1"), Incoming::Ignore));
        let Incoming::Envelope(Envelope::Presence(got)) = parse(&payload, "i2") else {
            panic!("presence");
        };
        assert_eq!(got, change);
        assert_eq!(seq_of_id("12-0"), Some(12));
    }

    #[test]
    fn a_dm_keeps_its_inbox_number_on_the_channel() {
        let dm = DirectMessage {
            id: uuid::Uuid::now_v7(),
            from: Nick::parse("alice").unwrap(),
            to: Nick::parse("Carol").unwrap(),
            text: "psst".into(),
            ts: Timestamp(42),
        };
        let to = Nick::parse("carol").unwrap();
        let payload = format!("d17 ab12 {}", DmWire::encode(&dm, &to, Some("00ff")));
        let Incoming::Dm { at, dm: got } = parse(&payload, "i2") else {
            panic!("a dm");
        };
        let want = InboxAt {
            generation: "ab12".into(),
            n: 17,
        };
        assert_eq!(at, want);
        assert!(got.is_for("00ff") && !got.is_for("0100"));
        let got = got.dm;
        assert_eq!((got.id, got.to, got.text), (dm.id, to, dm.text));
        assert!(matches!(parse("dx g {}", "i2"), Incoming::Ignore));
        assert!(matches!(parse("d1 {}", "i2"), Incoming::Ignore));
    }
}
