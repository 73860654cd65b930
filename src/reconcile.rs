//! Reconciliation (pure code): the audit log checked against itself (the hash chain and
//! the checkpoints) and against the counters the store holds.
//!
//! Findings, each with where it is:
//! - `CHAIN_BROKEN`: a gap or a repeat in a shard's numbering, a record whose previous
//!   hash does not link, whose hash does not match its fields, a record without a hash
//!   after chained ones, a checkpoint that does not match its record, or whose MAC does
//!   not verify.
//! - `COUNTER_REGRESSION`: an asset's audited counters go backward in its shard's order.
//! - `COUNTER_DRIFT`: an asset's newest audited counter differs from its stored counter
//!   (or an audited asset is missing from the store's key table).
//! - `MISSING_AUDIT_ENTRY`: a registered asset whose registration is not audited.
//!
//! A [`Reconciler`] keeps, per shard, where it stopped (the watermark: the next sequence
//! number and the chain head) and, per asset, what the log said so far; a run feeds it the
//! records and checkpoints past the watermark, in order, then the stored assets. So a run
//! costs in proportion to the new records (plus one pass over the key table); a full run
//! starts from a new `Reconciler`.

use crate::audit::{chain_hash, AuditEvent, AuditRecord, GENESIS};
use crate::store::{Checkpoint, StoredAsset};
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// The kinds of finding (stable names: reports, logs and metrics labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FindingKind {
    CounterDrift,
    MissingAuditEntry,
    CounterRegression,
    ChainBroken,
}

impl FindingKind {
    pub const ALL: [FindingKind; 4] = [
        FindingKind::CounterDrift,
        FindingKind::MissingAuditEntry,
        FindingKind::CounterRegression,
        FindingKind::ChainBroken,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FindingKind::CounterDrift => "COUNTER_DRIFT",
            FindingKind::MissingAuditEntry => "MISSING_AUDIT_ENTRY",
            FindingKind::CounterRegression => "COUNTER_REGRESSION",
            FindingKind::ChainBroken => "CHAIN_BROKEN",
        }
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub shard: Option<u16>,
    pub seq: Option<u64>,
    pub asset: Option<Uuid>,
    pub detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind.name())?;
        if let Some(s) = self.shard {
            write!(f, " shard {s}")?;
        }
        if let Some(q) = self.seq {
            write!(f, " seq {q}")?;
        }
        if let Some(a) = self.asset {
            write!(f, " asset {a}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// A record as the store holds it: the record and its stored chain hashes (`None` for a
/// record from before the chain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRecord {
    pub record: AuditRecord,
    pub prev_hash: Option<[u8; 32]>,
    pub hash: Option<[u8; 32]>,
}

/// Where a shard's check stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ShardMark {
    /// The next sequence number to check.
    pub next_seq: u64,
    /// The hash of the last checked record (the genesis before any chained one).
    #[serde(skip)]
    pub head: [u8; 32],
    /// Whether a chained record was seen (after it, every record must be chained).
    pub chained: bool,
    /// The last checkpoint that matched its record (and verified, with a key).
    pub checkpointed: u64,
    /// The shard's chain broke: its later records are not checked against it (one finding
    /// per break, not one per record after it).
    pub broken: bool,
}

impl Default for ShardMark {
    fn default() -> ShardMark {
        ShardMark {
            next_seq: 1,
            head: GENESIS,
            chained: false,
            checkpointed: 0,
            broken: false,
        }
    }
}

/// What the log says of one asset so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct AssetLog {
    registered: bool,
    /// The counter of its newest record (in shard order; across shards, by time).
    newest: u64,
    newest_at: (u64, u16, u64),
    /// The largest counter of its records in each shard so far, for regressions.
    max_in_shard: Option<(u16, u64)>,
}

/// Compares two MACs in constant time.
pub fn mac_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a MAC of a checkpoint (the appliance's or an offline verifier's audit key).
pub type MacCheck<'a> = &'a dyn Fn(&Checkpoint) -> bool;

/// The figures of a run.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Report {
    pub records_checked: u64,
    pub checkpoints_checked: u64,
    pub assets_checked: u64,
    pub assets_drifted: u64,
    /// Drifted assets over assets checked (0 with no asset).
    pub drift_ratio: f64,
    /// Whether checkpoint MACs were checked (a key was given).
    pub macs_checked: bool,
    pub shards: BTreeMap<u16, ShardMark>,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn count(&self, kind: FindingKind) -> usize {
        self.findings.iter().filter(|f| f.kind == kind).count()
    }
}

/// The reconciler's memory between runs (bounded by the shards and the assets).
#[derive(Clone, Default)]
pub struct Reconciler {
    shards: BTreeMap<u16, ShardMark>,
    assets: HashMap<Uuid, AssetLog>,
    scratch: Vec<u8>,
}

/// One run: feed it each shard's new records and checkpoints, then the stored assets.
pub struct Run<'r> {
    r: &'r mut Reconciler,
    mac: Option<MacCheck<'r>>,
    report: Report,
}

impl Reconciler {
    pub fn new() -> Reconciler {
        Reconciler::default()
    }

    /// Where each shard's check stands: a run reads the records from `next_seq` on.
    pub fn watermark(&self, shard: u16) -> ShardMark {
        self.shards.get(&shard).copied().unwrap_or_default()
    }

    /// Starts a run; with `mac`, checkpoint MACs are checked.
    pub fn run<'r>(&'r mut self, mac: Option<MacCheck<'r>>) -> Run<'r> {
        Run {
            report: Report {
                macs_checked: mac.is_some(),
                ..Report::default()
            },
            r: self,
            mac,
        }
    }
}

impl Run<'_> {
    fn find(
        &mut self,
        kind: FindingKind,
        shard: u16,
        seq: u64,
        asset: Option<Uuid>,
        detail: String,
    ) {
        self.report.findings.push(Finding {
            kind,
            shard: Some(shard),
            seq: Some(seq),
            asset,
            detail,
        });
    }

    /// A row whose fields cannot be a record: the chain breaks there.
    pub fn unreadable(&mut self, shard: u16, seq: u64, why: String) {
        let mut mark = self.r.watermark(shard);
        self.report.records_checked += 1;
        if !mark.broken {
            self.find(
                FindingKind::ChainBroken,
                shard,
                seq,
                None,
                format!("its fields are not a record ({why})"),
            );
            mark.broken = true;
        }
        mark.next_seq = mark.next_seq.max(seq + 1);
        self.r.shards.insert(shard, mark);
    }

    /// One shard's records past its watermark (in sequence order) and its checkpoints
    /// past it (in sequence order).
    pub fn shard(&mut self, shard: u16, records: &[LoggedRecord], checkpoints: &[Checkpoint]) {
        let mut mark = self.r.watermark(shard);
        let mut cps = checkpoints.iter().peekable();
        for lr in records {
            let rec = &lr.record;
            self.report.records_checked += 1;
            // A checkpoint before this record (its record was not in the log).
            while let Some(c) = cps.next_if(|c| c.seq < rec.seq) {
                self.report.checkpoints_checked += 1;
                if c.seq >= mark.next_seq {
                    let detail =
                        format!("checkpoint {} names a record that is not in the log", c.seq);
                    self.find(FindingKind::ChainBroken, shard, c.seq, None, detail);
                }
            }
            // A record that breaks the chain is not trusted for the counters either (its
            // fields may be what was changed): one finding, not its consequences. The check
            // goes on from its stored hash, so a later, separate break is found too.
            let mut trusted = true;
            if let Some(detail) = self.link(&mut mark, lr) {
                self.find(FindingKind::ChainBroken, shard, rec.seq, None, detail);
                mark.broken = true;
                trusted = false;
                if let Some(h) = lr.hash {
                    mark.head = h;
                    mark.chained = true;
                }
            }
            mark.next_seq = mark.next_seq.max(rec.seq + 1);
            if let Some(c) = cps.next_if(|c| c.seq == rec.seq) {
                self.report.checkpoints_checked += 1;
                match lr.hash {
                    Some(h) if h == c.hash => match self.mac {
                        Some(check) if !check(c) => {
                            let detail = format!("checkpoint {}: its MAC does not verify", c.seq);
                            self.find(FindingKind::ChainBroken, shard, c.seq, None, detail);
                        }
                        _ => {
                            if !mark.broken {
                                mark.checkpointed = c.seq;
                            }
                        }
                    },
                    _ => {
                        let detail =
                            format!("checkpoint {}: does not match the record's hash", c.seq);
                        self.find(FindingKind::ChainBroken, shard, c.seq, None, detail);
                    }
                }
            }
            if trusted {
                self.asset_record(shard, rec);
            }
        }
        for c in cps {
            self.report.checkpoints_checked += 1;
            if c.seq >= mark.next_seq {
                let detail = format!("checkpoint {} names a record that is not in the log", c.seq);
                self.find(FindingKind::ChainBroken, shard, c.seq, None, detail);
            }
        }
        self.r.shards.insert(shard, mark);
    }

    /// Checks `lr` continues the shard's chain; advances the head.
    fn link(&mut self, mark: &mut ShardMark, lr: &LoggedRecord) -> Option<String> {
        let rec = &lr.record;
        if rec.seq != mark.next_seq {
            return Some(format!(
                "expected sequence number {}, found {} (a record is missing, repeated or renumbered)",
                mark.next_seq, rec.seq
            ));
        }
        let Some(hash) = lr.hash else {
            return mark
                .chained
                .then(|| "a record without a hash after chained records".to_owned());
        };
        if lr.prev_hash != Some(mark.head) {
            return Some(
                "its previous hash does not link (records reordered, inserted or deleted)".into(),
            );
        }
        if chain_hash(rec, &mark.head, &mut self.r.scratch) != hash {
            return Some("its hash does not match its fields (the record was changed)".into());
        }
        mark.head = hash;
        mark.chained = true;
        None
    }

    fn asset_record(&mut self, shard: u16, rec: &AuditRecord) {
        if rec.asset.is_nil() {
            return;
        }
        let at = (rec.ts_ms, shard, rec.seq);
        let log = self.r.assets.entry(rec.asset).or_default();
        if rec.event == AuditEvent::Register {
            log.registered = true;
        }
        let regression = match log.max_in_shard {
            Some((s, max)) if s == shard && rec.counter < max => Some(max),
            _ => None,
        };
        log.max_in_shard = match log.max_in_shard {
            Some((s, max)) if s == shard => Some((s, max.max(rec.counter))),
            _ => Some((shard, rec.counter)),
        };
        // Newest: in sequence order within a shard (the true order); across shards (the
        // core count changed) by time.
        let newer = if log.newest_at.1 == shard && log.newest_at != (0, 0, 0) {
            rec.seq >= log.newest_at.2
        } else {
            at >= log.newest_at
        };
        if newer {
            log.newest_at = at;
            log.newest = rec.counter;
        }
        if let Some(max) = regression {
            let detail = format!(
                "{} with counter {} after counter {max} (a counter went backward)",
                rec.event.name(),
                rec.counter
            );
            self.find(
                FindingKind::CounterRegression,
                shard,
                rec.seq,
                Some(rec.asset),
                detail,
            );
        }
    }

    /// The stored assets (the key table, whole), then the report.
    pub fn finish(mut self, stored: &[StoredAsset]) -> Report {
        let mut seen = std::collections::HashSet::with_capacity(stored.len());
        for a in stored {
            seen.insert(a.asset);
            self.report.assets_checked += 1;
            match self.r.assets.get(&a.asset).copied() {
                None => {
                    self.report.assets_drifted += 1;
                    self.report.findings.push(Finding {
                        kind: FindingKind::MissingAuditEntry,
                        shard: None,
                        seq: None,
                        asset: Some(a.asset),
                        detail: format!(
                            "registered (counter {}) but no record of it is in the log",
                            a.counter
                        ),
                    });
                }
                Some(log) => {
                    if !log.registered {
                        self.report.findings.push(Finding {
                            kind: FindingKind::MissingAuditEntry,
                            shard: None,
                            seq: None,
                            asset: Some(a.asset),
                            detail: "registered but its registration is not in the log".into(),
                        });
                    }
                    if log.newest != a.counter {
                        self.report.assets_drifted += 1;
                        self.report.findings.push(Finding {
                            kind: FindingKind::CounterDrift,
                            shard: None,
                            seq: None,
                            asset: Some(a.asset),
                            detail: format!(
                                "stored counter {} but the newest audited counter is {}",
                                a.counter, log.newest
                            ),
                        });
                    }
                }
            }
        }
        let mut missing: Vec<(&Uuid, &AssetLog)> = self
            .r
            .assets
            .iter()
            .filter(|(id, _)| !seen.contains(*id))
            .collect();
        missing.sort_by_key(|(id, _)| **id);
        for (id, log) in missing {
            self.report.findings.push(Finding {
                kind: FindingKind::CounterDrift,
                shard: None,
                seq: None,
                asset: Some(*id),
                detail: format!(
                    "audited (newest counter {}) but missing from the key table",
                    log.newest
                ),
            });
        }
        self.report.drift_ratio = if self.report.assets_checked == 0 {
            0.0
        } else {
            self.report.assets_drifted as f64 / self.report.assets_checked as f64
        };
        self.report.shards = self.r.shards.clone();
        self.report
    }
}

/// The record a stored row describes, or why its fields cannot be a record (a changed
/// row, found as CHAIN_BROKEN).
pub fn logged_from_row(row: &crate::store::AuditRow) -> Result<LoggedRecord, String> {
    use crate::audit::DeriveDetail;
    use std::sync::Arc;
    // What the encoding leaves out must be empty: a column the hash does not cover cannot
    // carry anything.
    let derive_columns = row.derivation_path.is_some()
        || row.purpose.is_some()
        || row.ttl_s.is_some()
        || row.scheme_version.is_some();
    let region_event = matches!(
        row.event,
        AuditEvent::Derive | AuditEvent::RegionEnable | AuditEvent::RegionDisable
    );
    if row.event != AuditEvent::Derive && derive_columns {
        return Err(format!("a {} with derivation fields", row.event.name()));
    }
    if !region_event && row.region.is_some() {
        return Err(format!("a {} with a region", row.event.name()));
    }
    if row.event != AuditEvent::Rotate && row.rotation_id.is_some() {
        return Err(format!("a {} with a rotation id", row.event.name()));
    }
    let derive = match row.event {
        AuditEvent::Derive => {
            // Borrowed, not cloned: this runs for every derivation a run reads.
            fn text<'a>(v: &'a Option<String>, what: &str) -> Result<&'a str, String> {
                v.as_deref()
                    .ok_or_else(|| format!("a DERIVE without its {what}"))
            }
            let path = text(&row.derivation_path, "path")?;
            let purpose = text(&row.purpose, "purpose")?;
            Some(DeriveDetail {
                path: crate::kdf::DerivationPath::parse(path)
                    .map_err(|e| format!("path {path:?}: {e}"))?,
                purpose: crate::policy::Purpose::from_name(purpose)
                    .ok_or_else(|| format!("purpose {purpose:?}"))?,
                region: Arc::from(text(&row.region, "region")?),
                ttl_s: row.ttl_s.ok_or("a DERIVE without its ttl")?,
                scheme_version: row.scheme_version.ok_or("a DERIVE without its scheme")?,
            })
        }
        _ => None,
    };
    let switched_region = match row.event {
        AuditEvent::RegionEnable | AuditEvent::RegionDisable => Some(Arc::from(
            row.region
                .as_deref()
                .ok_or("a region switch without its region")?,
        )),
        _ => None,
    };
    Ok(LoggedRecord {
        record: AuditRecord {
            shard: row.shard,
            seq: row.seq,
            event: row.event,
            asset: row.asset,
            counter: row.counter,
            state: row.state,
            requester: Arc::from(row.requester.as_str()),
            request_id: row.request_id,
            ts_ms: row.ts_ms,
            derive,
            rotation_id: row.rotation_id,
            switched_region,
        },
        prev_hash: row.prev_hash,
        hash: row.hash,
    })
}

/// Records a run reads at a time (bounds its memory).
pub const PAGE_RECORDS: usize = 50_000;

/// Read access to a store's audit log and key table, for a run. A run reads each shard's
/// head and the key table inside one short snapshot ([`AuditSource::begin`] …
/// [`AuditSource::end`]), so an operation committed meanwhile (its record and its counter
/// together) is seen whole or not at all, never as drift; then the append-only records
/// and checkpoints up to those heads outside it (see [`reconcile`]).
pub trait AuditSource {
    /// Starts the run's snapshot (a read transaction).
    fn begin(&self) -> crate::store::LocalFuture<Result<(), crate::store::StoreError>>;
    /// Ends it.
    fn end(&self) -> crate::store::LocalFuture<Result<(), crate::store::StoreError>>;
    /// Every shard with a record or a checkpoint.
    fn shards(&self) -> crate::store::LocalFuture<Result<Vec<u16>, crate::store::StoreError>>;
    /// The highest sequence number of `shard`'s records (0: none).
    fn last_seq(
        &self,
        shard: u16,
    ) -> crate::store::LocalFuture<Result<u64, crate::store::StoreError>>;
    /// The records of `shard` with `from_seq <= seq < from_seq + limit` (a bounded range
    /// of the index, whatever the planner knows), in sequence order; a row
    /// whose columns cannot be read is there as its sequence number and why.
    fn records(
        &self,
        shard: u16,
        from_seq: u64,
        limit: usize,
    ) -> crate::store::LocalFuture<Result<Vec<crate::store::RowRead>, crate::store::StoreError>>;
    /// The checkpoints of `shard` with `from_seq <= seq <= to_seq`, in sequence order.
    fn checkpoints(
        &self,
        shard: u16,
        from_seq: u64,
        to_seq: u64,
    ) -> crate::store::LocalFuture<Result<Vec<Checkpoint>, crate::store::StoreError>>;
    /// The whole key table.
    fn assets(
        &self,
    ) -> crate::store::LocalFuture<Result<Vec<StoredAsset>, crate::store::StoreError>>;
    /// At most `limit` rows of the key table with an asset id above `after` (in RFC 4122
    /// byte order), in `state` if given, in asset id order (LIST_ASSETS). A source that
    /// does not list says so.
    fn asset_page(
        &self,
        after: uuid::Uuid,
        state: Option<crate::lifecycle::AssetState>,
        limit: usize,
    ) -> crate::store::LocalFuture<Result<Vec<crate::store::ListedRow>, crate::store::StoreError>>
    {
        let _ = (after, state, limit);
        Box::pin(async {
            Err(crate::store::StoreError::Unavailable(
                "this source does not list assets".into(),
            ))
        })
    }
}

/// How a run reads: its page size, and what it awaits between pages (the appliance
/// sleeps there to hold `audit.reconcile_records_per_s`).
pub struct Pace<'a> {
    /// Records read at most per page.
    pub page_records: usize,
    /// Awaited after each page with the number of records it held.
    pub after_page: Option<&'a dyn Fn(usize) -> crate::store::LocalFuture<()>>,
}

impl Pace<'static> {
    /// As fast as the store answers, in pages of [`PAGE_RECORDS`] (offline and benches).
    pub const FULL_SPEED: Pace<'static> = Pace {
        page_records: PAGE_RECORDS,
        after_page: None,
    };
}

/// A run over `source` from the reconciler's watermarks: every shard's new records and
/// checkpoints, page by page, then the key table.
///
/// What must agree is read in one short snapshot: each shard's head (its last sequence
/// number) and the key table, committed together by the same batches. The records and
/// checkpoints up to those heads are append-only, so they are read afterwards in pages,
/// each its own short read, and anything written after the snapshot is left for the next
/// run. A run thus holds no read transaction open while it hashes: on SQLite a long one
/// holds back the WAL's checkpoints, and the commits of the derive path pay for it.
pub async fn reconcile(
    r: &mut Reconciler,
    source: &dyn AuditSource,
    mac: Option<MacCheck<'_>>,
    pace: &Pace<'_>,
) -> Result<Report, crate::store::StoreError> {
    // On a copy: a run that fails half way leaves the watermarks where they were, so
    // nothing it passed goes unreported.
    let mut work = r.clone();
    source.begin().await?;
    let frame = read_frame(source).await;
    let ended = source.end().await;
    let (heads, assets) = frame?;
    ended?;
    let report = check_up_to(&mut work, source, mac, pace, &heads, &assets).await?;
    *r = work;
    Ok(report)
}

/// A shard as the run's snapshot saw it.
struct Head {
    shard: u16,
    /// Its last record's sequence number.
    last_seq: u64,
    /// Checkpoints past that record: they name records that are not there (the last
    /// ones deleted). Only this snapshot can tell: later checkpoints may be new batches'.
    dangling: Vec<Checkpoint>,
}

/// Each shard's head and the key table, read in the caller's snapshot.
async fn read_frame(
    source: &dyn AuditSource,
) -> Result<(Vec<Head>, Vec<StoredAsset>), crate::store::StoreError> {
    let mut heads = Vec::new();
    for shard in source.shards().await? {
        let last_seq = source.last_seq(shard).await?;
        let dangling = source
            .checkpoints(shard, last_seq + 1, u64::MAX >> 1)
            .await?;
        heads.push(Head {
            shard,
            last_seq,
            dangling,
        });
    }
    Ok((heads, source.assets().await?))
}

/// Checks every shard's records and checkpoints from its watermark up to its head, then
/// the key table against them.
async fn check_up_to(
    r: &mut Reconciler,
    source: &dyn AuditSource,
    mac: Option<MacCheck<'_>>,
    pace: &Pace<'_>,
    heads: &[Head],
    assets: &[StoredAsset],
) -> Result<Report, crate::store::StoreError> {
    let mut run = r.run(mac);
    for head in heads {
        let (shard, end) = (head.shard, head.last_seq);
        let mut cursor = run.r.watermark(shard).next_seq;
        while cursor <= end {
            let from = cursor;
            let limit = (end - from + 1).min(pace.page_records.max(1) as u64) as usize;
            cursor = cursor.saturating_add(limit as u64);
            let rows = source.records(shard, from, limit).await?;
            // A range with no record (deleted): the next record found shows the gap.
            let Some(last) = rows.last().map(|r| r.seq) else {
                continue;
            };
            let mut cps = source.checkpoints(shard, from, last).await?;
            let mut page = Vec::with_capacity(rows.len());
            for row in &rows {
                let parsed = match &row.row {
                    Ok(r) => logged_from_row(r),
                    Err(why) => Err(why.clone()),
                };
                match parsed {
                    Ok(lr) => page.push(lr),
                    Err(why) => {
                        // The checkpoints before this row go with the records before it.
                        let before: Vec<Checkpoint> =
                            cps.iter().filter(|c| c.seq < row.seq).copied().collect();
                        cps.retain(|c| c.seq > row.seq);
                        run.shard(shard, &page, &before);
                        page.clear();
                        run.unreadable(shard, row.seq, why);
                    }
                }
            }
            run.shard(shard, &page, &cps);
            if let Some(after_page) = pace.after_page {
                after_page(rows.len()).await;
            }
        }
        // Checkpoints past the last record checked name records that are not there:
        // up to the head (records deleted in the middle of a page's range), and past it.
        let next = run.r.watermark(shard).next_seq;
        let mut dangling = if next <= end {
            source.checkpoints(shard, next, end).await?
        } else {
            Vec::new()
        };
        dangling.extend(head.dangling.iter().copied());
        run.shard(shard, &[], &dangling);
    }
    Ok(run.finish(assets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::AssetState;
    use std::sync::Arc;

    fn record(shard: u16, seq: u64, event: AuditEvent, asset: Uuid, counter: u64) -> AuditRecord {
        AuditRecord {
            shard,
            seq,
            event,
            asset,
            counter,
            state: AssetState::Active,
            requester: Arc::from("t"),
            request_id: seq,
            ts_ms: 1_000 + seq,
            derive: None,
            rotation_id: None,
            switched_region: None,
        }
    }

    /// Records chained as a shard writes them.
    fn chained(records: Vec<AuditRecord>, prev: &mut [u8; 32]) -> Vec<LoggedRecord> {
        let mut scratch = Vec::new();
        records
            .into_iter()
            .map(|record| {
                let hash = chain_hash(&record, prev, &mut scratch);
                let lr = LoggedRecord {
                    record,
                    prev_hash: Some(*prev),
                    hash: Some(hash),
                };
                *prev = hash;
                lr
            })
            .collect()
    }

    fn stored(asset: Uuid, counter: u64) -> StoredAsset {
        StoredAsset {
            asset,
            state: AssetState::Active,
            counter,
        }
    }

    #[test]
    fn a_clean_log_then_an_incremental_run_checks_only_new_records() {
        let a = Uuid::from_u128(1);
        let mut head = GENESIS;
        let first = chained(
            vec![
                record(0, 1, AuditEvent::Register, a, 0),
                record(0, 2, AuditEvent::Derive, a, 0),
            ],
            &mut head,
        );
        let mut r = Reconciler::new();
        let mut run = r.run(None);
        run.shard(0, &first, &[]);
        let report = run.finish(&[stored(a, 0)]);
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        assert_eq!((report.records_checked, report.drift_ratio), (2, 0.0));
        assert_eq!(r.watermark(0).next_seq, 3);
        // The next run starts at the watermark: only the rotation is read.
        let next = chained(vec![record(0, 3, AuditEvent::Rotate, a, 1)], &mut head);
        let mut run = r.run(None);
        run.shard(0, &next, &[]);
        let report = run.finish(&[stored(a, 1)]);
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        assert_eq!(report.records_checked, 1);
        // A stored counter behind the log: drift, half of two assets.
        let b = Uuid::from_u128(2);
        let more = chained(vec![record(0, 4, AuditEvent::Register, b, 0)], &mut head);
        let mut run = r.run(None);
        run.shard(0, &more, &[]);
        let report = run.finish(&[stored(a, 0), stored(b, 0)]);
        assert_eq!(report.count(FindingKind::CounterDrift), 1);
        assert_eq!(report.drift_ratio, 0.5);
    }

    #[test]
    fn regressions_missing_registrations_and_checkpoints_are_found() {
        let a = Uuid::from_u128(1);
        // Records from before the chain (no hashes) whose counter goes backward.
        let legacy: Vec<LoggedRecord> = [
            record(0, 1, AuditEvent::Derive, a, 0),
            record(0, 2, AuditEvent::Rotate, a, 1),
            record(0, 3, AuditEvent::Derive, a, 0),
        ]
        .into_iter()
        .map(|record| LoggedRecord {
            record,
            prev_hash: None,
            hash: None,
        })
        .collect();
        let mut r = Reconciler::new();
        let mut run = r.run(None);
        run.shard(0, &legacy, &[]);
        let report = run.finish(&[stored(a, 0)]);
        let kinds: Vec<FindingKind> = report.findings.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [
                FindingKind::CounterRegression,
                FindingKind::MissingAuditEntry
            ],
            "{:?}",
            report.findings
        );

        // A checkpoint that does not match, one whose MAC fails, one past the log.
        let mut head = GENESIS;
        let log = chained(
            vec![
                record(1, 1, AuditEvent::Register, a, 0),
                record(1, 2, AuditEvent::Derive, a, 0),
            ],
            &mut head,
        );
        let cp = |seq, hash| Checkpoint {
            shard: 1,
            seq,
            hash,
            mac: [0; 32],
            ts_ms: 0,
        };
        let good_hash = log[1].hash.unwrap();
        let reject_all = |_: &Checkpoint| false;
        let mut r = Reconciler::new();
        let mut run = r.run(Some(&reject_all));
        run.shard(
            1,
            &log,
            &[cp(1, [9; 32]), cp(2, good_hash), cp(5, good_hash)],
        );
        let report = run.finish(&[stored(a, 0)]);
        let details: Vec<&str> = report.findings.iter().map(|f| f.detail.as_str()).collect();
        assert_eq!(report.count(FindingKind::ChainBroken), 3, "{details:?}");
        assert!(details[0].contains("does not match"), "{details:?}");
        assert!(details[1].contains("MAC does not verify"), "{details:?}");
        assert!(details[2].contains("not in the log"), "{details:?}");
        assert_eq!(r.watermark(1).checkpointed, 0);
    }

    #[test]
    fn a_second_break_after_the_first_is_found_too_and_a_failed_run_changes_nothing() {
        let a = Uuid::from_u128(1);
        let mut head = GENESIS;
        let mut log = chained(
            (1..=6)
                .map(|seq| {
                    record(
                        0,
                        seq,
                        if seq == 1 {
                            AuditEvent::Register
                        } else {
                            AuditEvent::Derive
                        },
                        a,
                        0,
                    )
                })
                .collect(),
            &mut head,
        );
        log[1].record.request_id = 77; // changed: seq 2
        log[4].record.request_id = 78; // changed: seq 5
        let mut r = Reconciler::new();
        let mut run = r.run(None);
        run.shard(0, &log, &[]);
        let report = run.finish(&[stored(a, 0)]);
        let seqs: Vec<Option<u64>> = report.findings.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, [Some(2), Some(5)], "{:?}", report.findings);

        // A source that fails half way: the reconciler's state is left as it was.
        struct Failing;
        impl AuditSource for Failing {
            fn begin(&self) -> crate::store::LocalFuture<Result<(), crate::store::StoreError>> {
                Box::pin(async { Ok(()) })
            }
            fn end(&self) -> crate::store::LocalFuture<Result<(), crate::store::StoreError>> {
                Box::pin(async { Ok(()) })
            }
            fn last_seq(
                &self,
                _: u16,
            ) -> crate::store::LocalFuture<Result<u64, crate::store::StoreError>> {
                Box::pin(async { Ok(3) })
            }
            fn shards(
                &self,
            ) -> crate::store::LocalFuture<Result<Vec<u16>, crate::store::StoreError>> {
                Box::pin(async { Ok(vec![7]) })
            }
            fn records(
                &self,
                _: u16,
                _: u64,
                _: usize,
            ) -> crate::store::LocalFuture<
                Result<Vec<crate::store::RowRead>, crate::store::StoreError>,
            > {
                Box::pin(async { Ok(Vec::new()) })
            }
            fn checkpoints(
                &self,
                _: u16,
                _: u64,
                _: u64,
            ) -> crate::store::LocalFuture<Result<Vec<Checkpoint>, crate::store::StoreError>>
            {
                Box::pin(async { Ok(Vec::new()) })
            }
            fn assets(
                &self,
            ) -> crate::store::LocalFuture<Result<Vec<StoredAsset>, crate::store::StoreError>>
            {
                Box::pin(async { Err(crate::store::StoreError::Unavailable("down".into())) })
            }
        }
        let before = r.watermark(0);
        assert!(futures_lite::future::block_on(reconcile(
            &mut r,
            &Failing,
            None,
            &Pace::FULL_SPEED
        ))
        .is_err());
        assert_eq!(r.watermark(0), before);
        assert_eq!(
            r.watermark(7),
            ShardMark::default(),
            "the failed run left no mark"
        );
    }

    #[test]
    fn proofs_say_what_they_found() {
        let a = Uuid::from_u128(1);
        let mut head = GENESIS;
        let log = chained(
            vec![
                record(0, 1, AuditEvent::Register, a, 0),
                record(0, 2, AuditEvent::Derive, a, 0),
                record(0, 3, AuditEvent::Derive, a, 0),
            ],
            &mut head,
        );
        let h1 = log[0].hash.unwrap();
        let cp = Checkpoint {
            shard: 0,
            seq: 3,
            hash: head,
            mac: [0; 32],
            ts_ms: 0,
        };
        let yes = |_: &Checkpoint| true;
        let no = |_: &Checkpoint| false;
        let verdict =
            |records: &[LoggedRecord], cp: Option<&Checkpoint>, mac: Option<MacCheck<'_>>| {
                prove(1, &h1, records, cp, mac).0
            };
        assert_eq!(verdict(&log, Some(&cp), Some(&yes)), Verdict::Proven);
        assert_eq!(verdict(&log, Some(&cp), Some(&no)), Verdict::Broken);
        assert_eq!(verdict(&log, Some(&cp), None), Verdict::Unauthenticated);
        assert_eq!(verdict(&log, None, Some(&yes)), Verdict::Unauthenticated);
        assert_eq!(verdict(&log[1..], Some(&cp), Some(&yes)), Verdict::NotFound);
        let mut changed = log.clone();
        changed[1].record.counter = 9;
        assert_eq!(verdict(&changed, Some(&cp), Some(&yes)), Verdict::Broken);
        let mut first = log.clone();
        first[0].record.counter = 9;
        assert_eq!(verdict(&first, Some(&cp), Some(&yes)), Verdict::Broken);
        assert_eq!(
            prove(1, &[1; 32], &log, Some(&cp), Some(&yes)).0,
            Verdict::Mismatch
        );
    }

    /// A store written to while a run reads it: the run stops at the heads its snapshot
    /// saw, so a rotation committed meanwhile (its record and its counter together) is not
    /// half seen as drift; the next run takes it.
    #[test]
    fn a_run_stops_at_the_heads_of_its_snapshot() {
        use std::cell::{Cell, RefCell};
        fn row_of(lr: &LoggedRecord) -> crate::store::AuditRow {
            let r = &lr.record;
            crate::store::AuditRow {
                shard: r.shard,
                seq: r.seq,
                event: r.event,
                asset: r.asset,
                counter: r.counter,
                state: r.state,
                requester: r.requester.to_string(),
                request_id: r.request_id,
                ts_ms: r.ts_ms,
                derivation_path: None,
                purpose: None,
                region: None,
                ttl_s: None,
                scheme_version: None,
                rotation_id: r.rotation_id,
                prev_hash: lr.prev_hash,
                hash: lr.hash,
            }
        }
        type Fut<T> = crate::store::LocalFuture<Result<T, crate::store::StoreError>>;
        struct Growing {
            rows: RefCell<Vec<crate::store::AuditRow>>,
            assets: RefCell<Vec<StoredAsset>>,
            /// Committed at the first page read: a rotation, record and counter.
            pending: RefCell<Option<(crate::store::AuditRow, StoredAsset)>>,
            in_snapshot: Cell<bool>,
        }
        impl AuditSource for Growing {
            fn begin(&self) -> Fut<()> {
                self.in_snapshot.set(true);
                Box::pin(async { Ok(()) })
            }
            fn end(&self) -> Fut<()> {
                self.in_snapshot.set(false);
                Box::pin(async { Ok(()) })
            }
            fn shards(&self) -> Fut<Vec<u16>> {
                Box::pin(async { Ok(vec![0]) })
            }
            fn last_seq(&self, _: u16) -> Fut<u64> {
                let last = self.rows.borrow().last().map_or(0, |r| r.seq);
                Box::pin(async move { Ok(last) })
            }
            fn records(&self, _: u16, from: u64, limit: usize) -> Fut<Vec<crate::store::RowRead>> {
                assert!(
                    !self.in_snapshot.get(),
                    "pages are read outside the snapshot"
                );
                if let Some((row, asset)) = self.pending.borrow_mut().take() {
                    self.rows.borrow_mut().push(row);
                    self.assets.borrow_mut()[0] = asset;
                }
                let rows: Vec<_> = self
                    .rows
                    .borrow()
                    .iter()
                    .filter(|r| r.seq >= from && r.seq < from + limit as u64)
                    .map(|r| crate::store::RowRead {
                        seq: r.seq,
                        row: Ok(r.clone()),
                    })
                    .collect();
                Box::pin(async move { Ok(rows) })
            }
            fn checkpoints(&self, _: u16, _: u64, _: u64) -> Fut<Vec<Checkpoint>> {
                Box::pin(async { Ok(Vec::new()) })
            }
            fn assets(&self) -> Fut<Vec<StoredAsset>> {
                assert!(
                    self.in_snapshot.get(),
                    "the key table is read in the snapshot"
                );
                let assets = self.assets.borrow().clone();
                Box::pin(async move { Ok(assets) })
            }
        }
        let a = Uuid::from_u128(7);
        let mut head = GENESIS;
        let first = chained(vec![record(0, 1, AuditEvent::Register, a, 0)], &mut head);
        let mut rotation = record(0, 2, AuditEvent::Rotate, a, 1);
        rotation.rotation_id = Some(Uuid::from_u128(99));
        let second = chained(vec![rotation], &mut head);
        let source = Growing {
            rows: RefCell::new(vec![row_of(&first[0])]),
            assets: RefCell::new(vec![stored(a, 0)]),
            pending: RefCell::new(Some((row_of(&second[0]), stored(a, 1)))),
            in_snapshot: Cell::new(false),
        };
        let mut r = Reconciler::new();
        let run = |r: &mut Reconciler| {
            futures_lite::future::block_on(reconcile(r, &source, None, &Pace::FULL_SPEED)).unwrap()
        };
        let report = run(&mut r);
        assert_eq!(report.records_checked, 1, "the rotation is past the head");
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        let report = run(&mut r);
        assert_eq!(report.records_checked, 1, "the next run takes it");
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        assert_eq!(report.assets_drifted, 0);
    }

    #[test]
    fn rows_with_columns_the_hash_does_not_cover_are_refused() {
        let row = crate::store::AuditRow {
            shard: 0,
            seq: 1,
            event: AuditEvent::Register,
            asset: Uuid::from_u128(1),
            counter: 0,
            state: AssetState::Active,
            requester: "t".into(),
            request_id: 1,
            ts_ms: 1,
            derivation_path: None,
            purpose: None,
            region: None,
            ttl_s: None,
            scheme_version: None,
            rotation_id: None,
            prev_hash: None,
            hash: None,
        };
        assert!(logged_from_row(&row).is_ok());
        for spoil in [
            |r: &mut crate::store::AuditRow| r.purpose = Some("TRADING".into()),
            |r: &mut crate::store::AuditRow| r.region = Some("EU-WEST".into()),
            |r: &mut crate::store::AuditRow| r.rotation_id = Some(Uuid::nil()),
        ] {
            let mut bad = row.clone();
            spoil(&mut bad);
            assert!(logged_from_row(&bad).is_err(), "{bad:?}");
        }
    }
}

/// What a receipt's proof found (codes on the wire: never renumber).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[repr(u8)]
pub enum Verdict {
    /// The record is there with the receipt's hash, its fields match it, and a checkpoint
    /// at or after it verifies through the chain.
    Proven = 1,
    /// The record is there and matches, but no checkpoint covers it yet (its batch went
    /// while sealed, or the newest checkpoints are missing).
    Unauthenticated = 2,
    /// A record is there with another hash than the receipt's.
    Mismatch = 3,
    /// No record at the receipt's shard and sequence number.
    NotFound = 4,
    /// The chain from the record to the checkpoint, or the checkpoint, does not verify.
    Broken = 5,
}

impl Verdict {
    pub fn from_u8(v: u8) -> Option<Verdict> {
        [
            Verdict::Proven,
            Verdict::Unauthenticated,
            Verdict::Mismatch,
            Verdict::NotFound,
            Verdict::Broken,
        ]
        .into_iter()
        .find(|x| *x as u8 == v)
    }
}

/// Proves a receipt (shard, seq, hash): `records` are the log's records from `seq` on
/// (up to and including the checkpoint's), `checkpoint` the first at or after `seq`.
pub fn prove(
    seq: u64,
    hash: &[u8; 32],
    records: &[LoggedRecord],
    checkpoint: Option<&Checkpoint>,
    mac: Option<MacCheck<'_>>,
) -> (Verdict, String) {
    let Some(first) = records.first().filter(|r| r.record.seq == seq) else {
        return (Verdict::NotFound, format!("no record {seq} in the log"));
    };
    if first.hash.as_ref() != Some(hash) {
        return (
            Verdict::Mismatch,
            "the record at the receipt's position has another hash".into(),
        );
    }
    let mut scratch = Vec::new();
    let Some(prev) = first.prev_hash else {
        return (Verdict::Broken, "the record is not chained".into());
    };
    if chain_hash(&first.record, &prev, &mut scratch) != *hash {
        return (
            Verdict::Broken,
            "the record's fields do not match its hash (changed)".into(),
        );
    }
    let Some(cp) = checkpoint else {
        return (
            Verdict::Unauthenticated,
            "no checkpoint covers the record yet".into(),
        );
    };
    let mut head = *hash;
    for lr in records
        .iter()
        .skip(1)
        .take_while(|r| r.record.seq <= cp.seq)
    {
        let ok = lr.prev_hash == Some(head)
            && lr
                .hash
                .is_some_and(|h| chain_hash(&lr.record, &head, &mut scratch) == h);
        if !ok {
            return (
                Verdict::Broken,
                format!(
                    "the chain breaks at record {} before checkpoint {}",
                    lr.record.seq, cp.seq
                ),
            );
        }
        head = lr.hash.unwrap_or(head);
    }
    let reached = records.last().map(|r| r.record.seq) >= Some(cp.seq);
    if !reached || head != cp.hash {
        return (
            Verdict::Broken,
            format!(
                "checkpoint {} does not match the chain from the record",
                cp.seq
            ),
        );
    }
    match mac {
        Some(check) if !check(cp) => (
            Verdict::Broken,
            format!("checkpoint {}: its MAC does not verify", cp.seq),
        ),
        Some(_) => (
            Verdict::Proven,
            format!("covered by checkpoint {} (MAC verified)", cp.seq),
        ),
        None => (
            Verdict::Unauthenticated,
            format!(
                "covered by checkpoint {}, whose MAC was not checked (sealed)",
                cp.seq
            ),
        ),
    }
}
