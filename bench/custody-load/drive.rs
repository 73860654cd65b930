//! A measured run against custody (`demo`, `run`): the assets registered, the open loop,
//! and beside it on connections of their own the region switcher (`--toggle-region-ms`)
//! and the reconciler load (`--reconcile-phase-s`).

use crate::cli::Options;
use crate::report::Report;
use crate::schedule::{lock, Session};
use crate::stats;
use crate::target::{failover_config, CustodyTarget};
use custody::client::{ClientError, FailoverClient, FailoverConfig};
use hdrhistogram::Histogram;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The full reconciliations run during the window (`--reconcile-phase-s`).
pub struct ReconcileLoad {
    pub runs: u64,
    pub records: u64,
    pub findings: u64,
    pub busy_refusals: u64,
    pub run_us: Histogram<u64>,
}

/// Registers the assets, then runs the open-loop load against custody and collects the
/// figures.
///
/// Threads: this thread paces (sleeping until each request's scheduled time, with the
/// timer slack lowered) and starts each request itself with [`Client::start`]; one tokio
/// worker runs the connections and records each reply as it arrives; a reporter prints a
/// live line every second. No per-request task or channel hop sits between the schedule
/// and the socket.
pub fn drive(
    o: &Options,
    endpoints: &[SocketAddr],
    certs: &Path,
    seed: u64,
    appliance_pid: Option<u32>,
) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("custody-load-io")
        .enable_all()
        .build()?;
    let config = failover_config(endpoints, certs);
    let (target, shards) = rt.block_on(CustodyTarget::connect(o, &config, seed))?;
    let mut session = Session::new(o, seed);
    if let Some(path) = &o.ack_log {
        session = session.with_ack_log(path, endpoints)?;
    }
    if let Some(path) = &o.failure_log {
        session = session.with_failure_log(path)?;
    }
    // The region switcher: its own connection, EU-WEST off and on every N ms, each
    // answer's latency recorded.
    let switch_us = Arc::new(Mutex::new(stats::latency_histogram()));
    let switcher = o.toggle_region_ms.map(|every| {
        let (finished, switch_us) = (session.finished.clone(), switch_us.clone());
        rt.spawn(toggle_region(config.clone(), every, finished, switch_us))
    });
    // The reconciler load: in odd phases of the measured window, full reconciliations
    // back to back on a connection of its own. `epoch` is odd while one is in flight and
    // moves on at every start and end, so a derivation can tell whether its life crossed
    // one (`epoch` at its scheduled time odd, or different at its answer).
    let epoch = Arc::new(AtomicU64::new(0));
    let reconciler = o.reconcile_phase.map(|phase| {
        let plan = Phases {
            phase,
            full: !o.reconcile_incremental,
            measure_from: session.measure_from,
            measure_until: session.measure_until,
            finished: session.finished.clone(),
            epoch: epoch.clone(),
        };
        rt.spawn(reconcile_in_phases(config.clone(), plan))
    });
    session.run(
        o,
        &target,
        target.assets.len(),
        appliance_pid,
        o.reconcile_phase.is_some().then_some(&epoch),
    )?;
    if let Some(switcher) = switcher {
        rt.block_on(switcher)??;
    }
    let reconcile_load = match reconciler {
        Some(r) => Some(rt.block_on(r)??),
        None => None,
    };
    let reconnects = target.reconnects();
    drop(target);
    drop(rt);
    let ack_log = session.finish_ack_log().transpose()?;
    let failure_log = session.finish_failure_log().transpose()?;
    let start_clock = session.start_clock;
    let (rec, memory, measured_unix_ms, cost) = session.take(appliance_pid);
    let switches = std::mem::replace(&mut *lock(&switch_us), stats::latency_histogram());
    Ok(Report {
        region_switch_us: (!switches.is_empty()).then_some(switches),
        reconcile_load,
        endpoints: endpoints.to_vec(),
        reconnects,
        ack_log,
        failure_log,
        start_clock: Some(start_clock),
        cost,
        ..Report::new(shards, rec, memory, measured_unix_ms)
    })
}

/// The region switcher's loop: EU-WEST off and on every `every` ms until `finished`,
/// each answer's latency into `switch_us`; left on at the end.
async fn toggle_region(
    config: FailoverConfig,
    every: u64,
    finished: Arc<AtomicBool>,
    switch_us: Arc<Mutex<Histogram<u64>>>,
) -> anyhow::Result<()> {
    let client = FailoverClient::connect(config).await?;
    let mut enabled = true;
    while !finished.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(every)).await;
        enabled = !enabled;
        let sent = Instant::now();
        client.set_region("EU-WEST", enabled).await?;
        let _ = lock(&switch_us).record((sent.elapsed().as_micros() as u64).max(1));
    }
    if !enabled {
        client.set_region("EU-WEST", true).await?;
    }
    anyhow::Ok(())
}

/// When the reconciler load runs: the odd `phase`-long phases of the measured window.
struct Phases {
    phase: Duration,
    /// Full runs (`false`: incremental, `--reconcile-incremental`).
    full: bool,
    measure_from: Instant,
    measure_until: Instant,
    finished: Arc<AtomicBool>,
    /// Odd while a run is in flight; moves on at every start and end.
    epoch: Arc<AtomicU64>,
}

/// The reconciler load's loop: reconciliations back to back in the reconciling phases,
/// asleep in the quiet ones, until the window ends or the run is `finished`.
async fn reconcile_in_phases(
    config: FailoverConfig,
    plan: Phases,
) -> anyhow::Result<ReconcileLoad> {
    let Phases {
        phase,
        full,
        measure_from,
        measure_until,
        finished,
        epoch,
    } = plan;
    let client = FailoverClient::connect(config).await?;
    let mut load = ReconcileLoad {
        runs: 0,
        records: 0,
        findings: 0,
        busy_refusals: 0,
        run_us: stats::latency_histogram(),
    };
    loop {
        let now = Instant::now();
        if finished.load(Ordering::Relaxed) || now >= measure_until {
            break;
        }
        let in_window = now.saturating_duration_since(measure_from);
        let phase_no = (in_window.as_nanos() / phase.as_nanos().max(1)) as u64;
        if now < measure_from || phase_no % 2 == 0 {
            // A quiet phase: sleep to the next reconciling one.
            let next = measure_from + phase * (phase_no as u32 | 1);
            tokio::time::sleep_until(next.into()).await;
            continue;
        }
        epoch.fetch_add(1, Ordering::AcqRel);
        let sent = Instant::now();
        let result = client.reconcile(full).await;
        epoch.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(r) => {
                load.runs += 1;
                load.records += r.records_checked;
                load.findings += u64::from(r.findings_total);
                let _ = load
                    .run_us
                    .record((sent.elapsed().as_micros() as u64).max(1));
            }
            Err(ClientError::Refused(r)) if r.status == custody::wire::Status::Busy => {
                load.busy_refusals += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("reconciliation under load: {e}")),
        }
    }
    anyhow::Ok(load)
}
