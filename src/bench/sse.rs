//! One benchmark receiver over HTTP and SSE (PROTOCOL.md, "HTTP adapter"):
//! `POST /connect`, `GET /events?session=`, `POST /command` to join, then the
//! `data:` lines of the stream. A server whose HTTP adapter answers `503` makes
//! the workload fail with a message that says so.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// An open `GET /events` stream.
pub struct SseStream {
    body: Incoming,
    buffer: BytesMut,
}

impl SseStream {
    /// Reads the next `data:` line into `buf` (without the `data:` prefix);
    /// false at end of stream.
    pub async fn next_data(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<bool> {
        loop {
            while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line = self.buffer.split_to(end + 1);
                if let Some(data) = line.strip_prefix(b"data:") {
                    let data = data.strip_prefix(b" ").unwrap_or(data);
                    buf.extend_from_slice(data);
                    return Ok(true);
                }
            }
            match self.body.frame().await {
                None => return Ok(false),
                Some(frame) => {
                    if let Ok(mut data) = frame?.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buffer.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
            }
        }
    }
}

impl SseStream {
    /// Opens a plain SSE stream (`GET path`), for a hub that is not this
    /// server (`bench fanout --receivers sse-peer`).
    pub async fn open(addr: SocketAddr, path: &str) -> anyhow::Result<SseStream> {
        let (status, body) = request(addr, Method::GET, path, None, "").await?;
        if status != StatusCode::OK {
            bail!("{addr} answered {status} to GET {path}");
        }
        Ok(SseStream {
            body,
            buffer: BytesMut::new(),
        })
    }
}

/// An HTTP session with its event stream open.
pub struct SseClient {
    /// The session's events.
    pub stream: SseStream,
    /// The session token.
    pub session: String,
    /// The nick the server gave it.
    pub nick: String,
}

impl SseClient {
    /// Opens a session and its event stream.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<SseClient> {
        let (status, body) = request(addr, Method::POST, "/connect", None, "{}").await?;
        let body = body.collect().await?.to_bytes();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            bail!(
                "{addr} answered 503 to POST /connect: its HTTP adapter is unavailable, and SSE \
                 workloads need it ({})",
                String::from_utf8_lossy(&body)
            );
        }
        if status != StatusCode::CREATED && status != StatusCode::OK {
            bail!(
                "{addr} answered {status} to POST /connect: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let reply: serde_json::Value =
            serde_json::from_slice(&body).context("POST /connect did not answer JSON")?;
        let session = reply["session"]
            .as_str()
            .context("POST /connect answered no session")?
            .to_owned();
        let nick = reply["nick"].as_str().unwrap_or_default().to_owned();
        let path = format!("/events?session={session}");
        let (status, body) = request(addr, Method::GET, &path, None, "").await?;
        if status != StatusCode::OK {
            bail!("{addr} answered {status} to GET /events");
        }
        Ok(SseClient {
            stream: SseStream {
                body,
                buffer: BytesMut::new(),
            },
            session,
            nick,
        })
    }

    /// Opens a session and joins `room`, returning once the stream shows the join.
    pub async fn join(addr: SocketAddr, room: &str) -> anyhow::Result<SseClient> {
        let mut client = SseClient::connect(addr).await?;
        let line = serde_json::json!({ "line": format!("/join {room}") }).to_string();
        let (status, body) =
            request(addr, Method::POST, "/command", Some(&client.session), &line).await?;
        let body = body.collect().await?.to_bytes();
        if status != StatusCode::OK {
            bail!(
                "{addr} answered {status} to /join {room}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let joined = format!(r#""nick":"{}""#, client.nick);
        let mut data = Vec::new();
        loop {
            data.clear();
            if !client.stream.next_data(&mut data).await? {
                bail!("{addr} ended the event stream while joining {room}");
            }
            let text = String::from_utf8_lossy(&data);
            if text.contains(r#""type":"join""#) && text.contains(&joined) {
                return Ok(client);
            }
        }
    }
}

/// Sends one request on a fresh connection and returns the status and body.
async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> anyhow::Result<(StatusCode, Incoming)> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("could not connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection task ends when the response (or stream) does.
    tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    let request = builder.body(Full::new(Bytes::copy_from_slice(body.as_bytes())))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    Ok((status, response.into_body()))
}
