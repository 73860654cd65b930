//! A value every core reads and a reload replaces whole: the access policy, the TLS
//! acceptor and the connection limits.
//!
//! The writer (the reload thread) swaps an `Arc` under a mutex and then moves a
//! generation counter forward; each core keeps its own copy and takes the new one only
//! when the generation moved, so the read path costs one atomic load and touches no
//! reference count or lock shared by the cores.
//!
//! Written against `super::sync`, so that `loom-tests/` compiles this file with loom's
//! primitives and models the hand-off (`loom-tests/tests/published.rs`).

use super::sync::{Arc, AtomicU64, Mutex, Ordering};
use std::cell::RefCell;

/// The value in force, shared by every core.
pub struct Published<T> {
    generation: AtomicU64,
    current: Mutex<Arc<T>>,
}

impl<T> Published<T> {
    /// `value` in force as generation 1.
    pub fn new(value: T) -> Published<T> {
        Published {
            generation: AtomicU64::new(1),
            current: Mutex::new(Arc::new(value)),
        }
    }

    /// Puts `value` in force (whole: a reader sees either the old value or this one) and
    /// returns its generation. The value is stored before the generation moves (Release),
    /// so a reader that sees the new generation (Acquire) finds the new value.
    pub fn replace(&self, value: T) -> u64 {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(value);
        self.generation.fetch_add(1, Ordering::Release) + 1
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Arc<T> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A core's copy of a [`Published`] value: refreshed when the generation moved.
pub struct LocalCopy<T> {
    cell: Arc<Published<T>>,
    copy: RefCell<(u64, Arc<T>)>,
}

impl<T> LocalCopy<T> {
    pub fn new(cell: Arc<Published<T>>) -> LocalCopy<T> {
        // The generation first: a replace between the two reads leaves a copy newer than
        // its generation, which the next read refreshes (never an old value kept).
        let generation = cell.generation();
        let copy = (generation, cell.current());
        LocalCopy {
            cell,
            copy: RefCell::new(copy),
        }
    }

    fn refresh(&self) {
        let generation = self.cell.generation();
        if self.copy.borrow().0 != generation {
            *self.copy.borrow_mut() = (generation, self.cell.current());
        }
    }

    /// The value in force, borrowed from this core's copy (no shared count touched).
    pub fn get(&self) -> std::cell::Ref<'_, T> {
        self.refresh();
        std::cell::Ref::map(self.copy.borrow(), |c| &*c.1)
    }

    /// The value in force, to keep past this call (a connection's settings for its
    /// whole life): one shared count touched.
    pub fn snapshot(&self) -> Arc<T> {
        self.refresh();
        self.copy.borrow().1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_follows_every_replace_and_a_snapshot_keeps_its_value() {
        let cell = Arc::new(Published::new(String::from("one")));
        let local = LocalCopy::new(cell.clone());
        let kept = local.snapshot();
        assert_eq!(&*local.get(), "one");
        assert_eq!(cell.replace("two".into()), 2);
        assert_eq!(&*local.get(), "two");
        assert_eq!(cell.replace("three".into()), 3);
        assert_eq!(&*local.snapshot(), "three");
        assert_eq!(&*kept, "one", "a snapshot is not changed by a reload");
        assert_eq!(cell.generation(), 3);
    }
}
