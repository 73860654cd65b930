//! How a batch of audit records best goes into PostgreSQL: the appliance's one-statement
//! `unnest` commit (the production path, called through the store) against a binary
//! `COPY` in a transaction (BEGIN and the owner and sequence checks pipelined, COPY,
//! COMMIT), on the same server, interleaved in one run.
//!
//! ```text
//! CUSTODY_TEST_DATABASE_URL=postgresql://root@127.0.0.1:5432/test cargo bench --bench pg_commit
//! ```
//!
//! Each batch size runs `ROUNDS` commits of each method, alternating, first with the
//! server's durable commit (`synchronous_commit = on`, what custody requires) and then
//! with `synchronous_commit = off` in the benchmark's own sessions only, which leaves
//! the cost of the statements without the WAL flush. Prints medians and p99 per commit.

#[path = "../tests/common/pg.rs"]
mod pg;
#[path = "../tests/common/records.rs"]
mod records;

use custody::store::postgres::{self, Ownership, PgConfig, PgStore};
use custody::store::{CommitBatch, ShardStore, Store, StoreError};
use records::Records;
use std::time::{Duration, Instant};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

const ROUNDS: usize = 300;
const BATCH_SIZES: [usize; 4] = [1, 16, 128, 512];

fn main() {
    let Ok(url) = std::env::var("CUSTODY_TEST_DATABASE_URL") else {
        eprintln!(
            "pg_commit: set CUSTODY_TEST_DATABASE_URL to a PostgreSQL server to run this benchmark"
        );
        return;
    };
    let admin = PgConfig::from_url(&url).expect("database URL");
    let database = pg::TempDatabase::new(admin, "custody_bench_commit").expect("fresh database");
    let config = database.config.clone();
    let result = postgres::on_own_executor("pg-commit-bench", move || run(config));
    result.expect("executor").expect("benchmark");
}

const COPY_COLUMNS: &str = "custody_audit_log (shard, seq, logged_at, event, asset_id, counter, \
    state_at_event, requester, request_id, derivation_path, purpose, region, ttl_s, scheme_version)";

/// The alternative: a transaction with the same checks as the production statement, the
/// records by binary COPY.
async fn copy_commit(
    c: &tokio_postgres::Client,
    token: i64,
    batch: &CommitBatch,
) -> Result<(), tokio_postgres::Error> {
    let shard = batch.shard as i16;
    let first = batch.records[0].seq as i64;
    let last = batch.records[batch.records.len() - 1].seq as i64;
    let prev = first - 1;
    let own_params: [&(dyn ToSql + Sync); 1] = [&token];
    let adv_params: [&(dyn ToSql + Sync); 3] = [&shard, &prev, &last];
    // Pipelined: the three are sent before the first answer comes back.
    let begin = c.batch_execute("BEGIN");
    let own = c.query_one(
        "SELECT 1 FROM custody_owner WHERE id = 1 AND token = $1 FOR SHARE",
        &own_params,
    );
    let adv = c.execute(
        "UPDATE custody_shard_seq SET last_seq = $3 WHERE shard = $1 AND last_seq = $2",
        &adv_params,
    );
    let (b, (o, a)) = futures_lite::future::zip(begin, futures_lite::future::zip(own, adv)).await;
    let (_, _, advanced) = (b?, o?, a?);
    assert_eq!(advanced, 1, "sequence continues");
    let sink = c
        .copy_in(&format!("COPY {COPY_COLUMNS} FROM STDIN BINARY"))
        .await?;
    let types = [
        Type::INT2,
        Type::INT8,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::UUID,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INT4,
        Type::INT2,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    for r in &batch.records {
        let d = r.derive.as_ref().expect("derive record");
        let ts = std::time::UNIX_EPOCH + Duration::from_millis(r.ts_ms);
        let row: [&(dyn ToSql + Sync); 14] = [
            &shard,
            &(r.seq as i64),
            &ts,
            &r.event.name(),
            &r.asset,
            &(r.counter as i64),
            &r.state.name(),
            &&*r.requester,
            &(r.request_id as i64),
            &d.path.to_string(),
            &d.purpose.name(),
            &&*d.region,
            &(d.ttl_s as i32),
            &i16::from(d.scheme_version),
        ];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    c.batch_execute("COMMIT").await
}

fn summary(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[(v.len() * 99) / 100])
}

/// The two ways side by side on one database: shard 0 commits through the store
/// (unnest), shard 1 by COPY, each with its own next sequence number.
struct Bench {
    config: PgConfig,
    ownership: Ownership,
    unnest: Box<dyn ShardStore>,
    copy: tokio_postgres::Client,
    /// The session that migrated and took ownership, kept open for the whole run.
    _owner: tokio_postgres::Client,
    records: Records,
    asset: Uuid,
    seq0: u64,
    seq1: u64,
}

impl Bench {
    /// Migrates the fresh database at `config`, takes ownership, and registers the asset
    /// every batch derives (through the store, on shard 0).
    async fn set_up(config: PgConfig) -> Result<Bench, StoreError> {
        let owner = postgres::connect(&config).await?;
        postgres::migrate(&owner).await?;
        let ownership =
            postgres::acquire_ownership(&owner, Uuid::new_v4(), Duration::from_secs(600)).await?;
        let records = Records::new("bench-client", "m/44'/0'/0'/0'/7");
        let asset = Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef);
        let store = PgStore::new(config.clone(), ownership);
        let unnest = store.open_shard(0, 2);
        unnest.load().await?;
        let copy = postgres::connect(&config).await?;
        copy.batch_execute("INSERT INTO custody_shard_seq VALUES (1, 0) ON CONFLICT DO NOTHING")
            .await
            .expect("shard 1");
        unnest.commit(records.register_batch(0, 1, asset)).await?;
        Ok(Bench {
            config,
            ownership,
            unnest,
            copy,
            _owner: owner,
            records,
            asset,
            seq0: 1,
            seq1: 0,
        })
    }

    /// `synchronous_commit = off` in the benchmark's sessions only: the store's
    /// connection and the COPY one.
    async fn without_durability(&mut self) -> Result<(), StoreError> {
        let s = postgres::connect(&self.config).await?;
        s.batch_execute(&format!(
            "ALTER DATABASE {} SET synchronous_commit = off",
            self.config.dbname
        ))
        .await
        .expect("alter database");
        drop(s);
        // A new store session picks up the database's new default; the COPY session
        // sets it itself.
        self.unnest = PgStore::new(
            PgConfig {
                allow_unsafe_durability: true,
                ..self.config.clone()
            },
            self.ownership,
        )
        .open_shard(0, 2);
        self.unnest.load().await?;
        self.copy
            .batch_execute("SET synchronous_commit = off")
            .await
            .expect("set");
        Ok(())
    }

    /// `ROUNDS` commits of `size` records each way, alternating: each commit's time.
    async fn rounds(&mut self, size: usize) -> Result<(Vec<Duration>, Vec<Duration>), StoreError> {
        let (mut t_unnest, mut t_copy) = (Vec::new(), Vec::new());
        let n = size as u64;
        for _ in 0..ROUNDS {
            let b0 = self
                .records
                .derive_batch(0, self.seq0 + 1..=self.seq0 + n, self.asset);
            let b1 = self
                .records
                .derive_batch(1, self.seq1 + 1..=self.seq1 + n, self.asset);
            let t = Instant::now();
            self.unnest.commit(b0).await?;
            t_unnest.push(t.elapsed());
            self.seq0 += n;
            let t = Instant::now();
            copy_commit(&self.copy, self.ownership.token, &b1)
                .await
                .expect("copy commit");
            t_copy.push(t.elapsed());
            self.seq1 += n;
        }
        Ok((t_unnest, t_copy))
    }
}

/// One batch size's line: median and p99 per commit each way, and rows/s.
fn print_size(size: usize, t_unnest: Vec<Duration>, t_copy: Vec<Duration>) {
    let (u50, u99) = summary(t_unnest);
    let (c50, c99) = summary(t_copy);
    let rate = |d: Duration| size as f64 / d.as_secs_f64();
    println!(
        "  batch {size:>4}: unnest {:>7.3} / {:>7.3} ms ({:>9.0} rows/s)   copy {:>7.3} / {:>7.3} ms ({:>9.0} rows/s)   copy/unnest median {:.2}",
        u50.as_secs_f64() * 1e3,
        u99.as_secs_f64() * 1e3,
        rate(u50),
        c50.as_secs_f64() * 1e3,
        c99.as_secs_f64() * 1e3,
        rate(c50),
        c50.as_secs_f64() / u50.as_secs_f64()
    );
}

/// Both ways at every batch size, durable first, then without the WAL flush.
async fn run(config: PgConfig) -> Result<(), StoreError> {
    let mut bench = Bench::set_up(config).await?;
    println!("pg_commit: {ROUNDS} commits per method and batch size, alternating; per commit: median / p99; rows/s from the medians");
    for durable in [true, false] {
        if !durable {
            bench.without_durability().await?;
        }
        println!(
            "synchronous_commit = {}",
            if durable {
                "on (durable)"
            } else {
                "off (statement cost only)"
            }
        );
        for size in BATCH_SIZES {
            let (t_unnest, t_copy) = bench.rounds(size).await?;
            print_size(size, t_unnest, t_copy);
        }
    }
    Ok(())
}
