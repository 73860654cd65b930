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

//!
//! | file | room |
//! |---|---|
//! | `mod.rs` | the operations a shard takes ([`ShardOp`]) and answers ([`ShardReply`]), its bounds, the rate limit |
//! | [`registry`] | accepting an operation: the assets' states, what each operation may do, its audit record |
//! | [`commit`] | the committer: sealing batches, the store's answer, settling and releasing |

mod commit;
mod registry;

use crate::audit::AuditEvent;
use crate::lifecycle::{AssetState, Transition};
use crate::policy::CheckedDerive;
use crate::signal::LocalSignal;
use crate::store::{ShardSnapshot, ShardStore};
use crate::wire::{AssetInfo, Receipt, Refusal, Rotated, Status};
use registry::{Accepted, AssetEntry, PendingOp, RotationIndex};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub use commit::CommitStats;

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

/// Lifecycle transitions committed by this shard, by (from, to), since last taken.
pub type TransitionCounts = HashMap<(AssetState, AssetState), u64>;

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
    /// Completed re-reads from the store, and their signal ([`Shard::reread`]).
    rereads: std::cell::Cell<u64>,
    reread_done: LocalSignal,
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
            rereads: std::cell::Cell::new(0),
            reread_done: LocalSignal::new(),
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
}

#[cfg(test)]
mod tests;
