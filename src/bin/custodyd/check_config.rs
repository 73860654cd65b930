//! `custodyd check-config FILE`: a configuration file checked as the start would read it
//! (the TLS files too), and what it sets up summed up in one line.

use custody::config::{Config, KeySource, SealConfig, StoreBackend};
use std::path::Path;

/// Checks `file`: prints every problem (exit status 2) or the summary (exit status 0).
pub(crate) fn check_config(file: &Path) -> i32 {
    let c = match custody::config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return 2;
        }
    };
    let store = store_text(&c.store.backend);
    let seal = seal_text(&c.seal);
    let tls = match tls_text(&c) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: tls: {e}", file.display());
            return 2;
        }
    };
    println!(
        "{}: ok (listen {}, {} cores, store {store}, seal {seal}, {tls})",
        file.display(),
        c.server.listen,
        c.server.cores,
    );
    0
}

/// The store: the SQLite file, or the PostgreSQL user, address and database.
fn store_text(backend: &StoreBackend) -> String {
    match backend {
        StoreBackend::Sqlite { path } => format!("sqlite {}", path.display()),
        StoreBackend::Postgres(pg) => {
            format!("postgres {}@{}/{}", pg.user, pg.hosts_text(), pg.dbname)
        }
    }
}

/// The seal provider and the files it reads.
fn seal_text(seal: &SealConfig) -> String {
    match seal {
        SealConfig::Dev { seed_file } => {
            format!("dev {} (NOT for production)", seed_file.display())
        }
        SealConfig::Pkcs11 {
            pkcs11,
            sealed_seed_file,
        } => format!(
            "pkcs11 token {:?} key {:?} sealed seed {}",
            pkcs11.token_label,
            pkcs11.key_label,
            sealed_seed_file.display()
        ),
        SealConfig::Shamir { share_set_file } => format!(
            "shamir share set {} (starts sealed: unseal with k shares)",
            share_set_file.display()
        ),
    }
}

/// The server certificate's subject and end of validity, or why the TLS files do not load.
fn tls_text(c: &Config) -> Result<String, custody::tls::TlsError> {
    // The TLS files as the start will read them (skipped for a key held as a systemd
    // credential outside the unit, where it cannot be read).
    let credential_elsewhere = matches!(c.tls.key, KeySource::Credential(_))
        && std::env::var_os("CREDENTIALS_DIRECTORY").is_none();
    if credential_elsewhere {
        return Ok(format!(
            "tls key {} not checked outside the unit",
            c.tls.key
        ));
    }
    let t = custody::tls::server_config(&c.tls)?;
    Ok(format!(
        "certificate \"{}\" until {}",
        t.certificate.subject,
        custody::tls::format_unix(t.certificate.not_after)
    ))
}
