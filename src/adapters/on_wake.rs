//! A future that is polled only when it asked to be.
//!
//! `tokio::select!` polls every branch that is not ready each time its task
//! wakes, and a task that streams events wakes several times per event. A
//! branch that waits for something rare (a cancellation, a keep-alive
//! timer, the client closing its side of a stream) then costs a poll per
//! wake-up and tells nothing: callgrind put such polls at about a fifth of an
//! SSE delivery's instructions. [`OnWake`] hands its future a waker of its
//! own and polls it only once that waker has fired (and on the first poll,
//! when the future registers its wakers).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

pin_project_lite::pin_project! {
    /// `inner`, polled only after its own waker fired.
    pub struct OnWake<F> {
        #[pin]
        inner: F,
        flag: Arc<Flag>,
        // A copy of the waker in `flag.task`, which only `poll` writes: a
        // poll whose task's waker is unchanged need not take the lock.
        registered: Option<Waker>,
    }
}

/// Set when the inner future's waker fires; wakes the task that polls it.
///
/// The task's waker stays registered when it is woken (unlike an
/// `AtomicWaker`, whose `wake` takes it out): a poll can then trust that what
/// it registered last is still there. With a waker that a wake took out, a
/// poll that found its waker unchanged skipped registering, and the next wake
/// found nobody to wake (a lost wake-up, caught by the stress test below).
#[derive(Debug, Default)]
struct Flag {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Set before the waker is read: a poll that registers after this
        // read still finds the flag set.
        self.woken.store(true, Ordering::Release);
        if let Some(task) = &*self.task.lock().unwrap_or_else(|e| e.into_inner()) {
            task.wake_by_ref();
        }
    }
}

impl<F> OnWake<F> {
    /// Wraps `inner`; the first poll polls it.
    pub fn new(inner: F) -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        OnWake {
            inner,
            flag,
            registered: None,
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut woken = this.flag.woken.swap(false, Ordering::AcqRel);
        // Registered again only when the task's waker changed. The flag is
        // read again after registering: a wake that read the old waker (or
        // none) is not lost, and one that reads the slot later wakes the new.
        if !this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            let waker = cx.waker().clone();
            *this.flag.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
            *this.registered = Some(waker);
            woken |= this.flag.woken.swap(false, Ordering::AcqRel);
        }
        if !woken {
            return Poll::Pending;
        }
        // Made per poll, not kept: a poll is rare, and every open stream
        // would keep the waker's 16 bytes.
        let waker = Waker::from(this.flag.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts its polls; ready once `ready` is set, pending (without
    /// registering a waker) otherwise.
    struct Counted<'a> {
        polls: &'a AtomicUsize,
        ready: &'a AtomicBool,
    }

    impl Future for Counted<'_> {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.ready.load(Ordering::Relaxed) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn the_inner_future_is_polled_first_then_only_when_its_waker_fired() {
        let (polls, ready) = (AtomicUsize::new(0), AtomicBool::new(false));
        let wrapped = OnWake::new(Counted {
            polls: &polls,
            ready: &ready,
        });
        let mut wrapped = std::pin::pin!(wrapped);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        for _ in 0..10 {
            assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled without a wake");
        ready.store(true, Ordering::Relaxed);
        // Not woken yet: still not polled.
        assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        wrapped.flag.wake_by_ref();
        assert!(wrapped.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    /// Counts the wakes of a task's waker.
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The interleaving the stress test below once hit: a wake, the poll it
    /// causes (same task waker, so nothing is registered again), then a
    /// second wake. It must reach the task: the first wake must not have
    /// used the registration up.
    #[test]
    fn a_wake_after_a_poll_that_saw_one_still_reaches_the_task() {
        let (polls, ready) = (AtomicUsize::new(0), AtomicBool::new(false));
        let wrapped = OnWake::new(Counted {
            polls: &polls,
            ready: &ready,
        });
        let mut wrapped = std::pin::pin!(wrapped);
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let task = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&task);
        // The first poll polls the inner future; the second, with nothing
        // woken, registers the task's waker and keeps a copy.
        assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        wrapped.flag.wake_by_ref();
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
        assert!(wrapped.as_mut().poll(&mut cx).is_pending());
        wrapped.flag.wake_by_ref();
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            2,
            "the second wake was lost"
        );
    }

    /// Wakes from another thread racing the polls: none may be lost. A
    /// receive loop inside `OnWake` needs every message, and wakes itself
    /// (`yield_now`) between some of them; a lost wake-up hangs a round.
    #[test]
    fn wakes_racing_polls_from_another_thread_are_never_lost() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            for round in 0..300 {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(64);
                let receiving = tokio::spawn(OnWake::new(async move {
                    for i in 0..2_000u32 {
                        rx.recv().await.expect("a message");
                        if i % 3 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                }));
                let sending = std::thread::spawn(move || {
                    for i in 0..2_000 {
                        tx.blocking_send(i).unwrap();
                    }
                });
                tokio::time::timeout(std::time::Duration::from_secs(5), receiving)
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: a wake-up was lost"))
                    .unwrap();
                sending.join().unwrap();
            }
        });
    }

    #[tokio::test]
    async fn a_signal_wakes_the_task_that_waits_on_it() {
        let token = tokio_util::sync::CancellationToken::new();
        let waiting = tokio::spawn({
            let token = token.clone();
            async move { OnWake::new(token.cancelled()).await }
        });
        tokio::task::yield_now().await;
        token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
    }
}
