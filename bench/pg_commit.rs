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

use custody::audit::{AuditEvent, AuditRecord, DeriveDetail};
use custody::kdf::DerivationPath;
use custody::lifecycle::AssetState;
use custody::policy::Purpose;
use custody::store::postgres::{self, PgConfig, PgStore};
use custody::store::{AssetWrite, CommitBatch, Store};
use std::sync::Arc;
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
    let result = postgres::on_own_executor("pg-commit-bench", move || run(admin));
    result.expect("executor").expect("benchmark");
}

fn record(shard: u16, seq: u64, asset: Uuid, path: &DerivationPath) -> AuditRecord {
    AuditRecord {
        shard,
        seq,
        event: AuditEvent::Derive,
        asset,
        counter: 0,
        state: AssetState::Active,
        requester: Arc::from("bench-client"),
        request_id: seq,
        ts_ms: custody::audit::now_ms(),
        derive: Some(DeriveDetail {
            path: *path,
            purpose: Purpose::Trading,
            region: Arc::from("US-EAST"),
            ttl_s: 300,
            scheme_version: 1,
        }),
        rotation_id: None,
        switched_region: None,
    }
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

async fn run(admin: PgConfig) -> Result<(), custody::store::StoreError> {
    let name = "custody_bench_commit";
    let a = postgres::connect(&admin).await?;
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        a.batch_execute(&sql)
            .await
            .map_err(|e| custody::store::StoreError::Unavailable(e.to_string()))?;
    }
    let config = PgConfig {
        dbname: name.into(),
        ..admin.clone()
    };
    let c = postgres::connect(&config).await?;
    postgres::migrate(&c).await?;
    let ownership =
        postgres::acquire_ownership(&c, Uuid::new_v4(), Duration::from_secs(600)).await?;
    let path = DerivationPath::parse("m/44'/0'/0'/0'/7").expect("path");
    let asset = Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef);
    let store = PgStore::new(config.clone(), ownership);
    // Shard 0 commits through the store (unnest); shard 1 by COPY.
    let mut unnest = store.open_shard(0, 2);
    unnest.load().await?;
    let copy = postgres::connect(&config).await?;
    copy.batch_execute("INSERT INTO custody_shard_seq VALUES (1, 0) ON CONFLICT DO NOTHING")
        .await
        .expect("shard 1");
    unnest
        .commit(CommitBatch {
            region_writes: Vec::new(),
            shard: 0,
            records: vec![AuditRecord {
                event: AuditEvent::Register,
                derive: None,
                ..record(0, 1, asset, &path)
            }],
            asset_writes: vec![AssetWrite {
                asset,
                state: AssetState::Active,
                counter: 0,
                insert: true,
            }],
            ..Default::default()
        })
        .await?;
    let (mut seq0, mut seq1) = (1u64, 0u64);

    println!("pg_commit: {ROUNDS} commits per method and batch size, alternating; per commit: median / p99; rows/s from the medians");
    for durable in [true, false] {
        if !durable {
            // Only the benchmark's sessions: the store's connection and the COPY one.
            let s = postgres::connect(&config).await?;
            s.batch_execute(&format!(
                "ALTER DATABASE {name} SET synchronous_commit = off"
            ))
            .await
            .expect("alter database");
            drop(s);
            // A new store session picks up the database's new default; the COPY session
            // sets it itself.
            unnest = PgStore::new(
                PgConfig {
                    allow_unsafe_durability: true,
                    ..config.clone()
                },
                ownership,
            )
            .open_shard(0, 2);
            unnest.load().await?;
            copy.batch_execute("SET synchronous_commit = off")
                .await
                .expect("set");
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
            let (mut t_unnest, mut t_copy) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                let batch = |shard: u16, after: u64| CommitBatch {
                    region_writes: Vec::new(),
                    shard,
                    records: (1..=size as u64)
                        .map(|i| record(shard, after + i, asset, &path))
                        .collect(),
                    asset_writes: vec![],
                    ..Default::default()
                };
                let (b0, b1) = (batch(0, seq0), batch(1, seq1));
                let t = Instant::now();
                unnest.commit(b0).await?;
                t_unnest.push(t.elapsed());
                seq0 += size as u64;
                let t = Instant::now();
                copy_commit(&copy, ownership.token, &b1)
                    .await
                    .expect("copy commit");
                t_copy.push(t.elapsed());
                seq1 += size as u64;
            }
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
    }
    drop(unnest);
    drop(copy);
    let a = postgres::connect(&admin).await?;
    let _ = a
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
    Ok(())
}
