//! TLS to a real PostgreSQL: `require` encrypts, `verify-full` checks the certificate's
//! issuer and name, and the appliance serves over a verified connection.
//!
//! `verify-full` needs the server to present a certificate from a CA the test knows:
//! `.ci/postgres-tls.sh` provisions one on the local server and prints the CA bundle's
//! path, which the tests read from `CUSTODY_TEST_PG_CA`.

mod common;

use common::{asset, derive_body, on_executor, runtime, PgDatabase, TestAppliance};
use custody::client::Client;
use custody::config::{PgHost, PgSslMode as SslMode, PgTls};
use custody::store::postgres::{self, PgConfig};
use std::path::PathBuf;

/// The test CA's bundle, or `None` (skip) when it is not provisioned.
fn test_ca() -> Option<PathBuf> {
    match std::env::var_os("CUSTODY_TEST_PG_CA") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            common::missing(
                "PostgreSQL with TLS",
                &"CUSTODY_TEST_PG_CA is not set (run .ci/postgres-tls.sh)",
            );
            None
        }
    }
}

fn admin() -> Option<PgConfig> {
    if std::env::var("CUSTODY_TEST_DATABASE_URL").is_err() {
        common::missing("PostgreSQL", &"CUSTODY_TEST_DATABASE_URL is not set");
        return None;
    }
    Some(PgDatabase::admin_config())
}

/// `admin`'s servers under `name` (the name the certificate must carry), secured by `tls`.
fn named(admin: &PgConfig, name: &str, tls: PgTls) -> PgConfig {
    PgConfig {
        hosts: admin
            .hosts
            .iter()
            .map(|h| PgHost {
                name: name.to_owned(),
                addr: h.addr,
            })
            .collect(),
        tls,
        ..admin.clone()
    }
}

/// Connects and asks the server whether this very session is encrypted.
fn session_is_tls(config: PgConfig) -> Result<bool, String> {
    on_executor(move || async move {
        let c = postgres::connect(&config)
            .await
            .map_err(|e| e.to_string())?;
        let row = c
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get::<_, bool>(0))
    })
}

#[test]
fn disable_is_plain_and_require_is_encrypted() {
    let Some(admin) = admin() else { return };
    assert_eq!(session_is_tls(admin.clone()), Ok(false));
    let require = PgConfig {
        tls: PgTls::new(SslMode::Require, None).unwrap(),
        ..admin
    };
    assert_eq!(session_is_tls(require), Ok(true));
}

#[test]
fn verify_full_accepts_the_servers_certificate_by_ip_and_by_name() {
    let (Some(admin), Some(ca)) = (admin(), test_ca()) else {
        return;
    };
    for host in ["127.0.0.1", "localhost"] {
        let tls = PgTls::new(SslMode::VerifyFull, Some(&ca)).unwrap();
        let config = named(&admin, host, tls);
        assert_eq!(session_is_tls(config), Ok(true), "{host}");
    }
}

#[test]
fn verify_full_refuses_an_unknown_issuer() {
    let (Some(admin), Some(_)) = (admin(), test_ca()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = params.self_signed(&key).unwrap();
    let path = dir.path().join("other-ca.pem");
    std::fs::write(&path, other_ca.pem()).unwrap();
    let tls = PgTls::new(SslMode::VerifyFull, Some(&path)).unwrap();
    let config = named(&admin, "127.0.0.1", tls);
    let err = session_is_tls(config).unwrap_err();
    assert!(err.contains("sslmode verify-full"), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[test]
fn verify_full_refuses_a_certificate_for_another_name() {
    let (Some(admin), Some(ca)) = (admin(), test_ca()) else {
        return;
    };
    // The right server and the right CA, but the config names another host.
    let tls = PgTls::new(SslMode::VerifyFull, Some(&ca)).unwrap();
    let config = named(&admin, "db.custody.invalid", tls);
    let err = session_is_tls(config).unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
}

#[test]
fn the_appliance_serves_over_verify_full() {
    let Some(ca) = test_ca() else { return };
    let Some(db) = PgDatabase::create("tls") else {
        return;
    };
    let section = format!(
        "{}postgres_sslmode = \"verify-full\"\npostgres_sslrootcert = \"{}\"\n",
        db.store_section().replace(
            &format!("postgres_host = \"{}\"", db.config.hosts_text()),
            "postgres_host = \"localhost\""
        ),
        ca.display()
    );
    let mut app = TestAppliance::prepare_with(&section);
    let out = app.custodyd(&["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.launch();
    let a = asset(900);
    let receipt = runtime().block_on(async {
        let client = Client::connect(&app.client_config()).await.unwrap();
        client.register(a).await.unwrap();
        client
            .derive(derive_body(a, "m/44'/0'/0'/0'/7"))
            .await
            .unwrap()
            .receipt
    });
    // Every connection the appliance holds to its database is encrypted (asked before
    // this test opens plain connections of its own to read the audit log).
    let dbname = db.config.dbname.clone();
    let admin = PgDatabase::admin_config();
    let (tls, plain): (i64, i64) = on_executor(move || async move {
        let c = postgres::connect(&admin).await.unwrap();
        let row = c
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
                   FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                  WHERE a.datname = $1 AND a.application_name = 'custodyd'",
                &[&dbname],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    });
    assert!(tls >= 1, "the appliance holds encrypted connections");
    assert_eq!(plain, 0, "and no plain ones");
    let rows = db.audit_rows();
    assert!(rows
        .iter()
        .any(|r| (r.0, r.1, r.2.as_str(), r.3) == (receipt.shard, receipt.seq, "DERIVE", a)));

    app.kill9();
}
