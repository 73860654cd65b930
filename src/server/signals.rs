//! SIGTERM and SIGINT: blocked in every thread, taken by a thread of their own, and the
//! race between a stop signal and the start of the cores (one compare-and-swap each).

use super::CoreEvent;
use std::sync::{mpsc, Arc};

/// The start-up phases a stop signal and the main thread race on (one compare-and-swap
/// each decides: the signal ends a start, or the cores start and the signal drains them).
pub(super) const PHASE_STARTING: u8 = 0;
const PHASE_SERVING: u8 = 1;
const PHASE_STOPPING: u8 = 2;

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and so in every thread it starts
/// afterwards); returns SIGTERM and SIGINT, which [`spawn_stop_signal_thread`] takes with sigwait.
pub(super) fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set, and pthread_sigmask on this thread.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        // SIGHUP too, before any thread starts: a thread that left it unblocked would
        // take a `systemctl reload` with the default action, which ends the process.
        // The reload thread sigwaits for it (started without a config file, nothing
        // does, and SIGHUP is ignored).
        let mut all = set;
        libc::sigaddset(&mut all, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
    set
}

/// A thread that waits for SIGTERM and SIGINT and tells the main thread (a counted
/// event each, so the second forces the stop).
pub(super) fn spawn_stop_signal_thread(
    set: libc::sigset_t,
    events: mpsc::Sender<CoreEvent>,
    phase: Arc<std::sync::atomic::AtomicU8>,
) {
    let spawned = std::thread::Builder::new()
        .name("custody-signals".into())
        .spawn(move || {
            let mut n = 0;
            loop {
                let mut signal: libc::c_int = 0;
                // SAFETY: waits for a signal of `set`, which every thread has blocked.
                if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                    continue;
                }
                n += 1;
                let name = if signal == libc::SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                let claimed = phase.compare_exchange(
                    PHASE_STARTING,
                    PHASE_STOPPING,
                    std::sync::atomic::Ordering::AcqRel,
                    std::sync::atomic::Ordering::Acquire,
                );
                if claimed.is_ok() {
                    // Unsealing, opening or taking over the store, and no core will start
                    // (the main thread's claim of the start now fails): nothing was served
                    // and nothing acknowledged. Exit now, without running exit handlers
                    // (the main thread may be inside the HSM's library); the kernel
                    // discards the process's memory.
                    tracing::warn!(
                        signal = name,
                        "stopped during start-up, before any core served: nothing was acknowledged"
                    );
                    // SAFETY: _exit ends the process at once; nothing is left to flush
                    // (the log writes unbuffered to stderr).
                    unsafe { libc::_exit(0) };
                }
                if events.send(CoreEvent::Stop { signal: name, n }).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        // Without the thread the signals stay blocked: stop with SIGKILL.
        tracing::error!(error = %e, "cannot start the signal thread: SIGTERM will not stop the appliance");
    }
}

/// The main thread's claim of the start: either the cores start, or a stop signal already
/// claimed the start (and the signal thread is ending the process): never both.
pub(super) fn claim_start(phase: &std::sync::atomic::AtomicU8) {
    if phase
        .compare_exchange(
            PHASE_STARTING,
            PHASE_SERVING,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        )
        .is_err()
    {
        // The signal thread is ending the process with _exit (no exit handlers): wait
        // for it rather than race it with an exit of our own.
        loop {
            std::thread::park();
        }
    }
}
