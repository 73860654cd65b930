//! Loom models of the store's lease (`src/lease.rs`): the lease thread takes, renews and
//! loses it while every core asks, per request, whether it may acknowledge, and reports
//! its shard loaded under the token. (The lease in these models is an hour long: loom
//! does not model time, and no deadline may pass while a model runs.)

use custody_loom_tests::lease::{Lease, LeaseTiming, Role};
use loom::sync::Arc;
use loom::thread;
use std::time::{Duration, Instant};

fn hour() -> LeaseTiming {
    LeaseTiming {
        lease: Duration::from_secs(3600),
        margin: Duration::from_secs(60),
    }
}

/// Two cores report ready at once: exactly one of them completes the activation, and
/// the role is active once both have.
#[test]
fn two_cores_ready_at_once_activate_exactly_once() {
    loom::model(|| {
        let lease = Arc::new(Lease::shared(2));
        lease.acquired(5, Instant::now(), &hour());
        let cores: Vec<_> = (0..2)
            .map(|_| {
                let lease = lease.clone();
                thread::spawn(move || lease.core_ready(5))
            })
            .collect();
        let completed: usize = cores
            .into_iter()
            .map(|c| usize::from(c.join().unwrap()))
            .sum();
        assert_eq!(completed, 1, "one core completes the activation");
        assert_eq!(lease.role(), Role::Active);
        assert!(lease.may_acknowledge());
    });
}

/// The lease is lost while a core is still loading under it: whatever the order, the
/// appliance ends up acknowledging nothing, and a core that saw "may acknowledge" saw it
/// under the token it loaded.
#[test]
fn a_step_down_during_the_activation_leaves_nothing_acknowledging() {
    loom::model(|| {
        let lease = Arc::new(Lease::shared(1));
        lease.acquired(9, Instant::now(), &hour());
        let core = {
            let lease = lease.clone();
            thread::spawn(move || {
                lease.core_ready(9);
                lease.may_acknowledge_for(9)
            })
        };
        let keeper = {
            let lease = lease.clone();
            thread::spawn(move || lease.step_down(9))
        };
        let _ = core.join().unwrap();
        assert!(
            keeper.join().unwrap(),
            "the token held is stepped down once"
        );
        assert!(
            !lease.may_acknowledge(),
            "after the step-down nothing is acknowledged"
        );
        assert_eq!(lease.role(), Role::Standby);
        assert_eq!(lease.token(), 0);
    });
}

/// A renewal's answer arriving while the lease is lost does not revive it.
#[test]
fn a_late_renewal_does_not_revive_a_lost_lease() {
    loom::model(|| {
        let lease = Arc::new(Lease::shared(1));
        lease.acquired(3, Instant::now(), &hour());
        lease.core_ready(3);
        let renewal = {
            let lease = lease.clone();
            thread::spawn(move || lease.renewed(3, Instant::now(), &hour()))
        };
        let fenced = {
            let lease = lease.clone();
            thread::spawn(move || lease.step_down(3))
        };
        renewal.join().unwrap();
        assert!(fenced.join().unwrap());
        assert!(!lease.may_acknowledge());
        assert!(!lease.may_acknowledge_for(3));
    });
}

/// A takeover after a step-down: a core that reports ready under the old token does not
/// count towards the new one.
#[test]
fn a_core_ready_under_an_old_token_does_not_activate_the_new_one() {
    loom::model(|| {
        let lease = Arc::new(Lease::shared(1));
        lease.acquired(1, Instant::now(), &hour());
        let core = {
            let lease = lease.clone();
            thread::spawn(move || lease.core_ready(1))
        };
        let keeper = {
            let lease = lease.clone();
            thread::spawn(move || {
                lease.step_down(1);
                lease.acquired(2, Instant::now(), &hour());
            })
        };
        core.join().unwrap();
        keeper.join().unwrap();
        assert_eq!(lease.token(), 2);
        assert_ne!(
            lease.role(),
            Role::Active,
            "token 2 is not active before a core loaded under it"
        );
        assert!(lease.core_ready(2));
        assert!(lease.may_acknowledge_for(2));
    });
}
