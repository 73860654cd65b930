//! Availability against real processes (issue 19, I6, I7): two appliances on one
//! PostgreSQL database, one active and one standby, under pipelined load that follows the
//! active; every acknowledgement is checked at the end against the store.

mod common;

use common::failover::{assert_reconciles, check_against_store, hello, same_seed, FailoverLoad};
use common::{asset, http_get, register_all, runtime, PgDatabase, TestAppliance};
use custody::client::Client;
use custody::wire::Status;
use std::time::{Duration, Instant};

/// The lease in these tests (`tests/common` writes 1000 ms into every PostgreSQL config).
const LEASE: Duration = Duration::from_millis(1000);

fn pair(tag: &str) -> Option<(PgDatabase, TestAppliance, TestAppliance)> {
    let db = PgDatabase::create(tag)?;
    let mut a = TestAppliance::prepare_with(&db.store_section());
    assert!(a.custodyd(&["migrate"]).status.success());
    a.launch();
    let b = TestAppliance::prepare_with(&db.store_section());
    same_seed(&a, &b);
    Some((db, a, b))
}

fn assets(first: u64) -> Vec<uuid::Uuid> {
    (first..first + 32).map(asset).collect()
}

fn metric(app: &TestAppliance, line_start: &str) -> Option<String> {
    let (_, body) = http_get(app.admin, "/metrics");
    body.lines()
        .find(|l| l.starts_with(line_start))
        .map(|l| l.rsplit(' ').next().unwrap_or("").to_owned())
}

#[test]
fn a_standby_answers_not_active_naming_the_active_and_changes_nothing_for_clients() {
    let Some((db, a, mut b)) = pair("standby") else {
        return;
    };
    let assets = assets(100);
    register_all(&a, &assets);
    let load = FailoverLoad::start(vec![a.client_config()], assets, 2, 8);
    load.wait_for_more_from(0, 500, Duration::from_secs(20));
    // The standby starts while the active serves.
    b.launch_standby();
    load.wait_for_more_from(0, 500, Duration::from_secs(20));
    let (status, active) = hello(&b).unwrap_err();
    assert_eq!(status, Some(Status::NotActive));
    assert_eq!(
        active,
        Some(a.addr.to_string()),
        "the standby names the active"
    );
    assert_eq!(
        http_get(b.admin, "/readyz").0,
        503,
        "a standby is not ready"
    );
    assert_eq!(http_get(a.admin, "/readyz").0, 200);
    assert_eq!(
        metric(&b, "custody_role{role=\"standby\"}").as_deref(),
        Some("1")
    );
    assert_eq!(
        metric(&a, "custody_role{role=\"active\"}").as_deref(),
        Some("1")
    );
    // The seal's requests are the standby's own: it is unsealed to take over.
    runtime().block_on(async {
        let c = Client::connect(&b.client_config()).await.unwrap();
        c.seal_status().await.expect("SEAL_STATUS on a standby");
    });
    let outcome = load.finish();
    assert_eq!(
        outcome.not_active, 0,
        "the active never stopped acknowledging"
    );
    assert_eq!(outcome.unknown, 0);
    assert_eq!(outcome.unavailable, 0);
    assert!(
        outcome.longest_gap() < Duration::from_millis(500),
        "{:?}",
        outcome.longest_gap()
    );
    check_against_store(&db, &outcome.acks);
    assert_reconciles(&a);
}

#[test]
fn sigkill_of_the_active_a_standby_serves_and_nothing_acknowledged_is_lost() {
    let Some((db, mut a, mut b)) = pair("sigkill") else {
        return;
    };
    let assets = assets(200);
    register_all(&a, &assets);
    b.launch_standby();
    let load = FailoverLoad::start(vec![a.client_config(), b.client_config()], assets, 2, 8);
    load.wait_for_more_from(0, 1000, Duration::from_secs(20));
    let killed = Instant::now();
    a.kill9();
    load.wait_for_more_from(1, 500, Duration::from_secs(20));
    let took = killed.elapsed();
    let outcome = load.finish();
    assert!(
        took < LEASE * 5,
        "the standby served {took:?} after the kill (lease {LEASE:?})"
    );
    assert!(metric(&b, "custody_role{role=\"active\"}").as_deref() == Some("1"));
    assert_eq!(
        metric(&b, "custody_lease_takeovers_total").as_deref(),
        Some("1")
    );
    check_against_store(&db, &outcome.acks);
    assert_reconciles(&b);
    eprintln!(
        "takeover: {} acknowledged, gap {:?}, {} not active, {} unknown, {} unavailable",
        outcome.acks.len(),
        outcome.longest_gap(),
        outcome.not_active,
        outcome.unknown,
        outcome.unavailable
    );
}

#[test]
fn a_paused_active_acknowledges_nothing_after_its_lease_could_lapse_and_steps_down() {
    let Some((db, mut a, mut b)) = pair("pause") else {
        return;
    };
    let assets = assets(300);
    register_all(&a, &assets);
    b.launch_standby();
    let load = FailoverLoad::start(vec![a.client_config(), b.client_config()], assets, 2, 8);
    load.wait_for_more_from(0, 1000, Duration::from_secs(20));
    let pid = a.pid().expect("running") as i32;
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = Instant::now();
    load.wait_for_more_from(1, 500, Duration::from_secs(20));
    std::thread::sleep((LEASE * 2).saturating_sub(stopped.elapsed()));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let resumed = load.now();
    // The resumed appliance is a standby: it names the new active.
    common::wait::eventually(Duration::from_secs(5), || match hello(&a) {
        Err((Some(Status::NotActive), Some(active))) if active == b.addr.to_string() => Ok(()),
        other => Err(format!("the resumed appliance answers {other:?}")),
    });
    load.wait_for_more_from(1, 500, Duration::from_secs(20));
    let outcome = load.finish();
    assert!(a.is_running(), "it serves on as a standby:\n{}", a.log());
    assert_eq!(
        metric(&a, "custody_lease_step_downs_total").as_deref(),
        Some("1")
    );
    // Whatever the paused appliance answered once it resumed came after its lease had
    // lapsed: none of it may be an acknowledgement.
    let late: Vec<_> = outcome
        .acks
        .iter()
        .filter(|x| x.endpoint == 0 && x.at >= resumed)
        .collect();
    assert!(late.is_empty(), "acknowledged after it resumed: {late:?}");
    check_against_store(&db, &outcome.acks);
    assert_reconciles(&b);
}

#[test]
fn repeated_takeovers_back_and_forth_lose_nothing() {
    let Some((db, a, b)) = pair("repeat") else {
        return;
    };
    let assets = assets(400);
    register_all(&a, &assets);
    let mut apps = [a, b];
    apps[1].launch_standby();
    let load = FailoverLoad::start(
        vec![apps[0].client_config(), apps[1].client_config()],
        assets,
        2,
        8,
    );
    load.wait_for_more_from(0, 300, Duration::from_secs(20));
    let mut active = 0;
    for round in 0..6 {
        apps[active].kill9();
        let next = 1 - active;
        load.wait_for_more_from(next, 300, Duration::from_secs(20));
        apps[active].launch_standby();
        eprintln!("round {round}: {} took over", ["a", "b"][next]);
        active = next;
    }
    let outcome = load.finish();
    let takeovers = metric(&apps[active], "custody_lease_takeovers_total");
    assert_eq!(
        takeovers.as_deref(),
        Some("1"),
        "a restarted appliance counts its own"
    );
    check_against_store(&db, &outcome.acks);
    assert_reconciles(&apps[active]);
    eprintln!(
        "6 takeovers: {} acknowledged, longest gap {:?}, {} not active, {} unknown",
        outcome.acks.len(),
        outcome.longest_gap(),
        outcome.not_active,
        outcome.unknown
    );
}

#[test]
fn a_standby_unsealed_with_another_seed_never_takes_over() {
    let Some((_db, mut a, _)) = pair("seed") else {
        return;
    };
    // Not `same_seed`: this one has a root seed of its own (other keys, another audit key).
    let mut stranger = TestAppliance::prepare_with(&_db.store_section());
    stranger.launch_standby();
    a.kill9();
    std::thread::sleep(LEASE * 4);
    let (status, _) = hello(&stranger).unwrap_err();
    assert_eq!(status, Some(Status::NotActive), "it stays a standby");
    assert!(
        stranger.log().contains("another root seed"),
        "it says why:\n{}",
        stranger.log()
    );
}
