//! The transport-agnostic chat core.
//!
//! [`Hub`] owns sessions and rooms and decides everything: who may say what,
//! what a command does, which sessions receive which event. It speaks in
//! [`Command`]s and [`Event`]s and knows nothing of sockets, HTTP or SQL; it
//! reaches storage and other instances only through the [`Store`] and [`Bus`]
//! traits. State sits behind one `std::sync::Mutex` that is never held across an
//! `.await`, and events reach sessions through bounded outboxes with
//! `try_send`, so no client can make the core wait.

mod catchup;
mod cluster;
mod commands;
mod event;
mod history;
mod names;
pub mod outbox;
pub mod ports;
mod rate;
mod rooms;
mod router;
mod sessions;
mod watch;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;
use uuid::Uuid;

pub use commands::{Command, DEFAULT_HISTORY, HELP, MAX_HISTORY, parse};
pub use event::{
    DirectMessage, Draft, ErrorCode, Event, EventBody, Format, HelpLine, Message, MessageKind,
    Reply, RoomCount, Timestamp,
};
/// A message of room `r` with a given seq, for unit tests.
#[cfg(test)]
pub(crate) use history::tests::msg as test_message;
pub use history::{History, RING};
pub use names::{
    IdempotencyKey, MAX_IDEMPOTENCY_KEY, MAX_NICK, MAX_ROOM, Nick, NickKey, Refusal, RoomName, Text,
};
pub use rate::TokenBucket;
pub use sessions::{Backlog, Direct, EndReason, Replies, SessionHandle, SessionId};
pub use watch::RoomWatch;

use catchup::{CatchUp, MAX_CATCH_UP};
use ports::{Bus, BusError, Claim, Deliver, Envelope, Presence, Store};
use rooms::Room;
use router::{Undeliverable, fan_out};
use sessions::{IdMap, Session};

/// How many guest nicks a new session draws before giving up.
const GUEST_DRAWS: usize = 16;
/// How many times a resuming join reads storage before it announces, as a
/// gap, messages that keep arriving faster than it can read them.
const CATCH_UP_READS: usize = 3;
/// Queue slots a TCP client's catch-up leaves free (its `join`, gaps, and
/// whatever arrives next).
const CATCH_UP_RESERVE: usize = 8;

/// A resuming join's read was overtaken by more messages than the ring holds.
struct Torn;

/// A new membership for the directory: the room, the nick, and the last seq
/// delivered here (where the bus picks up).
type Joined = (RoomName, Nick, u64);

impl Deliver for Hub {
    /// Delivers what the bus carries to the local sessions it concerns.
    fn deliver(&self, envelope: Envelope) {
        match envelope {
            Envelope::Message(message) => self.deliver_message(message),
            Envelope::Dm(dm) => self.deliver_dm(dm),
            Envelope::Presence(change) => self.deliver_presence(change),
            Envelope::ClaimLost { session, nick } => {
                self.claim_lost(session, nick);
            }
            Envelope::Superseded { instance } => self.superseded(instance),
        }
    }

    /// Every local session's nick and rooms.
    fn claims(&self) -> Vec<Claim> {
        self.local_claims()
    }
}

/// The limits the core enforces (PROTOCOL.md, "Limits").
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest message text, in characters.
    pub max_text: usize,
    /// Messages per second per session; 0 turns the limit off.
    pub rate: u32,
    /// Messages a session may send at once before `rate` applies.
    pub burst: u32,
    /// `/nick`, `/join` and `/leave` per second per session; 0 turns the limit off.
    pub command_rate: u32,
    /// Of those, how many a session may send at once.
    pub command_burst: u32,
    /// Events that may wait for one session before it is a slow consumer.
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_text: 2_000,
            rate: 10,
            burst: 20,
            command_rate: 2,
            command_burst: 5,
            queue: 1_024,
        }
    }
}

/// Counters for `/metrics` and the benchmarks.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Room messages accepted from local sessions.
    pub messages_in: AtomicU64,
    /// Events queued to local sessions (one per recipient).
    pub events_out: AtomicU64,
    /// Sessions ended because they did not read.
    pub slow_consumers: AtomicU64,
}

/// The chat core. Cheap to clone: every clone is the same hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    instance: String,
    limits: Limits,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    state: Mutex<State>,
    next_id: AtomicU64,
    stats: HubStats,
    /// Why this instance must stop serving, once its bus has said so.
    halt: tokio::sync::watch::Sender<Option<String>>,
}

#[derive(Default)]
struct State {
    sessions: IdMap<Session>,
    nicks: HashMap<NickKey, SessionId>,
    rooms: HashMap<RoomName, Room>,
    /// Nicks the cluster gave another session while this instance was away,
    /// by the session that held them, until it ends. Kept beside the sessions
    /// rather than in each: it is rare, and the fan-out reads every session.
    lost: HashMap<SessionId, Nick>,
    closed: bool,
}

/// Whether nothing may be sent for session `id` now: the bus does not admit
/// this instance's users (its lease is unconfirmed), or the session goes by
/// a nick that is someone else's by now (it is being renamed). The fence is
/// judged first, under the same lock (see `Bus::admits`).
fn fenced_out(
    bus: &dyn Bus,
    lost: &HashMap<SessionId, Nick>,
    id: SessionId,
    session: &Session,
) -> bool {
    bus.admits().is_err() || lost.get(&id) == Some(&session.nick)
}

/// The events one command produces for its caller.
#[derive(Default)]
struct Answer(Vec<(Event, Delivery)>);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// Only the caller gets it (replies, errors, history replay).
    Direct,
    /// The caller's copy of a room event already queued to its outbox; an HTTP
    /// caller also gets it in the response.
    Echo,
}

impl Answer {
    fn direct(event: Event) -> Self {
        Answer(vec![(event, Delivery::Direct)])
    }

    fn refusal(r: Refusal) -> Self {
        Self::direct(Event::error(r.code, r.message))
    }

    fn reply(reply: Reply) -> Self {
        Self::direct(Event::new(EventBody::Reply(reply)))
    }

    /// Whether a rename took place.
    fn renames(&self) -> bool {
        self.0
            .iter()
            .any(|(e, _)| matches!(e.body(), EventBody::Nick { .. }))
    }
}

impl Hub {
    /// A hub for instance `instance`, reading history from `store` and
    /// publishing through `bus`. Feed it the bus with [`Hub::deliver`].
    pub fn new(instance: String, limits: Limits, store: Arc<dyn Store>, bus: Arc<dyn Bus>) -> Self {
        Hub {
            shared: Arc::new(Shared {
                instance,
                limits,
                store,
                bus,
                state: Mutex::new(State::default()),
                next_id: AtomicU64::new(1),
                stats: HubStats::default(),
                halt: tokio::sync::watch::Sender::new(None),
            }),
        }
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.shared.instance
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// The counters.
    pub fn stats(&self) -> &HubStats {
        &self.shared.stats
    }

    /// The store, for adapters that serve history.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// The bus, for health checks.
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.shared.bus
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; keep serving what state is left.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parses one line with this hub's text limit.
    pub fn parse(&self, line: &str) -> Result<Option<Command>, Refusal> {
        commands::parse(line, self.shared.limits.max_text)
    }

    /// Opens a session. `nick` is the one asked for (a guest nick if `None`);
    /// `token` is the HTTP session token, shown in the welcome event.
    pub async fn connect(
        &self,
        nick: Option<Nick>,
        replies: Replies,
        token: Option<String>,
    ) -> Result<SessionHandle, Refusal> {
        // The id comes first: it owns the session's nick in the cluster.
        let id = SessionId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        let guest = nick.is_none();
        let mut draws = 0;
        let (nick, mut state) = loop {
            let nick = self.claim_initial_nick(id, nick.clone()).await?;
            {
                let state = self.lock();
                if !state.nicks.contains_key(&nick.key()) {
                    break (nick, state);
                }
            }
            // Another local session took it between our look and our claim.
            // A guest draws again; an asked-for nick is taken.
            self.release_claim(id, &nick).await;
            draws += 1;
            if !guest || draws == GUEST_DRAWS {
                return Err(taken(&nick));
            }
        };
        if state.closed {
            return Err(Refusal::new(
                ErrorCode::Unavailable,
                "the server is shutting down",
            ));
        }
        let (outbox, events) = outbox::channel(self.shared.limits.queue.max(1));
        let (end, ended) = oneshot::channel();
        let welcome = Event::new(EventBody::Welcome {
            nick: nick.clone(),
            instance: self.shared.instance.clone(),
            session: token,
        });
        // A fresh channel has room for one event.
        let _ = outbox.try_send(welcome);
        let backlog = Backlog::of(&outbox);
        state.nicks.insert(nick.key(), id);
        state.sessions.insert(
            id,
            Session {
                nick: nick.clone(),
                rooms: BTreeSet::new(),
                current: None,
                outbox,
                direct: None,
                end: Some(end),
                bucket: TokenBucket::new(self.shared.limits.rate, self.shared.limits.burst),
                commands: TokenBucket::new(
                    self.shared.limits.command_rate,
                    self.shared.limits.command_burst,
                ),
                replies,
            },
        );
        Ok(SessionHandle {
            id,
            nick,
            events,
            ended,
            backlog,
        })
    }

    /// Gives the core a quicker way into session `id`'s connection than its
    /// outbox (see [`Direct`]). Events already queued keep their place: the
    /// adapter's `Direct` must queue behind them until they are written.
    pub fn attach(&self, id: SessionId, direct: Arc<dyn Direct>) {
        if let Some(session) = self.lock().sessions.get_mut(&id) {
            session.direct = Some(direct);
        }
    }

    /// The nick a new session asked for, or a free guest nick, claimed
    /// cluster-wide when there is a cluster.
    async fn claim_initial_nick(
        &self,
        id: SessionId,
        asked: Option<Nick>,
    ) -> Result<Nick, Refusal> {
        let directory = self.shared.bus.directory();
        if let Some(nick) = asked {
            if self.lock().nicks.contains_key(&nick.key()) {
                return Err(taken(&nick));
            }
            if let Some(directory) = directory
                && !directory.claim_nick(&nick, id).await.map_err(bus_down)?
            {
                return Err(taken(&nick));
            }
            return Ok(nick);
        }
        for _ in 0..GUEST_DRAWS {
            let Some(guest) = guest_nick(&self.lock().nicks) else {
                return Err(Refusal::new(
                    ErrorCode::Unavailable,
                    "every guest nick (guest-0000 to guest-ffff) is in use; \
                     ask for a nick of your own, or try again later",
                ));
            };
            match directory {
                None => return Ok(guest),
                Some(directory) if directory.claim_nick(&guest, id).await.map_err(bus_down)? => {
                    return Ok(guest);
                }
                Some(_) => continue,
            }
        }
        Err(Refusal::new(
            ErrorCode::Unavailable,
            "no free guest nick; try again",
        ))
    }

    /// Gives back a cluster claim `id` made but will not use.
    async fn release_claim(&self, id: SessionId, nick: &Nick) {
        if let Some(directory) = self.shared.bus.directory()
            && let Err(err) = directory.release_nick(nick, id).await
        {
            tracing::warn!(cause = %err, %nick, "could not give back an unused nick claim");
        }
    }

    /// Carries out one command. Returns the events it produced for the caller
    /// when the session's replies go to the caller (HTTP); otherwise they are
    /// already in the session's outbox and the result is empty.
    pub async fn handle(&self, id: SessionId, command: Command) -> Vec<Event> {
        if command.reaches_others() && !self.take_command_token(id) {
            return self.answer(id, Answer::refusal(self.commands_limited()));
        }
        let answer = match command {
            Command::Say(text) => self.say_answer(id, text, MessageKind::Text).await,
            Command::Me(text) => self.say_answer(id, text, MessageKind::Action).await,
            Command::Nick(nick) => self.rename(id, nick).await,
            Command::Join { room, after } => self.join(id, room, after).await,
            Command::Leave(room) => self.leave(id, room).await,
            Command::Switch(room) => self.switch(id, room),
            Command::Rooms => match self.room_list().await {
                Ok(rooms) => Answer::reply(Reply::Rooms { rooms }),
                Err(r) => Answer::refusal(r),
            },
            Command::Who(room) => self.who(id, room).await,
            Command::Msg { to, text } => self.direct_message(id, to, text).await,
            Command::History(n) => self.history(id, n).await,
            Command::Format(format) => Answer::reply(Reply::Format { format }),
            Command::Help => Answer::reply(Reply::Help {
                commands: HELP.to_vec(),
            }),
            Command::Quit => {
                // Said before the session ends, so it is still delivered.
                let bye = self.answer(id, Answer::reply(Reply::Quit {}));
                self.disconnect(id, EndReason::Quit);
                return bye;
            }
        };
        self.answer(id, answer)
    }

    /// Tells the caller its input was refused (bad line, bad UTF-8, too long).
    pub fn refuse(&self, id: SessionId, refusal: Refusal) -> Vec<Event> {
        self.answer(id, Answer::refusal(refusal))
    }

    /// Routes an answer: into the outbox (TCP) or back to the caller (HTTP).
    fn answer(&self, id: SessionId, answer: Answer) -> Vec<Event> {
        let mut state = self.lock();
        let Some(session) = state.sessions.get(&id) else {
            return Vec::new();
        };
        if session.replies == Replies::Caller {
            return answer.0.into_iter().map(|(event, _)| event).collect();
        }
        let mut failed = Undeliverable::default();
        for (event, delivery) in answer.0 {
            if delivery == Delivery::Direct {
                fan_out(&state.sessions, [&id], &event, &mut failed);
            }
        }
        self.reap(&mut state, failed);
        Vec::new()
    }

    /// Says `text` in `room` (default: the current room). Returns the message
    /// with its `seq` once the bus has ordered it. With `key`, a repeat of a
    /// key this nick used within the store's window sends nothing and
    /// returns the first message sent with it.
    pub async fn say(
        &self,
        id: SessionId,
        room: Option<RoomName>,
        text: Text,
        kind: MessageKind,
        key: Option<IdempotencyKey>,
    ) -> Result<Arc<Message>, Refusal> {
        let draft = {
            let mut state = self.lock();
            let State { sessions, lost, .. } = &mut *state;
            let session = sessions.get_mut(&id).ok_or_else(session_gone)?;
            let room = match room.or_else(|| session.current.clone()) {
                Some(room) => room,
                None => return Err(no_room()),
            };
            if !session.rooms.contains(&room) {
                return Err(not_in(&room));
            }
            if fenced_out(self.shared.bus.as_ref(), lost, id, session) {
                return Err(fenced());
            }
            if !session.bucket.try_take() {
                return Err(self.rate_limited());
            }
            Draft {
                room,
                id: Uuid::now_v7(),
                nick: session.nick.clone(),
                text: text.into_string(),
                kind,
                ts: Timestamp::now(),
                key,
            }
        };
        self.shared
            .stats
            .messages_in
            .fetch_add(1, Ordering::Relaxed);
        self.shared.bus.publish(draft).await.map_err(|err| {
            tracing::warn!(cause = %err, "publish failed");
            if let BusError::Fenced { .. } = err {
                return fenced();
            }
            Refusal::new(
                ErrorCode::Unavailable,
                "the message was not sent: storage or bus is not answering; try again",
            )
        })
    }

    async fn say_answer(&self, id: SessionId, text: Text, kind: MessageKind) -> Answer {
        match self.say(id, None, text, kind, None).await {
            // The sender's copy arrives through the bus like everyone else's.
            Ok(_) => Answer::default(),
            Err(r) => Answer::refusal(r),
        }
    }

    /// Takes a token from the session's bucket for commands that reach others.
    /// A session that has ended passes: the command will find it gone.
    fn take_command_token(&self, id: SessionId) -> bool {
        self.lock()
            .sessions
            .get_mut(&id)
            .is_none_or(|session| session.commands.try_take())
    }

    fn commands_limited(&self) -> Refusal {
        let Limits {
            command_rate,
            command_burst,
            ..
        } = self.shared.limits;
        Refusal::new(
            ErrorCode::RateLimited,
            format!(
                "slow down: /nick, /join and /leave at most {command_rate} a second \
                 (bursts of {command_burst})"
            ),
        )
    }

    fn rate_limited(&self) -> Refusal {
        let Limits { rate, burst, .. } = self.shared.limits;
        Refusal::new(
            ErrorCode::RateLimited,
            format!("slow down: at most {rate} messages a second (bursts of {burst})"),
        )
    }

    async fn rename(&self, id: SessionId, new: Nick) -> Answer {
        let directory = self.shared.bus.directory();
        let old = {
            let state = self.lock();
            let Some(session) = state.sessions.get(&id) else {
                return Answer::default();
            };
            let free = new.key() == session.nick.key() || !state.nicks.contains_key(&new.key());
            if !free {
                return Answer::refusal(taken(&new));
            }
            session.nick.clone()
        };
        if let Some(directory) = directory {
            match directory.claim_nick(&new, id).await {
                Ok(true) => {}
                Ok(false) => return Answer::refusal(taken(&new)),
                Err(err) => return Answer::refusal(bus_down(err)),
            }
        }
        let answer = self.apply_rename(id, new.clone(), None);
        if let Some(directory) = directory
            && answer.renames()
            && let Err(err) = directory.renamed(&old, &new, id).await
        {
            tracing::warn!(cause = %err, "could not move presence to the new nick");
        }
        answer
    }

    /// Renames session `id` to `new` (already claimed cluster-wide) and tells
    /// it and its rooms' local members; with `from`, only if it is still
    /// called that.
    fn apply_rename(&self, id: SessionId, new: Nick, from: Option<&Nick>) -> Answer {
        let mut state = self.lock();
        let State {
            sessions,
            nicks,
            rooms,
            lost,
            ..
        } = &mut *state;
        let Some(session) = sessions.get_mut(&id) else {
            return Answer::default();
        };
        if session.nick == new || from.is_some_and(|from| *from != session.nick) {
            return Answer::default();
        }
        let old = session.nick.clone();
        if new.key() != old.key() && nicks.contains_key(&new.key()) {
            return Answer::refusal(taken(&new));
        }
        nicks.remove(&old.key());
        nicks.insert(new.key(), id);
        session.nick = new.clone();
        // Renamed away from a lost nick: a later claim of it (the taker left)
        // is the session's own again.
        lost.remove(&id);
        let mut to: BTreeSet<SessionId> = session
            .rooms
            .iter()
            .filter_map(|r| rooms.get(r))
            .flat_map(|r| r.members.iter().copied())
            .collect();
        to.insert(id);
        let event = Event::new(EventBody::Nick { old, new });
        let mut failed = Undeliverable::default();
        fan_out(sessions, &to, &event, &mut failed);
        self.reap(&mut state, failed);
        Answer(vec![(event, Delivery::Echo)])
    }

    async fn join(&self, id: SessionId, room: RoomName, after: Option<u64>) -> Answer {
        // The first use of a room seeds its ring from storage, outside the lock.
        let known = self.lock().rooms.contains_key(&room);
        let mut stored = if known {
            Vec::new()
        } else {
            match self.stored_ring(&room).await {
                Ok(stored) => stored,
                Err(refusal) => return Answer::refusal(refusal),
            }
        };
        // A cursor ahead of this instance's delivery but within what the room
        // reached: this instance lags the one the client came from.
        let ahead = match after {
            Some(after) if after > self.ring(&room).last().map_or(0, |m| m.seq) => {
                (after <= self.known_top(&room).await).then_some(after)
            }
            _ => None,
        };
        let mut catch_up: Option<CatchUp> = None;
        let mut reads = 0;
        let (answer, joined) = loop {
            // A resuming join reads what the client missed, also outside the
            // lock; a second read only fetches what arrived since the first.
            if let Some(after) = after {
                let read = match &catch_up {
                    None => self.catch_up(&room, after).await,
                    Some(earlier) => self.catch_up(&room, earlier.read_end()).await,
                };
                match read {
                    Ok(read) => match &mut catch_up {
                        None => catch_up = Some(read),
                        Some(earlier) => earlier.extend(read),
                    },
                    Err(refusal) => return Answer::refusal(refusal),
                }
            }
            reads += 1;
            let last_read = reads == CATCH_UP_READS;
            let seed = std::mem::take(&mut stored);
            let resume = catch_up.as_ref().map(|c| (c, ahead));
            match self.apply_join(id, room.clone(), seed, resume, last_read) {
                Ok(done) => break done,
                Err(Torn) => continue,
            }
        };
        if let (Some((room, nick, delivered)), Some(directory)) =
            (joined, self.shared.bus.directory())
            && let Err(err) = directory.joined(&room, &nick, delivered).await
        {
            tracing::warn!(cause = %err, %room, "could not record the join cluster-wide");
        }
        answer
    }

    /// The locked part of a join; also returns what the directory must record.
    /// With `catch_up`, the replay is everything after the client's cursor
    /// instead of the ring; `Err(Torn)` asks for a fresh read (unless
    /// `last_read`) when more messages arrived since the read than the ring holds.
    fn apply_join(
        &self,
        id: SessionId,
        room: RoomName,
        stored: Vec<Message>,
        resume: Option<(&CatchUp, Option<u64>)>,
        last_read: bool,
    ) -> Result<(Answer, Option<Joined>), Torn> {
        let (catch_up, ahead) = match resume {
            Some((catch_up, ahead)) => (Some(catch_up), ahead),
            None => (None, None),
        };
        let mut state = self.lock();
        let State {
            sessions, rooms, ..
        } = &mut *state;
        let Some(session) = sessions.get_mut(&id) else {
            return Ok((Answer::default(), None));
        };
        let entry = rooms
            .entry(room.clone())
            .or_insert_with(|| Room::new(stored));
        entry.touch();
        let outbox = session.replies == Replies::Outbox;
        // What follows the join: the ring, or all the client missed.
        let replay: Vec<Event> = match catch_up {
            None => entry.history.iter().cloned().map(Event::message).collect(),
            Some(catch_up) => {
                // A TCP client's replay must fit its queue, or it would be
                // dropped as a slow consumer for asking.
                let cap = if outbox {
                    session.outbox.capacity().saturating_sub(CATCH_UP_RESERVE)
                } else {
                    MAX_CATCH_UP
                };
                let plan = catch_up
                    .clone()
                    .delivered_up_to(entry.history.last_seq())
                    .plan(entry.history.iter(), cap.min(MAX_CATCH_UP));
                if plan.torn && !last_read {
                    return Err(Torn);
                }
                plan.items
                    .into_iter()
                    .map(|i| i.into_event(&room))
                    .collect()
            }
        };
        session.current = Some(room.clone());
        let member = !session.rooms.insert(room.clone());
        if member && catch_up.is_none() {
            return Ok((Answer::reply(Reply::Switch { room }), None));
        }
        let nick = session.nick.clone();
        let mut failed = Undeliverable::default();
        let mut answer = Answer::default();
        let mut joined = None;
        if member {
            // Resuming a room it is in: a reply, then the replay.
            let reply = Event::new(EventBody::Reply(Reply::Switch { room: room.clone() }));
            if outbox {
                fan_out(sessions, [&id], &reply, &mut failed);
            }
            answer.0.push((reply, Delivery::Echo));
        } else {
            entry.members.insert(id);
            let event = Event::new(EventBody::Join {
                room: room.clone(),
                nick: nick.clone(),
            });
            fan_out(sessions, &entry.members, &event, &mut failed);
            entry.notify_watchers(&event);
            answer.0.push((event, Delivery::Echo));
            joined = Some((room, nick, entry.history.last_seq()));
        }
        if let Some(ahead) = ahead.filter(|&a| a > entry.history.last_seq()) {
            entry.ahead.insert(id, ahead);
        }
        // The replay goes out under the same lock as the join: a message
        // delivered meanwhile would otherwise overtake it.
        for replayed in replay {
            if outbox {
                fan_out(sessions, [&id], &replayed, &mut failed);
            }
            answer.0.push((replayed, Delivery::Echo));
        }
        self.reap(&mut state, failed);
        Ok((answer, joined))
    }

    async fn leave(&self, id: SessionId, room: Option<RoomName>) -> Answer {
        let answer = self.apply_leave(id, room);
        if let Some(directory) = self.shared.bus.directory() {
            for (event, _) in &answer.0 {
                if let EventBody::Leave { room, nick } = event.body()
                    && let Err(err) = directory.left(room, nick).await
                {
                    tracing::warn!(cause = %err, %room, "could not record the leave cluster-wide");
                }
            }
        }
        answer
    }

    fn apply_leave(&self, id: SessionId, room: Option<RoomName>) -> Answer {
        let mut state = self.lock();
        let State {
            sessions, rooms, ..
        } = &mut *state;
        let Some(session) = sessions.get_mut(&id) else {
            return Answer::default();
        };
        let room = match room.or_else(|| session.current.clone()) {
            Some(room) => room,
            None => return Answer::refusal(no_room()),
        };
        if !session.rooms.remove(&room) {
            return Answer::refusal(not_in(&room));
        }
        if session.current.as_ref() == Some(&room) {
            session.current = session.rooms.iter().next_back().cloned();
        }
        let event = Event::new(EventBody::Leave {
            room: room.clone(),
            nick: session.nick.clone(),
        });
        let mut failed = Undeliverable::default();
        if let Some(entry) = rooms.get_mut(&room) {
            fan_out(sessions, &entry.members, &event, &mut failed);
            entry.notify_watchers(&event);
            entry.members.remove(&id);
            entry.ahead.remove(&id);
            entry.touch();
        }
        self.reap(&mut state, failed);
        Answer(vec![(event, Delivery::Echo)])
    }

    fn switch(&self, id: SessionId, room: RoomName) -> Answer {
        let mut state = self.lock();
        let Some(session) = state.sessions.get_mut(&id) else {
            return Answer::default();
        };
        if !session.rooms.contains(&room) {
            return Answer::refusal(not_in(&room));
        }
        session.current = Some(room.clone());
        Answer::reply(Reply::Switch { room })
    }

    /// Rooms that have members on any instance, with member counts, by name.
    pub async fn room_list(&self) -> Result<Vec<RoomCount>, Refusal> {
        match self.shared.bus.directory() {
            Some(directory) => directory.rooms().await.map_err(bus_down),
            None => Ok(self.rooms()),
        }
    }

    /// Rooms that have members on this instance, with member counts, by name.
    pub fn rooms(&self) -> Vec<RoomCount> {
        let state = self.lock();
        let mut rooms: Vec<RoomCount> = state
            .rooms
            .iter()
            .filter(|(_, r)| !r.members.is_empty())
            .map(|(name, r)| RoomCount {
                room: name.clone(),
                members: r.members.len(),
            })
            .collect();
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        rooms
    }

    async fn who(&self, id: SessionId, room: Option<RoomName>) -> Answer {
        let room = {
            let state = self.lock();
            let Some(session) = state.sessions.get(&id) else {
                return Answer::default();
            };
            match room.or_else(|| session.current.clone()) {
                Some(room) => room,
                None => return Answer::refusal(no_room()),
            }
        };
        if let Some(directory) = self.shared.bus.directory() {
            return match directory.members(&room).await {
                Ok(members) => Answer::reply(Reply::Who { room, members }),
                Err(err) => Answer::refusal(bus_down(err)),
            };
        }
        let state = self.lock();
        let mut members: Vec<Nick> = state
            .rooms
            .get(&room)
            .into_iter()
            .flat_map(|r| r.members.iter())
            .filter_map(|m| state.sessions.get(m))
            .map(|s| s.nick.clone())
            .collect();
        members.sort_by_key(Nick::key);
        Answer::reply(Reply::Who { room, members })
    }

    async fn direct_message(&self, id: SessionId, to: Nick, text: Text) -> Answer {
        let remote = match self.local_direct_message(id, &to, text) {
            Ok(answer) => return answer,
            Err(remote) => remote,
        };
        let Some(directory) = self.shared.bus.directory() else {
            return Answer::refusal(no_such_nick(&to));
        };
        match directory.send_dm(&remote).await {
            Ok(Some(recipient)) => {
                let ts = remote.ts;
                let dm = Arc::new(DirectMessage {
                    to: recipient.clone(),
                    ..remote
                });
                let event = Event::at(
                    EventBody::Dm {
                        dm,
                        peer: recipient,
                    },
                    ts,
                );
                let mut state = self.lock();
                let mut failed = Undeliverable::default();
                fan_out(&state.sessions, [&id], &event, &mut failed);
                self.reap(&mut state, failed);
                Answer(vec![(event, Delivery::Echo)])
            }
            Ok(None) => Answer::refusal(no_such_nick(&to)),
            Err(err) => Answer::refusal(bus_down(err)),
        }
    }

    /// Delivers a DM whose recipient is on this instance. When the recipient is
    /// elsewhere, returns the message for the directory to route instead.
    fn local_direct_message(
        &self,
        id: SessionId,
        to: &Nick,
        text: Text,
    ) -> Result<Answer, DirectMessage> {
        let mut state = self.lock();
        let State {
            sessions,
            nicks,
            lost,
            ..
        } = &mut *state;
        let Some(session) = sessions.get_mut(&id) else {
            return Ok(Answer::default());
        };
        if fenced_out(self.shared.bus.as_ref(), lost, id, session) {
            return Ok(Answer::refusal(fenced()));
        }
        if !session.bucket.try_take() {
            return Ok(Answer::refusal(self.rate_limited()));
        }
        let from = session.nick.clone();
        let Some((&target, recipient)) = nicks
            .get(&to.key())
            .and_then(|t| sessions.get(t).map(|s| (t, s.nick.clone())))
        else {
            return Err(DirectMessage {
                id: Uuid::now_v7(),
                from,
                to: to.clone(),
                text: text.into_string(),
                ts: Timestamp::now(),
            });
        };
        let dm = Arc::new(DirectMessage {
            id: Uuid::now_v7(),
            from: from.clone(),
            to: recipient.clone(),
            text: text.into_string(),
            ts: Timestamp::now(),
        });
        let ts = dm.ts;
        let mut failed = Undeliverable::default();
        let to_recipient = Event::at(EventBody::Dm { dm, peer: from }, ts);
        fan_out(sessions, [&target], &to_recipient, &mut failed);
        let echo = if target == id {
            to_recipient
        } else {
            // One rendering for both sides: the JSON does not name the peer.
            let to_sender = to_recipient.for_peer(recipient);
            fan_out(sessions, [&id], &to_sender, &mut failed);
            to_sender
        };
        self.reap(&mut state, failed);
        Ok(Answer(vec![(echo, Delivery::Echo)]))
    }

    async fn history(&self, id: SessionId, n: u16) -> Answer {
        let room = {
            let state = self.lock();
            let Some(session) = state.sessions.get(&id) else {
                return Answer::default();
            };
            match session.current.clone() {
                Some(room) => room,
                None => return Answer::refusal(no_room()),
            }
        };
        match self.history_page(&room, None, u32::from(n)).await {
            Ok(messages) => Answer(
                messages
                    .into_iter()
                    .map(|m| (Event::message(m), Delivery::Direct))
                    .collect(),
            ),
            Err(refusal) => Answer::refusal(refusal),
        }
    }

    fn deliver_dm(&self, dm: Arc<DirectMessage>) {
        let mut state = self.lock();
        let Some(&target) = state.nicks.get(&dm.to.key()) else {
            return; // gone since the sender looked
        };
        let ts = dm.ts;
        let peer = dm.from.clone();
        let event = Event::at(EventBody::Dm { dm, peer }, ts);
        let mut failed = Undeliverable::default();
        fan_out(&state.sessions, [&target], &event, &mut failed);
        self.reap(&mut state, failed);
    }

    /// Tells local members about a membership change on another instance.
    fn deliver_presence(&self, change: Presence) {
        let mut state = self.lock();
        let State {
            sessions, rooms, ..
        } = &mut *state;
        // A join or leave also goes to the room's streams; a rename does not
        // (a room stream carries messages, joins and leaves).
        let (to, event, streamed): (BTreeSet<SessionId>, _, _) = match change {
            Presence::Joined { room, nick } => (
                members_in(rooms, &room),
                EventBody::Join {
                    room: room.clone(),
                    nick,
                },
                Some(room),
            ),
            Presence::Left { room, nick } => (
                members_in(rooms, &room),
                EventBody::Leave {
                    room: room.clone(),
                    nick,
                },
                Some(room),
            ),
            Presence::Renamed {
                old,
                new,
                rooms: of,
            } => (
                of.iter().flat_map(|room| members_in(rooms, room)).collect(),
                EventBody::Nick { old, new },
                None,
            ),
        };
        let event = Event::new(event);
        if let Some(entry) = streamed.and_then(|room| rooms.get_mut(&room)) {
            entry.notify_watchers(&event);
        }
        if to.is_empty() {
            return;
        }
        let mut failed = Undeliverable::default();
        fan_out(sessions, &to, &event, &mut failed);
        self.reap(&mut state, failed);
    }

    fn deliver_message(&self, message: Arc<Message>) {
        let mut state = self.lock();
        let State {
            sessions, rooms, ..
        } = &mut *state;
        let Some(room) = rooms.get_mut(&message.room) else {
            return;
        };
        if message.seq <= room.history.last_seq() {
            return; // already delivered: buses may repeat after a reconnect
        }
        room.history.push(message.clone());
        room.touch();
        let event = Event::message(message);
        let mut failed = Undeliverable::default();
        let seq = room.history.last_seq();
        let members = if room.ahead.is_empty() {
            fan_out(sessions, &room.members, &event, &mut failed)
        } else {
            fan_out(sessions, &room.recipients(seq), &event, &mut failed)
        };
        let sent = members + room.notify_watchers(&event);
        self.shared
            .stats
            .events_out
            .fetch_add(sent as u64, Ordering::Relaxed);
        self.reap(&mut state, failed);
    }

    /// Ends a session: it leaves its rooms (members see `leave`) and its nick is
    /// free again. Harmless if the session has already ended.
    pub fn disconnect(&self, id: SessionId, reason: EndReason) {
        let mut state = self.lock();
        let more = self.end_session(&mut state, id, reason);
        self.reap(&mut state, more);
    }

    /// Ends every session (the daemon is stopping) and refuses new ones.
    pub fn shutdown(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.nicks.clear();
        for room in state.rooms.values_mut() {
            room.members.clear();
            room.watchers.clear();
        }
        for (_, mut session) in state.sessions.drain() {
            if let Some(end) = session.end.take() {
                let _ = end.send(EndReason::Shutdown);
            }
        }
    }

    /// Whether session `id` is connected (it has not ended).
    pub fn is_connected(&self, id: SessionId) -> bool {
        self.lock().sessions.contains_key(&id)
    }

    /// The rooms session `id` is in (none once it has ended).
    pub fn rooms_of(&self, id: SessionId) -> Vec<RoomName> {
        self.lock()
            .sessions
            .get(&id)
            .map(|s| s.rooms.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Sessions and rooms with members on this instance.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        let rooms = state
            .rooms
            .values()
            .filter(|r| !r.members.is_empty())
            .count();
        (state.sessions.len(), rooms)
    }

    /// Ends sessions that could not take an event, and those that their ending
    /// in turn overflowed, until none is left.
    fn reap(&self, state: &mut State, failed: Undeliverable) {
        let mut queue: VecDeque<(SessionId, EndReason)> = failed
            .slow
            .into_iter()
            .map(|id| (id, EndReason::SlowConsumer))
            .chain(failed.gone.into_iter().map(|id| (id, EndReason::Quit)))
            .collect();
        while let Some((id, reason)) = queue.pop_front() {
            let more = self.end_session(state, id, reason);
            queue.extend(
                more.slow
                    .into_iter()
                    .map(|id| (id, EndReason::SlowConsumer)),
            );
            queue.extend(more.gone.into_iter().map(|id| (id, EndReason::Quit)));
        }
    }

    fn end_session(&self, state: &mut State, id: SessionId, reason: EndReason) -> Undeliverable {
        let mut failed = Undeliverable::default();
        let Some(mut session) = state.sessions.remove(&id) else {
            return failed;
        };
        state.lost.remove(&id);
        if reason == EndReason::SlowConsumer {
            self.shared
                .stats
                .slow_consumers
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(session = %id, nick = %session.nick, "slow consumer dropped");
        }
        if state.nicks.get(&session.nick.key()) == Some(&id) {
            state.nicks.remove(&session.nick.key());
        }
        for room in &session.rooms {
            if let Some(entry) = state.rooms.get_mut(room) {
                entry.members.remove(&id);
                entry.ahead.remove(&id);
                entry.touch();
                let event = Event::new(EventBody::Leave {
                    room: room.clone(),
                    nick: session.nick.clone(),
                });
                fan_out(&state.sessions, &entry.members, &event, &mut failed);
                entry.notify_watchers(&event);
            }
        }
        if let Some(end) = session.end.take() {
            let _ = end.send(reason);
        }
        if reason != EndReason::Shutdown && self.shared.bus.directory().is_some() {
            let bus = self.shared.bus.clone();
            let nick = session.nick.clone();
            tokio::spawn(async move {
                if let Some(directory) = bus.directory()
                    && let Err(err) = directory.release_nick(&nick, id).await
                {
                    tracing::warn!(cause = %err, %nick, "could not free the nick cluster-wide; its lease will");
                }
            });
        }
        failed
    }
}

/// The local members of `room`.
fn members_in(rooms: &HashMap<RoomName, Room>, room: &RoomName) -> BTreeSet<SessionId> {
    rooms
        .get(room)
        .map(|r| r.members.iter().copied().collect())
        .unwrap_or_default()
}

fn taken(nick: &Nick) -> Refusal {
    Refusal::new(
        ErrorCode::NickTaken,
        format!("{nick} is taken; pick another"),
    )
}

fn no_such_nick(nick: &Nick) -> Refusal {
    Refusal::new(ErrorCode::NoSuchNick, format!("nobody is called {nick}"))
}

/// This instance lost touch with the cluster for most of a lease: what its
/// user typed meanwhile is not sent, since the nick may be someone else's now.
fn fenced() -> Refusal {
    Refusal::new(
        ErrorCode::Unavailable,
        "not sent: this instance lost touch with the cluster for too long, and is checking \
         that your nick is still yours; try again in a moment",
    )
}

fn bus_down(err: BusError) -> Refusal {
    if let BusError::Fenced { .. } = err {
        return fenced();
    }
    if let BusError::Recovering { lease_secs } = err {
        return Refusal::new(
            ErrorCode::Unavailable,
            format!(
                "the cluster is recovering from an outage and hands out no nick for up to {lease_secs} s, \
                 so that nobody takes a connected user's; try again shortly"
            ),
        );
    }
    tracing::warn!(cause = %err, "cluster directory unavailable");
    Refusal::new(
        ErrorCode::Unavailable,
        "the other instances cannot be reached right now; try again",
    )
}

fn session_gone() -> Refusal {
    Refusal::new(ErrorCode::Unavailable, "this session has ended")
}

fn no_room() -> Refusal {
    Refusal::new(
        ErrorCode::NotInRoom,
        "you are in no room; /join general first",
    )
}

fn not_in(room: &RoomName) -> Refusal {
    Refusal::new(
        ErrorCode::NotInRoom,
        format!("you are not in #{room}; /join {room} first"),
    )
}

/// Random draws before [`guest_nick`] looks for a free nick in order.
const RANDOM_GUEST_DRAWS: usize = 64;

/// A free guest nick: `guest-` and 4 hex digits, as the protocol says. `None`
/// when all 65,536 are in use on this instance (the format never changes).
fn guest_nick(taken: &HashMap<NickKey, SessionId>) -> Option<Nick> {
    let nick = |n: u16| Nick::parse(&format!("guest-{n:04x}")).expect("guest nicks are valid");
    let free = |n: &u16| !taken.contains_key(&nick(*n).key());
    // Random draws succeed at once unless nearly every guest nick is in use;
    // then one pass in order from a random start finds a free one, if any.
    let start: u16 = rand::random();
    (0..RANDOM_GUEST_DRAWS)
        .map(|_| rand::random::<u16>())
        .chain((0..=u16::MAX).map(|i| start.wrapping_add(i)))
        .find(free)
        .map(nick)
}

#[cfg(test)]
mod guest_tests {
    use super::*;

    #[test]
    fn guest_nicks_keep_their_format_and_run_out_cleanly() {
        let mut taken = HashMap::new();
        for n in 0..=u16::MAX {
            if n != 0xbeef {
                let nick = Nick::parse(&format!("guest-{n:04x}")).unwrap();
                taken.insert(nick.key(), SessionId(u64::from(n)));
            }
        }
        assert_eq!(guest_nick(&taken).unwrap().to_string(), "guest-beef");
        let last = Nick::parse("guest-beef").unwrap();
        taken.insert(last.key(), SessionId(1));
        assert!(guest_nick(&taken).is_none());
    }
}
