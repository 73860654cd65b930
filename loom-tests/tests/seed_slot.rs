//! Loom models of the seed cache's hand-offs (`src/seal/slot.rs`, compiled against loom):
//! the seal thread publishing and clearing the key while a core reads it, and operators'
//! commands waking the seal thread.

use custody_loom_tests::slot::{KeySlot, Mailbox, Reader};
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;

/// A stand-in for the keyed derivation state: two halves that are equal while the key is
/// alive, and a drop that wipes them (as `Locked` zeroizes the real one).
struct Secret {
    a: u64,
    b: u64,
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.a = 0;
        self.b = 0;
    }
}

fn check(key: &Secret) {
    assert_ne!(key.a, 0, "a reader saw a wiped key");
    assert_eq!(key.a, key.b, "a reader saw a half-made key");
}

/// The clock value the models read at: every published key serves at 0.
const NOW: u64 = 0;

#[test]
fn a_reader_sees_whole_live_keys_while_the_seal_thread_replaces_and_clears_them() {
    loom::model(|| {
        let slot = Arc::new(KeySlot::<Secret>::default());
        slot.publish(Arc::new(Secret { a: 1, b: 1 }), 10, slot.epoch());
        let writer = {
            let slot = slot.clone();
            thread::spawn(move || {
                // A refresh, then a seal.
                drop(slot.clear());
                slot.publish(Arc::new(Secret { a: 2, b: 2 }), 10, slot.epoch());
                drop(slot.clear());
            })
        };
        let mut reader = Reader::default();
        for _ in 0..2 {
            if let Some(key) = reader.get(&slot, NOW) {
                check(&key);
            }
        }
        writer.join().unwrap();
        assert!(reader.get(&slot, NOW).is_none(), "cleared at the end");
        reader.refresh(&slot);
        assert!(!reader.holds(), "and the reader let go of its copy");
    });
}

#[test]
fn once_clear_returns_no_reader_gets_a_key() {
    loom::model(|| {
        let slot = Arc::new(KeySlot::<Secret>::default());
        slot.publish(Arc::new(Secret { a: 7, b: 7 }), 10, slot.epoch());
        let cleared = Arc::new(AtomicBool::new(false));
        let writer = {
            let (slot, cleared) = (slot.clone(), cleared.clone());
            thread::spawn(move || {
                drop(slot.clear());
                cleared.store(true, Ordering::Release);
            })
        };
        let mut reader = Reader::default();
        let before = reader.get(&slot, NOW);
        if let Some(key) = &before {
            check(key);
        }
        if cleared.load(Ordering::Acquire) {
            assert!(reader.get(&slot, NOW).is_none(), "served after the seal");
        }
        drop(before);
        writer.join().unwrap();
    });
}

#[test]
fn an_unseal_that_started_before_a_seal_never_publishes_after_it() {
    loom::model(|| {
        let slot = Arc::new(KeySlot::<Secret>::default());
        slot.publish(Arc::new(Secret { a: 1, b: 1 }), 10, slot.epoch());
        let refresher = {
            let slot = slot.clone();
            thread::spawn(move || {
                // The seal thread asks the provider (taking the epoch first), then publishes.
                let epoch = slot.epoch();
                let published = slot.publish(Arc::new(Secret { a: 2, b: 2 }), 10, epoch);
                (epoch, published)
            })
        };
        drop(slot.seal());
        let (epoch, published) = refresher.join().unwrap();
        if epoch == 0 {
            // The refresh began before the seal: whether it published before the seal
            // (then the seal removed it) or tried after (then it was refused), nothing
            // serves now.
            assert!(
                slot.current(NOW).is_none(),
                "a seal was undone (published {published})"
            );
        } else {
            assert!(published, "a refresh begun after the seal may publish");
        }
    });
}

#[test]
fn a_posted_command_always_wakes_the_seal_thread() {
    loom::model(|| {
        let mailbox = Arc::new(Mailbox::default());
        let seal_thread = {
            let mailbox = mailbox.clone();
            // Blocks until a command comes: a lost wake-up is a loom deadlock.
            thread::spawn(move || mailbox.wait_for_command())
        };
        mailbox.post(|c| c.seal = true);
        let got = seal_thread.join().unwrap();
        assert!(got.seal);
        assert_eq!(mailbox.take(), Default::default(), "taken exactly once");
    });
}

#[test]
fn commands_from_two_operators_are_both_delivered() {
    loom::model(|| {
        let mailbox = Arc::new(Mailbox::default());
        let other = {
            let mailbox = mailbox.clone();
            thread::spawn(move || mailbox.post(|c| c.unseal = true))
        };
        mailbox.post(|c| c.seal = true);
        other.join().unwrap();
        let got = mailbox.wait_for_command();
        assert!(got.seal && got.unseal, "{got:?}");
    });
}
