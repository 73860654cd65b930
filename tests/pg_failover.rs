//! PostgreSQL failover under load (issue 19, point 4): a primary and its synchronous
//! streaming replica (a pair of clusters of this test's own, [`common::pg_pair`]), two
//! appliances (active and standby) whose `store.postgres_host` lists both servers. The
//! primary crashes (`pg_ctl stop -m immediate`), the replica is promoted, and service must
//! resume on the promoted server without restarting an appliance, with every acknowledged
//! derivation and rotation on it (a synchronous commit is on the replica before it is
//! acknowledged), no counter regressed, no gap in a log, and I3 kept.

mod common;

use common::failover::{
    assert_reconciles, check_against_store, hello, same_seed, FailoverLoad, FailoverOutcome,
};
use common::pg_pair::{PgPair, REPLICA};
use common::{asset, http_get, register_all, PgDatabase, TestAppliance};
use custody::wire::Status;
use std::time::{Duration, Instant};

/// The lease in these tests (`tests/common` writes 1000 ms into every PostgreSQL config).
const LEASE: Duration = Duration::from_millis(1000);

/// An active appliance and a standby on a fresh database of `pair`.
fn appliances(
    pair: &PgPair,
    name: &str,
    replica_first: bool,
) -> (PgDatabase, TestAppliance, TestAppliance) {
    let db = pair.database(name, replica_first);
    let mut a = TestAppliance::prepare_with(&db.store_section());
    // The lease's steps (taken, renewed again, stepped down) are at info.
    a.set_log("info", "text");
    let migrated = a.custodyd(&["migrate"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    a.launch();
    let mut b = TestAppliance::prepare_with(&db.store_section());
    b.set_log("info", "text");
    same_seed(&a, &b);
    (db, a, b)
}

fn assets(first: u64) -> Vec<uuid::Uuid> {
    (first..first + 32).map(asset).collect()
}

/// Which role `app`'s /metrics says it holds.
fn role(app: &TestAppliance) -> &'static str {
    let (_, body) = http_get(app.admin, "/metrics");
    ["active", "standby"]
        .into_iter()
        .find(|r| {
            body.lines()
                .any(|l| l == format!("custody_role{{role=\"{r}\"}} 1"))
        })
        .unwrap_or("neither")
}

/// Crashes the primary under load, promotes the replica `promote_after` later, waits for
/// 500 acknowledgements after the promotion and checks everything against the promoted
/// server.
fn crash_and_promote(tag: &str, first_asset: u64, promote_after: Duration) {
    let Some(pair) = PgPair::start() else { return };
    let (db, mut a, mut b) = appliances(&pair, tag, false);
    let assets = assets(first_asset);
    register_all(&a, &assets);
    b.launch_standby();
    let load = FailoverLoad::start(vec![a.client_config(), b.client_config()], assets, 2, 8);
    load.wait_for_more_from(0, 1000, Duration::from_secs(20));
    pair.crash_primary();
    // After pg_ctl returns: the primary is gone, so whatever is acknowledged later was
    // sent after it died, or committed (and replicated) before.
    let crashed = load.now();
    std::thread::sleep(promote_after);
    let promoting = Instant::now();
    pair.promote_replica();
    let promotion = promoting.elapsed();
    let promoted = load.now();
    load.wait_for_more(500, Duration::from_secs(30));
    let outcome = load.finish();
    assert!(
        a.is_running(),
        "the first active kept running:\n{}",
        a.log()
    );
    assert!(b.is_running(), "the standby kept running:\n{}", b.log());
    check_against_store(&db, &outcome.acks);
    let roles = settled_roles(&pair, &a, &b, &outcome, promoted);
    let writable = pair.psql(REPLICA, "SHOW transaction_read_only");
    assert_eq!(writable, [["off"]], "the promoted server takes writes");
    assert_reconciles(if roles[0] == "active" { &a } else { &b });
    report(tag, &outcome, crashed, promoted, promotion, roles);
}

/// The roles once they settle (within 3 s: /metrics is published every 100 ms, and an
/// appliance whose lease was taken steps down at its next renewal): one active, one
/// standby. Else the failure shows who acknowledged what after the promotion, the lease
/// row and both logs.
fn settled_roles(
    pair: &PgPair,
    a: &TestAppliance,
    b: &TestAppliance,
    outcome: &FailoverOutcome,
    promoted: Duration,
) -> [&'static str; 2] {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let roles = [role(a), role(b)];
        if roles == ["active", "standby"] || roles == ["standby", "active"] {
            return roles;
        }
        if Instant::now() > deadline {
            let by = |e: usize| {
                let acks = outcome.acks.iter().filter(|x| x.endpoint == e);
                acks.filter(|x| x.sent >= promoted).count()
            };
            let owner = "SELECT instance, token, heartbeat_at, now(), address FROM custody_owner";
            panic!(
                "roles {roles:?}, not one active and one standby; acknowledged after the \
                 promotion: a {}, b {}; lease row {:?}\n--- a\n{}\n--- b\n{}",
                by(0),
                by(1),
                pair.psql(REPLICA, owner),
                a.log(),
                b.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The figures: from the crash to the first acknowledgement of a request sent after it,
/// the longest gap, and the refusals.
fn report(
    tag: &str,
    outcome: &FailoverOutcome,
    crashed: Duration,
    promoted: Duration,
    promotion: Duration,
    roles: [&str; 2],
) {
    let first = outcome
        .first_sent_after(crashed)
        .expect("an acknowledgement of a request sent after the crash");
    let after_crash = outcome.acks.iter().filter(|x| x.sent >= crashed).count();
    eprintln!(
        "{tag}: {} acknowledged ({after_crash} sent after the crash, {} rotations); promoted \
         {:?} after the crash (pg_ctl promote took {promotion:?}); first acknowledgement {:?} \
         after the crash, {:?} after the promotion, from {}; longest gap {:?}; {} not active, \
         {} unknown, {} unavailable; roles now {roles:?}",
        outcome.acks.len(),
        outcome.acks.iter().filter(|x| x.rotation).count(),
        promoted - crashed,
        first.at - crashed,
        first.at.saturating_sub(promoted),
        ["a", "b"][first.endpoint],
        outcome.longest_gap(),
        outcome.not_active,
        outcome.unknown,
        outcome.unavailable,
    );
}

#[test]
fn the_primary_crashes_its_sync_replica_is_promoted_at_once_and_nothing_acknowledged_is_lost() {
    crash_and_promote("failover_at_once", 100, Duration::ZERO);
}

/// A promotion slower than the lease: the active fences itself meanwhile, and whichever
/// appliance reaches the promoted server first takes the lapsed lease there.
#[test]
fn a_promotion_later_than_the_lease_the_lease_is_taken_on_the_promoted_server() {
    crash_and_promote("failover_late", 200, LEASE * 3);
}

/// `connect` passes over a hot standby listed first: an active and a standby started
/// later both reach the primary, and the standby takes over when the active dies.
#[test]
fn a_standby_started_later_passes_over_a_read_only_replica_listed_first() {
    let Some(pair) = PgPair::start() else { return };
    let (db, mut a, mut b) = appliances(&pair, "replica_first", true);
    let assets = assets(300);
    register_all(&a, &assets);
    let load = FailoverLoad::start(vec![a.client_config(), b.client_config()], assets, 2, 8);
    load.wait_for_more_from(0, 300, Duration::from_secs(20));
    b.launch_standby();
    let (status, active) = hello(&b).unwrap_err();
    assert_eq!(status, Some(Status::NotActive));
    assert_eq!(
        active,
        Some(a.addr.to_string()),
        "the standby sees the active's lease"
    );
    a.kill9();
    load.wait_for_more_from(1, 300, Duration::from_secs(20));
    let outcome = load.finish();
    assert_eq!(role(&b), "active");
    check_against_store(&db, &outcome.acks);
    assert_reconciles(&b);
    eprintln!(
        "replica listed first: {} acknowledged, longest gap {:?}, {} not active, {} unknown",
        outcome.acks.len(),
        outcome.longest_gap(),
        outcome.not_active,
        outcome.unknown
    );
}
