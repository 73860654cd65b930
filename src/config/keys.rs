//! The [`KEYS`] table: every key of the configuration, its default and its meaning.
//!
//! A row's default is written as the TOML value it stands for, and it is the only place
//! that default is written: stage two ([`super::resolve`]) reads an unwritten key as its
//! row's default (`(required…)` marks a key with none). `appliance/custody.toml` is
//! checked against the table, and the table against what resolve applies.

/// A key of the configuration: where it lives, its default, and what it means.
pub struct KeyDoc {
    pub key: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

/// Every key, its default and its meaning: the reference config is checked against this.
pub const KEYS: &[KeyDoc] = &[
    KeyDoc { key: "server.listen", default: "\"127.0.0.1:7443\"", doc: "address every core listens on (SO_REUSEPORT)" },
    KeyDoc { key: "server.advertise", default: "\"\"", doc: "the client address (host:port or [v6]:port) other appliances sharing the store name in their NOT_ACTIVE replies to point clients at this one while it is active; \"\" = server.listen when its IP is given, else this machine's hostname and server.listen's port" },
    KeyDoc { key: "server.shard_listen", default: "\"\"", doc: "IP:port of the first per-shard port: shard i (core i) also listens on that IP at port + i, and HELLO announces the ports, so a shard-aware client (custody::client::ShardedClient) sends each asset's requests to the core that owns it and none crosses cores; plain clients keep using server.listen; \"\" = off" },
    KeyDoc { key: "server.admin_listen", default: "\"127.0.0.1:7480\"", doc: "address of the admin HTTP listener: GET /metrics (Prometheus), /healthz (alive: no core stuck), /readyz (unsealed, store taking commits); keep it on loopback or a management network; \"\" = off" },
    KeyDoc { key: "server.metrics_publish_ms", default: "1000", doc: "how often each core publishes its figures for /metrics and /healthz (a scrape sees figures at most this old; a core silent for 3 intervals, at least 2 s, fails /healthz); 50-60000" },
    KeyDoc { key: "server.shutdown_timeout_s", default: "20", doc: "on SIGTERM the listeners close and every connection answers what it already sent, then closes; past this many seconds (or on a second SIGTERM) the process exits at once with status 1, answering nothing more (nothing unanswered was acknowledged); keep systemd's TimeoutStopSec above it; 1-3600" },
    KeyDoc { key: "server.cores", default: "0", doc: "executors to run, one per core; 0 = one per online core but one (one on a host of one or two cores), the spare core left to the commit thread and the kernel" },
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
    KeyDoc { key: "store.postgres_host", default: "\"127.0.0.1\"", doc: "PostgreSQL host name or address, or several separated by commas as libpq's host=a,b (\"db1,db2\", \"10.0.0.5:5433,10.0.0.6\", \"[::1]:5432\"; at most 8): a primary and its standbys, tried in order (the one that answered last first) until one takes writes (transaction_read_only off); an item without a port uses postgres_port" },
    KeyDoc { key: "store.postgres_port", default: "5432", doc: "PostgreSQL port of the postgres_host items that name none" },
    KeyDoc { key: "store.postgres_dbname", default: "\"custody\"", doc: "database name" },
    KeyDoc { key: "store.postgres_user", default: "\"custody\"", doc: "database user" },
    KeyDoc { key: "store.postgres_password_file", default: "\"\"", doc: "file holding the password (relative to this file); never logged" },
    KeyDoc { key: "store.postgres_password_env", default: "\"\"", doc: "environment variable holding the password, if no file is given" },
    KeyDoc { key: "store.postgres_allow_unsafe_durability", default: "false", doc: "serve even if PostgreSQL has synchronous_commit or fsync off (throwaway databases only)" },
    KeyDoc { key: "store.postgres_owner_lease_ms", default: "2000", doc: "how long the active appliance's lease on the store lasts at PostgreSQL without a renewal; a standby takes over once it lapses (renewed every lease/4); 500-600000" },
    KeyDoc { key: "store.postgres_owner_lease_margin_ms", default: "500", doc: "how long before its lease could lapse an active that cannot renew it stops acknowledging (self-fencing); less than half of postgres_owner_lease_ms; 50-300000" },
    KeyDoc { key: "store.postgres_partition_check_s", default: "3600", doc: "how often the appliance makes the coming months' audit-log partitions (they are also made at start-up and by custodyd migrate)" },
    KeyDoc { key: "store.postgres_sslmode", default: "\"disable\"", doc: "TLS to PostgreSQL: \"disable\" (loopback or a private link only), \"require\" (encrypted, certificate not checked) or \"verify-full\" (certificate chains to postgres_sslrootcert and names the postgres_host item connected to)" },
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

impl KeyDoc {
    /// The default as the value it stands for, as if written in the file; `None` for a key
    /// that has none (`(required)`).
    pub fn default_value(&self) -> Option<toml::Value> {
        if self.default.starts_with('(') {
            return None;
        }
        let mut table = format!("v = {}", self.default)
            .parse::<toml::Table>()
            .ok()?;
        table.remove("v")
    }
}

/// The row of `key`, if it is a key.
pub(super) fn row(key: &str) -> Option<&'static KeyDoc> {
    KEYS.iter().find(|k| k.key == key)
}
