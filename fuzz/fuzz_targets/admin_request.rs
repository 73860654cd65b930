//! Any bytes through the admin listener's request-head parser (`/metrics`, `/healthz`,
//! `/readyz`): a request, a refusal, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    custody::metrics::fuzz_decode(data);
});
