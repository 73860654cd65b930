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
use crate::lifecycle::AssetState;
use crate::policy::CheckedDerive;
use crate::signal::LocalSignal;
use crate::store::{AssetWrite, CommitBatch, ShardSnapshot, ShardStore, StoreError};
use crate::wire::{AssetInfo, Receipt, Refusal, Status};
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardReply {
    Asset(AssetInfo),
    Derived { counter: u64, receipt: Receipt },
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
    pub commit_batches_inflight_max: usize,
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

/// What an accepted operation answers once its record is durable.
enum Outcome {
    Registered,
    Derived,
}

/// An accepted operation waiting for its batch.
struct PendingOp {
    accepted_at: Instant,
    record: AuditRecord,
    write: Option<AssetWrite>,
    outcome: Outcome,
    reply: oneshot::Sender<OpResult>,
}

/// An operation whose record is in a sealed batch.
struct Waiter {
    seq: u64,
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
    /// A batch failed: once no batch is in flight, numbering restarts at `durable_next`.
    resync: bool,
    pending: VecDeque<PendingOp>,
    inflight_batches: usize,
}

/// One core's shard.
pub struct Shard {
    id: u16,
    limits: ShardLimits,
    store: Box<dyn ShardStore>,
    state: RefCell<ShardState>,
    kick: LocalSignal,
    commit_stats: RefCell<CommitStats>,
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
            state: RefCell::new(ShardState {
                assets,
                next_seq: snapshot.last_seq + 1,
                durable_next: snapshot.last_seq + 1,
                resync: false,
                pending: VecDeque::with_capacity(limits.pending_max.min(4096)),
                inflight_batches: 0,
            }),
            limits,
            store,
            kick: LocalSignal::new(),
            commit_stats: RefCell::new(CommitStats::default()),
        }
    }

    /// The commit figures since the last call, which starts new ones.
    pub fn take_commit_stats(&self) -> CommitStats {
        std::mem::take(&mut *self.commit_stats.borrow_mut())
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
                let entry = durable_entry(&st.assets, &asset)?;
                Ok(Accepted::Now(ShardReply::Asset(AssetInfo {
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
                Ok(self.enqueue(&mut st, record, Some(write), Outcome::Registered))
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
                };
                Ok(self.enqueue(&mut st, record, None, Outcome::Derived))
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
        outcome: Outcome,
    ) -> Accepted {
        let (reply, rx) = oneshot::channel();
        st.pending.push_back(PendingOp {
            accepted_at: Instant::now(),
            record,
            write,
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
            if resync && inflight == 0 {
                // Every batch sealed before the failure has been heard from: number again
                // from the last durable record.
                let mut st = self.state.borrow_mut();
                st.next_seq = st.durable_next;
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
            if let Outcome::Registered = op.outcome {
                st.assets.remove(&op.record.asset);
            }
            let _ = op.reply.send(Err(Refusal::new(
                Status::StoreUnavailable,
                format!(
                    "not committed within {} ms (the store is slow or down)",
                    self.limits.commit_timeout.as_millis()
                ),
            )));
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
        self.commit_stats.borrow_mut().record(
            waiters.len(),
            sealed_at.elapsed(),
            matches!(in_time, Some(Ok(()))),
        );
        match in_time {
            Some(Ok(())) => {
                self.settle(&waiters, true);
                self.release(waiters);
            }
            Some(Err(e)) => {
                self.settle(&waiters, false);
                if let StoreError::SequenceGap { expected, .. } = e {
                    // The store says where its log continues: everything before that is
                    // durable, whatever this shard heard about it.
                    let mut st = self.state.borrow_mut();
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
                    settled.push((w.seq, w.asset, matches!(w.outcome, Outcome::Registered)));
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
        };
        let mut waiters = Vec::with_capacity(n);
        st.inflight_batches += 1;
        for mut op in st.pending.drain(..n) {
            let seq = st.next_seq;
            st.next_seq += 1;
            op.record.seq = seq;
            waiters.push(Waiter {
                seq,
                asset: op.record.asset,
                counter: op.record.counter,
                outcome: op.outcome,
                reply: op.reply,
            });
            if let Some(w) = op.write {
                batch.asset_writes.push(w);
            }
            batch.records.push(op.record);
        }
        (batch, waiters)
    }

    /// Brings the registry in line with a batch's fate.
    fn settle(&self, waiters: &[Waiter], durable: bool) {
        self.settle_parts(
            waiters
                .iter()
                .map(|w| (w.seq, w.asset, matches!(w.outcome, Outcome::Registered))),
            durable,
        );
    }

    /// `parts`: (sequence number, asset, is a registration) of each record of the batch.
    /// Durable: registrations become real and the durable sequence moves forward. Not
    /// durable: registrations are forgotten and numbering resynchronises.
    fn settle_parts(&self, parts: impl Iterator<Item = (u64, Uuid, bool)>, durable: bool) {
        let mut st = self.state.borrow_mut();
        let mut last_seq = None;
        for (seq, asset, registration) in parts {
            last_seq = Some(seq);
            if !registration {
                continue;
            }
            if durable {
                if let Some(e) = st.assets.get_mut(&asset) {
                    e.durable = true;
                }
            } else {
                st.assets.remove(&asset);
            }
        }
        if durable {
            if let Some(last) = last_seq {
                st.durable_next = st.durable_next.max(last + 1);
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
                    },
                },
                Outcome::Registered => ShardReply::Asset(AssetInfo {
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
    }

    struct ScriptedStore(Rc<Script>);

    impl ShardStore for ScriptedStore {
        fn load(&self) -> LocalFuture<Result<ShardSnapshot, StoreError>> {
            Box::pin(async { Ok(ShardSnapshot::default()) })
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
        }
    }

    fn shard(script: &Rc<Script>, limits: ShardLimits) -> Rc<Shard> {
        let shard = Rc::new(Shard::new(
            0,
            ShardSnapshot::default(),
            limits,
            Box::new(ScriptedStore(script.clone())),
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
