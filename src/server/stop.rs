//! The main thread once the cores start: it waits for every core to report ready, serves
//! (following the seal state and the role for systemd's status line, pinging the
//! watchdog), and stops on a signal (the drain) or a core's failure.

use super::{CoreEvent, ServerError};
use crate::config::Config;
use crate::seal::cache::SeedCache;
use crate::store::Store;
use std::sync::{mpsc, Arc};

/// How often the main thread checks the seal state for systemd's status line.
const STATUS_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a clean stop waits for the store to be released.
const STORE_RELEASE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the main thread watches once the cores start, and what a stop takes down.
pub(super) struct Watch {
    pub config: Config,
    pub notifier: Arc<crate::systemd::Notifier>,
    /// Rung on SIGTERM: every core drains.
    pub draining: Arc<super::DrainBell>,
    pub metrics: Arc<crate::metrics::Registry>,
    /// What the cores and the signal thread report.
    pub events: mpsc::Receiver<CoreEvent>,
    pub key: Arc<SeedCache>,
    pub store: Arc<dyn Store>,
    pub lease: Arc<crate::lease::Lease>,
}

/// How the wait for the cores ended, when it did not fail.
enum Started {
    /// Every core is ready; they hold this many assets in all.
    Serving { assets: usize },
    /// A stop signal came first.
    Stopping(&'static str),
}

impl Watch {
    /// Waits for the cores, serves, and stops: returns only on a failure or once stopped.
    pub fn run(self) -> Result<(), ServerError> {
        let assets = match self.wait_ready()? {
            Started::Serving { assets } => assets,
            Started::Stopping(signal) => return self.drain(signal),
        };
        let (serving, status) = self.announce(assets);
        let signal = self.serve(&serving, status)?;
        self.drain(signal)
    }

    /// Waits until every core reports ready, one fails, or a stop signal comes.
    fn wait_ready(&self) -> Result<Started, ServerError> {
        let cores = self.config.server.cores;
        let mut ready_cores = 0;
        let mut total_assets = 0;
        while ready_cores < cores {
            match self.events.recv() {
                Ok(CoreEvent::Ready {
                    core,
                    shard,
                    assets,
                }) => {
                    tracing::debug!(core, shard, assets, "core ready");
                    ready_cores += 1;
                    total_assets += assets;
                }
                Ok(CoreEvent::Failed { core, reason }) => {
                    return Err(ServerError::Core { core, reason });
                }
                Ok(CoreEvent::Stop { signal, .. }) => {
                    // Cores already ready may be serving: drain them like any stop (the
                    // others drain once they start, or the bound forces the stop).
                    tracing::info!(signal, "stop signal while the cores start");
                    return Ok(Started::Stopping(signal));
                }
                Ok(CoreEvent::Drained { .. }) => {}
                Err(_) => {
                    return Err(ServerError::Core {
                        core: 0,
                        reason: "every core stopped before it was ready".into(),
                    })
                }
            }
        }
        Ok(Started::Serving {
            assets: total_assets,
        })
    }

    /// Logs and tells systemd that the appliance serves, and starts the watchdog's pings;
    /// returns where it serves (the status line's first part) and the status line sent.
    fn announce(&self, total_assets: usize) -> (String, String) {
        let config = &self.config;
        let cores = config.server.cores;
        tracing::info!(
            listen = %config.server.listen,
            shards = cores,
            assets = total_assets,
            store = %self.store.describe(),
            seal = match &config.seal {
                crate::config::SealConfig::Dev { .. } => "dev (NOT for production)",
                crate::config::SealConfig::Pkcs11 { .. } => "pkcs11",
                crate::config::SealConfig::Shamir { .. } => "shamir",
            },
            "custodyd serving"
        );
        let serving = format!(
            "serving on {} with {cores} shards, {total_assets} assets",
            config.server.listen
        );
        let status = status_line(&serving, &self.key.status().state, &self.lease);
        self.notifier.ready(&status);
        if let Some(every) = crate::systemd::watchdog_interval() {
            self.spawn_watchdog(every);
        }
        (serving, status)
    }

    /// Pings systemd's watchdog only while every core keeps publishing its figures
    /// (/healthz).
    fn spawn_watchdog(&self, every: std::time::Duration) {
        let registry = self.metrics.clone();
        let spawned = crate::systemd::spawn_watchdog(self.notifier.clone(), every, move || {
            let h = registry.health();
            if h.ok {
                Ok(())
            } else {
                Err(h.problems.join("; "))
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the watchdog thread: systemd will restart the appliance after WatchdogSec");
        }
    }

    /// Serves until the first stop signal (returned) or a core's failure; `status` is the
    /// status line systemd last had.
    fn serve(&self, serving: &str, mut status: String) -> Result<&'static str, ServerError> {
        // From here on the appliance stops on SIGTERM or SIGINT (drained) or when a core's
        // executor fails. Losing the store's lease does not stop it: it serves on as a
        // standby (NOT_ACTIVE) and takes the lease again when it lapses.
        loop {
            let event = match self.events.recv_timeout(STATUS_REFRESH) {
                Ok(event) => Ok(event),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // The status line follows the seal state (`systemctl status`).
                    let now = status_line(serving, &self.key.status().state, &self.lease);
                    if now != status {
                        self.notifier.status(&now);
                        status = now;
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
            };
            match event {
                Ok(CoreEvent::Failed { core, reason }) => {
                    return Err(ServerError::Core { core, reason })
                }
                Ok(CoreEvent::Stop { signal, .. }) => return Ok(signal),
                Ok(CoreEvent::Ready { .. }) | Ok(CoreEvent::Drained { .. }) => {}
                Err(_) => {
                    return Err(ServerError::Core {
                        core: 0,
                        reason: "every core stopped".into(),
                    })
                }
            }
        }
    }

    /// The graceful stop: the listeners close, each connection stops reading, answers what it
    /// already read (each answer after its audit record is durable, as always) and closes;
    /// then the key is dropped and the process exits 0. Past `server.shutdown_timeout_s`, or
    /// on a second SIGTERM, it exits at once (status 1): what was not answered was not
    /// acknowledged, and what was acknowledged is committed.
    fn drain(&self, signal: &'static str) -> Result<(), ServerError> {
        let bound = self.config.server.shutdown_timeout;
        let started = std::time::Instant::now();
        tracing::info!(
            signal,
            bound_ms = bound.as_millis() as u64,
            "stopping: no new connections; answering what each connection already sent"
        );
        self.notifier.stopping("stopping: draining connections");
        self.metrics.set_draining();
        self.draining.raise();
        let (forced, drained) = self.wait_drained(started)?;
        // The keyed state goes first, whatever happens next.
        self.key.stop();
        match forced {
            None => {
                self.release_store();
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "stopped: every connection answered what it had sent"
                );
                Ok(())
            }
            Some(why) => {
                let open = self.metrics.open_connections();
                tracing::error!(
                    %why,
                    cores_drained = drained,
                    cores = self.config.server.cores,
                    connections_open = open,
                    "forced stop: requests still in flight are not answered (none of them was acknowledged)"
                );
                Err(ServerError::ForcedStop(why))
            }
        }
    }

    /// Waits for every core to drain, within `server.shutdown_timeout_s` from `started`;
    /// returns why the stop is forced (none: every core drained) and the cores drained.
    /// A core's failure or the loss of the store ends the wait (the key dropped).
    fn wait_drained(
        &self,
        started: std::time::Instant,
    ) -> Result<(Option<String>, usize), ServerError> {
        let cores = self.config.server.cores;
        let bound = self.config.server.shutdown_timeout;
        let mut drained = 0;
        let forced = loop {
            if drained == cores {
                break None;
            }
            let left = bound.saturating_sub(started.elapsed());
            match self.events.recv_timeout(left) {
                Ok(CoreEvent::Drained { core }) => {
                    tracing::debug!(core, "core drained");
                    drained += 1;
                }
                Ok(CoreEvent::Stop { signal, n }) if n > 1 => {
                    break Some(format!("a second {signal}"))
                }
                Ok(CoreEvent::Failed { core, reason }) => {
                    self.key.stop();
                    return Err(ServerError::Core { core, reason });
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    break Some(format!(
                        "server.shutdown_timeout_s ({} s) passed",
                        bound.as_secs()
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break Some("every core stopped".into())
                }
            }
        };
        Ok((forced, drained))
    }

    /// Nothing is in flight: gives the store up, so a restart (or the successor) takes it
    /// at once rather than after the lease.
    fn release_store(&self) {
        match self.store.release(STORE_RELEASE_LIMIT) {
            Ok(true) => tracing::info!("released the store for the next appliance"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not release the store; the next appliance takes it once the lease lapses")
            }
        }
    }
}

/// systemd's status line while serving: where, the role when the store is shared, and the
/// seal state when it is not plain unsealed.
fn status_line(
    serving: &str,
    state: &crate::seal::cache::SealState,
    lease: &crate::lease::Lease,
) -> String {
    use crate::seal::cache::SealState;
    let seal = match state {
        SealState::Unsealed => "",
        SealState::Sealed { .. } => "; sealed: waiting for unseal",
        SealState::Unsealing { .. } => "; unsealing: shares coming in",
        SealState::ServingStale { .. } => "; serving a stale seed: the HSM does not answer",
        SealState::SealedByOperator { .. } => "; sealed by an operator",
        SealState::SealedByFailure { .. } => "; sealed: the HSM failed past the grace period",
    };
    let role = match (lease.is_single_node(), lease.role()) {
        (true, _) => String::new(),
        (false, crate::lease::Role::Standby) => match lease.active_address() {
            Some(active) => format!("; standby (active: {active})"),
            None => "; standby".into(),
        },
        (false, _) => format!("; {}", lease.role_name()),
    };
    format!("{serving}{role}{seal}")
}
