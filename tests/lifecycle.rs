//! Rotation and the asset lifecycle over real TLS sockets: zero-downtime rotation under a
//! steady derive load (I3), the idempotent retry of a rotation after a dropped connection
//! and across a restart, compare-and-set, suspend / resume / retire with their statuses,
//! the roles that may do each, and the audit log that records every transition.

mod common;

use common::{asset, derive_body, read_audit, runtime, TestAppliance, TEST_ROLES};
use custody::audit::AuditEvent;
use custody::client::{Client, ClientError};
use custody::lifecycle::AssetState;
use custody::op::{Request, RotateBody};
use custody::wire::Status;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn operator_appliance(admins: &str) -> TestAppliance {
    TestAppliance::start_with(&format!("[policy]\n{TEST_ROLES}admins = {admins}\n"))
}

fn status_of(e: ClientError) -> Status {
    e.status()
        .unwrap_or_else(|| panic!("expected a refusal, got {e}"))
}

#[test]
fn rotation_under_load_loses_nothing_and_no_stale_counter_follows_its_acknowledgement() {
    let app = operator_appliance("[]");
    let a = asset(5150);
    let rt = runtime();
    let client = Arc::new(rt.block_on(Client::connect(&app.client_config())).unwrap());
    rt.block_on(client.register(a)).unwrap();

    // 4 connections x 8 lanes derive `a` without pause; each derivation is recorded with
    // the instant it was sent and the counter it got.
    let seen: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let config = app.client_config();
    let load = {
        let (seen, stop) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut lanes = Vec::new();
                for _ in 0..4 {
                    let c = Arc::new(Client::connect(&config).await.unwrap());
                    for lane in 0..8 {
                        let (c, seen, stop) = (c.clone(), seen.clone(), stop.clone());
                        lanes.push(tokio::spawn(async move {
                            let mut i = 0u32;
                            while !stop.load(Ordering::Relaxed) {
                                i += 1;
                                let sent = Instant::now();
                                let path = format!("m/44'/0'/0'/{lane}'/{i}");
                                match c.derive(derive_body(a, &path)).await {
                                    Ok(d) => seen.lock().unwrap().push((sent, d.counter)),
                                    Err(e) => panic!("a derivation failed during rotations: {e}"),
                                }
                            }
                        }));
                    }
                }
                for l in lanes {
                    l.await.unwrap();
                }
            })
        })
    };
    // Five rotations while the load runs, each acknowledged at a known instant.
    let mut acks = Vec::new();
    for n in 1..=5u64 {
        std::thread::sleep(Duration::from_millis(60));
        let r = rt
            .block_on(client.rotate(a, uuid::Uuid::new_v4(), Some(n - 1)))
            .expect("rotation");
        acks.push((Instant::now(), r.counter));
        assert_eq!(r.counter, n);
    }
    std::thread::sleep(Duration::from_millis(60));
    stop.store(true, Ordering::Relaxed);
    load.join().expect("no derivation failed");

    let seen = seen.lock().unwrap();
    assert!(seen.len() > 500, "the load ran: {} derivations", seen.len());
    // I3: a derivation sent after a rotation was acknowledged uses its counter or a later one.
    for (acked_at, counter) in &acks {
        let stale = seen
            .iter()
            .filter(|(sent, c)| sent > acked_at && c < counter)
            .count();
        assert_eq!(
            stale, 0,
            "derivations sent after rotation {counter} used an older counter"
        );
    }
    // Every counter from 0 to 5 served someone: no pause in service around a rotation.
    for c in 0..=5 {
        assert!(
            seen.iter().any(|(_, got)| *got == c),
            "counter {c} never served"
        );
    }
    drop(seen);

    // The audit log: every rotation recorded in order, and in sequence order no
    // derivation uses a counter older than the latest rotation before it (I2, I3).
    let rows: Vec<_> = read_audit(&app.db_path())
        .into_iter()
        .filter(|r| r.asset == a)
        .collect();
    let rotations: Vec<u64> = rows
        .iter()
        .filter(|r| r.event == AuditEvent::Rotate)
        .map(|r| r.counter)
        .collect();
    assert_eq!(rotations, [1, 2, 3, 4, 5]);
    let mut current = 0;
    for r in &rows {
        match r.event {
            AuditEvent::Rotate => current = r.counter,
            AuditEvent::Derive => assert_eq!(r.counter, current, "seq {}", r.seq),
            _ => {}
        }
    }
}

#[test]
fn a_rotation_retried_after_a_dropped_connection_or_a_restart_answers_the_first_result() {
    let mut app = operator_appliance("[]");
    let a = asset(6021);
    let id = uuid::Uuid::new_v4();
    let rt = runtime();
    rt.block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        c.register(a).await.unwrap();
        // The request goes out and the connection is dropped before the answer.
        let mut frame = Vec::new();
        Request::Rotate(RotateBody {
            asset: a,
            rotation_id: id,
            expected_counter: None,
        })
        .encode(77, &mut frame);
        c.send_raw(frame).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    });
    let first = rt.block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        // The retry: the first rotation's result, not a second rotation.
        loop {
            match c.rotate(a, id, None).await {
                Ok(r) => break r,
                Err(e) if e.status() == Some(Status::Busy) => {
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    });
    assert_eq!((first.counter, first.replayed), (1, true));
    app.kill9();
    app.launch();
    rt.block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        let again = c.rotate(a, id, None).await.unwrap();
        assert_eq!(
            (again.counter, again.receipt, again.replayed),
            (1, first.receipt, true)
        );
        // The id belongs to `a`; a new id rotates again.
        let b = asset(6022);
        c.register(b).await.unwrap();
        assert_eq!(
            status_of(c.rotate(b, id, None).await.unwrap_err()),
            Status::RotationIdReused
        );
        let next = c.rotate(a, uuid::Uuid::new_v4(), None).await.unwrap();
        assert_eq!((next.counter, next.replayed), (2, false));
        assert_eq!(c.status(a).await.unwrap().counter, 2);
    });
    let rotations = read_audit(&app.db_path())
        .into_iter()
        .filter(|r| r.event == AuditEvent::Rotate)
        .count();
    assert_eq!(rotations, 2, "the retried rotation was recorded once");
}

#[test]
fn suspend_resume_retire_with_their_roles_statuses_and_audit() {
    let mut app = operator_appliance("[]");
    let a = asset(7001);
    let rt = runtime();
    let path = "m/44'/0'/0'/0'/1";
    rt.block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        c.register(a).await.unwrap();
        assert_eq!(c.suspend(a).await.unwrap().state, AssetState::Suspended);
        assert_eq!(
            status_of(c.derive(derive_body(a, path)).await.unwrap_err()),
            Status::AssetSuspended
        );
        assert_eq!(
            status_of(c.suspend(a).await.unwrap_err()),
            Status::InvalidTransition
        );
        assert_eq!(
            status_of(c.rotate(a, uuid::Uuid::new_v4(), None).await.unwrap_err()),
            Status::AssetSuspended
        );
        assert_eq!(c.resume(a).await.unwrap().state, AssetState::Active);
        c.derive(derive_body(a, path)).await.unwrap();
        // An operator may not retire; a bad rotation id or asset id is its own status.
        assert_eq!(status_of(c.retire(a).await.unwrap_err()), Status::Forbidden);
        assert_eq!(
            status_of(c.rotate(a, uuid::Uuid::nil(), None).await.unwrap_err()),
            Status::InvalidRotationId
        );
        assert_eq!(
            status_of(c.suspend(uuid::Uuid::nil()).await.unwrap_err()),
            Status::InvalidAssetId
        );
        assert_eq!(
            status_of(c.suspend(asset(7002)).await.unwrap_err()),
            Status::UnknownAsset
        );
    });
    // As an admin, through the CLI.
    app.kill9();
    app.reconfigure(&format!(
        "[policy]\n{TEST_ROLES}admins = [\"test-client\"]\n"
    ));
    app.launch();
    let (certs, addr) = (app.certs().display().to_string(), app.addr.to_string());
    let a_text = a.to_string();
    let cli = |args: &[&str]| {
        let mut all = vec!["--addr", addr.as_str(), "--certs", certs.as_str()];
        all.extend_from_slice(args);
        let out = app.custody(&all);
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (code, text) = cli(&["rotate", &a_text, "--expect-counter", "0"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("counter 0 -> 1"), "{text}");
    let (code, text) = cli(&["rotate", &a_text, "--expect-counter", "0"]);
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("COUNTER_MISMATCH"), "{text}");
    let (code, text) = cli(&["retire", &a_text]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("state RETIRED"), "{text}");
    for op in ["suspend", "resume", "rotate", "retire"] {
        let (code, text) = cli(&[op, &a_text]);
        assert_eq!(code, Some(3), "{op}: {text}");
        assert!(text.contains("ASSET_RETIRED"), "{op}: {text}");
    }
    let (_, text) = cli(&["status", &a_text]);
    assert!(text.contains("state RETIRED counter 1"), "{text}");

    // Every transition is in the audit log with its requester.
    let events: Vec<(AuditEvent, AssetState, u64)> = read_audit(&app.db_path())
        .into_iter()
        .filter(|r| r.asset == a && r.event != AuditEvent::Derive)
        .map(|r| {
            assert_eq!(r.requester, "test-client");
            (r.event, r.state, r.counter)
        })
        .collect();
    use AuditEvent::*;
    assert_eq!(
        events,
        [
            (Register, AssetState::Active, 0),
            (Suspend, AssetState::Suspended, 0),
            (Resume, AssetState::Active, 0),
            (Rotate, AssetState::Active, 1),
            (Retire, AssetState::Retired, 1),
        ]
    );
}

#[test]
fn the_gate_refuses_by_role_purpose_and_region_and_counts_on() {
    // A deriver of TRADING in US-EAST only, and auditor: no operator role.
    let app = TestAppliance::start_with(
        "[policy]\nderivers = [{ identity = \"test-client\", purposes = [\"TRADING\"], regions = [\"US-EAST\"] }]\nauditors = [\"test-client\"]\n",
    );
    let a = asset(7101);
    runtime().block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        for e in [
            c.register(a).await.unwrap_err(),
            c.rotate(a, uuid::Uuid::new_v4(), None).await.unwrap_err(),
            c.suspend(a).await.unwrap_err(),
            c.resume(a).await.unwrap_err(),
            c.retire(a).await.unwrap_err(),
            c.seal().await.unwrap_err(),
        ] {
            assert_eq!(status_of(e), Status::Forbidden);
        }
        // The auditor reads status (of an asset nobody could register here).
        assert_eq!(
            status_of(c.status(a).await.unwrap_err()),
            Status::UnknownAsset
        );
        // Purpose and region outside the grant: FORBIDDEN, saying which.
        let mut body = derive_body(a, "m/44'/0'/0'/0'/1");
        body.purpose = custody::policy::Purpose::Settlement as u8;
        let e = c.derive(body.clone()).await.unwrap_err();
        assert_eq!(e.status(), Some(Status::Forbidden));
        assert!(e.to_string().contains("purpose SETTLEMENT"), "{e}");
        body.purpose = custody::policy::Purpose::Trading as u8;
        body.region = "EU-WEST".into();
        let e = c.derive(body.clone()).await.unwrap_err();
        assert!(e.to_string().contains("region EU-WEST"), "{e}");
        // Within the grant, the request goes on to the shard (which does not know `a`).
        body.region = "US-EAST".into();
        assert_eq!(
            status_of(c.derive(body).await.unwrap_err()),
            Status::UnknownAsset
        );
    });
}

#[test]
fn an_identity_without_a_role_gets_only_hello_and_the_seal_state() {
    let app =
        TestAppliance::start_with("[policy]\nregions = [\"US-EAST\", \"EU-WEST\", \"APAC\"]\n");
    let a = asset(7102);
    runtime().block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        c.hello().await.unwrap();
        c.seal_status().await.unwrap();
        // Refused before its fields are even looked at (this path is invalid).
        let e = c.derive(derive_body(a, "m/0")).await.unwrap_err();
        assert_eq!(e.status(), Some(Status::Forbidden));
        assert!(e.to_string().contains("has no role"), "{e}");
        for e in [
            c.register(a).await.unwrap_err(),
            c.status(a).await.unwrap_err(),
            c.rotate(a, uuid::Uuid::new_v4(), None).await.unwrap_err(),
        ] {
            assert_eq!(status_of(e), Status::Forbidden);
        }
    });
}

#[test]
fn the_rate_limit_holds_each_requester_and_asset_to_its_rate_and_says_when_to_retry() {
    // 5 requests per 60 s for derivers; operators and auditors unlimited in practice.
    let app = TestAppliance::start_with(
        "[policy]\nderivers = [{ identity = \"test-client\", purposes = [\"TRADING\"], regions = [\"US-EAST\"] }]\noperators = [\"test-client\"]\nrate_limits = { deriver = \"5/60s\", operator = \"1000/1s\" }\n",
    );
    let (a, b) = (asset(7201), asset(7202));
    runtime().block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        c.register(a).await.unwrap();
        c.register(b).await.unwrap();
        for i in 0..5 {
            c.derive(derive_body(a, &format!("m/44'/0'/0'/0'/{i}")))
                .await
                .unwrap();
        }
        // The sixth within the period is refused, with when to retry (12 s = 60 s / 5).
        let e = c
            .derive(derive_body(a, "m/44'/0'/0'/0'/5"))
            .await
            .unwrap_err();
        match e {
            ClientError::Refused(r) => {
                assert_eq!(r.status, Status::RateLimited);
                assert!(
                    (11_000..=12_000).contains(&r.retry_after_ms),
                    "{}",
                    r.retry_after_ms
                );
                assert!(r.message.contains("5/60s"), "{}", r.message);
            }
            other => panic!("{other}"),
        }
        // Another asset has its own bucket; nothing was audited for the refused request.
        c.derive(derive_body(b, "m/44'/0'/0'/0'/1")).await.unwrap();
    });
    let derives = read_audit(&app.db_path())
        .into_iter()
        .filter(|r| r.event == AuditEvent::Derive)
        .count();
    assert_eq!(derives, 6);
}
