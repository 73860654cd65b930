//! Configuration: read in two stages, every problem reported with its key.
//!
//! Stage one parses the TOML as written (syntax only). Stage two resolves each key to a
//! typed value (defaults filled in, ranges and the caps of [`crate::bounds`] checked,
//! paths made absolute against the config file's directory) and checks the values against
//! each other. Unknown keys are problems too, so a typo never silently falls back to a
//! default. `appliance/custody.toml` documents every key and its default; the
//! [`KEYS`] table is the single place each one is defined.
//!
//! This file holds the resolved types (what the rest of the appliance reads); the stages
//! and the sections live beside it:
//!
//! - `keys`: the [`KEYS`] table, each key with its default and meaning;
//! - `load`: stage one, [`parse`] and [`load`];
//! - `resolve`: stage two, [`resolve`]: the sections in order, `[server]`, `[audit]`
//!   and `[tls]` among them, then the checks across sections;
//! - `resolver`: the reader of one key (its type, range and default);
//! - `store`, `seal`, `limits`, `policy`: the sections of those names;
//! - `postgres`: the PostgreSQL store's settings and TLS modes.

mod keys;
mod limits;
mod load;
mod policy;
mod postgres;
mod resolve;
mod resolver;
mod seal;
mod store;

pub use keys::{KeyDoc, KEYS};
pub use load::{load, parse};
pub use postgres::{PgConfig, PgHost, PgSslMode, PgTls, PgTlsError, PreferredHost};
pub use resolve::resolve;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the PIN comes from. Never inline in the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN (trailing newline ignored).
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
    /// A systemd credential (`LoadCredential=`): `$CREDENTIALS_DIRECTORY/NAME`.
    Credential(String),
}

/// The `pkcs11` seal provider's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library), e.g. /usr/lib/softhsm/libsofthsm2.so.
    pub module: PathBuf,
    /// The label of the token that holds the wrapping key.
    pub token_label: String,
    /// The label of the AES-256 wrapping key.
    pub key_label: String,
    pub pin: PinSource,
}

/// The seed cache's timing (`[seal]`: key TTL, HSM timeout, stale serving, breaker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheTiming {
    /// Age at which the key is refreshed through the provider.
    pub ttl: Duration,
    /// Longest wait for one provider call.
    pub hsm_timeout: Duration,
    /// How long past its TTL a key keeps serving while refreshes fail.
    pub max_stale: Duration,
    /// Failures in a row that open the breaker.
    pub breaker_failures: u32,
    /// How long the open breaker waits before one probe.
    pub breaker_open: Duration,
}

/// One problem with the configuration, tied to its key (`section.key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// All the problems found; never empty.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<ConfigProblem>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}: {} problem(s)", self.file, self.problems.len())?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// How a client certificate names its holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// The subject's common name.
    CommonName,
    /// The first DNS or URI subject alternative name.
    SubjectAltName,
}

/// Where the server's TLS private key is read (at start and on every reload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `tls.key`: a PEM file.
    File(PathBuf),
    /// `tls.key_credential`: a systemd credential (`LoadCredential=NAME:/etc/custody/tls.key`),
    /// read from `$CREDENTIALS_DIRECTORY/NAME`. systemd copies credentials when the unit
    /// starts, so a new key in the source file takes a restart, not a reload.
    Credential(String),
}

impl KeySource {
    /// The file to read the key from.
    pub fn path(&self) -> Result<PathBuf, String> {
        match self {
            KeySource::File(p) => Ok(p.clone()),
            KeySource::Credential(name) => std::env::var_os("CREDENTIALS_DIRECTORY")
                .map(|dir| PathBuf::from(dir).join(name))
                .ok_or_else(|| {
                    format!(
                        "tls.key_credential {name:?}: CREDENTIALS_DIRECTORY is not set (is the unit's LoadCredential={name}:... in place?)"
                    )
                }),
        }
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "{}", p.display()),
            KeySource::Credential(name) => write!(f, "credential {name}"),
        }
    }
}

/// Where the root seed comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SealConfig {
    /// A plain seed file: for development and demos only, never production.
    Dev { seed_file: PathBuf },
    /// The seed sealed by a key in an HSM, reached through PKCS#11.
    Pkcs11 {
        pkcs11: Pkcs11Config,
        sealed_seed_file: PathBuf,
    },
    /// No seed at rest: the appliance starts sealed and operators submit k of the n
    /// Shamir shares `custody init` wrote; the share set file names the seed they rebuild.
    Shamir { share_set_file: PathBuf },
}

/// Which store holds the counters and the audit log.
#[derive(Clone, Debug)]
pub enum StoreBackend {
    /// The embedded store: one SQLite file.
    Sqlite { path: PathBuf },
    /// The production store.
    Postgres(PgConfig),
}

/// The resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: Server,
    pub tls: Tls,
    pub store: StoreConfig,
    pub seal: SealConfig,
    /// The seed cache's TTL, staleness bound, provider timeout and breaker.
    pub seal_timing: CacheTiming,
    pub limits: Limits,
    pub policy: Policy,
    pub audit: AuditConfig,
}

/// The appliance's own reconciliation of the audit log (`[audit]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditConfig {
    /// How often the appliance reconciles the new records; `None` = only on demand.
    pub reconcile_interval: Option<Duration>,
    /// Records per second the appliance's runs read at most; `None` = unpaced.
    pub reconcile_rate: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub listen: SocketAddr,
    /// Executors to run, one per core; resolved from 0 to one per online core but one
    /// ([`resolve::default_cores`]).
    pub cores: usize,
    pub state_dir: PathBuf,
    pub log_level: tracing::Level,
    /// One JSON object per line instead of text.
    pub log_json: bool,
    /// Each shard logs its commit figures this often; `None` = never.
    pub stats_log_interval: Option<Duration>,
    /// The admin HTTP listener (/metrics, /healthz, /readyz); `None` = off.
    pub admin_listen: Option<SocketAddr>,
    /// The first of the per-shard ports: shard i also listens on this IP at port + i
    /// (HELLO announces them); `None` = only the shared port.
    pub shard_listen: Option<SocketAddr>,
    /// The client address other appliances sharing the store name in their NOT_ACTIVE
    /// replies while this one is active (`server.advertise`, else derived from `listen`):
    /// never empty, `host:port` of at most [`crate::bounds::ACTIVE_ADDRESS_BYTES_MAX`] bytes.
    pub advertise: String,
    /// How often each core publishes its figures for the metrics.
    pub metrics_publish: Duration,
    /// How long a graceful stop (SIGTERM) may take before the process exits anyway.
    pub shutdown_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: KeySource,
    pub client_ca: PathBuf,
    pub require_client_cert: bool,
    pub identity: IdentitySource,
    pub handshake_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub commit_batch_records_max: usize,
    pub commit_batch_delay: Duration,
    pub commit_batches_inflight_max: usize,
    pub commit_linger: Duration,
    pub commit_timeout: Duration,
    pub commit_queue_depth: usize,
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_frame_body_bytes: u32,
    /// What one connection, one identity and one source may hold (reloadable).
    pub connection: ConnectionLimits,
    pub cross_core_queue_depth: u32,
    pub max_pending_per_shard: u32,
    pub max_assets_per_shard: u64,
    /// How long a rotation id is remembered: the same id again answers the first result.
    pub rotation_id_retention: Duration,
    /// Most rotation ids each shard remembers (the oldest are forgotten first).
    pub rotation_ids_max_per_shard: u32,
    /// Rate-limit buckets each shard keeps (one per active requester and asset).
    pub rate_limit_buckets_per_shard: u32,
}

/// The bounds of the connection edge (I8): slots per core, per identity and per source,
/// and how long the appliance waits for a client. A reload (SIGHUP, POLICY_RELOAD) puts
/// them in force whole: the slots and timeouts for connections made after it (a connection
/// keeps those it started with), `max_inflight_per_connection` from the next request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Established connections each core holds.
    pub max_connections_per_core: u32,
    pub max_inflight_per_connection: u32,
    /// Established connections one identity with a role holds on one core.
    pub max_connections_per_identity: u32,
    /// Established connections one identity with no role holds on one core.
    pub max_connections_per_roleless_identity: u32,
    /// Established connections of all identities with no role, on one core.
    pub max_roleless_connections_per_core: u32,
    /// TLS handshakes in progress on one core (slots of their own).
    pub max_handshakes_per_core: u32,
    /// TLS handshakes in progress from one source address (IPv4, IPv6 /64) on one core.
    pub max_handshakes_per_source: u32,
    /// Once a frame's first byte arrived, the whole frame must arrive within this.
    pub frame_timeout: Duration,
    /// A connection with nothing in flight that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A batch of replies the client does not take within this closes the connection.
    pub write_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub regions: Vec<String>,
    /// Every identity's roles (`policy.derivers`, `operators`, `admins`, `auditors`) and
    /// each role's rate limit, as the gate checks them.
    pub access: crate::policy::AccessPolicy,
}

impl Config {
    /// The directory the sealed seed (or dev seed) lives in, to create before init.
    pub fn seal_dir(&self) -> Option<PathBuf> {
        match &self.seal {
            SealConfig::Dev { seed_file } => seed_file.parent().map(Path::to_path_buf),
            SealConfig::Pkcs11 {
                sealed_seed_file, ..
            } => sealed_seed_file.parent().map(Path::to_path_buf),
            SealConfig::Shamir { share_set_file } => share_set_file.parent().map(Path::to_path_buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_text(text: &str) -> Result<Config, ConfigError> {
        resolve(
            &parse(text, "test.toml")?,
            Path::new("/etc/custody"),
            "test.toml",
        )
    }

    const MINIMAL: &str = r#"
        [tls]
        cert = "server.pem"
        key = "server.key"
        client_ca = "ca.pem"
    "#;

    #[test]
    fn defaults_fill_a_minimal_config() {
        let c = resolve_text(MINIMAL).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:7443".parse().unwrap());
        assert!(c.server.cores >= 1);
        assert_eq!(c.tls.cert, PathBuf::from("/etc/custody/server.pem"));
        match &c.store.backend {
            StoreBackend::Sqlite { path } => {
                assert_eq!(path, &PathBuf::from("/var/lib/custody/custody.db"))
            }
            other => panic!("default store is SQLite, got {other:?}"),
        }
        assert_eq!(c.limits.max_frame_body_bytes, 16_384);
        assert_eq!(c.policy.regions, ["US-EAST", "EU-WEST", "APAC"]);
        assert!(c.tls.require_client_cert);
        assert_eq!(c.store.commit_queue_depth, c.server.cores);
        assert_eq!(c.store.commit_batches_inflight_max, 1);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let err = resolve_text(
            r#"
            [server]
            listen = "nowhere"
            cores = -1
            colour = "blue"
            log_format = "xml"
            [tls]
            cert = 5
            identity = "email"
            [store]
            commit_batch_records_max = 100000
            [limits]
            max_pending_per_shard = 10
            max_frame_body_bytes = "big"
            [policy]
            regions = ["US-EAST", "US-EAST", "has space"]
            [audit]
            reconcile_records_per_s = 100
            "#,
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "server.listen",
            "server.cores",
            "server.colour",
            "server.log_format",
            "tls.cert",
            "tls.key",
            "tls.client_ca",
            "tls.identity",
            "store.commit_batch_records_max",
            "limits.max_frame_body_bytes",
            "policy.regions",
            "audit.reconcile_records_per_s",
        ] {
            assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
        }
        assert_eq!(keys.iter().filter(|k| **k == "policy.regions").count(), 2);
    }

    #[test]
    fn cross_key_checks() {
        let err = resolve_text(&format!(
            "{MINIMAL}\n[store]\ncommit_batch_records_max = 64\n[limits]\nmax_pending_per_shard = 32\n"
        ))
        .unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].key, "store.commit_batch_records_max");
    }

    #[test]
    fn postgres_settings_resolve_and_secrets_come_from_outside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pg.pass"), "s3cret\n").unwrap();
        let text = format!(
            "{MINIMAL}\n[store]\nbackend = \"postgres\"\npostgres_user = \"root\"\npostgres_password_file = \"pg.pass\"\n"
        );
        let c = resolve(&parse(&text, "t.toml").unwrap(), dir.path(), "t.toml").unwrap();
        match &c.store.backend {
            StoreBackend::Postgres(pg) => {
                assert_eq!(
                    pg.hosts,
                    [PgHost::from_addr("127.0.0.1:5432".parse().unwrap())]
                );
                assert_eq!(pg.hosts_text(), "127.0.0.1:5432");
                assert_eq!((pg.user.as_str(), pg.dbname.as_str()), ("root", "custody"));
                assert_eq!(pg.password.as_deref().map(String::as_str), Some("s3cret"));
                assert!(
                    !format!("{pg:?}").contains("s3cret"),
                    "the password never prints"
                );
            }
            other => panic!("{other:?}"),
        }
        let bad = format!(
            "{MINIMAL}\n[store]\nbackend = \"postgres\"\npostgres_password_file = \"missing\"\npostgres_sslmode = \"verify-full\"\n"
        );
        let err = resolve(&parse(&bad, "t.toml").unwrap(), dir.path(), "t.toml").unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"store.postgres_password_file"), "{keys:?}");
        assert!(
            keys.contains(&"store.postgres_sslrootcert"),
            "verify-full without a CA bundle: {keys:?}"
        );
        for (mode, key) in [
            ("prefer", "store.postgres_sslmode"),
            ("verify-ca", "store.postgres_sslmode"),
        ] {
            let bad = format!(
                "{MINIMAL}\n[store]\nbackend = \"postgres\"\npostgres_sslmode = \"{mode}\"\n"
            );
            let err = resolve(&parse(&bad, "t.toml").unwrap(), dir.path(), "t.toml").unwrap_err();
            assert_eq!(err.problems[0].key, key, "{mode}");
        }
    }

    #[test]
    fn postgres_host_lists_several_servers() {
        let pg = |hosts: &str| {
            let text = format!(
                "{MINIMAL}\n[store]\nbackend = \"postgres\"\npostgres_host = \"{hosts}\"\npostgres_port = 6000\n"
            );
            match resolve_text(&text).map(|c| c.store.backend) {
                Ok(StoreBackend::Postgres(pg)) => Ok(pg),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e),
            }
        };
        let c = pg("127.0.0.1, 127.0.0.2:5433,[::1]:5434,[::1]").unwrap();
        assert_eq!(
            c.hosts_text(),
            "127.0.0.1:6000,127.0.0.2:5433,[::1]:5434,[::1]:6000"
        );
        assert_eq!(c.hosts[1].addr, "127.0.0.2:5433".parse().unwrap());
        let e = pg("127.0.0.1,,db.custody.invalid,127.0.0.1:0").unwrap_err();
        let problems: Vec<&ConfigProblem> = e.problems.iter().collect();
        assert_eq!(problems.len(), 3, "{e}");
        assert!(
            problems.iter().all(|p| p.key == "store.postgres_host"),
            "{e}"
        );
        assert!(
            problems[1].message.contains("\"db.custody.invalid\""),
            "{e}"
        );
        assert!(problems[2].message.contains("\"127.0.0.1:0\""), "{e}");
        let many = vec!["127.0.0.1"; crate::bounds::PG_HOSTS_MAX + 1].join(",");
        let e = pg(&many).unwrap_err();
        assert_eq!(e.problems[0].key, "store.postgres_host");
        assert!(e.problems[0].message.contains("at most 8"), "{e}");
        let most = vec!["127.0.0.1"; crate::bounds::PG_HOSTS_MAX].join(",");
        assert_eq!(pg(&most).unwrap().hosts.len(), crate::bounds::PG_HOSTS_MAX);
    }

    #[test]
    fn each_postgres_host_must_be_a_tls_name_when_tls_is_on() {
        let text = format!(
            "{MINIMAL}\n[store]\nbackend = \"postgres\"\npostgres_host = \"127.0.0.1,bad_host!\"\npostgres_sslmode = \"require\"\n"
        );
        let e = resolve_text(&text).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "store.postgres_host");
        assert!(e.problems[0].message.contains("\"bad_host!\""), "{e}");
    }

    #[test]
    fn the_lease_margin_is_less_than_half_the_lease() {
        let lease = |lease: u32, margin: u32| {
            let text = format!(
                "{MINIMAL}\n[store]\nbackend = \"postgres\"\npostgres_owner_lease_ms = {lease}\npostgres_owner_lease_margin_ms = {margin}\n"
            );
            resolve_text(&text)
        };
        let c = lease(1000, 499).unwrap();
        match &c.store.backend {
            StoreBackend::Postgres(pg) => {
                assert_eq!(pg.owner_lease, Duration::from_millis(1000));
                assert_eq!(pg.owner_lease_margin, Duration::from_millis(499));
            }
            other => panic!("{other:?}"),
        }
        let e = lease(1000, 500).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "store.postgres_owner_lease_margin_ms");
        assert!(
            e.problems[0].message.contains("500 ms") && e.problems[0].message.contains("1000 ms"),
            "{e}"
        );
        let e = lease(1000, 10).unwrap_err();
        assert_eq!(e.problems[0].key, "store.postgres_owner_lease_margin_ms");
    }

    #[test]
    fn server_advertise_is_given_or_derived() {
        let advertise = |server: &str| {
            resolve_text(&format!("{MINIMAL}\n[server]\n{server}\n")).map(|c| c.server.advertise)
        };
        assert_eq!(advertise("").unwrap(), "127.0.0.1:7443");
        assert_eq!(
            advertise("listen = \"10.0.0.5:7000\"").unwrap(),
            "10.0.0.5:7000"
        );
        let any = advertise("listen = \"0.0.0.0:7000\"").unwrap();
        assert!(any.ends_with(":7000"), "{any}");
        assert_eq!(
            advertise("advertise = \"custody-2.example:7443\"").unwrap(),
            "custody-2.example:7443"
        );
        assert_eq!(
            advertise("advertise = \"[fd00::2]:7443\"").unwrap(),
            "[fd00::2]:7443"
        );
        for bad in ["custody-2", "custody-2:0", "fd00::2:7443", "a b:1"] {
            let e = advertise(&format!("advertise = \"{bad}\"")).unwrap_err();
            assert_eq!(e.problems[0].key, "server.advertise", "{bad}: {e}");
        }
    }

    #[test]
    fn pkcs11_seal_settings_resolve_with_exactly_one_pin_source() {
        let dir = tempfile::tempdir().unwrap();
        let seal = |lines: &str| {
            let text = format!("{MINIMAL}\n[seal]\nprovider = \"pkcs11\"\n{lines}");
            resolve(&parse(&text, "t.toml").unwrap(), dir.path(), "t.toml")
        };
        let c = seal("pkcs11_pin_file = \"hsm.pin\"\npkcs11_token_label = \"t1\"\n").unwrap();
        match &c.seal {
            SealConfig::Pkcs11 {
                pkcs11,
                sealed_seed_file,
            } => {
                assert_eq!(pkcs11.pin, PinSource::File(dir.path().join("hsm.pin")));
                assert_eq!(pkcs11.token_label, "t1");
                assert_eq!(pkcs11.key_label, "custody-seed-wrap");
                assert!(sealed_seed_file.ends_with("sealed-seed.json"));
            }
            other => panic!("{other:?}"),
        }
        let c = seal("pkcs11_pin_credential = \"custody-pin\"\n").unwrap();
        assert!(
            matches!(&c.seal, SealConfig::Pkcs11 { pkcs11, .. } if pkcs11.pin == PinSource::Credential("custody-pin".into()))
        );
        for bad in [
            "",
            "pkcs11_pin_file = \"a\"\npkcs11_pin_env = \"B\"\n",
            "pkcs11_pin_env = \"B\"\npkcs11_key_label = \"\"\n",
        ] {
            let err = seal(bad).unwrap_err();
            assert!(
                err.problems[0].key.starts_with("seal.pkcs11_"),
                "{bad}: {err}"
            );
        }
        let err = resolve_text(&format!("{MINIMAL}\n[seal]\nprovider = \"vault\"\n")).unwrap_err();
        assert_eq!(err.problems[0].key, "seal.provider");
    }

    #[test]
    fn postgres_tls_settings_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["ca.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("pg-ca.pem"), ca.pem()).unwrap();
        let text = format!(
            "{MINIMAL}\n[store]\nbackend = \"postgres\"\npostgres_host = \"127.0.0.1\"\npostgres_sslmode = \"verify-full\"\npostgres_sslrootcert = \"pg-ca.pem\"\n"
        );
        let c = resolve(&parse(&text, "t.toml").unwrap(), dir.path(), "t.toml").unwrap();
        match &c.store.backend {
            StoreBackend::Postgres(pg) => assert_eq!(pg.tls.mode(), PgSslMode::VerifyFull),
            other => panic!("{other:?}"),
        }
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let bad = text.replace("pg-ca.pem", "empty.pem");
        let err = resolve(&parse(&bad, "t.toml").unwrap(), dir.path(), "t.toml").unwrap_err();
        assert_eq!(err.problems[0].key, "store.postgres_sslrootcert");
        assert!(err.problems[0].message.contains("no certificate"), "{err}");
    }

    #[test]
    fn roles_and_rate_limits_resolve_into_the_access_policy() {
        use crate::policy::{Need, Purpose};
        let c = resolve_text(&format!(
            "{MINIMAL}\n[limits]\nrate_limit = \"10/1s\"\n[policy]\nadmins = [\"root-ops\"]\nauditors = [\"audit\"]\nderivers = [{{ identity = \"svc\", purposes = [\"TRADING\"], regions = [\"APAC\"] }}]\nrate_limits = {{ auditor = \"500/60s\" }}\n"
        ))
        .unwrap();
        let access = &c.policy.access;
        let asset = uuid::Uuid::parse_str("0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d").unwrap();
        let trading = Need::Derive {
            asset: &asset,
            purpose: Purpose::Trading,
            region: "APAC",
        };
        assert_eq!(
            access
                .authorize("svc", trading)
                .unwrap()
                .unwrap()
                .limit
                .to_string(),
            "10/1s"
        );
        assert_eq!(
            access
                .authorize("audit", Need::Status)
                .unwrap()
                .unwrap()
                .limit
                .to_string(),
            "500/60s"
        );
        assert!(access.authorize("svc", Need::Status).is_err());
        assert!(access.authorize("root-ops", Need::Operator).is_ok());
        assert!(access.authorize("nobody", Need::Anyone).is_ok());
        assert_eq!(
            access.authorize("nobody", trading).unwrap_err().reason,
            crate::policy::DenyReason::NoRole
        );

        let err = resolve_text(&format!(
            "{MINIMAL}\n[limits]\nrate_limit = \"lots\"\n[policy]\nderivers = [{{ identity = \"svc\", purposes = [\"GAMBLING\"], regions = [\"MARS\"], extra = 1 }}, {{ identity = \"svc\", purposes = [], regions = [\"APAC\"] }}]\nrate_limits = {{ janitor = \"1/1s\" }}\n"
        ))
        .unwrap_err();
        let said = err.to_string();
        for expected in [
            "limits.rate_limit: \"lots\" is not <requests>/<seconds>s",
            "policy.derivers[0]: unknown field \"extra\"",
            "policy.derivers[0]: purpose \"GAMBLING\"",
            "policy.derivers[0]: region \"MARS\" is not in policy.regions",
            "policy.derivers[1]: identity \"svc\": missing, empty or listed twice",
            "policy.derivers[1]: purposes: a non-empty list",
        ] {
            assert!(said.contains(expected), "{expected}\n{said}");
        }
        let err = resolve_text(&format!(
            "{MINIMAL}\n[policy]\nrate_limits = {{ janitor = \"1/1s\", admin = \"0/1s\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"janitor\" is not a role"), "{err}");
        assert!(err.contains("admin: \"0/1s\""), "{err}");
    }

    #[test]
    fn asset_groups_resolve_and_every_mistake_is_named() {
        use crate::policy::{DenyReason, Need, Purpose};
        let fx = "0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d";
        let c = resolve_text(&format!(
            "{MINIMAL}\n[policy]\nderivers = [{{ identity = \"fx\", purposes = [\"TRADING\"], regions = [\"APAC\"], asset_groups = [\"desk-fx\"] }}]\n[policy.asset_groups]\ndesk-fx = [\"{fx}\"]\ndesk-rates = []\n"
        ))
        .unwrap();
        let access = &c.policy.access;
        assert_eq!(access.asset_groups().len(), 2);
        let need = |asset| Need::Derive {
            asset,
            purpose: Purpose::Trading,
            region: "APAC",
        };
        let member = uuid::Uuid::parse_str(fx).unwrap();
        assert!(access.authorize("fx", need(&member)).is_ok());
        let other = uuid::Uuid::new_v4();
        assert_eq!(
            access.authorize("fx", need(&other)).unwrap_err().reason,
            DenyReason::AssetGroup
        );

        let err = resolve_text(&format!(
            "{MINIMAL}\n[policy]\nderivers = [{{ identity = \"a\", purposes = [\"TRADING\"], regions = [\"APAC\"], asset_groups = [\"desk-eq\"] }}, {{ identity = \"b\", purposes = [\"TRADING\"], regions = [\"APAC\"], asset_groups = [] }}]\n[policy.asset_groups]\n\"bad name\" = [\"{fx}\"]\ndesk-rates = [\"00000000-0000-0000-0000-000000000000\", 7]\n"
        ))
        .unwrap_err()
        .to_string();
        for expected in [
            "policy.asset_groups.bad name: a group name is 1-64 characters",
            "policy.asset_groups.desk-rates: \"00000000-0000-0000-0000-000000000000\": not an RFC 4122 asset id",
            "policy.asset_groups.desk-rates: 7: not an RFC 4122 asset id",
            "policy.derivers[1]: asset_groups: a non-empty list",
            "policy.derivers[0]: asset group \"desk-eq\" is not in policy.asset_groups",
        ] {
            assert!(err.contains(expected), "{expected}\n{err}");
        }
        let err = resolve_text(&format!(
            "{MINIMAL}\n[policy]\nderivers = [{{ identity = \"a\", purposes = [\"TRADING\"], regions = [\"APAC\"], asset_groups = [\"desk-eq\"] }}]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "policy.derivers[0]: asset group \"desk-eq\" is not in policy.asset_groups"
            ),
            "{err}"
        );
        let many: String = (0..=crate::bounds::ASSET_GROUPS_MAX)
            .map(|i| format!("g{i} = []\n"))
            .collect();
        let err = resolve_text(&format!("{MINIMAL}\n[policy.asset_groups]\n{many}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("65 groups: at most 64"), "{err}");
    }

    #[test]
    fn syntax_errors_are_stage_one() {
        let err = resolve_text("[server\nlisten = 1").unwrap_err();
        assert_eq!(err.problems[0].key, "(syntax)");
    }

    #[test]
    fn the_tls_key_comes_from_a_file_or_a_credential_never_both() {
        let c = resolve_text(MINIMAL).unwrap();
        assert_eq!(c.tls.key, KeySource::File("/etc/custody/server.key".into()));
        let cred = "[tls]\ncert = \"server.pem\"\nkey_credential = \"custody-tls-key\"\nclient_ca = \"ca.pem\"\n";
        let c = resolve_text(cred).unwrap();
        assert_eq!(c.tls.key, KeySource::Credential("custody-tls-key".into()));
        assert_eq!(c.tls.key.to_string(), "credential custody-tls-key");
        let both = format!("{MINIMAL}\nkey_credential = \"custody-tls-key\"\n");
        let e = resolve_text(&both).unwrap_err();
        assert_eq!(e.problems[0].key, "tls.key", "{e}");
        assert!(e.problems[0].message.contains("one way only"), "{e}");
        let slash = cred.replace("custody-tls-key", "../etc/shadow");
        assert_eq!(
            resolve_text(&slash).unwrap_err().problems[0].key,
            "tls.key_credential"
        );
        let neither = "[tls]\ncert = \"server.pem\"\nclient_ca = \"ca.pem\"\n";
        assert_eq!(
            resolve_text(neither).unwrap_err().problems[0].key,
            "tls.key"
        );
    }

    /// What `c` holds for `key`, as the key would be written (`None`: `c` does not show
    /// it, e.g. a PostgreSQL key while SQLite is the store).
    fn applied(c: &Config, key: &str) -> Option<toml::Value> {
        use crate::policy::{Need, Purpose};
        use toml::Value::{Array, Boolean as B, Integer as I, String as S, Table};
        let ms = |d: Duration| Some(I(d.as_millis() as i64));
        let secs = |d: Duration| Some(I(d.as_secs() as i64));
        let us = |d: Duration| Some(I(d.as_micros() as i64));
        let text = |t: &str| Some(S(t.to_owned()));
        let path = |p: &Path| Some(S(p.display().to_string()));
        let in_state = |p: &Path| {
            let rel = p.strip_prefix(&c.server.state_dir).ok()?;
            Some(S(rel.display().to_string()))
        };
        let addr = |a: Option<SocketAddr>| Some(S(a.map_or(String::new(), |a| a.to_string())));
        let online = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pg = match &c.store.backend {
            StoreBackend::Postgres(pg) => Some(pg),
            StoreBackend::Sqlite { .. } => None,
        };
        let pkcs11 = match &c.seal {
            SealConfig::Pkcs11 { pkcs11, .. } => Some(pkcs11),
            _ => None,
        };
        let pin = |source: fn(&PinSource) -> Option<&str>| {
            let p = pkcs11?;
            Some(S(source(&p.pin).unwrap_or("").to_owned()))
        };
        let access = &c.policy.access;
        let asset = uuid::Uuid::parse_str("0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d").unwrap();
        let derive = Need::Derive {
            asset: &asset,
            purpose: Purpose::Trading,
            region: "APAC",
        };
        // The identities the role configs below give each role, and how each is asked.
        let roles = [
            ("deriver", "de", derive),
            ("operator", "op", Need::Operator),
            ("admin", "ad", Need::Admin),
            ("auditor", "au", Need::Status),
        ];
        let limit = |identity: &str, need| {
            let allowed = access.authorize(identity, need).ok()??;
            Some(allowed.limit.to_string())
        };
        let t = &c.seal_timing;
        let l = &c.limits;
        let cl = &l.connection;
        let st = &c.store;
        match key {
            "server.listen" => addr(Some(c.server.listen)),
            "server.shard_listen" => addr(c.server.shard_listen),
            "server.admin_listen" => addr(c.server.admin_listen),
            "server.advertise" => (c.server.advertise
                == resolve::derived_advertise(c.server.listen))
            .then(|| S(String::new())),
            "server.metrics_publish_ms" => ms(c.server.metrics_publish),
            "server.shutdown_timeout_s" => secs(c.server.shutdown_timeout),
            "server.cores" => Some(I(if c.server.cores == resolve::default_cores(online) {
                0
            } else {
                c.server.cores as i64
            })),
            "server.state_dir" => path(&c.server.state_dir),
            "server.log_level" => text(&c.server.log_level.to_string().to_lowercase()),
            "server.log_format" => text(if c.server.log_json { "json" } else { "text" }),
            "server.stats_log_interval_s" => Some(I(c
                .server
                .stats_log_interval
                .map_or(0, |d| d.as_secs() as i64))),
            "tls.key_credential" => match &c.tls.key {
                KeySource::File(_) => text(""),
                KeySource::Credential(name) => text(name),
            },
            "tls.require_client_cert" => Some(B(c.tls.require_client_cert)),
            "tls.identity" => text(match c.tls.identity {
                IdentitySource::CommonName => "cn",
                IdentitySource::SubjectAltName => "san",
            }),
            "tls.handshake_timeout_ms" => ms(c.tls.handshake_timeout),
            "store.backend" => text(if pg.is_some() { "postgres" } else { "sqlite" }),
            "store.sqlite_path" => match &st.backend {
                StoreBackend::Sqlite { path } => in_state(path),
                StoreBackend::Postgres(_) => None,
            },
            // The port of the first host stands for postgres_port; another host's port
            // is shown with it only where it differs.
            "store.postgres_host" => text(&postgres_host(pg?)),
            "store.postgres_port" => Some(I(i64::from(pg?.hosts.first()?.addr.port()))),
            "store.postgres_dbname" => text(&pg?.dbname),
            "store.postgres_user" => text(&pg?.user),
            "store.postgres_password_file" | "store.postgres_password_env" => {
                pg?.password.is_none().then(|| S(String::new()))
            }
            "store.postgres_allow_unsafe_durability" => Some(B(pg?.allow_unsafe_durability)),
            "store.postgres_owner_lease_ms" => ms(pg?.owner_lease),
            "store.postgres_owner_lease_margin_ms" => ms(pg?.owner_lease_margin),
            "store.postgres_partition_check_s" => secs(pg?.partition_check),
            "store.postgres_sslmode" => text(pg?.tls.mode().as_str()),
            "store.postgres_sslrootcert" => pg?.tls.roots().is_none().then(|| S(String::new())),
            "store.commit_batch_records_max" => Some(I(st.commit_batch_records_max as i64)),
            "store.commit_batch_delay_us" => us(st.commit_batch_delay),
            "store.commit_batches_inflight_max" => Some(I(st.commit_batches_inflight_max as i64)),
            "store.commit_linger_us" => us(st.commit_linger),
            "store.commit_timeout_ms" => ms(st.commit_timeout),
            "store.commit_queue_depth" => {
                let all = c.server.cores * st.commit_batches_inflight_max;
                Some(I(if st.commit_queue_depth == all {
                    0
                } else {
                    st.commit_queue_depth as i64
                }))
            }
            "seal.provider" => text(match &c.seal {
                SealConfig::Dev { .. } => "dev",
                SealConfig::Pkcs11 { .. } => "pkcs11",
                SealConfig::Shamir { .. } => "shamir",
            }),
            "seal.cache_ttl_s" => secs(t.ttl),
            "seal.max_stale_s" => secs(t.max_stale),
            "seal.hsm_timeout_ms" => ms(t.hsm_timeout),
            "seal.breaker_failures" => Some(I(i64::from(t.breaker_failures))),
            "seal.breaker_open_ms" => ms(t.breaker_open),
            "seal.sealed_seed_file" => match &c.seal {
                SealConfig::Pkcs11 {
                    sealed_seed_file, ..
                } => in_state(sealed_seed_file),
                _ => None,
            },
            "seal.pkcs11_module" => path(&pkcs11?.module),
            "seal.pkcs11_token_label" => text(&pkcs11?.token_label),
            "seal.pkcs11_key_label" => text(&pkcs11?.key_label),
            "seal.pkcs11_pin_file" => pin(|p| match p {
                PinSource::File(f) => f.to_str(),
                _ => None,
            }),
            "seal.pkcs11_pin_env" => pin(|p| match p {
                PinSource::Env(v) => Some(v.as_str()),
                _ => None,
            }),
            "seal.pkcs11_pin_credential" => pin(|p| match p {
                PinSource::Credential(n) => Some(n.as_str()),
                _ => None,
            }),
            "seal.share_set_file" => match &c.seal {
                SealConfig::Shamir { share_set_file } => in_state(share_set_file),
                _ => None,
            },
            "seal.dev_seed_file" => match &c.seal {
                SealConfig::Dev { seed_file } => in_state(seed_file),
                _ => None,
            },
            "limits.max_frame_body_bytes" => Some(I(i64::from(l.max_frame_body_bytes))),
            "limits.max_inflight_per_connection" => {
                Some(I(i64::from(cl.max_inflight_per_connection)))
            }
            "limits.max_connections_per_core" => Some(I(i64::from(cl.max_connections_per_core))),
            "limits.max_connections_per_identity" => {
                Some(I(i64::from(cl.max_connections_per_identity)))
            }
            "limits.max_connections_per_roleless_identity" => {
                Some(I(i64::from(cl.max_connections_per_roleless_identity)))
            }
            "limits.max_roleless_connections_per_core" => {
                Some(I(i64::from(cl.max_roleless_connections_per_core)))
            }
            "limits.max_handshakes_per_core" => Some(I(i64::from(cl.max_handshakes_per_core))),
            "limits.max_handshakes_per_source" => Some(I(i64::from(cl.max_handshakes_per_source))),
            "limits.frame_timeout_ms" => ms(cl.frame_timeout),
            "limits.idle_timeout_s" => secs(cl.idle_timeout),
            "limits.write_timeout_ms" => ms(cl.write_timeout),
            "limits.cross_core_queue_depth" => Some(I(i64::from(l.cross_core_queue_depth))),
            "limits.max_pending_per_shard" => Some(I(i64::from(l.max_pending_per_shard))),
            "limits.max_assets_per_shard" => Some(I(l.max_assets_per_shard as i64)),
            "limits.rotation_id_retention_s" => secs(l.rotation_id_retention),
            "limits.rotation_ids_max_per_shard" => Some(I(i64::from(l.rotation_ids_max_per_shard))),
            "limits.rate_limit_buckets_per_shard" => {
                Some(I(i64::from(l.rate_limit_buckets_per_shard)))
            }
            // Seen through the roles of the role configs: every role's limit is the default
            // unless policy.rate_limits names the role.
            "limits.rate_limit" => text(&limit("au", Need::Status)?),
            "policy.rate_limits" => {
                let default = limit("au", Need::Status)?;
                let mut named = toml::Table::new();
                for (role, identity, need) in roles {
                    let l = limit(identity, need)?;
                    if l != default {
                        named.insert(role.into(), S(l));
                    }
                }
                Some(Table(named))
            }
            "audit.reconcile_records_per_s" => {
                Some(I(c.audit.reconcile_rate.map_or(0, |n| n as i64)))
            }
            "audit.reconcile_interval_s" => Some(I(c
                .audit
                .reconcile_interval
                .map_or(0, |d| d.as_secs() as i64))),
            "policy.regions" => Some(Array(
                c.policy.regions.iter().map(|r| S(r.clone())).collect(),
            )),
            "policy.admins" | "policy.operators" | "policy.auditors" | "policy.derivers" => {
                (access.identities() == 0).then(|| Array(Vec::new()))
            }
            "policy.asset_groups" => access
                .asset_groups()
                .is_empty()
                .then(|| Table(toml::Table::new())),
            _ => None,
        }
    }

    /// `store.postgres_host` as it would be written for `pg`'s hosts.
    fn postgres_host(pg: &PgConfig) -> String {
        let port = pg.hosts.first().map(|h| h.addr.port());
        let items: Vec<String> = pg
            .hosts
            .iter()
            .map(|h| match Some(h.addr.port()) == port {
                true => h.name.clone(),
                false => h.to_string(),
            })
            .collect();
        items.join(",")
    }

    #[test]
    fn every_default_in_keys_is_the_value_resolve_applies() {
        let roles = "[policy]\nadmins = [\"ad\"]\noperators = [\"op\"]\nauditors = [\"au\"]\nderivers = [{ identity = \"de\", purposes = [\"TRADING\"], regions = [\"APAC\"] }]\n";
        let configs = [
            MINIMAL.to_owned(),
            format!("{MINIMAL}\n[store]\nbackend = \"postgres\"\n[seal]\nprovider = \"shamir\"\n"),
            format!(
                "{MINIMAL}\n[seal]\nprovider = \"pkcs11\"\npkcs11_pin_env = \"HSM_PIN\"\n{roles}"
            ),
            format!("{MINIMAL}\n[seal]\nprovider = \"pkcs11\"\npkcs11_pin_credential = \"pin\"\n"),
        ];
        let mut checked = std::collections::BTreeSet::new();
        for text in &configs {
            let table = parse(text, "test.toml").unwrap();
            let c = resolve_text(text).unwrap();
            for row in KEYS {
                let Some(default) = row.default_value() else {
                    assert!(
                        row.default.starts_with("(required"),
                        "{}: default {} is not a TOML value",
                        row.key,
                        row.default
                    );
                    continue;
                };
                let (section, name) = row.key.split_once('.').unwrap();
                if table.get(section).and_then(|s| s.get(name)).is_some() {
                    continue;
                }
                if let Some(value) = applied(&c, row.key) {
                    assert_eq!(
                        value, default,
                        "{}: KEYS says {}, resolve applies {value}",
                        row.key, row.default
                    );
                    checked.insert(row.key);
                }
            }
        }
        for row in KEYS.iter().filter(|k| k.default_value().is_some()) {
            assert!(
                checked.contains(row.key),
                "{}: no config here shows its default",
                row.key
            );
        }
    }

    #[test]
    fn the_reference_config_is_valid_and_documents_every_key() {
        let text = include_str!("../../appliance/custody.toml");
        let table = parse(text, "custody.toml").unwrap();
        resolve(&table, Path::new("/etc/custody"), "custody.toml").unwrap();
        for k in KEYS {
            let (section, name) = k.key.split_once('.').unwrap();
            let written = table
                .get(section)
                .and_then(|s| s.as_table())
                .is_some_and(|s| s.contains_key(name));
            let commented =
                text.contains(&format!("# {name} = ")) || text.contains(&format!("{name} = "));
            assert!(
                written || commented,
                "appliance/custody.toml does not mention {}",
                k.key
            );
        }
    }
}
