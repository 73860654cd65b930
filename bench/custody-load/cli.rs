//! The command line: the usage text, the options every command shares, `floods`' own
//! flags, and their parsing and checks.

use crate::target::Clients;
use crate::workload::{self, Distribution, Mix};
use anyhow::bail;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

pub const USAGE: &str = "usage:
  custody-load demo [OPTIONS]
      start custodyd (embedded SQLite store, dev seal, dev certificates in a fresh
      directory), drive it, verify the audit log, have it reconcile its whole audit
      log (exit 5 on any finding), stop it
  custody-load run --addr HOST:PORT[,HOST:PORT...] --certs DIR [OPTIONS] [--verify-db FILE]
      drive a running appliance (client.pem/client.key/ca.pem in DIR; the client needs
      the deriver, operator and auditor roles), then have it reconcile its audit log;
      several addresses (a highly available group): each connection follows the active,
      moving to the next endpoint on NOT_ACTIVE or a closed connection (20 ms doubling to
      500 ms between rounds); the report counts requests acknowledged, refused
      NOT_ACTIVE, of unknown outcome (in flight when a connection closed) and otherwise
      refused, the longest gap between two acknowledgements and each endpoint switch
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
  --cores N         (demo) appliance cores (default: the appliance's, one per core but one)
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
  --ack-log FILE    write every acknowledged DERIVE and ROTATE to FILE as it comes, one
                    tab-separated line each (ms since start, endpoint, op, asset,
                    counter, receipt shard, seq, hash; bench/custody-load/acklog.rs)
  --failure-log FILE  write every request not acknowledged to FILE as it comes (ms
                    since start, op, outcome: the status, OUTCOME_UNKNOWN, NOT_SENT);
                    the JSON's run_start gives time 0 on the wall clock and on
                    CLOCK_MONOTONIC, to place a fault on the logs' clock
  --server-pid PID  (run) the appliance's process on this host: the report gives its
                    CPU per request (user, system) and context switches per request over
                    the window (demo reads its own custodyd's)
  --json            print the report as JSON (and no live line)";

/// The options of a run (`demo`, `run`, `article`, `compare`; `floods` reads a few).
#[derive(Clone)]
pub struct Options {
    pub rate: u64,
    pub duration: Duration,
    pub warmup: Duration,
    pub connections: usize,
    pub depth: usize,
    pub assets: usize,
    pub distribution: Distribution,
    pub mix: Mix,
    pub slo_p99: Option<Duration>,
    pub reconcile_at_end: bool,
    pub clients: Clients,
    pub cores: Option<usize>,
    pub state_dir: Option<PathBuf>,
    pub postgres: Option<String>,
    pub seal_ttl: Option<u64>,
    /// `--addr`: the appliances, in the order connections try them (empty: not given).
    pub endpoints: Vec<SocketAddr>,
    /// `--ack-log`: where every acknowledged DERIVE and ROTATE is written.
    pub ack_log: Option<PathBuf>,
    /// `--failure-log`: where every request not acknowledged is written.
    pub failure_log: Option<PathBuf>,
    /// `--server-pid`: the appliance's process (`run`), whose CPU time and context
    /// switches over the window the report gives (`demo` knows its own).
    pub server_pid: Option<u32>,
    pub certs: Option<PathBuf>,
    pub verify_db: Option<PathBuf>,
    pub toggle_region_ms: Option<u64>,
    pub reconcile_phase: Option<Duration>,
    /// The reconciler load's runs are incremental (from the watermarks) instead of full.
    pub reconcile_incremental: bool,
    pub reconcile_rate: Option<u64>,
    pub article_connections: usize,
    pub json: bool,
    /// Part of `compare`: the JSON report is printed once, for both runs.
    pub compare: bool,
}

impl Default for Options {
    /// The defaults the usage text gives.
    fn default() -> Options {
        Options {
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
            endpoints: Vec::new(),
            ack_log: None,
            failure_log: None,
            server_pid: None,
            certs: None,
            verify_db: None,
            toggle_region_ms: None,
            reconcile_phase: None,
            reconcile_incremental: false,
            reconcile_rate: None,
            article_connections: 16,
            json: false,
            compare: false,
        }
    }
}

/// `floods`' own flags (the rest are shared: --addr, --certs, --json).
#[derive(Default)]
pub struct FloodArgs {
    pub kinds: Option<String>,
    pub connections: Option<usize>,
    pub hold_s: Option<f64>,
    pub settle_s: Option<f64>,
    pub deriver_rate: Option<u32>,
    pub source: Option<std::net::IpAddr>,
    pub rounds: Option<usize>,
    pub admin: Option<SocketAddr>,
    pub pid: Option<u32>,
    pub asset: Option<Uuid>,
}

/// A command line, read: the command (`None`: none given) and its flags.
pub struct Args {
    pub command: Option<String>,
    pub options: Options,
    pub floods: FloodArgs,
}

/// Reads the process's arguments; `None` when they ask for --help (the usage is printed
/// then, whatever follows). The options are not checked yet (see [`Options::check`]).
pub fn parse() -> anyhow::Result<Option<Args>> {
    use lexopt::prelude::*;
    let mut o = Options::default();
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
            Long("addr") => o.endpoints = parse_endpoints(&p.value()?.string()?)?,
            Long("ack-log") => o.ack_log = Some(p.value()?.into()),
            Long("failure-log") => o.failure_log = Some(p.value()?.into()),
            Long("server-pid") => o.server_pid = Some(p.value()?.parse()?),
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
                return Ok(None);
            }
            Value(v) if command.is_none() => command = Some(v.string()?),
            _ => return Err(arg.unexpected().into()),
        }
    }
    Ok(Some(Args {
        command,
        options: o,
        floods: floods_options,
    }))
}

/// `--addr HOST:PORT[,HOST:PORT...]`: the endpoints in order.
fn parse_endpoints(text: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let endpoints = text
        .split(',')
        .map(|one| {
            one.trim()
                .parse::<SocketAddr>()
                .map_err(|e| anyhow::anyhow!("--addr {one:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if endpoints.len() > custody::client::FAILOVER_ENDPOINTS_MAX {
        bail!(
            "--addr: more than {} endpoints",
            custody::client::FAILOVER_ENDPOINTS_MAX
        );
    }
    Ok(endpoints)
}

impl Options {
    /// Refuses the values no run can have.
    pub fn check(&self) -> anyhow::Result<()> {
        let o = self;
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
        Ok(())
    }
}
