//! `[store]` for PostgreSQL: where the server is, who connects, and how the connection is
//! secured (TLS in the three modes an operator knows from libpq's `sslmode`):
//!
//! - `disable`: plain TCP (a local server on loopback or a private link);
//! - `require`: TLS, but the server's certificate is not checked (encryption against a
//!   passive listener only; an active attacker can impersonate the server);
//! - `verify-full`: TLS, the certificate must chain to `sslrootcert` and name the host
//!   the config gives (DNS name or IP address). The mode for a remote server.
//!
//! Plain settings: `store::postgres` connects with them, `store::pg_tls` builds each
//! connection's TLS client from [`PgTls`].

use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// libpq's `sslmode`, the three values custody supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgSslMode {
    Disable,
    Require,
    VerifyFull,
}

impl PgSslMode {
    pub fn parse(s: &str) -> Option<PgSslMode> {
        match s {
            "disable" => Some(PgSslMode::Disable),
            "require" => Some(PgSslMode::Require),
            "verify-full" => Some(PgSslMode::VerifyFull),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PgSslMode::Disable => "disable",
            PgSslMode::Require => "require",
            PgSslMode::VerifyFull => "verify-full",
        }
    }
}

/// How a connection to PostgreSQL is secured: read once with the config (so a bad CA
/// file is a configuration error, not a connection failure), shared by every core;
/// `store::pg_tls` builds each connection's TLS client from it.
#[derive(Clone)]
pub struct PgTls {
    mode: PgSslMode,
    /// The trust anchors of `verify-full` (`None` in the other modes).
    roots: Option<Arc<rustls::RootCertStore>>,
    /// The name the certificate must carry (`verify-full`), also sent as SNI.
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// Why a TLS setting for PostgreSQL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    #[error("{0:?} is not a host name or IP address a certificate can name")]
    ServerName(String),
    #[error("sslmode \"verify-full\" needs a CA bundle (store.postgres_sslrootcert)")]
    NoRootCert,
    #[error("{0}")]
    RootCert(String),
}

impl PgTls {
    /// No TLS.
    pub fn disabled() -> PgTls {
        PgTls {
            mode: PgSslMode::Disable,
            roots: None,
            server_name: ServerName::try_from("localhost").expect("a valid DNS name"),
        }
    }

    /// TLS in `mode` to `host`, trusting the CA certificates of `root_cert` (PEM) for
    /// `verify-full`.
    pub fn new(mode: PgSslMode, host: &str, root_cert: Option<&Path>) -> Result<PgTls, PgTlsError> {
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| PgTlsError::ServerName(host.to_owned()))?;
        let roots = match mode {
            PgSslMode::Disable | PgSslMode::Require => None,
            PgSslMode::VerifyFull => {
                let path = root_cert.ok_or(PgTlsError::NoRootCert)?;
                let roots = crate::certs::read_roots(path)
                    .map_err(|e| PgTlsError::RootCert(e.to_string()))?;
                Some(Arc::new(roots))
            }
        };
        Ok(PgTls {
            mode,
            roots,
            server_name,
        })
    }

    pub fn mode(&self) -> PgSslMode {
        self.mode
    }

    /// The trust anchors of `verify-full`.
    pub fn roots(&self) -> Option<&rustls::RootCertStore> {
        self.roots.as_deref()
    }

    /// The name the server's certificate must carry, also sent as SNI.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }
}

/// How to reach the database. The password never appears in `Debug` or in errors.
#[derive(Clone)]
pub struct PgConfig {
    pub addr: SocketAddr,
    pub dbname: String,
    pub user: String,
    pub password: Option<zeroize::Zeroizing<String>>,
    /// Serve even if the server acknowledges commits before they are on disk
    /// (`synchronous_commit` or `fsync` off). Only for throwaway test databases.
    pub allow_unsafe_durability: bool,
    /// How long an owner's lease lasts without a heartbeat (I6).
    pub owner_lease: Duration,
    /// TLS to the server (`sslmode`).
    pub tls: PgTls,
    /// How often the appliance makes sure the coming months' audit-log partitions exist.
    pub partition_check: Duration,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("addr", &self.addr)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("allow_unsafe_durability", &self.allow_unsafe_durability)
            .field("owner_lease", &self.owner_lease)
            .field("tls", &self.tls)
            .field("partition_check", &self.partition_check)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [
            PgSslMode::Disable,
            PgSslMode::Require,
            PgSslMode::VerifyFull,
        ] {
            assert_eq!(PgSslMode::parse(m.as_str()), Some(m));
        }
        assert_eq!(PgSslMode::parse("prefer"), None);
        assert_eq!(PgSslMode::parse("verify-ca"), None);
    }

    #[test]
    fn verify_full_needs_a_root_cert() {
        assert!(matches!(
            PgTls::new(PgSslMode::VerifyFull, "db.example", None),
            Err(PgTlsError::NoRootCert)
        ));
        let e = PgTls::new(
            PgSslMode::VerifyFull,
            "db.example",
            Some(Path::new("/nonexistent.pem")),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent.pem"), "{e}");
    }

    #[test]
    fn a_bad_host_name_is_refused() {
        assert!(matches!(
            PgTls::new(PgSslMode::Require, "not a host", None),
            Err(PgTlsError::ServerName(_))
        ));
        assert!(PgTls::new(PgSslMode::Require, "10.1.2.3", None).is_ok());
    }
}
