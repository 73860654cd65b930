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
//! end every acknowledged derivation's receipt (shard, seq) is looked up in the audit log.

use anyhow::{bail, Context};
use custody::client::{Client, ClientConfig, ClientError};
use custody::store::sqlite::SqliteReader;
use custody::wire::{DeriveBody, Receipt};
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const USAGE: &str = "usage:
  custody-load demo [OPTIONS]
      start custodyd (embedded SQLite store, dev seal, dev certificates in a fresh
      directory), drive it, verify the audit log, stop it
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
    addr: Option<SocketAddr>,
    certs: Option<PathBuf>,
    verify_db: Option<PathBuf>,
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
        addr: None,
        certs: None,
        verify_db: None,
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
            Long("addr") => o.addr = Some(p.value()?.parse()?),
            Long("certs") => o.certs = Some(p.value()?.into()),
            Long("verify-db") => o.verify_db = Some(p.value()?.into()),
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
    match command.as_deref() {
        Some("demo") => demo(o),
        Some("run") => {
            let addr = o.addr.context("run needs --addr")?;
            let certs = o.certs.clone().context("run needs --certs DIR")?;
            let report = drive(&o, addr, &certs, 0)?;
            finish(&o, report, o.verify_db.as_deref())
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
    let config = dir.join("custody.toml");
    std::fs::write(
        &config,
        format!(
            "# written by custody-load demo\n[server]\nlisten = \"{addr}\"\ncores = {}\nstate_dir = \"{}\"\nlog_level = \"warn\"\n\n[tls]\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\nclient_ca = \"certs/ca.pem\"\n",
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
    let log = dir.join("custodyd.log");
    let child = Command::new(&custodyd)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.join("custodyd.stderr"))?)
        .spawn()
        .with_context(|| format!("starting {}", custodyd.display()))?;
    let mut appliance = Appliance { child, log };
    if !o.json {
        eprintln!(
            "custody-load: started custodyd on {addr} (state in {}, embedded SQLite store, dev seal)",
            dir.display()
        );
    }
    wait_ready(&mut appliance, addr, &certs, &dir)?;
    let report = drive(&o, addr, &certs, 1)?;
    let code = finish(&o, report, Some(&dir.join("custody.db")))?;
    drop(appliance);
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
}

struct Report {
    shards: u16,
    stats: Stats,
    measured_elapsed: Duration,
}

/// Registers the assets, then runs the open-loop load and collects the figures.
fn drive(o: &Options, addr: SocketAddr, certs: &Path, seed: u64) -> anyhow::Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let config = client_config(addr, certs);
        let mut clients = Vec::with_capacity(o.connections);
        for _ in 0..o.connections {
            clients.push(Arc::new(Client::connect(&config).await?));
        }
        let hello = clients[0].hello().await?;
        let assets = register_assets(&clients, o.assets, seed).await?;

        let stats = Rc::new(RefCell::new(Stats {
            latency_us: Some(Histogram::new_with_bounds(1, 60_000_000, 3)?),
            live_latency_us: Some(Histogram::new_with_bounds(1, 60_000_000, 3)?),
            ..Stats::default()
        }));
        let total = o.rate as f64 * (o.warmup + o.duration).as_secs_f64();
        let total = total.round() as u64;
        let interval_ns = 1e9 / o.rate as f64;
        let start = Instant::now() + Duration::from_millis(20);
        let measure_from = start + o.warmup;
        let measure_until = measure_from + o.duration;

        // The pacer: a plain thread that wakes at each scheduled time (with the timer slack
        // lowered) and hands the due requests to the runtime.
        let (tx, mut due) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
        let pacer = std::thread::Builder::new()
            .name("custody-load-pacer".into())
            .spawn(move || {
                // SAFETY: prctl with PR_SET_TIMERSLACK only changes this thread's timer slack.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
                for i in 0..total {
                    let at = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    if tx.send((i, at)).is_err() {
                        return;
                    }
                }
            })?;

        let live = {
            let stats = stats.clone();
            let json = o.json;
            tokio::task::spawn_local(async move {
                let mut tick = tokio::time::interval_at(
                    tokio::time::Instant::from_std(start + Duration::from_secs(1)),
                    Duration::from_secs(1),
                );
                let mut last_ok = 0;
                loop {
                    tick.tick().await;
                    let mut s = stats.borrow_mut();
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
            })
        };

        let semaphores: Vec<Arc<tokio::sync::Semaphore>> = (0..o.connections)
            .map(|_| Arc::new(tokio::sync::Semaphore::new(o.depth)))
            .collect();
        let mut tasks = Vec::with_capacity(1024);
        let mut rng = 0x2545_f491_4f6c_dd1du64 ^ seed;
        while let Some((i, scheduled)) = due.recv().await {
            let conn = (i as usize) % o.connections;
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let asset = assets[(rng % assets.len() as u64) as usize];
            let permit = semaphores[conn].clone().acquire_owned().await?;
            let client = clients[conn].clone();
            let stats = stats.clone();
            stats.borrow_mut().sent += 1;
            let body = DeriveBody {
                asset,
                path: format!("m/44'/0'/0'/0'/{}", i % 1000),
                region: "US-EAST".into(),
                purpose: 1,
                ttl_s: 300,
            };
            tasks.push(tokio::task::spawn_local(async move {
                let result = tokio::time::timeout(REQUEST_TIMEOUT, client.derive(body)).await;
                drop(permit);
                let done = Instant::now();
                let latency_us = done.saturating_duration_since(scheduled).as_micros() as u64;
                let measured = scheduled >= measure_from && scheduled < measure_until;
                let mut s = stats.borrow_mut();
                match result {
                    Ok(Ok(d)) => {
                        s.ok += 1;
                        s.receipts.push((d.receipt, asset, d.counter));
                        if let Some(h) = s.live_latency_us.as_mut() {
                            let _ = h.record(latency_us.max(1));
                        }
                        if measured {
                            s.measured_ok += 1;
                            s.last_measured_done = Some(done);
                            if let Some(h) = s.latency_us.as_mut() {
                                let _ = h.record(latency_us.max(1));
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        let name = match &e {
                            ClientError::Refused(r) => r.status.name().to_owned(),
                            ClientError::Closed => "CONNECTION_CLOSED".to_owned(),
                            other => format!("CLIENT: {other}"),
                        };
                        *s.errors.entry(name).or_default() += 1;
                        s.live_errors += 1;
                        if measured {
                            s.measured_errors += 1;
                        }
                    }
                    Err(_) => {
                        *s.errors.entry("TIMEOUT".into()).or_default() += 1;
                        s.live_errors += 1;
                        if measured {
                            s.measured_errors += 1;
                        }
                    }
                }
            }));
            if tasks.len() >= 4096 {
                tasks.retain(|t| !t.is_finished());
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        live.abort();
        let _ = live.await;
        let _ = pacer.join();
        let stats = Rc::try_unwrap(stats)
            .map_err(|_| anyhow::anyhow!("stats still shared"))?
            .into_inner();
        let measured_elapsed = stats
            .last_measured_done
            .map(|t| t.saturating_duration_since(measure_from))
            .unwrap_or(o.duration)
            .max(o.duration);
        Ok(Report {
            shards: hello.shard_count,
            stats,
            measured_elapsed,
        })
    })
}

async fn register_assets(
    clients: &[Arc<Client>],
    n: usize,
    seed: u64,
) -> anyhow::Result<Vec<Uuid>> {
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let client = clients[i % clients.len()].clone();
        // Deterministic version-4 style ids, different per run seed.
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
        bytes[8..].copy_from_slice(&(seed ^ crate_run_nonce()).to_be_bytes());
        let asset = uuid::Builder::from_random_bytes(bytes).into_uuid();
        tasks.push(tokio::task::spawn_local(async move {
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
fn finish(o: &Options, report: Report, db: Option<&Path>) -> anyhow::Result<i32> {
    let s = &report.stats;
    let audit = match db {
        Some(path) => Some(verify_audit(path, &s.receipts)?),
        None => None,
    };
    let h = s.latency_us.as_ref().context("no histogram")?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let throughput = s.measured_ok as f64 / report.measured_elapsed.as_secs_f64();
    let errors_total: u64 = s.errors.values().sum();
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
            "errors": s.errors,
            "measured_ok": s.measured_ok,
            "measured_errors": s.measured_errors,
            "throughput_rps": throughput,
            "latency_ms": {
                "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p99_9": ms(0.999),
                "max": h.max() as f64 / 1000.0,
            },
            "audit": audit.as_ref().map(|a| serde_json::json!({
                "acknowledged": a.acknowledged, "found": a.found, "missing": a.missing, "mismatched": a.mismatched,
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
        println!(
            "  latency     p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   p99.9 {:.3} ms   max {:.3} ms",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0
        );
        if s.errors.is_empty() {
            println!("  errors      none");
        } else {
            let list: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("  errors      {}", list.join(", "));
        }
        match &audit {
            Some(a) => println!(
                "  audit       {} of {} acknowledged derivations have their durable audit record ({} missing, {} mismatched)",
                a.found, a.acknowledged, a.missing, a.mismatched
            ),
            None => println!("  audit       not checked (give --verify-db FILE)"),
        }
    }
    let audit_ok = audit
        .map(|a| a.missing == 0 && a.mismatched == 0)
        .unwrap_or(true);
    Ok(if audit_ok { 0 } else { 4 })
}

struct AuditCheck {
    acknowledged: usize,
    found: usize,
    missing: usize,
    mismatched: usize,
}

fn verify_audit(db: &Path, receipts: &[(Receipt, Uuid, u64)]) -> anyhow::Result<AuditCheck> {
    let reader = SqliteReader::open(db)?;
    let rows: HashMap<(u16, u64), (Uuid, u64, custody::audit::AuditEvent)> = reader
        .audit_rows()?
        .into_iter()
        .map(|r| ((r.shard, r.seq), (r.asset, r.counter, r.event)))
        .collect();
    let mut check = AuditCheck {
        acknowledged: receipts.len(),
        found: 0,
        missing: 0,
        mismatched: 0,
    };
    for (receipt, asset, counter) in receipts {
        match rows.get(&(receipt.shard, receipt.seq)) {
            Some((a, c, custody::audit::AuditEvent::Derive)) if a == asset && c == counter => {
                check.found += 1
            }
            Some(_) => check.mismatched += 1,
            None => check.missing += 1,
        }
    }
    Ok(check)
}
