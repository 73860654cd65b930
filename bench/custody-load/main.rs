//! custody-load: the load harness.
//!
//! ```text
//! custody-load demo [OPTIONS]                   start custodyd on the embedded store, drive it, verify
//! custody-load run --addr A --certs DIR [OPTIONS] [--verify-db FILE]   drive a running appliance
//! custody-load article --postgres URL [OPTIONS]   the same schedule against the article's design
//! custody-load compare --postgres URL [OPTIONS]   custody on PostgreSQL, then the article's design
//! ```
//!
//! Open loop at a constant rate: a pacing thread schedules each request at its own time,
//! and latency is measured from that scheduled time, not from when the request could be
//! sent, so a stall shows up in the figures instead of hiding (no coordinated omission).
//! Requests scheduled during the warm-up are served but left out of the figures. The
//! assets are picked uniformly or by a Zipf law, the operations by a mix of DERIVE,
//! ROTATE and STATUS. At the end a sample of the acknowledged derivations' receipts
//! (all of them up to a million) is looked up in the audit log, and the appliance
//! reconciles its whole audit log. Memory stays bounded for a run of any length (a 24 h
//! soak): histograms, counters and a fixed-size sample of the receipts; the live line
//! shows the harness's and (demo) the appliance's resident memory. Exit status: 0; 4 when
//! an acknowledged derivation has no audit record; 5 when a reconciliation finds anything
//! (drift above 0 among it); 6 when the derivations' p99 misses `--slo-p99`.

mod article;
mod floods;
mod stats;
mod workload;

use anyhow::{bail, Context};
use custody::client::{Client, ClientConfig, ClientError};
use custody::net::free_loopback_ports;
use custody::op::{DeriveBody, Reply, Request};
use custody::store::postgres::{self, PgConfig};
use custody::store::sqlite::SqliteReader;
use custody::wire::Receipt;
use hdrhistogram::Histogram;
use stats::{Answer, Percentiles, Recorder};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;
use workload::{AssetPicker, Distribution, Mix, Op, Rng};

const USAGE: &str = "usage:
  custody-load demo [OPTIONS]
      start custodyd (embedded SQLite store, dev seal, dev certificates in a fresh
      directory), drive it, verify the audit log, have it reconcile its whole audit
      log (exit 5 on any finding), stop it
  custody-load run --addr HOST:PORT --certs DIR [OPTIONS] [--verify-db FILE]
      drive a running appliance (client.pem/client.key/ca.pem in DIR; the client needs
      the deriver, operator and auditor roles), then have it reconcile its audit log
  custody-load article --postgres URL [OPTIONS]
      the same schedule against the article's design in a fresh database at URL: one
      transaction per request (advisory lock, row lock, audit INSERT, COMMIT), over
      --article-connections connections
  custody-load compare --postgres URL [OPTIONS]
      demo on PostgreSQL, then article, with the same options; prints both reports and
      a table of the two
  custody-load floods --addr HOST:PORT --certs DIR --asset UUID [FLOOD OPTIONS]
      connection-level abuse against a running appliance, one flood after another,
      with a steady deriver (client.pem: deriver of UUID) and a fresh connection every
      100 ms measured before, during and after each; floods use clients/flood.pem (an
      identity with a role) and clients/nobody.pem (no role), from --flood-source;
      exit 1 if the deriver or a fresh connection failed at any moment
      (bench/floods.sh starts an appliance and runs them at full size)

flood options:
  --kinds K,...     tcp, roleless, identity, slow-header, slow-body, idle, memory
                    (default: all but memory)
  --flood-connections N  connections per flood (default 1000)
  --hold-s S        how long a flood holds its connections (default 5)
  --settle-s S      measured before and after each flood (default 3)
  --deriver-rate N  the steady deriver's derivations a second (default 20)
  --flood-source IP the floods' source address (default 127.0.0.2)
  --rounds N        (memory) open and close the connections N times (default 3)
  --admin ADDR      the admin listener, for custody_heap_bytes
  --pid PID         custodyd's process, for its resident memory

options:
  --rate N          requests per second (default 15000)
  --duration S      measured seconds (default 10; a soak: 86400)
  --warmup S        seconds before the measurement, excluded from the figures (default 1)
  --connections N   TLS connections (default 4)
  --depth N         requests in flight per connection at most (default 256)
  --assets N        assets to register and spread the load over (default 1000)
  --distribution D  how requests pick their asset: uniform (default), zipf (s = 1) or
                    zipf:S (rank k gets weight 1/k^S)
  --mix M           the operations, as weights: derive=90,rotate=5,status=5 (default
                    derive=100); latency is reported per operation
  --rotate-percent P  the same as --mix derive=100-P,rotate=P
  --slo-p99 D       exit 6 when the derivations' p99 is above D (e.g. 35ms, 0.05s) or
                    any measured request failed
  --clients K       plain (default: every connection on the shared port), shard-aware
                    (each request on its shard's own port, HELLO's shard_ports) or
                    both (every other request each way: both measured in one run)
  --no-reconcile    (run) skip the closing reconciliation (it needs the auditor role)
  --cores N         (demo) appliance cores (default: all)
  --state-dir DIR   (demo) where to put the appliance's files (default: a new temp dir)
  --postgres URL    (demo) use PostgreSQL at URL (e.g. postgresql://root@127.0.0.1/test)
                    instead of the embedded store: a fresh database is made, migrated,
                    verified and dropped
  --seal-ttl S      (demo) the seed cache's TTL (seal.cache_ttl_s; default 300): the
                    report counts the refreshes through the seal provider in the window
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
  --reconcile-incremental  the --reconcile-phase-s runs are incremental (each checks
                    the records since the last: the steady cost of the periodic runs,
                    paid continuously) instead of full
  --reconcile-rate N  (demo) the appliance's audit.reconcile_records_per_s (default
                    50000; 0 = unpaced)
  --article-connections N  (article, compare) PostgreSQL connections for the article's
                    design, each one transaction at a time (default 16: pgbench's best
                    on this hardware, bench/article/run.sh)
  --json            print the report as JSON (and no live line)";

/// How long the target may answer nothing at all: with every connection full for this
/// long the run stops, and after the schedule the requests still unanswered when no
/// answer came for this long count as errors (TIMEOUT).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Options {
    rate: u64,
    duration: Duration,
    warmup: Duration,
    connections: usize,
    depth: usize,
    assets: usize,
    distribution: Distribution,
    mix: Mix,
    slo_p99: Option<Duration>,
    reconcile_at_end: bool,
    clients: Clients,
    cores: Option<usize>,
    state_dir: Option<PathBuf>,
    postgres: Option<String>,
    seal_ttl: Option<u64>,
    addr: Option<SocketAddr>,
    certs: Option<PathBuf>,
    verify_db: Option<PathBuf>,
    toggle_region_ms: Option<u64>,
    reconcile_phase: Option<Duration>,
    /// The reconciler load's runs are incremental (from the watermarks) instead of full.
    reconcile_incremental: bool,
    reconcile_rate: Option<u64>,
    article_connections: usize,
    json: bool,
    /// Part of `compare`: the JSON report is printed once, for both runs.
    compare: bool,
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
        distribution: Distribution::Uniform,
        mix: Mix::default(),
        slo_p99: None,
        reconcile_at_end: true,
        clients: Clients::Plain,
        cores: None,
        state_dir: None,
        postgres: None,
        seal_ttl: None,
        addr: None,
        certs: None,
        verify_db: None,
        toggle_region_ms: None,
        reconcile_phase: None,
        reconcile_incremental: false,
        reconcile_rate: None,
        article_connections: 16,
        json: false,
        compare: false,
    };
    let mut command = None;
    let mut floods_options = FloodArgs::default();
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Long("rate") => o.rate = p.value()?.parse()?,
            Long("duration") => o.duration = Duration::from_secs_f64(p.value()?.parse()?),
            Long("warmup") => o.warmup = Duration::from_secs_f64(p.value()?.parse()?),
            Long("connections") => o.connections = p.value()?.parse()?,
            Long("depth") => o.depth = p.value()?.parse()?,
            Long("assets") => o.assets = p.value()?.parse()?,
            Long("distribution") => o.distribution = Distribution::parse(&p.value()?.string()?)?,
            Long("mix") => o.mix = Mix::parse(&p.value()?.string()?)?,
            Long("rotate-percent") => o.mix = Mix::rotate_percent(p.value()?.parse()?)?,
            Long("slo-p99") => o.slo_p99 = Some(workload::parse_duration(&p.value()?.string()?)?),
            Long("no-reconcile") => o.reconcile_at_end = false,
            Long("clients") => o.clients = Clients::parse(&p.value()?.string()?)?,
            Long("cores") => o.cores = Some(p.value()?.parse()?),
            Long("state-dir") => o.state_dir = Some(p.value()?.into()),
            Long("postgres") => o.postgres = Some(p.value()?.string()?),
            Long("seal-ttl") => o.seal_ttl = Some(p.value()?.parse()?),
            Long("addr") => o.addr = Some(p.value()?.parse()?),
            Long("certs") => o.certs = Some(p.value()?.into()),
            Long("verify-db") => o.verify_db = Some(p.value()?.into()),
            Long("toggle-region-ms") => o.toggle_region_ms = Some(p.value()?.parse()?),
            Long("reconcile-phase-s") => {
                o.reconcile_phase = Some(Duration::from_secs_f64(p.value()?.parse()?))
            }
            Long("reconcile-rate") => o.reconcile_rate = Some(p.value()?.parse()?),
            Long("reconcile-incremental") => o.reconcile_incremental = true,
            Long("article-connections") => o.article_connections = p.value()?.parse()?,
            Long("json") => o.json = true,
            Long("kinds") => floods_options.kinds = Some(p.value()?.string()?),
            Long("flood-connections") => floods_options.connections = Some(p.value()?.parse()?),
            Long("hold-s") => floods_options.hold_s = Some(p.value()?.parse()?),
            Long("settle-s") => floods_options.settle_s = Some(p.value()?.parse()?),
            Long("deriver-rate") => floods_options.deriver_rate = Some(p.value()?.parse()?),
            Long("flood-source") => floods_options.source = Some(p.value()?.parse()?),
            Long("rounds") => floods_options.rounds = Some(p.value()?.parse()?),
            Long("admin") => floods_options.admin = Some(p.value()?.parse()?),
            Long("pid") => floods_options.pid = Some(p.value()?.parse()?),
            Long("asset") => floods_options.asset = Some(p.value()?.parse()?),
            Long("help") | Short('h') => {
                println!("{USAGE}");
                return Ok(0);
            }
            Value(v) if command.is_none() => command = Some(v.string()?),
            _ => return Err(arg.unexpected().into()),
        }
    }
    if o.rate == 0
        || o.connections == 0
        || o.depth == 0
        || o.assets == 0
        || o.article_connections == 0
    {
        bail!(
            "--rate, --connections, --depth, --assets and --article-connections must be positive"
        );
    }
    if o.reconcile_rate.is_some_and(|n| n > 0 && n < 5000) {
        bail!("--reconcile-rate must be 0 (unpaced) or at least 5000 (the appliance refuses less)");
    }
    if o.reconcile_phase
        .is_some_and(|d| d < Duration::from_millis(100))
    {
        bail!("--reconcile-phase-s must be at least 0.1");
    }
    match command.as_deref() {
        Some("demo") => Ok(demo(o)?.0),
        Some("run") => {
            let addr = o.addr.context("run needs --addr")?;
            let certs = o.certs.clone().context("run needs --certs DIR")?;
            let mut report = drive(&o, addr, &certs, 0, None)?;
            if o.reconcile_at_end {
                report.reconciliation = Some(closing_reconciliation(addr, &certs)?);
            }
            let audit = o.verify_db.clone().map(AuditSource::Sqlite);
            Ok(finish(&o, report, audit)?.0)
        }
        Some("article") => Ok(article(&o)?.0),
        Some("compare") => compare(Options { compare: true, ..o }),
        Some("floods") => run_floods(&o, floods_options),
        _ => {
            eprintln!("{USAGE}");
            Ok(2)
        }
    }
}

/// `floods`' own flags (the rest are shared: --addr, --certs, --json).
#[derive(Default)]
struct FloodArgs {
    kinds: Option<String>,
    connections: Option<usize>,
    hold_s: Option<f64>,
    settle_s: Option<f64>,
    deriver_rate: Option<u32>,
    source: Option<std::net::IpAddr>,
    rounds: Option<usize>,
    admin: Option<SocketAddr>,
    pid: Option<u32>,
    asset: Option<Uuid>,
}

/// `floods`: connection-level abuse against a running appliance (floods.rs); exits 1 if
/// the steady deriver was refused or failed at any moment.
fn run_floods(o: &Options, a: FloodArgs) -> anyhow::Result<i32> {
    let addr = o.addr.context("floods needs --addr")?;
    let certs = o.certs.clone().context("floods needs --certs DIR")?;
    let options = floods::FloodOptions {
        addr,
        certs,
        admin: a.admin,
        pid: a.pid,
        kinds: floods::Kind::parse_list(
            a.kinds
                .as_deref()
                .unwrap_or("tcp,roleless,identity,slow-header,slow-body,idle"),
        )?,
        connections: a.connections.unwrap_or(1000),
        hold: Duration::from_secs_f64(a.hold_s.unwrap_or(5.0)),
        settle: Duration::from_secs_f64(a.settle_s.unwrap_or(3.0)),
        deriver_rate: a.deriver_rate.unwrap_or(20),
        source: a.source.unwrap_or(std::net::IpAddr::from([127, 0, 0, 2])),
        rounds: a.rounds.unwrap_or(3),
        asset: a.asset.context("floods needs --asset UUID (registered)")?,
        json: o.json,
    };
    let reports = floods::run(&options)?;
    floods::print(&reports, o.json)?;
    let failed = reports.iter().any(|r| {
        r.before.failures + r.during.failures + r.after.failures > 0
            || r.before.probe_failures + r.during.probe_failures + r.after.probe_failures > 0
    });
    Ok(i32::from(failed))
}

/// The appliance's /metrics, as text (`None`: unreachable).
fn metrics_text(admin: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The sum of a metric's samples in the appliance's /metrics (`None`: unreachable).
fn metric_sum(admin: SocketAddr, name: &str) -> Option<f64> {
    let text = metrics_text(admin)?;
    let prefix = format!("{name}{{");
    Some(
        text.lines()
            .filter(|l| l.starts_with(&prefix) || l.starts_with(&format!("{name} ")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// The appliance's full reconciliation of its audit log, asked for after the run.
fn closing_reconciliation(
    addr: SocketAddr,
    certs: &Path,
) -> anyhow::Result<custody::op::ReconcileSummary> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let c = Client::connect(&client_config(addr, certs)).await?;
        c.reconcile(true).await.map_err(|e| {
            anyhow::anyhow!(
                "the closing reconciliation: {e} (the client needs the auditor role; --no-reconcile skips it)"
            )
        })
    })
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

fn demo(o: Options) -> anyhow::Result<(i32, Headline)> {
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
    let port = free_loopback_ports(1)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let admin_port = free_loopback_ports(1)?;
    // A port per shard for shard-aware clients (server.shard_listen).
    let shards = o
        .cores
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let shard_base = free_loopback_ports(u16::try_from(shards)?)?;
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
            "# written by custody-load demo\n[server]\nlisten = \"{addr}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nshard_listen = \"127.0.0.1:{shard_base}\"\ncores = {}\nstate_dir = \"{}\"\nlog_level = \"info\"\nstats_log_interval_s = 1\n\n[tls]\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\nclient_ca = \"certs/ca.pem\"\n\n{store_section}{seal_section}{audit_section}{POLICY_SECTION}",
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
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let cross_before = metric_sum(admin, "custody_cross_core_requests_total");
    let mut report = drive(&o, addr, &certs, 1, Some(appliance.child.id()))?;
    // The cores publish their figures every second.
    std::thread::sleep(Duration::from_millis(1100));
    report.cross_core = cross_before
        .zip(metric_sum(admin, "custody_cross_core_requests_total"))
        .map(|(a, b)| (b - a).max(0.0) as u64);
    // The last second's figures are logged a moment after the run ends.
    std::thread::sleep(Duration::from_millis(1100));
    report.commits = commit_figures(&dir.join("custodyd.stderr"), report.measured_unix_ms);
    report.seal_refreshes = seal_refreshes(&dir.join("custodyd.stderr"), report.measured_unix_ms);
    // The run ends with the appliance's full reconciliation of its audit log.
    report.reconciliation = Some(closing_reconciliation(addr, &certs)?);
    let audit = match &database {
        Some(db) => AuditSource::Postgres(db.config.clone()),
        None => AuditSource::Sqlite(dir.join("custody.db")),
    };
    let outcome = finish(&o, report, Some(audit))?;
    drop(appliance);
    drop(database);
    Ok(outcome)
}

/// The article's design on PostgreSQL, driven by the same schedule.
fn article(o: &Options) -> anyhow::Result<(i32, Headline)> {
    let url = o
        .postgres
        .as_deref()
        .context("article needs --postgres URL")?;
    let database = TempDatabase::create(url)?;
    if !o.json {
        eprintln!(
            "custody-load: the article's design in PostgreSQL database {}, {} connections",
            database.config.dbname, o.article_connections
        );
    }
    let o = Options {
        connections: o.article_connections,
        ..o.clone()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("custody-load-pg")
        .enable_all()
        .build()?;
    let target = rt.block_on(article::start(&database.config, o.connections, o.assets))?;
    let session = Session::new(&o, 2);
    session.run(&o, &target, o.assets, None, None)?;
    let rows = rt.block_on(article::audit_rows(&database.config))?;
    drop(target);
    drop(rt);
    let (rec, memory, measured_unix_ms) = session.take(None);
    let report = Report {
        shards: 0,
        measured_unix_ms,
        rec,
        commits: None,
        seal_refreshes: None,
        region_switch_us: None,
        reconciliation: None,
        reconcile_load: None,
        memory,
        article_audit_rows: Some(rows),
        cross_core: None,
    };
    let outcome = finish(&o, report, None)?;
    drop(database);
    Ok(outcome)
}

/// custody on PostgreSQL, then the article's design, with the same options.
fn compare(o: Options) -> anyhow::Result<i32> {
    if o.postgres.is_none() {
        bail!("compare needs --postgres URL");
    }
    let (custody_code, custody) = demo(o.clone())?;
    let (article_code, article) = article(&o)?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    if o.json {
        let json = serde_json::json!({
            "custody": custody.json,
            "article": article.json,
            "throughput_ratio": ratio(custody.throughput, article.throughput),
            "p99_ratio_article_over_custody": ratio(article.p99, custody.p99),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        let _ = article_code;
        return Ok(custody_code);
    }
    println!(
        "\ncustody-load compare: {} req/s target, {} s, {} assets ({}), mix {}",
        o.rate,
        o.duration.as_secs_f64(),
        o.assets,
        o.distribution.describe(),
        o.mix.describe()
    );
    println!(
        "  {:<22} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "", "throughput", "p50 ms", "p99 ms", "p99.9 ms", "errors"
    );
    for (name, h) in [
        ("custody (PostgreSQL)", &custody),
        ("article's design", &article),
    ] {
        println!(
            "  {:<22} {:>12.0} {:>10.3} {:>10.3} {:>10.3} {:>10}",
            name, h.throughput, h.p50, h.p99, h.p999, h.errors
        );
    }
    println!(
        "  custody / article: {:.1}x the throughput; the article's p99 is {:.1}x custody's",
        ratio(custody.throughput, article.throughput),
        ratio(article.p99, custody.p99)
    );
    // custody must pass its own checks; the article is measured, not judged.
    let _ = article_code;
    Ok(custody_code)
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

/// The full reconciliations run during the window (`--reconcile-phase-s`).
struct ReconcileLoad {
    runs: u64,
    records: u64,
    findings: u64,
    busy_refusals: u64,
    run_us: Histogram<u64>,
}

/// Resident memory seen during the run (the live line samples it every second).
#[derive(Clone, Copy, Default)]
struct Memory {
    harness_max_kib: u64,
    /// The appliance's (demo): at the first and last sample, and the largest.
    appliance_first_kib: Option<u64>,
    appliance_last_kib: Option<u64>,
    appliance_max_kib: u64,
}

impl Memory {
    fn sample(&mut self, appliance_pid: Option<u32>) {
        if let Some(kib) = rss_kib("self") {
            self.harness_max_kib = self.harness_max_kib.max(kib);
        }
        if let Some(kib) = appliance_pid.and_then(|pid| rss_kib(&pid.to_string())) {
            self.appliance_first_kib.get_or_insert(kib);
            self.appliance_last_kib = Some(kib);
            self.appliance_max_kib = self.appliance_max_kib.max(kib);
        }
    }
}

/// VmRSS of /proc/`pid`, KiB.
fn rss_kib(pid: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

struct Report {
    shards: u16,
    rec: Recorder<(Receipt, Uuid, u64)>,
    /// The measured window, milliseconds since the Unix epoch.
    measured_unix_ms: (u64, u64),
    /// The appliance's group-commit figures in the window (demo only).
    commits: Option<CommitFigures>,
    /// Refreshes of the seed cache through the seal provider in the window (demo only).
    seal_refreshes: Option<usize>,
    /// Answer latency of the region switches (`--toggle-region-ms`), microseconds.
    region_switch_us: Option<Histogram<u64>>,
    /// The appliance's full reconciliation after the run.
    reconciliation: Option<custody::op::ReconcileSummary>,
    /// Reconciliations run during the window (`--reconcile-phase-s`).
    reconcile_load: Option<ReconcileLoad>,
    memory: Memory,
    /// The article's design (`article`): rows in its audit log at the end.
    article_audit_rows: Option<u64>,
    /// Operations the appliance handed from one core to another during the run (demo).
    cross_core: Option<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts the appliance's `seed cache: refreshed` log lines whose `at_ms` falls in `window`.
fn seal_refreshes(log: &Path, window: (u64, u64)) -> Option<usize> {
    use std::io::BufRead;
    let file = std::io::BufReader::new(std::fs::File::open(log).ok()?);
    Some(
        file.lines()
            .map_while(Result::ok)
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
    use std::io::BufRead;
    // Read line by line, keeping only the numbers of the lines in the window: a day's
    // soak logs one line per shard per second.
    const FIELDS: [&str; 9] = [
        "batches",
        "records",
        "failed",
        "batch_p50",
        "batch_p99",
        "batch_max",
        "commit_p50_us",
        "commit_p99_us",
        "commit_max_us",
    ];
    let mut columns: Vec<Vec<u64>> = vec![Vec::new(); FIELDS.len()];
    let file = std::io::BufReader::new(std::fs::File::open(log).ok()?);
    for line in file.lines().map_while(Result::ok) {
        if !line.contains("commit stats") {
            continue;
        }
        let value = |k: &str| {
            line.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .find(|(key, _)| *key == k)
                .and_then(|(_, v)| v.parse::<u64>().ok())
        };
        let Some(at) = value("at_ms") else { continue };
        if at >= window.0 + 1000 && at <= window.1 + 100 {
            for (column, k) in columns.iter_mut().zip(FIELDS) {
                column.push(value(k).unwrap_or(0));
            }
        }
    }
    let intervals = columns[0].len();
    if intervals == 0 {
        return None;
    }
    let mut take = |k: &str| {
        let i = FIELDS.iter().position(|f| *f == k).unwrap_or(0);
        std::mem::take(&mut columns[i])
    };
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2] as f64
    };
    Some(CommitFigures {
        intervals,
        batches: take("batches").iter().sum(),
        records: take("records").iter().sum(),
        failed: take("failed").iter().sum(),
        batch_p50: median(take("batch_p50")),
        batch_p99: median(take("batch_p99")),
        batch_max: take("batch_max").into_iter().max().unwrap_or(0),
        commit_p50_ms: median(take("commit_p50_us")) / 1000.0,
        commit_p99_ms: median(take("commit_p99_us")) / 1000.0,
        commit_max_ms: take("commit_max_us").into_iter().max().unwrap_or(0) as f64 / 1000.0,
    })
}

/// A derivation's receipt, with the asset and counter it must show in the audit log.
type Kept = (Receipt, Uuid, u64);
/// The recorder the reply callbacks share.
type SharedRecorder = Arc<Mutex<Recorder<Kept>>>;

/// What a target calls once per request with its answer (and a derivation's receipt).
type Done = Box<dyn FnOnce(Answer, Option<Kept>) + Send>;

/// Where the schedule's requests go: custody over its wire protocol, or the article's
/// design on PostgreSQL (`custody-load article`).
trait Target {
    /// Starts request `i` (`op` on asset number `asset`) on connection `conn`.
    fn start(&self, conn: usize, i: u64, op: Op, asset: usize, route: Route, done: Done);
}

/// Which kind of client a request goes through (`--clients`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// The shared port; the appliance hands it to the owning core if need be.
    Plain,
    /// Its shard's own port (`custody::client::ShardedClient`).
    ShardAware,
}

/// The kinds of client a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Clients {
    Plain,
    ShardAware,
    /// Every other request each way, so both are measured in the same run.
    Both,
}

impl Clients {
    fn parse(text: &str) -> anyhow::Result<Clients> {
        match text {
            "plain" => Ok(Clients::Plain),
            "shard-aware" => Ok(Clients::ShardAware),
            "both" => Ok(Clients::Both),
            _ => bail!("--clients is plain, shard-aware or both, not {text:?}"),
        }
    }

    fn route(self, i: u64) -> Route {
        match self {
            Clients::Plain => Route::Plain,
            Clients::ShardAware => Route::ShardAware,
            Clients::Both if i % 2 == 0 => Route::Plain,
            Clients::Both => Route::ShardAware,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Clients::Plain => "plain",
            Clients::ShardAware => "shard-aware",
            Clients::Both => "both",
        }
    }
}

/// custody over TLS: the registered assets, and per connection slot a plain client
/// and (`--clients shard-aware|both`) a shard-aware one.
struct CustodyTarget {
    clients: Vec<Arc<Client>>,
    sharded: Vec<Arc<custody::client::ShardedClient>>,
    assets: Vec<Uuid>,
    seed: u64,
}

impl Target for CustodyTarget {
    fn start(&self, conn: usize, i: u64, op: Op, asset: usize, route: Route, done: Done) {
        let asset = self.assets[asset];
        let request = match op {
            Op::Rotate => {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&i.to_le_bytes());
                id[8..].copy_from_slice(&(self.seed ^ crate_run_nonce()).to_le_bytes());
                Request::Rotate(custody::op::RotateBody {
                    asset,
                    rotation_id: uuid::Builder::from_random_bytes(id).into_uuid(),
                    expected_counter: None,
                })
            }
            Op::Status => Request::Status { asset },
            Op::Derive => Request::Derive(DeriveBody {
                asset,
                path: format!("m/44'/0'/0'/0'/{}", i % 1000),
                region: "US-EAST".into(),
                purpose: 1,
                ttl_s: 300,
            }),
        };
        let on_reply: custody::client::ReplyCallback = Box::new(move |result| {
            let mut receipt = None;
            let answer = match result {
                Ok(Reply::Derived(d)) if op == Op::Derive => {
                    receipt = Some((d.receipt, asset, d.counter));
                    Answer::Ok
                }
                Ok(Reply::Rotated(_)) if op == Op::Rotate => Answer::Ok,
                Ok(Reply::Asset(_)) if op == Op::Status => Answer::Ok,
                // Another rotation of the asset is being committed: the documented
                // answer (retry), not a failure.
                Ok(Reply::Refused(r))
                    if op == Op::Rotate && r.status == custody::wire::Status::Busy =>
                {
                    Answer::RotationBusy
                }
                Ok(Reply::Refused(r)) => Answer::Error(r.status.name().to_owned()),
                Ok(_) => Answer::Error("UNEXPECTED_REPLY".to_owned()),
                Err(ClientError::Closed) => Answer::Error("CONNECTION_CLOSED".to_owned()),
                Err(e) => Answer::Error(format!("CLIENT: {e}")),
            };
            done(answer, receipt);
        });
        match (route, self.sharded.get(conn)) {
            (Route::ShardAware, Some(c)) => c.start(&request, on_reply),
            _ => self.clients[conn].start(&request, on_reply),
        }
    }
}

/// Prints the live line every second (unless `json`) and samples resident memory.
fn spawn_reporter(
    rec: SharedRecorder,
    finished: Arc<AtomicBool>,
    memory: Arc<Mutex<Memory>>,
    start: Instant,
    json: bool,
    appliance_pid: Option<u32>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("custody-load-live".into())
        .spawn(move || {
            let mut next = start + Duration::from_secs(1);
            while !finished.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep((next - now).min(Duration::from_millis(100)));
                    continue;
                }
                next += Duration::from_secs(1);
                let live = lock(&rec).take_live();
                let mem = {
                    let mut m = lock(&memory);
                    m.sample(appliance_pid);
                    *m
                };
                if !json {
                    let appliance = mem
                        .appliance_last_kib
                        .map(|k| format!(", custodyd {} MiB", k / 1024))
                        .unwrap_or_default();
                    eprintln!(
                        "  {:>5.0}s  {:>6} req/s  errors {:>5}  p99 {:>7.3} ms  rss {} MiB{appliance}",
                        start.elapsed().as_secs_f64(),
                        live.ok,
                        live.errors,
                        live.p99_ms,
                        rss_kib("self").unwrap_or(0) / 1024,
                    );
                }
            }
        })
}

/// The open loop: each request at its scheduled time, on a connection with room (waiting
/// for one counts: latency runs from the scheduled time), then the last answers.
/// `epoch`: the reconciler load's (see [`drive`]), to class each derivation.
#[allow(clippy::too_many_arguments)]
fn run_schedule(
    o: &Options,
    target: &dyn Target,
    assets: usize,
    seed: u64,
    start: Instant,
    rec: &SharedRecorder,
    finished: &AtomicBool,
    epoch: Option<&Arc<AtomicU64>>,
) -> anyhow::Result<()> {
    let picker = AssetPicker::new(assets, o.distribution);
    let total = (o.rate as f64 * (o.warmup + o.duration).as_secs_f64()).round() as u64;
    let interval_ns = 1e9 / o.rate as f64;
    let inflight: Vec<Arc<AtomicUsize>> = (0..o.connections).map(|_| Arc::default()).collect();
    // SAFETY: prctl with PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
    let mut rng = Rng::new(seed);
    for i in 0..total {
        let scheduled = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
        let now = Instant::now();
        if scheduled > now {
            std::thread::sleep(scheduled - now);
        }
        // Waiting on a slow target is measured (the schedule falls behind and the
        // latency shows it); only a target that answers nothing for REQUEST_TIMEOUT ends
        // the run.
        // The reconciler load's epoch at the scheduled time: latency runs from there, so a
        // wait for room below belongs to the class of that moment.
        let epoch_at_schedule = epoch.map(|e| e.load(Ordering::Acquire));
        let mut waiting_since = Instant::now();
        let mut answered_before = None;
        let conn = loop {
            let first = (i as usize) % o.connections;
            let found = (0..o.connections)
                .map(|k| (first + k) % o.connections)
                .find(|&c| inflight[c].load(Ordering::Acquire) < o.depth);
            let answered = found.is_none().then(|| lock(rec).answered);
            if answered != answered_before {
                waiting_since = Instant::now();
                answered_before = answered;
            }
            match found {
                Some(c) => break c,
                None if waiting_since.elapsed() > REQUEST_TIMEOUT => {
                    finished.store(true, Ordering::Relaxed);
                    bail!(
                        "every connection has had {} requests unanswered for {} s: the target stopped answering",
                        o.depth,
                        REQUEST_TIMEOUT.as_secs()
                    );
                }
                None => std::thread::sleep(Duration::from_micros(20)),
            }
        };
        let op = o.mix.pick(rng.next_u64());
        let asset = picker.pick(rng.next_f64());
        let route = o.clients.route(i);
        inflight[conn].fetch_add(1, Ordering::AcqRel);
        lock(rec).sent(op);
        let rec = rec.clone();
        let slot = inflight[conn].clone();
        let epoch = epoch.cloned();
        target.start(
            conn,
            i,
            op,
            asset,
            route,
            Box::new(move |answer, receipt| {
                let done = Instant::now();
                slot.fetch_sub(1, Ordering::AcqRel);
                let reconciling = epoch
                    .zip(epoch_at_schedule)
                    .map(|(e, at)| at % 2 == 1 || e.load(Ordering::Acquire) != at);
                let mut r = lock(&rec);
                if let Some(receipt) = receipt {
                    r.receipts.add(receipt);
                }
                r.answered(
                    op,
                    scheduled,
                    done,
                    answer,
                    reconciling,
                    Some(route as usize),
                );
            }),
        );
    }
    // Wait for the last answers while they keep coming; what has not answered after
    // REQUEST_TIMEOUT without any progress timed out.
    let mut deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut answered_before = 0;
    loop {
        let (sent, answered) = {
            let r = lock(rec);
            (r.sent_total(), r.answered)
        };
        if answered >= sent {
            break;
        }
        if answered != answered_before {
            answered_before = answered;
            deadline = Instant::now() + REQUEST_TIMEOUT;
        }
        if Instant::now() > deadline {
            lock(rec).timed_out(sent - answered);
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// One measured run: its schedule's start, the window, the recorder and the live line.
struct Session {
    start: Instant,
    measure_from: Instant,
    measure_until: Instant,
    seed: u64,
    rec: SharedRecorder,
    finished: Arc<AtomicBool>,
    memory: Arc<Mutex<Memory>>,
}

impl Session {
    fn new(o: &Options, seed: u64) -> Session {
        let start = Instant::now() + Duration::from_millis(20);
        let measure_from = start + o.warmup;
        let measure_until = measure_from + o.duration;
        Session {
            start,
            measure_from,
            measure_until,
            seed,
            rec: Arc::new(Mutex::new(Recorder::new(measure_from, measure_until, seed))),
            finished: Arc::new(AtomicBool::new(false)),
            memory: Arc::new(Mutex::new(Memory::default())),
        }
    }

    /// Runs the schedule against `target` with the live line, to its last answer; then
    /// `finished` is set (the switcher and the reconciler load stop on it).
    fn run(
        &self,
        o: &Options,
        target: &dyn Target,
        assets: usize,
        appliance_pid: Option<u32>,
        epoch: Option<&Arc<AtomicU64>>,
    ) -> anyhow::Result<()> {
        let reporter = spawn_reporter(
            self.rec.clone(),
            self.finished.clone(),
            self.memory.clone(),
            self.start,
            o.json,
            appliance_pid,
        )?;
        let outcome = run_schedule(
            o,
            target,
            assets,
            self.seed,
            self.start,
            &self.rec,
            &self.finished,
            epoch,
        );
        self.finished.store(true, Ordering::Relaxed);
        let _ = reporter.join();
        outcome
    }

    /// The figures (every reply callback is gone with its target, or they are taken
    /// out anyway), the memory samples, and the window on the wall clock.
    fn take(self, appliance_pid: Option<u32>) -> (Recorder<Kept>, Memory, (u64, u64)) {
        let rec = std::mem::replace(
            &mut *lock(&self.rec),
            Recorder::new(self.measure_from, self.measure_until, self.seed),
        );
        let mut memory = *lock(&self.memory);
        memory.sample(appliance_pid);
        let window = window_unix_ms(self.measure_from, rec.summary().elapsed);
        (rec, memory, window)
    }
}

/// The measured window on the wall clock (Unix ms), to pick the appliance's log lines.
fn window_unix_ms(measure_from: Instant, elapsed: Duration) -> (u64, u64) {
    let from = custody::audit::now_ms().saturating_sub(
        Instant::now()
            .saturating_duration_since(measure_from)
            .as_millis() as u64,
    );
    (from, from + elapsed.as_millis() as u64)
}

/// Registers the assets, then runs the open-loop load against custody and collects the
/// figures.
///
/// Threads: this thread paces (sleeping until each request's scheduled time, with the
/// timer slack lowered) and starts each request itself with [`Client::start`]; one tokio
/// worker runs the connections and records each reply as it arrives; a reporter prints a
/// live line every second. No per-request task or channel hop sits between the schedule
/// and the socket.
fn drive(
    o: &Options,
    addr: SocketAddr,
    certs: &Path,
    seed: u64,
    appliance_pid: Option<u32>,
) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("custody-load-io")
        .enable_all()
        .build()?;
    let (clients, sharded, hello, assets) = rt.block_on(async {
        let config = client_config(addr, certs);
        let mut clients = Vec::with_capacity(o.connections);
        for _ in 0..o.connections {
            clients.push(Arc::new(Client::connect(&config).await?));
        }
        let mut sharded = Vec::new();
        if o.clients != Clients::Plain {
            for _ in 0..o.connections {
                let c = custody::client::ShardedClient::connect(&config).await?;
                if !c.is_shard_aware() {
                    bail!("--clients {}: the appliance announces no per-shard ports (server.shard_listen)", o.clients.name());
                }
                sharded.push(Arc::new(c));
            }
        }
        let hello = clients[0].hello().await?;
        let assets = register_assets(&clients, o.assets, seed).await?;
        anyhow::Ok((clients, sharded, hello, assets))
    })?;
    let target = CustodyTarget {
        clients,
        sharded,
        assets,
        seed,
    };

    let session = Session::new(o, seed);
    let (measure_from, measure_until) = (session.measure_from, session.measure_until);
    let finished = session.finished.clone();
    // The region switcher: its own connection, EU-WEST off and on every N ms, each
    // answer's latency recorded.
    let switch_us = Arc::new(Mutex::new(stats::latency_histogram()));
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
                    let _ = lock(&switch_us).record((sent.elapsed().as_micros() as u64).max(1));
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
    let epoch = Arc::new(AtomicU64::new(0));
    let incremental = o.reconcile_incremental;
    let reconciler = match o.reconcile_phase {
        Some(phase) => {
            let (finished, epoch) = (finished.clone(), epoch.clone());
            let config = client_config(addr, certs);
            Some(rt.spawn(async move {
                let client = Client::connect(&config).await?;
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
                    let result = client.reconcile(!incremental).await;
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
            }))
        }
        None => None,
    };
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
    drop(target);
    drop(rt);
    let (rec, memory, measured_unix_ms) = session.take(appliance_pid);
    let switches = std::mem::replace(&mut *lock(&switch_us), stats::latency_histogram());
    Ok(Report {
        shards: hello.shard_count,
        measured_unix_ms,
        rec,
        commits: None,
        seal_refreshes: None,
        region_switch_us: (!switches.is_empty()).then_some(switches),
        reconciliation: None,
        reconcile_load,
        memory,
        article_audit_rows: None,
        cross_core: None,
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
/// A run's main figures, for `compare`.
struct Headline {
    throughput: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    errors: u64,
    /// The JSON report (`--json`).
    json: serde_json::Value,
}

fn finish(
    o: &Options,
    report: Report,
    audit: Option<AuditSource>,
) -> anyhow::Result<(i32, Headline)> {
    let rec = &report.rec;
    let audit = match audit {
        Some(source) => Some(verify_audit(
            source,
            rec.receipts.items(),
            rec.receipts.seen(),
        )?),
        None => None,
    };
    let summary = rec.summary();
    let derive = summary.latency[Op::Derive.index()];
    let errors_total = rec.errors_total();
    let slo_missed = match (o.slo_p99, derive) {
        // A failed request misses the objective whatever the others' latency.
        (Some(_), _) if rec.measured_errors > 0 => true,
        (Some(slo), Some(p)) => p.p99 > slo.as_secs_f64() * 1000.0,
        // No derivation measured: the objective cannot be said to hold.
        (Some(_), None) => true,
        (None, _) => false,
    };
    let ops: Vec<Op> = Op::ALL
        .into_iter()
        .filter(|op| o.mix.share(*op) > 0.0)
        .collect();
    let load = report.reconcile_load.as_ref();
    let run_ms_p50 = load
        .filter(|l| !l.run_us.is_empty())
        .map(|l| l.run_us.value_at_quantile(0.5) as f64 / 1000.0);
    let mem = &report.memory;
    let json = if o.json {
        let json = serde_json::json!({
            "rate_target": o.rate,
            "duration_s": o.duration.as_secs_f64(),
            "warmup_s": o.warmup.as_secs_f64(),
            "connections": o.connections,
            "depth": o.depth,
            "assets": o.assets,
            "distribution": o.distribution.describe(),
            "mix": o.mix.describe(),
            "shards": report.shards,
            "requests_sent": rec.sent_total(),
            "requests_ok": rec.ok.iter().sum::<u64>(),
            "by_op": ops.iter().map(|op| (op.name().to_owned(), serde_json::json!({
                "sent": rec.sent[op.index()], "ok": rec.ok[op.index()],
                "latency_ms": summary.latency[op.index()].map(|p| p.json()),
            }))).collect::<serde_json::Map<_, _>>(),
            "rotations_busy": rec.rotations_busy,
            "region_switches": report.region_switch_us.as_ref().and_then(Percentiles::of).map(|p| p.json()),
            "errors": rec.errors,
            "measured_ok": rec.measured_ok,
            "measured_errors": rec.measured_errors,
            "throughput_rps": summary.throughput,
            "latency_ms": derive.map(|p| p.json()),
            "slo_p99_ms": o.slo_p99.map(|d| d.as_secs_f64() * 1000.0),
            "slo_met": o.slo_p99.map(|_| !slo_missed),
            "clients": o.clients.name(),
            "by_client": (o.clients == Clients::Both).then(|| serde_json::json!({
                "plain": summary.by_route[0].map(|p| p.json()),
                "shard_aware": summary.by_route[1].map(|p| p.json()),
            })),
            "cross_core_requests": report.cross_core,
            "memory_mib": {
                "harness_max": mem.harness_max_kib as f64 / 1024.0,
                "appliance_first": mem.appliance_first_kib.map(|k| k as f64 / 1024.0),
                "appliance_last": mem.appliance_last_kib.map(|k| k as f64 / 1024.0),
                "appliance_max": mem.appliance_first_kib.map(|_| mem.appliance_max_kib as f64 / 1024.0),
            },
            "commits": report.commits.as_ref().map(|c| serde_json::json!({
                "shard_seconds": c.intervals, "batches": c.batches, "records": c.records,
                "failed": c.failed,
                "records_per_batch_mean": c.records as f64 / c.batches.max(1) as f64,
                "batch_records": { "p50": c.batch_p50, "p99": c.batch_p99, "max": c.batch_max },
                "commit_ms": { "p50": c.commit_p50_ms, "p99": c.commit_p99_ms, "max": c.commit_max_ms },
            })),
            "seal_refreshes": report.seal_refreshes,
            "article_audit_rows": report.article_audit_rows,
            "audit": audit.as_ref().map(|a| serde_json::json!({
                "acknowledged": a.acknowledged, "checked": a.checked, "found": a.found,
                "missing": a.missing, "mismatched": a.mismatched,
            })),
            "reconcile_load": load.map(|l| serde_json::json!({
                "phase_s": o.reconcile_phase.map(|d| d.as_secs_f64()),
                "runs": l.runs, "records_checked": l.records, "findings": l.findings,
                "busy_refusals": l.busy_refusals, "run_ms_p50": run_ms_p50,
                "during_reconciliation": summary.during.map(|p| p.json()),
                "without": summary.quiet.map(|p| p.json()),
            })),
            "reconciliation": report.reconciliation.as_ref().map(|r| serde_json::json!({
                "records_checked": r.records_checked, "checkpoints_checked": r.checkpoints_checked,
                "assets_checked": r.assets_checked, "assets_drifted": r.assets_drifted,
                "drift_ratio": r.assets_drifted as f64 / r.assets_checked.max(1) as f64,
                "macs_checked": r.macs_checked, "findings": r.findings_total,
            })),
        });
        if !o.compare {
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        json
    } else {
        println!(
            "custody-load: {} req/s target for {:.0} s after {:.0} s warm-up; {} connections, depth {}, {} assets ({}), mix {}{}",
            o.rate,
            o.duration.as_secs_f64(),
            o.warmup.as_secs_f64(),
            o.connections,
            o.depth,
            o.assets,
            o.distribution.describe(),
            o.mix.describe(),
            match report.article_audit_rows {
                None => format!(", {} shards", report.shards),
                Some(_) => ", the article's design".to_owned(),
            }
        );
        println!(
            "  requests    {} sent, {} ok, {} errors ({} measured ok, {} measured errors)",
            rec.sent_total(),
            rec.ok.iter().sum::<u64>(),
            errors_total,
            rec.measured_ok,
            rec.measured_errors
        );
        println!(
            "  throughput  {:.0} req/s (measured window)",
            summary.throughput
        );
        if let Some(p) = report.region_switch_us.as_ref().and_then(Percentiles::of) {
            println!(
                "  regions     {} switches of EU-WEST answered in p50 {:.3} ms, max {:.3} ms (in force on every core from the answer)",
                p.count, p.p50, p.max
            );
        }
        for op in &ops {
            let name = if *op == Op::Derive {
                "latency"
            } else {
                op.name()
            };
            match summary.latency[op.index()] {
                Some(p) => println!(
                    "  {name:<11} p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   p99.9 {:.3} ms   max {:.3} ms{}",
                    p.p50,
                    p.p90,
                    p.p99,
                    p.p999,
                    p.max,
                    if ops.len() > 1 { format!("   ({} measured)", p.count) } else { String::new() }
                ),
                None => println!("  {name:<11} none measured"),
            }
        }
        if rec.rotations_busy > 0 {
            println!(
                "  rotations   {} answered BUSY (another rotation of the asset in flight: the documented answer, to retry)",
                rec.rotations_busy
            );
        }
        if o.clients == Clients::Both {
            for (name, class) in [
                ("plain", summary.by_route[0]),
                ("shard-aware", summary.by_route[1]),
            ] {
                match class {
                    Some(p) => println!(
                        "    {name:<11} {:>8} derivations  p50 {:.3} ms   p99 {:.3} ms   p99.9 {:.3} ms   max {:.3} ms",
                        p.count, p.p50, p.p99, p.p999, p.max
                    ),
                    None => println!("    {name:<11} no derivations"),
                }
            }
        }
        if let Some(n) = report.cross_core {
            println!(
                "  routing     {} clients; {n} operations handed from one core to another",
                o.clients.name()
            );
        }
        if let (Some(slo), Some(p)) = (o.slo_p99, derive) {
            println!(
                "  objective   p99 {:.3} ms against {:.3} ms, {} measured errors: {}",
                p.p99,
                slo.as_secs_f64() * 1000.0,
                rec.measured_errors,
                if slo_missed { "MISSED" } else { "met" }
            );
        }
        if let Some(l) = load {
            println!(
                "  reconciling {} {} runs in the {:.1} s phases ({} records checked, run p50 {}, {} findings, {} BUSY)",
                l.runs,
                if o.reconcile_incremental { "incremental" } else { "full" },
                o.reconcile_phase.map(|d| d.as_secs_f64()).unwrap_or(0.0),
                l.records,
                run_ms_p50.map(|m| format!("{m:.0} ms")).unwrap_or_else(|| "-".into()),
                l.findings,
                l.busy_refusals
            );
            for (name, class) in [("during", summary.during), ("without", summary.quiet)] {
                match class {
                    Some(p) => println!(
                        "    {name:<8} {:>8} derivations  p50 {:.3} ms   p99 {:.3} ms   p99.9 {:.3} ms   max {:.3} ms",
                        p.count, p.p50, p.p99, p.p999, p.max
                    ),
                    None => println!("    {name:<8} no derivations"),
                }
            }
        }
        if rec.errors.is_empty() {
            println!("  errors      none");
        } else {
            let list: Vec<String> = rec.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("  errors      {}", list.join(", "));
        }
        let appliance = match (mem.appliance_first_kib, mem.appliance_last_kib) {
            (Some(first), Some(last)) => format!(
                "; custodyd {} MiB at the start, {} MiB at the end, {} MiB at most",
                first / 1024,
                last / 1024,
                mem.appliance_max_kib / 1024
            ),
            _ => String::new(),
        };
        println!(
            "  memory      harness {} MiB at most{appliance}",
            mem.harness_max_kib / 1024
        );
        if let Some(c) = &report.commits {
            println!(
                "  commits     {} batches ({:.0}/s), {:.1} records per batch, {} failed; per shard-second (median of {}): batch p50 {} p99 {} (max {}), commit p50 {:.3} ms p99 {:.3} ms (max {:.3} ms)",
                c.batches,
                c.batches as f64 / summary.elapsed.as_secs_f64(),
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
        match (&audit, report.article_audit_rows) {
            (_, Some(rows)) => println!(
                "  audit       {rows} rows in the article's audit log for {} acknowledged derivations",
                rec.ok[Op::Derive.index()]
            ),
            (Some(a), None) if a.checked == a.acknowledged => println!(
                "  audit       {} of {} acknowledged derivations have their durable audit record ({} missing, {} mismatched)",
                a.found, a.acknowledged, a.missing, a.mismatched
            ),
            (Some(a), None) => println!(
                "  audit       {} of a uniform sample of {} (of {} acknowledged derivations) have their durable audit record ({} missing, {} mismatched)",
                a.found, a.checked, a.acknowledged, a.missing, a.mismatched
            ),
            (None, None) => println!("  audit       not checked (give --verify-db FILE)"),
        }
        match &report.reconciliation {
            Some(r) => {
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
            None if report.article_audit_rows.is_some() => {
                println!(
                    "  reconcile   none (the article's design has no reconciliation of its own)"
                )
            }
            None => println!("  reconcile   not asked for (--no-reconcile)"),
        }
        serde_json::Value::Null
    };
    let audit_ok = audit
        .map(|a| a.missing == 0 && a.mismatched == 0)
        .unwrap_or(true)
        && report
            .article_audit_rows
            .is_none_or(|rows| rows >= rec.ok[Op::Derive.index()]);
    // Any drift or other finding of a reconciliation fails the run.
    let reconciled = report
        .reconciliation
        .as_ref()
        .is_none_or(|r| r.findings_total == 0)
        && load.is_none_or(|l| l.findings == 0);
    let code = if !audit_ok {
        4
    } else if !reconciled {
        5
    } else if slo_missed {
        6
    } else {
        0
    };
    let headline = Headline {
        throughput: summary.throughput,
        p50: derive.map_or(f64::NAN, |p| p.p50),
        p99: derive.map_or(f64::NAN, |p| p.p99),
        p999: derive.map_or(f64::NAN, |p| p.p999),
        errors: errors_total,
        json,
    };
    Ok((code, headline))
}

struct AuditCheck {
    /// Derivations acknowledged in the run.
    acknowledged: u64,
    /// Receipts looked up: all of them, or a uniform sample of [`stats::RECEIPTS_KEPT`].
    checked: u64,
    found: u64,
    missing: u64,
    mismatched: u64,
}

/// Where the audit log to check is.
enum AuditSource {
    Sqlite(PathBuf),
    Postgres(PgConfig),
}

/// Looks the receipts up in the audit log: each must be a DERIVE of its asset with its
/// counter. Reads, per shard, only the ranges of the log that hold receipts, in pages, so
/// memory stays bounded whatever the log's size.
fn verify_audit(
    source: AuditSource,
    receipts: &[(Receipt, Uuid, u64)],
    acknowledged: u64,
) -> anyhow::Result<AuditCheck> {
    let mut sorted: Vec<&(Receipt, Uuid, u64)> = receipts.iter().collect();
    sorted.sort_by_key(|(r, _, _)| (r.shard, r.seq));
    let sorted: Vec<(u16, u64, Uuid, u64)> = sorted
        .into_iter()
        .map(|(r, a, c)| (r.shard, r.seq, *a, *c))
        .collect();
    async fn check(
        source: &dyn custody::reconcile::AuditSource,
        receipts: &[(u16, u64, Uuid, u64)],
    ) -> Result<(u64, u64, u64), custody::store::StoreError> {
        const PAGE: usize = 50_000;
        let (mut found, mut missing, mut mismatched) = (0, 0, 0);
        let mut i = 0;
        while i < receipts.len() {
            let (shard, from) = (receipts[i].0, receipts[i].1);
            // Only as far as the last receipt within a page: sparse receipts (a sample
            // of a long run) read a few rows each, not a page each.
            let last = receipts[i..]
                .iter()
                .take_while(|r| r.0 == shard && r.1 < from + PAGE as u64)
                .last()
                .map_or(from, |r| r.1);
            let span = (last - from + 1) as usize;
            let rows: HashMap<u64, custody::store::RowRead> = source
                .records(shard, from, span)
                .await?
                .into_iter()
                .map(|r| (r.seq, r))
                .collect();
            while i < receipts.len() && receipts[i].0 == shard && receipts[i].1 < from + PAGE as u64
            {
                let (_, seq, asset, counter) = receipts[i];
                match rows.get(&seq).map(|r| &r.row) {
                    Some(Ok(row))
                        if row.event == custody::audit::AuditEvent::Derive
                            && row.asset == asset
                            && row.counter == counter =>
                    {
                        found += 1
                    }
                    Some(_) => mismatched += 1,
                    None => missing += 1,
                }
                i += 1;
            }
        }
        Ok((found, missing, mismatched))
    }
    let (found, missing, mismatched) = match source {
        AuditSource::Sqlite(db) => {
            let reader = std::rc::Rc::new(SqliteReader::open(&db)?);
            futures_lite::future::block_on(check(&reader, &sorted))?
        }
        AuditSource::Postgres(config) => {
            postgres::on_own_executor("custody-load-db", move || async move {
                let client = postgres::connect(&config).await?;
                let source = postgres::PgAuditSource {
                    client: std::rc::Rc::new(client),
                };
                check(&source, &sorted).await
            })??
        }
    };
    Ok(AuditCheck {
        acknowledged,
        checked: receipts.len() as u64,
        found,
        missing,
        mismatched,
    })
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
