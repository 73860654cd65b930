//! PostgreSQL crashes and comes back while the appliance is under load: requests fail
//! fast with STORE_UNAVAILABLE while it is down, nothing acknowledged is lost, and the
//! appliance serves again by itself without a restart.
//!
//! This stops the shared local server (`pg_ctlcluster … stop -m immediate`, PostgreSQL's
//! crash stop), so it is the only test in its binary: cargo runs test binaries one after
//! another, so no other PostgreSQL test is running meanwhile.

mod common;

use common::{asset, runtime, BackgroundLoad, PgDatabase, TestAppliance};
use custody::client::Client;
use std::collections::HashMap;
use std::process::Command;
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
        common::missing(
            "pg_ctlcluster",
            &"this test cannot control the cluster (needs root and a Debian cluster)",
        );
        return;
    };
    let mut app = TestAppliance::prepare_with(&db.store_section());
    assert!(app.custodyd(&["migrate"]).status.success());
    app.launch();
    let assets: Vec<uuid::Uuid> = (400..432).map(asset).collect();
    runtime().block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        for a in &assets {
            client.register(*a).await.unwrap();
        }
    });
    let load = BackgroundLoad::start(app.client_config(), assets, 4, 16);

    load.wait_for(2000, "load before the crash");
    assert!(pg_ctl(&["stop", "-m", "immediate"]), "stop PostgreSQL");
    let down_at = load.acknowledged();
    std::thread::sleep(Duration::from_millis(1500));
    let during = load.acknowledged() - down_at;
    assert!(pg_ctl(&["start"]), "start PostgreSQL");
    let started = Instant::now();
    load.wait_for(
        load.acknowledged() + 2000,
        "service did not resume by itself after PostgreSQL came back",
    );
    let resumed_after = started.elapsed();
    let outcome = load.finish();
    assert!(
        app.is_running(),
        "the appliance kept running:\n{}",
        app.log()
    );
    assert_eq!(outcome.closed, 0, "the appliance closed no connection");

    // Commits in flight when the server died are not acknowledged, and nothing can
    // commit while it is down (a few replies may still be on their way at `down_at`).
    assert!(
        during < 200,
        "{during} acknowledged while PostgreSQL was down"
    );
    assert!(
        outcome.unavailable > 0,
        "requests were refused while it was down"
    );
    let slowest = outcome.slowest_refusal;
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
    for (a, counter, receipt) in &outcome.acknowledged {
        let row = by_receipt
            .get(&(receipt.shard, receipt.seq))
            .unwrap_or_else(|| panic!("acknowledged {receipt:?} has no audit record"));
        assert_eq!(*row, (*a, *counter, "DERIVE"));
    }
    for shard in 0..2u16 {
        let seqs: Vec<u64> = rows.iter().filter(|r| r.0 == shard).map(|r| r.1).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "shard {shard}"
        );
    }
    eprintln!(
        "restart: {} acknowledged, {} refused with STORE_UNAVAILABLE (slowest {slowest:?}), service back {resumed_after:?} after PostgreSQL started",
        outcome.acknowledged.len(),
        outcome.unavailable
    );
}
