//! Integration tests over real TLS sockets against a running `custodyd`.
//!
//! Modules of this test binary, in the order a request meets the appliance:
//! - TLS edge: mutual TLS required, TLS 1.3 only;
//! - bad input: every malformed frame or field gets its typed status, framing errors
//!   close only their connection, nothing reaches the store;
//! - derive path: register, derive, status end to end, keys checked against the KDF,
//!   pipelining across shards, bounds answered BUSY;
//! - lifecycle: states that refuse derivation;
//! - faults: SIGKILL under load and restart.

mod common;

use common::{asset, derive_body, read_audit, runtime, TestAppliance};
use custody::client::Client;
use custody::kdf::{DerivationKey, DerivationPath, RootSeed};
use custody::op::{self, Reply, Request};
use custody::wire::{self, FrameHeader, Opcode, Status};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type RawTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn raw_connect(app: &TestAppliance) -> RawTls {
    let c = app.client_config();
    let tls = custody::tls::client_config(&c.ca, &c.cert, &c.key).unwrap();
    raw_connect_with(app, tls).await.expect("handshake")
}

async fn raw_connect_with(
    app: &TestAppliance,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<RawTls> {
    let tcp = tokio::net::TcpStream::connect(app.addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
}

/// Reads one frame; `None` when the connection closes first.
async fn read_frame(s: &mut RawTls, buf: &mut Vec<u8>) -> Option<(FrameHeader, Vec<u8>)> {
    loop {
        if let Ok(Some(f)) = wire::decode_frame(buf, 1 << 20) {
            let out = (f.header, f.body.to_vec());
            let n = f.consumed;
            buf.drain(..n);
            return Some(out);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no reply within 10 s"),
        }
    }
}

fn refusal_status(op: Opcode, body: &[u8]) -> Status {
    match Reply::decode(op, body).expect("reply decodes") {
        Reply::Refused(r) => r.status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn expect_closed(s: &mut RawTls, buf: &mut Vec<u8>) {
    assert!(
        read_frame(s, buf).await.is_none(),
        "connection should be closed"
    );
}

fn frame(opcode: u8, request_id: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    FrameHeader {
        opcode,
        request_id,
        body_len: body.len() as u32,
    }
    .encode(&mut out);
    out.extend_from_slice(body);
    out
}

fn local_key(app: &TestAppliance) -> DerivationKey {
    DerivationKey::new(&RootSeed::from_bytes(app.seed())).expect("locked memory")
}

// ---------------------------------------------------------------- TLS edge

#[test]
fn tls_requires_a_client_certificate_from_the_configured_ca() {
    let app = TestAppliance::start();
    let other = tempfile::tempdir().unwrap();
    let foreign = custody::tls::write_dev_certs(other.path(), "intruder").unwrap();
    let rt = runtime();
    rt.block_on(async {
        // No client certificate at all.
        let roots = {
            let mut r = rustls::RootCertStore::empty();
            for c in custody::certs::read_certs(&app.certs().join("ca.pem")).unwrap() {
                r.add(c).unwrap();
            }
            r
        };
        let no_cert = Arc::new(
            rustls::ClientConfig::builder_with_provider(custody::certs::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        // A certificate from another CA (trusting the right server CA).
        let foreign_cert = custody::tls::client_config(
            &app.certs().join("ca.pem"),
            &foreign.client_cert,
            &foreign.client_key,
        )
        .unwrap();
        for (what, tls) in [("no certificate", no_cert), ("foreign CA", foreign_cert)] {
            // In TLS 1.3 the client may finish its side before the server's verdict
            // arrives, so the refusal shows as an alert or a closed stream on first use.
            let served = match raw_connect_with(&app, tls).await {
                Err(_) => false,
                Ok(mut s) => {
                    let mut hello = Vec::new();
                    Request::Hello.encode(1, &mut hello);
                    let _ = s.write_all(&hello).await;
                    let mut buf = Vec::new();
                    read_frame(&mut s, &mut buf).await.is_some()
                }
            };
            assert!(!served, "{what}: the appliance must refuse the handshake");
        }
        // The right certificate still works.
        let client = Client::connect(&app.client_config()).await.unwrap();
        assert_eq!(client.hello().await.unwrap().shard_count, 2);
    });
}

#[test]
fn openssl_s_client_sees_tls13_only() {
    let app = TestAppliance::start();
    let certs = app.certs();
    let run = |version: &str| {
        let mut child = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &app.addr.to_string(), version])
            .arg("-CAfile")
            .arg(certs.join("ca.pem"))
            .arg("-cert")
            .arg(certs.join("client.pem"))
            .arg("-key")
            .arg(certs.join("client.key"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        match child.as_mut() {
            Ok(c) => {
                drop(c.stdin.take());
                let out = child.unwrap().wait_with_output().unwrap();
                Some(String::from_utf8_lossy(&out.stdout).to_string())
            }
            Err(_) => None,
        }
    };
    let Some(tls13) = run("-tls1_3") else {
        common::missing("openssl s_client", &"openssl cannot run");
        return;
    };
    assert!(
        tls13.contains("TLSv1.3"),
        "TLS 1.3 handshake expected:\n{tls13}"
    );
    assert!(
        tls13.contains("Verify return code: 0"),
        "server cert must verify:\n{tls13}"
    );
    let tls12 = run("-tls1_2").unwrap();
    assert!(
        !tls12.contains("Cipher is ECDHE") && !tls12.contains("TLSv1.2, Cipher"),
        "TLS 1.2 must be refused:\n{tls12}"
    );
}

// ---------------------------------------------------------------- bad input

#[test]
fn framing_errors_are_answered_then_close_only_their_connection() {
    let app = TestAppliance::start();
    let rt = runtime();
    rt.block_on(async {
        let survivor = Client::connect(&app.client_config()).await.unwrap();
        let a = asset(1);
        survivor.register(a).await.unwrap();

        let cases: Vec<(&str, Vec<u8>, Status)> = vec![
            (
                "bad magic",
                b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                Status::MalformedFrame,
            ),
            (
                "wrong version",
                {
                    let mut f = frame(Opcode::Hello as u8, 7, &[]);
                    f[4] = 9;
                    f
                },
                Status::UnsupportedVersion,
            ),
            (
                "reserved flags",
                {
                    let mut f = frame(Opcode::Hello as u8, 7, &[]);
                    f[7] = 1;
                    f
                },
                Status::MalformedFrame,
            ),
            (
                "oversized",
                {
                    let mut f = Vec::new();
                    FrameHeader {
                        opcode: Opcode::Derive as u8,
                        request_id: 7,
                        body_len: 16_385,
                    }
                    .encode(&mut f);
                    f
                },
                Status::FrameTooLarge,
            ),
        ];
        for (what, bytes, status) in cases {
            let mut s = raw_connect(&app).await;
            s.write_all(&bytes).await.unwrap();
            let mut buf = Vec::new();
            let (header, body) = read_frame(&mut s, &mut buf)
                .await
                .unwrap_or_else(|| panic!("{what}: no reply"));
            assert_eq!(refusal_status(Opcode::Hello, &body), status, "{what}");
            if status != Status::MalformedFrame {
                assert_eq!(
                    header.request_id, 7,
                    "{what}: the reply names the request id"
                );
            }
            expect_closed(&mut s, &mut buf).await;
        }

        // A truncated frame followed by EOF: the appliance just closes.
        let mut s = raw_connect(&app).await;
        let f = frame(Opcode::Status as u8, 3, a.as_bytes());
        s.write_all(&f[..f.len() - 5]).await.unwrap();
        s.shutdown().await.unwrap();
        let mut buf = Vec::new();
        expect_closed(&mut s, &mut buf).await;

        // The other connection never noticed.
        assert_eq!(survivor.status(a).await.unwrap().counter, 0);
    });
    let rows = read_audit(&app.db_path());
    assert_eq!(rows.len(), 1, "only the registration is audited");
}

#[test]
fn bad_requests_get_typed_statuses_and_leave_no_trace() {
    let app = TestAppliance::start();
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        let good = asset(2);
        client.register(good).await.unwrap();

        let mut s = raw_connect(&app).await;
        let mut buf = Vec::new();
        // Unknown opcode and a garbage body: answered, and the connection stays open.
        s.write_all(&frame(0x7e, 11, b"whatever")).await.unwrap();
        let (h, body) = read_frame(&mut s, &mut buf).await.unwrap();
        assert_eq!(
            (h.request_id, refusal_status(Opcode::Hello, &body)),
            (11, Status::UnknownOpcode)
        );
        s.write_all(&frame(Opcode::Derive as u8, 12, &[1, 2, 3]))
            .await
            .unwrap();
        let (h, body) = read_frame(&mut s, &mut buf).await.unwrap();
        assert_eq!(
            (h.request_id, refusal_status(Opcode::Derive, &body)),
            (12, Status::BadBody)
        );
        let mut trailing = good.as_bytes().to_vec();
        trailing.push(0);
        s.write_all(&frame(Opcode::Status as u8, 13, &trailing))
            .await
            .unwrap();
        let (_, body) = read_frame(&mut s, &mut buf).await.unwrap();
        assert_eq!(refusal_status(Opcode::Status, &body), Status::BadBody);
        let mut hello = Vec::new();
        Request::Hello.encode(14, &mut hello);
        s.write_all(&hello).await.unwrap();
        let (h, body) = read_frame(&mut s, &mut buf).await.unwrap();
        assert_eq!(h.request_id, 14);
        assert!(matches!(
            Reply::decode(Opcode::Hello, &body).unwrap(),
            Reply::Hello(_)
        ));

        // Field rules, each with its own status.
        let bad: Vec<(op::DeriveBody, Status)> = vec![
            (
                derive_body(uuid::Uuid::nil(), "m/44'/0'/0'/0'/1"),
                Status::InvalidAssetId,
            ),
            (
                derive_body(uuid::Uuid::from_bytes([0x42; 16]), "m/44'/0'/0'/0'/1"),
                Status::InvalidAssetId,
            ),
            (derive_body(good, "m/44'/0'/0'/0'/1'"), Status::InvalidPath),
            (
                derive_body(good, "m/44'/0'/0'/0'/2147483648"),
                Status::InvalidPath,
            ),
            (derive_body(good, "m/45'/0'/0'/0'/1"), Status::InvalidPath),
            (
                op::DeriveBody {
                    region: "MARS".into(),
                    ..derive_body(good, "m/44'/0'/0'/0'/1")
                },
                Status::InvalidRegion,
            ),
            (
                op::DeriveBody {
                    purpose: 9,
                    ..derive_body(good, "m/44'/0'/0'/0'/1")
                },
                Status::InvalidPurpose,
            ),
            (
                op::DeriveBody {
                    ttl_s: 59,
                    ..derive_body(good, "m/44'/0'/0'/0'/1")
                },
                Status::InvalidTtl,
            ),
            (
                op::DeriveBody {
                    ttl_s: 3601,
                    ..derive_body(good, "m/44'/0'/0'/0'/1")
                },
                Status::InvalidTtl,
            ),
            (
                derive_body(asset(999), "m/44'/0'/0'/0'/1"),
                Status::UnknownAsset,
            ),
        ];
        for (body, status) in bad {
            let err = client.derive(body.clone()).await.unwrap_err();
            assert_eq!(err.status(), Some(status), "{body:?}: {err}");
        }
        assert_eq!(
            client
                .register(uuid::Uuid::nil())
                .await
                .unwrap_err()
                .status(),
            Some(Status::InvalidAssetId)
        );
        assert_eq!(
            client.register(good).await.unwrap_err().status(),
            Some(Status::AssetExists)
        );
        assert_eq!(
            client.status(asset(998)).await.unwrap_err().status(),
            Some(Status::UnknownAsset)
        );
    });
    let rows = read_audit(&app.db_path());
    assert_eq!(rows.len(), 1, "rejected requests write nothing: {rows:?}");
    let assets = custody::store::sqlite::SqliteReader::open(&app.db_path())
        .unwrap()
        .assets()
        .unwrap();
    assert_eq!(assets.len(), 1);
}

// ---------------------------------------------------------------- derive path

#[test]
fn register_derive_status_end_to_end_with_audit() {
    let app = TestAppliance::start();
    let key = local_key(&app);
    let rt = runtime();
    let assets: Vec<uuid::Uuid> = (10..30).map(asset).collect();
    let acknowledged = rt.block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        let mut shards_seen = std::collections::HashSet::new();
        for a in &assets {
            let info = client.register(*a).await.unwrap();
            assert_eq!(
                (info.state, info.counter),
                (custody::lifecycle::AssetState::Active, 0)
            );
            assert_eq!(
                info.shard,
                custody::placement::shard_of(a, 2),
                "owner by the documented hash"
            );
            shards_seen.insert(info.shard);
        }
        assert_eq!(shards_seen.len(), 2, "the assets spread over both shards");
        let mut acknowledged = Vec::new();
        for (i, a) in assets.iter().enumerate() {
            let path = format!("m/44'/60'/{i}'/0'/{}", i * 7);
            let d = client.derive(derive_body(*a, &path)).await.unwrap();
            let expected = key.derive(a, 0, &DerivationPath::parse(&path).unwrap());
            assert_eq!(d.key, expected, "the key is the KBKDF of the seed");
            assert_eq!((d.counter, d.scheme_version), (0, 1));
            acknowledged.push((*a, path, d.receipt));
        }
        let st = client.status(assets[0]).await.unwrap();
        assert_eq!(st.counter, 0);
        acknowledged
    });
    let rows = read_audit(&app.db_path());
    for (a, path, receipt) in acknowledged {
        let row = rows
            .iter()
            .find(|r| r.shard == receipt.shard && r.seq == receipt.seq)
            .expect("receipt in the audit log");
        assert_eq!(row.asset, a);
        assert_eq!(row.event, custody::audit::AuditEvent::Derive);
        assert_eq!(row.derivation_path.as_deref(), Some(path.as_str()));
        assert_eq!(
            row.requester, "test-client",
            "requester is the certificate CN"
        );
        assert_eq!(row.region.as_deref(), Some("US-EAST"));
        assert_eq!(row.purpose.as_deref(), Some("TRADING"));
        assert_eq!((row.ttl_s, row.scheme_version), (Some(300), Some(1)));
    }
    // Per-shard sequences have no gaps.
    for shard in 0..2u16 {
        let seqs: Vec<u64> = rows
            .iter()
            .filter(|r| r.shard == shard)
            .map(|r| r.seq)
            .collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "shard {shard}");
    }
}

#[test]
fn pipelined_requests_across_shards_all_answer_by_request_id() {
    let app = TestAppliance::start();
    let rt = runtime();
    rt.block_on(async {
        let client = Arc::new(Client::connect(&app.client_config()).await.unwrap());
        let assets: Vec<uuid::Uuid> = (100..164).map(asset).collect();
        for a in &assets {
            client.register(*a).await.unwrap();
        }
        let mut tasks = Vec::new();
        for i in 0..1000usize {
            let client = client.clone();
            let a = assets[i % assets.len()];
            tasks.push(tokio::spawn(async move {
                client
                    .derive(derive_body(a, &format!("m/44'/0'/0'/0'/{i}")))
                    .await
            }));
        }
        let mut receipts = std::collections::HashSet::new();
        for t in tasks {
            let d = t.await.unwrap().unwrap();
            assert!(receipts.insert(d.receipt), "each receipt is unique");
        }
        assert_eq!(receipts.len(), 1000);
    });
}

#[test]
fn inflight_bound_answers_busy_and_busy_leaves_no_trace() {
    let app = TestAppliance::start_with("[limits]\nmax_inflight_per_connection = 4\n");
    let rt = runtime();
    let (ok, busy) = rt.block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        let a = asset(7);
        client.register(a).await.unwrap();
        // 200 frames in one write: the reader dispatches them before any can finish.
        let mut s = raw_connect(&app).await;
        let mut burst = Vec::new();
        for i in 0..200u64 {
            Request::Derive(derive_body(a, "m/44'/0'/0'/0'/1")).encode(i + 1, &mut burst);
        }
        s.write_all(&burst).await.unwrap();
        let (mut ok, mut busy) = (0, 0);
        let mut buf = Vec::new();
        for _ in 0..200 {
            let (_, body) = read_frame(&mut s, &mut buf)
                .await
                .expect("every request is answered");
            match Reply::decode(Opcode::Derive, &body).unwrap() {
                Reply::Derived(_) => ok += 1,
                Reply::Refused(r) => {
                    assert_eq!(r.status, Status::Busy, "{}", r.message);
                    assert!(r.retry_after_ms > 0);
                    busy += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        (ok, busy)
    });
    assert!(busy > 0, "the bound must be hit");
    assert!(ok >= 4);
    let derives = read_audit(&app.db_path())
        .iter()
        .filter(|r| r.event == custody::audit::AuditEvent::Derive)
        .count();
    assert_eq!(derives, ok, "only acknowledged derivations are audited");
}

// ---------------------------------------------------------------- lifecycle

#[test]
fn suspended_and_retired_assets_refuse_derivation() {
    let mut app = TestAppliance::start();
    let (active, suspended, retired) = (asset(51), asset(52), asset(53));
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        for a in [active, suspended, retired] {
            client.register(a).await.unwrap();
        }
    });
    // Suspension and retirement arrive over the wire in the lifecycle issue; here the
    // store is edited while the appliance is down, as an operator restoring state would.
    app.kill9();
    {
        let conn = rusqlite::Connection::open(app.db_path()).unwrap();
        for (a, state) in [(suspended, "SUSPENDED"), (retired, "RETIRED")] {
            conn.execute(
                "UPDATE custody_keys SET state = ?1 WHERE asset_id = ?2",
                rusqlite::params![state, a.to_string()],
            )
            .unwrap();
        }
    }
    app.launch();
    rt.block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        client
            .derive(derive_body(active, "m/44'/0'/0'/0'/1"))
            .await
            .unwrap();
        let e = client
            .derive(derive_body(suspended, "m/44'/0'/0'/0'/1"))
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(Status::AssetSuspended));
        let e = client
            .derive(derive_body(retired, "m/44'/0'/0'/0'/1"))
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(Status::AssetRetired));
        assert_eq!(
            client.status(retired).await.unwrap().state,
            custody::lifecycle::AssetState::Retired
        );
    });
    let derives: Vec<_> = read_audit(&app.db_path())
        .into_iter()
        .filter(|r| r.event == custody::audit::AuditEvent::Derive)
        .collect();
    assert_eq!(derives.len(), 1);
    assert_eq!(derives[0].asset, active);
}

// ---------------------------------------------------------------- faults

#[test]
fn sigkill_under_load_loses_no_acknowledged_derivation() {
    let mut app = TestAppliance::start();
    let rt = runtime();
    let assets: Vec<uuid::Uuid> = (200..232).map(asset).collect();
    common::register_all(&app, &assets);
    let acknowledged = common::derive_until_sigkill(&mut app, &assets, 3000);

    app.launch();
    let rows = common::assert_acknowledged_are_audited(&app.db_path(), &acknowledged);
    // Counters intact and every asset still registered and active.
    let stored = custody::store::sqlite::SqliteReader::open(&app.db_path())
        .unwrap()
        .assets()
        .unwrap();
    assert_eq!(stored.len(), assets.len());
    assert!(stored
        .iter()
        .all(|s| s.counter == 0 && s.state == custody::lifecycle::AssetState::Active));
    // The restarted appliance continues each shard's sequence.
    rt.block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        for a in &assets[..4] {
            let d = client
                .derive(derive_body(*a, "m/44'/0'/0'/0'/1"))
                .await
                .unwrap();
            let last = rows
                .iter()
                .filter(|r| r.shard == d.receipt.shard)
                .map(|r| r.seq)
                .max()
                .unwrap();
            assert!(d.receipt.seq > last, "sequence continues after restart");
        }
    });
}

#[test]
fn a_second_appliance_on_the_same_store_refuses_to_start() {
    let app = TestAppliance::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_custodyd"))
        .arg("run")
        .arg("--config")
        .arg(app.config_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("owned by another running appliance"),
        "{stderr}"
    );
}
