//! Configuration: read in two stages, every problem reported with its key.
//!
//! Stage one parses the TOML as written (syntax only). Stage two resolves each key to a
//! typed value (defaults filled in, ranges and the caps of [`crate::bounds`] checked,
//! paths made absolute against the config file's directory) and checks the values against
//! each other. Unknown keys are problems too, so a typo never silently falls back to a
//! default. `appliance/custody.toml` documents every key and its default; the
//! [`KEYS`] table below is the single place each one is defined.

mod postgres;

pub use postgres::{PgConfig, PgSslMode, PgTls, PgTlsError};

use crate::bounds;
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

/// The seal settings before the state directory is known.
enum SealSpec {
    Dev(String),
    Pkcs11 {
        config: Pkcs11Config,
        sealed: String,
    },
    Shamir(String),
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
    /// Executors to run, one per core; resolved from 0 ("all") to the online core count.
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

/// A key of the configuration: where it lives, its default, and what it means.
pub struct KeyDoc {
    pub key: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

/// Every key, its default and its meaning: the reference config is checked against this.
pub const KEYS: &[KeyDoc] = &[
    KeyDoc { key: "server.listen", default: "\"127.0.0.1:7443\"", doc: "address every core listens on (SO_REUSEPORT)" },
    KeyDoc { key: "server.shard_listen", default: "\"\"", doc: "IP:port of the first per-shard port: shard i (core i) also listens on that IP at port + i, and HELLO announces the ports, so a shard-aware client (custody::client::ShardedClient) sends each asset's requests to the core that owns it and none crosses cores; plain clients keep using server.listen; \"\" = off" },
    KeyDoc { key: "server.admin_listen", default: "\"127.0.0.1:7480\"", doc: "address of the admin HTTP listener: GET /metrics (Prometheus), /healthz (alive: no core stuck), /readyz (unsealed, store taking commits); keep it on loopback or a management network; \"\" = off" },
    KeyDoc { key: "server.metrics_publish_ms", default: "1000", doc: "how often each core publishes its figures for /metrics and /healthz (a scrape sees figures at most this old; a core silent for 3 intervals, at least 2 s, fails /healthz); 50-60000" },
    KeyDoc { key: "server.shutdown_timeout_s", default: "20", doc: "on SIGTERM the listeners close and every connection answers what it already sent, then closes; past this many seconds (or on a second SIGTERM) the process exits at once with status 1, answering nothing more (nothing unanswered was acknowledged); keep systemd's TimeoutStopSec above it; 1-3600" },
    KeyDoc { key: "server.cores", default: "0", doc: "executors to run, one per core; 0 = every online core" },
    KeyDoc { key: "server.state_dir", default: "\"/var/lib/custody\"", doc: "directory for the store and the lock file" },
    KeyDoc { key: "server.log_level", default: "\"info\"", doc: "error, warn, info, debug or trace (debug: a line per answer, with the connection id and the client's request id; no level logs a seed, key, share or PIN)" },
    KeyDoc { key: "server.log_format", default: "\"text\"", doc: "text (key=value fields) or json (one object per line, for a log pipeline); both carry the connection id (`conn`) and identity of every event logged while serving a connection, and the request id of the events about one request" },
    KeyDoc { key: "server.stats_log_interval_s", default: "60", doc: "every this many seconds each shard logs its group-commit figures (batches, batch size and commit latency percentiles) at info level; 0 = never" },
    KeyDoc { key: "tls.cert", default: "(required)", doc: "server certificate chain, PEM" },
    KeyDoc { key: "tls.key", default: "(required unless tls.key_credential)", doc: "server private key, PEM (PKCS#8, SEC1 or PKCS#1); readable by the custody user only" },
    KeyDoc { key: "tls.key_credential", default: "\"\"", doc: "instead of tls.key: the name of a systemd credential holding the server key (LoadCredential=NAME:/etc/custody/tls.key), so the custody user never reads the key file itself; systemd copies it at start, so a new key takes a restart rather than a reload" },
    KeyDoc { key: "tls.client_ca", default: "(required)", doc: "CA bundle that client certificates must chain to, PEM" },
    KeyDoc { key: "tls.require_client_cert", default: "true", doc: "mutual TLS; false only for local experiments" },
    KeyDoc { key: "tls.identity", default: "\"cn\"", doc: "requester identity: \"cn\" (subject CN) or \"san\" (first DNS/URI SAN)" },
    KeyDoc { key: "tls.handshake_timeout_ms", default: "5000", doc: "a handshake slower than this is dropped" },
    KeyDoc { key: "store.backend", default: "\"sqlite\"", doc: "the store: \"sqlite\" (embedded) or \"postgres\" (production)" },
    KeyDoc { key: "store.sqlite_path", default: "\"custody.db\"", doc: "SQLite file, relative to server.state_dir" },
    KeyDoc { key: "store.postgres_host", default: "\"127.0.0.1\"", doc: "PostgreSQL host name or address" },
    KeyDoc { key: "store.postgres_port", default: "5432", doc: "PostgreSQL port" },
    KeyDoc { key: "store.postgres_dbname", default: "\"custody\"", doc: "database name" },
    KeyDoc { key: "store.postgres_user", default: "\"custody\"", doc: "database user" },
    KeyDoc { key: "store.postgres_password_file", default: "\"\"", doc: "file holding the password (relative to this file); never logged" },
    KeyDoc { key: "store.postgres_password_env", default: "\"\"", doc: "environment variable holding the password, if no file is given" },
    KeyDoc { key: "store.postgres_allow_unsafe_durability", default: "false", doc: "serve even if PostgreSQL has synchronous_commit or fsync off (throwaway databases only)" },
    KeyDoc { key: "store.postgres_owner_lease_ms", default: "10000", doc: "how long this appliance's claim on the database lasts without a heartbeat; a successor waits at most this long" },
    KeyDoc { key: "store.postgres_partition_check_s", default: "3600", doc: "how often the appliance makes the coming months' audit-log partitions (they are also made at start-up and by custodyd migrate)" },
    KeyDoc { key: "store.postgres_sslmode", default: "\"disable\"", doc: "TLS to PostgreSQL: \"disable\" (loopback or a private link only), \"require\" (encrypted, certificate not checked) or \"verify-full\" (certificate chains to postgres_sslrootcert and names postgres_host)" },
    KeyDoc { key: "store.postgres_sslrootcert", default: "\"\"", doc: "CA bundle (PEM) the server's certificate must chain to; required by \"verify-full\"" },
    KeyDoc { key: "store.commit_batch_records_max", default: "512", doc: "audit records per group commit, at most" },
    KeyDoc { key: "store.commit_batch_delay_us", default: "0", doc: "how long a shard holds a batch open for more records; 0 = commit as soon as the previous batch is durable" },
    KeyDoc { key: "store.commit_batches_inflight_max", default: "1", doc: "batches a shard may have waiting for the store at once" },
    KeyDoc { key: "store.commit_linger_us", default: "100", doc: "how long the commit thread waits for the shards of its last transaction to send their next batches, so they share one fsync" },
    KeyDoc { key: "store.commit_timeout_ms", default: "2000", doc: "a commit slower than this fails its requests with STORE_UNAVAILABLE" },
    KeyDoc { key: "store.commit_queue_depth", default: "0", doc: "batches waiting for the store's commit thread; 0 = cores x commit_batches_inflight_max" },
    KeyDoc { key: "seal.provider", default: "\"dev\"", doc: "where the root seed comes from: \"pkcs11\" (sealed by a key in an HSM; `custody init` makes the sealed file), \"shamir\" (starts sealed; operators submit k of n shares with `custody unseal`) or \"dev\" (a plain seed file, NOT for production)" },
    KeyDoc { key: "seal.cache_ttl_s", default: "300", doc: "the unsealed seed's keyed state is refreshed through the provider this often" },
    KeyDoc { key: "seal.max_stale_s", default: "600", doc: "while refreshes fail, the last key keeps serving this long past its TTL; then derivations answer SEALED" },
    KeyDoc { key: "seal.hsm_timeout_ms", default: "500", doc: "longest wait for one unseal call to the provider" },
    KeyDoc { key: "seal.breaker_failures", default: "3", doc: "unseal failures in a row that open the circuit breaker" },
    KeyDoc { key: "seal.breaker_open_ms", default: "5000", doc: "how long the open breaker waits before one probe call" },
    KeyDoc { key: "seal.sealed_seed_file", default: "\"sealed-seed.json\"", doc: "pkcs11 provider: the sealed seed `custody init` writes (mode 0600), relative to server.state_dir" },
    KeyDoc { key: "seal.pkcs11_module", default: "\"/usr/lib/softhsm/libsofthsm2.so\"", doc: "pkcs11 provider: the PKCS#11 module (shared library) of the HSM" },
    KeyDoc { key: "seal.pkcs11_token_label", default: "\"custody\"", doc: "pkcs11 provider: the label of the token that holds the wrapping key" },
    KeyDoc { key: "seal.pkcs11_key_label", default: "\"custody-seed-wrap\"", doc: "pkcs11 provider: the label of the AES-256 wrapping key (sensitive, not extractable)" },
    KeyDoc { key: "seal.pkcs11_pin_file", default: "\"\"", doc: "pkcs11 provider: file holding the user PIN (relative to this file); give exactly one PIN source" },
    KeyDoc { key: "seal.pkcs11_pin_env", default: "\"\"", doc: "pkcs11 provider: environment variable holding the user PIN" },
    KeyDoc { key: "seal.pkcs11_pin_credential", default: "\"\"", doc: "pkcs11 provider: name of a systemd credential (LoadCredential=) holding the user PIN" },
    KeyDoc { key: "seal.share_set_file", default: "\"share-set.json\"", doc: "shamir provider: the share set `custody init` writes (seed id, k, n, fingerprint; nothing secret), relative to server.state_dir" },
    KeyDoc { key: "seal.dev_seed_file", default: "\"dev-seed.bin\"", doc: "dev provider: 32-byte seed file (mode 0600), relative to server.state_dir" },
    KeyDoc { key: "limits.max_frame_body_bytes", default: "16384", doc: "largest frame body accepted; larger frames close the connection" },
    KeyDoc { key: "limits.max_inflight_per_connection", default: "1024", doc: "pipelined requests per connection; more are answered BUSY" },
    KeyDoc { key: "limits.max_connections_per_core", default: "4096", doc: "established (authenticated) connections each core holds; a connection past it is refused after its handshake with a CONNECTION_LIMIT frame; handshakes in progress have slots of their own (max_handshakes_per_core)" },
    KeyDoc { key: "limits.max_connections_per_identity", default: "1024", doc: "established connections one client identity with a role holds on one core; more get CONNECTION_LIMIT; below max_connections_per_core, so one identity never fills a core" },
    KeyDoc { key: "limits.max_connections_per_roleless_identity", default: "4", doc: "established connections one identity with no role in [policy] (it may only say HELLO and SEAL_STATUS) holds on one core; more get CONNECTION_LIMIT" },
    KeyDoc { key: "limits.max_roleless_connections_per_core", default: "64", doc: "established connections of all identities with no role together, on one core; more get CONNECTION_LIMIT; below max_connections_per_core, so they never take the slots of identities with a role" },
    KeyDoc { key: "limits.max_handshakes_per_core", default: "256", doc: "TLS handshakes in progress on one core, apart from the established connections' slots; when full, a new connection evicts the oldest handshake (a flood cycles through the table in moments while a real client's handshake completes)" },
    KeyDoc { key: "limits.max_handshakes_per_source", default: "16", doc: "TLS handshakes in progress from one source address (an IPv4 address, an IPv6 /64) on one core; more are closed at once, before TLS; below max_handshakes_per_core" },
    KeyDoc { key: "limits.frame_timeout_ms", default: "5000", doc: "once the first byte of a frame arrived, the whole frame must arrive within this, or the connection gets a FRAME_TIMEOUT frame and is closed (after answering what it already sent); 10-600000" },
    KeyDoc { key: "limits.idle_timeout_s", default: "300", doc: "a connection with no request in flight that sends nothing for this long is closed cleanly (TLS close_notify); a client that wants to keep a quiet connection sends HELLO more often (docs/protocol.md); 1-86400" },
    KeyDoc { key: "limits.write_timeout_ms", default: "10000", doc: "replies the client does not read within this (its receive window stays full) close the connection; 10-600000" },
    KeyDoc { key: "limits.cross_core_queue_depth", default: "4096", doc: "messages per channel between two cores; a full channel answers BUSY" },
    KeyDoc { key: "limits.max_pending_per_shard", default: "16384", doc: "requests a shard holds waiting for their commit; more are answered BUSY" },
    KeyDoc { key: "limits.max_assets_per_shard", default: "1000000", doc: "assets each shard's registry holds" },
    KeyDoc { key: "limits.rotation_id_retention_s", default: "86400", doc: "a rotation id is remembered this long: the same id sent again answers the first result instead of rotating again" },
    KeyDoc { key: "limits.rate_limit", default: "\"100/60s\"", doc: "requests each requester may make on each asset, as <requests>/<seconds>s (GCRA: that many at once, then one per period/requests); policy.rate_limits overrides it per role" },
    KeyDoc { key: "audit.reconcile_records_per_s", default: "50000", doc: "the appliance's reconciliation runs (periodic and on demand) read on average at most this many audit records a second since the run began, in pages of 5,000 (at least 5000), so that they take little of the cores the derive path runs on (a full run of N records takes N / this); it must stay above the rate records are written, or the periodic runs fall behind; 0 = as fast as the store answers (`custody reconcile --offline` is never paced)" },
    KeyDoc { key: "audit.reconcile_interval_s", default: "60", doc: "every this many seconds the appliance reconciles the audit records written since its last run (chain, checkpoints, counters; docs/audit.md) on a thread of its own; 0 = only on demand (`custody reconcile`)" },
    KeyDoc { key: "limits.rate_limit_buckets_per_shard", default: "100000", doc: "rate-limit buckets (requester, asset) each shard keeps; idle ones are dropped, and when all are busy a new caller is refused RATE_LIMITED" },
    KeyDoc { key: "limits.rotation_ids_max_per_shard", default: "100000", doc: "most rotation ids each shard remembers; past it the oldest are forgotten first" },
    KeyDoc { key: "policy.regions", default: "[\"US-EAST\", \"EU-WEST\", \"APAC\"]", doc: "compliance regions a derivation may name" },
    KeyDoc { key: "policy.admins", default: "[]", doc: "client identities with the admin role: `custody seal`, `custody unseal`, `custody retire`, `custody region enable|disable` and `custody policy reload` over the wire, and what operators may (none by default)" },
    KeyDoc { key: "policy.operators", default: "[]", doc: "client identities with the operator role: register, `custody rotate`, `custody suspend`, `custody resume`, and status (none by default)" },
    KeyDoc { key: "policy.auditors", default: "[]", doc: "client identities with the auditor role: status (none by default)" },
    KeyDoc { key: "policy.derivers", default: "[]", doc: "client identities with the deriver role, each `{ identity = \"…\", purposes = [\"TRADING\", …], regions = [\"US-EAST\", …] }` and optionally `asset_groups = [\"desk-fx\", …]`: it may derive only for those purposes and regions (and assets of those groups). An identity with no role is refused everything but HELLO and SEAL_STATUS" },
    KeyDoc { key: "policy.asset_groups", default: "{}", doc: "named sets of asset ids a deriver may be limited to, e.g. `{ desk-fx = [\"0b9f…\", …] }`; a deriver with `asset_groups = [\"desk-fx\"]` may derive only assets of those groups (at most 64 groups, 1,000,000 memberships in all)" },
    KeyDoc { key: "policy.rate_limits", default: "{}", doc: "per-role rate limits overriding limits.rate_limit, e.g. `{ auditor = \"10000/60s\" }`; roles: deriver, operator, admin, auditor" },
];

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

/// Stage one: the file as written.
pub fn parse(text: &str, file: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError {
        file: file.to_owned(),
        problems: vec![ConfigProblem {
            key: "(syntax)".into(),
            message: e.to_string().trim().replace('\n', " "),
        }],
    })
}

/// Reads and resolves a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        problems: vec![ConfigProblem {
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        }],
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    resolve(&parse(&text, &file)?, &base, &file)
}

/// Stage two: typed values, defaults, ranges, and checks across keys.
pub fn resolve(table: &toml::Table, base_dir: &Path, file: &str) -> Result<Config, ConfigError> {
    let mut r = Resolver {
        table,
        problems: Vec::new(),
        used: Vec::new(),
    };
    let listen =
        r.string("server.listen", "127.0.0.1:7443")
            .and_then(|s| match s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => r.problem("server.listen", format!("{s:?} is not IP:port ({e})")),
            });
    let online = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cores = r
        .int("server.cores", 0, 0, bounds::CORES_CAP as i64)
        .map(|n| if n == 0 { online } else { n as usize });
    let state_dir = r
        .string("server.state_dir", "/var/lib/custody")
        .map(|s| absolute(base_dir, &s));
    let log_level =
        r.string("server.log_level", "info")
            .and_then(|s| match s.parse::<tracing::Level>() {
                Ok(l) => Some(l),
                Err(_) => r.problem(
                    "server.log_level",
                    format!("{s:?} is not one of error, warn, info, debug, trace"),
                ),
            });
    let log_json = r
        .string("server.log_format", "text")
        .and_then(|s| match s.as_str() {
            "text" => Some(false),
            "json" => Some(true),
            _ => r.problem(
                "server.log_format",
                format!("{s:?} is not \"text\" or \"json\""),
            ),
        });
    let stats_interval = r
        .int("server.stats_log_interval_s", 60, 0, 86_400)
        .map(|s| (s > 0).then(|| Duration::from_secs(s as u64)));
    let admin_listen = r
        .string("server.admin_listen", "127.0.0.1:7480")
        .and_then(|s| {
            if s.is_empty() {
                return Some(None);
            }
            match s.parse::<SocketAddr>() {
                Ok(a) if Some(a) == listen => r.problem(
                    "server.admin_listen",
                    format!("{s:?} is server.listen's address too"),
                ),
                Ok(a) => Some(Some(a)),
                Err(e) => r.problem(
                    "server.admin_listen",
                    format!("{s:?} is not IP:port or \"\" ({e})"),
                ),
            }
        });
    let shard_listen = r.string("server.shard_listen", "").and_then(|s| {
        if s.is_empty() {
            return Some(None);
        }
        match s.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => r.problem(
                "server.shard_listen",
                format!("{s:?}: the ports are announced, so the first must be fixed (not 0)"),
            ),
            Ok(a) => Some(Some(a)),
            Err(e) => r.problem(
                "server.shard_listen",
                format!("{s:?} is not IP:port or \"\" ({e})"),
            ),
        }
    });
    let metrics_publish = r
        .int("server.metrics_publish_ms", 1000, 50, 60_000)
        .map(|ms| Duration::from_millis(ms as u64));
    let shutdown_timeout = r
        .int("server.shutdown_timeout_s", 20, 1, 3600)
        .map(|s| Duration::from_secs(s as u64));
    let reconcile_interval = r
        .int("audit.reconcile_interval_s", 60, 0, 86_400)
        .map(|s| (s > 0).then(|| Duration::from_secs(s as u64)));
    let reconcile_rate = r
        .int("audit.reconcile_records_per_s", 50_000, 0, 100_000_000)
        .and_then(|n| match n {
            0 => Some(None),
            // Below a page a second, one page would hold the auditor thread (and the
            // proofs and requests queued behind it) for seconds.
            n if n < bounds::RECONCILE_PAGE_RECORDS as i64 => r.problem(
                "audit.reconcile_records_per_s",
                format!(
                    "{n} is below {} (one page a second); 0 = unpaced",
                    bounds::RECONCILE_PAGE_RECORDS
                ),
            ),
            n => Some(Some(n as u64)),
        });

    let cert = r.required_path("tls.cert", base_dir);
    let key_credential = r.string("tls.key_credential", "").filter(|s| !s.is_empty());
    let key = match key_credential {
        Some(name) => {
            if r.raw("tls.key").is_some() {
                r.problem(
                    "tls.key",
                    "give the key one way only: tls.key or tls.key_credential".into(),
                )
            } else if name.contains('/') || name == "." || name == ".." {
                r.problem(
                    "tls.key_credential",
                    format!("{name:?} is not a credential name (no '/')"),
                )
            } else {
                Some(KeySource::Credential(name))
            }
        }
        None => r.required_path("tls.key", base_dir).map(KeySource::File),
    };
    let client_ca = r.required_path("tls.client_ca", base_dir);
    let require_client_cert = r.bool("tls.require_client_cert", true);
    let identity = r
        .string("tls.identity", "cn")
        .and_then(|s| match s.as_str() {
            "cn" => Some(IdentitySource::CommonName),
            "san" => Some(IdentitySource::SubjectAltName),
            _ => r.problem("tls.identity", format!("{s:?} is not \"cn\" or \"san\"")),
        });
    let handshake_timeout = r
        .int("tls.handshake_timeout_ms", 5000, 10, 120_000)
        .map(|ms| Duration::from_millis(ms as u64));

    let backend_name = r.string("store.backend", "sqlite");
    let sqlite_path = r.string("store.sqlite_path", "custody.db");
    let pg_host = r.string("store.postgres_host", "127.0.0.1");
    let pg_port = r.int("store.postgres_port", 5432, 1, 65_535);
    let pg_dbname = r.string("store.postgres_dbname", "custody");
    let pg_user = r.string("store.postgres_user", "custody");
    let pg_password_file = r.string("store.postgres_password_file", "");
    let pg_password_env = r.string("store.postgres_password_env", "");
    let pg_sslmode = r.string("store.postgres_sslmode", "disable");
    let pg_sslrootcert = r.string("store.postgres_sslrootcert", "");
    let pg_partition_check = r
        .int("store.postgres_partition_check_s", 3600, 1, 86_400)
        .map(|s| Duration::from_secs(s as u64));
    let pg_unsafe = r.bool("store.postgres_allow_unsafe_durability", false);
    let pg_lease = r
        .int("store.postgres_owner_lease_ms", 10_000, 500, 600_000)
        .map(|ms| Duration::from_millis(ms as u64));
    let store_spec: Option<StoreSpec> = match backend_name.as_deref() {
        None => None,
        Some("sqlite") => sqlite_path.map(StoreSpec::Sqlite),
        Some("postgres") => {
            let tls = match (pg_sslmode.as_deref(), &pg_host, pg_sslrootcert.as_deref()) {
                (Some(mode), Some(host), Some(root)) => match PgSslMode::parse(mode) {
                    None => r.problem(
                        "store.postgres_sslmode",
                        format!("{mode:?} is not \"disable\", \"require\" or \"verify-full\""),
                    ),
                    Some(mode) => {
                        let root = (!root.is_empty()).then(|| absolute(base_dir, root));
                        match PgTls::new(mode, host, root.as_deref()) {
                            Ok(tls) => Some(tls),
                            Err(e @ PgTlsError::ServerName(_)) => {
                                r.problem("store.postgres_host", e.to_string())
                            }
                            Err(e) => r.problem("store.postgres_sslrootcert", e.to_string()),
                        }
                    }
                },
                _ => None,
            };
            let addr = match (&pg_host, pg_port) {
                (Some(host), Some(port)) => {
                    use std::net::ToSocketAddrs;
                    match (host.as_str(), port as u16)
                        .to_socket_addrs()
                        .map(|mut a| a.next())
                    {
                        Ok(Some(addr)) => Some(addr),
                        Ok(None) | Err(_) => r.problem(
                            "store.postgres_host",
                            format!("{host:?} does not resolve to an address"),
                        ),
                    }
                }
                _ => None,
            };
            let password = match (pg_password_file.as_deref(), pg_password_env.as_deref()) {
                (Some(""), Some("")) => Some(None),
                (Some(file), _) if !file.is_empty() => {
                    let path = absolute(base_dir, file);
                    match std::fs::read_to_string(&path) {
                        Ok(text) => Some(Some(zeroize::Zeroizing::new(
                            text.trim_end_matches(['\r', '\n']).to_owned(),
                        ))),
                        Err(e) => r.problem(
                            "store.postgres_password_file",
                            format!("cannot read {}: {e}", path.display()),
                        ),
                    }
                }
                (_, Some(var)) if !var.is_empty() => match std::env::var(var) {
                    Ok(p) => Some(Some(zeroize::Zeroizing::new(p))),
                    Err(_) => r.problem(
                        "store.postgres_password_env",
                        format!("environment variable {var} is not set"),
                    ),
                },
                _ => None,
            };
            match (
                addr,
                pg_dbname,
                pg_user,
                password,
                pg_unsafe,
                pg_lease,
                tls,
                pg_partition_check,
            ) {
                (
                    Some(addr),
                    Some(dbname),
                    Some(user),
                    Some(password),
                    Some(unsafe_ok),
                    Some(lease),
                    Some(tls),
                    Some(partition_check),
                ) => Some(StoreSpec::Postgres(PgConfig {
                    addr,
                    dbname,
                    user,
                    password,
                    allow_unsafe_durability: unsafe_ok,
                    owner_lease: lease,
                    tls,
                    partition_check,
                })),
                _ => None,
            }
        }
        Some(other) => r.problem(
            "store.backend",
            format!("{other:?} is not a store this build has (\"sqlite\" or \"postgres\")"),
        ),
    };
    let batch_max = r.int(
        "store.commit_batch_records_max",
        512,
        1,
        i64::from(bounds::COMMIT_BATCH_RECORDS_CAP),
    );
    let batch_delay = r
        .int(
            "store.commit_batch_delay_us",
            0,
            0,
            bounds::COMMIT_BATCH_DELAY_US_CAP as i64,
        )
        .map(|us| Duration::from_micros(us as u64));
    let inflight_batches = r.int(
        "store.commit_batches_inflight_max",
        1,
        1,
        bounds::COMMIT_BATCHES_INFLIGHT_CAP as i64,
    );
    let linger = r
        .int(
            "store.commit_linger_us",
            100,
            0,
            bounds::COMMIT_LINGER_US_CAP as i64,
        )
        .map(|us| Duration::from_micros(us as u64));
    let commit_timeout = r
        .int("store.commit_timeout_ms", 2000, 1, 600_000)
        .map(|ms| Duration::from_millis(ms as u64));
    let queue_depth = r.int("store.commit_queue_depth", 0, 0, 65_536);

    let seal_provider = r.string("seal.provider", "dev");
    let dev_seed_file = r.string("seal.dev_seed_file", "dev-seed.bin");
    let sealed_seed_file = r.string("seal.sealed_seed_file", "sealed-seed.json");
    let share_set_file = r.string("seal.share_set_file", "share-set.json");
    let seal_timing = match (
        r.int("seal.cache_ttl_s", 300, 1, 86_400),
        r.int("seal.max_stale_s", 600, 0, 86_400),
        r.int("seal.hsm_timeout_ms", 500, 10, 60_000),
        r.int("seal.breaker_failures", 3, 1, 100),
        r.int("seal.breaker_open_ms", 5000, 10, 600_000),
    ) {
        (Some(ttl), Some(stale), Some(timeout), Some(failures), Some(open)) => Some(CacheTiming {
            ttl: Duration::from_secs(ttl as u64),
            hsm_timeout: Duration::from_millis(timeout as u64),
            max_stale: Duration::from_secs(stale as u64),
            breaker_failures: failures as u32,
            breaker_open: Duration::from_millis(open as u64),
        }),
        _ => None,
    };
    let p11_module = r.string("seal.pkcs11_module", "/usr/lib/softhsm/libsofthsm2.so");
    let p11_token = r.string("seal.pkcs11_token_label", "custody");
    let p11_key = r.string("seal.pkcs11_key_label", "custody-seed-wrap");
    let p11_pin_file = r.string("seal.pkcs11_pin_file", "");
    let p11_pin_env = r.string("seal.pkcs11_pin_env", "");
    let p11_pin_credential = r.string("seal.pkcs11_pin_credential", "");
    let seal_spec: Option<SealSpec> = match seal_provider.as_deref() {
        None => None,
        Some("dev") => dev_seed_file.map(SealSpec::Dev),
        Some("shamir") => match share_set_file {
            Some(f) if f.is_empty() => r.problem("seal.share_set_file", "must not be empty".into()),
            other => other.map(SealSpec::Shamir),
        },
        Some("pkcs11") => {
            let pins: Vec<(&'static str, String)> = [
                ("seal.pkcs11_pin_file", p11_pin_file),
                ("seal.pkcs11_pin_env", p11_pin_env),
                ("seal.pkcs11_pin_credential", p11_pin_credential),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.filter(|v| !v.is_empty()).map(|v| (k, v)))
            .collect();
            let pin = match pins.as_slice() {
                [("seal.pkcs11_pin_file", f)] => Some(PinSource::File(absolute(base_dir, f))),
                [("seal.pkcs11_pin_env", v)] => Some(PinSource::Env(v.clone())),
                [(_, name)] => Some(PinSource::Credential(name.clone())),
                [] => r.problem(
                    "seal.pkcs11_pin_file",
                    "the pkcs11 provider needs the PIN from one of pkcs11_pin_file, pkcs11_pin_env or pkcs11_pin_credential".into(),
                ),
                _ => r.problem(
                    "seal.pkcs11_pin_file",
                    "give the PIN one way only: pkcs11_pin_file, pkcs11_pin_env or pkcs11_pin_credential".into(),
                ),
            };
            for (key, value) in [
                ("seal.pkcs11_token_label", &p11_token),
                ("seal.pkcs11_key_label", &p11_key),
                ("seal.pkcs11_module", &p11_module),
                ("seal.sealed_seed_file", &sealed_seed_file),
            ] {
                if value.as_deref() == Some("") {
                    r.problem::<()>(key, "must not be empty".into());
                }
            }
            match (p11_module, p11_token, p11_key, pin, sealed_seed_file) {
                (Some(module), Some(token_label), Some(key_label), Some(pin), Some(sealed))
                    if !module.is_empty()
                        && !token_label.is_empty()
                        && !key_label.is_empty()
                        && !sealed.is_empty() =>
                {
                    Some(SealSpec::Pkcs11 {
                        config: Pkcs11Config {
                            module: absolute(base_dir, &module),
                            token_label,
                            key_label,
                            pin,
                        },
                        sealed,
                    })
                }
                _ => None,
            }
        }
        Some(other) => r.problem(
            "seal.provider",
            format!("{other:?} is not a seal provider this build has (\"pkcs11\", \"shamir\" or \"dev\")"),
        ),
    };

    let max_frame = r.int(
        "limits.max_frame_body_bytes",
        16_384,
        256,
        i64::from(bounds::FRAME_BODY_BYTES_CAP),
    );
    let connection = resolve_connection_limits(&mut r);
    let cross_depth = r.int(
        "limits.cross_core_queue_depth",
        4096,
        1,
        i64::from(bounds::CROSS_CORE_QUEUE_DEPTH_CAP),
    );
    let pending_max = r.int(
        "limits.max_pending_per_shard",
        16_384,
        1,
        i64::from(bounds::PENDING_PER_SHARD_CAP),
    );
    let assets_max = r.int(
        "limits.max_assets_per_shard",
        1_000_000,
        1,
        bounds::ASSETS_CAP as i64,
    );

    let rotation_retention = r.int("limits.rotation_id_retention_s", 86_400, 60, 30 * 86_400);
    let rotation_ids_max = r.int(
        "limits.rotation_ids_max_per_shard",
        100_000,
        1,
        bounds::ROTATION_IDS_PER_SHARD_CAP as i64,
    );

    let regions = r.string_list("policy.regions", &["US-EAST", "EU-WEST", "APAC"]);
    if let Some(list) = &regions {
        if list.is_empty() || list.len() > bounds::REGIONS_MAX {
            r.problem::<()>(
                "policy.regions",
                format!("must name between 1 and {} regions", bounds::REGIONS_MAX),
            );
        }
        for (i, name) in list.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() <= bounds::REGION_TEXT_BYTES_MAX
                && name.bytes().all(|b| (0x21..=0x7e).contains(&b));
            if !ok {
                r.problem::<()>(
                    "policy.regions",
                    format!(
                        "{name:?}: a region is 1-{} printable ASCII characters without spaces",
                        bounds::REGION_TEXT_BYTES_MAX
                    ),
                );
            }
            if list[..i].contains(name) {
                r.problem::<()>("policy.regions", format!("{name:?} is listed twice"));
            }
        }
    }

    let admins = r.string_list("policy.admins", &[]);
    let operators = r.string_list("policy.operators", &[]);
    let auditors = r.string_list("policy.auditors", &[]);
    for (key, names) in [
        ("policy.admins", &admins),
        ("policy.operators", &operators),
        ("policy.auditors", &auditors),
    ] {
        if let Some(list) = names {
            for (i, name) in list.iter().enumerate() {
                if name.is_empty() || list[..i].contains(name) {
                    r.problem::<()>(key, format!("{name:?}: empty or listed twice"));
                }
            }
        }
    }

    let default_limit = match r.string("limits.rate_limit", "100/60s") {
        Some(text) => match crate::ratelimit::RateLimit::parse(&text) {
            Ok(l) => Some(l),
            Err(e) => r.problem("limits.rate_limit", e),
        },
        None => None,
    };
    let buckets = r.int(
        "limits.rate_limit_buckets_per_shard",
        100_000,
        1,
        bounds::RATE_LIMIT_BUCKETS_PER_SHARD_CAP as i64,
    );
    let role_limits = r.rate_limits("policy.rate_limits", default_limit);
    let groups = r.asset_groups("policy.asset_groups");
    let derivers = r.derivers(
        "policy.derivers",
        regions.as_deref().unwrap_or(&[]),
        groups.as_ref(),
    );
    let access = match (
        &admins,
        &operators,
        &auditors,
        derivers,
        role_limits,
        groups,
        &regions,
    ) {
        (
            Some(admins),
            Some(operators),
            Some(auditors),
            Some(derivers),
            Some(limits),
            Some(groups),
            Some(regions),
        ) => {
            let mut grants: std::collections::HashMap<String, crate::policy::Grants> =
                std::collections::HashMap::new();
            for (identity, d) in derivers {
                grants.entry(identity).or_default().deriver = Some(d);
            }
            for a in admins {
                grants.entry(a.clone()).or_default().admin = true;
            }
            for o in operators {
                grants.entry(o.clone()).or_default().operator = true;
            }
            for a in auditors {
                grants.entry(a.clone()).or_default().auditor = true;
            }
            Some(
                crate::policy::AccessPolicy::new(grants, limits)
                    .with_asset_groups(groups)
                    .with_regions(crate::policy::RegionTable::in_order(regions)),
            )
        }
        _ => None,
    };

    r.unknown_keys();

    // Cross-key checks, only when the keys involved resolved.
    if let (Some(batch), Some(pending)) = (batch_max, pending_max) {
        if batch > pending {
            r.problem::<()>(
                "store.commit_batch_records_max",
                format!("{batch} exceeds limits.max_pending_per_shard ({pending}): batches could never fill"),
            );
        }
    }
    if let (Some(depth), Some(cores), Some(inflight)) = (queue_depth, cores, inflight_batches) {
        let needed = cores as i64 * inflight;
        if depth != 0 && depth < needed {
            r.problem::<()>(
                "store.commit_queue_depth",
                format!("{depth} is below server.cores x store.commit_batches_inflight_max ({needed}): shards would find the queue full"),
            );
        }
    }
    if let (Some(timeout), Some(delay)) = (commit_timeout, batch_delay) {
        if delay >= timeout {
            r.problem::<()>(
                "store.commit_batch_delay_us",
                "must be shorter than store.commit_timeout_ms".into(),
            );
        }
    }
    if let (Some(false), Some(_)) = (require_client_cert, identity) {
        tracing::warn!("tls.require_client_cert = false: requests are attributed to \"anonymous\"");
    }

    if !r.problems.is_empty() {
        return Err(ConfigError {
            file: file.to_owned(),
            problems: r.problems,
        });
    }
    let (
        Some(listen),
        Some(cores),
        Some(state_dir),
        Some(log_level),
        Some(log_json),
        Some(cert),
        Some(key),
        Some(client_ca),
        Some(require_client_cert),
        Some(identity),
        Some(handshake_timeout),
        Some(store_spec),
        Some(batch_max),
        Some(batch_delay),
        Some(inflight_batches),
        Some(linger),
        Some(commit_timeout),
        Some(queue_depth),
        Some(seal_spec),
        Some(seal_timing),
        Some(max_frame),
        Some(connection),
        Some(cross_depth),
        Some(pending_max),
        Some(assets_max),
        Some(regions),
        Some(access),
        Some(buckets),
        Some(rotation_retention),
        Some(rotation_ids_max),
        Some(stats_log_interval),
        Some(admin_listen),
        Some(shard_listen),
        Some(metrics_publish),
        Some(shutdown_timeout),
        Some(reconcile_interval),
        Some(reconcile_rate),
    ) = (
        listen,
        cores,
        state_dir,
        log_level,
        log_json,
        cert,
        key,
        client_ca,
        require_client_cert,
        identity,
        handshake_timeout,
        store_spec,
        batch_max,
        batch_delay,
        inflight_batches,
        linger,
        commit_timeout,
        queue_depth,
        seal_spec,
        seal_timing,
        max_frame,
        connection,
        cross_depth,
        pending_max,
        assets_max,
        regions,
        access,
        buckets,
        rotation_retention,
        rotation_ids_max,
        stats_interval,
        admin_listen,
        shard_listen,
        metrics_publish,
        shutdown_timeout,
        reconcile_interval,
        reconcile_rate,
    )
    else {
        // Every None above recorded a problem, so this is unreachable; report it anyway.
        return Err(ConfigError {
            file: file.to_owned(),
            problems: vec![ConfigProblem {
                key: "(internal)".into(),
                message: "a key failed to resolve without a reported problem".into(),
            }],
        });
    };
    Ok(Config {
        server: Server {
            listen,
            cores,
            state_dir: state_dir.clone(),
            log_level,
            log_json,
            stats_log_interval,
            admin_listen,
            shard_listen,
            metrics_publish,
            shutdown_timeout,
        },
        tls: Tls {
            cert,
            key,
            client_ca,
            require_client_cert,
            identity,
            handshake_timeout,
        },
        store: StoreConfig {
            backend: match store_spec {
                StoreSpec::Sqlite(path) => StoreBackend::Sqlite {
                    path: absolute(&state_dir, &path),
                },
                StoreSpec::Postgres(pg) => StoreBackend::Postgres(pg),
            },
            commit_batch_records_max: batch_max as usize,
            commit_batch_delay: batch_delay,
            commit_batches_inflight_max: inflight_batches as usize,
            commit_linger: linger,
            commit_timeout,
            commit_queue_depth: if queue_depth == 0 {
                cores * inflight_batches as usize
            } else {
                queue_depth as usize
            },
        },
        seal: match seal_spec {
            SealSpec::Dev(file) => SealConfig::Dev {
                seed_file: absolute(&state_dir, &file),
            },
            SealSpec::Pkcs11 { config, sealed } => SealConfig::Pkcs11 {
                pkcs11: config,
                sealed_seed_file: absolute(&state_dir, &sealed),
            },
            SealSpec::Shamir(file) => SealConfig::Shamir {
                share_set_file: absolute(&state_dir, &file),
            },
        },
        seal_timing,
        limits: Limits {
            max_frame_body_bytes: max_frame as u32,
            connection,
            cross_core_queue_depth: cross_depth as u32,
            max_pending_per_shard: pending_max as u32,
            max_assets_per_shard: assets_max as u64,
            rotation_id_retention: Duration::from_secs(rotation_retention as u64),
            rotation_ids_max_per_shard: rotation_ids_max as u32,
            rate_limit_buckets_per_shard: buckets as u32,
        },
        policy: Policy { regions, access },
        audit: AuditConfig {
            reconcile_interval,
            reconcile_rate,
        },
    })
}

/// `[limits]`' connection bounds, with the checks that make them mean what they say: each
/// per-identity and per-source bound below the core's, so that no one identity or source
/// can fill a core.
fn resolve_connection_limits(r: &mut Resolver<'_>) -> Option<ConnectionLimits> {
    let count = |r: &mut Resolver<'_>, key, default, cap: u32| {
        r.int(key, default, 1, i64::from(cap)).map(|n| n as u32)
    };
    let per_core = count(
        r,
        "limits.max_connections_per_core",
        4096,
        bounds::CONNECTIONS_PER_CORE_CAP,
    );
    let inflight = count(
        r,
        "limits.max_inflight_per_connection",
        1024,
        bounds::INFLIGHT_PER_CONNECTION_CAP,
    );
    let per_identity = count(
        r,
        "limits.max_connections_per_identity",
        1024,
        bounds::CONNECTIONS_PER_CORE_CAP,
    );
    let per_roleless = count(
        r,
        "limits.max_connections_per_roleless_identity",
        4,
        bounds::CONNECTIONS_PER_CORE_CAP,
    );
    let roleless = count(
        r,
        "limits.max_roleless_connections_per_core",
        64,
        bounds::CONNECTIONS_PER_CORE_CAP,
    );
    let handshakes = count(
        r,
        "limits.max_handshakes_per_core",
        256,
        bounds::HANDSHAKES_PER_CORE_CAP,
    );
    let per_source = count(
        r,
        "limits.max_handshakes_per_source",
        16,
        bounds::HANDSHAKES_PER_CORE_CAP,
    );
    let ms = |r: &mut Resolver<'_>, key, default, min, max| {
        r.int(key, default, min, max)
            .map(|n| Duration::from_millis(n as u64))
    };
    let frame_timeout = ms(r, "limits.frame_timeout_ms", 5000, 10, 600_000);
    let idle_timeout = r
        .int("limits.idle_timeout_s", 300, 1, 86_400)
        .map(|s| Duration::from_secs(s as u64));
    let write_timeout = ms(r, "limits.write_timeout_ms", 10_000, 10, 600_000);
    let (per_core, per_identity, per_roleless, roleless, handshakes, per_source) = (
        per_core?,
        per_identity?,
        per_roleless?,
        roleless?,
        handshakes?,
        per_source?,
    );
    let below = |r: &mut Resolver<'_>, key: &'static str, n: u32, bound: &str, of: u32| {
        if n >= of && of > 1 {
            r.problem::<()>(key, format!("{n} must be below {bound} ({of}), so that no one identity or source can take all of a core's slots"));
        }
    };
    below(
        r,
        "limits.max_connections_per_identity",
        per_identity,
        "limits.max_connections_per_core",
        per_core,
    );
    below(
        r,
        "limits.max_roleless_connections_per_core",
        roleless,
        "limits.max_connections_per_core",
        per_core,
    );
    below(
        r,
        "limits.max_handshakes_per_source",
        per_source,
        "limits.max_handshakes_per_core",
        handshakes,
    );
    if per_roleless > roleless {
        r.problem::<()>(
            "limits.max_connections_per_roleless_identity",
            format!(
                "{per_roleless} is above limits.max_roleless_connections_per_core ({roleless})"
            ),
        );
    }
    Some(ConnectionLimits {
        max_connections_per_core: per_core,
        max_inflight_per_connection: inflight?,
        max_connections_per_identity: per_identity,
        max_connections_per_roleless_identity: per_roleless,
        max_roleless_connections_per_core: roleless,
        max_handshakes_per_core: handshakes,
        max_handshakes_per_source: per_source,
        frame_timeout: frame_timeout?,
        idle_timeout: idle_timeout?,
        write_timeout: write_timeout?,
    })
}

/// The store as written, before paths are made absolute.
enum StoreSpec {
    Sqlite(String),
    Postgres(PgConfig),
}

fn absolute(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

struct Resolver<'a> {
    table: &'a toml::Table,
    problems: Vec<ConfigProblem>,
    used: Vec<&'static str>,
}

impl Resolver<'_> {
    fn problem<T>(&mut self, key: &str, message: String) -> Option<T> {
        self.problems.push(ConfigProblem {
            key: key.to_owned(),
            message,
        });
        None
    }

    /// The value at `section.key`, if written.
    fn raw(&mut self, key: &'static str) -> Option<&toml::Value> {
        debug_assert!(KEYS.iter().any(|k| k.key == key), "undocumented key {key}");
        self.used.push(key);
        let (section, name) = key.split_once('.')?;
        self.table.get(section)?.as_table()?.get(name)
    }

    fn string(&mut self, key: &'static str, default: &str) -> Option<String> {
        match self.raw(key).cloned() {
            None => Some(default.to_owned()),
            Some(toml::Value::String(s)) => Some(s),
            Some(v) => self.problem(key, format!("expected a string, found {}", v.type_str())),
        }
    }

    fn required_path(&mut self, key: &'static str, base: &Path) -> Option<PathBuf> {
        match self.raw(key).cloned() {
            None => self.problem(key, "is required".into()),
            Some(toml::Value::String(s)) if !s.is_empty() => Some(absolute(base, &s)),
            Some(v) => self.problem(key, format!("expected a file path, found {v}")),
        }
    }

    fn bool(&mut self, key: &'static str, default: bool) -> Option<bool> {
        match self.raw(key).cloned() {
            None => Some(default),
            Some(toml::Value::Boolean(b)) => Some(b),
            Some(v) => self.problem(key, format!("expected true or false, found {v}")),
        }
    }

    fn int(&mut self, key: &'static str, default: i64, min: i64, max: i64) -> Option<i64> {
        match self.raw(key).cloned() {
            None => Some(default),
            Some(toml::Value::Integer(n)) if (min..=max).contains(&n) => Some(n),
            Some(toml::Value::Integer(n)) => {
                self.problem(key, format!("{n} is outside {min}..={max}"))
            }
            Some(v) => self.problem(key, format!("expected an integer, found {}", v.type_str())),
        }
    }

    fn string_list(&mut self, key: &'static str, default: &[&str]) -> Option<Vec<String>> {
        match self.raw(key).cloned() {
            None => Some(default.iter().map(|s| s.to_string()).collect()),
            Some(toml::Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        toml::Value::String(s) => out.push(s),
                        other => {
                            return self.problem(
                                key,
                                format!("expected strings, found {}", other.type_str()),
                            )
                        }
                    }
                }
                Some(out)
            }
            Some(v) => self.problem(
                key,
                format!("expected a list of strings, found {}", v.type_str()),
            ),
        }
    }

    /// `policy.rate_limits`: a table of role name → "<requests>/<seconds>s"; every role
    /// not named gets `default` (in the order of [`crate::policy::Role::ALL`]).
    fn rate_limits(
        &mut self,
        key: &'static str,
        default: Option<crate::ratelimit::RateLimit>,
    ) -> Option<[crate::ratelimit::RateLimit; 4]> {
        use crate::policy::Role;
        let default = default?;
        let mut out = [default; 4];
        let table = match self.raw(key).cloned() {
            None => return Some(out),
            Some(toml::Value::Table(t)) => t,
            Some(v) => {
                return self.problem(
                    key,
                    format!(
                        "expected a table of role = \"N/Ss\", found {}",
                        v.type_str()
                    ),
                )
            }
        };
        let mut ok = true;
        for (role, value) in table {
            let Some(r) = Role::ALL.into_iter().find(|r| r.name() == role) else {
                self.problem::<()>(
                    key,
                    format!("{role:?} is not a role (deriver, operator, admin, auditor)"),
                );
                ok = false;
                continue;
            };
            match value.as_str().map(crate::ratelimit::RateLimit::parse) {
                Some(Ok(l)) => out[r as usize] = l,
                Some(Err(e)) => {
                    self.problem::<()>(key, format!("{role}: {e}"));
                    ok = false;
                }
                None => {
                    self.problem::<()>(key, format!("{role}: expected a string like \"100/60s\""));
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// `policy.asset_groups`: a table of group name → list of asset ids (RFC 4122 UUIDs),
    /// within [`bounds::ASSET_GROUPS_MAX`] groups and [`bounds::ASSET_GROUP_MEMBERS_MAX`]
    /// memberships.
    fn asset_groups(&mut self, key: &'static str) -> Option<crate::policy::AssetGroups> {
        let table = match self.raw(key).cloned() {
            None => return Some(crate::policy::AssetGroups::default()),
            Some(toml::Value::Table(t)) => t,
            Some(v) => {
                return self.problem(
                    key,
                    format!(
                        "expected a table of group = [asset ids], found {}",
                        v.type_str()
                    ),
                )
            }
        };
        if table.len() > bounds::ASSET_GROUPS_MAX {
            return self.problem(
                key,
                format!(
                    "{} groups: at most {} may be defined",
                    table.len(),
                    bounds::ASSET_GROUPS_MAX
                ),
            );
        }
        let members: usize = table
            .values()
            .map(|v| v.as_array().map_or(0, |a| a.len()))
            .sum();
        if members > bounds::ASSET_GROUP_MEMBERS_MAX {
            return self.problem(
                key,
                format!(
                    "{members} memberships: at most {} may be listed",
                    bounds::ASSET_GROUP_MEMBERS_MAX
                ),
            );
        }
        let mut ok = true;
        let mut groups = Vec::with_capacity(table.len());
        for (name, value) in table {
            let at = format!("{key}.{name}");
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !name_ok {
                self.problem::<()>(
                    &at,
                    "a group name is 1-64 characters of A-Z, a-z, 0-9, '-', '_' and '.'".into(),
                );
                ok = false;
            }
            let Some(items) = value.as_array() else {
                self.problem::<()>(
                    &at,
                    format!("expected a list of asset ids, found {}", value.type_str()),
                );
                ok = false;
                continue;
            };
            let mut assets = Vec::with_capacity(items.len());
            for item in items {
                let parsed = item
                    .as_str()
                    .and_then(|t| uuid::Uuid::parse_str(t).ok())
                    .filter(|u| crate::policy::check_asset_id(u).is_ok());
                match parsed {
                    Some(u) => assets.push(u),
                    None => {
                        self.problem::<()>(
                            &at,
                            format!("{item}: not an RFC 4122 asset id (a UUID, variant 10, version 1-8)"),
                        );
                        ok = false;
                    }
                }
            }
            groups.push((name, assets));
        }
        ok.then(|| crate::policy::AssetGroups::new(groups))
    }

    /// `policy.derivers`: a list of `{ identity, purposes, regions, asset_groups? }`;
    /// every purpose a known one, every region a configured one, every group a defined
    /// one, no identity twice.
    fn derivers(
        &mut self,
        key: &'static str,
        configured: &[String],
        groups: Option<&crate::policy::AssetGroups>,
    ) -> Option<Vec<(String, crate::policy::DeriverGrant)>> {
        let items = match self.raw(key).cloned() {
            None => return Some(Vec::new()),
            Some(toml::Value::Array(items)) => items,
            Some(v) => {
                return self.problem(
                    key,
                    format!("expected a list of tables, found {}", v.type_str()),
                )
            }
        };
        let mut out: Vec<(String, crate::policy::DeriverGrant)> = Vec::new();
        let mut ok = true;
        for (i, item) in items.into_iter().enumerate() {
            let at = format!("{key}[{i}]");
            let Some(t) = item.as_table() else {
                self.problem::<()>(
                    &at,
                    "expected a table { identity, purposes, regions }".into(),
                );
                ok = false;
                continue;
            };
            if let Some(extra) = t.keys().find(|k| {
                !["identity", "purposes", "regions", "asset_groups"].contains(&k.as_str())
            }) {
                self.problem::<()>(
                    &at,
                    format!("unknown field {extra:?} (identity, purposes, regions, asset_groups)"),
                );
                ok = false;
            }
            let identity = t
                .get("identity")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned();
            if identity.is_empty() || out.iter().any(|(id, _)| *id == identity) {
                self.problem::<()>(
                    &at,
                    format!("identity {identity:?}: missing, empty or listed twice"),
                );
                ok = false;
            }
            let strings = |field: &str| -> Option<Vec<String>> {
                t.get(field)?
                    .as_array()?
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect()
            };
            let mut purposes = Vec::new();
            match strings("purposes") {
                Some(list) if !list.is_empty() => {
                    for name in list {
                        match crate::policy::Purpose::from_name(&name) {
                            Some(p) if !purposes.contains(&p) => purposes.push(p),
                            Some(_) => {}
                            None => {
                                self.problem::<()>(&at, format!("purpose {name:?} is not TRADING, SETTLEMENT, AUDIT or BACKUP"));
                                ok = false;
                            }
                        }
                    }
                }
                _ => {
                    self.problem::<()>(
                        &at,
                        "purposes: a non-empty list of purpose names is required".into(),
                    );
                    ok = false;
                }
            }
            let regions = match strings("regions") {
                Some(list) if !list.is_empty() => {
                    for name in &list {
                        if !configured.contains(name) {
                            self.problem::<()>(
                                &at,
                                format!("region {name:?} is not in policy.regions"),
                            );
                            ok = false;
                        }
                    }
                    list
                }
                _ => {
                    self.problem::<()>(
                        &at,
                        "regions: a non-empty list of configured regions is required".into(),
                    );
                    ok = false;
                    Vec::new()
                }
            };
            let asset_groups = match t.get("asset_groups") {
                None => None,
                Some(_) => match (strings("asset_groups"), groups) {
                    (Some(names), Some(groups)) if !names.is_empty() => match groups.mask(&names) {
                        Ok(mask) => Some((names, mask)),
                        Err(unknown) => {
                            self.problem::<()>(
                                &at,
                                format!("asset group {unknown:?} is not in policy.asset_groups"),
                            );
                            ok = false;
                            None
                        }
                    },
                    // The groups themselves are wrong (reported there): still name a group
                    // that is not even defined, so every problem is listed at once.
                    (Some(names), None) if !names.is_empty() => {
                        let defined: Vec<String> = match self.raw("policy.asset_groups") {
                            Some(toml::Value::Table(t)) => t.keys().cloned().collect(),
                            _ => Vec::new(),
                        };
                        for unknown in names.iter().filter(|n| !defined.contains(n)) {
                            self.problem::<()>(
                                &at,
                                format!("asset group {unknown:?} is not in policy.asset_groups"),
                            );
                        }
                        ok = false;
                        None
                    }
                    _ => {
                        self.problem::<()>(
                            &at,
                            "asset_groups: a non-empty list of group names (leave it out for every asset)".into(),
                        );
                        ok = false;
                        None
                    }
                },
            };
            out.push((
                identity,
                crate::policy::DeriverGrant {
                    purposes,
                    regions,
                    asset_groups,
                },
            ));
        }
        ok.then_some(out)
    }

    fn unknown_keys(&mut self) {
        let mut unknown = Vec::new();
        for (section, value) in self.table {
            match value.as_table() {
                Some(t) => {
                    for name in t.keys() {
                        let full = format!("{section}.{name}");
                        if !KEYS.iter().any(|k| k.key == full) {
                            unknown.push(full);
                        }
                    }
                }
                None => unknown.push(section.clone()),
            }
        }
        for key in unknown {
            let hint = KEYS
                .iter()
                .find(|k| k.key.rsplit('.').next() == key.rsplit('.').next())
                .map(|k| format!(" (did you mean {}?)", k.key))
                .unwrap_or_default();
            self.problem::<()>(&key, format!("unknown key{hint}"));
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
                assert_eq!(pg.addr, "127.0.0.1:5432".parse().unwrap());
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
