//! The production store: PostgreSQL, driven by tokio-postgres on each glommio executor.
//!
//! Every shard opens its own connection from its own core (`Config::connect_raw` over the
//! executor's TCP stream, through [`TokioIo`]), so a shard commits without a hop to
//! another thread. A batch is one transaction: the shard's sequence row moves forward only
//! if the batch continues it (otherwise the batch is refused, nothing written), the
//! batch's audit records go in with one multi-row `unnest` insert, registrations with
//! another, then COMMIT. PostgreSQL is never used for locking or ordering on the derive
//! path; the shard does that.

use super::{
    CommitBatch, LocalFuture, RecentRotation, RotationWindow, ShardSnapshot, ShardStore, Store,
    StoreError, StoredAsset, SCHEMA_VERSION,
};
use crate::config::{PgSslMode as SslMode, PgTls};
use crate::lifecycle::AssetState;
use crate::placement::shard_of;
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

const MIGRATIONS: [&str; 3] = [
    include_str!("../../appliance/sql/postgres/0001_init.sql"),
    include_str!("../../appliance/sql/postgres/0002_lifecycle.sql"),
    include_str!("../../appliance/sql/postgres/0003_audit_chain.sql"),
];

/// A connection (and its first queries) slower than this counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First wait after a failed connection attempt; doubled after each further failure.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between connection attempts.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

pub use crate::config::PgConfig;

impl PgConfig {
    /// The driver's settings (the address is not among them: connect with `connect_raw`).
    pub fn driver_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.dbname(&self.dbname)
            .user(&self.user)
            .application_name("custodyd");
        if let Some(p) = &self.password {
            c.password(p.as_bytes());
        }
        c.ssl_mode(match self.tls.mode() {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        c
    }
}

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    // tokio-postgres errors carry the server's message; they never include parameters.
    StoreError::Unavailable(format!("postgres: {e}"))
}

/// Opens a connection from the current glommio executor and drives it there.
pub async fn connect(config: &PgConfig) -> Result<Client, StoreError> {
    let tcp = glommio::net::TcpStream::connect(config.addr)
        .await
        .map_err(|e| StoreError::Unavailable(format!("connect to {}: {e}", config.addr)))?;
    let _ = tcp.set_nodelay(true);
    let driver = config.driver_config();
    let connector = super::pg_tls::connector(&config.tls)
        .map_err(|e| StoreError::Unavailable(format!("postgres TLS client: {e}")))?;
    match connector {
        None => {
            let (client, connection) = driver
                .connect_raw(TokioIo(tcp), NoTls)
                .await
                .map_err(pg_err)?;
            drive(connection);
            Ok(client)
        }
        Some(tls) => {
            let (client, connection) = driver
                .connect_raw(TokioIo(tcp), tls)
                .await
                .map_err(|e| tls_err(config, e))?;
            drive(connection);
            Ok(client)
        }
    }
}

/// Runs a connection's I/O on the current executor until the client or server ends it.
fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    glommio::spawn_local(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection ended");
        }
    })
    .detach();
}

/// A failed TLS connection, saying which `sslmode` was asked for (a certificate that
/// does not verify shows up here with rustls's reason).
fn tls_err(config: &PgConfig, e: tokio_postgres::Error) -> StoreError {
    use std::error::Error as _;
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    StoreError::Unavailable(format!(
        "postgres at {} with sslmode {}: {reason}",
        config.addr,
        config.tls.mode().as_str()
    ))
}

/// Applies the embedded migrations (in one transaction each) and checks the version.
pub async fn migrate(client: &Client) -> Result<u32, StoreError> {
    let current = schema_version(client).await?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    for sql in MIGRATIONS.iter().skip(current as usize) {
        client
            .batch_execute(&format!("BEGIN; {sql}; COMMIT;"))
            .await
            .map_err(pg_err)?;
    }
    ensure_partitions(client).await?;
    schema_version(client).await
}

/// Months of audit-log partitions kept ready ahead of time, the current one included.
pub const PARTITION_MONTHS_AHEAD: i32 = 3;

/// Makes the audit log's monthly partitions for this month and the next ones. A month
/// whose rows already sit in the default partition is left there (with a warning from
/// the server): inserts never fail for lack of a partition.
pub async fn ensure_partitions(client: &Client) -> Result<(), StoreError> {
    client
        .batch_execute(&format!(
            "DO $$
             DECLARE m date;
             BEGIN
               FOR i IN 0..{last} LOOP
                 m := (date_trunc('month', now()) + make_interval(months => i))::date;
                 BEGIN
                   EXECUTE format(
                     'CREATE TABLE IF NOT EXISTS %I PARTITION OF custody_audit_log FOR VALUES FROM (%L) TO (%L)',
                     'custody_audit_log_' || to_char(m, 'YYYY_MM'), m, (m + interval '1 month')::date);
                 EXCEPTION WHEN others THEN
                   RAISE WARNING 'custody: partition for % not created: %', m, SQLERRM;
                 END;
               END LOOP;
             END $$",
            last = PARTITION_MONTHS_AHEAD - 1
        ))
        .await
        .map_err(pg_err)
}

/// The applied schema version (0 for an empty database).
pub async fn schema_version(client: &Client) -> Result<u32, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('custody_schema') IS NOT NULL", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM custody_schema", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    Ok(v.unwrap_or(0).max(0) as u32)
}

/// Refuses a server that acknowledges commits before they are durable: with
/// `synchronous_commit` or `fsync` off, an acknowledged derivation's audit record could
/// vanish in a crash (I1). `allow` (config `store.postgres_allow_unsafe_durability`) serves
/// anyway, with a warning on every connection.
pub async fn check_durability(client: &Client, allow: bool) -> Result<(), StoreError> {
    let mut unsafe_settings = Vec::new();
    for setting in ["synchronous_commit", "fsync"] {
        let value: String = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .map_err(pg_err)?
            .get(0);
        if value == "off" || (setting == "synchronous_commit" && value == "local") {
            unsafe_settings.push(format!("{setting} = {value}"));
        }
    }
    if unsafe_settings.is_empty() {
        return Ok(());
    }
    let what = unsafe_settings.join(", ");
    if allow {
        tracing::warn!(settings = %what, "PostgreSQL acknowledges commits before they are durable; serving anyway because store.postgres_allow_unsafe_durability = true");
        return Ok(());
    }
    Err(StoreError::Unavailable(format!(
        "PostgreSQL has {what}: an acknowledged derivation could lose its audit record in a crash. \
         Fix the server, or set store.postgres_allow_unsafe_durability = true for a throwaway database"
    )))
}

/// The PostgreSQL store: each shard connects on first use from its own core, and every
/// commit carries the fencing token this appliance took the store with.
pub struct PgStore {
    config: PgConfig,
    ownership: Ownership,
    on_fenced: FenceAlarm,
}

/// Called (from any core) when this appliance finds it no longer owns the store: a
/// successor took the database over. Commits are refused from then on whatever the alarm
/// does; the server stops the process.
pub type FenceAlarm = Arc<dyn Fn(String) + Send + Sync>;

/// What an appliance holds once it owns the store.
#[derive(Clone, Copy, Debug)]
pub struct Ownership {
    pub instance: Uuid,
    pub token: i64,
    pub lease: Duration,
}

impl PgStore {
    pub fn new(config: PgConfig, ownership: Ownership) -> PgStore {
        PgStore {
            config,
            ownership,
            on_fenced: Arc::new(|_| {}),
        }
    }

    /// Calls `alarm` once ownership is found lost (by the heartbeat or by a commit).
    pub fn with_fence_alarm(mut self, alarm: FenceAlarm) -> PgStore {
        self.on_fenced = alarm;
        self
    }
}

/// Takes the store for `instance`: moves the fencing token forward if nobody holds a live
/// lease. While another appliance holds one, waits (up to one lease, so a killed
/// predecessor's lease can lapse), then refuses with who holds it.
pub async fn acquire_ownership(
    client: &Client,
    instance: Uuid,
    lease: Duration,
) -> Result<Ownership, StoreError> {
    let lease_ms = lease.as_millis() as i64;
    // Set once the holder is known: wait for its lease (not ours) to lapse.
    let mut deadline: Option<std::time::Instant> = None;
    loop {
        let taken = client
            .query_opt(
                "UPDATE custody_owner SET instance = $1, token = token + 1, heartbeat_at = now(), \
                 lease_ms = $2 \
                 WHERE id = 1 AND (instance IS NULL OR instance = $1 \
                   OR heartbeat_at < now() - make_interval(secs => lease_ms / 1000.0)) \
                 RETURNING token",
                &[&instance, &lease_ms],
            )
            .await
            .map_err(pg_err)?;
        if let Some(row) = taken {
            return Ok(Ownership {
                instance,
                token: row.get(0),
                lease,
            });
        }
        let row = client
            .query_one(
                "SELECT instance, extract(epoch FROM now() - heartbeat_at)::float8 * 1000, lease_ms \
                 FROM custody_owner WHERE id = 1",
                &[],
            )
            .await
            .map_err(pg_err)?;
        let holder: Option<Uuid> = row.get(0);
        let age_ms: Option<f64> = row.get(1);
        let holder_lease_ms: i64 = row.get(2);
        let until = *deadline.get_or_insert_with(|| {
            std::time::Instant::now() + Duration::from_millis(holder_lease_ms.max(0) as u64 + 200)
        });
        if std::time::Instant::now() >= until {
            return Err(StoreError::Locked(format!(
                "the database is owned by another running appliance (instance {}, last heartbeat {} ms ago, lease {} ms); stop it first",
                holder.map(|u| u.to_string()).unwrap_or_else(|| "?".into()),
                age_ms.map(|a| a.round() as i64).unwrap_or(-1),
                holder_lease_ms
            )));
        }
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
}

/// Keeps the coming months' audit-log partitions made while the appliance runs (shard 0
/// only), so a month never starts with its rows going to the default partition.
async fn maintain_partitions(config: PgConfig) {
    let mut client: Option<Client> = None;
    loop {
        glommio::timer::sleep(config.partition_check).await;
        if client.as_ref().map_or(true, |c| c.is_closed()) {
            client = connect(&config).await.ok();
        }
        match client.as_ref() {
            None => tracing::warn!(
                "audit-log partitions: PostgreSQL unreachable; next try in {:?}",
                config.partition_check
            ),
            Some(c) => match ensure_partitions(c).await {
                Ok(()) => tracing::debug!("audit-log partitions ready"),
                Err(e) => tracing::warn!(error = %e, "audit-log partitions not made"),
            },
        }
    }
}

/// Keeps the lease alive while this appliance owns the store. Returns when ownership is
/// lost (another appliance took over); from then on every commit is refused as fenced.
async fn heartbeat(config: PgConfig, ownership: Ownership, on_fenced: FenceAlarm) {
    let interval = ownership.lease / 3;
    let mut client: Option<Client> = None;
    loop {
        glommio::timer::sleep(interval).await;
        if client.as_ref().map_or(true, |c| c.is_closed()) {
            client = connect(&config).await.ok();
        }
        let Some(c) = client.as_ref() else {
            tracing::warn!("store heartbeat: PostgreSQL unreachable");
            continue;
        };
        match c
            .execute(
                "UPDATE custody_owner SET heartbeat_at = now() WHERE id = 1 AND token = $1",
                &[&ownership.token],
            )
            .await
        {
            Ok(1) => {}
            Ok(_) => {
                on_fenced(format!(
                    "another appliance took the database over (this one held token {}); every commit is refused from now on",
                    ownership.token
                ));
                return;
            }
            Err(e) => tracing::warn!(error = %e, "store heartbeat failed"),
        }
    }
}

impl Store for PgStore {
    fn open_shard(&self, shard: u16, shard_count: u16) -> Box<dyn ShardStore> {
        Box::new(PgShard {
            inner: Rc::new(PgShardInner {
                config: self.config.clone(),
                token: self.ownership.token,
                ownership: self.ownership,
                on_fenced: self.on_fenced.clone(),
                shard,
                shard_count,
                session: RefCell::new(None),
                retry: std::cell::Cell::new(None),
            }),
        })
    }

    fn release(&self, limit: Duration) -> Result<bool, StoreError> {
        let (config, ownership) = (self.config.clone(), self.ownership);
        let (done, outcome) = std::sync::mpsc::channel();
        // A thread of its own, waited for at most `limit`: a server that does not answer
        // must not hold the stop (the lease then lapses by itself).
        std::thread::Builder::new()
            .name("custody-release".into())
            .spawn(move || {
                let released = on_own_executor("custody-release-io", move || async move {
                    let client = connect(&config).await?;
                    client
                        .execute(
                            "UPDATE custody_owner SET instance = NULL \
                             WHERE id = 1 AND instance = $1 AND token = $2",
                            &[&ownership.instance, &ownership.token],
                        )
                        .await
                        .map_err(|e| StoreError::Unavailable(format!("release: {e}")))
                })
                .and_then(|r| r);
                let _ = done.send(released);
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start a thread: {e}")))?;
        match outcome.recv_timeout(limit) {
            Ok(Ok(1)) => Ok(true),
            Ok(Ok(_)) => Err(StoreError::Unavailable(
                "the store was not ours any more (another appliance took it over)".into(),
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {} ms",
                limit.as_millis()
            ))),
        }
    }

    fn describe(&self) -> String {
        format!(
            "postgres:{}@{}/{}",
            self.config.user, self.config.addr, self.config.dbname
        )
    }
}

struct Session {
    client: Rc<Client>,
    commit_batch: Statement,
}

/// A whole batch in one statement, hence one implicit transaction and one round trip:
/// move the shard's sequence row forward only if the batch continues it, and insert the
/// records and registrations and apply the lifecycle updates only if it did. The counts
/// say which happened. An update that would move a counter backward (I2) matches no row,
/// and then the statement raises an error, so nothing of the batch is kept. (The shard
/// sends at most one write per asset per batch.)
const COMMIT_BATCH_SQL: &str = "\
WITH own AS (
    SELECT 1 FROM custody_owner WHERE id = 1 AND token = $20 FOR SHARE
), adv AS (
    UPDATE custody_shard_seq SET last_seq = $3
    WHERE shard = $1 AND last_seq = $2 AND EXISTS (SELECT 1 FROM own)
    RETURNING 1
), audit AS (
    INSERT INTO custody_audit_log (shard, seq, logged_at, event, asset_id, counter,
        state_at_event, requester, request_id, derivation_path, purpose, region, ttl_s,
        scheme_version, rotation_id, prev_hash, hash)
    SELECT $1, u.seq, to_timestamp(u.ts_ms / 1000.0), u.event, u.asset_id, u.counter,
        u.state, u.requester, u.request_id, u.path, u.purpose, u.region, u.ttl_s, u.scheme,
        u.rotation_id, u.prev_hash, u.hash
    FROM unnest($4::bigint[], $5::bigint[], $6::text[], $7::uuid[], $8::bigint[],
        $9::text[], $10::text[], $11::bigint[], $12::text[], $13::text[], $14::text[],
        $15::integer[], $16::smallint[], $21::uuid[], $27::bytea[], $28::bytea[])
        AS u(seq, ts_ms, event, asset_id, counter, state, requester, request_id, path,
             purpose, region, ttl_s, scheme, rotation_id, prev_hash, hash)
    WHERE EXISTS (SELECT 1 FROM adv)
    RETURNING 1
), checkpoint AS (
    INSERT INTO custody_audit_checkpoints (shard, seq, hash, mac, logged_at)
    SELECT $1, $29::bigint, $30::bytea, $31::bytea, to_timestamp($32::bigint / 1000.0)
    WHERE $29::bigint IS NOT NULL AND EXISTS (SELECT 1 FROM adv)
    RETURNING 1
), keys AS (
    INSERT INTO custody_keys (asset_id, state, derivation_counter, created_at, updated_at)
    SELECT k.asset_id, k.state, k.counter, now(), now()
    FROM unnest($17::uuid[], $18::text[], $19::bigint[]) AS k(asset_id, state, counter)
    WHERE EXISTS (SELECT 1 FROM adv)
    RETURNING 1
), upd AS (
    UPDATE custody_keys k SET state = w.state, derivation_counter = w.counter, updated_at = now()
    FROM unnest($22::uuid[], $23::text[], $24::bigint[]) AS w(asset_id, state, counter)
    WHERE k.asset_id = w.asset_id AND k.derivation_counter <= w.counter
        AND k.state <> 'RETIRED' AND EXISTS (SELECT 1 FROM adv)
    RETURNING 1
), regions AS (
    INSERT INTO custody_regions (region, enabled, updated_at)
    SELECT g.region, g.enabled, now()
    FROM unnest($25::text[], $26::boolean[]) AS g(region, enabled)
    WHERE EXISTS (SELECT 1 FROM adv)
    ON CONFLICT (region) DO UPDATE SET enabled = excluded.enabled, updated_at = excluded.updated_at
    RETURNING 1
)
SELECT (SELECT count(*) FROM adv), (SELECT count(*) FROM audit), (SELECT count(*) FROM keys),
    (SELECT last_seq FROM custody_shard_seq WHERE shard = $1), (SELECT count(*) FROM own),
    CASE WHEN (SELECT count(*) FROM adv) = 1 AND (SELECT count(*) FROM upd) <> cardinality($22::uuid[])
        -- not a constant, so the planner cannot fold it: raised only when this branch runs
        THEN ('custody: a lifecycle update matched ' || (SELECT count(*) FROM upd)
            || ' asset rows, not ' || cardinality($22::uuid[])
            || ' (missing asset or counter regression)')::integer
        ELSE (SELECT count(*) FROM upd)::integer END";

struct PgShardInner {
    config: PgConfig,
    token: i64,
    ownership: Ownership,
    on_fenced: FenceAlarm,
    shard: u16,
    shard_count: u16,
    session: RefCell<Option<Rc<Session>>>,
    /// After a failed connect: no new attempt before this instant (requests fail fast
    /// with STORE_UNAVAILABLE meanwhile), and the next wait.
    retry: std::cell::Cell<Option<(std::time::Instant, Duration)>>,
}

struct PgShard {
    inner: Rc<PgShardInner>,
}

impl PgShardInner {
    /// The shard's connection, (re)connected and its statements prepared if needed.
    async fn session(&self) -> Result<Rc<Session>, StoreError> {
        if let Some(s) = self.session.borrow().as_ref() {
            if !s.client.is_closed() {
                return Ok(s.clone());
            }
        }
        let now = std::time::Instant::now();
        if let Some((not_before, _)) = self.retry.get() {
            if now < not_before {
                return Err(StoreError::Unavailable(format!(
                    "postgres at {} is unreachable; next attempt in {} ms",
                    self.config.addr,
                    (not_before - now).as_millis()
                )));
            }
        }
        let attempt = futures_lite::future::or(async { Some(self.open_session().await) }, async {
            glommio::timer::sleep(CONNECT_TIMEOUT).await;
            None
        })
        .await;
        let result = attempt.unwrap_or_else(|| {
            Err(StoreError::Unavailable(format!(
                "postgres at {} did not answer within {} ms",
                self.config.addr,
                CONNECT_TIMEOUT.as_millis()
            )))
        });
        match &result {
            Ok(session) => {
                self.retry.set(None);
                *self.session.borrow_mut() = Some(session.clone());
            }
            Err(_) => {
                let wait = match self.retry.get() {
                    Some((_, last)) => (last * 2).min(RECONNECT_BACKOFF_MAX),
                    None => RECONNECT_BACKOFF_MIN,
                };
                self.retry
                    .set(Some((std::time::Instant::now() + wait, wait)));
            }
        }
        result
    }

    async fn open_session(&self) -> Result<Rc<Session>, StoreError> {
        let client = connect(&self.config).await?;
        let version = schema_version(&client).await?;
        if version != SCHEMA_VERSION {
            return Err(StoreError::Unavailable(format!(
                "database schema is version {version}, this build needs {SCHEMA_VERSION}: run `custodyd migrate`"
            )));
        }
        check_durability(&client, self.config.allow_unsafe_durability).await?;
        let commit_batch = client.prepare(COMMIT_BATCH_SQL).await.map_err(pg_err)?;
        Ok(Rc::new(Session {
            client: Rc::new(client),
            commit_batch,
        }))
    }

    async fn load(&self, window: RotationWindow) -> Result<ShardSnapshot, StoreError> {
        let s = self.session().await?;
        if self.shard == 0 {
            ensure_partitions(&s.client).await?;
            glommio::spawn_local(heartbeat(
                self.config.clone(),
                self.ownership,
                self.on_fenced.clone(),
            ))
            .detach();
            glommio::spawn_local(maintain_partitions(self.config.clone())).detach();
        }
        let last = self.last_seq(&s.client).await?;
        Ok(ShardSnapshot {
            assets: self.assets(&s.client).await?,
            last_seq: last.max(0) as u64,
            last_hash: self.hash_at(&s.client, last).await?,
            rotations: self.recent_rotations(&s.client, window).await?,
            regions: stored_regions(&s.client).await?,
        })
    }

    /// The shard's last committed sequence number (its row made from the log if the
    /// shard has none yet).
    async fn last_seq(&self, client: &Client) -> Result<i64, StoreError> {
        let shard = self.shard as i16;
        client
            .execute(
                "INSERT INTO custody_shard_seq (shard, last_seq) \
                 SELECT $1, COALESCE(max(seq), 0) FROM custody_audit_log WHERE shard = $1 \
                 ON CONFLICT (shard) DO NOTHING",
                &[&shard],
            )
            .await
            .map_err(pg_err)?;
        let row = client
            .query_one(
                "SELECT last_seq FROM custody_shard_seq WHERE shard = $1",
                &[&shard],
            )
            .await
            .map_err(pg_err)?;
        Ok(row.get(0))
    }

    /// The assets this shard owns.
    async fn assets(&self, client: &Client) -> Result<Vec<StoredAsset>, StoreError> {
        let rows = client
            .query(
                "SELECT asset_id, state, derivation_counter FROM custody_keys",
                &[],
            )
            .await
            .map_err(pg_err)?;
        let mut assets = Vec::new();
        for row in rows {
            let asset: Uuid = row.get(0);
            if shard_of(&asset, self.shard_count) == self.shard {
                assets.push(stored_asset(&row)?);
            }
        }
        Ok(assets)
    }

    /// The shard's rotations within `window`, oldest first.
    async fn recent_rotations(
        &self,
        client: &Client,
        window: RotationWindow,
    ) -> Result<Vec<RecentRotation>, StoreError> {
        let shard = self.shard as i16;
        let since = i64::try_from(window.since_ms).unwrap_or(i64::MAX);
        let max = i64::try_from(window.max).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT rotation_id, asset_id, counter, seq, \
                 (extract(epoch FROM logged_at) * 1000)::bigint, hash \
                 FROM custody_audit_log \
                 WHERE shard = $1 AND event = 'ROTATE' \
                 AND logged_at >= to_timestamp($2::bigint / 1000.0) \
                 ORDER BY logged_at DESC, seq DESC LIMIT $3",
                &[&shard, &since, &max],
            )
            .await
            .map_err(pg_err)?;
        let mut rotations = Vec::with_capacity(rows.len());
        for row in rows.iter().rev() {
            let rotation_id: Option<Uuid> = row.get(0);
            let number = |i: usize| -> Result<u64, StoreError> {
                let v: i64 = row.get(i);
                u64::try_from(v)
                    .map_err(|_| StoreError::Corrupt(format!("ROTATE record: column {i} is {v}")))
            };
            let seq = number(3)?;
            rotations.push(RecentRotation {
                rotation_id: rotation_id.ok_or_else(|| {
                    StoreError::Corrupt("ROTATE record without a rotation id".into())
                })?,
                asset: row.get(1),
                counter: number(2)?,
                seq,
                ts_ms: number(4)?,
                hash: super::hash_of(row.get(5), self.shard, seq)?,
            });
        }
        Ok(rotations)
    }

    /// The chain hash of the shard's record `last` (the genesis hash before any).
    async fn hash_at(&self, client: &Client, last: i64) -> Result<[u8; 32], StoreError> {
        if last <= 0 {
            return Ok(crate::audit::GENESIS);
        }
        let row = client
            .query_opt(
                "SELECT hash FROM custody_audit_log WHERE shard = $1 AND seq = $2",
                &[&(self.shard as i16), &last],
            )
            .await
            .map_err(pg_err)?;
        super::hash_of(
            row.and_then(|r| r.get::<_, Option<Vec<u8>>>(0)),
            self.shard,
            last as u64,
        )
    }

    async fn commit(&self, batch: CommitBatch) -> Result<(), StoreError> {
        let s = self.session().await?;
        self.write(&s, &batch).await
    }

    /// One batch in one statement (COMMIT_BATCH_SQL): the sequence advanced only if the
    /// batch continues it, the records, checkpoint, region switches and asset rows written,
    /// and the ownership token checked, all or nothing.
    async fn write(&self, s: &Session, batch: &CommitBatch) -> Result<(), StoreError> {
        let (Some(first), Some(last)) = (batch.records.first(), batch.records.last()) else {
            return Ok(());
        };
        let shard = batch.shard as i16;
        let (first_seq, last_seq) = (to_i64(first.seq, "seq")?, to_i64(last.seq, "seq")?);
        let c = RecordColumns::of(batch)?;
        let w = RowWrites::of(batch)?;
        let region_names: Vec<&str> = batch
            .region_writes
            .iter()
            .map(|w| w.region.as_str())
            .collect();
        let region_enabled: Vec<bool> = batch.region_writes.iter().map(|w| w.enabled).collect();
        let checkpoint_seq: Option<i64> = match &batch.checkpoint {
            Some(c) => Some(to_i64(c.seq, "seq")?),
            None => None,
        };
        let checkpoint_hash: Option<&[u8]> = batch.checkpoint.as_ref().map(|c| &c.hash[..]);
        let checkpoint_mac: Option<&[u8]> = batch.checkpoint.as_ref().map(|c| &c.mac[..]);
        let checkpoint_ts: Option<i64> = batch.checkpoint.as_ref().map(|c| c.ts_ms as i64);
        let row = s
            .client
            .query_one(
                &s.commit_batch,
                &[
                    &shard,
                    &(first_seq - 1),
                    &last_seq,
                    &c.seq,
                    &c.ts_ms,
                    &c.event,
                    &c.asset,
                    &c.counter,
                    &c.state,
                    &c.requester,
                    &c.request_id,
                    &c.path,
                    &c.purpose,
                    &c.region,
                    &c.ttl,
                    &c.scheme,
                    &w.ids,
                    &w.states,
                    &w.counters,
                    &self.token,
                    &c.rotation,
                    &w.upd_ids,
                    &w.upd_states,
                    &w.upd_counters,
                    &region_names,
                    &region_enabled,
                    &c.prev_hash,
                    &c.hash,
                    &checkpoint_seq,
                    &checkpoint_hash,
                    &checkpoint_mac,
                    &checkpoint_ts,
                ],
            )
            .await
            .map_err(pg_err)?;
        self.check_commit(&row, batch, &w)
    }

    /// What the statement says it did: fenced (another appliance owns the database), a
    /// sequence gap, or every record and row written.
    fn check_commit(
        &self,
        row: &tokio_postgres::Row,
        batch: &CommitBatch,
        w: &RowWrites<'_>,
    ) -> Result<(), StoreError> {
        let (advanced, audited, registered): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let updated: i32 = row.get(5);
        let owner: i64 = row.get(4);
        if owner != 1 {
            (self.on_fenced)(format!(
                "shard {} found at commit that another appliance owns the database (this one held token {})",
                batch.shard, self.token
            ));
            return Err(StoreError::Fenced { token: self.token });
        }
        if advanced != 1 {
            let committed: Option<i64> = row.get(3);
            return Err(StoreError::SequenceGap {
                shard: batch.shard,
                expected: committed.unwrap_or(0).max(0) as u64 + 1,
                found: batch.records.first().map_or(0, |r| r.seq),
            });
        }
        if audited != batch.records.len() as i64
            || registered != w.ids.len() as i64
            || updated as usize != w.upd_ids.len()
        {
            // Cannot happen inside one statement; refuse to call it committed if it does.
            return Err(StoreError::Corrupt(format!(
                "batch wrote {audited} of {} records, {registered} of {} registrations and {updated} of {} updates",
                batch.records.len(),
                w.ids.len(),
                w.upd_ids.len()
            )));
        }
        Ok(())
    }
}

fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} exceeds 2^63-1")))
}

/// A batch's audit records as the statement's column arrays (one element per record).
struct RecordColumns<'a> {
    seq: Vec<i64>,
    ts_ms: Vec<i64>,
    event: Vec<&'static str>,
    asset: Vec<Uuid>,
    counter: Vec<i64>,
    state: Vec<&'static str>,
    requester: Vec<&'a str>,
    request_id: Vec<i64>,
    path: Vec<Option<String>>,
    purpose: Vec<Option<&'static str>>,
    region: Vec<Option<&'a str>>,
    ttl: Vec<Option<i32>>,
    scheme: Vec<Option<i16>>,
    rotation: Vec<Option<Uuid>>,
    prev_hash: Vec<Option<&'a [u8]>>,
    hash: Vec<Option<&'a [u8]>>,
}

impl<'a> RecordColumns<'a> {
    fn of(batch: &'a CommitBatch) -> Result<RecordColumns<'a>, StoreError> {
        let n = batch.records.len();
        let mut c = RecordColumns {
            seq: Vec::with_capacity(n),
            ts_ms: Vec::with_capacity(n),
            event: Vec::with_capacity(n),
            asset: Vec::with_capacity(n),
            counter: Vec::with_capacity(n),
            state: Vec::with_capacity(n),
            requester: Vec::with_capacity(n),
            request_id: Vec::with_capacity(n),
            path: Vec::with_capacity(n),
            purpose: Vec::with_capacity(n),
            region: Vec::with_capacity(n),
            ttl: Vec::with_capacity(n),
            scheme: Vec::with_capacity(n),
            rotation: Vec::with_capacity(n),
            prev_hash: Vec::with_capacity(n),
            hash: Vec::with_capacity(n),
        };
        let chained = batch.chain.len() == n;
        for (i, r) in batch.records.iter().enumerate() {
            if chained {
                let prev = if i == 0 {
                    &batch.chain_prev
                } else {
                    &batch.chain[i - 1]
                };
                c.prev_hash.push(Some(&prev[..]));
                c.hash.push(Some(&batch.chain[i][..]));
            } else {
                c.prev_hash.push(None);
                c.hash.push(None);
            }
            c.seq.push(to_i64(r.seq, "seq")?);
            c.ts_ms.push(r.ts_ms as i64);
            c.event.push(r.event.name());
            c.asset.push(r.asset);
            c.counter.push(to_i64(r.counter, "counter")?);
            c.state.push(r.state.name());
            c.requester.push(&*r.requester);
            c.request_id.push(r.request_id as i64);
            c.path.push(r.derive.as_ref().map(|d| d.path.to_string()));
            c.purpose.push(r.derive.as_ref().map(|d| d.purpose.name()));
            c.region.push(
                r.derive
                    .as_ref()
                    .map(|d| &*d.region)
                    .or(r.switched_region.as_deref()),
            );
            c.ttl.push(r.derive.as_ref().map(|d| d.ttl_s as i32));
            c.scheme
                .push(r.derive.as_ref().map(|d| i16::from(d.scheme_version)));
            c.rotation.push(r.rotation_id);
        }
        Ok(c)
    }
}

/// A batch's asset rows as the statement's arrays: registrations to insert, and updates.
struct RowWrites<'a> {
    ids: Vec<Uuid>,
    states: Vec<&'a str>,
    counters: Vec<i64>,
    upd_ids: Vec<Uuid>,
    upd_states: Vec<&'a str>,
    upd_counters: Vec<i64>,
}

impl<'a> RowWrites<'a> {
    fn of(batch: &'a CommitBatch) -> Result<RowWrites<'a>, StoreError> {
        let mut w = RowWrites {
            ids: Vec::new(),
            states: Vec::new(),
            counters: Vec::new(),
            upd_ids: Vec::new(),
            upd_states: Vec::new(),
            upd_counters: Vec::new(),
        };
        for a in &batch.asset_writes {
            let counter = to_i64(a.counter, "counter")?;
            if a.insert {
                w.ids.push(a.asset);
                w.states.push(a.state.name());
                w.counters.push(counter);
            } else {
                w.upd_ids.push(a.asset);
                w.upd_states.push(a.state.name());
                w.upd_counters.push(counter);
            }
        }
        Ok(w)
    }
}

/// Every region switch the store holds, by name.
async fn stored_regions(client: &Client) -> Result<Vec<(String, bool)>, StoreError> {
    let rows = client
        .query(
            "SELECT region, enabled FROM custody_regions ORDER BY region",
            &[],
        )
        .await
        .map_err(pg_err)?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, bool>(1)))
        .collect())
}

impl ShardStore for PgShard {
    fn load_with(
        &self,
        rotations: RotationWindow,
    ) -> LocalFuture<Result<ShardSnapshot, StoreError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.load(rotations).await })
    }

    fn commit(&self, batch: CommitBatch) -> LocalFuture<Result<(), StoreError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.commit(batch).await })
    }
}

/// glommio's streams speak the futures I/O traits; tokio-postgres speaks tokio's.
pub struct TokioIo<S>(pub S);

impl<S: futures_lite::AsyncRead + Unpin> tokio::io::AsyncRead for TokioIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let unfilled = buf.initialize_unfilled();
        match Pin::new(&mut self.0).poll_read(cx, unfilled) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: futures_lite::AsyncWrite + Unpin> tokio::io::AsyncWrite for TokioIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

/// Every audit row as (shard, seq, event, asset, counter), in (shard, seq) order: for
/// verification and the conformance tests.
pub async fn audit_rows(client: &Client) -> Result<Vec<(u16, u64, String, Uuid, u64)>, StoreError> {
    let rows = client
        .query(
            "SELECT shard, seq, event, asset_id, counter FROM custody_audit_log ORDER BY shard, seq",
            &[],
        )
        .await
        .map_err(pg_err)?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i16>(0) as u16,
                r.get::<_, i64>(1) as u64,
                r.get::<_, String>(2),
                r.get::<_, Uuid>(3),
                r.get::<_, i64>(4) as u64,
            )
        })
        .collect())
}

/// A database as the reconciler's source (read-only queries on one connection).
pub struct PgAuditSource {
    pub client: Rc<Client>,
}

const AUDIT_ROW_COLUMNS: &str = "shard, seq, event, asset_id, counter, state_at_event, \
    requester, request_id, (extract(epoch FROM logged_at) * 1000)::bigint, derivation_path, \
    purpose, region, ttl_s, scheme_version, rotation_id, prev_hash, hash";

fn audit_row(r: &tokio_postgres::Row) -> Result<super::AuditRow, StoreError> {
    let (shard, seq) = (r.get::<_, i16>(0) as u16, r.get::<_, i64>(1) as u64);
    let bad = |what: String| StoreError::Corrupt(format!("shard {shard} record {seq}: {what}"));
    let event: String = r.get(2);
    let state: String = r.get(5);
    let hash = |i: usize| -> Result<Option<[u8; 32]>, StoreError> {
        match r.get::<_, Option<Vec<u8>>>(i) {
            None => Ok(None),
            Some(b) => super::hash_of(Some(b), shard, seq).map(Some),
        }
    };
    Ok(super::AuditRow {
        shard,
        seq,
        event: crate::audit::AuditEvent::from_name(&event)
            .ok_or_else(|| bad(format!("event {event:?}")))?,
        asset: r.get(3),
        counter: r.get::<_, i64>(4) as u64,
        state: AssetState::from_name(&state).ok_or_else(|| bad(format!("state {state:?}")))?,
        requester: r.get(6),
        request_id: r.get::<_, i64>(7) as u64,
        ts_ms: r.get::<_, i64>(8).max(0) as u64,
        derivation_path: r.get(9),
        purpose: r.get(10),
        region: r.get(11),
        ttl_s: r.get::<_, Option<i32>>(12).map(|t| t as u32),
        scheme_version: r.get::<_, Option<i16>>(13).map(|v| v as u8),
        rotation_id: r.get(14),
        prev_hash: hash(15)?,
        hash: hash(16)?,
    })
}

/// A row of `SELECT asset_id, state, derivation_counter FROM custody_keys`.
fn stored_asset(row: &tokio_postgres::Row) -> Result<StoredAsset, StoreError> {
    let asset: Uuid = row.get(0);
    let state: String = row.get(1);
    let counter: i64 = row.get(2);
    Ok(StoredAsset {
        asset,
        state: AssetState::from_name(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("asset {asset}: state {state:?}")))?,
        counter: u64::try_from(counter)
            .map_err(|_| StoreError::Corrupt(format!("asset {asset}: counter {counter}")))?,
    })
}

fn checkpoint_row(r: &tokio_postgres::Row) -> Result<super::Checkpoint, StoreError> {
    let (shard, seq) = (r.get::<_, i16>(0) as u16, r.get::<_, i64>(1) as u64);
    Ok(super::Checkpoint {
        shard,
        seq,
        hash: super::hash_of(Some(r.get(2)), shard, seq)?,
        mac: super::hash_of(Some(r.get(3)), shard, seq)?,
        ts_ms: r.get::<_, i64>(4).max(0) as u64,
    })
}

impl crate::reconcile::AuditSource for PgAuditSource {
    fn begin(&self) -> super::LocalFuture<Result<(), StoreError>> {
        let client = self.client.clone();
        Box::pin(async move {
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(pg_err)
        })
    }

    fn end(&self) -> super::LocalFuture<Result<(), StoreError>> {
        let client = self.client.clone();
        Box::pin(async move { client.batch_execute("COMMIT").await.map_err(pg_err) })
    }

    fn shards(&self) -> super::LocalFuture<Result<Vec<u16>, StoreError>> {
        let client = self.client.clone();
        Box::pin(async move {
            let rows = client
                .query(
                    // A loose index scan of the checkpoints' primary key (see the
                    // SQLite store's SHARDS_SQL): DISTINCT would read the whole table.
                    "WITH RECURSIVE c(shard) AS ( \
                       SELECT min(shard) FROM custody_audit_checkpoints UNION ALL \
                       SELECT (SELECT min(shard) FROM custody_audit_checkpoints \
                               WHERE shard > c.shard) \
                       FROM c WHERE c.shard IS NOT NULL) \
                     SELECT shard FROM custody_shard_seq UNION \
                     SELECT shard FROM c WHERE shard IS NOT NULL ORDER BY 1",
                    &[],
                )
                .await
                .map_err(pg_err)?;
            Ok(rows.iter().map(|r| r.get::<_, i16>(0) as u16).collect())
        })
    }

    fn last_seq(&self, shard: u16) -> super::LocalFuture<Result<u64, StoreError>> {
        let client = self.client.clone();
        Box::pin(async move {
            let row = client
                .query_one(
                    "SELECT COALESCE(max(seq), 0) FROM custody_audit_log WHERE shard = $1",
                    &[&(shard as i16)],
                )
                .await
                .map_err(pg_err)?;
            Ok(row.get::<_, i64>(0).max(0) as u64)
        })
    }

    fn records(
        &self,
        shard: u16,
        from_seq: u64,
        limit: usize,
    ) -> super::LocalFuture<Result<Vec<super::RowRead>, StoreError>> {
        let client = self.client.clone();
        Box::pin(async move {
            let from = i64::try_from(from_seq).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client
                .query(
                    &format!(
                        "SELECT {AUDIT_ROW_COLUMNS} FROM custody_audit_log \
                         WHERE shard = $1 AND seq >= $2 AND seq < $2 + $3 ORDER BY seq"
                    ),
                    &[&(shard as i16), &from, &limit],
                )
                .await
                .map_err(pg_err)?;
            Ok(rows
                .iter()
                .map(|r| super::RowRead {
                    seq: r.get::<_, i64>(1).max(0) as u64,
                    row: audit_row(r).map_err(|e| e.to_string()),
                })
                .collect())
        })
    }

    fn checkpoints(
        &self,
        shard: u16,
        from_seq: u64,
        to_seq: u64,
    ) -> super::LocalFuture<Result<Vec<super::Checkpoint>, StoreError>> {
        let client = self.client.clone();
        Box::pin(async move {
            let from = i64::try_from(from_seq).unwrap_or(i64::MAX);
            let to = i64::try_from(to_seq).unwrap_or(i64::MAX);
            let rows = client
                .query(
                    "SELECT shard, seq, hash, mac, (extract(epoch FROM logged_at) * 1000)::bigint \
                     FROM custody_audit_checkpoints WHERE shard = $1 AND seq >= $2 AND seq <= $3 \
                     ORDER BY seq",
                    &[&(shard as i16), &from, &to],
                )
                .await
                .map_err(pg_err)?;
            rows.iter().map(checkpoint_row).collect()
        })
    }

    fn assets(&self) -> super::LocalFuture<Result<Vec<super::StoredAsset>, StoreError>> {
        let client = self.client.clone();
        Box::pin(async move {
            let rows = client
                .query(
                    "SELECT asset_id, state, derivation_counter FROM custody_keys",
                    &[],
                )
                .await
                .map_err(pg_err)?;
            rows.iter().map(stored_asset).collect()
        })
    }

    fn asset_page(
        &self,
        after: Uuid,
        state: Option<AssetState>,
        limit: usize,
    ) -> super::LocalFuture<Result<Vec<super::ListedRow>, StoreError>> {
        let client = self.client.clone();
        Box::pin(async move {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let state = state.map(AssetState::name);
            let rows = client
                .query(
                    "SELECT asset_id, state, derivation_counter, \
                     (extract(epoch FROM updated_at) * 1000)::bigint FROM custody_keys \
                     WHERE asset_id > $1 AND ($2::text IS NULL OR state = $2) \
                     ORDER BY asset_id LIMIT $3",
                    &[&after, &state, &limit],
                )
                .await
                .map_err(pg_err)?;
            rows.iter()
                .map(|row| {
                    Ok(super::ListedRow {
                        asset: stored_asset(row)?,
                        changed_unix_ms: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
                    })
                })
                .collect()
        })
    }
}

/// Every audit checkpoint, in (shard, seq) order.
pub async fn checkpoints(client: &Client) -> Result<Vec<super::Checkpoint>, StoreError> {
    let rows = client
        .query(
            "SELECT shard, seq, hash, mac, (extract(epoch FROM logged_at) * 1000)::bigint \
             FROM custody_audit_checkpoints ORDER BY shard, seq",
            &[],
        )
        .await
        .map_err(pg_err)?;
    rows.iter().map(checkpoint_row).collect()
}

/// Takes the store for a new appliance instance, on an executor of its own thread (used
/// at start-up, before the cores exist).
pub fn acquire_ownership_blocking(config: &PgConfig) -> Result<Ownership, StoreError> {
    let config = config.clone();
    on_own_executor("custody-owner", move || async move {
        let client = connect(&config).await?;
        let version = schema_version(&client).await?;
        if version != SCHEMA_VERSION {
            return Err(StoreError::Unavailable(format!(
                "database schema is version {version}, this build needs {SCHEMA_VERSION}: run `custodyd migrate`"
            )));
        }
        acquire_ownership(&client, Uuid::new_v4(), config.owner_lease).await
    })?
}

/// Runs a future on a glommio executor of a thread of its own and waits for it. A
/// PostgreSQL connection is driven by the executor that made it, so code outside the
/// appliance's cores (start-up, `custodyd migrate`, the load harness, tests) talks to the
/// database this way.
pub fn on_own_executor<T, F>(
    name: &str,
    make: impl FnOnce() -> F + Send + 'static,
) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + 'static,
{
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || -> Result<T, StoreError> {
            let ex = glommio::LocalExecutorBuilder::default()
                .io_memory(256 * 1024)
                .make()
                .map_err(|e| StoreError::Unavailable(format!("cannot start an executor: {e}")))?;
            Ok(ex.run(make()))
        })
        .map_err(|e| StoreError::Unavailable(format!("cannot start a thread: {e}")))?
        .join()
        .unwrap_or_else(|_| Err(StoreError::Unavailable(format!("thread {name} panicked"))))
}

impl PgConfig {
    /// Connection settings from a `postgresql://user[:password]@host[:port]/dbname` URL
    /// (tests and the load harness; the appliance reads its config file).
    pub fn from_url(url: &str) -> Result<PgConfig, StoreError> {
        use std::net::ToSocketAddrs;
        let parsed: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("database URL: {e}")))?;
        let host = match parsed.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".into(),
        };
        let port = parsed.get_ports().first().copied().unwrap_or(5432);
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| StoreError::Unavailable(format!("{host}:{port} does not resolve")))?;
        Ok(PgConfig {
            addr,
            dbname: parsed.get_dbname().unwrap_or("postgres").to_owned(),
            user: parsed.get_user().unwrap_or("postgres").to_owned(),
            password: parsed
                .get_password()
                .map(|p| zeroize::Zeroizing::new(String::from_utf8_lossy(p).into_owned())),
            allow_unsafe_durability: false,
            owner_lease: Duration::from_secs(10),
            partition_check: Duration::from_secs(3600),
            tls: match parsed.get_ssl_mode() {
                // `prefer` is the driver's default when the URL names none; custody does
                // not fall back silently, so it means plain TCP here.
                tokio_postgres::config::SslMode::Require => {
                    PgTls::new(SslMode::Require, &host, None)
                        .map_err(|e| StoreError::Unavailable(format!("database URL: {e}")))?
                }
                _ => PgTls::disabled(),
            },
        })
    }
}
