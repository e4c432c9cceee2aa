//! A small HTTP client for the tests: one connection per request (HTTP/1.1, or
//! HTTP/2 cleartext with prior knowledge), JSON helpers and an SSE reader.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::WAIT;

/// Which HTTP version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.1.
    H1,
    /// HTTP/2 over cleartext TCP, with prior knowledge (h2c).
    H2,
}

/// A client for one server.
#[derive(Debug, Clone, Copy)]
pub struct Http {
    /// The server.
    pub addr: SocketAddr,
    /// The version spoken.
    pub version: Version,
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    /// Its status code.
    pub status: u16,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
    /// The version the server answered with.
    pub version: hyper::Version,
}

impl Reply {
    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A response whose body is still arriving.
pub struct Open {
    /// Its status code.
    pub status: u16,
    /// Its headers.
    pub headers: HeaderMap,
    /// The version the server answered with.
    pub version: hyper::Version,
    body: Incoming,
    connection: JoinHandle<()>,
}

impl Drop for Open {
    fn drop(&mut self) {
        // Closes the socket, as a browser tab that goes away does.
        self.connection.abort();
    }
}

impl Http {
    /// An HTTP/1.1 client.
    pub fn new(addr: SocketAddr) -> Http {
        Http {
            addr,
            version: Version::H1,
        }
    }

    /// An HTTP/2 (h2c) client.
    pub fn h2(addr: SocketAddr) -> Http {
        Http {
            addr,
            version: Version::H2,
        }
    }

    /// Sends a request on a new connection and returns once the head arrives.
    pub async fn open(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Open {
        self.try_open(method, path, headers, body)
            .await
            .unwrap_or_else(|err| panic!("{path}: {err}"))
    }

    /// `GET path`, or why there was no answer: for probing a server that may
    /// not be ready (it may accept a connection and close it unanswered).
    pub async fn try_get(&self, path: &str) -> Result<Reply, String> {
        self.try_request(Method::GET, path, &[], None).await
    }

    async fn try_open(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Result<Open, String> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|err| format!("connect: {err}"))?;
        let io = TokioIo::new(stream);
        let mut req = Request::builder().method(method).uri(path);
        if self.version == Version::H1 {
            req = req.header("host", self.addr.to_string());
        } else {
            req = req.uri(format!("http://{}{}", self.addr, path));
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .expect("a valid request");
        let (response, connection) = match self.version {
            Version::H1 => {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|err| format!("HTTP/1.1 handshake: {err}"))?;
                let connection = tokio::spawn(async move {
                    let _ = conn.await;
                });
                (sender.send_request(req).await, connection)
            }
            Version::H2 => {
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|err| format!("HTTP/2 handshake: {err}"))?;
                let connection = tokio::spawn(async move {
                    let _ = conn.await;
                });
                (sender.send_request(req).await, connection)
            }
        };
        let response = response.map_err(|err| format!("no response: {err}"))?;
        let (parts, body) = response.into_parts();
        Ok(Open {
            status: parts.status.as_u16(),
            headers: parts.headers,
            version: parts.version,
            body,
            connection,
        })
    }

    /// Sends a request and reads the whole response (within [`WAIT`]).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Reply {
        self.try_request(method, path, headers, body)
            .await
            .unwrap_or_else(|err| panic!("{path}: {err}"))
    }

    async fn try_request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Result<Reply, String> {
        let fut = async {
            let mut open = self.try_open(method, path, headers, body).await?;
            let body = (&mut open.body)
                .collect()
                .await
                .map_err(|err| format!("the whole body: {err}"))?
                .to_bytes();
            Ok(Reply {
                status: open.status,
                headers: std::mem::take(&mut open.headers),
                body,
                version: open.version,
            })
        };
        tokio::time::timeout(WAIT, fut)
            .await
            .map_err(|_| "no response within the wait".to_owned())?
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Reply {
        self.request(Method::GET, path, &[], None).await
    }

    /// `POST path` with a JSON body and, if given, a bearer token.
    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("authorization", auth.as_str()));
        }
        self.request(
            Method::POST,
            path,
            &headers,
            Some(Bytes::from(body.to_string())),
        )
        .await
    }

    /// `POST /connect`; returns the token and nick.
    pub async fn connect(&self, nick: Option<&str>) -> (String, String) {
        let body = match nick {
            Some(nick) => serde_json::json!({ "nick": nick }),
            None => serde_json::json!({}),
        };
        let reply = self.post("/connect", None, &body).await;
        assert_eq!(reply.status, 201, "{}", reply.text());
        let v = reply.json();
        (
            v["session"].as_str().unwrap().to_owned(),
            v["nick"].as_str().unwrap().to_owned(),
        )
    }

    /// `POST /command`; returns the reply.
    pub async fn command(&self, token: &str, line: &str) -> Reply {
        self.post(
            "/command",
            Some(token),
            &serde_json::json!({ "line": line }),
        )
        .await
    }

    /// Opens an SSE stream, optionally resuming after `last_event_id`.
    pub async fn sse(&self, path: &str, last_event_id: Option<&str>) -> Sse {
        let mut headers = vec![("accept", "text/event-stream")];
        if let Some(id) = last_event_id {
            headers.push(("last-event-id", id));
        }
        let open = tokio::time::timeout(WAIT, self.open(Method::GET, path, &headers, None))
            .await
            .expect("the stream opens within the wait");
        assert_eq!(open.status, 200, "stream {path} refused");
        assert_eq!(
            open.headers
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        Sse {
            open,
            buf: String::new(),
            last_id: None,
        }
    }
}

/// One SSE frame.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    /// `id:`, if the frame had one.
    pub id: Option<String>,
    /// `event:`, if any.
    pub event: Option<String>,
    /// `data:` lines joined by newlines.
    pub data: String,
    /// Comment lines (`: ping`).
    pub comments: Vec<String>,
    /// `retry:`, if any.
    pub retry: Option<u64>,
}

impl Frame {
    /// The data as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("data is not JSON ({e}): {}", self.data))
    }
}

/// An SSE stream being read.
pub struct Sse {
    open: Open,
    buf: String,
    /// The last `id:` seen, as EventSource keeps it.
    pub last_id: Option<String>,
}

impl Sse {
    /// The next frame (comments included), `None` at end of stream. Panics
    /// after [`WAIT`].
    pub async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(at) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..at + 2).collect();
                let mut frame = Frame::default();
                for line in raw.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        frame.comments.push(c.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("id:") {
                        frame.id = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        frame.event = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if !frame.data.is_empty() {
                            frame.data.push('\n');
                        }
                        frame.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    } else if let Some(v) = line.strip_prefix("retry:") {
                        frame.retry = v.trim().parse().ok();
                    }
                }
                if frame.id.is_some() {
                    self.last_id = frame.id.clone();
                }
                return Some(frame);
            }
            let next = tokio::time::timeout(WAIT, self.open.body.frame())
                .await
                .expect("an SSE frame within the wait");
            match next {
                None => return None,
                Some(Err(e)) => panic!("stream failed: {e}"),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.push_str(&String::from_utf8_lossy(&data));
                    }
                }
            }
        }
    }

    /// The next event, or `None` once the stream ends or breaks (its server
    /// died): for tests that resume elsewhere, as EventSource would.
    pub async fn event_or_end(&mut self) -> Option<Frame> {
        loop {
            if self.buf.contains("\n\n") {
                let frame = self.frame().await?;
                if frame.event.is_some() {
                    return Some(frame);
                }
                continue;
            }
            let next = tokio::time::timeout(WAIT, self.open.body.frame())
                .await
                .expect("an SSE frame within the wait");
            match next {
                None | Some(Err(_)) => return None,
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.push_str(&String::from_utf8_lossy(&data));
                    }
                }
            }
        }
    }

    /// The next frame that is an event (skipping pings and `retry:`).
    pub async fn event(&mut self) -> Frame {
        loop {
            let frame = self.frame().await.expect("an event, not end of stream");
            if frame.event.is_some() {
                return frame;
            }
        }
    }

    /// Reads events until one matches, returning it.
    pub async fn expect(&mut self, matches: impl Fn(&Frame, &Value) -> bool) -> Frame {
        loop {
            let frame = self.event().await;
            let v = frame.json();
            if matches(&frame, &v) {
                return frame;
            }
        }
    }
}
