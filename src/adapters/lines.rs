//! Line framing for the TCP adapter, with a hard maximum.
//!
//! tokio-util's `LinesCodec` reports an over-long line or bad UTF-8 as a stream
//! *error*, after which `FramedRead` ends the stream. A chat connection must
//! survive both, so this decoder reports them as frames instead and the
//! connection carries on with the next line.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// One unit of client input.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, without `\n` or `\r\n`.
    Line(String),
    /// A line longer than the maximum; it is discarded up to its newline.
    TooLong,
    /// A line that is not UTF-8; discarded.
    InvalidUtf8,
}

/// Splits input on `\n` (a preceding `\r` is dropped), at most `max` bytes a line.
#[derive(Debug)]
pub struct LineCodec {
    max: usize,
    /// Bytes of the buffer already searched for a newline.
    searched: usize,
    /// Inside an over-long line, dropping bytes until its newline.
    discarding: bool,
}

impl LineCodec {
    /// A codec for lines of at most `max` bytes (line ending not counted).
    pub fn new(max: usize) -> Self {
        LineCodec {
            max,
            searched: 0,
            discarding: false,
        }
    }
}

impl Decoder for LineCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        loop {
            if self.discarding {
                match buf.iter().position(|&b| b == b'\n') {
                    Some(end) => {
                        buf.advance(end + 1);
                        self.discarding = false;
                        self.searched = 0;
                    }
                    None => {
                        buf.clear();
                        return Ok(None);
                    }
                }
                continue;
            }
            // A line of `max` bytes may be followed by "\r\n".
            let window = buf.len().min(self.max + 2);
            let found = buf[self.searched..window].iter().position(|&b| b == b'\n');
            match found {
                Some(offset) => {
                    let end = self.searched + offset;
                    self.searched = 0;
                    let mut line = buf.split_to(end + 1);
                    line.truncate(end);
                    if line.last() == Some(&b'\r') {
                        line.truncate(end - 1);
                    }
                    return Ok(Some(frame(line, self.max)));
                }
                None if buf.len() > self.max + 1 => {
                    // No newline within reach: the line is too long whatever follows.
                    self.discarding = true;
                    self.searched = 0;
                    return Ok(Some(Frame::TooLong));
                }
                None => {
                    self.searched = window;
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        if self.discarding || buf.is_empty() {
            buf.clear();
            return Ok(None);
        }
        // A last line without a newline still counts (`printf hi | nc ...`).
        let line = buf.split();
        self.searched = 0;
        Ok(Some(frame(line, self.max)))
    }
}

fn frame(line: BytesMut, max: usize) -> Frame {
    if line.len() > max {
        return Frame::TooLong;
    }
    match String::from_utf8(line.to_vec()) {
        Ok(s) => Frame::Line(s),
        Err(_) => Frame::InvalidUtf8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(codec: &mut LineCodec, input: &[u8]) -> Vec<Frame> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            out.push(f);
        }
        out
    }

    fn line(s: &str) -> Frame {
        Frame::Line(s.to_owned())
    }

    #[test]
    fn splits_on_lf_and_crlf() {
        let mut c = LineCodec::new(100);
        assert_eq!(
            decode_all(&mut c, b"a\nb\r\n\nc"),
            vec![line("a"), line("b"), line("")]
        );
    }

    #[test]
    fn partial_lines_wait_for_more() {
        let mut c = LineCodec::new(100);
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"lo\n");
        assert_eq!(c.decode(&mut buf).unwrap(), Some(line("hello")));
    }

    #[test]
    fn too_long_is_reported_once_and_the_next_line_survives() {
        let mut c = LineCodec::new(8);
        let mut input = vec![b'x'; 10_000];
        input.extend_from_slice(b"\nok\n");
        assert_eq!(decode_all(&mut c, &input), vec![Frame::TooLong, line("ok")]);
    }

    #[test]
    fn too_long_across_reads() {
        let mut c = LineCodec::new(8);
        let mut buf = BytesMut::from(&b"xxxxxx"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"xxxxxx");
        assert_eq!(c.decode(&mut buf).unwrap(), Some(Frame::TooLong));
        buf.extend_from_slice(b"xxxx\nok\n");
        assert_eq!(c.decode(&mut buf).unwrap(), Some(line("ok")));
    }

    #[test]
    fn exactly_max_fits_with_crlf() {
        let mut c = LineCodec::new(4);
        assert_eq!(
            decode_all(&mut c, b"abcd\r\nabcde\n"),
            vec![line("abcd"), Frame::TooLong]
        );
    }

    #[test]
    fn invalid_utf8_is_a_frame_not_an_error() {
        let mut c = LineCodec::new(100);
        assert_eq!(
            decode_all(&mut c, b"\xff\xfe\nfine\n"),
            vec![Frame::InvalidUtf8, line("fine")]
        );
    }

    #[test]
    fn last_line_without_newline_counts_at_eof() {
        let mut c = LineCodec::new(100);
        let mut buf = BytesMut::from(&b"bye"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        assert_eq!(c.decode_eof(&mut buf).unwrap(), Some(line("bye")));
        assert_eq!(c.decode_eof(&mut buf).unwrap(), None);
    }
}
