//! The line-based TCP adapter: `nc localhost 9001`.
//!
//! Each connection is two tasks. The reader frames lines (at most `--max-line`
//! bytes), parses them and hands commands to the [`Hub`], one at a time. The
//! writer drains the session's bounded outbox, rendering each event as text or
//! JSON, and writes everything that is waiting in one buffer per write. The hub
//! never waits for either: when the outbox is full it ends the session as a
//! slow consumer, and the writer says so before closing.
//!
//! A client that sends faster than it reads its answers is paced, not dropped:
//! while its outbox is over half full the reader takes no more lines (TCP
//! back-pressure: the client's sends block once the socket buffers fill), and
//! resumes as the writer drains it. Only events the client did not ask for
//! (room traffic) can then fill the rest, so only a client that does not read
//! at all becomes a slow consumer. `rate-limited` errors are coalesced to one
//! a second (see [`super::coalesce`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::coalesce::RateNotices;
use super::lines::{Frame, LineCodec};
use super::peers::Peers;
use crate::core::{
    Backlog, Command, EndReason, ErrorCode, Event, EventBody, Format, Hub, Refusal, Replies, Reply,
    SessionHandle,
};

/// Most bytes gathered into one write.
const WRITE_BUFFER: usize = 64 * 1024;
/// A connection's first read buffer.
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
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let this = self.clone();
                    self.tracker
                        .spawn(async move { this.connection(stream, peer).await });
                }
                Err(err) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::error!(cause = %err, "failed to accept a TCP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(self, mut stream: TcpStream, peer: SocketAddr) {
        let Some(_address_permit) = self.peers.admit(peer.ip()) else {
            let limit = self.peers.limits().max_conns;
            let refusal = Event::error(
                ErrorCode::Unavailable,
                format!(
                    "too many connections from your address (at most {limit}); close some first"
                ),
            );
            let _ = tokio::time::timeout(PARTING, stream.write_all(refusal.text())).await;
            return;
        };
        let Ok(_permit) = self.connections.clone().try_acquire_owned() else {
            let refusal = Event::error(
                ErrorCode::Unavailable,
                "the server is full; try again later",
            );
            let _ = tokio::time::timeout(PARTING, stream.write_all(refusal.text())).await;
            return;
        };
        let _ = stream.set_nodelay(true);
        let session = match self.hub.connect(None, Replies::Outbox, None).await {
            Ok(session) => session,
            Err(refusal) => {
                let event = Event::error(refusal.code, refusal.message);
                let _ = tokio::time::timeout(PARTING, stream.write_all(event.text())).await;
                return;
            }
        };
        let id = session.id;
        tracing::debug!(%peer, session = %id, nick = %session.nick, "tcp connected");
        let (read, write) = stream.into_split();
        let SessionHandle {
            events,
            ended,
            backlog,
            ..
        } = session;
        let (done_tx, done_rx) = oneshot::channel();
        let drained = Arc::new(Notify::new());
        let mut writer = tokio::spawn(write_events(write, events, ended, done_rx, drained.clone()));
        // Start small: most lines are short and an idle connection should
        // cost little (the buffer grows for long lines, up to --max-line).
        let mut lines = FramedRead::with_capacity(read, LineCodec::new(self.max_line), READ_BUFFER);
        let pace = Pace {
            backlog,
            drained,
            high: self.hub.limits().queue / 2,
        };
        let mut writer_finished = false;
        loop {
            let frame = tokio::select! {
                frame = async {
                    pace.wait().await;
                    lines.next().await
                } => frame,
                // The core ended the session (slow consumer): stop reading too.
                _ = &mut writer => {
                    writer_finished = true;
                    break;
                }
                // The writer sees the session end and says goodbye.
                _ = self.shutdown.cancelled() => break,
            };
            let refusal = match frame {
                None | Some(Err(_)) => break,
                Some(Ok(Frame::Line(line))) => match self.hub.parse(&line) {
                    Ok(None) => continue,
                    Ok(Some(Command::Quit)) => break,
                    Ok(Some(command)) => {
                        self.hub.handle(id, command).await;
                        continue;
                    }
                    Err(refusal) => refusal,
                },
                Some(Ok(Frame::TooLong)) => Refusal::new(
                    ErrorCode::TooLong,
                    format!(
                        "lines are at most {} bytes; this one was discarded",
                        self.max_line
                    ),
                ),
                Some(Ok(Frame::InvalidUtf8)) => Refusal::new(
                    ErrorCode::InvalidUtf8,
                    "that line was not valid UTF-8; it was discarded",
                ),
            };
            self.hub.refuse(id, refusal);
        }
        if !self.shutdown.is_cancelled() {
            let _ = done_tx.send(());
            self.hub.disconnect(id, EndReason::Quit);
        }
        if !writer_finished {
            let _ = writer.await;
        }
        tracing::debug!(%peer, session = %id, "tcp closed");
    }
}

/// Back-pressure for one connection's reader.
struct Pace {
    backlog: Backlog,
    /// Signalled by the writer each time it has taken events off the outbox.
    drained: Arc<Notify>,
    /// Above this many queued events the reader takes no more lines.
    high: usize,
}

impl Pace {
    /// Returns once the outbox is at most half full, or the session has ended.
    /// Half a queue is room for any command's answer (`/history` is at most
    /// 100 events) except a resuming `/join ROOM SEQ`, which the core trims to
    /// the room left, with a `gap`.
    async fn wait(&self) {
        loop {
            // `notify_one` keeps a permit when nobody waits, so a drain that
            // happens between this check and the wait below is not missed.
            match self.backlog.queued() {
                Some(queued) if queued > self.high => self.drained.notified().await,
                _ => return,
            }
        }
    }
}

/// Why the writer stops.
enum Stop {
    /// The core ended the session.
    Ended(EndReason),
    /// The reader is gone (client closed, `/quit`), or the socket failed.
    Closed,
}

/// The writer half: outbox to socket, batching whatever is queued.
async fn write_events(
    mut socket: OwnedWriteHalf,
    mut events: mpsc::Receiver<Event>,
    mut ended: oneshot::Receiver<EndReason>,
    mut reader_done: oneshot::Receiver<()>,
    drained: Arc<Notify>,
) {
    let mut format = Format::Text;
    let mut notices = RateNotices::default();
    // Allocated per batch and released once written, so an idle connection
    // holds no write buffer (one allocation per write is cheap next to the
    // system call).
    let mut buf = BytesMut::new();
    let stop = loop {
        let first = tokio::select! {
            biased;
            reason = &mut ended => break Stop::Ended(reason.unwrap_or(EndReason::Quit)),
            _ = &mut reader_done => break Stop::Closed,
            event = events.recv() => match event {
                Some(event) => notices.filter(event, Instant::now()),
                None => break Stop::Closed,
            },
            () = sleep_until(notices.due()) => notices.summary(Instant::now()),
        };
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
        drained.notify_one();
        if buf.is_empty() {
            continue; // every event taken was a held-back refusal
        }
        // A client that does not read blocks this write; the core then ends
        // the session, which must interrupt it.
        let written = tokio::select! {
            written = socket.write_all(&buf) => written,
            reason = &mut ended => break Stop::Ended(reason.unwrap_or(EndReason::Quit)),
        };
        if written.is_err() {
            break Stop::Closed;
        }
        // What was taken before the write is on its way: let the reader go on.
        drained.notify_one();
        buf = BytesMut::new();
    };
    // The reader may be waiting for room that will never come.
    drained.notify_one();
    buf.clear();
    let parting = match stop {
        // Its socket is full: what is queued would never get through.
        Stop::Ended(EndReason::SlowConsumer) => Some(Event::error(
            ErrorCode::SlowConsumer,
            "you were not reading fast enough; disconnected",
        )),
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
    if !buf.is_empty() {
        let _ = tokio::time::timeout(PARTING, socket.write_all(&buf)).await;
    }
    let _ = tokio::time::timeout(PARTING, socket.shutdown()).await;
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Renders everything still queued, ending with any held-back refusals.
fn drain(
    events: &mut mpsc::Receiver<Event>,
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
