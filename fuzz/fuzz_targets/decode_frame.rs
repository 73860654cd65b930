//! Any bytes through the frame, request and reply decoders: a frame, "need more" or a
//! typed error, never a panic (and every decoded request re-encodes to the same bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    custody::op::fuzz_decode(data);
});
