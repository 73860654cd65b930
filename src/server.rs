//! The appliance: unseal, open the store, start one executor per core, serve.
//!
//! Each executor joins the channel mesh (its mesh position is its shard number), loads
//! the assets its shard owns, starts the shard's committer and the mesh server, binds the
//! shared listening port (SO_REUSEPORT) and accepts connections. The main thread waits
//! until every core reports ready (or one fails) and then only joins them.

use crate::config::{Config, StoreBackend};
use crate::context::CoreContext;
use crate::net::accept_loop;
use crate::policy::FieldRules;
use crate::published::Published;
use crate::reload::Reloader;
use crate::router::{MeshMsg, ShardRouter};
use crate::seal::cache::{CoreKey, SeedCache, CORE_KEY_REFRESH};
use crate::settings::ConnectionSettings;
use crate::shard::{Shard, ShardLimits};
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};
use crate::wire::ProviderCode;
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{mpsc, Arc};

/// Memory each executor registers with io_uring for its own buffers. custody does no
/// direct file I/O through glommio, so a small area keeps locked memory low.
const EXECUTOR_IO_MEMORY_BYTES: usize = 512 * 1024;
/// io_uring submission queue depth per executor.
const EXECUTOR_RING_DEPTH: usize = 256;

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
    #[error("lost ownership of the store: {0}")]
    Fenced(String),
    #[error("forced stop: {0}")]
    ForcedStop(String),
    #[error("cannot open the admin listener (server.admin_listen) on {addr}: {reason} (is another process using the port? \"\" turns it off)")]
    Admin { addr: SocketAddr, reason: String },
}

impl ServerError {
    /// The process exit status for this failure: 2 when the configuration, its TLS files
    /// or the host must be fixed first (as for a configuration that does not resolve), 3
    /// when another appliance took the store over (restarting would only be refused), 1
    /// otherwise. systemd restarts on 1 only (`RestartPreventExitStatus=2 3`).
    pub fn exit_code(&self) -> i32 {
        match self {
            ServerError::Tls(_) | ServerError::Preflight(_) => 2,
            ServerError::Fenced(_) => 3,
            _ => 1,
        }
    }
}

/// Everything a core needs, `Send` so it can be moved onto the core's thread.
#[derive(Clone)]
struct CoreSetup {
    config: Arc<Config>,
    key: Arc<SeedCache>,
    store: Arc<dyn Store>,
    /// The TLS acceptor and connection limits in force (replaced on SIGHUP and
    /// POLICY_RELOAD).
    settings: Arc<Published<ConnectionSettings>>,
    mesh: Option<MeshBuilder<MeshMsg, glommio::channels::channel_mesh::Full>>,
    events: mpsc::Sender<CoreEvent>,
    /// The regions' switch, shared by every core.
    regions: Arc<crate::regions::RegionSwitch>,
    /// The access policy in force (replaced on SIGHUP and POLICY_RELOAD).
    policy: Arc<crate::policy::PolicyCell>,
    /// Re-reads the configuration file (`None` when the appliance was given no file).
    reloader: Option<Arc<Reloader>>,
    /// Set on SIGTERM: every core drains (see [`DRAIN_POLL`]).
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// Where each core publishes its figures for /metrics and /healthz.
    metrics: Arc<crate::metrics::Registry>,
    /// The reconciliation thread.
    auditor: Option<Arc<crate::auditor::Auditor>>,
}

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
    /// The store belongs to another appliance now (I6).
    Fenced {
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

/// Runs the appliance until the process is stopped. Returns only on a start-up failure or
/// when a core stops.
pub fn run(config: Config) -> Result<(), ServerError> {
    run_with_reload(config, None)
}

/// [`run`], and with `config_file`, SIGHUP (and an admin's POLICY_RELOAD) re-reads it and
/// puts its `[policy]` in force, whole or not at all (see [`Reloader`]).
pub fn run_with_reload(
    config: Config,
    config_file: Option<std::path::PathBuf>,
) -> Result<(), ServerError> {
    // Before any thread starts, so that every thread inherits the mask and only the
    // signal thread takes SIGTERM and SIGINT.
    let stop_signals = block_stop_signals();
    let notifier = Arc::new(crate::systemd::Notifier::from_env());
    // The host first: io_uring, RLIMIT_MEMLOCK and the CPUs, each with its fix.
    let cpus = crate::preflight::check_host(config.server.cores, EXECUTOR_IO_MEMORY_BYTES as u64)?;
    // From here a SIGTERM stops the start at once (an HSM or a store that does not
    // answer can hold it for minutes); once the cores start, it drains them.
    let (events, ready) = mpsc::channel();
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(PHASE_STARTING));
    spawn_stop_signal_thread(stop_signals, events.clone(), phase.clone());
    notifier.status("starting: unsealing and loading the shards");
    let policy = Arc::new(crate::policy::PolicyCell::new(config.policy.access.clone()));
    let regions = Arc::new(crate::regions::RegionSwitch::new(&config.policy.regions));
    // The TLS files are checked before anything else starts: an expired certificate or a
    // key that is not the certificate's stops the start with the file and the fix.
    let settings = Arc::new(Published::new(ConnectionSettings::from_config(&config)?));
    log_certificate(&config.tls, &settings.current().certificate, "start");
    let reloader = config_file.map(|file| {
        let reloader = Arc::new(Reloader::new(
            file,
            policy.clone(),
            settings.clone(),
            config.clone(),
            cpus.clone(),
            regions.clone(),
        ));
        crate::reload::spawn_sighup_thread(reloader.clone());
        reloader
    });
    std::fs::create_dir_all(&config.server.state_dir).map_err(|e| ServerError::StateDir {
        path: config.server.state_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    // The first unseal happens here (a failure stops the start); the cache then refreshes
    // the keyed state on its own thread. The seed itself is zeroized after each keying.
    let key = match &config.seal {
        crate::config::SealConfig::Shamir { share_set_file } => {
            let set = crate::seal::shamir::ShareSet::read(share_set_file)
                .map_err(crate::seal::SealError::from)?;
            tracing::warn!(
                seed_id = %set.seed_id,
                fingerprint = %set.fingerprint,
                threshold = set.threshold,
                shares = set.shares,
                "sealed: waiting for {} of the {} unseal shares (custody unseal)",
                set.threshold,
                set.shares
            );
            SeedCache::start_with_shares(set)?
        }
        _ => SeedCache::start(crate::seal::provider(&config.seal), config.seal_timing)?,
    };
    let cores = config.server.cores;
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store: Arc<dyn Store> = match &config.store.backend {
        StoreBackend::Sqlite { path } => Arc::new(SqliteStore::open(
            path,
            config.store.commit_queue_depth,
            config.store.commit_linger,
        )?),
        StoreBackend::Postgres(pg) => {
            if pg.tls.mode() == crate::config::PgSslMode::Disable && !pg.addr.ip().is_loopback() {
                tracing::warn!(
                    server = %pg.addr,
                    "PostgreSQL is reached without TLS over a non-loopback address: audit records and counters cross the network in clear; set store.postgres_sslmode = \"verify-full\""
                );
            }
            let ownership = crate::store::postgres::acquire_ownership_blocking(pg)?;
            tracing::info!(instance = %ownership.instance, token = ownership.token, "this appliance owns the store");
            let alarm = events.clone();
            Arc::new(
                PgStore::new(pg.clone(), ownership).with_fence_alarm(Arc::new(move |reason| {
                    let _ = alarm.send(CoreEvent::Fenced { reason });
                })),
            )
        }
    };
    let auditor = match crate::auditor::Auditor::spawn(
        config.store.backend.clone(),
        key.clone(),
        config.audit.reconcile_interval,
        config.audit.reconcile_rate,
    ) {
        Ok(a) => Some(Arc::new(a)),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the auditor thread: no reconciliation will run");
            None
        }
    };
    let metrics = Arc::new(
        crate::metrics::Registry::new(
            cores,
            key.clone(),
            policy.clone(),
            config.server.metrics_publish,
        )
        .with_auditor(auditor.as_ref().map(|a| a.status()))
        .with_tls(settings.clone()),
    );
    if let Some(addr) = config.server.admin_listen {
        let bound = crate::metrics::spawn_admin_listener(addr, metrics.clone()).map_err(|e| {
            ServerError::Admin {
                addr,
                reason: e.to_string(),
            }
        })?;
        tracing::info!(admin = %bound, "admin listener: /metrics, /healthz, /readyz");
    }
    let mesh = (cores > 1)
        .then(|| MeshBuilder::full(cores, config.limits.cross_core_queue_depth as usize));
    let setup = CoreSetup {
        config: Arc::new(config.clone()),
        key: key.clone(),
        store: store.clone(),
        settings,
        mesh,
        events,
        regions,
        policy: policy.clone(),
        reloader,
        draining: draining.clone(),
        metrics: metrics.clone(),
        auditor,
    };
    // Either the cores start, or a stop signal already claimed the start (and the signal
    // thread is ending the process): never both.
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
    let mut handles = Vec::with_capacity(cores);
    for core in 0..cores {
        // Executor i on the i-th CPU this process may use (its affinity mask need not
        // start at CPU 0); unbound only if the mask could not be read.
        let placement = match cpus.get(core) {
            Some(&cpu) if std::env::var_os("CUSTODY_UNBOUND").is_none() => Placement::Fixed(cpu),
            _ => Placement::Unbound,
        };
        let setup = setup.clone();
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("custody-core-{core}"))
            .io_memory(EXECUTOR_IO_MEMORY_BYTES)
            .ring_depth(EXECUTOR_RING_DEPTH)
            .spawn(move || async move {
                // Release builds abort on a panic (profile.release); in a build that
                // unwinds, a core that panics reports it here, since main cannot count
                // on its channel closing (the signal thread holds a sender for good).
                let failed = ReportOnDrop {
                    events: setup.events.clone(),
                    core,
                    armed: true,
                };
                if let Err(reason) = core_main(core, setup).await {
                    let _ = failed.events.send(CoreEvent::Failed { core, reason });
                }
                failed.disarm();
            })
            .map_err(|e| ServerError::Core {
                core,
                reason: format!("cannot start executor: {e}"),
            })?;
        handles.push(handle);
    }
    drop(setup);
    let mut ready_cores = 0;
    let mut total_assets = 0;
    while ready_cores < cores {
        match ready.recv() {
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
            Ok(CoreEvent::Fenced { reason }) => return Err(ServerError::Fenced(reason)),
            Ok(CoreEvent::Stop { signal, .. }) => {
                // Cores already ready may be serving: drain them like any stop (the
                // others drain once they start, or the bound forces the stop).
                tracing::info!(signal, "stop signal while the cores start");
                return drain(
                    signal, &config, &notifier, &draining, &metrics, &ready, cores, &key, &*store,
                );
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
    tracing::info!(
        listen = %config.server.listen,
        shards = cores,
        assets = total_assets,
        store = %store.describe(),
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
    let mut status = status_line(&serving, &key.status().state);
    notifier.ready(&status);
    if let Some(every) = crate::systemd::watchdog_interval() {
        // Pings only while every core keeps publishing its figures (/healthz).
        let registry = metrics.clone();
        let spawned = crate::systemd::spawn_watchdog(notifier.clone(), every, move || {
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
    // From here on the appliance stops on SIGTERM or SIGINT (drained), when a core's
    // executor fails, or when another appliance took the store over; in the last two
    // cases the process exits without acknowledging anything more (every commit is
    // refused already).
    let first = loop {
        let event = match ready.recv_timeout(STATUS_REFRESH) {
            Ok(event) => Ok(event),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // The status line follows the seal state (`systemctl status`).
                let now = status_line(&serving, &key.status().state);
                if now != status {
                    notifier.status(&now);
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
            Ok(CoreEvent::Fenced { reason }) => {
                tracing::error!(%reason, "this appliance lost ownership of the store; stopping");
                return Err(ServerError::Fenced(reason));
            }
            Ok(CoreEvent::Stop { signal, .. }) => break signal,
            Ok(CoreEvent::Ready { .. }) | Ok(CoreEvent::Drained { .. }) => {}
            Err(_) => {
                return Err(ServerError::Core {
                    core: 0,
                    reason: "every core stopped".into(),
                })
            }
        }
    };
    drain(
        first, &config, &notifier, &draining, &metrics, &ready, cores, &key, &*store,
    )
}

/// How often the main thread checks the seal state for systemd's status line.
const STATUS_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

/// systemd's status line while serving: where, and the seal state when it is not plain
/// unsealed.
fn status_line(serving: &str, state: &crate::seal::cache::SealState) -> String {
    use crate::seal::cache::SealState;
    let seal = match state {
        SealState::Unsealed => "",
        SealState::Sealed { .. } => "; sealed: waiting for unseal",
        SealState::Unsealing { .. } => "; unsealing: shares coming in",
        SealState::ServingStale { .. } => "; serving a stale seed: the HSM does not answer",
        SealState::SealedByOperator { .. } => "; sealed by an operator",
        SealState::SealedByFailure { .. } => "; sealed: the HSM failed past the grace period",
    };
    format!("{serving}{seal}")
}

/// Sends `Failed` for its core when dropped armed (the core's future panicked).
struct ReportOnDrop {
    events: mpsc::Sender<CoreEvent>,
    core: usize,
    armed: bool,
}

impl ReportOnDrop {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ReportOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.events.send(CoreEvent::Failed {
                core: self.core,
                reason: "the core's executor panicked (see the log)".into(),
            });
        }
    }
}

/// How often a core looks for the drain flag, and then for its last connection to close.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// The graceful stop: the listeners close, each connection stops reading, answers what it
/// already read (each answer after its audit record is durable, as always) and closes;
/// then the key is dropped and the process exits 0. Past `server.shutdown_timeout_s`, or
/// on a second SIGTERM, it exits at once (status 1): what was not answered was not
/// acknowledged, and what was acknowledged is committed.
#[allow(clippy::too_many_arguments)]
fn drain(
    signal: &'static str,
    config: &Config,
    notifier: &crate::systemd::Notifier,
    draining: &std::sync::atomic::AtomicBool,
    metrics: &crate::metrics::Registry,
    ready: &mpsc::Receiver<CoreEvent>,
    cores: usize,
    key: &SeedCache,
    store: &dyn Store,
) -> Result<(), ServerError> {
    let bound = config.server.shutdown_timeout;
    let started = std::time::Instant::now();
    tracing::info!(
        signal,
        bound_ms = bound.as_millis() as u64,
        "stopping: no new connections; answering what each connection already sent"
    );
    notifier.stopping("stopping: draining connections");
    metrics.set_draining();
    draining.store(true, std::sync::atomic::Ordering::Release);
    let mut drained = 0;
    let forced = loop {
        if drained == cores {
            break None;
        }
        let left = bound.saturating_sub(started.elapsed());
        match ready.recv_timeout(left) {
            Ok(CoreEvent::Drained { core }) => {
                tracing::debug!(core, "core drained");
                drained += 1;
            }
            Ok(CoreEvent::Stop { signal, n }) if n > 1 => break Some(format!("a second {signal}")),
            Ok(CoreEvent::Failed { core, reason }) => {
                key.stop();
                return Err(ServerError::Core { core, reason });
            }
            Ok(CoreEvent::Fenced { reason }) => {
                key.stop();
                return Err(ServerError::Fenced(reason));
            }
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break Some(format!(
                    "server.shutdown_timeout_s ({} s) passed",
                    bound.as_secs()
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break Some("every core stopped".into()),
        }
    };
    // The keyed state goes first, whatever happens next.
    key.stop();
    match forced {
        None => {
            // Nothing is in flight: give the store up, so a restart (or the successor)
            // takes it at once rather than after the lease.
            match store.release(STORE_RELEASE_LIMIT) {
                Ok(true) => tracing::info!("released the store for the next appliance"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not release the store; the next appliance takes it once the lease lapses")
                }
            }
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "stopped: every connection answered what it had sent"
            );
            Ok(())
        }
        Some(why) => {
            let open = metrics.open_connections();
            tracing::error!(
                %why,
                cores_drained = drained,
                cores,
                connections_open = open,
                "forced stop: requests still in flight are not answered (none of them was acknowledged)"
            );
            Err(ServerError::ForcedStop(why))
        }
    }
}

/// How long a clean stop waits for the store to be released.
const STORE_RELEASE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The start-up phases a stop signal and the main thread race on (one compare-and-swap
/// each decides: the signal ends a start, or the cores start and the signal drains them).
const PHASE_STARTING: u8 = 0;
const PHASE_SERVING: u8 = 1;
const PHASE_STOPPING: u8 = 2;

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and so in every thread it starts
/// afterwards); returns SIGTERM and SIGINT, which [`spawn_stop_signal_thread`] takes with sigwait.
fn block_stop_signals() -> libc::sigset_t {
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
fn spawn_stop_signal_thread(
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

async fn core_main(core: usize, setup: CoreSetup) -> Result<(), String> {
    let config = &setup.config;
    let cores = config.server.cores as u16;
    let (senders, receivers, shard_id) = match setup.mesh.clone() {
        Some(mesh) => {
            let (s, r) = mesh
                .join()
                .await
                .map_err(|_| "cannot join the channel mesh".to_owned())?;
            let id = s.peer_id() as u16;
            (Some(s), Some(r), id)
        }
        None => (None, None, 0),
    };
    let shard_store = setup.store.open_shard(shard_id, cores);
    let window = crate::store::RotationWindow {
        since_ms: crate::audit::now_ms()
            .saturating_sub(config.limits.rotation_id_retention.as_millis() as u64),
        max: config.limits.rotation_ids_max_per_shard as usize,
    };
    let snapshot = shard_store
        .load_with(window)
        .await
        .map_err(|e| format!("loading shard {shard_id}: {e}"))?;
    let limits = ShardLimits {
        commit_batch_records_max: config.store.commit_batch_records_max,
        commit_batch_delay: config.store.commit_batch_delay,
        commit_batches_inflight_max: config.store.commit_batches_inflight_max,
        commit_timeout: config.store.commit_timeout,
        pending_max: config.limits.max_pending_per_shard as usize,
        assets_max: config.limits.max_assets_per_shard as usize,
        rotation_id_retention: config.limits.rotation_id_retention,
        rotation_ids_max: config.limits.rotation_ids_max_per_shard as usize,
        rate_limit_buckets: config.limits.rate_limit_buckets_per_shard as usize,
    };
    // Every core applies the stored region switches before it listens, so none serves a
    // disabled region at start-up.
    // One view of the seed cache per core, shared by the connections (derivations) and
    // the shard (checkpoint MACs), so the core's refresh drops a sealed key from both.
    let key = Rc::new(
        CoreKey::new(setup.key.clone())
            .map_err(|e| format!("the core's derivation scratch: {e}"))?,
    );
    let shard = Rc::new(
        Shard::new(
            shard_id,
            snapshot,
            limits,
            shard_store,
            setup.regions.clone(),
        )
        .with_signer(Box::new(key.clone())),
    );
    let assets = shard.asset_count();
    glommio::spawn_local(shard.clone().run_committer()).detach();
    if let Some(every) = config.server.stats_log_interval {
        glommio::spawn_local(log_commit_stats(shard.clone(), every)).detach();
    }
    let router = Rc::new(ShardRouter::new(shard.clone(), cores, senders));
    if let Some(receivers) = receivers {
        glommio::spawn_local(router.clone().serve_mesh(receivers)).detach();
    }
    let listener = bind(config.server.listen).map_err(|e| {
        format!(
            "cannot listen on {}: {e} (is another process using the port?)",
            config.server.listen
        )
    })?;
    let ctx = Rc::new(CoreContext {
        router,
        key,
        rules: FieldRules::with_switch(setup.regions.clone()),
        limits: config.limits.clone(),
        settings: crate::published::LocalCopy::new(setup.settings.clone()),
        shard_count: cores,
        shard_ports: shard_ports(&config.server, cores)?,
        connections: Cell::new(0),
        admission: Default::default(),
        refusal_log: Default::default(),
        access: crate::policy::CorePolicy::new(setup.policy.clone()),
        denials: Default::default(),
        metrics: Default::default(),
        reloader: setup.reloader.clone(),
        auditor: setup.auditor.clone(),
        seal_provider: match &config.seal {
            crate::config::SealConfig::Dev { .. } => ProviderCode::Dev,
            crate::config::SealConfig::Pkcs11 { .. } => ProviderCode::Pkcs11,
            crate::config::SealConfig::Shamir { .. } => ProviderCode::Shamir,
        },
        drain: Default::default(),
    });
    // The drain: the main thread sets the flag on SIGTERM; this core sees it within
    // DRAIN_POLL, closes its listeners and its connections' reading, and reports once
    // every connection has answered what it read and closed.
    {
        let ctx = ctx.clone();
        let draining = setup.draining.clone();
        let events = setup.events.clone();
        glommio::spawn_local(async move {
            while !draining.load(std::sync::atomic::Ordering::Acquire) {
                glommio::timer::sleep(DRAIN_POLL).await;
            }
            ctx.drain.open();
            while ctx.connections.get() > 0 {
                glommio::timer::sleep(DRAIN_POLL).await;
            }
            let _ = events.send(CoreEvent::Drained { core });
        })
        .detach();
    }
    // Drop this core's copy of a sealed or replaced key even when no request comes.
    {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(CORE_KEY_REFRESH).await;
                ctx.key.refresh();
                ctx.key.cache().expire_shares();
            }
        })
        .detach();
    }
    // Publish this core's figures for the metrics, from now on (a core that stops
    // publishing fails /healthz).
    {
        let ctx = ctx.clone();
        let registry = setup.metrics.clone();
        let every = config.server.metrics_publish;
        glommio::spawn_local(async move {
            loop {
                publish_figures(core, &ctx, &shard, &registry);
                glommio::timer::sleep(every).await;
            }
        })
        .detach();
    }
    let _ = setup.events.send(CoreEvent::Ready {
        core,
        shard: shard_id,
        assets,
    });
    // This core's own port, if any: a shard-aware client's requests for its assets.
    if let Some(&port) = ctx.shard_ports.get(core) {
        let ip = config.server.shard_listen.map(|a| a.ip());
        let addr = SocketAddr::new(ip.unwrap_or(config.server.listen.ip()), port);
        let own = bind(addr).map_err(|e| {
            format!(
                "cannot listen on {addr} (server.shard_listen, shard {core}): {e} (is another process using the port?)"
            )
        })?;
        glommio::spawn_local(accept_loop(ctx.clone(), own)).detach();
    }
    accept_loop(ctx, listener).await;
    // Drained: the shard serves on (requests other cores forward, commits in flight)
    // until the process exits.
    std::future::pending::<()>().await;
    Ok(())
}

/// The per-shard ports (`server.shard_listen`): the first port, then one more per shard.
fn shard_ports(server: &crate::config::Server, shards: u16) -> Result<Vec<u16>, String> {
    let Some(base) = server.shard_listen else {
        return Ok(Vec::new());
    };
    (0..shards)
        .map(|i| {
            base.port().checked_add(i).ok_or_else(|| {
                format!(
                    "server.shard_listen: port {} plus {} shards passes 65535",
                    base.port(),
                    shards
                )
            })
        })
        .collect()
}

/// Copies the core's and its shard's figures into the core's slot of the registry.
fn publish_figures(
    core: usize,
    ctx: &CoreContext,
    shard: &Shard,
    registry: &crate::metrics::Registry,
) {
    let Some(slot) = registry.slot(core) else {
        return;
    };
    ctx.metrics.borrow_mut().cross_core = ctx.router.forwarded();
    let net = ctx.metrics.borrow();
    let figures = shard.figures();
    let denials = *ctx.denials.borrow();
    slot.lock().unwrap_or_else(|p| p.into_inner()).publish(
        &net,
        &figures,
        denials,
        u64::from(ctx.connections.get()),
        ctx.admission.borrow().in_use(),
    );
}

/// Logs the shard's group-commit figures every `every` (one line per shard, nothing when
/// it committed nothing), for operators until the metrics endpoint reads the same figures.
async fn log_commit_stats(shard: Rc<Shard>, every: std::time::Duration) {
    loop {
        glommio::timer::sleep(every).await;
        let s = shard.take_commit_stats();
        if s.batches() == 0 && s.failed() == 0 {
            continue;
        }
        let (b, c) = (s.batch_records(), s.commit_us());
        tracing::info!(
            shard = shard.id(),
            at_ms = crate::audit::now_ms(),
            batches = s.batches(),
            records = s.records(),
            failed = s.failed(),
            batch_p50 = b.value_at_quantile(0.5),
            batch_p99 = b.value_at_quantile(0.99),
            batch_max = b.max(),
            commit_p50_us = c.value_at_quantile(0.5),
            commit_p99_us = c.value_at_quantile(0.99),
            commit_max_us = c.max(),
            "commit stats"
        );
    }
}

fn bind(addr: SocketAddr) -> glommio::Result<glommio::net::TcpListener, ()> {
    glommio::net::TcpListener::bind(addr)
}

/// Logs the server certificate in force.
fn log_certificate(
    tls: &crate::config::Tls,
    certificate: &crate::tls::CertificateInfo,
    when: &str,
) {
    tracing::info!(
        when,
        cert = %tls.cert.display(),
        subject = %certificate.subject,
        serial = %certificate.serial,
        not_after = certificate.not_after,
        "server certificate"
    );
}
