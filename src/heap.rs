//! The process heap: custodyd's allocator, what it holds, and how freed memory goes back to
//! the OS.
//!
//! custodyd runs on jemalloc (`tikv-jemallocator`, the allocator TiKV ships), declared in
//! `src/bin/custodyd.rs` with [`MALLOC_CONF`]: background threads return freed pages to the
//! OS within [`DIRTY_DECAY_MS`], whatever the cores do meanwhile. glibc's malloc, before
//! it, kept what a flood of connections freed: issue 16 measured 20 MB growing to 448 MB
//! and staying there; with `malloc_trim` every 2 s the heap came back but resident memory
//! stayed 44 % above its start, held by pages where the flood's freed blocks lay between
//! long-lived ones. jemalloc's size classes keep the two apart and come back within about
//! 10 % (docs/benchmarks.md, "Connection floods").
//!
//! The figures are jemalloc's own statistics: only meaningful in a process that allocates
//! with it (custodyd, and this crate's unit tests).

/// How long freed ("dirty") pages stay mapped before jemalloc's background threads give
/// them back (`madvise`): short, so that memory a closed flood left comes back in moments.
pub const DIRTY_DECAY_MS: u64 = 1000;

/// jemalloc's options, read at its start from the symbol custodyd exports
/// (`_rjem_malloc_conf`): background purging threads, [`DIRTY_DECAY_MS`], and pages given
/// back at once rather than kept "muzzy". Must agree with [`DIRTY_DECAY_MS`] (a unit test
/// checks).
pub const MALLOC_CONF: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// The allocator's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapFigures {
    /// Bytes allocated and not yet freed.
    pub in_use_bytes: u64,
    /// Resident bytes the allocator holds beyond them: freed pages not yet given back, and
    /// its own metadata.
    pub free_bytes: u64,
}

/// What the allocator holds now (jemalloc's statistics, refreshed by this call); `None`
/// if it cannot say.
pub fn figures() -> Option<HeapFigures> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read().ok()? as u64;
    let resident = tikv_jemalloc_ctl::stats::resident::read().ok()? as u64;
    Some(HeapFigures {
        in_use_bytes: allocated,
        free_bytes: resident.saturating_sub(allocated),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conf_says_what_the_constant_says() {
        let conf = std::str::from_utf8(&MALLOC_CONF[..MALLOC_CONF.len() - 1]).unwrap();
        assert!(
            conf.contains(&format!("dirty_decay_ms:{DIRTY_DECAY_MS}")),
            "{conf}"
        );
        assert_eq!(MALLOC_CONF.last(), Some(&0), "jemalloc reads a C string");
    }

    #[test]
    fn allocations_are_seen_and_freed_memory_is_no_longer_in_use() {
        let start = figures().expect("jemalloc statistics (the unit tests allocate with it)");
        // Many small blocks, as connections leave them.
        let blocks: Vec<Vec<u8>> = (0..20_000).map(|i| vec![i as u8; 4000]).collect();
        let held = figures().unwrap();
        assert!(
            held.in_use_bytes >= start.in_use_bytes + 60_000_000,
            "{held:?}"
        );
        drop(blocks);
        let after = figures().unwrap();
        assert!(
            after.in_use_bytes < held.in_use_bytes - 60_000_000,
            "{after:?} after {held:?}"
        );
    }
}
