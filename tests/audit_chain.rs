//! The tamper-evident audit log of a running appliance, checked by the independent
//! verifier (`appliance/audit_verify.py`, Python standard library only): every record is
//! chained, every batch checkpointed with a MAC under the seed's audit key, a receipt names
//! its record's hash, and tampering with a copy of the store is found.

mod common;

use common::{asset, derive_body, read_audit, runtime, TestAppliance};
use custody::client::Client;
use std::path::Path;
use std::process::Command;

/// Runs the verifier; `None` (with a notice) without python3, unless
/// `CUSTODY_REQUIRE_SERVICES=1`.
fn verify(db: &Path, seed: Option<&Path>) -> Option<(i32, serde_json::Value)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance/audit_verify.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg("--sqlite").arg(db).arg("--json");
    if let Some(seed) = seed {
        cmd.arg("--seed-file").arg(seed);
    }
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => {
            common::missing("python3 (the independent audit verifier)", &e);
            return None;
        }
    };
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verifier output ({e}):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Some((out.status.code().unwrap_or(-1), report))
}

fn findings(report: &serde_json::Value) -> Vec<String> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{} {}",
                f["kind"].as_str().unwrap(),
                f["detail"].as_str().unwrap()
            )
        })
        .collect()
}

/// A copy of the store (WAL checkpointed into it) to tamper with.
fn copy_of(app: &TestAppliance, name: &str) -> std::path::PathBuf {
    let copy = app.dir.path().join(name);
    let src = rusqlite::Connection::open(app.db_path()).unwrap();
    src.execute(&format!("VACUUM INTO '{}'", copy.display()), [])
        .unwrap();
    copy
}

fn tamper(db: &Path, sql: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch(sql).unwrap();
}

/// Runs `statements` on `db`, then recomputes every hash of `shard`'s chain with this
/// repository's verifier, as someone with write access to the store could. `false` when
/// python3 cannot run (allowed only without CUSTODY_REQUIRE_SERVICES=1).
fn rewrite_with_recomputed_hashes(db: &Path, shard: u16, statements: &[&str]) -> bool {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance");
    let statements: String = statements
        .iter()
        .map(|sql| format!("c.execute({sql:?})\n"))
        .collect();
    let rewrite = format!(
        r#"
import sqlite3, sys
sys.path.insert(0, {dir:?})
import audit_verify as v
c = sqlite3.connect({db:?}, timeout=10)
c.row_factory = sqlite3.Row
{statements}
rows = [dict(r) for r in c.execute("SELECT %s FROM custody_audit_log WHERE shard = {shard} ORDER BY seq" % ", ".join(v.COLUMNS))]
prev = v.GENESIS
for r in rows:
    h = v.chain_hash(r, prev)
    c.execute("UPDATE custody_audit_log SET prev_hash = ?, hash = ? WHERE shard = ? AND seq = ?", (prev, h, r["shard"], r["seq"]))
    prev = h
c.commit()
"#,
        dir = script.display().to_string(),
        db = db.display().to_string(),
    );
    let out = match Command::new("python3").arg("-c").arg(&rewrite).output() {
        Ok(out) => out,
        Err(e) => {
            common::missing("python3 (rewrites the store's rows)", &e);
            return false;
        }
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

#[test]
fn every_record_is_chained_and_checkpointed_and_tampering_is_found() {
    let mut app = TestAppliance::start_with(&format!(
        "[policy]\n{}admins = [\"test-client\"]\n",
        common::TEST_ROLES
    ));
    let rt = runtime();
    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    let (a, b) = (asset(501), asset(502));
    let mut receipts = Vec::new();
    rt.block_on(async {
        c.register(a).await.unwrap();
        c.register(b).await.unwrap();
        for i in 0..20 {
            let d = c
                .derive(derive_body(
                    if i % 2 == 0 { a } else { b },
                    "m/44'/0'/0'/0'/3",
                ))
                .await
                .unwrap();
            receipts.push(d.receipt);
        }
        let r = c.rotate(a, uuid::Uuid::new_v4(), None).await.unwrap();
        receipts.push(r.receipt);
        c.suspend(b).await.unwrap();
        c.set_region("APAC", false).await.unwrap();
    });

    // Every receipt names its record's hash.
    let rows = read_audit(&app.db_path());
    for receipt in &receipts {
        let row = rows
            .iter()
            .find(|r| r.shard == receipt.shard && r.seq == receipt.seq)
            .expect("the receipt's record");
        assert_eq!(row.hash, Some(receipt.hash), "{receipt:?}");
    }
    assert!(rows.iter().all(|r| r.hash.is_some()));

    let seed = app.dir.path().join("dev-seed.bin");
    let Some((code, report)) = verify(&app.db_path(), Some(&seed)) else {
        return;
    };
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["records"].as_u64(), Some(rows.len() as u64));
    for (shard, s) in report["shards"].as_object().unwrap() {
        assert_eq!(s["chained"], s["records"], "shard {shard}: {report:#}");
        assert_eq!(
            s["unauthenticated_tail"].as_u64(),
            Some(0),
            "shard {shard}: every batch is checkpointed while unsealed: {report:#}"
        );
    }
    // Restarted, the shards continue their chains from the store.
    app.kill9();
    app.launch();
    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    rt.block_on(c.derive(derive_body(a, "m/44'/0'/0'/0'/4")))
        .unwrap();
    let (code, report) = verify(&app.db_path(), Some(&seed)).unwrap();
    assert_eq!(code, 0, "after a restart: {report:#}");

    // Tampering with copies: each is found.
    let shard_of_a = rows.iter().find(|r| r.asset == a).unwrap().shard;
    let cases: [(&str, String, &str); 4] = [
        (
            "counter.db",
            format!("UPDATE custody_audit_log SET counter = counter + 1 WHERE shard = {shard_of_a} AND seq = 3"),
            "its hash does not match its fields",
        ),
        (
            "deleted.db",
            format!("DELETE FROM custody_audit_log WHERE shard = {shard_of_a} AND seq = 2"),
            "expected sequence number 2",
        ),
        (
            "swapped.db",
            format!(
                "UPDATE custody_audit_log SET seq = 1000000 WHERE shard = {shard_of_a} AND seq = 2; \
                 UPDATE custody_audit_log SET seq = 2 WHERE shard = {shard_of_a} AND seq = 3; \
                 UPDATE custody_audit_log SET seq = 3 WHERE shard = {shard_of_a} AND seq = 1000000;"
            ),
            "its previous hash does not link",
        ),
        (
            "forged-checkpoint.db",
            format!("UPDATE custody_audit_checkpoints SET mac = zeroblob(32) WHERE shard = {shard_of_a}"),
            "its MAC does not verify",
        ),
    ];
    for (name, sql, expected) in cases {
        let copy = copy_of(&app, name);
        tamper(&copy, &sql);
        let (code, report) = verify(&copy, Some(&seed)).unwrap();
        let found = findings(&report);
        assert_eq!(code, 1, "{name}: {report:#}");
        assert!(
            found
                .iter()
                .any(|f| f.starts_with("CHAIN_BROKEN") && f.contains(expected)),
            "{name}: expected {expected:?} in {found:?}"
        );
    }
    // Without the seed the MACs are not checked, and says so.
    let copy = copy_of(&app, "no-seed.db");
    let (code, report) = verify(&copy, None).unwrap();
    assert_eq!((code, report["macs_checked"].as_bool()), (0, Some(false)));
}

/// Rewriting a whole tail with recomputed hashes keeps the chain consistent; the
/// checkpoints (whose MACs need the seed) no longer match it.
#[test]
fn a_rewritten_tail_with_recomputed_hashes_is_caught_by_the_checkpoints() {
    let app = TestAppliance::start();
    let rt = runtime();
    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    let a = asset(601);
    rt.block_on(async {
        c.register(a).await.unwrap();
        for _ in 0..5 {
            c.derive(derive_body(a, "m/44'/0'/0'/0'/9")).await.unwrap();
        }
    });
    let copy = copy_of(&app, "rewritten.db");
    let shard = read_audit(&copy)
        .iter()
        .find(|r| r.asset == a)
        .unwrap()
        .shard;
    // Change a derivation's counter and recompute every hash after it, as someone with
    // write access to the store (and this repository's verifier) could.
    let sql =
        format!("UPDATE custody_audit_log SET counter = 77 WHERE shard = {shard} AND seq = 3");
    if !rewrite_with_recomputed_hashes(&copy, shard, &[&sql]) {
        return;
    }
    let seed = app.dir.path().join("dev-seed.bin");
    let (code, report) = verify(&copy, Some(&seed)).unwrap();
    let found = findings(&report);
    assert_eq!(code, 1, "{report:#}");
    assert!(
        found
            .iter()
            .all(|f| f.contains("checkpoint") && f.contains("does not match the record's hash")),
        "{found:?}"
    );
    assert!(!found.is_empty());
}

/// The chain's limit and what closes it while the appliance runs: a tail rewritten with
/// recomputed hashes, its checkpoints deleted, passes a reconciliation (nothing
/// authenticated covers it) until the shard's next record, which links to the hash the
/// shard kept in memory, not to the rewritten one.
#[test]
fn a_tail_rewritten_with_its_checkpoints_deleted_breaks_at_the_next_record() {
    let app = TestAppliance::start_with(&format!("[policy]\n{}", common::TEST_ROLES));
    let rt = runtime();
    let c = rt.block_on(Client::connect(&app.client_config())).unwrap();
    let a = asset(611);
    rt.block_on(async {
        c.register(a).await.unwrap();
        for _ in 0..5 {
            c.derive(derive_body(a, "m/44'/0'/0'/0'/9")).await.unwrap();
        }
    });
    let shard = read_audit(&app.db_path())
        .iter()
        .find(|r| r.asset == a)
        .unwrap()
        .shard;
    let reconcile = || {
        app.custody_json(&[
            "--addr",
            &app.addr.to_string(),
            "--certs",
            &app.certs().display().to_string(),
            "--json",
            "reconcile",
            "--full",
        ])
    };
    // The live store, behind the appliance's back.
    let delete =
        format!("DELETE FROM custody_audit_checkpoints WHERE shard = {shard} AND seq >= 3");
    let change = format!(
        "UPDATE custody_audit_log SET requester = 'someone-else' WHERE shard = {shard} AND seq = 3"
    );
    if !rewrite_with_recomputed_hashes(&app.db_path(), shard, &[&delete, &change]) {
        return;
    }
    // The limit docs/audit.md states: nothing authenticated covers records 3 to 6 now.
    let (code, report) = reconcile();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["findings_total"].as_u64(), Some(0), "{report:#}");
    // The shard's next record links to the hash it kept, not to the rewritten tail.
    rt.block_on(c.derive(derive_body(a, "m/44'/0'/0'/0'/9")))
        .unwrap();
    let (code, report) = reconcile();
    assert_eq!(code, 1, "{report:#}");
    let findings: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(
        findings.iter().any(|f| f.starts_with("CHAIN_BROKEN")),
        "{report:#}"
    );
}
