//! Waiting for something an appliance does in its own time, with a deadline.

use std::time::{Duration, Instant};

/// How often [`eventually`] asks again.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

/// Asks `probe` every [`POLL_EVERY`] until it answers `Ok`, for at most `within`: the
/// value it answered. Past the deadline, a panic with the last `Err` it gave (what was
/// seen instead of what was waited for).
pub fn eventually<T>(within: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => {
                panic!("not within {within:?}: {seen}")
            }
            Err(_) => std::thread::sleep(POLL_EVERY),
        }
    }
}
