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
}
