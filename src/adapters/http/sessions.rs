//! The HTTP session table: a random token per session, and each session's
//! feed of events, which outlives any one SSE stream.
//!
//! A TCP session lives exactly as long as its socket. An HTTP session does not
//! have one: its commands arrive as separate requests and its events leave
//! through an SSE stream that a browser drops and reopens at will. So the table
//! keeps each session's outbox (the core's bounded queue) between streams. A
//! session with no stream for `linger` (60 s) is ended, which frees its nick;
//! one whose queue overflows meanwhile is a slow consumer, as on TCP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedMutexGuard, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::resend::Memory;
use crate::core::{EndReason, Hub, SessionHandle, SessionId, outbox};

/// How long a new stream waits for the old one to let go before cutting its
/// connection (it may be stuck writing to a dead socket).
const TAKEOVER: Duration = Duration::from_secs(1);

/// A session's 128-bit random token, as 32 lower-case hex digits.
pub fn new_token() -> String {
    // rand's thread RNG is a CSPRNG (ChaCha), suitable for bearer tokens.
    format!("{:032x}", rand::random::<u128>())
}

/// Every live HTTP session of this instance, by token.
pub struct Sessions {
    table: Mutex<HashMap<String, Arc<HttpSession>>>,
    /// How long a session outlives its stream.
    linger: Duration,
    /// Most sessions at once.
    capacity: usize,
}

/// One HTTP session.
pub struct HttpSession {
    /// The core's id for it.
    pub id: SessionId,
    /// Its events, held by whichever stream is attached.
    feed: Arc<tokio::sync::Mutex<Feed>>,
    /// `None` while a stream is attached, else when the last one went away.
    detached: watch::Sender<Option<Instant>>,
    /// Bumped when a new stream takes over, so the old one ends.
    generation: watch::Sender<u64>,
    /// The attached stream's connection, cut if it will not let go.
    connection: Mutex<Option<CancellationToken>>,
    /// Set once, when the core ends the session.
    ended: watch::Sender<Option<EndReason>>,
}

/// What a stream drains: the session's queue, and its memory of what it
/// sent, which outlives any one stream.
pub struct Feed {
    /// The core's bounded outbox for this session.
    pub events: outbox::Receiver,
    /// Frames sent lately and each room's seqs, for resuming.
    pub memory: Memory,
}

impl Feed {
    fn new(events: outbox::Receiver) -> Self {
        Feed {
            events,
            memory: Memory::default(),
        }
    }
}

/// A stream's hold on a session: while it exists, no other stream drains the
/// feed. Dropping it starts the session's linger clock.
pub struct Attached {
    /// The session.
    pub session: Arc<HttpSession>,
    /// Its feed, exclusively.
    pub feed: OwnedMutexGuard<Feed>,
    /// This stream's generation: a newer one means "let go".
    pub generation: watch::Receiver<u64>,
    /// Fires with the reason when the core ends the session.
    pub ended: watch::Receiver<Option<EndReason>>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.session.detached.send_replace(Some(Instant::now()));
    }
}

/// The table is full.
#[derive(Debug)]
pub struct Full;

impl Sessions {
    /// An empty table.
    pub fn new(linger: Duration, capacity: usize) -> Arc<Sessions> {
        Arc::new(Sessions {
            table: Mutex::new(HashMap::new()),
            linger,
            capacity,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<HttpSession>>> {
        // Nothing panics under this lock; if it did, the map is still usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether another session fits.
    pub fn has_room(&self) -> bool {
        self.lock().len() < self.capacity
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Adds a session the core has opened under `token`, and starts the task
    /// that ends it after `linger` without a stream.
    pub fn insert(
        self: &Arc<Self>,
        hub: &Hub,
        token: String,
        handle: SessionHandle,
        tracker: &TaskTracker,
    ) -> Result<Arc<HttpSession>, Full> {
        let SessionHandle {
            id, events, ended, ..
        } = handle;
        let session = Arc::new(HttpSession {
            id,
            feed: Arc::new(tokio::sync::Mutex::new(Feed::new(events))),
            detached: watch::Sender::new(Some(Instant::now())),
            generation: watch::Sender::new(0),
            connection: Mutex::new(None),
            ended: watch::Sender::new(None),
        });
        {
            let mut table = self.lock();
            if table.len() >= self.capacity {
                return Err(Full);
            }
            table.insert(token.clone(), session.clone());
        }
        // The session outlives the request that opened it: its own span, at
        // debug level (an enabled span is kept for the session's life), so
        // its end says its id itself.
        let span = tracing::debug_span!("http_session", session = %id);
        tracker.spawn(
            supervise(self.clone(), hub.clone(), token, session.clone(), ended).instrument(span),
        );
        Ok(session)
    }

    /// The live session with this token.
    pub fn get(&self, token: &str) -> Option<Arc<HttpSession>> {
        self.lock().get(token).cloned()
    }

    fn remove(&self, token: &str) {
        self.lock().remove(token);
    }
}

impl HttpSession {
    /// Whether the core has ended this session.
    pub fn has_ended(&self) -> bool {
        self.ended.borrow().is_some()
    }

    /// Resolves once the session has ended and its token no longer answers.
    pub async fn ended(&self) {
        let mut ended = self.ended.subscribe();
        // The sender lives in the session itself, so it cannot close first.
        let _ = ended.wait_for(Option::is_some).await;
    }

    /// How many streams have attached to this session so far: a change tells
    /// that a client came back.
    pub fn streams_attached(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Makes a new stream the session's only one. An older stream is told to
    /// let go; if it does not within a second (stuck on a dead socket), its
    /// connection is cut. `connection` is the new stream's, for the same fate.
    pub async fn attach(
        self: &Arc<Self>,
        connection: CancellationToken,
    ) -> Result<Attached, AttachError> {
        self.generation.send_modify(|g| *g += 1);
        let feed = match tokio::time::timeout(TAKEOVER, self.feed.clone().lock_owned()).await {
            Ok(feed) => feed,
            Err(_) => {
                if let Some(old) = self.lock_connection().take() {
                    old.cancel();
                }
                tokio::time::timeout(TAKEOVER * 5, self.feed.clone().lock_owned())
                    .await
                    .map_err(|_| AttachError::Busy)?
            }
        };
        if self.has_ended() {
            return Err(AttachError::Ended);
        }
        *self.lock_connection() = Some(connection);
        self.detached.send_replace(None);
        let mut generation = self.generation.subscribe();
        generation.borrow_and_update();
        Ok(Attached {
            session: self.clone(),
            feed,
            generation,
            ended: self.ended.subscribe(),
        })
    }

    pub(super) fn lock_connection(&self) -> std::sync::MutexGuard<'_, Option<CancellationToken>> {
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a stream could not take a session over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachError {
    /// The session has ended.
    Ended,
    /// The previous stream did not let go in time.
    Busy,
}

/// Ends the session after `linger` without a stream, and drops it from the
/// table once the core has ended it for any reason.
async fn supervise(
    sessions: Arc<Sessions>,
    hub: Hub,
    token: String,
    session: Arc<HttpSession>,
    mut ended: oneshot::Receiver<EndReason>,
) {
    let mut detached = session.detached.subscribe();
    let reason = loop {
        let since = *detached.borrow_and_update();
        let expiry = async {
            match since {
                // Boxed: a session with its stream open holds no timer.
                Some(since) => Box::pin(tokio::time::sleep_until(since + sessions.linger)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            reason = &mut ended => break reason.unwrap_or(EndReason::Quit),
            _ = detached.changed() => {}
            _ = expiry => {
                hub.disconnect(session.id, EndReason::Expired);
            }
        }
    };
    tracing::info!(session = %session.id, %reason, "http session ended");
    sessions.remove(&token);
    session.ended.send_replace(Some(reason));
    // Wake a stream stuck waiting for events so it sees the end.
    session.generation.send_modify(|_| {});
    // A reader that stopped reading never lets its stream see the end: hyper
    // stops polling a body whose socket is full. Cut its connection once it
    // has had a moment to take the last frame, as TCP does.
    if reason == EndReason::SlowConsumer
        && let Some(connection) = session.lock_connection().take()
    {
        super::sse::cut_soon(&connection);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_128_bits_of_hex_and_differ() {
        let a = new_token();
        let b = new_token();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
