//! What one receiving connection saw: which messages arrived (so the run can
//! count losses), which arrived twice, how late, and which errors the server
//! sent. Pure bookkeeping over received lines; no I/O.

use std::collections::HashMap;

use super::payload::{self, Stamp};

/// Errors a connection was sent, by code.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorCounts {
    /// `rate-limited`: a sender went over the server's per-session rate.
    pub rate_limited: u64,
    /// `slow-consumer`: the server dropped this connection for not reading.
    pub slow_consumer: u64,
    /// Any other error code.
    pub other: u64,
}

impl ErrorCounts {
    /// Adds another connection's counts.
    pub fn add(&mut self, other: &ErrorCounts) {
        self.rate_limited += other.rate_limited;
        self.slow_consumer += other.slow_consumer;
        self.other += other.other;
    }
}

/// One sender's messages as seen by one receiver.
#[derive(Debug, Default)]
struct Seen {
    /// Bit `n` is set once message `n` has arrived.
    bits: Vec<u64>,
    /// Distinct messages that arrived.
    unique: u64,
}

impl Seen {
    /// Marks `n`; false if it had already arrived.
    fn mark(&mut self, n: u64) -> bool {
        let (word, bit) = ((n / 64) as usize, n % 64);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        let fresh = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        if fresh {
            self.unique += 1;
        }
        fresh
    }
}

/// The accounts of one receiving connection.
#[derive(Debug)]
pub struct Receiver {
    run: u32,
    /// Senders whose end marker this receiver waits for.
    senders: usize,
    /// Indexed by sender id: the ids are the run's own, 0 to senders - 1.
    seen: Vec<Seen>,
    /// Distinct messages seen, from all senders.
    unique: u64,
    ended: HashMap<u32, u64>,
    /// Send-to-receive latencies in nanoseconds, of first arrivals.
    pub latencies: Vec<u64>,
    /// Latencies of messages whose sender is on another instance (cluster).
    pub remote_latencies: Vec<u64>,
    /// Messages that arrived again.
    pub duplicates: u64,
    /// Error events received.
    pub errors: ErrorCounts,
    /// When the last measured message arrived (run clock, ns).
    pub last_arrival_ns: u64,
    /// Socket reads that completed a measured message, where counted (TCP).
    pub reads: Option<u64>,
}

impl Receiver {
    /// A receiver for run `run` in a room with `senders` senders.
    pub fn new(run: u32, senders: usize) -> Self {
        Receiver {
            run,
            senders,
            seen: Vec::new(),
            unique: 0,
            ended: HashMap::new(),
            latencies: Vec::new(),
            remote_latencies: Vec::new(),
            duplicates: 0,
            errors: ErrorCounts::default(),
            last_arrival_ns: 0,
            reads: None,
        }
    }

    /// Accounts for one received line (JSON, text or SSE `data:`) at `now_ns`.
    /// `remote` says whether a sender is on another instance than this
    /// receiver. True when the line was a message not seen before.
    pub fn on_line(&mut self, line: &[u8], now_ns: u64, remote: impl Fn(u32) -> bool) -> bool {
        match payload::find(line, self.run) {
            Some(Stamp::Message { sender, n, sent_ns }) => {
                let sender_at = sender as usize;
                if self.seen.len() <= sender_at {
                    self.seen.resize_with(sender_at + 1, Seen::default);
                }
                let fresh = self.seen[sender_at].mark(n);
                if fresh {
                    self.unique += 1;
                    let latency = now_ns.saturating_sub(sent_ns);
                    if remote(sender) {
                        self.remote_latencies.push(latency);
                    } else {
                        self.latencies.push(latency);
                    }
                    self.last_arrival_ns = now_ns;
                } else {
                    self.duplicates += 1;
                }
                fresh
            }
            Some(Stamp::End { sender, total }) => {
                self.ended.insert(sender, total);
                false
            }
            None => {
                self.on_other(line);
                false
            }
        }
    }

    fn on_other(&mut self, line: &[u8]) {
        let code = if line.starts_with(b"! ") {
            line[2..].split(|&b| b == b':').next()
        } else if contains(line, br#""type":"error""#) {
            after(line, br#""code":""#).and_then(|rest| rest.split(|&b| b == b'"').next())
        } else {
            return;
        };
        match code {
            Some(b"rate-limited") => self.errors.rate_limited += 1,
            Some(b"slow-consumer") => self.errors.slow_consumer += 1,
            _ => self.errors.other += 1,
        }
    }

    /// Whether every sender of the room has said it is done.
    pub fn done(&self) -> bool {
        self.ended.len() >= self.senders
    }

    /// Distinct messages received.
    pub fn unique(&self) -> u64 {
        self.unique
    }

    /// Messages of `sender` that never arrived, out of `sent`.
    pub fn lost_from(&self, sender: u32, sent: u64) -> u64 {
        let got = self.seen.get(sender as usize).map_or(0, |s| s.unique);
        sent.saturating_sub(got)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn after<'a>(hay: &'a [u8], needle: &[u8]) -> Option<&'a [u8]> {
    let at = hay.windows(needle.len()).position(|w| w == needle)?;
    Some(&hay[at + needle.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(sender: u32, n: u64, sent: u64) -> Vec<u8> {
        format!(
            r#"{{"type":"message","text":"{}"}}"#,
            payload::message(5, sender, n, sent, 0)
        )
        .into_bytes()
    }

    #[test]
    fn losses_duplicates_and_latency_are_counted() {
        let mut r = Receiver::new(5, 1);
        let local = |_| false;
        r.on_line(&line(0, 0, 100), 150, local);
        r.on_line(&line(0, 2, 200), 260, local);
        r.on_line(&line(0, 2, 200), 270, local);
        assert!(!r.done());
        r.on_line(payload::end(5, 0, 3).as_bytes(), 300, local);
        assert!(r.done());
        assert_eq!(r.unique(), 2);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.lost_from(0, 3), 1);
        assert_eq!(r.latencies, vec![50, 60]);
        assert_eq!(r.last_arrival_ns, 260);
    }

    #[test]
    fn errors_are_counted_by_code_in_both_renderings() {
        let mut r = Receiver::new(5, 1);
        r.on_line(
            br#"{"type":"error","code":"rate-limited","message":"slow down"}"#,
            0,
            |_| false,
        );
        r.on_line(b"! slow-consumer: you are not reading", 0, |_| false);
        r.on_line(b"! nick-taken: x", 0, |_| false);
        r.on_line(b"* bob joined", 0, |_| false);
        assert_eq!(
            r.errors,
            ErrorCounts {
                rate_limited: 1,
                slow_consumer: 1,
                other: 1
            }
        );
    }
}
