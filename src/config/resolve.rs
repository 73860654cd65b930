//! Stage two: each section's keys resolved to typed values ([`Resolver`] reads one key,
//! the section modules a section), then the checks across sections, then the
//! [`Config`] put together. [`resolve`] is the list of sections; `[server]`, `[audit]`
//! and `[tls]` are resolved here, the larger sections in their own modules.

use super::limits::{resolve_limits, LimitKeys};
use super::policy::{resolve_policy, PolicySection};
use super::resolver::{absolute, Resolver};
use super::seal::{resolve_seal, SealKeys};
use super::store::{resolve_store, StoreKeys};
use super::{
    AuditConfig, Config, ConfigError, ConfigProblem, IdentitySource, KeySource, Server, Tls,
};
use crate::bounds;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Every section as resolved, before the checks across them.
struct Sections {
    server: ServerSection,
    audit: Option<AuditConfig>,
    tls: Option<Tls>,
    store: StoreKeys,
    seal: SealKeys,
    limits: LimitKeys,
    policy: PolicySection,
}

/// `[server]` resolved, and its core count on its own: the checks across sections use it
/// even when another server key is wrong.
struct ServerSection {
    server: Option<Server>,
    cores: Option<usize>,
}

/// Stage two: typed values, defaults, ranges, and checks across keys.
pub fn resolve(table: &toml::Table, base_dir: &Path, file: &str) -> Result<Config, ConfigError> {
    let mut r = Resolver::new(table);
    // In the order their problems are listed.
    let sections = Sections {
        server: resolve_server(&mut r, base_dir),
        audit: resolve_audit(&mut r),
        tls: resolve_tls(&mut r, base_dir),
        store: resolve_store(&mut r, base_dir),
        seal: resolve_seal(&mut r, base_dir),
        limits: resolve_limits(&mut r),
        policy: resolve_policy(&mut r),
    };
    r.unknown_keys();
    check_across_sections(&mut r, &sections);
    if !r.problems.is_empty() {
        return Err(ConfigError {
            file: file.to_owned(),
            problems: r.problems,
        });
    }
    // Every value missing below recorded a problem, so this is unreachable; report it
    // anyway.
    sections.finish().ok_or_else(|| ConfigError {
        file: file.to_owned(),
        problems: vec![ConfigProblem {
            key: "(internal)".into(),
            message: "a key failed to resolve without a reported problem".into(),
        }],
    })
}

/// Cross-key checks, only when the keys involved resolved.
fn check_across_sections(r: &mut Resolver<'_>, s: &Sections) {
    if let (Some(batch), Some(pending)) = (s.store.batch_max, s.limits.pending_max) {
        if batch > pending {
            r.problem::<()>(
                "store.commit_batch_records_max",
                format!("{batch} exceeds limits.max_pending_per_shard ({pending}): batches could never fill"),
            );
        }
    }
    if let (Some(depth), Some(cores), Some(inflight)) = (
        s.store.queue_depth,
        s.server.cores,
        s.store.inflight_batches,
    ) {
        let needed = cores as i64 * inflight;
        if depth != 0 && depth < needed {
            r.problem::<()>(
                "store.commit_queue_depth",
                format!("{depth} is below server.cores x store.commit_batches_inflight_max ({needed}): shards would find the queue full"),
            );
        }
    }
    if let (Some(timeout), Some(delay)) = (s.store.commit_timeout, s.store.batch_delay) {
        if delay >= timeout {
            r.problem::<()>(
                "store.commit_batch_delay_us",
                "must be shorter than store.commit_timeout_ms".into(),
            );
        }
    }
}

impl Sections {
    /// The configuration, if every key resolved: the store's and the seal's files placed
    /// in the state directory.
    fn finish(self) -> Option<Config> {
        let server = self.server.server?;
        let store = self.store.finish(&server.state_dir, server.cores)?;
        let (seal, seal_timing) = self.seal.finish(&server.state_dir)?;
        let limits = self.limits.finish(self.policy.rate_limit_buckets?)?;
        Some(Config {
            tls: self.tls?,
            store,
            seal,
            seal_timing,
            limits,
            policy: self.policy.policy?,
            audit: self.audit?,
            server,
        })
    }
}

/// The executors `server.cores = 0` runs on a host that lets the process use `online`
/// CPUs: one per CPU but one, which is left to the threads beside the executors (the
/// store's commit thread, the lease keeper, the admin listener) and to the kernel's
/// network and disk work; one executor on a host of one or two CPUs. On two CPUs a
/// second executor costs more than it serves: it shares its CPU with the commit thread,
/// half the plain clients' requests cross between the two executors, and each executor
/// going to sleep interrupts the other CPU (docs/benchmarks.md, "What a request
/// costs, after issue 20": a third less CPU per request with one executor at every rate
/// measured, the same throughput at overload).
pub fn default_cores(online: usize) -> usize {
    online.saturating_sub(1).max(1)
}

/// `[server]`.
fn resolve_server(r: &mut Resolver<'_>, base_dir: &Path) -> ServerSection {
    let listen = socket_addr(r, "server.listen");
    let online = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cores = r.int("server.cores", 0, bounds::CORES_CAP as i64).map(|n| {
        if n == 0 {
            default_cores(online)
        } else {
            n as usize
        }
    });
    let state_dir = r.string("server.state_dir").map(|s| absolute(base_dir, &s));
    let log_level = log_level(r);
    let log_json = log_json(r);
    let stats_log_interval = r
        .int("server.stats_log_interval_s", 0, 86_400)
        .map(|s| (s > 0).then(|| Duration::from_secs(s as u64)));
    let admin_listen = admin_listen(r, listen);
    let shard_listen = shard_listen(r);
    let advertise = advertise(r, listen);
    let metrics_publish = r
        .int("server.metrics_publish_ms", 50, 60_000)
        .map(|ms| Duration::from_millis(ms as u64));
    let shutdown_timeout = r
        .int("server.shutdown_timeout_s", 1, 3600)
        .map(|s| Duration::from_secs(s as u64));
    let server = (|| {
        Some(Server {
            listen: listen?,
            cores: cores?,
            state_dir: state_dir?,
            log_level: log_level?,
            log_json: log_json?,
            stats_log_interval: stats_log_interval?,
            admin_listen: admin_listen?,
            shard_listen: shard_listen?,
            advertise: advertise?,
            metrics_publish: metrics_publish?,
            shutdown_timeout: shutdown_timeout?,
        })
    })();
    ServerSection { server, cores }
}

/// An `IP:port` key with no way to turn it off.
fn socket_addr(r: &mut Resolver<'_>, key: &'static str) -> Option<SocketAddr> {
    let s = r.string(key)?;
    match s.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(e) => r.problem(key, format!("{s:?} is not IP:port ({e})")),
    }
}

fn log_level(r: &mut Resolver<'_>) -> Option<tracing::Level> {
    let s = r.string("server.log_level")?;
    match s.parse::<tracing::Level>() {
        Ok(l) => Some(l),
        Err(_) => r.problem(
            "server.log_level",
            format!("{s:?} is not one of error, warn, info, debug, trace"),
        ),
    }
}

/// `server.log_format`: whether the log is JSON (else text).
fn log_json(r: &mut Resolver<'_>) -> Option<bool> {
    let s = r.string("server.log_format")?;
    match s.as_str() {
        "text" => Some(false),
        "json" => Some(true),
        _ => r.problem(
            "server.log_format",
            format!("{s:?} is not \"text\" or \"json\""),
        ),
    }
}

/// `server.admin_listen`: `""` = off; never `server.listen`'s address.
fn admin_listen(r: &mut Resolver<'_>, listen: Option<SocketAddr>) -> Option<Option<SocketAddr>> {
    let s = r.string("server.admin_listen")?;
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
}

/// `server.shard_listen`: `""` = off; a fixed first port, since the ports are announced.
fn shard_listen(r: &mut Resolver<'_>) -> Option<Option<SocketAddr>> {
    let s = r.string("server.shard_listen")?;
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
}

/// `server.advertise`: the client address other appliances point clients at while this
/// one is active; `""` = [`derived_advertise`] of `server.listen`.
fn advertise(r: &mut Resolver<'_>, listen: Option<SocketAddr>) -> Option<String> {
    let s = r.string("server.advertise")?;
    if s.is_empty() {
        return listen.map(derived_advertise);
    }
    match check_advertise(&s) {
        Ok(()) => Some(s),
        Err(why) => r.problem("server.advertise", format!("{s:?} {why}")),
    }
}

/// The address to advertise when none is given: `listen` itself when its IP is given
/// (a client can reach that), else this machine's hostname (read from the kernel) with
/// the listen port; `listen` when the hostname cannot be read.
pub(super) fn derived_advertise(listen: SocketAddr) -> String {
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let hostname = hostname.trim();
    let derived = format!("{hostname}:{}", listen.port());
    if hostname.is_empty() || check_advertise(&derived).is_err() {
        return listen.to_string();
    }
    derived
}

/// Whether `s` is an address a NOT_ACTIVE reply can carry and a client can dial:
/// `host:port` or `[v6]:port`, port 1-65535, at most
/// [`bounds::ACTIVE_ADDRESS_BYTES_MAX`] bytes.
fn check_advertise(s: &str) -> Result<(), String> {
    if s.len() > bounds::ACTIVE_ADDRESS_BYTES_MAX {
        return Err(format!(
            "is {} bytes, longer than {}",
            s.len(),
            bounds::ACTIVE_ADDRESS_BYTES_MAX
        ));
    }
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let (v6, port) = rest
                .split_once("]:")
                .ok_or("is not host:port or [IPv6]:port")?;
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("names {v6:?}, not an IPv6 address"))?;
            (v6, port)
        }
        None => s
            .rsplit_once(':')
            .ok_or("is not host:port or [IPv6]:port")?,
    };
    let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':');
    if host.is_empty()
        || !host.chars().all(name_char)
        || (host.contains(':') && !s.starts_with('['))
    {
        return Err("is not host:port or [IPv6]:port (an IPv6 address goes in brackets)".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("has port {port:?}, not 1-65535")),
    }
}

/// `[audit]`.
fn resolve_audit(r: &mut Resolver<'_>) -> Option<AuditConfig> {
    let reconcile_interval = r
        .int("audit.reconcile_interval_s", 0, 86_400)
        .map(|s| (s > 0).then(|| Duration::from_secs(s as u64)));
    let reconcile_rate = r
        .int("audit.reconcile_records_per_s", 0, 100_000_000)
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
    Some(AuditConfig {
        reconcile_interval: reconcile_interval?,
        reconcile_rate: reconcile_rate?,
    })
}

/// `[tls]`.
fn resolve_tls(r: &mut Resolver<'_>, base_dir: &Path) -> Option<Tls> {
    let cert = r.required_path("tls.cert", base_dir);
    let key = tls_key(r, base_dir);
    let client_ca = r.required_path("tls.client_ca", base_dir);
    let require_client_cert = r.bool("tls.require_client_cert");
    let identity = r.string("tls.identity").and_then(|s| match s.as_str() {
        "cn" => Some(IdentitySource::CommonName),
        "san" => Some(IdentitySource::SubjectAltName),
        _ => r.problem("tls.identity", format!("{s:?} is not \"cn\" or \"san\"")),
    });
    let handshake_timeout = r
        .int("tls.handshake_timeout_ms", 10, 120_000)
        .map(|ms| Duration::from_millis(ms as u64));
    if let (Some(false), Some(_)) = (require_client_cert, identity) {
        tracing::warn!("tls.require_client_cert = false: requests are attributed to \"anonymous\"");
    }
    Some(Tls {
        cert: cert?,
        key: key?,
        client_ca: client_ca?,
        require_client_cert: require_client_cert?,
        identity: identity?,
        handshake_timeout: handshake_timeout?,
    })
}

/// The server key: `tls.key` (a file) or `tls.key_credential` (a systemd credential's
/// name), exactly one of them.
fn tls_key(r: &mut Resolver<'_>, base_dir: &Path) -> Option<KeySource> {
    let key_credential = r.string("tls.key_credential").filter(|s| !s.is_empty());
    match key_credential {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_executors_leave_one_core_spare() {
        assert_eq!(default_cores(1), 1);
        assert_eq!(default_cores(2), 1);
        assert_eq!(default_cores(3), 2);
        assert_eq!(default_cores(16), 15);
    }

    #[test]
    fn an_advertised_address_is_host_port() {
        for ok in [
            "custody-1:7443",
            "10.0.0.5:7443",
            "[::1]:7443",
            "db.example.com:1",
            "a:65535",
        ] {
            assert_eq!(check_advertise(ok), Ok(()), "{ok}");
        }
        for bad in [
            "custody-1",
            "custody-1:",
            ":7443",
            "custody-1:0",
            "custody-1:65536",
            "::1:7443",
            "[::1]7443",
            "[nope]:7443",
            "has space:7443",
        ] {
            assert!(check_advertise(bad).is_err(), "{bad}");
        }
        let long = format!("{}:7443", "a".repeat(bounds::ACTIVE_ADDRESS_BYTES_MAX));
        assert!(check_advertise(&long).unwrap_err().contains("longer than"));
    }

    #[test]
    fn the_advertised_address_is_derived_from_the_listen_address() {
        let given: SocketAddr = "10.0.0.5:7443".parse().unwrap();
        assert_eq!(derived_advertise(given), "10.0.0.5:7443");
        let any: SocketAddr = "0.0.0.0:7443".parse().unwrap();
        let derived = derived_advertise(any);
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        match hostname.trim() {
            "" => assert_eq!(derived, "0.0.0.0:7443"),
            h => assert_eq!(derived, format!("{h}:7443")),
        }
        assert!(check_advertise(&derived).is_ok(), "{derived}");
    }
}
