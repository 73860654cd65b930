//! The durable store: counters, asset states and the audit log, behind one trait.
//!
//! The store is never used for locking or ordering: the shard that owns an asset orders
//! its operations in memory and hands the store whole batches. A batch is one
//! transaction; the shard releases the batch's replies only after [`ShardStore::commit`]
//! returns `Ok` (I1). SQLite ([`sqlite`]) is the embedded default; PostgreSQL implements
//! the same trait.

pub mod handoff;
pub mod pg_tls;
pub mod postgres;
pub mod sqlite;

/// The synchronisation primitives [`handoff`] is written against (loom swaps these).
pub(crate) mod sync {
    pub use std::sync::{Arc, Condvar, Mutex, MutexGuard};
}

use crate::audit::{AuditEvent, AuditRecord};
use crate::lifecycle::AssetState;
use std::future::Future;
use std::pin::Pin;
use uuid::Uuid;

/// Version of the schema this build writes. A store with a newer schema is refused.
pub const SCHEMA_VERSION: u32 = 4;

/// Errors of the store layer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store schema version {found} is newer than this build supports ({supported}); upgrade custody")]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("store holds data this build cannot read: {0}")]
    Corrupt(String),
    #[error("the store's commit queue is full")]
    QueueFull,
    #[error("the store is shut down")]
    Closed,
    #[error("store already in use: {0}")]
    Locked(String),
    #[error("this appliance no longer owns the store (fencing token {token} is stale): another appliance took it over")]
    Fenced { token: i64 },
    #[error("the batch is durable, but this appliance's lease (token {token}) could lapse before its answers left: not acknowledged, the outcome is unknown to the callers")]
    LeaseLapsed { token: i64 },
    #[error("shard {shard}: batch starts at sequence {found}, the log continues at {expected}")]
    SequenceGap {
        shard: u16,
        expected: u64,
        found: u64,
    },
}

/// A change to an asset row, committed in the same transaction as its audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssetWrite {
    pub asset: Uuid,
    pub state: AssetState,
    pub counter: u64,
    /// `true` for a registration (the row must not exist yet).
    pub insert: bool,
}

/// A compliance region switched on or off, committed with its audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionWrite {
    pub region: String,
    pub enabled: bool,
}

/// One shard's batch: its audit records in sequence order and the asset (and region)
/// changes they describe. Committed whole or not at all, and only if its first record
/// continues the shard's committed sequence (a store never writes a gap).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitBatch {
    pub shard: u16,
    pub records: Vec<AuditRecord>,
    pub asset_writes: Vec<AssetWrite>,
    pub region_writes: Vec<RegionWrite>,
    /// The chain: the hash before the first record, then each record's hash (one per
    /// record; empty: the records are stored without hashes, as tools and old tests do).
    pub chain_prev: [u8; 32],
    pub chain: Vec<[u8; 32]>,
    /// The batch's checkpoint (its last record's sequence number and hash, with their
    /// MAC); `None` while the appliance is sealed (no audit key): a later checkpoint
    /// covers these records through the chain.
    pub checkpoint: Option<Checkpoint>,
}

/// A shard's authenticated position in its chain, kept beside its records.
pub use crate::checkpoint::Checkpoint;

/// An asset as the store holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredAsset {
    pub asset: Uuid,
    pub state: AssetState,
    pub counter: u64,
}

/// An asset row as LIST_ASSETS reads it: the stored asset and when its row last changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListedRow {
    pub asset: StoredAsset,
    pub changed_unix_ms: u64,
}

/// A committed rotation, as a shard reloads it to recognise its id when it comes again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecentRotation {
    pub rotation_id: Uuid,
    pub asset: Uuid,
    /// The counter the rotation set.
    pub counter: u64,
    pub seq: u64,
    pub ts_ms: u64,
    /// The ROTATE record's chain hash (all zero for a record stored without one).
    pub hash: [u8; 32],
}

/// Which committed rotations a shard reloads at start-up: those since `since_ms` (Unix
/// milliseconds), at most the `max` most recent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationWindow {
    pub since_ms: u64,
    pub max: usize,
}

impl RotationWindow {
    /// Every rotation, up to 100,000 of the newest (tests and tools).
    pub const ALL: RotationWindow = RotationWindow {
        since_ms: 0,
        max: 100_000,
    };
}

/// What a shard needs at start-up: its assets, where its audit sequence stands, and its
/// recent rotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardSnapshot {
    pub assets: Vec<StoredAsset>,
    /// The highest sequence number committed for this shard (0 if none).
    pub last_seq: u64,
    /// That record's chain hash: where the chain continues ([`crate::audit::GENESIS`]
    /// when the shard has no record, or its last one predates the chain).
    pub last_hash: [u8; 32],
    /// The rotations inside the requested window, oldest first.
    pub rotations: Vec<RecentRotation>,
    /// Every region switch the store holds: (region, enabled).
    pub regions: Vec<(String, bool)>,
}

/// A stored hash column: 32 bytes, or NULL (a record from before the chain).
pub(crate) fn hash_of(hash: Option<Vec<u8>>, shard: u16, seq: u64) -> Result<[u8; 32], StoreError> {
    match hash {
        None => Ok(crate::audit::GENESIS),
        Some(h) => <[u8; 32]>::try_from(h.as_slice()).map_err(|_| {
            StoreError::Corrupt(format!(
                "shard {shard} record {seq}: its hash is {} bytes, not 32",
                h.len()
            ))
        }),
    }
}

/// An audit row as read back (for verification, the CLI and tests).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuditRow {
    pub shard: u16,
    pub seq: u64,
    pub event: AuditEvent,
    pub asset: Uuid,
    pub counter: u64,
    pub state: AssetState,
    pub requester: String,
    pub request_id: u64,
    pub ts_ms: u64,
    pub derivation_path: Option<String>,
    pub purpose: Option<String>,
    pub region: Option<String>,
    pub ttl_s: Option<u32>,
    pub scheme_version: Option<u8>,
    pub rotation_id: Option<Uuid>,
    /// The chain (`None` for a record from before schema v3).
    #[serde(serialize_with = "hex_opt")]
    pub prev_hash: Option<[u8; 32]>,
    #[serde(serialize_with = "hex_opt")]
    pub hash: Option<[u8; 32]>,
}

fn hex_opt<S: serde::Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(b) => s.serialize_some(&b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
        None => s.serialize_none(),
    }
}

/// A stored audit row as a reader got it: its sequence number, and the row or why its
/// columns are not one (a changed row: the reconciler's finding, not a failed run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowRead {
    pub seq: u64,
    pub row: Result<AuditRow, String>,
}

/// A future that stays on the executor that created it.
pub type LocalFuture<T> = Pin<Box<dyn Future<Output = T> + 'static>>;

/// A shard's handle on the store. Lives on the shard's core.
pub trait ShardStore {
    /// Loads the assets this shard owns, its last audit sequence number and its
    /// rotations inside `rotations`.
    fn load_with(
        &self,
        rotations: RotationWindow,
    ) -> LocalFuture<Result<ShardSnapshot, StoreError>>;
    /// [`ShardStore::load_with`] the rotations of [`RotationWindow::ALL`].
    fn load(&self) -> LocalFuture<Result<ShardSnapshot, StoreError>> {
        self.load_with(RotationWindow::ALL)
    }
    /// Commits a batch durably; `Ok` only once the transaction is on disk.
    fn commit(&self, batch: CommitBatch) -> LocalFuture<Result<(), StoreError>>;
}

/// A store the appliance opens once and hands to each shard.
pub trait Store: Send + Sync {
    /// The store's handle for shard `shard` of `shard_count`.
    fn open_shard(&self, shard: u16, shard_count: u16) -> Box<dyn ShardStore>;
    /// A short description for logs and status (never includes a secret).
    fn describe(&self) -> String;
    /// Gives the store up after a clean stop (nothing in flight), so that the next
    /// appliance takes it at once instead of waiting for a lease to lapse. Blocking; at
    /// most `limit`. `true` when something was given up (the embedded store has nothing
    /// to give up).
    fn release(&self, _limit: std::time::Duration) -> Result<bool, StoreError> {
        Ok(false)
    }
}
