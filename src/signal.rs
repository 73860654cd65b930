//! `LocalSignal`: a wake-up between tasks of one core, without locks or atomics.
//!
//! One task waits, any task on the same core signals. A signal sent while nobody waits is
//! kept (one permit), so the check-then-wait pattern cannot lose a wake-up as long as the
//! waiter re-checks its condition after each wake (spurious wake-ups are allowed).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct LocalSignal {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl LocalSignal {
    pub fn new() -> LocalSignal {
        LocalSignal::default()
    }

    /// Wakes the waiter, or leaves a permit for the next wait.
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Resolves once a signal is (or was) sent, consuming it.
    pub fn wait(&self) -> Wait<'_> {
        Wait { signal: self }
    }
}

pub struct Wait<'a> {
    signal: &'a LocalSignal,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.set.replace(false) {
            return Poll::Ready(());
        }
        *self.signal.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A latch for many waiters of one core: once opened it stays open, and every wait, past
/// or future, resolves. Each waiting future holds one slot and frees it when dropped, so
/// a connection that races every read against the latch reuses its slot: the slots in use
/// never exceed the waiters alive at once.
#[derive(Default)]
pub struct LocalLatch {
    open: Cell<bool>,
    slots: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl LocalLatch {
    /// Opens the latch and wakes every waiter.
    pub fn open(&self) {
        if self.open.replace(true) {
            return;
        }
        let wakers: Vec<Waker> = self
            .slots
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.get()
    }

    /// Resolves once the latch is open.
    pub fn wait(&self) -> LatchWait<'_> {
        LatchWait {
            latch: self,
            slot: None,
        }
    }

    /// Slots allocated (for tests: bounded by the waiters alive at once).
    pub fn slots(&self) -> usize {
        self.slots.borrow().len()
    }
}

pub struct LatchWait<'a> {
    latch: &'a LocalLatch,
    slot: Option<usize>,
}

impl Future for LatchWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.latch.open.get() {
            return Poll::Ready(());
        }
        let waker = Some(cx.waker().clone());
        match self.slot {
            Some(i) => self.latch.slots.borrow_mut()[i] = waker,
            None => {
                let mut slots = self.latch.slots.borrow_mut();
                let i = match self.latch.free.borrow_mut().pop() {
                    Some(i) => {
                        slots[i] = waker;
                        i
                    }
                    None => {
                        slots.push(waker);
                        slots.len() - 1
                    }
                };
                drop(slots);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for LatchWait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot.take() {
            if let Some(s) = self.latch.slots.borrow_mut().get_mut(i) {
                *s = None;
            }
            self.latch.free.borrow_mut().push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn a_permit_is_kept_and_consumed_once() {
        futures_lite::future::block_on(async {
            let s = LocalSignal::new();
            s.notify();
            s.wait().await;
            let pending = futures_lite::future::poll_once(s.wait()).await;
            assert!(pending.is_none(), "the permit was consumed");
        });
    }

    #[test]
    fn a_waiting_task_is_woken() {
        glommio::LocalExecutorBuilder::default()
            .io_memory(256 * 1024)
            .make()
            .unwrap()
            .run(async {
                let s = Rc::new(LocalSignal::new());
                let waiter = {
                    let s = s.clone();
                    glommio::spawn_local(async move { s.wait().await })
                };
                glommio::executor().yield_now().await;
                s.notify();
                waiter.await;
            });
    }

    #[test]
    fn a_latch_wakes_every_waiter_and_reuses_the_slots_of_dropped_waits() {
        glommio::LocalExecutorBuilder::default()
            .io_memory(256 * 1024)
            .make()
            .unwrap()
            .run(async {
                let latch = Rc::new(LocalLatch::default());
                // A connection's pattern: a new wait raced against each read, dropped
                // when the read wins.
                for _ in 0..1000 {
                    let pending = futures_lite::future::poll_once(latch.wait()).await;
                    assert!(pending.is_none());
                }
                assert_eq!(latch.slots(), 1, "dropped waits free their slot");
                let waiters: Vec<_> = (0..3)
                    .map(|_| {
                        let latch = latch.clone();
                        glommio::spawn_local(async move { latch.wait().await })
                    })
                    .collect();
                glommio::executor().yield_now().await;
                assert_eq!(latch.slots(), 3);
                latch.open();
                for w in waiters {
                    w.await;
                }
                // Open stays open.
                latch.wait().await;
                assert!(latch.is_open());
            });
    }
}
