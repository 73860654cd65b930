//! One shard's connection: its session (reconnected with back-off), the snapshot it loads
//! at start and after a re-read, and each batch written in one statement.

use super::*;

pub(super) struct Session {
    pub(super) client: Rc<Client>,
    pub(super) commit_batch: Statement,
}

/// A whole batch in one statement, hence one implicit transaction and one round trip:
/// move the shard's sequence row forward only if the batch continues it, and insert the
/// records and registrations and apply the lifecycle updates only if it did. The counts
/// say which happened. An update that would move a counter backward (I2) matches no row,
/// and then the statement raises an error, so nothing of the batch is kept. (The shard
/// sends at most one write per asset per batch.)
pub(super) const COMMIT_BATCH_SQL: &str = "\
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

pub(super) struct PgShardInner {
    pub(super) config: PgConfig,
    /// The fencing token the shard's state was loaded under: its commits carry it.
    pub(super) token: std::cell::Cell<i64>,
    pub(super) lease: Arc<Lease>,
    pub(super) shard: u16,
    pub(super) shard_count: u16,
    pub(super) session: RefCell<Option<Rc<Session>>>,
    /// After a failed connect: no new attempt before this instant (requests fail fast
    /// with STORE_UNAVAILABLE meanwhile), and the next wait.
    pub(super) retry: std::cell::Cell<Option<(std::time::Instant, Duration)>>,
}

pub(super) struct PgShard {
    pub(super) inner: Rc<PgShardInner>,
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
                    self.config.hosts_text(),
                    (not_before - now).as_millis()
                )));
            }
        }
        // `connect` gives each host the connect timeout; the session (its first queries
        // too) gets as many.
        let limit = CONNECT_TIMEOUT * self.config.hosts.len().max(1) as u32;
        let attempt = futures_lite::future::or(async { Some(self.open_session().await) }, async {
            glommio::timer::sleep(limit).await;
            None
        })
        .await;
        let result = attempt.unwrap_or_else(|| {
            Err(StoreError::Unavailable(format!(
                "postgres at {} did not answer within {} ms",
                self.config.hosts_text(),
                limit.as_millis()
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

    /// The shard as the store holds it, read under the lease's token of now (which its
    /// commits then carry; a standby reads under none, and commits nothing).
    async fn load(&self, window: RotationWindow) -> Result<ShardSnapshot, StoreError> {
        let token = self.lease.token();
        let s = self.session().await?;
        let last = self.last_seq(&s.client).await?;
        let snapshot = ShardSnapshot {
            assets: self.assets(&s.client).await?,
            last_seq: last.max(0) as u64,
            last_hash: self.hash_at(&s.client, last).await?,
            rotations: self.recent_rotations(&s.client, window).await?,
            regions: stored_regions(&s.client).await?,
        };
        self.token.set(token);
        Ok(snapshot)
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
                hash: crate::store::hash_of(row.get(5), self.shard, seq)?,
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
        crate::store::hash_of(
            row.and_then(|r| r.get::<_, Option<Vec<u8>>>(0)),
            self.shard,
            last as u64,
        )
    }

    /// Commits under the token the shard was loaded under, and calls the batch durable
    /// only if this appliance may still acknowledge under it (else its answers could
    /// leave after the lease lapsed: [`StoreError::LeaseLapsed`]).
    async fn commit(&self, batch: CommitBatch) -> Result<(), StoreError> {
        let token = self.token.get();
        if self.lease.token() != token {
            return Err(StoreError::Fenced { token });
        }
        let s = self.session().await?;
        self.write(&s, &batch, token).await?;
        if !self.lease.may_acknowledge_for(token) {
            return Err(StoreError::LeaseLapsed { token });
        }
        Ok(())
    }

    /// One batch in one statement (COMMIT_BATCH_SQL): the sequence advanced only if the
    /// batch continues it, the records, checkpoint, region switches and asset rows written,
    /// and the ownership token checked, all or nothing.
    async fn write(&self, s: &Session, batch: &CommitBatch, token: i64) -> Result<(), StoreError> {
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
                    &token,
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
        self.check_commit(&row, batch, &w, token)
    }

    /// What the statement says it did: fenced (another appliance owns the database), a
    /// sequence gap, or every record and row written.
    fn check_commit(
        &self,
        row: &tokio_postgres::Row,
        batch: &CommitBatch,
        w: &RowWrites<'_>,
        token: i64,
    ) -> Result<(), StoreError> {
        let (advanced, audited, registered): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let updated: i32 = row.get(5);
        let owner: i64 = row.get(4);
        if owner != 1 {
            if self.lease.step_down(token) {
                tracing::warn!(
                    shard = batch.shard,
                    token,
                    "a commit found another appliance holding the store's lease: this one is a standby now"
                );
            }
            return Err(StoreError::Fenced { token });
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

pub(super) fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} exceeds 2^63-1")))
}

/// A batch's audit records as the statement's column arrays (one element per record).
pub(super) struct RecordColumns<'a> {
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
pub(super) struct RowWrites<'a> {
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
pub(super) async fn stored_regions(client: &Client) -> Result<Vec<(String, bool)>, StoreError> {
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
