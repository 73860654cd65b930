//! One conformance suite for every store: the embedded SQLite store and PostgreSQL.
//!
//! PostgreSQL comes from `CUSTODY_TEST_DATABASE_URL` (e.g.
//! `postgresql://root@127.0.0.1:5432/test`); each test makes its own database there and
//! drops it afterwards, so tests run in parallel. Without the variable the PostgreSQL half
//! is skipped with a notice, unless `CUSTODY_REQUIRE_SERVICES=1`, which makes it fail.

mod common;

use custody::audit::{AuditEvent, AuditRecord};
use custody::lifecycle::AssetState;
use custody::placement::shard_of;
use custody::store::postgres::{self, PgConfig, PgStore};
use custody::store::sqlite::{SqliteReader, SqliteStore};
use custody::store::{
    AssetWrite, Checkpoint, CommitBatch, RegionWrite, RotationWindow, Store, StoreError,
};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// A store under test, and how to read back what it holds. (A handful exist per test
/// run, so the size of the PostgreSQL variant does not matter.)
#[allow(clippy::large_enum_variant)]
enum Backend {
    Sqlite {
        dir: tempfile::TempDir,
    },
    Postgres {
        config: PgConfig,
        admin: PgConfig,
        ownership: postgres::Ownership,
    },
}

impl Backend {
    fn sqlite() -> Backend {
        Backend::Sqlite {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A fresh, migrated database; `None` when PostgreSQL is not configured.
    async fn postgres() -> Option<Backend> {
        let url = match std::env::var("CUSTODY_TEST_DATABASE_URL") {
            Ok(u) => u,
            Err(_) => {
                common::missing("PostgreSQL", &"CUSTODY_TEST_DATABASE_URL is not set");
                return None;
            }
        };
        let admin = common::PgDatabase::parse_url(&url);
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "custody_conf_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let client = postgres::connect(&admin)
            .await
            .expect("PostgreSQL reachable");
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            client
                .batch_execute(&sql)
                .await
                .expect("create test database");
        }
        let config = PgConfig {
            dbname: name,
            ..admin.clone()
        };
        let c = postgres::connect(&config).await.unwrap();
        assert_eq!(
            postgres::migrate(&c).await.unwrap(),
            custody::store::SCHEMA_VERSION
        );
        let ownership = postgres::acquire_ownership(&c, Uuid::new_v4(), config.owner_lease)
            .await
            .unwrap();
        Some(Backend::Postgres {
            config,
            admin,
            ownership,
        })
    }

    fn open(&self) -> Box<dyn Store> {
        match self {
            Backend::Sqlite { dir } => {
                Box::new(SqliteStore::open(&dir.path().join("c.db"), 8, Duration::ZERO).unwrap())
            }
            Backend::Postgres {
                config, ownership, ..
            } => Box::new(PgStore::new(config.clone(), *ownership)),
        }
    }

    /// (shard, seq, event, asset, counter) of every audit row.
    async fn audit(&self) -> Vec<(u16, u64, String, Uuid, u64)> {
        match self {
            Backend::Sqlite { dir } => SqliteReader::open(&dir.path().join("c.db"))
                .unwrap()
                .audit_rows()
                .unwrap()
                .into_iter()
                .map(|r| {
                    (
                        r.shard,
                        r.seq,
                        r.event.name().to_owned(),
                        r.asset,
                        r.counter,
                    )
                })
                .collect(),
            Backend::Postgres { config, .. } => {
                let c = postgres::connect(config).await.unwrap();
                postgres::audit_rows(&c).await.unwrap()
            }
        }
    }

    async fn checkpoints(&self) -> Vec<Checkpoint> {
        match self {
            Backend::Sqlite { dir } => SqliteReader::open(&dir.path().join("c.db"))
                .unwrap()
                .checkpoints()
                .unwrap(),
            Backend::Postgres { config, .. } => {
                let c = postgres::connect(config).await.unwrap();
                postgres::checkpoints(&c).await.unwrap()
            }
        }
    }

    async fn drop_database(self) {
        if let Backend::Postgres { config, admin, .. } = self {
            let c = postgres::connect(&admin).await.unwrap();
            let _ = c
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    config.dbname
                ))
                .await;
        }
    }
}

fn run(test: impl std::future::Future<Output = ()> + 'static) {
    glommio::LocalExecutorBuilder::default()
        .io_memory(256 * 1024)
        .make()
        .unwrap()
        .run(test);
}

fn asset_on(shard: u16, shards: u16, n: u8) -> Uuid {
    (0..=255u8)
        .map(|i| {
            uuid::Builder::from_random_bytes([
                n, i, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
            ])
            .into_uuid()
        })
        .find(|a| shard_of(a, shards) == shard)
        .unwrap()
}

fn record(shard: u16, seq: u64, event: AuditEvent, asset: Uuid) -> AuditRecord {
    AuditRecord {
        shard,
        seq,
        event,
        asset,
        counter: 0,
        state: AssetState::Active,
        requester: Arc::from("conformance"),
        request_id: seq,
        ts_ms: 1_795_000_000_000 + seq,
        derive: None,
        rotation_id: None,
        switched_region: None,
    }
}

fn register(shard: u16, seq: u64, asset: Uuid) -> CommitBatch {
    CommitBatch {
        region_writes: Vec::new(),
        shard,
        records: vec![record(shard, seq, AuditEvent::Register, asset)],
        asset_writes: vec![AssetWrite {
            asset,
            state: AssetState::Active,
            counter: 0,
            insert: true,
        }],
        ..Default::default()
    }
}

fn rotation_id() -> Uuid {
    Uuid::parse_str("0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d").unwrap()
}

fn write(asset: Uuid, state: AssetState, counter: u64) -> AssetWrite {
    AssetWrite {
        asset,
        state,
        counter,
        insert: false,
    }
}

fn derive(shard: u16, seqs: std::ops::RangeInclusive<u64>, asset: Uuid) -> CommitBatch {
    CommitBatch {
        region_writes: Vec::new(),
        shard,
        records: seqs
            .map(|s| record(shard, s, AuditEvent::Derive, asset))
            .collect(),
        asset_writes: vec![],
        ..Default::default()
    }
}

/// The suite: every store must behave exactly like this.
async fn conformance(backend: Backend) {
    let (a, b) = (asset_on(1, 2, 1), asset_on(0, 2, 2));
    {
        let store = backend.open();
        let s1 = store.open_shard(1, 2);
        let s0 = store.open_shard(0, 2);
        let fresh = s1.load().await.unwrap();
        assert_eq!((fresh.assets.len(), fresh.last_seq), (0, 0));
        s0.load().await.unwrap();

        s1.commit(register(1, 1, a)).await.unwrap();
        s1.commit(derive(1, 2..=4, a)).await.unwrap();
        s0.commit(register(0, 1, b)).await.unwrap();

        // A gap, and a repeat, are refused and write nothing.
        match s1.commit(derive(1, 6..=6, a)).await {
            Err(StoreError::SequenceGap {
                shard: 1,
                expected: 5,
                found: 6,
            }) => {}
            other => panic!("gap: {other:?}"),
        }
        match s1.commit(derive(1, 3..=5, a)).await {
            Err(StoreError::SequenceGap {
                shard: 1,
                expected: 5,
                found: 3,
            }) => {}
            other => panic!("repeat: {other:?}"),
        }
        // Still usable after a refusal.
        s1.commit(derive(1, 5..=5, a)).await.unwrap();

        // Lifecycle: a rotation (with its id) and a suspension update the asset row.
        let mut rotation = record(1, 6, AuditEvent::Rotate, a);
        rotation.counter = 1;
        rotation.rotation_id = Some(rotation_id());
        let mut suspension = record(1, 7, AuditEvent::Suspend, a);
        suspension.counter = 1;
        suspension.state = AssetState::Suspended;
        // Chained, with a checkpoint (what a running shard sends; the store keeps, not
        // checks, the hashes).
        s1.commit(CommitBatch {
            region_writes: Vec::new(),
            shard: 1,
            records: vec![rotation],
            asset_writes: vec![write(a, AssetState::Active, 1)],
            chain_prev: [5; 32],
            chain: vec![[6; 32]],
            checkpoint: Some(Checkpoint {
                shard: 1,
                seq: 6,
                hash: [6; 32],
                mac: [0xcc; 32],
                ts_ms: 1_795_000_000_000,
            }),
        })
        .await
        .unwrap();
        s1.commit(CommitBatch {
            region_writes: Vec::new(),
            shard: 1,
            records: vec![suspension],
            asset_writes: vec![write(a, AssetState::Suspended, 1)],
            ..Default::default()
        })
        .await
        .unwrap();
        // A counter moving backward (I2), or an update of an asset that does not exist,
        // fails the whole batch: no record, no sequence step.
        for bad in [
            write(a, AssetState::Active, 0),
            write(Uuid::new_v4(), AssetState::Active, 3),
        ] {
            let refused = s1
                .commit(CommitBatch {
                    region_writes: Vec::new(),
                    shard: 1,
                    records: vec![record(1, 8, AuditEvent::Resume, a)],
                    asset_writes: vec![bad.clone()],
                    ..Default::default()
                })
                .await;
            assert!(refused.is_err(), "{bad:?} was committed");
        }
        // A region switch: its record (nil asset, the region named) and the durable switch.
        let mut switch = record(1, 8, AuditEvent::RegionDisable, Uuid::nil());
        switch.switched_region = Some(Arc::from("EU-WEST"));
        s1.commit(CommitBatch {
            shard: 1,
            records: vec![switch],
            asset_writes: vec![],
            region_writes: vec![RegionWrite {
                region: "EU-WEST".into(),
                enabled: false,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
        // Retired is terminal in the store too: a later update of the row is refused.
        let mut retirement = record(1, 9, AuditEvent::Retire, a);
        retirement.counter = 1;
        retirement.state = AssetState::Retired;
        s1.commit(CommitBatch {
            shard: 1,
            records: vec![retirement],
            asset_writes: vec![write(a, AssetState::Retired, 1)],
            region_writes: vec![],
            chain_prev: [8; 32],
            chain: vec![[9; 32]],
            ..Default::default()
        })
        .await
        .unwrap();
        let revived = s1
            .commit(CommitBatch {
                shard: 1,
                records: vec![record(1, 10, AuditEvent::Resume, a)],
                asset_writes: vec![write(a, AssetState::Active, 1)],
                region_writes: vec![],
                ..Default::default()
            })
            .await;
        assert!(revived.is_err(), "a retired asset was brought back");
    }
    // Restart: a new store instance sees exactly what was committed.
    let store = backend.open();
    let s1 = store.open_shard(1, 2).load().await.unwrap();
    assert_eq!(s1.last_seq, 9);
    assert_eq!(
        s1.last_hash, [9; 32],
        "the chain continues from the last hash"
    );
    assert_eq!(s1.regions, [("EU-WEST".to_string(), false)]);
    assert_eq!(
        s1.assets.iter().map(|x| x.asset).collect::<Vec<_>>(),
        vec![a]
    );
    assert_eq!(s1.assets[0].state, AssetState::Retired);
    assert_eq!(s1.assets[0].counter, 1);
    assert_eq!(s1.rotations.len(), 1);
    let r = s1.rotations[0];
    assert_eq!(
        (r.rotation_id, r.asset, r.counter, r.seq),
        (rotation_id(), a, 1, 6)
    );
    assert_eq!(r.hash, [6; 32]);
    // The window: nothing newer than an hour from now, and at most `max`.
    let later = store
        .open_shard(1, 2)
        .load_with(RotationWindow {
            since_ms: custody::audit::now_ms() + 3_600_000,
            max: 10,
        })
        .await
        .unwrap();
    assert!(later.rotations.is_empty());
    let none = store
        .open_shard(1, 2)
        .load_with(RotationWindow {
            since_ms: 0,
            max: 0,
        })
        .await
        .unwrap();
    assert!(none.rotations.is_empty());
    let s0 = store.open_shard(0, 2).load().await.unwrap();
    assert_eq!((s0.last_seq, s0.assets.len()), (1, 1));
    assert_eq!(
        s0.last_hash,
        custody::audit::GENESIS,
        "stored without a hash"
    );
    assert_eq!(
        backend.checkpoints().await,
        vec![Checkpoint {
            shard: 1,
            seq: 6,
            hash: [6; 32],
            mac: [0xcc; 32],
            ts_ms: 1_795_000_000_000,
        }]
    );
    drop(store);

    let audit = backend.audit().await;
    let expected: Vec<(u16, u64, String, Uuid, u64)> = vec![
        (0, 1, "REGISTER".into(), b, 0),
        (1, 1, "REGISTER".into(), a, 0),
        (1, 2, "DERIVE".into(), a, 0),
        (1, 3, "DERIVE".into(), a, 0),
        (1, 4, "DERIVE".into(), a, 0),
        (1, 5, "DERIVE".into(), a, 0),
        (1, 6, "ROTATE".into(), a, 1),
        (1, 7, "SUSPEND".into(), a, 1),
        (1, 8, "REGION_DISABLE".into(), Uuid::nil(), 0),
        (1, 9, "RETIRE".into(), a, 1),
    ];
    assert_eq!(audit, expected);
    backend.drop_database().await;
}

#[test]
fn sqlite_conforms() {
    run(conformance(Backend::sqlite()));
}

#[test]
fn postgres_conforms() {
    run(async {
        if let Some(backend) = Backend::postgres().await {
            conformance(backend).await;
        }
    });
}

#[test]
fn postgres_version_1_migrates_to_the_latest_keeping_every_row() {
    run(async {
        let Ok(url) = std::env::var("CUSTODY_TEST_DATABASE_URL") else {
            common::missing("PostgreSQL", &"CUSTODY_TEST_DATABASE_URL is not set");
            return;
        };
        let admin = common::PgDatabase::parse_url(&url);
        let name = format!("custody_v1_{}", std::process::id());
        let a = postgres::connect(&admin).await.unwrap();
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            a.batch_execute(&sql).await.unwrap();
        }
        let config = PgConfig {
            dbname: name.clone(),
            ..admin.clone()
        };
        let c = postgres::connect(&config).await.unwrap();
        c.batch_execute(&format!(
            "BEGIN; {}; COMMIT;",
            include_str!("../appliance/sql/postgres/0001_init.sql")
        ))
        .await
        .unwrap();
        c.batch_execute(
            "INSERT INTO custody_keys VALUES ('6ba7b810-9dad-11d1-80b4-00c04fd430c8', 'ACTIVE', 4, now(), now());
             INSERT INTO custody_shard_seq VALUES (0, 1);
             INSERT INTO custody_audit_log (shard, seq, logged_at, event, asset_id, counter,
                 state_at_event, requester, request_id)
             VALUES (0, 1, now(), 'DERIVE', '6ba7b810-9dad-11d1-80b4-00c04fd430c8', 4, 'ACTIVE', 'old', 9);",
        )
        .await
        .unwrap();
        assert_eq!(postgres::schema_version(&c).await.unwrap(), 1);
        assert_eq!(
            postgres::migrate(&c).await.unwrap(),
            custody::store::SCHEMA_VERSION
        );
        assert_eq!(
            postgres::audit_rows(&c).await.unwrap(),
            vec![(
                0,
                1,
                "DERIVE".to_owned(),
                Uuid::parse_str("6ba7b810-9dad-11d1-80b4-00c04fd430c8").unwrap(),
                4
            )]
        );
        let nulls: i64 = c
            .query_one(
                "SELECT count(*) FROM custody_audit_log WHERE rotation_id IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(nulls, 1);
        // A record from before the chain keeps NULL hashes: the unchained prefix.
        let unchained: i64 = c
            .query_one(
                "SELECT count(*) FROM custody_audit_log WHERE hash IS NULL AND prev_hash IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(unchained, 1);
        // The new events are allowed now; migrating again changes nothing.
        c.batch_execute(
            "INSERT INTO custody_audit_log (shard, seq, logged_at, event, asset_id, counter,
                 state_at_event, requester, request_id, rotation_id)
             VALUES (0, 2, now(), 'ROTATE', '6ba7b810-9dad-11d1-80b4-00c04fd430c8', 5, 'ACTIVE', 'op', 1,
                 '0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d')",
        )
        .await
        .unwrap();
        assert_eq!(
            postgres::migrate(&c).await.unwrap(),
            custody::store::SCHEMA_VERSION
        );
        drop(c);
        let _ = a
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    });
}

#[test]
fn postgres_with_synchronous_commit_off_is_refused() {
    run(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let Backend::Postgres {
            config, ownership, ..
        } = &backend
        else {
            unreachable!()
        };
        // A database whose sessions default to synchronous_commit = off.
        let c = postgres::connect(config).await.unwrap();
        c.batch_execute(&format!(
            "ALTER DATABASE {} SET synchronous_commit = off",
            config.dbname
        ))
        .await
        .unwrap();
        let store = PgStore::new(config.clone(), *ownership);
        match store.open_shard(0, 1).load().await {
            Err(StoreError::Unavailable(m)) => {
                assert!(m.contains("synchronous_commit = off"), "{m}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let allowed = PgStore::new(
            PgConfig {
                allow_unsafe_durability: true,
                ..config.clone()
            },
            *ownership,
        );
        allowed.open_shard(0, 1).load().await.unwrap();
        backend.drop_database().await;
    });
}

#[test]
fn postgres_unreachable_fails_fast_and_backs_off() {
    run(async {
        // Nothing listens on port 1: every attempt is refused at once.
        let store = PgStore::new(
            PgConfig {
                hosts: vec![custody::config::PgHost::from_addr(
                    "127.0.0.1:1".parse().unwrap(),
                )],
                dbname: "custody".into(),
                user: "custody".into(),
                password: None,
                allow_unsafe_durability: false,
                owner_lease: Duration::from_secs(10),
                owner_lease_margin: Duration::from_millis(500),
                tls: custody::config::PgTls::disabled(),
                partition_check: Duration::from_secs(3600),
                preferred_host: Default::default(),
            },
            postgres::Ownership {
                instance: Uuid::nil(),
                token: 0,
                lease: Duration::from_secs(10),
            },
        );
        let shard = store.open_shard(0, 1);
        let started = std::time::Instant::now();
        for _ in 0..3 {
            match shard.commit(register(0, 1, asset_on(0, 1, 9))).await {
                Err(StoreError::Unavailable(_)) => {}
                other => panic!("expected STORE_UNAVAILABLE, got {other:?}"),
            }
        }
        assert!(started.elapsed() < Duration::from_millis(500), "fails fast");
        // Within the backoff no new connection is even tried.
        match shard.load().await {
            Err(StoreError::Unavailable(m)) => assert!(m.contains("next attempt"), "{m}"),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn postgres_a_stale_owner_cannot_commit() {
    run(async {
        let Some(backend) = Backend::postgres().await else {
            return;
        };
        let Backend::Postgres {
            config, ownership, ..
        } = &backend
        else {
            unreachable!()
        };
        // The old owner serves shard 0, so its heartbeat keeps the lease alive.
        let old = PgStore::new(config.clone(), *ownership);
        let old_shard = old.open_shard(0, 1);
        old_shard.load().await.unwrap();
        old_shard
            .commit(register(0, 1, asset_on(0, 1, 1)))
            .await
            .unwrap();
        let c = postgres::connect(config).await.unwrap();
        c.execute("UPDATE custody_owner SET lease_ms = 600", &[])
            .await
            .unwrap();
        let heartbeat_every = ownership.lease / 3;
        assert!(
            heartbeat_every > Duration::from_millis(900),
            "the lease below lapses first"
        );
        // A newcomer waits out the holder's lease; the holder's heartbeat is slower than
        // that here, so the lease lapses and the newcomer takes over, as after a pause.
        let new = postgres::acquire_ownership(&c, Uuid::new_v4(), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(new.token > ownership.token);
        // The old owner's next commit is fenced off and writes nothing.
        match old_shard.commit(register(0, 2, asset_on(0, 1, 2))).await {
            Err(StoreError::Fenced { token }) => assert_eq!(token, ownership.token),
            other => panic!("expected fencing, got {other:?}"),
        }
        // While the new owner's lease is live (it just took it), a third is refused.
        let third = postgres::acquire_ownership(&c, Uuid::new_v4(), Duration::from_secs(1));
        c.execute("UPDATE custody_owner SET lease_ms = 300", &[])
            .await
            .unwrap();
        let keep_alive = async {
            for _ in 0..10 {
                glommio::timer::sleep(Duration::from_millis(100)).await;
                let _ = c
                    .execute(
                        "UPDATE custody_owner SET heartbeat_at = now() WHERE token = $1",
                        &[&new.token],
                    )
                    .await;
            }
        };
        let (refused, ()) = futures_lite::future::zip(third, keep_alive).await;
        match refused {
            Err(StoreError::Locked(m)) => {
                assert!(m.contains("owned by another running appliance"), "{m}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let newcomer = PgStore::new(config.clone(), new).open_shard(0, 1);
        assert_eq!(newcomer.load().await.unwrap().last_seq, 1);
        newcomer
            .commit(register(0, 2, asset_on(0, 1, 2)))
            .await
            .unwrap();
        assert_eq!(backend.audit().await.len(), 2);
        backend.drop_database().await;
    });
}
