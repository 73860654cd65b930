//! One core: its executor's life, and its start in order (the mesh, the shard and its
//! committer, the listeners) with the tasks it runs beside its connections (the drain,
//! the key's refresh, the figures it publishes, the commit stats it logs).

use super::CoreEvent;
use crate::config::Config;
use crate::context::CoreContext;
use crate::net::accept_loop;
use crate::policy::FieldRules;
use crate::published::Published;
use crate::reload::Reloader;
use crate::router::{MeshMsg, ShardRouter};
use crate::seal::cache::{CoreKey, SeedCache, CORE_KEY_REFRESH};
use crate::settings::ConnectionSettings;
use crate::shard::{Shard, ShardLimits};
use crate::store::Store;
use crate::wire::ProviderCode;
use glommio::channels::channel_mesh::{MeshBuilder, Receivers, Senders};
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{mpsc, Arc};

/// Everything a core needs, `Send` so it can be moved onto the core's thread.
#[derive(Clone)]
pub(super) struct CoreSetup {
    pub(super) config: Arc<Config>,
    pub(super) key: Arc<SeedCache>,
    pub(super) store: Arc<dyn Store>,
    /// The TLS acceptor and connection limits in force (replaced on SIGHUP and
    /// POLICY_RELOAD).
    pub(super) settings: Arc<Published<ConnectionSettings>>,
    pub(super) mesh: Option<MeshBuilder<MeshMsg, glommio::channels::channel_mesh::Full>>,
    pub(super) events: mpsc::Sender<CoreEvent>,
    /// The regions' switch, shared by every core.
    pub(super) regions: Arc<crate::regions::RegionSwitch>,
    /// The access policy in force (replaced on SIGHUP and POLICY_RELOAD).
    pub(super) policy: Arc<crate::policy::PolicyCell>,
    /// Re-reads the configuration file (`None` when the appliance was given no file).
    pub(super) reloader: Option<Arc<Reloader>>,
    /// Raised on SIGTERM: every core drains.
    pub(super) draining: Arc<super::DrainBell>,
    /// Where each core publishes its figures for /metrics and /healthz.
    pub(super) metrics: Arc<crate::metrics::Registry>,
    /// The reconciliation thread.
    pub(super) auditor: Option<Arc<crate::auditor::Auditor>>,
    /// The store's lease: whether this appliance is active, and under which token.
    pub(super) lease: Arc<crate::lease::Lease>,
}

/// One core's life on its executor: [`core_main`], with its failure reported to the main
/// thread.
pub(super) async fn run(core: usize, setup: CoreSetup) {
    // Release builds abort on a panic (profile.release); in a build that unwinds, a core
    // that panics reports it here, since main cannot count on its channel closing (the
    // signal thread holds a sender for good).
    let failed = ReportOnDrop {
        events: setup.events.clone(),
        core,
        armed: true,
    };
    if let Err(reason) = core_main(core, setup).await {
        let _ = failed.events.send(CoreEvent::Failed { core, reason });
    }
    failed.disarm();
}

/// One core's start, in order: the mesh, the shard and its committer, the mesh server,
/// the shared port, the core's tasks (the drain, the key's refresh, the figures), its
/// ready report, its own port; then it accepts connections until it drains.
async fn core_main(core: usize, setup: CoreSetup) -> Result<(), String> {
    let config = &setup.config;
    let cores = config.server.cores as u16;
    let MeshPlace {
        senders,
        receivers,
        shard_id,
    } = join_mesh(&setup).await?;
    // The token the shard loads under (read before the load: a newer one makes the core
    // load again).
    let token = setup.lease.token();
    let (shard, key) = open_shard(&setup, shard_id, cores).await?;
    let assets = shard.asset_count();
    if !setup.lease.is_single_node() {
        if token != 0 {
            setup.lease.core_ready(token);
        }
        glommio::spawn_local(follow_lease(shard.clone(), setup.lease.clone(), token)).detach();
    }
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
    let ctx = Rc::new(core_context(&setup, router, key, cores)?);
    spawn_drain(core, &ctx, &setup);
    spawn_key_refresh(&ctx);
    spawn_publisher(core, &ctx, shard, &setup);
    let _ = setup.events.send(CoreEvent::Ready {
        core,
        shard: shard_id,
        assets,
    });
    listen_on_own_port(core, &ctx, config)?;
    accept_loop(ctx, listener).await;
    // Drained: the shard serves on (requests other cores forward, commits in flight)
    // until the process exits.
    std::future::pending::<()>().await;
    Ok(())
}

/// This core's place in the channel mesh.
struct MeshPlace {
    senders: Option<Senders<MeshMsg>>,
    receivers: Option<Receivers<MeshMsg>>,
    /// The core's mesh position, which is its shard number.
    shard_id: u16,
}

/// Joins the channel mesh (none, and shard 0, on a single core).
async fn join_mesh(setup: &CoreSetup) -> Result<MeshPlace, String> {
    let Some(mesh) = setup.mesh.clone() else {
        return Ok(MeshPlace {
            senders: None,
            receivers: None,
            shard_id: 0,
        });
    };
    let (s, r) = mesh
        .join()
        .await
        .map_err(|_| "cannot join the channel mesh".to_owned())?;
    let shard_id = s.peer_id() as u16;
    Ok(MeshPlace {
        senders: Some(s),
        receivers: Some(r),
        shard_id,
    })
}

/// Loads the shard's assets from the store and builds the shard, with this core's view of
/// the seed cache (returned too: the connections derive with it).
async fn open_shard(
    setup: &CoreSetup,
    shard_id: u16,
    cores: u16,
) -> Result<(Rc<Shard>, Rc<CoreKey>), String> {
    let config = &setup.config;
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
            shard_limits(config),
            shard_store,
            setup.regions.clone(),
        )
        .with_signer(Box::new(key.clone())),
    );
    Ok((shard, key))
}

/// The shard's bounds, from `[store]` and `[limits]`.
fn shard_limits(config: &Config) -> ShardLimits {
    ShardLimits {
        commit_batch_records_max: config.store.commit_batch_records_max,
        commit_batch_delay: config.store.commit_batch_delay,
        commit_batches_inflight_max: config.store.commit_batches_inflight_max,
        commit_timeout: config.store.commit_timeout,
        pending_max: config.limits.max_pending_per_shard as usize,
        assets_max: config.limits.max_assets_per_shard as usize,
        rotation_id_retention: config.limits.rotation_id_retention,
        rotation_ids_max: config.limits.rotation_ids_max_per_shard as usize,
        rate_limit_buckets: config.limits.rate_limit_buckets_per_shard as usize,
    }
}

/// What this core's connections share: the router, the key, the policy and limits in
/// force, and the core's counters.
fn core_context(
    setup: &CoreSetup,
    router: Rc<ShardRouter>,
    key: Rc<CoreKey>,
    cores: u16,
) -> Result<CoreContext, String> {
    let config = &setup.config;
    Ok(CoreContext {
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
        lease: setup.lease.clone(),
    })
}

/// Follows the store's lease: when this appliance takes it (a new token), the shard
/// re-reads what the store holds before the core counts as ready under it; the role turns
/// active once every core is. Losing the lease needs nothing here (every request is
/// refused NOT_ACTIVE, every commit under the old token fenced).
async fn follow_lease(shard: Rc<Shard>, lease: Arc<crate::lease::Lease>, mut loaded: i64) {
    loop {
        glommio::timer::sleep(LEASE_FOLLOW_POLL).await;
        let token = lease.token();
        if token == 0 || token == loaded {
            continue;
        }
        shard.reread().await;
        loaded = token;
        if lease.core_ready(token) {
            tracing::info!(
                token,
                "every shard is loaded under the new lease: this appliance is active"
            );
        }
    }
}

/// How often a core looks for a new lease token (bounds what a takeover waits for it).
const LEASE_FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// The drain: the main thread rings the bell on SIGTERM; this core wakes, closes its
/// listeners and its connections' reading, and reports once every connection has
/// answered what it read and closed (checked every DRAIN_POLL while it drains).
fn spawn_drain(core: usize, ctx: &Rc<CoreContext>, setup: &CoreSetup) {
    let ctx = ctx.clone();
    let bell = setup.draining.wait();
    let events = setup.events.clone();
    glommio::spawn_local(async move {
        // Rung, or dropped with the process: either way this core drains.
        let _ = bell.await;
        ctx.drain.open();
        while ctx.connections.get() > 0 {
            glommio::timer::sleep(DRAIN_POLL).await;
        }
        let _ = events.send(CoreEvent::Drained { core });
    })
    .detach();
}

/// Drops this core's copy of a sealed or replaced key even when no request comes.
fn spawn_key_refresh(ctx: &Rc<CoreContext>) {
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

/// Publishes this core's figures for the metrics, from now on (a core that stops
/// publishing fails /healthz).
fn spawn_publisher(core: usize, ctx: &Rc<CoreContext>, shard: Rc<Shard>, setup: &CoreSetup) {
    let ctx = ctx.clone();
    let registry = setup.metrics.clone();
    let every = setup.config.server.metrics_publish;
    glommio::spawn_local(async move {
        loop {
            publish_figures(core, &ctx, &shard, &registry);
            glommio::timer::sleep(every).await;
        }
    })
    .detach();
}

/// This core's own port, if any: a shard-aware client's requests for its assets.
fn listen_on_own_port(core: usize, ctx: &Rc<CoreContext>, config: &Config) -> Result<(), String> {
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

/// How often a draining core looks for its last connection to close.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(20);
