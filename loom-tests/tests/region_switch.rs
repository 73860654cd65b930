//! Loom model of the region switch (`src/regions.rs`): the shard that commits a switch
//! sets it, then answers; a request checked on another core after that answer arrived
//! must see the switch.

use custody_loom_tests::regions::RegionSwitch;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;

#[test]
fn a_request_checked_after_the_switch_answered_sees_it() {
    loom::model(|| {
        let switch = Arc::new(RegionSwitch::new(&["US-EAST".into(), "EU-WEST".into()]));
        // The answer travelling back to the admin (a channel in the appliance).
        let answered = Arc::new(AtomicBool::new(false));
        let shard = {
            let (switch, answered) = (switch.clone(), answered.clone());
            thread::spawn(move || {
                switch.set(1, false);
                answered.store(true, Ordering::Release);
            })
        };
        // Another core's gate: once the answer is out, EU-WEST is refused.
        if answered.load(Ordering::Acquire) {
            assert!(
                !switch.is_enabled(1),
                "a request after the answer saw the old switch"
            );
        }
        assert!(switch.is_enabled(0), "other regions are untouched");
        shard.join().unwrap();
        assert!(!switch.is_enabled(1));
    });
}
