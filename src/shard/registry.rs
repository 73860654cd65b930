//! Accepting an operation: the registry of the assets a shard owns, what each operation
//! may do to an asset in its current state, and the audit record it will commit. Nothing
//! here waits: an operation is refused or answered at once (STATUS, a repeated rotation),
//! or its record joins the pending queue and its answer waits for the committer
//! ([`super::commit`]).

use super::{
    LifecycleOp, OpResult, Shard, ShardLimits, ShardOp, ShardReply, ShardState, COUNTER_MAX,
    NO_ASSET,
};
use crate::audit::{now_ms, AuditEvent, AuditRecord, DeriveDetail};
use crate::kdf::SCHEME_V1;
use crate::lifecycle::{self, AssetState};
use crate::policy::CheckedDerive;
use crate::store::{AssetWrite, RecentRotation};
use crate::wire::{AssetInfo, Receipt, Refusal, Rotated, Status};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;
use uuid::Uuid;

/// A lifecycle operation accepted but not yet settled: what the asset looks like while
/// it is in flight, and once it is durable.
#[derive(Clone, Copy, Debug)]
pub(super) struct InFlight {
    /// Orders the shard's lifecycle operations (acceptance order = sequence order).
    pub(super) token: u64,
    /// The state shown while in flight (ROTATING for a rotation).
    pub(super) visible: AssetState,
    /// The state once durable.
    pub(super) then: AssetState,
    pub(super) counter: u64,
}

#[derive(Debug)]
pub(super) struct AssetEntry {
    /// What the store holds.
    pub(super) durable_state: AssetState,
    pub(super) durable_counter: u64,
    /// Lifecycle operations accepted on top of it, oldest first. The asset's state and
    /// counter, as every new request sees them, are those of the last one.
    pub(super) in_flight: VecDeque<InFlight>,
    /// `false` while the registration's commit is in flight: the asset does not exist yet
    /// for anyone but a second registration, which is refused.
    pub(super) durable: bool,
}

impl AssetEntry {
    pub(super) fn new(state: AssetState, counter: u64, durable: bool) -> AssetEntry {
        AssetEntry {
            durable_state: state,
            durable_counter: counter,
            in_flight: VecDeque::new(),
            durable,
        }
    }

    /// The state new requests see.
    pub(super) fn state(&self) -> AssetState {
        self.in_flight
            .back()
            .map_or(self.durable_state, |f| f.visible)
    }

    /// The counter new derivations use (a rotation in flight: its new counter, since
    /// such a derivation is committed only after the rotation is).
    pub(super) fn counter(&self) -> u64 {
        self.in_flight
            .back()
            .map_or(self.durable_counter, |f| f.counter)
    }
}

/// What an accepted operation answers once its record is durable.
#[derive(Clone, Copy, Debug)]
pub(super) enum Outcome {
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
pub(super) struct RotationMemo {
    pub(super) asset: Uuid,
    pub(super) counter: u64,
    /// The rotation's record (sequence number and chain hash); `None` while its commit
    /// is in flight.
    pub(super) seq: Option<(u64, [u8; 32])>,
    pub(super) ts_ms: u64,
}

/// Rotation ids of this shard's assets, for `rotation_id_retention`, at most
/// `rotation_ids_max` of them.
#[derive(Default)]
pub(super) struct RotationIndex {
    pub(super) by_id: HashMap<Uuid, RotationMemo>,
    /// Committed ids, oldest first, for eviction.
    pub(super) order: VecDeque<(u64, Uuid)>,
}

impl RotationIndex {
    pub(super) fn confirm(&mut self, id: Uuid, seq: u64, hash: [u8; 32], limits: &ShardLimits) {
        let Some(m) = self.by_id.get_mut(&id) else {
            return;
        };
        m.seq = Some((seq, hash));
        self.order.push_back((m.ts_ms, id));
        self.evict(limits);
    }

    pub(super) fn load(&mut self, r: &RecentRotation, limits: &ShardLimits) {
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

    pub(super) fn evict(&mut self, limits: &ShardLimits) {
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

/// An accepted operation waiting for its batch.
pub(super) struct PendingOp {
    pub(super) accepted_at: Instant,
    pub(super) record: AuditRecord,
    pub(super) write: Option<AssetWrite>,
    pub(super) region_write: Option<crate::store::RegionWrite>,
    pub(super) outcome: Outcome,
    pub(super) reply: oneshot::Sender<OpResult>,
}

pub(super) enum Accepted {
    Now(ShardReply),
    AfterCommit(oneshot::Receiver<OpResult>),
}

impl Shard {
    /// Refuses an operation, answers it at once, or queues its record for the committer.
    pub(super) fn accept(&self, op: ShardOp) -> Result<Accepted, Refusal> {
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
            ShardOp::Status { asset } => self.status(&st, asset),
            ShardOp::Rotate {
                asset,
                rotation_id,
                expected_counter,
                requester,
                request_id,
            } => self.accept_rotation(
                &mut st,
                (asset, rotation_id, expected_counter),
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
            } => self.accept_region(&mut st, (index, enabled), requester, request_id),
            ShardOp::Register {
                asset,
                requester,
                request_id,
            } => self.accept_registration(&mut st, asset, requester, request_id),
            ShardOp::Derive {
                request,
                requester,
                request_id,
            } => self.accept_derivation(&mut st, request, requester, request_id),
        }
    }

    /// The audit record of an accepted operation on `asset` at (counter, state); its
    /// sequence number is given when its batch is sealed.
    fn record(
        &self,
        event: AuditEvent,
        asset: Uuid,
        (counter, state): (u64, AssetState),
        requester: Arc<str>,
        request_id: u64,
    ) -> AuditRecord {
        AuditRecord {
            shard: self.id,
            seq: 0,
            event,
            asset,
            counter,
            state,
            requester,
            request_id,
            ts_ms: now_ms(),
            derive: None,
            rotation_id: None,
            switched_region: None,
        }
    }

    /// STATUS: what the store holds; a rotation in flight shows as ROTATING until it is
    /// durable (other transitions in flight are not reported before they are).
    fn status(&self, st: &ShardState, asset: Uuid) -> Result<Accepted, Refusal> {
        let entry = durable_entry(&st.assets, &asset)?;
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

    /// SET_REGION: the switch of the region in `index`, set on every core once durable.
    fn accept_region(
        &self,
        st: &mut ShardState,
        (index, enabled): (usize, bool),
        requester: Arc<str>,
        request_id: u64,
    ) -> Result<Accepted, Refusal> {
        let Some(name) = self.regions.name(index) else {
            return Err(Refusal::new(
                Status::InvalidRegion,
                format!("no region in slot {index} of the region switch"),
            ));
        };
        self.check_room(st)?;
        let event = if enabled {
            AuditEvent::RegionEnable
        } else {
            AuditEvent::RegionDisable
        };
        let mut record = self.record(
            event,
            NO_ASSET,
            (0, AssetState::Active),
            requester,
            request_id,
        );
        record.switched_region = Some(name.clone());
        let region_write = crate::store::RegionWrite {
            region: name.to_string(),
            enabled,
        };
        let outcome = Outcome::RegionSet { index, enabled };
        Ok(self.enqueue_with(st, record, (None, Some(region_write)), outcome))
    }

    /// REGISTER: a new asset, active at counter 0, that exists for others once durable.
    fn accept_registration(
        &self,
        st: &mut ShardState,
        asset: Uuid,
        requester: Arc<str>,
        request_id: u64,
    ) -> Result<Accepted, Refusal> {
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
        self.check_room(st)?;
        st.assets
            .insert(asset, AssetEntry::new(AssetState::Active, 0, false));
        let record = self.record(
            AuditEvent::Register,
            asset,
            (0, AssetState::Active),
            requester,
            request_id,
        );
        let write = AssetWrite {
            asset,
            state: AssetState::Active,
            counter: 0,
            insert: true,
        };
        Ok(self.enqueue(st, record, Some(write), Outcome::Registered))
    }

    /// DERIVE: at the counter new derivations use (a rotation in flight: its new one).
    fn accept_derivation(
        &self,
        st: &mut ShardState,
        request: CheckedDerive,
        requester: Arc<str>,
        request_id: u64,
    ) -> Result<Accepted, Refusal> {
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
        self.check_room(st)?;
        let mut record = self.record(
            AuditEvent::Derive,
            request.asset,
            (counter, state),
            requester,
            request_id,
        );
        record.derive = Some(DeriveDetail {
            path: request.path,
            purpose: request.purpose,
            region: request.region,
            ttl_s: request.ttl_s,
            scheme_version: SCHEME_V1,
        });
        Ok(self.enqueue(st, record, None, Outcome::Derived))
    }

    /// A rotation id seen before: the first result again, if it is durable (BUSY while
    /// it commits); an id of another asset is refused.
    fn replay_rotation(
        &self,
        m: &RotationMemo,
        asset: Uuid,
        rotation_id: Uuid,
    ) -> Result<Accepted, Refusal> {
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

    /// ROTATE: the counter moves forward by one once the rotation's record is durable.
    /// Derivations accepted meanwhile use the new counter (they commit after it), and the
    /// asset shows ROTATING. The same rotation id again answers the first result.
    fn accept_rotation(
        &self,
        st: &mut ShardState,
        (asset, rotation_id, expected_counter): (Uuid, Uuid, Option<u64>),
        requester: Arc<str>,
        request_id: u64,
    ) -> Result<Accepted, Refusal> {
        if let Some(m) = st.rotations.by_id.get(&rotation_id) {
            return self.replay_rotation(m, asset, rotation_id);
        }
        self.check_room(st)?;
        let token = st.next_token;
        let entry = durable_entry_mut(&mut st.assets, &asset)?;
        rotatable(entry.state(), &asset)?;
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
        let mut record = self.record(
            AuditEvent::Rotate,
            asset,
            (counter, AssetState::Active),
            requester,
            request_id,
        );
        record.ts_ms = ts_ms;
        record.rotation_id = Some(rotation_id);
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
        let record = self.record(op.event(), asset, (counter, to), requester, request_id);
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

    /// BUSY when the pending queue is full (`limits.max_pending_per_shard`).
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

    /// Queues an accepted operation's record (and its asset's row update) for the
    /// committer; its answer comes once the batch is durable.
    fn enqueue(
        &self,
        st: &mut ShardState,
        record: AuditRecord,
        write: Option<AssetWrite>,
        outcome: Outcome,
    ) -> Accepted {
        self.enqueue_with(st, record, (write, None), outcome)
    }

    fn enqueue_with(
        &self,
        st: &mut ShardState,
        record: AuditRecord,
        (write, region_write): (Option<AssetWrite>, Option<crate::store::RegionWrite>),
        outcome: Outcome,
    ) -> Accepted {
        let (reply, rx) = oneshot::channel();
        st.pending.push_back(PendingOp {
            accepted_at: Instant::now(),
            record,
            write,
            region_write,
            outcome,
            reply,
        });
        self.kick.notify();
        Accepted::AfterCommit(rx)
    }
}

/// Whether an asset in `state` may rotate now.
fn rotatable(state: AssetState, asset: &Uuid) -> Result<(), Refusal> {
    match state {
        AssetState::Active => Ok(()),
        AssetState::Rotating => {
            let mut refusal = Refusal::new(
                Status::Busy,
                format!("a rotation of asset {asset} is being committed; rotate again once it is"),
            );
            refusal.retry_after_ms = 1;
            Err(refusal)
        }
        AssetState::Suspended => Err(Refusal::new(
            Status::AssetSuspended,
            format!("asset {asset} is suspended: resume it before rotating it"),
        )),
        AssetState::Retired => Err(retired(asset)),
    }
}

pub(super) fn retired(asset: &Uuid) -> Refusal {
    Refusal::new(
        Status::AssetRetired,
        format!("asset {asset} is retired: it answers only STATUS"),
    )
}

pub(super) fn durable_entry_mut<'a>(
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

pub(super) fn durable_entry<'a>(
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
