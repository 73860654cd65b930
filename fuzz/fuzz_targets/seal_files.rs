//! Any bytes through the sealed-seed file decoder and the import-seed decoder: a value or
//! an error, never a panic (and a decoded sealed seed re-encodes to an equal one).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    custody::seal::blob::fuzz_decode(data);
});
