//! The commit thread's write: the batches of one or more shards in one transaction (audit
//! records, checkpoints, region switches, asset rows).

use super::{sql_err, to_i64};
use crate::store::{AssetWrite, CommitBatch, StoreError};
use rusqlite::{params, Connection};
use uuid::Uuid;

/// Writes the batches of one or more shards in one IMMEDIATE transaction: every batch or
/// none. A write that would move a counter backward (I2) or touch a retired asset fails
/// the whole transaction.
pub(super) fn write_batches<'a>(
    conn: &mut Connection,
    batches: impl Iterator<Item = &'a CommitBatch>,
) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sql_err)?;
    let now = crate::audit::now_ms() as i64;
    for batch in batches {
        insert_records(&tx, batch)?;
        if let Some(c) = &batch.checkpoint {
            insert_checkpoint(&tx, c)?;
        }
        write_regions(&tx, &batch.region_writes, now)?;
        write_assets(&tx, &batch.asset_writes, now)?;
    }
    tx.commit().map_err(sql_err)
}

/// A batch's audit records, each with the chain hash before it and its own.
fn insert_records(tx: &rusqlite::Transaction<'_>, batch: &CommitBatch) -> Result<(), StoreError> {
    let mut insert_audit = tx
        .prepare_cached(
            "INSERT INTO custody_audit_log (shard, seq, event, asset_id, counter, \
             state_at_event, requester, request_id, ts_ms, derivation_path, purpose, \
             region, ttl_s, scheme_version, rotation_id, prev_hash, hash) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        )
        .map_err(sql_err)?;
    let mut asset_text = Uuid::encode_buffer();
    let chained = batch.chain.len() == batch.records.len();
    for (i, r) in batch.records.iter().enumerate() {
        let (prev, hash) = if chained {
            let prev = if i == 0 {
                &batch.chain_prev
            } else {
                &batch.chain[i - 1]
            };
            (Some(&prev[..]), Some(&batch.chain[i][..]))
        } else {
            (None, None)
        };
        insert_audit
            .execute(params![
                r.shard,
                to_i64(r.seq, "seq")?,
                r.event.name(),
                &*r.asset.hyphenated().encode_lower(&mut asset_text),
                to_i64(r.counter, "counter")?,
                r.state.name(),
                &*r.requester,
                r.request_id as i64,
                r.ts_ms as i64,
                r.derive.as_ref().map(|d| d.path.to_string()),
                r.derive.as_ref().map(|d| d.purpose.name()),
                r.derive
                    .as_ref()
                    .map(|d| &*d.region)
                    .or(r.switched_region.as_deref()),
                r.derive.as_ref().map(|d| d.ttl_s),
                r.derive.as_ref().map(|d| d.scheme_version),
                r.rotation_id.map(|id| id.hyphenated().to_string()),
                prev,
                hash,
            ])
            .map_err(sql_err)?;
    }
    Ok(())
}

/// A batch's checkpoint: its last position and the MAC over it.
fn insert_checkpoint(
    tx: &rusqlite::Transaction<'_>,
    c: &crate::store::Checkpoint,
) -> Result<(), StoreError> {
    let (seq, ts_ms) = (to_i64(c.seq, "seq")?, to_i64(c.ts_ms, "ts_ms")?);
    tx.prepare_cached(
        "INSERT INTO custody_audit_checkpoints (shard, seq, hash, mac, ts_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut insert| insert.execute(params![c.shard, seq, &c.hash[..], &c.mac[..], ts_ms]))
    .map_err(sql_err)?;
    Ok(())
}

/// The region switches of a batch (one per region).
fn write_regions(
    tx: &rusqlite::Transaction<'_>,
    writes: &[crate::store::RegionWrite],
    now: i64,
) -> Result<(), StoreError> {
    if writes.is_empty() {
        return Ok(());
    }
    let mut upsert_region = tx
        .prepare_cached(
            "INSERT INTO custody_regions (region, enabled, updated_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (region) DO UPDATE SET enabled = excluded.enabled, \
             updated_ms = excluded.updated_ms",
        )
        .map_err(sql_err)?;
    for w in writes {
        upsert_region
            .execute(params![w.region, w.enabled, now])
            .map_err(sql_err)?;
    }
    Ok(())
}

/// The asset rows of a batch (one per asset): a registration inserts, the rest update,
/// and an update that would move a counter backward or touch a retired asset matches no
/// row, which fails the transaction (I2).
fn write_assets(
    tx: &rusqlite::Transaction<'_>,
    writes: &[AssetWrite],
    now: i64,
) -> Result<(), StoreError> {
    for AssetWrite {
        asset,
        state,
        counter,
        insert,
    } in writes
    {
        let id = asset.hyphenated().to_string();
        let counter = to_i64(*counter, "counter")?;
        let sql = if *insert {
            "INSERT INTO custody_keys (asset_id, state, derivation_counter, created_ms, \
             updated_ms) VALUES (?1, ?2, ?3, ?4, ?4)"
        } else {
            "UPDATE custody_keys SET state = ?2, derivation_counter = ?3, updated_ms = ?4 \
             WHERE asset_id = ?1 AND derivation_counter <= ?3 AND state <> 'RETIRED'"
        };
        let changed = tx
            .prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute(params![id, state.name(), counter, now]))
            .map_err(sql_err)?;
        if changed != 1 {
            // I2: an update that would move a counter backward matches no row.
            return Err(StoreError::Corrupt(format!(
                "asset {id}: write matched {changed} rows (counter regression?)"
            )));
        }
    }
    Ok(())
}
