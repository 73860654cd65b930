//! The appliance on PostgreSQL, over real TLS sockets: migrations, the derive path, and
//! SIGKILL under load. Uses `CUSTODY_TEST_DATABASE_URL` (see tests/common).

mod common;

use common::{asset, derive_body, runtime, PgDatabase, TestAppliance};
use custody::client::{Client, ClientError};
use std::collections::HashMap;
use std::sync::Arc;
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
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 1"));
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

    let pid = app.pid().unwrap();
    let acknowledged = rt.block_on(async {
        let mut tasks = Vec::new();
        let acknowledged = Arc::new(std::sync::Mutex::new(Vec::new()));
        for c in 0..4usize {
            let client = Arc::new(Client::connect(&app.client_config()).await.unwrap());
            for lane in 0..16usize {
                let (client, acknowledged, assets) =
                    (client.clone(), acknowledged.clone(), assets.clone());
                tasks.push(tokio::spawn(async move {
                    for i in 0.. {
                        let a = assets[(c * 16 + lane + i) % assets.len()];
                        match client
                            .derive(derive_body(a, &format!("m/44'/0'/0'/0'/{i}")))
                            .await
                        {
                            Ok(d) => acknowledged.lock().unwrap().push((a, d.counter, d.receipt)),
                            Err(ClientError::Closed) => return,
                            Err(e) => panic!("unexpected error under load: {e}"),
                        }
                    }
                }));
            }
        }
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if acknowledged.lock().unwrap().len() > 2000 {
                break;
            }
        }
        // SAFETY: sending SIGKILL to our own child process.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        for t in tasks {
            t.await.unwrap();
        }
        let v = acknowledged.lock().unwrap().clone();
        v
    });
    app.kill9();

    let rows = db.with_client(|c| {
        Box::pin(async move { custody::store::postgres::audit_rows(&c).await.unwrap() })
    });
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
    for shard in 0..2u16 {
        let seqs: Vec<u64> = rows.iter().filter(|r| r.0 == shard).map(|r| r.1).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "shard {shard} has no gap"
        );
    }

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
    let rows = db.with_client(|c| {
        Box::pin(async move { custody::store::postgres::audit_rows(&c).await.unwrap() })
    });
    for shard in 0..2u16 {
        let seqs: Vec<u64> = rows.iter().filter(|r| r.0 == shard).map(|r| r.1).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "shard {shard} has no gap"
        );
    }
    for r in after_restart {
        assert!(rows.iter().any(|row| (row.0, row.1) == (r.shard, r.seq)));
    }
}
