//! The compliance regions' on/off switch, shared by every core.
//!
//! The configured regions are fixed at start; whether each is enabled is durable in the
//! store (an admin's SET_REGION, audited) and mirrored here, one atomic flag per region.
//! The shard that commits a switch sets the flag after the commit is durable and before
//! it answers, so every derivation checked after the answer, on any core, sees it: the
//! propagation bound is the memory order of one atomic store (Release) and load (Acquire).

use super::sync::{AtomicBool, Ordering};
use std::sync::Arc;

/// The switch of every configured region.
#[derive(Debug)]
pub struct RegionSwitch {
    names: Vec<Arc<str>>,
    enabled: Vec<AtomicBool>,
    /// Whether the stored switches were applied (by the first core to start).
    loaded: AtomicBool,
}

impl RegionSwitch {
    /// All configured regions, enabled.
    pub fn new(names: &[String]) -> RegionSwitch {
        RegionSwitch {
            names: names.iter().map(|n| Arc::from(n.as_str())).collect(),
            enabled: names.iter().map(|_| AtomicBool::new(true)).collect(),
            loaded: AtomicBool::new(false),
        }
    }

    /// [`RegionSwitch::load`] by the first caller only: the first core to start applies
    /// what the store holds before any core listens; a later core's snapshot (possibly
    /// older than a switch committed meanwhile) is not applied over it.
    pub fn load_once(&self, stored: &[(String, bool)]) -> Vec<String> {
        if self
            .loaded
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Vec::new();
        }
        self.load(stored)
    }

    /// The position of a configured region.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| **n == *name)
    }

    pub fn name(&self, index: usize) -> Option<&Arc<str>> {
        self.names.get(index)
    }

    pub fn is_enabled(&self, index: usize) -> bool {
        self.enabled
            .get(index)
            .is_some_and(|e| e.load(Ordering::Acquire))
    }

    /// Sets a region's switch (after its record is durable).
    pub fn set(&self, index: usize, enabled: bool) {
        if let Some(e) = self.enabled.get(index) {
            e.store(enabled, Ordering::Release);
        }
    }

    /// Applies the switches the store holds; names no longer configured are returned (to
    /// be logged), not applied.
    pub fn load(&self, stored: &[(String, bool)]) -> Vec<String> {
        let mut unknown = Vec::new();
        for (name, enabled) in stored {
            match self.index(name) {
                Some(i) => self.set(i, *enabled),
                None => unknown.push(name.clone()),
            }
        }
        unknown
    }

    /// Every configured region and whether it is enabled, in configuration order.
    pub fn snapshot(&self) -> Vec<(String, bool)> {
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), self.is_enabled(i)))
            .collect()
    }
}

// Its unit test is in `policy.rs` (this file is also compiled into the loom models).
