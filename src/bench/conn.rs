//! One benchmark connection over TCP: connect, read the welcome, choose the
//! rendering, join a room, then hand over a line reader and a writer.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

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

/// Where a connection's lines come from.
pub enum Lines {
    /// A TCP connection's lines.
    Tcp(BufReader<OwnedReadHalf>),
    /// An SSE stream's `data:` lines.
    Sse(SseStream),
}

impl Lines {
    /// Reads the next line into `buf` (cleared first); false at end of stream.
    pub async fn next(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<bool> {
        buf.clear();
        match self {
            Lines::Tcp(reader) => Ok(reader.read_until(b'\n', buf).await? > 0),
            Lines::Sse(stream) => stream.next_data(buf).await,
        }
    }
}

/// A connected TCP client, possibly in a room.
pub struct TcpClient {
    /// Its lines.
    pub reader: BufReader<OwnedReadHalf>,
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
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("could not connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        let mut reader = BufReader::new(read);
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
}
