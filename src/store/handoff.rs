//! The hand-offs between the shards (executor threads) and the threads beside them.
//!
//! Three pieces, all bounded and all free of executor blocking:
//! - [`CommitQueue`]: shards `submit` jobs without ever blocking (a full queue is refused,
//!   and the shard answers BUSY); the commit thread `take`s them in FIFO order, blocking
//!   only itself. A job is taken exactly once.
//! - [`completion`]: a one-shot slot the commit thread fills after the commit returns; the
//!   shard awaits it as a future. The waker is registered under the same lock the result
//!   is written under, so a wake-up cannot be lost. A completer dropped without a result
//!   (the commit thread died) resolves the future with [`Abandoned`], never hangs it.
//! - [`Bell`]: a signal raised once by one thread (main, on SIGTERM: the drain) that every
//!   executor waiting on it hears, through a [`completion`] each; an executor that starts
//!   waiting after the ring hears it at once. Nothing polls for it.
//!
//! This file is compiled twice: into the appliance with `std::sync`, and into
//! `loom-tests/` with loom's `sync`, where every interleaving of these paths is checked.

use super::sync::{Arc, Condvar, Mutex};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Why a job was not queued. The job comes back so nothing is lost silently.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError<J> {
    /// The queue holds its bound of jobs.
    Full(J),
    /// The commit thread is gone.
    Closed(J),
}

struct QueueState<J> {
    jobs: VecDeque<J>,
    capacity: usize,
    closed: bool,
}

struct QueueShared<J> {
    state: Mutex<QueueState<J>>,
    ready: Condvar,
}

/// A bounded multi-producer queue with one consuming thread.
pub struct CommitQueue<J> {
    shared: Arc<QueueShared<J>>,
}

impl<J> Clone for CommitQueue<J> {
    fn clone(&self) -> Self {
        CommitQueue {
            shared: self.shared.clone(),
        }
    }
}

impl<J> CommitQueue<J> {
    pub fn new(capacity: usize) -> CommitQueue<J> {
        assert!(capacity > 0, "a commit queue needs room for one job");
        CommitQueue {
            shared: Arc::new(QueueShared {
                state: Mutex::new(QueueState {
                    jobs: VecDeque::with_capacity(capacity),
                    capacity,
                    closed: false,
                }),
                ready: Condvar::new(),
            }),
        }
    }

    /// Queues a job without blocking.
    pub fn submit(&self, job: J) -> Result<(), SubmitError<J>> {
        let mut state = lock(&self.shared.state);
        if state.closed {
            return Err(SubmitError::Closed(job));
        }
        if state.jobs.len() >= state.capacity {
            return Err(SubmitError::Full(job));
        }
        state.jobs.push_back(job);
        drop(state);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Blocks the calling (commit) thread until at least one job is queued, then moves up
    /// to `max` jobs into `out` in FIFO order. Returns `false` once the queue is closed
    /// and empty: the thread should exit.
    pub fn take(&self, max: usize, out: &mut Vec<J>) -> bool {
        let mut state = lock(&self.shared.state);
        loop {
            if !state.jobs.is_empty() {
                let n = state.jobs.len().min(max.max(1));
                out.extend(state.jobs.drain(..n));
                return true;
            }
            if state.closed {
                return false;
            }
            state = match self.shared.ready.wait(state) {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }

    /// After `take`: waits until `out` holds `want` jobs or `linger` has passed, moving
    /// jobs as they arrive (at most `max` in all). Group commit across shards: shards
    /// that committed together submit their next batches within microseconds of each
    /// other, and one transaction is cheaper than two.
    pub fn linger(&self, max: usize, out: &mut Vec<J>, want: usize, linger: std::time::Duration) {
        let want = want.min(max);
        if out.len() >= want || linger.is_zero() {
            return;
        }
        let deadline = std::time::Instant::now() + linger;
        let mut state = lock(&self.shared.state);
        loop {
            let room = max.saturating_sub(out.len());
            let n = state.jobs.len().min(room);
            out.extend(state.jobs.drain(..n));
            if out.len() >= want || state.closed {
                return;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return;
            }
            state = match self.shared.ready.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Refuses further jobs; the commit thread drains what is queued, then stops.
    pub fn close(&self) {
        lock(&self.shared.state).closed = true;
        self.shared.ready.notify_all();
    }

    /// Jobs waiting (for status and metrics).
    pub fn len(&self) -> usize {
        lock(&self.shared.state).jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// For the commit thread: a guard that, when dropped (the thread returns or unwinds),
    /// closes the queue and drops every job still queued, so their completers publish
    /// [`Abandoned`] instead of leaving shards waiting on a thread that is gone.
    pub fn close_on_drop(&self) -> CloseOnDrop<J> {
        CloseOnDrop {
            queue: self.clone(),
        }
    }
}

/// See [`CommitQueue::close_on_drop`].
pub struct CloseOnDrop<J> {
    queue: CommitQueue<J>,
}

impl<J> Drop for CloseOnDrop<J> {
    fn drop(&mut self) {
        let orphans = {
            let mut state = lock(&self.queue.shared.state);
            state.closed = true;
            std::mem::take(&mut state.jobs)
        };
        self.queue.shared.ready.notify_all();
        // Dropped outside the queue lock: each completer publishes under its own slot lock.
        drop(orphans);
    }
}

/// A signal raised once, heard by every waiter: [`Bell::wait`] is a future that resolves
/// once [`Bell::raise`] has run, whichever comes first. Bounded by its waiters (one per
/// executor).
pub struct Bell {
    /// The completions of those waiting, until the ring (`None` once rung). Taken under
    /// the lock a waiter registers under, so a waiter is either completed by the ring or
    /// finds it rung.
    waiting: Mutex<Option<Vec<Completer<()>>>>,
}

impl Bell {
    pub fn new() -> Bell {
        Bell {
            waiting: Mutex::new(Some(Vec::new())),
        }
    }

    /// A wait for the ring: resolves `Ok` once the bell is raised (at once if it already
    /// was), `Err(Abandoned)` if the bell is dropped first.
    pub fn wait(&self) -> Pending<()> {
        let (done, pending) = completion();
        match lock(&self.waiting).as_mut() {
            Some(waiting) => waiting.push(done),
            None => done.complete(()),
        }
        pending
    }

    /// Rings the bell: every waiter is completed (outside the lock: each completion
    /// wakes its executor), and later waits resolve at once.
    pub fn raise(&self) {
        let waiting = lock(&self.waiting).take().unwrap_or_default();
        for done in waiting {
            done.complete(());
        }
    }
}

impl Default for Bell {
    fn default() -> Bell {
        Bell::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> super::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind (a queue, a slot);
    // carrying on is safer than poisoning every shard.
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The commit thread dropped the completer without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

struct Slot<T> {
    value: Option<Result<T, Abandoned>>,
    waker: Option<Waker>,
}

/// The commit thread's side of a completion: fills it once.
pub struct Completer<T> {
    slot: Option<Arc<Mutex<Slot<T>>>>,
}

/// The shard's side: a future of the commit's result.
pub struct Pending<T> {
    slot: Arc<Mutex<Slot<T>>>,
}

/// A new one-shot completion.
pub fn completion<T>() -> (Completer<T>, Pending<T>) {
    let slot = Arc::new(Mutex::new(Slot {
        value: None,
        waker: None,
    }));
    (
        Completer {
            slot: Some(slot.clone()),
        },
        Pending { slot },
    )
}

impl<T> Completer<T> {
    /// Publishes the result and wakes the waiting shard. Consumes the completer, so a
    /// result is published at most once.
    pub fn complete(mut self, value: T) {
        self.publish(Ok(value));
    }

    fn publish(&mut self, value: Result<T, Abandoned>) {
        if let Some(slot) = self.slot.take() {
            let waker = {
                let mut s = lock(&slot);
                s.value = Some(value);
                s.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        self.publish(Err(Abandoned));
    }
}

impl<T> Future for Pending<T> {
    type Output = Result<T, Abandoned>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = lock(&self.slot);
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                let renew = match &s.waker {
                    Some(w) => !w.will_wake(cx.waker()),
                    None => true,
                };
                if renew {
                    s.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}
