//! `src/store/handoff.rs` and `src/seal/slot.rs`, compiled against loom's primitives.
//!
//! The module file is the appliance's own, included by path: inside it, `super::sync`
//! resolves to this crate root's `sync`, which re-exports loom's `Arc`, `Condvar`, `Mutex`
//! and `MutexGuard` instead of `std::sync`'s. The models live in `tests/handoff.rs`.

/// The synchronisation primitives `handoff` is written against: loom's here.
pub(crate) mod sync {
    pub use loom::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
    pub use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
}

#[path = "../../src/store/handoff.rs"]
pub mod handoff;

#[path = "../../src/seal/slot.rs"]
pub mod slot;

#[path = "../../src/regions.rs"]
pub mod regions;

#[path = "../../src/published.rs"]
pub mod published;

#[path = "../../src/lease.rs"]
pub mod lease;
