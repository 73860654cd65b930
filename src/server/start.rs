//! The process's start-up, in order: the host's checks, the stop signals, the TLS files,
//! the configuration's reload, the state directory, the seal, the store, the auditor, the
//! metrics and their admin listener, and one executor per core; then [`Watch`] takes over.

use super::executor::{self, CoreSetup};
use super::signals::{self, PHASE_STARTING};
use super::stop::Watch;
use super::ServerError;
use crate::config::{Config, StoreBackend};
use crate::lease::{Lease, LeaseTiming};
use crate::published::Published;
use crate::reload::Reloader;
use crate::seal::cache::SeedCache;
use crate::settings::ConnectionSettings;
use crate::store::postgres::{spawn_lease_keeper, Claimant, FirstLook, PgStore};
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
    let draining = Arc::new(super::DrainBell::default());
    let (store, lease) = open_store(&config, &key)?;
    let auditor = start_auditor(&config, &key);
    let metrics = start_metrics(&config, &key, &policy, &settings, auditor.as_ref(), &lease)?;
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
        lease: lease.clone(),
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
        lease,
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

/// Opens the configured store with its lease: SQLite's appliance is active for good;
/// PostgreSQL's starts the lease keeper and waits for its first look, so that the cores
/// load their shards under the token when this appliance takes the lease at once (else it
/// starts as a standby, and loads again when it takes over).
fn open_store(
    config: &Config,
    key: &Arc<SeedCache>,
) -> Result<(Arc<dyn Store>, Arc<Lease>), ServerError> {
    let cores = config.server.cores;
    match &config.store.backend {
        StoreBackend::Sqlite { path } => {
            let store = SqliteStore::open(
                path,
                config.store.commit_queue_depth,
                config.store.commit_linger,
            )?;
            Ok((Arc::new(store), Arc::new(Lease::sole(cores))))
        }
        StoreBackend::Postgres(pg) => {
            if pg.tls.mode() == crate::config::PgSslMode::Disable
                && pg.hosts.iter().any(|h| !h.addr.ip().is_loopback())
            {
                tracing::warn!(
                    server = %pg.hosts_text(),
                    "PostgreSQL is reached without TLS over a non-loopback address: audit records and counters cross the network in clear; set store.postgres_sslmode = \"verify-full\""
                );
            }
            crate::store::postgres::check_schema_blocking(pg)?;
            let lease = Arc::new(Lease::shared(cores));
            let claimant = Claimant {
                instance: uuid::Uuid::new_v4(),
                address: config.server.advertise.clone(),
                timing: LeaseTiming {
                    lease: pg.owner_lease,
                    margin: pg.owner_lease_margin,
                },
                serving_seed: serving_seed(key.clone()),
            };
            let instance = claimant.instance;
            let first = spawn_lease_keeper(pg.clone(), lease.clone(), claimant, FIRST_LOOK_WAIT)?;
            match &first {
                FirstLook::Active { token } => {
                    tracing::info!(%instance, token, "this appliance holds the store's lease: it starts active")
                }
                FirstLook::Standby { active } => {
                    tracing::info!(%instance, active = active.as_deref().unwrap_or("unknown"), "another appliance holds the store's lease: this one starts as a standby")
                }
                FirstLook::Unreachable(why) => {
                    tracing::warn!(%instance, %why, "the lease could not be looked at yet: starting as a standby")
                }
            }
            let store = PgStore::shared(pg.clone(), lease.clone(), instance);
            Ok((Arc::new(store), lease))
        }
    }
}

/// The fingerprint of the seed `key` serves with, while it can derive.
fn serving_seed(key: Arc<SeedCache>) -> Arc<dyn Fn() -> Option<String> + Send + Sync> {
    use crate::seal::cache::SealState;
    Arc::new(move || {
        let status = key.status();
        match status.state {
            SealState::Unsealed | SealState::ServingStale { .. } => status.fingerprint,
            _ => None,
        }
    })
}

/// How long start-up waits for the lease keeper's first look before the cores start.
const FIRST_LOOK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

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
    lease: &Arc<Lease>,
) -> Result<Arc<crate::metrics::Registry>, ServerError> {
    let metrics = Arc::new(
        crate::metrics::Registry::new(
            config.server.cores,
            key.clone(),
            policy.clone(),
            config.server.metrics_publish,
        )
        .with_auditor(auditor.map(|a| a.status()))
        .with_tls(settings.clone())
        .with_lease(lease.clone()),
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
