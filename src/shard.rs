//! A shard: the registry of the assets one core owns, the derive path, and group commit.
//!
//! A shard lives on one executor and is `!Send`; it alone reads and writes its assets, so
//! the order in which its core runs operations is the order they happen in. Each accepted
//! operation gets its audit record appended to the shard's pending queue; the shard's
//! committer task seals up to `commit_batch_records_max` of them into a [`CommitBatch`]
//! (after waiting at most `commit_batch_delay_us` for more), numbers them with the shard's
//! sequence, and releases their replies only when the store says the batch is durable
//! (I1). Up to `commit_batches_inflight_max` batches are in flight; the store refuses a
//! batch that does not continue the shard's committed sequence, so after a failure the
//! shard waits until every batch in flight has been heard from and numbers again from the
//! last durable record: the log never has a gap. No accepted request waits longer than
//! `commit_timeout_ms` for an answer, whether its batch is sealed or not.

use crate::audit::{now_ms, AuditEvent, AuditRecord, DeriveDetail};
use crate::kdf::SCHEME_V1;
use crate::lifecycle::{self, AssetState, Transition};
use crate::policy::CheckedDerive;
use crate::signal::LocalSignal;
use crate::store::{
    AssetWrite, CommitBatch, RecentRotation, ShardSnapshot, ShardStore, StoreError,
};
use crate::wire::{AssetInfo, Receipt, Refusal, Rotated, Status};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

/// What a shard answers. A derivation's key is not part of it: the connection's core
/// derives the key from the durable counter once the reply arrives, so a key exists only
/// after its audit record is durable, and never crosses cores or waits in a queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardReply {
    Asset(AssetInfo),
    Derived {
        counter: u64,
        receipt: Receipt,
    },
    Rotated(Rotated),
    /// After SET_REGION: the region's slot in the switch and its new state (in force on
    /// every core before this reply was sent).
    RegionSet {
        slot: usize,
        enabled: bool,
    },
}

/// Who asks, and within which rate limit: the owning shard keeps a GCRA bucket per
/// (requester, asset).
#[derive(Clone, Debug)]
pub struct RateCheck {
    pub requester: Arc<str>,
    /// The role the request is allowed under: its own bucket.
    pub role: crate::policy::Role,
    pub limit: crate::ratelimit::RateLimit,
}

/// The largest counter an asset may reach: the stores keep it as a signed 64-bit integer.
pub const COUNTER_MAX: u64 = i64::MAX as u64;

/// SUSPEND, RESUME and RETIRE: the lifecycle operations other than rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleOp {
    Suspend,
    Resume,
    Retire,
}

impl LifecycleOp {
    fn transition(self) -> Transition {
        match self {
            LifecycleOp::Suspend => Transition::Suspend,
            LifecycleOp::Resume => Transition::Resume,
            LifecycleOp::Retire => Transition::Retire,
        }
    }

    fn event(self) -> AuditEvent {
        match self {
            LifecycleOp::Suspend => AuditEvent::Suspend,
            LifecycleOp::Resume => AuditEvent::Resume,
            LifecycleOp::Retire => AuditEvent::Retire,
        }
    }

    pub fn name(self) -> &'static str {
        self.event().name()
    }
}

/// The answer to an operation.
pub type OpResult = Result<ShardReply, Refusal>;

/// An operation addressed to the shard that owns its asset. `Send`: it may cross cores.
#[derive(Debug)]
pub enum ShardOp {
    Register {
        asset: Uuid,
        requester: Arc<str>,
        request_id: u64,
    },
    Derive {
        request: CheckedDerive,
        requester: Arc<str>,
        request_id: u64,
    },
    Status {
        asset: Uuid,
    },
    Rotate {
        asset: Uuid,
        rotation_id: Uuid,
        expected_counter: Option<u64>,
        requester: Arc<str>,
        request_id: u64,
    },
    Lifecycle {
        asset: Uuid,
        op: LifecycleOp,
        requester: Arc<str>,
        request_id: u64,
    },
    /// Switch a configured region (its slot in the region switch) on or off. Shard 0
    /// commits every switch.
    SetRegion {
        index: usize,
        enabled: bool,
        requester: Arc<str>,
        request_id: u64,
    },
}

/// The asset of operations that have none (a region switch): the nil UUID.
const NO_ASSET: Uuid = Uuid::nil();

impl ShardOp {
    pub fn asset(&self) -> &Uuid {
        match self {
            ShardOp::Register { asset, .. }
            | ShardOp::Status { asset }
            | ShardOp::Rotate { asset, .. }
            | ShardOp::Lifecycle { asset, .. } => asset,
            ShardOp::Derive { request, .. } => &request.asset,
            ShardOp::SetRegion { .. } => &NO_ASSET,
        }
    }

    /// The shard that runs this operation: the asset's owner, or shard 0 for a region
    /// switch.
    pub fn owner(&self, shard_count: u16) -> u16 {
        match self {
            ShardOp::SetRegion { .. } => 0,
            _ => crate::placement::shard_of(self.asset(), shard_count),
        }
    }
}

/// The shard's bounds, from the resolved configuration.
#[derive(Clone, Debug)]
pub struct ShardLimits {
    pub commit_batch_records_max: usize,
    pub commit_batch_delay: Duration,
    pub commit_batches_inflight_max: usize,
    pub commit_timeout: Duration,
    pub pending_max: usize,
    pub assets_max: usize,
    /// How long a committed rotation's id is remembered (a repeat answers the first result).
    pub rotation_id_retention: Duration,
    /// Most rotation ids remembered (oldest forgotten first).
    pub rotation_ids_max: usize,
    /// Most rate-limit buckets kept.
    pub rate_limit_buckets: usize,
}

/// A lifecycle operation accepted but not yet settled: what the asset looks like while
/// it is in flight, and once it is durable.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    /// Orders the shard's lifecycle operations (acceptance order = sequence order).
    token: u64,
    /// The state shown while in flight (ROTATING for a rotation).
    visible: AssetState,
    /// The state once durable.
    then: AssetState,
    counter: u64,
}

#[derive(Debug)]
struct AssetEntry {
    /// What the store holds.
    durable_state: AssetState,
    durable_counter: u64,
    /// Lifecycle operations accepted on top of it, oldest first. The asset's state and
    /// counter, as every new request sees them, are those of the last one.
    in_flight: VecDeque<InFlight>,
    /// `false` while the registration's commit is in flight: the asset does not exist yet
    /// for anyone but a second registration, which is refused.
    durable: bool,
}

impl AssetEntry {
    fn new(state: AssetState, counter: u64, durable: bool) -> AssetEntry {
        AssetEntry {
            durable_state: state,
            durable_counter: counter,
            in_flight: VecDeque::new(),
            durable,
        }
    }

    /// The state new requests see.
    fn state(&self) -> AssetState {
        self.in_flight
            .back()
            .map_or(self.durable_state, |f| f.visible)
    }

    /// The counter new derivations use (a rotation in flight: its new counter, since
    /// such a derivation is committed only after the rotation is).
    fn counter(&self) -> u64 {
        self.in_flight
            .back()
            .map_or(self.durable_counter, |f| f.counter)
    }
}

/// What an accepted operation answers once its record is durable.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    Registered,
    Derived,
    Rotated {
        rotation_id: Uuid,
        previous: u64,
        token: u64,
    },
    Transitioned {
        state: AssetState,
        token: u64,
    },
    RegionSet {
        index: usize,
        enabled: bool,
    },
}

/// A rotation the shard remembers by id.
#[derive(Clone, Copy, Debug)]
struct RotationMemo {
    asset: Uuid,
    counter: u64,
    /// The rotation's record (sequence number and chain hash); `None` while its commit
    /// is in flight.
    seq: Option<(u64, [u8; 32])>,
    ts_ms: u64,
}

/// Rotation ids of this shard's assets, for `rotation_id_retention`, at most
/// `rotation_ids_max` of them.
#[derive(Default)]
struct RotationIndex {
    by_id: HashMap<Uuid, RotationMemo>,
    /// Committed ids, oldest first, for eviction.
    order: VecDeque<(u64, Uuid)>,
}

impl RotationIndex {
    fn confirm(&mut self, id: Uuid, seq: u64, hash: [u8; 32], limits: &ShardLimits) {
        let Some(m) = self.by_id.get_mut(&id) else {
            return;
        };
        m.seq = Some((seq, hash));
        self.order.push_back((m.ts_ms, id));
        self.evict(limits);
    }

    fn load(&mut self, r: &RecentRotation, limits: &ShardLimits) {
        self.by_id.insert(
            r.rotation_id,
            RotationMemo {
                asset: r.asset,
                counter: r.counter,
                seq: Some((r.seq, r.hash)),
                ts_ms: r.ts_ms,
            },
        );
        self.order.push_back((r.ts_ms, r.rotation_id));
        self.evict(limits);
    }

    fn evict(&mut self, limits: &ShardLimits) {
        let oldest_kept = now_ms().saturating_sub(limits.rotation_id_retention.as_millis() as u64);
        while let Some(&(ts, id)) = self.order.front() {
            if self.order.len() <= limits.rotation_ids_max && ts >= oldest_kept {
                break;
            }
            self.order.pop_front();
            self.by_id.remove(&id);
        }
    }
}

/// Lifecycle transitions committed by this shard, by (from, to), since last taken.
pub type TransitionCounts = HashMap<(AssetState, AssetState), u64>;

/// An accepted operation waiting for its batch.
struct PendingOp {
    accepted_at: Instant,
    record: AuditRecord,
    write: Option<AssetWrite>,
    region_write: Option<crate::store::RegionWrite>,
    outcome: Outcome,
    reply: oneshot::Sender<OpResult>,
}

/// An operation whose record is in a sealed batch.
struct Waiter {
    seq: u64,
    /// The record's chain hash.
    hash: [u8; 32],
    asset: Uuid,
    counter: u64,
    outcome: Outcome,
    reply: oneshot::Sender<OpResult>,
}

struct ShardState {
    assets: HashMap<Uuid, AssetEntry>,
    /// The number the next sealed record gets.
    next_seq: u64,
    /// One past the highest number the store has confirmed durable.
    durable_next: u64,
    /// The chain hash of record `next_seq - 1` (sealed) and of `durable_next - 1`
    /// (durable): numbering and chaining restart together after a failed batch.
    head: [u8; 32],
    durable_head: [u8; 32],
    /// A batch failed: once no batch is in flight, numbering restarts at `durable_next`.
    resync: bool,
    /// The store's log is ahead of what this shard believes is durable (a commit that was
    /// reported failed had in fact landed): re-read the shard from the store before
    /// anything more is accepted.
    reload: bool,
    pending: VecDeque<PendingOp>,
    inflight_batches: usize,
    rotations: RotationIndex,
    /// The next lifecycle operation's token.
    next_token: u64,
    transitions: TransitionCounts,
}

/// One core's shard.
pub struct Shard {
    id: u16,
    limits: ShardLimits,
    store: Box<dyn ShardStore>,
    state: RefCell<ShardState>,
    kick: LocalSignal,
    commit_stats: RefCell<CommitStats>,
    /// Cumulative figures for the metrics (the core publishes them).
    figures: RefCell<crate::metrics::ShardFigures>,
    /// Authenticates each batch's checkpoint (`None`: batches go without one).
    signer: Option<Box<dyn crate::checkpoint::Signer>>,
    /// Reused for the canonical encoding of each record as it is chained.
    encode_scratch: RefCell<Vec<u8>>,
    limiter: RefCell<crate::ratelimit::RateLimiter>,
    /// The regions' switch every core reads; this shard sets it after a durable switch.
    regions: Arc<crate::regions::RegionSwitch>,
    /// The limiter's clock starts with the shard.
    started: Instant,
    rate_limited: std::cell::Cell<u64>,
}

/// Group-commit figures of one shard since they were last taken: batch sizes and commit
/// latencies (from sealing the batch to the store's answer). Owned by the shard's core;
/// nothing else touches it until it is taken.
pub struct CommitStats {
    batch_records: hdrhistogram::Histogram<u64>,
    commit_us: hdrhistogram::Histogram<u64>,
    records: u64,
    failed: u64,
}

impl Default for CommitStats {
    fn default() -> CommitStats {
        CommitStats {
            batch_records: hdrhistogram::Histogram::new_with_bounds(
                1,
                u64::from(crate::bounds::COMMIT_BATCH_RECORDS_CAP).max(2),
                2,
            )
            .expect("valid histogram bounds"),
            commit_us: hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 2)
                .expect("valid histogram bounds"),
            records: 0,
            failed: 0,
        }
    }
}

impl CommitStats {
    fn record(&mut self, records: usize, took: Duration, committed: bool) {
        if committed {
            self.records += records as u64;
            self.batch_records.saturating_record(records as u64);
            self.commit_us
                .saturating_record((took.as_micros() as u64).max(1));
        } else {
            self.failed += 1;
        }
    }

    /// Committed batches.
    pub fn batches(&self) -> u64 {
        self.batch_records.len()
    }

    /// Audit records in committed batches.
    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn failed(&self) -> u64 {
        self.failed
    }

    pub fn batch_records(&self) -> &hdrhistogram::Histogram<u64> {
        &self.batch_records
    }

    pub fn commit_us(&self) -> &hdrhistogram::Histogram<u64> {
        &self.commit_us
    }
}

enum Accepted {
    Now(ShardReply),
    AfterCommit(oneshot::Receiver<OpResult>),
}

impl Shard {
    pub fn new(
        id: u16,
        snapshot: ShardSnapshot,
        limits: ShardLimits,
        store: Box<dyn ShardStore>,
        regions: Arc<crate::regions::RegionSwitch>,
    ) -> Shard {
        for lost in regions.load_once(&snapshot.regions) {
            tracing::warn!(region = %lost, "the store has a switch for a region the region switch has no slot left for; ignored (a reload that configures it is refused: no slot)");
        }
        let assets = snapshot
            .assets
            .into_iter()
            .map(|a| (a.asset, AssetEntry::new(a.state, a.counter, true)))
            .collect();
        let buckets = limits.rate_limit_buckets;
        let mut rotations = RotationIndex::default();
        for r in &snapshot.rotations {
            rotations.load(r, &limits);
        }
        Shard {
            id,
            state: RefCell::new(ShardState {
                assets,
                next_seq: snapshot.last_seq + 1,
                durable_next: snapshot.last_seq + 1,
                head: snapshot.last_hash,
                durable_head: snapshot.last_hash,
                resync: false,
                reload: false,
                pending: VecDeque::with_capacity(limits.pending_max.min(4096)),
                inflight_batches: 0,
                rotations,
                next_token: 1,
                transitions: TransitionCounts::new(),
            }),
            limits,
            store,
            kick: LocalSignal::new(),
            commit_stats: RefCell::new(CommitStats::default()),
            figures: RefCell::new(crate::metrics::ShardFigures::default()),
            signer: None,
            encode_scratch: RefCell::new(Vec::with_capacity(256)),
            limiter: RefCell::new(crate::ratelimit::RateLimiter::new(buckets)),
            regions,
            started: Instant::now(),
            rate_limited: std::cell::Cell::new(0),
        }
    }

    /// Authenticates each batch's checkpoint with `signer` (the appliance's: the core's
    /// view of the seed cache).
    pub fn with_signer(mut self, signer: Box<dyn crate::checkpoint::Signer>) -> Shard {
        self.signer = Some(signer);
        self
    }

    /// The commit figures since the last call, which starts new ones.
    pub fn take_commit_stats(&self) -> CommitStats {
        std::mem::take(&mut *self.commit_stats.borrow_mut())
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    /// The lifecycle transitions committed since the last call (for metrics).
    pub fn take_transition_counts(&self) -> TransitionCounts {
        std::mem::take(&mut self.state.borrow_mut().transitions)
    }

    /// The shard's cumulative figures for the metrics, brought up to date.
    pub fn figures(&self) -> std::cell::Ref<'_, crate::metrics::ShardFigures> {
        let transitions = self.take_transition_counts();
        {
            let mut f = self.figures.borrow_mut();
            for (k, v) in transitions {
                *f.transitions.entry(k).or_default() += v;
            }
            f.rate_limited = self.rate_limited.get();
            let st = self.state.borrow();
            f.assets = st.assets.len() as u64;
            f.audit_head_seq = st.durable_next.saturating_sub(1);
        }
        self.figures.borrow()
    }

    pub fn asset_count(&self) -> usize {
        self.state.borrow().assets.len()
    }

    /// Requests refused by the rate limit so far (for metrics).
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.get()
    }

    /// [`Shard::execute`] after the (requester, asset) rate limit, if any.
    pub async fn execute_limited(&self, op: ShardOp, rate: Option<RateCheck>) -> OpResult {
        // Buckets only for assets that exist (and registrations, which operators make and
        // `limits.max_assets_per_shard` bounds): random asset ids cannot fill the table.
        let counted = match &op {
            ShardOp::Register { .. } | ShardOp::SetRegion { .. } => true,
            other => self
                .state
                .borrow()
                .assets
                .get(other.asset())
                .is_some_and(|e| e.durable),
        };
        if let Some(rc) = rate.filter(|_| counted) {
            let now_ns = self.started.elapsed().as_nanos() as u64;
            let checked = self.limiter.borrow_mut().check(
                &rc.requester,
                *op.asset(),
                rc.role as u8,
                rc.limit,
                now_ns,
            );
            if let Err(limited) = checked {
                self.rate_limited.set(self.rate_limited.get() + 1);
                let (retry_after, message) = match limited {
                    crate::ratelimit::Limited::Rate { retry_after } => (
                        retry_after,
                        format!(
                            "{:?} is over its rate limit of {} on asset {}",
                            &*rc.requester,
                            rc.limit,
                            op.asset()
                        ),
                    ),
                    crate::ratelimit::Limited::Full { retry_after } => (
                        retry_after,
                        format!(
                            "shard {} keeps its limit of rate-limit buckets (limits.rate_limit_buckets_per_shard), all busy",
                            self.id
                        ),
                    ),
                };
                let mut refusal = Refusal::new(Status::RateLimited, message);
                refusal.retry_after_ms =
                    u32::try_from(retry_after.as_nanos().div_ceil(1_000_000)).unwrap_or(u32::MAX);
                return Err(refusal);
            }
        }
        self.execute(op).await
    }

    /// Runs an operation: refused at once, answered at once (status), or answered once
    /// its audit record is durable.
    pub async fn execute(&self, op: ShardOp) -> OpResult {
        match self.accept(op)? {
            Accepted::Now(reply) => Ok(reply),
            Accepted::AfterCommit(rx) => rx.await.unwrap_or_else(|_| {
                Err(Refusal::new(
                    Status::Internal,
                    "the shard dropped the request before its commit completed",
                ))
            }),
        }
    }

    fn accept(&self, op: ShardOp) -> Result<Accepted, Refusal> {
        let mut st = self.state.borrow_mut();
        if st.reload {
            let mut refusal = Refusal::new(
                Status::StoreUnavailable,
                format!(
                    "shard {} is re-reading its state from the store; retry",
                    self.id
                ),
            );
            refusal.retry_after_ms = 10;
            return Err(refusal);
        }
        match op {
            ShardOp::Status { asset } => {
                let entry = durable_entry(&st.assets, &asset)?;
                // What the store holds; a rotation in flight shows as ROTATING until it is
                // durable (other transitions in flight are not reported before they are).
                let rotating = entry
                    .in_flight
                    .iter()
                    .any(|f| f.visible == AssetState::Rotating);
                Ok(Accepted::Now(ShardReply::Asset(AssetInfo {
                    asset,
                    state: if rotating {
                        AssetState::Rotating
                    } else {
                        entry.durable_state
                    },
                    counter: entry.durable_counter,
                    shard: self.id,
                })))
            }
            ShardOp::Rotate {
                asset,
                rotation_id,
                expected_counter,
                requester,
                request_id,
            } => self.accept_rotation(
                &mut st,
                asset,
                rotation_id,
                expected_counter,
                requester,
                request_id,
            ),
            ShardOp::Lifecycle {
                asset,
                op,
                requester,
                request_id,
            } => self.accept_lifecycle(&mut st, asset, op, requester, request_id),
            ShardOp::SetRegion {
                index,
                enabled,
                requester,
                request_id,
            } => {
                let Some(name) = self.regions.name(index) else {
                    return Err(Refusal::new(
                        Status::InvalidRegion,
                        format!("no region in slot {index} of the region switch"),
                    ));
                };
                self.check_room(&st)?;
                let record = AuditRecord {
                    shard: self.id,
                    seq: 0,
                    event: if enabled {
                        AuditEvent::RegionEnable
                    } else {
                        AuditEvent::RegionDisable
                    },
                    asset: NO_ASSET,
                    counter: 0,
                    state: AssetState::Active,
                    requester,
                    request_id,
                    ts_ms: now_ms(),
                    derive: None,
                    rotation_id: None,
                    switched_region: Some(name.clone()),
                };
                let (reply, rx) = oneshot::channel();
                st.pending.push_back(PendingOp {
                    accepted_at: Instant::now(),
                    record,
                    write: None,
                    region_write: Some(crate::store::RegionWrite {
                        region: name.to_string(),
                        enabled,
                    }),
                    outcome: Outcome::RegionSet { index, enabled },
                    reply,
                });
                self.kick.notify();
                Ok(Accepted::AfterCommit(rx))
            }
            ShardOp::Register {
                asset,
                requester,
                request_id,
            } => {
                if st.assets.contains_key(&asset) {
                    return Err(Refusal::new(
                        Status::AssetExists,
                        format!("asset {asset} is already registered"),
                    ));
                }
                if st.assets.len() >= self.limits.assets_max {
                    return Err(Refusal::new(
                        Status::Busy,
                        format!(
                            "shard {} holds its limit of {} assets (limits.max_assets_per_shard)",
                            self.id, self.limits.assets_max
                        ),
                    ));
                }
                self.check_room(&st)?;
                st.assets
                    .insert(asset, AssetEntry::new(AssetState::Active, 0, false));
                let record = AuditRecord {
                    shard: self.id,
                    seq: 0,
                    event: AuditEvent::Register,
                    asset,
                    counter: 0,
                    state: AssetState::Active,
                    requester,
                    request_id,
                    ts_ms: now_ms(),
                    derive: None,
                    rotation_id: None,
                    switched_region: None,
                };
                let write = AssetWrite {
                    asset,
                    state: AssetState::Active,
                    counter: 0,
                    insert: true,
                };
                Ok(self.enqueue(&mut st, record, Some(write), Outcome::Registered))
            }
            ShardOp::Derive {
                request,
                requester,
                request_id,
            } => {
                let entry = durable_entry(&st.assets, &request.asset)?;
                let (state, counter) = (entry.state(), entry.counter());
                match state {
                    s if s.allows_derive() => {}
                    AssetState::Suspended => {
                        return Err(Refusal::new(
                            Status::AssetSuspended,
                            format!("asset {} is suspended", request.asset),
                        ))
                    }
                    _ => {
                        return Err(Refusal::new(
                            Status::AssetRetired,
                            format!("asset {} is retired", request.asset),
                        ))
                    }
                }
                self.check_room(&st)?;
                let record = AuditRecord {
                    shard: self.id,
                    seq: 0,
                    event: AuditEvent::Derive,
                    asset: request.asset,
                    counter,
                    state,
                    requester,
                    request_id,
                    ts_ms: now_ms(),
                    derive: Some(DeriveDetail {
                        path: request.path,
                        purpose: request.purpose,
                        region: request.region,
                        ttl_s: request.ttl_s,
                        scheme_version: SCHEME_V1,
                    }),
                    rotation_id: None,
                    switched_region: None,
                };
                Ok(self.enqueue(&mut st, record, None, Outcome::Derived))
            }
        }
    }

    /// ROTATE: the counter moves forward by one once the rotation's record is durable.
    /// Derivations accepted meanwhile use the new counter (they commit after it), and the
    /// asset shows ROTATING. The same rotation id again answers the first result.
    fn accept_rotation(
        &self,
        st: &mut ShardState,
        asset: Uuid,
        rotation_id: Uuid,
        expected_counter: Option<u64>,
        requester: Arc<str>,
        request_id: u64,
    ) -> Result<Accepted, Refusal> {
        if let Some(m) = st.rotations.by_id.get(&rotation_id) {
            if m.asset != asset {
                return Err(Refusal::new(
                    Status::RotationIdReused,
                    format!(
                        "rotation id {rotation_id} was already used for asset {}; use a new id for each rotation",
                        m.asset
                    ),
                ));
            }
            return match m.seq {
                Some((seq, hash)) => Ok(Accepted::Now(ShardReply::Rotated(Rotated {
                    asset,
                    rotation_id,
                    counter: m.counter,
                    previous_counter: m.counter.saturating_sub(1),
                    receipt: Receipt {
                        shard: self.id,
                        seq,
                        hash,
                    },
                    replayed: true,
                }))),
                None => {
                    let mut refusal = Refusal::new(
                        Status::Busy,
                        format!("rotation {rotation_id} is being committed; ask again"),
                    );
                    refusal.retry_after_ms = 1;
                    Err(refusal)
                }
            };
        }
        self.check_room(st)?;
        let token = st.next_token;
        let entry = durable_entry_mut(&mut st.assets, &asset)?;
        match entry.state() {
            AssetState::Active => {}
            AssetState::Rotating => {
                let mut refusal = Refusal::new(
                    Status::Busy,
                    format!(
                        "a rotation of asset {asset} is being committed; rotate again once it is"
                    ),
                );
                refusal.retry_after_ms = 1;
                return Err(refusal);
            }
            AssetState::Suspended => {
                return Err(Refusal::new(
                    Status::AssetSuspended,
                    format!("asset {asset} is suspended: resume it before rotating it"),
                ))
            }
            AssetState::Retired => return Err(retired(&asset)),
        }
        let previous = entry.counter();
        if let Some(expected) = expected_counter {
            if expected != previous {
                return Err(Refusal::new(
                    Status::CounterMismatch,
                    format!(
                        "asset {asset} is at counter {previous}, not the expected {expected}; nothing changed"
                    ),
                ));
            }
        }
        if previous >= COUNTER_MAX {
            return Err(Refusal::new(
                Status::CounterExhausted,
                format!(
                    "asset {asset} is at the largest counter ({COUNTER_MAX}); it cannot rotate"
                ),
            ));
        }
        let counter = previous + 1;
        entry.in_flight.push_back(InFlight {
            token,
            visible: AssetState::Rotating,
            then: AssetState::Active,
            counter,
        });
        st.next_token += 1;
        let ts_ms = now_ms();
        st.rotations.by_id.insert(
            rotation_id,
            RotationMemo {
                asset,
                counter,
                seq: None,
                ts_ms,
            },
        );
        let record = AuditRecord {
            shard: self.id,
            seq: 0,
            event: AuditEvent::Rotate,
            asset,
            counter,
            state: AssetState::Active,
            requester,
            request_id,
            ts_ms,
            derive: None,
            rotation_id: Some(rotation_id),
            switched_region: None,
        };
        let write = AssetWrite {
            asset,
            state: AssetState::Active,
            counter,
            insert: false,
        };
        let outcome = Outcome::Rotated {
            rotation_id,
            previous,
            token,
        };
        Ok(self.enqueue(st, record, Some(write), outcome))
    }

    /// SUSPEND, RESUME, RETIRE: the new state applies to requests from now on; if its
    /// commit fails, the asset goes back to what the store holds.
    fn accept_lifecycle(
        &self,
        st: &mut ShardState,
        asset: Uuid,
        op: LifecycleOp,
        requester: Arc<str>,
        request_id: u64,
    ) -> Result<Accepted, Refusal> {
        self.check_room(st)?;
        let token = st.next_token;
        let entry = durable_entry_mut(&mut st.assets, &asset)?;
        let from = entry.state();
        match from {
            AssetState::Rotating => {
                let mut refusal = Refusal::new(
                    Status::Busy,
                    format!(
                        "a rotation of asset {asset} is being committed; {} it once it is",
                        op.name()
                    ),
                );
                refusal.retry_after_ms = 1;
                return Err(refusal);
            }
            AssetState::Retired => return Err(retired(&asset)),
            _ => {}
        }
        let to = lifecycle::apply(from, op.transition()).map_err(|_| {
            Refusal::new(
                Status::InvalidTransition,
                format!(
                    "asset {asset} is {from}: {} does not apply; nothing changed",
                    op.name()
                ),
            )
        })?;
        let counter = entry.counter();
        entry.in_flight.push_back(InFlight {
            token,
            visible: to,
            then: to,
            counter,
        });
        st.next_token += 1;
        let record = AuditRecord {
            shard: self.id,
            seq: 0,
            event: op.event(),
            asset,
            counter,
            state: to,
            requester,
            request_id,
            ts_ms: now_ms(),
            derive: None,
            rotation_id: None,
            switched_region: None,
        };
        let write = AssetWrite {
            asset,
            state: to,
            counter,
            insert: false,
        };
        Ok(self.enqueue(
            st,
            record,
            Some(write),
            Outcome::Transitioned { state: to, token },
        ))
    }

    fn check_room(&self, st: &ShardState) -> Result<(), Refusal> {
        if st.pending.len() >= self.limits.pending_max {
            let mut refusal = Refusal::new(
                Status::Busy,
                format!(
                    "shard {} has {} requests waiting for commit (limits.max_pending_per_shard)",
                    self.id,
                    st.pending.len()
                ),
            );
            refusal.retry_after_ms = 1;
            return Err(refusal);
        }
        Ok(())
    }

    fn enqueue(
        &self,
        st: &mut ShardState,
        record: AuditRecord,
        write: Option<AssetWrite>,
        outcome: Outcome,
    ) -> Accepted {
        let (reply, rx) = oneshot::channel();
        st.pending.push_back(PendingOp {
            accepted_at: Instant::now(),
            record,
            write,
            region_write: None,
            outcome,
            reply,
        });
        self.kick.notify();
        Accepted::AfterCommit(rx)
    }

    /// The group-commit loop. Runs for the life of the shard on the shard's core.
    pub async fn run_committer(self: Rc<Self>) {
        loop {
            let (pending, inflight, resync) = {
                let st = self.state.borrow();
                (st.pending.len(), st.inflight_batches, st.resync)
            };
            let reload = self.state.borrow().reload;
            if reload && inflight == 0 {
                self.reload_from_store().await;
                continue;
            }
            if resync && inflight == 0 {
                // Every batch sealed before the failure has been heard from: number again
                // from the last durable record.
                let mut st = self.state.borrow_mut();
                st.next_seq = st.durable_next;
                st.head = st.durable_head;
                st.resync = false;
                continue;
            }
            if pending == 0 {
                self.kick.wait().await;
                continue;
            }
            if resync || inflight >= self.limits.commit_batches_inflight_max {
                // No batch may be sealed now; wait for one to finish, but answer whatever
                // has waited its full commit timeout.
                let wait = self.until_oldest_expires();
                futures_lite::future::or(self.kick.wait(), glommio::timer::sleep(wait)).await;
                self.expire_pending();
                continue;
            }
            let delay = self.limits.commit_batch_delay;
            if !delay.is_zero() && pending < self.limits.commit_batch_records_max {
                glommio::timer::sleep(delay).await;
            }
            let (batch, waiters) = self.seal();
            let sealed_at = Instant::now();
            let commit = self.store.commit(batch);
            glommio::spawn_local(self.clone().finish_batch(commit, waiters, sealed_at)).detach();
        }
    }

    /// Re-reads the shard's assets, rotations, region switches and sequence from the
    /// store, after answering STORE_UNAVAILABLE to everything still waiting to be sealed
    /// (it was accepted against the old picture). Retries until the store answers.
    async fn reload_from_store(&self) {
        let pending = std::mem::take(&mut self.state.borrow_mut().pending);
        for op in pending {
            let _ = op.reply.send(Err(Refusal::new(
                Status::StoreUnavailable,
                "not committed: the shard is re-reading its state from the store",
            )));
        }
        let window = crate::store::RotationWindow {
            since_ms: now_ms().saturating_sub(self.limits.rotation_id_retention.as_millis() as u64),
            max: self.limits.rotation_ids_max,
        };
        match self.store.load_with(window).await {
            Ok(snapshot) => {
                let mut st = self.state.borrow_mut();
                st.assets = snapshot
                    .assets
                    .iter()
                    .map(|a| (a.asset, AssetEntry::new(a.state, a.counter, true)))
                    .collect();
                st.rotations = RotationIndex::default();
                for r in &snapshot.rotations {
                    st.rotations.load(r, &self.limits);
                }
                // Shard 0 alone commits region switches, so only its re-read (with none of
                // its batches in flight) holds every switch; another shard's snapshot may
                // predate a switch shard 0 has set since, and must not undo it.
                if self.id == 0 {
                    for lost in self.regions.load(&snapshot.regions) {
                        tracing::warn!(region = %lost, "the store has a switch for a region the region switch has no slot left for; ignored");
                    }
                }
                st.next_seq = snapshot.last_seq + 1;
                st.durable_next = snapshot.last_seq + 1;
                st.head = snapshot.last_hash;
                st.durable_head = snapshot.last_hash;
                st.resync = false;
                st.reload = false;
                tracing::warn!(
                    shard = self.id,
                    assets = st.assets.len(),
                    last_seq = snapshot.last_seq,
                    "shard re-read from the store"
                );
            }
            Err(e) => {
                tracing::warn!(shard = self.id, error = %e, "re-reading the shard from the store failed; retrying");
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    fn until_oldest_expires(&self) -> Duration {
        let st = self.state.borrow();
        let deadline = match st.pending.front() {
            Some(op) => op.accepted_at + self.limits.commit_timeout,
            None => return self.limits.commit_timeout,
        };
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }

    /// Answers STORE_UNAVAILABLE to pending operations older than the commit timeout.
    /// They have no sequence number yet; a registration among them is forgotten.
    fn expire_pending(&self) {
        let mut st = self.state.borrow_mut();
        let now = Instant::now();
        while let Some(op) = st.pending.front() {
            if now.duration_since(op.accepted_at) < self.limits.commit_timeout {
                break;
            }
            let Some(op) = st.pending.pop_front() else {
                break;
            };
            let why = format!(
                "not committed within {} ms (the store is slow or down)",
                self.limits.commit_timeout.as_millis()
            );
            match op.outcome {
                Outcome::Registered => {
                    st.assets.remove(&op.record.asset);
                }
                Outcome::Rotated { token, .. } | Outcome::Transitioned { token, .. } => {
                    undo_lifecycle(&mut st, &op.record.asset, token, &why);
                    if let Outcome::Rotated { rotation_id, .. } = op.outcome {
                        st.rotations.by_id.remove(&rotation_id);
                    }
                }
                Outcome::Derived | Outcome::RegionSet { .. } => {}
            }
            let _ = op
                .reply
                .send(Err(Refusal::new(Status::StoreUnavailable, why)));
        }
    }

    /// Waits for one batch's commit and answers its requests.
    async fn finish_batch(
        self: Rc<Self>,
        mut commit: crate::store::LocalFuture<Result<(), StoreError>>,
        waiters: Vec<Waiter>,
        sealed_at: Instant,
    ) {
        let timeout = self.limits.commit_timeout;
        let in_time = futures_lite::future::or(async { Some((&mut commit).await) }, async {
            glommio::timer::sleep(timeout).await;
            None
        })
        .await;
        let committed = matches!(in_time, Some(Ok(())));
        let took = sealed_at.elapsed();
        self.commit_stats
            .borrow_mut()
            .record(waiters.len(), took, committed);
        {
            let mut f = self.figures.borrow_mut();
            f.store_ok = committed;
            if committed {
                f.commit.record(took);
                f.batch_records.saturating_record(waiters.len() as u64);
                f.batch_records_sum += waiters.len() as u64;
            } else {
                f.commits_failed += 1;
            }
        }
        match in_time {
            Some(Ok(())) => {
                self.settle(&waiters, true);
                self.release(waiters);
            }
            Some(Err(e)) => {
                self.settle(&waiters, false);
                if let StoreError::SequenceGap { expected, .. } = e {
                    // The store says where its log continues: everything before that is
                    // durable, whatever this shard heard about it. If that is further
                    // than this shard knows, a batch it took for failed had landed: its
                    // registry may be wrong, so it re-reads the store.
                    let mut st = self.state.borrow_mut();
                    if expected > st.durable_next {
                        tracing::error!(
                            shard = self.id,
                            expected,
                            believed = st.durable_next,
                            "the store holds records this shard took for not committed; re-reading the shard from the store"
                        );
                        st.reload = true;
                    }
                    st.durable_next = st.durable_next.max(expected);
                }
                let message = format!("commit failed: {e}");
                tracing::warn!(shard = self.id, batch = waiters.len(), %message, "batch not committed");
                for w in waiters {
                    let _ = w
                        .reply
                        .send(Err(Refusal::new(Status::StoreUnavailable, message.clone())));
                }
            }
            None => {
                // Too late for the callers: tell them now (the outcome is unknown to
                // them). The batch's fate still decides what the shard remembers, and its
                // in-flight slot is kept until that is known.
                let outcome_unknown = format!(
                    "commit did not finish within {} ms; its outcome is unknown",
                    timeout.as_millis()
                );
                let mut settled = Vec::with_capacity(waiters.len());
                for w in waiters {
                    let _ = w.reply.send(Err(Refusal::new(
                        Status::StoreUnavailable,
                        outcome_unknown.clone(),
                    )));
                    settled.push(Settled {
                        seq: w.seq,
                        hash: w.hash,
                        asset: w.asset,
                        outcome: w.outcome,
                    });
                }
                let durable = commit.await.is_ok();
                self.settle_parts(settled.into_iter(), durable);
            }
        }
        self.state.borrow_mut().inflight_batches -= 1;
        self.kick.notify();
    }

    fn seal(&self) -> (CommitBatch, Vec<Waiter>) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        let n = st.pending.len().min(self.limits.commit_batch_records_max);
        let mut batch = CommitBatch {
            shard: self.id,
            records: Vec::with_capacity(n),
            asset_writes: Vec::new(),
            region_writes: Vec::new(),
            chain_prev: st.head,
            chain: Vec::with_capacity(n),
            checkpoint: None,
        };
        let mut scratch = self.encode_scratch.borrow_mut();
        let mut waiters = Vec::with_capacity(n);
        // One write per asset per batch (the last wins; a registration stays an insert),
        // so a store can apply the writes in any order.
        let mut written: HashMap<Uuid, usize> = HashMap::new();
        st.inflight_batches += 1;
        let now = Instant::now();
        let mut figures = self.figures.borrow_mut();
        for mut op in st.pending.drain(..n) {
            figures
                .queue_wait
                .record(now.saturating_duration_since(op.accepted_at));
            let seq = st.next_seq;
            st.next_seq += 1;
            op.record.seq = seq;
            let hash = crate::audit::chain_hash(&op.record, &st.head, &mut scratch);
            st.head = hash;
            batch.chain.push(hash);
            waiters.push(Waiter {
                seq,
                hash,
                asset: op.record.asset,
                counter: op.record.counter,
                outcome: op.outcome,
                reply: op.reply,
            });
            if let Some(w) = op.region_write {
                // One write per region per batch too (the last wins).
                match batch
                    .region_writes
                    .iter_mut()
                    .find(|r| r.region == w.region)
                {
                    Some(earlier) => earlier.enabled = w.enabled,
                    None => batch.region_writes.push(w),
                }
            }
            if let Some(w) = op.write {
                match written.get(&w.asset) {
                    Some(&at) => {
                        let earlier = &mut batch.asset_writes[at];
                        earlier.state = w.state;
                        earlier.counter = w.counter;
                        earlier.insert |= w.insert;
                    }
                    None => {
                        written.insert(w.asset, batch.asset_writes.len());
                        batch.asset_writes.push(w);
                    }
                }
            }
            batch.records.push(op.record);
        }
        // The checkpoint: the batch's last position, authenticated (none while sealed; a
        // later checkpoint covers these records through the chain).
        if let (Some(last), Some(signer)) = (batch.records.last(), &self.signer) {
            if let Some(mac) = signer.sign(self.id, last.seq, &st.head) {
                batch.checkpoint = Some(crate::store::Checkpoint {
                    shard: self.id,
                    seq: last.seq,
                    hash: st.head,
                    mac,
                    ts_ms: now_ms(),
                });
            }
        }
        (batch, waiters)
    }

    /// Brings the registry in line with a batch's fate.
    fn settle(&self, waiters: &[Waiter], durable: bool) {
        self.settle_parts(
            waiters.iter().map(|w| Settled {
                seq: w.seq,
                hash: w.hash,
                asset: w.asset,
                outcome: w.outcome,
            }),
            durable,
        );
    }

    /// Durable: registrations become real, lifecycle operations become what the store
    /// holds, and the durable sequence moves forward. Not durable: registrations are
    /// forgotten, lifecycle operations undone (with everything accepted on top of them),
    /// and numbering resynchronises.
    fn settle_parts(&self, parts: impl Iterator<Item = Settled>, durable: bool) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        let mut last_seq = None;
        for part in parts {
            last_seq = Some((part.seq, part.hash));
            match part.outcome {
                Outcome::Derived => {}
                Outcome::RegionSet { index, enabled } => {
                    // Set before the answer goes: every request checked after it, on
                    // any core, sees the switch.
                    if durable {
                        self.regions.set(index, enabled);
                    }
                }
                Outcome::Registered => {
                    if durable {
                        if let Some(e) = st.assets.get_mut(&part.asset) {
                            e.durable = true;
                        }
                        self.figures.borrow_mut().registered += 1;
                    } else {
                        st.assets.remove(&part.asset);
                    }
                }
                Outcome::Rotated { token, .. } | Outcome::Transitioned { token, .. } => {
                    if durable {
                        if let Some(e) = st.assets.get_mut(&part.asset) {
                            // Settles come in sequence order: this is the oldest.
                            let at = e.in_flight.iter().position(|f| f.token == token);
                            if let Some(f) = at.and_then(|at| e.in_flight.remove(at)) {
                                let from = e.durable_state;
                                *st.transitions.entry((from, f.visible)).or_default() += 1;
                                if f.visible != f.then {
                                    *st.transitions.entry((f.visible, f.then)).or_default() += 1;
                                }
                                e.durable_state = f.then;
                                e.durable_counter = f.counter;
                            }
                        }
                        if let Outcome::Rotated { rotation_id, .. } = part.outcome {
                            st.rotations
                                .confirm(rotation_id, part.seq, part.hash, &self.limits);
                        }
                    } else {
                        undo_lifecycle(
                            st,
                            &part.asset,
                            token,
                            "an earlier lifecycle operation of this asset was not committed",
                        );
                        if let Outcome::Rotated { rotation_id, .. } = part.outcome {
                            st.rotations.by_id.remove(&rotation_id);
                        }
                    }
                }
            }
        }
        if durable {
            if let Some((last, hash)) = last_seq {
                if last + 1 > st.durable_next {
                    st.durable_next = last + 1;
                    st.durable_head = hash;
                }
            }
        } else {
            st.resync = true;
        }
    }

    fn release(&self, waiters: Vec<Waiter>) {
        for w in waiters {
            let reply = match w.outcome {
                Outcome::Derived => ShardReply::Derived {
                    counter: w.counter,
                    receipt: Receipt {
                        shard: self.id,
                        seq: w.seq,
                        hash: w.hash,
                    },
                },
                Outcome::Registered => ShardReply::Asset(AssetInfo {
                    asset: w.asset,
                    state: AssetState::Active,
                    counter: 0,
                    shard: self.id,
                }),
                Outcome::Rotated {
                    rotation_id,
                    previous,
                    ..
                } => ShardReply::Rotated(Rotated {
                    asset: w.asset,
                    rotation_id,
                    counter: w.counter,
                    previous_counter: previous,
                    receipt: Receipt {
                        shard: self.id,
                        seq: w.seq,
                        hash: w.hash,
                    },
                    replayed: false,
                }),
                Outcome::RegionSet { index, enabled } => ShardReply::RegionSet {
                    slot: index,
                    enabled,
                },
                Outcome::Transitioned { state, .. } => ShardReply::Asset(AssetInfo {
                    asset: w.asset,
                    state,
                    counter: w.counter,
                    shard: self.id,
                }),
            };
            // The caller may have gone (connection closed): its record is durable anyway.
            let _ = w.reply.send(Ok(reply));
        }
    }
}

/// One record of a batch, as its fate is settled.
struct Settled {
    seq: u64,
    hash: [u8; 32],
    asset: Uuid,
    outcome: Outcome,
}

/// A lifecycle operation (`token`) of `asset` did not commit: it is dropped with every
/// lifecycle operation accepted after it (the later ones in flight fail by the sequence
/// gap; they change nothing when they settle), and every request of the asset still
/// waiting to be sealed, accepted on top of it, is answered STORE_UNAVAILABLE.
fn undo_lifecycle(st: &mut ShardState, asset: &Uuid, token: u64, why: &str) {
    if let Some(e) = st.assets.get_mut(asset) {
        e.in_flight.retain(|f| f.token < token);
    }
    let pending = std::mem::take(&mut st.pending);
    for op in pending {
        if op.record.asset != *asset {
            st.pending.push_back(op);
            continue;
        }
        if let Outcome::Rotated { rotation_id, .. } = op.outcome {
            st.rotations.by_id.remove(&rotation_id);
        }
        let _ = op.reply.send(Err(Refusal::new(
            Status::StoreUnavailable,
            format!("not committed: {why}"),
        )));
    }
}

fn retired(asset: &Uuid) -> Refusal {
    Refusal::new(
        Status::AssetRetired,
        format!("asset {asset} is retired: it answers only STATUS"),
    )
}

fn durable_entry_mut<'a>(
    assets: &'a mut HashMap<Uuid, AssetEntry>,
    asset: &Uuid,
) -> Result<&'a mut AssetEntry, Refusal> {
    match assets.get_mut(asset) {
        Some(e) if e.durable => Ok(e),
        _ => Err(Refusal::new(
            Status::UnknownAsset,
            format!("asset {asset} is not registered"),
        )),
    }
}

fn durable_entry<'a>(
    assets: &'a HashMap<Uuid, AssetEntry>,
    asset: &Uuid,
) -> Result<&'a AssetEntry, Refusal> {
    match assets.get(asset) {
        Some(e) if e.durable => Ok(e),
        _ => Err(Refusal::new(
            Status::UnknownAsset,
            format!("asset {asset} is not registered"),
        )),
    }
}

#[cfg(test)]
mod tests {
    //! The shard against a scripted store: the fault-injection seam for commit failures
    //! and slow commits that a real SQLite file cannot produce on demand.

    use super::*;
    use crate::kdf::DerivationPath;
    use crate::policy::Purpose;
    use crate::store::LocalFuture;
    use std::cell::Cell;

    #[derive(Default)]
    struct Script {
        /// Outcome of each commit in order; `Ok` once the script runs out.
        outcomes: RefCell<VecDeque<Result<(), StoreError>>>,
        /// How long each commit takes.
        delay: Cell<Duration>,
        committed: RefCell<Vec<CommitBatch>>,
        /// The next commit lands but is reported failed (a connection lost after COMMIT).
        land_then_fail: Cell<bool>,
    }

    struct ScriptedStore(Rc<Script>);

    impl ShardStore for ScriptedStore {
        /// What the committed batches add up to, as a real store would load it.
        fn load_with(
            &self,
            _: crate::store::RotationWindow,
        ) -> LocalFuture<Result<ShardSnapshot, StoreError>> {
            let mut snap = ShardSnapshot::default();
            let mut assets: Vec<crate::store::StoredAsset> = Vec::new();
            for b in self.0.committed.borrow().iter() {
                for (i, r) in b.records.iter().enumerate() {
                    snap.last_seq = r.seq;
                    snap.last_hash = b.chain.get(i).copied().unwrap_or(crate::audit::GENESIS);
                    if let (AuditEvent::Rotate, Some(id)) = (r.event, r.rotation_id) {
                        snap.rotations.push(RecentRotation {
                            rotation_id: id,
                            asset: r.asset,
                            counter: r.counter,
                            seq: r.seq,
                            ts_ms: r.ts_ms,
                            hash: snap.last_hash,
                        });
                    }
                }
                for w in &b.asset_writes {
                    assets.retain(|a| a.asset != w.asset);
                    assets.push(crate::store::StoredAsset {
                        asset: w.asset,
                        state: w.state,
                        counter: w.counter,
                    });
                }
            }
            snap.assets = assets;
            Box::pin(async move { Ok(snap) })
        }

        fn commit(&self, batch: CommitBatch) -> LocalFuture<Result<(), StoreError>> {
            let script = self.0.clone();
            Box::pin(async move {
                let delay = script.delay.get();
                if !delay.is_zero() {
                    glommio::timer::sleep(delay).await;
                }
                // Like every store: a batch must continue the committed sequence.
                let last = script
                    .committed
                    .borrow()
                    .last()
                    .and_then(|b| b.records.last().map(|r| r.seq))
                    .unwrap_or(0);
                let first = batch.records[0].seq;
                if first != last + 1 {
                    return Err(StoreError::SequenceGap {
                        shard: 0,
                        expected: last + 1,
                        found: first,
                    });
                }
                if script.land_then_fail.replace(false) {
                    script.committed.borrow_mut().push(batch);
                    return Err(StoreError::Unavailable(
                        "connection lost after COMMIT".into(),
                    ));
                }
                let outcome = script.outcomes.borrow_mut().pop_front().unwrap_or(Ok(()));
                if outcome.is_ok() {
                    script.committed.borrow_mut().push(batch);
                }
                outcome
            })
        }
    }

    fn limits() -> ShardLimits {
        ShardLimits {
            commit_batch_records_max: 64,
            commit_batch_delay: Duration::ZERO,
            commit_batches_inflight_max: 2,
            commit_timeout: Duration::from_millis(200),
            pending_max: 3,
            assets_max: 10,
            rotation_id_retention: Duration::from_secs(3600),
            rotation_ids_max: 4,
            rate_limit_buckets: 16,
        }
    }

    fn shard(script: &Rc<Script>, limits: ShardLimits) -> Rc<Shard> {
        let shard = Rc::new(Shard::new(
            0,
            ShardSnapshot::default(),
            limits,
            Box::new(ScriptedStore(script.clone())),
            Arc::new(crate::regions::RegionSwitch::new(&[
                "US-EAST".into(),
                "EU-WEST".into(),
            ])),
        ));
        glommio::spawn_local(shard.clone().run_committer()).detach();
        shard
    }

    fn asset(n: u8) -> Uuid {
        uuid::Builder::from_random_bytes([n; 16]).into_uuid()
    }

    fn register(a: Uuid) -> ShardOp {
        ShardOp::Register {
            asset: a,
            requester: Arc::from("tester"),
            request_id: 1,
        }
    }

    fn derive(a: Uuid) -> ShardOp {
        ShardOp::Derive {
            request: CheckedDerive {
                asset: a,
                path: DerivationPath::parse("m/44'/0'/0'/0'/1").unwrap(),
                region: Arc::from("US-EAST"),
                purpose: Purpose::Trading,
                ttl_s: 60,
            },
            requester: Arc::from("tester"),
            request_id: 2,
        }
    }

    fn fail_next_commit(script: &Script, why: &str) {
        script
            .outcomes
            .borrow_mut()
            .push_back(Err(StoreError::Unavailable(why.into())));
    }

    /// Accepts an operation that must wait for its commit.
    fn accepted(s: &Shard, op: ShardOp) -> oneshot::Receiver<OpResult> {
        match s.accept(op) {
            Ok(Accepted::AfterCommit(rx)) => rx,
            _ => panic!("the operation should wait for its commit"),
        }
    }

    async fn refused_status(rx: oneshot::Receiver<OpResult>) -> Status {
        rx.await.unwrap().unwrap_err().status
    }

    fn seq_of(r: OpResult) -> u64 {
        match r {
            Ok(ShardReply::Derived { receipt, .. }) => receipt.seq,
            other => panic!("expected a derivation, got {other:?}"),
        }
    }

    fn run(test: impl std::future::Future<Output = ()> + 'static) {
        glommio::LocalExecutorBuilder::default()
            .io_memory(256 * 1024)
            .make()
            .unwrap()
            .run(test);
    }

    #[test]
    fn replies_only_after_commit_and_sequences_are_dense() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let a = asset(1);
            s.execute(register(a)).await.unwrap();
            for expected in 2..=4 {
                assert_eq!(seq_of(s.execute(derive(a)).await), expected);
            }
            let committed: Vec<u64> = script
                .committed
                .borrow()
                .iter()
                .flat_map(|b| b.records.iter().map(|r| r.seq))
                .collect();
            assert_eq!(committed, [1, 2, 3, 4]);
        });
    }

    #[test]
    fn a_failed_commit_fails_the_batch_and_gives_its_sequence_back() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let a = asset(2);
            s.execute(register(a)).await.unwrap();
            fail_next_commit(&script, "disk on fire");
            // Two derivations sealed into the failing batch both fail.
            let (x, y) =
                futures_lite::future::zip(s.execute(derive(a)), s.execute(derive(a))).await;
            for r in [x, y] {
                assert_eq!(r.unwrap_err().status, Status::StoreUnavailable);
            }
            // The next batch reuses the numbers: no gap in the log.
            assert_eq!(seq_of(s.execute(derive(a)).await), 2);
            assert_eq!(script.committed.borrow().len(), 2);
        });
    }

    #[test]
    fn after_a_failure_numbering_resumes_from_the_last_durable_record() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let a = asset(8);
            s.execute(register(a)).await.unwrap();
            script.delay.set(Duration::from_millis(30));
            fail_next_commit(&script, "fsync failed");
            // A (seq 2) fails; B (seq 3), already in flight, is refused for the gap; the
            // three requests queued meanwhile form a batch larger than A.
            let a_rx = accepted(&s, derive(a));
            glommio::executor().yield_now().await;
            let b_rx = accepted(&s, derive(a));
            glommio::executor().yield_now().await;
            assert_eq!(s.state.borrow().inflight_batches, 2);
            let later: Vec<_> = (0..3).map(|_| accepted(&s, derive(a))).collect();
            for rx in [a_rx, b_rx] {
                assert_eq!(refused_status(rx).await, Status::StoreUnavailable);
            }
            let mut seqs = Vec::new();
            for rx in later {
                seqs.push(seq_of(rx.await.unwrap()));
            }
            assert_eq!(seqs, [2, 3, 4]);
            script.delay.set(Duration::ZERO);
            assert_eq!(
                seq_of(s.execute(derive(a)).await),
                5,
                "the shard is not wedged"
            );
        });
    }

    #[test]
    fn requests_waiting_for_a_slot_are_answered_at_the_commit_timeout() {
        run(async {
            let script = Rc::new(Script::default());
            let mut l = limits();
            l.commit_batches_inflight_max = 1;
            let s = shard(&script, l);
            let a = asset(9);
            s.execute(register(a)).await.unwrap();
            script.delay.set(Duration::from_millis(600));
            let started = std::time::Instant::now();
            let sealed = accepted(&s, derive(a));
            glommio::executor().yield_now().await;
            // The only slot is taken by a commit that will take 600 ms.
            let waiting = accepted(&s, derive(a));
            for rx in [sealed, waiting] {
                assert_eq!(refused_status(rx).await, Status::StoreUnavailable);
                assert!(
                    started.elapsed() < Duration::from_millis(500),
                    "answered at the timeout"
                );
            }
        });
    }

    #[test]
    fn a_failed_registration_is_forgotten() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let a = asset(3);
            fail_next_commit(&script, "down");
            assert_eq!(
                s.execute(register(a)).await.unwrap_err().status,
                Status::StoreUnavailable
            );
            let status = s.execute(ShardOp::Status { asset: a }).await.unwrap_err();
            assert_eq!(status.status, Status::UnknownAsset);
            s.execute(register(a)).await.unwrap();
            assert!(matches!(
                s.execute(ShardOp::Status { asset: a }).await,
                Ok(ShardReply::Asset(_))
            ));
        });
    }

    fn rotate(a: Uuid, id: u128, expected: Option<u64>) -> ShardOp {
        ShardOp::Rotate {
            asset: a,
            rotation_id: Uuid::from_u128(id),
            expected_counter: expected,
            requester: Arc::from("operator"),
            request_id: 7,
        }
    }

    fn lifecycle(a: Uuid, op: LifecycleOp) -> ShardOp {
        ShardOp::Lifecycle {
            asset: a,
            op,
            requester: Arc::from("operator"),
            request_id: 8,
        }
    }

    fn rotated(r: OpResult) -> Rotated {
        match r {
            Ok(ShardReply::Rotated(r)) => r,
            other => panic!("expected a rotation, got {other:?}"),
        }
    }

    fn state_of(s: &Shard, a: Uuid) -> (AssetState, u64) {
        match s.accept(ShardOp::Status { asset: a }) {
            Ok(Accepted::Now(ShardReply::Asset(info))) => (info.state, info.counter),
            _ => panic!("status answers at once"),
        }
    }

    fn counter_of(r: OpResult) -> u64 {
        match r {
            Ok(ShardReply::Derived { counter, .. }) => counter,
            other => panic!("expected a derivation, got {other:?}"),
        }
    }

    #[test]
    fn a_rotation_moves_the_counter_once_and_its_id_again_answers_the_first_result() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let (a, b) = (asset(20), asset(21));
            s.execute(register(a)).await.unwrap();
            s.execute(register(b)).await.unwrap();
            let first = rotated(s.execute(rotate(a, 1, None)).await);
            assert_eq!(
                (first.previous_counter, first.counter, first.replayed),
                (0, 1, false)
            );
            // The same id again: the first answer, nothing new committed.
            let records = script
                .committed
                .borrow()
                .iter()
                .map(|b| b.records.len())
                .sum::<usize>();
            let again = rotated(s.execute(rotate(a, 1, None)).await);
            assert_eq!(
                (again.counter, again.receipt, again.replayed),
                (1, first.receipt, true)
            );
            let after = script
                .committed
                .borrow()
                .iter()
                .map(|b| b.records.len())
                .sum::<usize>();
            assert_eq!(records, after);
            // The id on another asset is refused; so is a stale expected counter.
            let e = s.execute(rotate(b, 1, None)).await.unwrap_err();
            assert_eq!(e.status, Status::RotationIdReused);
            let e = s.execute(rotate(a, 2, Some(0))).await.unwrap_err();
            assert_eq!(e.status, Status::CounterMismatch);
            assert!(
                e.message.contains("at counter 1, not the expected 0"),
                "{}",
                e.message
            );
            assert_eq!(state_of(&s, a), (AssetState::Active, 1));
            assert_eq!(rotated(s.execute(rotate(a, 2, Some(1))).await).counter, 2);
            assert_eq!(counter_of(s.execute(derive(a)).await), 2);
            // The ROTATE records carry their ids, and the asset row the new counter.
            let batches = script.committed.borrow();
            let ids: Vec<_> = batches
                .iter()
                .flat_map(|b| &b.records)
                .filter(|r| r.event == AuditEvent::Rotate)
                .map(|r| (r.rotation_id, r.counter))
                .collect();
            assert_eq!(
                ids,
                [(Some(Uuid::from_u128(1)), 1), (Some(Uuid::from_u128(2)), 2)]
            );
            let last_write = batches
                .iter()
                .flat_map(|b| &b.asset_writes)
                .filter(|w| w.asset == a)
                .last()
                .cloned();
            assert_eq!(
                last_write,
                Some(AssetWrite {
                    asset: a,
                    state: AssetState::Active,
                    counter: 2,
                    insert: false
                })
            );
            drop(batches);
            let counts = s.take_transition_counts();
            assert_eq!(
                counts.get(&(AssetState::Active, AssetState::Rotating)),
                Some(&2)
            );
            assert_eq!(
                counts.get(&(AssetState::Rotating, AssetState::Active)),
                Some(&2)
            );
        });
    }

    #[test]
    fn derivations_during_a_rotation_use_the_new_counter_and_commit_after_it() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let a = asset(22);
            s.execute(register(a)).await.unwrap();
            script.delay.set(Duration::from_millis(30));
            let before = accepted(&s, derive(a));
            let rotation = accepted(&s, rotate(a, 9, None));
            // ROTATING while the rotation waits for its commit, at the durable counter.
            assert_eq!(state_of(&s, a), (AssetState::Rotating, 0));
            let during = accepted(&s, derive(a));
            // A second rotation or a suspension waits for this one.
            assert!(matches!(s.accept(rotate(a, 10, None)), Err(r) if r.status == Status::Busy));
            assert!(
                matches!(s.accept(lifecycle(a, LifecycleOp::Suspend)), Err(r) if r.status == Status::Busy)
            );
            let (before, rotation, during) = (
                before.await.unwrap(),
                rotation.await.unwrap(),
                during.await.unwrap(),
            );
            let r = rotated(rotation);
            assert_eq!(counter_of(before.clone()), 0);
            assert_eq!(counter_of(during.clone()), 1);
            assert!(seq_of(before) < r.receipt.seq && r.receipt.seq < seq_of(during));
            assert_eq!(state_of(&s, a), (AssetState::Active, 1));
        });
    }

    #[test]
    fn a_rotation_that_fails_to_commit_changes_nothing_and_takes_its_followers_with_it() {
        run(async {
            let script = Rc::new(Script::default());
            let mut l = limits();
            l.commit_batches_inflight_max = 1;
            l.pending_max = 8;
            let s = shard(&script, l);
            let a = asset(23);
            s.execute(register(a)).await.unwrap();
            script.delay.set(Duration::from_millis(20));
            fail_next_commit(&script, "disk gone");
            let rotation = accepted(&s, rotate(a, 5, None));
            // Accepted while the rotation's batch is sealed and in flight: still pending.
            glommio::timer::sleep(Duration::from_millis(5)).await;
            let follower = accepted(&s, derive(a));
            assert_eq!(refused_status(rotation).await, Status::StoreUnavailable);
            assert_eq!(refused_status(follower).await, Status::StoreUnavailable);
            script.delay.set(Duration::ZERO);
            assert_eq!(state_of(&s, a), (AssetState::Active, 0));
            assert_eq!(counter_of(s.execute(derive(a)).await), 0);
            // The id was not spent: the retry rotates.
            let r = rotated(s.execute(rotate(a, 5, None)).await);
            assert_eq!((r.counter, r.replayed), (1, false));
        });
    }

    #[test]
    fn suspend_resume_retire_and_what_each_state_refuses() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let a = asset(24);
            s.execute(register(a)).await.unwrap();
            let suspended = s.execute(lifecycle(a, LifecycleOp::Suspend)).await.unwrap();
            assert!(matches!(
                suspended,
                ShardReply::Asset(AssetInfo {
                    state: AssetState::Suspended,
                    ..
                })
            ));
            assert_eq!(
                s.execute(derive(a)).await.unwrap_err().status,
                Status::AssetSuspended
            );
            assert_eq!(
                s.execute(rotate(a, 1, None)).await.unwrap_err().status,
                Status::AssetSuspended
            );
            let again = s
                .execute(lifecycle(a, LifecycleOp::Suspend))
                .await
                .unwrap_err();
            assert_eq!(again.status, Status::InvalidTransition);
            assert!(again.message.contains("is SUSPENDED"), "{}", again.message);
            s.execute(lifecycle(a, LifecycleOp::Resume)).await.unwrap();
            assert_eq!(counter_of(s.execute(derive(a)).await), 0);
            let e = s
                .execute(lifecycle(a, LifecycleOp::Resume))
                .await
                .unwrap_err();
            assert_eq!(e.status, Status::InvalidTransition);
            s.execute(lifecycle(a, LifecycleOp::Retire)).await.unwrap();
            for op in [
                derive(a),
                rotate(a, 2, None),
                lifecycle(a, LifecycleOp::Resume),
                lifecycle(a, LifecycleOp::Suspend),
                lifecycle(a, LifecycleOp::Retire),
            ] {
                assert_eq!(
                    s.execute(op).await.unwrap_err().status,
                    Status::AssetRetired
                );
            }
            assert_eq!(state_of(&s, a), (AssetState::Retired, 0));
            let events: Vec<AuditEvent> = script
                .committed
                .borrow()
                .iter()
                .flat_map(|b| &b.records)
                .map(|r| r.event)
                .collect();
            use AuditEvent::*;
            assert_eq!(events, [Register, Suspend, Resume, Derive, Retire]);
            let counts = s.take_transition_counts();
            assert_eq!(
                counts.get(&(AssetState::Active, AssetState::Suspended)),
                Some(&1)
            );
            assert_eq!(
                counts.get(&(AssetState::Suspended, AssetState::Active)),
                Some(&1)
            );
            assert_eq!(
                counts.get(&(AssetState::Active, AssetState::Retired)),
                Some(&1)
            );
        });
    }

    #[test]
    fn a_suspension_that_fails_to_commit_is_undone() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let a = asset(25);
            s.execute(register(a)).await.unwrap();
            fail_next_commit(&script, "down");
            let e = s
                .execute(lifecycle(a, LifecycleOp::Suspend))
                .await
                .unwrap_err();
            assert_eq!(e.status, Status::StoreUnavailable);
            assert_eq!(state_of(&s, a), (AssetState::Active, 0));
            assert_eq!(counter_of(s.execute(derive(a)).await), 0);
            assert!(s.take_transition_counts().is_empty());
        });
    }

    #[test]
    fn one_write_per_asset_per_batch() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let a = asset(26);
            s.execute(register(a)).await.unwrap();
            // Accepted before the committer runs: one batch.
            let one = accepted(&s, lifecycle(a, LifecycleOp::Suspend));
            let two = accepted(&s, lifecycle(a, LifecycleOp::Resume));
            one.await.unwrap().unwrap();
            two.await.unwrap().unwrap();
            let batches = script.committed.borrow();
            let last = batches.last().unwrap();
            assert_eq!(last.records.len(), 2);
            assert_eq!(
                last.asset_writes,
                [AssetWrite {
                    asset: a,
                    state: AssetState::Active,
                    counter: 0,
                    insert: false
                }]
            );
        });
    }

    /// One step of a generated lifecycle history.
    #[derive(Clone, Debug)]
    enum Step {
        Derive(u8),
        Rotate(u8, bool),
        /// A rotation id used before (by any asset).
        RotateAgain(u8),
        Op(u8, LifecycleOp),
        FailNextCommit,
        /// Let outstanding batches commit before the next step.
        Settle,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let a = 0u8..2;
        prop_oneof![
            4 => a.clone().prop_map(Step::Derive),
            2 => (a.clone(), any::<bool>()).prop_map(|(a, cas)| Step::Rotate(a, cas)),
            1 => a.clone().prop_map(Step::RotateAgain),
            1 => a.clone().prop_map(|a| Step::Op(a, LifecycleOp::Suspend)),
            1 => a.clone().prop_map(|a| Step::Op(a, LifecycleOp::Resume)),
            1 => (0u8..8).prop_filter_map("retire rarely", |n| (n == 0).then_some(Step::Op(n % 2, LifecycleOp::Retire))),
            1 => Just(Step::FailNextCommit),
            2 => Just(Step::Settle),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any history of derivations, rotations (new, repeated, compare-and-set),
        /// transitions and failed commits, with operations in flight together, keeps I2 and
        /// I3 in the committed log, answers OK only for what was committed, and leaves the
        /// shard where the committed log says it is.
        #[test]
        fn lifecycle_histories_keep_i2_and_i3(steps in proptest::collection::vec(step(), 1..60)) {
            run(async move {
                let script = Rc::new(Script::default());
                let mut l = limits();
                l.pending_max = 64;
                l.rotation_ids_max = 1000;
                let s = shard(&script, l);
                let assets = [asset(40), asset(41)];
                for a in assets {
                    s.execute(register(a)).await.unwrap();
                }
                let mut waiting: Vec<(Step, oneshot::Receiver<OpResult>)> = Vec::new();
                let mut answers: Vec<(Step, OpResult)> = Vec::new();
                let mut next_id = 1u128;
                let mut used_ids: Vec<u128> = Vec::new();
                for st in steps {
                    let op = match &st {
                        Step::Derive(a) => derive(assets[*a as usize]),
                        Step::Rotate(a, cas) => {
                            let id = next_id;
                            next_id += 1;
                            used_ids.push(id);
                            let a = assets[*a as usize];
                            let expected = if *cas { Some(state_of(&s, a).1) } else { None };
                            rotate(a, id, expected)
                        }
                        Step::RotateAgain(a) => match used_ids.last() {
                            Some(id) => rotate(assets[*a as usize], *id, None),
                            None => continue,
                        },
                        Step::Op(a, op) => lifecycle(assets[*a as usize], *op),
                        Step::FailNextCommit => {
                            fail_next_commit(&script, "injected");
                            continue;
                        }
                        Step::Settle => {
                            for (st, rx) in waiting.drain(..) {
                                answers.push((st, rx.await.unwrap()));
                            }
                            continue;
                        }
                    };
                    match s.accept(op) {
                        Ok(Accepted::Now(reply)) => answers.push((st, Ok(reply))),
                        Ok(Accepted::AfterCommit(rx)) => waiting.push((st, rx)),
                        Err(refusal) => answers.push((st, Err(refusal))),
                    }
                }
                for (st, rx) in waiting.drain(..) {
                    answers.push((st, rx.await.unwrap()));
                }
                let log: Vec<AuditRecord> = script
                    .committed
                    .borrow()
                    .iter()
                    .flat_map(|b| b.records.clone())
                    .collect();
                // Dense sequence numbers: nothing lost, nothing twice.
                for (i, r) in log.iter().enumerate() {
                    assert_eq!(r.seq, i as u64 + 1);
                }
                // One hash chain through every committed batch: after a failed batch,
                // numbering and chaining restart together from the durable head.
                let mut prev = crate::audit::GENESIS;
                let mut scratch = Vec::new();
                for b in script.committed.borrow().iter() {
                    assert_eq!(b.chain_prev, prev, "batch at seq {}", b.records[0].seq);
                    assert_eq!(b.chain.len(), b.records.len());
                    for (r, h) in b.records.iter().zip(&b.chain) {
                        assert_eq!(*h, crate::audit::chain_hash(r, &prev, &mut scratch), "seq {}", r.seq);
                        prev = *h;
                    }
                }
                for a in assets {
                    let mine: Vec<&AuditRecord> = log.iter().filter(|r| r.asset == a).collect();
                    let (mut counter, mut state) = (0u64, AssetState::Active);
                    for r in &mine {
                        match r.event {
                            AuditEvent::Register
                            | AuditEvent::RegionEnable
                            | AuditEvent::RegionDisable => {}
                            // I2: each rotation moves the counter forward by exactly one.
                            AuditEvent::Rotate => {
                                assert_eq!(r.counter, counter + 1, "rotation at seq {}", r.seq);
                                assert_eq!(state, AssetState::Active);
                                counter = r.counter;
                            }
                            // I3: a derivation uses the counter of the last rotation before it,
                            // and only while the asset serves.
                            AuditEvent::Derive => {
                                assert_eq!(r.counter, counter, "derivation at seq {}", r.seq);
                                assert_eq!(state, AssetState::Active, "derivation at seq {}", r.seq);
                            }
                            AuditEvent::Suspend | AuditEvent::Resume | AuditEvent::Retire => {
                                assert_eq!(r.counter, counter);
                                let t = match r.event {
                                    AuditEvent::Suspend => Transition::Suspend,
                                    AuditEvent::Resume => Transition::Resume,
                                    _ => Transition::Retire,
                                };
                                state = lifecycle::apply(state, t).expect("a legal transition");
                                assert_eq!(r.state, state);
                            }
                        }
                    }
                    // The shard ends where its committed log says.
                    assert_eq!(state_of(&s, a), (state, counter));
                }
                // OK answers are committed; each rotation id moved one counter at most once.
                let mut rotations_by_id: HashMap<Uuid, u64> = HashMap::new();
                for r in log.iter().filter(|r| r.event == AuditEvent::Rotate) {
                    let id = r.rotation_id.expect("a ROTATE record has its id");
                    assert!(rotations_by_id.insert(id, r.counter).is_none(), "id {id} rotated twice");
                }
                for (st, answer) in &answers {
                    match answer {
                        Ok(ShardReply::Derived { counter, receipt }) => {
                            let r = &log[receipt.seq as usize - 1];
                            assert_eq!((r.event, r.counter), (AuditEvent::Derive, *counter), "{st:?}");
                        }
                        Ok(ShardReply::Rotated(rot)) => {
                            let r = &log[rot.receipt.seq as usize - 1];
                            assert_eq!(
                                (r.event, r.counter, r.rotation_id),
                                (AuditEvent::Rotate, rot.counter, Some(rot.rotation_id)),
                                "{st:?}"
                            );
                        }
                        Ok(ShardReply::Asset(info)) => {
                            let committed = log.iter().any(|r| r.asset == info.asset && r.state == info.state);
                            assert!(committed, "{st:?} answered {info:?} without a record");
                        }
                        Ok(ShardReply::RegionSet { .. }) | Err(_) => {}
                    }
                }
            });
        }
    }

    #[test]
    fn review_cases_regions_merge_status_is_durable_and_unknown_assets_take_no_bucket() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let a = asset(30);
            s.execute(register(a)).await.unwrap();
            // Two switches of one region in one batch: one region write, the last.
            let switch = |enabled| ShardOp::SetRegion {
                index: 1,
                enabled,
                requester: Arc::from("admin"),
                request_id: 9,
            };
            let one = accepted(&s, switch(false));
            let two = accepted(&s, switch(true));
            one.await.unwrap().unwrap();
            let regions = two.await.unwrap().unwrap();
            assert_eq!(
                regions,
                ShardReply::RegionSet {
                    slot: 1,
                    enabled: true
                }
            );
            let last = script.committed.borrow().last().cloned().unwrap();
            assert_eq!(last.records.len(), 2);
            assert_eq!(
                last.region_writes,
                [crate::store::RegionWrite {
                    region: "EU-WEST".into(),
                    enabled: true
                }]
            );
            // STATUS reports a suspension only once it is durable.
            script.delay.set(Duration::from_millis(20));
            let suspended = accepted(&s, lifecycle(a, LifecycleOp::Suspend));
            assert_eq!(state_of(&s, a), (AssetState::Active, 0));
            suspended.await.unwrap().unwrap();
            assert_eq!(state_of(&s, a), (AssetState::Suspended, 0));
            // A rate-limited request on an unknown asset makes no bucket.
            let rc = RateCheck {
                requester: Arc::from("svc"),
                role: crate::policy::Role::Deriver,
                limit: crate::ratelimit::RateLimit::parse("1/60s").unwrap(),
            };
            for _ in 0..3 {
                let e = s
                    .execute_limited(derive(asset(31)), Some(rc.clone()))
                    .await
                    .unwrap_err();
                assert_eq!(e.status, Status::UnknownAsset);
            }
            assert_eq!(s.limiter.borrow().buckets(), 0);
        });
    }

    #[test]
    fn a_commit_reported_failed_that_had_landed_makes_the_shard_reread_the_store() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let a = asset(32);
            s.execute(register(a)).await.unwrap();
            script.land_then_fail.set(true);
            // Reported failed, but durable in the store.
            let e = s.execute(rotate(a, 77, None)).await.unwrap_err();
            assert_eq!(e.status, Status::StoreUnavailable);
            assert_eq!(state_of(&s, a), (AssetState::Active, 0), "undone in memory");
            // The next batch finds the store ahead: refused, and the shard re-reads it.
            let e = s.execute(derive(a)).await.unwrap_err();
            assert_eq!(e.status, Status::StoreUnavailable);
            let deadline = Instant::now() + Duration::from_secs(2);
            while state_of_or_busy(&s, a) != Some((AssetState::Active, 1)) {
                assert!(
                    Instant::now() < deadline,
                    "the shard did not re-read the store"
                );
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            // It knows the rotation now: the id answers its result; derivations use it.
            let again = rotated(s.execute(rotate(a, 77, None)).await);
            assert_eq!((again.counter, again.replayed), (1, true));
            assert_eq!(counter_of(s.execute(derive(a)).await), 1);
            // And the log holds no derivation at the old counter after the rotation.
            let log: Vec<AuditRecord> = script
                .committed
                .borrow()
                .iter()
                .flat_map(|b| b.records.clone())
                .collect();
            for (i, r) in log.iter().enumerate() {
                assert_eq!(r.seq, i as u64 + 1);
            }
            assert!(log
                .iter()
                .filter(|r| r.event == AuditEvent::Derive)
                .all(|r| r.counter == 1));
        });
    }

    fn state_of_or_busy(s: &Shard, a: Uuid) -> Option<(AssetState, u64)> {
        match s.accept(ShardOp::Status { asset: a }) {
            Ok(Accepted::Now(ShardReply::Asset(info))) => Some((info.state, info.counter)),
            _ => None,
        }
    }

    #[test]
    fn a_late_commit_answers_store_unavailable_but_keeps_the_truth() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let a = asset(4);
            script.delay.set(Duration::from_millis(400));
            let started = std::time::Instant::now();
            let r = s.execute(register(a)).await;
            assert_eq!(r.unwrap_err().status, Status::StoreUnavailable);
            assert!(
                started.elapsed() < Duration::from_millis(390),
                "answered at the timeout"
            );
            // Unknown while the batch's fate is open, registered once it committed.
            script.delay.set(Duration::ZERO);
            glommio::timer::sleep(Duration::from_millis(300)).await;
            assert!(matches!(
                s.execute(ShardOp::Status { asset: a }).await,
                Ok(ShardReply::Asset(_))
            ));
            assert_eq!(seq_of(s.execute(derive(a)).await), 2);
        });
    }

    #[test]
    fn bounds_answer_busy_and_change_nothing() {
        run(async {
            let script = Rc::new(Script::default());
            let s = shard(&script, limits());
            let a = asset(5);
            s.execute(register(a)).await.unwrap();
            script.delay.set(Duration::from_millis(50));
            // pending_max = 3: the fourth request finds the queue full.
            let waiting: Vec<_> = (0..3).map(|_| accepted(&s, derive(a))).collect();
            let busy = s.accept(derive(a)).err().unwrap();
            assert_eq!(busy.status, Status::Busy);
            assert!(busy.retry_after_ms > 0);
            for rx in waiting {
                rx.await.unwrap().unwrap();
            }
            let records: usize = script
                .committed
                .borrow()
                .iter()
                .map(|b| b.records.len())
                .sum();
            assert_eq!(
                records, 4,
                "the registration and three derivations, not the refused one"
            );
            // The asset registry bound.
            for n in 10..19 {
                s.execute(register(asset(n))).await.unwrap();
            }
            assert_eq!(
                s.execute(register(asset(99))).await.unwrap_err().status,
                Status::Busy
            );
        });
    }
}
