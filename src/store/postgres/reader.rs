//! Read-only access for the auditor and the tools: the audit rows, checkpoints and asset
//! pages, on one connection.

use super::*;

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

pub(super) const AUDIT_ROW_COLUMNS: &str = "shard, seq, event, asset_id, counter, state_at_event, \
    requester, request_id, (extract(epoch FROM logged_at) * 1000)::bigint, derivation_path, \
    purpose, region, ttl_s, scheme_version, rotation_id, prev_hash, hash";

pub(super) fn audit_row(r: &tokio_postgres::Row) -> Result<crate::store::AuditRow, StoreError> {
    let (shard, seq) = (r.get::<_, i16>(0) as u16, r.get::<_, i64>(1) as u64);
    let bad = |what: String| StoreError::Corrupt(format!("shard {shard} record {seq}: {what}"));
    let event: String = r.get(2);
    let state: String = r.get(5);
    let hash = |i: usize| -> Result<Option<[u8; 32]>, StoreError> {
        match r.get::<_, Option<Vec<u8>>>(i) {
            None => Ok(None),
            Some(b) => crate::store::hash_of(Some(b), shard, seq).map(Some),
        }
    };
    Ok(crate::store::AuditRow {
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
pub(super) fn stored_asset(row: &tokio_postgres::Row) -> Result<StoredAsset, StoreError> {
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

pub(super) fn checkpoint_row(
    r: &tokio_postgres::Row,
) -> Result<crate::store::Checkpoint, StoreError> {
    let (shard, seq) = (r.get::<_, i16>(0) as u16, r.get::<_, i64>(1) as u64);
    Ok(crate::store::Checkpoint {
        shard,
        seq,
        hash: crate::store::hash_of(Some(r.get(2)), shard, seq)?,
        mac: crate::store::hash_of(Some(r.get(3)), shard, seq)?,
        ts_ms: r.get::<_, i64>(4).max(0) as u64,
    })
}

impl crate::reconcile::AuditSource for PgAuditSource {
    fn begin(&self) -> crate::store::LocalFuture<Result<(), StoreError>> {
        let client = self.client.clone();
        Box::pin(async move {
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(pg_err)
        })
    }

    fn end(&self) -> crate::store::LocalFuture<Result<(), StoreError>> {
        let client = self.client.clone();
        Box::pin(async move { client.batch_execute("COMMIT").await.map_err(pg_err) })
    }

    fn shards(&self) -> crate::store::LocalFuture<Result<Vec<u16>, StoreError>> {
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

    fn last_seq(&self, shard: u16) -> crate::store::LocalFuture<Result<u64, StoreError>> {
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
    ) -> crate::store::LocalFuture<Result<Vec<crate::store::RowRead>, StoreError>> {
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
                .map(|r| crate::store::RowRead {
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
    ) -> crate::store::LocalFuture<Result<Vec<crate::store::Checkpoint>, StoreError>> {
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

    fn assets(
        &self,
    ) -> crate::store::LocalFuture<Result<Vec<crate::store::StoredAsset>, StoreError>> {
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
    ) -> crate::store::LocalFuture<Result<Vec<crate::store::ListedRow>, StoreError>> {
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
                    Ok(crate::store::ListedRow {
                        asset: stored_asset(row)?,
                        changed_unix_ms: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
                    })
                })
                .collect()
        })
    }
}

/// Every audit checkpoint, in (shard, seq) order.
pub async fn checkpoints(client: &Client) -> Result<Vec<crate::store::Checkpoint>, StoreError> {
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
