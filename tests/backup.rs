//! Backup and restore of the embedded store as the runbook gives them
//! (docs/operations.md, "Backup and restore"): `sqlite3 custody.db "VACUUM INTO 'FILE'"` taken
//! while the appliance serves derivations is a consistent snapshot; restored into a
//! stopped appliance it starts, its full reconciliation finds nothing, and what happened
//! after the backup (a rotation, derivations) is gone from it, as the runbook warns.

mod common;

use common::{asset, register_all, runtime, BackgroundLoad, TestAppliance};
use custody::client::Client;
use std::process::Command;

/// `sqlite3 ARGS`, given at most a minute (`timeout`); `None` when sqlite3 is missing.
fn sqlite3(args: &[&str]) -> Option<std::process::Output> {
    if let Err(e) = common::runs("sqlite3", &["-version"]) {
        common::missing("the sqlite3 command-line tool (package sqlite3)", &e);
        return None;
    }
    Some(
        Command::new("timeout")
            .arg("60")
            .arg("sqlite3")
            .args(args)
            .output()
            .expect("run timeout sqlite3"),
    )
}

#[test]
fn an_online_backup_restores_into_an_appliance_that_reconciles_clean() {
    let mut app = TestAppliance::start();
    let assets: Vec<_> = (0..16).map(|i| asset(12_000 + i)).collect();
    register_all(&app, &assets);
    let load = BackgroundLoad::start(app.client_config(), assets.clone(), 2, 8);
    load.wait_for(2_000, "derivations before the backup");

    // The backup, as the runbook gives it, while derivations commit.
    let backup = app.dir.path().join("backup.db");
    let db = app.db_path();
    let at_backup = load.acknowledged();
    let Some(out) = sqlite3(&[
        db.to_str().unwrap(),
        &format!("VACUUM INTO '{}'", backup.display()),
    ]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    load.wait_for(load.acknowledged() + 2_000, "derivations after the backup");
    let outcome = load.finish();
    assert!(outcome.acknowledged.len() > at_backup);
    let check = sqlite3(&[backup.to_str().unwrap(), "PRAGMA integrity_check"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "ok");

    // A rotation after the backup.
    let rt = runtime();
    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    let rotated = assets[0];
    let before = rt.block_on(c.status(rotated)).unwrap().counter;
    rt.block_on(c.rotate(rotated, uuid::Uuid::new_v4(), Some(before)))
        .unwrap();
    assert_eq!(rt.block_on(c.status(rotated)).unwrap().counter, before + 1);
    drop(c);

    // Restore, as the runbook gives it: stopped, the WAL and index files removed.
    app.kill9();
    std::fs::rename(&db, app.dir.path().join("custody.db.replaced")).unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    std::fs::copy(&backup, &db).unwrap();
    app.launch();

    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    let summary = rt.block_on(c.reconcile(true)).unwrap();
    assert_eq!(summary.findings_total, 0, "{:?}", summary.findings);
    assert_eq!(summary.assets_drifted, 0);
    // Every derivation acknowledged before the backup began is in it (16 registrations
    // and one record per derivation), and not all of those acknowledged after it.
    let acknowledged = outcome.acknowledged.len() as u64;
    assert!(
        (16 + at_backup as u64..16 + acknowledged).contains(&summary.records_checked),
        "{} records: the backup is a snapshot between {at_backup} and {acknowledged} derivations",
        summary.records_checked
    );
    // The rotation after the backup is gone: the old counter is back in force, which is
    // why the runbook has every later rotation applied again before clients return.
    assert_eq!(rt.block_on(c.status(rotated)).unwrap().counter, before);
    rt.block_on(c.rotate(rotated, uuid::Uuid::new_v4(), Some(before)))
        .unwrap();
    assert_eq!(rt.block_on(c.status(rotated)).unwrap().counter, before + 1);
    assert!(app.is_running());
}
