//! The appliance: unseal, open the store, start one executor per core, serve.
//!
//! Each executor joins the channel mesh (its mesh position is its shard number), loads
//! the assets its shard owns, starts the shard's committer and the mesh server, binds the
//! shared listening port (SO_REUSEPORT) and accepts connections. The main thread waits
//! until every core reports ready (or one fails) and then only joins them.
//!
//! The rooms: `start` (the process's start-up, in order: the host, the signals, the TLS
//! files, the seal, the store, the auditor, the metrics, the cores), `stop` (the main
//! thread's watch once the cores start: ready, serving, the drain), `signals` (SIGTERM and
//! SIGINT, and their race with the start) and `executor` (one core's start and its tasks).

mod executor;
mod signals;
mod start;
mod stop;

pub use start::{run, run_with_reload};

use crate::store::StoreError;
use std::net::SocketAddr;

/// Why the appliance could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("state directory {path}: {reason}")]
    StateDir { path: String, reason: String },
    #[error("seal: {0}")]
    Seal(#[from] crate::seal::SealError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("this host cannot run the appliance as configured: {0}")]
    Preflight(#[from] crate::preflight::PreflightError),
    #[error("core {core}: {reason}")]
    Core { core: usize, reason: String },
    #[error("forced stop: {0}")]
    ForcedStop(String),
    #[error("cannot open the admin listener (server.admin_listen) on {addr}: {reason} (is another process using the port? \"\" turns it off)")]
    Admin { addr: SocketAddr, reason: String },
}

impl ServerError {
    /// The process exit status for this failure: 2 when the configuration, its TLS files
    /// or the host must be fixed first (as for a configuration that does not resolve), 1
    /// otherwise. systemd restarts on 1 only (`RestartPreventExitStatus=2`). (Status 3,
    /// once "another appliance took the store over", is retired: such an appliance now
    /// serves on as a standby.)
    pub fn exit_code(&self) -> i32 {
        match self {
            ServerError::Tls(_) | ServerError::Preflight(_) => 2,
            _ => 1,
        }
    }
}

/// The drain's signal from the main thread to every core: rung once on SIGTERM, and each
/// core waiting on it wakes at once (a foreign wake of its executor), so no core polls a
/// flag while it serves (a 20 ms poll woke each idle core 50 times a second). Modelled in
/// `loom-tests/tests/handoff.rs`.
pub(super) type DrainBell = crate::store::handoff::Bell;

/// What the cores (and the signal thread) tell the main thread.
enum CoreEvent {
    Ready {
        core: usize,
        shard: u16,
        assets: usize,
    },
    Failed {
        core: usize,
        reason: String,
    },
    /// SIGTERM or SIGINT (the `n`th since start): drain and stop; a second one forces.
    Stop {
        signal: &'static str,
        n: u32,
    },
    /// The core closed its listeners and every connection answered what it had read.
    Drained {
        core: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::DrainBell;
    use crate::store::handoff::Abandoned;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    fn ready<F: Future<Output = Result<(), Abandoned>> + Unpin>(f: &mut F) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        matches!(std::pin::Pin::new(f).poll(&mut cx), Poll::Ready(Ok(())))
    }

    #[test]
    fn a_core_waiting_before_the_drain_wakes_when_it_is_raised() {
        let bell = DrainBell::default();
        let mut wait = bell.wait();
        assert!(!ready(&mut wait));
        bell.raise();
        assert!(ready(&mut wait));
    }

    #[test]
    fn a_core_that_starts_waiting_after_the_drain_is_not_left_waiting() {
        let bell = DrainBell::default();
        bell.raise();
        let mut wait = bell.wait();
        assert!(ready(&mut wait));
    }
}
