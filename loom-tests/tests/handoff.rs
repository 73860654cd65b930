//! Loom models of the hand-off between a shard (executor thread) and the store's commit
//! thread: `CommitQueue` and `completion()` from `src/store/handoff.rs`, compiled against
//! loom's `Arc`/`Mutex`/`Condvar` (see `src/lib.rs`).
//!
//! Every model is explored over all interleavings loom finds (bounded by `PREEMPTIONS`).
//! A lost wake-up shows up as loom's "deadlock" failure: every thread is blocked, the
//! shard in `block_on` waiting for a wake that never comes.

use custody_loom_tests::handoff::{
    completion, Abandoned, Bell, CommitQueue, Completer, SubmitError,
};
use loom::future::block_on;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

/// Explores every interleaving (no preemption bound unless `LOOM_MAX_PREEMPTIONS` is set).
/// The two- and three-thread models below are small enough for that.
fn model<F>(f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    loom::model::Builder::new().check(f);
}

/// Preemption bound for the one model too big to explore exhaustively (three threads, a
/// queue and two completions): every interleaving with at most this many preemptions.
/// The bugs these paths can have need one or two preemptions at the wrong place.
const PREEMPTIONS: usize = 3;

fn model_bounded<F>(f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(PREEMPTIONS);
    }
    builder.check(f);
}

/// A job as the store sees it: an id (standing for the batch) and who to tell.
type Job = (u32, Completer<u32>);

/// Polls the inner future; the first time it returns `Pending`, raises `parked` so another
/// thread can act only once the shard is known to be waiting.
struct NotePending<F> {
    inner: Pin<Box<F>>,
    parked: Arc<AtomicBool>,
}

impl<F: Future> Future for NotePending<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let r = self.inner.as_mut().poll(cx);
        if r.is_pending() {
            self.parked.store(true, Ordering::SeqCst);
        }
        r
    }
}

/// Spins (yielding to loom) until `flag` is set.
fn wait_for(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        thread::yield_now();
    }
}

fn noop_waker() -> Waker {
    fn clone(_: *const ()) -> RawWaker {
        RawWaker::new(std::ptr::null(), &VTABLE)
    }
    fn noop(_: *const ()) {}
    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, noop, noop, noop);
    // SAFETY: every vtable function ignores the (null) data pointer.
    unsafe { Waker::from_raw(RawWaker::new(std::ptr::null(), &VTABLE)) }
}

// ---------------------------------------------------------------------------------------
// 1. No lost wake-up.
// ---------------------------------------------------------------------------------------

/// The commit thread completes before the shard ever polls: the first poll sees the value.
#[test]
fn wakeup_complete_before_first_poll() {
    model(|| {
        let (done, pending) = completion::<u32>();
        let committer = thread::spawn(move || done.complete(7));
        committer.join().unwrap();
        assert_eq!(block_on(pending), Ok(7));
    });
}

/// The shard has polled, registered its waker and parked; only then does the commit thread
/// complete. The wake must reach the parked shard.
#[test]
fn wakeup_complete_while_pending() {
    model(|| {
        let (done, pending) = completion::<u32>();
        let parked = Arc::new(AtomicBool::new(false));
        let seen = parked.clone();
        let committer = thread::spawn(move || {
            wait_for(&seen);
            done.complete(7);
        });
        let fut = NotePending {
            inner: Box::pin(pending),
            parked,
        };
        assert_eq!(block_on(fut), Ok(7));
        committer.join().unwrap();
    });
}

/// No order imposed: the completion may land between the shard's check of the slot and
/// its waker registration, or anywhere else.
#[test]
fn wakeup_any_order() {
    model(|| {
        let (done, pending) = completion::<u32>();
        let committer = thread::spawn(move || done.complete(7));
        assert_eq!(block_on(pending), Ok(7));
        committer.join().unwrap();
    });
}

/// The future is first polled by one task (waker A), then awaited by another (waker B):
/// the completer must wake B, not the stale A (the `will_wake` renewal in `poll`).
#[test]
fn wakeup_goes_to_latest_waker() {
    model(|| {
        let (done, pending) = completion::<u32>();
        let committer = thread::spawn(move || done.complete(7));
        let mut pending = Box::pin(pending);
        let stale = noop_waker();
        let first = pending.as_mut().poll(&mut Context::from_waker(&stale));
        let result = match first {
            Poll::Ready(v) => v,
            Poll::Pending => block_on(pending),
        };
        assert_eq!(result, Ok(7));
        committer.join().unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// 2. No reply before its commit.
// ---------------------------------------------------------------------------------------

/// The whole path: the shard submits a job and awaits it; the commit thread takes it,
/// "commits" (sets `committed`), then completes. A shard that sees `Ok` must also see the
/// commit. `committed` is read and written `Relaxed`, so only the hand-off itself (the slot
/// lock) can order the two: loom would show the shard a stale `false` otherwise.
#[test]
fn no_reply_before_commit() {
    model(|| {
        let queue = CommitQueue::<Job>::new(1);
        let committed = Arc::new(AtomicBool::new(false));

        let commit_queue = queue.clone();
        let commit_flag = committed.clone();
        let committer = thread::spawn(move || {
            let mut jobs = Vec::new();
            while commit_queue.take(1, &mut jobs) {
                for (id, done) in jobs.drain(..) {
                    commit_flag.store(true, Ordering::Relaxed);
                    done.complete(id);
                }
            }
        });

        let (done, pending) = completion();
        queue
            .submit((1, done))
            .map_err(|_| ())
            .expect("empty queue accepts");
        let result = block_on(pending);
        assert_eq!(result, Ok(1));
        assert!(
            committed.load(Ordering::Relaxed),
            "shard saw its reply before the commit"
        );
        queue.close();
        committer.join().unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// 3. No batch committed twice (nor lost, nor answered to the wrong shard).
// ---------------------------------------------------------------------------------------

#[test]
fn each_batch_committed_once() {
    model_bounded(|| {
        let queue = CommitQueue::<Job>::new(2);
        let log = Arc::new(Mutex::new(Vec::<u32>::new()));

        let producers: Vec<_> = [1u32, 2]
            .into_iter()
            .map(|id| {
                let q = queue.clone();
                thread::spawn(move || {
                    let (done, pending) = completion();
                    q.submit((id, done)).map_err(|_| ()).expect("room for both");
                    // The commit thread answers each job with 10 × its id.
                    assert_eq!(block_on(pending), Ok(id * 10), "wrong reply for {id}");
                })
            })
            .collect();

        // The commit thread (this one): max = 1 first, then 2, until both are taken.
        let mut taken = 0;
        let mut max = 1;
        let mut jobs = Vec::new();
        while taken < 2 {
            assert!(queue.take(max, &mut jobs), "queue closed early");
            assert!(
                !jobs.is_empty() && jobs.len() <= max,
                "take broke its bound"
            );
            for (id, done) in jobs.drain(..) {
                taken += 1;
                log.lock().unwrap().push(id);
                done.complete(id * 10);
            }
            max = 2;
        }
        for p in producers {
            p.join().unwrap();
        }
        assert!(queue.is_empty(), "a job was left behind");
        let mut committed = log.lock().unwrap().clone();
        committed.sort_unstable();
        assert_eq!(committed, vec![1, 2], "each id committed exactly once");
    });
}

// ---------------------------------------------------------------------------------------
// 4. A dropped completer resolves the shard's future with Abandoned.
// ---------------------------------------------------------------------------------------

/// The commit thread drops the completer without a result (it died mid-batch).
#[test]
fn dropped_completer_abandons() {
    model(|| {
        let (done, pending) = completion::<u32>();
        let committer = thread::spawn(move || drop(done));
        assert_eq!(block_on(pending), Err(Abandoned));
        committer.join().unwrap();
    });
}

/// The commit thread exits with a job still queued: the last queue handle's drop drops the
/// job's completer, and the shard gets Abandoned rather than waiting forever.
#[test]
fn queued_job_dropped_with_queue_abandons() {
    model(|| {
        let queue = CommitQueue::<Job>::new(1);
        let (done, pending) = completion();
        queue
            .submit((1, done))
            .map_err(|_| ())
            .expect("empty queue accepts");
        let commit_queue = queue.clone();
        drop(queue);
        let committer = thread::spawn(move || drop(commit_queue));
        assert_eq!(block_on(pending), Err(Abandoned));
        committer.join().unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// 5. Bounded, and closing.
// ---------------------------------------------------------------------------------------

#[test]
fn bounded_and_close() {
    model(|| {
        let queue = CommitQueue::<u32>::new(1);
        assert_eq!(queue.submit(1), Ok(()));
        // The consumer has not taken yet: the second job is refused and handed back.
        assert_eq!(queue.submit(2), Err(SubmitError::Full(2)));
        assert_eq!(queue.len(), 1);

        let commit_queue = queue.clone();
        let committer = thread::spawn(move || {
            let mut all = Vec::new();
            let mut jobs = Vec::new();
            // Takes job 1, then blocks on the empty queue until close() wakes it.
            while commit_queue.take(2, &mut jobs) {
                all.append(&mut jobs);
            }
            // Once false, it stays false.
            assert!(!commit_queue.take(2, &mut jobs));
            all
        });

        queue.close();
        assert_eq!(queue.submit(3), Err(SubmitError::Closed(3)));
        // close() does not discard what was queued: the consumer drains job 1, then stops.
        assert_eq!(committer.join().unwrap(), vec![1]);
        assert!(queue.is_empty());
    });
}

/// Close races a consumer already blocked on the empty queue: it must wake and return false.
#[test]
fn close_wakes_blocked_take() {
    model(|| {
        let queue = CommitQueue::<u32>::new(1);
        let commit_queue = queue.clone();
        let committer = thread::spawn(move || {
            let mut jobs = Vec::new();
            let more = commit_queue.take(1, &mut jobs);
            (more, jobs)
        });
        queue.close();
        assert_eq!(committer.join().unwrap(), (false, vec![]));
    });
}

/// A submit racing a consumer blocked on the empty queue must wake it (submit's notify).
#[test]
fn submit_wakes_blocked_take() {
    model(|| {
        let queue = CommitQueue::<u32>::new(1);
        let commit_queue = queue.clone();
        let committer = thread::spawn(move || {
            let mut jobs = Vec::new();
            let more = commit_queue.take(1, &mut jobs);
            (more, jobs)
        });
        assert_eq!(queue.submit(5), Ok(()));
        assert_eq!(committer.join().unwrap(), (true, vec![5]));
    });
}

/// Loom needs every execution of a model to be deterministic, and `linger` reads the
/// real clock for its deadline: a deadline no model run can reach keeps the clock out of
/// the explored paths (loom's `wait_timeout` never times out anyway).
const LINGER_NEVER_EXPIRES: std::time::Duration = std::time::Duration::from_secs(3600);

/// Cross-shard group commit: after taking one shard's batch, the commit thread lingers
/// for the other active shard's batch. Loom's `wait_timeout` never times out, so this
/// checks the waking side: a batch submitted while the commit thread lingers is always
/// noticed (no lost wake-up), taken once, and in FIFO order with the first.
#[test]
fn linger_collects_the_other_shards_batch() {
    model(|| {
        let queue: CommitQueue<u32> = CommitQueue::new(4);
        queue.submit(1).unwrap();
        let producer = {
            let queue = queue.clone();
            thread::spawn(move || queue.submit(2).unwrap())
        };
        let mut out = Vec::new();
        assert!(queue.take(8, &mut out));
        queue.linger(8, &mut out, 2, LINGER_NEVER_EXPIRES);
        producer.join().unwrap();
        assert_eq!(out, vec![1, 2]);
        assert!(queue.is_empty());
    });
}

/// Lingering never takes more than `max`, and a close ends it at once.
#[test]
fn linger_respects_max_and_close() {
    model(|| {
        let queue: CommitQueue<u32> = CommitQueue::new(4);
        for id in 1..=3 {
            queue.submit(id).unwrap();
        }
        let mut out = Vec::new();
        assert!(queue.take(1, &mut out));
        queue.linger(2, &mut out, 5, LINGER_NEVER_EXPIRES);
        assert_eq!(out, vec![1, 2]);
        let closer = {
            let queue = queue.clone();
            thread::spawn(move || queue.close())
        };
        let mut more = Vec::new();
        assert!(queue.take(8, &mut more));
        queue.linger(8, &mut more, 5, LINGER_NEVER_EXPIRES);
        closer.join().unwrap();
        assert_eq!(more, vec![3]);
    });
}

/// The drain's bell: two cores wait on it while main rings it, in any order (a core may
/// start waiting before the ring, during it or after it). Neither core may be left
/// waiting: a lost wake-up is loom's deadlock.
#[test]
fn bell_wakes_every_waiter_whenever_it_started_waiting() {
    model(|| {
        let bell = Arc::new(Bell::new());
        let cores: Vec<_> = (0..2)
            .map(|_| {
                let bell = bell.clone();
                thread::spawn(move || block_on(bell.wait()))
            })
            .collect();
        bell.raise();
        for core in cores {
            assert_eq!(core.join().unwrap(), Ok(()));
        }
    });
}

/// A bell dropped unrung (the process going away) releases its waiters with `Abandoned`.
#[test]
fn bell_dropped_unrung_releases_its_waiters() {
    model(|| {
        let bell = Bell::new();
        let wait = bell.wait();
        let core = thread::spawn(move || block_on(wait));
        drop(bell);
        assert_eq!(core.join().unwrap(), Err(Abandoned));
    });
}
