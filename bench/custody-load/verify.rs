//! The audit check at the end of a run: every kept receipt (a sample past
//! [`crate::stats::RECEIPTS_KEPT`]) looked up in the audit log, SQLite or PostgreSQL.

use custody::store::postgres::{self, PgConfig};
use custody::store::sqlite::SqliteReader;
use custody::wire::Receipt;
use std::collections::HashMap;
use std::path::PathBuf;
use uuid::Uuid;

/// What the audit check found.
pub struct AuditCheck {
    /// Derivations acknowledged in the run.
    pub acknowledged: u64,
    /// Receipts looked up: all of them, or a uniform sample of [`crate::stats::RECEIPTS_KEPT`].
    pub checked: u64,
    pub found: u64,
    pub missing: u64,
    pub mismatched: u64,
}

/// Where the audit log to check is.
pub enum AuditSource {
    Sqlite(PathBuf),
    Postgres(PgConfig),
}

/// A receipt to look up: (shard, seq, asset, counter).
type Wanted = (u16, u64, Uuid, u64);

/// Looks the receipts up in the audit log: each must be a DERIVE of its asset with its
/// counter. Reads, per shard, only the ranges of the log that hold receipts, in pages, so
/// memory stays bounded whatever the log's size.
pub fn verify_audit(
    source: AuditSource,
    receipts: &[(Receipt, Uuid, u64)],
    acknowledged: u64,
) -> anyhow::Result<AuditCheck> {
    let mut sorted: Vec<&(Receipt, Uuid, u64)> = receipts.iter().collect();
    sorted.sort_by_key(|(r, _, _)| (r.shard, r.seq));
    let sorted: Vec<Wanted> = sorted
        .into_iter()
        .map(|(r, a, c)| (r.shard, r.seq, *a, *c))
        .collect();
    let (found, missing, mismatched) = match source {
        AuditSource::Sqlite(db) => {
            let reader = std::rc::Rc::new(SqliteReader::open(&db)?);
            futures_lite::future::block_on(check(&reader, &sorted))?
        }
        AuditSource::Postgres(config) => {
            postgres::on_own_executor("custody-load-db", move || async move {
                let client = postgres::connect(&config).await?;
                let source = postgres::PgAuditSource {
                    client: std::rc::Rc::new(client),
                };
                check(&source, &sorted).await
            })??
        }
    };
    Ok(AuditCheck {
        acknowledged,
        checked: receipts.len() as u64,
        found,
        missing,
        mismatched,
    })
}

/// The receipts (in (shard, seq) order) against `source`, a page at a time: how many are
/// found, missing and mismatched.
async fn check(
    source: &dyn custody::reconcile::AuditSource,
    receipts: &[Wanted],
) -> Result<(u64, u64, u64), custody::store::StoreError> {
    const PAGE: usize = 50_000;
    let (mut found, mut missing, mut mismatched) = (0, 0, 0);
    let mut i = 0;
    while i < receipts.len() {
        let (shard, from) = (receipts[i].0, receipts[i].1);
        // Only as far as the last receipt within a page: sparse receipts (a sample
        // of a long run) read a few rows each, not a page each.
        let last = receipts[i..]
            .iter()
            .take_while(|r| r.0 == shard && r.1 < from + PAGE as u64)
            .last()
            .map_or(from, |r| r.1);
        let span = (last - from + 1) as usize;
        let rows: HashMap<u64, custody::store::RowRead> = source
            .records(shard, from, span)
            .await?
            .into_iter()
            .map(|r| (r.seq, r))
            .collect();
        while i < receipts.len() && receipts[i].0 == shard && receipts[i].1 < from + PAGE as u64 {
            let (_, seq, asset, counter) = receipts[i];
            match rows.get(&seq).map(|r| &r.row) {
                Some(Ok(row))
                    if row.event == custody::audit::AuditEvent::Derive
                        && row.asset == asset
                        && row.counter == counter =>
                {
                    found += 1
                }
                Some(_) => mismatched += 1,
                None => missing += 1,
            }
            i += 1;
        }
    }
    Ok((found, missing, mismatched))
}
