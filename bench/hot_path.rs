//! criterion benches of the pure pieces on the derive hot path: the KDF, the codec, the
//! field rules and the shard hash. Kept short for a 2-core machine:
//! `cargo bench --bench hot_path`.

#[path = "../tests/common/records.rs"]
mod records;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use custody::kdf::{DerivationKey, DerivationPath, RootSeed};
use custody::op::{DeriveBody, Derived, Reply, Request};
use custody::policy::FieldRules;
use custody::wire::{self, Receipt};
use records::Records;
use std::time::Duration;
use uuid::Uuid;

fn body() -> DeriveBody {
    DeriveBody {
        asset: Uuid::parse_str("0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d").unwrap(),
        path: "m/44'/60'/0'/0'/12345".into(),
        region: "EU-WEST".into(),
        purpose: 2,
        ttl_s: 300,
    }
}

fn kdf(c: &mut Criterion) {
    let key = DerivationKey::new(&RootSeed::from_bytes([0x42; 32])).expect("locked memory");
    let asset = body().asset;
    let path = DerivationPath::parse(&body().path).unwrap();
    let mut scratch = custody::kdf::Scratch::new().expect("locked memory");
    c.bench_function(
        "kdf/derive in the core's locked scratch (the appliance's path)",
        |b| {
            b.iter(|| {
                key.derive_in(
                    &mut scratch,
                    black_box(&asset),
                    black_box(7),
                    black_box(&path),
                )
            })
        },
    );
    c.bench_function("kdf/derive (stack scratch, wiped)", |b| {
        b.iter(|| key.derive(black_box(&asset), black_box(7), black_box(&path)))
    });
    // The previous way, for the ratio: clone the keyed `Hmac<Sha256>` onto the stack.
    {
        use hmac::{Hmac, Mac};
        let keyed = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&[0x42; 32]).unwrap();
        c.bench_function("kdf/derive by cloning a keyed Hmac (before)", |b| {
            b.iter(|| {
                let mut mac = keyed.clone();
                mac.update(&[0, 0, 0, 1]);
                mac.update(custody::kdf::LABEL_V1);
                mac.update(&[0]);
                mac.update(&custody::kdf::context_v1(
                    black_box(&asset),
                    black_box(7),
                    black_box(&path),
                ));
                mac.update(&[0, 0, 1, 0]);
                mac.finalize().into_bytes()
            })
        });
    }
    c.bench_function("kdf/key the HMAC (per seed, not per request)", |b| {
        let seed = RootSeed::from_bytes([0x42; 32]);
        b.iter(|| DerivationKey::new(black_box(&seed)))
    });
}

fn codec(c: &mut Criterion) {
    let mut frame = Vec::new();
    Request::Derive(body()).encode(99, &mut frame);
    c.bench_function("wire/decode derive request", |b| {
        b.iter(|| {
            let f = wire::decode_frame(black_box(&frame), 16_384)
                .unwrap()
                .unwrap();
            Request::decode(f.header.opcode, f.body).unwrap()
        })
    });
    let reply = Reply::Derived(Derived {
        counter: 3,
        scheme_version: 1,
        key: zeroize::Zeroizing::new([0x5a; 32]),
        receipt: Receipt {
            shard: 1,
            seq: 1 << 40,
            hash: [0x11; 32],
        },
    });
    let mut out = Vec::with_capacity(256);
    c.bench_function("wire/encode derive reply", |b| {
        b.iter(|| {
            out.clear();
            black_box(&reply).encode(wire::Opcode::Derive as u8, 99, &mut out);
        })
    });
}

fn gate(c: &mut Criterion) {
    let regions: Vec<String> = vec!["US-EAST".into(), "EU-WEST".into(), "APAC".into()];
    let rules = FieldRules::with_switch(std::sync::Arc::new(custody::regions::RegionSwitch::new(
        &regions,
    )));
    let table = custody::policy::RegionTable::in_order(&regions);
    let b0 = body();
    c.bench_function("op/derive check (field rules)", |b| {
        b.iter(|| black_box(&b0).check(rules.switch(), &table).unwrap())
    });
    // The role check of a deriver among 1,000 identities.
    // Each deriver is limited to one of 64 asset groups of 1,000 assets each.
    use custody::policy::{
        AccessPolicy, AssetGroups, DeriverGrant, Grants, Need, Purpose, RateLimit,
    };
    let limit = RateLimit::parse("100/60s").unwrap();
    let grants = (0..1000)
        .map(|i| {
            (
                format!("svc-{i}"),
                Grants {
                    deriver: Some(DeriverGrant {
                        purposes: vec![Purpose::Trading, Purpose::Settlement],
                        regions: vec!["US-EAST".into(), "EU-WEST".into()],
                        asset_groups: Some((vec![format!("desk-{}", i % 64)], 1u64 << (i % 64))),
                    }),
                    ..Grants::default()
                },
            )
        })
        .collect();
    let id = |g: u64, a: u64| {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&g.to_be_bytes());
        b[8..].copy_from_slice(&a.to_be_bytes());
        uuid::Builder::from_random_bytes(b).into_uuid()
    };
    let groups = AssetGroups::new(
        (0..64u64)
            .map(|g| {
                let members = (0..1000u64).map(|a| id(g, a)).collect();
                (format!("desk-{g}"), members)
            })
            .collect(),
    );
    // svc-517 is in desk-5 (517 % 64); its asset is the 7th of desk-5.
    let grouped = id(5, 7);
    let access = AccessPolicy::new(grants, [limit; 4]).with_asset_groups(groups);
    c.bench_function("policy/authorize derive (1,000 identities)", |b| {
        b.iter(|| {
            access
                .authorize(
                    black_box("svc-517"),
                    Need::Derive {
                        asset: &grouped,
                        purpose: Purpose::Settlement,
                        region: "EU-WEST",
                    },
                )
                .unwrap()
        })
    });
    // GCRA on a live bucket among 10,000 (requester, asset) buckets.
    let mut limiter = custody::ratelimit::RateLimiter::new(100_000);
    let who: std::sync::Arc<str> = std::sync::Arc::from("svc-517");
    let generous = RateLimit::parse("1000000000/1s").unwrap();
    for n in 0..10_000u128 {
        limiter
            .check(&who, Uuid::from_u128(n), 0, generous, 0)
            .unwrap();
    }
    let mut now = 0u64;
    c.bench_function("ratelimit/check (10,000 buckets)", |b| {
        b.iter(|| {
            now += 1_000;
            limiter.check(&who, black_box(Uuid::from_u128(4242)), 0, generous, now)
        })
    });
    c.bench_function("placement/shard_of (2 shards)", |b| {
        b.iter(|| custody::placement::shard_of(black_box(&b0.asset), 2))
    });
}

/// The audit chain: one record's canonical encoding and SHA-256 (per record, in the shard
/// as it seals a batch) and one checkpoint MAC (per batch).
fn audit(c: &mut Criterion) {
    use custody::audit::{chain_hash, AuditRecord, GENESIS};
    let asset = uuid::Uuid::from_u128(0x0b9f_3c5e_8d1a_4f6b_9c2d_3e4f_5a6b_7c8d);
    let record = AuditRecord {
        counter: 3,
        request_id: 99,
        ts_ms: 1_795_000_000_000,
        ..Records::new("trading-svc", "m/44'/0'/0'/0'/7").derive(1, 1 << 30, asset)
    };
    let mut scratch = Vec::with_capacity(256);
    c.bench_function("audit/chain_hash (a DERIVE record)", |b| {
        b.iter(|| chain_hash(black_box(&record), &GENESIS, &mut scratch))
    });
    let key =
        custody::kdf::DerivationKey::new(&custody::kdf::RootSeed::from_bytes([7; 32])).unwrap();
    c.bench_function("audit/checkpoint_mac", |b| {
        b.iter(|| key.checkpoint_mac(1, black_box(1 << 30), &GENESIS))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = kdf, codec, gate, audit
}
criterion_main!(benches);
