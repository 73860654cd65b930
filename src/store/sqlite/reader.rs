//! Read-only access to a store file: the auditor's reconciliation and proofs, and the
//! verification tools, while or after the appliance runs.

use super::*;

/// Read-only access to a store file, for verification while or after the appliance runs.
pub struct SqliteReader {
    conn: Connection,
}

impl SqliteReader {
    pub fn open(path: &Path) -> Result<SqliteReader, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql_err)?;
        Ok(SqliteReader { conn })
    }

    pub fn assets(&self) -> Result<Vec<StoredAsset>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT asset_id, state, derivation_counter FROM custody_keys ORDER BY asset_id",
            )
            .map_err(sql_err)?;
        let mut rows = stmt.query([]).map_err(sql_err)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql_err)? {
            out.push(stored_asset(row)?);
        }
        Ok(out)
    }

    /// A page of the key table after `after`, in `state` if given (LIST_ASSETS). The ids
    /// are canonical lower-case text, whose order is the UUIDs' byte order.
    pub fn asset_page(
        &self,
        after: Uuid,
        state: Option<AssetState>,
        limit: usize,
    ) -> Result<Vec<crate::store::ListedRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT asset_id, state, derivation_counter, updated_ms FROM custody_keys \
                 WHERE asset_id > ?1 AND (?2 IS NULL OR state = ?2) ORDER BY asset_id LIMIT ?3",
            )
            .map_err(sql_err)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = stmt
            .query(rusqlite::params![
                after.to_string(),
                state.map(AssetState::name),
                limit
            ])
            .map_err(sql_err)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql_err)? {
            let changed: i64 = row.get(3).map_err(sql_err)?;
            out.push(crate::store::ListedRow {
                asset: stored_asset(row)?,
                changed_unix_ms: u64::try_from(changed).unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// Every audit checkpoint in (shard, seq) order.
    pub fn checkpoints(&self) -> Result<Vec<crate::store::Checkpoint>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT shard, seq, hash, mac, ts_ms FROM custody_audit_checkpoints \
                 ORDER BY shard, seq",
            )
            .map_err(sql_err)?;
        let mut rows = stmt.query([]).map_err(sql_err)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql_err)? {
            out.push(checkpoint_row(row)?);
        }
        Ok(out)
    }

    /// Every shard with a record or a checkpoint: a few seeks of the primary keys
    /// ([`SHARDS_SQL`]), whatever the length of the log.
    pub fn shards(&self) -> Result<Vec<u16>, StoreError> {
        let mut stmt = self.conn.prepare(SHARDS_SQL).map_err(sql_err)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, u16>(0))
            .map_err(sql_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql_err)
    }

    /// At most `limit` records of `shard` from `from_seq` on (through the primary key).
    pub fn records(
        &self,
        shard: u16,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<crate::store::RowRead>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT shard, seq, event, asset_id, counter, state_at_event, requester, \
                 request_id, ts_ms, derivation_path, purpose, region, ttl_s, scheme_version, \
                 rotation_id, prev_hash, hash FROM custody_audit_log \
                 WHERE shard = ?1 AND seq >= ?2 AND seq < ?2 + ?3 ORDER BY seq",
            )
            .map_err(sql_err)?;
        let from = i64::try_from(from_seq).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = stmt.query(params![shard, from, limit]).map_err(sql_err)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql_err)? {
            // The sequence number is the primary key's (an integer); the rest may be
            // anything someone wrote into the file.
            let seq = row.get::<_, i64>(1).map_err(sql_err)?.max(0) as u64;
            out.push(crate::store::RowRead {
                seq,
                row: audit_row(row).map_err(|e| e.to_string()),
            });
        }
        Ok(out)
    }

    /// The checkpoints of `shard` with `from_seq <= seq <= to_seq`.
    pub fn checkpoints_between(
        &self,
        shard: u16,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<Vec<crate::store::Checkpoint>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT shard, seq, hash, mac, ts_ms FROM custody_audit_checkpoints \
                 WHERE shard = ?1 AND seq >= ?2 AND seq <= ?3 ORDER BY seq",
            )
            .map_err(sql_err)?;
        let from = i64::try_from(from_seq).unwrap_or(i64::MAX);
        let to = i64::try_from(to_seq).unwrap_or(i64::MAX);
        let mut rows = stmt.query(params![shard, from, to]).map_err(sql_err)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql_err)? {
            out.push(checkpoint_row(row)?);
        }
        Ok(out)
    }

    /// Every audit row in (shard, seq) order.
    pub fn audit_rows(&self) -> Result<Vec<AuditRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT shard, seq, event, asset_id, counter, state_at_event, requester, \
                 request_id, ts_ms, derivation_path, purpose, region, ttl_s, scheme_version, \
                 rotation_id, prev_hash, hash FROM custody_audit_log ORDER BY shard, seq",
            )
            .map_err(sql_err)?;
        let mut rows = stmt.query([]).map_err(sql_err)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql_err)? {
            out.push(audit_row(row).map_err(sql_err)?);
        }
        Ok(out)
    }
}

fn checkpoint_row(row: &rusqlite::Row<'_>) -> Result<crate::store::Checkpoint, StoreError> {
    let shard: u16 = row.get(0).map_err(sql_err)?;
    let seq = row.get::<_, i64>(1).map_err(sql_err)?.max(0) as u64;
    Ok(crate::store::Checkpoint {
        shard,
        seq,
        hash: crate::store::hash_of(Some(row.get(2).map_err(sql_err)?), shard, seq)?,
        mac: crate::store::hash_of(Some(row.get(3).map_err(sql_err)?), shard, seq)?,
        ts_ms: row.get::<_, i64>(4).map_err(sql_err)?.max(0) as u64,
    })
}

/// [`SqliteReader`] as the reconciler's source.
impl crate::reconcile::AuditSource for std::rc::Rc<SqliteReader> {
    fn begin(&self) -> crate::store::LocalFuture<Result<(), StoreError>> {
        // A deferred read transaction: its snapshot is taken by the first read and kept
        // until the end (WAL mode: writers go on meanwhile).
        let r = self.conn.execute_batch("BEGIN DEFERRED").map_err(sql_err);
        Box::pin(async move { r })
    }

    fn end(&self) -> crate::store::LocalFuture<Result<(), StoreError>> {
        let r = self.conn.execute_batch("COMMIT").map_err(sql_err);
        Box::pin(async move { r })
    }

    fn shards(&self) -> crate::store::LocalFuture<Result<Vec<u16>, StoreError>> {
        let r = SqliteReader::shards(self);
        Box::pin(async move { r })
    }

    fn last_seq(&self, shard: u16) -> crate::store::LocalFuture<Result<u64, StoreError>> {
        let r = last_seq(&self.conn, shard);
        Box::pin(async move { r })
    }

    fn records(
        &self,
        shard: u16,
        from_seq: u64,
        limit: usize,
    ) -> crate::store::LocalFuture<Result<Vec<crate::store::RowRead>, StoreError>> {
        let r = SqliteReader::records(self, shard, from_seq, limit);
        Box::pin(async move { r })
    }

    fn checkpoints(
        &self,
        shard: u16,
        from_seq: u64,
        to_seq: u64,
    ) -> crate::store::LocalFuture<Result<Vec<crate::store::Checkpoint>, StoreError>> {
        let r = self.checkpoints_between(shard, from_seq, to_seq);
        Box::pin(async move { r })
    }

    fn assets(&self) -> crate::store::LocalFuture<Result<Vec<StoredAsset>, StoreError>> {
        let r = SqliteReader::assets(self);
        Box::pin(async move { r })
    }

    fn asset_page(
        &self,
        after: Uuid,
        state: Option<AssetState>,
        limit: usize,
    ) -> crate::store::LocalFuture<Result<Vec<crate::store::ListedRow>, StoreError>> {
        let r = SqliteReader::asset_page(self, after, state, limit);
        Box::pin(async move { r })
    }
}

fn audit_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    let bad = |i: usize, what: String| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            Box::<dyn std::error::Error + Send + Sync>::from(what),
        )
    };
    let event: String = row.get(2)?;
    let asset: String = row.get(3)?;
    let state: String = row.get(5)?;
    Ok(AuditRow {
        shard: row.get(0)?,
        seq: row.get::<_, i64>(1)? as u64,
        event: AuditEvent::from_name(&event).ok_or_else(|| bad(2, event.clone()))?,
        asset: Uuid::parse_str(&asset).map_err(|e| bad(3, e.to_string()))?,
        counter: row.get::<_, i64>(4)? as u64,
        state: AssetState::from_name(&state).ok_or_else(|| bad(5, state.clone()))?,
        requester: row.get(6)?,
        request_id: row.get::<_, i64>(7)? as u64,
        ts_ms: row.get::<_, i64>(8)? as u64,
        derivation_path: row.get(9)?,
        purpose: row.get(10)?,
        region: row.get(11)?,
        ttl_s: row.get(12)?,
        scheme_version: row.get(13)?,
        rotation_id: match row.get::<_, Option<String>>(14)? {
            Some(text) => Some(Uuid::parse_str(&text).map_err(|e| bad(14, e.to_string()))?),
            None => None,
        },
        prev_hash: hash32(row, 15)?,
        hash: hash32(row, 16)?,
    })
}

fn hash32(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<[u8; 32]>> {
    match row.get::<_, Option<Vec<u8>>>(i)? {
        None => Ok(None),
        Some(b) => <[u8; 32]>::try_from(b.as_slice()).map(Some).map_err(|_| {
            rusqlite::Error::FromSqlConversionFailure(
                i,
                rusqlite::types::Type::Blob,
                Box::<dyn std::error::Error + Send + Sync>::from(format!(
                    "{} bytes, not 32",
                    b.len()
                )),
            )
        }),
    }
}
