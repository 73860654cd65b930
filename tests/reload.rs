//! SIGHUP reloads the policy (roles and rate limits) without a restart, whole or not at
//! all: connections stay up, a bad file leaves the policy in force, and a change that
//! needs a restart (the list of regions) is refused.

mod common;

use common::{asset, runtime, TestAppliance, TEST_ROLES};
use custody::client::Client;
use custody::wire::Status;
use std::time::{Duration, Instant};

const NO_OPERATOR: &str = "[policy]\nderivers = [{ identity = \"test-client\", purposes = [\"TRADING\"], regions = [\"US-EAST\"] }]\nauditors = [\"test-client\"]\n";

fn sighup(app: &TestAppliance) {
    // SAFETY: sending SIGHUP to our own child process.
    unsafe { libc::kill(app.pid().expect("running") as i32, libc::SIGHUP) };
}

/// Polls REGISTER of a fresh asset until its status is `want` (5 s at most).
fn register_until(c: &Client, rt: &tokio::runtime::Runtime, n: &mut u64, want: Option<Status>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        *n += 1;
        let got = rt
            .block_on(c.register(asset(8800 + *n)))
            .err()
            .and_then(|e| e.status());
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still {got:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_reloads_the_policy_whole_or_not_at_all_on_live_connections() {
    let mut app = TestAppliance::start_with(NO_OPERATOR);
    let rt = runtime();
    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    let mut n = 0;
    register_until(&c, &rt, &mut n, Some(Status::Forbidden));

    // Grant the operator role: the same connection may register after SIGHUP.
    app.reconfigure(&format!("[policy]\n{TEST_ROLES}"));
    sighup(&app);
    register_until(&c, &rt, &mut n, None);

    // A broken file (an unknown purpose) changes nothing, and says why in the log.
    app.reconfigure("[policy]\nderivers = [{ identity = \"test-client\", purposes = [\"GAMBLING\"], regions = [\"US-EAST\"] }]\n");
    sighup(&app);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !app.log().contains("policy not reloaded") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(app.log().contains("GAMBLING"), "{}", app.log());
    register_until(&c, &rt, &mut n, None);

    // Changing the list of regions takes a restart: refused whole.
    app.reconfigure(&format!(
        "[policy]\nregions = [\"US-EAST\"]\n{NO_OPERATOR_BODY}"
    ));
    sighup(&app);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !app.log().contains("the list of regions takes a restart") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            app.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    register_until(&c, &rt, &mut n, None);

    // Taking the role away works the same way.
    app.reconfigure(NO_OPERATOR);
    sighup(&app);
    register_until(&c, &rt, &mut n, Some(Status::Forbidden));
    assert!(app.is_running());
}

const NO_OPERATOR_BODY: &str = "derivers = [{ identity = \"test-client\", purposes = [\"TRADING\"], regions = [\"US-EAST\"] }]\nauditors = [\"test-client\"]\n";
