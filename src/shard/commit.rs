//! The committer: one task per shard that seals the pending records into batches
//! (numbered with the shard's sequence and chained), hands them to the store, and settles
//! each batch's fate: the registry brought in line, the answers released only once the
//! batch is durable (I1). After a failure it waits for every batch in flight and numbers
//! again from the last durable record, so the log never has a gap; after a commit reported
//! failed that had landed, it re-reads the shard from the store.

use super::registry::{AssetEntry, Outcome, RotationIndex};
use super::{OpResult, Shard, ShardReply, ShardState};
use crate::audit::now_ms;
use crate::lifecycle::AssetState;
use crate::store::{CommitBatch, StoreError};
use crate::wire::{AssetInfo, Receipt, Refusal, Rotated, Status};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

/// What the callers of a batch the store did not commit hear: NOT_ACTIVE when the lease
/// was lost (nothing was written: the request may go to the active as it is), else
/// STORE_UNAVAILABLE.
fn refusal_of(e: &StoreError, message: &str) -> Refusal {
    match e {
        StoreError::Fenced { .. } => Refusal::not_active(message, None),
        _ => Refusal::new(Status::StoreUnavailable, message),
    }
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

impl Shard {
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
                self.rereads.set(self.rereads.get() + 1);
                // What the store holds now is what the shard holds: its last refusal
                // (a batch fenced before a takeover, say) no longer says anything.
                self.figures.borrow_mut().store_ok = true;
                self.reread_done.notify();
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
        self.count_commit(waiters.len(), sealed_at.elapsed(), committed);
        match in_time {
            Some(Ok(())) => {
                self.settle(&waiters, true);
                self.release(waiters);
            }
            Some(Err(e)) => self.fail_batch(waiters, e),
            None => {
                // Too late for the callers: tell them now (the outcome is unknown to
                // them). The batch's fate still decides what the shard remembers, and its
                // in-flight slot is kept until that is known.
                let settled = self.answer_late(waiters, timeout);
                let durable = commit.await.is_ok();
                self.settle_parts(settled.into_iter(), durable);
            }
        }
        let mut st = self.state.borrow_mut();
        assert!(
            st.inflight_batches > 0,
            "shard {}: a batch finished that was not in flight",
            self.id
        );
        st.inflight_batches -= 1;
        drop(st);
        self.kick.notify();
    }

    /// The commit's figures: its latency and size when durable, a failure otherwise.
    fn count_commit(&self, records: usize, took: Duration, committed: bool) {
        self.commit_stats
            .borrow_mut()
            .record(records, took, committed);
        let mut f = self.figures.borrow_mut();
        f.store_ok = committed;
        if committed {
            f.commit.record(took);
            f.batch_records.saturating_record(records as u64);
            f.batch_records_sum += records as u64;
        } else {
            f.commits_failed += 1;
        }
    }

    /// A batch the store refused: its operations undone and answered STORE_UNAVAILABLE.
    fn fail_batch(&self, waiters: Vec<Waiter>, e: StoreError) {
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
        if let StoreError::LeaseLapsed { .. } = e {
            // Durable, but not acknowledged: the registry no longer says what the store
            // holds, so the shard re-reads it before it accepts anything more.
            self.state.borrow_mut().reload = true;
        }
        let message = format!("commit failed: {e}");
        tracing::warn!(shard = self.id, batch = waiters.len(), %message, "batch not committed");
        for w in waiters {
            let _ = w.reply.send(Err(refusal_of(&e, &message)));
        }
    }

    /// Re-reads the shard from the store once every batch in flight has been heard from,
    /// and resolves when a re-read that began after this call has completed (a takeover:
    /// the new active's shards load what the previous one left).
    pub async fn reread(&self) {
        let before = self.rereads.get();
        self.state.borrow_mut().reload = true;
        self.kick.notify();
        while self.rereads.get() == before {
            self.reread_done.wait().await;
        }
    }

    /// A batch whose commit outlived the commit timeout: its callers are answered now, and
    /// what is needed to settle it once the store answers is kept.
    fn answer_late(&self, waiters: Vec<Waiter>, timeout: Duration) -> Vec<Settled> {
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
        settled
    }

    /// Seals up to `commit_batch_records_max` pending records into a batch: numbered from
    /// the shard's next sequence number, each chained to the one before, with one row
    /// update per asset and per region, and the batch's checkpoint.
    fn seal(&self) -> (CommitBatch, Vec<Waiter>) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        self.assert_sealable(st);
        let n = st.pending.len().min(self.limits.commit_batch_records_max);
        let first_seq = st.next_seq;
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
                fold_region_write(&mut batch.region_writes, w);
            }
            if let Some(w) = op.write {
                fold_asset_write(&mut batch.asset_writes, &mut written, w);
            }
            batch.records.push(op.record);
        }
        // Sequence continuity: the batch's records are numbered one after another from
        // where the last sealed batch ended.
        assert_eq!(
            st.next_seq,
            first_seq + n as u64,
            "shard {}: numbering skipped",
            self.id
        );
        debug_assert!(batch
            .records
            .iter()
            .enumerate()
            .all(|(i, r)| r.seq == first_seq + i as u64));
        batch.checkpoint = self.checkpoint(&batch, &st.head);
        (batch, waiters)
    }

    /// What must hold whenever a batch is sealed: a free in-flight slot, no failure
    /// still to resynchronise from, and, with no batch in flight, numbering and chaining
    /// that continue exactly from the last durable record (the head is the durable head,
    /// as after every re-read and resynchronisation).
    fn assert_sealable(&self, st: &ShardState) {
        assert!(
            !st.resync && !st.reload,
            "shard {}: sealing before the resync or re-read",
            self.id
        );
        assert!(
            st.inflight_batches < self.limits.commit_batches_inflight_max,
            "shard {}: sealing with every in-flight slot taken",
            self.id
        );
        if st.inflight_batches == 0 {
            assert_eq!(
                (st.next_seq, st.head),
                (st.durable_next, st.durable_head),
                "shard {}: with no batch in flight, the next record must follow the last durable one",
                self.id
            );
        }
        assert!(
            st.next_seq >= st.durable_next,
            "shard {}: numbering behind the durable log",
            self.id
        );
    }

    /// The checkpoint: the batch's last position, authenticated (none while sealed; a later
    /// checkpoint covers these records through the chain).
    fn checkpoint(&self, batch: &CommitBatch, head: &[u8; 32]) -> Option<crate::store::Checkpoint> {
        let (last, signer) = (batch.records.last()?, self.signer.as_ref()?);
        let mac = signer.sign(self.id, last.seq, head)?;
        Some(crate::store::Checkpoint {
            shard: self.id,
            seq: last.seq,
            hash: *head,
            mac,
            ts_ms: now_ms(),
        })
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
                    self.settle_lifecycle(st, &part, token, durable)
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

    /// A lifecycle operation's fate. Durable: the asset's durable state and counter become
    /// the operation's (settles come in sequence order, so it is the oldest in flight), and
    /// a rotation's id is remembered with its record. Not durable: it is undone with
    /// everything accepted on top of it.
    fn settle_lifecycle(&self, st: &mut ShardState, part: &Settled, token: u64, durable: bool) {
        if !durable {
            undo_lifecycle(
                st,
                &part.asset,
                token,
                "an earlier lifecycle operation of this asset was not committed",
            );
            if let Outcome::Rotated { rotation_id, .. } = part.outcome {
                st.rotations.by_id.remove(&rotation_id);
            }
            return;
        }
        if let Some(e) = st.assets.get_mut(&part.asset) {
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

/// One write per region per batch: a later switch of the same region replaces the earlier.
fn fold_region_write(writes: &mut Vec<crate::store::RegionWrite>, w: crate::store::RegionWrite) {
    match writes.iter_mut().find(|r| r.region == w.region) {
        Some(earlier) => earlier.enabled = w.enabled,
        None => writes.push(w),
    }
}

/// One write per asset per batch: the last state and counter win; a registration stays
/// an insert.
fn fold_asset_write(
    writes: &mut Vec<crate::store::AssetWrite>,
    written: &mut HashMap<Uuid, usize>,
    w: crate::store::AssetWrite,
) {
    match written.get(&w.asset) {
        Some(&at) => {
            let earlier = &mut writes[at];
            earlier.state = w.state;
            earlier.counter = w.counter;
            earlier.insert |= w.insert;
        }
        None => {
            written.insert(w.asset, writes.len());
            writes.push(w);
        }
    }
}
