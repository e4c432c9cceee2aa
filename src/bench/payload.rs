//! The benchmark's message text: who sent it, its number and when, so that a
//! receiver can measure latency and spot losses and duplicates from the text
//! alone, whatever the rendering (TCP text, JSON lines, SSE `data:`).
//!
//! ```text
//! bz1 RUN SENDER N SENT_NS xxxx...    one measured message (padded to --size)
//! bz1 RUN SENDER end TOTAL            sender SENDER is done and sent TOTAL
//! bz1 RUN warm                         the barrier before measuring
//! ```
//!
//! `RUN` is 8 hex digits chosen per run, so messages of earlier runs (replayed
//! on join) are ignored. The text has no quote, backslash or control
//! character, so it appears verbatim in every rendering.

use std::time::Instant;

/// Marks a benchmark message.
pub const MARK: &[u8] = b"bz1 ";

/// Sender ids are below this: a receiver keeps an account per id.
pub const MOST_SENDERS: u32 = 1 << 20;

/// One clock for senders and receivers of one process: nanoseconds since a base.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        Clock {
            base: Instant::now(),
        }
    }

    /// Nanoseconds since the clock started.
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// The instant `ns` nanoseconds after the base.
    pub fn at(&self, ns: u64) -> Instant {
        self.base + std::time::Duration::from_nanos(ns)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// What a benchmark line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// Message `n` of `sender`, sent at `sent_ns` on the run's [`Clock`].
    Message { sender: u32, n: u64, sent_ns: u64 },
    /// `sender` has finished after sending `total` messages.
    End { sender: u32, total: u64 },
}

/// The text of message `n` of `sender`, padded with `x` to at least `size` bytes.
pub fn message(run: u32, sender: u32, n: u64, sent_ns: u64, size: usize) -> String {
    let mut text = format!("bz1 {run:08x} {sender} {n} {sent_ns} ");
    while text.len() < size {
        text.push('x');
    }
    text
}

/// The text that ends `sender`'s stream.
pub fn end(run: u32, sender: u32, total: u64) -> String {
    format!("bz1 {run:08x} {sender} end {total}")
}

/// The text of the warm-up barrier: once every member has received it, every
/// event queued before it (the joins of a thousand members) has been delivered.
pub fn warm(run: u32) -> String {
    format!("bz1 {run:08x} warm")
}

/// Whether `line` carries run `run`'s warm-up barrier.
pub fn is_warm(line: &[u8], run: u32) -> bool {
    memchr::memmem::find(line, warm(run).as_bytes()).is_some()
}

/// Finds a stamp of run `run` in a received line, in any rendering.
pub fn find(line: &[u8], run: u32) -> Option<Stamp> {
    // memmem's vectorised search: a byte-by-byte window scan was a visible
    // share of the generator's work per delivery at saturation.
    let at = memchr::memmem::find(line, MARK)?;
    let mut words = line[at + MARK.len()..]
        .split(|&b| b == b' ' || b == b'"' || b == b'\r' || b == b'\n')
        .filter(|w| !w.is_empty());
    let got_run = u32::from_str_radix(std::str::from_utf8(words.next()?).ok()?, 16).ok()?;
    if got_run != run {
        return None;
    }
    let sender = u32::try_from(number(words.next()?)?)
        .ok()
        .filter(|&s| s < MOST_SENDERS)?;
    let third = words.next()?;
    if third == b"end" {
        let total = number(words.next()?)?;
        return Some(Stamp::End { sender, total });
    }
    let n = number(third)?;
    let sent_ns = number(words.next()?)?;
    Some(Stamp::Message { sender, n, sent_ns })
}

fn number(word: &[u8]) -> Option<u64> {
    std::str::from_utf8(word).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_found_in_every_rendering() {
        let text = message(0xabc, 7, 42, 123_456, 64);
        assert!(text.len() >= 64);
        let want = Some(Stamp::Message {
            sender: 7,
            n: 42,
            sent_ns: 123_456,
        });
        let json =
            format!(r#"{{"type":"message","room":"r","seq":1,"text":"{text}","kind":"text"}}"#);
        assert_eq!(find(json.as_bytes(), 0xabc), want);
        let line = format!("[08:01:02] #r <guest-1a2b> {text}\r\n");
        assert_eq!(find(line.as_bytes(), 0xabc), want);
        assert_eq!(find(line.as_bytes(), 0xabd), None, "another run's message");
    }

    #[test]
    fn an_end_marker_carries_the_total() {
        let json = format!(r#"{{"text":"{}"}}"#, end(1, 3, 99));
        assert_eq!(
            find(json.as_bytes(), 1),
            Some(Stamp::End {
                sender: 3,
                total: 99
            })
        );
        assert_eq!(find(b"* bob joined", 1), None);
    }

    #[test]
    fn the_barrier_is_not_a_stamp() {
        let line = format!(r#"{{"text":"{}"}}"#, warm(9));
        assert!(is_warm(line.as_bytes(), 9));
        assert!(!is_warm(line.as_bytes(), 8));
        assert_eq!(find(line.as_bytes(), 9), None);
    }
}
