//! The line-based TCP adapter: `nc localhost 9001`.
//!
//! Each connection is one task with two halves. The reader frames lines (at
//! most `--max-line` bytes), parses them and hands commands to the [`Hub`],
//! one at a time. The writer drains the session's bounded outbox, rendering
//! each event as text or JSON, and writes everything that is waiting in one
//! buffer per write; it runs beside the reader (also while a command is
//! handled) only while it has something to do, and is otherwise parked as
//! plain state (see [`Writer`]). The hub never waits for either: when the
//! outbox is full it ends the session as a slow consumer, and the writer
//! says so before closing.
//!
//! Most events skip the outbox and the writer: while nothing of the
//! connection's is queued, the hub only notes the event on the connection
//! and marks it dirty, and a flusher task writes every dirty connection once
//! per scheduler turn (a non-blocking `send` each, see [`Socket`]). A client
//! that keeps up costs no task wake-up of its own, and when the server is
//! busy the events of one turn share a write. Only when the socket is full,
//! or something is already queued, does an event go to the outbox, and the
//! writer keeps the order until it has written everything waiting.
//!
//! A client that sends faster than it reads its answers is paced, not dropped:
//! while its outbox is over half full the reader takes no more lines (TCP
//! back-pressure: the client's sends block once the socket buffers fill), and
//! resumes as the writer drains it. Only events the client did not ask for
//! (room traffic) can then fill the rest, so only a client that does not read
//! at all becomes a slow consumer. `rate-limited` errors are coalesced to one
//! a second (see [`super::coalesce`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::task::AtomicWaker;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::coalesce::RateNotices;
use super::lines::{Frame, LineCodec};
use super::peers::{PeerPermit, Peers};
use crate::core::outbox::{self, TryRecvError, TrySendError};
use crate::core::{
    Backlog, Command, Direct, EndReason, ErrorCode, Event, EventBody, Format, Hub, Refusal,
    Replies, Reply, SessionHandle, SessionId,
};

/// Most bytes gathered into one write.
const WRITE_BUFFER: usize = 64 * 1024;
/// Room made in the read buffer for each read.
const READ_BUFFER: usize = 512;
/// How long a parting message may take to write before the socket is dropped.
const PARTING: Duration = Duration::from_secs(2);

/// What the TCP adapter needs besides the hub.
#[derive(Clone)]
pub struct TcpAdapter {
    /// The chat core.
    pub hub: Hub,
    /// Longest line in bytes.
    pub max_line: usize,
    /// Shared with the HTTP adapter: one permit per open connection.
    pub connections: Arc<Semaphore>,
    /// Shared with the HTTP adapter: connections per client address.
    pub peers: Arc<Peers>,
    /// Fires when the daemon stops.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks so shutdown can wait for them.
    pub tracker: TaskTracker,
}

impl TcpAdapter {
    /// Accepts connections until shutdown.
    pub async fn serve(self, listener: TcpListener) {
        // One flusher per core; each connection keeps to one of them.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let flushers: Arc<[Arc<Flusher>]> = (0..cores)
            .map(|_| {
                let flusher = Arc::new(Flusher::default());
                tokio::spawn(flusher.clone().run(self.shutdown.clone()));
                flusher
            })
            .collect();
        let mut accepted_count = 0usize;
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // Connections take turns on the flushers.
                    accepted_count = accepted_count.wrapping_add(1);
                    let flusher = flushers[accepted_count % flushers.len()].clone();
                    // With RUST_LOG=debug every line logged during the
                    // connection's life names it. Not at the default level:
                    // an enabled span keeps its fields for the connection's
                    // life, 0.46 KiB of an idle connection's 2.85. The
                    // connection's own lines say who it is instead.
                    let span = tracing::debug_span!(
                        "tcp",
                        %peer,
                        session = tracing::field::Empty
                    );
                    match self.admit(peer) {
                        // Instrumented only when the span is on: a span
                        // takes 40 bytes in every connection's task even
                        // when it is off.
                        Ok(admitted) if span.is_disabled() => self
                            .tracker
                            .spawn(self.connection(stream, peer, flusher, admitted)),
                        Ok(admitted) => self.tracker.spawn(
                            self.connection(stream, peer, flusher, admitted)
                                .instrument(span),
                        ),
                        // A task of its own: the connection's task then
                        // keeps no room for a refusal it never writes.
                        Err(refusal) => self.tracker.spawn(part(stream, refusal)),
                    };
                }
                Err(err) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::error!(cause = %err, "failed to accept a TCP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Whether a connection from `peer` may open: its permits, or the
    /// refusal to write to it.
    fn admit(&self, peer: SocketAddr) -> Result<Admitted, Bytes> {
        let refusal = |message: String| {
            Bytes::copy_from_slice(Event::error(ErrorCode::Unavailable, message).text())
        };
        let Some(address) = self.peers.admit(peer.ip()) else {
            let most = self.peers.limits().max_conns;
            return Err(refusal(format!(
                "too many connections from your address (at most {most}); close some first"
            )));
        };
        // Only a connection its address may open counts against the server:
        // one address at its limit must not fill the server for the others.
        let Ok(server) = self.connections.clone().try_acquire_owned() else {
            return Err(refusal("the server is full; try again later".to_owned()));
        };
        Ok(Admitted {
            _address: address,
            _server: server,
        })
    }

    /// One admitted connection's task. It takes only the parts of the
    /// adapter it uses, set up before it starts: what a task captures is
    /// kept for the connection's life (also once moved out of, so nothing
    /// is), and an idle connection's task is most of what it costs.
    // Not an `async fn`: its arguments would be kept twice in the task.
    #[allow(clippy::manual_async_fn)]
    fn connection(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        flusher: Arc<Flusher>,
        admitted: Admitted,
    ) -> impl Future<Output = ()> + Send + use<> {
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let mut lines = LineReader::new(read, self.max_line);
        let socket = Socket::new(write, flusher);
        let hub = self.hub.clone();
        let max_line = self.max_line;
        let shutdown = self.shutdown.clone();
        async move {
            // Held, never moved: released when the task ends.
            let _admitted = &admitted;
            // Boxed, as every command below: the task of an idle connection is
            // then no larger than the state it keeps while it waits.
            let Some(Opened {
                id,
                events,
                ended,
                backlog,
            }) = Box::pin(open_session(&hub, &socket, peer)).await
            else {
                return;
            };
            let (done_tx, done_rx) = oneshot::channel();
            let drained = Arc::new(AtomicWaker::new());
            hub.attach(id, socket.clone());
            // The welcome is queued: the writer starts at once.
            let mut writer = Writer::new(
                WriterState {
                    socket,
                    events,
                    ended,
                    reader_done: done_rx,
                    notices: RateNotices::default(),
                },
                drained.clone(),
            );
            let pace = Pace {
                backlog,
                drained,
                high: hub.limits().queue / 2,
            };
            let reason = loop {
                let frame = tokio::select! {
                    frame = async {
                        pace.wait().await;
                        lines.next().await
                    } => frame,
                    // The core ended the session (slow consumer, or the daemon
                    // stops: the hub ends every session): stop reading too.
                    stop = writer.stopped() => break stop.describe(),
                };
                // Decided before any wait: the line, and what it parsed to,
                // are not kept in the task while the command runs.
                let command = match read_command(&hub, frame, max_line) {
                    Read::Command(command) => command,
                    Read::Nothing => continue,
                    Read::Refused(refusal) => {
                        hub.refuse(id, refusal);
                        continue;
                    }
                    Read::End(reason) => break reason,
                };
                // After a `/quit` the hub queues a goodbye, then ends the session.
                let quit = matches!(command, Command::Quit);
                writer.beside(Box::pin(hub.handle(id, command))).await;
                if quit {
                    break "quit";
                }
            };
            if !shutdown.is_cancelled() {
                let _ = done_tx.send(());
                hub.disconnect(id, EndReason::Quit);
            }
            writer.finish().await;
            tracing::info!(%peer, session = %id, reason, "disconnected");
        }
    }
}

/// What a connection's session is made of, once the core has let it in.
struct Opened {
    id: SessionId,
    events: outbox::Receiver,
    ended: oneshot::Receiver<EndReason>,
    backlog: Backlog,
}

/// Opens the connection's session (it gets a guest nick), or writes the
/// core's refusal to it.
async fn open_session(hub: &Hub, socket: &Socket, peer: SocketAddr) -> Option<Opened> {
    let session = match hub.connect(None, Replies::Outbox, None).await {
        Ok(session) => session,
        Err(refusal) => {
            let event = Event::error(refusal.code, refusal.message);
            socket.part(event.text()).await;
            return None;
        }
    };
    let id = session.id;
    tracing::Span::current().record("session", tracing::field::display(id));
    tracing::info!(%peer, session = %id, nick = %session.nick, "connected");
    let SessionHandle {
        events,
        ended,
        backlog,
        ..
    } = session;
    Some(Opened {
        id,
        events,
        ended,
        backlog,
    })
}

/// What a frame read from the client asks for.
enum Read {
    Command(Command),
    /// A blank line.
    Nothing,
    /// A line that is refused, and why.
    Refused(Refusal),
    /// The connection is done reading, and why (for the log).
    End(&'static str),
}

fn read_command(hub: &Hub, frame: Option<io::Result<Frame>>, max_line: usize) -> Read {
    match frame {
        None => Read::End("closed by the client"),
        Some(Err(_)) => Read::End("read error"),
        Some(Ok(Frame::Line(line))) => match hub.parse(&line) {
            Ok(None) => Read::Nothing,
            Ok(Some(command)) => Read::Command(command),
            Err(refusal) => Read::Refused(refusal),
        },
        Some(Ok(Frame::TooLong)) => Read::Refused(Refusal::new(
            ErrorCode::TooLong,
            format!("lines are at most {max_line} bytes; this one was discarded"),
        )),
        Some(Ok(Frame::InvalidUtf8)) => Read::Refused(Refusal::new(
            ErrorCode::InvalidUtf8,
            "that line was not valid UTF-8; it was discarded",
        )),
    }
}

/// Frames lines (at most `--max-line` bytes) from the socket, with a buffer
/// that exists only while input is waiting: an idle connection holds none.
/// Most lines are short, so each read makes room for a few hundred bytes; a
/// long line grows the buffer up to `--max-line`.
struct LineReader {
    half: OwnedReadHalf,
    codec: LineCodec,
    buf: BytesMut,
    eof: bool,
}

impl LineReader {
    fn new(half: OwnedReadHalf, max_line: usize) -> Self {
        LineReader {
            half,
            codec: LineCodec::new(max_line),
            buf: BytesMut::new(),
            eof: false,
        }
    }

    /// The next line, or `None` at the end of input.
    async fn next(&mut self) -> Option<io::Result<Frame>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`LineReader::next`], by hand: waiting with `poll_read_ready` keeps
    /// the waker in the socket's own reader slot, where `readable()` would
    /// put a waiter node of about 200 bytes in the connection's task, for
    /// every idle connection's whole life.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame>>> {
        loop {
            let frame = if self.eof {
                self.codec.decode_eof(&mut self.buf)
            } else {
                self.codec.decode(&mut self.buf)
            };
            match frame {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) if self.eof => return Poll::Ready(None),
                Ok(None) => {}
                Err(err) => return Poll::Ready(Some(Err(err))),
            }
            if self.buf.is_empty() {
                // Everything read is handled: give the memory back.
                self.buf = BytesMut::new();
            }
            let half: &TcpStream = self.half.as_ref();
            if let Err(err) = std::task::ready!(half.poll_read_ready(cx)) {
                return Poll::Ready(Some(Err(err)));
            }
            self.buf.reserve(READ_BUFFER);
            match self.half.try_read_buf(&mut self.buf) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                // Readiness is cleared: the next poll waits for more.
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Poll::Ready(Some(Err(err))),
            }
        }
    }
}

/// Back-pressure for one connection's reader.
struct Pace {
    backlog: Backlog,
    /// Signalled by the writer each time it has taken events off the outbox.
    drained: Arc<AtomicWaker>,
    /// Above this many queued events the reader takes no more lines.
    high: usize,
}

impl Pace {
    /// Returns once the outbox is at most half full, or the session has ended.
    /// Half a queue is room for any command's answer (`/history` is at most
    /// 100 events) except a resuming `/join ROOM SEQ`, which the core trims to
    /// the room left, with a `gap`.
    ///
    /// Polled by hand: a `Notified` would be kept in every idle connection's
    /// task, and this wait is almost never taken.
    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if !self.is_behind() {
                return Poll::Ready(());
            }
            // Registered before looking again, so a drain between the two
            // looks is not missed.
            self.drained.register(cx.waker());
            if self.is_behind() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    fn is_behind(&self) -> bool {
        self.backlog
            .queued()
            .is_some_and(|queued| queued > self.high)
    }
}

/// Why the writer stops.
#[derive(Clone, Copy)]
enum Stop {
    /// The core ended the session.
    Ended(EndReason),
    /// The reader is gone (client closed, `/quit`), or the socket failed.
    Closed,
}

impl Stop {
    /// For the disconnect log line, when the writer stopped first.
    fn describe(&self) -> &'static str {
        match self {
            Stop::Ended(EndReason::SlowConsumer) => "slow consumer",
            Stop::Ended(EndReason::Shutdown) => "shutdown",
            Stop::Ended(_) => "ended",
            Stop::Closed => "write failed",
        }
    }
}

/// The socket's write half, shared by the flusher and the writer.
#[derive(Debug)]
struct Socket {
    half: OwnedWriteHalf,
    state: Mutex<Turn>,
    /// Wakes the writer to finish a flush the socket took only part of.
    tail_ready: Notify,
    /// Signalled whenever the writer takes the turn back from direct
    /// writes: a parked writer is started again (see [`Writer`]).
    wanted: Wanted,
    /// Writes what the hub hands over while the writer has nothing queued.
    flusher: Arc<Flusher>,
    /// This socket, for the flusher's list.
    me: Weak<Socket>,
}

/// Whose turn it is to write, and what waits.
#[derive(Debug)]
struct Turn {
    /// The writer has (or may have) something to write: every event goes to
    /// the outbox until the writer finds it empty, so none overtakes another.
    queued: bool,
    /// The connection's format, as the writer last left it.
    format: Format,
    /// Events handed over since the last flush, oldest first. Only added to
    /// while `queued` is false; the writer writes them first when it takes
    /// the turn.
    pending: Vec<Event>,
    /// What the socket did not take of a flush; written before anything else.
    tail: Bytes,
}

impl Socket {
    fn new(half: OwnedWriteHalf, flusher: Arc<Flusher>) -> Arc<Self> {
        Arc::new_cyclic(|me| Socket {
            half,
            // The welcome is queued before the connection is attached.
            state: Mutex::new(Turn {
                queued: true,
                format: Format::Text,
                pending: Vec::new(),
                tail: Bytes::new(),
            }),
            tail_ready: Notify::new(),
            wanted: Wanted::default(),
            flusher,
            me: me.clone(),
        })
    }

    fn turn(&self) -> MutexGuard<'_, Turn> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes what is pending, once, without waiting. What the socket does
    /// not take becomes the writer's to finish.
    fn flush(&self, buf: &mut BytesMut) {
        let mut turn = self.turn();
        if turn.queued || turn.pending.is_empty() {
            return; // the writer has taken the turn, and what was pending
        }
        buf.clear();
        let mut format = turn.format;
        for event in turn.pending.drain(..) {
            render(&event, &mut format, buf);
        }
        if turn.pending.capacity() > PENDING_KEPT {
            turn.pending = Vec::new();
        }
        // Full, or failed: the writer waits for room, or finds out.
        let written = self.half.try_write(buf).unwrap_or_default();
        if written < buf.len() {
            turn.tail = Bytes::copy_from_slice(&buf[written..]);
            turn.queued = true;
            self.tail_ready.notify_one();
            self.wanted.notify();
        }
    }

    /// The writer takes the turn from direct writes: the unwritten end of a
    /// flush, then what was pending for the next one, go into `buf` before
    /// anything queued after them.
    fn take_turn(&self, format: &mut Format, buf: &mut BytesMut) {
        let mut turn = self.turn();
        turn.queued = true;
        buf.put(std::mem::take(&mut turn.tail));
        for event in turn.pending.drain(..) {
            render(&event, format, buf);
        }
    }

    /// Writes a refusal to a connection the core did not let in, for at
    /// most [`PARTING`].
    async fn part(&self, refusal: &[u8]) {
        let mut buf = BytesMut::from(refusal);
        let _ = tokio::time::timeout(PARTING, self.write_all(&mut buf)).await;
    }

    /// Writes all of `buf`, waiting while the socket is full. What is written
    /// leaves `buf` at once, so if this is cancelled `buf` holds what is not.
    async fn write_all(&self, buf: &mut BytesMut) -> io::Result<()> {
        while !buf.is_empty() {
            self.half.writable().await?;
            match self.half.try_write(buf) {
                Ok(n) => buf.advance(n),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

impl Direct for Socket {
    fn deliver(&self, event: &Event, outbox: &outbox::Sender) -> Result<(), TrySendError<Event>> {
        let mut turn = self.turn();
        // Pending events are bounded like the outbox: a flusher that does not
        // get to run (a saturated server) must not let them grow past it.
        if !turn.queued && is_plain(event) && turn.pending.len() < outbox.max_capacity() {
            if turn.pending.is_empty()
                && let Some(me) = self.me.upgrade()
            {
                self.flusher.mark(me);
            }
            turn.pending.push(event.clone());
            return Ok(());
        }
        if !turn.queued {
            turn.queued = true;
            self.wanted.notify();
        }
        // Pushed under the lock: the writer cannot find the outbox empty and
        // hand the turn back between the check above and this push.
        outbox.try_send(event.clone())
    }
}

/// The writer's turn is wanted back: a permit, as `Notify::notify_one`
/// leaves one, that the parked writer takes. A flag and a waker, where a
/// `Notified` future would keep a waiter node in the connection's task.
#[derive(Debug, Default)]
struct Wanted {
    flag: AtomicBool,
    waker: AtomicWaker,
}

impl Wanted {
    fn notify(&self) {
        self.flag.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once notified since the last time it was.
    fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.flag.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        // Registered before looking again, so a notice between the two
        // looks is not missed.
        self.waker.register(cx.waker());
        if self.flag.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Pending events kept room for between flushes; more is released.
const PENDING_KEPT: usize = 8;

/// Writes every connection the hub handed events to, once per scheduler
/// turn: one wake-up for a whole fan-out instead of one per recipient, and,
/// when the server is busy, one write for all of a turn's events.
#[derive(Debug, Default)]
struct Flusher {
    dirty: Mutex<Vec<Arc<Socket>>>,
    wake: Notify,
}

impl Flusher {
    /// Queues `socket` for the next flush.
    fn mark(&self, socket: Arc<Socket>) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        dirty.push(socket);
        if dirty.len() == 1 {
            self.wake.notify_one();
        }
    }

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut buf = BytesMut::new();
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
            }
            // Let the tasks already woken run first (and the I/O driver be
            // polled): what they deliver shares this flush's writes. An idle
            // server loses nothing by it.
            tokio::task::yield_now().await;
            std::mem::swap(
                &mut batch,
                &mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()),
            );
            for socket in batch.drain(..) {
                socket.flush(&mut buf);
            }
            if buf.capacity() > WRITE_BUFFER {
                buf = BytesMut::new();
            }
        }
    }
}

/// Whether an event renders the same whoever writes it: a `/format` reply
/// switches the writer's format and a `rate-limited` refusal may be held back,
/// so those two always go through the writer.
fn is_plain(event: &Event) -> bool {
    !matches!(
        event.body(),
        EventBody::Reply(Reply::Format { .. })
            | EventBody::Error {
                code: ErrorCode::RateLimited,
                ..
            }
    )
}

/// The writer half: outbox to socket, batching whatever is queued.
///
/// With `may_park`, it parks once it has handed the turn back with nothing
/// due, returning its state; `early` is an end the connection saw while it
/// was parked.
///
/// Not an `async fn`: its arguments would be kept twice in the task.
#[allow(clippy::manual_async_fn)]
fn write_events(
    state: WriterState,
    drained: Arc<AtomicWaker>,
    early: Option<EndReason>,
    may_park: bool,
) -> impl Future<Output = Outcome> + Send + use<> {
    async move {
        let WriterState {
            socket,
            mut events,
            mut ended,
            mut reader_done,
            mut notices,
        } = state;
        let mut format = socket.turn().format;
        // Released whenever the writer hands the turn back, so an idle connection
        // holds no write buffer.
        let mut buf = BytesMut::new();
        // An event found while handing the turn back: it keeps the turn.
        let mut next = None;
        let stop = if let Some(reason) = early {
            Stop::Ended(reason)
        } else {
            loop {
                let first = match next.take() {
                    Some(event) => notices.filter(event, Instant::now()),
                    None => tokio::select! {
                        biased;
                        reason = &mut ended => break Stop::Ended(reason.unwrap_or(EndReason::Quit)),
                        _ = &mut reader_done => break Stop::Closed,
                        () = socket.tail_ready.notified() => None,
                        event = events.recv() => match event {
                            Some(event) => notices.filter(event, Instant::now()),
                            None => break Stop::Closed,
                        },
                        () = sleep_until(notices.due()) => notices.summary(Instant::now()),
                    },
                };
                // The writer takes the turn (a notice summary wakes it while it
                // has none).
                socket.take_turn(&mut format, &mut buf);
                if let Some(first) = first {
                    render(&first, &mut format, &mut buf);
                }
                while buf.len() < WRITE_BUFFER {
                    match events.try_recv() {
                        Ok(event) => {
                            if let Some(event) = notices.filter(event, Instant::now()) {
                                render(&event, &mut format, &mut buf);
                            }
                        }
                        Err(_) => break,
                    }
                }
                drained.wake();
                if !buf.is_empty() {
                    // A client that does not read blocks this write; the core then
                    // ends the session, which must interrupt it.
                    let written = tokio::select! {
                        written = socket.write_all(&mut buf) => written,
                        reason = &mut ended => break Stop::Ended(reason.unwrap_or(EndReason::Quit)),
                    };
                    if written.is_err() {
                        break Stop::Closed;
                    }
                    // What was taken before the write is on its way: let the reader go on.
                    drained.wake();
                }
                // Hand the turn back to direct writes once nothing is waiting. The
                // hub queues under the same lock, so nothing slips in between.
                let mut turn = socket.turn();
                if !turn.tail.is_empty() || !turn.pending.is_empty() {
                    continue;
                }
                match events.try_recv() {
                    Ok(event) => next = Some(event),
                    Err(TryRecvError::Empty) => {
                        turn.queued = false;
                        turn.format = format;
                        buf = BytesMut::new();
                        if may_park && notices.due().is_none() {
                            drop(turn);
                            return Outcome::Parked(WriterState {
                                socket,
                                events,
                                ended,
                                reader_done,
                                notices,
                            });
                        }
                    }
                    Err(TryRecvError::Disconnected) => break Stop::Closed,
                }
            }
        };
        // From here on only this task writes. A write cut short by the end
        // leaves the rest in `buf`; a flush the socket took only part of leaves
        // its end in `tail`, and events may be pending for the next flush (only
        // one of the three is ever non-empty).
        socket.take_turn(&mut format, &mut buf);
        // The reader may be waiting for room that will never come.
        drained.wake();
        let parting = match &stop {
            // Its socket is full: what is queued would never get through.
            Stop::Ended(EndReason::SlowConsumer) => {
                buf.clear();
                Some(Event::error(
                    ErrorCode::SlowConsumer,
                    "you were not reading fast enough; disconnected",
                ))
            }
            Stop::Ended(EndReason::Shutdown) => {
                drain(&mut events, &mut notices, &mut format, &mut buf);
                Some(Event::error(
                    ErrorCode::Unavailable,
                    "the server is shutting down",
                ))
            }
            Stop::Ended(_) | Stop::Closed => {
                drain(&mut events, &mut notices, &mut format, &mut buf);
                None
            }
        };
        if let Some(event) = parting {
            render(&event, &mut format, &mut buf);
        }
        // The parting writes are boxed: the writer's task keeps no room for
        // them while it waits.
        if !buf.is_empty() {
            let _ = Box::pin(tokio::time::timeout(PARTING, socket.write_all(&mut buf))).await;
        }
        // The hub has usually let go of the socket by now; if not, it is shut
        // down when the hub does.
        if let Ok(mut socket) = Arc::try_unwrap(socket) {
            let _ = Box::pin(tokio::time::timeout(PARTING, socket.half.shutdown())).await;
        }
        Outcome::Stopped(stop)
    }
}

/// What the writer keeps between its runs.
struct WriterState {
    socket: Arc<Socket>,
    events: outbox::Receiver,
    ended: oneshot::Receiver<EndReason>,
    reader_done: oneshot::Receiver<()>,
    /// Held-back `rate-limited` refusals: their once-a-second pace holds
    /// across runs.
    notices: RateNotices,
}

/// How a run of the writer ends.
enum Outcome {
    /// Nothing to write: started again when something is.
    Parked(WriterState),
    /// For good.
    Stopped(Stop),
}

/// A connection's writer, run by its connection task beside the reader: a
/// boxed future while it has something to write (or a held-back notice
/// due), and only its state, parked here, while the client keeps up. Most
/// connections are idle most of the time, and an idle one then holds no
/// writer task and no writer future. (A task of its own, started and
/// parked again and again, would also cost more: task memory is aligned to
/// a cache line, and the allocator does not reuse such blocks well.)
///
/// A parked writer is started again when the hub or the flusher takes the
/// turn from direct writes (`Socket::wanted`), when the core ends the
/// session, and when the reader is done. The turn keeps the order as
/// before: whatever arrives while it starts waits in the outbox, or in the
/// socket's tail, for it.
struct Writer {
    running: Option<std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>>>,
    parked: Option<WriterState>,
    drained: Arc<AtomicWaker>,
    /// Why it stopped for good, once it has.
    stopped: Option<Stop>,
}

impl Writer {
    /// Starts the writer: something is queued (the welcome).
    fn new(state: WriterState, drained: Arc<AtomicWaker>) -> Self {
        let mut writer = Writer {
            running: None,
            parked: Some(state),
            drained,
            stopped: None,
        };
        writer.start(None, true);
        writer
    }

    fn start(&mut self, early: Option<EndReason>, may_park: bool) {
        if let Some(state) = self.parked.take() {
            self.running = Some(Box::pin(write_events(
                state,
                self.drained.clone(),
                early,
                may_park,
            )));
        }
    }

    /// Resolves once the writer has stopped for good (the session ended, or
    /// the socket failed), starting it whenever it is wanted meanwhile.
    /// Cancel-safe: dropped and called again, it picks up where it was.
    async fn stopped(&mut self) -> Stop {
        enum Next {
            Ran(Option<Outcome>),
            Wanted,
            Ended(EndReason),
        }
        loop {
            if let Some(stop) = self.stopped {
                return stop;
            }
            let next = match (&mut self.running, &mut self.parked) {
                (Some(running), _) => Next::Ran(Some(running.await)),
                // Polled by hand, as the reader's waits: a `select!` over a
                // `Notified` kept about 80 bytes more in every idle
                // connection's task.
                (None, Some(state)) => {
                    std::future::poll_fn(|cx| {
                        if let Poll::Ready(reason) = Pin::new(&mut state.ended).poll(cx) {
                            return Poll::Ready(Next::Ended(reason.unwrap_or(EndReason::Quit)));
                        }
                        state.socket.wanted.poll(cx).map(|()| Next::Wanted)
                    })
                    .await
                }
                (None, None) => Next::Ran(None),
            };
            match next {
                Next::Ran(outcome) => self.ran(outcome),
                Next::Wanted => self.start(None, true),
                Next::Ended(reason) => self.start(Some(reason), false),
            }
        }
    }

    /// Runs `work` (a command) while keeping the writer going, as a writer
    /// task of its own would be.
    async fn beside<F: Future + Unpin>(&mut self, mut work: F) -> F::Output {
        tokio::select! {
            biased;
            output = &mut work => return output,
            // Stopped for good: finish the command; the reader sees it next.
            _ = self.stopped() => {}
        }
        work.await
    }

    /// Takes in how a run ended.
    fn ran(&mut self, outcome: Option<Outcome>) {
        self.running = None;
        match outcome {
            Some(Outcome::Parked(state)) => self.parked = Some(state),
            Some(Outcome::Stopped(stop)) => self.stopped = Some(stop),
            None => self.stopped = Some(Stop::Closed),
        }
    }

    /// The reader is done (or the daemon stops): lets the writer write what
    /// is left and close (it parks no more), and waits for it.
    async fn finish(&mut self) {
        while self.stopped.is_none() {
            match &mut self.running {
                Some(running) => {
                    let outcome = running.await;
                    self.ran(Some(outcome));
                }
                None if self.parked.is_some() => self.start(None, false),
                None => self.stopped = Some(Stop::Closed),
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one. The timer is boxed, and
/// made only while a notice is due, so the writer's task does not carry one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => Box::pin(tokio::time::sleep_until(deadline)).await,
        None => std::future::pending().await,
    }
}

/// Writes a refusal to a connection that was not let in, for at most
/// [`PARTING`], and closes it.
async fn part(mut stream: TcpStream, refusal: Bytes) {
    let _ = tokio::time::timeout(PARTING, stream.write_all(&refusal)).await;
}

/// What lets a connection in: a place among its address's connections, and
/// among the server's. Held for the connection's life.
struct Admitted {
    _address: PeerPermit,
    _server: OwnedSemaphorePermit,
}

/// Renders everything still queued, ending with any held-back refusals.
fn drain(
    events: &mut outbox::Receiver,
    notices: &mut RateNotices,
    format: &mut Format,
    buf: &mut BytesMut,
) {
    let now = Instant::now();
    while let Ok(event) = events.try_recv() {
        if let Some(event) = notices.filter(event, now) {
            render(&event, format, buf);
        }
    }
    if let Some(summary) = notices.summary(now) {
        render(&summary, format, buf);
    }
}

/// Appends one event in the connection's format. A `/format` reply switches the
/// format first, so it is rendered in the format it announces.
fn render(event: &Event, format: &mut Format, buf: &mut BytesMut) {
    if let EventBody::Reply(Reply::Format { format: new }) = event.body() {
        *format = *new;
    }
    match format {
        Format::Text => buf.put_slice(event.text()),
        Format::Json => {
            buf.put_slice(event.json());
            buf.put_u8(b'\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A writer over one end of a loopback connection; the other end, and
    /// the hub's side of the session (its outbox and end signal).
    /// Waits until the writer has found its outbox empty and handed the
    /// turn back.
    async fn writer_gives_the_turn_back(socket: &Socket) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while socket.turn().queued {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
    }

    async fn wired(
        rcvbuf: Option<u32>,
    ) -> (
        Arc<Socket>,
        outbox::Sender,
        oneshot::Sender<EndReason>,
        tokio::task::JoinHandle<Stop>,
        TcpStream,
    ) {
        let (socket, outbox, end, mut writer, client) = wired_writer(rcvbuf).await;
        // Driven as the connection task drives it.
        let writer = tokio::spawn(async move { writer.stopped().await });
        (socket, outbox, end, writer, client)
    }

    /// As [`wired`], with the writer left for the test to drive.
    async fn wired_writer(
        rcvbuf: Option<u32>,
    ) -> (
        Arc<Socket>,
        outbox::Sender,
        oneshot::Sender<EndReason>,
        Writer,
        TcpStream,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = rcvbuf {
            client.set_recv_buffer_size(size).unwrap();
        }
        let (client, accepted) = tokio::join!(
            client.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (_read, write) = accepted.unwrap().0.into_split();
        // Not run: the tests flush by hand, when they choose.
        let socket = Socket::new(write, Arc::new(Flusher::default()));
        let (outbox, events) = outbox::channel(1024);
        // As the hub queues a welcome.
        outbox.try_send(numbered(0, 0)).unwrap();
        let (end, ended) = oneshot::channel();
        let (_done, reader_done) = oneshot::channel();
        std::mem::forget(_done);
        let writer = Writer::new(
            WriterState {
                socket: socket.clone(),
                events,
                ended,
                reader_done,
                notices: RateNotices::default(),
            },
            Arc::new(AtomicWaker::new()),
        );
        (socket, outbox, end, writer, client.unwrap())
    }

    fn numbered(n: usize, pad: usize) -> Event {
        Event::error(ErrorCode::Unavailable, format!("{n} {}", "x".repeat(pad)))
    }

    /// The numbers of the `numbered` events in what the client read.
    fn numbers(text: &str) -> Vec<usize> {
        text.lines()
            .filter_map(|l| l.split_whitespace().find_map(|w| w.parse().ok()))
            .collect()
    }

    async fn read_all(mut client: TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out))
            .await
            .expect("the writer closes")
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Delivers a `/format` reply, which takes the writer's way (and the
    /// turn), then 3, which must queue behind it.
    fn deliver_a_format_reply_then_3(socket: &Socket, outbox: &outbox::Sender) {
        let reply = Event::new(EventBody::Reply(Reply::Format {
            format: Format::Text,
        }));
        socket.deliver(&reply, outbox).unwrap();
        socket.deliver(&numbered(3, 0), outbox).unwrap();
    }

    /// Once the writer has handed the turn back, delivers 4 by a flush, then
    /// ends the session and lets the socket go.
    async fn deliver_4_by_a_flush_then_end(
        socket: Arc<Socket>,
        outbox: outbox::Sender,
        end: oneshot::Sender<EndReason>,
    ) {
        writer_gives_the_turn_back(&socket).await;
        socket.deliver(&numbered(4, 0), &outbox).unwrap();
        socket.flush(&mut BytesMut::new());
        end.send(EndReason::Quit).unwrap();
        drop(outbox);
        // The flusher (not running) still lists it.
        socket.flusher.dirty.lock().unwrap().clear();
    }

    #[tokio::test]
    async fn pending_events_go_before_what_is_queued_after_them() {
        let (socket, outbox, end, writer, client) = wired(None).await;
        // The writer has the turn at first: let it write the welcome, find
        // the outbox empty and hand the turn back.
        writer_gives_the_turn_back(&socket).await;
        // 1 and 2 wait for a flush; a format reply takes the writer's way
        // and gives it the turn; 3 must queue behind it.
        socket.deliver(&numbered(1, 0), &outbox).unwrap();
        socket.deliver(&numbered(2, 0), &outbox).unwrap();
        assert_eq!(socket.turn().pending.len(), 2);
        deliver_a_format_reply_then_3(&socket, &outbox);
        // Once the writer hands the turn back, 4 waits for a flush again.
        deliver_4_by_a_flush_then_end(socket, outbox, end).await;
        writer.await.unwrap();
        let text = read_all(client).await;
        assert_eq!(numbers(&text), [0, 1, 2, 3, 4], "{text}");
        assert!(text.contains("format is now text"), "{text}");
    }

    #[tokio::test]
    async fn a_flush_the_socket_cannot_take_is_finished_in_order() {
        // A small receive window that is not read until the end.
        let (socket, outbox, end, writer, client) = wired(Some(4096)).await;
        writer_gives_the_turn_back(&socket).await;
        let mut n = 0;
        // Flush until the socket refuses part of one; then keep delivering.
        while !socket.turn().queued {
            for _ in 0..10 {
                n += 1;
                socket.deliver(&numbered(n, 1_000), &outbox).unwrap();
            }
            socket.flush(&mut BytesMut::new());
            assert!(n < 1_000_000, "the socket never filled");
        }
        for _ in 0..100 {
            n += 1;
            socket.deliver(&numbered(n, 1_000), &outbox).unwrap();
        }
        drop(outbox);
        let reading = tokio::spawn(read_all(client));
        // The writer gets the rest through once the client reads, and stops
        // when the outbox closes.
        assert!(matches!(writer.await.unwrap(), Stop::Closed));
        drop(end);
        socket.flusher.dirty.lock().unwrap().clear();
        drop(socket);
        let text = reading.await.unwrap();
        assert_eq!(numbers(&text), (0..=n).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_reader_held_back_goes_on_once_the_writer_has_drained_the_backlog() {
        let (_socket, outbox, _end, mut writer, _client) = wired_writer(None).await;
        for n in 1..=10 {
            outbox.try_send(numbered(n, 0)).unwrap();
        }
        let pace = Pace {
            backlog: Backlog::of(&outbox),
            drained: writer.drained.clone(),
            high: 4,
        };
        // One task drives both, the reader's wait first, as a connection's
        // does: the writer drains the outbox in one go and waits for more,
        // and only its signal can wake the waiting reader.
        // (The deadline goes first: a timer that wakes the task must not
        // let the reader's wait find the drain by chance.)
        let paced = tokio::select! {
            biased;
            () = tokio::time::sleep(Duration::from_secs(5)) => false,
            () = pace.wait() => true,
            _ = writer.stopped() => false,
        };
        assert!(paced, "the reader was left waiting");
        assert_eq!(Backlog::of(&outbox).queued(), Some(0));
    }

    /// As `Notify::notify_one` without a waiter: one permit, however many
    /// notices, taken by the next poll; a parked writer is woken by it.
    #[test]
    fn a_wanted_notice_is_one_permit_and_wakes_the_parked_writer() {
        struct Wakes(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Wakes {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let wakes = Arc::new(Wakes(Default::default()));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let wanted = Wanted::default();
        assert!(wanted.poll(&mut cx).is_pending());
        wanted.notify();
        wanted.notify();
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "the parked poll is woken"
        );
        assert!(wanted.poll(&mut cx).is_ready());
        assert!(wanted.poll(&mut cx).is_pending(), "one permit, not a count");
    }

    #[tokio::test]
    async fn a_parked_writer_started_again_keeps_the_order() {
        let (socket, outbox, end, mut writer, client) = wired_writer(None).await;
        // It writes the welcome, hands the turn back and parks.
        let outcome = writer.running.take().expect("started").await;
        writer.ran(Some(outcome));
        assert!(writer.parked.is_some() && writer.running.is_none());
        assert!(!socket.turn().queued);
        // 1 and 2 wait for a flush; the format reply takes the turn (and
        // asks for the writer), and 3 queues behind it, all before the
        // writer is running again.
        socket.deliver(&numbered(1, 0), &outbox).unwrap();
        socket.deliver(&numbered(2, 0), &outbox).unwrap();
        deliver_a_format_reply_then_3(&socket, &outbox);
        assert!(socket.turn().queued);
        let driver = tokio::spawn(async move { writer.stopped().await });
        // Started again, it writes all of it, hands the turn back, and
        // parks; 4 then goes by a flush. An end seen while parked still
        // closes the connection.
        deliver_4_by_a_flush_then_end(socket, outbox, end).await;
        assert!(matches!(
            driver.await.unwrap(),
            Stop::Ended(EndReason::Quit)
        ));
        let text = read_all(client).await;
        assert_eq!(numbers(&text), [0, 1, 2, 3, 4], "{text}");
    }
}
