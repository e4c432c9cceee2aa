//! Failing fast while the ordering authority is away.
//!
//! A message needs the authority (the database for `poll`, Redis for `redis`,
//! the reservation row for `local`) to get its `seq`. When the authority does
//! not answer, waiting for it helps nobody: the sender's later lines queue up
//! behind the stuck one and, once it returns, run as a burst the rate limiter
//! refuses. So each attempt gets [`ATTEMPT`], and once one has failed for a
//! reason that says "unreachable" the gate is shut: publishes are refused at
//! once with the reason, except one probe per [`PROBE`], until an attempt (or
//! the bus's own background traffic) succeeds again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::core::ports::BusError;

/// How long one round trip to the authority may take on the publish path:
/// with the refusal itself, well inside the protocol's 1 s.
pub const ATTEMPT: Duration = Duration::from_millis(800);
/// While shut, how often a publish may try the authority anyway.
pub const PROBE: Duration = Duration::from_secs(1);

/// Whether the authority is answering, as the last attempts saw it.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Open,
    Shut {
        since: Instant,
        last_try: Instant,
        cause: String,
    },
}

impl Gate {
    /// Whether an attempt may go ahead now: always while open; while shut,
    /// once per [`PROBE`] (that caller is the probe), otherwise an error
    /// that says why.
    pub fn admit(&self) -> Result<(), BusError> {
        let mut state = self.lock();
        match &mut *state {
            State::Open => Ok(()),
            State::Shut { last_try, .. } if last_try.elapsed() >= PROBE => {
                *last_try = Instant::now();
                Ok(())
            }
            State::Shut { since, cause, .. } => Err(down(*since, cause)),
        }
    }

    /// The state for `/healthz`: an error with the reason while shut.
    pub fn status(&self) -> Result<(), BusError> {
        match &*self.lock() {
            State::Open => Ok(()),
            State::Shut { since, cause, .. } => Err(down(*since, cause)),
        }
    }

    /// An attempt succeeded: the authority is back.
    pub fn open(&self) {
        let mut state = self.lock();
        if let State::Shut { since, .. } = &*state {
            tracing::info!(
                after = ?since.elapsed(),
                "ordering authority reachable again; messages are accepted"
            );
            *state = State::Open;
        }
    }

    /// An attempt found the authority unreachable: refuse until it answers.
    pub fn shut(&self, cause: impl std::fmt::Display) {
        let mut state = self.lock();
        let now = Instant::now();
        match &mut *state {
            State::Open => {
                tracing::error!(%cause, "ordering authority unreachable; messages are refused until it answers");
                *state = State::Shut {
                    since: now,
                    last_try: now,
                    cause: cause.to_string(),
                };
            }
            State::Shut { last_try, .. } => *last_try = now,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two plain values; a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn down(since: Instant, cause: &str) -> BusError {
    BusError::Down {
        for_secs: since.elapsed().as_secs(),
        cause: cause.to_owned(),
    }
}

/// Runs one attempt at the authority within [`ATTEMPT`], shutting the gate if
/// it timed out or could not reach the authority, opening it if it worked.
pub async fn attempt<T>(
    gate: &Gate,
    what: &str,
    work: impl Future<Output = Result<T, BusError>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(ATTEMPT, work).await {
        Ok(Ok(value)) => {
            gate.open();
            Ok(value)
        }
        Ok(Err(err)) => {
            if err.is_unreachable() {
                gate.shut(format!("{what}: {err}"));
            }
            Err(err)
        }
        Err(_) => {
            gate.shut(format!("{what}: no answer within {ATTEMPT:?}"));
            Err(BusError::Down {
                for_secs: 0,
                cause: format!("{what}: no answer within {ATTEMPT:?}"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shut_gate_refuses_at_once_but_lets_a_probe_through_each_second() {
        let gate = Gate::default();
        assert!(gate.admit().is_ok());
        gate.shut("connection refused");
        let err = gate.admit().expect_err("shut");
        assert!(err.to_string().contains("connection refused"), "{err}");
        assert!(gate.status().is_err());
        gate.open();
        assert!(gate.admit().is_ok());
        assert!(gate.status().is_ok());
    }

    #[tokio::test]
    async fn an_attempt_that_hangs_is_cut_short_and_shuts_the_gate() {
        tokio::time::pause();
        let gate = Gate::default();
        let hung = attempt(
            &gate,
            "publish",
            std::future::pending::<Result<(), BusError>>(),
        );
        assert!(hung.await.is_err());
        assert!(gate.status().is_err());
        let ok = attempt(&gate, "publish", async { Ok::<_, BusError>(7) }).await;
        assert_eq!(ok.unwrap(), 7);
        assert!(gate.status().is_ok());
    }
}
