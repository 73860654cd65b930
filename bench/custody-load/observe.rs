//! What the harness reads off the appliance besides its answers: its /metrics, its
//! closing reconciliation, and the `commit stats` and `seed cache: refreshed` lines of
//! its log (demo).

use crate::target::failover_config;
use custody::client::FailoverClient;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The appliance's /metrics, as text (`None`: unreachable).
pub fn metrics_text(admin: SocketAddr) -> Option<String> {
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
pub fn metric_sum(admin: SocketAddr, name: &str) -> Option<f64> {
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
pub fn closing_reconciliation(
    endpoints: &[SocketAddr],
    certs: &Path,
) -> anyhow::Result<custody::op::ReconcileSummary> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let c = FailoverClient::connect(failover_config(endpoints, certs)).await?;
        c.reconcile(true).await.map_err(|e| {
            anyhow::anyhow!(
                "the closing reconciliation: {e} (the client needs the auditor role; --no-reconcile skips it)"
            )
        })
    })
}

/// Counts the appliance's `seed cache: refreshed` log lines whose `at_ms` falls in `window`.
pub fn seal_refreshes(log: &Path, window: (u64, u64)) -> Option<usize> {
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
pub struct CommitFigures {
    /// Shard-seconds that fell wholly inside the window.
    pub intervals: usize,
    pub batches: u64,
    pub records: u64,
    pub failed: u64,
    pub batch_p50: f64,
    pub batch_p99: f64,
    pub batch_max: u64,
    pub commit_p50_ms: f64,
    pub commit_p99_ms: f64,
    pub commit_max_ms: f64,
}

/// Reads the `commit stats` lines of a custodyd log whose interval (the second before
/// `at_ms`) lies inside `window`; percentiles are medians over those shard-seconds.
pub fn commit_figures(log: &Path, window: (u64, u64)) -> Option<CommitFigures> {
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
