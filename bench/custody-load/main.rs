//! custody-load: the load harness.
//!
//! ```text
//! custody-load demo [OPTIONS]                   start custodyd on the embedded store, drive it, verify
//! custody-load run --addr A --certs DIR [OPTIONS] [--verify-db FILE]   drive a running appliance
//! ```
//!
//! Open loop at a constant rate: a pacing thread schedules each request at its own time,
//! and latency is measured from that scheduled time, not from when the request could be
//! sent, so a stall shows up in the figures instead of hiding (no coordinated omission).
//! Requests scheduled during the warm-up are served but left out of the figures. At the
//! end every acknowledged derivation's receipt (shard, seq) is looked up in the audit log,
//! and (demo) the appliance reconciles its whole audit log. Exit status: 0, 4 when an
//! acknowledged derivation has no audit record, 5 when the reconciliation finds anything
//! (drift above 0 among it).

use anyhow::{bail, Context};
use custody::client::{Client, ClientConfig, ClientError};
use custody::store::postgres::{self, PgConfig};
use custody::store::sqlite::SqliteReader;
use custody::wire::{DeriveBody, Receipt, Reply, Request};
use hdrhistogram::Histogram;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const USAGE: &str = "usage:
  custody-load demo [OPTIONS]
      start custodyd (embedded SQLite store, dev seal, dev certificates in a fresh
      directory), drive it, verify the audit log, have it reconcile its whole audit
      log (exit 5 on any finding), stop it
  custody-load run --addr HOST:PORT --certs DIR [OPTIONS] [--verify-db FILE]
      drive a running appliance (assets are registered first)

OPTIONS:
  --rate N          requests per second (default 15000)
  --duration S      measured seconds (default 10)
  --warmup S        seconds before the measurement, excluded from the figures (default 1)
  --connections N   TLS connections (default 4)
  --depth N         requests in flight per connection at most (default 256)
  --assets N        assets to register and spread the load over (default 1000)
  --cores N         (demo) appliance cores (default: all)
  --state-dir DIR   (demo) where to put the appliance's files (default: a new temp dir)
  --postgres URL    (demo) use PostgreSQL at URL (e.g. postgresql://root@127.0.0.1/test)
                    instead of the embedded store: a fresh database is made, migrated,
                    verified and dropped
  --seal-ttl S      (demo) the seed cache's TTL (seal.cache_ttl_s; default 300): the
                    report counts the refreshes through the seal provider in the window
  --rotate-percent P  this share of the requests (0-100, default 0) are ROTATEs of the
                    chosen asset instead of DERIVEs; the latency figures stay the
                    derivations' (so p99 with and without rotations compare directly)
  --toggle-region-ms MS  switch the region EU-WEST off and on again every MS ms on a
                    connection of its own (the derivations use US-EAST); the report
                    gives the switch's answer latency (SET_REGION is committed, then
                    in force on every core)
  --reconcile-phase-s S  during the measured window, alternate S-second phases with
                    and without full reconciliations (RECONCILE --full back to back on
                    a connection of its own); each derivation is classed by whether a
                    reconciliation was in flight at any moment of its life, and the
                    report gives the latency of both classes from the same run (demo:
                    the appliance's periodic runs are off, so none runs unseen)
  --reconcile-rate N  (demo) the appliance's audit.reconcile_records_per_s (default
                    50000; 0 = unpaced)
  --json            print the report as JSON";

/// A request that has not answered after this long counts as an error (TIMEOUT).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Options {
    rate: u64,
    duration: Duration,
    warmup: Duration,
    connections: usize,
    depth: usize,
    assets: usize,
    cores: Option<usize>,
    state_dir: Option<PathBuf>,
    postgres: Option<String>,
    seal_ttl: Option<u64>,
    addr: Option<SocketAddr>,
    certs: Option<PathBuf>,
    verify_db: Option<PathBuf>,
    rotate_percent: f64,
    toggle_region_ms: Option<u64>,
    reconcile_phase: Option<Duration>,
    reconcile_rate: Option<u64>,
    json: bool,
}

fn main() {
    match real_main() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("custody-load: {e:#}");
            std::process::exit(1);
        }
    }
}

fn real_main() -> anyhow::Result<i32> {
    use lexopt::prelude::*;
    let mut o = Options {
        rate: 15_000,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(1),
        connections: 4,
        depth: 256,
        assets: 1000,
        cores: None,
        state_dir: None,
        postgres: None,
        seal_ttl: None,
        addr: None,
        certs: None,
        verify_db: None,
        rotate_percent: 0.0,
        toggle_region_ms: None,
        reconcile_phase: None,
        reconcile_rate: None,
        json: false,
    };
    let mut command = None;
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Long("rate") => o.rate = p.value()?.parse()?,
            Long("duration") => o.duration = Duration::from_secs_f64(p.value()?.parse()?),
            Long("warmup") => o.warmup = Duration::from_secs_f64(p.value()?.parse()?),
            Long("connections") => o.connections = p.value()?.parse()?,
            Long("depth") => o.depth = p.value()?.parse()?,
            Long("assets") => o.assets = p.value()?.parse()?,
            Long("cores") => o.cores = Some(p.value()?.parse()?),
            Long("state-dir") => o.state_dir = Some(p.value()?.into()),
            Long("postgres") => o.postgres = Some(p.value()?.string()?),
            Long("seal-ttl") => o.seal_ttl = Some(p.value()?.parse()?),
            Long("addr") => o.addr = Some(p.value()?.parse()?),
            Long("certs") => o.certs = Some(p.value()?.into()),
            Long("verify-db") => o.verify_db = Some(p.value()?.into()),
            Long("rotate-percent") => o.rotate_percent = p.value()?.parse()?,
            Long("toggle-region-ms") => o.toggle_region_ms = Some(p.value()?.parse()?),
            Long("reconcile-phase-s") => {
                o.reconcile_phase = Some(Duration::from_secs_f64(p.value()?.parse()?))
            }
            Long("reconcile-rate") => o.reconcile_rate = Some(p.value()?.parse()?),
            Long("json") => o.json = true,
            Long("help") | Short('h') => {
                println!("{USAGE}");
                return Ok(0);
            }
            Value(v) if command.is_none() => command = Some(v.string()?),
            _ => return Err(arg.unexpected().into()),
        }
    }
    if o.rate == 0 || o.connections == 0 || o.depth == 0 || o.assets == 0 {
        bail!("--rate, --connections, --depth and --assets must be positive");
    }
    if o.reconcile_phase
        .is_some_and(|d| d < Duration::from_millis(100))
    {
        bail!("--reconcile-phase-s must be at least 0.1");
    }
    if !(0.0..=100.0).contains(&o.rotate_percent) {
        bail!("--rotate-percent must be between 0 and 100");
    }
    match command.as_deref() {
        Some("demo") => demo(o),
        Some("run") => {
            let addr = o.addr.context("run needs --addr")?;
            let certs = o.certs.clone().context("run needs --certs DIR")?;
            let report = drive(&o, addr, &certs, 0)?;
            let audit = o.verify_db.clone().map(AuditSource::Sqlite);
            finish(&o, report, audit)
        }
        _ => {
            eprintln!("{USAGE}");
            Ok(2)
        }
    }
}

/// The appliance started by `demo`; killed when dropped.
struct Appliance {
    child: Child,
    log: PathBuf,
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn demo(o: Options) -> anyhow::Result<i32> {
    let (dir, _temp) = match &o.state_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new().prefix("custody-demo-").tempdir()?;
            (t.path().to_owned(), Some(t))
        }
    };
    std::fs::create_dir_all(&dir)?;
    let certs = dir.join("certs");
    custody::tls::write_dev_certs(&certs, "custody-load")?;
    let seed = dir.join("dev-seed.bin");
    if !seed.exists() {
        custody::seal::write_dev_seed(&seed)?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let database = match &o.postgres {
        Some(url) => Some(TempDatabase::create(url)?),
        None => None,
    };
    let store_section = match &database {
        Some(db) => format!(
            "[store]\nbackend = \"postgres\"\npostgres_host = \"{}\"\npostgres_port = {}\npostgres_user = \"{}\"\npostgres_dbname = \"{}\"\n",
            db.config.addr.ip(),
            db.config.addr.port(),
            db.config.user,
            db.config.dbname
        ),
        None => String::new(),
    };
    let seal_section = match o.seal_ttl {
        Some(ttl) => format!("\n[seal]\ncache_ttl_s = {ttl}\n"),
        None => String::new(),
    };
    // With --reconcile-phase-s the harness's runs are the only ones: the appliance's own
    // periodic runs would fall in the quiet phases unseen.
    let mut audit_section = String::new();
    if let Some(n) = o.reconcile_rate {
        audit_section += &format!("reconcile_records_per_s = {n}\n");
    }
    if o.reconcile_phase.is_some() {
        audit_section += "reconcile_interval_s = 0\n";
    }
    if !audit_section.is_empty() {
        audit_section = format!("\n[audit]\n{audit_section}");
    }
    let config = dir.join("custody.toml");
    // The harness's client registers, derives and reads status; its rate limit is set out
    // of the way of the measurement (the limiter still runs on every request).
    const POLICY_SECTION: &str = "\n[policy]\nderivers = [{ identity = \"custody-load\", purposes = [\"TRADING\", \"SETTLEMENT\", \"AUDIT\", \"BACKUP\"], regions = [\"US-EAST\", \"EU-WEST\", \"APAC\"] }]\noperators = [\"custody-load\"]\nauditors = [\"custody-load\"]\nadmins = [\"custody-load\"]\nrate_limits = { deriver = \"1000000000/1s\", operator = \"1000000000/1s\", auditor = \"1000000000/1s\" }\n";
    std::fs::write(
        &config,
        format!(
            "# written by custody-load demo\n[server]\nlisten = \"{addr}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\ncores = {}\nstate_dir = \"{}\"\nlog_level = \"info\"\nstats_log_interval_s = 1\n\n[tls]\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\nclient_ca = \"certs/ca.pem\"\n\n{store_section}{seal_section}{audit_section}{POLICY_SECTION}",
            o.cores.unwrap_or(0),
            dir.display()
        ),
    )?;
    let custodyd = std::env::current_exe()?.with_file_name("custodyd");
    if !custodyd.exists() {
        bail!(
            "{} not found: build the workspace first (cargo build --release)",
            custodyd.display()
        );
    }
    if database.is_some() {
        let out = Command::new(&custodyd)
            .arg("migrate")
            .arg("--config")
            .arg(&config)
            .output()?;
        if !out.status.success() {
            bail!(
                "custodyd migrate failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let log = dir.join("custodyd.log");
    let mut command = Command::new(&custodyd);
    command
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.join("custodyd.stderr"))?);
    // The appliance goes with the harness even if the harness dies without unwinding
    // (release builds abort on panic, e.g. when its output pipe closes).
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", custodyd.display()))?;
    let mut appliance = Appliance { child, log };
    if !o.json {
        let store = match &database {
            Some(db) => format!("PostgreSQL database {}", db.config.dbname),
            None => "embedded SQLite store".to_owned(),
        };
        eprintln!(
            "custody-load: started custodyd on {addr} (state in {}, {store}, dev seal)",
            dir.display()
        );
    }
    wait_ready(&mut appliance, addr, &certs, &dir)?;
    let mut report = drive(&o, addr, &certs, 1)?;
    // The last second's figures are logged a moment after the run ends.
    std::thread::sleep(Duration::from_millis(1100));
    report.commits = commit_figures(&dir.join("custodyd.stderr"), report.measured_unix_ms);
    report.seal_refreshes = seal_refreshes(&dir.join("custodyd.stderr"), report.measured_unix_ms);
    // The run ends with the appliance's full reconciliation of its audit log.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    report.reconciliation = Some(rt.block_on(async {
        let c = Client::connect(&client_config(addr, &certs)).await?;
        c.reconcile(true)
            .await
            .map_err(|e| anyhow::anyhow!("reconciliation after the run: {e}"))
    })?);
    let audit = match &database {
        Some(db) => AuditSource::Postgres(db.config.clone()),
        None => AuditSource::Sqlite(dir.join("custody.db")),
    };
    let code = finish(&o, report, Some(audit))?;
    drop(appliance);
    drop(database);
    Ok(code)
}

fn wait_ready(
    app: &mut Appliance,
    addr: SocketAddr,
    certs: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = app.child.try_wait()? {
            let stderr = std::fs::read_to_string(dir.join("custodyd.stderr")).unwrap_or_default();
            bail!("custodyd exited with {status} before it served:\n{stderr}");
        }
        let ok = rt.block_on(async {
            match Client::connect(&client_config(addr, certs)).await {
                Ok(c) => c.hello().await.is_ok(),
                Err(_) => false,
            }
        });
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "custodyd did not serve within 30 s (log: {})",
                app.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn client_config(addr: SocketAddr, certs: &Path) -> ClientConfig {
    ClientConfig {
        addr,
        server_name: "localhost".into(),
        ca: certs.join("ca.pem"),
        cert: certs.join("client.pem"),
        key: certs.join("client.key"),
    }
}

#[derive(Default)]
struct Stats {
    sent: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    latency_us: Option<Histogram<u64>>,
    measured_ok: u64,
    measured_errors: u64,
    last_measured_done: Option<Instant>,
    receipts: Vec<(Receipt, Uuid, u64)>,
    live_errors: u64,
    live_latency_us: Option<Histogram<u64>>,
    answered: u64,
    rotations_sent: u64,
    rotations_ok: u64,
    rotations_busy: u64,
    /// Measured derivations with a reconciliation in flight at some moment of their life
    /// (`--reconcile-phase-s`), and those without.
    during_reconcile_us: Option<Histogram<u64>>,
    quiet_us: Option<Histogram<u64>>,
}

/// The full reconciliations run during the window (`--reconcile-phase-s`).
#[derive(Default)]
struct ReconcileLoad {
    runs: u64,
    records: u64,
    findings: u64,
    busy_refusals: u64,
    run_ms: Vec<f64>,
}

struct Report {
    shards: u16,
    stats: Stats,
    measured_elapsed: Duration,
    /// The measured window, milliseconds since the Unix epoch.
    measured_unix_ms: (u64, u64),
    /// The appliance's group-commit figures in the window (demo only).
    commits: Option<CommitFigures>,
    /// Refreshes of the seed cache through the seal provider in the window (demo only).
    seal_refreshes: Option<usize>,
    /// Answer latency of each region switch (`--toggle-region-ms`), microseconds.
    region_switch_us: Vec<u64>,
    /// The appliance's full reconciliation after the run (demo only).
    reconciliation: Option<custody::wire::ReconcileSummary>,
    /// Reconciliations run during the window (`--reconcile-phase-s`).
    reconcile_load: Option<ReconcileLoad>,
}

fn lock_vec<T>(m: &Mutex<Vec<T>>) -> std::sync::MutexGuard<'_, Vec<T>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// (count, p50, max) of microsecond samples, in milliseconds.
fn switch_figures(samples: &[u64]) -> Option<(usize, f64, f64)> {
    let mut v = samples.to_vec();
    v.sort_unstable();
    let mid = *v.get(v.len() / 2)?;
    Some((v.len(), mid as f64 / 1000.0, *v.last()? as f64 / 1000.0))
}

/// Counts the appliance's `seed cache: refreshed` log lines whose `at_ms` falls in `window`.
fn seal_refreshes(log: &Path, window: (u64, u64)) -> Option<usize> {
    let text = std::fs::read_to_string(log).ok()?;
    Some(
        text.lines()
            .filter(|l| l.contains("seed cache: refreshed"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix("at_ms="))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .filter(|at| (window.0..=window.1).contains(at))
            .count(),
    )
}

/// Group commit as the appliance saw it during the measured window, read from its
/// per-shard `commit stats` log lines (one per shard per second in the demo).
struct CommitFigures {
    /// Shard-seconds that fell wholly inside the window.
    intervals: usize,
    batches: u64,
    records: u64,
    failed: u64,
    batch_p50: f64,
    batch_p99: f64,
    batch_max: u64,
    commit_p50_ms: f64,
    commit_p99_ms: f64,
    commit_max_ms: f64,
}

/// Reads the `commit stats` lines of a custodyd log whose interval (the second before
/// `at_ms`) lies inside `window`; percentiles are medians over those shard-seconds.
fn commit_figures(log: &Path, window: (u64, u64)) -> Option<CommitFigures> {
    let text = std::fs::read_to_string(log).ok()?;
    let mut lines: Vec<HashMap<&str, u64>> = Vec::new();
    for line in text.lines().filter(|l| l.contains("commit stats")) {
        let fields: HashMap<&str, u64> = line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        let at = *fields.get("at_ms")?;
        if at >= window.0 + 1000 && at <= window.1 + 100 {
            lines.push(fields);
        }
    }
    if lines.is_empty() {
        return None;
    }
    let field = |k: &str| {
        lines
            .iter()
            .map(|f| f.get(k).copied().unwrap_or(0))
            .collect::<Vec<u64>>()
    };
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2] as f64
    };
    Some(CommitFigures {
        intervals: lines.len(),
        batches: field("batches").iter().sum(),
        records: field("records").iter().sum(),
        failed: field("failed").iter().sum(),
        batch_p50: median(field("batch_p50")),
        batch_p99: median(field("batch_p99")),
        batch_max: field("batch_max").into_iter().max().unwrap_or(0),
        commit_p50_ms: median(field("commit_p50_us")) / 1000.0,
        commit_p99_ms: median(field("commit_p99_us")) / 1000.0,
        commit_max_ms: field("commit_max_us").into_iter().max().unwrap_or(0) as f64 / 1000.0,
    })
}

fn lock(stats: &Mutex<Stats>) -> std::sync::MutexGuard<'_, Stats> {
    match stats.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Registers the assets, then runs the open-loop load and collects the figures.
///
/// Threads: this thread paces (sleeping until each request's scheduled time, with the
/// timer slack lowered) and starts each request itself with [`Client::start`]; one tokio
/// worker runs the connections and records each reply as it arrives; a reporter prints a
/// live line every second. No per-request task or channel hop sits between the schedule
/// and the socket.
fn drive(o: &Options, addr: SocketAddr, certs: &Path, seed: u64) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("custody-load-io")
        .enable_all()
        .build()?;
    let (clients, hello, assets) = rt.block_on(async {
        let config = client_config(addr, certs);
        let mut clients = Vec::with_capacity(o.connections);
        for _ in 0..o.connections {
            clients.push(Arc::new(Client::connect(&config).await?));
        }
        let hello = clients[0].hello().await?;
        let assets = register_assets(&clients, o.assets, seed).await?;
        anyhow::Ok((clients, hello, assets))
    })?;

    let stats = Arc::new(Mutex::new(Stats {
        latency_us: Some(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        live_latency_us: Some(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        during_reconcile_us: Some(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        quiet_us: Some(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        ..Stats::default()
    }));
    let total = (o.rate as f64 * (o.warmup + o.duration).as_secs_f64()).round() as u64;
    let interval_ns = 1e9 / o.rate as f64;
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + o.warmup;
    let measure_until = measure_from + o.duration;
    let inflight: Vec<Arc<AtomicUsize>> = (0..o.connections).map(|_| Arc::default()).collect();

    let finished = Arc::new(AtomicBool::new(false));
    // The region switcher: its own connection, EU-WEST off and on every N ms, each
    // answer's latency recorded.
    let switch_us = Arc::new(Mutex::new(Vec::<u64>::new()));
    let switcher = match o.toggle_region_ms {
        Some(every) => {
            let (finished, switch_us) = (finished.clone(), switch_us.clone());
            let config = client_config(addr, certs);
            Some(rt.spawn(async move {
                let client = Client::connect(&config).await?;
                let mut enabled = true;
                while !finished.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(every)).await;
                    enabled = !enabled;
                    let sent = Instant::now();
                    client.set_region("EU-WEST", enabled).await?;
                    lock_vec(&switch_us).push(sent.elapsed().as_micros() as u64);
                }
                if !enabled {
                    client.set_region("EU-WEST", true).await?;
                }
                anyhow::Ok(())
            }))
        }
        None => None,
    };
    // The reconciler load: in odd phases of the measured window, full reconciliations
    // back to back on a connection of its own. `epoch` is odd while one is in flight and
    // moves on at every start and end, so a derivation can tell whether its life crossed
    // one (`epoch` at its scheduled time odd, or different at its answer).
    let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reconciler = match o.reconcile_phase {
        Some(phase) => {
            let (finished, epoch) = (finished.clone(), epoch.clone());
            let config = client_config(addr, certs);
            Some(rt.spawn(async move {
                let client = Client::connect(&config).await?;
                let mut load = ReconcileLoad::default();
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
                    let result = client.reconcile(true).await;
                    epoch.fetch_add(1, Ordering::AcqRel);
                    match result {
                        Ok(r) => {
                            load.runs += 1;
                            load.records += r.records_checked;
                            load.findings += u64::from(r.findings_total);
                            load.run_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
                        }
                        Err(ClientError::Refused(r)) if r.status == custody::wire::Status::Busy => {
                            load.busy_refusals += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => return Err(anyhow::anyhow!("reconciliation under load: {e}")),
                    }
                }
                anyhow::Ok(load)
            }))
        }
        None => None,
    };
    let reporter = {
        let stats = stats.clone();
        let finished = finished.clone();
        let json = o.json;
        std::thread::Builder::new()
            .name("custody-load-live".into())
            .spawn(move || {
                let mut last_ok = 0;
                let mut next = start + Duration::from_secs(1);
                while !finished.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(Duration::from_millis(100)));
                        continue;
                    }
                    next += Duration::from_secs(1);
                    let mut s = lock(&stats);
                    let p99 = s
                        .live_latency_us
                        .as_ref()
                        .map(|h| h.value_at_quantile(0.99))
                        .unwrap_or(0);
                    if !json {
                        eprintln!(
                            "  {:>4.0}s  {:>6} req/s  errors {:>5}  p99 {:>7.3} ms",
                            start.elapsed().as_secs_f64(),
                            s.ok - last_ok,
                            s.live_errors,
                            p99 as f64 / 1000.0
                        );
                    }
                    last_ok = s.ok;
                    s.live_errors = 0;
                    if let Some(h) = s.live_latency_us.as_mut() {
                        h.reset();
                    }
                }
            })?
    };

    // SAFETY: prctl with PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ seed;
    for i in 0..total {
        let scheduled = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
        let now = Instant::now();
        if scheduled > now {
            std::thread::sleep(scheduled - now);
        }
        // A connection with room; if every one is at its depth, wait (the delay counts:
        // latency runs from the scheduled time).
        let waiting_since = Instant::now();
        let conn = loop {
            let first = (i as usize) % o.connections;
            let found = (0..o.connections)
                .map(|k| (first + k) % o.connections)
                .find(|&c| inflight[c].load(Ordering::Acquire) < o.depth);
            match found {
                Some(c) => break c,
                None if waiting_since.elapsed() > REQUEST_TIMEOUT => {
                    finished.store(true, Ordering::Relaxed);
                    bail!(
                        "every connection has had {} requests unanswered for {} s: the appliance stopped answering",
                        o.depth,
                        REQUEST_TIMEOUT.as_secs()
                    );
                }
                None => std::thread::sleep(Duration::from_micros(20)),
            }
        };
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let asset = assets[(rng % assets.len() as u64) as usize];
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let rotate = (rng % 1_000_000) < (o.rotate_percent * 10_000.0) as u64;
        let request = if rotate {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&rng.to_le_bytes());
            id[8..].copy_from_slice(&(i ^ seed).to_le_bytes());
            Request::Rotate(custody::wire::RotateBody {
                asset,
                rotation_id: uuid::Builder::from_random_bytes(id).into_uuid(),
                expected_counter: None,
            })
        } else {
            Request::Derive(DeriveBody {
                asset,
                path: format!("m/44'/0'/0'/0'/{}", i % 1000),
                region: "US-EAST".into(),
                purpose: 1,
                ttl_s: 300,
            })
        };
        inflight[conn].fetch_add(1, Ordering::AcqRel);
        {
            let mut s = lock(&stats);
            s.sent += 1;
            s.rotations_sent += u64::from(rotate);
        }
        let stats = stats.clone();
        let slot = inflight[conn].clone();
        let epoch_at_schedule = epoch.load(Ordering::Acquire);
        let epoch = epoch.clone();
        clients[conn].start(
            &request,
            Box::new(move |result| {
                let done = Instant::now();
                slot.fetch_sub(1, Ordering::AcqRel);
                let latency_us =
                    (done.saturating_duration_since(scheduled).as_micros() as u64).max(1);
                let measured = scheduled >= measure_from && scheduled < measure_until;
                let mut s = lock(&stats);
                s.answered += 1;
                match result {
                    Ok(Reply::Derived(d)) => {
                        s.ok += 1;
                        s.receipts.push((d.receipt, asset, d.counter));
                        if let Some(h) = s.live_latency_us.as_mut() {
                            let _ = h.record(latency_us);
                        }
                        if measured {
                            s.measured_ok += 1;
                            s.last_measured_done = Some(done);
                            if let Some(h) = s.latency_us.as_mut() {
                                let _ = h.record(latency_us);
                            }
                            let crossed = epoch_at_schedule % 2 == 1
                                || epoch.load(Ordering::Acquire) != epoch_at_schedule;
                            let class = if crossed {
                                s.during_reconcile_us.as_mut()
                            } else {
                                s.quiet_us.as_mut()
                            };
                            if let Some(h) = class {
                                let _ = h.record(latency_us);
                            }
                        }
                        return;
                    }
                    Ok(Reply::Rotated(_)) => {
                        s.rotations_ok += 1;
                        return;
                    }
                    // Another rotation of the asset is being committed: the documented
                    // answer (retry), not a failure.
                    Ok(Reply::Refused(r)) if rotate && r.status == custody::wire::Status::Busy => {
                        s.rotations_busy += 1;
                        return;
                    }
                    Ok(Reply::Refused(r)) => {
                        *s.errors.entry(r.status.name().to_owned()).or_default() += 1
                    }
                    Ok(_) => *s.errors.entry("UNEXPECTED_REPLY".to_owned()).or_default() += 1,
                    Err(ClientError::Closed) => {
                        *s.errors.entry("CONNECTION_CLOSED".to_owned()).or_default() += 1
                    }
                    Err(e) => *s.errors.entry(format!("CLIENT: {e}")).or_default() += 1,
                }
                s.live_errors += 1;
                if measured {
                    s.measured_errors += 1;
                }
            }),
        );
    }
    // Wait for the last answers; whatever has not answered by then timed out.
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let (sent, answered) = {
            let s = lock(&stats);
            (s.sent, s.answered)
        };
        if answered >= sent {
            break;
        }
        if Instant::now() > deadline {
            *lock(&stats).errors.entry("TIMEOUT".into()).or_default() += sent - answered;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    finished.store(true, Ordering::Relaxed);
    let _ = reporter.join();
    if let Some(switcher) = switcher {
        rt.block_on(switcher)??;
    }
    let reconcile_load = match reconciler {
        Some(r) => Some(rt.block_on(r)??),
        None => None,
    };
    let switch_us = std::mem::take(&mut *lock_vec(&switch_us));
    drop(clients);
    drop(rt);
    let stats = std::mem::take(&mut *lock(&stats));
    let measured_elapsed = stats
        .last_measured_done
        .map(|t| t.saturating_duration_since(measure_from))
        .unwrap_or(o.duration)
        .max(o.duration);
    // The window on the wall clock, to pick the appliance's commit figures that fall in it.
    let unix_now = custody::audit::now_ms();
    let measured_from_unix_ms = unix_now.saturating_sub(
        Instant::now()
            .saturating_duration_since(measure_from)
            .as_millis() as u64,
    );
    Ok(Report {
        shards: hello.shard_count,
        stats,
        measured_elapsed,
        measured_unix_ms: (
            measured_from_unix_ms,
            measured_from_unix_ms + measured_elapsed.as_millis() as u64,
        ),
        commits: None,
        seal_refreshes: None,
        region_switch_us: switch_us,
        reconciliation: None,
        reconcile_load,
    })
}

async fn register_assets(
    clients: &[Arc<Client>],
    n: usize,
    seed: u64,
) -> anyhow::Result<Vec<Uuid>> {
    // Bounded concurrency: the appliance answers BUSY past its per-connection limit.
    let limit = Arc::new(tokio::sync::Semaphore::new(256 * clients.len()));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let client = clients[i % clients.len()].clone();
        // Deterministic version-4 style ids, different per run seed.
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
        bytes[8..].copy_from_slice(&(seed ^ crate_run_nonce()).to_be_bytes());
        let asset = uuid::Builder::from_random_bytes(bytes).into_uuid();
        let permit = limit.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            match client.register(asset).await {
                Ok(_) => Ok(asset),
                Err(ClientError::Refused(r)) if r.status == custody::wire::Status::AssetExists => {
                    Ok(asset)
                }
                Err(e) => Err(e),
            }
        }));
    }
    let mut assets = Vec::with_capacity(n);
    for t in tasks {
        assets.push(t.await??);
    }
    Ok(assets)
}

/// A per-process nonce so that repeated runs against one appliance use fresh assets.
fn crate_run_nonce() -> u64 {
    use std::sync::OnceLock;
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(|| {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_be_bytes(b)
    })
}

/// Prints the report, verifies the audit log, and gives the exit code.
fn finish(o: &Options, report: Report, audit: Option<AuditSource>) -> anyhow::Result<i32> {
    let s = &report.stats;
    let audit = match audit {
        Some(source) => Some(verify_audit(source, &s.receipts)?),
        None => None,
    };
    let h = s.latency_us.as_ref().context("no histogram")?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let throughput = s.measured_ok as f64 / report.measured_elapsed.as_secs_f64();
    let errors_total: u64 = s.errors.values().sum();
    // With `--reconcile-phase-s`: the derivations' latency with and without a full
    // reconciliation in flight, and what the reconciliations did.
    let classes = report.reconcile_load.as_ref().map(|load| {
        let figures = |h: Option<&Histogram<u64>>| {
            h.filter(|h| !h.is_empty()).map(|h| {
                let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
                (h.len(), q(0.5), q(0.99), q(0.999), h.max() as f64 / 1000.0)
            })
        };
        let mut run_ms = load.run_ms.clone();
        run_ms.sort_by(f64::total_cmp);
        (
            figures(s.during_reconcile_us.as_ref()),
            figures(s.quiet_us.as_ref()),
            run_ms.get(run_ms.len() / 2).copied(),
            load,
        )
    });
    if o.json {
        let json = serde_json::json!({
            "rate_target": o.rate,
            "duration_s": o.duration.as_secs_f64(),
            "warmup_s": o.warmup.as_secs_f64(),
            "connections": o.connections,
            "depth": o.depth,
            "assets": o.assets,
            "shards": report.shards,
            "requests_sent": s.sent,
            "requests_ok": s.ok,
            "rotate_percent": o.rotate_percent,
            "rotations_sent": s.rotations_sent,
            "rotations_ok": s.rotations_ok,
            "rotations_busy": s.rotations_busy,
            "region_switches": switch_figures(&report.region_switch_us).map(|(n, p50, max)| serde_json::json!({
                "count": n, "answer_ms_p50": p50, "answer_ms_max": max,
            })),
            "errors": s.errors,
            "measured_ok": s.measured_ok,
            "measured_errors": s.measured_errors,
            "throughput_rps": throughput,
            "latency_ms": {
                "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p99_9": ms(0.999),
                "max": h.max() as f64 / 1000.0,
            },
            "commits": report.commits.as_ref().map(|c| serde_json::json!({
                "shard_seconds": c.intervals, "batches": c.batches, "records": c.records,
                "failed": c.failed,
                "records_per_batch_mean": c.records as f64 / c.batches.max(1) as f64,
                "batch_records": { "p50": c.batch_p50, "p99": c.batch_p99, "max": c.batch_max },
                "commit_ms": { "p50": c.commit_p50_ms, "p99": c.commit_p99_ms, "max": c.commit_max_ms },
            })),
            "seal_refreshes": report.seal_refreshes,
            "audit": audit.as_ref().map(|a| serde_json::json!({
                "acknowledged": a.acknowledged, "found": a.found, "missing": a.missing, "mismatched": a.mismatched,
            })),
            "reconcile_load": classes.as_ref().map(|(during, quiet, run_p50, load)| {
                let class = |c: &Option<(u64, f64, f64, f64, f64)>| c.map(|(n, p50, p99, p999, max)| serde_json::json!({
                    "derivations": n, "p50_ms": p50, "p99_ms": p99, "p99_9_ms": p999, "max_ms": max,
                }));
                serde_json::json!({
                    "phase_s": o.reconcile_phase.map(|d| d.as_secs_f64()),
                    "runs": load.runs, "records_checked": load.records, "findings": load.findings,
                    "busy_refusals": load.busy_refusals, "run_ms_p50": run_p50,
                    "during_reconciliation": class(during), "without": class(quiet),
                })
            }),
            "reconciliation": report.reconciliation.as_ref().map(|r| serde_json::json!({
                "records_checked": r.records_checked, "checkpoints_checked": r.checkpoints_checked,
                "assets_checked": r.assets_checked, "assets_drifted": r.assets_drifted,
                "drift_ratio": r.assets_drifted as f64 / r.assets_checked.max(1) as f64,
                "macs_checked": r.macs_checked, "findings": r.findings_total,
            })),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!(
            "custody-load: {} req/s target for {:.0} s after {:.0} s warm-up; {} connections, depth {}, {} assets, {} shards",
            o.rate,
            o.duration.as_secs_f64(),
            o.warmup.as_secs_f64(),
            o.connections,
            o.depth,
            o.assets,
            report.shards
        );
        println!(
            "  requests    {} sent, {} ok, {} errors ({} measured ok, {} measured errors)",
            s.sent, s.ok, errors_total, s.measured_ok, s.measured_errors
        );
        println!("  throughput  {throughput:.0} req/s (measured window)");
        if let Some((n, p50, max)) = switch_figures(&report.region_switch_us) {
            println!(
                "  regions     {n} switches of EU-WEST answered in p50 {p50:.3} ms, max {max:.3} ms (in force on every core from the answer)"
            );
        }
        if o.rotate_percent > 0.0 {
            println!(
                "  rotations   {} of {} sent answered OK, {} BUSY (another rotation of the asset in flight) ({} % of requests; the figures are the derivations')",
                s.rotations_ok, s.rotations_sent, s.rotations_busy, o.rotate_percent
            );
        }
        println!(
            "  latency     p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   p99.9 {:.3} ms   max {:.3} ms",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0
        );
        if let Some((during, quiet, run_p50, load)) = &classes {
            println!(
                "  reconciling {} full runs in the {:.1} s phases ({} records checked, run p50 {}, {} findings, {} BUSY)",
                load.runs,
                o.reconcile_phase.map(|d| d.as_secs_f64()).unwrap_or(0.0),
                load.records,
                run_p50.map(|m| format!("{m:.0} ms")).unwrap_or_else(|| "-".into()),
                load.findings,
                load.busy_refusals
            );
            for (name, class) in [("during", during), ("without", quiet)] {
                match class {
                    Some((n, p50, p99, p999, max)) => println!(
                        "    {name:<8} {n:>8} derivations  p50 {p50:.3} ms   p99 {p99:.3} ms   p99.9 {p999:.3} ms   max {max:.3} ms"
                    ),
                    None => println!("    {name:<8} no derivations"),
                }
            }
        }
        if s.errors.is_empty() {
            println!("  errors      none");
        } else {
            let list: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("  errors      {}", list.join(", "));
        }
        if let Some(c) = &report.commits {
            println!(
                "  commits     {} batches ({:.0}/s), {:.1} records per batch, {} failed; per shard-second (median of {}): batch p50 {} p99 {} (max {}), commit p50 {:.3} ms p99 {:.3} ms (max {:.3} ms)",
                c.batches,
                c.batches as f64 / report.measured_elapsed.as_secs_f64(),
                c.records as f64 / c.batches.max(1) as f64,
                c.failed,
                c.intervals,
                c.batch_p50,
                c.batch_p99,
                c.batch_max,
                c.commit_p50_ms,
                c.commit_p99_ms,
                c.commit_max_ms
            );
        }
        if let Some(n) = report.seal_refreshes {
            println!(
                "  seal        {n} refreshes of the seed cache through the provider in the window"
            );
        }
        match &audit {
            Some(a) => println!(
                "  audit       {} of {} acknowledged derivations have their durable audit record ({} missing, {} mismatched)",
                a.found, a.acknowledged, a.missing, a.mismatched
            ),
            None => println!("  audit       not checked (give --verify-db FILE)"),
        }
        if let Some(r) = &report.reconciliation {
            println!(
                "  reconcile   {} records, {} checkpoints (MACs {}), {} assets: drift ratio {:.6}, {} findings",
                r.records_checked,
                r.checkpoints_checked,
                if r.macs_checked { "checked" } else { "not checked" },
                r.assets_checked,
                r.assets_drifted as f64 / r.assets_checked.max(1) as f64,
                r.findings_total
            );
            for f in &r.findings {
                println!("              {f}");
            }
        }
    }
    let audit_ok = audit
        .map(|a| a.missing == 0 && a.mismatched == 0)
        .unwrap_or(true);
    // Any drift or other finding of the closing reconciliation fails the run.
    let reconciled = report
        .reconciliation
        .as_ref()
        .is_none_or(|r| r.findings_total == 0)
        && report
            .reconcile_load
            .as_ref()
            .is_none_or(|l| l.findings == 0);
    Ok(if !audit_ok {
        4
    } else if !reconciled {
        5
    } else {
        0
    })
}

struct AuditCheck {
    acknowledged: usize,
    found: usize,
    missing: usize,
    mismatched: usize,
}

/// Where the audit log to check is.
enum AuditSource {
    Sqlite(PathBuf),
    Postgres(PgConfig),
}

fn verify_audit(
    source: AuditSource,
    receipts: &[(Receipt, Uuid, u64)],
) -> anyhow::Result<AuditCheck> {
    // (shard, seq) → (asset, counter, is a derivation)
    let rows: HashMap<(u16, u64), (Uuid, u64, bool)> = match source {
        AuditSource::Sqlite(db) => SqliteReader::open(&db)?
            .audit_rows()?
            .into_iter()
            .map(|r| {
                (
                    (r.shard, r.seq),
                    (
                        r.asset,
                        r.counter,
                        r.event == custody::audit::AuditEvent::Derive,
                    ),
                )
            })
            .collect(),
        AuditSource::Postgres(config) => {
            postgres::on_own_executor("custody-load-db", move || async move {
                let client = postgres::connect(&config).await?;
                postgres::audit_rows(&client).await
            })??
            .into_iter()
            .map(|(shard, seq, event, asset, counter)| {
                ((shard, seq), (asset, counter, event == "DERIVE"))
            })
            .collect()
        }
    };
    let mut check = AuditCheck {
        acknowledged: receipts.len(),
        found: 0,
        missing: 0,
        mismatched: 0,
    };
    for (receipt, asset, counter) in receipts {
        match rows.get(&(receipt.shard, receipt.seq)) {
            Some((a, c, true)) if a == asset && c == counter => check.found += 1,
            Some(_) => check.mismatched += 1,
            None => check.missing += 1,
        }
    }
    Ok(check)
}

/// A fresh PostgreSQL database for one demo run, dropped afterwards.
struct TempDatabase {
    config: PgConfig,
    admin: PgConfig,
}

impl TempDatabase {
    fn create(url: &str) -> anyhow::Result<TempDatabase> {
        let admin = PgConfig::from_url(url).context("--postgres URL")?;
        let name = format!("custody_load_{}", std::process::id());
        let config = PgConfig {
            dbname: name.clone(),
            ..admin.clone()
        };
        let admin_for_create = admin.clone();
        postgres::on_own_executor("custody-load-db", move || async move {
            let c = postgres::connect(&admin_for_create).await?;
            for sql in [
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                format!("CREATE DATABASE {name}"),
            ] {
                c.batch_execute(&sql)
                    .await
                    .map_err(|e| custody::store::StoreError::Unavailable(e.to_string()))?;
            }
            Ok::<(), custody::store::StoreError>(())
        })??;
        Ok(TempDatabase { config, admin })
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.config.dbname.clone());
        let _ = postgres::on_own_executor("custody-load-db", move || async move {
            if let Ok(c) = postgres::connect(&admin).await {
                let _ = c
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        });
    }
}
