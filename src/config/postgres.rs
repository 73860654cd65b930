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
use std::sync::atomic::{AtomicUsize, Ordering};
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
/// `store::pg_tls` builds each connection's TLS client from it and the name of the host
/// it connects to ([`PgHost::server_name`]).
#[derive(Clone)]
pub struct PgTls {
    mode: PgSslMode,
    /// The trust anchors of `verify-full` (`None` in the other modes).
    roots: Option<Arc<rustls::RootCertStore>>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls").field("mode", &self.mode).finish()
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
        }
    }

    /// TLS in `mode`, trusting the CA certificates of `root_cert` (PEM) for `verify-full`.
    pub fn new(mode: PgSslMode, root_cert: Option<&Path>) -> Result<PgTls, PgTlsError> {
        let roots = match mode {
            PgSslMode::Disable | PgSslMode::Require => None,
            PgSslMode::VerifyFull => {
                let path = root_cert.ok_or(PgTlsError::NoRootCert)?;
                let roots = crate::certs::read_roots(path)
                    .map_err(|e| PgTlsError::RootCert(e.to_string()))?;
                Some(Arc::new(roots))
            }
        };
        Ok(PgTls { mode, roots })
    }

    pub fn mode(&self) -> PgSslMode {
        self.mode
    }

    /// The trust anchors of `verify-full`.
    pub fn roots(&self) -> Option<&rustls::RootCertStore> {
        self.roots.as_deref()
    }
}

/// One PostgreSQL server the appliance may use: the name as configured and the address
/// it resolved to when the config was read (a server that moves takes a restart, as the
/// single host always did).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgHost {
    /// As configured: a DNS name or an IP address. `verify-full` checks the server's
    /// certificate against it, and TLS sends it as SNI.
    pub name: String,
    pub addr: SocketAddr,
}

impl PgHost {
    /// A host given as an address (tests, URLs of IP addresses): its name is the IP.
    pub fn from_addr(addr: SocketAddr) -> PgHost {
        PgHost {
            name: addr.ip().to_string(),
            addr,
        }
    }

    /// The name the server's certificate must carry (`verify-full`), also sent as SNI.
    pub fn server_name(&self) -> Result<ServerName<'static>, PgTlsError> {
        server_name(&self.name)
    }
}

/// `name` as a TLS server name: a DNS name or an IP address a certificate can carry.
pub fn server_name(name: &str) -> Result<ServerName<'static>, PgTlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| PgTlsError::ServerName(name.to_owned()))
}

/// `name:port`, an IPv6 literal in brackets, as an operator would write it.
impl std::fmt::Display for PgHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.name.contains(':') {
            write!(f, "[{}]:{}", self.name, self.addr.port())
        } else {
            write!(f, "{}:{}", self.name, self.addr.port())
        }
    }
}

/// Which of the configured hosts answered as the writable server last: the next
/// connection tries it first, so that after a failover every shard's reconnect goes
/// straight to the promoted server instead of timing out on the old one each time.
///
/// Shared by every clone of a [`PgConfig`] (the cores' copies are clones of one), so one
/// shard's discovery serves them all. Only a hint: an index past the end of the host
/// list (a clone whose hosts were replaced) counts as the first host.
#[derive(Clone, Default)]
pub struct PreferredHost(Arc<AtomicUsize>);

impl PreferredHost {
    /// The host to try first, below `hosts`.
    pub fn get(&self, hosts: usize) -> usize {
        let i = self.0.load(Ordering::Relaxed);
        if i < hosts {
            i
        } else {
            0
        }
    }

    pub fn set(&self, i: usize) {
        self.0.store(i, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for PreferredHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.load(Ordering::Relaxed))
    }
}

/// How to reach the database. The password never appears in `Debug` or in errors.
#[derive(Clone)]
pub struct PgConfig {
    /// The servers, in the order they are tried (libpq's `host=a,b`): the writable one is
    /// the store; the others are standbys that may be promoted. Never empty.
    pub hosts: Vec<PgHost>,
    pub dbname: String,
    pub user: String,
    pub password: Option<zeroize::Zeroizing<String>>,
    /// Serve even if the server acknowledges commits before they are on disk
    /// (`synchronous_commit` or `fsync` off). Only for throwaway test databases.
    pub allow_unsafe_durability: bool,
    /// How long an owner's lease lasts at PostgreSQL without a renewal (I6); a standby
    /// appliance takes over once it lapses.
    pub owner_lease: Duration,
    /// How long before its lease could lapse an active appliance that cannot renew it
    /// stops acknowledging (self-fencing): less than half the lease.
    pub owner_lease_margin: Duration,
    /// TLS to the servers (`sslmode`).
    pub tls: PgTls,
    /// How often the appliance makes sure the coming months' audit-log partitions exist.
    pub partition_check: Duration,
    /// The host that answered as writable last, tried first (shared by clones).
    pub preferred_host: PreferredHost,
}

impl PgConfig {
    /// The hosts as `host:port,host:port`, for messages and logs.
    pub fn hosts_text(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(PgHost::to_string).collect();
        hosts.join(",")
    }

    /// The indices of the hosts in the order a connection tries them: the one that
    /// answered last, then the others as configured.
    pub fn host_order(&self) -> impl Iterator<Item = usize> + '_ {
        let first = self.preferred_host.get(self.hosts.len());
        std::iter::once(first)
            .filter(|_| !self.hosts.is_empty())
            .chain((0..self.hosts.len()).filter(move |&i| i != first))
    }
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("hosts", &self.hosts_text())
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("allow_unsafe_durability", &self.allow_unsafe_durability)
            .field("owner_lease", &self.owner_lease)
            .field("owner_lease_margin", &self.owner_lease_margin)
            .field("tls", &self.tls)
            .field("partition_check", &self.partition_check)
            .field("preferred_host", &self.preferred_host)
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
            PgTls::new(PgSslMode::VerifyFull, None),
            Err(PgTlsError::NoRootCert)
        ));
        let e = PgTls::new(PgSslMode::VerifyFull, Some(Path::new("/nonexistent.pem"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent.pem"), "{e}");
    }

    #[test]
    fn a_bad_host_name_is_refused() {
        assert!(matches!(
            server_name("not a host"),
            Err(PgTlsError::ServerName(_))
        ));
        assert!(server_name("10.1.2.3").is_ok());
        assert!(server_name("db1.example").is_ok());
    }

    fn config(hosts: &[&str]) -> PgConfig {
        PgConfig {
            hosts: hosts
                .iter()
                .map(|h| PgHost::from_addr(h.parse().unwrap()))
                .collect(),
            dbname: "d".into(),
            user: "u".into(),
            password: None,
            allow_unsafe_durability: false,
            owner_lease: Duration::from_secs(2),
            owner_lease_margin: Duration::from_millis(500),
            tls: PgTls::disabled(),
            partition_check: Duration::from_secs(3600),
            preferred_host: PreferredHost::default(),
        }
    }

    #[test]
    fn hosts_print_as_an_operator_writes_them() {
        let c = config(&["10.0.0.5:5433", "[::1]:5432"]);
        assert_eq!(c.hosts_text(), "10.0.0.5:5433,[::1]:5432");
    }

    #[test]
    fn the_host_that_answered_last_is_tried_first_by_every_clone() {
        let c = config(&["10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432"]);
        assert_eq!(c.host_order().collect::<Vec<_>>(), [0, 1, 2]);
        let clone = c.clone();
        clone.preferred_host.set(2);
        assert_eq!(c.host_order().collect::<Vec<_>>(), [2, 0, 1]);
        let fewer = PgConfig {
            hosts: c.hosts[..1].to_vec(),
            ..c.clone()
        };
        assert_eq!(fewer.host_order().collect::<Vec<_>>(), [0]);
        let none = PgConfig {
            hosts: Vec::new(),
            ..c
        };
        assert_eq!(none.host_order().count(), 0);
    }
}
