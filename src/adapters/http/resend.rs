//! What an HTTP session has sent lately, and where each of its rooms stands:
//! the memory that lets a stream that reconnects (`Last-Event-ID`) resume
//! with no gap.
//!
//! A session's frames leave in one order on one stream, so the last id a
//! client saw is a position in that order: everything sent after it may be
//! lost. The memory keeps the newest frames (at most [`RESEND_FRAMES`] and
//! [`RESEND_BYTES`]) and, per room, the range of seqs the session was sent.
//! A resume whose position is remembered resends what followed it, whatever
//! kind of event. One older than the memory (or an id the session never
//! sent) is caught up room by room from storage, for *every* room the
//! session was sent messages of, then gets the remembered frames: no room is
//! left behind, at the price of possible repeats that `(room, seq)` tells
//! apart.
//!
//! Frames are the events' own renderings ([`Event::sse`]), shared with every
//! other session that got the same event: remembering one costs a reference,
//! not a copy. Only frames that are not room messages get an `id: eN` line,
//! written separately, since room messages carry theirs (`ROOM:SEQ`).

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::Bytes;

use crate::core::{Event, EventBody, RoomName};

/// Frames a session remembers having sent, to resend after a reconnect.
pub const RESEND_FRAMES: usize = 1_024;
/// Bytes of frames a session remembers, counted in full even where shared.
pub const RESEND_BYTES: usize = 1 << 20;

/// One frame as it goes on the wire: an optional `id:` line, then the
/// event's shared rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wire {
    /// `id: eN\n` for events that are not room messages.
    pub id: Option<Bytes>,
    /// The event's SSE rendering.
    pub frame: Bytes,
}

/// Where a remembered frame puts its room: a message's seq, or the range a
/// gap announced.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    room: RoomName,
    from: u64,
    to: u64,
}

#[derive(Debug, Clone)]
struct Sent {
    /// `N` of `eN`, for frames that are not room messages.
    number: Option<u64>,
    place: Option<Place>,
    frame: Bytes,
}

impl Sent {
    fn wire(&self) -> Wire {
        Wire {
            id: self.number.map(id_line),
            frame: self.frame.clone(),
        }
    }

    fn is(&self, id: &str) -> bool {
        match (self.number, &self.place) {
            (Some(n), _) => id.strip_prefix('e').and_then(|n| n.parse().ok()) == Some(n),
            (None, Some(p)) => super::sse::parse_room_id(id)
                .is_some_and(|(room, seq)| room == p.room && seq == p.to),
            (None, None) => false,
        }
    }
}

fn id_line(n: u64) -> Bytes {
    Bytes::from(format!("id: e{n}\n"))
}

/// The seqs of one room this session was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    /// The seq before the first the session was sent (it needs none older).
    before: u64,
    /// The newest it was sent.
    last: u64,
}

/// How a reconnecting stream catches up.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// The client's position is remembered: these frames followed it.
    Remembered(Vec<Wire>),
    /// The client is older than the memory: read each of these rooms from
    /// storage, then send the remembered frames (skipping what the reads
    /// cover). Each read is `(room, after, up_to)`.
    Storage {
        /// What to read, room by room.
        reads: Vec<(RoomName, u64, u64)>,
        /// The named room and the seq the client claims, if any.
        named: Option<(RoomName, u64)>,
    },
}

/// Rooms a session's memory tracks before it forgets those the session left.
const TRACKED_ROOMS: usize = 256;

/// A session's memory of what it sent.
#[derive(Debug)]
pub struct Memory {
    sent: VecDeque<Sent>,
    bytes: usize,
    /// Looked up twice per frame: hashed with foldhash, not SipHash, whose
    /// two lookups were a twentieth of an SSE delivery's instructions (the
    /// table is per session and bounded, so it needs no stronger hash).
    rooms: HashMap<RoomName, Span, foldhash::fast::RandomState>,
    counter: u64,
    /// Room count past which [`Memory::crowded`] asks for pruning.
    prune_at: usize,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            sent: VecDeque::new(),
            bytes: 0,
            rooms: HashMap::default(),
            counter: 0,
            prune_at: TRACKED_ROOMS,
        }
    }
}

impl Memory {
    /// Records an event this stream is about to send and returns the frame to
    /// write; `None` for a room message the session was already sent.
    pub fn record(&mut self, event: &Event) -> Option<Wire> {
        let place = place_of(event);
        if let (EventBody::Message(_), Some(p)) = (event.body(), &place)
            && self.rooms.get(&p.room).is_some_and(|s| p.to <= s.last)
        {
            return None;
        }
        let number = match event.body() {
            EventBody::Message(_) => None,
            _ => {
                self.counter += 1;
                Some(self.counter)
            }
        };
        let sent = Sent {
            number,
            place,
            frame: event.sse().clone(),
        };
        let wire = sent.wire();
        self.note(&sent);
        self.push_back(sent);
        Some(wire)
    }

    /// Records frames a resume sent from storage before the remembered ones:
    /// they go in front, in the order they were sent, so the memory keeps the
    /// stream's order. Returns what to write.
    pub fn record_replayed(&mut self, events: &[Event]) -> Vec<Wire> {
        let mut front = Vec::with_capacity(events.len());
        for event in events {
            let number = match event.body() {
                EventBody::Message(_) => None,
                _ => {
                    self.counter += 1;
                    Some(self.counter)
                }
            };
            let sent = Sent {
                number,
                place: place_of(event),
                frame: event.sse().clone(),
            };
            self.note(&sent);
            front.push(sent);
        }
        let wires = front.iter().map(Sent::wire).collect();
        for sent in front.into_iter().rev() {
            self.bytes += sent.frame.len();
            self.sent.push_front(sent);
        }
        self.trim();
        wires
    }

    /// How to resume a client whose last id was `last`.
    pub fn resume(&self, last: &str) -> Resume {
        if let Some(at) = self.sent.iter().position(|s| s.is(last)) {
            return Resume::Remembered(self.after(at, None));
        }
        let named = super::sse::parse_room_id(last);
        if let Some((room, _)) = &named
            && !self.rooms.contains_key(room)
        {
            // This session was never sent a message of that room: the id
            // is not its to name (a wiped database, a made-up cursor), and
            // claims nothing about the rest. Nothing missed.
            return Resume::Remembered(Vec::new());
        }
        if let Some((room, seq)) = &named {
            // The newest remembered frame of that room the client says it has:
            // it got everything sent before that too.
            let anchor = self.sent.iter().rposition(|s| {
                s.place
                    .as_ref()
                    .is_some_and(|p| p.room == *room && p.to <= *seq)
            });
            if let Some(at) = anchor {
                return Resume::Remembered(self.after(at, named.as_ref()));
            }
        }
        // Older than anything remembered, or not an id this session sent:
        // every room from where the memory no longer covers it.
        let mut reads: Vec<(RoomName, u64, u64)> = self
            .rooms
            .iter()
            .filter_map(|(room, span)| {
                let up_to = self
                    .sent
                    .iter()
                    .filter_map(|s| s.place.as_ref())
                    .find(|p| p.room == *room)
                    .map_or(span.last, |p| p.from - 1);
                let after = match &named {
                    Some((named, seq)) if named == room => (*seq).max(span.before).min(up_to),
                    _ => span.before,
                };
                (after < up_to).then(|| (room.clone(), after, up_to))
            })
            .collect();
        reads.sort();
        Resume::Storage { reads, named }
    }

    /// The remembered frames, for after a storage catch-up, without those of
    /// the named room the client already has.
    pub fn remembered(&self, named: Option<&(RoomName, u64)>) -> Vec<Wire> {
        self.sent
            .iter()
            .filter(|s| !has(named, s))
            .map(Sent::wire)
            .collect()
    }

    /// Forgets rooms the session is no longer in and has no frame of in
    /// memory, so the table follows the session's rooms.
    pub fn retain_rooms(&mut self, member_of: &[RoomName]) {
        let remembered: HashSet<&RoomName> = self
            .sent
            .iter()
            .filter_map(|s| s.place.as_ref().map(|p| &p.room))
            .collect();
        let member_of: HashSet<&RoomName> = member_of.iter().collect();
        self.rooms
            .retain(|room, _| member_of.contains(room) || remembered.contains(room));
        // A session in many rooms is not asked again at every event.
        self.prune_at = TRACKED_ROOMS.max(2 * self.rooms.len());
    }

    /// Whether the room table has grown enough to prune it
    /// ([`Memory::retain_rooms`]).
    pub fn crowded(&self) -> bool {
        self.rooms.len() > self.prune_at
    }

    /// Frames and bytes remembered.
    #[cfg(test)]
    pub fn size(&self) -> (usize, usize) {
        (self.sent.len(), self.bytes)
    }

    fn after(&self, at: usize, named: Option<&(RoomName, u64)>) -> Vec<Wire> {
        self.sent
            .iter()
            .skip(at + 1)
            .filter(|s| !has(named, s))
            .map(Sent::wire)
            .collect()
    }

    fn note(&mut self, sent: &Sent) {
        if let Some(p) = &sent.place {
            let fresh = Span {
                before: p.from - 1,
                last: 0,
            };
            // Looked up first: the room is almost always known, and the
            // entry API would take a clone of its name for every frame.
            let span = match self.rooms.get_mut(&p.room) {
                Some(span) => span,
                None => self.rooms.entry(p.room.clone()).or_insert(fresh),
            };
            span.before = span.before.min(p.from - 1);
            span.last = span.last.max(p.to);
        }
    }

    fn push_back(&mut self, sent: Sent) {
        self.bytes += sent.frame.len();
        self.sent.push_back(sent);
        self.trim();
    }

    /// Drops the oldest frames beyond either bound; a resume that needs them
    /// reads their rooms from storage.
    fn trim(&mut self) {
        while self.sent.len() > RESEND_FRAMES || self.bytes > RESEND_BYTES {
            match self.sent.pop_front() {
                Some(old) => self.bytes -= old.frame.len(),
                None => break,
            }
        }
    }
}

/// Whether `s` is a message of the named room the client already has.
fn has(named: Option<&(RoomName, u64)>, s: &Sent) -> bool {
    match (named, &s.place) {
        (Some((room, seq)), Some(p)) => s.number.is_none() && p.room == *room && p.to <= *seq,
        _ => false,
    }
}

fn place_of(event: &Event) -> Option<Place> {
    match event.body() {
        EventBody::Message(m) => Some(Place {
            room: m.room.clone(),
            from: m.seq,
            to: m.seq,
        }),
        EventBody::Gap {
            room,
            from_seq,
            to_seq,
        } if from_seq >= &1 && to_seq >= from_seq => Some(Place {
            room: room.clone(),
            from: *from_seq,
            to: *to_seq,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::core::{Message, MessageKind, Nick, Timestamp};
    use uuid::Uuid;

    fn message(room: &str, seq: u64) -> Event {
        message_of(room, seq, 8)
    }

    fn message_of(room: &str, seq: u64, len: usize) -> Event {
        Event::message(Arc::new(Message {
            room: RoomName::parse(room).unwrap(),
            seq,
            id: Uuid::now_v7(),
            nick: Nick::parse("alice").unwrap(),
            text: "x".repeat(len),
            kind: MessageKind::Text,
            ts: Timestamp::now(),
        }))
    }

    fn join() -> Event {
        Event::new(EventBody::Join {
            room: RoomName::parse("general").unwrap(),
            nick: Nick::parse("bob").unwrap(),
        })
    }

    fn room(s: &str) -> RoomName {
        RoomName::parse(s).unwrap()
    }

    /// The ids of frames, as a client would read them.
    fn ids(wires: &[Wire]) -> Vec<String> {
        wires
            .iter()
            .map(|w| match &w.id {
                Some(id) => String::from_utf8_lossy(&id[4..id.len() - 1]).into_owned(),
                None => {
                    let text = String::from_utf8_lossy(&w.frame);
                    text.lines().next().unwrap()[4..].to_owned()
                }
            })
            .collect()
    }

    fn remembered(resume: Resume) -> Vec<String> {
        match resume {
            Resume::Remembered(wires) => ids(&wires),
            other => panic!("expected a resume from memory, got {other:?}"),
        }
    }

    #[test]
    fn frames_get_room_seq_or_counter_ids_and_share_the_rendering() {
        let mut m = Memory::default();
        let event = message("general", 7);
        let w = m.record(&event).unwrap();
        assert_eq!(w.id, None);
        assert!(w.frame.starts_with(b"id: general:7\nevent: message\n"));
        assert_eq!(w.frame.as_ptr(), event.sse().as_ptr(), "shared, not copied");
        let j = m.record(&join()).unwrap();
        assert_eq!(j.id.as_deref(), Some(&b"id: e1\n"[..]));
        assert!(j.frame.starts_with(b"event: join\n"));
        assert_eq!(ids(&[m.record(&join()).unwrap()]), ["e2"]);
    }

    #[test]
    fn a_remembered_position_resends_what_followed_it() {
        let mut m = Memory::default();
        m.record(&message("general", 1));
        m.record(&join());
        m.record(&message("random", 1));
        m.record(&message("general", 2));
        assert_eq!(
            remembered(m.resume("general:1")),
            ["e1", "random:1", "general:2"]
        );
        assert_eq!(remembered(m.resume("e1")), ["random:1", "general:2"]);
        assert_eq!(remembered(m.resume("general:2")), Vec::<String>::new());
    }

    #[test]
    fn a_claim_above_what_was_sent_means_nothing_missed_in_that_room() {
        let mut m = Memory::default();
        m.record(&message("general", 1));
        m.record(&message("random", 4));
        m.record(&message("general", 2));
        // The newest general frame at or below the claim anchors the position.
        assert_eq!(
            remembered(m.resume("general:999999999")),
            Vec::<String>::new()
        );
        assert_eq!(remembered(m.resume("random:999")), ["general:2"]);
        // A room this session was never sent anything of.
        assert_eq!(
            remembered(m.resume("music:999999999")),
            Vec::<String>::new()
        );
    }

    #[test]
    fn messages_already_sent_are_not_sent_again() {
        let mut m = Memory::default();
        assert!(m.record(&message("general", 5)).is_some());
        assert!(m.record(&message("general", 5)).is_none());
        assert!(m.record(&message("general", 6)).is_some());
        assert!(m.record(&message("random", 1)).is_some());
    }

    #[test]
    fn memory_is_bounded_by_frames_and_by_bytes() {
        let mut m = Memory::default();
        for seq in 1..=(RESEND_FRAMES as u64 + 5) {
            m.record(&message("general", seq));
        }
        assert_eq!(m.size().0, RESEND_FRAMES);
        assert!(matches!(m.resume("general:6"), Resume::Remembered(_)));

        let mut m = Memory::default();
        for seq in 1..=2_000 {
            m.record(&message_of("general", seq, 2_000));
        }
        let (frames, bytes) = m.size();
        assert!(bytes <= RESEND_BYTES, "{bytes}");
        assert!(frames < 600, "{frames} frames of 2,000 characters in 1 MiB");
    }

    #[test]
    fn older_than_memory_reads_every_room_from_storage() {
        let mut m = Memory::default();
        for seq in 11..=20 {
            m.record(&message("general", seq));
        }
        for seq in 31..=40 {
            m.record(&message("random", seq));
        }
        // Only the last 1,024 frames stay: general, random's first ten and
        // music's first five are gone.
        for seq in 1..=(RESEND_FRAMES as u64) {
            m.record(&message("music", seq));
        }
        m.record(&join());
        for seq in 41..=44 {
            m.record(&message("random", seq));
        }
        let Resume::Storage { reads, named } = m.resume("general:15") else {
            panic!("general:15 is no longer remembered");
        };
        assert_eq!(named, Some((room("general"), 15)));
        assert_eq!(
            reads,
            [
                (room("general"), 15, 20),
                (room("music"), 0, 5),
                (room("random"), 30, 40),
            ]
        );
        // A garbage id: every room from the session's start in it.
        let Resume::Storage { reads, .. } = m.resume("nonsense") else {
            panic!()
        };
        assert_eq!(reads[0], (room("general"), 10, 20));
    }

    #[test]
    fn frames_replayed_from_storage_are_remembered_in_stream_order() {
        let mut m = Memory::default();
        m.record(&message("general", 21));
        let replayed: Vec<Event> = (1..=5).map(|s| message("general", s)).collect();
        let wires = m.record_replayed(&replayed);
        assert_eq!(ids(&wires).len(), 5);
        // A later resume from the middle of the storage replay finds its place.
        assert_eq!(
            remembered(m.resume("general:2")),
            ["general:3", "general:4", "general:5", "general:21"]
        );
    }
}
