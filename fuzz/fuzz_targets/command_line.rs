//! The slash-command parser (TCP lines and `POST /command`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| baby_discord::fuzzing::command_line(data));
