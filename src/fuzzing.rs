//! Entry points for the `cargo fuzz` targets in `fuzz/` (feature `fuzzing`,
//! off by default). Each takes arbitrary bytes, feeds them to one parser the
//! way the daemon does, and asserts what must hold whatever the input: a
//! panic or a failed assertion here is a bug the fuzzer reports.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::adapters::lines::{Frame, LineCodec};
use crate::core::{Command, ErrorCode, parse};

/// The text limit the targets use: the default, and a tiny one from the
/// input's first byte so the `too-long` edges are reached too.
fn max_text(data: &[u8]) -> (usize, &[u8]) {
    match data.split_first() {
        Some((&b, rest)) if b & 1 == 1 => (usize::from(b >> 1) + 1, rest),
        Some((_, rest)) => (2_000, rest),
        None => (2_000, data),
    }
}

/// The command parser (TCP lines and `POST /command`).
pub fn command_line(data: &[u8]) {
    let (max, data) = max_text(data);
    let Ok(line) = std::str::from_utf8(data) else {
        return; // the line codec refuses non-UTF-8 before the parser
    };
    match parse(line, max) {
        Ok(Some(Command::Say(text) | Command::Me(text))) => {
            assert!(text.as_str().chars().count() <= max);
            assert!(!text.as_str().trim().is_empty(), "blank text {line:?}");
        }
        Ok(Some(Command::Msg { text, .. })) => assert!(text.as_str().chars().count() <= max),
        Ok(_) => {}
        Err(refusal) => {
            if refusal.code == ErrorCode::UnknownCommand {
                // Raw input is never echoed unescaped.
                assert!(
                    refusal
                        .message
                        .chars()
                        .all(|c| c.is_ascii_graphic() || c == ' '),
                    "{:?}",
                    refusal.message
                );
            }
        }
    }
}

/// The TCP line codec: however the input is split into reads, the frames are
/// the same, and no line is longer than the limit or holds a newline.
pub fn line_codec(data: &[u8]) {
    let Some((&head, data)) = data.split_first() else {
        return;
    };
    let max = usize::from(head % 32) + 1;
    let whole = frames(max, data, data.len().max(1));
    let cut = usize::from(head / 32) + 1;
    assert_eq!(whole, frames(max, data, cut), "split into reads of {cut}");
    for frame in &whole {
        if let Frame::Line(line) = frame {
            assert!(line.len() <= max && !line.contains('\n'), "{line:?}");
        }
    }
}

fn frames(max: usize, data: &[u8], read: usize) -> Vec<Frame> {
    let mut codec = LineCodec::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in data.chunks(read) {
        buf.extend_from_slice(chunk);
        while let Some(frame) = codec.decode(&mut buf).expect("the codec never fails") {
            out.push(frame);
        }
    }
    while let Some(frame) = codec.decode_eof(&mut buf).expect("the codec never fails") {
        out.push(frame);
    }
    out
}

/// The HTTP JSON bodies (`/connect`, `/command`, `/message`) and the checks
/// their handlers make before the hub sees them.
pub fn http_body(data: &[u8]) {
    let (max, data) = max_text(data);
    crate::adapters::http::check_bodies(data, max);
}

/// The `Last-Event-ID` parser: what it accepts prints back as itself.
pub fn last_event_id(data: &[u8]) {
    let Ok(id) = std::str::from_utf8(data) else {
        return; // hyper hands over only header values that are text
    };
    if let Some((room, seq)) = crate::adapters::http::parse_room_id(id) {
        let again = crate::adapters::http::parse_room_id(&format!("{room}:{seq}"));
        assert_eq!(again, Some((room, seq)));
    }
}
