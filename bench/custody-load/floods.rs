//! `custody-load floods`: connection-level abuse against a running appliance (issue 16, I8),
//! with a steady deriver measured before, during and after each flood.
//!
//! The deriver holds one connection and derives `--deriver-rate` times a second; a prober
//! opens a new connection and derives every 100 ms (connect, handshake and answer timed
//! together). Every flood comes from its own source address (`--flood-source`, 127.0.0.2
//! by default), as an attacker's would, while the deriver connects from 127.0.0.1. The
//! appliance's resident memory (`/proc/PID`) and heap (`custody_heap_bytes` on its admin
//! listener) are read before, at the peak and after each flood.
//!
//! Floods (`--kinds`, comma-separated):
//! - `tcp`: plain TCP connects that never start TLS, held open;
//! - `roleless`: TLS connections with a certificate whose identity has no role, held;
//! - `identity`: TLS connections of one identity with a role, more than its limit, held;
//! - `slow-header`, `slow-body`: each connection sends part of a frame's header (or a
//!   header and half its body) and then nothing (slow-loris);
//! - `idle`: TLS connections established and left quiet;
//! - `memory`: `--connections` established, idle connections opened and closed
//!   `--rounds` times (needs limits that let one identity hold them all).

use anyhow::{bail, Context};
use custody::client::{Client, ClientConfig};
use custody::op::{self, Reply, Request};
use custody::wire::{self, Status};
use hdrhistogram::Histogram;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Tcp,
    Roleless,
    Identity,
    SlowHeader,
    SlowBody,
    Idle,
    Memory,
}

impl Kind {
    fn parse(s: &str) -> anyhow::Result<Kind> {
        Ok(match s {
            "tcp" => Kind::Tcp,
            "roleless" => Kind::Roleless,
            "identity" => Kind::Identity,
            "slow-header" => Kind::SlowHeader,
            "slow-body" => Kind::SlowBody,
            "idle" => Kind::Idle,
            "memory" => Kind::Memory,
            other => bail!("unknown flood {other:?} (tcp, roleless, identity, slow-header, slow-body, idle, memory)"),
        })
    }

    pub fn parse_list(s: &str) -> anyhow::Result<Vec<Kind>> {
        s.split(',').map(|k| Kind::parse(k.trim())).collect()
    }
}

pub struct FloodOptions {
    pub addr: SocketAddr,
    /// A dev-certs directory: `client.pem` is the deriver; `clients/flood.pem` an identity
    /// with a role, `clients/nobody.pem` one without.
    pub certs: PathBuf,
    pub admin: Option<SocketAddr>,
    pub pid: Option<u32>,
    pub kinds: Vec<Kind>,
    pub connections: usize,
    /// How long each flood's connections are held once opened.
    pub hold: Duration,
    /// Before and after each flood.
    pub settle: Duration,
    pub deriver_rate: u32,
    pub source: IpAddr,
    pub rounds: usize,
    pub asset: uuid::Uuid,
    pub json: bool,
}

/// A steady client's figures over one phase.
#[derive(Debug, serde::Serialize)]
pub struct PhaseFigures {
    pub derives: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Derivations that failed or were refused.
    pub failures: u64,
    /// New connections that connected and were answered.
    pub probes: u64,
    pub probe_p99_ms: f64,
    pub probe_max_ms: f64,
    pub probe_failures: u64,
    pub rss_kib_max: Option<u64>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct FloodOutcome {
    /// Connections the flood opened (TCP connected, or TLS established).
    pub opened: u64,
    /// Connections the appliance refused with a CONNECTION_LIMIT frame.
    pub refused_with_status: u64,
    /// Connections closed before or during the TLS handshake (a bound before TLS).
    pub closed_before_tls: u64,
    /// Connections the appliance closed with FRAME_TIMEOUT.
    pub frame_timeouts: u64,
    /// Connections the appliance closed while the flood held them (idle or otherwise).
    pub closed_by_appliance: u64,
    /// How long the flood took to open its connections.
    pub open_s: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct FloodReport {
    pub kind: Kind,
    pub connections: usize,
    pub before: PhaseFigures,
    pub during: PhaseFigures,
    pub after: PhaseFigures,
    pub flood: FloodOutcome,
    pub rss_kib_before: Option<u64>,
    pub rss_kib_peak: Option<u64>,
    pub rss_kib_after: Option<u64>,
    pub heap_in_use_before: Option<u64>,
    pub heap_in_use_peak: Option<u64>,
    pub heap_in_use_after: Option<u64>,
    /// The part of the heap in use that SQLite holds (its page caches grow with the
    /// steady deriver's records, whatever the flood does).
    pub heap_sqlite_before: Option<u64>,
    pub heap_sqlite_after: Option<u64>,
    /// Memory rounds: heap bytes per idle established connection, each round.
    pub heap_bytes_per_connection: Vec<f64>,
}

/// Latencies of one phase, filled by the deriver and the prober threads.
struct Phase {
    derive_us: Histogram<u64>,
    failures: u64,
    probe_us: Histogram<u64>,
    probe_failures: u64,
    rss_kib_max: Option<u64>,
}

impl Phase {
    fn new() -> Phase {
        Phase {
            derive_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            failures: 0,
            probe_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            probe_failures: 0,
            rss_kib_max: None,
        }
    }

    fn figures(&self) -> PhaseFigures {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        PhaseFigures {
            derives: self.derive_us.len(),
            p50_ms: ms(&self.derive_us, 0.5),
            p99_ms: ms(&self.derive_us, 0.99),
            max_ms: self.derive_us.max() as f64 / 1000.0,
            failures: self.failures,
            probes: self.probe_us.len(),
            probe_p99_ms: ms(&self.probe_us, 0.99),
            probe_max_ms: self.probe_us.max() as f64 / 1000.0,
            probe_failures: self.probe_failures,
            rss_kib_max: self.rss_kib_max,
        }
    }
}

/// The phase the steady clients record into now (swapped between phases).
type Current = Arc<Mutex<Phase>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn client_config(o: &FloodOptions, name: &str) -> ClientConfig {
    let (cert, key) = match name {
        "client" => (o.certs.join("client.pem"), o.certs.join("client.key")),
        other => (
            o.certs.join("clients").join(format!("{other}.pem")),
            o.certs.join("clients").join(format!("{other}.key")),
        ),
    };
    ClientConfig {
        addr: o.addr,
        server_name: "localhost".into(),
        ca: o.certs.join("ca.pem"),
        cert,
        key,
    }
}

/// Runs every flood of `o.kinds` in turn; the reports, and whether the deriver was served
/// throughout.
pub fn run(o: &FloodOptions) -> anyhow::Result<Vec<FloodReport>> {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let current: Current = Arc::new(Mutex::new(Phase::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let steady = rt.block_on(start_steady(o, current.clone(), stop.clone()))?;
    let mut reports = Vec::new();
    for &kind in &o.kinds {
        reports.push(rt.block_on(one_flood(o, kind, &current))?);
    }
    stop.store(true, Ordering::Release);
    rt.block_on(async {
        for t in steady {
            let _ = t.await;
        }
    });
    Ok(reports)
}

async fn start_steady(
    o: &FloodOptions,
    current: Current,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let config = client_config(o, "client");
    let client = Arc::new(
        Client::connect(&config)
            .await
            .context("the steady deriver's connection")?,
    );
    let every = Duration::from_secs_f64(1.0 / f64::from(o.deriver_rate.max(1)));
    let asset = o.asset;
    let deriver = {
        let (current, stop) = (current.clone(), stop.clone());
        tokio::spawn(async move {
            let mut next = tokio::time::Instant::now();
            while !stop.load(Ordering::Acquire) {
                next += every;
                tokio::time::sleep_until(next).await;
                let started = Instant::now();
                let ok = derive_once(&client, asset).await;
                record(&current, started, ok, false);
            }
        })
    };
    let prober = tokio::spawn(async move {
        while !stop.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let started = Instant::now();
            let ok = match tokio::time::timeout(Duration::from_secs(5), Client::connect(&config))
                .await
            {
                Ok(Ok(c)) => derive_once(&c, asset).await,
                Ok(Err(e)) => {
                    eprintln!("custody-load floods: a fresh connection failed: {e}");
                    false
                }
                Err(_) => {
                    eprintln!("custody-load floods: a fresh connection took over 5 s");
                    false
                }
            };
            record(&current, started, ok, true);
        }
    });
    Ok(vec![deriver, prober])
}

async fn derive_once(client: &Client, asset: uuid::Uuid) -> bool {
    let body = op::DeriveBody {
        asset,
        path: "m/44'/0'/0'/0'/1".into(),
        region: "US-EAST".into(),
        purpose: 1,
        ttl_s: 60,
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), client.call(&Request::Derive(body))).await,
        Ok(Ok(Reply::Derived(_)))
    )
}

fn record(current: &Current, started: Instant, ok: bool, probe: bool) {
    let us = started.elapsed().as_micros().max(1) as u64;
    let mut phase = lock(current);
    match (probe, ok) {
        (false, true) => {
            let _ = phase.derive_us.record(us);
        }
        (false, false) => phase.failures += 1,
        (true, true) => {
            let _ = phase.probe_us.record(us);
        }
        (true, false) => phase.probe_failures += 1,
    }
}

/// Records into a new phase for `how_long`, sampling the appliance's memory; returns it.
async fn phase(o: &FloodOptions, current: &Current, how_long: Duration) -> Phase {
    *lock(current) = Phase::new();
    let until = Instant::now() + how_long;
    while Instant::now() < until {
        sample_rss(o.pid, current);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sample_rss(o.pid, current);
    std::mem::replace(&mut *lock(current), Phase::new())
}

/// Keeps the phase's largest resident size of custodyd.
fn sample_rss(pid: Option<u32>, current: &Current) {
    if let Some(kib) = pid.and_then(rss_kib) {
        let mut p = lock(current);
        p.rss_kib_max = Some(p.rss_kib_max.unwrap_or(0).max(kib));
    }
}

/// custodyd's resident memory, KiB (the harness's own reader of /proc).
fn rss_kib(pid: u32) -> Option<u64> {
    crate::live::rss_kib(&pid.to_string())
}

/// `custody_heap_bytes{kind="in_use"}` from the admin listener.
fn heap_in_use(o: &FloodOptions) -> Option<u64> {
    heap_bytes(o, "in_use")
}

/// `custody_heap_bytes{kind=KIND}` from the admin listener.
fn heap_bytes(o: &FloodOptions, kind: &str) -> Option<u64> {
    let sample = format!("custody_heap_bytes{{kind=\"{kind}\"}} ");
    crate::observe::metrics_text(o.admin?)?
        .lines()
        .find_map(|l| l.strip_prefix(sample.as_str()))?
        .parse()
        .ok()
}

async fn one_flood(o: &FloodOptions, kind: Kind, current: &Current) -> anyhow::Result<FloodReport> {
    if !o.json {
        eprintln!(
            "custody-load floods: {kind:?}, {} connections",
            o.connections
        );
    }
    if kind == Kind::Memory {
        // A working appliance's store caches are warm: fill them first (the writer's and
        // the auditor's), so that "after" differs from "before" by what the flood left,
        // not by SQLite's page caches filling with the steady deriver's records and the
        // periodic reconciliations (each grows to its bound, 2 MiB a connection).
        warm_store(o, WARM_DERIVATIONS).await?;
    }
    let heap_before = heap_in_use(o);
    let sqlite_before = heap_bytes(o, "sqlite");
    let before = phase(o, current, o.settle).await;
    let rss_before = o.pid.and_then(rss_kib);
    *lock(current) = Phase::new();
    let sampler = {
        let current = current.clone();
        let pid = o.pid;
        tokio::spawn(async move {
            loop {
                sample_rss(pid, &current);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut heap_peak = None;
    let mut per_connection = Vec::new();
    let flood = if kind == Kind::Memory {
        let mut total = FloodOutcome::default();
        for _ in 0..o.rounds.max(1) {
            let base = heap_in_use(o);
            let (outcome, held) = open_tls(o, "flood", Partial::None).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let peak = heap_in_use(o);
            heap_peak = heap_peak.max(peak);
            if let (Some(b), Some(p)) = (base, peak) {
                if !held.is_empty() {
                    per_connection.push((p as f64 - b as f64) / held.len() as f64);
                }
            }
            drop(held);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            total.opened += outcome.opened;
            total.refused_with_status += outcome.refused_with_status;
            total.closed_before_tls += outcome.closed_before_tls;
            total.open_s += outcome.open_s;
        }
        total
    } else {
        let flood = run_flood(o, kind).await;
        heap_peak = heap_in_use(o);
        flood
    };
    sampler.abort();
    let during = std::mem::replace(&mut *lock(current), Phase::new());
    // The main thread gives freed memory back every 2 s: let it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = phase(o, current, o.settle).await;
    Ok(FloodReport {
        kind,
        connections: o.connections,
        rss_kib_before: rss_before,
        rss_kib_peak: during.rss_kib_max,
        rss_kib_after: o.pid.and_then(rss_kib),
        heap_in_use_before: heap_before,
        heap_in_use_peak: heap_peak,
        heap_in_use_after: heap_in_use(o),
        heap_sqlite_before: sqlite_before,
        heap_sqlite_after: heap_bytes(o, "sqlite"),
        heap_bytes_per_connection: per_connection,
        before: before.figures(),
        during: during.figures(),
        after: after.figures(),
        flood,
    })
}

/// Derivations written before a memory run: about 4 MB of audit records.
const WARM_DERIVATIONS: usize = 12_000;

/// `n` derivations of the deriver's asset, 256 in flight at a time.
async fn warm_store(o: &FloodOptions, n: usize) -> anyhow::Result<()> {
    let client = Arc::new(
        Client::connect(&client_config(o, "client"))
            .await
            .context("the warm-up connection")?,
    );
    let mut done = 0;
    while done < n {
        let batch: Vec<_> = (0..256.min(n - done))
            .map(|_| {
                let c = client.clone();
                let asset = o.asset;
                tokio::spawn(async move { derive_once(&c, asset).await })
            })
            .collect();
        for t in batch {
            if !t.await.unwrap_or(false) {
                bail!("a warm-up derivation failed");
            }
        }
        done += 256;
    }
    // And the auditor's: a full reconciliation reads the whole log through its own
    // connection (as the periodic runs will during the measurement).
    let auditor = Client::connect(&client_config(o, "flood"))
        .await
        .context("the warm-up auditor connection")?;
    match auditor.call(&Request::Reconcile { full: true }).await {
        Ok(Reply::Reconciled(_)) => Ok(()),
        other => bail!("the warm-up reconciliation failed: {other:?}"),
    }
}

/// What a TLS flood connection sends after its handshake.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Partial {
    None,
    Header,
    Body,
}

async fn run_flood(o: &FloodOptions, kind: Kind) -> FloodOutcome {
    match kind {
        Kind::Tcp => {
            let (outcome, held) = open_tcp(o).await;
            tokio::time::sleep(o.hold).await;
            drop(held);
            outcome
        }
        Kind::Roleless | Kind::Identity | Kind::Idle | Kind::SlowHeader | Kind::SlowBody => {
            let (who, partial) = match kind {
                Kind::Roleless => ("nobody", Partial::None),
                Kind::SlowHeader => ("flood", Partial::Header),
                Kind::SlowBody => ("flood", Partial::Body),
                _ => ("flood", Partial::None),
            };
            let (mut outcome, held) = open_tls(o, who, partial).await;
            // Held: count what the appliance closes meanwhile (idle, frame timeouts).
            let closes = held.into_iter().map(|s| tokio::spawn(watch(s, o.hold)));
            for c in closes.collect::<Vec<_>>() {
                match c.await {
                    Ok(Closed::FrameTimeout) => outcome.frame_timeouts += 1,
                    Ok(Closed::Other) => outcome.closed_by_appliance += 1,
                    _ => {}
                }
            }
            outcome
        }
        Kind::Memory => unreachable!("memory rounds are run by one_flood"),
    }
}

fn flood_socket(o: &FloodOptions) -> std::io::Result<tokio::net::TcpSocket> {
    let s = match o.source {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    s.bind(SocketAddr::new(o.source, 0))?;
    Ok(s)
}

/// Opens `o.connections` TCP connections one after another. The process keeps 1,024
/// descriptors for the steady clients: past its limit less those, the oldest flood
/// connection is closed as a new one opens (the appliance has closed nearly all of them
/// already: one source holds few handshake slots).
async fn open_tcp(
    o: &FloodOptions,
) -> (
    FloodOutcome,
    std::collections::VecDeque<tokio::net::TcpStream>,
) {
    let started = Instant::now();
    let mut outcome = FloodOutcome::default();
    let most_held = fd_limit().saturating_sub(1024).max(1);
    let mut held = std::collections::VecDeque::with_capacity(o.connections.min(most_held));
    for _ in 0..o.connections {
        if held.len() >= most_held {
            held.pop_front();
        }
        match flood_socket(o) {
            Ok(s) => match s.connect(o.addr).await {
                Ok(stream) => {
                    outcome.opened += 1;
                    held.push_back(stream);
                }
                Err(_) => outcome.closed_before_tls += 1,
            },
            Err(_) => outcome.closed_before_tls += 1,
        }
    }
    outcome.open_s = started.elapsed().as_secs_f64();
    (outcome, held)
}

/// This process's limit on open descriptors.
fn fd_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Opens `o.connections` TLS connections as `who`, 16 at a time (below the appliance's
/// handshakes per source), each sending `partial` after its handshake; the ones the
/// appliance kept.
async fn open_tls(o: &FloodOptions, who: &str, partial: Partial) -> (FloodOutcome, Vec<Tls>) {
    let started = Instant::now();
    let config = client_config(o, who);
    let tls = match custody::tls::client_config(&config.ca, &config.cert, &config.key) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("custody-load floods: {e}");
            return (FloodOutcome::default(), Vec::new());
        }
    };
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let held = Arc::new(Mutex::new(Vec::with_capacity(o.connections)));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (tls, counts, held, next) = (tls.clone(), counts.clone(), held.clone(), next.clone());
        let (addr, total, source) = (o.addr, o.connections as u64, o.source);
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let outcome = one_tls(addr, source, tls.clone(), partial).await;
                match outcome {
                    Ok(stream) => {
                        counts[0].fetch_add(1, Ordering::Relaxed);
                        lock(&held).push(stream);
                    }
                    Err(Some(Status::ConnectionLimit)) => {
                        counts[1].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        counts[2].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let outcome = FloodOutcome {
        opened: counts[0].load(Ordering::Relaxed),
        refused_with_status: counts[1].load(Ordering::Relaxed),
        closed_before_tls: counts[2].load(Ordering::Relaxed),
        open_s: started.elapsed().as_secs_f64(),
        ..FloodOutcome::default()
    };
    let held = std::mem::take(&mut *lock(&held));
    (outcome, held)
}

/// One flood connection: handshake, then `partial`; a refusal frame within 300 ms is
/// reported as its status.
async fn one_tls(
    addr: SocketAddr,
    source: IpAddr,
    tls: Arc<rustls::ClientConfig>,
    partial: Partial,
) -> Result<Tls, Option<Status>> {
    let socket = match source {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|_| None)?;
    socket.bind(SocketAddr::new(source, 0)).map_err(|_| None)?;
    let tcp = socket.connect(addr).await.map_err(|_| None)?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(|_| None)?;
    let connect = tokio_rustls::TlsConnector::from(tls).connect(name, tcp);
    let mut stream = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| None)?
        .map_err(|_| None)?;
    let mut frame = Vec::new();
    Request::Hello.encode(7, &mut frame);
    match partial {
        Partial::None => {}
        Partial::Header => stream.write_all(&frame[..10]).await.map_err(|_| None)?,
        Partial::Body => {
            // A header that announces a body, and half of it.
            let mut f = Vec::new();
            Request::Status {
                asset: uuid::Uuid::from_u128(1),
            }
            .encode(8, &mut f);
            stream
                .write_all(&f[..wire::HEADER_LEN + 8])
                .await
                .map_err(|_| None)?;
        }
    }
    let _ = stream.flush().await;
    let mut buf = [0u8; 512];
    match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await {
        // Nothing within 300 ms: the appliance kept the connection.
        Err(_) => Ok(stream),
        Ok(Ok(n)) if n > 0 => Err(status_of(&buf[..n])),
        Ok(_) => Err(None),
    }
}

fn status_of(bytes: &[u8]) -> Option<Status> {
    let frame = wire::decode_frame(bytes, 64 * 1024).ok()??;
    match Reply::decode(wire::Opcode::Hello, frame.body).ok()? {
        Reply::Refused(r) => Some(r.status),
        _ => None,
    }
}

enum Closed {
    FrameTimeout,
    Other,
    Held,
}

/// Holds a flood connection for `hold`; how the appliance closed it, if it did.
async fn watch(mut s: Tls, hold: Duration) -> Closed {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(hold, s.read(&mut buf)).await {
        Err(_) => Closed::Held,
        Ok(Ok(n)) if n > 0 => match status_of(&buf[..n]) {
            Some(Status::FrameTimeout) => Closed::FrameTimeout,
            _ => Closed::Other,
        },
        Ok(_) => Closed::Other,
    }
}

/// Many connections need many descriptors: the floods hold theirs in this process, beside
/// the steady clients', so raise the limit well past the largest flood (as root, the hard
/// limit too), or else take the hard limit.
fn raise_fd_limit() {
    const WANTED: libc::rlim_t = 1 << 18;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: WANTED.max(lim.rlim_cur),
            rlim_max: WANTED.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Prints the reports as a table (or JSON).
pub fn print(reports: &[FloodReport], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(reports)?);
        return Ok(());
    }
    let mib = |k: Option<u64>| k.map_or("-".to_owned(), |k| format!("{:.0}", k as f64 / 1024.0));
    println!("| flood | conns | opened / refused (status) / closed before TLS / frame timeouts / closed | deriver p50/p99 ms before, during, after | fresh connect+derive p99/max ms during | failures | custodyd RSS MiB before / peak / after |");
    println!("|---|---:|---|---|---|---:|---|");
    for r in reports {
        println!(
            "| {:?} | {} | {} / {} / {} / {} / {} | {:.2}/{:.2}, {:.2}/{:.2}, {:.2}/{:.2} | {:.1}/{:.1} | {} | {} / {} / {} |",
            r.kind,
            r.connections,
            r.flood.opened,
            r.flood.refused_with_status,
            r.flood.closed_before_tls,
            r.flood.frame_timeouts,
            r.flood.closed_by_appliance,
            r.before.p50_ms,
            r.before.p99_ms,
            r.during.p50_ms,
            r.during.p99_ms,
            r.after.p50_ms,
            r.after.p99_ms,
            r.during.probe_p99_ms,
            r.during.probe_max_ms,
            r.before.failures + r.during.failures + r.after.failures
                + r.before.probe_failures + r.during.probe_failures + r.after.probe_failures,
            mib(r.rss_kib_before),
            mib(r.rss_kib_peak),
            mib(r.rss_kib_after),
        );
        if !r.heap_bytes_per_connection.is_empty() {
            let per: Vec<String> = r
                .heap_bytes_per_connection
                .iter()
                .map(|b| format!("{b:.0}"))
                .collect();
            let mb = |b: Option<u64>| {
                b.map_or("-".to_owned(), |b| format!("{:.1}", b as f64 / 1048576.0))
            };
            println!(
                "|   heap bytes per idle connection, by round: {}; heap in use MiB before / peak / after: {} / {} / {} (of which SQLite {} / {}) |",
                per.join(", "),
                mb(r.heap_in_use_before),
                mb(r.heap_in_use_peak),
                mb(r.heap_in_use_after),
                mb(r.heap_sqlite_before),
                mb(r.heap_sqlite_after)
            );
        }
    }
    Ok(())
}
