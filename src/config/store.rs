//! `[store]`: which store (SQLite or PostgreSQL, with where the server is, who connects
//! and how the connection is secured) and the group commit's batching and timing.

use super::resolver::{absolute, Resolver};
use super::{PgConfig, PgSslMode, PgTls, PgTlsError, StoreBackend, StoreConfig};
use crate::bounds;
use std::path::Path;
use std::time::Duration;

/// The store as written, before paths are made absolute.
enum StoreSpec {
    Sqlite(String),
    Postgres(PgConfig),
}

/// `[store]` as resolved, each value if its key resolved: the checks across sections look
/// at the commit settings whether or not the rest did.
pub(super) struct StoreKeys {
    spec: Option<StoreSpec>,
    pub(super) batch_max: Option<i64>,
    pub(super) batch_delay: Option<Duration>,
    pub(super) inflight_batches: Option<i64>,
    linger: Option<Duration>,
    pub(super) commit_timeout: Option<Duration>,
    pub(super) queue_depth: Option<i64>,
}

impl StoreKeys {
    /// [`StoreConfig`], if every key resolved: the SQLite file in `state_dir`, and a queue
    /// depth of 0 made `cores` x the batches each shard may have in flight.
    pub(super) fn finish(self, state_dir: &Path, cores: usize) -> Option<StoreConfig> {
        let inflight_batches = self.inflight_batches? as usize;
        let queue_depth = self.queue_depth?;
        Some(StoreConfig {
            backend: match self.spec? {
                StoreSpec::Sqlite(path) => StoreBackend::Sqlite {
                    path: absolute(state_dir, &path),
                },
                StoreSpec::Postgres(pg) => StoreBackend::Postgres(pg),
            },
            commit_batch_records_max: self.batch_max? as usize,
            commit_batch_delay: self.batch_delay?,
            commit_batches_inflight_max: inflight_batches,
            commit_linger: self.linger?,
            commit_timeout: self.commit_timeout?,
            commit_queue_depth: if queue_depth == 0 {
                cores * inflight_batches
            } else {
                queue_depth as usize
            },
        })
    }
}

/// `[store]`.
pub(super) fn resolve_store(r: &mut Resolver<'_>, base_dir: &Path) -> StoreKeys {
    let backend = r.string("store.backend");
    let sqlite_path = r.string("store.sqlite_path");
    let pg = PgKeys::read(r);
    let spec = match backend.as_deref() {
        None => None,
        Some("sqlite") => sqlite_path.map(StoreSpec::Sqlite),
        Some("postgres") => pg.resolve(r, base_dir).map(StoreSpec::Postgres),
        Some(other) => r.problem(
            "store.backend",
            format!("{other:?} is not a store this build has (\"sqlite\" or \"postgres\")"),
        ),
    };
    let batch_max = r.int(
        "store.commit_batch_records_max",
        1,
        i64::from(bounds::COMMIT_BATCH_RECORDS_CAP),
    );
    let micros = |r: &mut Resolver<'_>, key, max: u64| {
        r.int(key, 0, max as i64)
            .map(|us| Duration::from_micros(us as u64))
    };
    let batch_delay = micros(
        r,
        "store.commit_batch_delay_us",
        bounds::COMMIT_BATCH_DELAY_US_CAP,
    );
    let inflight_batches = r.int(
        "store.commit_batches_inflight_max",
        1,
        bounds::COMMIT_BATCHES_INFLIGHT_CAP as i64,
    );
    let linger = micros(r, "store.commit_linger_us", bounds::COMMIT_LINGER_US_CAP);
    let commit_timeout = r
        .int("store.commit_timeout_ms", 1, 600_000)
        .map(|ms| Duration::from_millis(ms as u64));
    let queue_depth = r.int("store.commit_queue_depth", 0, 65_536);
    StoreKeys {
        spec,
        batch_max,
        batch_delay,
        inflight_batches,
        linger,
        commit_timeout,
        queue_depth,
    }
}

/// The `store.postgres_*` keys as written (read whatever the backend, so that a wrong
/// one is reported even while SQLite is in use).
struct PgKeys {
    host: Option<String>,
    port: Option<i64>,
    dbname: Option<String>,
    user: Option<String>,
    password_file: Option<String>,
    password_env: Option<String>,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    partition_check: Option<Duration>,
    allow_unsafe: Option<bool>,
    lease: Option<Duration>,
}

impl PgKeys {
    fn read(r: &mut Resolver<'_>) -> PgKeys {
        PgKeys {
            host: r.string("store.postgres_host"),
            port: r.int("store.postgres_port", 1, 65_535),
            dbname: r.string("store.postgres_dbname"),
            user: r.string("store.postgres_user"),
            password_file: r.string("store.postgres_password_file"),
            password_env: r.string("store.postgres_password_env"),
            sslmode: r.string("store.postgres_sslmode"),
            sslrootcert: r.string("store.postgres_sslrootcert"),
            partition_check: r
                .int("store.postgres_partition_check_s", 1, 86_400)
                .map(|s| Duration::from_secs(s as u64)),
            allow_unsafe: r.bool("store.postgres_allow_unsafe_durability"),
            lease: r
                .int("store.postgres_owner_lease_ms", 500, 600_000)
                .map(|ms| Duration::from_millis(ms as u64)),
        }
    }

    /// The PostgreSQL store's settings: its TLS, its address (the host resolved now) and
    /// its password (read now, from a file or the environment).
    fn resolve(self, r: &mut Resolver<'_>, base_dir: &Path) -> Option<PgConfig> {
        let tls = self.tls(r, base_dir);
        let addr = self.addr(r);
        let password = self.password(r, base_dir);
        Some(PgConfig {
            addr: addr?,
            dbname: self.dbname?,
            user: self.user?,
            password: password?,
            allow_unsafe_durability: self.allow_unsafe?,
            owner_lease: self.lease?,
            tls: tls?,
            partition_check: self.partition_check?,
        })
    }

    fn tls(&self, r: &mut Resolver<'_>, base_dir: &Path) -> Option<PgTls> {
        let (Some(mode), Some(host), Some(root)) = (
            self.sslmode.as_deref(),
            &self.host,
            self.sslrootcert.as_deref(),
        ) else {
            return None;
        };
        let Some(mode) = PgSslMode::parse(mode) else {
            return r.problem(
                "store.postgres_sslmode",
                format!("{mode:?} is not \"disable\", \"require\" or \"verify-full\""),
            );
        };
        let root = (!root.is_empty()).then(|| absolute(base_dir, root));
        match PgTls::new(mode, host, root.as_deref()) {
            Ok(tls) => Some(tls),
            Err(e @ PgTlsError::ServerName(_)) => r.problem("store.postgres_host", e.to_string()),
            Err(e) => r.problem("store.postgres_sslrootcert", e.to_string()),
        }
    }

    fn addr(&self, r: &mut Resolver<'_>) -> Option<std::net::SocketAddr> {
        use std::net::ToSocketAddrs;
        let (Some(host), Some(port)) = (&self.host, self.port) else {
            return None;
        };
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

    /// The password from `postgres_password_file` (trailing newline dropped), else from
    /// `postgres_password_env`; `Some(None)` when neither is given.
    fn password(
        &self,
        r: &mut Resolver<'_>,
        base_dir: &Path,
    ) -> Option<Option<zeroize::Zeroizing<String>>> {
        match (self.password_file.as_deref(), self.password_env.as_deref()) {
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
        }
    }
}
