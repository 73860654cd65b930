//! The compliance regions' on/off switch, shared by every core.
//!
//! Each region the appliance has known since it started owns a slot: an atomic flag that
//! says whether it is enabled. Whether a region is *configured* is the policy's business
//! (its region table, replaced whole on a reload, maps each configured name to its slot);
//! the switch only remembers names and flags, so a region that a reload removes and a
//! later reload restores comes back with the switch it had (a disabled region is not
//! re-enabled by editing the configuration).
//!
//! Whether a region is enabled is durable in the store (an admin's SET_REGION, audited)
//! and mirrored here. The shard that commits a switch sets the flag after the commit is
//! durable and before it answers, so every derivation checked after the answer, on any
//! core, sees it: the propagation bound is the memory order of one atomic store (Release)
//! and load (Acquire).

use super::sync::{AtomicBool, Mutex, Ordering};
use std::sync::Arc;

/// Slots a switch has unless told otherwise: every region configured at start or by a
/// reload, and every region the store holds a switch for, over the process's life.
pub const REGION_SLOTS_DEFAULT: usize = 1024;

/// Why regions could not be given slots.
#[derive(Debug, PartialEq, Eq)]
pub struct SlotsFull {
    pub needed: usize,
    pub free: usize,
}

impl std::fmt::Display for SlotsFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} new regions need a slot but only {} of the region switch's slots are free (restart to reclaim the slots of removed regions)",
            self.needed, self.free
        )
    }
}

/// The switch of every region known since start.
#[derive(Debug)]
pub struct RegionSwitch {
    /// Slot names, append-only (a slot's position never changes). Locked only by a
    /// switch, a reload and the start-up load, never by a derivation.
    names: Mutex<Vec<Arc<str>>>,
    enabled: Vec<AtomicBool>,
    /// Whether the stored switches were applied (by the first core to start).
    loaded: AtomicBool,
}

impl RegionSwitch {
    /// The configured regions in slots `0..names.len()`, all enabled.
    pub fn new(names: &[String]) -> RegionSwitch {
        RegionSwitch::with_slots(names, REGION_SLOTS_DEFAULT.max(names.len()))
    }

    /// [`RegionSwitch::new`] with `slots` slots in all (at least `names.len()`).
    pub fn with_slots(names: &[String], slots: usize) -> RegionSwitch {
        let slots = slots.max(names.len());
        RegionSwitch {
            names: Mutex::new(names.iter().map(|n| Arc::from(n.as_str())).collect()),
            enabled: (0..slots).map(|_| AtomicBool::new(true)).collect(),
            loaded: AtomicBool::new(false),
        }
    }

    fn lock_names(&self) -> super::sync::MutexGuard<'_, Vec<Arc<str>>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
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

    /// The slot of a region known to the switch (configured or not).
    pub fn slot(&self, name: &str) -> Option<usize> {
        self.lock_names().iter().position(|n| **n == *name)
    }

    pub fn name(&self, slot: usize) -> Option<Arc<str>> {
        self.lock_names().get(slot).cloned()
    }

    pub fn is_enabled(&self, slot: usize) -> bool {
        self.enabled
            .get(slot)
            .is_some_and(|e| e.load(Ordering::Acquire))
    }

    /// Sets a region's switch (after its record is durable).
    pub fn set(&self, slot: usize, enabled: bool) {
        if let Some(e) = self.enabled.get(slot) {
            e.store(enabled, Ordering::Release);
        }
    }

    /// The slots of `names`, giving each name new to the switch a slot of its own
    /// (enabled): all of them or, when the free slots are too few, none.
    pub fn claim(&self, names: &[String]) -> Result<Vec<usize>, SlotsFull> {
        let mut known = self.lock_names();
        let new: Vec<&String> = {
            let mut new: Vec<&String> = Vec::new();
            for n in names {
                if !known.iter().any(|k| **k == **n) && !new.contains(&n) {
                    new.push(n);
                }
            }
            new
        };
        let free = self.enabled.len() - known.len();
        if new.len() > free {
            return Err(SlotsFull {
                needed: new.len(),
                free,
            });
        }
        known.extend(new.into_iter().map(|n| Arc::from(n.as_str())));
        Ok(names
            .iter()
            .filter_map(|n| known.iter().position(|k| **k == **n))
            .collect())
    }

    /// Applies the switches the store holds. A stored name not known yet gets a slot of
    /// its own, so a later reload that configures it finds its switch; the names that got
    /// none (no free slot) are returned, to be logged.
    pub fn load(&self, stored: &[(String, bool)]) -> Vec<String> {
        let mut lost = Vec::new();
        for (name, enabled) in stored {
            match self.claim(std::slice::from_ref(name)) {
                Ok(slots) => {
                    if let Some(&slot) = slots.first() {
                        self.set(slot, *enabled);
                    }
                }
                Err(_) => lost.push(name.clone()),
            }
        }
        lost
    }
}

// Its unit tests are in `policy.rs` (this file is also compiled into the loom models).
