//! SIGHUP and `custody policy reload` (POLICY_RELOAD) reload the policy (roles, rate
//! limits, asset groups, regions), the TLS certificate and key and the connection limits
//! without a restart, whole or not at all: connections stay up, a bad file (or an expired
//! certificate, or a key that is not the certificate's) leaves everything in force, and a
//! region brought back keeps its switch.

mod common;

use common::{asset, runtime, TestAppliance, TEST_ROLES};
use custody::client::{Client, ClientError};
use custody::op::DeriveBody;
use custody::wire::Status;
use std::time::Duration;

const NO_OPERATOR: &str = "[policy]\nderivers = [{ identity = \"test-client\", purposes = [\"TRADING\"], regions = [\"US-EAST\"] }]\nauditors = [\"test-client\"]\n";

fn sighup(app: &TestAppliance) {
    // SAFETY: sending SIGHUP to our own child process.
    unsafe { libc::kill(app.pid().expect("running") as i32, libc::SIGHUP) };
}

/// Polls REGISTER of a fresh asset until its status is `want` (5 s at most).
fn register_until(c: &Client, rt: &tokio::runtime::Runtime, n: &mut u64, want: Option<Status>) {
    common::eventually(Duration::from_secs(5), || {
        *n += 1;
        let got = rt
            .block_on(c.register(asset(8800 + *n)))
            .err()
            .and_then(|e| e.status());
        (got == want)
            .then_some(())
            .ok_or_else(|| format!("still {got:?}, expected {want:?}"))
    });
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
    wait_for_log(&app, "configuration not reloaded");
    assert!(app.log().contains("GAMBLING"), "{}", app.log());
    register_until(&c, &rt, &mut n, None);

    // The list of regions reloads too: a new region is configured on every core.
    app.reconfigure(&format!(
        "[policy]\nregions = [\"US-EAST\", \"LATAM\"]\n{NO_OPERATOR_BODY}operators = [\"test-client\"]\n"
    ));
    sighup(&app);
    common::eventually(Duration::from_secs(5), || {
        let regions = rt.block_on(c.regions()).unwrap();
        (regions == [("US-EAST".to_string(), true), ("LATAM".to_string(), true)])
            .then_some(())
            .ok_or_else(|| format!("regions still {regions:?}"))
    });
    register_until(&c, &rt, &mut n, None);

    // Taking the role away works the same way.
    app.reconfigure(NO_OPERATOR);
    sighup(&app);
    register_until(&c, &rt, &mut n, Some(Status::Forbidden));
    assert!(app.is_running());
}

const NO_OPERATOR_BODY: &str = "derivers = [{ identity = \"test-client\", purposes = [\"TRADING\"], regions = [\"US-EAST\"] }]\nauditors = [\"test-client\"]\n";

const ADMIN_ROLES: &str =
    "operators = [\"test-client\"]\nauditors = [\"test-client\"]\nadmins = [\"test-client\"]\n";

fn derive_in(
    c: &Client,
    rt: &tokio::runtime::Runtime,
    a: uuid::Uuid,
    region: &str,
) -> Option<Status> {
    let body = DeriveBody {
        asset: a,
        path: "m/44'/0'/0'/0'/1".into(),
        region: region.into(),
        purpose: 1,
        ttl_s: 300,
    };
    rt.block_on(c.derive(body)).err().and_then(|e| e.status())
}

fn refused(result: Result<custody::op::PolicyReloaded, ClientError>) -> (Status, String) {
    match result {
        Err(ClientError::Refused(r)) => (r.status, r.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn policy_reload_over_the_wire_puts_regions_and_asset_groups_in_force() {
    let (fx, rates) = (asset(9101), asset(9102));
    let mut app = TestAppliance::start_with(&format!(
        "[policy]\n{ADMIN_ROLES}derivers = [{{ identity = \"test-client\", purposes = [\"TRADING\"], regions = [\"US-EAST\"] }}]\n"
    ));
    let rt = runtime();
    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    for a in [fx, rates] {
        rt.block_on(c.register(a)).unwrap();
    }
    assert_eq!(derive_in(&c, &rt, fx, "LATAM"), Some(Status::InvalidRegion));
    assert_eq!(derive_in(&c, &rt, rates, "US-EAST"), None);

    // A new region, and the deriver limited to the desk-fx group.
    let with_latam = format!(
        "[policy]\nregions = [\"US-EAST\", \"LATAM\"]\n{ADMIN_ROLES}derivers = [{{ identity = \"test-client\", purposes = [\"TRADING\"], regions = [\"US-EAST\", \"LATAM\"], asset_groups = [\"desk-fx\"] }}]\n[policy.asset_groups]\ndesk-fx = [\"{fx}\"]\n"
    );
    app.reconfigure(&with_latam);
    let r = rt.block_on(c.policy_reload()).unwrap();
    assert_eq!(
        (r.generation, r.identities, r.regions, r.asset_groups),
        (2, 1, 2, 1)
    );
    assert_eq!(derive_in(&c, &rt, fx, "LATAM"), None);
    assert_eq!(
        derive_in(&c, &rt, rates, "US-EAST"),
        Some(Status::Forbidden)
    );
    let out = app.custody(&[
        "--addr",
        &app.addr.to_string(),
        "--certs",
        app.certs().to_str().unwrap(),
        "policy",
        "reload",
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("generation 3"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Switched off, then removed from the list, then brought back: still off.
    rt.block_on(c.set_region("LATAM", false)).unwrap();
    app.reconfigure(&format!(
        "[policy]\nregions = [\"US-EAST\"]\n{ADMIN_ROLES}derivers = [{{ identity = \"test-client\", purposes = [\"TRADING\"], regions = [\"US-EAST\"] }}]\n"
    ));
    rt.block_on(c.policy_reload()).unwrap();
    assert_eq!(derive_in(&c, &rt, fx, "LATAM"), Some(Status::InvalidRegion));
    assert_eq!(
        rt.block_on(c.regions()).unwrap(),
        [("US-EAST".to_string(), true)]
    );
    let (status, _) = refused_region(rt.block_on(c.set_region("LATAM", true)));
    assert_eq!(
        status,
        Status::InvalidRegion,
        "a removed region cannot be switched"
    );
    app.reconfigure(&with_latam);
    rt.block_on(c.policy_reload()).unwrap();
    assert_eq!(
        derive_in(&c, &rt, fx, "LATAM"),
        Some(Status::RegionDisabled)
    );

    // A bad file is refused whole, with its problems; the policy in force stays.
    app.reconfigure(&format!(
        "[policy]\nregions = [\"US-EAST\", \"LATAM\", \"MARS\"]\n{ADMIN_ROLES}derivers = [{{ identity = \"test-client\", purposes = [\"TRADING\"], regions = [\"US-EAST\"], asset_groups = [\"desk-eq\"] }}]\n"
    ));
    let (status, message) = refused(rt.block_on(c.policy_reload()));
    assert_eq!(status, Status::PolicyInvalid);
    assert!(message.contains("desk-eq"), "{message}");
    assert_eq!(
        rt.block_on(c.regions()).unwrap(),
        [("US-EAST".to_string(), true), ("LATAM".to_string(), false)],
        "nothing of the bad file was applied"
    );
    assert_eq!(
        derive_in(&c, &rt, rates, "US-EAST"),
        Some(Status::Forbidden)
    );
    assert_eq!(derive_in(&c, &rt, fx, "US-EAST"), None);

    // Without the admin role, POLICY_RELOAD is refused (and the file is not read).
    app.reconfigure(&with_latam.replace("admins = [\"test-client\"]\n", ""));
    rt.block_on(c.policy_reload()).unwrap();
    let (status, _) = refused(rt.block_on(c.policy_reload()));
    assert_eq!(status, Status::Forbidden);
    assert!(app.is_running());
}

fn refused_region(result: Result<Vec<(String, bool)>, ClientError>) -> (Status, String) {
    match result {
        Err(ClientError::Refused(r)) => (r.status, r.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_reload_needing_more_region_slots_than_remain_is_refused_whole() {
    let mut app = TestAppliance::start_with(&format!("[policy]\n{ADMIN_ROLES}"));
    let rt = runtime();
    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    let regions = |round: usize| -> String {
        (0..255)
            .map(|i| format!("\"R{round}-{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // 3 regions at start, then 4 x 255 new ones: 1,023 of the 1,024 slots.
    for round in 0..4 {
        app.reconfigure(&format!(
            "[policy]\nregions = [{}]\n{ADMIN_ROLES}",
            regions(round)
        ));
        let r = rt.block_on(c.policy_reload()).unwrap();
        assert_eq!(r.regions, 255);
    }
    app.reconfigure(&format!(
        "[policy]\nregions = [\"R0-0\", \"NEW-1\", \"NEW-2\"]\n{ADMIN_ROLES}"
    ));
    let (status, message) = refused(rt.block_on(c.policy_reload()));
    assert_eq!(status, Status::PolicyInvalid);
    assert!(
        message.contains("2 new regions need a slot but only 1"),
        "{message}"
    );
    // Nothing of it was applied: the last good list is in force.
    let listed = rt.block_on(c.regions()).unwrap();
    assert_eq!(listed.len(), 255);
    assert!(listed
        .iter()
        .all(|(name, on)| name.starts_with("R3-") && *on));
}

/// Waits until `what` is in the appliance's log (5 s at most).
fn wait_for_log(app: &TestAppliance, what: &str) {
    common::eventually(Duration::from_secs(5), || {
        let log = app.log();
        log.contains(what)
            .then_some(())
            .ok_or_else(|| format!("{what:?} not logged:\n{log}"))
    });
}

/// The value of a metric without labels on /metrics.
fn gauge(app: &TestAppliance, name: &str) -> Option<f64> {
    let (_, body) = common::http_get(app.admin, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
}

/// A client of `app` that trusts only the CA in `ca` (the test client's own certificate
/// and key, which the appliance's client CA issued).
fn client_trusting(app: &TestAppliance, ca: &std::path::Path) -> custody::client::ClientConfig {
    custody::client::ClientConfig {
        ca: ca.to_owned(),
        ..app.client_config()
    }
}

fn copy_over(from: &std::path::Path, to: &std::path::Path) {
    // Written beside and renamed, as a deployment tool would, so custodyd never reads
    // half a file.
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn sighup_puts_a_new_certificate_in_force_for_new_connections_while_open_ones_keep_working() {
    let mut app = TestAppliance::start();
    let rt = runtime();
    let old = rt.block_on(Client::connect(&app.client_config())).unwrap();
    let a = asset(9_300);
    rt.block_on(old.register(a)).unwrap();
    assert_eq!(derive_in(&old, &rt, a, "US-EAST"), None);
    assert_eq!(gauge(&app, "custody_tls_generation"), Some(1.0));
    let old_ca = app.certs().join("ca.pem");

    // A new server certificate and key from another CA (the clients' CA stays), and a
    // lower connection limit, put in place and reloaded.
    let next = tempfile::tempdir().unwrap();
    let new = custody::tls::write_dev_certs(next.path(), "unused").unwrap();
    copy_over(&new.server_cert, &app.certs().join("server.pem"));
    copy_over(&new.server_key, &app.certs().join("server.key"));
    app.reconfigure("[limits]\nmax_inflight_per_connection = 7\n");
    sighup(&app);
    wait_for_log(&app, "configuration reloaded");
    assert_eq!(gauge(&app, "custody_tls_generation"), Some(2.0));
    assert!(
        !app.log().contains("read only at start"),
        "only reloadable keys changed: {}",
        app.log()
    );

    // New connections see the new certificate: a client trusting only the new CA gets
    // in, one trusting only the old CA is refused in the handshake.
    let fresh = rt
        .block_on(Client::connect(&client_trusting(&app, &new.ca_cert)))
        .expect("the new certificate is shown to new connections");
    let hello = rt.block_on(fresh.hello()).unwrap();
    assert_eq!(
        hello.max_inflight_per_connection, 7,
        "the new limit is announced"
    );
    assert_eq!(derive_in(&fresh, &rt, a, "US-EAST"), None);
    let refused = rt.block_on(async {
        match Client::connect(&client_trusting(&app, &old_ca)).await {
            Ok(c) => c.hello().await.map(|_| ()),
            Err(e) => Err(e),
        }
    });
    assert!(refused.is_err(), "the old certificate is still shown");

    // The connection opened before the reload keeps working, on the old certificate.
    for _ in 0..3 {
        assert_eq!(derive_in(&old, &rt, a, "US-EAST"), None);
    }

    // A key that is not the certificate's is refused whole: the policy change in the
    // same file is not applied, the certificate in force stays, and the log says why.
    let other = tempfile::tempdir().unwrap();
    let wrong = custody::tls::write_dev_certs(other.path(), "unused").unwrap();
    copy_over(&wrong.server_key, &app.certs().join("server.key"));
    app.reconfigure(NO_OPERATOR);
    sighup(&app);
    wait_for_log(&app, "configuration not reloaded");
    assert!(
        app.log()
            .contains("is not the private key of the certificate"),
        "{}",
        app.log()
    );
    assert_eq!(gauge(&app, "custody_tls_generation"), Some(2.0));
    rt.block_on(old.register(asset(9_301)))
        .expect("the operator role the refused file took away is still in force");
    let again = rt
        .block_on(Client::connect(&client_trusting(&app, &new.ca_cert)))
        .unwrap();
    rt.block_on(again.hello()).unwrap();
    assert!(app.is_running());
}

#[test]
fn a_reload_names_the_changes_that_take_a_restart() {
    let mut app = TestAppliance::start();
    app.reconfigure("[limits]\nmax_frame_body_bytes = 8192\n[audit]\nreconcile_interval_s = 0\n");
    sighup(&app);
    wait_for_log(&app, "read only at start");
    let log = app.log();
    assert!(
        log.contains("sections=audit, limits (other than the connection limits and rate_limit)\n"),
        "exactly the two sections are named: {log}"
    );
    assert!(app.is_running());
}
