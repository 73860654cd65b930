//! Any bytes through the seal layer's file decoders: the sealed-seed file, the import
//! seed, a Shamir share line and the share set file. A value or an error, never a panic
//! (and what decodes re-encodes to an equal value).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    custody::seal::blob::fuzz_decode(data);
    custody::seal::shamir::fuzz_decode(data);
});
