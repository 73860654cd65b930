//! PostgreSQL crashes and comes back while the appliance is under load: requests fail
//! fast with STORE_UNAVAILABLE while it is down, nothing acknowledged is lost, and the
//! appliance serves again by itself without a restart.
//!
//! This stops the shared local server (`pg_ctlcluster … stop -m immediate`, PostgreSQL's
//! crash stop), so it is the only test in its binary: cargo runs test binaries one after
//! another, so no other PostgreSQL test is running meanwhile.

mod common;

use common::{asset, derive_body, runtime, PgDatabase, TestAppliance};
use custody::client::{Client, ClientError};
use custody::wire::Status;
use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `pg_ctlcluster VERSION main ACTION…` for the local cluster, or `None` when this
/// machine cannot control it (no cluster, not root).
fn cluster_control() -> Option<impl Fn(&[&str]) -> bool> {
    let version = std::fs::read_dir("/etc/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.chars().all(|c| c.is_ascii_digit()))?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    Some(move |action: &[&str]| {
        Command::new("pg_ctlcluster")
            .arg("--skip-systemctl-redirect")
            .arg(&version)
            .arg("main")
            .args(action)
            .status()
            .is_ok_and(|s| s.success())
    })
}

#[test]
fn postgres_crash_restart_under_load_loses_nothing_and_service_resumes() {
    let Some(db) = PgDatabase::create("restart") else {
        return;
    };
    let Some(pg_ctl) = cluster_control() else {
        assert!(
            std::env::var("CUSTODY_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "CUSTODY_REQUIRE_SERVICES=1 but this test cannot run pg_ctlcluster (needs root and a Debian cluster)"
        );
        eprintln!("cannot control the PostgreSQL cluster: skipping the restart test");
        return;
    };
    let mut app = TestAppliance::prepare_with(&db.store_section());
    assert!(app.custodyd(&["migrate"]).status.success());
    app.launch();
    let assets: Vec<uuid::Uuid> = (400..432).map(asset).collect();
    let config = app.client_config();

    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let unavailable = Arc::new(AtomicUsize::new(0));
    let slowest_refusal = Arc::new(Mutex::new(Duration::ZERO));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (acknowledged, unavailable, slowest_refusal, stop, assets) = (
            acknowledged.clone(),
            unavailable.clone(),
            slowest_refusal.clone(),
            stop.clone(),
            assets.clone(),
        );
        std::thread::spawn(move || runtime().block_on(async move {
            let mut tasks = Vec::new();
            for c in 0..4usize {
                let client = Arc::new(Client::connect(&config).await.expect("connect"));
                for a in &assets {
                    let _ = client.register(*a).await;
                }
                for lane in 0..16usize {
                    let (client, acknowledged, unavailable, slowest_refusal, stop, assets) = (
                        client.clone(),
                        acknowledged.clone(),
                        unavailable.clone(),
                        slowest_refusal.clone(),
                        stop.clone(),
                        assets.clone(),
                    );
                    tasks.push(tokio::spawn(async move {
                        let mut i = 0usize;
                        while !stop.load(Ordering::Relaxed) {
                            i += 1;
                            let a = assets[(c * 16 + lane + i) % assets.len()];
                            let sent = Instant::now();
                            match client
                                .derive(derive_body(a, &format!("m/44'/0'/0'/0'/{i}")))
                                .await
                            {
                                Ok(d) => acknowledged.lock().unwrap().push((a, d.counter, d.receipt)),
                                Err(e) if e.status() == Some(Status::StoreUnavailable) => {
                                    unavailable.fetch_add(1, Ordering::Relaxed);
                                    let took = sent.elapsed();
                                    {
                                        let mut slowest = slowest_refusal.lock().unwrap();
                                        *slowest = (*slowest).max(took);
                                    }
                                    tokio::time::sleep(Duration::from_millis(5)).await;
                                }
                                Err(ClientError::Closed) => panic!("the appliance closed a connection"),
                                Err(e) => panic!("unexpected error while PostgreSQL restarts: {e}"),
                            }
                        }
                    }));
                }
            }
            for t in tasks {
                t.await.expect("load task");
            }
        }))
    };
    let acked = || acknowledged.lock().unwrap().len();
    let wait_for = |n: usize, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked() < n {
            assert!(Instant::now() < deadline, "{what}: {} acknowledged", acked());
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    wait_for(2000, "load before the crash");
    assert!(pg_ctl(&["stop", "-m", "immediate"]), "stop PostgreSQL");
    let down_at = acked();
    std::thread::sleep(Duration::from_millis(1500));
    let during = acked() - down_at;
    assert!(pg_ctl(&["start"]), "start PostgreSQL");
    let started = Instant::now();
    let up_at = acked();
    wait_for(up_at + 2000, "service did not resume by itself after PostgreSQL came back");
    let resumed_after = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load");
    assert!(app.is_running(), "the appliance kept running:\n{}", app.log());

    // Commits in flight when the server died are not acknowledged, and nothing can
    // commit while it is down (a few replies may still be on their way at `down_at`).
    assert!(during < 200, "{during} acknowledged while PostgreSQL was down");
    assert!(unavailable.load(Ordering::Relaxed) > 0, "requests were refused while it was down");
    let slowest = *slowest_refusal.lock().unwrap();
    assert!(
        slowest < Duration::from_millis(2500),
        "refusals come within the commit timeout (2 s), slowest {slowest:?}"
    );

    // Every acknowledged derivation is in the audit log, and each shard's sequence has no gap.
    let rows = db.audit_rows();
    let by_receipt: HashMap<(u16, u64), (uuid::Uuid, u64, &str)> = rows
        .iter()
        .map(|(shard, seq, event, a, counter)| ((*shard, *seq), (*a, *counter, event.as_str())))
        .collect();
    let acknowledged = acknowledged.lock().unwrap();
    for (a, counter, receipt) in acknowledged.iter() {
        let row = by_receipt
            .get(&(receipt.shard, receipt.seq))
            .unwrap_or_else(|| panic!("acknowledged {receipt:?} has no audit record"));
        assert_eq!(*row, (*a, *counter, "DERIVE"));
    }
    for shard in 0..2u16 {
        let seqs: Vec<u64> = rows.iter().filter(|r| r.0 == shard).map(|r| r.1).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "shard {shard}");
    }
    eprintln!(
        "restart: {} acknowledged, {} refused with STORE_UNAVAILABLE (slowest {slowest:?}), service back {resumed_after:?} after PostgreSQL started",
        acknowledged.len(),
        unavailable.load(Ordering::Relaxed)
    );
}
