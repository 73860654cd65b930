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
use crate::lease::{Lease, WHOLE_ASSET_SPACE};
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

pub use crate::config::PgConfig;

mod connect;
mod lease;
mod reader;
mod schema;
mod shard;

pub use connect::*;
pub use lease::*;
pub use reader::*;
pub use schema::*;
use shard::*;

/// The PostgreSQL store: each shard connects on first use from its own core, and every
/// commit carries the fencing token its shard was loaded under ([`crate::lease`]).
pub struct PgStore {
    config: PgConfig,
    lease: Arc<Lease>,
    /// This appliance at the store (`None`: a tool or test holding a fixed token).
    instance: Option<Uuid>,
}

/// What a tool or test holds once it owns the store with [`acquire_ownership`].
#[derive(Clone, Copy, Debug)]
pub struct Ownership {
    pub instance: Uuid,
    pub token: i64,
    pub lease: Duration,
}

impl PgStore {
    /// A store held with a token taken once ([`acquire_ownership`]) and never renewed:
    /// tools, tests and benches.
    pub fn new(config: PgConfig, ownership: Ownership) -> PgStore {
        PgStore {
            config,
            lease: Arc::new(Lease::held(ownership.token)),
            instance: Some(ownership.instance),
        }
    }

    /// The appliance's store: the lease keeper ([`spawn_lease_keeper`]) moves `lease`;
    /// shards load and commit under the token it holds.
    pub fn shared(config: PgConfig, lease: Arc<Lease>, instance: Uuid) -> PgStore {
        PgStore {
            config,
            lease,
            instance: Some(instance),
        }
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

impl Store for PgStore {
    fn open_shard(&self, shard: u16, shard_count: u16) -> Box<dyn ShardStore> {
        Box::new(PgShard {
            inner: Rc::new(PgShardInner {
                config: self.config.clone(),
                // Until its first load: the token held now (a tool's fixed one).
                token: std::cell::Cell::new(self.lease.token()),
                lease: self.lease.clone(),
                shard,
                shard_count,
                session: RefCell::new(None),
                retry: std::cell::Cell::new(None),
            }),
        })
    }

    fn release(&self, limit: Duration) -> Result<bool, StoreError> {
        self.lease.leave();
        let (token, Some(instance)) = (self.lease.token(), self.instance) else {
            return Ok(false);
        };
        if token == 0 {
            return Ok(false);
        }
        let config = self.config.clone();
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
                             WHERE id = $3 AND instance = $1 AND token = $2",
                            &[&instance, &token, &WHOLE_ASSET_SPACE],
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
            self.config.user,
            self.config.hosts_text(),
            self.config.dbname
        )
    }
}

/// Checks, before the appliance starts, that the database is reachable and its schema is
/// this build's (on an executor of its own thread: the cores do not exist yet).
pub fn check_schema_blocking(config: &PgConfig) -> Result<(), StoreError> {
    let config = config.clone();
    on_own_executor("custody-schema", move || async move {
        let client = connect(&config).await?;
        let version = schema_version(&client).await?;
        if version != SCHEMA_VERSION {
            return Err(StoreError::Unavailable(format!(
                "database schema is version {version}, this build needs {SCHEMA_VERSION}: run `custodyd migrate`"
            )));
        }
        Ok(())
    })?
}
