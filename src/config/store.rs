//! `[store]`: which store (SQLite or PostgreSQL, with where the server is, who connects
//! and how the connection is secured) and the group commit's batching and timing.

use super::postgres::server_name;
use super::resolver::{absolute, Resolver};
use super::{PgConfig, PgHost, PgSslMode, PgTls, PreferredHost, StoreBackend, StoreConfig};
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
    lease_margin: Option<Duration>,
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
            lease_margin: r
                .int("store.postgres_owner_lease_margin_ms", 50, 300_000)
                .map(|ms| Duration::from_millis(ms as u64)),
        }
    }

    /// The PostgreSQL store's settings: its TLS, its hosts (each resolved now) and its
    /// password (read now, from a file or the environment).
    fn resolve(self, r: &mut Resolver<'_>, base_dir: &Path) -> Option<PgConfig> {
        let mode = self.mode(r);
        let tls = self.tls(r, mode, base_dir);
        let hosts = self.hosts(r, mode);
        let password = self.password(r, base_dir);
        let margin = self.lease_margin(r);
        Some(PgConfig {
            hosts: hosts?,
            dbname: self.dbname?,
            user: self.user?,
            password: password?,
            allow_unsafe_durability: self.allow_unsafe?,
            owner_lease: self.lease?,
            owner_lease_margin: margin?,
            tls: tls?,
            partition_check: self.partition_check?,
            preferred_host: PreferredHost::default(),
        })
    }

    /// `postgres_owner_lease_margin_ms`, below half the lease: the active stops
    /// acknowledging a margin before its lease could lapse, and renews every quarter
    /// lease, so a margin of half or more would leave it fencing itself on one late
    /// renewal.
    fn lease_margin(&self, r: &mut Resolver<'_>) -> Option<Duration> {
        let (margin, lease) = (self.lease_margin?, self.lease?);
        if margin * 2 >= lease {
            return r.problem(
                "store.postgres_owner_lease_margin_ms",
                format!(
                    "{} ms must be less than half of store.postgres_owner_lease_ms ({} ms)",
                    margin.as_millis(),
                    lease.as_millis()
                ),
            );
        }
        Some(margin)
    }

    fn mode(&self, r: &mut Resolver<'_>) -> Option<PgSslMode> {
        let mode = self.sslmode.as_deref()?;
        match PgSslMode::parse(mode) {
            Some(m) => Some(m),
            None => r.problem(
                "store.postgres_sslmode",
                format!("{mode:?} is not \"disable\", \"require\" or \"verify-full\""),
            ),
        }
    }

    fn tls(&self, r: &mut Resolver<'_>, mode: Option<PgSslMode>, base_dir: &Path) -> Option<PgTls> {
        let (Some(mode), Some(root)) = (mode, self.sslrootcert.as_deref()) else {
            return None;
        };
        let root = (!root.is_empty()).then(|| absolute(base_dir, root));
        match PgTls::new(mode, root.as_deref()) {
            Ok(tls) => Some(tls),
            Err(e) => r.problem("store.postgres_sslrootcert", e.to_string()),
        }
    }

    /// `postgres_host`, a comma-separated list as libpq's `host=a,b` (an item without a
    /// port takes `postgres_port`): every item checked, each problem naming its item.
    fn hosts(&self, r: &mut Resolver<'_>, mode: Option<PgSslMode>) -> Option<Vec<PgHost>> {
        let (Some(list), Some(port)) = (&self.host, self.port) else {
            return None;
        };
        let items: Vec<&str> = list.split(',').map(str::trim).collect();
        if items.len() > bounds::PG_HOSTS_MAX {
            return r.problem(
                "store.postgres_host",
                format!(
                    "{} hosts; at most {} may be listed",
                    items.len(),
                    bounds::PG_HOSTS_MAX
                ),
            );
        }
        let tls = mode.is_some_and(|m| m != PgSslMode::Disable);
        let mut hosts = Some(Vec::with_capacity(items.len()));
        for item in items {
            match resolve_host(item, port as u16, tls) {
                Ok(host) => hosts.iter_mut().for_each(|h| h.push(host.clone())),
                Err(message) => hosts = r.problem("store.postgres_host", message),
            }
        }
        hosts
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

/// One item of `postgres_host`: `name`, `name:port`, `[v6]`, `[v6]:port`, or a bare IPv6
/// literal (which takes `default_port`), resolved; a TLS server name too if `tls`.
fn resolve_host(item: &str, default_port: u16, tls: bool) -> Result<PgHost, String> {
    use std::net::ToSocketAddrs;
    let (name, port) = split_host(item).ok_or_else(|| format!("{item:?} is not host[:port]"))?;
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("{item:?}: {p:?} is not a port (1-65535)")),
        },
    };
    if tls {
        server_name(name).map_err(|e| format!("{item:?}: {e}"))?;
    }
    match (name, port).to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => Ok(PgHost {
            name: name.to_owned(),
            addr,
        }),
        Ok(None) | Err(_) => Err(format!("{item:?} does not resolve to an address")),
    }
}

/// `item` as (host, port if given); `None` when the host is empty or the brackets are
/// unbalanced.
fn split_host(item: &str) -> Option<(&str, Option<&str>)> {
    let (name, port) = if let Some(rest) = item.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        match after {
            "" => (v6, None),
            _ => (v6, Some(after.strip_prefix(':')?)),
        }
    } else if item.matches(':').count() > 1 {
        (item, None)
    } else {
        match item.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (item, None),
        }
    };
    (!name.is_empty()).then_some((name, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_items_split_as_libpq_reads_them() {
        assert_eq!(split_host("db1"), Some(("db1", None)));
        assert_eq!(
            split_host("10.0.0.5:5433"),
            Some(("10.0.0.5", Some("5433")))
        );
        assert_eq!(split_host("[::1]:5432"), Some(("::1", Some("5432"))));
        assert_eq!(split_host("[::1]"), Some(("::1", None)));
        assert_eq!(split_host("::1"), Some(("::1", None)));
        assert_eq!(split_host(""), None);
        assert_eq!(split_host(":5432"), None);
        assert_eq!(split_host("[::1"), None);
        assert_eq!(split_host("[::1]5432"), None);
    }

    #[test]
    fn host_items_resolve_with_their_port_or_the_default() {
        let h = resolve_host("127.0.0.1", 5432, false).unwrap();
        assert_eq!(
            (h.name.as_str(), h.addr),
            ("127.0.0.1", "127.0.0.1:5432".parse().unwrap())
        );
        let h = resolve_host("127.0.0.1:5433", 5432, false).unwrap();
        assert_eq!(h.addr, "127.0.0.1:5433".parse().unwrap());
        let h = resolve_host("[::1]:6000", 5432, true).unwrap();
        assert_eq!(
            (h.name.as_str(), h.addr),
            ("::1", "[::1]:6000".parse().unwrap())
        );
        assert_eq!(h.to_string(), "[::1]:6000");
        for (bad, says) in [
            ("127.0.0.1:0", "not a port"),
            ("127.0.0.1:70000", "not a port"),
            ("127.0.0.1:x", "not a port"),
            ("", "not host[:port]"),
            ("db.custody.invalid", "does not resolve"),
        ] {
            let e = resolve_host(bad, 5432, false).unwrap_err();
            assert!(
                e.contains(says) && e.contains(&format!("{bad:?}")),
                "{bad}: {e}"
            );
        }
        let e = resolve_host("bad_name!", 5432, true).unwrap_err();
        assert!(e.contains("certificate can name"), "{e}");
    }
}
