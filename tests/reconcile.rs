//! `custody reconcile --offline` against the stores a running appliance wrote, on SQLite
//! and on PostgreSQL: a clean log gives no finding; each kind of tampering gives exactly
//! its finding.

mod common;

use common::{asset, derive_body, runtime, PgDatabase, TestAppliance};
use custody::client::Client;
use std::path::Path;

/// Registers two assets, derives, rotates and suspends: a log of every kind of record.
fn activity(app: &TestAppliance) -> (uuid::Uuid, uuid::Uuid) {
    let rt = runtime();
    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    let (a, b) = (asset(701), asset(702));
    rt.block_on(async {
        c.register(a).await.unwrap();
        c.register(b).await.unwrap();
        for i in 0..12 {
            c.derive(derive_body(
                if i % 2 == 0 { a } else { b },
                "m/44'/0'/0'/0'/1",
            ))
            .await
            .unwrap();
        }
        c.rotate(a, uuid::Uuid::new_v4(), None).await.unwrap();
        for _ in 0..4 {
            c.derive(derive_body(a, "m/44'/0'/0'/0'/1")).await.unwrap();
        }
        c.suspend(b).await.unwrap();
    });
    (a, b)
}

/// Runs the offline reconciliation with `config`: exit code and the JSON report.
fn reconcile(app: &TestAppliance, config: &Path, seed: bool) -> (i32, serde_json::Value) {
    let seed_file = app.dir.path().join("dev-seed.bin");
    let mut args = vec![
        "reconcile",
        "--offline",
        "--json",
        "--config",
        config.to_str().unwrap(),
    ];
    if seed {
        args.extend(["--seed-file", seed_file.to_str().unwrap()]);
    }
    app.custody_json(&args)
}

/// The kinds of the report's findings, sorted.
fn kinds(report: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap().to_owned())
        .collect();
    k.sort();
    k.dedup();
    k
}

fn shard_of(app: &TestAppliance, a: uuid::Uuid) -> u16 {
    common::read_audit(&app.db_path())
        .iter()
        .find(|r| r.asset == a)
        .unwrap()
        .shard
}

#[test]
fn sqlite_a_clean_log_has_no_finding_and_each_tampering_its_own() {
    let app = TestAppliance::start();
    let (a, b) = activity(&app);
    let config = app.config_path();
    let (code, report) = reconcile(&app, &config, true);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["findings"].as_array().unwrap().len(), 0);
    assert_eq!(report["drift_ratio"].as_f64(), Some(0.0));
    assert_eq!(report["assets_checked"].as_u64(), Some(2));
    assert_eq!(report["macs_checked"].as_bool(), Some(true));
    let records = common::read_audit(&app.db_path()).len() as u64;
    assert_eq!(report["records_checked"].as_u64(), Some(records));

    let s = shard_of(&app, a);
    let id_a = a.hyphenated().to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "delete a record",
            format!("DELETE FROM custody_audit_log WHERE shard = {s} AND seq = 3"),
            "CHAIN_BROKEN",
        ),
        (
            "delete the last record (its checkpoint kept)",
            format!(
                "DELETE FROM custody_audit_log WHERE shard = {s} AND seq = \
                 (SELECT max(seq) FROM custody_audit_log WHERE shard = {s})"
            ),
            "CHAIN_BROKEN",
        ),
        (
            "change an audited counter",
            format!("UPDATE custody_audit_log SET counter = counter + 5 WHERE shard = {s} AND seq = 4"),
            "CHAIN_BROKEN",
        ),
        (
            "swap two records",
            format!(
                "UPDATE custody_audit_log SET seq = 1000000 WHERE shard = {s} AND seq = 3; \
                 UPDATE custody_audit_log SET seq = 3 WHERE shard = {s} AND seq = 4; \
                 UPDATE custody_audit_log SET seq = 4 WHERE shard = {s} AND seq = 1000000;"
            ),
            "CHAIN_BROKEN",
        ),
        (
            "insert a forged record",
            format!(
                "INSERT INTO custody_audit_log (shard, seq, event, asset_id, counter, state_at_event, \
                 requester, request_id, ts_ms, prev_hash, hash) \
                 SELECT shard, seq + 1, 'REGISTER', asset_id, counter, state_at_event, requester, \
                 request_id, ts_ms, hash, hash FROM custody_audit_log \
                 WHERE shard = {s} AND seq = (SELECT max(seq) FROM custody_audit_log WHERE shard = {s})"
            ),
            "CHAIN_BROKEN",
        ),
        (
            "forge a checkpoint",
            format!("UPDATE custody_audit_checkpoints SET mac = zeroblob(32) WHERE shard = {s}"),
            "CHAIN_BROKEN",
        ),
        (
            "roll a stored counter back",
            format!("UPDATE custody_keys SET derivation_counter = 0 WHERE asset_id = '{id_a}'"),
            "COUNTER_DRIFT",
        ),
        (
            "write a row that is not a record",
            format!("UPDATE custody_audit_log SET state_at_event = 'GONE' WHERE shard = {s} AND seq = 4"),
            "CHAIN_BROKEN",
        ),
        (
            "register an asset without its record",
            "INSERT INTO custody_keys VALUES ('6ba7b810-9dad-41d1-80b4-00c04fd430c8', 'ACTIVE', 0, 1, 1)".into(),
            "MISSING_AUDIT_ENTRY",
        ),
    ];
    for (i, (what, sql, kind)) in cases.iter().enumerate() {
        let copy = app.dir.path().join(format!("tampered-{i}.db"));
        let src = rusqlite::Connection::open(app.db_path()).unwrap();
        src.execute(&format!("VACUUM INTO '{}'", copy.display()), [])
            .unwrap();
        rusqlite::Connection::open(&copy)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
        let config = app.dir.path().join(format!("tampered-{i}.toml"));
        std::fs::write(
            &config,
            std::fs::read_to_string(app.config_path()).unwrap()
                + &format!("\n[store]\nsqlite_path = \"{}\"\n", copy.display()),
        )
        .unwrap();
        let (code, report) = reconcile(&app, &config, true);
        assert_eq!(code, 1, "{what}: {report:#}");
        assert_eq!(kinds(&report), [kind.to_string()], "{what}: {report:#}");
        if *kind == "COUNTER_DRIFT" {
            // One of the two assets drifted, and the finding names it, not the other.
            assert_eq!(report["assets_drifted"].as_u64(), Some(1), "{report:#}");
            assert_eq!(report["drift_ratio"].as_f64(), Some(0.5), "{report:#}");
            let named = report["findings"][0]["asset"].as_str();
            assert_eq!(named, Some(id_a.as_str()), "{report:#}");
            assert_ne!(named, Some(b.hyphenated().to_string().as_str()));
        }
    }
}

#[test]
fn postgres_a_clean_log_has_no_finding_and_each_tampering_its_own() {
    let Some(db) = PgDatabase::create("reconcile") else {
        return;
    };
    let mut app = TestAppliance::prepare_with(&db.store_section());
    let out = app.custodyd(&["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.launch();
    let (a, _) = activity(&app);
    let config = app.config_path();
    let (code, report) = reconcile(&app, &config, true);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["assets_checked"].as_u64(), Some(2));
    assert!(report["records_checked"].as_u64().unwrap() >= 20);
    // Without the seed the MACs are not checked; the rest is.
    let (code, report) = reconcile(&app, &config, false);
    assert_eq!((code, report["macs_checked"].as_bool()), (0, Some(false)));

    let rows = db.audit_rows();
    let s = rows.iter().find(|r| r.3 == a).unwrap().0;
    let id_a = a.hyphenated().to_string();
    // Each tampering, checked and then undone (the appliance keeps running untouched).
    let cases: Vec<(&str, Vec<String>, Vec<String>, &str)> = vec![
        (
            "change an audited counter",
            vec![format!("UPDATE custody_audit_log SET counter = counter + 5 WHERE shard = {s} AND seq = 4")],
            vec![format!("UPDATE custody_audit_log SET counter = counter - 5 WHERE shard = {s} AND seq = 4")],
            "CHAIN_BROKEN",
        ),
        (
            "roll a stored counter back",
            vec![format!("UPDATE custody_keys SET derivation_counter = derivation_counter - 1 WHERE asset_id = '{id_a}'")],
            vec![format!("UPDATE custody_keys SET derivation_counter = derivation_counter + 1 WHERE asset_id = '{id_a}'")],
            "COUNTER_DRIFT",
        ),
        (
            "forge a checkpoint",
            vec![format!("UPDATE custody_audit_checkpoints SET mac = decode(repeat('00', 32), 'hex') WHERE shard = {s}")],
            vec![],
            "CHAIN_BROKEN",
        ),
    ];
    for (what, tamper, undo, kind) in cases {
        db.sql(tamper);
        let (code, report) = reconcile(&app, &config, true);
        assert_eq!(code, 1, "{what}: {report:#}");
        assert_eq!(kinds(&report), [kind.to_string()], "{what}: {report:#}");
        db.sql(undo);
    }
}

/// The appliance's own reconciliation: every interval from its watermark, and on an
/// auditor's `custody reconcile`; its figures in /metrics; a rolled-back counter in the
/// live store is found, and a full run finds it again.
#[test]
fn the_appliance_reconciles_on_its_own_and_on_demand() {
    let app = TestAppliance::start_with(&format!(
        "[audit]\nreconcile_interval_s = 1\n\n[policy]\n{}",
        common::TEST_ROLES
    ));
    let (a, _) = activity(&app);
    let cli = |extra: &[&str]| {
        let mut args = vec![
            "--addr".to_string(),
            app.addr.to_string(),
            "--certs".to_string(),
            app.certs().display().to_string(),
            "--json".to_string(),
            "reconcile".to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        app.custody_json(&refs)
    };
    // The periodic run: /metrics shows it, with no drift.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, m) = common::http_get(app.admin, "/metrics");
        if m.contains("custody_audit_reconciliation_runs_total{result=\"ok\"} ")
            && !m.contains("custody_audit_reconciliation_runs_total{result=\"ok\"} 0\n")
        {
            assert!(
                m.contains("custody_audit_reconciliation_drift_ratio 0\n"),
                "{m}"
            );
            assert!(m.contains("custody_audit_chain_broken_shards 0\n"), "{m}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reconciliation ran:\n{m}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // On demand, in full: every record, no finding, MACs checked.
    let (code, full) = cli(&["--full"]);
    assert_eq!(code, 0, "{full:#}");
    let records = common::read_audit(&app.db_path()).len() as u64;
    assert_eq!(full["records_checked"].as_u64(), Some(records));
    assert_eq!(full["macs_checked"].as_bool(), Some(true));
    assert_eq!(full["findings_total"].as_u64(), Some(0));

    // A counter rolled back behind the appliance's back: drift, on demand and in /metrics.
    let c = rusqlite::Connection::open(app.db_path()).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    c.execute(
        "UPDATE custody_keys SET derivation_counter = 0 WHERE asset_id = ?1",
        [a.hyphenated().to_string()],
    )
    .unwrap();
    let (code, report) = cli(&[]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["assets_drifted"].as_u64(), Some(1));
    let findings = report["findings"].as_array().unwrap();
    assert!(
        findings[0].as_str().unwrap().starts_with("COUNTER_DRIFT"),
        "{report:#}"
    );
    let (_, m) = common::http_get(app.admin, "/metrics");
    assert!(
        m.contains("custody_audit_reconciliation_drift_ratio 0.5\n"),
        "{m}"
    );
    assert!(
        app.log().contains("audit reconciliation finding"),
        "{}",
        app.log()
    );
}

/// A receipt kept by a client is proven through the appliance: its record, with that
/// hash, under a checkpoint whose MAC verifies; a wrong hash or position is not.
#[test]
fn a_kept_receipt_is_proven_and_a_wrong_one_is_not() {
    use custody::reconcile::Verdict;
    let app = TestAppliance::start();
    let rt = runtime();
    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    let a = asset(801);
    let receipts: Vec<custody::wire::Receipt> = rt.block_on(async {
        c.register(a).await.unwrap();
        let mut out = Vec::new();
        for _ in 0..3 {
            out.push(
                c.derive(derive_body(a, "m/44'/0'/0'/0'/2"))
                    .await
                    .unwrap()
                    .receipt,
            );
        }
        out
    });
    for r in &receipts {
        let p = rt.block_on(c.prove_receipt(*r)).unwrap();
        assert_eq!(Verdict::from_u8(p.verdict), Some(Verdict::Proven), "{p:?}");
        assert!(p.checkpoint_seq >= r.seq, "{p:?}");
    }
    let mut wrong = receipts[0];
    wrong.hash[0] ^= 1;
    let p = rt.block_on(c.prove_receipt(wrong)).unwrap();
    assert_eq!(
        Verdict::from_u8(p.verdict),
        Some(Verdict::Mismatch),
        "{p:?}"
    );
    let mut nowhere = receipts[0];
    nowhere.seq = 1_000_000;
    let p = rt.block_on(c.prove_receipt(nowhere)).unwrap();
    assert_eq!(
        Verdict::from_u8(p.verdict),
        Some(Verdict::NotFound),
        "{p:?}"
    );
    // The CLI says the same, and exits 0 only when proven.
    let r = receipts[1];
    let hex = custody::hex::encode(&r.hash);
    let out = app.custody(&[
        "--addr",
        &app.addr.to_string(),
        "--certs",
        app.certs().to_str().unwrap(),
        "prove",
        &r.shard.to_string(),
        &r.seq.to_string(),
        &hex,
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.starts_with("PROVEN"), "{said}");
}
