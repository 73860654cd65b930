//! The process's start-up, in order: the host's checks, the stop signals, the TLS files,
//! the configuration's reload, the state directory, the seal, the store, the auditor, the
//! metrics and their admin listener, and one executor per core; then [`Watch`] takes over.

use super::executor::{self, CoreSetup};
use super::signals::{self, PHASE_STARTING};
use super::stop::Watch;
use super::{CoreEvent, ServerError};
use crate::config::{Config, StoreBackend};
use crate::published::Published;
use crate::reload::Reloader;
use crate::seal::cache::SeedCache;
use crate::settings::ConnectionSettings;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use std::sync::{mpsc, Arc};

/// Memory each executor registers with io_uring for its own buffers. custody does no
/// direct file I/O through glommio, so a small area keeps locked memory low.
const EXECUTOR_IO_MEMORY_BYTES: usize = 512 * 1024;
/// io_uring submission queue depth per executor.
const EXECUTOR_RING_DEPTH: usize = 256;

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
    let stop_signals = signals::block_stop_signals();
    let notifier = Arc::new(crate::systemd::Notifier::from_env());
    // The host first: io_uring, RLIMIT_MEMLOCK and the CPUs, each with its fix.
    let cpus = crate::preflight::check_host(config.server.cores, EXECUTOR_IO_MEMORY_BYTES as u64)?;
    // From here a SIGTERM stops the start at once (an HSM or a store that does not
    // answer can hold it for minutes); once the cores start, it drains them.
    let (events, ready) = mpsc::channel();
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(PHASE_STARTING));
    signals::spawn_stop_signal_thread(stop_signals, events.clone(), phase.clone());
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
    let key = unseal(&config)?;
    let cores = config.server.cores;
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = open_store(&config, &events)?;
    let auditor = start_auditor(&config, &key);
    let metrics = start_metrics(&config, &key, &policy, &settings, auditor.as_ref())?;
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
    signals::claim_start(&phase);
    // Held until the appliance stops (as the executors run).
    let _executors = spawn_cores(setup, &cpus)?;
    Watch {
        config,
        notifier,
        draining,
        metrics,
        events: ready,
        key,
        store,
    }
    .run()
}

/// The first unseal (a failure stops the start); the cache then refreshes the keyed state
/// on its own thread. The seed itself is zeroized after each keying.
fn unseal(config: &Config) -> Result<Arc<SeedCache>, ServerError> {
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
    Ok(key)
}

/// Opens the configured store; PostgreSQL's is taken over first (its fence alarm tells
/// the main thread when another appliance takes it back).
fn open_store(
    config: &Config,
    events: &mpsc::Sender<CoreEvent>,
) -> Result<Arc<dyn Store>, ServerError> {
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
    Ok(store)
}

/// The reconciliation thread; the appliance serves without it if it cannot start.
fn start_auditor(config: &Config, key: &Arc<SeedCache>) -> Option<Arc<crate::auditor::Auditor>> {
    match crate::auditor::Auditor::spawn(
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
    }
}

/// The registry the cores publish into, and the admin listener that serves it (a
/// start-up failure if its address is taken).
fn start_metrics(
    config: &Config,
    key: &Arc<SeedCache>,
    policy: &Arc<crate::policy::PolicyCell>,
    settings: &Arc<Published<ConnectionSettings>>,
    auditor: Option<&Arc<crate::auditor::Auditor>>,
) -> Result<Arc<crate::metrics::Registry>, ServerError> {
    let metrics = Arc::new(
        crate::metrics::Registry::new(
            config.server.cores,
            key.clone(),
            policy.clone(),
            config.server.metrics_publish,
        )
        .with_auditor(auditor.map(|a| a.status()))
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
    Ok(metrics)
}

/// Starts one executor per core, each on its own CPU, with its copy of `setup` (dropped
/// here once every core has its own).
fn spawn_cores(
    setup: CoreSetup,
    cpus: &[usize],
) -> Result<Vec<ExecutorJoinHandle<()>>, ServerError> {
    let cores = setup.config.server.cores;
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
            .spawn(move || executor::run(core, setup))
            .map_err(|e| ServerError::Core {
                core,
                reason: format!("cannot start executor: {e}"),
            })?;
        handles.push(handle);
    }
    Ok(handles)
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
