//! Audit records and commit batches built the same way by the benchmarks and the tests.
//!
//! The benchmarks (`bench/pg_commit.rs`, `bench/reconcile_scale.rs`, `bench/hot_path.rs`)
//! are crates of their own and cannot import this folder, so they include the file itself
//! (`#[path = "../tests/common/records.rs"] mod records;`); it depends on nothing but the
//! `custody` library and std. The tests reach it as `common::records`.
//!
//! Every record is an accepted operation on an active asset at counter 0, with the request
//! id equal to its sequence number and the current wall-clock time; a caller that needs
//! another field sets it with struct update syntax (`AuditRecord { counter: 3, ..r }`).

// Each crate that includes the file uses a part of it.
#![allow(dead_code)]

use custody::audit::{AuditEvent, AuditRecord, DeriveDetail};
use custody::kdf::DerivationPath;
use custody::lifecycle::AssetState;
use custody::policy::Purpose;
use custody::store::{AssetWrite, CommitBatch};
use std::ops::RangeInclusive;
use std::sync::Arc;
use uuid::Uuid;

/// Builds records asked for by one requester, its derivations all of one path.
pub struct Records {
    requester: Arc<str>,
    path: DerivationPath,
}

impl Records {
    /// Records of `requester`; `path` (a fixture's constant) is the derivations' path.
    pub fn new(requester: &str, path: &str) -> Records {
        Records {
            requester: Arc::from(requester),
            path: DerivationPath::parse(path).expect("a fixture's derivation path"),
        }
    }

    /// A DERIVE record of `asset` (purpose TRADING in US-EAST, TTL 300 s, scheme 1).
    pub fn derive(&self, shard: u16, seq: u64, asset: Uuid) -> AuditRecord {
        AuditRecord {
            shard,
            seq,
            event: AuditEvent::Derive,
            asset,
            counter: 0,
            state: AssetState::Active,
            requester: self.requester.clone(),
            request_id: seq,
            ts_ms: custody::audit::now_ms(),
            derive: Some(DeriveDetail {
                path: self.path,
                purpose: Purpose::Trading,
                region: Arc::from("US-EAST"),
                ttl_s: 300,
                scheme_version: 1,
            }),
            rotation_id: None,
            switched_region: None,
        }
    }

    /// The REGISTER record of `asset`.
    pub fn register(&self, shard: u16, seq: u64, asset: Uuid) -> AuditRecord {
        AuditRecord {
            event: AuditEvent::Register,
            derive: None,
            ..self.derive(shard, seq, asset)
        }
    }

    /// A batch that registers `asset`: its record at `seq` and the new asset row.
    pub fn register_batch(&self, shard: u16, seq: u64, asset: Uuid) -> CommitBatch {
        CommitBatch {
            shard,
            records: vec![self.register(shard, seq, asset)],
            asset_writes: vec![registration(asset)],
            ..Default::default()
        }
    }

    /// A batch of derivations of `asset`, one record per sequence number in `seqs`
    /// (no asset row changes: a derivation leaves the counter where it is).
    pub fn derive_batch(&self, shard: u16, seqs: RangeInclusive<u64>, asset: Uuid) -> CommitBatch {
        CommitBatch {
            shard,
            records: seqs.map(|seq| self.derive(shard, seq, asset)).collect(),
            ..Default::default()
        }
    }
}

/// The asset row a registration inserts: active, at counter 0.
pub fn registration(asset: Uuid) -> AssetWrite {
    AssetWrite {
        asset,
        state: AssetState::Active,
        counter: 0,
        insert: true,
    }
}
