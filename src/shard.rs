//! A shard: the registry of the assets one core owns, the derive path, and group commit.
//!
//! A shard lives on one executor and is `!Send`; it alone reads and writes its assets, so
//! the order in which its core runs operations is the order they happen in. Each accepted
//! operation gets its audit record appended to the shard's pending queue; the shard's
//! committer task seals up to `commit_batch_records_max` of them into a [`CommitBatch`]
//! (after waiting at most `commit_batch_delay_us` for more), numbers them with the shard's
//! sequence, and releases their replies only when the store says the batch is durable
//! (I1). One batch is in flight per shard at a time, so sequence numbers never skip: a
//! batch that fails gives its numbers back.

use crate::audit::{now_ms, AuditEvent, AuditRecord, DeriveDetail};
use crate::kdf::{DerivationKey, DerivedKey, SCHEME_V1};
use crate::lifecycle::AssetState;
use crate::policy::{check_asset_id, CheckedDerive};
use crate::store::{AssetWrite, CommitBatch, ShardSnapshot, ShardStore, StoreError};
use crate::wire::{AssetInfo, Derived, Receipt, Refusal, Reply, Status};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use uuid::Uuid;

/// The answer to an operation.
pub type OpResult = Result<Reply, Refusal>;

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
}

impl ShardOp {
    pub fn asset(&self) -> &Uuid {
        match self {
            ShardOp::Register { asset, .. } | ShardOp::Status { asset } => asset,
            ShardOp::Derive { request, .. } => &request.asset,
        }
    }
}

/// The shard's bounds, from the resolved configuration.
#[derive(Clone, Debug)]
pub struct ShardLimits {
    pub commit_batch_records_max: usize,
    pub commit_batch_delay: Duration,
    pub commit_timeout: Duration,
    pub pending_max: usize,
    pub assets_max: usize,
}

#[derive(Debug)]
struct AssetEntry {
    state: AssetState,
    counter: u64,
    /// `false` while the registration's commit is in flight: the asset does not exist yet
    /// for anyone but a second registration, which is refused.
    durable: bool,
}

struct PendingOp {
    record: AuditRecord,
    write: Option<AssetWrite>,
    key: Option<DerivedKey>,
    reply: oneshot::Sender<OpResult>,
}

struct Waiter {
    seq: u64,
    asset: Uuid,
    counter: u64,
    key: Option<DerivedKey>,
    reply: oneshot::Sender<OpResult>,
}

struct ShardState {
    assets: HashMap<Uuid, AssetEntry>,
    next_seq: u64,
    pending: VecDeque<PendingOp>,
}

/// One core's shard.
pub struct Shard {
    id: u16,
    key: Arc<DerivationKey>,
    regions: Vec<Arc<str>>,
    limits: ShardLimits,
    store: Box<dyn ShardStore>,
    state: RefCell<ShardState>,
    kick: Notify,
}

enum Accepted {
    Now(Reply),
    AfterCommit(oneshot::Receiver<OpResult>),
}

impl Shard {
    pub fn new(
        id: u16,
        snapshot: ShardSnapshot,
        key: Arc<DerivationKey>,
        regions: &[String],
        limits: ShardLimits,
        store: Box<dyn ShardStore>,
    ) -> Shard {
        let assets = snapshot
            .assets
            .into_iter()
            .map(|a| {
                (
                    a.asset,
                    AssetEntry {
                        state: a.state,
                        counter: a.counter,
                        durable: true,
                    },
                )
            })
            .collect();
        Shard {
            id,
            key,
            regions: regions.iter().map(|r| Arc::from(r.as_str())).collect(),
            state: RefCell::new(ShardState {
                assets,
                next_seq: snapshot.last_seq + 1,
                pending: VecDeque::with_capacity(limits.pending_max.min(4096)),
            }),
            limits,
            store,
            kick: Notify::new(),
        }
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn asset_count(&self) -> usize {
        self.state.borrow().assets.len()
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
        match op {
            ShardOp::Status { asset } => {
                check_asset_id(&asset)?;
                let entry = durable_entry(&st.assets, &asset)?;
                Ok(Accepted::Now(Reply::Asset(AssetInfo {
                    asset,
                    state: entry.state,
                    counter: entry.counter,
                    shard: self.id,
                })))
            }
            ShardOp::Register {
                asset,
                requester,
                request_id,
            } => {
                check_asset_id(&asset)?;
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
                st.assets.insert(
                    asset,
                    AssetEntry {
                        state: AssetState::Active,
                        counter: 0,
                        durable: false,
                    },
                );
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
                };
                let write = AssetWrite {
                    asset,
                    state: AssetState::Active,
                    counter: 0,
                    insert: true,
                };
                Ok(self.enqueue(&mut st, record, Some(write), None))
            }
            ShardOp::Derive {
                request,
                requester,
                request_id,
            } => {
                let entry = durable_entry(&st.assets, &request.asset)?;
                match entry.state {
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
                let (state, counter) = (entry.state, entry.counter);
                self.check_room(&st)?;
                let key = self.key.derive(&request.asset, counter, &request.path);
                let region = self
                    .regions
                    .get(request.region as usize)
                    .cloned()
                    .unwrap_or_else(|| Arc::from("?"));
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
                        region,
                        ttl_s: request.ttl_s,
                        scheme_version: SCHEME_V1,
                    }),
                };
                Ok(self.enqueue(&mut st, record, None, Some(key)))
            }
        }
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
        key: Option<DerivedKey>,
    ) -> Accepted {
        let (reply, rx) = oneshot::channel();
        st.pending.push_back(PendingOp {
            record,
            write,
            key,
            reply,
        });
        self.kick.notify_one();
        Accepted::AfterCommit(rx)
    }

    /// The group-commit loop. Runs for the life of the shard on the shard's core.
    pub async fn run_committer(self: Rc<Self>) {
        loop {
            if self.state.borrow().pending.is_empty() {
                self.kick.notified().await;
                continue;
            }
            let delay = self.limits.commit_batch_delay;
            if !delay.is_zero()
                && self.state.borrow().pending.len() < self.limits.commit_batch_records_max
            {
                glommio::timer::sleep(delay).await;
            }
            let (batch, waiters, first_seq) = self.seal();
            let mut commit = self.store.commit(batch);
            let timeout = self.limits.commit_timeout;
            let in_time = futures_lite::future::or(async { Some((&mut commit).await) }, async {
                glommio::timer::sleep(timeout).await;
                None
            })
            .await;
            match in_time {
                Some(Ok(())) => self.release(waiters),
                Some(Err(e)) => self.fail(waiters, first_seq, Some(e)),
                None => {
                    // Too late for the callers: tell them now. The batch's fate decides
                    // only what the shard remembers, so keep waiting for it before the
                    // next batch takes sequence numbers.
                    let registered: Vec<Uuid> = waiters
                        .iter()
                        .filter(|w| w.key.is_none())
                        .map(|w| w.asset)
                        .collect();
                    for w in waiters {
                        let _ = w.reply.send(Err(Refusal::new(
                            Status::StoreUnavailable,
                            format!("commit did not finish within {} ms", timeout.as_millis()),
                        )));
                    }
                    match commit.await {
                        Ok(()) => self.mark_durable(&registered),
                        Err(_) => self.forget(&registered, first_seq),
                    }
                }
            }
        }
    }

    fn seal(&self) -> (CommitBatch, Vec<Waiter>, u64) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        let n = st.pending.len().min(self.limits.commit_batch_records_max);
        let first_seq = st.next_seq;
        let mut batch = CommitBatch {
            shard: self.id,
            records: Vec::with_capacity(n),
            asset_writes: Vec::new(),
        };
        let mut waiters = Vec::with_capacity(n);
        for mut op in st.pending.drain(..n) {
            let seq = st.next_seq;
            st.next_seq += 1;
            op.record.seq = seq;
            waiters.push(Waiter {
                seq,
                asset: op.record.asset,
                counter: op.record.counter,
                key: op.key,
                reply: op.reply,
            });
            if let Some(w) = op.write {
                batch.asset_writes.push(w);
            }
            batch.records.push(op.record);
        }
        (batch, waiters, first_seq)
    }

    fn release(&self, waiters: Vec<Waiter>) {
        let registered: Vec<Uuid> = waiters
            .iter()
            .filter(|w| w.key.is_none())
            .map(|w| w.asset)
            .collect();
        self.mark_durable(&registered);
        for w in waiters {
            let reply = match w.key {
                Some(key) => Reply::Derived(Derived {
                    counter: w.counter,
                    scheme_version: SCHEME_V1,
                    key,
                    receipt: Receipt {
                        shard: self.id,
                        seq: w.seq,
                    },
                }),
                None => Reply::Asset(AssetInfo {
                    asset: w.asset,
                    state: AssetState::Active,
                    counter: 0,
                    shard: self.id,
                }),
            };
            // The caller may have gone (connection closed): its record is durable anyway.
            let _ = w.reply.send(Ok(reply));
        }
    }

    fn fail(&self, waiters: Vec<Waiter>, first_seq: u64, error: Option<StoreError>) {
        let registered: Vec<Uuid> = waiters
            .iter()
            .filter(|w| w.key.is_none())
            .map(|w| w.asset)
            .collect();
        self.forget(&registered, first_seq);
        let message = match error {
            Some(e) => format!("commit failed: {e}"),
            None => "commit failed".to_owned(),
        };
        tracing::warn!(shard = self.id, batch = waiters.len(), %message, "batch not committed");
        for w in waiters {
            let _ = w
                .reply
                .send(Err(Refusal::new(Status::StoreUnavailable, message.clone())));
        }
    }

    fn mark_durable(&self, registered: &[Uuid]) {
        let mut st = self.state.borrow_mut();
        for asset in registered {
            if let Some(e) = st.assets.get_mut(asset) {
                e.durable = true;
            }
        }
    }

    /// Forgets what a failed batch would have done and gives back its sequence numbers.
    /// Later operations are still pending (not sealed), so renumbering them is safe.
    fn forget(&self, registered: &[Uuid], first_seq: u64) {
        let mut st = self.state.borrow_mut();
        for asset in registered {
            st.assets.remove(asset);
        }
        st.next_seq = first_seq;
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
