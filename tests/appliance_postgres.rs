//! The appliance on PostgreSQL, over real TLS sockets: migrations, the derive path, and
//! SIGKILL under load. Uses `CUSTODY_TEST_DATABASE_URL` (see tests/common).

mod common;

use common::{asset, derive_body, on_executor, runtime, PgDatabase, TestAppliance};
use custody::client::Client;
use std::collections::HashMap;
use std::time::Duration;

#[test]
fn postgres_store_needs_migrate_then_serves_and_survives_sigkill() {
    let Some(db) = PgDatabase::create("serve") else {
        return;
    };
    let mut app = TestAppliance::prepare_with(&db.store_section());

    // An unmigrated database is refused with the command that fixes it.
    let out = app.custodyd(&["run"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("custodyd migrate"), "{stderr}");

    let out = app.custodyd(&["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 4"));
    // Migrating again changes nothing.
    assert!(app.custodyd(&["migrate"]).status.success());

    app.launch();
    let rt = runtime();
    let assets: Vec<uuid::Uuid> = (300..332).map(asset).collect();
    rt.block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        for a in &assets {
            client.register(*a).await.unwrap();
        }
        let e = client.register(assets[0]).await.unwrap_err();
        assert_eq!(e.status(), Some(custody::wire::Status::AssetExists));
    });

    let acknowledged = common::derive_until_sigkill(&mut app, &assets, 2000);

    let rows = db.audit_rows();
    let by_receipt: HashMap<(u16, u64), (uuid::Uuid, u64, String)> = rows
        .iter()
        .map(|(shard, seq, event, a, counter)| ((*shard, *seq), (*a, *counter, event.clone())))
        .collect();
    for (a, counter, receipt) in &acknowledged {
        let row = by_receipt
            .get(&(receipt.shard, receipt.seq))
            .unwrap_or_else(|| panic!("acknowledged {receipt:?} has no audit record"));
        assert_eq!((row.0, row.1, row.2.as_str()), (*a, *counter, "DERIVE"));
    }
    assert_no_gaps(&rows);

    // Restarted, it continues each shard's sequence. (A COMMIT the killed appliance sent
    // just before it died may land after the read above, so compare with a fresh read.)
    app.launch();
    let after_restart = rt.block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        let mut receipts = Vec::new();
        for a in &assets[..4] {
            let d = client
                .derive(derive_body(*a, "m/44'/0'/0'/0'/1"))
                .await
                .unwrap();
            let last = rows
                .iter()
                .filter(|r| r.0 == d.receipt.shard)
                .map(|r| r.1)
                .max()
                .unwrap();
            assert!(d.receipt.seq > last, "sequence continues after restart");
            assert_eq!(client.status(*a).await.unwrap().counter, 0);
            receipts.push(d.receipt);
        }
        receipts
    });
    let rows = db.audit_rows();
    assert_no_gaps(&rows);
    for r in after_restart {
        assert!(rows.iter().any(|row| (row.0, row.1) == (r.shard, r.seq)));
    }
}

#[test]
fn postgres_backends_terminated_under_load_the_appliance_recovers_by_itself() {
    let Some(db) = PgDatabase::create("terminate") else {
        return;
    };
    let mut app = TestAppliance::prepare_with(&db.store_section());
    assert!(app.custodyd(&["migrate"]).status.success());
    app.launch();
    let assets: Vec<uuid::Uuid> = (400..416).map(asset).collect();
    let dbname = db.config.dbname.clone();
    runtime().block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        for a in &assets {
            client.register(*a).await.unwrap();
        }
    });
    let load = common::BackgroundLoad::start(app.client_config(), assets, 1, 32);
    load.wait_for(500, "load is running");
    // Cut every connection the appliance has to the database.
    let killed = on_executor(move || async move {
        let admin = custody::store::postgres::connect(&PgDatabase::admin_config())
            .await
            .unwrap();
        admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'custodyd'",
                &[&dbname],
            )
            .await
            .unwrap()
            .len()
    });
    assert!(killed >= 2, "one connection per shard, got {killed}");
    // Service resumes without a restart.
    std::thread::sleep(Duration::from_millis(700));
    let after_cut = load.acknowledged();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        load.acknowledged() > after_cut,
        "derivations are acknowledged again after the cut"
    );
    let outcome = load.finish();
    assert_eq!(outcome.closed, 0, "no connection to the appliance closed");
    let (acknowledged, refused) = (outcome.acknowledged, outcome.unavailable);
    assert!(app.is_running(), "the appliance did not restart or die");
    let rows = db.audit_rows();
    let receipts: std::collections::HashSet<(u16, u64)> = rows.iter().map(|r| (r.0, r.1)).collect();
    for (_, _, r) in &acknowledged {
        assert!(
            receipts.contains(&(r.shard, r.seq)),
            "acknowledged {r:?} is in the log"
        );
    }
    assert_no_gaps(&rows);
    eprintln!(
        "acknowledged {}, refused with STORE_UNAVAILABLE {refused}",
        acknowledged.len()
    );
}

/// Each shard's audit sequence is 1, 2, 3, … with nothing missing.
fn assert_no_gaps(rows: &[(u16, u64, String, uuid::Uuid, u64)]) {
    for shard in 0..2u16 {
        let seqs: Vec<u64> = rows.iter().filter(|r| r.0 == shard).map(|r| r.1).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "shard {shard} has no gap"
        );
    }
}

/// The audit log's partitions named `custody_audit_log_YYYY_MM` (and the default).
fn partitions(db: &PgDatabase) -> Vec<String> {
    let config = db.config.clone();
    on_executor(move || async move {
        let c = custody::store::postgres::connect(&config).await.unwrap();
        c.query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
              WHERE i.inhparent = 'custody_audit_log'::regclass ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    })
}

fn month_partition(months_ahead: i32) -> String {
    let config = PgDatabase::admin_config();
    on_executor(move || async move {
        let c = custody::store::postgres::connect(&config).await.unwrap();
        c.query_one(
            "SELECT 'custody_audit_log_' || to_char(date_trunc('month', now()) + make_interval(months => $1), 'YYYY_MM')",
            &[&months_ahead],
        )
        .await
        .unwrap()
        .get(0)
    })
}

#[test]
fn audit_partitions_are_made_ahead_and_remade_while_running() {
    let Some(db) = PgDatabase::create("partitions") else {
        return;
    };
    let mut app = TestAppliance::prepare_with(&format!(
        "{}postgres_partition_check_s = 1\n",
        db.store_section()
    ));
    assert!(app.custodyd(&["migrate"]).status.success());
    let ahead: Vec<String> = (0..custody::store::postgres::PARTITION_MONTHS_AHEAD)
        .map(month_partition)
        .collect();
    let made = partitions(&db);
    for p in ahead
        .iter()
        .chain(["custody_audit_log_default".to_owned()].iter())
    {
        assert!(made.contains(p), "{p} missing from {made:?}");
    }

    app.launch();
    let a = asset(555);
    runtime().block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        c.register(a).await.unwrap();
        c.derive(derive_body(a, "m/44'/0'/0'/0'/1")).await.unwrap();
    });
    // This month's records go to this month's partition, none to the default.
    let (current, default) = {
        let (config, current) = (db.config.clone(), ahead[0].clone());
        on_executor(move || async move {
            let c = custody::store::postgres::connect(&config).await.unwrap();
            let n = |sql: String| {
                let c = &c;
                async move { c.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) }
            };
            (
                n(format!("SELECT count(*) FROM {current}")).await,
                n("SELECT count(*) FROM custody_audit_log_default".into()).await,
            )
        })
    };
    assert_eq!(
        (current, default),
        (2, 0),
        "register and derive in {}",
        ahead[0]
    );

    // A partition that goes missing while the appliance runs is made again on schedule.
    let last = ahead.last().unwrap().clone();
    {
        let (config, last) = (db.config.clone(), last.clone());
        on_executor(move || async move {
            let c = custody::store::postgres::connect(&config).await.unwrap();
            c.batch_execute(&format!("DROP TABLE {last}"))
                .await
                .unwrap();
        });
    }
    assert!(!partitions(&db).contains(&last));
    common::eventually(Duration::from_secs(10), || {
        partitions(&db)
            .contains(&last)
            .then_some(())
            .ok_or_else(|| format!("{last} not remade:\n{}", app.log()))
    });
}

#[test]
fn rotations_and_suspensions_are_durable_on_postgres_and_a_rotation_id_survives_a_restart() {
    let Some(db) = PgDatabase::create("lifecycle") else {
        return;
    };
    let mut app = TestAppliance::prepare_with(&format!(
        "{}\n[policy]\n{}",
        db.store_section(),
        common::TEST_ROLES
    ));
    assert!(app.custodyd(&["migrate"]).status.success());
    app.launch();
    let (a, id) = (asset(4401), uuid::Uuid::new_v4());
    let rt = runtime();
    let first = rt.block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        c.register(a).await.unwrap();
        let r = c.rotate(a, id, None).await.unwrap();
        c.rotate(a, uuid::Uuid::new_v4(), Some(1)).await.unwrap();
        c.suspend(a).await.unwrap();
        r
    });
    app.kill9();
    app.launch();
    rt.block_on(async {
        let c = Client::connect(&app.client_config()).await.unwrap();
        let s = c.status(a).await.unwrap();
        assert_eq!(
            (s.state, s.counter),
            (custody::lifecycle::AssetState::Suspended, 2)
        );
        let again = c.rotate(a, id, None).await.unwrap();
        assert_eq!(
            (again.counter, again.receipt, again.replayed),
            (1, first.receipt, true)
        );
        c.resume(a).await.unwrap();
        let d = c.derive(derive_body(a, "m/44'/0'/0'/0'/1")).await.unwrap();
        assert_eq!(d.counter, 2);
    });
    let events: Vec<(String, u64)> = db
        .audit_rows()
        .into_iter()
        .filter(|r| r.3 == a)
        .map(|r| (r.2, r.4))
        .collect();
    let expected: Vec<(String, u64)> = [
        ("REGISTER", 0),
        ("ROTATE", 1),
        ("ROTATE", 2),
        ("SUSPEND", 2),
        ("RESUME", 2),
        ("DERIVE", 2),
    ]
    .iter()
    .map(|(e, c)| (e.to_string(), *c))
    .collect();
    assert_eq!(events, expected);
}

#[test]
fn assets_are_listed_from_postgres() {
    let Some(db) = PgDatabase::create("listing") else {
        return;
    };
    let mut app = TestAppliance::prepare_with(&format!(
        "{}\n[policy]\n{}",
        db.store_section(),
        common::TEST_ROLES
    ));
    assert!(app.custodyd(&["migrate"]).status.success());
    app.launch();
    common::check_asset_listing(&app, 7_700, 30);
}
