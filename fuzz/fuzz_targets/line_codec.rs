//! The TCP line codec, fed the same bytes in different read sizes.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| baby_discord::fuzzing::line_codec(data));
