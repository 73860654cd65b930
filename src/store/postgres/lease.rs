//! The owner lease at PostgreSQL: the I/O of [`crate::lease`].
//!
//! One thread of its own ("custody-lease", a glommio executor) keeps the lease, so that a
//! busy core never delays a renewal into self-fencing. A standby looks at the lease row
//! every [`LeaseTiming::watch_every`] and takes it once it has lapsed by PostgreSQL's
//! clock (`now()` against the holder's last `heartbeat_at` plus the holder's `lease_ms`);
//! taking it moves the fencing token forward. The active renews every
//! [`LeaseTiming::renew_every`]; a renewal that matches no row means another appliance
//! holds a newer token, and this one steps down. A renewal that fails or does not answer
//! in time changes nothing: the cores stop acknowledging on their own once the last good
//! renewal is older than the lease minus the margin, and acknowledge again if a later
//! renewal of the same token succeeds (nobody else took it meanwhile).
//!
//! The active also keeps the audit log's coming partitions made (a task of its own on
//! this thread, with its own connection, so slow DDL never holds a renewal up).

use super::*;
use crate::lease::{Lease, LeaseTiming, WHOLE_ASSET_SPACE};
use std::time::Instant;

/// Who this appliance is at the store, and where its clients reach it.
#[derive(Clone)]
pub struct Claimant {
    pub instance: Uuid,
    /// `server.advertise`: what standbys name in their NOT_ACTIVE replies.
    pub address: String,
    pub timing: LeaseTiming,
    /// The fingerprint of the root seed this appliance serves with, while it can derive
    /// (unsealed, or serving a stale seed); `None` while sealed. An appliance takes the
    /// lease only while it can serve, and only for a store written under its seed; an
    /// active that can no longer serve gives the lease up for a standby that can.
    pub serving_seed: Arc<dyn Fn() -> Option<String> + Send + Sync>,
}

impl std::fmt::Debug for Claimant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimant")
            .field("instance", &self.instance)
            .field("address", &self.address)
            .field("timing", &self.timing)
            .finish()
    }
}

/// What the first look at the lease found (start-up waits for it, so that the cores
/// load their shards under the token when this appliance is the one to take it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirstLook {
    Active {
        token: i64,
    },
    Standby {
        active: Option<String>,
    },
    /// PostgreSQL did not answer; the keeper goes on trying.
    Unreachable(String),
}

/// Starts the lease thread; returns what its first attempt found (within `wait`).
pub fn spawn_lease_keeper(
    config: PgConfig,
    lease: Arc<Lease>,
    claimant: Claimant,
    wait: Duration,
) -> Result<FirstLook, StoreError> {
    let (tell, first) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("custody-lease".into())
        .spawn(move || {
            let ex = match glommio::LocalExecutorBuilder::default()
                .io_memory(256 * 1024)
                .make()
            {
                Ok(ex) => ex,
                Err(e) => {
                    let _ = tell.send(FirstLook::Unreachable(format!(
                        "cannot start the lease executor: {e}"
                    )));
                    return;
                }
            };
            ex.run(keep(config, lease, claimant, tell));
        })
        .map_err(|e| StoreError::Unavailable(format!("cannot start the lease thread: {e}")))?;
    Ok(first.recv_timeout(wait).unwrap_or_else(|_| {
        FirstLook::Unreachable(format!(
            "no answer from PostgreSQL within {} ms",
            wait.as_millis()
        ))
    }))
}

/// The keeper's life: watch or renew, forever (the process ends it).
async fn keep(
    config: PgConfig,
    lease: Arc<Lease>,
    claimant: Claimant,
    first: std::sync::mpsc::Sender<FirstLook>,
) {
    glommio::spawn_local(keep_partitions(config.clone(), lease.clone())).detach();
    let mut first = Some(first);
    let mut client: Option<Client> = None;
    loop {
        let look = look_once(&config, &lease, &claimant, &mut client).await;
        if let Some(tell) = first.take() {
            let _ = tell.send(look);
        }
        let pause = match lease.token() {
            0 => claimant.timing.watch_every(),
            _ => claimant.timing.renew_every(),
        };
        glommio::timer::sleep(pause).await;
    }
}

/// One round: (re)connect if needed (each host within the connect timeout), then take
/// the lease (standby) or renew it (active) within a renewal interval.
async fn look_once(
    config: &PgConfig,
    lease: &Lease,
    claimant: &Claimant,
    client: &mut Option<Client>,
) -> FirstLook {
    if lease.leaving() {
        return FirstLook::Standby { active: None };
    }
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        match connect(config).await {
            Ok(c) => *client = Some(c),
            Err(e) => return unreachable(lease, client, e.to_string()),
        }
    }
    let Some(c) = client.as_ref() else {
        return unreachable(lease, client, "no connection".into());
    };
    let limit = claimant
        .timing
        .renew_every()
        .max(Duration::from_millis(100));
    let round = async {
        match lease.token() {
            0 => take_or_watch(c, lease, claimant).await,
            token => renew(c, lease, claimant, token).await,
        }
    };
    let outcome = futures_lite::future::or(async { Some(round.await) }, async {
        glommio::timer::sleep(limit).await;
        None
    })
    .await;
    match outcome {
        Some(Ok(look)) => look,
        Some(Err(e)) => unreachable(lease, client, e.to_string()),
        None => unreachable(
            lease,
            client,
            format!("no answer within {} ms", limit.as_millis()),
        ),
    }
}

/// A round that did not reach PostgreSQL: the connection is dropped (the next round
/// makes a new one, finding the writable server again).
fn unreachable(lease: &Lease, client: &mut Option<Client>, why: String) -> FirstLook {
    *client = None;
    tracing::warn!(role = lease.role().name(), %why, "owner lease: PostgreSQL did not answer");
    FirstLook::Unreachable(why)
}

/// A standby's round: take the lease if it has lapsed, else note who holds it.
async fn take_or_watch(
    client: &Client,
    lease: &Lease,
    claimant: &Claimant,
) -> Result<FirstLook, StoreError> {
    let Some(seed) = (claimant.serving_seed)() else {
        // Sealed: it could not derive; let an unsealed appliance take the lease.
        let active = holder_address(client).await?;
        lease.set_active_address(active.clone());
        return Ok(FirstLook::Standby { active });
    };
    let sent = Instant::now();
    if let Some(token) = try_take(client, claimant, &seed).await? {
        lease.acquired(token, sent, &claimant.timing);
        tracing::info!(token, instance = %claimant.instance, address = %claimant.address, "took the store's lease: active once every core has loaded its shard");
        return Ok(FirstLook::Active { token });
    }
    let active = holder_address(client).await?;
    lease.set_active_address(active.clone());
    Ok(FirstLook::Standby { active })
}

/// Takes the lease when nobody holds it or its holder's lease has lapsed by PostgreSQL's
/// clock; the new token, or `None` while another appliance's lease is live.
pub(super) async fn try_take(
    client: &Client,
    claimant: &Claimant,
    seed: &str,
) -> Result<Option<i64>, StoreError> {
    let lease_ms = claimant.timing.lease.as_millis() as i64;
    let row = client
        .query_opt(
            "UPDATE custody_owner SET instance = $1, token = token + 1, heartbeat_at = now(), \
             lease_ms = $2, address = $3, acquired_at = now(), \
             seed_fingerprint = COALESCE(seed_fingerprint, $5) \
             WHERE id = $4 AND (instance IS NULL OR heartbeat_at IS NULL \
               OR heartbeat_at < now() - make_interval(secs => lease_ms / 1000.0)) \
             AND (seed_fingerprint IS NULL OR seed_fingerprint = $5) \
             RETURNING token",
            &[
                &claimant.instance,
                &lease_ms,
                &claimant.address,
                &WHOLE_ASSET_SPACE,
                &seed,
            ],
        )
        .await
        .map_err(pg_err)?;
    if row.is_none() {
        warn_if_other_seed(client, seed).await?;
    }
    Ok(row.map(|r| r.get(0)))
}

static OTHER_SEED_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says so (an error, once) when the store was written under another root seed than this
/// appliance's: it will never take the lease (its keys and audit key would not be the
/// store's).
async fn warn_if_other_seed(client: &Client, seed: &str) -> Result<(), StoreError> {
    let row = client
        .query_opt(
            "SELECT seed_fingerprint FROM custody_owner WHERE id = $1",
            &[&WHOLE_ASSET_SPACE],
        )
        .await
        .map_err(pg_err)?;
    if let Some(stored) = row.and_then(|r| r.get::<_, Option<String>>(0)) {
        // Once per process: the keeper asks every watch interval.
        if stored != seed && !OTHER_SEED_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(
                store_seed = %stored,
                this_seed = %seed,
                "this appliance is unsealed with another root seed than the store was written under: it stays a standby and never takes the lease"
            );
        }
    }
    Ok(())
}

/// The client address of the lease's holder, when one holds it.
async fn holder_address(client: &Client) -> Result<Option<String>, StoreError> {
    let row = client
        .query_opt(
            "SELECT address FROM custody_owner WHERE id = $1 AND instance IS NOT NULL",
            &[&WHOLE_ASSET_SPACE],
        )
        .await
        .map_err(pg_err)?;
    Ok(row.and_then(|r| r.get::<_, Option<String>>(0)))
}

/// The active's round: renew `token`; step down if another appliance holds a newer one.
async fn renew(
    client: &Client,
    lease: &Lease,
    claimant: &Claimant,
    token: i64,
) -> Result<FirstLook, StoreError> {
    if (claimant.serving_seed)().is_none() {
        return give_up(client, lease, claimant, token).await;
    }
    let sent = Instant::now();
    let renewed = client
        .execute(
            "UPDATE custody_owner SET heartbeat_at = now() \
             WHERE id = $1 AND token = $2 AND instance = $3",
            &[&WHOLE_ASSET_SPACE, &token, &claimant.instance],
        )
        .await
        .map_err(pg_err)?;
    if renewed == 1 {
        lease.renewed(token, sent, &claimant.timing);
        return Ok(FirstLook::Active { token });
    }
    if lease.step_down(token) {
        tracing::warn!(
            token,
            "another appliance took the store's lease over: this one is a standby now and acknowledges nothing"
        );
    }
    let active = holder_address(client).await?;
    lease.set_active_address(active.clone());
    Ok(FirstLook::Standby { active })
}

/// The active can no longer derive (sealed by an operator, or the HSM failed past its
/// grace): it steps down and hands the lease on at once, so that an unsealed standby
/// serves instead of this one answering SEALED.
async fn give_up(
    client: &Client,
    lease: &Lease,
    claimant: &Claimant,
    token: i64,
) -> Result<FirstLook, StoreError> {
    if lease.step_down(token) {
        tracing::warn!(
            token,
            "sealed: this appliance gives the store's lease up for an unsealed standby"
        );
    }
    client
        .execute(
            "UPDATE custody_owner SET instance = NULL WHERE id = $1 AND token = $2 AND instance = $3",
            &[&WHOLE_ASSET_SPACE, &token, &claimant.instance],
        )
        .await
        .map_err(pg_err)?;
    Ok(FirstLook::Standby { active: None })
}

/// While this appliance holds the lease, keeps the audit log's coming months'
/// partitions made (at once on taking it, then every `partition_check`; after a failure,
/// again in [`PARTITION_RETRY`]).
async fn keep_partitions(config: PgConfig, lease: Arc<Lease>) {
    let mut made_for = 0i64;
    let mut last: Option<Instant> = None;
    loop {
        glommio::timer::sleep(Duration::from_millis(200)).await;
        let token = lease.token();
        let since = last.map_or(Duration::MAX, |t| t.elapsed());
        let due = token != 0
            && ((token != made_for && since >= PARTITION_RETRY) || since >= config.partition_check);
        if !due {
            continue;
        }
        last = Some(Instant::now());
        match connect(&config).await {
            Ok(c) => match ensure_partitions(&c).await {
                Ok(()) => made_for = token,
                Err(e) => tracing::warn!(error = %e, "audit-log partitions not made"),
            },
            Err(e) => tracing::warn!(error = %e, "audit-log partitions: PostgreSQL unreachable"),
        }
    }
}

/// How soon partitions are tried again after a failure.
const PARTITION_RETRY: Duration = Duration::from_secs(5);
