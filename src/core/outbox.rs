//! A session's outbox: the bounded queue of events from the hub to one
//! connection.
//!
//! It offers the part of tokio's `mpsc` the adapters use, at a fraction of
//! its size at rest. A tokio channel allocates its cache-padded state and a
//! first block of 32 slots when it is made, about 800 bytes, and keeps the
//! block for the channel's life; most sessions are idle, with nothing
//! queued, and a queue is only needed while a connection falls behind. Here
//! the state is one small allocation, the slots are a `VecDeque` that grows
//! with what is queued, and a drained queue gives back what it grew.
//!
//! One receiver and any number of senders; the senders never wait (`--queue`
//! bounds the queue, and a full one ends the session as a slow consumer).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

pub use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use super::event::Event;

/// Slots a drained queue keeps; a queue that grew past it is given back.
const KEPT: usize = 8;

/// Makes an outbox of at most `capacity` events (at least one).
pub fn channel(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        capacity: capacity.max(1),
        state: Mutex::new(State {
            queue: VecDeque::new(),
            waker: None,
            senders: 1,
            open: true,
        }),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct Shared {
    capacity: usize,
    state: Mutex<State>,
}

struct State {
    queue: VecDeque<Event>,
    /// The receiver, waiting in [`Receiver::recv`].
    waker: Option<Waker>,
    /// Live senders; at none the receiver sees the end once drained.
    senders: usize,
    /// Whether the receiver is still there.
    open: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    /// Takes the oldest event, giving back what a queue that grew holds once
    /// it is empty.
    fn pop(&mut self) -> Option<Event> {
        let event = self.queue.pop_front()?;
        if self.queue.is_empty() && self.queue.capacity() > KEPT {
            self.queue = VecDeque::new();
        }
        Some(event)
    }
}

/// The hub's end of an outbox.
pub struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    /// Queues `event`, unless the outbox is full or its receiver is gone.
    pub fn try_send(&self, event: Event) -> Result<(), TrySendError<Event>> {
        let waker = {
            let mut state = self.shared.state();
            if !state.open {
                return Err(TrySendError::Closed(event));
            }
            if state.queue.len() >= self.shared.capacity {
                return Err(TrySendError::Full(event));
            }
            state.queue.push_back(event);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Room left for events.
    pub fn capacity(&self) -> usize {
        self.shared.capacity - self.shared.state().queue.len()
    }

    /// Most events the outbox holds.
    pub fn max_capacity(&self) -> usize {
        self.shared.capacity
    }

    /// A reference that does not keep the outbox open.
    pub fn downgrade(&self) -> WeakSender {
        WeakSender {
            shared: self.shared.clone(),
        }
    }
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.shared.state().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.state();
            state.senders -= 1;
            if state.senders > 0 {
                return;
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

/// A sender that does not keep the outbox open: once every [`Sender`] is
/// gone it no longer upgrades.
#[derive(Clone)]
pub struct WeakSender {
    shared: Arc<Shared>,
}

impl WeakSender {
    /// A sender again, while another still exists.
    pub fn upgrade(&self) -> Option<Sender> {
        let mut state = self.shared.state();
        if state.senders == 0 {
            return None;
        }
        state.senders += 1;
        drop(state);
        Some(Sender {
            shared: self.shared.clone(),
        })
    }
}

impl std::fmt::Debug for WeakSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakSender").finish_non_exhaustive()
    }
}

/// The connection's end of an outbox.
pub struct Receiver {
    shared: Arc<Shared>,
}

impl Receiver {
    /// The next event, waiting for one; `None` once every sender is gone and
    /// the queue is drained. Cancel-safe: an event is only taken when this
    /// returns it.
    pub async fn recv(&mut self) -> Option<Event> {
        poll_fn(|cx| {
            let mut state = self.shared.state();
            if let Some(event) = state.pop() {
                return Poll::Ready(Some(event));
            }
            if state.senders == 0 {
                return Poll::Ready(None);
            }
            match &mut state.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                waker => *waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Result<Event, TryRecvError> {
        let mut state = self.shared.state();
        match state.pop() {
            Some(event) => Ok(event),
            None if state.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Senders see the outbox closed; what was queued goes now.
        let queued = {
            let mut state = self.shared.state();
            state.open = false;
            state.waker = None;
            std::mem::take(&mut state.queue)
        };
        drop(queued);
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ErrorCode;

    fn event(n: usize) -> Event {
        Event::error(ErrorCode::Unavailable, format!("{n}"))
    }

    fn number(event: &Event) -> usize {
        let text = std::str::from_utf8(event.text()).unwrap();
        text.split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap()
    }

    #[test]
    fn bounded_in_order_and_counted() {
        let (tx, mut rx) = channel(3);
        assert_eq!((tx.capacity(), tx.max_capacity()), (3, 3));
        for n in 0..3 {
            tx.try_send(event(n)).unwrap();
        }
        assert!(matches!(tx.try_send(event(3)), Err(TrySendError::Full(_))));
        assert_eq!(tx.capacity(), 0);
        assert_eq!(number(&rx.try_recv().unwrap()), 0);
        assert_eq!(tx.capacity(), 1);
        tx.try_send(event(3)).unwrap();
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| number(&e))
            .collect();
        assert_eq!(got, [1, 2, 3]);
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
    }

    #[test]
    fn a_drained_queue_gives_its_slots_back() {
        let (tx, mut rx) = channel(1024);
        for n in 0..100 {
            tx.try_send(event(n)).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert_eq!(tx.shared.state().queue.capacity(), 0);
    }

    #[tokio::test]
    async fn the_end_is_seen_after_what_was_queued() {
        let (tx, mut rx) = channel(4);
        let weak = tx.downgrade();
        let second = weak.upgrade().unwrap();
        tx.try_send(event(1)).unwrap();
        drop(tx);
        second.try_send(event(2)).unwrap();
        drop(second);
        assert!(weak.upgrade().is_none());
        assert_eq!(number(&rx.recv().await.unwrap()), 1);
        assert_eq!(number(&rx.try_recv().unwrap()), 2);
        assert!(rx.recv().await.is_none());
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Disconnected)));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken() {
        let (tx, mut rx) = channel(4);
        let waiting = tokio::spawn(async move { rx.recv().await.map(|e| number(&e)) });
        tokio::task::yield_now().await;
        tx.try_send(event(7)).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got, Some(7));
    }

    #[test]
    fn senders_see_a_dropped_receiver() {
        let (tx, rx) = channel(4);
        tx.try_send(event(1)).unwrap();
        drop(rx);
        assert!(matches!(
            tx.try_send(event(2)),
            Err(TrySendError::Closed(_))
        ));
    }
}
