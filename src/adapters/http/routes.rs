//! The routes of PROTOCOL.md ("HTTP adapter"): parse the request, call the
//! core, render the answer. Errors are an `error` event as the body, with the
//! status the protocol gives its code.
//!
//! ```text
//! GET  /                         the browser page
//! POST /connect                  {"nick"?}            201 {"session","nick","instance"}
//! POST /command                  {"line"}             200 {"events":[...]}
//! POST /message                  {"room"?,"text"}     200 {"room","seq","id"} (Idempotency-Key?)
//! POST /disconnect[?session=TOKEN&grace=S]            204
//! GET  /events?session=TOKEN                          SSE, the session's events
//! GET  /messages/{room}                               SSE, one room, read-only
//! GET  /rooms                                         {"rooms":[{room,members}]}
//! GET  /rooms/{room}/history?before=SEQ&limit=N       {"messages":[...]}
//! GET  /healthz                                       200 / 503
//! GET  /metrics                                       Prometheus text
//! ```

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::super::peers::Peers;
use super::metrics::{self, Metrics};
use super::sessions::{AttachError, HttpSession, Sessions, new_token};
use super::sse::{self, StreamContext};
use crate::core::{
    ErrorCode, Event, EventBody, Hub, IdempotencyKey, MAX_HISTORY, MessageKind, Nick, Refusal,
    Replies, RoomName, Text,
};

/// Every response body: a whole buffer or an SSE stream.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What a request's body may be: hyper's, or none for a stream request
/// read by `stream.rs`.
pub trait RequestBody:
    hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<B> RequestBody for B where
    B: hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
}

/// The browser client, one file, no build step.
const PAGE: &str = include_str!("page.html");
/// Messages per history page when `limit` is not given.
const DEFAULT_PAGE: u32 = 50;
/// How long a health check may take per dependency.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `POST /disconnect` waits for the session table to let go.
const ENDING: Duration = Duration::from_secs(2);
/// Longest `grace` a `POST /disconnect` may ask for, in seconds.
const MAX_GRACE_SECS: u64 = 10;

/// The state the routes share.
pub struct Routes {
    /// The chat core.
    pub hub: Hub,
    /// HTTP sessions by token.
    pub sessions: Arc<Sessions>,
    /// `/metrics`.
    pub metrics: Metrics,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// How long a body may take to arrive.
    pub body_timeout: Duration,
    /// Time between SSE pings.
    pub sse_ping: Duration,
    /// Fires when the daemon stops.
    pub shutdown: CancellationToken,
    /// Where session supervisors run.
    pub tracker: TaskTracker,
    /// Open SSE streams.
    pub streams: Arc<AtomicI64>,
    /// Limits per client address (`POST /connect`).
    pub peers: Arc<Peers>,
}

/// An answer that is not the happy path: status plus an `error` event.
struct Failure(StatusCode, Event);

impl Failure {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Failure(status, Event::error(code, message))
    }

    fn refused(refusal: Refusal) -> Self {
        Failure(
            status_of(refusal.code),
            Event::error(refusal.code, refusal.message),
        )
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadArguments, message)
    }

    fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unavailable,
            "unknown or expired session; POST /connect for a new one",
        )
    }
}

type Answer = Result<Response<Body>, Failure>;

/// The status for an error code (PROTOCOL.md, "HTTP adapter", statuses).
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::NickTaken => StatusCode::CONFLICT,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable | ErrorCode::SlowConsumer => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    // Plain structs and maps of strings and numbers always serialise.
    json_bytes(
        status,
        serde_json::to_vec(value).expect("a response body serialises"),
    )
}

/// A JSON response of `body`, which is JSON already.
fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(body))
        .expect("static headers are valid")
}

/// `{"KEY":[...]}` built from events' canonical JSON, verbatim (the same bytes
/// the stream and TCP clients get, and no second serialisation).
fn raw_json_response<'a>(
    status: StatusCode,
    key: &str,
    events: impl Iterator<Item = &'a Event>,
) -> Response<Body> {
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(b"{\"");
    body.extend_from_slice(key.as_bytes());
    body.extend_from_slice(b"\":[");
    for (i, event) in events.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(event.json());
    }
    body.extend_from_slice(b"]}");
    json_bytes(status, body)
}

/// The answer to `POST /connect`.
#[derive(Serialize)]
struct Connected<'a> {
    session: &'a str,
    nick: &'a Nick,
    instance: &'a str,
}

/// The answer to `POST /message`.
#[derive(Serialize)]
struct Sent<'a> {
    room: &'a RoomName,
    seq: u64,
    id: uuid::Uuid,
}

fn error_response(Failure(status, event): Failure) -> Response<Body> {
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store");
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body is not read; the connection cannot be reused.
        response = response.header(header::CONNECTION, "close");
    }
    response
        .body(full(event.json().clone()))
        .expect("static headers are valid")
}

/// The answer to every request on a connection over a connection limit
/// (`why` says which).
pub fn overloaded(why: &str) -> Response<Body> {
    let mut response = error_response(Failure::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        why,
    ));
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The query parameter `name`, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| {
            percent_decode_str(&value.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// A path segment, percent-decoded (`%23general` is `#general`).
fn segment(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn parse_room(s: &str) -> Result<RoomName, Failure> {
    RoomName::parse(&segment(s)).map_err(Failure::refused)
}

#[derive(Deserialize)]
struct ConnectBody {
    nick: Option<String>,
}

#[derive(Deserialize)]
struct CommandBody {
    line: String,
}

#[derive(Deserialize)]
struct MessageBody {
    room: Option<String>,
    text: String,
}

/// Parses a JSON body; an empty one reads as `{}` when `empty_ok`.
fn decode_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], empty_ok: bool) -> Result<T, Failure> {
    let bytes: &[u8] = if empty_ok && bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|err| Failure::bad(format!("bad JSON: {err}")))
}

/// Runs `bytes` through every body decoder and the checks the handlers apply
/// before anything reaches the hub, as the fuzz target needs them. A refusal
/// must be a client error: a 5xx here would blame the server for bad input.
#[cfg(feature = "fuzzing")]
pub(crate) fn check_bodies(bytes: &[u8], max_text: usize) {
    let client_error = |f: &Failure| {
        assert!(f.0.is_client_error(), "{} for bad input", f.0);
    };
    match decode_json::<ConnectBody>(bytes, true) {
        Ok(body) => {
            if let Some(nick) = body
                .nick
                .as_deref()
                .map(str::trim)
                .filter(|n| !n.is_empty())
            {
                let _ = Nick::parse(nick).map_err(|r| client_error(&Failure::refused(r)));
            }
        }
        Err(f) => client_error(&f),
    }
    match decode_json::<CommandBody>(bytes, false) {
        Ok(body) => {
            let _ = crate::core::parse(&body.line, max_text)
                .map_err(|r| client_error(&Failure::refused(r)));
        }
        Err(f) => client_error(&f),
    }
    match decode_json::<MessageBody>(bytes, false) {
        Ok(body) => {
            if let Some(room) = body.room.as_deref().filter(|r| !r.is_empty()) {
                let _ = RoomName::parse(room).map_err(|r| client_error(&Failure::refused(r)));
            }
            let _ =
                Text::parse(&body.text, max_text).map_err(|r| client_error(&Failure::refused(r)));
        }
        Err(f) => client_error(&f),
    }
}

impl Routes {
    /// Answers one request.
    pub async fn handle<B: RequestBody>(
        &self,
        req: Request<B>,
        connection: CancellationToken,
        peer: IpAddr,
    ) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let method = req.method().clone();
        let (route, answer): (&'static str, Answer) = match (&method, parts.as_slice()) {
            (&Method::GET, [""]) => ("/", Ok(page())),
            (&Method::POST, ["connect"]) => ("/connect", self.connect(req, peer).await),
            (&Method::POST, ["command"]) => ("/command", self.command(req).await),
            (&Method::POST, ["message"]) => ("/message", self.message(req).await),
            (&Method::POST, ["disconnect"]) => ("/disconnect", self.disconnect(req).await),
            (&Method::GET, ["events"]) => ("/events", self.events(req, connection).await),
            (&Method::GET, ["messages", room]) => (
                "/messages/{room}",
                self.room_stream(room, req.headers(), connection).await,
            ),
            (&Method::GET, ["rooms"]) => ("/rooms", self.rooms().await),
            (&Method::GET, ["rooms", room, "history"]) => (
                "/rooms/{room}/history",
                self.history(room, req.uri().query()).await,
            ),
            (&Method::GET, ["healthz"]) => ("/healthz", self.healthz().await),
            (&Method::GET, ["metrics"]) => ("/metrics", Ok(self.metrics())),
            (_, [""] | ["events" | "rooms" | "healthz" | "metrics"])
            | (_, ["connect" | "command" | "message" | "disconnect"])
            | (_, ["messages", _] | ["rooms", _, "history"]) => (
                "other",
                Err(Failure::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    ErrorCode::BadArguments,
                    format!("{method} is not allowed on {path}"),
                )),
            ),
            _ => (
                "other",
                Err(Failure::new(
                    StatusCode::NOT_FOUND,
                    ErrorCode::UnknownCommand,
                    "no such route; see GET / or the protocol",
                )),
            ),
        };
        let response = answer.unwrap_or_else(error_response);
        self.metrics.request(route, response.status().as_u16());
        response
    }

    /// Reads a body of at most `max_body` bytes: a declared length over the
    /// limit is refused before reading any of it, a chunked body as soon as it
    /// passes the limit.
    async fn body<B: RequestBody>(&self, req: Request<B>) -> Result<Bytes, Failure> {
        let too_large = || {
            Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLong,
                format!("request bodies are at most {} bytes", self.max_body),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return Err(too_large());
        }
        let limited = Limited::new(req.into_body(), self.max_body);
        match tokio::time::timeout(self.body_timeout, limited.collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Ok(Err(_)) => Err(Failure::bad("the request body could not be read")),
            Err(_) => Err(Failure::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BadArguments,
                "the request body took too long",
            )),
        }
    }

    /// Reads and parses a JSON body; an empty body reads as `{}` when allowed.
    async fn json<T: for<'de> Deserialize<'de>, B: RequestBody>(
        &self,
        req: Request<B>,
        empty_ok: bool,
    ) -> Result<T, Failure> {
        let bytes = self.body(req).await?;
        decode_json(&bytes, empty_ok)
    }

    /// The session a request names: `Authorization: Bearer TOKEN` or `?session=TOKEN`.
    fn session<B>(&self, req: &Request<B>) -> Result<Arc<HttpSession>, Failure> {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned());
        let token = bearer.or_else(|| query_param(req.uri().query(), "session"));
        let session = token
            .and_then(|t| self.sessions.get(&t))
            .ok_or_else(Failure::unauthorized)?;
        // Also asked of the core: the adapter learns that the core ended a
        // session (a slow consumer, say) a moment later, and a command in
        // between was answered 200 with nothing in it.
        if session.has_ended() || !self.hub.is_connected(session.id) {
            return Err(Failure::unauthorized());
        }
        Ok(session)
    }

    async fn connect<B: RequestBody>(&self, req: Request<B>, peer: IpAddr) -> Answer {
        // The body is read first, even when refused, so the connection can be reused.
        let body: ConnectBody = self.json(req, true).await?;
        if !self.peers.may_connect(peer) {
            let limits = self.peers.limits();
            return Err(Failure::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                format!(
                    "slow down: at most {} new sessions a second from one address (bursts of {}); \
                     reuse the session you have",
                    limits.connect_rate, limits.connect_burst
                ),
            ));
        }
        let nick = match body.nick.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(nick) => Some(Nick::parse(nick).map_err(Failure::refused)?),
        };
        if !self.sessions.has_room() {
            return Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "too many sessions; try again later",
            ));
        }
        let token = new_token();
        let handle = self
            .hub
            .connect(nick, Replies::Caller, Some(token.clone()))
            .await
            .map_err(Failure::refused)?;
        let (id, nick) = (handle.id, handle.nick.clone());
        if self
            .sessions
            .insert(&self.hub, token.clone(), handle, &self.tracker)
            .is_err()
        {
            self.hub.disconnect(id, crate::core::EndReason::Quit);
            return Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "too many sessions; try again later",
            ));
        }
        tracing::info!(%peer, session = %id, %nick, "http session opened");
        let body = Connected {
            session: &token,
            nick: &nick,
            instance: self.hub.instance(),
        };
        Ok(json_response(StatusCode::CREATED, &body))
    }

    async fn command<B: RequestBody>(&self, req: Request<B>) -> Answer {
        let session = self.session(&req)?;
        let body: CommandBody = self.json(req, false).await?;
        let events = match self.hub.parse(&body.line) {
            Ok(None) => Vec::new(),
            Ok(Some(command)) => self.hub.handle(session.id, command).await,
            Err(refusal) => return Err(Failure::refused(refusal)),
        };
        // The core answers every command of a session it knows; nothing
        // means it ended the session while the command ran.
        if events.is_empty() && !self.hub.is_connected(session.id) {
            return Err(Failure::unauthorized());
        }
        // A refused command is answered as an error, with its status.
        if let [event] = events.as_slice()
            && let EventBody::Error { code, .. } = event.body()
        {
            return Err(Failure(status_of(*code), event.clone()));
        }
        Ok(raw_json_response(StatusCode::OK, "events", events.iter()))
    }

    async fn message<B: RequestBody>(&self, req: Request<B>) -> Answer {
        let session = self.session(&req)?;
        let key = idempotency_key(req.headers())?;
        let body: MessageBody = self.json(req, false).await?;
        let room = match body.room.as_deref() {
            None | Some("") => None,
            Some(room) => Some(RoomName::parse(room).map_err(Failure::refused)?),
        };
        let text = Text::parse(&body.text, self.hub.limits().max_text).map_err(Failure::refused)?;
        let message = self
            .hub
            .say(session.id, room, text, MessageKind::Text, key)
            .await
            .map_err(Failure::refused)?;
        let body = Sent {
            room: &message.room,
            seq: message.seq,
            id: message.id,
        };
        Ok(json_response(StatusCode::OK, &body))
    }

    /// Ends the session now or, with `?grace=S`, in `S` seconds unless a new
    /// stream attaches meanwhile. A closing browser tab cannot tell a reload
    /// from a close, so the page says "I am leaving" on both: a reload's new
    /// page reattaches and keeps the session; a closed tab frees its nick
    /// within `S` seconds rather than after the whole linger window. The
    /// token may come as `?session=` because `navigator.sendBeacon` cannot set
    /// headers.
    async fn disconnect<B: RequestBody>(&self, req: Request<B>) -> Answer {
        let session = self.session(&req)?;
        let grace = match query_param(req.uri().query(), "grace") {
            None => None,
            Some(s) => match s.parse::<u64>() {
                Ok(secs) if (1..=MAX_GRACE_SECS).contains(&secs) => Some(Duration::from_secs(secs)),
                _ => {
                    return Err(Failure::bad(format!(
                        "grace is a number of seconds from 1 to {MAX_GRACE_SECS}"
                    )));
                }
            },
        };
        match grace {
            None => {
                self.hub
                    .disconnect(session.id, crate::core::EndReason::Quit);
                // The session table learns of the end from its own task:
                // answer once it has, so the token is refused from the 204 on.
                if tokio::time::timeout(ENDING, session.ended()).await.is_err() {
                    tracing::warn!(session = %session.id, "a disconnected session did not end in time");
                }
            }
            Some(grace) => {
                let hub = self.hub.clone();
                let shutdown = self.shutdown.clone();
                // Streams attached so far; one more means the page came back.
                let streams_then = session.streams_attached();
                self.tracker.spawn(async move {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(grace) => {
                            if session.streams_attached() == streams_then {
                                hub.disconnect(session.id, crate::core::EndReason::Quit);
                            }
                        }
                    }
                });
            }
        }
        Ok(Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(full(Bytes::new()))
            .expect("static response is valid"))
    }

    fn stream_context(&self, connection: CancellationToken) -> StreamContext {
        StreamContext {
            hub: self.hub.clone(),
            ping: self.sse_ping,
            shutdown: self.shutdown.clone(),
            connection,
            open: self.streams.clone(),
        }
    }

    async fn events<B: RequestBody>(
        &self,
        req: Request<B>,
        connection: CancellationToken,
    ) -> Answer {
        let session = self.session(&req)?;
        let last = last_event_id(req.headers());
        let attached = session
            .attach(connection.clone())
            .await
            .map_err(|err| match err {
                AttachError::Ended => Failure::unauthorized(),
                // The session is alive: say it is busy, not that it is unknown.
                AttachError::Busy => Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    "this session's previous stream is still closing; try again",
                ),
            })?;
        let stream = sse::session_stream(self.stream_context(connection), attached, last);
        Ok(sse_response(stream))
    }

    async fn room_stream(
        &self,
        room: &str,
        headers: &HeaderMap,
        connection: CancellationToken,
    ) -> Answer {
        let room = parse_room(room)?;
        let after = last_event_id(headers)
            .and_then(|id| sse::parse_room_id(&id))
            .filter(|(r, _)| *r == room)
            .map(|(_, seq)| seq);
        let watch = self
            .hub
            .watch(room.clone())
            .await
            .map_err(Failure::refused)?;
        let stream = sse::room_stream(self.stream_context(connection), room, watch, after);
        Ok(sse_response(stream))
    }

    async fn rooms(&self) -> Answer {
        let rooms = self.hub.room_list().await.map_err(Failure::refused)?;
        #[derive(Serialize)]
        struct Rooms {
            rooms: Vec<crate::core::RoomCount>,
        }
        Ok(json_response(StatusCode::OK, &Rooms { rooms }))
    }

    async fn history(&self, room: &str, query: Option<&str>) -> Answer {
        let room = parse_room(room)?;
        let before = match query_param(query, "before") {
            None => None,
            Some(s) => Some(
                s.parse::<u64>()
                    .map_err(|_| Failure::bad("before is a seq: a whole number"))?,
            ),
        };
        let limit = match query_param(query, "limit") {
            None => DEFAULT_PAGE,
            Some(s) => match s.parse::<u32>() {
                Ok(n) if n >= 1 => n.min(u32::from(MAX_HISTORY)),
                _ => return Err(Failure::bad("limit is a number from 1 to 100")),
            },
        };
        let messages = self
            .hub
            .history_page(&room, before, limit)
            .await
            .map_err(Failure::refused)?;
        let events: Vec<Event> = messages.into_iter().map(Event::message).collect();
        Ok(raw_json_response(StatusCode::OK, "messages", events.iter()))
    }

    async fn healthz(&self) -> Answer {
        let store = tokio::time::timeout(HEALTH_TIMEOUT, self.hub.store().ping()).await;
        let store = match store {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("timed out".to_owned()),
        };
        let bus = tokio::time::timeout(HEALTH_TIMEOUT, self.hub.bus().health()).await;
        let bus = match bus {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("timed out".to_owned()),
        };
        self.metrics
            .store_up
            .store(u8::from(store.is_ok()), Ordering::Relaxed);
        self.metrics
            .bus_up
            .store(u8::from(bus.is_ok()), Ordering::Relaxed);
        let (sessions, rooms) = self.hub.counts();
        let shutting_down = self.shutdown.is_cancelled();
        let ok = store.is_ok() && bus.is_ok() && !shutting_down;
        let mut body = json!({
            "status": if ok { "ok" } else { "unavailable" },
            "instance": self.hub.instance(),
            "store": self.hub.store().engine(),
            "bus": self.hub.bus().name(),
            "sessions": sessions,
            "rooms": rooms,
        });
        let problems: Vec<String> = [
            store.err().map(|e| format!("store: {e}")),
            bus.err().map(|e| format!("bus: {e}")),
            shutting_down.then(|| "shutting down".to_owned()),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !problems.is_empty() {
            body["problems"] = json!(problems);
        }
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        Ok(json_response(status, &body))
    }

    fn metrics(&self) -> Response<Body> {
        Response::builder()
            .header(header::CONTENT_TYPE, metrics::CONTENT_TYPE)
            .body(full(self.metrics.render()))
            .expect("static headers are valid")
    }
}

/// The page's Content-Security-Policy: its one inline script and one inline
/// style are allowed by their SHA-256, nothing else runs or styles the page
/// (no `'unsafe-inline'`), and it talks only to its own origin.
fn page_csp() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        let hash = |open: &str, close: &str| {
            use base64::Engine as _;
            use sha2::Digest as _;
            let start = PAGE.find(open).expect("the page has the element") + open.len();
            let len = PAGE[start..].find(close).expect("the element is closed");
            let digest = sha2::Sha256::digest(&PAGE.as_bytes()[start..start + len]);
            base64::engine::general_purpose::STANDARD.encode(digest)
        };
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
             connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
            hash("<script>", "</script>"),
            hash("<style>", "</style>"),
        )
    })
}

fn page() -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CONTENT_SECURITY_POLICY, page_csp())
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .body(full(PAGE))
        .expect("static headers are valid")
}

/// The `Idempotency-Key` of a `POST /message`, if any: a retry with the same
/// key is answered with the first send's receipt (PROTOCOL.md).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, Failure> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let value = value.to_str().unwrap_or_default();
    IdempotencyKey::parse(value)
        .map(Some)
        .map_err(Failure::refused)
}

fn last_event_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .filter(|s| !s.is_empty())
}

fn sse_response(
    stream: impl futures::Stream<Item = Result<hyper::body::Frame<Bytes>, Infallible>> + Send + 'static,
) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_protocol() {
        assert_eq!(status_of(ErrorCode::NickTaken), StatusCode::CONFLICT);
        assert_eq!(
            status_of(ErrorCode::RateLimited),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(status_of(ErrorCode::InvalidNick), StatusCode::BAD_REQUEST);
        assert_eq!(
            status_of(ErrorCode::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn query_params_are_decoded() {
        let q = Some("session=abc&before=12&room=%23general");
        assert_eq!(query_param(q, "session").as_deref(), Some("abc"));
        assert_eq!(query_param(q, "before").as_deref(), Some("12"));
        assert_eq!(query_param(q, "room").as_deref(), Some("#general"));
        assert_eq!(query_param(q, "limit"), None);
        assert_eq!(query_param(None, "session"), None);
    }
}
