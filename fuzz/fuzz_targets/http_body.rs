//! The JSON bodies of `POST /connect`, `/command` and `/message`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| baby_discord::fuzzing::http_body(data));
