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

/// Asks `probe` until it answers `Ok` `times` times in a row, for at most `within` (a
/// change every core must see: with new connections landing on any core, a run of
/// answers shows each has it). Past the deadline, a panic with the last `Err`.
pub fn eventually_in_a_row(
    within: Duration,
    times: usize,
    mut probe: impl FnMut() -> Result<(), String>,
) {
    let mut run = 0;
    eventually(within, || match probe() {
        Ok(()) => {
            run += 1;
            (run >= times)
                .then_some(())
                .ok_or_else(|| format!("{run} of {times} in a row"))
        }
        Err(seen) => {
            run = 0;
            Err(seen)
        }
    });
}
