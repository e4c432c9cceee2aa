//! Server-Sent Events streams: a session's events (`GET /events`) and one
//! room's, read-only (`GET /messages/{room}`).
//!
//! Each stream is an `async_stream` loop over the cancel token, a ping timer
//! and the event queue, turned into a hyper body. Frames come from
//! [`Event::sse`], rendered once per event. A reconnecting client names the
//! last frame it got (`Last-Event-ID`). A session stream resends what
//! followed it from the session's memory, or catches every room of the
//! session up from storage when the client is older than that memory
//! (`resend.rs` decides which); a room stream replays its room from storage.
//! Either reports an `event: gap` where storage no longer has messages, and a
//! cursor above the room's seq means "nothing missed", never a muted stream.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use hyper::body::Frame;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::resend::{Memory, Resume, Wire};
use super::sessions::{Attached, HttpSession};
use super::stream::BATCH;
use crate::adapters::on_wake::OnWake;
use crate::core::{EndReason, ErrorCode, Event, EventBody, Hub, RoomName, RoomWatch};

/// The first frame: how long EventSource waits before reconnecting (ms).
const RETRY: &[u8] = b"retry: 2000\n\n";
/// The keep-alive comment.
const PING: &[u8] = b": ping\n\n";
/// Messages read from storage per round trip while resuming.
const REPLAY_PAGE: u32 = 500;
/// How long a slow consumer's connection may take to receive its error.
const PARTING: Duration = Duration::from_secs(2);

/// What every stream needs besides its events.
#[derive(Clone)]
pub struct StreamContext {
    /// The chat core (storage reads on resume).
    pub hub: Hub,
    /// Time between pings.
    pub ping: Duration,
    /// Fires when the daemon stops: the stream must end, or the drain hangs.
    pub shutdown: CancellationToken,
    /// Cancelling it cuts this stream's connection (a reader that is stuck).
    pub connection: CancellationToken,
    /// Open streams, for `/metrics`.
    pub open: Arc<AtomicI64>,
}

type Chunk = Result<Frame<Bytes>, Infallible>;

fn data(bytes: impl Into<Bytes>) -> Chunk {
    Ok(Frame::data(bytes.into()))
}

/// Counts a stream as open while it lives.
struct Open(Arc<AtomicI64>);

impl Open {
    fn new(open: &Arc<AtomicI64>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Open(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Parses an SSE id of the form `ROOM:SEQ`.
pub fn parse_room_id(id: &str) -> Option<(RoomName, u64)> {
    let (room, seq) = id.trim().rsplit_once(':')?;
    Some((RoomName::parse(room).ok()?, seq.parse().ok()?))
}

/// The gap frame for messages `from..=to` that cannot be replayed.
fn gap(room: &RoomName, from_seq: u64, to_seq: u64) -> Bytes {
    Event::new(EventBody::Gap {
        room: room.clone(),
        from_seq,
        to_seq,
    })
    .sse()
    .clone()
}

fn error(code: ErrorCode, message: &str) -> Bytes {
    Event::error(code, message).sse().clone()
}

/// Every stored message of `room` after `after`, oldest first, page by page,
/// with a `gap` frame wherever storage no longer has some. Each frame comes
/// with the highest seq sent so far, where live delivery must pick up.
fn replay(hub: Hub, room: RoomName, after: u64) -> impl Stream<Item = (Chunk, u64)> {
    async_stream::stream! {
        let mut last_seq = after;
        loop {
            match hub.replay(&room, last_seq, REPLAY_PAGE).await {
                Ok(page) => {
                    let full = page.len() as u32 >= REPLAY_PAGE;
                    for m in page {
                        if m.seq > last_seq + 1 {
                            yield (data(gap(&room, last_seq + 1, m.seq - 1)), last_seq);
                        }
                        last_seq = m.seq;
                        yield (data(Event::message(m).sse().clone()), last_seq);
                    }
                    if !full {
                        return;
                    }
                }
                Err(refusal) => {
                    yield (data(error(refusal.code, &refusal.message)), last_seq);
                    return;
                }
            }
        }
    }
}

/// What a session stream that reconnects with `last` sends before its queue:
/// what followed that frame, from memory; or, when the client is older than
/// the memory, every room it was sent messages of, caught up from storage,
/// then the remembered frames. Frames read from storage join the memory, so
/// the next reconnect finds its place among them.
async fn catch_up(hub: &Hub, memory: &mut Memory, last: &str) -> Vec<Wire> {
    let (reads, named) = match memory.resume(last) {
        Resume::Remembered(wires) => return wires,
        Resume::Storage { reads, named } => (reads, named),
    };
    let mut replayed = Vec::new();
    let mut failures = Vec::new();
    for (room, after, up_to) in reads {
        match hub.missed(&room, after, up_to).await {
            Ok(events) => replayed.extend(events),
            Err(refusal) => failures.push(Wire {
                id: None,
                frame: error(
                    refusal.code,
                    &format!("#{room} could not be caught up: {}", refusal.message),
                ),
            }),
        }
    }
    let remembered = memory.remembered(named.as_ref());
    let mut wires = failures;
    wires.extend(memory.record_replayed(&replayed));
    wires.extend(remembered);
    wires
}

/// Cuts the connection shortly, for a reader that may never take its last frame.
pub(super) fn cut_soon(connection: &CancellationToken) {
    let connection = connection.clone();
    tokio::spawn(async move {
        tokio::time::sleep(PARTING).await;
        connection.cancel();
    });
}

/// Why a session stream must stop, other than its outbox closing: the core
/// ends the session (its reason: `Shutdown` when the daemon stops, since
/// stopping ends every session), or a newer stream takes the session over
/// (`None`).
///
/// One wait covers both: the session's generation changes when a stream
/// attaches, and again once the session has ended (its reason is set
/// first). Waiting on the end and on the daemon's shutdown as well cost a
/// tenth of an SSE delivery, polled on every wake-up, and told nothing more.
async fn stopped(
    ended: &watch::Receiver<Option<EndReason>>,
    generation: &mut watch::Receiver<u64>,
    session: &HttpSession,
) -> Option<EndReason> {
    let _ = generation.changed().await;
    if session.has_ended() {
        *ended.borrow()
    } else {
        None
    }
}

pin_project_lite::pin_project! {
    /// What a stream waits for besides its events: its end, and the next
    /// ping. Ready with `Some` of the end's output, or with `None` when a ping
    /// is due (the timer is then set for the next one).
    struct Pinging<E> {
        #[pin]
        end: E,
        #[pin]
        ping: tokio::time::Sleep,
        every: Duration,
    }
}

impl<E: Future> Future for Pinging<E> {
    type Output = Option<E::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(end) = this.end.poll(cx) {
            return Poll::Ready(Some(end));
        }
        if this.ping.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.ping
            .as_mut()
            .reset(tokio::time::Instant::now() + *this.every);
        // tokio keeps a reset timer's last waker, which is this future's;
        // polled once more all the same, so the next ping does not rest on it.
        let _ = this.ping.as_mut().poll(cx);
        Poll::Ready(None)
    }
}

/// A stream's end and its pings (one every `every`) in one wait, polled
/// only when one of them fires, not on every wake-up of the stream (see
/// [`OnWake`]).
fn idle<E>(end: E, every: Duration) -> OnWake<Pinging<E>> {
    OnWake::new(Pinging {
        end,
        ping: tokio::time::sleep(every),
        every,
    })
}

/// Appends what the stream writes for `event`, if anything: its id line,
/// then its frame.
fn push(batch: &mut BytesMut, memory: &mut Memory, event: &Event) {
    if let Some(wire) = memory.record(event) {
        if let Some(id) = wire.id {
            batch.extend_from_slice(&id);
        }
        batch.extend_from_slice(&wire.frame);
    }
}

/// A session's stream: first what it missed since `last_event_id`, then its
/// queue, live, until the session ends, another stream takes over or the
/// daemon stops.
pub fn session_stream(
    ctx: StreamContext,
    mut attached: Attached,
    last_event_id: Option<String>,
) -> impl Stream<Item = Chunk> {
    async_stream::stream! {
        let _open = Open::new(&ctx.open);
        yield data(RETRY);
        // The rooms the session left and has nothing remembered of are forgotten.
        attached.feed.memory.retain_rooms(&ctx.hub.rooms_of(attached.session.id));
        if let Some(last) = last_event_id {
            // Boxed: a resume's storage reads would otherwise size the
            // state of every stream, for its whole life.
            let wires = Box::pin(catch_up(&ctx.hub, &mut attached.feed.memory, &last)).await;
            for wire in wires {
                if let Some(id) = wire.id {
                    yield data(id);
                }
                yield data(wire.frame);
            }
        }
        // Made once, not on every event: the wait registers with its signal,
        // and doing that per event was a tenth of a delivery.
        let ended = attached.ended.clone();
        let mut generation = attached.generation.clone();
        let idle = idle(stopped(&ended, &mut generation, &attached.session), ctx.ping);
        futures::pin_mut!(idle);
        let reason = loop {
            tokio::select! {
                biased;
                next = &mut idle => match next {
                    Some(reason) => break reason,
                    None => yield data(PING),
                },
                event = attached.feed.events.recv() => match event {
                    Some(event) => {
                        // Whatever else is queued goes in the same frame: one
                        // wake-up and one write for all of it.
                        let mut batch = BytesMut::new();
                        push(&mut batch, &mut attached.feed.memory, &event);
                        while batch.len() < BATCH {
                            match attached.feed.events.try_recv() {
                                Ok(event) => push(&mut batch, &mut attached.feed.memory, &event),
                                Err(_) => break,
                            }
                        }
                        if !batch.is_empty() {
                            yield data(batch.freeze());
                        }
                        if attached.feed.memory.crowded() {
                            let rooms = ctx.hub.rooms_of(attached.session.id);
                            attached.feed.memory.retain_rooms(&rooms);
                        }
                    }
                    None => {
                        // The core dropped the outbox: the session ended; learn why.
                        let mut ended = attached.ended.clone();
                        // Boxed: the stream's state keeps no room for it.
                        let reason = Box::pin(tokio::time::timeout(
                            Duration::from_secs(1),
                            ended.wait_for(Option::is_some),
                        ))
                        .await;
                        break match reason {
                            Ok(Ok(reason)) => *reason,
                            _ => Some(EndReason::Quit),
                        };
                    }
                },
            }
        };
        match reason {
            Some(EndReason::SlowConsumer) => {
                cut_soon(&ctx.connection);
                yield data(error(
                    ErrorCode::SlowConsumer,
                    "you were not reading fast enough; the session has ended",
                ));
            }
            Some(EndReason::Shutdown) => {
                yield data(error(ErrorCode::Unavailable, "the server is shutting down"));
            }
            _ => {}
        }
    }
}

/// A room's read-only stream: its last messages (or, resuming after `after`,
/// every message since), then its `message`, `join` and `leave` events live.
pub fn room_stream(
    ctx: StreamContext,
    room: RoomName,
    watch: RoomWatch,
    after: Option<u64>,
) -> impl Stream<Item = Chunk> {
    let RoomWatch {
        recent,
        mut events,
        slow,
    } = watch;
    // A reader that stopped reading leaves this stream unpolled (its socket
    // is full), so the hub's dropping it must cut the connection from outside.
    let connection = ctx.connection.clone();
    tokio::spawn(async move {
        if slow.await.is_ok() {
            cut_soon(&connection);
        }
    });
    async_stream::stream! {
        let _open = Open::new(&ctx.open);
        yield data(RETRY);
        // The highest seq sent; live copies at or below it are duplicates.
        let mut last_seq = 0;
        match after {
            None => {
                for m in recent {
                    last_seq = m.seq;
                    yield data(Event::message(m).sse().clone());
                }
            }
            Some(after) if after >= recent.last().map_or(0, |m| m.seq) => {
                // Nothing missed. Either this instance lags behind the one
                // the client came from (the cursor is a real seq: skip live
                // copies up to it), or the cursor is above anything the room
                // reached (a wiped database or garbage): live messages flow
                // at once, never muted.
                let delivered = recent.last().map_or(0, |m| m.seq);
                last_seq = if after > delivered && after <= ctx.hub.known_top(&room).await {
                    after
                } else {
                    delivered
                };
            }
            Some(after) => {
                last_seq = after;
                let replayed = replay(ctx.hub.clone(), room.clone(), after);
                futures::pin_mut!(replayed);
                while let Some((frame, seq)) = replayed.next().await {
                    last_seq = seq;
                    yield frame;
                }
            }
        }
        let idle = idle(ctx.shutdown.cancelled(), ctx.ping);
        futures::pin_mut!(idle);
        loop {
            tokio::select! {
                biased;
                next = &mut idle => match next {
                    Some(()) => {
                        yield data(error(ErrorCode::Unavailable, "the server is shutting down"));
                        break;
                    }
                    None => yield data(PING),
                },
                event = events.recv() => match event {
                    Some(event) => {
                        if let EventBody::Message(m) = event.body() {
                            if m.seq <= last_seq {
                                continue;
                            }
                            if last_seq > 0 && m.seq > last_seq + 1 {
                                yield data(gap(&room, last_seq + 1, m.seq - 1));
                            }
                            last_seq = m.seq;
                        }
                        yield data(event.sse().clone());
                    }
                    None => {
                        // The hub dropped this watcher: it fell a whole queue behind.
                        cut_soon(&ctx.connection);
                        yield data(error(
                            ErrorCode::SlowConsumer,
                            "you were not reading fast enough; disconnected",
                        ));
                        break;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_parse() {
        let (room, seq) = parse_room_id("general:42").unwrap();
        assert_eq!((room.as_str(), seq), ("general", 42));
        assert!(parse_room_id("e12").is_none());
        assert!(parse_room_id("general:x").is_none());
        assert!(parse_room_id("Bad Room:1").is_none());
    }

    #[test]
    fn gap_frame_carries_the_inclusive_range() {
        let room = RoomName::parse("general").unwrap();
        let frame = gap(&room, 3, 9);
        let text = std::str::from_utf8(&frame).unwrap();
        assert!(
            text.starts_with("event: gap\ndata: {\"type\":\"gap\""),
            "{text}"
        );
        assert!(text.contains("\"from_seq\":3,\"to_seq\":9"), "{text}");
    }
}
