//! A commit thread that dies (returns or unwinds) while jobs are still queued.
//!
//! The store keeps its own queue handle, so the queue outlives the commit thread: without
//! a guard, a job queued after the thread's last `take` keeps its completer forever and the
//! shard's `Pending` never resolves (loom reports a deadlock). `close_on_drop` closes the
//! queue and drops the orphans, so every shard gets `Abandoned` and later submits `Closed`.

use custody_loom_tests::handoff::{completion, CommitQueue, Completer};
use loom::future::block_on;
use loom::thread;

type Job = (u32, Completer<u32>);

#[test]
fn dead_commit_thread_abandons_queued_jobs() {
    loom::model(|| {
        // The store's handle: it stays alive after the commit thread is gone.
        let queue = CommitQueue::<Job>::new(2);
        let commit_queue = queue.clone();
        let committer = thread::spawn(move || {
            let _closer = commit_queue.close_on_drop();
            let mut jobs = Vec::new();
            if commit_queue.take(1, &mut jobs) {
                // The commit "panics": the thread unwinds, dropping what it took.
                drop(jobs);
            }
        });
        let (d1, p1) = completion();
        let (d2, p2) = completion();
        let s1 = queue.submit((1, d1)).is_ok();
        let s2 = queue.submit((2, d2)).is_ok();
        // Taken and dropped, or orphaned in the queue: either way Abandoned, never a hang.
        if s1 {
            assert!(block_on(p1).is_err());
        }
        if s2 {
            assert!(block_on(p2).is_err());
        }
        committer.join().unwrap();
        assert!(queue.is_empty());
    });
}
