//! Reconciliation at scale on the embedded store: a log of N chained, checkpointed
//! records (written through the store's own commit path, in batches as a shard sends
//! them), a full reconciliation of it with the checkpoint MACs, then M new records and an
//! incremental run from the watermark. Prints the times and the process's peak memory.
//!
//! ```text
//! cargo bench --bench reconcile_scale                      # N = 10,000,000, M = 1,000,000
//! CUSTODY_RECONCILE_RECORDS=1000000 CUSTODY_RECONCILE_NEW=100000 cargo bench --bench reconcile_scale
//! CUSTODY_RECONCILE_POSTGRES=postgresql://root@127.0.0.1:5432/test cargo bench --bench reconcile_scale
//! ```
//!
//! With `CUSTODY_RECONCILE_POSTGRES` the log goes into a fresh database on that server
//! (the appliance's commit statement, month partitions) and is read through the
//! reconciler's PostgreSQL source.

#[path = "../tests/common/records.rs"]
mod records;

use custody::audit::{chain_hash, GENESIS};
use custody::kdf::{DerivationKey, RootSeed};
use custody::reconcile::{mac_eq, reconcile, AuditSource, Pace, Reconciler};
use custody::store::postgres::{self, PgConfig};
use custody::store::sqlite::{SqliteReader, SqliteStore};
use custody::store::{Checkpoint, CommitBatch, ShardStore, Store};
use records::Records;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const SHARDS: u16 = 2;
const ASSETS: u64 = 10_000;
const BATCH: usize = 5_000;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident memory of the process so far (MiB).
fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_maxrss as f64 / 1024.0
}

/// Writes chained, checkpointed records to every shard as the shards would.
struct Writer {
    shards: Vec<Box<dyn ShardStore>>,
    next: Vec<u64>,
    head: Vec<[u8; 32]>,
    key: DerivationKey,
    assets: Vec<Uuid>,
    records: Records,
    scratch: Vec<u8>,
}

impl Writer {
    /// Opens and loads every shard of `store`; the assets are `ASSETS` fixed ids.
    async fn open(store: &dyn Store, seed: &RootSeed) -> Writer {
        let shards: Vec<Box<dyn ShardStore>> =
            (0..SHARDS).map(|s| store.open_shard(s, SHARDS)).collect();
        for s in &shards {
            s.load().await.expect("load");
        }
        Writer {
            shards,
            next: vec![1; SHARDS as usize],
            head: vec![GENESIS; SHARDS as usize],
            key: DerivationKey::new(seed).expect("key"),
            assets: (0..ASSETS)
                .map(|i| {
                    let mut b = [0u8; 16];
                    b[8..].copy_from_slice(&i.to_be_bytes());
                    uuid::Builder::from_random_bytes(b).into_uuid()
                })
                .collect(),
            records: Records::new("bench", "m/44'/0'/0'/0'/1"),
            scratch: Vec::new(),
        }
    }

    /// Commits `n` records spread evenly over the shards.
    async fn write_all(&mut self, n: u64) {
        for s in 0..SHARDS as usize {
            self.write(s, n / SHARDS as u64).await;
        }
    }

    /// Commits `n` records to shard `s`: its share of the registrations first, then
    /// derivations round the assets.
    async fn write(&mut self, s: usize, n: u64) {
        let mut left = n;
        while left > 0 {
            let take = left.min(BATCH as u64);
            let mut batch = CommitBatch {
                shard: s as u16,
                chain_prev: self.head[s],
                ..Default::default()
            };
            for _ in 0..take {
                self.add_record(s, &mut batch);
            }
            let last = batch.records.last().map(|r| r.seq).unwrap_or(0);
            batch.checkpoint = Some(Checkpoint {
                shard: s as u16,
                seq: last,
                hash: self.head[s],
                mac: self.key.checkpoint_mac(s as u16, last, &self.head[s]),
                ts_ms: custody::audit::now_ms(),
            });
            self.shards[s].commit(batch).await.expect("commit");
            left -= take;
        }
    }

    /// Shard `s`'s next record into `batch`, chained to the one before it (with its
    /// asset row when it registers).
    fn add_record(&mut self, s: usize, batch: &mut CommitBatch) {
        let seq = self.next[s];
        self.next[s] += 1;
        let i = ((seq - 1) as usize * SHARDS as usize + s) % self.assets.len();
        let registering = seq as usize <= self.assets.len() / SHARDS as usize;
        let asset = self.assets[i];
        let record = if registering {
            self.records.register(s as u16, seq, asset)
        } else {
            self.records.derive(s as u16, seq, asset)
        };
        let h = chain_hash(&record, &self.head[s], &mut self.scratch);
        self.head[s] = h;
        batch.chain.push(h);
        if registering {
            batch.asset_writes.push(records::registration(asset));
        }
        batch.records.push(record);
    }
}

/// The store the log goes into: SQLite at `path`, or (`CUSTODY_RECONCILE_POSTGRES`) a
/// fresh database on that server, with its settings.
async fn open_store(postgres: Option<&str>, path: &Path) -> (Box<dyn Store>, Option<PgConfig>) {
    match postgres {
        None => (
            Box::new(SqliteStore::open(path, 8, Duration::ZERO).expect("store")),
            None,
        ),
        Some(url) => {
            let admin = PgConfig::from_url(url).expect("url");
            let name = "custody_bench_reconcile";
            let a = postgres::connect(&admin).await.expect("server");
            a.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .expect("drop");
            a.batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create");
            let config = PgConfig {
                dbname: name.into(),
                ..admin
            };
            let c = postgres::connect(&config).await.expect("database");
            postgres::migrate(&c).await.expect("migrate");
            let owner = postgres::acquire_ownership(&c, Uuid::new_v4(), Duration::from_secs(3600))
                .await
                .expect("owner");
            (
                Box::new(postgres::PgStore::new(config.clone(), owner)),
                Some(config),
            )
        }
    }
}

/// The reconciler's source for the log just written.
async fn audit_source(pg: Option<&PgConfig>, path: &Path) -> Box<dyn AuditSource> {
    match pg {
        None => Box::new(Rc::new(SqliteReader::open(path).expect("reader"))),
        Some(config) => Box::new(postgres::PgAuditSource {
            client: Rc::new(postgres::connect(config).await.expect("reader")),
        }),
    }
}

fn main() {
    let n = env("CUSTODY_RECONCILE_RECORDS", 10_000_000);
    let m = env("CUSTODY_RECONCILE_NEW", 1_000_000);
    let dir = tempfile::Builder::new()
        .prefix("custody-reconcile-bench-")
        .tempdir_in(std::env::var("CUSTODY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
        .expect("temp dir");
    let path = dir.path().join("custody.db");
    let seed = RootSeed::from_bytes([7; 32]);
    let postgres = std::env::var("CUSTODY_RECONCILE_POSTGRES").ok();
    glommio::LocalExecutorBuilder::default()
        .io_memory(256 * 1024)
        .make()
        .expect("executor")
        .run(async move {
            let (store, pg) = open_store(postgres.as_deref(), &path).await;
            let backend = if pg.is_some() { "PostgreSQL" } else { "SQLite" };
            let mut w = Writer::open(&*store, &seed).await;
            let started = Instant::now();
            w.write_all(n).await;
            eprintln!(
                "wrote {n} records in {:.1} s ({} assets, batches of {BATCH}, each checkpointed)",
                started.elapsed().as_secs_f64(),
                ASSETS
            );
            let db_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let source = audit_source(pg.as_ref(), &path).await;
            let reader = &*source;
            let key = DerivationKey::new(&seed).expect("key");
            let check = |c: &Checkpoint| mac_eq(&key.checkpoint_mac(c.shard, c.seq, &c.hash), &c.mac);
            let rss_before = peak_rss_mib();
            let mut r = Reconciler::new();
            let t = Instant::now();
            let report = reconcile(&mut r, reader, Some(&check), &Pace::FULL_SPEED).await.expect("full run");
            let full = t.elapsed();
            assert!(report.findings.is_empty(), "{:?}", &report.findings[..report.findings.len().min(5)]);
            println!(
                "{backend}: full reconciliation: {} records, {} checkpoints, {} assets in {:.2} s ({:.0} records/s); peak RSS {:.0} MiB (before the run {:.0} MiB); SQLite file {:.2} GiB",
                report.records_checked,
                report.checkpoints_checked,
                report.assets_checked,
                full.as_secs_f64(),
                report.records_checked as f64 / full.as_secs_f64(),
                peak_rss_mib(),
                rss_before,
                db_bytes as f64 / (1u64 << 30) as f64
            );
            w.write_all(m).await;
            let t = Instant::now();
            let report = reconcile(&mut r, reader, Some(&check), &Pace::FULL_SPEED)
                .await
                .expect("incremental run");
            let inc = t.elapsed();
            assert!(report.findings.is_empty());
            println!(
                "{backend}: incremental reconciliation: {} new records, {} checkpoints, {} assets in {:.2} s; peak RSS {:.0} MiB",
                report.records_checked,
                report.checkpoints_checked,
                report.assets_checked,
                inc.as_secs_f64(),
                peak_rss_mib()
            );
        });
}
