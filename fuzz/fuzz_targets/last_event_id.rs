//! The SSE `Last-Event-ID` parser (`ROOM:SEQ`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| baby_discord::fuzzing::last_event_id(data));
