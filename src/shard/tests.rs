//! The shard against a scripted store: the fault-injection seam for commit failures
//! and slow commits that a real SQLite file cannot produce on demand.

use super::*;
use crate::audit::AuditRecord;
use crate::kdf::DerivationPath;
use crate::lifecycle;
use crate::policy::Purpose;
use crate::store::LocalFuture;
use crate::store::{AssetWrite, CommitBatch, RecentRotation, StoreError};
use std::cell::Cell;
use std::rc::Rc;
use tokio::sync::oneshot;

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
        let (x, y) = futures_lite::future::zip(s.execute(derive(a)), s.execute(derive(a))).await;
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
