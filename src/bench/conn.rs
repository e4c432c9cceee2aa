//! One benchmark connection over TCP: connect, read the welcome, choose the
//! rendering, join a room, then hand over a line reader and a writer. Also an
//! IRC client of the same shape, so a C IRC server can be measured beside this
//! one by the same instrument.

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

use super::sse::SseStream;

/// How long one connection may take to be ready (connected, joined).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Tries at a connection whose guest nick collided with another's.
const GUEST_NICK_ATTEMPTS: u32 = 5;

/// How a TCP connection renders events.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Rendering {
    /// `/format json`: one JSON event per line.
    Json,
    /// The default human text.
    Text,
}

/// A socket's read half that counts the reads that returned data. Lines per
/// read tells how many deliveries shared a server write, roughly: the kernel
/// may join two writes that arrive before the reader gets to them.
pub struct Counted {
    half: OwnedReadHalf,
    reads: u64,
}

impl Counted {
    /// Reads that returned data so far.
    pub fn reads(&self) -> u64 {
        self.reads
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.half).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.reads += 1;
        }
        polled
    }
}

/// A buffered, counted read half.
pub type Reader = BufReader<Counted>;

fn reader(half: OwnedReadHalf) -> Reader {
    BufReader::new(Counted { half, reads: 0 })
}

/// Where a connection's lines come from.
pub enum Lines {
    /// A TCP connection's lines.
    Tcp(Reader),
    /// An SSE stream's `data:` lines.
    Sse(SseStream),
}

impl Lines {
    /// Waits for the next read and hands `each` every complete line it
    /// brought, in order; false at end of stream. `carry` keeps a line cut
    /// by the end of a read until the next.
    ///
    /// A line at a time cost the load generator a wait per line, and at
    /// saturation the generator, not the server, was what fell behind: a read
    /// brings dozens of lines then.
    pub async fn next_read(
        &mut self,
        carry: &mut Vec<u8>,
        mut each: impl FnMut(&[u8]),
    ) -> anyhow::Result<bool> {
        match self {
            Lines::Tcp(reader) => {
                let chunk = reader.fill_buf().await?;
                if chunk.is_empty() {
                    return Ok(false);
                }
                let read = chunk.len();
                let mut start = 0;
                for end in memchr::memchr_iter(b'\n', chunk) {
                    let line = &chunk[start..=end];
                    if carry.is_empty() {
                        each(line);
                    } else {
                        carry.extend_from_slice(line);
                        each(carry);
                        carry.clear();
                    }
                    start = end + 1;
                }
                carry.extend_from_slice(&chunk[start..]);
                reader.consume(read);
                Ok(true)
            }
            Lines::Sse(stream) => {
                carry.clear();
                let more = stream.next_data(carry).await?;
                if more {
                    each(carry);
                }
                carry.clear();
                Ok(more)
            }
        }
    }

    /// Reads that returned data so far, where they are counted (TCP).
    pub fn reads(&self) -> Option<u64> {
        match self {
            Lines::Tcp(reader) => Some(reader.get_ref().reads()),
            Lines::Sse(_) => None,
        }
    }
}

/// A connected TCP client, possibly in a room.
pub struct TcpClient {
    /// Its lines.
    pub reader: Reader,
    /// Its writer. Dropping it closes the session, so keep it while reading.
    pub writer: OwnedWriteHalf,
    /// The nick the server gave it.
    pub nick: String,
}

impl TcpClient {
    /// Connects and reads the welcome line. A server that refuses because the
    /// random guest nick it drew is taken (possible in a cluster) is asked again.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<TcpClient> {
        let mut attempt = 1;
        loop {
            match TcpClient::connect_once(addr).await {
                Err(e) if attempt < GUEST_NICK_ATTEMPTS && e.to_string().contains("nick-taken") => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn connect_once(addr: SocketAddr) -> anyhow::Result<TcpClient> {
        let stream = dial(addr).await?;
        let (read, writer) = stream.into_split();
        let mut reader = reader(read);
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            bail!("{addr} closed the connection before its welcome");
        }
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end();
        let Some(nick) = welcome_nick(line) else {
            bail!("{addr} refused the connection: {line}");
        };
        Ok(TcpClient {
            reader,
            writer,
            nick: nick.to_owned(),
        })
    }

    /// Connects, chooses `rendering` and joins `room`, returning once the
    /// server has confirmed the join.
    pub async fn join(
        addr: SocketAddr,
        rendering: Rendering,
        room: &str,
    ) -> anyhow::Result<TcpClient> {
        let mut client = TcpClient::connect(addr).await?;
        let mut commands = String::new();
        if rendering == Rendering::Json {
            commands.push_str("/format json\n");
        }
        commands.push_str(&format!("/join {room}\n"));
        client.writer.write_all(commands.as_bytes()).await?;
        let joined_json = format!(r#""nick":"{}""#, client.nick);
        let joined_text = format!("* {} joined", client.nick);
        let mut line = Vec::new();
        loop {
            line.clear();
            if client.reader.read_until(b'\n', &mut line).await? == 0 {
                bail!("{addr} closed the connection while joining {room}");
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            if text.starts_with("! ") || text.contains(r#""type":"error""#) {
                bail!("{addr} refused to join {room}: {text}");
            }
            let json_join = text.contains(r#""type":"join""#) && text.contains(&joined_json);
            if json_join || text.ends_with(&joined_text) {
                return Ok(client);
            }
        }
    }
}

/// Connections one loopback source address opens before the next is used:
/// one address to one port has about 28,000 ephemeral ports on Linux.
const CONNECTIONS_PER_SOURCE: usize = 20_000;

/// Connections this process has opened, to spread them over source addresses.
static DIALED: AtomicUsize = AtomicUsize::new(0);

/// Connects to `addr` with `TCP_NODELAY`. To a loopback address, after the
/// first 20,000 connections, each next 20,000 come from the next source
/// address (127.0.0.2, .3, ...), so one run can hold more connections than
/// one address has ports. The first ones bind nothing: a port picked at
/// `bind` time may not be one a recently closed connection still holds,
/// while one picked by `connect` may, so a run right after another (its
/// connections in TIME_WAIT) would run out of ports sooner.
pub async fn dial(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let n = DIALED.fetch_add(1, Ordering::Relaxed);
    let stream = match addr {
        SocketAddr::V4(v4) if v4.ip().is_loopback() && n >= CONNECTIONS_PER_SOURCE => {
            let host = 1 + (n / CONNECTIONS_PER_SOURCE % 250) as u8;
            let socket = TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0)))?;
            socket.connect(addr).await
        }
        _ => TcpStream::connect(addr).await,
    }
    .with_context(|| format!("could not connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// An IRC client (RFC 1459/2812 subset: NICK, USER, JOIN, PRIVMSG), for a
/// baseline server. It does not answer PINGs: the baseline's configuration
/// (`bench/ngircd`) sets a ping timeout longer than any run.
pub struct IrcClient {
    /// Its lines.
    pub reader: Reader,
    /// Its writer.
    pub writer: OwnedWriteHalf,
}

/// Tries at an IRC connection that was reset while registering.
const IRC_ATTEMPTS: u32 = 5;

/// Whether `error` comes from a connection the server reset.
fn was_reset(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset)
    })
}

/// IRC nicks handed out by this process.
static IRC_NICKS: AtomicUsize = AtomicUsize::new(0);

impl IrcClient {
    /// Connects and registers under a fresh nick, returning after the
    /// welcome numeric (001). A connection reset while registering is tried
    /// again: a server with a short accept queue (ngircd's holds 10) resets
    /// some of many connections opened at once, which is not what is measured.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<IrcClient> {
        let mut attempt = 1;
        loop {
            match IrcClient::connect_once(addr).await {
                Err(e) if attempt < IRC_ATTEMPTS && was_reset(&e) => attempt += 1,
                result => return result,
            }
        }
    }

    async fn connect_once(addr: SocketAddr) -> anyhow::Result<IrcClient> {
        let (read, mut writer) = dial(addr).await?.into_split();
        let n = IRC_NICKS.fetch_add(1, Ordering::Relaxed);
        let nick = format!("b{:x}x{n}", std::process::id());
        let hello = format!("NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n");
        writer.write_all(hello.as_bytes()).await?;
        let mut client = IrcClient {
            reader: reader(read),
            writer,
        };
        client.wait_for("001").await?;
        Ok(client)
    }

    /// Connects, registers and joins `#room`, returning at the end of the
    /// channel's names list (366), after which the channel's messages flow.
    pub async fn join(addr: SocketAddr, room: &str) -> anyhow::Result<IrcClient> {
        let mut client = IrcClient::connect(addr).await?;
        client
            .writer
            .write_all(format!("JOIN #{room}\r\n").as_bytes())
            .await?;
        client.wait_for("366").await?;
        Ok(client)
    }

    /// Reads lines until the numeric `want`; fails on `ERROR` or an error
    /// numeric (4xx, 5xx).
    async fn wait_for(&mut self, want: &str) -> anyhow::Result<()> {
        let mut line = Vec::new();
        loop {
            line.clear();
            if self.reader.read_until(b'\n', &mut line).await? == 0 {
                bail!("the IRC server closed the connection while waiting for {want}");
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            match irc_numeric(text) {
                Some(n) if n == want => return Ok(()),
                Some(n) if n.starts_with('4') || n.starts_with('5') => {
                    bail!("the IRC server refused: {text}")
                }
                _ if text.starts_with("ERROR") => bail!("the IRC server refused: {text}"),
                _ => {}
            }
        }
    }
}

/// The numeric of `:server 001 nick :text`, if the line is one.
fn irc_numeric(line: &str) -> Option<&str> {
    let mut words = line.strip_prefix(':')?.split(' ');
    words.next()?;
    words
        .next()
        .filter(|w| w.len() == 3 && w.bytes().all(|b| b.is_ascii_digit()))
}

/// The nick in `* welcome to baby-discord (instance a1). You are NICK. /help ...`.
fn welcome_nick(line: &str) -> Option<&str> {
    let rest = line.split_once("You are ")?.1;
    rest.split_once(". ").map(|(nick, _)| nick)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nick_is_read_from_the_welcome() {
        let line =
            "* welcome to baby-discord (instance a1). You are guest-7f3a. /help for commands";
        assert_eq!(welcome_nick(line), Some("guest-7f3a"));
        assert_eq!(welcome_nick("! unavailable: too many connections"), None);
    }

    #[tokio::test]
    async fn a_line_cut_between_reads_is_handed_over_whole() {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        let (read, _write) = ours.into_split();
        let mut lines = Lines::Tcp(reader(read));
        let mut carry = Vec::new();
        let mut seen = Vec::new();
        // On loopback a small write is in the peer's queue when `write_all`
        // returns, so each part comes in one read.
        for part in [&b"one\ntw"[..], b"o", b"\nthree\nfour\n"] {
            peer.write_all(part).await.unwrap();
            let more = lines.next_read(&mut carry, |l| seen.push(l.to_vec()));
            assert!(more.await.unwrap());
        }
        let seen: Vec<&[u8]> = seen.iter().map(Vec::as_slice).collect();
        assert_eq!(seen, [&b"one\n"[..], b"two\n", b"three\n", b"four\n"]);
        assert_eq!(lines.reads(), Some(3));
    }

    #[test]
    fn irc_numerics_are_told_from_messages() {
        assert_eq!(irc_numeric(":irc.local 001 b1 :Welcome"), Some("001"));
        assert_eq!(
            irc_numeric(":irc.local 366 b1 #r :End of NAMES"),
            Some("366")
        );
        assert_eq!(irc_numeric(":a!u@h PRIVMSG #r :001"), None);
        assert_eq!(irc_numeric("PING :irc.local"), None);
    }
}
