//! Loom model of a published value (`src/published.rs`: the policy and the TLS
//! connection settings): the reload thread replaces it while a core reads through its
//! own copy. A core never goes back to an older value, never reads a value older than a
//! generation it has seen, and once the reload is done (its answer seen) reads the new one.

use custody_loom_tests::published::{LocalCopy, Published};
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;

#[test]
fn a_core_sees_each_reload_in_order_and_the_last_once_it_answered() {
    loom::model(|| {
        // Values equal their generation: 1 at start, one more per replace.
        let cell = Arc::new(Published::new(1u64));
        let done = Arc::new(AtomicBool::new(false));
        let reload = {
            let (cell, done) = (cell.clone(), done.clone());
            thread::spawn(move || {
                assert_eq!(cell.replace(2), 2);
                assert_eq!(cell.replace(3), 3);
                // The reload's answer (a completion in the appliance).
                done.store(true, Ordering::Release);
            })
        };
        let core = LocalCopy::new(cell.clone());
        let mut last = 0;
        for _ in 0..2 {
            let seen = cell.generation();
            let value = *core.get();
            assert!(value >= last, "went back from {last} to {value}");
            assert!(value >= seen, "generation {seen} seen, value {value} read");
            last = value;
        }
        if done.load(Ordering::Acquire) {
            assert_eq!(*core.get(), 3, "a read after the reload answered");
            assert_eq!(*core.snapshot(), 3);
        }
        reload.join().unwrap();
        assert_eq!(*core.get(), 3);
    });
}
