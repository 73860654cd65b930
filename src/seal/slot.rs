//! The hand-offs of the seed cache between threads, written against `super::sync` so that
//! `loom-tests` compiles this very file against loom's primitives:
//!
//! - [`KeySlot`]: the seal thread publishes a whole key (an `Arc`) or clears it; each core
//!   keeps a [`Reader`] that takes the new `Arc` only when the generation moved (one
//!   atomic load per request) and answers nothing once the slot is cleared or expired.
//! - [`Mailbox`]: operators' commands (seal, unseal, stop) to the seal thread, which
//!   sleeps on a condition variable between its deadlines; a command posted at any moment
//!   wakes it (no lost wake-up).

use super::sync::{Arc, AtomicU64, Condvar, Mutex, MutexGuard, Ordering};
use std::time::Duration;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The key and the seal epoch, changed together under one mutex.
struct Held<K> {
    key: Option<Arc<K>>,
    /// Moved forward by every operator seal: a key unsealed before a seal cannot be
    /// published after it.
    epoch: u64,
}

/// The key cores derive with, published by the seal thread.
pub struct KeySlot<K> {
    key: Mutex<Held<K>>,
    generation: AtomicU64,
    /// The key may serve while the clock is below this; 0 = no key.
    serve_until: AtomicU64,
}

impl<K> Default for KeySlot<K> {
    fn default() -> Self {
        KeySlot {
            key: Mutex::new(Held {
                key: None,
                epoch: 0,
            }),
            generation: AtomicU64::new(0),
            serve_until: AtomicU64::new(0),
        }
    }
}

impl<K> KeySlot<K> {
    /// The seal epoch now: take it before asking the provider, hand it to `publish`.
    pub fn epoch(&self) -> u64 {
        lock(&self.key).epoch
    }

    /// Makes `key` the one to serve until `serve_until` (clock value, above 0), replacing
    /// the previous one without a gap, unless an operator sealed since `epoch` was read:
    /// then nothing changes and `false` comes back. The key is whole before anyone can
    /// see it: it is only ever handed over as an `Arc`.
    pub fn publish(&self, key: Arc<K>, serve_until: u64, epoch: u64) -> bool {
        let old = {
            let mut held = lock(&self.key);
            if held.epoch != epoch {
                return false;
            }
            let old = held.key.replace(key);
            self.serve_until
                .store(serve_until.max(1), Ordering::Release);
            self.generation.fetch_add(1, Ordering::AcqRel);
            old
        };
        drop(old);
        true
    }

    /// Stops serving at once and takes the key out (the caller drops it; readers drop
    /// their copies at their next refresh).
    pub fn clear(&self) -> Option<Arc<K>> {
        let mut held = lock(&self.key);
        self.serve_until.store(0, Ordering::Release);
        let old = held.key.take();
        self.generation.fetch_add(1, Ordering::AcqRel);
        old
    }

    /// An operator's seal: [`KeySlot::clear`], and no key unsealed before it can be
    /// published after it.
    pub fn seal(&self) -> Option<Arc<K>> {
        let mut held = lock(&self.key);
        held.epoch += 1;
        self.serve_until.store(0, Ordering::Release);
        let old = held.key.take();
        self.generation.fetch_add(1, Ordering::AcqRel);
        old
    }

    /// Whether a key may serve at clock value `now`.
    pub fn serving(&self, now: u64) -> bool {
        now < self.serve_until.load(Ordering::Acquire)
    }

    /// The key now, if one may serve (takes the mutex: not for the request path).
    pub fn current(&self, now: u64) -> Option<Arc<K>> {
        if !self.serving(now) {
            return None;
        }
        lock(&self.key).key.clone()
    }

    pub fn has_key(&self) -> bool {
        lock(&self.key).key.is_some()
    }
}

/// One core's copy of the slot's key.
pub struct Reader<K> {
    generation: u64,
    key: Option<Arc<K>>,
}

impl<K> Default for Reader<K> {
    fn default() -> Self {
        Reader {
            generation: u64::MAX,
            key: None,
        }
    }
}

impl<K> Reader<K> {
    /// Takes the slot's key if its generation moved since the last look.
    pub fn refresh(&mut self, slot: &KeySlot<K>) {
        let g = slot.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.key = lock(&slot.key).key.clone();
            self.generation = g;
        }
    }

    /// The key to use at clock value `now`, or `None` (sealed or expired).
    pub fn get(&mut self, slot: &KeySlot<K>, now: u64) -> Option<Arc<K>> {
        self.refresh(slot);
        if !slot.serving(now) {
            return None;
        }
        self.key.clone()
    }

    /// Runs `f` with the key to use at clock value `now` (`None`: sealed or expired),
    /// borrowing this reader's copy: no reference count touched, so cores that derive at
    /// once do not share a cache line.
    pub fn with_key<R>(
        &mut self,
        slot: &KeySlot<K>,
        now: u64,
        f: impl FnOnce(&K) -> R,
    ) -> Option<R> {
        self.refresh(slot);
        if !slot.serving(now) {
            return None;
        }
        self.key.as_deref().map(f)
    }

    /// Whether this reader still holds a copy.
    pub fn holds(&self) -> bool {
        self.key.is_some()
    }
}

/// Commands to the seal thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Commands {
    pub seal: bool,
    pub unseal: bool,
    pub stop: bool,
}

impl Commands {
    fn any(&self) -> bool {
        self.seal || self.unseal || self.stop
    }
}

/// Where commands wait for the seal thread.
#[derive(Default)]
pub struct Mailbox {
    commands: Mutex<Commands>,
    wake: Condvar,
}

impl Mailbox {
    pub fn post(&self, f: impl FnOnce(&mut Commands)) {
        f(&mut lock(&self.commands));
        self.wake.notify_all();
    }

    /// Takes every posted command.
    pub fn take(&self) -> Commands {
        std::mem::take(&mut *lock(&self.commands))
    }

    /// Sleeps until a command is posted or `timeout` passes. A command posted before the
    /// call returns at once: the flags are checked under the same mutex the poster holds.
    pub fn wait(&self, timeout: Duration) {
        let c = lock(&self.commands);
        if !c.any() {
            let _ = self.wake.wait_timeout(c, timeout);
        }
    }

    /// Sleeps until a command is posted (no timeout): for models and tests.
    pub fn wait_for_command(&self) -> Commands {
        let mut c = lock(&self.commands);
        while !c.any() {
            c = self.wake.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        std::mem::take(&mut *c)
    }
}
