//! The process heap: what the allocator holds, and handing freed memory back to the OS.
//!
//! custody uses the system allocator (glibc's malloc on the supported hosts). It keeps
//! memory freed by the executors' threads in their arenas: after a flood of connections
//! closes, a process that never asks would keep its peak resident size for good (issue 16
//! measured 20 MB growing to 448 MB and staying there). `malloc_trim(0)` returns every
//! free page of every arena (glibc 2.8 and later walk all arenas, not only the main one).
//! The main thread calls [`give_back_if_worth_it`] every couple of seconds, off the
//! executors: it trims only when the free memory held passes
//! [`bounds::HEAP_FREE_RETAINED_BYTES_MAX`], so a steady appliance never pays for it.
//!
//! A different allocator (jemalloc, mimalloc) would decay freed memory by itself, at the
//! price of a C build and a second allocator to audit; glibc's own call does the job, and
//! `docs/benchmarks.md` ("Connection floods") measures it.

use crate::bounds;

/// The allocator's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapFigures {
    /// Bytes handed out and not yet freed (arenas and large mmapped blocks).
    pub in_use_bytes: u64,
    /// Bytes freed but kept by the allocator in its arenas.
    pub free_bytes: u64,
}

/// What the allocator holds now; `None` where the allocator cannot say (not glibc).
/// Takes every arena's lock for a moment: for scrapes and the main thread, not a core.
pub fn figures() -> Option<HeapFigures> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's own bookkeeping (glibc >= 2.33).
        let m = unsafe { libc::mallinfo2() };
        Some(HeapFigures {
            in_use_bytes: (m.uordblks + m.hblkhd) as u64,
            free_bytes: m.fordblks as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Returns free arena pages to the OS when the allocator keeps more than
/// [`bounds::HEAP_FREE_RETAINED_BYTES_MAX`] free; the bytes it held free before, if it
/// trimmed.
pub fn give_back_if_worth_it() -> Option<u64> {
    let before = figures()?;
    if before.free_bytes <= bounds::HEAP_FREE_RETAINED_BYTES_MAX {
        return None;
    }
    give_back();
    Some(before.free_bytes)
}

/// Returns every free page of every arena to the OS now.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim touches only the allocator's free lists; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_is_seen_and_given_back() {
        let Some(start) = figures() else { return };
        // Many small blocks, as connections leave them: freed, they stay in the arena.
        let blocks: Vec<Vec<u8>> = (0..20_000).map(|i| vec![i as u8; 4000]).collect();
        let held = figures().unwrap();
        assert!(
            held.in_use_bytes >= start.in_use_bytes + 60_000_000,
            "{held:?}"
        );
        drop(blocks);
        give_back();
        let after = figures().unwrap();
        assert!(
            after.in_use_bytes < held.in_use_bytes - 60_000_000,
            "{after:?} after {held:?}"
        );
    }
}
