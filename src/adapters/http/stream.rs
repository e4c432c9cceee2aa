//! A connection whose first request opens an event stream, served without
//! hyper's HTTP/1 machinery.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for every
//! HTTP/1 connection, for as long as it lives: for an SSE stream, open for
//! hours and writing a few hundred bytes now and then, that is most of what
//! an idle session costs. A connection whose first bytes are
//! `GET /events...` or `GET /messages/...` on HTTP/1.1 comes here instead:
//! its head is read into a buffer freed once parsed, the request goes
//! through the same routes as any other, and the answer is written as one
//! chunked response; the connection closes when it ends (`connection:
//! close`, so a client never sends a second request on it). Anything
//! unusual (no complete request line in the first bytes, HTTP/1.0, HTTP/2)
//! still goes to hyper.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Body as _;
use hyper::{Request, Response, StatusCode, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::routes::{self, Body, Routes};
use crate::adapters::on_wake::OnWake;

/// Largest request head read here; hyper answers 431 past its own limit too.
const MAX_HEAD: usize = 16 * 1024;
/// Most headers a stream request may have.
const MAX_HEADERS: usize = 64;
/// Frames that are ready at once go out in one write, up to this many bytes.
pub(super) const BATCH: usize = 16 * 1024;

/// Whether a connection's first bytes are an SSE request this module serves:
/// a complete `GET /events...` or `GET /messages/...` request line on HTTP/1.1.
pub fn is_stream_request(first: &[u8]) -> bool {
    let Some(end) = first.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    let line = &first[..end];
    (line.starts_with(b"GET /events?")
        || line.starts_with(b"GET /events ")
        || line.starts_with(b"GET /messages/"))
        && line.ends_with(b" HTTP/1.1")
}

/// What the connection needs besides its socket.
pub struct Stream {
    pub routes: Arc<Routes>,
    /// Cancelled to cut this connection.
    pub cut: CancellationToken,
    pub peer: SocketAddr,
    /// Why every request on this connection is refused, if it is.
    pub refusal: Option<String>,
    /// Told once the head has arrived, which ends the no-request timeout.
    pub first_request: Arc<Notify>,
}

impl Stream {
    /// Reads the request head, answers it, and writes the answer's body as
    /// it comes, until it ends or the client goes away.
    ///
    /// Not an `async fn`: its arguments would be kept twice in the task.
    #[allow(clippy::manual_async_fn)]
    pub fn serve(self, mut socket: TcpStream) -> impl Future<Output = ()> + Send + use<> {
        async move {
            // Boxed, as the routes' future below: what only the start needs is
            // freed once the stream runs, instead of sizing its task for good.
            let request = match Box::pin(read_head(&mut socket)).await {
                Ok(Some(request)) => request,
                Ok(None) => return,
                Err(status) => {
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    return;
                }
            };
            self.first_request.notify_one();
            let response = match &self.refusal {
                Some(why) => routes::overloaded(why),
                None => {
                    Box::pin(
                        self.routes
                            .handle(request, self.cut.clone(), self.peer.ip()),
                    )
                    .await
                }
            };
            let _ = write_response(&mut socket, response).await;
            let _ = socket.shutdown().await;
        }
    }
}

/// Reads and parses the head; `Ok(None)` when the client left first, `Err`
/// with the status to answer when the head is not one to serve.
async fn read_head(socket: &mut TcpStream) -> Result<Option<Request<Empty<Bytes>>>, StatusCode> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let n = match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let mut request = Request::builder()
                    .method(parsed.method.unwrap_or("GET"))
                    .uri(parsed.path.unwrap_or("/"))
                    .version(hyper::Version::HTTP_11);
                for h in parsed.headers.iter() {
                    request = request.header(h.name, h.value);
                }
                return request
                    .body(Empty::new())
                    .map(Some)
                    .map_err(|_| StatusCode::BAD_REQUEST);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
            }
            Err(_) => return Err(StatusCode::BAD_REQUEST),
        }
    }
}

/// Writes the response as `transfer-encoding: chunked`, frames that are
/// ready together in one write. Ends when the body does, or when the client
/// closes its side (bytes it sends are ignored: no second request is read).
///
/// Not an `async fn`: its arguments would be kept twice in the stream's task.
#[allow(clippy::manual_async_fn)]
fn write_response(
    socket: &mut TcpStream,
    response: Response<Body>,
) -> impl Future<Output = std::io::Result<()>> + Send + '_ {
    async move {
        let (parts, mut body) = response.into_parts();
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(
            parts
                .status
                .canonical_reason()
                .unwrap_or("Unknown")
                .as_bytes(),
        );
        out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            // Framing is this module's to say.
            if [
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
                header::CONNECTION,
            ]
            .contains(name)
            {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n");
        // The head is written once; its headers are not kept for the stream's life.
        drop(parts);
        socket.write_all(&out).await?;
        out = Vec::new();
        let (mut read, mut write) = socket.split();
        // Polled only when the socket has something to read, not on every
        // frame (see `OnWake`): bytes the client sends are dropped.
        let closed = OnWake::new(async move {
            let mut ignored = [0u8; 64];
            while let Ok(1..) = read.read(&mut ignored).await {}
        });
        futures::pin_mut!(closed);
        loop {
            let frame = tokio::select! {
                biased;
                frame = body.frame() => frame,
                () = &mut closed => return Ok(()),
            };
            let Some(Ok(frame)) = frame else {
                write.write_all(b"0\r\n\r\n").await?;
                return Ok(());
            };
            if let Ok(data) = frame.into_data() {
                chunk(&mut out, &data);
            }
            // Whatever else is ready goes in the same write.
            let mut ended = false;
            while out.len() < BATCH {
                match futures::FutureExt::now_or_never(body.frame()) {
                    Some(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            chunk(&mut out, &data);
                        }
                    }
                    Some(_) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            if ended || body.is_end_stream() {
                out.extend_from_slice(b"0\r\n\r\n");
            }
            if !out.is_empty() {
                write.write_all(&out).await?;
            }
            if ended {
                return Ok(());
            }
            // The batch buffer is not kept between writes: an idle stream holds none.
            out = Vec::new();
        }
    }
}

/// Appends `data` as one chunk.
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    // The size line in hex, written by hand: `write!` was a visible share of
    // a delivery's instructions.
    let mut size = [0u8; 16];
    let mut at = size.len();
    let mut n = data.len();
    loop {
        at -= 1;
        size[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.reserve(size.len() - at + data.len() + 4);
    out.extend_from_slice(&size[at..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_http11_stream_request_lines_are_taken() {
        assert!(is_stream_request(
            b"GET /events?session=ab HTTP/1.1\r\nhost: x"
        ));
        assert!(is_stream_request(b"GET /messages/general HTTP/1.1\r\n"));
        assert!(!is_stream_request(b"GET /events?session=ab HTTP/1.0\r\n"));
        assert!(!is_stream_request(b"GET /events?session=ab HTTP/1.1"));
        assert!(!is_stream_request(b"POST /events HTTP/1.1\r\n"));
        assert!(!is_stream_request(b"GET /eventsx HTTP/1.1\r\n"));
        assert!(!is_stream_request(b"GET /rooms HTTP/1.1\r\n"));
    }

    #[test]
    fn chunks_carry_their_length_in_hex() {
        let mut out = Vec::new();
        chunk(&mut out, &[b'x'; 26]);
        chunk(&mut out, b"");
        chunk(&mut out, b"y");
        chunk(&mut out, &[b'z'; 4096]);
        let expected = [
            &b"1a\r\n"[..],
            &[b'x'; 26],
            b"\r\n1\r\ny\r\n1000\r\n",
            &[b'z'; 4096],
            b"\r\n",
        ]
        .concat();
        assert_eq!(out, expected);
    }
}
